"""How well the last layer's CLS attention segments objects: Jaccard of 60%-mass masks (paper §4.2.1, Table 6).

For each image, the CLS token's attention over the patches of the last block is thresholded to keep the
patches that hold 60% of its mass (`hf_dino.attention.mass_threshold_masks`), per head and for the
head-averaged map; the patch masks are upsampled to pixels (nearest, as the official visualisation) and
compared with the ground truth by the Jaccard index (intersection over union).

Ground truth comes from a mask column (non-zero = object), or, for datasets whose objects sit on a black
background such as Fashion-MNIST, from the image itself (pixels above a threshold, default: non-zero).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from hf_dino.attention import AttentionModel, cls_attention_maps, mass_threshold_masks, mean_attention_map
from hf_dino.evaluation.features import (
    EvaluationTransform,
    detect_image_column,
    model_num_channels,
    to_model_image,
)

DEFAULT_MASS = 0.6  # paper §4.2.1


def jaccard_index(
    predicted: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Intersection over union of boolean masks, over the last two dimensions.

    Args:
        predicted: `(..., H, W)` bool.
        target: `(..., H, W)` bool, broadcastable to `predicted`.
        valid: optional `(..., H, W)` bool; pixels outside it (e.g. "void" borders) are ignored.

    Returns:
        `(...)` float32; 1.0 where both masks are empty (they agree).
    """
    predicted, target = predicted.bool(), target.bool()
    if valid is not None:
        predicted, target = predicted & valid.bool(), target & valid.bool()
    intersection = (predicted & target).sum(dim=(-2, -1)).float()
    union = (predicted | target).sum(dim=(-2, -1)).float()
    return torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union))


def as_attention_model(model: nn.Module | AttentionModel) -> AttentionModel:
    """Wrap a DinoModel (ViT) or a transformers ViTModel for last-layer CLS attention."""
    if isinstance(model, AttentionModel):
        return model
    config = model.config
    backbone = getattr(config, "backbone_config", None)
    if backbone is not None:
        if getattr(config, "is_vit", True) is False or backbone.model_type != "vit":
            raise ValueError("attention masks need a ViT backbone; this model is a ResNet")
        kind, vit_config = "dino", backbone
    elif config.model_type == "vit":
        kind, vit_config = "vit", config
    else:
        raise ValueError(
            f"attention masks need a DinoModel or a ViTModel, got model_type {config.model_type!r}"
        )
    patch = vit_config.patch_size
    return AttentionModel(
        model,
        kind=kind,
        patch_size=int(patch if isinstance(patch, int) else patch[0]),
        num_heads=vit_config.num_attention_heads,
    )


