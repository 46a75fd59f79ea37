"""Tests of the multi-crop augmentation against torchvision / PIL (the original DINO transforms)."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from torchvision.transforms import RandomResizedCrop

from hf_dino.augmentation import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiCropAugmentation,
    MultiCropConfig,
    MultiCropGeometric,
    MultiCropPhotometric,
    PhotometricAugmentation,
    adjust_hue,
    gaussian_blur,
    gaussian_kernels,
    image_to_tensor,
    sample_crop_parameters,
)

torch.set_num_threads(1)


def photo(size: int = 96) -> Image.Image:
    """A natural RGB photo (scikit-image's astronaut when installed, else a smooth synthetic scene)."""
    try:
        import skimage.data

        array = skimage.data.astronaut()
    except ImportError:
        y, x = np.mgrid[0:256, 0:256] / 40.0
        array = (np.stack([np.sin(x), np.cos(y), np.sin(x + y)], -1) * 120 + 128).astype(np.uint8)
    return Image.fromarray(array).resize((size, size), Image.Resampling.BICUBIC)


def small_config(**overrides) -> MultiCropConfig:
    values = {"global_crop_size": 32, "local_crop_size": 16, "local_crops_number": 3} | overrides
    return MultiCropConfig(**values)


# -- config --------------------------------------------------------------------------------------------------


def test_config_defaults_are_the_official_ones():
    config = MultiCropConfig()
    assert config.global_crops_scale == (0.4, 1.0) and config.local_crops_scale == (0.05, 0.4)
    assert (config.local_crops_number, config.global_crop_size, config.local_crop_size) == (8, 224, 96)
    assert (config.brightness, config.contrast, config.saturation, config.hue) == (0.4, 0.4, 0.2, 0.1)
    assert (config.color_jitter_prob, config.grayscale_prob, config.flip_prob) == (0.8, 0.2, 0.5)
    assert (config.global_1_blur_prob, config.global_2_blur_prob, config.local_blur_prob) == (1.0, 0.1, 0.5)
    assert config.blur_sigma == (0.1, 2.0) and config.solarize_prob == 0.2
    assert config.mean == IMAGENET_MEAN and config.std == IMAGENET_STD
    assert config.interpolation == "bicubic" and config.num_crops == 10


def test_config_accepts_lists_and_rejects_bad_values():
    config = MultiCropConfig.from_dict({"global_crops_scale": [0.25, 1], "local_crop_size": [64, 48]})
    assert config.global_crops_scale == (0.25, 1.0) and config.local_crop_size == (64, 48)
    assert MultiCropConfig.from_dict(config.to_dict()) == config
    for bad in (
        {"global_crops_scale": (0.5, 0.4)},
        {"local_crops_number": -1},
        {"hue": 0.7},
        {"flip_prob": 2},
    ):
        with pytest.raises(ValueError):
            MultiCropConfig(**bad)
    with pytest.raises(ValueError, match="unknown"):
        MultiCropConfig.from_dict({"local_crop_number": 8})


# -- geometric stage
# --------------------------------------------------------------------------------------------


def crop_statistics(boxes, height, width):
    boxes = np.asarray(boxes, dtype=float)
    top, left, crop_height, crop_width = boxes.T
    return {
        "area": crop_height * crop_width / (height * width),
        "log_ratio": np.log(crop_width / crop_height),
        "center_y": (top + crop_height / 2) / height,
        "center_x": (left + crop_width / 2) / width,
    }


@pytest.mark.parametrize("scale", [(0.4, 1.0), (0.05, 0.4)])
def test_crop_distribution_matches_torchvision(scale):
    ks_2samp = pytest.importorskip("scipy.stats").ks_2samp
    height, width, draws, ratio = 375, 500, 4000, (3 / 4, 4 / 3)
    rng = random.Random(0)
    torch.manual_seed(0)
    ours = [sample_crop_parameters(height, width, scale=scale, ratio=ratio, rng=rng) for _ in range(draws)]
    image = torch.empty(3, height, width)
    reference = [
        RandomResizedCrop.get_params(image, scale=list(scale), ratio=list(ratio)) for _ in range(draws)
    ]
    ours_stats = crop_statistics(ours, height, width)
    reference_stats = crop_statistics(reference, height, width)
    for name in ours_stats:
        assert ks_2samp(ours_stats[name], reference_stats[name]).pvalue > 1e-3, name
        assert abs(ours_stats[name].mean() - reference_stats[name].mean()) < 0.02, name

    # The test has power: a sampler with a wrong ratio range or a wrong scale range is rejected.
    wrong_ratio = [
        sample_crop_parameters(height, width, scale=scale, ratio=(3 / 4, 1.5), rng=rng) for _ in range(draws)
    ]
    wrong_scale = [
        sample_crop_parameters(height, width, scale=(scale[0] * 1.5, scale[1]), ratio=ratio, rng=rng)
        for _ in range(draws)
    ]
    assert (
        ks_2samp(
            crop_statistics(wrong_ratio, height, width)["log_ratio"], reference_stats["log_ratio"]
        ).pvalue
        < 1e-4
    )
    assert (
        ks_2samp(crop_statistics(wrong_scale, height, width)["area"], reference_stats["area"]).pvalue < 1e-4
    )


def test_crop_fallback_matches_torchvision():
    # A very wide image with scale (1, 1): no attempt fits, both fall back to the same central crop.
    for height, width in ((20, 400), (400, 20)):
        ours = sample_crop_parameters(
            height, width, scale=(1.0, 1.0), ratio=(3 / 4, 4 / 3), rng=random.Random(0)
        )
        reference = RandomResizedCrop.get_params(
            torch.empty(1, height, width), scale=[1.0, 1.0], ratio=[3 / 4, 4 / 3]
        )
        assert ours == tuple(reference)


def test_geometric_crops_equal_pil_resize_within_one_level():
    image = photo(80)
    config = small_config(
        global_crops_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0, local_crops_number=0
    )
    crops = MultiCropGeometric(config)(image, random.Random(0))
    expected = np.asarray(image.resize((32, 32), Image.Resampling.BICUBIC)).astype(int)
    for crop in crops:
        assert crop.dtype == torch.uint8 and crop.shape == (3, 32, 32)
        assert np.abs(crop.permute(1, 2, 0).numpy().astype(int) - expected).max() <= 1


def test_geometric_shapes_for_1_3_4_channels_and_16_bit():
    config = small_config(local_crop_size=(12, 20))
    geometric = MultiCropGeometric(config)
    rng = random.Random(0)
    cases = {
        "rgb": (photo(64), 3, torch.uint8),
        "gray": (photo(64).convert("L"), 1, torch.uint8),
        "four": (np.random.default_rng(0).integers(0, 255, (50, 70, 4), dtype=np.uint8), 4, torch.uint8),
        "sixteen": (np.random.default_rng(0).integers(0, 65535, (50, 70), dtype=np.uint16), 1, torch.float32),
        "tensor": (torch.randint(0, 255, (5, 40, 30), dtype=torch.uint8), 5, torch.uint8),
    }
    for name, (image, channels, dtype) in cases.items():
        crops = geometric(image, rng)
        assert len(crops) == 2 + 3, name
        assert [tuple(c.shape) for c in crops] == [(channels, 32, 32)] * 2 + [(channels, 12, 20)] * 3, name
        assert all(c.dtype == dtype for c in crops), name


def test_sixteen_bit_images_keep_their_depth():
    values = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16  # up to 65520, not multiples of 257
    config = small_config(
        global_crop_size=64,
        global_crops_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        flip_prob=0.0,
        local_crops_number=0,
    )
    crop = MultiCropGeometric(config)(values, random.Random(0))[0]
    assert crop.dtype == torch.float32
    torch.testing.assert_close(
        crop[0], torch.from_numpy(values.astype(np.float32) / 65535), atol=1e-6, rtol=0
    )
    assert len(torch.unique(crop)) > 256  # more levels than 8 bits could hold
    # PIL's 16-bit mode goes the same way.
    pil_crop = MultiCropGeometric(config)(Image.fromarray(values), random.Random(0))[0]
    torch.testing.assert_close(pil_crop, crop)


def test_small_images_are_upscaled_and_flips_happen_half_the_time():
    tiny = np.arange(6 * 5 * 3, dtype=np.uint8).reshape(6, 5, 3)
    crops = MultiCropGeometric(MultiCropConfig(local_crops_number=2))(tiny, random.Random(0))
    assert [tuple(c.shape) for c in crops] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 2

    image = photo(48)
    config = small_config(
        global_crop_size=48,
        local_crop_size=48,
        global_crops_scale=(1.0, 1.0),
        local_crops_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        local_crops_number=8,
    )
    geometric, rng = MultiCropGeometric(config), random.Random(1)
    unflipped = image_to_tensor(image)
    flips = total = 0
    for _ in range(50):
        for crop in geometric(image, rng):
            flipped = torch.equal(crop, unflipped.flip(-1))
            assert flipped or torch.equal(crop, unflipped)
            flips += flipped
            total += 1
    assert abs(flips / total - 0.5) < 4.5 * math.sqrt(0.25 / total)


def test_minimum_decode_size_keeps_enough_resolution():
    geometric = MultiCropGeometric()
    assert geometric.minimum_decode_size(500, 375) == (500, 375)  # ImageNet-sized: no reduction
    width, height = geometric.minimum_decode_size(4000, 3000)
    assert width < 1000 and height < 750
    # The smallest local crop box of the reduced image still has at least 96 pixels on its short side.
    assert math.sqrt(0.05 * width * height * 3 / 4) >= 96 - 1e-6


# -- photometric stage
# -------------------------------------------------------------------------------------------


def fixed_parameters(module: PhotometricAugmentation, batch: int, seed: int = 0, **flags):
    parameters = module.sample_parameters(batch, generator=torch.Generator().manual_seed(seed))
    for name, value in flags.items():
        getattr(parameters, name)[:] = value
    return parameters


def torchvision_jitter(image: torch.Tensor, parameters, index: int) -> torch.Tensor:
    operations = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    factors = [parameters.brightness, parameters.contrast, parameters.saturation, parameters.hue]
    for code in parameters.order[index].tolist():
        image = operations[code](image, factors[code][index].item())
    return image


@pytest.mark.parametrize("sync_free", [False, True])
def test_color_jitter_matches_torchvision_functional(sync_free):
    module = PhotometricAugmentation(blur_prob=0.0, solarize_prob=0.0, sync_free=sync_free)
    images = torch.rand(24, 3, 20, 24)
    parameters = fixed_parameters(module, 24, jitter=True, grayscale=False)
    parameters.order = torch.tensor(list(itertools.permutations(range(4))))  # every order once
    parameters.hue[::3] = torch.tensor([0.5, -0.5, 0.0, 0.1, -0.1, 0.05, 0.2, -0.3])
    output = module.apply(images, parameters, normalize=False)
    for index in range(24):
        expected = torchvision_jitter(images[index], parameters, index)
        torch.testing.assert_close(output[index], expected, atol=1e-5, rtol=0)


def test_color_jitter_close_to_the_original_pil_pipeline():
    image = photo(64)
    module = PhotometricAugmentation(blur_prob=0.0, solarize_prob=0.0)
    parameters = fixed_parameters(module, 24, seed=3, jitter=True, grayscale=False)
    parameters.order = torch.tensor(list(itertools.permutations(range(4))))
    batch = image_to_tensor(image).unsqueeze(0).expand(24, -1, -1, -1)
    output = (module.apply(batch, parameters, normalize=False) * 255).round()
    differences = []
    for index in range(24):
        expected = torch.from_numpy(np.array(torchvision_jitter(image, parameters, index))).permute(2, 0, 1)
        differences.append((output[index] - expected.float()).abs().mean().item())
    # PIL rounds to uint8 after each step and shifts hue in 1/255 steps; float arithmetic differs by ~1 level.
    assert max(differences) < 2.5


def test_hue_rotation_matches_torchvision_and_is_identity_at_zero():
    images = torch.rand(6, 3, 16, 16)
    images[0] = images[0, :1]  # gray pixels
    for shift in (-0.5, -0.2, 0.0, 0.07, 0.5):
        torch.testing.assert_close(
            adjust_hue(images, torch.full((6,), shift)), TF.adjust_hue(images, shift), atol=1e-5, rtol=0
        )
    torch.testing.assert_close(adjust_hue(images, torch.zeros(6)), images, atol=1e-6, rtol=0)


def test_grayscale_and_solarize_match_torchvision():
    images = torch.rand(4, 3, 10, 12)
    module = PhotometricAugmentation(MultiCropConfig(solarize_prob=1.0), blur_prob=0.0, solarize_prob=1.0)
    parameters = fixed_parameters(module, 4, jitter=False, grayscale=True, solarize=True)
    output = module.apply(images, parameters, normalize=False)
    gray = TF.rgb_to_grayscale(images, num_output_channels=3)
    torch.testing.assert_close(output, TF.solarize(gray, 128 / 255), atol=1e-6, rtol=0)

    uint8_images = torch.randint(0, 256, (4, 3, 10, 12), dtype=torch.uint8)
    parameters = fixed_parameters(module, 4, jitter=False, grayscale=False, solarize=True)
    output = module.apply(uint8_images, parameters, normalize=False)
    expected = TF.solarize(uint8_images, 128).float() / 255  # PIL/torchvision semantics: invert >= 128
    torch.testing.assert_close(output, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.0])
