"""Proof that hf_dino learns: weighted k-NN of trained teachers against random init and raw pixels.

    # the README's demo over 3 seeds (embedded Fashion-MNIST subset, CPU)
    python scripts/benchmark_learning.py demo --seeds 0 1 2 --output results/learning_demo.json
    # full Fashion-MNIST (60k / 10k) from a local copy, k-NN against training time
    python scripts/benchmark_learning.py fashion-mnist --data-dir /usr/share/datasets/fashion-mnist \
        --time-budget-minutes 60 --output results/learning_fashion_mnist_cpu.json
    # the paper's ablations (§5.3, Fig. 7) on the demo recipe: no momentum teacher, no centring, no sharpening
    python scripts/benchmark_learning.py ablations --output results/learning_ablations.json
    # any list of recipe variants (a YAML/JSON list of option overrides), e.g. to tune a preset
    python scripts/benchmark_learning.py sweep --variants variants.yaml --output results/sweep.json

Every run is an ordinary `DinoTrainer` run of a preset with option overrides; it runs on whatever device
accelerate picks (CPU here, CUDA when present). Results are JSON: per run the trained teacher's, the
random-init network's and raw pixels' k-NN top-1, the training time and the final collapse statistics,
plus the device and library versions. `--data-dir` reads Fashion-MNIST from its original idx files (Debian's
`dataset-fashion-mnist` package installs them in /usr/share/datasets/fashion-mnist) instead of the subset
embedded in the package; `--train-size` / `--test-size` take deterministic subsets of it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The paper's ablations (§5.3, Fig. 7), as option overrides of the demo recipe.
ABLATIONS: dict[str, dict[str, Any]] = {
    "full DINO": {},
    # Teacher = student at every step: no momentum encoder. The paper: the run does not learn (collapse).
    "no momentum teacher": {"momentum_teacher": 0.0, "momentum_teacher_end": 0.0},
    # The center never moves from 0: sharpening alone collapses onto one dimension (entropy -> 0).
    "no centering": {"center_momentum": 1.0},
    # Teacher as soft as the student: centring alone drives the output to uniform (loss -> ln K).
    "no sharpening": {"warmup_teacher_temp": 0.1, "teacher_temp": 0.1},
}


def read_idx(path: Path) -> np.ndarray:
    """An MNIST-format idx file (gzipped or not) as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    dimensions = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dimensions))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dimensions).reshape(shape)


def load_fashion_mnist(
    data_dir: Path, split: str, size: int | None, seed: int = 123
) -> tuple[list, np.ndarray]:
    """Fashion-MNIST images (PIL, grayscale 28x28) and labels from its idx files; a seeded subset when `size`."""
    from PIL import Image

    prefix = "train" if split == "train" else "t10k"
    candidates = [data_dir / f"{prefix}-images-idx3-ubyte{suffix}" for suffix in (".gz", "")]
    image_path = next((path for path in candidates if path.is_file()), None)
    if image_path is None:
        raise FileNotFoundError(f"no {prefix}-images-idx3-ubyte[.gz] in {data_dir}")
    images = read_idx(image_path)
    labels = read_idx(image_path.with_name(image_path.name.replace("images-idx3", "labels-idx1")))
    if size is not None and size < len(images):
        order = np.random.default_rng(seed).permutation(len(images))[:size]
        images, labels = images[order], labels[order]
    return [Image.fromarray(image, mode="L") for image in images], labels.astype(np.int64)


def evaluation_data_from_images(train, train_labels, test, test_labels, arguments) -> Any:
    """Pre-processed k-NN data (the training's normalisation, global-crop size) from PIL images."""
    from hf_dino.evaluation.features import EvaluationTransform
    from hf_dino.training.online_evaluation import EvaluationData

    channels = int(arguments.model_config.get("num_channels", 3))
    mean = arguments.augmentation.get("mean")
    std = arguments.augmentation.get("std")
    if mean is None or len(mean) != channels:
        mean, std = (0.5,) * channels, (0.5,) * channels
    size = arguments.global_crop_size
    transform = EvaluationTransform(
        resize_size=size, crop_size=size, num_channels=channels, mean=mean, std=std
    ).build()

    def pixels(images):
        return torch.stack(
            [transform(image.convert("L") if channels == 1 else image.convert("RGB")) for image in images]
        )

    return EvaluationData(
        pixels(train),
        torch.as_tensor(train_labels),
        pixels(test),
        torch.as_tensor(test_labels),
        {
            "id": "fashion_mnist (idx files)",
            "split": "test",
            "train_split": "train",
            "revision": None,
            "label_column": "label",
        },
    )


