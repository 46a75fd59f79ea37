"""Benchmark one DINO training step: the original's habits against hf_dino's fast path, side by side.

    python scripts/benchmark_step.py --model vit_small_patch16 --local-crops 10 --batch-size 64 \
        --device cuda --json benchmarks/step_vit_small_10.json
    python scripts/benchmark_step.py --model vit_tiny_patch16 --batch-size 4 --device cpu      # CPU target
    python scripts/benchmark_step.py --check --device cpu                                      # equivalence

Every variant runs in this one process on the same synthetic batch, in interleaved rounds (baseline, fast,
baseline, fast, ...), so that every ratio compares the same machine at the same moment. After warm-up it
measures training images/s, MFU (analytic FLOPs, cross-checked with `torch.utils.flop_counter`), peak
accelerator memory, host-device synchronisations per non-logging step and compiled graphs / recompilations.
With `--profile VARIANTS`, also where each listed variant's step time goes (device kernels by category).

Variants:
  baseline            scripts/dino_baseline.py: the original's step (eager attention, fp16 + GradScaler on CUDA,
                      22 log-softmaxes, per-tensor clipping with host syncs, Python-loop EMA, for-loop AdamW).
  trainer             hf_dino's own loop step (`DinoTrainer._training_step`, accelerate, bf16 on CUDA).
  trainer-compile     the same with `--torch-compile MODE` (the --compile-mode of this script); trainer-packed:
                      with `--pack-crops`; -no-recompute: with `--recompute-activations false`.
  fast                the same step built from hf_dino's public pieces (DinoModel.forward_with_head with SDPA,
                      DinoLoss, foreach clipping and EMA, fused AdamW, on-device metrics; bf16 on CUDA).
  fast-compile        fast + torch.compile of the forward passes and the loss.
  fast-bf16           fast with bf16 autocast forced (the lever on CPUs with bf16 units).
  fast-packed         fast with the student's crops of both resolutions in one backbone pass over packed tokens
                      (`forward_with_head(..., pack=True)`); fast-packed-compile: the same compiled.
  fast-no-<lever>     fast with one lever switched off: sdpa, fused-loss, foreach, fused-adamw, bf16, recompute
                      (the GELU and layer-norm outputs kept for the backward instead of recomputed). The parts
                      compose: fast-packed-compile-no-recompute, trainer-packed-compile, ...
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import dino_baseline  # noqa: E402 - the baseline lives next to this script, outside the package
from dino_baseline import BaselineTrainer, StepSchedule  # noqa: E402

from hf_dino import DinoConfig, DinoModel  # noqa: E402
from hf_dino.loss import DinoLoss  # noqa: E402
from hf_dino.training.monitoring import collapse_statistics_on_device  # noqa: E402
from hf_dino.training.optimization import (  # noqa: E402
    apply_schedule,
    build_optimizer,
    cancel_last_layer_gradients,
    clip_gradients_per_parameter,
    matching_parameters,
    parameter_groups,
    update_teacher,
)

# The paper's student drop path for ViT-S (official default 0.1); the teacher has none.
STUDENT_DROP_PATH = 0.1
# Nominal dense bf16 rate of one H100/H200 SXM (datasheet); MFU is also given against the measured matmul rate.
NOMINAL_PEAK_FLOPS = {"H100": 989.4e12, "H200": 989.4e12}


# ---------------------------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------------------------
def vit_forward_flops(config: DinoConfig, height: int, width: int) -> float:
    """Analytic forward FLOPs of the ViT backbone for one image (multiply-add = 2 FLOPs).

    Per block with N tokens (CLS included) and width D: qkv 6ND^2, scores and weighted sum 4N^2D,
    output projection 2ND^2, MLP 4ND*hidden; plus the patch embedding. Norms, softmax and GELU are left out
    (under 1%).
    """
    vit = config.backbone_config
    patch = config.patch_size
    dim, hidden = vit.hidden_size, vit.intermediate_size
    num_patches = (height // patch) * (width // patch)
    tokens = num_patches + 1
    per_block = 6 * tokens * dim**2 + 4 * tokens**2 * dim + 2 * tokens * dim**2 + 4 * tokens * dim * hidden
    patch_embedding = 2 * num_patches * vit.num_channels * patch * patch * dim
    return float(vit.num_hidden_layers * per_block + patch_embedding)


def head_flops(config: DinoConfig) -> float:
    """Forward FLOPs of the projection head for one crop (3 linear layers + the last layer)."""
    widths = [config.embed_dim, config.hidden_dim, config.hidden_dim, config.bottleneck_dim, config.out_dim]
    return float(sum(2 * a * b for a, b in zip(widths[:-1], widths[1:])))


def analytic_step_flops(config: DinoConfig, crop_sizes: Sequence[int]) -> dict[str, float]:
    """FLOPs per image and training step: student forward + backward (3x forward) + teacher on the global crops.

    Args:
        config: the architecture.
        crop_sizes: side of each crop, global crops first (e.g. [224, 224, 96, ...]).

    Returns:
        {"student_forward", "teacher_forward", "total"} in FLOPs per image.
    """
    per_crop = [vit_forward_flops(config, size, size) + head_flops(config) for size in crop_sizes]
    student_forward = sum(per_crop)
    teacher_forward = sum(per_crop[:2])
    return {
        "student_forward": student_forward,
        "teacher_forward": teacher_forward,
        "total": 3 * student_forward + teacher_forward,
    }


def counted_step_flops(model: DinoModel, crop_sizes: Sequence[int]) -> float:
    """FLOPs per image and step counted by `torch.utils.flop_counter` on meta tensors (no real compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    meta_model = copy.deepcopy(model).to("meta").train()
    channels = model.config.backbone_config.num_channels
    crops = [torch.empty(1, channels, size, size, device="meta") for size in crop_sizes]
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            meta_model.forward_with_head(crops[:2])
        meta_model.forward_with_head(crops).float().sum().backward()
    return float(counter.get_total_flops())


def measured_matmul_flops(device: torch.device) -> dict[str, Any]:
    """The device's sustained matrix-product rate (bf16 8192^3 on CUDA, fp32 1024^3 on CPU), median of 5."""
    if device.type == "cuda":
        size, dtype, repeats = 8192, torch.bfloat16, 5
    else:
        size, dtype, repeats = 1024, torch.float32, 5
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = []
    for index in range(repeats + 2):
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        _synchronize(device)
        if index >= 2:
            times.append((time.perf_counter() - start) / 3)
    rate = 2 * size**3 / statistics.median(times)
    return {"flops_per_second": rate, "dtype": str(dtype).replace("torch.", ""), "size": size}


# ---------------------------------------------------------------------------------------------------------------
# Host-device synchronisations
# ---------------------------------------------------------------------------------------------------------------
# Python-level reads that bring a device value to the host (or need its value on the host to proceed).
_HOST_READ_METHODS = (
    "item", "tolist", "numpy", "nonzero", "unique", "masked_select", "__bool__", "__float__", "__int__", "__index__",
)  # fmt: skip
_HOST_READ_FUNCTIONS = ("nonzero", "unique", "masked_select", "unique_consecutive")


class HostSyncCounter:
    """Count host-device synchronisations while the block runs.

    On CUDA, `torch.cuda.set_sync_debug_mode("warn")` makes every synchronising operation (a device-to-host
    copy such as `.item()`, `nonzero`, a GradScaler check, ...) emit a warning; warnings are counted, and so
    are explicit `torch.cuda.synchronize()` calls. On CPU nothing synchronises for real, so the Python-level
    reads that would be synchronisations on an accelerator are counted instead: `Tensor.item`, `tolist`,
    `numpy`, `nonzero`, `unique`, `masked_select`, `__bool__`, `__float__`, `__int__`, `__index__`.
    Reads of the tensors in `ignored` (the optimizer's step counters, which live on the host on every device)
    are not counted.

    Args:
        device: the training device.
        ignored: tensors whose reads are host-side on every device.
    """

    def __init__(self, device: torch.device, ignored: Iterable[torch.Tensor] = ()) -> None:
        self.device = device
        self.ignored_ids = {id(tensor) for tensor in ignored}
        self.counts: Counter[str] = Counter()
        self._stack = contextlib.ExitStack()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __enter__(self) -> HostSyncCounter:
        if self.device.type == "cuda":
            self._records = self._stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            original_synchronize = torch.cuda.synchronize

            def counted_synchronize(*args: Any, **kwargs: Any) -> None:
                self.counts["torch.cuda.synchronize"] += 1
                return original_synchronize(*args, **kwargs)

            self._patch(torch.cuda, "synchronize", counted_synchronize)
        else:
            for name in _HOST_READ_METHODS:
                self._patch(torch.Tensor, name, self._counted(getattr(torch.Tensor, name), f"Tensor.{name}"))
            for name in _HOST_READ_FUNCTIONS:
                self._patch(torch, name, self._counted(getattr(torch, name), f"torch.{name}"))
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
            for record in self._records:
                text = str(record.message)
                if "synchroniz" in text.lower():
                    self.counts[f"cuda: {text.splitlines()[0][:80]}"] += 1
        self._stack.close()

    def _counted(self, function: Callable, label: str) -> Callable:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if not (args and id(args[0]) in self.ignored_ids):
                self.counts[label] += 1
            return function(*args, **kwargs)

        return counted

    def _patch(self, owner: Any, name: str, replacement: Callable) -> None:
        had_own = name in vars(owner)
        original = vars(owner).get(name)
        setattr(owner, name, replacement)

        def restore() -> None:
            if had_own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)

        self._stack.callback(restore)


