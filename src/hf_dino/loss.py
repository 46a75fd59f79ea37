"""The DINO objective: cross-entropy between a centred, sharpened teacher and the student over views.

For teacher view `i` (a global crop) and student view `v` (any crop), the term is
`H(P_t^i, P_s^v) = -sum_k softmax((t_i - c) / tau_t)_k * log_softmax(s_v / tau_s)_k`, and the loss is
the mean of all terms with `v != i` (paper §3.1, Algorithm 1). The center `c` is an exponential moving
average of the batch mean of the teacher outputs, updated after the loss (paper §3.1, "avoiding
collapse"); with several processes the batch mean is taken over all of them.

Everything here is plain tensors: the module runs in one CPU process without a process group, and only
reaches for `torch.distributed` when one is initialised with more than one process.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as torch_distributed
import torch.nn.functional as F
from torch import nn


def _float32_region(device: torch.device) -> contextlib.AbstractContextManager:
    """A region where autocast cannot lower the precision of the softmaxes and sums below."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know: nothing to disable there
        return contextlib.nullcontext()


def _distributed_world_size() -> int:
    """The number of processes to average the center over (1 without an initialised process group)."""
    if torch_distributed.is_available() and torch_distributed.is_initialized():
        return torch_distributed.get_world_size()
    return 1


def _split_views(output: torch.Tensor, num_views: int, name: str) -> tuple[torch.Tensor, ...]:
    if output.dim() != 2:
        raise ValueError(f"{name} must have shape (num_views * batch, out_dim), got {tuple(output.shape)}")
    if output.shape[0] % num_views != 0:
        raise ValueError(
            f"{name} has {output.shape[0]} rows, which is not a multiple of its {num_views} views; "
            "stack the crops view by view: [view 1 of every image, view 2 of every image, ...]"
        )
    return output.chunk(num_views)


