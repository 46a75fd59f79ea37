"""Two CPU processes (gloo, started with torchrun) train exactly like one process on the combined batch.

Each process takes its half of every step's images (see `hf_dino.training.data_pipeline`); DDP averages the
gradients and the DINO center is all-reduced, so after a few steps the center, the teacher and the student
must equal those of a single process whose batch is both halves together.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))


def arguments_for(output_dir: str, batch_size: int):
    from test_training import tiny_arguments

    # SGD: see test_gradient_accumulation_equals_one_full_batch (AdamW would amplify float rounding).
    return tiny_arguments(
        Path(output_dir),
        batch_size=batch_size,
        epochs=2,
        warmup_epochs=0,
        optimizer="sgd",
        lr=2.0,
        save_steps=100,
    )


def child_main(output_dir: str) -> None:
    torch.set_num_threads(1)
    from hf_dino.training.trainer import DinoTrainer
    from test_training import fixed_crops

    trainer = DinoTrainer(
        arguments_for(output_dir, 4), train_dataset=fixed_crops(), accelerator_kwargs={"cpu": True}
    )
    trainer.setup()
    assert trainer.accelerator.num_processes == 2
    trainer.train()


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def test_two_processes_equal_one_process_on_the_combined_batch(tmp_path):
    two_dir = tmp_path / "two_processes"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--nnodes",
        "1",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(HERE),
        str(two_dir),
    ]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environment.pop(name, None)
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    from hf_dino.training.trainer import DinoTrainer
    from test_training import fixed_crops

    torch.set_num_threads(1)
    one = DinoTrainer(arguments_for(str(tmp_path / "one_process"), 8), train_dataset=fixed_crops())
    one.setup()
    one.train()
    assert one.step == 8

    center = load_file(str(two_dir / "teacher" / "dino_center.safetensors"))["center"]
    torch.testing.assert_close(center, one.loss_fn.center, rtol=1e-5, atol=1e-6)
    assert center.abs().sum() > 0
    teacher = load_file(str(two_dir / "teacher" / "model.safetensors"))
    expected_teacher = one.unwrapped_teacher.model.state_dict()
    for name, value in teacher.items():
        torch.testing.assert_close(value, expected_teacher[name], rtol=1e-4, atol=1e-5, msg=name)
    student = load_file(str(two_dir / "checkpoints" / "step-00000008" / "student" / "model.safetensors"))
    expected_student = one.unwrapped_student.model.state_dict()
    for name, value in student.items():
        torch.testing.assert_close(value, expected_student[name], rtol=1e-4, atol=1e-5, msg=name)


if __name__ == "__main__":
    child_main(sys.argv[1])