def test_blur_is_close_to_pil_gaussian_blur(sigma):
    image = photo(96)
    tensor = image_to_tensor(image).unsqueeze(0).float() / 255
    radius = 6
    ours = gaussian_blur(tensor, gaussian_kernels(torch.tensor([sigma]), radius))[0] * 255
    expected = torch.from_numpy(np.array(image.filter(ImageFilter.GaussianBlur(radius=sigma)))).permute(
        2, 0, 1
    )
    difference = (ours - expected.float()).abs()
    # PIL approximates the Gaussian by three box blurs: on average about one grey level apart; at sharp edges
    # and small sigma (~0.3, where three tiny boxes are a poor Gaussian) up to ~15 levels.
    assert difference.mean() < 1.5
    assert torch.quantile(difference.flatten(), 0.99) < 10
    # And it does blur: the horizontal gradient energy drops.
    assert ours.diff(dim=-1).abs().mean() < (tensor[0] * 255).diff(dim=-1).abs().mean()


def test_blur_methods_agree():
    images = torch.rand(5, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    kernels = gaussian_kernels(torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0]), 6)
    taps = gaussian_blur(images, kernels, "taps")
    torch.testing.assert_close(taps, gaussian_blur(images, kernels, "convolution"), atol=1e-6, rtol=0)
    # Replicated edges: a constant image stays constant, at the borders too.
    constant = torch.full((1, 3, 9, 9), 0.25)
    torch.testing.assert_close(gaussian_blur(constant, kernels[4:], "taps"), constant)
    with pytest.raises(ValueError, match="unknown blur method"):
        gaussian_blur(images, kernels, "fft")


