"""DINO multi-crop augmentation, split into a CPU geometric stage and a batched photometric stage.

The original recipe (paper §3.1 and appendix; official `DataAugmentationDINO`) turns every image into 2 global
views (224 px, scale (0.4, 1)) and N local views (96 px, scale (0.05, 0.4), N = 8 by default), each with a
random-resized crop, a horizontal flip, colour jitter, grayscale, Gaussian blur (probability 1.0 on the first
global view, 0.1 on the second, 0.5 on local views), solarisation (second global view only) and ImageNet
normalisation.

Here the work is split so the expensive photometric part can leave the data workers:

- `MultiCropGeometric` (CPU, one image at a time): random-resized crops + flips, returning uint8 tensors
  (C, H, W) for 8-bit images (float32 in [0, 1] for 16-bit / float images). This is all a data worker must do.
- `PhotometricAugmentation` / `MultiCropPhotometric` (`torch.nn.Module`, any device): colour jitter in a
  random order, grayscale, blur, solarisation and normalisation on a batch (B, C, H, W), with every random
  parameter drawn per sample from a `torch.Generator`. On CUDA it runs without host-device synchronisation.
- `MultiCropAugmentation` glues both and decides where the photometric stage runs ("workers" or
  "accelerator").

Differences from the original PIL pipeline, all deliberate and small:

- Crops are resized with torch's antialiased bicubic kernel on uint8 tensors (Keys a = -0.5 like PIL); outputs
  match PIL's `crop().resize(BICUBIC)` within one grey level and it is several times faster.
- Photometric operations run in float32 on [0, 1] images with torchvision's tensor formulas (grayscale weights
  0.2989/0.587/0.114, clamped blends, HSV hue rotation); PIL rounds to uint8 after every operation and shifts
  hue in steps of 1/255 of the circle.
- Gaussian blur is a true separable Gaussian with standard deviation sigma (PIL's `GaussianBlur(radius=sigma)`
  approximates one with three box blurs). Its kernel reaches as far as PIL's three boxes do,
  `3 * (floor((sqrt(4 sigma^2 + 1) - 1) / 2) + 1)` pixels (3 for sigma < 1.12, 6 up to sigma = 2), and edges
  are replicated as in PIL. The two differ by about one grey level on average, most around sigma 0.3 where
  PIL's three sub-pixel boxes are a poor Gaussian.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Grayscale weights of torchvision's tensor `rgb_to_grayscale` (ITU-R 601-2 luma).
GRAYSCALE_WEIGHTS = (0.2989, 0.587, 0.114)
# Codes of the four colour-jitter operations (torchvision's ColorJitter applies them in a random order).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3

CropSize = int | tuple[int, int]


@dataclass
class MultiCropConfig:
    """Every setting of the multi-crop augmentation; the defaults are the official DINO ones.

    Args:
        global_crops_scale: range of the crop area as a fraction of the image area for the 2 global views.
        local_crops_scale: same for the local views.
        local_crops_number: number of local views (0 disables them).
        global_crop_size: output size of global views (int for square, or (height, width)).
        local_crop_size: output size of local views.
        crop_ratio: range of the crop aspect ratio (width / height), sampled log-uniformly.
        interpolation: "bicubic" (official) or "bilinear".
        flip_prob: probability of a horizontal flip, per view.
        color_jitter_prob: probability of applying colour jitter, per view.
        brightness, contrast, saturation: jitter strength s; the factor is uniform in [max(0, 1 - s), 1 + s].
        hue: hue shift is uniform in [-hue, hue] (fraction of the colour circle).
        grayscale_prob: probability of converting a view to grayscale (kept as 3 channels).
        blur_sigma: range of the Gaussian blur standard deviation, in pixels.
        global_1_blur_prob, global_2_blur_prob, local_blur_prob: blur probability per kind of view.
        solarize_prob: probability of solarising the second global view (the only one the original solarises).
        solarize_threshold: pixels at or above it (in [0, 1] units) are inverted; 128/255 as PIL's default.
        mean, std: per-channel normalisation. Used when their length equals the image's channel count;
            otherwise images are normalised with 0.5 / 0.5 per channel.
    """

    global_crops_scale: tuple[float, float] = (0.4, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.4)
    local_crops_number: int = 8
    global_crop_size: CropSize = 224
    local_crop_size: CropSize = 96
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    flip_prob: float = 0.5
    color_jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    global_1_blur_prob: float = 1.0
    global_2_blur_prob: float = 0.1
    local_blur_prob: float = 0.5
    solarize_prob: float = 0.2
    solarize_threshold: float = 128 / 255
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        # YAML and JSON give lists: store tuples so the config stays hashable and comparable.
        for name in ("global_crops_scale", "local_crops_scale", "crop_ratio", "blur_sigma", "mean", "std"):
            setattr(self, name, tuple(float(value) for value in getattr(self, name)))
        for name in ("global_crop_size", "local_crop_size"):
            value = getattr(self, name)
            if not isinstance(value, int):
                setattr(self, name, tuple(int(side) for side in value))
        self._validate()

    def _validate(self) -> None:
        for name in ("global_crops_scale", "local_crops_scale"):
            low, high = getattr(self, name)
            if not 0 < low <= high <= 1:
                raise ValueError(f"{name} must satisfy 0 < low <= high <= 1, got {(low, high)}")
        low, high = self.crop_ratio
        if not 0 < low <= high:
            raise ValueError(f"crop_ratio must satisfy 0 < low <= high, got {(low, high)}")
        low, high = self.blur_sigma
        if not 0 < low <= high:
            raise ValueError(f"blur_sigma must satisfy 0 < low <= high, got {(low, high)}")
        if self.local_crops_number < 0:
            raise ValueError(f"local_crops_number must be >= 0, got {self.local_crops_number}")
        for name in ("global_crop_size", "local_crop_size"):
            if min(_as_size(getattr(self, name))) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', got {self.interpolation!r}")
        for field in fields(self):
            if field.name.endswith("_prob") and not 0 <= getattr(self, field.name) <= 1:
                raise ValueError(f"{field.name} must be in [0, 1], got {getattr(self, field.name)}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")
        if len(self.mean) != len(self.std) or min(self.std, default=1.0) <= 0:
            raise ValueError("mean and std must have the same length and std must be positive")

    @property
    def num_crops(self) -> int:
        """Views per image: 2 global + `local_crops_number` local."""
        return 2 + self.local_crops_number

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MultiCropConfig:
        known = {field.name for field in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown MultiCropConfig fields: {sorted(unknown)}")
        return cls(**values)


def _as_size(size: CropSize) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


# ------------------------------------------------------------------------------------------------------------
# Geometric stage (CPU, one image at a time)
# ------------------------------------------------------------------------------------------------------------


def sample_crop_parameters(
    height: int,
    width: int,
    *,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: random.Random,
) -> tuple[int, int, int, int]:
    """Draw a random-resized-crop box with the same distribution as torchvision's
    `RandomResizedCrop.get_params`.

    Up to 10 attempts draw an area fraction uniform in `scale` and an aspect ratio log-uniform in `ratio`; the
    first box that fits is placed uniformly. If none fits, the central crop of the largest box within `ratio`.

    Args:
        height, width: image size in pixels.
        scale: range of the crop area relative to the image area.
        ratio: range of the aspect ratio width / height.
        rng: source of randomness.

    Returns:
        (top, left, crop_height, crop_width) in pixels.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_width = round(math.sqrt(target_area * aspect_ratio))
        crop_height = round(math.sqrt(target_area / aspect_ratio))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = rng.randint(0, height - crop_height)
            left = rng.randint(0, width - crop_width)
            return top, left, crop_height, crop_width
    # Fallback: the whole image, trimmed to the allowed aspect-ratio range and centred.
    image_ratio = width / height
    if image_ratio < min(ratio):
        crop_width, crop_height = width, round(width / min(ratio))
    elif image_ratio > max(ratio):
        crop_height, crop_width = height, round(height * max(ratio))
    else:
        crop_width, crop_height = width, height
    crop_height, crop_width = max(1, min(crop_height, height)), max(1, min(crop_width, width))
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def image_to_tensor(image: Any) -> torch.Tensor:
    """Turn a decoded image into a (C, H, W) tensor: uint8 for 8-bit images, float32 in [0, 1] otherwise.

    Accepts PIL images (L, RGB, RGBA, ...; 16-bit `I;16*` and `I` modes are divided by 65535, `F` is clipped
    to [0, 1]), numpy arrays (H, W), (H, W, C) or channel-first (C, H, W) (see `looks_channel_first`), and
    torch tensors (H, W) or (C, H, W). 16-bit data are scaled to float, never truncated to 8 bits.

    Returns:
        Tensor (C, H, W), dtype uint8 or float32.
    """
    if isinstance(image, torch.Tensor):
        tensor = image if image.dim() == 3 else image.unsqueeze(0)
        if tensor.dim() != 3:
            raise ValueError(f"expected an image tensor (H, W) or (C, H, W), got shape {tuple(image.shape)}")
        return _scale_to_unit(tensor)
    if not isinstance(image, np.ndarray):
        image = _pil_to_array(image)
    array = image
    if array.ndim == 2:
        array = array[:, :, None]
    elif looks_channel_first(array.shape):
        array = np.moveaxis(array, 0, -1)  # channel-first array
    if array.ndim != 3:
        raise ValueError(f"expected an image array (H, W) or (H, W, C), got shape {image.shape}")
    if array.dtype == np.uint16:
        # torch has only partial uint16 support: go through int32 before scaling.
        array = array.astype(np.int32)
        return torch.from_numpy(array).permute(2, 0, 1).float().div_(65535.0)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    with warnings.catch_warnings():
        # PIL's array interface is read-only; the crops below never write into it.
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(array)
    return _scale_to_unit(tensor.permute(2, 0, 1))


