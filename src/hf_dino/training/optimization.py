"""The optimizer side of DINO: parameter groups, gradient clipping, the frozen last layer and the teacher EMA.

Everything here works on plain modules and tensors in one process; the training loop hands in the
unwrapped student (`accelerator.unwrap_model`). Nothing reads a tensor back to the host: clipping and the
EMA are a handful of `torch._foreach_*` kernels per step instead of hundreds of tiny ones and 2 host
synchronisations per parameter tensor in the original's Python loops (dino.md, "Wasted work").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

# Name fragment of the head's last (weight-normalised) layer, frozen during the first epochs.
LAST_LAYER_NAME = "head.last_layer."


def parameter_groups(model: nn.Module) -> list[dict]:
    """Split the trainable parameters into a weight-decayed group and a group without weight decay.

    As in the original recipe, biases and every 1-D parameter (norm weights) get no weight decay; the
    training loop sets the scheduled decay on the first group only.

    Args:
        model: the (unwrapped) student.

    Returns:
        `[{"params": regularized, "name": "decay"}, {"params": not_regularized, "weight_decay": 0.0,
        "name": "no_decay"}]`; the second group is left out when empty.
    """
    regularized: list[nn.Parameter] = []
    not_regularized: list[nn.Parameter] = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if name.endswith(".bias") or parameter.ndim <= 1:
            not_regularized.append(parameter)
        else:
            regularized.append(parameter)
    groups = [{"params": regularized, "name": "decay"}]
    if not_regularized:
        groups.append({"params": not_regularized, "weight_decay": 0.0, "name": "no_decay"})
    return groups


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You et al., 2017) as used for DINO's ResNet-50 recipe.

    Parameters with more than one dimension get weight decay and a trust ratio
    `eta * ||p|| / ||g + wd * p||` on their update; 1-D parameters (biases, norms) get neither, as in the
    original. The trust ratio is computed with `torch.where`, never on the host.

    Args:
        params: parameters or groups.
        lr: learning rate (set per step by the schedule).
        weight_decay: weight decay (set per step by the schedule).
        momentum: heavy-ball momentum (0.9).
        eta: trust coefficient (0.001).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        eta: float = 0.001,
    ) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "eta": eta})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch.optim.Optimizer's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                update = parameter.grad
                if parameter.ndim > 1:
                    update = update.add(parameter, alpha=group["weight_decay"])
                    parameter_norm = torch.linalg.vector_norm(parameter)
                    update_norm = torch.linalg.vector_norm(update)
                    trust = torch.where(
                        (parameter_norm > 0) & (update_norm > 0),
                        group["eta"] * parameter_norm / update_norm,
                        torch.ones_like(parameter_norm),
                    )
                    update = update.mul(trust)
                state = self.state[parameter]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(parameter)
                buffer = state["momentum_buffer"]
                buffer.mul_(group["momentum"]).add_(update)
                parameter.add_(buffer, alpha=-group["lr"])
        return loss


def build_optimizer(name: str, groups: list[dict], *, fused: bool | None = None) -> torch.optim.Optimizer:
    """The optimizer of the recipe; learning rate and weight decay are set per step by the schedules.

    Args:
        name: "adamw" (official for ViTs), "sgd" (momentum 0.9) or "lars".
        groups: from `parameter_groups`.
        fused: use the fused AdamW kernel (None: let torch choose).
    """
    if name == "adamw":
        kwargs = {} if fused is None else {"fused": fused}
        return torch.optim.AdamW(groups, lr=0.0, **kwargs)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9)
    if name == "lars":
        return LARS(groups)
    raise ValueError(f"unknown optimizer {name!r}: choose adamw, sgd or lars")


@torch.no_grad()
def complete_optimizer_state(optimizer: torch.optim.Optimizer) -> int:
    """Give each parameter that has no optimizer state yet the state its first step would start from.

    The head's last layer has no gradient while it is frozen, so AdamW / SGD keep no state for it. A
    distributed (FSDP) checkpoint loader builds its template with a state for every parameter and refuses a
    checkpoint that lacks one. The states written here are the ones the first step would create (AdamW:
    step 0 and zero moments; SGD and LARS: a zero momentum buffer, which gives `0 * momentum + g = g`
    exactly), so the training continues as it would have without them.

    Returns:
        How many parameters were given a state.
    """
    completed = 0
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if optimizer.state.get(parameter):
                continue
            if isinstance(optimizer, torch.optim.AdamW):
                on_device = group.get("fused") or group.get("capturable")
                state = {
                    "step": torch.zeros(
                        (), dtype=torch.float32, device=parameter.device if on_device else "cpu"
                    ),
                    "exp_avg": torch.zeros_like(parameter, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(parameter, memory_format=torch.preserve_format),
                }
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
            elif isinstance(optimizer, (torch.optim.SGD, LARS)):
                if isinstance(optimizer, torch.optim.SGD) and not group.get("momentum"):
                    continue  # plain SGD keeps no state
                state = {"momentum_buffer": torch.zeros_like(parameter, memory_format=torch.preserve_format)}
            else:
                raise TypeError(f"no initial state known for {type(optimizer).__name__}")
            optimizer.state[parameter] = state
            completed += 1
    return completed


def apply_schedule(optimizer: torch.optim.Optimizer, *, lr: float, weight_decay: float) -> None:
    """Set this step's learning rate on every group and its weight decay on the regularized groups."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("name") != "no_decay":
            group["weight_decay"] = weight_decay


