"""Attention-mask quality: Jaccard index, 60%-mass masks from the last layer, the dataset-level score."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_dino.evaluation.features import EvaluationTransform
from hf_dino.evaluation.masks import (
    as_attention_model,
    attention_masks,
    evaluate_attention_masks,
    jaccard_index,
)


def top_mass_mask(values: np.ndarray, mass: float) -> np.ndarray:
    """Independent 60%-mass mask: the fewest largest values whose sum reaches `mass` of the total."""
    order = np.argsort(-values.ravel(), kind="stable")
    cumulative = np.cumsum(values.ravel()[order]) / values.sum()
    count = int(np.searchsorted(cumulative, mass - 1e-12) + 1)
    mask = np.zeros(values.size, dtype=bool)
    mask[order[:count]] = True
    return mask.reshape(values.shape)


def test_jaccard_index_by_hand() -> None:
    predicted = torch.zeros(2, 4, 4, dtype=torch.bool)
    target = torch.zeros(2, 4, 4, dtype=torch.bool)
    predicted[0, :2, :] = True  # 8 pixels
    target[0, 1:3, :] = True  # 8 pixels, 4 shared -> 4 / 12
    scores = jaccard_index(predicted, target)
    assert scores[0].item() == pytest.approx(4 / 12)
    assert scores[1].item() == 1.0  # both empty: they agree
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    valid[0, 2, :] = False  # ignore the target-only row: 4 / 8
    assert jaccard_index(predicted, target, valid)[0].item() == pytest.approx(4 / 8)


def test_attention_masks_match_an_independent_computation(tiny_dino_model) -> None:
    pixel_values = torch.randn(2, 1, 28, 28)
    per_head, combined = attention_masks(as_attention_model(tiny_dino_model), pixel_values, mass=0.6)
    assert per_head.shape == (2, 2, 28, 28) and combined.shape == (2, 28, 28)

    with torch.no_grad():
        attention = tiny_dino_model.last_self_attention(pixel_values)  # (B, heads, 17, 17)
    cls_maps = attention[:, :, 0, 1:].reshape(2, 2, 4, 4).numpy()
    for image in range(2):
        for head in range(2):
            expected = top_mass_mask(cls_maps[image, head], 0.6).repeat(7, axis=0).repeat(7, axis=1)
            np.testing.assert_array_equal(per_head[image, head].numpy(), expected)
        expected = top_mass_mask(cls_maps[image].mean(axis=0), 0.6).repeat(7, axis=0).repeat(7, axis=1)
        np.testing.assert_array_equal(combined[image].numpy(), expected)


def test_dataset_score_with_masks_from_the_image(tiny_dino_model, toy_dataset_dict) -> None:
    dataset = toy_dataset_dict["test"]
    transform = EvaluationTransform(resize_size=None, crop_size=28, num_channels=1)
    results = evaluate_attention_masks(tiny_dino_model, dataset, transform=transform, batch_size=5)
    assert results["num_images"] == 12 and len(results["jaccard_per_head"]) == 2
    assert results["jaccard_best_head"] == max(results["jaccard_per_head"])

    # By hand: per image, the head-averaged mask against the non-zero pixels.
    attention_model = as_attention_model(tiny_dino_model)
    build = transform.build()
    scores = []
    for row in dataset:
        pixels = np.asarray(row["image"])
        _, combined = attention_masks(attention_model, build(row["image"]).unsqueeze(0))
        predicted, target = combined[0].numpy(), pixels > 0
        scores.append((predicted & target).sum() / (predicted | target).sum())
    assert results["jaccard"] == pytest.approx(float(np.mean(scores)), rel=1e-6)


def test_mask_column_and_ignored_pixels(tiny_dino_model, toy_dataset_dict) -> None:
    import datasets
    from PIL import Image

    dataset = toy_dataset_dict["test"].select(range(3))
    everything = Image.fromarray(np.full((28, 28), 1, dtype=np.uint8))
    with_masks = datasets.Dataset.from_dict(
        {"image": dataset["image"][:], "mask": [everything] * 3},
        features=datasets.Features({"image": datasets.Image(), "mask": datasets.Image()}),
    )
    transform = EvaluationTransform(resize_size=None, crop_size=28, num_channels=1)
    results = evaluate_attention_masks(tiny_dino_model, with_masks, mask_column="mask", transform=transform)
    # Ground truth covers the whole image: the Jaccard is the fraction of patches kept.
    per_head, combined = attention_masks(
        as_attention_model(tiny_dino_model),
        torch.stack([transform.build()(image) for image in dataset["image"]]),
    )
    assert results["jaccard"] == pytest.approx(combined.float().mean().item(), rel=1e-6)
    # Every pixel ignored: nothing to compare, both masks empty -> 1.
    ignored = evaluate_attention_masks(
        tiny_dino_model, with_masks, mask_column="mask", transform=transform, ignore_value=1
    )
    assert ignored["jaccard"] == 1.0


def test_resnet_models_are_refused() -> None:
    from hf_dino import DinoConfig, DinoModel

    config = DinoConfig.from_preset(
        "resnet50",
        hidden_sizes=[8, 8, 8, 8],
        embedding_size=8,
        depths=[1, 1, 1, 1],
        out_dim=16,
        hidden_dim=16,
        bottleneck_dim=8,
    )
    with pytest.raises(ValueError, match="ViT"):
        as_attention_model(DinoModel(config))


def test_transformers_vit_masks(tiny_vit_model, toy_dataset_dict) -> None:
    pixel_values = torch.randn(1, 3, 28, 28)
    per_head, _ = attention_masks(as_attention_model(tiny_vit_model), pixel_values)
    from transformers import ViTModel

    eager = ViTModel(tiny_vit_model.config, add_pooling_layer=False).eval()
    eager.load_state_dict(tiny_vit_model.state_dict())
    eager.set_attn_implementation("eager")  # transformers returns attention probabilities only in eager mode
    with torch.no_grad():
        attentions = eager(pixel_values, output_attentions=True).attentions
    cls_maps = attentions[-1][0, :, 0, 1:].reshape(2, 4, 4).numpy()
    for head in range(2):
        expected = top_mass_mask(cls_maps[head], 0.6).repeat(7, axis=0).repeat(7, axis=1)
        np.testing.assert_array_equal(per_head[0, head].numpy(), expected)
    transform = EvaluationTransform(resize_size=None, crop_size=28)
    results = evaluate_attention_masks(
        tiny_vit_model, toy_dataset_dict["test"].select(range(3)), transform=transform
    )
    assert results["num_images"] == 3
