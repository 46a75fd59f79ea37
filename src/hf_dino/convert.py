"""Checkpoints in and out.

In (`hf-dino convert SRC OUT`): the official DINO files (backbone-only `.pth`, full training checkpoints with
student, teacher and the loss center, torchvision ResNet-50 state dicts) and transformers `ViTModel` checkpoints
(such as `facebook/dino-vits16`) become a `DinoModel` folder. The architecture is read off the tensors' shapes.

Out (`hf-dino export SRC OUT`): the backbone of a `DinoModel` becomes a stock transformers checkpoint
(`ViTModel` / `ResNetModel`) with an image-processor config, loadable without hf_dino or remote code.

Official files are torch pickles. They are read with `torch.load(weights_only=True)` and one allowed class,
`argparse.Namespace` (the `args` of a full checkpoint); anything else in the pickle is refused.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import BitImageProcessor, ResNetConfig, ResNetModel, ViTConfig, ViTModel
from transformers.image_utils import PILImageResampling

from hf_dino.configuration_dino import PRESETS, DinoConfig
from hf_dino.modeling_dino import DinoModel

logger = logging.getLogger(__name__)

CENTER_FILE = "dino_center.safetensors"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Every official ViT uses 64-wide attention heads; the head count is not recorded in the tensors' shapes.
_HEAD_WIDTH = 64
# The only class a legitimate official checkpoint pickles besides tensors and containers.
_ALLOWED_GLOBALS = [argparse.Namespace]


class CheckpointFormatError(ValueError):
    """A checkpoint whose layout hf_dino does not recognise."""


# --------------------------------------------------------------------------------------------------------
# Reading files safely
# --------------------------------------------------------------------------------------------------------
def load_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    """Load an official checkpoint without unrestricted unpickling.

    Args:
        path: a `.pth`/`.pt` torch file or a `.safetensors` file.

    Returns:
        The loaded dict (a state dict, or a full checkpoint dict).

    Raises:
        ValueError: the file holds objects other than tensors, containers and `argparse.Namespace`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        with torch.serialization.safe_globals(_ALLOWED_GLOBALS):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"refusing to load {path}: it contains objects that a DINO checkpoint does not need "
            f"({str(error).splitlines()[0]}). hf_dino only unpickles tensors, containers and argparse.Namespace; "
            "if you trust the file, load it yourself and save its state dict with safetensors."
        ) from None
    if not isinstance(loaded, dict):
        raise CheckpointFormatError(
            f"{path} holds a {type(loaded).__name__}, not a state dict or a checkpoint dict"
        )
    return loaded


# --------------------------------------------------------------------------------------------------------
# Official layouts -> DinoModel names
# --------------------------------------------------------------------------------------------------------
def _strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}