def attention_masks(
    attention_model: AttentionModel, pixel_values: torch.Tensor, *, mass: float = DEFAULT_MASS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel masks of the patches that hold `mass` of the last-layer CLS attention.

    Args:
        attention_model: the wrapped model.
        pixel_values: `(B, C, H, W)` normalised images, H and W multiples of the patch size.
        mass: attention mass to keep (0.6 in the paper).

    Returns:
        `(per_head, combined)`: `(B, heads, H, W)` and `(B, H, W)` bool masks on the CPU; `combined`
        thresholds the head-averaged map.
    """
    grid = attention_model.grid_size(pixel_values)
    cls_attention, _ = attention_model.forward(pixel_values)
    maps = cls_attention_maps(cls_attention, grid).float().cpu()  # (B, heads, h, w)
    per_head = mass_threshold_masks(maps, mass)
    combined = mass_threshold_masks(mean_attention_map(maps), mass)
    patch = attention_model.patch_size

    def to_pixels(masks: torch.Tensor) -> torch.Tensor:  # (B, M, h, w) -> (B, M, h * patch, w * patch)
        return F.interpolate(masks.float(), scale_factor=patch, mode="nearest").bool()

    return to_pixels(per_head), to_pixels(combined.unsqueeze(1)).squeeze(1)


class _MaskBatches(torch.utils.data.Dataset):
    """Rows -> (normalised image, ground-truth mask, valid pixels), cropped to whole patches."""

    def __init__(
        self,
        dataset: Any,
        *,
        image_column: str,
        mask_column: str | None,
        transform: EvaluationTransform,
        patch_size: int,
        threshold: float,
        ignore_value: int | None,
    ) -> None:
        columns = [image_column] + ([mask_column] if mask_column else [])
        self.dataset = dataset.select_columns(columns) if hasattr(dataset, "select_columns") else dataset
        self.image_column, self.mask_column = image_column, mask_column
        self.transform = transform
        self.image_transform = transform.build()
        geometry: list = []
        if transform.resize_size is not None:
            geometry.append(transforms.Resize(transform.resize_size, interpolation=InterpolationMode.NEAREST))
        geometry.append(transforms.CenterCrop(transform.crop_size))
        self.mask_geometry = transforms.Compose(geometry)
        self.patch_size = patch_size
        self.threshold = threshold
        self.ignore_value = ignore_value

    def __len__(self) -> int:
        return len(self.dataset)

    def _mask_values(self, row: dict) -> np.ndarray:
        if self.mask_column:
            source = row[self.mask_column]
            mask_image = (
                Image.fromarray(np.asarray(source)) if not isinstance(source, Image.Image) else source
            )
            if mask_image.mode not in ("L", "P", "1", "I", "I;16", "F"):
                mask_image = mask_image.convert("L")
        else:
            mask_image = to_model_image(row[self.image_column], 1)  # the object is what is not background
        return np.asarray(self.mask_geometry(mask_image))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        row = self.dataset[int(index)]
        image = self.image_transform(to_model_image(row[self.image_column], self.transform.num_channels))
        values = torch.from_numpy(self._mask_values(row).astype(np.float64))
        if values.shape != image.shape[-2:]:
            raise ValueError(
                f"mask of size {tuple(values.shape)} does not match its image {tuple(image.shape[-2:])}"
            )
        valid = torch.ones_like(values, dtype=torch.bool)
        if self.ignore_value is not None:
            valid = values != self.ignore_value
        target = (values > self.threshold) & valid
        # Whole patches only, keeping the top-left corner (as the official attention visualisation crops).
        height = image.shape[-2] - image.shape[-2] % self.patch_size
        width = image.shape[-1] - image.shape[-1] % self.patch_size
        return image[:, :height, :width], target[:height, :width], valid[:height, :width]


@torch.inference_mode()
def evaluate_attention_masks(
    model: nn.Module | AttentionModel,
    dataset: Any,
    *,
    image_column: str | None = None,
    mask_column: str | None = None,
    threshold: float = 0.0,
    ignore_value: int | None = None,
    transform: EvaluationTransform | None = None,
    mass: float = DEFAULT_MASS,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Mean Jaccard index between attention masks and ground-truth masks over a dataset split.

    Args:
        model: a ViT `DinoModel`, a transformers `ViTModel`, or an `AttentionModel`.
        dataset: a `datasets.Dataset` with an image column (and a mask column, unless the ground truth is
            read from the image).
        image_column: the image column (detected when None).
        mask_column: the ground-truth column; None derives the mask from the image (pixels above
            `threshold` in greyscale, e.g. the garment in Fashion-MNIST).
        threshold: mask values (0-255 for images) above it are the object.
        ignore_value: a mask value marking pixels to leave out (e.g. 255 for PASCAL VOC borders).
        transform: resize / centre-crop sizes and normalisation (default: `EvaluationTransform()` for the
            model's channels); masks follow the same geometry with nearest-neighbour resizing.
        mass: attention mass kept by the masks (0.6 in the paper).
        batch_size: images per forward pass.
        num_workers: DataLoader workers.
        progress: show a progress bar.

    Returns:
        `{"jaccard": combined-map Jaccard (mean over images), "jaccard_per_head": [...], "jaccard_mean_head":
        mean over heads, "jaccard_best_head": best head's, "best_head": its index, "num_images": N}`;
        Jaccard values are fractions in [0, 1].
    """
    attention_model = as_attention_model(model)
    num_channels = model_num_channels(attention_model.model)
    transform = transform or EvaluationTransform(num_channels=num_channels)
    image_column = image_column or detect_image_column(dataset)
    loader = torch.utils.data.DataLoader(
        _MaskBatches(
            dataset,
            image_column=image_column,
            mask_column=mask_column,
            transform=transform,
            patch_size=attention_model.patch_size,
            threshold=threshold,
            ignore_value=ignore_value,
        ),
        batch_size=batch_size,
        num_workers=num_workers,
    )
    batches: Iterable = loader
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc="attention masks", unit="batch")
    per_head_scores, combined_scores = [], []
    for pixel_values, targets, valid in batches:
        per_head, combined = attention_masks(attention_model, pixel_values, mass=mass)
        per_head_scores.append(jaccard_index(per_head, targets.unsqueeze(1), valid.unsqueeze(1)))
        combined_scores.append(jaccard_index(combined, targets, valid))
    if not combined_scores:
        raise ValueError("the dataset split is empty")
    per_head_mean = torch.cat(per_head_scores).mean(dim=0)  # (heads,)
    best_head = int(per_head_mean.argmax())
    return {
        "jaccard": torch.cat(combined_scores).mean().item(),
        "jaccard_per_head": per_head_mean.tolist(),
        "jaccard_mean_head": per_head_mean.mean().item(),
        "jaccard_best_head": per_head_mean[best_head].item(),
        "best_head": best_head,
        "num_images": int(sum(len(scores) for scores in combined_scores)),
    }


__all__ = [
    "DEFAULT_MASS",
    "as_attention_model",
    "attention_masks",
    "evaluate_attention_masks",
    "jaccard_index",
]