def looks_channel_first(shape: Sequence[int]) -> bool:
    """Whether a 3-D array shape reads as (C, H, W): a small first axis (<= 16), smaller than the last.

    (3, 224, 224) and (8, 64, 64) are channel-first; (224, 224, 3), (64, 64, 8) and (3, 5, 3) are not.
    """
    return len(shape) == 3 and shape[0] <= 16 and shape[0] < shape[2]


def _pil_to_array(image: Any) -> np.ndarray:
    mode = getattr(image, "mode", None)
    if mode is None:
        raise TypeError(f"unsupported image type {type(image).__name__}")
    if mode.startswith("I;16") or mode == "I":
        return np.clip(np.asarray(image, dtype=np.int64), 0, 65535).astype(np.uint16)
    if mode == "F":
        return np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    if mode in ("P", "PA"):
        image = image.convert("RGBA" if "transparency" in image.info or mode == "PA" else "RGB")
    elif mode == "1":
        image = image.convert("L")
    elif mode not in ("L", "LA", "RGB", "RGBA", "CMYK"):
        image = image.convert("RGB")
    return np.asarray(image)


def _scale_to_unit(tensor: torch.Tensor) -> torch.Tensor:
    """uint8 stays uint8; 16-bit integers become float32 / 65535; floats become float32 clipped to [0, 1]."""
    if tensor.dtype == torch.uint8:
        return tensor
    if tensor.dtype == torch.bool:
        return tensor.to(torch.uint8) * 255
    if tensor.is_floating_point():
        return tensor.float().clamp(0.0, 1.0)
    # uint16, int16, int32, int64: treated as 16-bit data.
    return tensor.to(torch.int32).clamp(0, 65535).float().div_(65535.0)