def dynamo_counts() -> dict[str, int]:
    """Graphs compiled so far, frames compiled and graph breaks (torch._dynamo.utils.counters)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {"graphs": 0, "frames": 0, "graph_breaks": 0}
    return {
        "graphs": int(counters["stats"].get("unique_graphs", 0)),
        "frames": int(counters["frames"].get("ok", 0)),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


# ---------------------------------------------------------------------------------------------------------------
# The fast step, from hf_dino's public pieces
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class FastOptions:
    """The levers of the fast path; each can be switched off to measure what it brings.

    Args:
        precision: "fp32" or "bf16" (autocast).
        sdpa: scaled-dot-product attention (flash / memory-efficient kernels) instead of eager attention.
        fused_loss: hf_dino's DinoLoss (one log-softmax per student crop) instead of one per pair.
        foreach: foreach clipping and EMA without host syncs instead of the original's Python loops.
        fused_adamw: the fused AdamW kernel (False: torch's default implementation for the device).
        compile: torch.compile the forward passes and the loss.
        compile_mode: torch.compile mode ("default", "max-autotune-no-cudagraphs", "reduce-overhead").
        monitor: on-device collapse statistics every step, as hf_dino's loop records them.
        pack: the student's crops of both resolutions in one backbone pass over packed tokens.
        recompute: the blocks recompute their GELU and layer-norm outputs in the backward instead of keeping
            them (`GeluThenLinear`, `NormThenLinear`): less activation memory for one elementwise pass each.
    """

    precision: str = "fp32"
    sdpa: bool = True
    fused_loss: bool = True
    foreach: bool = True
    fused_adamw: bool = True
    compile: bool = False
    compile_mode: str = "default"
    monitor: bool = True
    pack: bool = False
    recompute: bool = True


def pairwise_loss(
    loss_fn: DinoLoss, student_output: torch.Tensor, teacher_output: torch.Tensor, teacher_temp: float
) -> torch.Tensor:
    """DinoLoss's value computed the original way, one log-softmax per pair (the fused-loss ablation)."""
    teacher_views = loss_fn.teacher_probabilities(teacher_output, teacher_temp).chunk(
        loss_fn.num_global_crops
    )
    num_crops = student_output.shape[0] // teacher_views[0].shape[0]
    student_views = (student_output.float() / loss_fn.student_temp).chunk(num_crops)
    total, terms = student_output.new_zeros((), dtype=torch.float32), 0
    for teacher_index, teacher_probs in enumerate(teacher_views):
        for student_index, student_view in enumerate(student_views):
            if student_index != teacher_index:
                total = total - (teacher_probs * F.log_softmax(student_view, dim=-1)).sum(dim=-1).mean()
                terms += 1
    return total / terms


class FastTrainer:
    """hf_dino's training step without accelerate: the order of `DinoTrainer._training_step`.

    Args:
        source: the `DinoModel` to copy the initial weights from (student and teacher start equal).
        options: the levers.
        clip_grad: per-tensor clipping threshold (official 3.0).
        freeze_last_layer: epochs with a frozen head last layer.
        drop_path_rate: the student's stochastic depth.
    """

    def __init__(
        self,
        source: DinoModel,
        options: FastOptions,
        *,
        clip_grad: float = 3.0,
        freeze_last_layer: int = 1,
        drop_path_rate: float = STUDENT_DROP_PATH,
    ) -> None:
        self.options = options
        self.device = source.head.last_layer.weight_v.device
        self.student = _copy_model(source, drop_path_rate).train()
        self.student.set_activation_recomputation(options.recompute)
        self.teacher = _copy_model(source, 0.0).train().requires_grad_(False)
        self.loss_fn = DinoLoss(source.config.out_dim).to(self.device)
        self.optimizer = build_optimizer(
            "adamw", parameter_groups(self.student), fused=options.fused_adamw or None
        )
        self.student_parameters, self.teacher_parameters = matching_parameters(self.student, self.teacher)
        self.trainable_parameters = [p for p in self.student.parameters() if p.requires_grad]
        self.clip_grad = clip_grad
        self.freeze_last_layer = freeze_last_layer
        self.pending: list[torch.Tensor] = []
        self.forward_and_loss = self._forward_and_loss
        self.uses_cuda_graphs = (
            options.compile and options.compile_mode == "reduce-overhead" and self.device.type == "cuda"
        )
        if options.compile:
            self.forward_and_loss = torch.compile(
                self._forward_and_loss, dynamic=False, mode=options.compile_mode
            )

    def _multi_crop(self, model: DinoModel, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.options.sdpa:
            return model.forward_with_head(list(crops), pack=self.options.pack)
        # Eager attention: the backbone materialises every layer's probabilities when asked for them.
        features = []
        for _, group in itertools.groupby(crops, key=lambda crop: tuple(crop.shape[-2:])):
            pixels = torch.cat(list(group))
            features.append(model.backbone(pixels, attention_layers="all")[0][:, 0])
        return model.head(torch.cat(features))

    def _forward_and_loss(
        self, crops: list[torch.Tensor], teacher_temp: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        autocast = torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.options.precision == "bf16"
        )
        with autocast:
            with torch.no_grad():
                teacher_output = self._multi_crop(self.teacher, crops[:2])
            student_output = self._multi_crop(self.student, crops)
            if self.options.fused_loss:
                loss = self.loss_fn.compute(
                    student_output=student_output, teacher_output=teacher_output, teacher_temp=teacher_temp
                )
            else:
                loss = pairwise_loss(self.loss_fn, student_output, teacher_output, teacher_temp)
        return loss, teacher_output

    def step(self, crops: Sequence[torch.Tensor], schedule: StepSchedule) -> torch.Tensor:
        """One optimizer step; nothing is read back to the host (see `flush`)."""
        apply_schedule(self.optimizer, lr=schedule.lr, weight_decay=schedule.weight_decay)
        if self.uses_cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs: a new step begins
        loss, teacher_output = self.forward_and_loss(list(crops), schedule.teacher_temp)
        if self.uses_cuda_graphs:
            # Out of the graphs' static memory, which the next replay overwrites (the buffered statistics and
            # the center read them later).
            loss, teacher_output = loss.clone(), teacher_output.clone()
        loss.backward()
        if self.clip_grad:
            if self.options.foreach:
                clip_gradients_per_parameter(self.trainable_parameters, self.clip_grad)
            else:
                dino_baseline.clip_gradients_with_host_sync(self.student, self.clip_grad)
        if schedule.epoch < self.freeze_last_layer:
            cancel_last_layer_gradients(self.student)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.options.foreach:
            update_teacher(self.teacher_parameters, self.student_parameters, schedule.teacher_momentum)
        else:
            dino_baseline.ema_python_loop(self.student, self.teacher, schedule.teacher_momentum)
        if self.options.monitor:
            self.pending.append(
                collapse_statistics_on_device(
                    loss=loss, teacher_output=teacher_output.detach(), center=self.loss_fn.center,
                    teacher_temp=schedule.teacher_temp,
                )
            )  # fmt: skip
        else:
            self.pending.append(loss.detach().reshape(1))
        self.loss_fn.update_center(teacher_output.detach())
        return loss.detach()

    def flush(self) -> list[float]:
        """A logging step: the buffered losses come to the host in one transfer; a non-finite one raises."""
        if not self.pending:
            return []
        losses = [row[0] for row in torch.stack(self.pending).cpu().tolist()]
        self.pending.clear()
        if not all(math.isfinite(value) for value in losses):
            raise FloatingPointError(f"non-finite loss in {losses}")
        return losses

    def state_tensors(self) -> list[torch.Tensor]:
        tensors = [*self.student.parameters(), *self.student.buffers(), *self.teacher.parameters()]
        tensors += [*self.teacher.buffers(), self.loss_fn.center]
        return tensors + _optimizer_tensors(self.optimizer)

    def host_side_tensors(self) -> list[torch.Tensor]:
        return _optimizer_step_counters(self.optimizer)

    def dino_state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        return {
            "student": _detached(self.student.state_dict()),
            "teacher": _detached(self.teacher.state_dict()),
            "center": {"center": self.loss_fn.center.detach().clone()},
        }


class LoopTrainer:
    """hf_dino's real loop step: `DinoTrainer._training_step` (accelerate, metrics recorder, schedules).

    The trainer is set up on a tiny in-memory dataset; its schedules are replaced by the benchmark's values so
    that every variant sees the same learning rate, momentum and temperatures.

    Args:
        source: the `DinoModel` to copy the initial weights from.
        preset: DinoConfig preset name of `source` (e.g. "vit_small_patch16").
        overrides: the DinoConfig overrides `source` was built with.
        crop_sizes: side of every crop, global first.
        batch_size: images per step.
        precision: "fp32" or "bf16".
        clip_grad, drop_path_rate: as `FastTrainer`.
        torch_compile, pack_crops, recompute_activations: the training arguments of those names.
    """

    def __init__(
        self,
        source: DinoModel,
        *,
        preset: str,
        overrides: dict[str, Any],
        crop_sizes: Sequence[int],
        batch_size: int,
        precision: str,
        clip_grad: float = 3.0,
        drop_path_rate: float = STUDENT_DROP_PATH,
        torch_compile: str | None = None,
        pack_crops: bool = False,
        recompute_activations: bool = True,
    ) -> None:
        from hf_dino.training import DinoTrainer, DinoTrainingArguments
        from hf_dino.training.data_pipeline import PrecomputedCrops
        from hf_dino.training.monitoring import MetricsRecorder

        self.device = source.head.last_layer.weight_v.device
        architecture, _, patch = preset.rpartition("_patch")  # "vit_small_patch16" -> "vit_small", "16"
        model_config = {key: value for key, value in overrides.items() if key not in ("out_dim",)}
        self._directory = tempfile.TemporaryDirectory(prefix="hf_dino_benchmark_")
        arguments = DinoTrainingArguments(
            arch=architecture,
            patch_size=int(model_config.pop("patch_size", patch)),
            out_dim=source.config.out_dim,
            drop_path_rate=drop_path_rate,
            model_config=model_config,
            mixed_precision={"bf16": "bf16", "fp32": "no"}[precision],
            torch_compile=torch_compile,
            pack_crops=pack_crops,
            recompute_activations=recompute_activations,
            clip_grad=clip_grad,
            batch_size=batch_size,
            freeze_last_layer=0,
            local_crops_number=len(crop_sizes) - 2,
            global_crop_size=crop_sizes[0],
            local_crop_size=crop_sizes[-1],
            num_workers=0,
            output_dir=self._directory.name,
            report_to="none",
            logging_steps=10**6,
            warmup_epochs=0,
        )
        channels = source.config.backbone_config.num_channels
        # Never read (the benchmark hands the step its batches); sized so the trainer accepts one full batch.
        tiny_data = PrecomputedCrops(
            [torch.zeros(batch_size, channels, size, size, dtype=torch.uint8) for size in crop_sizes]
        )
        _reset_accelerate_state()  # each LoopTrainer may ask for another mixed precision
        self.trainer = DinoTrainer(arguments, train_dataset=tiny_data)
        self.trainer.setup()
        self.trainer.recorder = MetricsRecorder(
            None, log_out_dim=math.log(source.config.out_dim), collapse_patience=10**9
        )
        self.trainer.unwrapped_student.model.load_state_dict(source.state_dict())
        self.trainer.unwrapped_teacher.model.load_state_dict(source.state_dict())
        self.schedule = StepSchedule()
        self.trainer.schedules = _FixedSchedules(self)
        self.uses_cuda_graphs = self.trainer._cuda_graphs

    def step(self, crops: Sequence[torch.Tensor], schedule: StepSchedule) -> torch.Tensor:
        self.schedule = schedule
        # The trainer reads its epoch from its step counter; keep it past the frozen-last-layer epochs.
        self.trainer.step = schedule.epoch * self.trainer.steps_per_epoch
        self.trainer._training_step(iter([list(crops)]))
        return self.trainer.recorder._device_values[-1][0]

    def flush(self) -> list[float]:
        return [record["loss"] for record in self.trainer.recorder.flush()]

    def state_tensors(self) -> list[torch.Tensor]:
        tensors = [*self.trainer.unwrapped_student.parameters(), *self.trainer.unwrapped_teacher.parameters()]
        tensors += [*self.trainer.unwrapped_student.buffers(), *self.trainer.unwrapped_teacher.buffers()]
        return tensors + [self.trainer.loss_fn.center] + _optimizer_tensors(self.trainer.optimizer)

    def host_side_tensors(self) -> list[torch.Tensor]:
        return _optimizer_step_counters(self.trainer.optimizer)

    def dino_state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        return {
            "student": _detached(self.trainer.unwrapped_student.model.state_dict()),
            "teacher": _detached(self.trainer.unwrapped_teacher.model.state_dict()),
            "center": {"center": self.trainer.loss_fn.center.detach().clone()},
        }


def _reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state so that another `Accelerator` may choose its own precision."""
    try:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    except (ImportError, AttributeError, TypeError):
        pass


class _FixedSchedules:
    """Stands in for `DinoSchedules`: the values of the benchmark's current step."""

    def __init__(self, owner: LoopTrainer) -> None:
        self.owner = owner

    def at(self, step: int) -> dict[str, float]:
        schedule = self.owner.schedule
        return {
            "lr": schedule.lr,
            "weight_decay": schedule.weight_decay,
            "teacher_momentum": schedule.teacher_momentum,
            "teacher_temp": schedule.teacher_temp,
        }


class BaselineRunner:
    """`BaselineTrainer` with the same interface as the fast trainers (its syncs happen inside `step`)."""

    def __init__(self, source: DinoModel, *, num_crops: int, use_fp16: bool, drop_path_rate: float) -> None:
        self.trainer = BaselineTrainer(
            source, num_crops=num_crops, use_fp16=use_fp16, drop_path_rate=drop_path_rate
        )
        self.losses: list[torch.Tensor] = []

    def step(self, crops: Sequence[torch.Tensor], schedule: StepSchedule) -> torch.Tensor:
        loss = self.trainer.step(crops, schedule)
        self.losses.append(loss)
        return loss

    def flush(self) -> list[float]:
        losses = [float(loss) for loss in self.losses]
        self.losses.clear()
        return losses

    def state_tensors(self) -> list[torch.Tensor]:
        return self.trainer.state_tensors()

    def host_side_tensors(self) -> list[torch.Tensor]:
        return _optimizer_step_counters(self.trainer.optimizer)

    def dino_state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.trainer.dino_state_dicts()


def _copy_model(source: DinoModel, drop_path_rate: float) -> DinoModel:
    config = copy.deepcopy(source.config)
    config.drop_path_rate = drop_path_rate
    reference = source.head.last_layer.weight_v
    with torch.device(reference.device):
        model = DinoModel(config)
    model.load_state_dict(source.state_dict())
    return model.to(dtype=reference.dtype)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [
        value
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    ]


def _optimizer_step_counters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [
        state["step"] for state in optimizer.state.values() if isinstance(state.get("step"), torch.Tensor)
    ]


def _detached(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in state_dict.items()}


# ---------------------------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------------------------
LEVERS = {
    "sdpa": {"sdpa": False},
    "fused-loss": {"fused_loss": False},
    "foreach": {"foreach": False},
    "fused-adamw": {"fused_adamw": False},
    "bf16": {"precision": "fp32"},
    "recompute": {"recompute": False},
}


def variant_names(device: torch.device) -> list[str]:
    """The variants every run knows; a `fast*` name also takes any `-no-<lever>` suffix (see `fast_options`)."""
    names = ["baseline", "trainer", "trainer-compile", "fast", "fast-compile", "fast-bf16", "fast-packed"]
    names += ["fast-packed-compile"]
    names += [f"fast-no-{lever}" for lever in LEVERS]
    return names


def fast_options(name: str, device: torch.device, compile_mode: str) -> FastOptions:
    """The options of a `fast*` variant name: `fast[-packed][-compile][-bf16][-no-<lever>]...`, e.g.
    `fast-packed-compile-no-recompute`."""
    default_precision = "bf16" if device.type == "cuda" else "fp32"
    options = FastOptions(precision=default_precision, compile_mode=compile_mode)
    base, *switched_off = name.split("-no-")
    flags = {"packed": {"pack": True}, "compile": {"compile": True}, "bf16": {"precision": "bf16"}}
    words = base.split("-")
    unknown = [lever for lever in switched_off if lever not in LEVERS]
    if words[0] != "fast" or any(word not in flags for word in words[1:]) or unknown:
        raise ValueError(
            f"unknown variant {name!r}; known: {', '.join(variant_names(device))} (and fast* "
            f"names combining -packed, -compile, -bf16 and -no-<lever>: {', '.join(LEVERS)})"
        )
    for word in words[1:]:
        options = dataclasses.replace(options, **flags[word])
    for lever in switched_off:
        options = dataclasses.replace(options, **LEVERS[lever])
    return options


def loop_options(name: str) -> dict[str, Any]:
    """The `LoopTrainer` options of a `trainer*` variant name: `trainer[-packed][-compile][-no-recompute]`."""
    base, *switched_off = name.split("-no-")
    words = base.split("-")
    if (
        words[0] != "trainer"
        or any(w not in ("packed", "compile") for w in words[1:])
        or any(lever != "recompute" for lever in switched_off)
    ):
        raise ValueError(f"unknown variant {name!r}: trainer[-packed][-compile][-no-recompute]")
    return {
        "pack_crops": "packed" in words,
        "compile": "compile" in words,
        "recompute_activations": not switched_off,
    }


def check_variant_name(name: str, device: torch.device) -> None:
    """Raise ValueError for a name no variant answers to."""
    if name == "baseline":
        return
    if name.startswith("trainer"):
        loop_options(name)
    else:
        fast_options(name, device, "default")


def build_variant(
    name: str,
    source: DinoModel,
    *,
    preset: str,
    overrides: dict[str, Any],
    crop_sizes: Sequence[int],
    batch_size: int,
    device: torch.device,
    drop_path_rate: float,
    compile_mode: str = "default",
    fp32_baseline: bool = False,
) -> Any:
    """Construct the trainer behind a variant name (see the module docstring)."""
    if name == "baseline":
        use_fp16 = device.type == "cuda" and not fp32_baseline
        return BaselineRunner(
            source, num_crops=len(crop_sizes), use_fp16=use_fp16, drop_path_rate=drop_path_rate
        )
    if name.startswith("trainer"):
        options = loop_options(name)
        precision = "bf16" if device.type == "cuda" else "fp32"
        return LoopTrainer(
            source, preset=preset, overrides=overrides, crop_sizes=crop_sizes, batch_size=batch_size,
            precision=precision, drop_path_rate=drop_path_rate,
            torch_compile=compile_mode if options["compile"] else None, pack_crops=options["pack_crops"],
            recompute_activations=options["recompute_activations"],
        )  # fmt: skip
    return FastTrainer(source, fast_options(name, device, compile_mode), drop_path_rate=drop_path_rate)


# ---------------------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------------------
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_batches(
    crop_sizes: Sequence[int], batch_size: int, channels: int, device: torch.device, count: int = 2
) -> list[list[torch.Tensor]]:
    """`count` multi-crop batches of normalised-looking random pixels (never zeros: they can run faster)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    batches = []
    for _ in range(count):
        crops = [torch.randn(batch_size, channels, size, size, generator=generator) for size in crop_sizes]
        batches.append([crop.to(device) for crop in crops])
    return batches


def schedule_for(step: int) -> StepSchedule:
    """Values that change every step as in a real run (lr, weight decay, momentum), temperature per epoch."""
    return StepSchedule(
        lr=5e-4 * (1 - 1e-3 * step),
        weight_decay=0.04 + 1e-4 * step,
        teacher_momentum=0.996 + 1e-5 * step,
        teacher_temp=0.04,
        epoch=1,
    )


def _unique_bytes(tensors: Iterable[torch.Tensor], device: torch.device) -> int:
    seen, total = set(), 0
    for tensor in tensors:
        if tensor.device.type != device.type:
            continue
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def peak_memory(
    runner: Any, batch: list[torch.Tensor], schedule: StepSchedule, device: torch.device
) -> dict[str, int]:
    """Peak device memory of one step as if the variant were alone on the device.

    `max_memory_allocated` during the step, minus what was allocated before it (other variants' state and
    the shared input batch), plus this variant's own state (weights, optimizer moments, center) and the batch.
    """
    _synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    runner.step(batch, schedule)
    runner.flush()
    _synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    state = _unique_bytes(runner.state_tensors(), device)
    inputs = sum(crop.numel() * crop.element_size() for crop in batch)
    return {
        "peak_bytes": peak - before + state + inputs,
        "state_bytes": state,
        "step_transient_bytes": peak - before,
    }


def count_syncs(
    runner: Any, batch: list[torch.Tensor], schedule: StepSchedule, device: torch.device
) -> dict[str, Any]:
    """Host-device synchronisations of one non-logging step (see `HostSyncCounter`)."""
    runner.flush()
    _synchronize(device)
    with HostSyncCounter(device, ignored=runner.host_side_tensors()) as counter:
        runner.step(batch, schedule)
    runner.flush()
    return {"per_step": counter.total, "by_kind": dict(counter.counts.most_common())}


# Inductor's Triton kernels say what they are in their prefix, whatever the operations their names list.
TRITON_PREFIXES = (
    ("triton_tem", "matmul"),  # matmul templates (max-autotune)
    ("triton_poi", "pointwise"),
    ("triton_red", "norms, softmax, reductions"),
    ("triton_per", "norms, softmax, reductions"),
)
# Other kernel / operator name patterns of each category, first match wins (lower case).
PROFILE_CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "aten::mm", "aten::addmm", "aten::bmm",
                "aten::baddbmm", "matmul", "convolution", "convolve", "conv2d", "fprop", "dgrad", "wgrad")),
    ("optimizer, clipping, EMA", ("adam", "multi_tensor", "foreach", "lerp")),
    ("copies and fills", ("memcpy", "memset", "copy", "fill", "catarray", "aten::cat", "clone", "index")),
    ("norms, softmax, reductions", ("norm", "softmax", "reduce", "sum", "mean", "welford", "max")),
    ("pointwise", ("elementwise", "gelu", "add", "mul", "div", "sub", "exp", "where", "dropout", "bernoulli",
                   "rand", "floor", "clamp")),
)  # fmt: skip


def profile_category(name: str) -> str:
    """The category of a GPU kernel or CPU operator name (see `TRITON_PREFIXES`, `PROFILE_CATEGORIES`)."""
    lowered = name.lower()
    for prefix, category in TRITON_PREFIXES:
        if lowered.startswith(prefix):
            return category
    for category, patterns in PROFILE_CATEGORIES:
        if any(pattern in lowered for pattern in patterns):
            return category
    return "other"


def _merged_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by possibly overlapping intervals."""
    total, end = 0.0, -math.inf
    for first, last in sorted(intervals):
        if last > end:
            total += last - max(first, end)
            end = last
    return total


def device_activity(events: Iterable[Any]) -> tuple[list[tuple[str, float]], float, int]:
    """(name, seconds) of every CUDA kernel, copy and fill among profiler events, the time the device was busy
    (overlaps counted once) and their number. The annotations that span kernels on the device's timeline (a
    compiled graph's or a record_function's range) are left out."""
    kernels = [
        event
        for event in events
        if event.device_type == torch.autograd.DeviceType.CUDA
        and not getattr(event, "is_user_annotation", False)
    ]
    durations = [(event.name, event.time_range.elapsed_us() / 1e6) for event in kernels]
    busy = _merged_length([(event.time_range.start / 1e6, event.time_range.end / 1e6) for event in kernels])
    return durations, busy, len(kernels)


def profile_steps(
    runner: Any,
    batches: list[list[torch.Tensor]],
    schedules: Sequence[StepSchedule],
    device: torch.device,
    *,
    flops_per_step: float,
    step_seconds: float | None = None,
    top: int = 25,
) -> dict[str, Any]:
    """Where one step's time goes, from `torch.profiler` over `len(schedules)` steps.

    On CUDA: the device's kernels, their busy time against the step's wall time (un-profiled, from the timing
    rounds, when given), kernels per step, time per category (matmul, attention, Triton fusions, optimizer...)
    and the rate the matmul and attention kernels reach on the analytic FLOPs. On a CPU: the operators' self
    CPU time instead of kernels.
    """
    from torch.profiler import ProfilerActivity, profile

    runner.flush()
    _synchronize(device)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    start = time.perf_counter()
    with profile(activities=activities) as profiler:
        for index, schedule in enumerate(schedules):
            runner.step(batches[index % len(batches)], schedule)
        _synchronize(device)
    wall = time.perf_counter() - start
    runner.flush()
    steps = len(schedules)
    if device.type == "cuda":
        durations, busy, count = device_activity(profiler.events())
        unit = "kernels"
    else:
        # Self CPU time of every operator (a nested operator's time is counted once, in the innermost one).
        durations = [(event.key, event.self_cpu_time_total / 1e6) for event in profiler.key_averages()]
        durations = [(name, seconds) for name, seconds in durations if seconds > 0]
        busy = sum(seconds for _, seconds in durations)
        count = sum(event.name.startswith("aten::") for event in profiler.events())
        unit = "aten operators"
    totals: dict[str, list[float]] = {}
    categories: dict[str, float] = {}
    for name, seconds in durations:
        entry = totals.setdefault(name, [0.0, 0])
        entry[0] += seconds
        entry[1] += 1
        categories[profile_category(name)] = categories.get(profile_category(name), 0.0) + seconds
    if device.type != "cuda":  # key_averages already aggregates: its count is the number of calls
        counts = {event.key: event.count for event in profiler.key_averages()}
        for name in totals:
            totals[name][1] = counts.get(name, 1)
    reference = step_seconds if step_seconds else wall / steps
    summed = sum(categories.values()) or math.nan
    compute = categories.get("matmul", 0.0) + categories.get("attention", 0.0)
    return {
        "steps_profiled": steps,
        "busy_means": "device kernels' time" if device.type == "cuda" else "operators' self CPU time",
        "step_ms": reference * 1e3,
        "step_ms_source": "timing rounds (un-profiled)" if step_seconds else "profiled steps",
        "profiled_step_ms": wall / steps * 1e3,
        "busy_ms_per_step": busy / steps * 1e3,
        "busy_fraction": busy / steps / reference,
        "counted": unit,
        "count_per_step": count / steps,
        "categories_ms_per_step": {
            name: seconds / steps * 1e3 for name, seconds in sorted(categories.items(), key=lambda kv: -kv[1])
        },
        "categories_share": {name: seconds / summed for name, seconds in categories.items()},
        "matmul_and_attention_flops_per_second": flops_per_step / (compute / steps) if compute else None,
        "top": [
            {
                "name": name[:160],
                "ms_per_step": seconds / steps * 1e3,
                "calls_per_step": calls / steps,
                "category": profile_category(name),
            }
            for name, (seconds, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
        ],  # fmt: skip
    }


def format_profile(name: str, profile: dict[str, Any]) -> str:
    """A few lines of text for the log."""
    lines = [
        f"[profile {name}] step {profile['step_ms']:.2f} ms ({profile['step_ms_source']}); busy "
        f"{profile['busy_ms_per_step']:.2f} ms ({100 * profile['busy_fraction']:.1f}%); "
        f"{profile['count_per_step']:.0f} {profile['counted']} per step"
    ]
    rate = profile.get("matmul_and_attention_flops_per_second")
    if rate:
        lines.append(f"  matmul + attention kernels reach {rate / 1e12:.3g} TFLOP/s on the analytic FLOPs")
    for category, milliseconds in profile["categories_ms_per_step"].items():
        lines.append(
            f"  {category:<30}{milliseconds:>9.2f} ms {100 * profile['categories_share'][category]:>6.1f}%"
        )
    for row in profile["top"]:
        lines.append(
            f"    {row['ms_per_step']:>8.3f} ms x{row['calls_per_step']:<6.1f} {row['category'][:12]:<13}"
            f"{row['name'][:100]}"
        )
    return "\n".join(lines)


def run_benchmark(arguments: argparse.Namespace) -> dict[str, Any]:
    """Build the variants, time them in interleaved rounds, and collect every figure."""
    device = torch.device(arguments.device)
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    torch.backends.cudnn.benchmark = True  # as the original sets it
    overrides = parse_overrides(arguments.override)
    if arguments.out_dim:
        overrides["out_dim"] = arguments.out_dim
    crop_sizes = [arguments.global_size] * 2 + [arguments.local_size] * arguments.local_crops
    torch.manual_seed(0)
    config = DinoConfig.from_preset(arguments.model, **overrides)
    with torch.device(device):
        source = DinoModel(config).train()
    channels = config.backbone_config.num_channels
    results: dict[str, Any] = {
        "environment": environment(device),
        "settings": {
            "model": arguments.model,
            "overrides": overrides,
            "crops": f"2x{arguments.global_size} + {arguments.local_crops}x{arguments.local_size}",
            "crop_sizes": crop_sizes,
            "batch_size": arguments.batch_size,
            "warmup_steps": arguments.warmup,
            "steps_per_round": arguments.steps,
            "rounds": arguments.rounds,
            "student_drop_path": arguments.drop_path,
            "data": "synthetic tensors on the device",
            "parameters_backbone": sum(p.numel() for p in source.backbone.parameters()),
            "parameters_head": sum(p.numel() for p in source.head.parameters()),
        },
        "variants": {},
    }
    flops = analytic_step_flops(config, crop_sizes)
    counted = counted_step_flops(source, crop_sizes) if config.is_vit else float("nan")
    results["flops"] = {
        "analytic_per_image_step": flops["total"],
        "analytic_student_forward_per_image": flops["student_forward"],
        "analytic_teacher_forward_per_image": flops["teacher_forward"],
        "flop_counter_per_image_step": counted,
        "counter_over_analytic": counted / flops["total"],
    }
    results["peak_flops"] = measured_matmul_flops(device)
    nominal = next(
        (rate for key, rate in NOMINAL_PEAK_FLOPS.items() if key in results["environment"]["device_name"]),
        None,
    )
    results["peak_flops"]["nominal_bf16_flops_per_second"] = nominal
    write_json(arguments.json, results)

    batches = synthetic_batches(crop_sizes, arguments.batch_size, channels, device)
    runners: dict[str, Any] = {}
    step_counter = itertools.count()
    for name in arguments.variants:
        entry: dict[str, Any] = results["variants"].setdefault(name, {})
        try:
            graphs_before = dynamo_counts()
            if device.type == "cuda":
                _synchronize(device)
                allocated_before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            runner = build_variant(
                name, source, preset=arguments.model, overrides=overrides, crop_sizes=crop_sizes,
                batch_size=arguments.batch_size, device=device, drop_path_rate=arguments.drop_path,
                compile_mode=arguments.compile_mode,
            )  # fmt: skip
            for _ in range(arguments.warmup):
                runner.step(batches[0], schedule_for(next(step_counter)))
            runner.flush()
            _synchronize(device)
            entry["setup_and_warmup_seconds"] = time.perf_counter() - start
            if device.type == "cuda":
                # Everything this variant allocated while it was built, compiled, warmed up and (CUDA graphs)
                # recorded, plus the input batch: an upper bound of its peak alone on the device, and the one
                # figure that also covers the CUDA graphs' memory pool.
                inputs = sum(crop.numel() * crop.element_size() for crop in batches[0])
                entry["setup_peak_bytes"] = (
                    torch.cuda.max_memory_allocated(device) - allocated_before + inputs
                )
            after = dynamo_counts()
            entry["compiled_graphs"] = after["graphs"] - graphs_before["graphs"]
            entry["graph_breaks"] = after["graph_breaks"] - graphs_before["graph_breaks"]
            entry["recompiles_after_warmup"] = 0
            runners[name] = runner
        except Exception as error:  # one broken variant must not lose the others
            entry["error"] = f"{type(error).__name__}: {error}"
            entry["traceback"] = traceback.format_exc(limit=6)
            print(f"[{name}] failed during setup: {entry['error']}", file=sys.stderr)
        write_json(arguments.json, results)

    # Interleaved timing rounds: every variant runs `steps` steps per round; one logging step ends each round.
    images_per_round = arguments.steps * arguments.batch_size
    timings: dict[str, list[float]] = {name: [] for name in runners}
    cpu_timings: dict[str, list[float]] = {name: [] for name in runners}
    for round_index in range(arguments.rounds):
        for name, runner in list(runners.items()):
            try:
                frames_before = dynamo_counts()["frames"]
                _synchronize(device)
                start, cpu_start = time.perf_counter(), time.process_time()
                for step in range(arguments.steps):
                    runner.step(batches[step % len(batches)], schedule_for(next(step_counter)))
                runner.flush()
                _synchronize(device)
                timings[name].append(time.perf_counter() - start)
                cpu_timings[name].append(time.process_time() - cpu_start)
                # Frames compiled during timed steps are recompilations (new shapes, values or guards).
                results["variants"][name]["recompiles_after_warmup"] += (
                    dynamo_counts()["frames"] - frames_before
                )
            except Exception as error:
                results["variants"][name]["error"] = f"round {round_index}: {type(error).__name__}: {error}"
                results["variants"][name]["traceback"] = traceback.format_exc(limit=6)
                print(f"[{name}] failed: {error}", file=sys.stderr)
                runners.pop(name)
        write_json(arguments.json, summarise(results, timings, cpu_timings, images_per_round))

    peak = results["peak_flops"]["flops_per_second"]
    for name, runner in runners.items():
        entry = results["variants"][name]
        try:
            entry["syncs"] = count_syncs(runner, batches[0], schedule_for(next(step_counter)), device)
        except Exception as error:
            entry["syncs"] = {"error": f"{type(error).__name__}: {error}"}
        if getattr(runner, "uses_cuda_graphs", False):
            # The CUDA graphs' memory pool is allocated while they are recorded (warm-up), not during the
            # measured step: the step's peak would leave out the activations. Not comparable; not reported.
            entry["memory"] = {"not_measured": "CUDA graphs allocate their memory pool while recording"}
        elif device.type == "cuda":
            try:
                entry["memory"] = peak_memory(runner, batches[0], schedule_for(next(step_counter)), device)
            except Exception as error:
                entry["memory"] = {"error": f"{type(error).__name__}: {error}"}
        write_json(arguments.json, summarise(results, timings, cpu_timings, images_per_round))
    results = summarise(results, timings, cpu_timings, images_per_round)
    for entry in results["variants"].values():
        if "images_per_second" in entry:
            entry["mfu_vs_measured_matmul"] = entry["images_per_second"] * flops["total"] / peak
            if nominal:
                entry["mfu_vs_nominal_bf16"] = entry["images_per_second"] * flops["total"] / nominal
    for name in arguments.profile or []:
        if name not in runners:
            continue
        entry = results["variants"][name]
        try:
            schedules = [schedule_for(next(step_counter)) for _ in range(arguments.profile_steps)]
            entry["profile"] = profile_steps(
                runners[name], batches, schedules, device,
                flops_per_step=flops["total"] * arguments.batch_size,
                step_seconds=arguments.batch_size / entry["images_per_second"],
            )  # fmt: skip
        except Exception as error:  # the profiler must not lose the figures above
            entry["profile"] = {"error": f"{type(error).__name__}: {error}"}
        write_json(arguments.json, results)
    baseline = results["variants"].get("baseline", {})
    if baseline.get("setup_peak_bytes"):
        for entry in results["variants"].values():
            if entry.get("setup_peak_bytes"):
                entry["setup_peak_over_baseline"] = entry["setup_peak_bytes"] / baseline["setup_peak_bytes"]
    if baseline.get("memory", {}).get("peak_bytes"):
        for entry in results["variants"].values():
            if entry.get("memory", {}).get("peak_bytes"):
                entry["memory"]["peak_over_baseline"] = (
                    entry["memory"]["peak_bytes"] / baseline["memory"]["peak_bytes"]
                )
    write_json(arguments.json, results)
    return results


def summarise(
    results: dict[str, Any],
    timings: dict[str, list[float]],
    cpu_timings: dict[str, list[float]],
    images_per_round: int,
) -> dict[str, Any]:
    """Images/s per variant (median and best round) and speed-ups over the baseline.

    `speedup_over_baseline` divides median rates; `speedup_paired` is the median over rounds of the ratio of
    the baseline's time to the variant's in the same round: adjacent in time, it is the figure least moved by
    other work on a shared machine. `images_per_cpu_second` (this process's CPU time) and
    `speedup_paired_cpu_time` discount the time other programs took the cores away (CPU runs, one thread).
    """
    for name, rounds in timings.items():
        if not rounds:
            continue
        entry = results["variants"][name]
        entry["round_seconds"] = rounds
        entry["round_cpu_seconds"] = cpu_timings[name]
        entry["images_per_cpu_second"] = images_per_round / statistics.median(cpu_timings[name])
        entry["images_per_second"] = images_per_round / statistics.median(rounds)
        entry["images_per_second_best"] = images_per_round / min(rounds)
        entry["images_per_second_spread"] = [images_per_round / max(rounds), images_per_round / min(rounds)]
    baseline = results["variants"].get("baseline", {})
    baseline_rounds = timings.get("baseline", [])
    if baseline.get("images_per_second"):
        for name, entry in results["variants"].items():
            if "images_per_second" not in entry:
                continue
            entry["speedup_over_baseline"] = entry["images_per_second"] / baseline["images_per_second"]
            entry["speedup_best_over_best"] = (
                entry["images_per_second_best"] / baseline["images_per_second_best"]
            )
            pairs = [base / own for base, own in zip(baseline_rounds, timings.get(name, []))]
            if pairs:
                entry["speedup_paired"] = statistics.median(pairs)
            cpu_pairs = [
                base / own for base, own in zip(cpu_timings.get("baseline", []), cpu_timings.get(name, []))
            ]
            if cpu_pairs:
                entry["speedup_paired_cpu_time"] = statistics.median(cpu_pairs)
    return results


# ---------------------------------------------------------------------------------------------------------------
# Equivalence check: one step of each path from the same weights on the same batch
# ---------------------------------------------------------------------------------------------------------------
def relative_difference(first: torch.Tensor, second: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are zero)."""
    first, second = first.double().cpu(), second.double().cpu()
    denominator = second.norm().item()
    difference = (first - second).norm().item()
    return difference / denominator if denominator > 0 else difference


def _concatenated_difference(
    state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], keys: Sequence[str]
) -> float:
    """Relative difference of all tensors `keys` taken together, against a reference state."""
    return relative_difference(
        torch.cat([state[key].double().cpu().flatten() for key in keys]),
        torch.cat([reference[key].double().cpu().flatten() for key in keys]),
    )


def state_update_difference(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], reference_after: dict[str, torch.Tensor]
) -> float:
    """Relative difference of the weight updates (after - before) over all tensors, against a reference path."""
    keys = sorted(before)
    update = torch.cat([(after[key].double().cpu() - before[key].double().cpu()).flatten() for key in keys])
    reference = torch.cat(
        [(reference_after[key].double().cpu() - before[key].double().cpu()).flatten() for key in keys]
    )
    return relative_difference(update, reference)


def equivalence_check(
    *,
    preset: str = "vit_tiny_patch16",
    overrides: dict[str, Any] | None = None,
    crop_sizes: Sequence[int] = (32, 32, 16, 16, 16, 16),
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    variants: Sequence[str] = ("fast", "fast-packed", "trainer"),
    precision: str = "fp32",
    steps: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """Run `steps` steps of the baseline and of each variant from the same weights on the same batches.

    Drop path is off (its random masks would differ between paths) and every path runs in `precision`
    ("fp32", or "bf16" for the fast paths against an fp32 baseline); on CUDA, TF32 is switched off so that
    fp32 means fp32.

    Returns:
        {variant: {"loss": [rel. diff per step], "center", "teacher", "student": rel. diffs of all weights
        together, "teacher_update": rel. diff of the EMA deltas}} against the baseline, plus its losses.
    """
    device = torch.device(device)
    overrides = dict(overrides if overrides is not None else TINY_OVERRIDES)
    previous_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        torch.manual_seed(seed)
        config = DinoConfig.from_preset(preset, **overrides)
        with torch.device(device):
            source = DinoModel(config).train()
        initial = {key: value.detach().clone() for key, value in source.state_dict().items()}
        channels = config.backbone_config.num_channels
        batches = synthetic_batches(crop_sizes, batch_size, channels, device, count=steps)
        baseline = BaselineRunner(source, num_crops=len(crop_sizes), use_fp16=False, drop_path_rate=0.0)
        baseline_losses = [
            float(baseline.step(batch, schedule_for(index))) for index, batch in enumerate(batches)
        ]
        reference = baseline.dino_state_dicts()
        report: dict[str, Any] = {"baseline_losses": baseline_losses, "precision": precision, "steps": steps}
        for name in variants:
            if name.startswith("trainer"):
                options = loop_options(name)
                runner = LoopTrainer(
                    source, preset=preset, overrides=overrides, crop_sizes=crop_sizes, batch_size=batch_size,
                    precision=precision, drop_path_rate=0.0, pack_crops=options["pack_crops"],
                    recompute_activations=options["recompute_activations"],
                )  # fmt: skip
            else:
                options = dataclasses.replace(fast_options(name, device, "default"), precision=precision)
                runner = FastTrainer(source, options, drop_path_rate=0.0)
            losses = [runner.step(batch, schedule_for(index)) for index, batch in enumerate(batches)]
            losses = [float(loss) for loss in losses]
            runner.flush()
            state = runner.dino_state_dicts()
            trainable = [
                key for key in reference["student"] if key in initial and key != "head.last_layer.weight_g"
            ]
            report[name] = {
                "losses": losses,
                "loss": [abs(a - b) / abs(b) for a, b in zip(losses, baseline_losses)],
                "center": relative_difference(state["center"]["center"], reference["center"]["center"]),
                "teacher": _concatenated_difference(state["teacher"], reference["teacher"], trainable),
                "student": _concatenated_difference(state["student"], reference["student"], trainable),
                # Adam's first steps move each weight by about lr * sign(gradient), so weights whose gradient is
                # rounding noise (e.g. the key bias, whose true gradient is 0) make the updates differ by far more
                # than the gradients do: informational, not a tolerance.
                "teacher_update": state_update_difference(
                    {k: initial[k] for k in trainable}, state["teacher"], reference["teacher"]
                ),
            }
        return report
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous_tf32


# A tiny ViT for smoke tests and the CPU equivalence check (2 blocks, width 64, K 256).
TINY_OVERRIDES: dict[str, Any] = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "out_dim": 256,
    "hidden_dim": 96,
    "bottleneck_dim": 32,
}


# ---------------------------------------------------------------------------------------------------------------
# Reporting and command line
# ---------------------------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    try:
        import accelerate

        accelerate_version = accelerate.__version__
    except ImportError:
        accelerate_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate_version,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": load,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_overrides(items: Sequence[str] | None) -> dict[str, Any]:
    """`KEY=VALUE` strings -> dict, values parsed as JSON when possible (`num_hidden_layers=2`)."""
    overrides: dict[str, Any] = {}
    for item in items or []:
        key, separator, value = item.partition("=")
        if not separator:
            raise ValueError(f"--override takes KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def write_json(path: str | None, results: dict[str, Any]) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(f"{path}.tmp")
    temporary.write_text(json.dumps(results, indent=1, default=str))
    os.replace(temporary, path)


def format_table(results: dict[str, Any]) -> str:
    flops = results["flops"]
    lines = [
        f"{results['environment']['device_name']} | torch {results['environment']['torch']} | "
        f"{results['settings']['model']} {results['settings']['crops']} | batch {results['settings']['batch_size']}",
        f"FLOPs per image-step: analytic {flops['analytic_per_image_step'] / 1e9:.2f} G, flop counter "
        f"{flops['flop_counter_per_image_step'] / 1e9:.2f} G (ratio {flops['counter_over_analytic']:.4f}); "
        f"measured matmul peak {results['peak_flops']['flops_per_second'] / 1e12:.3f} TFLOP/s "
        f"({results['peak_flops']['dtype']})",
        f"{'variant':<22}{'img/s':>9}{'best':>9}{'img/CPUs':>9}{'x base':>8}{'paired':>8}{'x CPU':>7}{'MFU':>7}"
        f"{'peak MiB':>10}{'setup MiB':>10}{'syncs':>7}{'graphs':>7}{'recomp':>7}",
    ]
    for name, entry in results["variants"].items():
        if "images_per_second" not in entry:
            lines.append(f"{name:<22}  {entry.get('error', 'no timing')[:90]}")
            continue
        memory = entry.get("memory", {}).get("peak_bytes")
        syncs = entry.get("syncs", {}).get("per_step", "?")
        lines.append(
            f"{name:<22}{entry['images_per_second']:>9.2f}{entry['images_per_second_best']:>9.2f}"
            f"{entry['images_per_cpu_second']:>9.2f}"
            f"{entry.get('speedup_over_baseline', float('nan')):>8.2f}{entry.get('speedup_paired', float('nan')):>8.2f}"
            f"{entry.get('speedup_paired_cpu_time', float('nan')):>7.2f}"
            f"{100 * entry.get('mfu_vs_measured_matmul', float('nan')):>6.1f}%"
            f"{(memory / 2**20 if memory else float('nan')):>10.0f}"
            f"{entry.get('setup_peak_bytes', float('nan')) / 2**20:>10.0f}{syncs:>7}"
            f"{entry.get('compiled_graphs', 0):>7}{entry.get('recompiles_after_warmup', 0):>7}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default="vit_small_patch16",
        help="DinoConfig preset (vit_small_patch16, vit_tiny_patch16, ...).",
    )
    parser.add_argument(
        "--override",
        action="append",
        metavar="KEY=VALUE",
        help="DinoConfig/backbone override, repeatable (tiny models).",
    )
    parser.add_argument("--out-dim", type=int, default=None, help="K (default: the preset's 65536).")
    parser.add_argument(
        "--local-crops", type=int, default=10, help="Local crops per image (10 or the official default 8)."
    )
    parser.add_argument("--global-size", type=int, default=224, help="Global crop side.")
    parser.add_argument("--local-size", type=int, default=96, help="Local crop side.")
    parser.add_argument(
        "--batch-size", type=int, default=64, help="Images per step (64 per device, official)."
    )
    parser.add_argument(
        "--warmup", type=int, default=3, help="Untimed steps per variant (compilation happens here)."
    )
    parser.add_argument("--steps", type=int, default=5, help="Timed steps per variant and round.")
    parser.add_argument(
        "--rounds", type=int, default=3, help="Interleaved timing rounds; the median round counts."
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU).")
    parser.add_argument(
        "--drop-path", type=float, default=STUDENT_DROP_PATH, help="Student drop path (0.1 official)."
    )
    parser.add_argument(
        "--variants",
        default=None,
        help="Comma-separated variants (default: baseline,trainer,fast,fast-compile).",
    )
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode of fast-compile.")
    parser.add_argument(
        "--profile",
        default=None,
        help="Comma-separated variants to profile after the timing (torch.profiler): kernel busy time against "
        "the step time, time per category, the top kernels.",
    )
    parser.add_argument("--profile-steps", type=int, default=3, help="Steps per profiled variant.")
    parser.add_argument(
        "--json", default=None, help="Write all figures to this JSON file (updated as results come in)."
    )
    parser.add_argument(
        "--check", action="store_true", help="Run the fast-vs-baseline equivalence check instead."
    )
    parser.add_argument(
        "--check-full",
        action="store_true",
        help="Run the check with --model, crops and --batch-size instead of the tiny default.",
    )
    parser.add_argument(
        "--check-precision",
        default="fp32",
        help="Precisions of the check's fast paths, comma-separated: fp32, bf16 (the baseline stays fp32).",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    if arguments.check:
        reports = {}
        for precision in arguments.check_precision.split(","):
            if arguments.override or arguments.check_full:
                overrides = parse_overrides(arguments.override)
                if arguments.out_dim:
                    overrides["out_dim"] = arguments.out_dim
                sizes = [arguments.global_size] * 2 + [arguments.local_size] * arguments.local_crops
                setup = {"preset": arguments.model, "overrides": overrides, "crop_sizes": sizes}
                setup["batch_size"] = arguments.batch_size
            else:
                setup = {}  # the tiny default of equivalence_check
            reports[precision] = equivalence_check(device=arguments.device, precision=precision, **setup)
        reports["environment"] = environment(torch.device(arguments.device))
        print(json.dumps(reports, indent=1, default=str))
        write_json(arguments.json, reports)
        return 0
    device = torch.device(arguments.device)
    if arguments.variants:
        arguments.variants = [name.strip() for name in arguments.variants.split(",") if name.strip()]
    else:
        arguments.variants = ["baseline", "trainer", "fast", "fast-compile"]
    arguments.profile = [name.strip() for name in (arguments.profile or "").split(",") if name.strip()]
    for name in arguments.variants + arguments.profile:
        try:
            check_variant_name(name, device)
        except ValueError as error:
            raise SystemExit(str(error)) from None
    results = run_benchmark(arguments)
    print(format_table(results))
    for name, entry in results["variants"].items():
        if "error" in entry.get("profile", {}):
            print(f"[profile {name}] failed: {entry['profile']['error']}")
        elif "profile" in entry:
            print(format_profile(name, entry["profile"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