def test_blur_kernel_size_follows_sigma_like_pil():
    kernels = gaussian_kernels(torch.tensor([0.5, 1.0, 1.5, 2.0]), 6)
    support = (kernels > 0).sum(dim=1)
    assert support.tolist() == [7, 7, 13, 13]  # PIL's three boxes reach 3 or 6 pixels in this range
    torch.testing.assert_close(kernels.sum(dim=1), torch.ones(4))


def test_sync_free_and_subset_paths_agree_for_1_3_4_channels():
    for channels in (1, 3, 4):
        images = torch.randint(0, 256, (16, channels, 24, 24), dtype=torch.uint8)
        config = MultiCropConfig(mean=(0.5,) * channels, std=(0.25,) * channels)
        fast = PhotometricAugmentation(config, blur_prob=0.5, solarize_prob=0.3, sync_free=True)
        subset = PhotometricAugmentation(config, blur_prob=0.5, solarize_prob=0.3, sync_free=False)
        parameters = fast.sample_parameters(16, generator=torch.Generator().manual_seed(channels))
        torch.testing.assert_close(
            fast.apply(images, parameters), subset.apply(images, parameters), atol=1e-6, rtol=0
        )


def test_compiled_photometric_stage_matches_the_eager_one():
    import torch._dynamo

    images = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8)
    eager = PhotometricAugmentation(MultiCropConfig(), blur_prob=0.5, solarize_prob=0.3)  # CPU: subset path
    compiled = PhotometricAugmentation(MultiCropConfig(), blur_prob=0.5, solarize_prob=0.3)
    compiled.compile_apply()
    torch._dynamo.utils.counters.clear()
    for seed in (0, 1):  # a second batch reuses the graph
        expected = eager(images, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(
            compiled(images, torch.Generator().manual_seed(seed)), expected, atol=1e-5, rtol=0
        )
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one graph, no break
    assert not torch._dynamo.utils.counters["graph_break"]


def test_compiled_stages_share_their_graphs_across_instances():
    """Every trainer of a process compiles its own stages: they reuse one set of graphs, so that dynamo's
    limit of 8 per code object is never reached (past it, the stage would run eagerly)."""
    import torch._dynamo

    config = MultiCropConfig(global_crop_size=16, local_crop_size=8, local_crops_number=2)
    crops = [torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8) for size in (16, 16, 8, 8)]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for seed in range(4):
        stage = MultiCropPhotometric(config)
        stage.compile_apply()
        stage(crops, torch.Generator().manual_seed(seed))
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] == 3  # global 1, global 2, local: their settings differ
    assert not counters["recompiles"] and not counters["graph_break"]


