"""Tests of hf_dino.attention (maps, masks, PCA, images, rendering, model adapters) and `hf-dino visualize`.

Every number is checked against an independent computation: numpy for masks and PCA, transformers' eager
attention and DinoModel's own `last_self_attention` for the attention adapter.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hf_dino import attention
from hf_dino.attention import (
    ImageLoadError,
    analyze_image,
    apply_colormap,
    choose_input_size,
    cls_attention_maps,
    load_attention_model,
    load_image,
    mass_threshold_masks,
    patch_pca,
    patch_pca_rgb,
    prepare_image,
    render_figures,
    render_head_grid,
    upsample_nearest,
)

torch.set_num_threads(1)

TINY_VIT = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 32,
    "patch_size": 8,
}


# ---------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------


def _sharpen_attention(model: torch.nn.Module) -> None:
    """The 0.02-std init gives near-uniform attention; larger query/key weights make the checks meaningful."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ("q_proj" in name or "k_proj" in name) and name.endswith("weight"):
                parameter.normal_(0.0, 0.3)


@pytest.fixture(scope="module")
def dino_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hf_dino.configuration_dino import DinoConfig
    from hf_dino.modeling_dino import DinoModel

    config = DinoConfig.from_preset(
        "vit_tiny_patch16", out_dim=64, hidden_dim=32, bottleneck_dim=16, **TINY_VIT
    )
    torch.manual_seed(0)
    model = DinoModel(config)
    _sharpen_attention(model)
    path = tmp_path_factory.mktemp("dino_model")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vit_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(1)
    model = ViTModel(ViTConfig(**TINY_VIT), add_pooling_layer=False)
    _sharpen_attention(model)
    path = tmp_path_factory.mktemp("vit_model")
    model.save_pretrained(path)
    return path


def _png_bytes(image: Image.Image, **save_options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save_options)
    return buffer.getvalue()


def _photo(size: tuple[int, int] = (96, 64)) -> Image.Image:
    """A smooth colour image with a bright disc (something for attention to find)."""
    width, height = size
    rows, columns = np.mgrid[0:height, 0:width]
    red = (columns / max(width - 1, 1) * 255).astype(np.uint8)
    green = (rows / max(height - 1, 1) * 255).astype(np.uint8)
    disc = ((columns - width * 0.6) ** 2 + (rows - height * 0.4) ** 2) < (min(size) * 0.25) ** 2
    blue = np.where(disc, 255, 40).astype(np.uint8)
    return Image.fromarray(np.stack([red, green, blue], axis=-1))


# ---------------------------------------------------------------------------------------------------------
# maps, masks, PCA
# ---------------------------------------------------------------------------------------------------------


def _numpy_top_mass_mask(values: np.ndarray, mass: float) -> np.ndarray:
    """Independent reference: the fewest largest patches whose sum reaches `mass` of the total."""
    flat = values.ravel()
    descending = np.argsort(-flat, kind="stable")
    running = np.cumsum(flat[descending]) / flat.sum()
    count = int(np.searchsorted(running, mass, side="left")) + 1
    mask = np.zeros(flat.shape, dtype=bool)
    mask[descending[:count]] = True
    return mask.reshape(values.shape)


@pytest.mark.parametrize("mass", [0.6, 0.3, 0.9])
def test_mass_threshold_masks_match_numpy_and_are_minimal(mass: float) -> None:
    generator = np.random.default_rng(0)
    maps = generator.gamma(0.5, size=(2, 3, 6, 7))  # skewed, like real attention
    masks = mass_threshold_masks(torch.from_numpy(maps), mass=mass).numpy()
    assert masks.shape == maps.shape and masks.dtype == bool
    for batch in range(2):
        for head in range(3):
            values, mask = maps[batch, head], masks[batch, head]
            np.testing.assert_array_equal(mask, _numpy_top_mass_mask(values, mass))
            kept = values[mask].sum() / values.sum()
            assert kept >= mass
            # Minimal: dropping the smallest kept patch falls below the mass.
            assert (values[mask].sum() - values[mask].min()) / values.sum() < mass
            # Every kept patch is at least as large as every dropped one.
            if (~mask).any():
                assert values[mask].min() >= values[~mask].max()


