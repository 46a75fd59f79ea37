"""What a DINO ViT looks at: last-layer CLS attention, 60%-mass masks and patch-feature PCA, as images.

The paper's most quoted result (paper §4.2.1, Fig. 1 and 3) is that the CLS token's self-attention in the
last block of a DINO ViT segments objects without ever seeing a label. This module turns an image and a
checkpoint into those pictures:

    model = load_attention_model("facebook/dino-vits8")          # or a hf_dino DinoModel folder / repo
    analysis = analyze_image(model, "cat.jpg", resolution=480)
    figures = render_figures(analysis)                            # {"heads": PIL.Image, "mean": ..., ...}

The pieces are plain functions so they can be tested against independent computations:
- images in: `load_image` (any file Pillow reads, every colour mode, corrupt files -> `ImageLoadError`),
  `prepare_image` (resize so both sides are multiples of the patch size),
- maps: `cls_attention_maps`, `mean_attention_map`, `mass_threshold_masks`, `patch_pca`, `patch_pca_rgb`,
- pictures out: `apply_colormap`, `overlay_heatmap`, `render_head_grid`, `render_masks`, ... (Pillow and
  numpy only; no matplotlib),
- models: `load_attention_model` wraps a hf_dino `DinoModel` or a stock transformers `ViTModel` in an
  `AttentionModel` that computes only the last block's attention, from that block's input, in the same
  forward pass that produces the patch features (every other block keeps its fast SDPA attention).

It imports nothing else from hf_dino, so the Gradio Space can ship this one file next to its `app.py`.
"""

from __future__ import annotations

import io
import math
import os
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError
from torch import nn

# ImageNet statistics: the normalisation every DINO checkpoint was trained with (official default).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The paper's masks keep the patches holding 60% of the CLS attention mass (paper §4.2.1, Fig. 3).
DEFAULT_MASS = 0.6
# Huge inputs are shrunk to this longest side before anything else: decoding and resizing stay cheap and
# no resolution the model is run at needs more.
MAX_INPUT_SIDE = 1024
# The model input keeps the image's aspect ratio up to this ratio (longer inputs are centre-cropped), so the
# number of tokens, and the time taken, stays bounded.
MAX_ASPECT_RATIO = 2.0
# A usable attention map needs a few patches per side, whatever the resolution asked for.
MIN_GRID_SIDE = 4


# ---------------------------------------------------------------------------------------------------------
# Images in
# ---------------------------------------------------------------------------------------------------------


class ImageLoadError(ValueError):
    """The input could not be read as an image; the message says why in words meant for a user."""


def load_image(
    source: str | os.PathLike | bytes | Image.Image,
    *,
    max_side: int = MAX_INPUT_SIDE,
    name: str | None = None,
) -> tuple[Image.Image, list[str]]:
    """Read an image from a path, bytes or a PIL image and return it as 8-bit RGB.

    Every colour mode is converted: grayscale and 1-bit to RGB, palette and alpha images composited on white,
    CMYK / YCbCr / LAB / HSV converted, 16-bit and float images rescaled to 8 bits. The EXIF orientation is
    applied and animated images contribute their first frame. Images larger than `max_side` on their longest
    side are shrunk first (JPEGs are decoded at reduced size directly).

    Args:
        source: a file path, the file's bytes, or an already opened PIL image.
        max_side: longest side kept after loading, in pixels.
        name: how error messages call the input (default: the file name).

    Returns:
        `(image, notes)`: the RGB image and a list of human-readable notes about what was converted.

    Raises:
        ImageLoadError: the file does not exist, is not an image, is corrupt or truncated, or is too large to
            decode safely.
    """
    notes: list[str] = []
    if isinstance(source, Image.Image):
        image = source
        label = name or "the image"
    else:
        default_label = Path(source).name if isinstance(source, (str, os.PathLike)) else "the uploaded data"
        label = name or default_label
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.is_file():
                raise ImageLoadError(f"{label}: no such file")
            if path.stat().st_size == 0:
                raise ImageLoadError(f"{label}: the file is empty")
            if path.suffix.lower() == ".svg":
                raise ImageLoadError(f"{label}: SVG (vector) images are not supported; upload a PNG or JPEG")
            stream: Any = path
        else:
            if len(source) == 0:
                raise ImageLoadError(f"{label}: the file is empty")
            stream = io.BytesIO(source)
        try:
            image = Image.open(stream)
        except UnidentifiedImageError:
            raise ImageLoadError(
                f"{label} is not an image file that can be read (supported: JPEG, PNG, WebP, GIF, BMP, TIFF)"
            ) from None
        except Image.DecompressionBombError:
            raise ImageLoadError(
                f"{label} is too large to decode safely (more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels)"
            ) from None
        except OSError as error:
            raise ImageLoadError(f"{label} could not be opened: {error}") from None

    width, height = image.size
    if width < 1 or height < 1:
        raise ImageLoadError(f"{label} has no pixels ({width}x{height})")
    if max(width, height) > max_side:
        # JPEG can decode straight at 1/2, 1/4 or 1/8 scale: a 50-megapixel photo then costs milliseconds.
        if image.format == "JPEG":
            image.draft("RGB", (max_side, max_side))
        notes.append(f"downscaled from {width}x{height} (longest side {max_side} px)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            image = ImageOps.exif_transpose(image)
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, ... for damaged files
        raise ImageLoadError(f"{label} is corrupt or truncated and could not be decoded ({error})") from None

    try:
        image, conversion = to_rgb(image)
    except (ValueError, OSError) as error:
        raise ImageLoadError(
            f"{label}: its colour mode {image.mode} cannot be converted to RGB ({error})"
        ) from None
    if conversion:
        notes.append(conversion)
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image, notes


def to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """Convert any Pillow colour mode to 8-bit RGB.

    Args:
        image: a loaded PIL image.

    Returns:
        `(rgb_image, note)` where `note` describes the conversion, or None if the image was already RGB.
    """
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Composite on white rather than dropping alpha: transparent pixels often hold garbage colours.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), f"{mode} image composited on white"
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.ndim == 3:  # multi-channel 16-bit modes, if Pillow gives them to us
            values = values[..., :3]
        high = float(values.max()) if values.size else 0.0
        low = float(values.min()) if values.size else 0.0
        if mode == "F" or low < 0 or high > 65535:
            # Unknown range (float or 32-bit data): stretch what is there.
            scaled = (values - low) / max(high - low, 1e-12) * 255.0
        elif high > 255:
            scaled = values / 257.0  # 16-bit -> 8-bit (65535 / 257 = 255)
        else:
            scaled = values
        eight_bit = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8)).convert("RGB")
        depth = "float" if mode == "F" else "high bit depth"
        return eight_bit, f"{mode} ({depth}) image converted to 8-bit RGB"
    if mode in ("1", "L"):
        return image.convert("RGB"), "grayscale image converted to RGB"
    return image.convert("RGB"), f"{mode} image converted to RGB"