def bernoulli_tolerance(probability: float, count: int) -> float:
    return 5 * math.sqrt(max(probability * (1 - probability), 1e-12) / count) + 1e-12


def test_parameter_probabilities_and_ranges_match_the_official_recipe():
    kstest = pytest.importorskip("scipy.stats").kstest
    photometric = MultiCropPhotometric()
    count = 20000
    generator = torch.Generator().manual_seed(0)
    expected_blur = {"global_1": 1.0, "global_2": 0.1, "local": 0.5}
    expected_solarize = {"global_1": 0.0, "global_2": 0.2, "local": 0.0}
    for name, module in (
        ("global_1", photometric.global_1),
        ("global_2", photometric.global_2),
        ("local", photometric.local),
    ):
        parameters = module.sample_parameters(count, generator=generator)
        frequencies = {
            "jitter": (parameters.jitter.float().mean().item(), 0.8),
            "grayscale": (parameters.grayscale.float().mean().item(), 0.2),
            "blur": (parameters.blur.float().mean().item(), expected_blur[name]),
            "solarize": (parameters.solarize.float().mean().item(), expected_solarize[name]),
        }
        for what, (observed, expected) in frequencies.items():
            assert abs(observed - expected) <= bernoulli_tolerance(expected, count), (name, what, observed)
        uniform_ranges = {
            "brightness": (0.6, 1.4),
            "contrast": (0.6, 1.4),
            "saturation": (0.8, 1.2),
            "hue": (-0.1, 0.1),
            "sigma": (0.1, 2.0),
        }
        for what, (low, high) in uniform_ranges.items():
            values = getattr(parameters, what).numpy()
            assert values.min() >= low and values.max() <= high
            assert kstest(values, "uniform", args=(low, high - low)).pvalue > 1e-3, (name, what)
        # The jitter order is a uniformly random permutation per sample (torchvision: torch.randperm(4)).
        orders = [tuple(row) for row in parameters.order.tolist()]
        assert all(sorted(order) == [0, 1, 2, 3] for order in orders)
        counts = np.array([orders.count(order) for order in itertools.permutations(range(4))])
        chi_square = ((counts - count / 24) ** 2 / (count / 24)).sum()
        assert chi_square < 60  # 23 degrees of freedom: p ~ 4e-5


