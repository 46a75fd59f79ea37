"""Linear probe on frozen features, the paper's protocol (paper §4.1 and appendix, official linear eval).

Protocol: frozen backbone; features = the CLS tokens of the last 4 blocks with the final norm, concatenated
(ViT-S), or the CLS token with the average of the patch tokens (ViT-B); one linear layer (weights
N(0, 0.01), zero bias) trained with SGD, momentum 0.9, no weight decay, learning rate `lr * batch / 256`
cosine-annealed to 0 over 100 epochs (stepped per epoch); the learning rate is swept. Training images are
random-resized crops with horizontal flips; test images are resized to 256 and centre-cropped to 224.

All swept learning rates train side by side, one linear layer each, on the same batches: the frozen
backbone runs once per batch whatever the number of learning rates.

Two ways to feed the training set:
- `train_linear_probe_on_images` (the paper): a fresh random crop and flip of every image every epoch,
  so the backbone runs `epochs` times over the training set. Most faithful, most expensive.
- `train_linear_probe` on cached features: the centre-crop features of the training set, computed once
  (and cached on disk by `extract_features`), then 100 epochs cost seconds. No augmentation means less
  regularisation, so accuracy is typically a little lower than the paper's protocol and overfits sooner on
  small datasets; use it for fast learning-rate sweeps and comparisons between checkpoints.

Difference from the official script: it reports the best test accuracy over all epochs; here the numbers
are those of the last epoch (no selection on the test set besides the learning rate).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hf_dino.evaluation.features import (
    FeatureExtractor,
    TrainingTransform,
    _ImageBatches,
    detect_image_column,
)
from hf_dino.evaluation.knn import topk_accuracy

# Base learning rates for a batch of 256, swept on a log scale around the official default of 0.001 and wide
# enough for features of any scale (the layers train side by side, so each extra rate costs little).
DEFAULT_LEARNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
DEFAULT_EPOCHS = 100  # paper
DEFAULT_BATCH_SIZE = 128  # official per-GPU default


class LinearClassifiers(nn.Module):
    """Independent linear layers, one per learning rate, applied to the same features in one batched product.

    Args:
        in_features: feature size.
        num_classes: number of classes.
        count: how many layers.

    Attributes:
        weight: `(count, num_classes, in_features)`.
        bias: `(count, num_classes)`.
    """

    def __init__(self, in_features: int, num_classes: int, count: int) -> None:
        super().__init__()
        weights, biases = [], []
        for _ in range(count):
            # Official initialisation, N(0, 0.01) and zero bias, drawn layer after layer from an `nn.Linear` as the
            # official code does: the first layer starts the same whatever the number of layers beside it.
            layer = nn.Linear(in_features, num_classes)
            nn.init.normal_(layer.weight, mean=0.0, std=0.01)
            nn.init.zeros_(layer.bias)
            weights.append(layer.weight.detach())
            biases.append(layer.bias.detach())
        self.weight = nn.Parameter(torch.stack(weights))
        self.bias = nn.Parameter(torch.stack(biases))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """`(B, in_features)` -> `(count, B, num_classes)` logits."""
        return torch.baddbmm(
            self.bias.unsqueeze(1),
            features.unsqueeze(0).expand(len(self.weight), -1, -1),
            self.weight.transpose(1, 2),
        )

    def layer(self, index: int) -> nn.Linear:
        """One of the layers as a standalone `nn.Linear` (a copy)."""
        count, num_classes, in_features = self.weight.shape
        layer = nn.Linear(in_features, num_classes)
        with torch.no_grad():
            layer.weight.copy_(self.weight[index])
            layer.bias.copy_(self.bias[index])
        return layer


class _SweptSGD:
    """SGD with momentum where each linear layer has its own learning rate (torch.optim.SGD's update rule).

    One vectorised update for all layers instead of one optimizer parameter group per layer: with small
    layers, the per-group overhead would dominate the probe's run time.
    """

    def __init__(
        self,
        classifiers: LinearClassifiers,
        learning_rates: torch.Tensor,
        momentum: float,
        weight_decay: float,
    ) -> None:
        self.parameters = [classifiers.weight, classifiers.bias]
        self.learning_rates = learning_rates  # (count,)
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.velocities = [torch.zeros_like(parameter) for parameter in self.parameters]
        self.scale = 1.0  # the learning-rate schedule's factor

    @torch.no_grad()
    def step(self) -> None:
        for parameter, velocity in zip(self.parameters, self.velocities):
            gradient = parameter.grad
            if self.weight_decay:
                gradient = gradient.add(parameter, alpha=self.weight_decay)
            velocity.mul_(self.momentum).add_(gradient)  # the first step's velocity is the gradient
            rates = (self.learning_rates * self.scale).view(-1, *([1] * (parameter.dim() - 1)))
            parameter.sub_(rates * velocity)
            parameter.grad = None


@dataclass
class LinearProbeResult:
    """Outcome of a learning-rate sweep.

    Attributes:
        per_learning_rate: `{base_lr: {"top1": %, "top5": %}}` at the last epoch, base lr per 256 images.
        best_learning_rate: the base learning rate with the best top-1.
        top1, top5: its accuracies (top-5 counts `min(5, num_classes)` classes).
        classifier: its trained linear layer.
        train_loss: mean training loss of the last epoch per base learning rate.
    """

    per_learning_rate: dict[float, dict[str, float]]
    best_learning_rate: float
    top1: float
    top5: float
    classifier: nn.Linear
    train_loss: dict[float, float] = field(default_factory=dict)

    def as_results(self) -> dict[str, Any]:
        """The numbers for an evaluation record."""
        return {
            "top1": self.top1,
            "top5": self.top5,
            "best_learning_rate": self.best_learning_rate,
            "per_learning_rate": {f"{lr:g}": values for lr, values in self.per_learning_rate.items()},
        }


def _check_labels(labels: torch.Tensor, num_classes: int, name: str) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{name} must be class indices in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]"
        )


def _train_classifiers(
    batches_for_epoch: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    *,
    in_features: int,
    num_classes: int,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    learning_rates: Sequence[float],
    epochs: int,
    batch_size: int,
    momentum: float,
    weight_decay: float,
    device: torch.device,
    progress: bool,
) -> LinearProbeResult:
    if not learning_rates or min(learning_rates) <= 0:
        raise ValueError(f"learning rates must be positive, got {list(learning_rates)}")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    classifiers = LinearClassifiers(in_features, num_classes, len(learning_rates)).to(device)
    # The linear scaling rule, as in the official linear evaluation.
    scaled_rates = torch.tensor([base_lr * batch_size / 256.0 for base_lr in learning_rates], device=device)
    optimizer = _SweptSGD(classifiers, scaled_rates, momentum=momentum, weight_decay=weight_decay)
    epoch_range: Iterable[int] = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        epoch_range = tqdm(epoch_range, desc="linear probe", unit="epoch")
    epoch_losses = torch.zeros(len(learning_rates))
    for epoch in epoch_range:
        # Cosine annealing to 0 over the epochs, stepped per epoch (official: CosineAnnealingLR, eta_min 0).
        optimizer.scale = 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
        epoch_losses = torch.zeros(len(learning_rates), device=device)
        seen = 0
        for features, labels in batches_for_epoch(epoch):
            features, labels = features.to(device).float(), labels.to(device)
            logits = classifiers(features)  # (count, B, classes)
            per_classifier = (
                F.cross_entropy(logits.flatten(0, 1), labels.repeat(len(learning_rates)), reduction="none")
                .view(len(learning_rates), -1)
                .mean(dim=1)
            )
            # The layers share no parameters: the sum's gradient is each layer's own loss gradient.
            per_classifier.sum().backward()
            optimizer.step()
            epoch_losses += per_classifier.detach() * len(labels)
            seen += len(labels)
        epoch_losses /= max(seen, 1)
        if not torch.isfinite(epoch_losses).any():
            raise FloatingPointError(
                "every learning rate diverged (non-finite loss); sweep lower learning rates"
            )

    per_learning_rate: dict[float, dict[str, float]] = {}
    with torch.no_grad():
        ranked_chunks = []
        for start in range(0, len(test_features), 4096):
            logits = classifiers(test_features[start : start + 4096].to(device).float())
            ranked_chunks.append(logits.topk(min(5, num_classes), dim=-1).indices.cpu())
        ranked = torch.cat(ranked_chunks, dim=1)  # (count, num_test, <=5)
    diverged = (
        ~torch.isfinite(epoch_losses.cpu())
        | ~torch.isfinite(classifiers.weight.detach()).flatten(1).all(1).cpu()
    )
    for index, base_lr in enumerate(learning_rates):
        if diverged[index]:  # NaN weights rank classes arbitrarily: report no accuracy rather than a fake one
            per_learning_rate[float(base_lr)] = {"top1": math.nan, "top5": math.nan}
            continue
        per_learning_rate[float(base_lr)] = {
            "top1": topk_accuracy(ranked[index], test_labels, 1),
            "top5": topk_accuracy(ranked[index], test_labels, 5),
        }
    # The best top-1 among the runs that did not diverge; ties go to the smaller learning rate.
    candidates = sorted(
        (i for i in range(len(learning_rates)) if not diverged[i]), key=lambda i: learning_rates[i]
    )
    best_index = max(candidates, key=lambda i: per_learning_rate[float(learning_rates[i])]["top1"])
    best_lr = float(learning_rates[best_index])
    return LinearProbeResult(
        per_learning_rate=per_learning_rate,
        best_learning_rate=best_lr,
        top1=per_learning_rate[best_lr]["top1"],
        top5=per_learning_rate[best_lr]["top5"],
        classifier=classifiers.layer(best_index).cpu(),
        train_loss={float(lr): float(loss) for lr, loss in zip(learning_rates, epoch_losses.tolist())},
    )


def _prepare(
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    train_labels = torch.as_tensor(train_labels).long()
    test_labels = torch.as_tensor(test_labels).long()
    test_features = torch.as_tensor(test_features).float()
    if test_features.dim() != 2 or len(test_features) != len(test_labels):
        raise ValueError(
            f"test features {tuple(test_features.shape)} and labels {tuple(test_labels.shape)} do not match"
        )
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    _check_labels(train_labels, num_classes, "train labels")
    _check_labels(test_labels, num_classes, "test labels")
    return train_labels, test_features, test_labels, num_classes


def train_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int | None = None,
    learning_rates: Sequence[float] = DEFAULT_LEARNING_RATES,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> LinearProbeResult:
    """Linear probe on precomputed (cached) training features: fast, without training augmentation.

    Args:
        train_features: `(num_train, dim)` frozen features (not normalised, as in the paper).
        train_labels: `(num_train,)` integer labels.
        test_features: `(num_test, dim)` frozen features of the test images (centre crops).
        test_labels: `(num_test,)` integer labels.
        num_classes: number of classes (default: the largest label + 1).
        learning_rates: base learning rates for a batch of 256, trained side by side.
        epochs: training epochs (100 in the paper).
        batch_size: training batch size (the learning rates are scaled by `batch_size / 256`).
        momentum: SGD momentum (0.9).
        weight_decay: SGD weight decay (0 in the paper).
        seed: seeds initialisation and shuffling.
        device: where to train.
        progress: show a progress bar.

    Returns:
        a `LinearProbeResult`.
    """
    train_features = torch.as_tensor(train_features).float()
    train_labels, test_features, test_labels, num_classes = _prepare(
        train_labels, test_features, test_labels, num_classes
    )
    if train_features.dim() != 2 or len(train_features) != len(train_labels):
        raise ValueError(
            f"train features {tuple(train_features.shape)} and labels {tuple(train_labels.shape)} do not match"
        )
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    train_features, train_labels_on_device = train_features.to(device), train_labels.to(device)

    def batches_for_epoch(epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(train_features), generator=generator).to(device)
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            yield train_features[indices], train_labels_on_device[indices]

    return _train_classifiers(
        batches_for_epoch,
        in_features=train_features.shape[1],
        num_classes=num_classes,
        test_features=test_features,
        test_labels=test_labels,
        learning_rates=learning_rates,
        epochs=epochs,
        batch_size=batch_size,
        momentum=momentum,
        weight_decay=weight_decay,
        device=device,
        progress=progress,
    )


def train_linear_probe_on_images(
    extractor: FeatureExtractor,
    train_dataset: Any,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    label_column: str,
    image_column: str | None = None,
    transform: TrainingTransform | None = None,
    num_classes: int | None = None,
    learning_rates: Sequence[float] = DEFAULT_LEARNING_RATES,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    num_workers: int = 0,
    seed: int = 0,
    progress: bool = False,
) -> LinearProbeResult:
    """Linear probe with fresh random-resized crops and flips every epoch (the paper's protocol).

    Args:
        extractor: the frozen backbone and feature layout (e.g. `FeatureExtractor(model, n_last_blocks=4)`).
        train_dataset: a `datasets.Dataset` with images and integer labels.
        test_features: `(num_test, dim)` features of the test images from the same extractor, centre crops.
        test_labels: `(num_test,)` integer labels.
        label_column: the training label column.
        image_column: the image column (detected when None).
        transform: the training transform (default: `TrainingTransform` for the model's channels, 224 px).
        num_workers: DataLoader workers decoding and cropping images.
        Other arguments: as `train_linear_probe`; the learning rates train side by side on the same crops.

    Returns:
        a `LinearProbeResult`.
    """
    from hf_dino.evaluation.features import model_num_channels

    train_labels = torch.as_tensor(np.asarray(list(train_dataset[label_column]), dtype=np.int64))
    _, test_features, test_labels, num_classes = _prepare(
        train_labels, test_features, test_labels, num_classes
    )
    num_channels = model_num_channels(extractor.model) if extractor.model is not None else 3
    transform = transform or TrainingTransform(num_channels=num_channels)
    image_column = image_column or detect_image_column(train_dataset)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        _ImageBatches(train_dataset, image_column, label_column, transform.build(), transform.num_channels),
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        num_workers=num_workers,
        pin_memory=extractor.device.type == "cuda",
    )

    def batches_for_epoch(epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        for pixel_values, labels in loader:
            # Made outside inference mode, so the linear layers may keep them for their backward pass.
            yield extractor(pixel_values).clone(), labels

    return _train_classifiers(
        batches_for_epoch,
        in_features=test_features.shape[1],
        num_classes=num_classes,
        test_features=test_features,
        test_labels=test_labels,
        learning_rates=learning_rates,
        epochs=epochs,
        batch_size=batch_size,
        momentum=momentum,
        weight_decay=weight_decay,
        device=extractor.device,
        progress=progress,
    )


__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_EPOCHS",
    "DEFAULT_LEARNING_RATES",
    "LinearClassifiers",
    "LinearProbeResult",
    "train_linear_probe",
    "train_linear_probe_on_images",
]