def choose_input_size(
    width: int,
    height: int,
    *,
    resolution: int,
    patch_size: int,
    max_aspect_ratio: float = MAX_ASPECT_RATIO,
) -> tuple[int, int, int, int]:
    """Pick the model input size: the short side near `resolution`, both sides multiples of the patch size.

    Args:
        width, height: the image size in pixels.
        resolution: wanted length of the short side (e.g. 224, 320 or 480; the paper's figures use 480).
        patch_size: the ViT patch size; both output sides are multiples of it.
        max_aspect_ratio: longer images are centre-cropped to this ratio first.

    Returns:
        `(crop_width, crop_height, input_width, input_height)`: the centre crop taken from the image (equal
        to the image size unless the aspect ratio is too extreme) and the size it is resized to.
    """
    if resolution < 1 or patch_size < 1:
        raise ValueError(f"resolution and patch_size must be positive, got {resolution} and {patch_size}")
    crop_width, crop_height = width, height
    if width > height * max_aspect_ratio:
        crop_width = max(1, round(height * max_aspect_ratio))
    elif height > width * max_aspect_ratio:
        crop_height = max(1, round(width * max_aspect_ratio))
    short_patches = max(MIN_GRID_SIDE, round(resolution / patch_size))
    scale = short_patches / min(crop_width, crop_height)
    if crop_width <= crop_height:
        columns, rows = short_patches, max(short_patches, round(crop_height * scale))
    else:
        columns, rows = max(short_patches, round(crop_width * scale)), short_patches
    return crop_width, crop_height, columns * patch_size, rows * patch_size


def prepare_image(image: Image.Image, *, resolution: int, patch_size: int) -> tuple[Image.Image, list[str]]:
    """Resize an RGB image to the model input size chosen by `choose_input_size`.

    Args:
        image: an RGB image (from `load_image`).
        resolution: wanted short side in pixels.
        patch_size: the ViT patch size.

    Returns:
        `(resized_image, notes)`; both sides of `resized_image` are multiples of `patch_size`.
    """
    notes: list[str] = []
    width, height = image.size
    crop_width, crop_height, input_width, input_height = choose_input_size(
        width, height, resolution=resolution, patch_size=patch_size
    )
    if (crop_width, crop_height) != (width, height):
        left, top = (width - crop_width) // 2, (height - crop_height) // 2
        image = image.crop((left, top, left + crop_width, top + crop_height))
        notes.append(f"very elongated image centre-cropped to {crop_width}x{crop_height}")
    if min(crop_width, crop_height) * 2 <= min(input_width, input_height):
        notes.append(f"small image ({crop_width}x{crop_height}) upscaled to {input_width}x{input_height}")
    resized = image.resize((input_width, input_height), Image.Resampling.BICUBIC)
    return resized, notes