def test_mass_threshold_default_is_sixty_percent_and_rejects_bad_mass() -> None:
    maps = torch.tensor([[0.5, 0.2], [0.2, 0.1]])
    # 0.5 alone is < 0.6; 0.5 + 0.2 = 0.7 >= 0.6.
    assert mass_threshold_masks(maps).sum() == 2
    assert mass_threshold_masks(maps, mass=1.0).all()
    with pytest.raises(ValueError, match="mass"):
        mass_threshold_masks(maps, mass=0.0)


def test_cls_attention_maps_take_the_cls_row_and_patch_columns() -> None:
    batch, heads, height, width = 2, 3, 4, 5
    tokens = 1 + height * width
    attentions = torch.randn(batch, heads, tokens, tokens)
    maps = cls_attention_maps(attentions, (height, width))
    assert maps.shape == (batch, heads, height, width)
    torch.testing.assert_close(maps[1, 2, 3, 4], attentions[1, 2, 0, 1 + 3 * width + 4])
    torch.testing.assert_close(maps[0, 1, 0, 0], attentions[0, 1, 0, 1])
    # Only the CLS row given (what AttentionModel.forward returns): same maps.
    torch.testing.assert_close(cls_attention_maps(attentions[:, :, :1], (height, width)), maps)
    with pytest.raises(ValueError, match="patch grid"):
        cls_attention_maps(attentions, (5, 5))


