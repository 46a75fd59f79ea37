"""The online k-NN of a training run: the paper's weighted k-NN (§4.1) on a labelled evaluation set.

The evaluation images are decoded and pre-processed once (resized to the global-crop size and normalised
as the training views are), then every evaluation only runs the teacher's backbone over the cached pixels.
Before training the same is done for raw pixels and for the network at its random initialisation, so that
the end of a run can say what DINO added.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from hf_dino.training.arguments import DinoTrainingArguments


@dataclasses.dataclass
class EvaluationData:
    """Pre-processed pixels of a labelled dataset for the online k-NN (memory bank + queries)."""

    train_pixels: torch.Tensor
    train_labels: torch.Tensor
    test_pixels: torch.Tensor
    test_labels: torch.Tensor
    description: dict[str, Any]


def load_evaluation_data(
    arguments: DinoTrainingArguments, *, num_channels: int, augmentation_config: Any | None
) -> EvaluationData:
    """Pre-process the labelled k-NN data once: resize to the global crop size, normalise as in training."""
    from hf_dino import data
    from hf_dino.evaluation.features import EvaluationTransform, detect_image_column, to_model_image

    name = arguments.eval_dataset
    if name in ("embedded", data.EMBEDDED_DATASET):
        train_split, test_split = data.load_embedded_dataset("train"), data.load_embedded_dataset("test")
    else:  # map-style: the k-NN needs the whole (finite) memory bank and query set
        train_split = data.load_image_dataset(name, split="train", streaming=False)
        test_split = data.load_image_dataset(name, split="test", streaming=False)
    mean, std = normalisation_for(num_channels, augmentation_config)
    size = arguments.global_crop_size
    transform = EvaluationTransform(
        resize_size=size, crop_size=size, num_channels=num_channels, mean=mean, std=std
    ).build()
    label_column = arguments.eval_label_column
    image_column = detect_image_column(train_split)

    def pixels(split: Any) -> tuple[torch.Tensor, torch.Tensor]:
        limit = (
            len(split) if arguments.eval_max_samples is None else min(len(split), arguments.eval_max_samples)
        )
        images, labels = [], []
        for index in range(limit):
            row = split[index]
            images.append(transform(to_model_image(row[image_column], num_channels)))
            labels.append(int(row[label_column]))
        return torch.stack(images), torch.tensor(labels)

    train_pixels, train_labels = pixels(train_split)
    test_pixels, test_labels = pixels(test_split)
    description = {
        "id": name,
        "split": "test",
        "train_split": "train",
        "revision": None,
        "label_column": label_column,
    }
    return EvaluationData(train_pixels, train_labels, test_pixels, test_labels, description)


def normalisation_for(
    num_channels: int, augmentation_config: Any | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std the training views were normalised with (MultiCropConfig's rule), for evaluation."""
    if augmentation_config is not None and len(augmentation_config.mean) == num_channels:
        return tuple(augmentation_config.mean), tuple(augmentation_config.std)
    if augmentation_config is not None:
        return (0.5,) * num_channels, (0.5,) * num_channels
    from hf_dino.evaluation.features import default_normalization

    return default_normalization(num_channels)


def knn_report(
    trained: dict[str, float],
    baselines: dict[str, dict[str, float]],
    data: EvaluationData | None,
    arguments: Any,
) -> str:
    """The end-of-training comparison: trained teacher vs the same network at random init vs raw pixels."""
    sizes = ""
    if data is not None:
        sizes = f" ({len(data.train_labels)} memory-bank images, {len(data.test_labels)} held-out queries)"
    lines = [f"Weighted {arguments.knn_k}-NN top-1 on the held-out split{sizes}:"]
    rows = [
        ("raw pixels", baselines.get("raw-pixels")),
        ("random init", baselines.get("random-init")),
        ("trained teacher", trained),
    ]
    for label, results in rows:
        if results:
            lines.append(f"  {label:<16} {results['top1']:6.2f}%")
    if baselines.get("random-init"):
        gain = trained["top1"] - baselines["random-init"]["top1"]
        lines.append(f"  DINO gain over the same network at random init: {gain:+.2f} points")
    return "\n".join(lines)


@torch.no_grad()
def knn_accuracy(
    model: nn.Module | None,
    data: EvaluationData,
    *,
    k: int = 20,
    temperature: float = 0.07,
    mixed_precision: str = "no",
    batch_size: int = 256,
) -> dict[str, float]:
    """Weighted k-NN top-1/top-5 (%) of a model's features (None: raw pixels) on pre-processed data."""
    from hf_dino.evaluation.features import FeatureExtractor
    from hf_dino.evaluation.knn import knn_classify

    precision = {"bf16": "bf16", "fp16": "fp16"}.get(mixed_precision, "fp32")
    extractor = FeatureExtractor(model, precision=precision)

    def features(pixels: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                extractor(pixels[start : start + batch_size]).cpu()
                for start in range(0, len(pixels), batch_size)
            ]
        )

    results = knn_classify(
        features(data.train_pixels),
        data.train_labels,
        features(data.test_pixels),
        data.test_labels,
        k=k,
        temperature=temperature,
    )
    return {key: float(value) for key, value in results.items()}
