"""Small models and a toy labelled image dataset for the evaluation tests (all built here, on the fly)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

TINY_VIT = {
    "image_size": 28,
    "patch_size": 7,
    "num_hidden_layers": 2,
    "hidden_size": 32,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}


def toy_image(label: int, generator: np.random.Generator) -> Image.Image:
    """28 x 28 greyscale, black background: a horizontal band (0), a vertical band (1) or a square (2)."""
    pixels = np.zeros((28, 28), dtype=np.uint8)
    start = int(generator.integers(4, 18))
    brightness = int(generator.integers(150, 256))
    if label == 0:
        pixels[start : start + 6, 3:25] = brightness
    elif label == 1:
        pixels[3:25, start : start + 6] = brightness
    else:
        pixels[start : start + 9, start : start + 9] = brightness
    return Image.fromarray(pixels, mode="L")


def toy_split(count: int, seed: int):
    import datasets

    generator = np.random.default_rng(seed)
    labels = [index % 3 for index in range(count)]
    return datasets.Dataset.from_dict(
        {"image": [toy_image(label, generator) for label in labels], "label": labels},
        features=datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(names=["band", "pillar", "square"])}
        ),
    )


@pytest.fixture(scope="session")
def toy_dataset_dict():
    import datasets

    return datasets.DatasetDict({"train": toy_split(24, seed=0), "test": toy_split(12, seed=1)})


@pytest.fixture(scope="session")
def toy_dataset_dir(toy_dataset_dict, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("toy_dataset")
    toy_dataset_dict.save_to_disk(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_dino_model():
    from hf_dino import DinoConfig, DinoModel

    torch.manual_seed(0)
    config = DinoConfig.from_preset(
        "vit_tiny_patch16", num_channels=1, out_dim=64, hidden_dim=64, bottleneck_dim=32, **TINY_VIT
    )
    return DinoModel(config).eval()


@pytest.fixture(scope="session")
def tiny_dino_dir(tiny_dino_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_dino")
    tiny_dino_model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_vit_model():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(1)
    return ViTModel(ViTConfig(num_channels=3, **TINY_VIT), add_pooling_layer=False).eval()
