"""The benchmark scripts: the baseline computes what hf_dino computes, and the scripts run and report sane figures.

The scripts live in `scripts/` (outside the package); they are imported from there. Everything runs on a tiny ViT
on one CPU thread in seconds; the GPU figures come from `scripts/gpu_checks.sh`.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import benchmark_activations  # noqa: E402
import benchmark_data  # noqa: E402
import benchmark_learning  # noqa: E402
import benchmark_step  # noqa: E402
import dino_baseline  # noqa: E402

from hf_dino import DinoConfig, DinoModel  # noqa: E402
from hf_dino.augmentation import MultiCropConfig, MultiCropGeometric  # noqa: E402
from hf_dino.loss import DinoLoss  # noqa: E402
from hf_dino.training.optimization import clip_gradients_per_parameter, update_teacher  # noqa: E402

TINY_CROPS = (32, 32, 16, 16, 16, 16)
TINY_ARGUMENTS = [
    "--model", "vit_tiny_patch16", "--out-dim", "256", "--global-size", "32", "--local-size", "16",
    "--local-crops", "4", "--batch-size", "2", "--warmup", "1", "--steps", "1", "--rounds", "2",
    "--device", "cpu", "--threads", "1",
] + [f"--override={key}={value}" for key, value in benchmark_step.TINY_OVERRIDES.items() if key != "out_dim"]  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed: int = 0) -> DinoModel:
    torch.manual_seed(seed)
    return DinoModel(DinoConfig.from_preset("vit_tiny_patch16", **benchmark_step.TINY_OVERRIDES)).train()


# ---------------------------------------------------------------------------------------------------------------
# FLOPs: the analytic count against the figures in the notes and against torch's flop counter
# ---------------------------------------------------------------------------------------------------------------
def test_analytic_flops_match_the_published_work_per_image():
    small = DinoConfig.from_preset("vit_small_patch16")
    ten_local = benchmark_step.analytic_step_flops(small, [224] * 2 + [96] * 10)
    eight_local = benchmark_step.analytic_step_flops(small, [224] * 2 + [96] * 8)
    tiny = benchmark_step.analytic_step_flops(
        DinoConfig.from_preset("vit_tiny_patch16"), [224] * 2 + [96] * 10
    )
    # dino.md, "Performance anchors": 123.8 / 113.8 GFLOP (ViT-S/16), 34.2 GFLOP (ViT-Ti/16), 9.20 and 1.62
    # GFLOP for one ViT-S/16 crop at 224 and 96 px, 44.6 MFLOP for the head.
    assert ten_local["total"] / 1e9 == pytest.approx(123.8, abs=0.1)
    assert eight_local["total"] / 1e9 == pytest.approx(113.8, abs=0.1)
    assert tiny["total"] / 1e9 == pytest.approx(34.2, abs=0.1)
    assert benchmark_step.vit_forward_flops(small, 224, 224) / 1e9 == pytest.approx(9.20, abs=0.01)
    assert benchmark_step.vit_forward_flops(small, 96, 96) / 1e9 == pytest.approx(1.62, abs=0.01)
    assert benchmark_step.head_flops(small) / 1e6 == pytest.approx(44.6, abs=0.1)


def test_flop_counter_agrees_with_the_analytic_count():
    model = tiny_model()
    analytic = benchmark_step.analytic_step_flops(model.config, TINY_CROPS)["total"]
    counted = benchmark_step.counted_step_flops(model, TINY_CROPS)
    # The analytic count leaves out norms and softmax and counts the patch embedding's input gradient, which is
    # never computed: a few percent on a model this small, under 1% at ViT-S/16 sizes.
    assert counted == pytest.approx(analytic, rel=0.05)


# ---------------------------------------------------------------------------------------------------------------
# The baseline and the fast path compute the same step
# ---------------------------------------------------------------------------------------------------------------
def test_baseline_network_reproduces_dino_model_outputs():
    model = tiny_model()
    baseline = dino_baseline.networks_like(model, drop_path_rate=0.0)
    crops = [torch.randn(3, 3, size, size) for size in TINY_CROPS]
    torch.testing.assert_close(baseline(crops), model.forward_with_head(crops), rtol=1e-5, atol=1e-5)
    # Weights round-trip to DinoModel names through hf_dino's converter (fused qkv split again).
    names = dino_baseline.dino_names(baseline.state_dict(), depth=2)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(names[key], value, rtol=0, atol=0)


def test_pairwise_and_fused_losses_agree():
    torch.manual_seed(1)
    batch, out_dim, crops = 3, 50, 6
    student = torch.randn(crops * batch, out_dim)
    teacher = torch.randn(2 * batch, out_dim)
    fused = DinoLoss(out_dim)
    fused.center.normal_()
    original = dino_baseline.PairwiseDinoLoss(out_dim, crops)
    original.center = fused.center.clone()
    expected = original(student, teacher, 0.04)  # also moves its center
    torch.testing.assert_close(
        fused(student_output=student, teacher_output=teacher, teacher_temp=0.04), expected
    )
    torch.testing.assert_close(fused.center, original.center)
    fused_again = DinoLoss(out_dim)
    fused_again.center.copy_(original.center)
    ablation = benchmark_step.pairwise_loss(fused_again, student, teacher, 0.04)
    torch.testing.assert_close(
        ablation, fused_again.compute(student_output=student, teacher_output=teacher, teacher_temp=0.04)
    )


def test_foreach_clipping_and_ema_equal_the_python_loops():
    torch.manual_seed(2)
    shapes = [(5, 4), (7,), (3, 3, 2), (11,)]
    first = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(shape)) for shape in shapes])
    second = torch.nn.ParameterList([torch.nn.Parameter(value.detach().clone()) for value in first])
    scales = [10.0, 0.01, 1.0, 5.0]  # some gradients above the threshold, some below
    for a, b, scale in zip(first, second, scales):
        a.grad = torch.randn_like(a) * scale
        b.grad = a.grad.clone()
    norms = dino_baseline.clip_gradients_with_host_sync(first, 3.0)
    device_norms = clip_gradients_per_parameter(list(second), 3.0)
    assert norms == pytest.approx([norm.item() for norm in device_norms])
    for a, b in zip(first, second):
        torch.testing.assert_close(a.grad, b.grad)
    assert max(a.grad.norm().item() for a in first) <= 3.0 + 1e-5

    teacher_loop = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(shape)) for shape in shapes])
    teacher_foreach = [value.detach().clone() for value in teacher_loop]
    dino_baseline.ema_python_loop(first, teacher_loop, 0.996)
    update_teacher(teacher_foreach, [value.detach() for value in first], 0.996)
    for a, b in zip(teacher_loop, teacher_foreach):
        torch.testing.assert_close(a.detach(), b)


def test_fast_path_gradients_equal_the_baseline_gradients():
    model = tiny_model()
    crops = [torch.randn(2, 3, size, size) for size in TINY_CROPS]
    baseline = dino_baseline.BaselineTrainer(model, num_crops=len(crops), use_fp16=False, drop_path_rate=0.0)
    fast = benchmark_step.FastTrainer(model, benchmark_step.FastOptions(), drop_path_rate=0.0)
    baseline.loss_fn(baseline.student(crops), baseline.teacher(crops[:2]), 0.04).backward()
    loss, _ = fast.forward_and_loss(crops, 0.04)
    loss.backward()
    official_gradients = {key: p.grad for key, p in baseline.student.named_parameters() if p.grad is not None}
    expected = dino_baseline.dino_names(official_gradients, depth=2)
    scale = max(gradient.norm().item() for gradient in expected.values())
    for key, parameter in fast.student.named_parameters():
        if parameter.grad is None:
            continue
        # The key bias has a true gradient of 0 (softmax ignores a constant per query): compare against the
        # largest gradient there instead of against its own rounding noise.
        tolerance = 1e-4 * max(expected[key].norm().item(), 1e-3 * scale)
        assert (parameter.grad - expected[key]).norm().item() <= tolerance, key


def test_fast_variant_names_compose_levers():
    cpu = torch.device("cpu")
    options = benchmark_step.fast_options("fast-packed-compile-no-recompute-no-sdpa", cpu, "reduce-overhead")
    assert (options.pack, options.compile, options.recompute, options.sdpa) == (True, True, False, False)
    assert options.compile_mode == "reduce-overhead" and options.precision == "fp32"
    assert benchmark_step.fast_options("fast", torch.device("cuda"), "default").precision == "bf16"
    assert benchmark_step.fast_options("fast-no-bf16", torch.device("cuda"), "default").precision == "fp32"
    for bad in ("fast-packd", "fast-no-nothing", "slow", "trainer-fast", "trainer-no-sdpa"):
        with pytest.raises(ValueError, match="unknown variant"):
            benchmark_step.check_variant_name(bad, cpu)
    assert benchmark_step.loop_options("trainer-packed-compile-no-recompute") == {
        "pack_crops": True,
        "compile": True,
        "recompute_activations": False,
    }


@pytest.mark.parametrize("variant", ["fast", "fast-packed", "trainer", "trainer-packed-no-recompute"])
def test_one_step_matches_the_baseline_in_float32(variant):
    report = benchmark_step.equivalence_check(
        variants=(variant,), steps=2, crop_sizes=TINY_CROPS, batch_size=4
    )
    result = report[variant]
    assert all(math.isfinite(loss) for loss in report["baseline_losses"])
    assert max(result["loss"]) < 1e-5
    assert result["center"] < 1e-5
    assert result["teacher"] < 1e-5
    # Adam's first updates are about lr * sign(gradient): rounding noise in near-zero gradients moves some
    # weights by a full step, so the student (which carries the whole update) agrees less tightly.
    assert result["student"] < 2e-3


def test_bf16_fast_path_stays_within_bf16_tolerance():
    report = benchmark_step.equivalence_check(
        variants=("fast",), steps=1, precision="bf16", crop_sizes=TINY_CROPS
    )
    assert report["fast"]["loss"][0] < 2e-2
    assert report["fast"]["center"] < 2e-2
    assert report["fast"]["teacher"] < 1e-4


# ---------------------------------------------------------------------------------------------------------------
# Synchronisation counting
# ---------------------------------------------------------------------------------------------------------------
def test_sync_counter_counts_host_reads_and_ignores_host_side_counters():
    value = torch.tensor([1.0, 2.0])
    step_counter = torch.tensor(3.0)
    with benchmark_step.HostSyncCounter(torch.device("cpu"), ignored=[step_counter]) as counter:
        value.sum().item()
        if value[0] > 0:
            pass
        value.tolist()
        torch.nonzero(value)
        step_counter.item()
    assert counter.counts == {"Tensor.item": 1, "Tensor.__bool__": 1, "Tensor.tolist": 1, "torch.nonzero": 1}
    value.sum().item()  # patches are gone
    assert counter.total == 4


# ---------------------------------------------------------------------------------------------------------------
# The scripts end to end
# ---------------------------------------------------------------------------------------------------------------
def test_benchmark_step_reports_sane_figures(tmp_path, capsys):
    output = tmp_path / "step.json"
    variants = "baseline,trainer,fast,fast-no-foreach,fast-packed"
    arguments = [*TINY_ARGUMENTS, "--variants", variants, "--profile", "baseline,fast", "--json", str(output)]
    assert benchmark_step.main(arguments) == 0
    results = json.loads(output.read_text())
    printed = capsys.readouterr().out
    assert "baseline" in printed and "[profile fast]" in printed
    assert results["environment"]["torch"] == torch.__version__
    assert results["flops"]["counter_over_analytic"] == pytest.approx(1.0, abs=0.05)
    entries = results["variants"]
    for name in variants.split(","):
        assert "error" not in entries[name], entries[name].get("traceback")
        assert entries[name]["images_per_second"] > 0
        assert len(entries[name]["round_seconds"]) == 2
        assert entries[name]["mfu_vs_measured_matmul"] > 0
    # The baseline reads every gradient norm and every clipping decision back, plus the loss: 2 per tensor + 1.
    model = tiny_model()
    baseline_tensors = len(dino_baseline.networks_like(model).state_dict()) - 1  # weight_g gets no gradient
    assert entries["baseline"]["syncs"]["per_step"] == 2 * baseline_tensors + 1
    assert entries["fast"]["syncs"]["per_step"] == 0
    assert entries["fast-packed"]["syncs"]["per_step"] == 0
    assert entries["trainer"]["syncs"]["per_step"] == 0
    assert entries["fast-no-foreach"]["syncs"]["per_step"] == 2 * sum(
        p.requires_grad for p in model.parameters()
    )
    assert entries["fast"]["speedup_over_baseline"] > 0
    assert entries["fast"]["compiled_graphs"] == 0
    # The profile: the operators' time split by category adds up; the fast path dispatches fewer operators than
    # the baseline (one log-softmax per crop, foreach clipping and EMA) and spends time in SDPA.
    for name in ("baseline", "fast"):
        profile = entries[name]["profile"]
        assert profile["steps_profiled"] == 3 and profile["counted"] == "aten operators"
        assert sum(profile["categories_ms_per_step"].values()) == pytest.approx(profile["busy_ms_per_step"])
        assert sum(profile["categories_share"].values()) == pytest.approx(1.0)
        assert profile["categories_ms_per_step"]["matmul"] > 0
        assert len(profile["top"]) == 25
    assert entries["fast"]["profile"]["count_per_step"] < entries["baseline"]["profile"]["count_per_step"]
    assert entries["fast"]["profile"]["categories_ms_per_step"]["attention"] > 0
    assert "attention" not in entries["baseline"]["profile"]["categories_ms_per_step"]
    assert "profile" not in entries["trainer"]


def test_profile_categories_and_device_activity():
    names = {
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1": "matmul",
        "nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NNT": "matmul",
        "triton_tem_fused_addmm_0": "matmul",
        "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>": "attention",
        "triton_poi_fused__to_copy_add_convert_element_type_gelu_mul_3": "pointwise",
        "triton_per_fused_native_layer_norm_native_layer_norm_backward_7": "norms, softmax, reductions",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>": (
            "optimizer, clipping, EMA"
        ),
        "Memcpy HtoD (Pageable -> Device)": "copies and fills",
        "void at::native::vectorized_elementwise_kernel<4, at::native::BinaryFunctor<MulFunctor<float>>>": (
            "pointwise"
        ),
        "cudaStreamSynchronize": "other",
    }
    for name, category in names.items():
        assert benchmark_step.profile_category(name) == category, name
    assert benchmark_step._merged_length([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (5.5, 5.7)]) == 4.0

    def event(name, start, end, device_type, annotation=False):
        span = SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start)
        return SimpleNamespace(
            name=name, time_range=span, device_type=device_type, is_user_annotation=annotation
        )

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [
        event("cudaLaunchKernel", 0, 5, cpu),
        event("## Call CompiledFxGraph ##", 0, 100, cuda, annotation=True),
        event("triton_poi_fused_add_0", 10, 30, cuda),
        event("nvjet_gemm", 20, 60, cuda),  # another stream, overlapping
        event("Memset (Device)", 80, 90, cuda),
    ]
    durations, busy, count = benchmark_step.device_activity(events)
    assert durations == [("triton_poi_fused_add_0", 20e-6), ("nvjet_gemm", 40e-6), ("Memset (Device)", 10e-6)]
    assert busy == pytest.approx(60e-6) and count == 3


def test_activation_count_matches_the_recomputed_tensors(tmp_path):
    # ViT-Ti/16 on 2x32 + 2x16 crops: 2 x (1 + 4) + 2 x (1 + 1) = 14 student tokens per image, 12 blocks of width
    # 192 and MLP width 768. Per token and block, recomputing the layer norms' outputs frees their two bf16
    # copies and the two float32 statistics of each norm, 2 x (2 x 192 + 2 x 4) bytes; recomputing the GELU
    # frees its bf16 output, 2 x 768 bytes. The count must find exactly that, per image.
    output = tmp_path / "activations.json"
    arguments = [
        "--model",
        "vit_tiny_patch16",
        "--global-size",
        "32",
        "--local-size",
        "16",
        "--local-crops",
        "2",
    ]
    assert benchmark_activations.main([*arguments, "--batch-sizes", "1,2", "--json", str(output)]) == 0
    variants = json.loads(output.read_text())["variants"]
    per_image = {name: figures["bytes_per_image"] for name, figures in variants.items()}
    tokens_times_blocks = 14 * 12
    assert per_image["hf_dino, norms kept"] - per_image["hf_dino"] == tokens_times_blocks * 2 * (
        2 * 192 + 2 * 4
    )
    assert (
        per_image["hf_dino, nothing recomputed"] - per_image["hf_dino, norms kept"]
        == tokens_times_blocks * 2 * 768
    )
    assert per_image["hf_dino"] < 0.7 * per_image["baseline"]


def test_check_command_prints_json(capsys):
    assert benchmark_step.main(["--check", "--device", "cpu", "--threads", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fp32"]["fast"]["center"] < 1e-5


def test_benchmark_data_per_core_figures(tmp_path):
    paths = benchmark_data.make_jpegs(tmp_path, count=6)
    assert len(paths) == 6
    images = [path.read_bytes() for path in paths]
    from PIL import Image

    for path in paths:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.size in benchmark_data.JPEG_SIZES
    config = benchmark_data.MultiCropConfig(local_crops_number=2)
    original = benchmark_data.PILPipeline(2)(images[0], 0)
    assert [tuple(crop.shape) for crop in original] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 2
    assert original[0].dtype == torch.float32
    ours = benchmark_data.HfDinoPipeline(config, "accelerator")(images[0], 0)
    assert [tuple(crop.shape) for crop in ours] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 2
    assert ours[0].dtype == torch.uint8  # the photometric stage is left to the accelerator
    results = benchmark_data.per_core_benchmarks(images, config, seconds=0.05, batch_size=2)
    for name in (
        "pil-baseline",
        "hf_dino-geometric",
        "hf_dino-workers",
        "hf_dino-cpu-batched",
        "decode-only",
        "device-decode-worker",
    ):
        assert results[name]["images_per_cpu_second"] > 0, results[name]
    assert results["pil-baseline"]["over_pil_baseline"] == 1.0


def test_benchmark_data_end_to_end_on_cpu(tmp_path):
    arguments = [
        "--images", "4", "--image-dir", str(tmp_path), "--skip-per-core", "--end-to-end", "--device", "cpu",
        "--workers", "0", "--global-size", "32", "--local-size", "16", "--local-crops", "2", "--batch-size", "2",
        "--warmup", "1", "--steps", "1", "--rounds", "2", "--loader-batches", "1",
        "--json", str(tmp_path / "data.json"), "--model", "vit_tiny_patch16",
    ] + [f"--override={key}={value}" for key, value in benchmark_step.TINY_OVERRIDES.items()]  # fmt: skip
    assert benchmark_data.main(arguments) == 0
    end = json.loads((tmp_path / "data.json").read_text())["end_to_end"]
    for key in (
        "synthetic_images_per_second",
        "synthetic_uint8_with_photometric_images_per_second",
        "real_jpeg_images_per_second",
        "real_jpeg_device_decode_images_per_second",
        "real_over_synthetic",
        "photometric_over_synthetic",
        "real_over_photometric",
        "real_device_decode_over_synthetic",
    ):
        assert end[key] > 0, end
    # Interleaved rounds, and the ratios pair the runs of one round.
    rounds = end["rounds_images_per_second"]
    assert [len(rates) for rates in rounds.values()] == [2, 2, 2], rounds
    pairs = [real / synthetic for real, synthetic in zip(rounds["real_jpeg"], rounds["synthetic"])]
    assert end["real_over_synthetic"] == pytest.approx(sum(pairs) / 2), end
    assert 0 <= end["real_loader_wait_fraction"] < 1, end
    assert 0 <= end["real_device_decode_loader_wait_fraction"] < 1, end
    # JPEGs decoded and cut as one batch (here on the CPU): the crops of hf_dino's per-image CPU path.
    agreement = end["device_decode_crops_vs_cpu"]
    assert agreement["share_within_2_levels"] > 0.99 and agreement["mean_grey_levels"] < 0.5, agreement
    assert end["loader_only_device_decode"]["images_per_second"] > 0
    assert end["loader_only_pil_baseline"]["images_per_second"] > 0
    assert end["loader_only_hf_dino_geometric"]["images_per_second"] > 0


def test_fitted_epochs_fill_the_budget_from_the_probe_step_time(monkeypatch):
    # A probe logging 100 ms per step after a slow start (the first quarter is skipped): 10 minutes at 97% are
    # 5,820 steps, 24 epochs of 234 steps (5,616 steps); the probe runs a sixth of the budget, 2 minutes at most.
    calls = []

    def probe(overrides, *, preset, data, output_dir):
        calls.append(overrides)
        times = [[step, 5.0 + 0.1 * step] for step in range(1, 41)]
        times[0][1] = 4.0  # compilation / start-up
        return {"elapsed_by_step": times, "steps": 40, "steps_per_epoch": 234, "total_batch_size": 256}

    monkeypatch.setattr(benchmark_learning, "run_recipe", probe)
    epochs, steps_per_epoch = benchmark_learning.fitted_epochs({"lr": 0.1}, "fashion_mnist", {}, 10.0)
    assert (epochs, steps_per_epoch) == (24, 234)
    assert calls[0]["max_time_minutes"] == pytest.approx(10.0 / 6) and calls[0]["lr"] == 0.1
    assert calls[0]["eval_steps"] is None and calls[0]["eval_baselines"] is False
    benchmark_learning.fitted_epochs({}, "fashion_mnist", {}, 60.0)
    assert calls[1]["max_time_minutes"] == 2.0


def test_gpu_checks_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPTS / "gpu_checks.sh")], check=True)


@pytest.mark.slow
def test_gpu_checks_dry_run_on_cpu(tmp_path):
    """The whole GPU script with tiny models on the CPU (a few minutes): every measurement writes its JSON."""
    environment = {
        "PATH": "/usr/bin:/bin",
        "PYTHON": sys.executable,
        "DEVICE": "cpu",
        "SMOKE": "1",
        "OUT": str(tmp_path),
    }
    environment["BUDGET_SECONDS"] = "900"
    subprocess.run(["bash", str(SCRIPTS / "gpu_checks.sh")], check=True, env=environment, timeout=1200)
    names = {path.name for path in tmp_path.iterdir()}
    assert len(names) <= 8
    assert {"gpu_checks.log", "check.json", "data.json", "step_vit_small_10.json"} <= names
    for path in tmp_path.glob("step_*.json"):
        variants = json.loads(path.read_text())["variants"]
        for name, entry in variants.items():
            if "compile" not in name:  # may run out of the dry run's time budget while compiling
                assert "images_per_second" in entry, (path.name, name, entry.get("error"))
    profiled = json.loads((tmp_path / "step_vit_small_10.json").read_text())["variants"]
    assert profiled["fast-packed"]["profile"]["busy_ms_per_step"] > 0, profiled["fast-packed"]["profile"]
    check = json.loads((tmp_path / "check.json").read_text())
    assert check["fp32"]["fast"]["center"] < 1e-4
    assert "real_over_synthetic" in json.loads((tmp_path / "data.json").read_text())["end_to_end"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_path_matches_the_baseline_on_cuda():
    for precision, tolerance in (("fp32", 1e-4), ("bf16", 2e-2)):
        report = benchmark_step.equivalence_check(
            device="cuda", precision=precision, variants=("fast", "trainer")
        )
        for variant in ("fast", "trainer"):
            assert max(report[variant]["loss"]) < tolerance
            assert report[variant]["center"] < tolerance


@pytest.mark.parametrize(
    "start, length, size, flip",
    [(5, 33, 16, False), (0, 50, 16, True), (7, 9, 16, False), (3, 16, 16, True), (11, 1, 4, False)],
)
def test_resize_weights_are_torch_antialiased_bicubic(start, length, size, flip):
    # Downscaling (stretched kernel cut at the crop's edges), upscaling, identity, one pixel; float input.
    values = torch.rand(2, 60, generator=torch.Generator().manual_seed(0)) * 255
    weights = benchmark_data.resize_weights(
        torch.tensor(start), torch.tensor(length), size, 60, flips=torch.tensor(flip)
    )
    assert weights.shape == (size, 60)
    assert torch.all(weights[:, :start] == 0) and torch.all(weights[:, start + length :] == 0)
    region = values[:, start : start + length].reshape(1, 2, 1, length)
    expected = torch.nn.functional.interpolate(region, size=(1, size), mode="bicubic", antialias=True)
    expected = expected.reshape(2, size)
    if flip:
        expected = expected.flip(-1)
    torch.testing.assert_close(values @ weights.T, expected, atol=1e-3, rtol=1e-5)


def test_crop_batch_cuts_the_boxes_of_the_per_image_crops(monkeypatch):
    # Two images of different sizes (padded to one batch), any boxes and flips: the batched matrices give the
    # per-image crops of the same draws, up to the uint8 path's rounding between its two passes.
    config = MultiCropConfig(global_crop_size=32, local_crop_size=16, local_crops_number=4)
    geometric = MultiCropGeometric(config)
    photo = torch.from_numpy(np.asarray(benchmark_data.bundled_photos()[0])).permute(2, 0, 1)
    images = [photo[:, :80, :90].contiguous(), photo[:, 100:150, 40:104].contiguous()]
    boxes = torch.tensor(
        [geometric.sample_boxes(image.shape[1], image.shape[2], random.Random(seed)) for seed, image in
         enumerate(images)]
    )  # fmt: skip
    assert boxes.shape == (2, 6, 5) and 0 < boxes[..., 4].sum() < 12  # some flipped, some not
    crops = benchmark_data.crop_batch(geometric, images, boxes)
    assert [tuple(crop.shape) for crop in crops] == [(2, 3, 32, 32)] * 2 + [(2, 3, 16, 16)] * 4
    for index, image in enumerate(images):
        expected = geometric(image, random.Random(index))  # the same draws, in the same order
        for crop, reference in zip(crops, expected):
            difference = (crop[index].int() - reference.int()).abs()
            assert crop.dtype == torch.uint8
            assert difference.max() <= 6 and difference.float().mean() < 0.5, difference.max()
    # Bounded intermediates: one image per product gives the same crops.
    monkeypatch.setattr(benchmark_data, "CROP_BATCH_ELEMENTS", 1)
    for chunked, whole in zip(benchmark_data.crop_batch(geometric, images, boxes), crops):
        assert torch.equal(chunked, whole)
    with pytest.raises(ValueError, match="bicubic"):
        bilinear = MultiCropGeometric(MultiCropConfig(interpolation="bilinear", local_crops_number=4))
        benchmark_data.crop_batch(bilinear, images, boxes)


@pytest.mark.slow
def test_photometric_dispatch_counts_operations_eager_and_compiled():
    # The compiled stage dispatches fewer operations per batch than either eager path (a CPU stands in).
    config = MultiCropConfig(global_crop_size=32, local_crop_size=16, local_crops_number=2)
    results = benchmark_data.photometric_dispatch(config, 2, torch.device("cpu"))
    for name in ("eager-subset", "eager-sync-free", "compiled", "compiled-convolution"):
        assert results[name]["aten_ops_per_batch"] > 0 and results[name]["wall_ms_per_batch"] > 0
    assert results["compiled"]["aten_ops_per_batch"] < results["eager-sync-free"]["aten_ops_per_batch"]
    # The blur's convolutions stay library calls under compilation; its taps fuse away.
    assert results["compiled"]["aten_ops_per_batch"] < results["compiled-convolution"]["aten_ops_per_batch"]
    assert "photometric stage, batch 2" in benchmark_data.format_table({"photometric": results})
