"""Activation memory of the DINO forward pass: the bytes autograd keeps for the backward, per image.

The training step's peak memory on an accelerator is the static state (weights, gradients, optimizer) plus what
the forward pass saves for the backward; the second dominates for ViTs at 64 images per device. This script
counts that second part exactly, on any device, CPU included: every tensor autograd saves during the teacher and
student forwards and the loss is recorded through `torch.autograd.graph.saved_tensors_hooks`, and the distinct
storages that are not parameters or buffers are summed. Autocast's half-precision copies of the weights count
(they live until the backward), the weights themselves do not.

    python scripts/benchmark_activations.py --model vit_small_patch16 --local-crops 10
    python scripts/benchmark_activations.py --json benchmarks/activations_vit_small_10.json

Part of the saved bytes does not grow with the batch (half-precision copies of the weights, the head's
normalised last layer), so the forward is measured at two batch sizes, the bytes split into a fixed part and a
per-image part, and the ratio given at `--target-batch-size` (64 images, the performance issue's setting).

It compares the baseline written the original's way (`scripts/dino_baseline.py`: fused qkv, eager attention,
one forward per resolution) with hf_dino's `DinoModel` forward as the training loop runs it, both under the same
half-precision autocast (bf16 here; the original's fp16 has the same sizes).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dino_baseline  # noqa: E402

from hf_dino import DinoConfig, DinoModel  # noqa: E402
from hf_dino.loss import DinoLoss  # noqa: E402


def saved_activation_bytes(run: Callable[[], torch.Tensor], state: Iterable[torch.Tensor]) -> dict[str, int]:
    """Bytes of the distinct non-state storages autograd saves while `run()` builds its graph.

    Returns:
        `{"bytes": total, "tensors": how many saved tensors were seen, "storages": distinct storages counted}`.
    """
    state_storages = {tensor.untyped_storage().data_ptr() for tensor in state}
    storages: dict[int, int] = {}
    seen = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal seen
        seen += 1
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in state_storages:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = run()
    del output  # frees the graph
    return {"bytes": sum(storages.values()), "tensors": seen, "storages": len(storages)}


def measure(arguments: argparse.Namespace, batch_size: int) -> dict:
    device = torch.device(arguments.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[arguments.precision]
    torch.manual_seed(0)
    config = DinoConfig.from_preset(arguments.model)
    with torch.device(device):
        source = DinoModel(config).train()
    crop_sizes = [arguments.global_size] * 2 + [arguments.local_size] * arguments.local_crops
    generator = torch.Generator().manual_seed(0)
    crops = [torch.randn(batch_size, 3, size, size, generator=generator).to(device) for size in crop_sizes]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    baseline = dino_baseline.BaselineTrainer(source, num_crops=len(crop_sizes), use_fp16=False)

    def baseline_forward() -> torch.Tensor:
        with autocast:
            teacher_output = baseline.teacher(crops[:2])
            student_output = baseline.student(crops)
            return baseline.loss_fn(student_output, teacher_output, 0.04)

    student = DinoModel(config).to(device).train()
    student.load_state_dict(source.state_dict())
    teacher = DinoModel(config).to(device).train().requires_grad_(False)
    teacher.load_state_dict(source.state_dict())
    loss_fn = DinoLoss(config.out_dim).to(device)

    def hf_dino_forward() -> torch.Tensor:
        with autocast:
            with torch.no_grad():
                teacher_output = teacher.forward_with_head(crops[:2])
            student_output = student.forward_with_head(crops)
            return loss_fn.compute(
                student_output=student_output, teacher_output=teacher_output, teacher_temp=0.04
            )

    def state_of(*modules: torch.nn.Module) -> list[torch.Tensor]:
        return [tensor for module in modules for tensor in (*module.parameters(), *module.buffers())]

    def recomputing(gelu: bool, norms: bool) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            for block in student.backbone.layers:
                block.recompute_gelu, block.recompute_norms = gelu, norms
            return hf_dino_forward()

        return run

    results = {}
    for name, run, modules in (
        ("baseline", baseline_forward, (baseline.student, baseline.teacher, baseline.loss_fn)),
        # hf_dino's default, then with its recomputation levers switched off one after the other
        ("hf_dino", recomputing(gelu=True, norms=True), (student, teacher, loss_fn)),
        ("hf_dino, norms kept", recomputing(gelu=True, norms=False), (student, teacher, loss_fn)),
        ("hf_dino, nothing recomputed", recomputing(gelu=False, norms=False), (student, teacher, loss_fn)),
    ):
        results[name] = saved_activation_bytes(run, state_of(*modules))
    return results


def fixed_and_per_image(small: dict, large: dict, small_batch: int, large_batch: int) -> dict[str, float]:
    """Split the saved bytes into a part independent of the batch and a part per image (a line through two
    batch sizes)."""
    per_image = (large["bytes"] - small["bytes"]) / (large_batch - small_batch)
    return {"fixed_bytes": small["bytes"] - per_image * small_batch, "bytes_per_image": per_image}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="vit_small_patch16", help="DinoConfig preset (default vit_small_patch16)"
    )
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--local-crops", type=int, default=10)
    parser.add_argument(
        "--batch-sizes", default="2,6", help="the two batch sizes measured (default 2,6; comma-separated)"
    )
    parser.add_argument("--target-batch-size", type=int, default=64, help="the batch the ratio is given at")
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write the figures to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    small_batch, large_batch = (int(value) for value in arguments.batch_sizes.split(","))
    small, large = measure(arguments, small_batch), measure(arguments, large_batch)
    crops = f"2x{arguments.global_size} + {arguments.local_crops}x{arguments.local_size}"
    results = {
        "settings": {
            "model": arguments.model,
            "crops": crops,
            "batch_sizes": [small_batch, large_batch],
            "target_batch_size": arguments.target_batch_size,
            "precision": arguments.precision,
            "device": arguments.device,
            "torch": torch.__version__,
        },
        "variants": {},
    }
    target = arguments.target_batch_size
    for name in small:
        figures = fixed_and_per_image(small[name], large[name], small_batch, large_batch)
        figures["bytes_at_target_batch"] = figures["fixed_bytes"] + target * figures["bytes_per_image"]
        figures["measured"] = {str(small_batch): small[name], str(large_batch): large[name]}
        results["variants"][name] = figures
    base = results["variants"]["baseline"]["bytes_at_target_batch"]
    print(f"{arguments.model} {crops}, {arguments.precision} autocast, saved for the backward:")
    for name, figures in results["variants"].items():
        figures["x_baseline_at_target_batch"] = figures["bytes_at_target_batch"] / base
        print(
            f"  {name:28s} {figures['bytes_per_image'] / 2**20:7.1f} MiB per image + "
            f"{figures['fixed_bytes'] / 2**20:6.1f} MiB fixed; at {target} images "
            f"{figures['bytes_at_target_batch'] / 2**30:6.2f} GiB = {figures['x_baseline_at_target_batch']:.2f}x "
            "the baseline"
        )
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