def run_recipe(
    overrides: dict[str, Any], *, preset: str, data: dict[str, Any] | None, output_dir: Path
) -> dict[str, Any]:
    """Train one recipe and return its numbers."""
    from hf_dino.training.arguments import DinoTrainingArguments, load_preset
    from hf_dino.training.trainer import DinoTrainer

    values = load_preset(preset)
    values.update(overrides)
    values.update(output_dir=str(output_dir), report_to="none", save_steps=10**9, save_total_limit=1)
    arguments = DinoTrainingArguments(**values)
    kwargs: dict[str, Any] = {}
    if data is not None:
        kwargs["train_images"] = data["train_images"]
        if "evaluation" not in data:
            data["evaluation"] = evaluation_data_from_images(
                data["train_images"],
                data["train_labels"],
                data["test_images"],
                data["test_labels"],
                arguments,
            )
        kwargs["evaluation_data"] = data["evaluation"]
    started = time.time()
    trainer = DinoTrainer(arguments, **kwargs)
    trainer.setup()
    summary = trainer.train()
    wall = time.time() - started
    # accelerate keeps one process-wide state; reset it so that the next run may use other settings
    # (e.g. another mixed precision). Single-process benchmark runs only.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    knn_curve = []
    metrics = output_dir / "metrics.jsonl"
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if "knn" in record and str(record.get("evaluated", "")).startswith("step-"):
            knn_curve.append(
                {
                    "step": record["step"],
                    "seconds": record.get("elapsed_seconds"),
                    "top1": record["knn"]["top1"],
                }
            )
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    step_seconds = [
        [record["step"], record["elapsed_seconds"]]
        for record in records
        if "loss" in record and record.get("elapsed_seconds") is not None
    ]
    last = summary["last_metrics"] or {}
    return {
        "overrides": overrides,
        "steps": summary["step"],
        "total_batch_size": trainer.total_batch_size,
        "steps_per_epoch": trainer.steps_per_epoch,
        "train_seconds": summary["train_seconds"],
        "wall_seconds": wall,
        "knn_top1": summary["knn"]["top1"] if summary["knn"] else None,
        "random_init_top1": summary["knn_baselines"].get("random-init", {}).get("top1"),
        "raw_pixels_top1": summary["knn_baselines"].get("raw-pixels", {}).get("top1"),
        "knn_curve": knn_curve,
        "elapsed_by_step": step_seconds,
        "final": {
            key: last.get(key)
            for key in (
                "loss",
                "teacher_entropy",
                "teacher_batch_entropy",
                "kl_teacher_student",
                "dimensions_in_use",
                "log_out_dim",
            )
        },
    }