def _split_network(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Split a student/teacher dict (`[module.]backbone.*`, `[module.]head.*`) into backbone and head dicts."""
    state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    backbone = _strip_prefix(state_dict, "backbone.")
    head = _strip_prefix(state_dict, "head.")
    leftover = [key for key in state_dict if not key.startswith(("backbone.", "head."))]
    if leftover:
        raise CheckpointFormatError(f"unexpected keys outside backbone./head.: {leftover[:10]}")
    return backbone, head


def _is_official_vit(state_dict: dict) -> bool:
    return "cls_token" in state_dict and "pos_embed" in state_dict and "patch_embed.proj.weight" in state_dict


def _is_torchvision_resnet(state_dict: dict) -> bool:
    return "conv1.weight" in state_dict and "layer1.0.conv1.weight" in state_dict


def vit_config_from_official(
    state_dict: dict[str, torch.Tensor], args: argparse.Namespace | None
) -> ViTConfig:
    """Read a ViT's architecture off the official tensors' shapes (and `args` when there are any)."""
    patch_weight = state_dict["patch_embed.proj.weight"]
    hidden_size, num_channels, patch_size = (
        patch_weight.shape[0],
        patch_weight.shape[1],
        patch_weight.shape[-1],
    )
    depth = 1 + max(int(match.group(1)) for key in state_dict if (match := re.match(r"blocks\.(\d+)\.", key)))
    num_positions = state_dict["pos_embed"].shape[1] - 1
    grid_side = int(round(num_positions**0.5))
    if grid_side * grid_side != num_positions:
        raise CheckpointFormatError(f"pos_embed holds {num_positions} patch positions, not a square grid")
    if args is not None and getattr(args, "patch_size", patch_size) != patch_size:
        raise CheckpointFormatError(
            f"args.patch_size {args.patch_size} disagrees with the weights' {patch_size}"
        )
    if hidden_size % _HEAD_WIDTH:
        raise CheckpointFormatError(
            f"embedding width {hidden_size} is not a multiple of {_HEAD_WIDTH}-wide heads"
        )
    return ViTConfig(
        **{key: value for key, value in PRESETS["vit_small_patch16"].items() if key != "backbone"}
        | {
            "hidden_size": hidden_size,
            "num_hidden_layers": depth,
            "num_attention_heads": hidden_size // _HEAD_WIDTH,
            "intermediate_size": state_dict["blocks.0.mlp.fc1.weight"].shape[0],
            "patch_size": patch_size,
            "image_size": grid_side * patch_size,
            "num_channels": num_channels,
        }
    )


def vit_from_official(state_dict: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Rename an official ViT state dict to `DinoModel.backbone` names (the fused qkv is split into q, k, v)."""
    renames = {
        "cls_token": "embeddings.cls_token",
        "pos_embed": "embeddings.position_embeddings",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight",
        "norm.bias": "layernorm.bias",
    }
    block_renames = {
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "attn.proj": "attention.o_proj",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    for index in range(depth):
        for old, new in block_renames.items():
            for kind in ("weight", "bias"):
                renames[f"blocks.{index}.{old}.{kind}"] = f"layers.{index}.{new}.{kind}"
    missing = sorted(set(renames) - set(state_dict))
    qkv_keys = [f"blocks.{index}.attn.qkv.{kind}" for index in range(depth) for kind in ("weight", "bias")]
    missing += [key for key in qkv_keys if key not in state_dict]
    unknown = sorted(set(state_dict) - set(renames) - set(qkv_keys))
    if missing or unknown:
        raise CheckpointFormatError(
            f"not an official ViT state dict: missing keys {missing[:10]}, unrecognised keys {unknown[:10]}"
        )
    converted = {new: state_dict[old] for old, new in renames.items()}
    for key in qkv_keys:  # the fused projection, rows ordered [query; key; value]
        index, kind = key.split(".")[1], key.split(".")[-1]
        for name, part in zip(("q_proj", "k_proj", "v_proj"), state_dict[key].chunk(3, dim=0)):
            converted[f"layers.{index}.attention.{name}.{kind}"] = part
    return converted


def resnet_from_torchvision(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a torchvision ResNet state dict (without `fc`) to transformers `ResNetModel` names."""
    converted = {}
    unknown = []
    for key, value in state_dict.items():
        if key.startswith("fc."):
            continue  # a classifier: not part of the backbone
        if match := re.fullmatch(r"conv1\.weight", key):
            converted["embedder.embedder.convolution.weight"] = value
        elif match := re.fullmatch(r"bn1\.(\w+)", key):
            converted[f"embedder.embedder.normalization.{match.group(1)}"] = value
        elif match := re.fullmatch(r"layer(\d)\.(\d+)\.conv(\d)\.weight", key):
            stage, block, conv = int(match.group(1)) - 1, match.group(2), int(match.group(3)) - 1
            converted[f"encoder.stages.{stage}.layers.{block}.layer.{conv}.convolution.weight"] = value
        elif match := re.fullmatch(r"layer(\d)\.(\d+)\.bn(\d)\.(\w+)", key):
            stage, block, conv = int(match.group(1)) - 1, match.group(2), int(match.group(3)) - 1
            converted[
                f"encoder.stages.{stage}.layers.{block}.layer.{conv}.normalization.{match.group(4)}"
            ] = value
        elif match := re.fullmatch(r"layer(\d)\.(\d+)\.downsample\.([01])\.(\w+)", key):
            stage, block = int(match.group(1)) - 1, match.group(2)
            part = "convolution" if match.group(3) == "0" else "normalization"
            converted[f"encoder.stages.{stage}.layers.{block}.shortcut.{part}.{match.group(4)}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointFormatError(f"unrecognised keys in the ResNet state dict: {unknown[:10]}")
    return converted


def resnet_config_from_torchvision(state_dict: dict[str, torch.Tensor]) -> ResNetConfig:
    depths = [
        1 + max(int(m.group(1)) for key in state_dict if (m := re.match(rf"layer{stage}\.(\d+)\.", key)))
        for stage in range(1, 5)
    ]
    if depths != [3, 4, 6, 3] or "layer1.0.conv3.weight" not in state_dict:
        raise CheckpointFormatError(
            f"only ResNet-50 (bottleneck, depths [3, 4, 6, 3]) is supported, got {depths}"
        )
    settings = {key: value for key, value in PRESETS["resnet50"].items() if key != "backbone"}
    settings["num_channels"] = state_dict["conv1.weight"].shape[1]
    return ResNetConfig(**settings)


def head_settings(head: dict[str, torch.Tensor], args: argparse.Namespace | None) -> dict[str, Any]:
    """Read the DINO head's sizes off its tensors: hidden/bottleneck/out dims, layers, batch norm."""
    if "last_layer.parametrizations.weight.original0" in head:  # saved with torch's newer weight-norm API
        head = dict(head)
        head["last_layer.weight_g"] = head.pop("last_layer.parametrizations.weight.original0")
        head["last_layer.weight_v"] = head.pop("last_layer.parametrizations.weight.original1")
    if "last_layer.weight_v" not in head:
        raise CheckpointFormatError(
            f"the head has no weight-normalised last layer; its keys: {sorted(head)[:10]}"
        )
    linear_indices = sorted(
        int(m.group(1))
        for key in head
        if (m := re.fullmatch(r"mlp\.(\d+)\.weight", key)) and head[key].ndim == 2
    )
    use_bn = any(key.endswith("running_mean") for key in head)
    if "mlp.weight" in head:
        layers, hidden_dim, bottleneck_dim = 1, 2048, head["mlp.weight"].shape[0]
    elif linear_indices:
        layers = len(linear_indices)
        hidden_dim = head[f"mlp.{linear_indices[0]}.weight"].shape[0]
        bottleneck_dim = head[f"mlp.{linear_indices[-1]}.weight"].shape[0]
    else:
        raise CheckpointFormatError(f"cannot read the head's MLP from keys {sorted(head)[:10]}")
    weight_g = head["last_layer.weight_g"]
    norm_last_layer = getattr(args, "norm_last_layer", None)
    if norm_last_layer is None:  # no args: a norm frozen at 1 is what norm_last_layer=True leaves behind
        norm_last_layer = bool(torch.all(weight_g == 1))
    return {
        "out_dim": head["last_layer.weight_v"].shape[0],
        "hidden_dim": hidden_dim,
        "bottleneck_dim": bottleneck_dim,
        "head_layers": layers,
        "use_bn_in_head": use_bn,
        "norm_last_layer": bool(norm_last_layer),
        "_state": head,
    }


def _model_from_parts(
    backbone: dict[str, torch.Tensor],
    head: dict[str, torch.Tensor] | None,
    args: argparse.Namespace | None,
    out_dim: int | None,
) -> DinoModel:
    if _is_official_vit(backbone):
        backbone_config = vit_config_from_official(backbone, args)
        backbone_state = vit_from_official(backbone, backbone_config.num_hidden_layers)
    elif _is_torchvision_resnet(backbone):
        backbone_config = resnet_config_from_torchvision(backbone)
        backbone_state = resnet_from_torchvision(backbone)
    else:
        raise CheckpointFormatError(
            "unknown checkpoint layout: expected an official ViT (cls_token, pos_embed, patch_embed.*, blocks.N.*) "
            f"or a torchvision ResNet-50 (conv1, layer1..4); got keys {sorted(backbone)[:12]}"
        )
    head_kwargs: dict[str, Any] = {}
    head_state: dict[str, torch.Tensor] = {}
    if head:
        head_kwargs = head_settings(head, args)
        head_state = head_kwargs.pop("_state")
    elif out_dim is not None:
        head_kwargs["out_dim"] = out_dim
    config = DinoConfig(backbone_config=backbone_config, **head_kwargs)
    model = DinoModel(config)
    state = {f"backbone.{key}": value for key, value in backbone_state.items()}
    state |= {f"head.{key}": value for key, value in head_state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if not (not head and key.startswith("head."))]
    if missing or unexpected:
        raise CheckpointFormatError(f"layout mismatch: missing {missing[:10]}, unexpected {unexpected[:10]}")
    if not head:
        logger.warning(
            "the checkpoint has no DINO head: the head (out_dim %d) is randomly initialised", config.out_dim
        )
    return model.eval()


def convert_official(
    path: str | os.PathLike, *, checkpoint_key: str = "teacher", out_dim: int | None = None
) -> tuple[DinoModel, torch.Tensor | None]:
    """Build a `DinoModel` from an official DINO file.

    Args:
        path: a backbone-only `.pth` (ViT or ResNet-50), or a full training checkpoint.
        checkpoint_key: in a full checkpoint, "teacher" (what the authors evaluate) or "student".
        out_dim: head size for a backbone-only file (its head is randomly initialised).

    Returns:
        `(model, center)`: the model in eval mode and, for a full checkpoint, the loss center `(1, out_dim)`.
    """
    loaded = load_checkpoint_file(path)
    args = loaded.get("args") if isinstance(loaded.get("args"), argparse.Namespace) else None
    if "teacher" in loaded or "student" in loaded:
        if checkpoint_key not in loaded:
            raise CheckpointFormatError(f"{path} has no {checkpoint_key!r} network; keys: {sorted(loaded)}")
        backbone, head = _split_network(loaded[checkpoint_key])
        center = (
            loaded.get("dino_loss", {}).get("center") if isinstance(loaded.get("dino_loss"), dict) else None
        )
        return _model_from_parts(backbone, head, args, out_dim), center
    for wrapper in ("state_dict", "model"):  # common wrappers around a plain state dict
        if wrapper in loaded and isinstance(loaded[wrapper], dict):
            loaded = loaded[wrapper]
    tensors = {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}
    if len(tensors) != len(loaded):
        raise CheckpointFormatError(
            f"unknown checkpoint layout; non-tensor entries {sorted(set(loaded) - set(tensors))}"
        )
    tensors = {key.removeprefix("module."): value for key, value in tensors.items()}
    if any(key.startswith("backbone.") for key in tensors):
        backbone, head = _split_network(tensors)
        return _model_from_parts(backbone, head, args, out_dim), None
    return _model_from_parts(tensors, None, args, out_dim), None


def convert_transformers_vit(
    name_or_path: str, *, revision: str | None = None, out_dim: int | None = None
) -> DinoModel:
    """Build a `DinoModel` from a transformers `ViTModel` checkpoint (e.g. `facebook/dino-vits16`).

    The backbone is copied as is; the head, absent from such checkpoints, is randomly initialised. The layer-norm
    epsilon is set to the original 1e-6 (those checkpoints say 1e-12, but DINO trained its weights with 1e-6).
    """
    vit = ViTModel.from_pretrained(name_or_path, revision=revision, add_pooling_layer=False)
    vit_config = vit.config
    vit_config.layer_norm_eps = 1e-6
    config = DinoConfig(backbone_config=vit_config, **({"out_dim": out_dim} if out_dim else {}))
    model = DinoModel(config)
    missing, unexpected = model.backbone.load_state_dict(vit.state_dict(), strict=False)
    if missing or unexpected:
        raise CheckpointFormatError(
            f"ViTModel layout mismatch: missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    logger.warning(
        "%s has no DINO head: the head (out_dim %d) is randomly initialised", name_or_path, config.out_dim
    )
    return model.eval()


# --------------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------------
def image_processor_for(config: DinoConfig) -> BitImageProcessor:
    """The evaluation preprocessing of the paper: bicubic resize of the short side to 256, centre crop 224,
    ImageNet mean/std (scaled to the model's input size when it is not 224; mean/std 0.5 for non-RGB models)."""
    if config.is_vit:
        size = config.backbone_config.image_size
        crop = size if isinstance(size, int) else size[0]
    else:
        crop = 224
    channels = config.backbone_config.num_channels
    # hf_dino trains grayscale and other non-RGB inputs with mean/std 0.5 per channel.
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,) * channels, (0.5,) * channels)
    return BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": round(crop * 256 / 224)},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": crop, "width": crop},
        do_normalize=True,
        image_mean=list(mean),
        image_std=list(std),
        do_convert_rgb=channels == 3,
    )


