"""Schedules checked value by value against the formula, computed by hand with math.cos."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hf_dino.schedules import (
    DinoSchedules,
    cosine_schedule,
    scaled_learning_rate,
    teacher_temperature_schedule,
)


def expected_value(
    step: int, base: float, final: float, total: int, warmup: int, start: float = 0.0
) -> float:
    """dino.md's formula for one step, written independently of the vectorised code."""
    if step < warmup:
        # np.linspace(start, base, W)[i] with both endpoints: W - 1 intervals.
        return start + (base - start) * step / (warmup - 1) if warmup > 1 else start
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


@pytest.mark.parametrize(
    ("epochs", "steps_per_epoch", "warmup_epochs"), [(10, 7, 2), (5, 3, 0), (3, 11, 1), (4, 5, 4)]
)
def test_cosine_schedule_matches_the_formula_at_every_step(
    epochs: int, steps_per_epoch: int, warmup_epochs: int
) -> None:
    base, final, start = 0.004, 1e-6, 1e-5
    schedule = cosine_schedule(base, final, epochs, steps_per_epoch, warmup_epochs, start_warmup_value=start)
    total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    assert schedule.shape == (total,)
    for step in range(total):
        assert schedule[step] == pytest.approx(
            expected_value(step, base, final, total, warmup, start), rel=1e-12
        )


def test_warmup_endpoints_and_cosine_start() -> None:
    schedule = cosine_schedule(0.5, 0.1, epochs=10, steps_per_epoch=4, warmup_epochs=2)
    assert schedule[0] == 0.0
    assert schedule[7] == 0.5  # last warm-up step reaches the base value (linspace endpoint)
    assert schedule[8] == 0.5  # first cosine step is the base value too
    assert schedule[-1] == pytest.approx(0.1 + 0.2 * (1 + math.cos(math.pi * 31 / 32)))
    assert np.all(np.diff(schedule[8:]) < 0)


def test_without_warmup_starts_at_the_base_value() -> None:
    schedule = cosine_schedule(0.996, 1.0, epochs=3, steps_per_epoch=5)
    assert schedule[0] == 0.996
    assert schedule[-1] < 1.0
    assert schedule[7] == pytest.approx(1.0 - 0.002 * (1 + math.cos(math.pi * 7 / 15)))


def test_fractional_warmup_epochs_round_down_to_whole_steps() -> None:
    schedule = cosine_schedule(1.0, 0.0, epochs=2, steps_per_epoch=10, warmup_epochs=0.55)
    assert schedule[4] == 1.0 and schedule[3] == pytest.approx(0.75)  # 5 warm-up steps: 0, .25, .5, .75, 1


def test_bad_schedule_arguments_raise() -> None:
    with pytest.raises(ValueError, match="exceeds the number of epochs"):
        cosine_schedule(1.0, 0.0, epochs=5, steps_per_epoch=10, warmup_epochs=6)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        cosine_schedule(1.0, 0.0, epochs=5, steps_per_epoch=0)
    with pytest.raises(ValueError, match="epochs must be at least 1"):
        cosine_schedule(1.0, 0.0, epochs=0, steps_per_epoch=3)
    with pytest.raises(ValueError, match="must not be negative"):
        cosine_schedule(1.0, 0.0, epochs=3, steps_per_epoch=3, warmup_epochs=-1)
    with pytest.raises(ValueError, match="exceeds the number of epochs"):
        teacher_temperature_schedule(0.04, 0.07, warmup_teacher_temp_epochs=30, epochs=10)


def test_teacher_temperature_schedule() -> None:
    schedule = teacher_temperature_schedule(0.04, 0.07, warmup_teacher_temp_epochs=30, epochs=100)
    assert schedule.shape == (100,)
    for epoch in range(30):
        assert schedule[epoch] == pytest.approx(0.04 + 0.03 * epoch / 29, rel=1e-12)
    assert schedule[29] == pytest.approx(0.07) and np.all(schedule[30:] == 0.07)
    # The official default: no warm-up, 0.04 throughout.
    assert np.all(teacher_temperature_schedule(0.04, 0.04, 0, 5) == 0.04)


def test_dino_schedules_from_the_official_defaults() -> None:
    schedules = DinoSchedules.build(
        lr=0.0005,
        min_lr=1e-6,
        warmup_epochs=10,
        weight_decay=0.04,
        weight_decay_end=0.4,
        momentum_teacher=0.996,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_temp_epochs=30,
        epochs=100,
        steps_per_epoch=20,
        total_batch_size=1024,
    )
    assert schedules.base_learning_rate == pytest.approx(0.002) == scaled_learning_rate(0.0005, 1024)
    assert schedules.total_steps == 2000
    assert schedules.learning_rate.shape == schedules.weight_decay.shape == schedules.teacher_momentum.shape
    assert schedules.teacher_temperature.shape == (100,)

    total, warmup = 2000, 200
    for step in (0, 1, 57, 199, 200, 201, 777, 1500, 1999):
        values = schedules.at(step)
        assert values["lr"] == pytest.approx(expected_value(step, 0.002, 1e-6, total, warmup), rel=1e-12)
        assert values["weight_decay"] == pytest.approx(expected_value(step, 0.04, 0.4, total, 0), rel=1e-12)
        assert values["teacher_momentum"] == pytest.approx(
            expected_value(step, 0.996, 1.0, total, 0), rel=1e-12
        )
        epoch = step // 20
        assert values["teacher_temp"] == pytest.approx(0.04 + 0.03 * min(epoch, 29) / 29, rel=1e-12)
    with pytest.raises(IndexError):
        schedules.at(2000)
