"""The paper's weighted k-nearest-neighbour classifier on frozen features (paper §4.1, official protocol).

Features are L2-normalised, so the dot product is the cosine similarity. Each query takes its `k` most
similar training images; each neighbour votes for its label with weight `exp(similarity / T)` (T = 0.07);
classes are ranked by their summed votes. Top-1 is the best-ranked class, top-5 the five best (fewer
when `k` or the number of classes is below 5, as the official code does).

Queries are processed in chunks so that the `(chunk, num_train)` similarity matrix stays small.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# The paper's k sweep (§4.1, appendix) and its reported k.
DEFAULT_K_VALUES = (10, 20, 100, 200)
DEFAULT_TEMPERATURE = 0.07


def _as_tensor(
    values: torch.Tensor | np.ndarray | Sequence, name: str, dtype: torch.dtype | None = None
) -> torch.Tensor:
    tensor = values if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))
    if dtype is not None:
        tensor = tensor.to(dtype)
    if tensor.numel() == 0:
        raise ValueError(f"{name} is empty")
    return tensor


def _check_inputs(
    train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor
) -> None:
    if train_features.dim() != 2 or query_features.dim() != 2:
        raise ValueError(
            "features must have shape (num_images, dim); got train "
            f"{tuple(train_features.shape)} and queries {tuple(query_features.shape)}"
        )
    if train_features.shape[1] != query_features.shape[1]:
        raise ValueError(
            f"train features have dimension {train_features.shape[1]} but queries {query_features.shape[1]}"
        )
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(
            f"train_labels must have shape ({train_features.shape[0]},), got {tuple(train_labels.shape)}"
        )
    if train_labels.min() < 0:
        raise ValueError("labels must be non-negative class indices")


def _infer_num_classes(*labels: torch.Tensor) -> int:
    return max(int(label.max()) for label in labels if label.numel() > 0) + 1


def knn_rankings(
    train_features: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray | Sequence[int],
    query_features: torch.Tensor | np.ndarray,
    *,
    k_values: Sequence[int] = DEFAULT_K_VALUES,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    batch_size: int = 256,
    max_rank: int | None = None,
) -> dict[int, torch.Tensor]:
    """Classes ranked by weighted k-NN votes, for several k from one similarity pass.

    Args:
        train_features: `(num_train, dim)` memory-bank features (L2-normalised here).
        train_labels: `(num_train,)` integer labels.
        query_features: `(num_queries, dim)` features to classify (L2-normalised here).
        k_values: neighbour counts, each between 1 and `num_train`.
        temperature: T in the vote weight `exp(similarity / T)`.
        num_classes: number of classes (default: the largest training label + 1).
        batch_size: queries per similarity chunk (memory: `batch_size * num_train` floats).
        max_rank: keep only this many best classes per query (e.g. 5 for top-5); None keeps all.

    Returns:
        `{k: (num_queries, num_ranked) int64 class indices on CPU, best first}`.
    """
    train_features = _as_tensor(train_features, "train_features")
    train_labels = _as_tensor(train_labels, "train_labels", torch.int64)
    query_features = _as_tensor(query_features, "query_features")
    _check_inputs(train_features, train_labels, query_features)
    num_classes = num_classes or _infer_num_classes(train_labels)
    if int(train_labels.max()) >= num_classes:
        raise ValueError(f"a training label is >= num_classes ({num_classes})")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    num_train = train_features.shape[0]
    k_values = sorted(set(k_values))
    if not k_values or not all(1 <= k <= num_train for k in k_values):
        raise ValueError(f"every k must lie between 1 and the {num_train} training images, got {k_values}")
    num_ranked = num_classes if max_rank is None else min(max_rank, num_classes)

    train_features = F.normalize(train_features.float(), dim=1, p=2)
    train_labels = train_labels.to(train_features.device)
    rankings: dict[int, list[torch.Tensor]] = {k: [] for k in k_values}
    for start in range(0, query_features.shape[0], batch_size):
        queries = F.normalize(query_features[start : start + batch_size].float(), dim=1, p=2)
        similarity = queries.to(train_features.device) @ train_features.T  # (chunk, num_train) cosines
        # Sorted, so the first k of the largest k are the k nearest for every smaller k.
        top_similarity, top_indices = similarity.topk(k_values[-1], dim=1, largest=True, sorted=True)
        top_labels = train_labels[top_indices]
        weights = (top_similarity / temperature).exp()
        for k in k_values:
            votes = torch.zeros(queries.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
            votes.scatter_add_(1, top_labels[:, :k], weights[:, :k])
            # The official call, unstable: classes with equal votes (zero, with fewer voting classes than the
            # top-5) come out in the order torch's sort gives, as in the original, which top-5 can depend on.
            ranked = votes.sort(1, True).indices[:, :num_ranked]
            rankings[k].append(ranked.cpu())
    return {k: torch.cat(chunks) for k, chunks in rankings.items()}


def knn_predict(
    train_features: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray | Sequence[int],
    query_features: torch.Tensor | np.ndarray,
    *,
    k: int = 20,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Classes ranked by weighted k-NN votes for each query (see `knn_rankings`).

    Returns:
        `(num_queries, num_classes)` int64 class indices, best first.
    """
    return knn_rankings(
        train_features,
        train_labels,
        query_features,
        k_values=[k],
        temperature=temperature,
        num_classes=num_classes,
        batch_size=batch_size,
    )[k]