def gradients_of(parameters: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [parameter.grad for parameter in parameters if parameter.grad is not None]


@torch.no_grad()
def clip_gradients_per_parameter(parameters: Iterable[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    """Clip each parameter tensor's gradient to norm `max_norm` on its own (the original's semantics).

    Each gradient is multiplied by `min(1, max_norm / (||g|| + 1e-6))`: identical results to the original's
    `if clip_coef < 1: grad.mul_(clip_coef)`, but with `torch.clamp` on the device instead of one host
    synchronisation per tensor.

    Args:
        parameters: parameters whose `.grad` is set (others are skipped).
        max_norm: the norm each gradient is clipped to.

    Returns:
        The per-tensor gradient norms before clipping (0-dim tensors on the device).
    """
    gradients = gradients_of(parameters)
    if not gradients:
        return []
    norms = torch._foreach_norm(gradients)
    coefficients = torch._foreach_add(norms, 1e-6)
    torch._foreach_reciprocal_(coefficients)
    torch._foreach_mul_(coefficients, max_norm)
    torch._foreach_clamp_max_(coefficients, 1.0)
    torch._foreach_mul_(gradients, coefficients)
    return list(norms)


def last_layer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The head's last-layer parameters (frozen for the first `freeze_last_layer` epochs)."""
    return [parameter for name, parameter in model.named_parameters() if LAST_LAYER_NAME in name]


def cancel_last_layer_gradients(model: nn.Module) -> None:
    """Drop the gradients of the head's last layer so that the optimizer step leaves it untouched.

    Setting `.grad = None` (not zeroing) matters: AdamW would still apply weight decay and decay its
    moments on a zero gradient, whereas a parameter without gradient is skipped entirely (official).
    """
    for parameter in last_layer_parameters(model):
        parameter.grad = None


def matching_parameters(
    student: nn.Module, teacher: nn.Module
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Student and teacher parameters in the same order, checked by name and shape.

    Under FSDP the parameters may be DTensors; their local shards are returned, which match because both
    networks are sharded the same way.
    """
    student_named = dict(student.named_parameters())
    teacher_named = dict(teacher.named_parameters())
    if student_named.keys() != teacher_named.keys():
        missing = sorted(set(student_named) ^ set(teacher_named))[:5]
        raise ValueError(f"student and teacher have different parameters (e.g. {missing})")
    student_tensors: list[torch.Tensor] = []
    teacher_tensors: list[torch.Tensor] = []
    for name, student_parameter in student_named.items():
        teacher_parameter = teacher_named[name]
        student_tensor = _local(student_parameter.detach())
        teacher_tensor = _local(teacher_parameter.detach())
        if student_tensor.shape != teacher_tensor.shape:
            raise ValueError(f"parameter {name} differs in shape between student and teacher")
        student_tensors.append(student_tensor)
        teacher_tensors.append(teacher_tensor)
    return student_tensors, teacher_tensors


def _local(tensor: torch.Tensor) -> torch.Tensor:
    to_local = getattr(tensor, "to_local", None)  # DTensor (FSDP2): update the local shard in place
    return to_local() if callable(to_local) else tensor


@torch.no_grad()
def update_teacher(
    teacher_parameters: Sequence[torch.Tensor], student_parameters: Sequence[torch.Tensor], momentum: float
) -> None:
    """The momentum teacher: `teacher <- momentum * teacher + (1 - momentum) * student` (paper §3.1).

    Two fused `foreach` kernels over all parameters instead of a Python loop of tiny ones.

    Args:
        teacher_parameters: the teacher's parameters (updated in place).
        student_parameters: the unwrapped student's parameters, same order and shapes.
        momentum: lambda of this step (cosine 0.996 -> 1).
    """
    teacher_parameters = list(teacher_parameters)
    student_parameters = list(student_parameters)
    if not teacher_parameters:
        return
    # The student may be in lower precision (e.g. pure bf16 training): bring it to the teacher's dtype.
    if student_parameters[0].dtype != teacher_parameters[0].dtype:
        student_parameters = [tensor.to(teacher_parameters[0].dtype) for tensor in student_parameters]
    torch._foreach_mul_(teacher_parameters, momentum)
    torch._foreach_add_(teacher_parameters, student_parameters, alpha=1.0 - momentum)
