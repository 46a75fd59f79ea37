"""`evaluate` metric modules shipped with hf_dino, loaded by path so that evaluation needs no network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

METRICS_DIRECTORY = Path(__file__).resolve().parent


def metric_path(name: str) -> Path:
    """The folder of a shipped metric module (`<name>/<name>.py`), which `evaluate.load` accepts."""
    path = METRICS_DIRECTORY / name
    if not (path / f"{name}.py").is_file():
        available = sorted(p.name for p in METRICS_DIRECTORY.iterdir() if (p / f"{p.name}.py").is_file())
        raise ValueError(f"no metric {name!r} shipped with hf_dino; available: {available}")
    return path


def load_metric(name: str = "topk_accuracy", **kwargs: Any):
    """`evaluate.load` of a shipped metric, by path (works offline).

    Args:
        name: the metric folder name, e.g. "topk_accuracy".
        kwargs: passed to `evaluate.load`.

    Returns:
        an `evaluate.EvaluationModule`.
    """
    import evaluate

    return evaluate.load(str(metric_path(name)), **kwargs)


__all__ = ["METRICS_DIRECTORY", "load_metric", "metric_path"]