def test_patch_pca_matches_numpy_svd() -> None:
    generator = np.random.default_rng(1)
    features = generator.normal(size=(48, 10)) @ np.diag(np.linspace(5, 0.5, 10))
    projections, components = patch_pca(torch.from_numpy(features))
    centred = features - features.mean(axis=0)
    _, _, right = np.linalg.svd(centred, full_matrices=False)
    reference = centred @ right[:3].T
    for index in range(3):
        sign = np.sign(reference[:, index] @ projections[:, index].numpy())
        np.testing.assert_allclose(projections[:, index].numpy(), sign * reference[:, index], atol=1e-9)
    # Components are orthonormal; the sign rule makes the largest loading positive.
    np.testing.assert_allclose(components.numpy() @ components.numpy().T, np.eye(3), atol=1e-9)
    assert all(row[np.argmax(np.abs(row))] > 0 for row in components.numpy())

    rgb = patch_pca_rgb(torch.from_numpy(features).float(), (6, 8))
    assert rgb.shape == (6, 8, 3) and rgb.dtype == np.float32
    expected = (projections.numpy() - projections.numpy().min(0)) / np.ptp(projections.numpy(), axis=0)
    np.testing.assert_allclose(rgb.reshape(48, 3), expected, atol=1e-5)
    # A batch shares one PCA: its colours are the stacked single-image computation.
    batched = patch_pca_rgb(torch.from_numpy(features).float().reshape(2, 24, 10), (4, 6))
    np.testing.assert_allclose(batched.reshape(48, 3), expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# images in
# ---------------------------------------------------------------------------------------------------------


def test_load_image_rejects_non_images_with_clear_messages(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(ImageLoadError, match="notes.txt is not an image file"):
        load_image(text)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(empty)
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image(tmp_path / "missing.jpg")
    svg = tmp_path / "drawing.svg"
    svg.write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    with pytest.raises(ImageLoadError, match="SVG"):
        load_image(svg)
    truncated = tmp_path / "truncated.jpg"
    buffer = io.BytesIO()
    _photo((200, 150)).save(buffer, format="JPEG")
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="corrupt or truncated"):
        load_image(truncated)
    with pytest.raises(ImageLoadError, match="upload.png is not an image"):
        load_image(b"\x89PNG garbage", name="upload.png")


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` (a decompression bomb as Pillow sees it)."""
    data = _png_bytes(Image.new("L", (1, 1)))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + header
    start = data.index(b"IHDR") - 4
    return (
        data[:start]
        + struct.pack(">I", len(header))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + data[start + 25 :]
    )


def test_load_image_refuses_decompression_bombs() -> None:
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(_png_with_size(30000, 30000))


def test_load_image_converts_every_mode_to_rgb() -> None:
    gray = Image.fromarray(np.full((10, 12), 77, dtype=np.uint8))
    image, notes = load_image(_png_bytes(gray))
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (77, 77, 77) and "grayscale" in notes[0]

    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    image, notes = load_image(_png_bytes(rgba))
    assert image.getpixel((1, 1)) == (255, 255, 255) and image.getpixel((0, 0)) == (0, 0, 255)

    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image, _ = load_image(_png_bytes(palette))
    assert image.getpixel((3, 3)) == (10, 200, 30)
    image, _ = load_image(_png_bytes(palette, transparency=1))
    assert image.getpixel((3, 3)) == (255, 255, 255)

    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    buffer = io.BytesIO()
    cmyk.save(buffer, format="JPEG", quality=100)
    image, notes = load_image(buffer.getvalue())
    red, green, blue = image.getpixel((4, 4))
    assert red > 240 and green < 15 and blue < 15 and "CMYK" in notes[0]

    sixteen_bit = Image.fromarray(np.full((6, 6), 257 * 200, dtype=np.uint16))
    image, notes = load_image(_png_bytes(sixteen_bit))
    assert image.mode == "RGB" and image.getpixel((2, 2)) == (200, 200, 200) and "8-bit" in notes[0]

    floats = Image.fromarray(np.linspace(-1, 1, 20, dtype=np.float32).reshape(4, 5), mode="F")
    image, _ = load_image(floats)
    assert image.getpixel((0, 0)) == (0, 0, 0) and image.getpixel((4, 3)) == (255, 255, 255)


def test_load_image_applies_exif_orientation_and_shrinks_huge_images(tmp_path: Path) -> None:
    photo = _photo((40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "rotated.jpg"
    photo.save(path, exif=exif)
    image, _ = load_image(path)
    assert image.size == (20, 40)

    huge = tmp_path / "huge.png"
    _photo((2100, 1050)).save(huge)
    image, notes = load_image(huge)
    assert image.size == (1024, 512) and "downscaled from 2100x1050" in notes[0]
    huge_jpeg = tmp_path / "huge.jpg"
    _photo((2400, 1800)).save(huge_jpeg, quality=80)
    image, _ = load_image(huge_jpeg)
    assert max(image.size) == 1024 and image.size[0] / image.size[1] == pytest.approx(4 / 3, rel=0.01)


@pytest.mark.parametrize(
    ("size", "resolution", "patch_size", "expected"),
    [
        ((640, 480), 480, 16, (640, 480, 640, 480)),  # already a multiple of 16
        ((500, 375), 224, 8, (500, 375, 296, 224)),  # short side 224 = 28 patches; 28 * 4/3 = 37.3 -> 37
        ((300, 1200), 224, 16, (300, 600, 224, 448)),  # 1:4 -> centre crop to 1:2
        ((7, 5), 224, 16, (7, 5, 320, 224)),  # tiny: upscaled to the resolution
        ((100, 100), 20, 16, (100, 100, 64, 64)),  # at least 4 patches per side
    ],
)
def test_choose_input_size(size, resolution, patch_size, expected) -> None:
    result = choose_input_size(*size, resolution=resolution, patch_size=patch_size)
    assert result == expected
    assert result[2] % patch_size == 0 and result[3] % patch_size == 0


def test_prepare_image_reports_crops_and_upscaling() -> None:
    resized, notes = prepare_image(_photo((12, 9)), resolution=64, patch_size=8)
    assert resized.size == (88, 64) and any("upscaled" in note for note in notes)
    resized, notes = prepare_image(_photo((400, 100)), resolution=64, patch_size=8)
    assert resized.size == (128, 64) and any("centre-cropped" in note for note in notes)


# ---------------------------------------------------------------------------------------------------------
# pictures out
# ---------------------------------------------------------------------------------------------------------


def test_colormap_is_viridis_like_and_upsampling_is_by_patch() -> None:
    colours = apply_colormap(np.array([[0.0, 0.5, 1.0]]))
    assert tuple(colours[0, 0]) == (0x44, 0x01, 0x54)  # viridis' dark purple end
    assert tuple(colours[0, 2]) == (0xFD, 0xE7, 0x25)  # and its yellow end
    luminance = attention.VIRIDIS_TABLE @ np.array([0.2126, 0.7152, 0.0722])
    assert np.all(np.diff(luminance) > -1.0)  # perceptually ordered: brightness rises (to rounding)

    grid = np.arange(6).reshape(2, 3)
    blocks = upsample_nearest(grid, 4)
    assert blocks.shape == (8, 12)
    np.testing.assert_array_equal(blocks[4:8, 8:12], np.full((4, 4), 5))


def test_render_head_grid_layout() -> None:
    image = _photo((48, 32))
    maps = np.random.default_rng(0).random((6, 4, 6))
    grid = render_head_grid(image, maps)
    # 7 tiles (input + 6 heads) -> 4 columns x 2 rows of 48x32 with 6-px gaps.
    assert grid.size == (4 * 54 + 6, 2 * 38 + 6)
    # The second head's tile shows its map through the colormap, block by block (away from the label).
    tile = np.asarray(grid)[6 + 38 : 6 + 38 + 32, 6 : 6 + 48]  # row 2, column 1 = head 4
    expected = upsample_nearest(apply_colormap(attention.normalize_map(maps[3])), 8)
    np.testing.assert_array_equal(tile[24:], expected[24:])


# ---------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------


def test_stock_vit_last_layer_attention_equals_eager_output_attentions(vit_model_dir: Path) -> None:
    from transformers import ViTModel

    model = load_attention_model(vit_model_dir)
    assert model.kind == "vit" and model.patch_size == 8 and model.num_heads == 2
    eager = ViTModel.from_pretrained(
        vit_model_dir, add_pooling_layer=False, attn_implementation="eager"
    ).eval()
    pixel_values = torch.randn(2, 3, 40, 56)  # not the 32-px training size: positions interpolated
    with torch.no_grad():
        reference = eager(pixel_values=pixel_values, output_attentions=True, interpolate_pos_encoding=True)
    expected = reference.attentions[-1]
    assert expected.shape == (2, 2, 1 + 5 * 7, 1 + 5 * 7)
    assert expected[:, :, 0].max() > 0.2  # not uniform: the comparison means something
    torch.testing.assert_close(model.last_self_attention(pixel_values), expected, rtol=1e-5, atol=1e-6)
    cls_attention, patch_tokens = model.forward(pixel_values)
    torch.testing.assert_close(cls_attention, expected[:, :, :1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(patch_tokens, reference.last_hidden_state[:, 1:], rtol=1e-5, atol=1e-5)
    # The model itself still runs SDPA: nothing was switched to eager.
    assert model.model.config._attn_implementation != "eager"


def test_dino_model_attention_equals_its_last_self_attention(dino_model_dir: Path) -> None:
    from hf_dino.modeling_dino import DinoModel

    model = load_attention_model(dino_model_dir)
    assert model.kind == "dino" and model.patch_size == 8 and model.num_heads == 2
    reference = DinoModel.from_pretrained(dino_model_dir).eval()
    pixel_values = torch.randn(1, 3, 48, 32)
    with torch.no_grad():
        expected = reference.last_self_attention(pixel_values)
        tokens = reference(pixel_values).last_hidden_state
    assert expected[:, :, 0].max() > 0.2  # not uniform: the comparison means something
    torch.testing.assert_close(model.last_self_attention(pixel_values), expected, rtol=1e-5, atol=1e-6)
    cls_attention, patch_tokens = model.forward(pixel_values)
    torch.testing.assert_close(cls_attention, expected[:, :, :1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(patch_tokens, tokens[:, 1:])


def test_resnet_and_unknown_checkpoints_get_clear_errors(tmp_path: Path) -> None:
    from hf_dino.configuration_dino import DinoConfig

    resnet_dir = tmp_path / "resnet"
    resnet_dir.mkdir()
    (resnet_dir / "config.json").write_text(json.dumps(DinoConfig.from_preset("resnet50").to_dict()))
    with pytest.raises(ValueError, match="resnet backbone: attention maps need a ViT"):
        load_attention_model(resnet_dir)
    bert_dir = tmp_path / "bert"
    bert_dir.mkdir()
    (bert_dir / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert'"):
        load_attention_model(bert_dir)


def test_analyze_image_and_figures(dino_model_dir: Path, tmp_path: Path) -> None:
    model = load_attention_model(dino_model_dir)
    path = tmp_path / "photo.png"
    _photo((90, 60)).save(path)
    analysis = analyze_image(model, path, resolution=64)
    assert analysis.image.size == (96, 64) and analysis.grid_hw == (8, 12)
    assert analysis.attention_maps.shape == (2, 8, 12) and analysis.masks.shape == (2, 8, 12)
    np.testing.assert_allclose(analysis.mean_map, analysis.attention_maps.mean(0), rtol=1e-6)
    # The masks are the mass masks of the maps the model returns.
    np.testing.assert_array_equal(
        analysis.masks, mass_threshold_masks(torch.from_numpy(analysis.attention_maps)).numpy()
    )
    # The maps are the CLS row of the full last-layer attention.
    pixel_values = model.preprocess(analysis.image)
    full = model.last_self_attention(pixel_values)
    np.testing.assert_allclose(
        analysis.attention_maps, cls_attention_maps(full, (8, 12))[0].numpy(), atol=1e-6
    )
    assert analysis.pca_rgb is not None and analysis.pca_rgb.shape == (8, 12, 3)

    figures = render_figures(analysis)
    assert set(figures) == {"heads", "mean", "masks", "pca"}
    assert figures["heads"].size == (3 * 102 + 6, 70 + 6)  # input + 2 heads in one row of 96x64 tiles
    assert figures["mean"].size == figures["pca"].size == (2 * 102 + 6, 76)
    small = render_figures(analysis, tile_long_side=48)
    assert small["heads"].size == (3 * 54 + 6, 38 + 6)
    assert "pca" not in render_figures(analyze_image(model, path, resolution=64, with_pca=False))


def test_example_images_ship_with_the_package() -> None:
    examples = attention.example_images()
    assert {path.stem for path in examples} >= {"astronaut", "chelsea", "coffee"}
    for path in examples:
        image, notes = load_image(path)
        assert min(image.size) == 256 and notes == []


# ---------------------------------------------------------------------------------------------------------
# hf-dino visualize
# ---------------------------------------------------------------------------------------------------------


def test_visualize_cli_writes_the_paper_figures(dino_model_dir: Path, tmp_path: Path, capsys) -> None:
    from hf_dino.cli import main as cli_main

    good = tmp_path / "cat.png"
    _photo((80, 60)).save(good)
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)).save(gray)
    bad = tmp_path / "bad.jpg"
    bad.write_text("this is text")
    output = tmp_path / "out"
    code = cli_main(
        ["visualize", "--model", str(dino_model_dir), "--resolution", "48", "--output-dir", str(output)]
        + [str(good), str(gray), str(bad)]
    )
    assert code == 1  # one input could not be read; the others are written
    captured = capsys.readouterr()
    assert "bad.jpg is not an image file" in captured.err
    names = sorted(path.name for path in output.iterdir())
    assert names == sorted(
        f"{stem}_{kind}.png" for stem in ("cat", "gray") for kind in ("heads", "mean", "masks", "pca")
    )
    heads = Image.open(output / "cat_heads.png")
    assert heads.size == (3 * 70 + 6, 48 + 12)  # 64x48 input (6x8 patches): input + 2 heads
    assert "8x6 patches" in captured.out

    code = cli_main(
        ["visualize", "--model", str(dino_model_dir), "--no-pca", "--output-dir", str(output), str(good)]
    )
    assert code == 0
    with pytest.raises(SystemExit):
        cli_main(["visualize", "--output-dir", str(output), str(good)])  # --model is required


def test_grayscale_model_gets_luminance_and_its_own_normalisation(tmp_path) -> None:
    """A 1-channel model (the Fashion-MNIST demo) is shown colour photos through their luminance, mean/std 0.5."""
    from hf_dino import DinoConfig, DinoModel
    from hf_dino.attention import analyze_image, image_to_pixel_values, load_attention_model

    config = DinoConfig.from_preset(
        "vit_tiny_patch16",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=28,
        patch_size=4,
        num_channels=1,
        out_dim=16,
        hidden_dim=16,
        bottleneck_dim=8,
    )
    DinoModel(config).save_pretrained(tmp_path / "gray")
    model = load_attention_model(tmp_path / "gray")
    assert model.image_mean == (0.5,) and model.image_std == (0.5,)
    photo = Image.fromarray(np.full((40, 40, 3), (255, 0, 0), dtype=np.uint8))
    pixels = image_to_pixel_values(photo, model.image_mean, model.image_std)
    luminance = np.asarray(photo.convert("L"), dtype=np.float32)[0, 0] / 255.0
    assert pixels.shape == (1, 1, 40, 40)
    assert pixels[0, 0, 0, 0].item() == pytest.approx((luminance - 0.5) / 0.5)
    analysis = analyze_image(model, photo, resolution=32, with_pca=False)
    assert analysis.mean_map.shape == (8, 8)
