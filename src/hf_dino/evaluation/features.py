"""Frozen features of a `datasets` image dataset, with an on-disk cache so that sweeps are cheap.

A model here is a hf_dino `DinoModel` (local, Hub, or remote code) or a stock transformers `ViTModel`
(e.g. `facebook/dino-vits16`, or the `backbone/` export of a hf_dino repo). The features are what the
paper evaluates (paper §4.1, official eval scripts):

- `n_last_blocks=1`: the final-norm CLS token (`DinoModel.forward_features`) — the k-NN protocol;
- `n_last_blocks=4`: the CLS tokens of the last 4 blocks, each with the final norm, concatenated — the
  ViT-S linear protocol;
- `avgpool_patch_tokens=True`: the CLS token(s) plus the average of the last block's patch tokens — the
  ViT-B linear protocol.

Images are resized (shorter side, bicubic) and centre-cropped, 256 / 224 by default as in the paper's
evaluation; for small images choose smaller sizes (e.g. `resize_size=None, crop_size=28` for
Fashion-MNIST at its native size).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision import transforms
from torchvision.transforms import InterpolationMode

# ImageNet statistics: every official DINO checkpoint was trained with them (official default).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Column names that hold images when the dataset's features do not say (checked in this order).
IMAGE_COLUMN_NAMES = (
    "image",
    "img",
    "images",
    "picture",
    "photo",
    "png",
    "jpg",
    "jpeg",
    "webp",
    "pixel_values",
)
RAW_PIXELS = "raw-pixels"


def default_normalization(num_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet mean/std for RGB; 0.5 / 0.5 per channel otherwise (as `hf_dino.augmentation` trains them)."""
    if num_channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.5,) * num_channels, (0.5,) * num_channels


def to_model_image(image: Any, num_channels: int) -> Image.Image:
    """A dataset's image value as a PIL image in the mode the model reads ("RGB" or "L").

    16-bit and float greyscale images are rescaled to 8 bits rather than clipped; palette, RGBA and CMYK
    images are converted (transparent pixels become black, as Pillow's RGB conversion does).

    Args:
        image: a PIL image, a numpy array `(H, W)` / `(H, W, C)`, or a `{"bytes", "path"}` dict.
        num_channels: 1 or 3.
    """
    if isinstance(image, dict):
        if image.get("bytes") is not None:
            import io

            image = Image.open(io.BytesIO(image["bytes"]))
        elif image.get("path"):
            image = Image.open(image["path"])
        else:
            raise ValueError("an image entry holds neither bytes nor a path")
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"cannot read an image from a {type(image).__name__}")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if num_channels == 1:
        return image if image.mode == "L" else image.convert("RGB").convert("L")
    if num_channels == 3:
        return image if image.mode == "RGB" else image.convert("RGB")
    raise ValueError(f"evaluation reads 1- or 3-channel images; the model expects {num_channels} channels")


@dataclass(frozen=True)
class EvaluationTransform:
    """Resize (shorter side, bicubic) then centre-crop, to a normalised tensor (the paper's test transform).

    Attributes:
        resize_size: shorter side after resizing (256 in the paper); None keeps the image's size.
        crop_size: side of the centre crop (224 in the paper).
        num_channels: 1 (greyscale) or 3 (RGB), as the model expects.
        mean, std: per-channel normalisation (default: ImageNet, see `default_normalization`).
    """

    resize_size: int | None = 256
    crop_size: int = 224
    num_channels: int = 3
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        default_mean, default_std = default_normalization(self.num_channels)
        object.__setattr__(self, "mean", tuple(float(v) for v in (self.mean or default_mean)))
        object.__setattr__(self, "std", tuple(float(v) for v in (self.std or default_std)))
        if len(self.mean) != self.num_channels or len(self.std) != self.num_channels:
            raise ValueError(f"mean and std need {self.num_channels} values, got {self.mean} and {self.std}")
        if self.crop_size < 1 or (self.resize_size is not None and self.resize_size < 1):
            raise ValueError(
                f"sizes must be positive, got resize {self.resize_size} and crop {self.crop_size}"
            )

    def build(self) -> Callable[[Image.Image], torch.Tensor]:
        steps: list[Callable] = []
        if self.resize_size is not None:
            steps.append(transforms.Resize(self.resize_size, interpolation=InterpolationMode.BICUBIC))
        steps += [
            transforms.CenterCrop(self.crop_size),
            transforms.ToTensor(),
            transforms.Normalize(self.mean, self.std),
        ]
        return transforms.Compose(steps)

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": type(self).__name__, **asdict(self)}


