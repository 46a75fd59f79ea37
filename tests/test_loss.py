"""DinoLoss against a naive, pair-by-pair implementation written here, and its center update."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.multiprocessing
import torch.nn.functional as F

from hf_dino.loss import DinoLoss, collapse_statistics

OUT_DIM = 64
BATCH = 3


def naive_dino_loss(
    student_output: torch.Tensor,
    teacher_output: torch.Tensor,
    center: torch.Tensor,
    teacher_temp: float,
    student_temp: float = 0.1,
    batch: int = BATCH,
) -> torch.Tensor:
    """The loss as the paper writes it: a double loop over (teacher view, student view), in float64."""
    student_views = student_output.double().chunk(student_output.shape[0] // batch)
    teacher_views = teacher_output.double().chunk(2)
    total, count = 0.0, 0
    for teacher_index, teacher_view in enumerate(teacher_views):
        teacher_probs = torch.softmax((teacher_view - center.double()) / teacher_temp, dim=-1)
        for student_index, student_view in enumerate(student_views):
            if student_index == teacher_index:
                continue
            student_log_probs = torch.log_softmax(student_view / student_temp, dim=-1)
            total = total + (-(teacher_probs * student_log_probs).sum(dim=-1)).mean()
            count += 1
    return total / count


def random_outputs(num_crops: int, seed: int = 0, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(num_crops * BATCH, OUT_DIM, generator=generator) * scale
    teacher = torch.randn(2 * BATCH, OUT_DIM, generator=generator) * scale
    return student, teacher


@pytest.mark.parametrize("num_crops", [2, 3, 10])
@pytest.mark.parametrize("teacher_temp", [0.04, 0.07])
def test_loss_matches_naive_double_loop(num_crops: int, teacher_temp: float) -> None:
    student, teacher = random_outputs(num_crops, seed=num_crops)
    loss_fn = DinoLoss(OUT_DIM)
    loss_fn.center.copy_(torch.randn(1, OUT_DIM) * 0.5)  # a non-zero center, as after some steps
    center_before = loss_fn.center.clone()

    loss = loss_fn(student_output=student, teacher_output=teacher, teacher_temp=teacher_temp)

    expected = naive_dino_loss(student, teacher, center_before, teacher_temp)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - expected.item()) / abs(expected.item()) < 1e-5


def test_single_student_crop_uses_the_one_cross_pair() -> None:
    student, teacher = random_outputs(1)
    loss = DinoLoss(OUT_DIM).compute(student_output=student, teacher_output=teacher, teacher_temp=0.05)
    teacher_probs = torch.softmax(teacher[BATCH:].double() / 0.05, dim=-1)
    expected = -(teacher_probs * torch.log_softmax(student.double() / 0.1, dim=-1)).sum(-1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_uniform_outputs_give_log_out_dim() -> None:
    # Collapse to a uniform output: every term is ln K (dino.md "loss stuck at ln K").
    loss = DinoLoss(OUT_DIM)(
        student_output=torch.zeros(4 * BATCH, OUT_DIM),
        teacher_output=torch.zeros(2 * BATCH, OUT_DIM),
        teacher_temp=0.04,
    )
    assert loss.item() == pytest.approx(math.log(OUT_DIM), rel=1e-6)


def test_center_is_an_ema_of_the_batch_mean() -> None:
    loss_fn = DinoLoss(OUT_DIM, center_momentum=0.9)
    _, first = random_outputs(2, seed=1)
    _, second = random_outputs(2, seed=2)
    student = torch.randn(2 * BATCH, OUT_DIM)

    loss_fn(student_output=student, teacher_output=first, teacher_temp=0.04)
    expected = 0.1 * first.mean(dim=0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, expected)

    loss_fn(student_output=student, teacher_output=second, teacher_temp=0.04)
    expected = 0.9 * expected + 0.1 * second.mean(dim=0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, expected)
    assert loss_fn.center.shape == (1, OUT_DIM)


def test_compute_leaves_center_alone_and_center_is_persistent() -> None:
    loss_fn = DinoLoss(OUT_DIM)
    student, teacher = random_outputs(4)
    loss_fn.compute(student_output=student, teacher_output=teacher, teacher_temp=0.04)
    assert torch.count_nonzero(loss_fn.center) == 0
    assert "center" in loss_fn.state_dict()


def test_loss_uses_the_center_from_before_its_update() -> None:
    loss_fn = DinoLoss(OUT_DIM)
    student, teacher = random_outputs(4, seed=3)
    loss = loss_fn(student_output=student, teacher_output=teacher, teacher_temp=0.04)
    expected = naive_dino_loss(student, teacher, torch.zeros(1, OUT_DIM), 0.04)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_update_center_from_a_list_equals_one_update_over_the_concatenation() -> None:
    micro_batches = [random_outputs(2, seed=seed)[1] for seed in range(4)]
    from_list, from_concatenation = DinoLoss(OUT_DIM), DinoLoss(OUT_DIM)
    from_list.center.fill_(0.25)
    from_concatenation.center.fill_(0.25)
    from_list.update_center(micro_batches)
    from_concatenation.update_center(torch.cat(micro_batches))
    torch.testing.assert_close(from_list.center, from_concatenation.center, rtol=1e-6, atol=1e-7)


def test_bfloat16_autocast_inputs_are_computed_in_float32() -> None:
    student, teacher = random_outputs(4, seed=5)
    student_bf16, teacher_bf16 = student.bfloat16(), teacher.bfloat16()
    loss_fn = DinoLoss(OUT_DIM)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = loss_fn(student_output=student_bf16, teacher_output=teacher_bf16, teacher_temp=0.04)
    assert loss.dtype == torch.float32
    assert loss_fn.center.dtype == torch.float32
    # Same numbers as a float64 computation on the bf16-rounded inputs: nothing was rounded inside.
    expected = naive_dino_loss(student_bf16.float(), teacher_bf16.float(), torch.zeros(1, OUT_DIM), 0.04)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(loss_fn.center, 0.1 * teacher_bf16.float().mean(0, keepdim=True))


def test_gradient_reaches_only_the_student() -> None:
    student, teacher = random_outputs(4, seed=6)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    loss = DinoLoss(OUT_DIM)(student_output=student, teacher_output=teacher, teacher_temp=0.04)
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.count_nonzero(student.grad) > 0

    # And it is the gradient of the naive loss.
    reference = student.detach().clone().requires_grad_(True)
    naive_dino_loss(reference, teacher.detach(), torch.zeros(1, OUT_DIM), 0.04).backward()
    torch.testing.assert_close(student.grad, reference.grad.float(), rtol=1e-4, atol=1e-7)


def test_bad_shapes_give_clear_errors() -> None:
    loss_fn = DinoLoss(OUT_DIM)
    with pytest.raises(ValueError, match="multiple of its 2 views"):
        loss_fn(
            student_output=torch.zeros(6, OUT_DIM), teacher_output=torch.zeros(5, OUT_DIM), teacher_temp=0.04
        )
    with pytest.raises(ValueError, match="whole number of crops"):
        loss_fn(
            student_output=torch.zeros(7, OUT_DIM), teacher_output=torch.zeros(6, OUT_DIM), teacher_temp=0.04
        )
    with pytest.raises(ValueError, match=r"\(rows, 64\)"):
        loss_fn(student_output=torch.zeros(6, 8), teacher_output=torch.zeros(6, OUT_DIM), teacher_temp=0.04)


def test_collapse_statistics() -> None:
    student, teacher = random_outputs(4, seed=7)
    center = torch.randn(1, OUT_DIM) * 0.1
    statistics = collapse_statistics(
        student_output=student, teacher_output=teacher, center=center, teacher_temp=0.07
    )

    probs = torch.softmax((teacher.double() - center.double()) / 0.07, dim=-1)
    entropy = -(probs * probs.log()).sum(-1).mean()
    mean_probs = probs.mean(0)
    batch_entropy = -(mean_probs * mean_probs.log()).sum()
    loss = naive_dino_loss(student, teacher, center, 0.07)
    assert statistics["teacher_entropy"] == pytest.approx(entropy.item(), rel=1e-5)
    assert statistics["teacher_batch_entropy"] == pytest.approx(batch_entropy.item(), rel=1e-5)
    # Cross-entropy = entropy + KL, over the same view pairs.
    assert statistics["kl_teacher_student"] == pytest.approx((loss - entropy).item(), rel=1e-4)
    assert statistics["center_norm"] == pytest.approx(center.norm().item(), rel=1e-6)
    assert statistics["dimensions_in_use"] == len(set((teacher - center).argmax(-1).tolist()))
    assert statistics["log_out_dim"] == pytest.approx(math.log(OUT_DIM))


def test_collapse_statistics_of_collapsed_outputs() -> None:
    # Every sample on one dimension: entropy 0, one dimension in use.
    teacher = torch.full((2 * BATCH, OUT_DIM), -50.0)
    teacher[:, 3] = 50.0
    loss_fn = DinoLoss(OUT_DIM)
    statistics = loss_fn.collapse_statistics(
        student_output=teacher.repeat(2, 1), teacher_output=teacher, teacher_temp=0.04
    )
    assert statistics["teacher_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert statistics["teacher_batch_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert statistics["dimensions_in_use"] == 1


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _distributed_center_worker(
    rank: int, world_size: int, port: int, parts: list[torch.Tensor], output_dir: str
) -> None:
    import torch.distributed

    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        loss_fn = DinoLoss(OUT_DIM)
        loss_fn.center.fill_(0.5)
        loss_fn.update_center(parts[rank])
        torch.save(loss_fn.center, f"{output_dir}/center-{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_center_is_all_reduced_over_two_processes(tmp_path) -> None:
    # Uneven row counts on purpose: the center must still be the mean over the combined batch.
    generator = torch.Generator().manual_seed(11)
    parts = [torch.randn(6, OUT_DIM, generator=generator), torch.randn(4, OUT_DIM, generator=generator) + 1.0]
    torch.multiprocessing.start_processes(
        _distributed_center_worker,
        args=(2, _free_port(), parts, str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    centers = [torch.load(tmp_path / f"center-{rank}.pt", weights_only=True) for rank in range(2)]

    single_process = DinoLoss(OUT_DIM)
    single_process.center.fill_(0.5)
    single_process.update_center(torch.cat(parts))
    for center in centers:
        torch.testing.assert_close(center, single_process.center, rtol=1e-6, atol=1e-6)


def test_loss_is_differentiable_through_a_linear_head() -> None:
    # A sanity check of the training use: a gradient step on the student lowers the loss.
    torch.manual_seed(0)
    head = torch.nn.Linear(8, OUT_DIM)
    inputs = torch.randn(4 * BATCH, 8)
    teacher = F.one_hot(torch.arange(2 * BATCH) % 5, OUT_DIM).float() * 5
    loss_fn = DinoLoss(OUT_DIM)
    first = loss_fn.compute(student_output=head(inputs), teacher_output=teacher, teacher_temp=0.1)
    first.backward()
    with torch.no_grad():
        for parameter in head.parameters():
            parameter -= 0.05 * parameter.grad
    second = loss_fn.compute(student_output=head(inputs), teacher_output=teacher, teacher_temp=0.1)
    assert second.item() < first.item()


@pytest.mark.gpu
def test_cuda_bf16_autocast_at_full_size_matches_float64() -> None:
    # The official sizes: K = 65536, 2 global + 10 local crops; bf16 head outputs under autocast.
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    generator = torch.Generator().manual_seed(0)
    batch, out_dim, num_crops = 16, 65536, 12
    student = (torch.randn(num_crops * batch, out_dim, generator=generator) * 3).bfloat16()
    teacher = (torch.randn(2 * batch, out_dim, generator=generator) * 3).bfloat16()
    loss_fn = DinoLoss(out_dim).cuda()
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        loss = loss_fn(student_output=student.cuda(), teacher_output=teacher.cuda(), teacher_temp=0.04)
    assert loss.dtype == torch.float32 and loss_fn.center.dtype == torch.float32

    expected = naive_dino_loss(student.float(), teacher.float(), torch.zeros(1, out_dim), 0.04, batch=batch)
    assert abs(loss.item() - expected.item()) / expected.item() < 1e-5
    torch.testing.assert_close(
        loss_fn.center.cpu(), 0.1 * teacher.float().mean(0, keepdim=True), rtol=1e-5, atol=1e-6
    )