def test_applied_frequencies_on_images():
    # Constant images make each operation visible: count how often it changed the output.
    count = 3000
    # sigma >= 1 so that every blur visibly changes a checkerboard (sigma 0.1 moves it by ~1e-22).
    config = MultiCropConfig(color_jitter_prob=0.0, blur_sigma=(1.0, 2.0))
    photometric = MultiCropPhotometric(config)
    generator = torch.Generator().manual_seed(1)
    bright = torch.full((count, 3, 4, 4), 0.8)
    solarized = photometric.global_2.apply(
        bright, photometric.global_2.sample_parameters(count, generator=generator), normalize=False
    )
    colour = torch.tensor([0.9, 0.2, 0.4]).view(1, 3, 1, 1).expand(count, 3, 4, 4)
    grayed = photometric.global_1.apply(
        colour, photometric.global_1.sample_parameters(count, generator=generator), normalize=False
    )
    checker = (torch.arange(8).view(1, 8) + torch.arange(8).view(8, 1)) % 2
    checker = checker.float().expand(count, 3, 8, 8)
    blurred = photometric.local.apply(
        checker, photometric.local.sample_parameters(count, generator=generator), normalize=False
    )
    solarize_rate = (solarized[:, 0, 0, 0] < 0.5).float().mean().item()
    gray_rate = (grayed[:, 0, 0, 0] - grayed[:, 1, 0, 0]).abs().lt(1e-6).float().mean().item()
    blur_rate = (blurred - checker).abs().amax(dim=(1, 2, 3)).gt(1e-3).float().mean().item()
    assert abs(solarize_rate - 0.2) <= bernoulli_tolerance(0.2, count)
    assert abs(gray_rate - 0.2) <= bernoulli_tolerance(0.2, count)
    assert abs(blur_rate - 0.5) <= bernoulli_tolerance(0.5, count)