def fitted_epochs(
    common: dict[str, Any], preset: str, data: dict[str, Any], minutes: float
) -> tuple[int, int]:
    """Epochs that fill `minutes` of training, from the step time of a short probe of the same recipe.

    Returns (epochs, steps per epoch)."""
    probe_dir = Path(tempfile.mkdtemp(prefix="hf_dino_probe_"))
    probe = run_recipe(
        {**common, "max_time_minutes": min(2.0, minutes / 6), "eval_steps": None, "eval_baselines": False},
        preset=preset,
        data=data,
        output_dir=probe_dir,
    )
    # Steps per second over the last three quarters (skipping compilation, worker start-up, cuDNN tuning).
    logged = probe["elapsed_by_step"]
    if len(logged) < 4:
        raise RuntimeError(f"the probe logged only {len(logged)} steps; give it more time")
    (first_step, first_time), (last_step, last_time) = logged[len(logged) // 4], logged[-1]
    seconds_per_step = (last_time - first_time) / max(1, last_step - first_step)
    epochs = max(1, int(0.97 * 60 * minutes / seconds_per_step / probe["steps_per_epoch"]))
    print(
        f"probe: {probe['steps']} steps, {seconds_per_step * 1000:.1f} ms/step, "
        f"{probe['total_batch_size'] / seconds_per_step:.0f} images/s -> {epochs} epochs in {minutes} min",
        flush=True,
    )
    return epochs, probe["steps_per_epoch"]


def environment() -> dict[str, Any]:
    import transformers

    device = "cuda: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "device": device,
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def summarise_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    gains = [run["knn_top1"] - run["random_init_top1"] for run in runs]
    trained = [run["knn_top1"] for run in runs]
    random_init = [run["random_init_top1"] for run in runs]
    spread = lambda values: max(values) - min(values)  # noqa: E731
    return {
        "trained_mean": statistics.mean(trained),
        "random_init_mean": statistics.mean(random_init),
        "raw_pixels": runs[0]["raw_pixels_top1"],
        "gain_mean": statistics.mean(gains),
        "gain_min": min(gains),
        "trained_spread": spread(trained),
        "random_init_spread": spread(random_init),
        "max_train_seconds": max(run["train_seconds"] for run in runs),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=("demo", "fashion-mnist", "ablations", "sweep"))
    parser.add_argument("--output", required=True, help="results JSON file")
    parser.add_argument("--preset", default=None, help="recipe to start from (demo / fashion_mnist by mode)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="Fashion-MNIST idx files instead of the embedded subset"
    )
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--test-size", type=int, default=None)
    parser.add_argument(
        "--time-budget-minutes", type=float, default=None, help="fashion-mnist: stop training after this"
    )
    parser.add_argument(
        "--fit-epochs",
        action="store_true",
        help="fashion-mnist: size the epochs (and so the cosine schedules) to --time-budget-minutes from the "
        "step time of a short probe run of the same recipe, so that the run ends its schedule, not cut off",
    )
    parser.add_argument(
        "--variants", type=Path, default=None, help="sweep: YAML/JSON list of option overrides"
    )
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the training outputs here")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    options = parser.parse_args(argv)
    import yaml

    if options.threads:
        torch.set_num_threads(options.threads)
    common = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in options.set)}
    preset = options.preset or ("fashion_mnist" if options.mode == "fashion-mnist" else "demo")
    data = None
    if options.data_dir is not None or options.mode == "fashion-mnist":
        data_dir = options.data_dir or Path("/usr/share/datasets/fashion-mnist")
        train_images, train_labels = load_fashion_mnist(data_dir, "train", options.train_size)
        test_images, test_labels = load_fashion_mnist(data_dir, "test", options.test_size)
        data = {
            "train_images": train_images,
            "train_labels": train_labels,
            "test_images": test_images,
            "test_labels": test_labels,
        }
        common.setdefault("dataset", f"fashion_mnist idx files ({data_dir})")

    if options.mode == "demo":
        variants = {f"seed {seed}": {"seed": seed} for seed in options.seeds}
    elif options.mode == "fashion-mnist":
        variants = {"fashion_mnist": {}}
        if options.time_budget_minutes is not None:
            common["max_time_minutes"] = options.time_budget_minutes
            if options.fit_epochs:
                common["epochs"], steps_per_epoch = fitted_epochs(
                    common, preset, data, options.time_budget_minutes
                )
                # About eight points on the k-NN curve, unless the command line says otherwise.
                common.setdefault("eval_steps", max(1, common["epochs"] * steps_per_epoch // 8))
    elif options.mode == "ablations":
        variants = {name: {**overrides, "seed": options.seeds[0]} for name, overrides in ABLATIONS.items()}
    else:
        if options.variants is None:
            parser.error("sweep needs --variants FILE")
        listed = yaml.safe_load(options.variants.read_text())
        variants = {str(index): dict(item) for index, item in enumerate(listed)}
        variants = {item.pop("name", key): item for key, item in variants.items()}

    results: dict[str, Any] = {
        "mode": options.mode,
        "preset": preset,
        "common_overrides": common,
        "environment": environment(),
        "runs": {},
    }
    output = Path(options.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    work_dir = options.work_dir or Path(tempfile.mkdtemp(prefix="hf_dino_learning_"))
    for name, overrides in variants.items():
        print(f"=== {name}: {overrides}", flush=True)
        try:
            results["runs"][name] = run_recipe(
                {**common, **overrides},
                preset=preset,
                data=data,
                output_dir=work_dir / name.replace(" ", "_"),
            )
            results["runs"][name].pop("elapsed_by_step", None)
        except Exception as error:  # keep the other runs (a collapsing ablation may stop on a NaN)
            results["runs"][name] = {"overrides": overrides, "error": f"{type(error).__name__}: {error}"}
        print(json.dumps(results["runs"][name]), flush=True)
        output.write_text(json.dumps(results, indent=2))
    if options.mode == "demo":
        results["summary"] = summarise_seeds([run for run in results["runs"].values() if "error" not in run])
        print(json.dumps(results["summary"], indent=2))
    output.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
