"""Two CPU processes (gloo, started with torchrun) train exactly like one process on the combined batch,
whether they run on one node or as a 2-node job.

Each process takes its half of every step's images (see `hf_dino.training.data_pipeline`); DDP averages the
gradients and the DINO center is all-reduced, so after a few steps the center, the teacher and the student
must equal those of a single process whose batch is both halves together.

The same holds under FSDP2 with gradient accumulation, where student and teacher are sharded across the two
processes: the EMA runs on local shards, per-parameter clipping needs whole-tensor norms, the online k-NN
gathers the teacher, and a run resumed from a sharded checkpoint must continue exactly. accelerate turns FSDP on only for GPU-like backends,
so the FSDP child, started by `accelerate launch` with the shipped `scripts/accelerate_fsdp.yaml`, switches it
on over gloo (`_fsdp_over_gloo`); everything after that is the real code path.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))


def arguments_for(output_dir: str, batch_size: int, **overrides):
    from test_training import tiny_arguments

    # SGD: see test_gradient_accumulation_equals_one_full_batch (AdamW would amplify float rounding).
    values = dict(
        batch_size=batch_size,
        epochs=2,
        warmup_epochs=0,
        optimizer="sgd",
        lr=2.0,
        save_steps=100,
    )
    values.update(overrides)
    return tiny_arguments(Path(output_dir), **values)


# The FSDP runs: a clipping threshold that the gradients exceed, a checkpoint halfway, an online k-NN, and packed
# crops (the sharded blocks called with packed sequences; tests/test_training.py checks that packed crops train
# like one pass per resolution, so the chain reaches the unpacked one-process run).
FSDP_OVERRIDES = dict(clip_grad=0.3, save_steps=4, eval_steps=4, knn_k=5, pack_crops=True)


def evaluation_data():
    from hf_dino.training.online_evaluation import EvaluationData

    generator = torch.Generator().manual_seed(1)
    patterns = torch.randn(3, 1, 8, 8, generator=generator)

    def images(count: int) -> tuple[torch.Tensor, torch.Tensor]:  # a pattern per class, under heavy noise
        labels = torch.arange(count) % 3
        return patterns[labels] + 2.0 * torch.randn(count, 1, 8, 8, generator=generator), labels

    (train_pixels, train_labels), (test_pixels, test_labels) = images(24), images(30)
    return EvaluationData(train_pixels, train_labels, test_pixels, test_labels, {"dataset": "noisy patterns"})


def _fsdp_over_gloo() -> None:
    """Make accelerate choose FSDP2 in a gloo (CPU) process group, as it would under NCCL.

    The plugin is read from the environment that `accelerate launch --config_file scripts/accelerate_fsdp.yaml`
    sets, as accelerate does on GPUs."""
    import accelerate.state
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    assert os.environ.get("ACCELERATE_USE_FSDP") == "true", "start the FSDP child with accelerate launch"
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    original_init = accelerate.state.AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = plugin

    accelerate.state.AcceleratorState.__init__ = init


def child_main(output_dir: str, mode: str, resume: str | None = None) -> None:
    torch.set_num_threads(1)
    from hf_dino.training.trainer import DinoTrainer
    from test_training import fixed_crops

    if mode == "fsdp":
        _fsdp_over_gloo()
        # 2 micro-batches of 2 images per process and step: gradient accumulation under FSDP as well
        arguments = arguments_for(
            output_dir, 2, gradient_accumulation_steps=2, resume=resume, **FSDP_OVERRIDES
        )
        data = evaluation_data()
    else:
        arguments, data = arguments_for(output_dir, 4), None
    trainer = DinoTrainer(
        arguments, train_dataset=fixed_crops(), evaluation_data=data, accelerator_kwargs={"cpu": True}
    )
    trainer.setup()
    assert trainer.accelerator.num_processes == 2
    assert trainer.is_fsdp == (mode == "fsdp")
    trainer.train()


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def launcher_command(port: int, *arguments: str, node_rank: int | None = None) -> list[str]:
    """torchrun: 2 processes on one node, or (with `node_rank`) this node's 1 process of a 2-node job."""
    nodes = ["--nproc_per_node", "2", "--nnodes", "1"]
    if node_rank is not None:
        nodes = ["--nproc_per_node", "1", "--nnodes", "2", "--node_rank", str(node_rank)]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *nodes,
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        str(HERE),
        *arguments,
    ]


def launcher_environment() -> dict[str, str]:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environment.pop(name, None)
    return environment