def test_parameters_are_drawn_per_sample_and_reproducibly():
    image = image_to_tensor(photo(32)).unsqueeze(0).expand(8, -1, -1, -1)
    module = MultiCropPhotometric().global_1
    output = module(image, torch.Generator().manual_seed(5))
    flat = output.flatten(1)
    assert all(not torch.allclose(flat[i], flat[j]) for i in range(8) for j in range(i + 1, 8))
    parameters = module.sample_parameters(8, generator=torch.Generator().manual_seed(5))
    assert len(set(parameters.sigma.tolist())) == 8 and len(set(parameters.brightness.tolist())) == 8
    torch.testing.assert_close(module(image, torch.Generator().manual_seed(5)), output)
    assert not torch.allclose(module(image, torch.Generator().manual_seed(6)), output)


def test_rgb_only_operations_are_skipped_and_normalisation_adapts():
    module = PhotometricAugmentation(blur_prob=0.0, solarize_prob=0.0)
    gray = torch.rand(5, 1, 12, 12)
    parameters = fixed_parameters(module, 5, jitter=True, grayscale=True)
    output = module.apply(gray, parameters, normalize=False)
    # Only brightness and contrast act on a single channel, in the sample's order.
    for index in range(5):
        expected = gray[index]
        for code in parameters.order[index].tolist():
            if code == 0:
                expected = TF.adjust_brightness(expected, parameters.brightness[index].item())
            elif code == 1:
                expected = TF.adjust_contrast(expected, parameters.contrast[index].item())
        torch.testing.assert_close(output[index], expected, atol=1e-6, rtol=0)
    # 1 and 4 channels fall back to mean = std = 0.5; 3 channels use ImageNet statistics.
    quiet = PhotometricAugmentation(
        MultiCropConfig(color_jitter_prob=0.0, grayscale_prob=0.0), blur_prob=0.0, solarize_prob=0.0
    )
    for channels in (1, 4):
        images = torch.rand(2, channels, 6, 6)
        torch.testing.assert_close(quiet(images), (images - 0.5) / 0.5)
    images = torch.rand(2, 3, 6, 6)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(quiet(images), (images - mean) / std)
    # 16-bit input as float in [0, 1] or as integers is accepted.
    for sixteen_bit in (torch.rand(2, 1, 6, 6), torch.randint(0, 65535, (2, 1, 6, 6), dtype=torch.int32)):
        result = module(sixteen_bit)
        assert result.dtype == torch.float32 and result.shape == (2, 1, 6, 6)


