"""What a DINO run reports: per-step metrics, collapse statistics, and the guards that stop a broken run.

Every optimizer step leaves one line in `OUTPUT_DIR/metrics.jsonl`, but the values stay on the device
until a logging step: the step's numbers are stacked into one small tensor, and every `logging_steps`
steps all of them come to the host in a single transfer (one host-device synchronisation per logging
step, none in between).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# Device-side values recorded per step, in this order (see `collapse_statistics_on_device`).
DEVICE_METRICS = (
    "loss",
    "teacher_entropy",
    "teacher_batch_entropy",
    "kl_teacher_student",
    "center_norm",
    "dimensions_in_use",
)


class NonFiniteLossError(RuntimeError):
    """Raised when the loss becomes NaN or infinite; the last checkpoint on disk is left untouched."""


@torch.no_grad()
def collapse_statistics_on_device(
    *, loss: torch.Tensor, teacher_output: torch.Tensor, center: torch.Tensor, teacher_temp: float
) -> torch.Tensor:
    """The loss and the collapse statistics of one step, as one float32 tensor that stays on the device.

    Same meaning as `hf_dino.loss.collapse_statistics`, computed without any host synchronisation (no
    `.item()`, no `torch.unique`). KL(teacher || student) averaged over the loss's view pairs equals the
    loss minus the teacher entropy, because every teacher view enters the same number of pairs.

    Args:
        loss: the step's loss (0-dim).
        teacher_output: `(2 * batch, out_dim)` teacher logits of the step (every micro-batch).
        center: `(1, out_dim)` the center the loss used (before this step's update).
        teacher_temp: tau_t of the step.

    Returns:
        `(len(DEVICE_METRICS),)` float32 tensor in the order of `DEVICE_METRICS`.
    """
    with torch.autocast(device_type=teacher_output.device.type, enabled=False):
        centred = (teacher_output.float() - center.float()) / teacher_temp
        log_probs = F.log_softmax(centred, dim=-1)
        probs = log_probs.exp()
        teacher_entropy = -(probs * log_probs).sum(dim=-1).mean()
        mean_probs = probs.mean(dim=0)
        batch_entropy = -torch.special.xlogy(mean_probs, mean_probs).sum()
        used = torch.zeros(centred.shape[-1], dtype=torch.bool, device=centred.device)
        used.index_fill_(0, centred.argmax(dim=-1), True)
        loss = loss.detach().float()
        return torch.stack(
            [
                loss,
                teacher_entropy,
                batch_entropy,
                loss - teacher_entropy,
                center.float().norm(),
                used.sum().float(),
            ]
        )


@dataclass
class CollapseGuard:
    """Warn when the teacher output sits at one of the two collapses the paper describes (§5.3, Fig. 7).

    Uniform collapse: the teacher's entropy reaches ln K (too little sharpening; the loss sits at ln K).
    One-dimension collapse: the batch-averaged teacher distribution has entropy near 0 (one output
    dimension wins for every image; too little centring).
    """

    log_out_dim: float
    patience: int
    uniform_fraction: float = 0.97
    one_dimension_entropy: float = 0.1
    _uniform_steps: int = 0
    _one_dimension_steps: int = 0
    _warned: bool = False

    def check(self, record: dict[str, Any]) -> str | None:
        """Update with one step's record; return a warning message when a collapse has lasted `patience` steps."""
        if record["teacher_entropy"] >= self.uniform_fraction * self.log_out_dim:
            self._uniform_steps += 1
        else:
            self._uniform_steps = 0
        if record["teacher_batch_entropy"] <= self.one_dimension_entropy:
            self._one_dimension_steps += 1
        else:
            self._one_dimension_steps = 0
        message = None
        if self._uniform_steps == self.patience:
            message = (
                f"step {record['step']}: the teacher output has been uniform for {self.patience} steps "
                f"(entropy {record['teacher_entropy']:.3f} ~ ln K = {self.log_out_dim:.3f}, loss "
                f"{record['loss']:.3f}): collapse. Lower --teacher-temp / --warmup-teacher-temp, raise "
                "--momentum-teacher, lower --lr, or use a smaller --out-dim."
            )
        elif self._one_dimension_steps == self.patience:
            message = (
                f"step {record['step']}: one output dimension has dominated for {self.patience} steps "
                f"(batch entropy {record['teacher_batch_entropy']:.3f}, "
                f"{int(record['dimensions_in_use'])} dimensions in use): collapse. Check the centering "
                "(--center-momentum), lower --lr, or raise --teacher-temp slightly."
            )
        return message


class MetricsRecorder:
    """Buffers each step's metrics (host scalars + one device tensor) and writes them at logging steps.

    Args:
        path: `OUTPUT_DIR/metrics.jsonl` (appended to; None writes nothing, e.g. on non-main processes).
        log_out_dim: ln K, for the collapse guard.
        collapse_patience: steps at a collapse before warning.
    """

    def __init__(self, path: Path | None, *, log_out_dim: float, collapse_patience: int) -> None:
        self.path = path
        self.log_out_dim = log_out_dim
        self._host_values: list[dict[str, Any]] = []
        self._device_values: list[torch.Tensor] = []
        self.guard = CollapseGuard(log_out_dim=log_out_dim, patience=collapse_patience)
        self.last_record: dict[str, Any] | None = None

    def record(self, host_values: dict[str, Any], device_values: torch.Tensor) -> None:
        """Remember one optimizer step (no synchronisation)."""
        self._host_values.append(host_values)
        self._device_values.append(device_values.detach())

    @property
    def pending(self) -> int:
        return len(self._host_values)

    def flush(self) -> list[dict[str, Any]]:
        """Bring the buffered steps to the host (one transfer), write them, run the guards.

        Returns:
            The flushed records, oldest first.

        Raises:
            NonFiniteLossError: when a buffered step has a NaN or infinite loss (after writing the records
                up to it, so the log shows where it happened).
        """
        if not self._host_values:
            return []
        values = torch.stack(self._device_values).cpu().tolist()  # the one host sync of a logging step
        records = []
        for host, device in zip(self._host_values, values):
            record = dict(host)
            record.update({name: value for name, value in zip(DEVICE_METRICS, device)})
            record["dimensions_in_use"] = int(record["dimensions_in_use"])
            record["log_out_dim"] = self.log_out_dim
            records.append(record)
        self._host_values.clear()
        self._device_values.clear()
        bad = next((record for record in records if not math.isfinite(record["loss"])), None)
        if bad is not None:
            records = records[: records.index(bad) + 1]
        if self.path is not None:
            with open(self.path, "a") as handle:
                for record in records:
                    handle.write(json.dumps(record) + "\n")
        if bad is not None:
            raise NonFiniteLossError(
                f"the loss became {bad['loss']} at step {bad['step']} (epoch {bad['epoch']}); training stopped "
                "and the last checkpoint was left as it was. Common causes: fp16 overflow (use "
                "--mixed-precision bf16 or keep --clip-grad 3.0), a learning rate too high for the batch "
                "(lower --lr or lengthen --warmup-epochs), or corrupt inputs. Resume from the last checkpoint "
                "with --resume auto after changing the recipe."
            )
        for record in records:
            message = self.guard.check(record)
            if message:
                logger.warning(message)
        self.last_record = records[-1]
        return records


def make_json_safe(value: Any) -> Any:
    """Tuples to lists and non-finite floats to strings, for json.dump."""
    if isinstance(value, dict):
        return {str(key): make_json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [make_json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