def save_dino_model(
    model: DinoModel, output_dir: str | os.PathLike, center: torch.Tensor | None = None
) -> Path:
    """`save_pretrained` + image-processor config + the DINO center (`dino_center.safetensors`) when given."""
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    image_processor_for(model.config).save_pretrained(output_dir)
    if center is not None:
        save_file(
            {"center": center.detach().float().cpu().contiguous().reshape(1, -1)},
            str(output_dir / CENTER_FILE),
        )
    return output_dir


def load_center(model_dir: str | os.PathLike) -> torch.Tensor | None:
    """The DINO center saved next to a model, `(1, out_dim)`, or None."""
    path = Path(model_dir) / CENTER_FILE
    return load_file(str(path))["center"] if path.is_file() else None


def export_backbone(model: DinoModel | str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Write the backbone of a DinoModel as a stock transformers checkpoint (`ViTModel` or `ResNetModel`).

    `ViTModel.from_pretrained(output_dir, add_pooling_layer=False)` then loads it with no missing or unexpected
    keys, `AutoModel.from_pretrained(output_dir)` works without remote code, and the saved image-processor
    config makes `pipeline("image-feature-extraction", model=output_dir)` work.
    """
    if not isinstance(model, DinoModel):
        model = DinoModel.from_pretrained(model)
    backbone_config = model.config.backbone_config
    if model.config.is_vit:
        stock = ViTModel(backbone_config, add_pooling_layer=False)
    else:
        stock = ResNetModel(backbone_config)
    stock.load_state_dict(model.backbone.state_dict(), strict=True)
    output_dir = Path(output_dir)
    stock.save_pretrained(output_dir)
    image_processor_for(model.config).save_pretrained(output_dir)
    return output_dir


# --------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------
def convert_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-dino convert",
        description="Convert an official DINO checkpoint (.pth backbone or full training checkpoint), a "
        "torchvision ResNet-50 state dict, or a transformers ViTModel (folder or Hub id, e.g. "
        "facebook/dino-vits16) into a DinoModel folder. The architecture is read off the weights.",
    )
    parser.add_argument(
        "source", help="a .pth/.safetensors file, a transformers model folder, or a Hub model id"
    )
    parser.add_argument("output_dir", help="folder to write the DinoModel to")
    parser.add_argument(
        "--checkpoint-key",
        default="teacher",
        choices=("teacher", "student"),
        help="which network of a full checkpoint to convert (the authors evaluate the teacher)",
    )
    parser.add_argument(
        "--out-dim",
        type=int,
        default=None,
        help="head output size when the source has no head (default 65536)",
    )
    parser.add_argument("--revision", default=None, help="Hub revision of a transformers source")
    args = parser.parse_args(argv)
    source = Path(args.source)
    center = None
    if source.is_file():
        model, center = convert_official(source, checkpoint_key=args.checkpoint_key, out_dim=args.out_dim)
    else:
        model = convert_transformers_vit(args.source, revision=args.revision, out_dim=args.out_dim)
    save_dino_model(model, args.output_dir, center)
    parts = ["backbone", "head"] + (["center"] if center is not None else [])
    print(f"wrote a DinoModel ({', '.join(parts)}) to {args.output_dir}")
    return 0


def export_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-dino export",
        description="Write the backbone of a DinoModel folder as a stock transformers checkpoint "
        "(ViTModel or ResNetModel) that loads without hf_dino.",
    )
    parser.add_argument("source", help="a DinoModel folder (or Hub id)")
    parser.add_argument("output_dir", help="folder to write the transformers checkpoint to")
    args = parser.parse_args(argv)
    export_backbone(args.source, args.output_dir)
    print(f"wrote a transformers backbone checkpoint to {args.output_dir}")
    return 0


__all__ = [
    "CENTER_FILE",
    "CheckpointFormatError",
    "convert_official",
    "convert_transformers_vit",
    "export_backbone",
    "load_center",
    "load_checkpoint_file",
    "save_dino_model",
]