def image_to_pixel_values(
    image: Image.Image,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Normalise an image into the model input.

    Args:
        image: a PIL image of size (W, H).
        mean, std: per-channel normalisation (ImageNet, as in DINO's training); one value each for a
            grayscale model, whose input is the image's luminance.

    Returns:
        pixel_values: float tensor (1, C, H, W) with C = len(mean) (3, or 1 for grayscale models).
    """
    grayscale = len(mean) == 1
    array = np.asarray(image.convert("L" if grayscale else "RGB"), dtype=np.float32) / 255.0
    if grayscale:
        array = array[..., None]
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


# ---------------------------------------------------------------------------------------------------------
# Attention maps, masks and PCA
# ---------------------------------------------------------------------------------------------------------


def cls_attention_maps(attentions_last_layer: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """The CLS token's attention to every patch, per head, laid out on the patch grid.

    Args:
        attentions_last_layer: (B, heads, queries, tokens) attention probabilities of the last block; query 0
            is the CLS token (a full (B, heads, tokens, tokens) matrix or only its CLS row, queries = 1). The
            last h*w tokens are the patches, in row-major order.
        grid_hw: (h, w) patches.

    Returns:
        (B, heads, h, w) attention of the CLS query to each patch (the CLS and any other prefix tokens
        are left out, so a map sums to less than 1).
    """
    height, width = grid_hw
    if attentions_last_layer.dim() != 4:
        raise ValueError(
            f"expected (B, heads, queries, tokens), got shape {tuple(attentions_last_layer.shape)}"
        )
    tokens = attentions_last_layer.shape[-1]
    if tokens < height * width + 1:
        raise ValueError(f"{tokens} tokens cannot hold a CLS token and a {height}x{width} patch grid")
    cls_row = attentions_last_layer[:, :, 0, tokens - height * width :]
    return cls_row.reshape(*cls_row.shape[:2], height, width)


def mean_attention_map(attention_maps: torch.Tensor) -> torch.Tensor:
    """Average the per-head maps.

    Args:
        attention_maps: (B, heads, h, w).

    Returns:
        (B, h, w) mean over heads.
    """
    return attention_maps.mean(dim=1)


def mass_threshold_masks(attention: torch.Tensor, mass: float = DEFAULT_MASS) -> torch.Tensor:
    """Keep, per map, the smallest set of top patches that holds `mass` of its attention (paper §4.2.1).

    Follows the official visualisation: values are sorted ascending, their cumulative sum is normalised by
    the map's total, and the patches whose cumulative sum exceeds `1 - mass` are kept. The kept patches hold
    at least `mass` of the total, and dropping the smallest of them would fall below it.

    Args:
        attention: (..., h, w) non-negative maps, e.g. (B, heads, h, w) from `cls_attention_maps`.
        mass: fraction of the attention mass to keep, in (0, 1].

    Returns:
        bool tensor with the shape of `attention`, True for kept patches.
    """
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    if attention.dim() < 2:
        raise ValueError(f"expected (..., h, w) maps, got shape {tuple(attention.shape)}")
    flat = attention.reshape(*attention.shape[:-2], -1).double()
    sorted_values, order = torch.sort(flat, dim=-1)
    cumulative = torch.cumsum(sorted_values, dim=-1) / sorted_values.sum(dim=-1, keepdim=True).clamp_min(
        1e-300
    )
    keep_sorted = cumulative > (1.0 - mass)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep.reshape(attention.shape)


def patch_pca(patch_tokens: torch.Tensor, n_components: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal components of patch features.

    The sign of each component is fixed so that its largest-magnitude loading is positive, which makes the
    result deterministic (an SVD may return either sign).

    Args:
        patch_tokens: (N, D) features of N patches (several images can be stacked into N).
        n_components: number of components.

    Returns:
        `(projections, components)`: (N, n_components) centred features projected on the components, and
        (n_components, D) the unit-norm components, by decreasing variance.
    """
    if patch_tokens.dim() != 2:
        raise ValueError(f"expected (N, D) patch features, got shape {tuple(patch_tokens.shape)}")
    features = patch_tokens.double()
    centred = features - features.mean(dim=0, keepdim=True)
    _, _, right_vectors = torch.linalg.svd(centred, full_matrices=False)
    components = right_vectors[:n_components]
    strongest = components.abs().argmax(dim=1)
    signs = torch.sign(components.gather(1, strongest[:, None]))
    components = components * torch.where(signs == 0, torch.ones_like(signs), signs)
    if components.shape[0] < n_components:  # fewer patches or dimensions than components: pad with zeros
        padding = components.new_zeros(n_components - components.shape[0], components.shape[1])
        components = torch.cat([components, padding])
    return centred @ components.T, components


def patch_pca_rgb(patch_tokens: torch.Tensor, grid_hw: tuple[int, int]) -> np.ndarray:
    """The first three principal components of the patch features as an RGB picture.

    Args:
        patch_tokens: (N, D) for one image, or (B, N, D) for several (one PCA fitted on all of them, so
            colours are comparable across the images), with N = h*w in row-major order.
        grid_hw: (h, w) patches.

    Returns:
        float32 array (h, w, 3), or (B, h, w, 3), in [0, 1]: each component min-max scaled to one channel.
    """
    height, width = grid_hw
    batched = patch_tokens.dim() == 3
    tokens = patch_tokens if batched else patch_tokens.unsqueeze(0)
    batch, count, dim = tokens.shape
    if count != height * width:
        raise ValueError(f"{count} patch tokens do not fill a {height}x{width} grid")
    projections, _ = patch_pca(tokens.reshape(batch * count, dim), n_components=3)
    low = projections.min(dim=0).values
    high = projections.max(dim=0).values
    scaled = (projections - low) / (high - low).clamp_min(1e-12)
    rgb = scaled.reshape(batch, height, width, 3).float().cpu().numpy()
    return rgb if batched else rgb[0]


# ---------------------------------------------------------------------------------------------------------
# Pictures out (Pillow + numpy)
# ---------------------------------------------------------------------------------------------------------

# Viridis sampled at 9 evenly spaced points (its published values); linear interpolation between them gives
# a perceptually ordered 256-entry table close to the full colormap, with no matplotlib needed.
_VIRIDIS_ANCHORS = (
    (0x44, 0x01, 0x54),
    (0x47, 0x2D, 0x7B),
    (0x3B, 0x52, 0x8B),
    (0x2C, 0x72, 0x8E),
    (0x21, 0x90, 0x8C),
    (0x27, 0xAD, 0x81),
    (0x5D, 0xC8, 0x63),
    (0xAA, 0xDC, 0x32),
    (0xFD, 0xE7, 0x25),
)


def _build_colormap_table(anchors: Sequence[tuple[int, int, int]], size: int = 256) -> np.ndarray:
    anchor_array = np.asarray(anchors, dtype=np.float64)
    anchor_positions = np.linspace(0.0, 1.0, len(anchors))
    positions = np.linspace(0.0, 1.0, size)
    channels = [np.interp(positions, anchor_positions, anchor_array[:, channel]) for channel in range(3)]
    return np.clip(np.rint(np.stack(channels, axis=1)), 0, 255).astype(np.uint8)


VIRIDIS_TABLE = _build_colormap_table(_VIRIDIS_ANCHORS)  # (256, 3) uint8


def normalize_map(values: np.ndarray) -> np.ndarray:
    """Min-max scale an array to [0, 1] (a constant array maps to 0), as `plt.imsave` does per image."""
    values = np.asarray(values, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if high - low <= 1e-12:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def apply_colormap(values: np.ndarray, table: np.ndarray = VIRIDIS_TABLE) -> np.ndarray:
    """Map values in [0, 1] through a colour table.

    Args:
        values: (h, w) floats in [0, 1] (clipped).
        table: (256, 3) uint8 colour table.

    Returns:
        (h, w, 3) uint8 RGB.
    """
    indices = np.clip(np.rint(np.asarray(values) * (len(table) - 1)), 0, len(table) - 1).astype(np.intp)
    return table[indices]


def upsample_nearest(values: np.ndarray, factor: int) -> np.ndarray:
    """Blow each patch up to a `factor` x `factor` block, as the paper's figures show them.

    Args:
        values: (h, w) or (h, w, C).
        factor: the patch size.

    Returns:
        (h*factor, w*factor) or (h*factor, w*factor, C).
    """
    return np.repeat(np.repeat(values, factor, axis=0), factor, axis=1)


def overlay_heatmap(image: Image.Image, heat: np.ndarray, *, alpha: float = 0.6) -> Image.Image:
    """Blend a colour-mapped heat map over an image.

    Args:
        image: RGB image of size (W, H).
        heat: (h, w) map in [0, 1] on a coarser grid (H, W multiples of h, w) or at pixel resolution.
        alpha: weight of the heat map.

    Returns:
        RGB image of size (W, H).
    """
    colours = _to_pixels(apply_colormap(heat), image.size)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    blended = (1.0 - alpha) * base + alpha * colours.astype(np.float32)
    return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))


def _to_pixels(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a (h, w[, C]) array to image `size` = (W, H)."""
    width, height = size
    if array.shape[:2] == (height, width):
        return array
    if (
        height % array.shape[0] == 0
        and width % array.shape[1] == 0
        and height // array.shape[0] == width // array.shape[1]
    ):
        return upsample_nearest(array, height // array.shape[0])
    rows = (np.arange(height) * array.shape[0] // height).clip(0, array.shape[0] - 1)
    columns = (np.arange(width) * array.shape[1] // width).clip(0, array.shape[1] - 1)
    return array[rows][:, columns]


def head_colours(count: int) -> list[tuple[int, int, int]]:
    """`count` distinct saturated colours, evenly spaced in hue (one per attention head)."""
    colours = []
    for index in range(count):
        hue = (index / max(count, 1) + 0.02) % 1.0
        rgb = Image.new("HSV", (1, 1), (round(hue * 255), 220, 255)).convert("RGB").getpixel((0, 0))
        colours.append(tuple(int(channel) for channel in rgb))
    return colours


def _mask_outline(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of `mask` within `width` pixels of its border (4-neighbourhood erosion, `width` times)."""
    eroded = mask.copy()
    for _ in range(width):
        padded = np.pad(eroded, 1, constant_values=False)
        eroded = (
            padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        )
    return mask & ~eroded


def masked_image(
    image: Image.Image, mask: np.ndarray, colour: tuple[int, int, int], *, dim: float = 0.3
) -> Image.Image:
    """Show one mask on an image: outside dimmed, inside tinted and outlined in `colour`.

    Args:
        image: RGB image of size (W, H).
        mask: (h, w) bool on the patch grid (or at pixel resolution).
        colour: the outline / tint colour.
        dim: brightness kept outside the mask.

    Returns:
        RGB image of size (W, H).
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    inside = _to_pixels(np.asarray(mask, dtype=bool), image.size)
    tint = np.asarray(colour, dtype=np.float32)
    result = np.where(inside[..., None], 0.8 * pixels + 0.2 * tint, dim * pixels)
    outline_width = max(1, round(min(image.size) / 160))
    result[_mask_outline(inside, outline_width)] = tint
    return Image.fromarray(np.clip(np.rint(result), 0, 255).astype(np.uint8))


def masks_overlay(
    image: Image.Image, masks: np.ndarray, colours: Sequence[tuple[int, int, int]]
) -> Image.Image:
    """All heads' masks on one image, each tinted and outlined in its own colour.

    Args:
        image: RGB image of size (W, H).
        masks: (heads, h, w) bool.
        colours: one colour per head.

    Returns:
        RGB image of size (W, H).
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    tint_sum = np.zeros_like(pixels)
    cover_count = np.zeros(pixels.shape[:2], dtype=np.float32)
    outline_width = max(1, round(min(image.size) / 200))
    outlines = []
    for mask, colour in zip(masks, colours):
        inside = _to_pixels(np.asarray(mask, dtype=bool), image.size)
        tint = np.asarray(colour, dtype=np.float32)
        tint_sum[inside] += tint
        cover_count += inside
        outlines.append((_mask_outline(inside, outline_width), tint))
    covered = cover_count > 0
    # Kept pixels: the image tinted by the mean colour of the heads that keep them; the rest dimmed.
    mean_tint = tint_sum / np.maximum(cover_count, 1.0)[..., None]
    result = np.where(covered[..., None], 0.65 * pixels + 0.35 * mean_tint, 0.3 * pixels)
    for outline, tint in outlines:
        result[outline] = tint
    return Image.fromarray(np.clip(np.rint(result), 0, 255).astype(np.uint8))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _label(tile: Image.Image, text: str) -> Image.Image:
    """Write `text` in a dark rounded box at the tile's top-left corner."""
    tile = tile.convert("RGB")
    draw = ImageDraw.Draw(tile, "RGBA")
    font_size = max(10, min(22, round(min(tile.size) / 14)))
    font = _font(font_size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    padding = max(3, font_size // 3)
    box = (padding, padding, padding + (right - left) + 2 * padding, padding + (bottom - top) + 2 * padding)
    draw.rounded_rectangle(box, radius=padding, fill=(0, 0, 0, 150))
    draw.text((2 * padding - left, 2 * padding - top), text, font=font, fill=(255, 255, 255, 255))
    return tile


def grid_columns(count: int) -> int:
    """Columns for `count` tiles: about twice as many columns as rows (7 -> 4, 13 -> 5)."""
    rows = max(1, round(math.sqrt(count / 2)))
    return math.ceil(count / rows)


def tile_grid(
    tiles: Sequence[Image.Image],
    labels: Sequence[str] | None = None,
    *,
    columns: int | None = None,
    tile_long_side: int | None = None,
    gap: int = 6,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Lay equally sized tiles out in a grid.

    Args:
        tiles: RGB images, all the same size.
        labels: optional caption per tile, drawn in its corner.
        columns: tiles per row; by default `grid_columns(len(tiles))`.
        tile_long_side: if given, tiles are resized (nearest, keeping patch blocks sharp) so that their longer
            side has this length.
        gap: pixels between tiles and around the grid.
        background: colour of the gaps.

    Returns:
        the grid as one RGB image.
    """
    if not tiles:
        raise ValueError("no tiles to lay out")
    columns = columns or grid_columns(len(tiles))
    width, height = tiles[0].size
    if tile_long_side is not None and max(width, height) != tile_long_side:
        scale = tile_long_side / max(width, height)
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
    rows = math.ceil(len(tiles) / columns)
    canvas = Image.new("RGB", (columns * (width + gap) + gap, rows * (height + gap) + gap), background)
    for index, tile in enumerate(tiles):
        if tile.size != (width, height):
            tile = tile.resize((width, height), Image.Resampling.NEAREST)
        if labels is not None:
            tile = _label(tile, labels[index])
        row, column = divmod(index, columns)
        canvas.paste(tile, (gap + column * (width + gap), gap + row * (height + gap)))
    return canvas


def render_head_grid(
    image: Image.Image, attention_maps: np.ndarray, *, tile_long_side: int | None = None
) -> Image.Image:
    """The input image followed by each head's CLS attention map (colour-mapped, min-max per head).

    Args:
        image: the model input image (W, H), multiples of the patch grid.
        attention_maps: (heads, h, w).
        tile_long_side: optional tile size (see `tile_grid`).

    Returns:
        RGB grid image.
    """
    tiles = [image.convert("RGB")]
    for head_map in attention_maps:
        tiles.append(Image.fromarray(_to_pixels(apply_colormap(normalize_map(head_map)), image.size)))
    labels = ["input"] + [f"head {index + 1}" for index in range(len(attention_maps))]
    return tile_grid(tiles, labels, tile_long_side=tile_long_side)


def render_mean_map(
    image: Image.Image, mean_map: np.ndarray, *, tile_long_side: int | None = None
) -> Image.Image:
    """The mean attention over heads: the map itself and blended over the image, side by side.

    Args:
        image: the model input image.
        mean_map: (h, w).
        tile_long_side: optional tile size.

    Returns:
        RGB image of two tiles.
    """
    heat = normalize_map(mean_map)
    plain = Image.fromarray(_to_pixels(apply_colormap(heat), image.size))
    return tile_grid(
        [overlay_heatmap(image, heat), plain],
        ["mean over heads", "mean map"],
        columns=2,
        tile_long_side=tile_long_side,
    )


def render_masks(
    image: Image.Image, masks: np.ndarray, *, mass: float = DEFAULT_MASS, tile_long_side: int | None = None
) -> Image.Image:
    """All heads' masks on the image, then one tile per head (outside the mask dimmed).

    Args:
        image: the model input image.
        masks: (heads, h, w) bool from `mass_threshold_masks`.
        mass: the kept fraction, for the captions.
        tile_long_side: optional tile size.

    Returns:
        RGB grid image.
    """
    colours = head_colours(len(masks))
    tiles = [masks_overlay(image, masks, colours)]
    tiles += [masked_image(image, mask, colour) for mask, colour in zip(masks, colours)]
    percent = f"{mass * 100:.0f}%"
    labels = [f"all heads, {percent} mass"] + [f"head {index + 1}" for index in range(len(masks))]
    return tile_grid(tiles, labels, tile_long_side=tile_long_side)


def render_pca(image: Image.Image, pca_rgb: np.ndarray, *, tile_long_side: int | None = None) -> Image.Image:
    """The input image beside the first three principal components of its patch features as RGB.

    Args:
        image: the model input image.
        pca_rgb: (h, w, 3) floats in [0, 1] from `patch_pca_rgb`.
        tile_long_side: optional tile size.

    Returns:
        RGB image of two tiles.
    """
    rgb = np.clip(np.rint(np.asarray(pca_rgb) * 255.0), 0, 255).astype(np.uint8)
    pca_image = Image.fromarray(_to_pixels(rgb, image.size))
    return tile_grid(
        [image.convert("RGB"), pca_image],
        ["input", "patch PCA (RGB)"],
        columns=2,
        tile_long_side=tile_long_side,
    )


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------


_NORM_BEFORE_ATTENTION = ("layernorm_before", "norm1")  # transformers ViT layers; timm-style blocks


def _find_last_attention(model: nn.Module) -> tuple[nn.Module, str, nn.Module | None]:
    """The last self-attention module with query/key projections, their layout, and the norm feeding it.

    Handles transformers' ViT as written since ~5.9 (`attention.q_proj`, `.k_proj`), its older layout
    (`attention.attention.query`, `.key`) and timm-style fused `qkv` projections.

    Returns:
        `(attention_module, layout, norm)`: layout is "q_proj", "query" or "qkv"; `norm` is the enclosing
        block's pre-attention LayerNorm, whose output is the attention input (None if there is none).
    """
    found: tuple[str, nn.Module, str] | None = None
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if isinstance(getattr(module, "q_proj", None), nn.Linear) and isinstance(
            getattr(module, "k_proj", None), nn.Linear
        ):
            found = (name, module, "q_proj")
        elif isinstance(getattr(module, "query", None), nn.Linear) and isinstance(
            getattr(module, "key", None), nn.Linear
        ):
            found = (name, module, "query")
        elif isinstance(getattr(module, "qkv", None), nn.Linear):
            found = (name, module, "qkv")
    if found is None:
        raise ValueError(f"{type(model).__name__} has no self-attention layer with query/key projections")
    name, module, layout = found
    # Walk up to the block that owns the attention and look for its pre-attention norm.
    parts = name.split(".") if name else []
    for depth in range(len(parts), -1, -1):
        block = modules.get(".".join(parts[:depth]))
        for attribute in _NORM_BEFORE_ATTENTION:
            norm = getattr(block, attribute, None)
            if isinstance(norm, nn.LayerNorm):
                return module, layout, norm
    return module, layout, None


class AttentionModel:
    """A DINO ViT behind one small interface: last-block CLS attention and patch features in one forward.

    The last block's attention is recomputed from that block's input (captured by a forward hook on its
    pre-attention LayerNorm) with the block's own query/key projections, so the model keeps its fast SDPA
    attention everywhere and only the attention rows asked for are materialised: the CLS row costs
    (B, heads, tokens) instead of the full (B, heads, tokens, tokens), which for ViT-S/8 at 480x640 is 550 MB.

    Attributes:
        model: the wrapped `DinoModel` or `ViTModel` (eval mode).
        name: where it was loaded from.
        kind: "dino" (hf_dino DinoModel, installed or remote code) or "vit" (stock transformers ViTModel).
        patch_size: pixels per patch side.
        num_heads: attention heads of the last block.
        image_mean, image_std: input normalisation (ImageNet; 0.5/0.5 for grayscale models).
    """

    def __init__(
        self, model: nn.Module, *, kind: str, name: str = "", patch_size: int, num_heads: int
    ) -> None:
        self.model = model.eval()
        self.kind = kind
        self.name = name
        self.patch_size = patch_size
        self.num_heads = num_heads
        config = getattr(model.config, "backbone_config", model.config)
        channels = getattr(config, "num_channels", 3)
        if channels == 3:
            self.image_mean, self.image_std = IMAGENET_MEAN, IMAGENET_STD
        elif channels == 1:  # grayscale models (e.g. hf_dino's Fashion-MNIST demo) train with mean/std 0.5
            self.image_mean, self.image_std = (0.5,), (0.5,)
        else:
            raise ValueError(
                f"{name or 'this model'} takes {channels}-channel images; only 1 or 3 can be shown"
            )
        self._attention_module, self._projection_layout, norm = _find_last_attention(model)
        # Captured inputs are kept per thread: a Space serves concurrent requests with the same model.
        self._captured = threading.local()
        if norm is not None:
            # The norm's output is the attention input. Hooking the norm rather than the attention module
            # also covers DinoModel, whose blocks call the attention projections without the module's forward.
            norm.register_forward_hook(self._capture_norm_output)
        else:
            self._attention_module.register_forward_pre_hook(self._capture_attention_input, with_kwargs=True)

    # -- hooks: keep the last block's attention input, only while this adapter runs a forward -----------

    def _capture_norm_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if getattr(self._captured, "active", False):
            self._captured.hidden_states = output

    def _capture_attention_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if getattr(self._captured, "active", False):
            self._captured.hidden_states = args[0] if args else kwargs["hidden_states"]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _forward_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward: (final-norm tokens (B, tokens, D), last block's attention input (B, tokens, D))."""
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        self._captured.active = True
        self._captured.hidden_states = None
        try:
            if self.kind == "vit":
                output = self.model(pixel_values=pixel_values, interpolate_pos_encoding=True)
            else:
                output = self.model(pixel_values=pixel_values)
        finally:
            self._captured.active = False
        attention_input = self._captured.hidden_states
        self._captured.hidden_states = None
        if attention_input is None:
            raise RuntimeError("the last attention layer was not called during the forward pass")
        return output.last_hidden_state, attention_input

    def _attention_from_input(self, hidden_states: torch.Tensor, *, cls_only: bool) -> torch.Tensor:
        """Softmax(q k^T * scale) of the last block, for the CLS query only or for every query.

        Args:
            hidden_states: (B, tokens, D) the input of the last attention module (after its layer norm).
            cls_only: compute only the CLS query row.

        Returns:
            (B, heads, 1 or tokens, tokens) attention probabilities in float32.
        """
        module, layout = self._attention_module, self._projection_layout
        batch, tokens, _ = hidden_states.shape
        queries_input = hidden_states[:, :1] if cls_only else hidden_states
        if layout == "q_proj":
            queries, keys = module.q_proj(queries_input), module.k_proj(hidden_states)
        elif layout == "query":
            queries, keys = module.query(queries_input), module.key(hidden_states)
        else:
            width = module.qkv.out_features // 3
            queries = nn.functional.linear(
                queries_input, module.qkv.weight[:width], _slice(module.qkv.bias, 0, width)
            )
            keys = nn.functional.linear(
                hidden_states, module.qkv.weight[width : 2 * width], _slice(module.qkv.bias, width, 2 * width)
            )
        head_dim = queries.shape[-1] // self.num_heads
        queries = queries.reshape(batch, -1, self.num_heads, head_dim).transpose(1, 2).float()
        keys = keys.reshape(batch, tokens, self.num_heads, head_dim).transpose(1, 2).float()
        scaling = getattr(module, "scaling", None) or getattr(module, "scale", None) or head_dim**-0.5
        return torch.softmax(queries @ keys.transpose(-1, -2) * float(scaling), dim=-1)

    # -- public API ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLS attention of the last block and the patch features, from one forward pass.

        Args:
            pixel_values: (B, 3, H, W) normalised images, H and W multiples of the patch size.

        Returns:
            `(cls_attention, patch_tokens)`: (B, heads, 1, tokens) attention of the CLS query (float32), and
            (B, h*w, D) final-norm patch tokens.
        """
        grid_hw = self.grid_size(pixel_values)
        tokens, attention_input = self._forward_tokens(pixel_values)
        cls_attention = self._attention_from_input(attention_input, cls_only=True)
        return cls_attention, tokens[:, tokens.shape[1] - grid_hw[0] * grid_hw[1] :]

    @torch.inference_mode()
    def last_self_attention(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Full attention probabilities of the last block.

        Args:
            pixel_values: (B, 3, H, W).

        Returns:
            (B, heads, tokens, tokens) float32.
        """
        _, attention_input = self._forward_tokens(pixel_values)
        return self._attention_from_input(attention_input, cls_only=False)

    @torch.inference_mode()
    def patch_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Final-norm patch tokens, (B, h*w, D) in row-major patch order."""
        return self.forward(pixel_values)[1]

    def grid_size(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        """(h, w) patches of an input (B, 3, H, W); H and W must be multiples of the patch size."""
        height, width = pixel_values.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"input {height}x{width} is not a multiple of the patch size {self.patch_size}")
        return height // self.patch_size, width // self.patch_size

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """An RGB image (sides multiples of the patch size) -> (1, 3, H, W) normalised pixel values."""
        return image_to_pixel_values(image, self.image_mean, self.image_std)


def _slice(bias: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    return None if bias is None else bias[start:stop]


def _patch_size_of(config: Any) -> int:
    patch = config.patch_size
    return int(patch if isinstance(patch, int) else patch[0])


def load_attention_model(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    *,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = True,
    token: str | bool | None = None,
) -> AttentionModel:
    """Load a DINO ViT for attention maps: a hf_dino `DinoModel` or a stock transformers `ViTModel`.

    - `model_type` "vit" (e.g. `facebook/dino-vits8`, or the `backbone/` export of a hf_dino repo) loads
      with `ViTModel.from_pretrained(..., add_pooling_layer=False)`.
    - `model_type` "dino" loads with hf_dino's `DinoModel` when hf_dino is installed, else through the
      repository's own code (`trust_remote_code`).

    Args:
        name_or_path: a Hub repo id or a local folder.
        revision: branch, tag or commit on the Hub.
        device: where to run the model.
        trust_remote_code: allow a "dino" repository's bundled code when hf_dino is not installed.
        token: Hub token for private repositories.

    Returns:
        an `AttentionModel`.

    Raises:
        ValueError: the checkpoint is not a ViT (e.g. a ResNet-50 DINO model has no attention to show).
    """
    from transformers import PretrainedConfig

    name = str(name_or_path)
    config_dict, _ = PretrainedConfig.get_config_dict(name, revision=revision, token=token)
    model_type = config_dict.get("model_type")
    if model_type == "vit":
        from transformers import ViTModel

        model = ViTModel.from_pretrained(name, revision=revision, token=token, add_pooling_layer=False)
        config = model.config
        return AttentionModel(
            model.to(device),
            kind="vit",
            name=name,
            patch_size=_patch_size_of(config),
            num_heads=config.num_attention_heads,
        )
    if model_type == "dino":
        backbone = config_dict.get("backbone_config") or {}
        if backbone.get("model_type", "vit") != "vit":
            raise ValueError(
                f"{name} has a {backbone.get('model_type')} backbone: attention maps need a ViT checkpoint"
            )
        try:
            from hf_dino.modeling_dino import DinoModel

            model = DinoModel.from_pretrained(name, revision=revision, token=token)
        except ImportError:
            if not trust_remote_code:
                raise ValueError(
                    f"{name} is a hf_dino DinoModel: install hf_dino or allow trust_remote_code"
                ) from None
            from transformers import AutoModel

            model = AutoModel.from_pretrained(name, revision=revision, token=token, trust_remote_code=True)
        backbone_config = model.config.backbone_config
        return AttentionModel(
            model.to(device),
            kind="dino",
            name=name,
            patch_size=_patch_size_of(backbone_config),
            num_heads=backbone_config.num_attention_heads,
        )
    raise ValueError(
        f"{name} has model_type {model_type!r}; attention maps support hf_dino 'dino' checkpoints and "
        "transformers 'vit' checkpoints such as facebook/dino-vits8"
    )


def example_images() -> list[Path]:
    """The small example photographs shipped in `examples/` beside this file (see its README for origins)."""
    folder = Path(__file__).resolve().parent / "examples"
    return sorted(path for path in folder.glob("*") if path.suffix.lower() in (".jpg", ".jpeg", ".png"))


# ---------------------------------------------------------------------------------------------------------
# Image -> everything
# ---------------------------------------------------------------------------------------------------------


@dataclass
class AttentionAnalysis:
    """Everything computed for one image.

    Attributes:
        image: the model input (RGB, resized; sides are multiples of the patch size).
        patch_size: pixels per patch side.
        grid_hw: (h, w) patches.
        attention_maps: (heads, h, w) float32 CLS attention per head.
        mean_map: (h, w) float32 mean over heads.
        masks: (heads, h, w) bool, the patches holding `mass` of each head's attention.
        mass: the kept attention fraction.
        pca_rgb: (h, w, 3) float32 in [0, 1], or None when not asked for.
        notes: what was done to the input (conversions, resizing), for the user.
        seconds: time taken by the forward pass and the maps (not the rendering).
    """

    image: Image.Image
    patch_size: int
    grid_hw: tuple[int, int]
    attention_maps: np.ndarray
    mean_map: np.ndarray
    masks: np.ndarray
    mass: float
    pca_rgb: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def analyze_image(
    model: AttentionModel,
    image: str | os.PathLike | bytes | Image.Image,
    *,
    resolution: int = 480,
    mass: float = DEFAULT_MASS,
    with_pca: bool = True,
) -> AttentionAnalysis:
    """Load, resize and run one image; compute its attention maps, masks and (optionally) PCA colours.

    Args:
        model: from `load_attention_model`.
        image: a path, file bytes or a PIL image (any mode; see `load_image`).
        resolution: short side of the model input in pixels (rounded to the patch size).
        mass: attention fraction the masks keep (paper: 0.6).
        with_pca: also compute the patch-feature PCA.

    Returns:
        an `AttentionAnalysis`.

    Raises:
        ImageLoadError: the image could not be read.
    """
    start = time.perf_counter()
    rgb, notes = load_image(image)
    resized, resize_notes = prepare_image(rgb, resolution=resolution, patch_size=model.patch_size)
    notes += resize_notes
    pixel_values = model.preprocess(resized)
    grid_hw = model.grid_size(pixel_values)
    cls_attention, patch_tokens = model.forward(pixel_values)
    maps = cls_attention_maps(cls_attention, grid_hw)[0]  # (heads, h, w)
    masks = mass_threshold_masks(maps, mass=mass)
    pca_rgb = patch_pca_rgb(patch_tokens[0].float(), grid_hw) if with_pca else None
    return AttentionAnalysis(
        image=resized,
        patch_size=model.patch_size,
        grid_hw=grid_hw,
        attention_maps=maps.float().cpu().numpy(),
        mean_map=mean_attention_map(maps[None])[0].float().cpu().numpy(),
        masks=masks.cpu().numpy(),
        mass=mass,
        pca_rgb=pca_rgb,
        notes=notes,
        seconds=time.perf_counter() - start,
    )


def render_figures(
    analysis: AttentionAnalysis, *, tile_long_side: int | None = None
) -> dict[str, Image.Image]:
    """The paper-style pictures of an analysis.

    Args:
        analysis: from `analyze_image`.
        tile_long_side: resize every tile so its longer side has this length (None: model input size).

    Returns:
        {"heads": head grid, "mean": mean map, "masks": mass masks, "pca": PCA (only if computed)}.
    """
    figures = {
        "heads": render_head_grid(analysis.image, analysis.attention_maps, tile_long_side=tile_long_side),
        "mean": render_mean_map(analysis.image, analysis.mean_map, tile_long_side=tile_long_side),
        "masks": render_masks(
            analysis.image, analysis.masks, mass=analysis.mass, tile_long_side=tile_long_side
        ),
    }
    if analysis.pca_rgb is not None:
        figures["pca"] = render_pca(analysis.image, analysis.pca_rgb, tile_long_side=tile_long_side)
    return figures


__all__ = [
    "DEFAULT_MASS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AttentionAnalysis",
    "AttentionModel",
    "ImageLoadError",
    "analyze_image",
    "apply_colormap",
    "choose_input_size",
    "cls_attention_maps",
    "example_images",
    "image_to_pixel_values",
    "load_attention_model",
    "load_image",
    "mass_threshold_masks",
    "mean_attention_map",
    "overlay_heatmap",
    "patch_pca",
    "patch_pca_rgb",
    "prepare_image",
    "render_figures",
    "render_head_grid",
    "render_masks",
    "render_mean_map",
    "render_pca",
    "to_rgb",
    "upsample_nearest",
]
