"""Exact resume: a CPU run killed with SIGKILL and resumed equals an uninterrupted run, step for step.

The training runs in child processes (this file run as a script), through the real augmentation pipeline
(seeded multi-crop views, photometric stage on the device) with stochastic depth on, so that the data
position, the augmentation seeds and the RNG states all have to be restored for the numbers to match.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve()


def child_arguments(output_dir: str, resume: bool):
    from hf_dino.training import DinoTrainingArguments

    return DinoTrainingArguments(
        arch="vit_tiny",
        patch_size=4,
        out_dim=16,
        drop_path_rate=0.2,
        model_config={
            "image_size": 8,
            "num_channels": 1,
            "hidden_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "hidden_dim": 32,
            "bottleneck_dim": 8,
        },
        global_crop_size=8,
        local_crop_size=4,
        local_crops_number=2,
        batch_size=4,
        epochs=3,
        warmup_epochs=1,
        momentum_teacher=0.9,
        lr=0.01,
        output_dir=output_dir,
        report_to="none",
        num_workers=0,
        logging_steps=1,
        save_steps=3,
        save_total_limit=2,
        mixed_precision="no",
        photometric_on="accelerator",
        resume="auto" if resume else None,
    )


def synthetic_images(count: int = 20):
    """Deterministic small grayscale PIL images (no files, no network)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(1234)
    pixels = torch.randint(0, 256, (count, 12, 12), generator=generator, dtype=torch.uint8)
    return [Image.fromarray(image.numpy(), mode="L") for image in pixels]


def child_main(output_dir: str, resume: bool, seconds_per_step: float) -> None:
    torch.set_num_threads(1)
    from hf_dino.training.trainer import DinoTrainer

    if seconds_per_step > 0:  # slow the run down so that the parent can kill it between two checkpoints
        original_step = DinoTrainer._training_step

        def slow_step(self, batches):
            record = original_step(self, batches)
            time.sleep(seconds_per_step)
            return record

        DinoTrainer._training_step = slow_step
    trainer = DinoTrainer(child_arguments(output_dir, resume), train_images=synthetic_images())
    trainer.setup()
    trainer.train()


def run_child(output_dir: Path, *, resume: bool = False, seconds_per_step: float = 0.0, wait: bool = True):
    command = [sys.executable, str(HERE), str(output_dir), "1" if resume else "0", str(seconds_per_step)]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(
        command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if not wait:
        return process
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    return output


def losses(output_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [record["step"] for record in records if "loss" in record]
    assert steps == sorted(set(steps)), f"duplicated or unordered steps: {steps}"
    return {record["step"]: record["loss"] for record in records if "loss" in record}


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    reference_dir = tmp_path / "reference"
    run_child(reference_dir)

    interrupted_dir = tmp_path / "interrupted"
    process = run_child(interrupted_dir, seconds_per_step=0.4, wait=False)
    latest = interrupted_dir / "checkpoints" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if latest.is_file() and latest.read_text().strip() >= "step-00000006":
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed:\n" + process.stdout.read()
    time.sleep(0.5)  # let it run into the next steps (and write their metrics) before killing it
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = losses(interrupted_dir)
    assert max(killed_at) < 15, "the run was killed after it finished"

    run_child(interrupted_dir, resume=True)
    reference, resumed = losses(reference_dir), losses(interrupted_dir)
    assert sorted(resumed) == list(range(1, 16))
    assert resumed == reference  # exactly equal floats, every step

    for part in ("model.safetensors", "dino_center.safetensors"):
        expected = load_file(str(reference_dir / "teacher" / part))
        actual = load_file(str(interrupted_dir / "teacher" / part))
        assert expected.keys() == actual.keys()
        for name in expected:
            assert torch.equal(expected[name], actual[name]), name
    student_expected = load_file(
        str(reference_dir / "checkpoints" / "step-00000015" / "student" / "model.safetensors")
    )
    student_actual = load_file(
        str(interrupted_dir / "checkpoints" / "step-00000015" / "student" / "model.safetensors")
    )
    assert all(torch.equal(student_expected[name], student_actual[name]) for name in student_expected)


@pytest.mark.parametrize("resume_value", ["auto", "checkpoint-folder"])
def test_resume_values(tmp_path, resume_value):
    from hf_dino.training import checkpointing

    assert checkpointing.resolve_resume_source("auto", tmp_path) is None  # nothing yet: a fresh start
    folder = tmp_path / "checkpoints" / "step-00000003"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text("{}")
    value = "auto" if resume_value == "auto" else str(folder)
    assert checkpointing.resolve_resume_source(value, tmp_path) == folder
    assert checkpointing.resolve_resume_source(str(tmp_path), tmp_path / "elsewhere") == folder
    with pytest.raises(FileNotFoundError):
        checkpointing.resolve_resume_source("./missing/folder", tmp_path)


if __name__ == "__main__":
    child_main(sys.argv[1], sys.argv[2] == "1", float(sys.argv[3]))