@dataclass(frozen=True)
class TrainingTransform:
    """Random-resized crop + horizontal flip (the paper's linear-probe training transform).

    Attributes:
        crop_size: output side (224 in the paper).
        scale: crop area range (torchvision's default (0.08, 1), as the official linear evaluation).
        num_channels, mean, std: as `EvaluationTransform`.
    """

    crop_size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    num_channels: int = 3
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        default_mean, default_std = default_normalization(self.num_channels)
        object.__setattr__(self, "mean", tuple(float(v) for v in (self.mean or default_mean)))
        object.__setattr__(self, "std", tuple(float(v) for v in (self.std or default_std)))

    def build(self) -> Callable[[Image.Image], torch.Tensor]:
        return transforms.Compose(
            [
                transforms.RandomResizedCrop(self.crop_size, scale=self.scale),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(self.mean, self.std),
            ]
        )

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": type(self).__name__, **asdict(self)}


# -------------------------------------------------------------------------------------------------------
# Models
# -------------------------------------------------------------------------------------------------------


def model_num_channels(model: nn.Module) -> int:
    """Input channels of a DinoModel or transformers vision model (3 when the config does not say)."""
    config = getattr(model, "config", None)
    backbone = getattr(config, "backbone_config", None) or config
    return int(getattr(backbone, "num_channels", 3))


