"""DinoConfig: the architecture of a DINO network (backbone + projection head), and nothing else.

The training recipe (learning rate, temperatures, crops, ...) lives in `hf_dino.training`; this config only
holds what is needed to rebuild the weights.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import PretrainedConfig, ResNetConfig, ViTConfig

# The paper's architectures (paper Table 2 / official vision_transformer.py and torchvision's ResNet-50).
# ViT settings common to every size: one CLS token, qkv bias, LayerNorm eps 1e-6 (the original; transformers'
# ViT default is 1e-12), exact GELU, 224-px positional grid.
_VIT_COMMON: dict[str, Any] = {
    "image_size": 224,
    "num_channels": 3,
    "qkv_bias": True,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "initializer_range": 0.02,
}
_VIT_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 192, "num_hidden_layers": 12, "num_attention_heads": 3, "intermediate_size": 768},
    "small": {
        "hidden_size": 384,
        "num_hidden_layers": 12,
        "num_attention_heads": 6,
        "intermediate_size": 1536,
    },
    "base": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
    },
}
_RESNET50: dict[str, Any] = {
    "num_channels": 3,
    "embedding_size": 64,
    "hidden_sizes": [256, 512, 1024, 2048],
    "depths": [3, 4, 6, 3],
    "layer_type": "bottleneck",
    "hidden_act": "relu",
    # torchvision's ResNet-50 (v1.5): stride in the 3x3 convolution, none in the first stage.
    "downsample_in_first_stage": False,
    "downsample_in_bottleneck": False,
}

# torchvision's ResNet-18: basic blocks. Not in the paper; a cheap convolutional backbone for small images
# and small budgets (the fashion_mnist preset).
_RESNET18: dict[str, Any] = {
    **_RESNET50,
    "hidden_sizes": [64, 128, 256, 512],
    "depths": [2, 2, 2, 2],
    "layer_type": "basic",
}

PRESETS: dict[str, dict[str, Any]] = {
    **{
        f"vit_{size}_patch{patch}": {"backbone": "vit", **_VIT_COMMON, **dims, "patch_size": patch}
        for size, dims in _VIT_SIZES.items()
        for patch in (16, 8)
    },
    "resnet50": {"backbone": "resnet", **_RESNET50},
    "resnet18": {"backbone": "resnet", **_RESNET18},
}

# DinoConfig fields (everything else given to `from_preset` goes to the backbone config).
_HEAD_FIELDS = ("out_dim", "hidden_dim", "bottleneck_dim", "head_layers", "norm_last_layer", "use_bn_in_head")
_BACKBONE_CLASSES = {"vit": ViTConfig, "resnet": ResNetConfig}


class DinoConfig(PretrainedConfig):
    r"""Configuration of a [`DinoModel`]: a backbone (ViT or ResNet) and the DINO projection head.

    Args:
        backbone_config (`ViTConfig`, `ResNetConfig` or `dict`, *optional*):
            The backbone. A dict must carry `model_type` ("vit" or "resnet"). Defaults to ViT-S/16.
        out_dim (`int`, defaults to 65536):
            K, the dimension of the head output (the number of "prototypes"; official default).
        hidden_dim (`int`, defaults to 2048):
            Width of the head's hidden layers.
        bottleneck_dim (`int`, defaults to 256):
            Width of the L2-normalised bottleneck before the last layer.
        head_layers (`int`, defaults to 3):
            Linear layers in the head's MLP (paper §3.1: 3).
        norm_last_layer (`bool`, defaults to `True`):
            Freeze the norm `g` of the weight-normalised last layer at 1 (official default; the released
            ViT-S/16 used `False`).
        use_bn_in_head (`bool`, defaults to `False`):
            Batch norm after each hidden linear layer of the head (DINO is BN-free by default).
        drop_path_rate (`float`, defaults to 0.0):
            Stochastic depth of the ViT blocks, rising linearly with depth to this value; only active in
            training mode. The official recipe uses 0.1 for the student and 0 for the teacher.
    """

    model_type = "dino"

    def __init__(
        self,
        backbone_config: ViTConfig | ResNetConfig | dict | None = None,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        head_layers: int = 3,
        norm_last_layer: bool = True,
        use_bn_in_head: bool = False,
        drop_path_rate: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if backbone_config is None:
            preset = dict(PRESETS["vit_small_patch16"])
            preset.pop("backbone")
            backbone_config = ViTConfig(**preset)
        elif isinstance(backbone_config, dict):
            backbone_config = dict(backbone_config)
            model_type = backbone_config.pop("model_type", None)
            if model_type not in _BACKBONE_CLASSES:
                raise ValueError(f"backbone_config needs model_type 'vit' or 'resnet', got {model_type!r}")
            backbone_config.pop("transformers_version", None)
            backbone_config = _BACKBONE_CLASSES[model_type](**backbone_config)
        elif not isinstance(backbone_config, (ViTConfig, ResNetConfig)):
            raise TypeError(
                f"backbone_config must be a ViTConfig, ResNetConfig or dict, got {type(backbone_config)}"
            )
        if head_layers < 1:
            raise ValueError(f"head_layers must be >= 1, got {head_layers}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.backbone_config = backbone_config
        self.out_dim = out_dim
        self.hidden_dim = hidden_dim
        self.bottleneck_dim = bottleneck_dim
        self.head_layers = head_layers
        self.norm_last_layer = norm_last_layer
        self.use_bn_in_head = use_bn_in_head
        self.drop_path_rate = drop_path_rate
        super().__init__(**kwargs)

    @property
    def is_vit(self) -> bool:
        return isinstance(self.backbone_config, ViTConfig)

    @property
    def embed_dim(self) -> int:
        """Size of the features (`pooler_output`) fed to the head."""
        if self.is_vit:
            return self.backbone_config.hidden_size
        return self.backbone_config.hidden_sizes[-1]

    @property
    def patch_size(self) -> int:
        if not self.is_vit:
            raise AttributeError("a ResNet backbone has no patch size")
        patch = self.backbone_config.patch_size
        return patch if isinstance(patch, int) else patch[0]

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        backbone = self.backbone_config.to_dict()
        backbone.pop("transformers_version", None)
        output["backbone_config"] = backbone
        return output

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> DinoConfig:
        """Build the config of one of the paper's architectures.

        Args:
            name: one of `DinoConfig.preset_names()`, e.g. "vit_small_patch16" or "resnet50".
            overrides: DinoConfig fields (`out_dim`, `norm_last_layer`, `drop_path_rate`, ...) or backbone
                fields (`image_size`, `num_hidden_layers`, `num_channels`, ...), e.g. for a tiny test model.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(cls.preset_names())}")
        backbone_kwargs = copy.deepcopy(PRESETS[name])
        backbone_type = backbone_kwargs.pop("backbone")
        dino_kwargs = {
            key: overrides.pop(key) for key in (*_HEAD_FIELDS, "drop_path_rate") if key in overrides
        }
        backbone_class = _BACKBONE_CLASSES[backbone_type]
        unknown = [key for key in overrides if not hasattr(backbone_class(), key)]
        if unknown:
            raise ValueError(f"unknown config fields for preset {name!r}: {unknown}")
        backbone_kwargs.update(overrides)
        return cls(backbone_config=backbone_class(**backbone_kwargs), **dino_kwargs)

    @staticmethod
    def preset_names() -> list[str]:
        return list(PRESETS)


__all__ = ["DinoConfig", "PRESETS"]
