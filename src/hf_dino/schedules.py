"""DINO's schedules as explicit arrays, computed once before training (as the official recipe does).

The learning rate, the weight decay and the teacher momentum change every optimizer step; the teacher
temperature changes every epoch. With `n` steps per epoch, `E` epochs, `T = E * n` steps and
`W = warmup_epochs * n` warm-up steps, the value at global step `i = epoch * n + step_in_epoch` is
`linspace(start, base, W)[i]` for `i < W` (both endpoints included) and
`final + (base - final) * (1 + cos(pi * (i - W) / (T - W))) / 2` after (official schedule).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _check_epochs(epochs: int, warmup_epochs: float, what: str) -> None:
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if warmup_epochs < 0:
        raise ValueError(f"{what} must not be negative, got {warmup_epochs}")
    if warmup_epochs > epochs:
        raise ValueError(
            f"{what} ({warmup_epochs}) exceeds the number of epochs ({epochs}): shorten the warm-up or "
            "train for longer"
        )


def cosine_schedule(
    base_value: float,
    final_value: float,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """A per-step schedule: linear warm-up, then a half cosine from `base_value` to `final_value`.

    Args:
        base_value: the value at the end of the warm-up (at step `W`, the first cosine step).
        final_value: the value the cosine approaches at the last step.
        epochs: E, the number of epochs.
        steps_per_epoch: n, optimizer steps per epoch.
        warmup_epochs: epochs of linear warm-up; `int(warmup_epochs * n)` steps (fractions allowed).
        start_warmup_value: the value at step 0 when there is a warm-up.

    Returns:
        float64 array of shape `(epochs * steps_per_epoch,)`, one value per optimizer step.
    """
    _check_epochs(epochs, warmup_epochs, "warmup_epochs")
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be at least 1, got {steps_per_epoch}")
    total_steps = epochs * steps_per_epoch
    warmup_steps = int(warmup_epochs * steps_per_epoch)
    warmup = np.linspace(start_warmup_value, base_value, warmup_steps)
    cosine_steps = total_steps - warmup_steps
    steps = np.arange(cosine_steps)
    # pi * j / (T - W), multiplied before dividing: the official order, so values agree to the last bit.
    cosine = final_value + 0.5 * (base_value - final_value) * (
        1 + np.cos(np.pi * steps / max(cosine_steps, 1))
    )
    return np.concatenate([warmup, cosine])


def teacher_temperature_schedule(
    warmup_teacher_temp: float, teacher_temp: float, warmup_teacher_temp_epochs: int, epochs: int
) -> np.ndarray:
    """The teacher temperature per epoch: linear from `warmup_teacher_temp` to `teacher_temp`, then flat.

    The paper warms 0.04 -> 0.07 over 30 epochs (§ appendix); the official default keeps 0.04 throughout.
    A teacher temperature above 0.07 early in training tends to collapse the run (official help text).

    Args:
        warmup_teacher_temp: tau_t at epoch 0.
        teacher_temp: tau_t after the warm-up.
        warmup_teacher_temp_epochs: epochs of warm-up (the last warm-up epoch already equals
            `teacher_temp`, as `np.linspace` includes both endpoints).
        epochs: total number of epochs.

    Returns:
        float64 array of shape `(epochs,)`.
    """
    if int(warmup_teacher_temp_epochs) != warmup_teacher_temp_epochs:
        raise ValueError(
            f"warmup_teacher_temp_epochs must be a whole number, got {warmup_teacher_temp_epochs}"
        )
    _check_epochs(epochs, warmup_teacher_temp_epochs, "warmup_teacher_temp_epochs")
    warmup_epochs = int(warmup_teacher_temp_epochs)
    warmup = np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs)
    return np.concatenate([warmup, np.full(epochs - warmup_epochs, teacher_temp, dtype=np.float64)])


def scaled_learning_rate(learning_rate: float, total_batch_size: int) -> float:
    """The linear scaling rule (paper §4.1, official): `lr * total_batch_size / 256`.

    Args:
        learning_rate: the learning rate for a batch of 256 images.
        total_batch_size: images per optimizer step over all processes and accumulation steps.
    """
    if total_batch_size < 1:
        raise ValueError(f"total_batch_size must be at least 1, got {total_batch_size}")
    return learning_rate * total_batch_size / 256.0


@dataclass(frozen=True)
class DinoSchedules:
    """Every schedule of a DINO run; index the per-step arrays with the global optimizer step.

    Attributes:
        learning_rate: `(total_steps,)` learning rate per step (linear scaling rule already applied).
        weight_decay: `(total_steps,)` weight decay per step.
        teacher_momentum: `(total_steps,)` EMA momentum of the teacher per step.
        teacher_temperature: `(epochs,)` teacher temperature per epoch.
        steps_per_epoch: optimizer steps per epoch.
        base_learning_rate: the peak learning rate, `lr * total_batch_size / 256`.
    """

    learning_rate: np.ndarray
    weight_decay: np.ndarray
    teacher_momentum: np.ndarray
    teacher_temperature: np.ndarray
    steps_per_epoch: int
    base_learning_rate: float

    @classmethod
    def build(
        cls,
        *,
        lr: float,
        min_lr: float,
        warmup_epochs: float,
        weight_decay: float,
        weight_decay_end: float,
        momentum_teacher: float,
        warmup_teacher_temp: float,
        teacher_temp: float,
        warmup_teacher_temp_epochs: int,
        epochs: int,
        steps_per_epoch: int,
        total_batch_size: int,
    ) -> DinoSchedules:
        """Build the schedules from the recipe's options (named as in the official `main_dino.py`).

        Args:
            lr: learning rate for a total batch of 256 (official default 0.0005).
            min_lr: learning rate at the end of the cosine (official default 1e-6).
            warmup_epochs: epochs of linear learning-rate warm-up from 0 (official default 10).
            weight_decay / weight_decay_end: cosine from the one to the other (official 0.04 -> 0.4).
            momentum_teacher: teacher EMA momentum at step 0, cosine to 1 (official default 0.996).
            warmup_teacher_temp / teacher_temp / warmup_teacher_temp_epochs: see
                `teacher_temperature_schedule`.
            epochs: total epochs.
            steps_per_epoch: optimizer steps per epoch.
            total_batch_size: images per optimizer step, all processes and accumulation steps together.
        """
        base_learning_rate = scaled_learning_rate(lr, total_batch_size)
        return cls(
            learning_rate=cosine_schedule(
                base_learning_rate, min_lr, epochs, steps_per_epoch, warmup_epochs=warmup_epochs
            ),
            weight_decay=cosine_schedule(weight_decay, weight_decay_end, epochs, steps_per_epoch),
            teacher_momentum=cosine_schedule(momentum_teacher, 1.0, epochs, steps_per_epoch),
            teacher_temperature=teacher_temperature_schedule(
                warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, epochs
            ),
            steps_per_epoch=steps_per_epoch,
            base_learning_rate=base_learning_rate,
        )

    @property
    def total_steps(self) -> int:
        return len(self.learning_rate)

    def at(self, step: int) -> dict[str, float]:
        """All values for one global optimizer step (the temperature of the step's epoch).

        Returns:
            `{"lr", "weight_decay", "teacher_momentum", "teacher_temp"}` as Python floats.
        """
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} is outside the schedule's {self.total_steps} steps")
        epoch = step // self.steps_per_epoch
        return {
            "lr": float(self.learning_rate[step]),
            "weight_decay": float(self.weight_decay[step]),
            "teacher_momentum": float(self.teacher_momentum[step]),
            "teacher_temp": float(self.teacher_temperature[epoch]),
        }


__all__ = [
    "DinoSchedules",
    "cosine_schedule",
    "scaled_learning_rate",
    "teacher_temperature_schedule",
]