class FeatureExtractor(nn.Module):
    """A frozen backbone turned into `pixel_values (B, C, H, W) -> features (B, D')`.

    Args:
        model: a hf_dino `DinoModel` (anything with `forward_features` and `get_intermediate_layers`), a
            transformers `ViTModel`-like model (`last_hidden_state` with a CLS token first and a final
            `layernorm`), or None for raw pixels (flattened, the paper's baseline).
        n_last_blocks: concatenate the final-norm CLS tokens of this many last blocks.
        avgpool_patch_tokens: also use the average of the last block's patch tokens.
        precision: "fp32" (the protocol), or "bf16" / "fp16" autocast for speed on accelerators.
    """

    def __init__(
        self,
        model: nn.Module | None,
        *,
        n_last_blocks: int = 1,
        avgpool_patch_tokens: bool = False,
        precision: str = "fp32",
    ) -> None:
        super().__init__()
        if n_last_blocks < 1:
            raise ValueError(f"n_last_blocks must be at least 1, got {n_last_blocks}")
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
        self.model = model
        self.n_last_blocks = n_last_blocks
        self.avgpool_patch_tokens = avgpool_patch_tokens
        self.precision = precision
        if model is None and (n_last_blocks != 1 or avgpool_patch_tokens):
            raise ValueError("raw pixels have no blocks or patch tokens")
        self.kind = self._kind(model)

    @staticmethod
    def _kind(model: nn.Module | None) -> str:
        if model is None:
            return "pixels"
        if hasattr(model, "forward_features") and hasattr(model, "get_intermediate_layers"):
            return "dino"
        if getattr(getattr(model, "config", None), "model_type", None) is not None:
            return "transformers"
        raise ValueError(f"{type(model).__name__} is neither a DinoModel nor a transformers model")

    @property
    def device(self) -> torch.device:
        if self.model is None:
            return torch.device("cpu")
        return next(self.model.parameters()).device

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "n_last_blocks": self.n_last_blocks,
            "avgpool_patch_tokens": self.avgpool_patch_tokens,
            "precision": self.precision,
        }

    def _blocks(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Final-norm tokens `(B, tokens, D)` of the last `n_last_blocks` blocks, oldest first."""
        model = self.model
        if self.kind == "dino":
            if self.n_last_blocks == 1 and not self.avgpool_patch_tokens:
                return [model.forward_features(pixel_values).unsqueeze(1)]
            return list(model.get_intermediate_layers(pixel_values, n=self.n_last_blocks))
        kwargs = {"interpolate_pos_encoding": True} if model.config.model_type == "vit" else {}
        if self.n_last_blocks == 1:
            output = model(pixel_values=pixel_values, **kwargs)
            if output.last_hidden_state.dim() == 4:  # a CNN (e.g. ResNetModel): its pooled vector
                return [output.pooler_output.flatten(1).unsqueeze(1)]
            return [output.last_hidden_state]
        output = model(pixel_values=pixel_values, output_hidden_states=True, **kwargs)
        final_norm = getattr(model, "layernorm", None)
        if final_norm is None:
            raise ValueError(
                f"{type(model).__name__} has no final `layernorm` to apply to intermediate blocks"
            )
        return [final_norm(hidden) for hidden in output.hidden_states[-self.n_last_blocks :]]

    # no_grad, not inference_mode: the online k-NN runs on the teacher in training, whose FSDP gather buffers
    # would become inference tensors that the next training step cannot write to.
    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Features `(B, D')` in float32 on the model's device (not normalised)."""
        if self.model is None:
            return pixel_values.flatten(1).float()
        pixel_values = pixel_values.to(self.device)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        # Frozen features: no drop path or dropout. The mode is restored, so a model that is being trained
        # (online k-NN during pretraining) goes on training as it was.
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.autocast(
                device_type=self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None
            ):
                blocks = self._blocks(pixel_values)
        finally:
            self.model.train(was_training)
        cls_tokens = torch.cat([block[:, 0] for block in blocks], dim=-1)
        if not self.avgpool_patch_tokens:
            return cls_tokens.float()
        if blocks[-1].shape[1] < 2:
            raise ValueError("average-pooled patch tokens need a ViT backbone")
        patch_mean = blocks[-1][:, 1:].mean(dim=1)
        if self.n_last_blocks == 1:
            # Interleaved [cls_0, avg_0, cls_1, avg_1, ...], the official layout, so that its released
            # linear heads line up (the official code supports the average only with one block).
            return torch.stack([cls_tokens, patch_mean], dim=-1).flatten(1).float()
        return torch.cat([cls_tokens, patch_mean], dim=-1).float()


def load_evaluation_model(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    subfolder: str = "",
    random_init: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a frozen model for evaluation, and describe where it came from (for records and cache keys).

    `name_or_path` may be a DinoModel folder, a training output folder (its `teacher/` is used), a stock
    transformers ViT folder, or a Hub repo id.

    Args:
        name_or_path: folder or Hub repo id.
        revision: Hub branch, tag or commit.
        subfolder: a folder inside the repo (e.g. "backbone" for the stock export).
        random_init: build the same architecture with freshly initialised weights (a baseline).
        seed: the seed of that initialisation.
        device: where to put the model.
        trust_remote_code: allow a Hub repo's own modeling code (only needed without hf_dino).

    Returns:
        `(model, identity)`: the model in eval mode, and `{"path", "revision", "weights_sha256"?,
        "random_init"?}`.
    """
    from transformers import AutoConfig, AutoModel, ViTModel

    import hf_dino  # noqa: F401  (registers DinoConfig / DinoModel with the Auto classes)

    path = Path(name_or_path)
    if (
        path.is_dir()
        and not (path / subfolder / "config.json").exists()
        and (path / "teacher" / "config.json").exists()
    ):
        path = path / "teacher"  # a training output folder: evaluate its final teacher
    name = str(path.resolve()) if path.exists() else str(name_or_path)
    config = AutoConfig.from_pretrained(
        name, revision=revision, subfolder=subfolder, trust_remote_code=trust_remote_code
    )
    load_kwargs: dict[str, Any] = {"add_pooling_layer": False} if config.model_type == "vit" else {}
    model_class = ViTModel if config.model_type == "vit" else AutoModel
    if random_init:
        torch.manual_seed(seed)
        model = ViTModel(config, **load_kwargs) if model_class is ViTModel else AutoModel.from_config(config)
    else:
        model = model_class.from_pretrained(
            name, revision=revision, subfolder=subfolder, trust_remote_code=trust_remote_code, **load_kwargs
        )
    identity: dict[str, Any] = {"path": name, "revision": revision}
    if subfolder:
        identity["subfolder"] = subfolder
    if random_init:
        identity["random_init"] = True
        identity["seed"] = seed
    elif Path(name).is_dir():
        identity["weights_sha256"] = _weights_digest(Path(name) / subfolder)
    else:
        commit = getattr(model.config, "_commit_hash", None)
        if commit:
            identity["revision"] = commit
    return model.to(device).eval(), identity


def _weights_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        if file.name == "dino_center.safetensors":
            continue
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


# -------------------------------------------------------------------------------------------------------
# Datasets
# -------------------------------------------------------------------------------------------------------


def detect_image_column(dataset: Any) -> str:
    """The image column of a `datasets` dataset: the first `Image` feature, else a usual column name."""
    import datasets

    features = getattr(dataset, "features", None) or {}
    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            return name
    columns = list(features) or list(getattr(dataset, "column_names", None) or [])
    for candidate in IMAGE_COLUMN_NAMES:
        if candidate in columns:
            return candidate
    raise ValueError(f"no image column found among {columns}; name it with --image-column")


def dataset_identity(dataset: Any, **known: Any) -> dict[str, Any]:
    """What identifies a dataset's content for the cache: the given fields plus its fingerprint and size."""
    identity = {key: value for key, value in known.items() if value is not None}
    fingerprint = getattr(dataset, "_fingerprint", None)
    if fingerprint:
        identity["fingerprint"] = fingerprint
    if hasattr(dataset, "__len__"):
        identity["num_rows"] = len(dataset)
    return identity


class _ImageBatches(torch.utils.data.Dataset):
    """Decodes and transforms rows on demand (in DataLoader workers when there are any)."""

    def __init__(
        self,
        dataset: Any,
        image_column: str,
        label_column: str | None,
        transform: Callable,
        num_channels: int,
    ):
        columns = [image_column] + ([label_column] if label_column else [])
        self.dataset = dataset.select_columns(columns) if hasattr(dataset, "select_columns") else dataset
        self.image_column = image_column
        self.label_column = label_column
        self.transform = transform
        self.num_channels = num_channels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = self.dataset[int(index)]
        image = self.transform(to_model_image(row[self.image_column], self.num_channels))
        label = row[self.label_column] if self.label_column else -1
        return image, -1 if label is None else int(label)


class FeatureCache:
    """Features on disk as safetensors files, one per key (a hash of everything that changes them).

    Args:
        directory: where the files go (created on first write).
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    @staticmethod
    def key(parts: dict[str, Any]) -> str:
        text = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.directory / f"features-{key}.safetensors"

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self.path(key)
        if not path.exists():
            return None
        try:
            return load_file(str(path))
        except Exception:  # a truncated or foreign file: recompute rather than fail
            return None

    def save(self, key: str, tensors: dict[str, torch.Tensor], parts: dict[str, Any]) -> Path:
        """Write atomically (temp file + rename), so that a killed run never leaves a broken entry."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        handle, temporary = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        os.close(handle)
        try:
            metadata = {"key_parts": json.dumps(parts, sort_keys=True, default=str)}
            save_file(
                {name: tensor.contiguous() for name, tensor in tensors.items()}, temporary, metadata=metadata
            )
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
        return path


def default_cache_directory() -> Path:
    """`$HF_DINO_CACHE/features`, else `~/.cache/hf_dino/features`."""
    root = os.environ.get("HF_DINO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hf_dino")
    return Path(root) / "features"


@dataclass
class ExtractedFeatures:
    """Features of one split.

    Attributes:
        features: `(num_images, dim)` float32 on CPU (L2-normalised when asked).
        labels: `(num_images,)` int64 (-1 where there is no label).
        from_cache: whether they were read from the cache.
    """

    features: torch.Tensor
    labels: torch.Tensor
    from_cache: bool = False
    cache_parts: dict[str, Any] = field(default_factory=dict)


def extract_features(
    extractor: FeatureExtractor | nn.Module | None,
    dataset: Any,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    transform: EvaluationTransform | TrainingTransform | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    normalize: bool = False,
    cache: FeatureCache | None = None,
    cache_identity: dict[str, Any] | None = None,
    progress: bool = False,
) -> ExtractedFeatures:
    """Run the frozen model over a dataset split and collect its features and labels.

    Args:
        extractor: a `FeatureExtractor`, a bare model (wrapped with the CLS-token defaults), or None for
            raw pixels.
        dataset: a `datasets.Dataset` (or anything indexable with rows as dicts).
        image_column: column holding images (detected when None).
        label_column: column holding integer labels (None: labels are -1).
        transform: how images become tensors (default: `EvaluationTransform()` for the model's channels).
        batch_size: images per forward pass.
        num_workers: DataLoader worker processes for decoding and resizing.
        normalize: L2-normalise the features (the k-NN protocol; the linear probe uses raw features).
        cache: where to keep and find features; None disables caching.
        cache_identity: what identifies the model and the dataset (`{"model": ..., "dataset": ...}`);
            caching needs it, as a bare model object has no stable name.
        progress: show a progress bar.

    Returns:
        `ExtractedFeatures` with `(num_images, dim)` float32 features and `(num_images,)` labels, on CPU.
    """
    if not isinstance(extractor, FeatureExtractor):
        extractor = FeatureExtractor(extractor)
    num_channels = model_num_channels(extractor.model) if extractor.model is not None else 3
    transform = transform or EvaluationTransform(num_channels=num_channels)
    if transform.num_channels != num_channels and extractor.model is not None:
        raise ValueError(
            f"the transform makes {transform.num_channels}-channel images; the model reads {num_channels}"
        )
    image_column = image_column or detect_image_column(dataset)
    if isinstance(transform, TrainingTransform):
        cache = None  # random views differ every time: nothing to reuse

    parts: dict[str, Any] = {}
    if cache is not None and cache_identity:
        parts = {
            **cache_identity,
            "image_column": image_column,
            "label_column": label_column,
            "transform": transform.fingerprint(),
            "features": extractor.describe(),
        }
        cached = cache.load(FeatureCache.key(parts))
        if cached is not None:
            features = F.normalize(cached["features"], dim=1) if normalize else cached["features"]
            return ExtractedFeatures(features, cached["labels"], from_cache=True, cache_parts=parts)

    loader = torch.utils.data.DataLoader(
        _ImageBatches(dataset, image_column, label_column, transform.build(), transform.num_channels),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=extractor.device.type == "cuda",
    )
    batches: Iterable = loader
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc="features", unit="batch")
    feature_chunks, label_chunks = [], []
    for pixel_values, labels in batches:
        feature_chunks.append(extractor(pixel_values).cpu())
        label_chunks.append(labels)
    if not feature_chunks:
        raise ValueError("the dataset split is empty")
    features, labels = torch.cat(feature_chunks), torch.cat(label_chunks).long()
    if cache is not None and parts:
        cache.save(FeatureCache.key(parts), {"features": features, "labels": labels}, parts)
    if normalize:
        features = F.normalize(features, dim=1)
    return ExtractedFeatures(features, labels, from_cache=False, cache_parts=parts)


__all__ = [
    "EvaluationTransform",
    "ExtractedFeatures",
    "FeatureCache",
    "FeatureExtractor",
    "TrainingTransform",
    "dataset_identity",
    "default_cache_directory",
    "default_normalization",
    "detect_image_column",
    "extract_features",
    "load_evaluation_model",
    "to_model_image",
]