def topk_accuracy(ranked_predictions: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Percentage of rows whose label is among the first `k` ranked predictions.

    Args:
        ranked_predictions: `(num_queries, num_ranked)` class indices, best first.
        labels: `(num_queries,)` true classes.
        k: how many ranked predictions count (capped at `num_ranked`).
    """
    k = min(k, ranked_predictions.shape[1])
    correct = (ranked_predictions[:, :k] == labels.view(-1, 1).to(ranked_predictions.device)).any(dim=1)
    return 100.0 * correct.float().mean().item()


def knn_sweep(
    train_features: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray | Sequence[int],
    test_features: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor | np.ndarray | Sequence[int],
    *,
    k_values: Sequence[int] = DEFAULT_K_VALUES,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    batch_size: int = 256,
) -> dict[int, dict[str, float]]:
    """`knn_classify` for several k at the cost of one: `{k: {"top1": %, "top5": %}}`.

    Values of k larger than the memory bank are left out (tiny datasets); at least one must fit.
    """
    train_labels = _as_tensor(train_labels, "train_labels", torch.int64)
    test_labels = _as_tensor(test_labels, "test_labels", torch.int64)
    num_train = len(train_labels)
    if test_labels.dim() != 1 or len(test_labels) != len(test_features):
        raise ValueError(
            f"test_labels must have shape ({len(test_features)},), got {tuple(test_labels.shape)}"
        )
    usable = [k for k in k_values if k <= num_train]
    if not usable:
        raise ValueError(f"every k in {list(k_values)} exceeds the {num_train} training images")
    num_classes = num_classes or _infer_num_classes(train_labels, test_labels)
    rankings = knn_rankings(
        train_features,
        train_labels,
        test_features,
        k_values=usable,
        temperature=temperature,
        num_classes=num_classes,
        batch_size=batch_size,
        max_rank=5,
    )
    return {
        k: {
            "top1": topk_accuracy(ranked, test_labels, 1),
            "top5": topk_accuracy(ranked, test_labels, min(5, k)),
        }
        for k, ranked in rankings.items()
    }


def knn_classify(
    train_features: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray | Sequence[int],
    test_features: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor | np.ndarray | Sequence[int],
    k: int = 20,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    batch_size: int = 256,
) -> dict[str, float]:
    """Weighted k-NN accuracy of frozen features, the paper's protocol (k = 20, T = 0.07).

    Args:
        train_features: `(num_train, dim)` memory-bank features; L2-normalised here.
        train_labels: `(num_train,)` integer labels.
        test_features: `(num_test, dim)` query features; L2-normalised here.
        test_labels: `(num_test,)` integer labels.
        k: neighbours per query (at most `num_train`).
        temperature: T in the vote weight `exp(similarity / T)`.
        num_classes: number of classes (default: the largest label + 1).
        batch_size: queries per similarity chunk (memory: `batch_size * num_train` floats).

    Returns:
        `{"top1": %, "top5": %}`; top-5 counts the first `min(5, k, num_classes)` ranked classes.
    """
    if k > len(train_labels):
        raise ValueError(f"k={k} exceeds the {len(train_labels)} training images")
    return knn_sweep(
        train_features,
        train_labels,
        test_features,
        test_labels,
        k_values=[k],
        temperature=temperature,
        num_classes=num_classes,
        batch_size=batch_size,
    )[k]


__all__ = [
    "DEFAULT_K_VALUES",
    "DEFAULT_TEMPERATURE",
    "knn_classify",
    "knn_predict",
    "knn_sweep",
    "topk_accuracy",
]