class MultiCropGeometric:
    """CPU stage: 2 global + N local random-resized crops of one image, each flipped with `flip_prob`.

    Images smaller than a crop are upscaled (the crop box is resized to the output size whatever its size).

    Args:
        config: the multi-crop settings.
    """

    def __init__(self, config: MultiCropConfig | None = None) -> None:
        self.config = config or MultiCropConfig()
        self.specs: list[tuple[tuple[int, int], tuple[float, float]]] = [
            (_as_size(self.config.global_crop_size), self.config.global_crops_scale)
        ] * 2 + [(_as_size(self.config.local_crop_size), self.config.local_crops_scale)] * (
            self.config.local_crops_number
        )

    def minimum_decode_size(self, width: int, height: int) -> tuple[int, int]:
        """Smallest (width, height) an image may be decoded at without starving any crop of resolution.

        Reduced-size JPEG decoding (PIL `draft`) is much faster for large photos. The smallest possible crop
        box (minimum scale, extreme aspect ratio) must still hold at least as many pixels as the crop output.
        Never asks for more than the full size.

        Returns:
            (width, height) to pass to `PIL.Image.draft`.
        """
        area = width * height
        factor = 0.0
        extreme_ratio = min(self.config.crop_ratio[0], 1 / self.config.crop_ratio[1])
        for (out_height, out_width), (min_scale, _) in self.specs:
            smallest_side = math.sqrt(min_scale * area * extreme_ratio)
            factor = max(factor, max(out_height, out_width) / max(smallest_side, 1e-9))
        factor = min(factor, 1.0)
        return max(1, math.ceil(width * factor)), max(1, math.ceil(height * factor))

    def sample_boxes(
        self, height: int, width: int, rng: random.Random
    ) -> list[tuple[int, int, int, int, int]]:
        """The crop boxes of one `height` x `width` image, global crops first: `(top, left, crop_height,
        crop_width, flip)` per crop. The same draws, in the same order, as `__call__` makes for that image."""
        boxes = []
        for _, scale in self.specs:
            box = sample_crop_parameters(height, width, scale=scale, ratio=self.config.crop_ratio, rng=rng)
            boxes.append((*box, int(rng.random() < self.config.flip_prob)))
        return boxes

    def __call__(self, image: Any, rng: random.Random | None = None) -> list[torch.Tensor]:
        """Crop one image.

        Args:
            image: PIL image, numpy array or tensor (see `image_to_tensor`).
            rng: source of randomness (a fresh unseeded one when omitted).

        Returns:
            `config.num_crops` tensors (C, H, W): the 2 global crops then the local ones; uint8 for 8-bit
            input, float32 in [0, 1] otherwise.
        """
        rng = rng if rng is not None else random.Random()
        tensor = image_to_tensor(image).unsqueeze(0)  # (1, C, H, W), possibly a channels-last view
        height, width = tensor.shape[-2:]
        if height == 0 or width == 0:
            raise ValueError("cannot crop an empty image")
        is_float = tensor.is_floating_point()
        crops = []
        for (size, _), (top, left, crop_height, crop_width, flip) in zip(
            self.specs, self.sample_boxes(height, width, rng)
        ):
            region = tensor[:, :, top : top + crop_height, left : left + crop_width]
            # Antialiased bicubic (a = -0.5): PIL's resize within one grey level; fast uint8 path in torch.
            crop = F.interpolate(region, size=size, mode=self.config.interpolation, antialias=True)
            if is_float:
                crop = crop.clamp_(0.0, 1.0)  # bicubic overshoots; PIL clamps too
            if flip:
                crop = crop.flip(-1)
            crops.append(crop[0])
        return crops


