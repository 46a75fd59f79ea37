"""Linear probe: the official optimisation recipe, side-by-side learning rates, both training modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hf_dino.evaluation.features import (
    EvaluationTransform,
    FeatureExtractor,
    TrainingTransform,
    extract_features,
)
from hf_dino.evaluation.linear import LinearClassifiers, train_linear_probe, train_linear_probe_on_images


@pytest.fixture
def separable_features():
    generator = np.random.default_rng(0)
    centers = generator.normal(size=(4, 12)) * 3
    train_labels = generator.integers(0, 4, size=200)
    test_labels = generator.integers(0, 4, size=80)
    train = centers[train_labels] + generator.normal(size=(200, 12))
    test = centers[test_labels] + generator.normal(size=(80, 12))
    as_tensor = lambda array: torch.as_tensor(array, dtype=torch.float32)  # noqa: E731
    return as_tensor(train), torch.as_tensor(train_labels), as_tensor(test), torch.as_tensor(test_labels)


def reference_probe(train, train_labels, base_lr, *, epochs, batch_size, seed):
    """The official recipe written out plainly: one layer, SGD + momentum, cosine per epoch, lr * bs / 256."""
    torch.manual_seed(seed)
    layer = torch.nn.Linear(train.shape[1], 4)
    torch.nn.init.normal_(layer.weight, mean=0.0, std=0.01)
    torch.nn.init.zeros_(layer.bias)
    optimizer = torch.optim.SGD(
        layer.parameters(), lr=base_lr * batch_size / 256, momentum=0.9, weight_decay=0
    )
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        # Cosine annealing to 0 over the epochs, stepped once per epoch.
        for group in optimizer.param_groups:
            group["lr"] = base_lr * batch_size / 256 * 0.5 * (1 + np.cos(np.pi * epoch / epochs))
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), batch_size):
            indices = order[start : start + batch_size]
            loss = F.cross_entropy(layer(train[indices]), train_labels[indices])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return layer


def test_matches_a_plain_reference_loop(separable_features) -> None:
    train, train_labels, test, test_labels = separable_features
    result = train_linear_probe(
        train, train_labels, test, test_labels, learning_rates=[0.05], epochs=4, batch_size=32, seed=7
    )
    reference = reference_probe(train, train_labels, 0.05, epochs=4, batch_size=32, seed=7)
    torch.testing.assert_close(result.classifier.weight, reference.weight, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.classifier.bias, reference.bias, rtol=1e-4, atol=1e-6)
    predictions = reference(test).argmax(1)
    assert result.top1 == pytest.approx(100.0 * (predictions == test_labels).float().mean().item())


def test_learning_rates_trained_side_by_side_do_not_interact(separable_features) -> None:
    train, train_labels, test, test_labels = separable_features
    together = train_linear_probe(
        train, train_labels, test, test_labels, learning_rates=[0.1, 1e-5], epochs=3, batch_size=50, seed=1
    )
    alone = train_linear_probe(
        train, train_labels, test, test_labels, learning_rates=[0.1], epochs=3, batch_size=50, seed=1
    )
    assert together.per_learning_rate[0.1] == alone.per_learning_rate[0.1]
    assert together.train_loss[0.1] == pytest.approx(alone.train_loss[0.1], rel=1e-5)
    # A learning rate far too small barely moves from chance; the sweep picks the working one.
    assert together.best_learning_rate == 0.1
    assert together.top1 > 90 and together.per_learning_rate[1e-5]["top1"] < together.top1
    assert set(together.as_results()) >= {"top1", "top5", "best_learning_rate", "per_learning_rate"}
    assert together.top5 == 100.0  # 4 classes: top-5 is top-4


def test_linear_classifiers_initialisation() -> None:
    torch.manual_seed(0)
    classifiers = LinearClassifiers(256, 1000, count=2)
    weight = classifiers.weight[0]
    assert weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert torch.count_nonzero(classifiers.bias) == 0
    features = torch.randn(5, 256)
    logits = classifiers(features)
    assert logits.shape == (2, 5, 1000)
    torch.testing.assert_close(logits[1], classifiers.layer(1)(features))


def test_bad_inputs(separable_features) -> None:
    train, train_labels, test, test_labels = separable_features
    with pytest.raises(ValueError, match="do not match"):
        train_linear_probe(train[:10], train_labels, test, test_labels, epochs=1)
    with pytest.raises(ValueError, match="class indices"):
        train_linear_probe(train, train_labels, test, test_labels, num_classes=2, epochs=1)
    with pytest.raises(ValueError, match="positive"):
        train_linear_probe(train, train_labels, test, test_labels, learning_rates=[0.0], epochs=1)


def test_on_images_with_random_crops(tiny_dino_model, toy_dataset_dict) -> None:
    extractor = FeatureExtractor(tiny_dino_model, n_last_blocks=2)
    test = extract_features(
        extractor,
        toy_dataset_dict["test"],
        label_column="label",
        transform=EvaluationTransform(resize_size=None, crop_size=28, num_channels=1),
    )
    assert test.features.shape == (12, 64)
    transform = TrainingTransform(crop_size=28, num_channels=1)
    options = {"label_column": "label", "transform": transform, "learning_rates": [0.1, 1.0], "epochs": 2}
    options |= {"batch_size": 8, "seed": 3}
    result = train_linear_probe_on_images(
        extractor, toy_dataset_dict["train"], test.features, test.labels, **options
    )
    assert set(result.per_learning_rate) == {0.1, 1.0}
    assert 0.0 <= result.top1 <= 100.0 and result.top5 == 100.0
    assert result.classifier.weight.shape == (3, 64)
    # Same seed, same crops, same classifier.
    again = train_linear_probe_on_images(
        extractor, toy_dataset_dict["train"], test.features, test.labels, **options
    )
    torch.testing.assert_close(again.classifier.weight, result.classifier.weight)


def test_a_diverging_learning_rate_is_reported_as_such(separable_features) -> None:
    train, train_labels, test, test_labels = separable_features
    result = train_linear_probe(
        train * 1e10, train_labels, test, test_labels, learning_rates=[1e-20, 1e38], epochs=2, batch_size=50
    )
    assert not np.isfinite(result.train_loss[1e38])  # overflowed
    assert result.best_learning_rate == 1e-20
    assert np.isnan(result.per_learning_rate[1e38]["top1"]) and np.isfinite(result.top1)