class DinoLoss(nn.Module):
    """DINO's self-distillation loss with the teacher center as a persistent buffer.

    Args:
        out_dim: K, the number of output dimensions of the projection head.
        student_temp: tau_s, the student temperature (0.1, official default).
        center_momentum: m, the momentum of the center's moving average (0.9, official default).
        num_global_crops: how many views the teacher sees; they are the first views of the student too
            (2 in the paper).

    Example:
        >>> loss_fn = DinoLoss(out_dim=65536)
        >>> loss = loss_fn(student_output=student_logits, teacher_output=teacher_logits, teacher_temp=0.04)

    With gradient accumulation, call `loss_fn.compute(...)` on every micro-batch and
    `loss_fn.update_center([teacher_output_1, teacher_output_2, ...])` once per optimizer step, so that
    the center moves once per step from the whole effective batch.
    """

    center: torch.Tensor

    def __init__(
        self,
        out_dim: int,
        *,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        num_global_crops: int = 2,
    ) -> None:
        super().__init__()
        if out_dim < 1:
            raise ValueError(f"out_dim must be positive, got {out_dim}")
        if student_temp <= 0:
            raise ValueError(f"student_temp must be positive, got {student_temp}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must lie in [0, 1], got {center_momentum}")
        if num_global_crops < 1:
            raise ValueError(f"num_global_crops must be at least 1, got {num_global_crops}")
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.num_global_crops = num_global_crops
        # Kept in float32 whatever the model's dtype: it accumulates small EMA steps.
        self.register_buffer("center", torch.zeros(1, out_dim, dtype=torch.float32), persistent=True)

    def extra_repr(self) -> str:
        return (
            f"out_dim={self.out_dim}, student_temp={self.student_temp}, "
            f"center_momentum={self.center_momentum}, num_global_crops={self.num_global_crops}"
        )

    def forward(
        self, *, student_output: torch.Tensor, teacher_output: torch.Tensor, teacher_temp: float
    ) -> torch.Tensor:
        """The loss for one batch, then the center update from that batch's teacher outputs.

        Args:
            student_output: `(num_crops * batch, out_dim)` head outputs for every crop, view by view in
                the order [global 1, global 2, local 1, ...].
            teacher_output: `(num_global_crops * batch, out_dim)` head outputs for the global crops, in
                the same view order.
            teacher_temp: tau_t, the teacher temperature for this epoch.

        Returns:
            A float32 scalar: the mean cross-entropy over all (teacher view, student view) pairs with
            different views.
        """
        loss = self.compute(
            student_output=student_output, teacher_output=teacher_output, teacher_temp=teacher_temp
        )
        self.update_center(teacher_output)
        return loss

    def teacher_probabilities(
        self, teacher_output: torch.Tensor, teacher_temp: float | torch.Tensor
    ) -> torch.Tensor:
        """The centred, sharpened teacher distribution `softmax((t - c) / tau_t)` in float32, no gradient.

        Args:
            teacher_output: `(rows, out_dim)` teacher head outputs.
            teacher_temp: tau_t, a number or a 0-d tensor (a tensor is not checked: that would read it back).

        Returns:
            `(rows, out_dim)` float32 probabilities.
        """
        if not isinstance(teacher_temp, torch.Tensor) and teacher_temp <= 0:
            raise ValueError(f"teacher_temp must be positive, got {teacher_temp}")
        with torch.no_grad(), _float32_region(teacher_output.device):
            centred = teacher_output.detach().float() - self.center.to(teacher_output.device)
            return F.softmax(centred / teacher_temp, dim=-1)

    def compute(
        self,
        *,
        student_output: torch.Tensor,
        teacher_output: torch.Tensor,
        teacher_temp: float | torch.Tensor,
    ) -> torch.Tensor:
        """The loss without touching the center (for gradient accumulation and evaluation).

        Args and Returns: as `forward`.
        """
        self._check_shapes(student_output, teacher_output)
        batch_size = teacher_output.shape[0] // self.num_global_crops
        num_crops = student_output.shape[0] // batch_size
        teacher_views = self.teacher_probabilities(teacher_output, teacher_temp).view(
            self.num_global_crops, batch_size, self.out_dim
        )
        with _float32_region(student_output.device):
            # One log-softmax per student row (one kernel for all crops), not one per pair: the sum over the
            # pairs v != i of <p_i, log q_v> is <p_i, sum_v log q_v> - <p_i, log q_i>.
            student_log_probs = F.log_softmax(student_output.float() / self.student_temp, dim=-1).view(
                num_crops, batch_size, self.out_dim
            )
            sum_of_student_log_probs = student_log_probs.sum(dim=0)  # (batch, out_dim)
            total = student_output.new_zeros((), dtype=torch.float32)
            num_terms = 0
            for index in range(self.num_global_crops):
                if index < num_crops:
                    other_views = sum_of_student_log_probs - student_log_probs[index]
                    num_terms += num_crops - 1
                else:  # fewer student crops than teacher views: every student crop is another view
                    other_views = sum_of_student_log_probs
                    num_terms += num_crops
                total = total - (teacher_views[index] * other_views).sum(dim=-1).mean()
        if num_terms == 0:
            raise ValueError(
                "the loss needs at least one (teacher view, student view) pair with different views"
            )
        return total / num_terms

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Move the center towards the mean teacher output of the (effective) batch.

        `c <- m * c + (1 - m) * mean(teacher_output)`, with the mean taken over every row on every
        process (an all-reduce when torch.distributed is initialised with more than one process; the row
        counts are reduced too, so processes may hold different numbers of rows).

        Args:
            teacher_output: `(rows, out_dim)`, or a list of such tensors (the micro-batches of one
                optimizer step); a list gives exactly one update over their concatenation.
        """
        tensors = [teacher_output] if isinstance(teacher_output, torch.Tensor) else list(teacher_output)
        if not tensors:
            raise ValueError("update_center needs at least one teacher output")
        for tensor in tensors:
            if tensor.dim() != 2 or tensor.shape[1] != self.out_dim:
                raise ValueError(
                    f"teacher outputs must have shape (rows, {self.out_dim}), got {tuple(tensor.shape)}"
                )
        with _float32_region(self.center.device):
            # Sum and row count travel in one tensor so that one all-reduce gives the global mean.
            sum_and_count = torch.zeros(1, self.out_dim + 1, dtype=torch.float32, device=self.center.device)
            for tensor in tensors:
                sum_and_count[:, :-1] += (
                    tensor.detach().float().sum(dim=0, keepdim=True).to(self.center.device)
                )
                sum_and_count[:, -1] += tensor.shape[0]
            if _distributed_world_size() > 1:
                torch_distributed.all_reduce(sum_and_count)
            batch_mean = sum_and_count[:, :-1] / sum_and_count[:, -1:]
            self.center.mul_(self.center_momentum).add_(batch_mean, alpha=1.0 - self.center_momentum)

    @torch.no_grad()
    def collapse_statistics(
        self, *, student_output: torch.Tensor, teacher_output: torch.Tensor, teacher_temp: float
    ) -> dict[str, float]:
        """Numbers that tell a learning run from a collapsing one, with the current center.

        Call it before the center update of the same batch (or with `compute` + `update_center`) to
        describe exactly the distributions the loss saw.

        Args: as `forward`.

        Returns:
            A dict of floats:
            - `teacher_entropy`: mean entropy (nats) of the centred, sharpened teacher distribution per
              sample; near 0 means collapse onto one dimension (paper §5.3).
            - `teacher_batch_entropy`: entropy of the teacher distribution averaged over the batch; near
              `log_out_dim` with `teacher_entropy` also near it means collapse to the uniform output.
            - `kl_teacher_student`: KL(teacher || student) averaged over the loss's view pairs, i.e. the
              loss minus the teacher entropy; near 0 means the student has nothing left to learn.
            - `center_norm`: L2 norm of the center.
            - `dimensions_in_use`: how many output dimensions are the teacher's argmax for some sample.
            - `log_out_dim`: ln K, the entropy of the uniform distribution, for reference.
        """
        return collapse_statistics(
            student_output=student_output,
            teacher_output=teacher_output,
            center=self.center,
            teacher_temp=teacher_temp,
            student_temp=self.student_temp,
            num_global_crops=self.num_global_crops,
        )

    def _check_shapes(self, student_output: torch.Tensor, teacher_output: torch.Tensor) -> None:
        for name, output in (("student_output", student_output), ("teacher_output", teacher_output)):
            if output.dim() != 2 or output.shape[1] != self.out_dim:
                raise ValueError(f"{name} must have shape (rows, {self.out_dim}), got {tuple(output.shape)}")
        teacher_views = _split_views(teacher_output, self.num_global_crops, "teacher_output")
        batch_size = teacher_views[0].shape[0]
        if batch_size == 0 or student_output.shape[0] % batch_size != 0:
            raise ValueError(
                f"student_output has {student_output.shape[0]} rows, not a whole number of crops of the "
                f"teacher's batch of {batch_size} images"
            )


def _cross_view_pairs(num_teacher_views: int, num_student_views: int) -> Iterator[tuple[int, int]]:
    for teacher_index in range(num_teacher_views):
        for student_index in range(num_student_views):
            if student_index != teacher_index:
                yield teacher_index, student_index


@torch.no_grad()
def collapse_statistics(
    *,
    student_output: torch.Tensor,
    teacher_output: torch.Tensor,
    center: torch.Tensor,
    teacher_temp: float,
    student_temp: float = 0.1,
    num_global_crops: int = 2,
) -> dict[str, float]:
    """Collapse statistics of one batch; see `DinoLoss.collapse_statistics` for their meaning.

    Args:
        student_output: `(num_crops * batch, out_dim)` student head outputs, view by view.
        teacher_output: `(num_global_crops * batch, out_dim)` teacher head outputs, view by view.
        center: `(1, out_dim)` the center used to centre the teacher outputs.
        teacher_temp: tau_t.
        student_temp: tau_s.
        num_global_crops: how many views the teacher sees.

    Returns:
        A dict of Python floats (one host sync for all of them).
    """
    with _float32_region(teacher_output.device):
        centred = teacher_output.float() - center.float().to(teacher_output.device)
        teacher_log_probs = F.log_softmax(centred / teacher_temp, dim=-1)
        teacher_probs = teacher_log_probs.exp()
        # 0 * log 0 is 0: xlogy keeps underflowed probabilities from producing NaN.
        teacher_entropy = -(teacher_probs * teacher_log_probs).sum(dim=-1).mean()
        mean_probs = teacher_probs.mean(dim=0)
        batch_entropy = -torch.special.xlogy(mean_probs, mean_probs).sum()

        teacher_views = _split_views(teacher_log_probs, num_global_crops, "teacher_output")
        num_crops = student_output.shape[0] // teacher_views[0].shape[0]
        student_views = F.log_softmax(student_output.float() / student_temp, dim=-1).chunk(num_crops)
        pair_divergences = [
            (teacher_views[i].exp() * (teacher_views[i] - student_views[v])).sum(dim=-1).mean()
            for i, v in _cross_view_pairs(num_global_crops, num_crops)
        ]
        kl = torch.stack(pair_divergences).mean() if pair_divergences else centred.new_zeros(())
        dimensions_in_use = torch.unique(centred.argmax(dim=-1)).numel()
        values = torch.stack(
            [teacher_entropy, batch_entropy, kl, center.float().norm().to(kl.device)]
        ).tolist()
    return {
        "teacher_entropy": values[0],
        "teacher_batch_entropy": values[1],
        "kl_teacher_student": values[2],
        "center_norm": values[3],
        "dimensions_in_use": dimensions_in_use,
        "log_out_dim": math.log(teacher_output.shape[1]),
    }