FSDP_CONFIG = HERE.parent.parent / "scripts" / "accelerate_fsdp.yaml"


def launch_two_processes(*arguments: str, accelerate_config: Path | None = None) -> None:
    command = launcher_command(free_port(), *arguments)
    if accelerate_config is not None:  # accelerate launch with the config file, 2 processes, full precision
        command = [
            *(sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config)),
            *("--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port())),
            *(str(HERE), *arguments),
        ]
    result = subprocess.run(command, env=launcher_environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def one_process_run(output_dir: Path, **overrides):
    from hf_dino.training.trainer import DinoTrainer
    from test_training import fixed_crops

    torch.set_num_threads(1)
    data = evaluation_data() if overrides.get("eval_steps") else None
    one = DinoTrainer(
        arguments_for(str(output_dir), 8, **overrides), train_dataset=fixed_crops(), evaluation_data=data
    )
    one.setup()
    one.train()
    assert one.step == 8
    return one


def assert_same_weights(saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert saved.keys() == expected.keys()
    for name, value in saved.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-5, msg=name)


def assert_run_equals(run_dir: Path, one) -> None:
    center = load_file(str(run_dir / "teacher" / "dino_center.safetensors"))["center"]
    torch.testing.assert_close(center, one.loss_fn.center, rtol=1e-5, atol=1e-6)
    assert center.abs().sum() > 0
    assert_same_weights(
        load_file(str(run_dir / "teacher" / "model.safetensors")), one.unwrapped_teacher.model.state_dict()
    )
    student = load_file(str(run_dir / "checkpoints" / "step-00000008" / "student" / "model.safetensors"))
    assert_same_weights(student, one.unwrapped_student.model.state_dict())


def test_two_processes_equal_one_process_on_the_combined_batch(tmp_path):
    two_dir = tmp_path / "two_processes"
    launch_two_processes(str(two_dir), "ddp")
    assert_run_equals(two_dir, one_process_run(tmp_path / "one_process"))


def test_two_nodes_equal_one_process_on_the_combined_batch(tmp_path):
    """Two launcher agents, one process each, meeting at the first node's address: a 2-node job (what
    `accelerate launch --num_machines 2 --machine_rank R --main_process_ip ...` starts on GPU nodes), here
    on one machine. Each node has a local rank 0; only the global rank 0 writes the shared output folder."""
    run_dir = tmp_path / "two_nodes"
    port = free_port()
    nodes = [
        subprocess.Popen(
            launcher_command(port, str(run_dir), "ddp", node_rank=rank),
            env=launcher_environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    for node in nodes:
        output, _ = node.communicate(timeout=300)
        assert node.returncode == 0, output[-5000:]
    assert_run_equals(run_dir, one_process_run(tmp_path / "one_process"))


def test_fsdp_two_processes_equal_one_process_and_resume_exactly(tmp_path):
    fsdp_dir = tmp_path / "fsdp"
    launch_two_processes(str(fsdp_dir), "fsdp", accelerate_config=FSDP_CONFIG)
    one = one_process_run(tmp_path / "one_process", **FSDP_OVERRIDES)
    assert_run_equals(fsdp_dir, one)
    # The clipping threshold bites: without it the same run ends elsewhere.
    unclipped = one_process_run(tmp_path / "unclipped", **{**FSDP_OVERRIDES, "clip_grad": 0.0})
    assert not torch.allclose(unclipped.loss_fn.center, one.loss_fn.center, rtol=1e-3, atol=1e-5)

    # The online k-NN ran on the gathered teacher, with the one-process run's results.
    def knn_records(run_dir: Path) -> list[dict]:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [record["knn"] for record in map(json.loads, lines) if "knn" in record]

    records, expected = knn_records(fsdp_dir), knn_records(tmp_path / "one_process")
    assert len(records) == len(expected) == 4  # raw pixels, random init, step 4 and the end
    for record, expected_record in zip(records, expected, strict=True):
        assert record == pytest.approx(expected_record)
    assert len({record["top1"] for record in records}) > 1  # the runs differ: an informative comparison

    # Resumed from the halfway checkpoint (sharded optimizer state, full teacher weights), in a new folder.
    resumed_dir = tmp_path / "fsdp_resumed"
    halfway = fsdp_dir / "checkpoints" / "step-00000004"
    launch_two_processes(str(resumed_dir), "fsdp", str(halfway), accelerate_config=FSDP_CONFIG)
    assert_run_equals(resumed_dir, one)


if __name__ == "__main__":
    child_main(*sys.argv[1:])