# ------------------------------------------------------------------------------------------------------------
# Photometric stage (any device, batched, per-sample parameters)
# ------------------------------------------------------------------------------------------------------------


@dataclass
class PhotometricParameters:
    """Random parameters of the photometric stage for a batch of B samples (all tensors have B rows).

    Attributes:
        jitter: (B,) bool, colour jitter applied.
        brightness, contrast, saturation: (B,) float blend factors (1 = unchanged).
        hue: (B,) float hue shift as a fraction of the colour circle (0 = unchanged).
        order: (B, 4) long, a permutation of BRIGHTNESS, CONTRAST, SATURATION, HUE per sample.
        grayscale: (B,) bool.
        blur: (B,) bool.
        sigma: (B,) float, Gaussian blur standard deviation in pixels.
        solarize: (B,) bool.
    """

    jitter: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    order: torch.Tensor
    grayscale: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    solarize: torch.Tensor

    def to(self, device: torch.device | str) -> PhotometricParameters:
        return PhotometricParameters(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 / 255, uint16 -> float32 / 65535, floating -> float32 (assumed in [0, 1])."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if images.is_floating_point():
        return images.float()
    return images.to(torch.int32).float().div_(65535.0)


def rgb_to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float -> (B, 1, H, W) luma with torchvision's weights."""
    red, green, blue = images.unbind(dim=1)
    return (
        GRAYSCALE_WEIGHTS[0] * red + GRAYSCALE_WEIGHTS[1] * green + GRAYSCALE_WEIGHTS[2] * blue
    ).unsqueeze(1)


def adjust_hue(images: torch.Tensor, hue_shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB images in HSV space, one shift per sample.

    Args:
        images: (B, 3, H, W) float in [0, 1].
        hue_shift: (B,) fraction of the colour circle, in [-0.5, 0.5].

    Returns:
        (B, 3, H, W) float in [0, 1].
    """
    red, green, blue = images.unbind(dim=1)
    # Elementwise max/min of the three planes: much faster than a reduction over the channel dimension.
    value = torch.maximum(torch.maximum(red, green), blue)
    chroma = value - torch.minimum(torch.minimum(red, green), blue)
    safe_chroma = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    # Hue in sextants [0, 6): which channel holds the maximum decides the formula; gray pixels get hue 0.
    hue = torch.where(
        value == red,
        (green - blue) / safe_chroma,
        torch.where(value == green, (blue - red) / safe_chroma + 2.0, (red - green) / safe_chroma + 4.0),
    )
    hue = torch.where(chroma > 0, hue, torch.zeros_like(hue))
    hue = torch.remainder(hue + 6.0 * hue_shift.view(-1, 1, 1), 6.0)
    # HSV -> RGB without branches: channel n (5 red, 3 green, 1 blue) is V - V*S*clamp(min(k, 4 - k), 0, 1)
    # with k = (n + hue) mod 6 (V*S is the chroma); n + hue < 12, so a conditional subtraction does the mod.
    channels = []
    for offset in (5.0, 3.0, 1.0):
        k = hue + offset
        k = torch.where(k >= 6.0, k - 6.0, k)
        channels.append(value - chroma * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(channels, dim=1)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with black: (B, C, H, W) float in [0, 1], factor (B,) -> (B, C, H, W) clamped to [0, 1]."""
    return (factor.view(-1, 1, 1, 1) * images).clamp(0.0, 1.0)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the mean gray level of each image (mean over all channels if not RGB); clamped to [0, 1]."""
    reference = rgb_to_grayscale(images) if images.shape[1] == 3 else images
    mean = reference.mean(dim=(1, 2, 3), keepdim=True)
    factor = factor.view(-1, 1, 1, 1)
    return (factor * images + (1.0 - factor) * mean).clamp(0.0, 1.0)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend RGB images with their grayscale version; clamped to [0, 1]. Other channel counts are
    unchanged."""
    if images.shape[1] != 3:
        return images
    factor = factor.view(-1, 1, 1, 1)
    return (factor * images + (1.0 - factor) * rgb_to_grayscale(images)).clamp(0.0, 1.0)


def pil_like_blur_radius(sigma: torch.Tensor) -> torch.Tensor:
    """How far PIL's three-pass box blur for standard deviation `sigma` reaches, in whole pixels.

    PIL's `GaussianBlur(radius=sigma)` runs 3 box blurs of radius l + a (a in [0, 1)) with
    l = floor((sqrt(12 sigma^2 / 3 + 1) - 1) / 2); each pass reaches l + 1 pixels.

    Args:
        sigma: (B,) standard deviations.

    Returns:
        (B,) long radii.
    """
    box_radius = torch.floor((torch.sqrt(4.0 * sigma * sigma + 1.0) - 1.0) / 2.0)
    return (3 * (box_radius + 1)).long()


def gaussian_kernels(sigma: torch.Tensor, max_radius: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels, one per sample, truncated at the PIL-like radius of each sigma.

    Args:
        sigma: (B,) standard deviations (> 0).
        max_radius: half width of the returned kernels; taps beyond a sample's own radius are zero.

    Returns:
        (B, 2 * max_radius + 1) float32 kernels summing to 1.
    """
    offsets = torch.arange(-max_radius, max_radius + 1, device=sigma.device, dtype=torch.float32)
    sigma = sigma.float().view(-1, 1)
    weights = torch.exp(-(offsets * offsets) / (2.0 * sigma * sigma))
    weights = weights * (offsets.abs() <= pil_like_blur_radius(sigma)).float()
    return weights / weights.sum(dim=1, keepdim=True)


def gaussian_blur(images: torch.Tensor, kernels: torch.Tensor, method: str | None = None) -> torch.Tensor:
    """Separable per-sample blur with replicated edges (as PIL).

    Args:
        images: (B, C, H, W) float.
        kernels: (B, K) 1-D kernels, K odd.
        method: "taps" (K shifted multiply-adds per direction), "convolution" (a depthwise convolution with
            one group per sample and channel) or None: taps under `torch.compile`, where they fuse into one
            memory-bound kernel per direction while the convolution stays a library call, and on CPU for
            images above 128 x 128 (about 5x faster than the convolution at 224 px); the convolution otherwise.

    Returns:
        (B, C, H, W) float.
    """
    batch, channels, height, width = images.shape
    radius = kernels.shape[1] // 2
    kernels = kernels.to(images.dtype)
    if method is None:
        large_on_cpu = images.device.type == "cpu" and height * width > 128 * 128
        method = "taps" if torch.compiler.is_compiling() or large_on_cpu else "convolution"
    if method not in ("taps", "convolution"):
        raise ValueError(f"unknown blur method {method!r}; expected 'taps' or 'convolution'")
    if method == "taps":
        per_sample = kernels.view(batch, 1, 1, 1, -1)
        padded = F.pad(images, (radius, radius, 0, 0), mode="replicate")
        rows = padded[..., 0:width] * per_sample[..., 0]
        for tap in range(1, 2 * radius + 1):
            rows.add_(padded[..., tap : tap + width] * per_sample[..., tap])
        padded = F.pad(rows, (0, 0, radius, radius), mode="replicate")
        output = padded[..., 0:height, :] * per_sample[..., 0]
        for tap in range(1, 2 * radius + 1):
            output.add_(padded[..., tap : tap + height, :] * per_sample[..., tap])
        return output
    # One group per (sample, channel): a depthwise convolution with per-sample weights.
    weights = kernels.repeat_interleave(channels, dim=0)  # (B*C, K)
    flat = images.reshape(1, batch * channels, height, width)
    flat = F.pad(flat, (radius, radius, 0, 0), mode="replicate")
    flat = F.conv2d(flat, weights.view(batch * channels, 1, 1, -1), groups=batch * channels)
    flat = F.pad(flat, (0, 0, radius, radius), mode="replicate")
    flat = F.conv2d(flat, weights.view(batch * channels, 1, -1, 1), groups=batch * channels)
    return flat.view(batch, channels, height, width)


def _apply_to_selected(
    images: torch.Tensor,
    selected: torch.Tensor,
    operation: Callable[..., torch.Tensor],
    values: torch.Tensor | None = None,
    *,
    sync_free: bool,
) -> torch.Tensor:
    """Apply `operation(images[, values])` to the selected samples only.

    Sync-free: run it on the whole batch and pick per sample with `torch.where` (no host-device sync).
    Otherwise read the mask on the host and compute only the selected rows (cheaper on CPU).

    Args:
        images: (B, C, H, W).
        selected: (B,) bool.
        operation: maps (n, C, H, W) [and (n,) values] to (n, C, H, W).
        values: (B,) per-sample argument of the operation, or None.

    Returns:
        (B, C, H, W).
    """

    def run(subset: torch.Tensor, subset_values: torch.Tensor | None) -> torch.Tensor:
        return operation(subset) if subset_values is None else operation(subset, subset_values)

    if sync_free:
        return torch.where(selected.view(-1, 1, 1, 1), run(images, values), images)
    indices = selected.nonzero().flatten()
    if indices.numel() == 0:
        return images
    if indices.numel() == images.shape[0]:
        return run(images, values)
    images = images.clone()
    images[indices] = run(images[indices], None if values is None else values[indices])
    return images


# `PhotometricAugmentation.apply` under torch.compile, one per mode (see `PhotometricAugmentation.compile_apply`).
_COMPILED_APPLY: dict[str, Callable[..., torch.Tensor]] = {}


class PhotometricAugmentation(nn.Module):
    """The photometric part of one kind of DINO view, on a batch, with random parameters drawn per sample.

    In order (official): colour jitter with probability `color_jitter_prob` (brightness, contrast, saturation
    and hue in a random order per sample, as torchvision's ColorJitter), grayscale with `grayscale_prob`,
    Gaussian blur with `blur_prob`, solarisation with `solarize_prob`, then normalisation.
    RGB-only operations (saturation, hue, grayscale) are skipped for images that do not have 3 channels.

    Args:
        config: the multi-crop settings (jitter strengths, probabilities, sigma range, mean/std).
        blur_prob: blur probability for this kind of view.
        solarize_prob: solarisation probability for this kind of view.
        sync_free: never read tensors back to the host (every op runs on the whole batch, masked per sample);
            None chooses it for non-CPU devices. On CPU, False is faster: hue and blur run only on the samples
            that draw them.
    """

    def __init__(
        self,
        config: MultiCropConfig | None = None,
        *,
        blur_prob: float,
        solarize_prob: float,
        sync_free: bool | None = None,
    ) -> None:
        super().__init__()
        self.config = config or MultiCropConfig()
        self.blur_prob = float(blur_prob)
        self.solarize_prob = float(solarize_prob)
        self.sync_free = sync_free
        self._compiled_apply: Callable[..., torch.Tensor] | None = None
        self.blur_method: str | None = None  # see `gaussian_blur`; None chooses per device and compilation
        self.max_blur_radius = int(pil_like_blur_radius(torch.tensor([self.config.blur_sigma[1]]))[0])
        self.register_buffer("mean", torch.tensor(self.config.mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(self.config.std, dtype=torch.float32), persistent=False)

    def sample_parameters(
        self, batch_size: int, *, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> PhotometricParameters:
        """Draw independent parameters for `batch_size` samples.

        Args:
            batch_size: B.
            device: where the returned tensors live.
            generator: seeds the draws; they are made on the generator's device and moved to `device`.

        Returns:
            `PhotometricParameters` with B rows.
        """
        config = self.config
        draw_device = generator.device if generator is not None else torch.device(device)
        # One draw of 9 uniforms per sample, plus 4 for the jitter order: cheap and reproducible.
        uniform = torch.rand(batch_size, 13, generator=generator, device=draw_device)

        def between(column: int, low: float, high: float) -> torch.Tensor:
            return low + (high - low) * uniform[:, column]

        def strength(column: int, value: float) -> torch.Tensor:
            return between(column, max(0.0, 1.0 - value), 1.0 + value)

        parameters = PhotometricParameters(
            jitter=uniform[:, 0] < config.color_jitter_prob,
            brightness=strength(1, config.brightness),
            contrast=strength(2, config.contrast),
            saturation=strength(3, config.saturation),
            hue=between(4, -config.hue, config.hue),
            order=uniform[:, 9:13].argsort(dim=1),  # a uniformly random permutation per sample
            grayscale=uniform[:, 5] < config.grayscale_prob,
            blur=uniform[:, 6] < self.blur_prob,
            sigma=between(7, config.blur_sigma[0], config.blur_sigma[1]),
            solarize=uniform[:, 8] < self.solarize_prob,
        )
        return parameters.to(device) if torch.device(device) != draw_device else parameters

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a batch with fresh per-sample parameters.

        Args:
            images: (B, C, H, W) uint8, uint16 or float in [0, 1].
            generator: seeds the parameter draws.

        Returns:
            (B, C, H, W) float32, normalised.
        """
        parameters = self.sample_parameters(images.shape[0], device=images.device, generator=generator)
        if self._compiled_apply is not None:
            return self._compiled_apply(self, images, parameters)
        return self.apply(images, parameters)

    def compile_apply(self, mode: str = "default") -> None:
        """Run `apply` through `torch.compile`: its few hundred small operations become a handful of fused
        kernels (the parameter draws stay eager: a generator cannot enter a graph).

        The compiled stage is sync-free (whole-batch arithmetic, masked per sample), whatever the device, so
        that it compiles to one graph; it gives the eager stage's result to float rounding.

        Args:
            mode: a `torch.compile` mode; CUDA graphs ("reduce-overhead") are not used here, as the next
                call would overwrite the views the training step is still reading.
        """
        if mode == "reduce-overhead":
            mode = "default"
        self.sync_free = True
        # One compiled `apply` per mode for every instance, the module an argument of it. Dynamo keeps at most 8
        # graphs per code object and runs the code eagerly past them. Compiled per instance
        # (`torch.compile(self.apply)`), the stages of three `MultiCropPhotometric` in one process (a benchmark;
        # another trainer would do the same) reached that limit on an H100 with torch 2.11, and the third ran
        # eagerly. Torch 2.14 shared the graphs across instances in either form.
        if mode not in _COMPILED_APPLY:
            _COMPILED_APPLY[mode] = torch.compile(PhotometricAugmentation.apply, mode=mode, dynamic=False)
        self._compiled_apply = _COMPILED_APPLY[mode]

    def apply(
        self, images: torch.Tensor, parameters: PhotometricParameters, *, normalize: bool = True
    ) -> torch.Tensor:
        """Augment a batch with given parameters (deterministic).

        Args:
            images: (B, C, H, W) uint8, uint16 or float in [0, 1].
            parameters: B rows of parameters on the images' device.
            normalize: subtract mean and divide by std at the end.

        Returns:
            (B, C, H, W) float32: normalised, or in [0, 1] when `normalize` is False.
        """
        if images.dim() != 4:
            raise ValueError(f"expected a batch (B, C, H, W), got shape {tuple(images.shape)}")
        sync_free = self.sync_free if self.sync_free is not None else images.device.type != "cpu"
        images = to_unit_float(images)
        is_rgb = images.shape[1] == 3
        if self.config.color_jitter_prob > 0:
            if sync_free:
                images = self._color_jitter_sync_free(images, parameters, is_rgb=is_rgb)
            else:
                images = self._color_jitter_by_subset(images, parameters, is_rgb=is_rgb)
        if is_rgb and self.config.grayscale_prob > 0:
            images = _apply_to_selected(
                images,
                parameters.grayscale,
                lambda subset: rgb_to_grayscale(subset).expand_as(subset),
                sync_free=sync_free,
            )
        if self.blur_prob > 0:
            images = self._blur(images, parameters, sync_free=sync_free)
        if self.solarize_prob > 0:
            invert = parameters.solarize.view(-1, 1, 1, 1) & (images >= self.config.solarize_threshold)
            images = torch.where(invert, 1.0 - images, images)
        if normalize:
            images = self._normalize(images)
        return images

    def _color_jitter_by_subset(
        self, images: torch.Tensor, parameters: PhotometricParameters, *, is_rgb: bool
    ) -> torch.Tensor:
        """Host-side branching: each sample gets exactly its four operations, in its order."""
        operations = (
            (BRIGHTNESS, adjust_brightness, parameters.brightness),
            (CONTRAST, adjust_contrast, parameters.contrast),
            (SATURATION, adjust_saturation, parameters.saturation),
            (HUE, adjust_hue, parameters.hue),
        )
        for step in range(4):
            for code, operation, factors in operations:
                if code in (SATURATION, HUE) and not is_rgb:
                    continue
                selected = parameters.jitter & (parameters.order[:, step] == code)
                images = _apply_to_selected(images, selected, operation, factors, sync_free=False)
        return images

    def _color_jitter_sync_free(
        self, images: torch.Tensor, parameters: PhotometricParameters, *, is_rgb: bool
    ) -> torch.Tensor:
        """Whole-batch arithmetic, no host reads: the same result as `_color_jitter_by_subset`.

        Brightness, contrast and saturation all blend the image with a reference (black, mean gray, gray), so
        one clamped blend per step covers whichever of the three each sample draws; a factor of 1 leaves a
        sample exactly unchanged. Hue is computed for the whole batch and selected per sample.
        """
        ones = torch.ones_like(parameters.brightness)
        brightness = torch.where(parameters.jitter, parameters.brightness, ones)
        contrast = torch.where(parameters.jitter, parameters.contrast, ones)
        saturation = torch.where(parameters.jitter & is_rgb, parameters.saturation, ones)
        for step in range(4):
            operation = parameters.order[:, step]
            factor = torch.where(
                operation == BRIGHTNESS,
                brightness,
                torch.where(
                    operation == CONTRAST, contrast, torch.where(operation == SATURATION, saturation, ones)
                ),
            ).view(-1, 1, 1, 1)
            # torchvision: contrast of non-RGB images blends with the mean of all channels.
            gray = rgb_to_grayscale(images) if is_rgb else images
            mean_gray = gray.mean(dim=(1, 2, 3), keepdim=True)
            operation = operation.view(-1, 1, 1, 1)
            reference = torch.where(
                operation == BRIGHTNESS,
                torch.zeros_like(mean_gray),
                torch.where(operation == CONTRAST, mean_gray, gray),
            )
            images = (factor * images + (1.0 - factor) * reference).clamp(0.0, 1.0)
            if is_rgb and self.config.hue > 0:
                selected = parameters.jitter & (parameters.order[:, step] == HUE)
                images = _apply_to_selected(images, selected, adjust_hue, parameters.hue, sync_free=True)
        return images

    def _blur(
        self, images: torch.Tensor, parameters: PhotometricParameters, *, sync_free: bool
    ) -> torch.Tensor:
        max_radius = self.max_blur_radius
        if not sync_free:
            # The host may look: use only as many taps as the widest kernel of the batch needs.
            radii = pil_like_blur_radius(parameters.sigma[parameters.blur])
            max_radius = int(radii.max()) if radii.numel() else 0

        def blur(subset: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return gaussian_blur(subset, gaussian_kernels(sigma, max_radius), self.blur_method)

        return _apply_to_selected(images, parameters.blur, blur, parameters.sigma, sync_free=sync_free)

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        channels = images.shape[1]
        if self.mean.numel() == channels:
            mean, std = self.mean.view(1, -1, 1, 1), self.std.view(1, -1, 1, 1)
            return (images - mean.to(images.device)) / std.to(images.device)
        return (images - 0.5) / 0.5


class MultiCropPhotometric(nn.Module):
    """The photometric stage of all DINO views: global 1 (blur p 1.0), global 2 (blur p 0.1, solarise p 0.2),
    local views (blur p 0.5); probabilities from the config.

    Args:
        config: the multi-crop settings.
        sync_free: see `PhotometricAugmentation`.
    """

    def __init__(self, config: MultiCropConfig | None = None, *, sync_free: bool | None = None) -> None:
        super().__init__()
        config = config or MultiCropConfig()
        self.config = config
        self.global_1 = PhotometricAugmentation(
            config, blur_prob=config.global_1_blur_prob, solarize_prob=0.0, sync_free=sync_free
        )
        self.global_2 = PhotometricAugmentation(
            config,
            blur_prob=config.global_2_blur_prob,
            solarize_prob=config.solarize_prob,
            sync_free=sync_free,
        )
        self.local = PhotometricAugmentation(
            config, blur_prob=config.local_blur_prob, solarize_prob=0.0, sync_free=sync_free
        )

    def compile_apply(self, mode: str = "default") -> None:
        """Compile the three views' photometric stages (see `PhotometricAugmentation.compile_apply`)."""
        for stage in (self.global_1, self.global_2, self.local):
            stage.compile_apply(mode)

    def forward(
        self, crops: Sequence[torch.Tensor], generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        """Augment every view of a batch.

        Args:
            crops: 2 + N tensors (B, C, H, W), in the order [global 1, global 2, local 1, ..., local N].
            generator: seeds all draws (global 1, then global 2, then all local views).

        Returns:
            2 + N float32 normalised tensors, same shapes.
        """
        if len(crops) < 2:
            raise ValueError(f"expected at least the 2 global crops, got {len(crops)} tensors")
        outputs = [self.global_1(crops[0], generator), self.global_2(crops[1], generator)]
        local_crops = list(crops[2:])
        if local_crops:
            # All local views have one size: one batched call of N * B samples.
            batch = local_crops[0].shape[0]
            merged = self.local(torch.cat(local_crops, dim=0), generator)
            outputs.extend(merged.split(batch, dim=0))
        return outputs


class MultiCropAugmentation:
    """DINO multi-crop views, with the photometric stage either in the data workers or on the accelerator.

    Usage in a data worker: `crops = augmentation(image, seed=...)` gives the 2 + N views of one image:
    normalised float32 tensors when `photometric_on="workers"`, uint8 crops otherwise. After collation and the
    transfer to the device, `augmentation.apply_on_device(batch_crops, generator)` runs the photometric stage
    on the batch (identity when it already ran in the workers).

    Args:
        config: the multi-crop settings (official defaults when omitted).
        photometric_on: "accelerator" (default: the data workers only decode and crop; the training loop
            calls `apply_on_device`) or "workers" (the official placement; ~6x the CPU cost per image).
    """

    def __init__(
        self,
        config: MultiCropConfig | None = None,
        photometric_on: Literal["workers", "accelerator"] = "accelerator",
    ) -> None:
        if photometric_on not in ("workers", "accelerator"):
            raise ValueError(f"photometric_on must be 'workers' or 'accelerator', got {photometric_on!r}")
        self.config = config or MultiCropConfig()
        self.photometric_on = photometric_on
        self.geometric = MultiCropGeometric(self.config)
        self.photometric = MultiCropPhotometric(self.config)

    def __call__(self, image: Any, *, seed: int | None = None) -> list[torch.Tensor]:
        """CPU-side views of one image.

        Args:
            image: PIL image, numpy array or tensor.
            seed: makes the crops (and the worker-side photometric draws) reproducible.

        Returns:
            2 + N tensors (C, H, W): uint8 / float32 crops, or normalised float32 views when
            `photometric_on="workers"`.
        """
        crops = self.geometric(image, random.Random(seed))
        if self.photometric_on == "workers":
            generator = torch.Generator()
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)
            with torch.no_grad():
                views = self.photometric([crop.unsqueeze(0) for crop in crops], generator)
            crops = [view[0] for view in views]
        return crops

    def apply_on_device(
        self, crops: Sequence[torch.Tensor], generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        """The accelerator part: photometric stage on collated crops (identity if it ran in the workers).

        Args:
            crops: 2 + N tensors (B, C, H, W) already on the device.
            generator: a generator on the same device, for reproducible draws.

        Returns:
            2 + N float32 normalised tensors (B, C, H, W).
        """
        if self.photometric_on == "workers":
            return list(crops)
        self.photometric.to(crops[0].device)
        with torch.no_grad():
            return self.photometric(crops, generator)

    def minimum_decode_size(self, width: int, height: int) -> tuple[int, int]:
        """See `MultiCropGeometric.minimum_decode_size`."""
        return self.geometric.minimum_decode_size(width, height)