# -- the glue
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_multicrop_augmentation_workers_and_accelerator(channels):
    config = small_config()
    image = np.random.default_rng(0).integers(0, 255, (40, 50, channels), dtype=np.uint8)
    on_workers = MultiCropAugmentation(config, photometric_on="workers")
    on_device = MultiCropAugmentation(config, photometric_on="accelerator")
    views = on_workers(image, seed=3)
    crops = on_device(image, seed=3)
    assert [tuple(v.shape) for v in views] == [(channels, 32, 32)] * 2 + [(channels, 16, 16)] * 3
    assert all(v.dtype == torch.float32 for v in views) and all(c.dtype == torch.uint8 for c in crops)
    # The same seed gives the same crops; the photometric stage then runs on the collated batch.
    torch.testing.assert_close(on_device(image, seed=3), crops)
    batch = [torch.stack([c, c]) for c in crops]
    finished = on_device.apply_on_device(batch, torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in finished] == [(2, channels, 32, 32)] * 2 + [(2, channels, 16, 16)] * 3
    assert all(v.dtype == torch.float32 for v in finished)
    assert on_workers.apply_on_device(views) == views


def test_multicrop_augmentation_16_bit_input():
    image = np.random.default_rng(0).integers(0, 65535, (40, 50), dtype=np.uint16)
    views = MultiCropAugmentation(small_config(), photometric_on="workers")(image, seed=0)
    assert all(v.dtype == torch.float32 and v.shape[0] == 1 for v in views)
    with pytest.raises(ValueError):
        MultiCropAugmentation(photometric_on="gpu")


@pytest.mark.gpu
def test_photometric_runs_on_cuda_without_host_sync():
    device = torch.device("cuda")
    photometric = MultiCropPhotometric().to(device)
    crops = [torch.randint(0, 256, (4, 3, 224, 224), dtype=torch.uint8, device=device)] * 2
    crops += [torch.randint(0, 256, (4, 3, 96, 96), dtype=torch.uint8, device=device)] * 8
    generator = torch.Generator(device=device).manual_seed(0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        views = photometric(crops, generator)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    cpu_views = MultiCropPhotometric(sync_free=True)(
        [c.cpu() for c in crops], torch.Generator().manual_seed(0)
    )
    assert [v.shape for v in views] == [v.shape for v in cpu_views]


def test_channel_layout_of_arrays():
    assert image_to_tensor(np.zeros((8, 64, 64), dtype=np.uint8)).shape == (8, 64, 64)  # channel-first
    assert image_to_tensor(np.zeros((64, 64, 8), dtype=np.uint8)).shape == (8, 64, 64)
    assert image_to_tensor(np.zeros((3, 5, 3), dtype=np.uint8)).shape == (3, 3, 5)  # tiny HWC stays HWC
    assert image_to_tensor(np.zeros((20, 30), dtype=np.uint16)).dtype == torch.float32
