"""Evaluation records: one JSON file per evaluation, in the format the Hub publisher reads.

{"protocol": "knn" | "linear" | "attention_masks", "parameters": {...},
 "dataset": {"id", "split", "revision", "label_column"}, "model": {"path", "revision"},
 "results": {"top1": ..., "top5": ..., ...}, "created": ISO time, "hf_dino_version": ...}
"""

from __future__ import annotations

import datetime
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

PROTOCOLS = ("knn", "linear", "attention_masks")


def _plain(value: Any) -> Any:
    """JSON-safe copies of numpy / torch scalars, tuples and paths; NaN and infinities become None."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def evaluation_record(
    *,
    protocol: str,
    parameters: dict[str, Any],
    dataset: dict[str, Any],
    model: dict[str, Any],
    results: dict[str, Any],
) -> dict[str, Any]:
    """Assemble a record.

    Args:
        protocol: "knn", "linear" or "attention_masks".
        parameters: everything that defines the evaluation (k, temperature, sizes, learning rates, ...).
        dataset: at least `id`, `split`, `revision`, `label_column` (None where not applicable); more
            keys (e.g. `train_split`) are kept.
        model: at least `path` and `revision`; more keys are kept.
        results: the numbers, `top1` / `top5` in percent for classification protocols.
    """
    from hf_dino import __version__

    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return _plain(
        {
            "protocol": protocol,
            "parameters": parameters,
            "dataset": {"id": None, "split": None, "revision": None, "label_column": None, **dataset},
            "model": {"path": None, "revision": None, **model},
            "results": results,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "hf_dino_version": __version__,
        }
    )


def write_evaluation_record(path: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write a record as indented JSON, atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".json.tmp")
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(record, file, indent=2, allow_nan=False)
            file.write("\n")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def read_evaluation_record(path: str | os.PathLike) -> dict[str, Any]:
    """Read a record back, checking that it has the fields every reader relies on."""
    record = json.loads(Path(path).read_text())
    missing = [key for key in ("protocol", "parameters", "dataset", "model", "results") if key not in record]
    if missing:
        raise ValueError(f"{path} is not an hf_dino evaluation record: missing {missing}")
    return record


__all__ = ["PROTOCOLS", "evaluation_record", "read_evaluation_record", "write_evaluation_record"]
