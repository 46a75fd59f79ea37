"""Publishing to the Hugging Face Hub: trained models, model cards, evaluation results and training state.

    hf-dino push OUTPUT_DIR REPO_ID [--private] [--revision BRANCH] [--no-training-state]

pushes a training output folder (see the layout in `hf_dino.training`) as one commit:

    README.md            the model card, rendered from model_cards/dino_model_card.md, with the evaluation
                         results of OUTPUT_DIR/eval/*.json as `model-index` (merged with those already there)
    config.json, model.safetensors, configuration_dino.py, modeling_dino.py
                         the teacher `DinoModel` with its code: `AutoModel.from_pretrained(repo,
                         trust_remote_code=True)` works without hf_dino installed
    backbone/            a stock transformers checkpoint of the backbone: `AutoModel.from_pretrained(repo,
                         subfolder="backbone")` needs no remote code
    training_state/      the latest checkpoint folder (student, teacher, centre, optimizer, schedule position)
                         for `hf-dino train --resume hub:REPO_ID`
    images/              loss and k-NN curves shown in the card
    training_config.json, metrics.jsonl
                         the resolved recipe and the per-step log of the run

Transient failures (HTTP 5xx, 408, 429, dropped connections, timeouts) are retried with exponential back-off;
a push that still fails raises `PushError`, whose message names the command to run to retry. A push only
reads the output folder: files are staged in a temporary folder (hard links where possible), so a failed
push leaves every local file as it was. `BackgroundPusher` runs pushes in a thread for the training loop.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

CARD_TEMPLATE_NAME = "dino_model_card.md"
DEFAULT_COMMIT_MESSAGE = "Upload DINO teacher, backbone export and training state"
DEFAULT_LICENSE = "apache-2.0"
# Statuses worth retrying: timeouts, rate limits and server-side errors (the same set huggingface_hub retries).
TRANSIENT_STATUS_CODES = (408, 429, 500, 502, 503, 504)
# Network exception class names of httpx / httpcore / requests / urllib3 that mean "try again later".
TRANSIENT_ERROR_NAMES = frozenset(
    {
        "TimeoutException",
        "NetworkError",
        "RemoteProtocolError",
        "ConnectError",
        "ReadError",
        "WriteError",
        "ConnectTimeout",
        "ReadTimeout",
        "ChunkedEncodingError",
        "ConnectionError",
        "Timeout",
    }
)
CHECKPOINT_NAME = re.compile(r"^step-(\d+)$")
TRAINER_STATE_FILE = "trainer_state.json"
# Files at least this large are hard-linked into the staging folder instead of copied.
LINK_THRESHOLD_BYTES = 1 << 20

# The evaluation protocols of hf_dino.evaluation -> (Hub task type, task name, prefix of metric names).
# The Hub's model-index groups results by task type and dataset only (a group has one task name), so the
# protocol is told apart by the metric name: "k-NN top-1 accuracy" and "Linear probe top-1 accuracy".
PROTOCOL_TASKS = {
    "knn": ("image-classification", "Image classification with frozen features", "k-NN"),
    "linear": ("image-classification", "Image classification with frozen features", "Linear probe"),
    "attention_masks": (
        "image-segmentation",
        "Attention masks (60% of the attention mass)",
        "Attention-mask",
    ),
}
# Result keys of evaluation records -> (metric type, metric name after the protocol's prefix).
METRIC_NAMES = {
    "top1": ("accuracy", "top-1 accuracy"),
    "top5": ("top_5_accuracy", "top-5 accuracy"),
    "jaccard": ("jaccard", "Jaccard index"),
}

ResultT = TypeVar("ResultT")


class PushError(RuntimeError):
    """A push that failed for good; the message says what failed and the command to run to retry."""

    def __init__(self, message: str, retry_command: str) -> None:
        super().__init__(message)
        self.retry_command = retry_command


@dataclass
class PushResult:
    """What a successful push produced."""

    repo_id: str
    revision: str
    commit_oid: str
    commit_url: str
    paths: list[str] = field(default_factory=list)
    attempts: int = 1


# ----------------------------------------------------------------------------------------------- retries
def _error_chain(error: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__  # explicit wrapping only: `raise Wrapper(...) from error`


def is_transient_error(error: BaseException) -> bool:
    """Whether retrying later may succeed: a timeout, a dropped connection or a 408/429/5xx answer.

    Checks the exception and its causes (huggingface_hub wraps upload errors), by status code for HTTP
    errors and by class name for network errors, so that it works with httpx and requests based clients.
    """
    from huggingface_hub.errors import HfHubHTTPError

    for link in _error_chain(error):
        if isinstance(link, HfHubHTTPError):
            response = getattr(link, "response", None)
            status = getattr(response, "status_code", None)
            if status is not None:
                return status in TRANSIENT_STATUS_CODES
        if isinstance(link, (ConnectionError, TimeoutError)):
            return True
        if any(cls.__name__ in TRANSIENT_ERROR_NAMES for cls in type(link).__mro__):
            module = type(link).__module__.split(".")[0]
            if module in ("httpx", "httpx2", "httpcore", "requests", "urllib3"):
                return True
    return False


def call_with_retries(
    action: Callable[[], ResultT],
    *,
    description: str,
    max_retries: int,
    initial_backoff_seconds: float,
    max_backoff_seconds: float = 60.0,
) -> tuple[ResultT, int]:
    """Run `action`, retrying transient errors with exponential back-off (wait, 2 wait, 4 wait, ...).

    Returns:
        (the action's result, the number of attempts it took). Non-transient errors, and the last transient
        one, are raised unchanged.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            return action(), attempt
        except Exception as error:
            if attempt > max_retries or not is_transient_error(error):
                raise
            wait = min(initial_backoff_seconds * 2 ** (attempt - 1), max_backoff_seconds)
            logger.warning(
                "%s failed (attempt %d of %d): %s; retrying in %.1f s",
                description,
                attempt,
                max_retries + 1,
                _short_error(error),
                wait,
            )
            time.sleep(wait)


def _short_error(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def retry_command(
    output_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    include_training_state: bool = True,
) -> str:
    """The `hf-dino push` command line that repeats a push."""
    arguments = ["hf-dino", "push", str(output_dir), repo_id]
    if private:
        arguments.append("--private")
    if revision is not None:
        arguments += ["--revision", revision]
    if not include_training_state:
        arguments.append("--no-training-state")
    return shlex.join(arguments)


# ----------------------------------------------------------------------------------- the training output
def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a training output, or None.

    Follows the agreed layout (`hf_dino.training.checkpointing`, not imported here because the training
    package pulls in the whole trainer): `checkpoints/latest` names the newest checkpoint, and a
    `checkpoints/step-N` folder is complete once its `trainer_state.json` exists (it is written last).
    """
    checkpoints_dir = Path(output_dir) / "checkpoints"
    pointer = checkpoints_dir / "latest"
    if pointer.is_file():
        candidate = checkpoints_dir / pointer.read_text().strip()
        if (candidate / TRAINER_STATE_FILE).is_file():
            return candidate
    if not checkpoints_dir.is_dir():
        return None
    complete = [
        (int(match.group(1)), path)
        for path in checkpoints_dir.iterdir()
        if (match := CHECKPOINT_NAME.match(path.name)) and (path / TRAINER_STATE_FILE).is_file()
    ]
    return max(complete)[1] if complete else None


def find_teacher_dir(output_dir: str | Path, checkpoint: Path | None = None) -> Path:
    """The teacher to publish: the newer of `OUTPUT_DIR/teacher` (the final teacher) and the latest
    checkpoint's `teacher/` (during training, before the final teacher exists).

    Args:
        output_dir: the training output folder.
        checkpoint: the latest checkpoint, when the caller has already looked it up.
    """
    output_dir = Path(output_dir)
    checkpoint = checkpoint if checkpoint is not None else find_latest_checkpoint(output_dir)
    candidates = [output_dir / "teacher"] + ([checkpoint / "teacher"] if checkpoint is not None else [])
    candidates = [folder for folder in candidates if (folder / "config.json").is_file()]
    if not candidates:
        raise FileNotFoundError(
            f"{output_dir} holds no teacher model: expected {output_dir / 'teacher'}/config.json or a "
            f"checkpoint in {output_dir / 'checkpoints'}/step-*/teacher (is this an hf-dino train output folder?)"
        )
    # max() keeps the first of equals: the final teacher wins a tie.
    return max(candidates, key=lambda folder: (folder / "config.json").stat().st_mtime)


def load_evaluation_records(output_dir: str | Path) -> list[dict[str, Any]]:
    """Every record in `OUTPUT_DIR/eval/*.json` (a file may hold one record or a list), oldest first."""
    records = []
    for path in sorted((Path(output_dir) / "eval").glob("*.json")):
        try:
            content = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            logger.warning("skipping unreadable evaluation record %s: %s", path, error)
            continue
        for record in content if isinstance(content, list) else [content]:
            if isinstance(record, dict) and isinstance(record.get("results"), dict):
                records.append(record)
            else:
                logger.warning("skipping %s: not an evaluation record (no 'results' object)", path)
    return sorted(records, key=lambda record: str(record.get("created", "")))


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """The per-step records of `OUTPUT_DIR/metrics.jsonl` (unparsable lines, e.g. a torn last line, skipped)."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _find_key(tree: Any, names: Iterable[str], *, allow_empty: bool = False) -> tuple[bool, Any]:
    """(found, value) of the first key in `names` anywhere in a nested dict, searched breadth first.

    Empty values (None, "", [], {}) count as absent unless `allow_empty`.
    """
    names = list(names)
    queue = [tree]
    while queue:
        node = queue.pop(0)
        if isinstance(node, dict):
            for name in names:
                if name in node and (allow_empty or node[name] not in (None, "", [], {})):
                    return True, node[name]
            queue.extend(value for value in node.values() if isinstance(value, dict))
    return False, None


def _find_value(tree: Any, names: Iterable[str]) -> Any:
    """The first non-empty value of a key in `names` anywhere in a nested dict, or None."""
    return _find_key(tree, names)[1]


# ------------------------------------------------------------------------------------- evaluation results
def _dataset_type(dataset_id: str) -> str:
    """A Hub dataset id as is; a local path by its folder name (the Hub needs an id, not a path)."""
    if os.sep in dataset_id and (dataset_id.startswith((os.sep, ".", "~")) or os.path.exists(dataset_id)):
        return Path(dataset_id.rstrip(os.sep)).name or "local"
    return dataset_id


def evaluation_record_to_results(record: dict[str, Any]) -> list[Any]:
    """One hf_dino evaluation record -> `huggingface_hub.EvalResult`s, one per numeric result.

    The record's protocol becomes the task, its dataset id / split / revision the dataset, each numeric
    entry of `results` a metric, and its parameters the metric's `args` (shown on the Hub).
    """
    from huggingface_hub import EvalResult

    protocol = str(record.get("protocol", "unknown"))
    task_type, task_name, prefix = PROTOCOL_TASKS.get(
        protocol, ("image-feature-extraction", protocol, protocol)
    )
    dataset = record.get("dataset") or {}
    dataset_id = str(dataset.get("id") or "unknown")
    parameters = {
        key: value
        for key, value in (record.get("parameters") or {}).items()
        if isinstance(value, (str, int, float, bool)) or value is None
    }
    results = []
    for key, value in record["results"].items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        metric_type, metric_name = METRIC_NAMES.get(key, (key, key.replace("_", " ")))
        metric_name = f"{prefix} {metric_name}"
        results.append(
            EvalResult(
                task_type=task_type,
                task_name=task_name,
                dataset_type=_dataset_type(dataset_id),
                dataset_name=dataset_id,
                dataset_split=dataset.get("split"),
                dataset_revision=dataset.get("revision"),
                metric_type=metric_type,
                metric_name=metric_name,
                metric_value=float(value),
                metric_args=parameters or None,
            )
        )
    return results


def _result_key(result: Any) -> tuple:
    """Results for the same task, dataset and metric replace each other (only fields that survive the
    model-index round trip: the task name is shared by a whole task-and-dataset group)."""
    return (*result.unique_identifier, result.metric_type, result.metric_name)


def merge_eval_results(existing: Iterable[Any], new: Iterable[Any]) -> list[Any]:
    """Existing results updated with new ones: same (task, dataset, metric) -> the new value replaces the
    old one in place; anything else is kept (old) or appended (new)."""
    merged: dict[tuple, Any] = {}
    for result in [*existing, *new]:
        merged[_result_key(result)] = result  # dicts keep first-insertion order, values update in place
    return list(merged.values())


# ---------------------------------------------------------------------------------------------- curves
def _series(metrics: list[dict[str, Any]], pattern: str) -> tuple[str, list[tuple[float, float]]] | None:
    """The first numeric metric whose name matches `pattern`, as (name, [(step, value), ...])."""
    names = sorted({key for record in metrics for key in record if re.search(pattern, key)})
    for name in names:
        points = []
        for index, record in enumerate(metrics):
            value = record.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                step = record.get("step", index)
                points.append((float(step if isinstance(step, (int, float)) else index), float(value)))
        if points:
            return name, points
    return None


def plot_curve(points: list[tuple[float, float]], path: Path, *, title: str, y_label: str) -> None:
    """A line plot saved as PNG: matplotlib when installed, else a plain PIL drawing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on training machines
        import matplotlib.pyplot as plt
    except ImportError:
        _plot_with_pil(points, path, title=title, y_label=y_label)
        return
    figure, axes = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    axes.plot(
        [x for x, _ in points],
        [y for _, y in points],
        linewidth=1.5,
        marker="o" if len(points) < 30 else None,
    )
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.set_ylabel(y_label)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _tick_label(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def _plot_with_pil(points: list[tuple[float, float]], path: Path, *, title: str, y_label: str) -> None:
    from PIL import Image, ImageDraw, ImageFont

    width, height = 640, 360
    left, right, top, bottom = 70, 20, 40, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    xs, ys = [x for x, _ in points], [y for _, y in points]
    x_min, x_max = min(xs), max(xs)
    y_min, y_max = min(ys), max(ys)
    if x_max == x_min:
        x_min, x_max = x_min - 1, x_max + 1
    if y_max == y_min:
        y_min, y_max = y_min - abs(y_min) * 0.1 - 1e-6, y_max + abs(y_max) * 0.1 + 1e-6

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - x_min) / (x_max - x_min) * (width - left - right),
            height - bottom - (y - y_min) / (y_max - y_min) * (height - top - bottom),
        )

    for tick in range(5):  # grid lines and tick labels
        fraction = tick / 4
        y_value = y_min + fraction * (y_max - y_min)
        _, y_pixel = to_pixel(x_min, y_value)
        draw.line([(left, y_pixel), (width - right, y_pixel)], fill=(230, 230, 230))
        draw.text((4, y_pixel - 6), _tick_label(y_value), fill="black", font=font)
        x_value = x_min + fraction * (x_max - x_min)
        x_pixel, _ = to_pixel(x_value, y_min)
        draw.line([(x_pixel, top), (x_pixel, height - bottom)], fill=(230, 230, 230))
        draw.text((x_pixel - 10, height - bottom + 6), _tick_label(x_value), fill="black", font=font)
    draw.rectangle([(left, top), (width - right, height - bottom)], outline="black")
    pixels = [to_pixel(x, y) for x, y in points]
    if len(pixels) > 1:
        draw.line(pixels, fill=(31, 119, 180), width=2)
    for x_pixel, y_pixel in pixels if len(pixels) < 30 else []:
        draw.ellipse([(x_pixel - 3, y_pixel - 3), (x_pixel + 3, y_pixel + 3)], fill=(31, 119, 180))
    draw.text((width // 2, 14), title, fill="black", font=font, anchor="mt")
    draw.text((width // 2, height - 14), "step", fill="black", font=font, anchor="mb")
    draw.text((4, 8), y_label, fill=(90, 90, 90), font=font)
    image.save(path)


def plot_training_curves(metrics: list[dict[str, Any]], images_dir: Path) -> list[dict[str, str]]:
    """Loss and k-NN accuracy curves from metrics.jsonl records, as PNGs in `images_dir`.

    Returns:
        [{"title", "path"}] with paths relative to the repo root, for the card.
    """
    curves = []
    wanted = (
        ("loss_curve.png", r"^(train[/_])?loss$", "DINO loss", "loss"),
        ("knn_curve.png", r"knn.*top_?1|top_?1.*knn", "k-NN top-1 accuracy during training", "top-1"),
    )
    for file_name, pattern, title, y_label in wanted:
        series = _series(metrics, pattern)
        if series is None:
            continue
        images_dir.mkdir(parents=True, exist_ok=True)
        plot_curve(
            series[1], images_dir / file_name, title=f"{title} (metrics.jsonl: {series[0]})", y_label=y_label
        )
        curves.append({"title": title, "path": f"images/{file_name}"})
    return curves


# ------------------------------------------------------------------------------------------ model card
def default_card_template() -> Path:
    """model_cards/dino_model_card.md: beside the package when installed with it, else in the checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (
        here / "model_cards" / CARD_TEMPLATE_NAME,
        here.parents[1] / "model_cards" / CARD_TEMPLATE_NAME,
    ):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"the model card template {CARD_TEMPLATE_NAME} was not found beside {here}")


def _count_parameters(weights_path: Path) -> tuple[int, int]:
    """(backbone, head) parameter counts read from a safetensors header (no tensor is loaded)."""
    from safetensors import safe_open

    backbone = head = 0
    with safe_open(str(weights_path), framework="numpy") as weights:
        for name in weights.keys():  # noqa: SIM118 - safe_open objects are not iterable
            count = math.prod(weights.get_slice(name).get_shape())
            if name.startswith("head."):
                head += count
            elif not name.endswith(("running_mean", "running_var", "num_batches_tracked")):
                backbone += count
    return backbone, head


def _human_count(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return str(count)


def _architecture(backbone: dict[str, Any]) -> tuple[str, int, int | None]:
    """(readable name, feature size, patch size or None) of a DinoConfig's backbone_config dict."""
    if backbone.get("model_type") == "resnet":
        depth = sum(backbone.get("depths") or [])
        name = "ResNet-50" if backbone.get("depths") == [3, 4, 6, 3] else f"ResNet ({depth} blocks)"
        return name, int((backbone.get("hidden_sizes") or [2048])[-1]), None
    hidden_size = int(backbone.get("hidden_size", 0))
    patch = backbone.get("patch_size", 16)
    patch = int(patch[0] if isinstance(patch, (list, tuple)) else patch)
    depth = backbone.get("num_hidden_layers")
    size = {192: "Ti", 384: "S", 768: "B", 1024: "L"}.get(hidden_size) if depth == 12 else None
    name = f"ViT-{size}/{patch}" if size else f"ViT ({depth} layers, width {hidden_size}, patch {patch})"
    return name, hidden_size, patch


def _format_duration(seconds: float) -> str:
    hours, remainder = divmod(int(round(seconds)), 3600)
    minutes, seconds = divmod(remainder, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"


def _hardware_text(training_config: dict[str, Any], metrics: list[dict[str, Any]]) -> str:
    lines = []
    for label, names in (
        ("Hardware", ("hardware", "device_name", "gpu_name", "accelerator")),
        ("Processes", ("num_processes", "world_size")),
        ("Mixed precision", ("mixed_precision",)),
    ):
        value = _find_value(training_config, names)
        if value is not None:
            lines.append(f"- {label}: {value}")
    elapsed = None
    if metrics:
        elapsed = _find_value(metrics[-1], ("elapsed_seconds", "elapsed", "time_elapsed", "train_runtime"))
        if elapsed is None:
            first, last = metrics[0].get("timestamp", metrics[0].get("time")), metrics[-1].get("timestamp")
            last = metrics[-1].get("time") if last is None else last
            if isinstance(first, (int, float)) and isinstance(last, (int, float)) and last >= first:
                elapsed = last - first
    if isinstance(elapsed, (int, float)):
        lines.append(f"- Training time: {_format_duration(float(elapsed))} (wall clock, from metrics.jsonl)")
    return "\n".join(lines) if lines else "Not recorded in the training output."


def _training_data_text(training_config: dict[str, Any]) -> tuple[str, str | None]:
    """(markdown, Hub dataset id or None) describing the training data named in the recipe."""
    found, dataset = _find_key(training_config, ("dataset", "dataset_name", "dataset_id"), allow_empty=True)
    if found and dataset in (None, ""):  # hf-dino train's default: the subset shipped in the package
        return (
            "The Fashion-MNIST subset embedded in hf_dino (Zalando Research's Fashion-MNIST: 28x28 grayscale "
            "images of clothing), without its labels.",
            None,
        )
    if isinstance(dataset, dict):
        dataset_id = dataset.get("id") or dataset.get("path") or dataset.get("name")
        details = ", ".join(f"{key}: `{value}`" for key, value in dataset.items() if value not in (None, ""))
    else:
        dataset_id = dataset
        split = _find_value(training_config, ("dataset_split",))
        details = f"split `{split}`" if split else ""
    if dataset_id is None:
        return "The dataset is not named in `training_config.json`; see the recipe below.", None
    dataset_id = str(dataset_id)
    is_hub_id = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", dataset_id) is not None and not os.path.exists(dataset_id)
    text = f"Images of `{dataset_id}`" + (f" ({details})" if details else "") + ", without their labels."
    return text, dataset_id if is_hub_id else None


def _results_table(results: list[Any]) -> list[dict[str, str]]:
    rows = []
    for result in results:
        parameters = ", ".join(f"{key}={value}" for key, value in (result.metric_args or {}).items())
        rows.append(
            {
                "task": result.task_name or result.task_type,
                "dataset": result.dataset_name,
                "split": result.dataset_split or "",
                "metric": result.metric_name or result.metric_type,
                "value": f"{result.metric_value:.4g}"
                if isinstance(result.metric_value, float)
                else result.metric_value,
                "parameters": parameters,
            }
        )
    return rows


def render_model_card(
    output_dir: str | Path,
    repo_id: str,
    *,
    teacher_dir: str | Path,
    eval_results: list[Any],
    curves: list[dict[str, str]],
    license: str = DEFAULT_LICENSE,  # noqa: A002 - the Hub's metadata field name
    template_path: str | Path | None = None,
) -> Any:
    """The model card (`huggingface_hub.ModelCard`) of a training output, with `eval_results` as model-index.

    Args:
        output_dir: the training output folder (training_config.json, metrics.jsonl are read if present).
        repo_id: the Hub repo the card describes (used in the code snippets).
        teacher_dir: the DinoModel folder published at the repo root.
        eval_results: `EvalResult`s for the card metadata (already merged with the Hub's).
        curves: [{"title", "path"}] images to show (see `plot_training_curves`).
        license: a Hub license id.
        template_path: a Jinja template; defaults to model_cards/dino_model_card.md.
    """
    from huggingface_hub import ModelCard, ModelCardData

    from hf_dino import __version__

    output_dir, teacher_dir = Path(output_dir), Path(teacher_dir)
    config = json.loads((teacher_dir / "config.json").read_text())
    backbone = config.get("backbone_config") or {}
    architecture, embed_dim, patch_size = _architecture(backbone)
    training_config_path = output_dir / "training_config.json"
    training_config = json.loads(training_config_path.read_text()) if training_config_path.is_file() else {}
    metrics = read_metrics(output_dir)
    training_data, dataset_id = _training_data_text(training_config)
    backbone_parameters = head_parameters = 0
    if (teacher_dir / "model.safetensors").is_file():
        backbone_parameters, head_parameters = _count_parameters(teacher_dir / "model.safetensors")
    image_size = int(backbone.get("image_size", 224))
    last_step = metrics[-1].get("step") if metrics else None
    trained_steps = "unknown (no metrics.jsonl)"
    if isinstance(last_step, int):
        trained_steps = f"{last_step + 1} optimizer steps"  # steps are counted from 0 in metrics.jsonl
    model_name = repo_id.split("/")[-1]
    card_data = ModelCardData(
        model_name=model_name,
        license=license,
        library_name="transformers",
        pipeline_tag="image-feature-extraction",
        tags=["dino", "self-supervised-learning", "image-feature-extraction", "vision", "hf_dino"],
        datasets=[dataset_id] if dataset_id else None,
        eval_results=eval_results or None,
    )
    is_fashion_mnist = "fashion" in training_data.lower() and "mnist" in training_data.lower()
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path or default_card_template()),
        model_name=model_name,
        repo_id=repo_id,
        hf_dino_version=__version__,
        architecture=architecture,
        embed_dim=embed_dim,
        patch_size=patch_size,
        patch_grid=f"{image_size // patch_size}x{image_size // patch_size}" if patch_size else "",
        image_size=image_size,
        out_dim=config.get("out_dim", "?"),
        backbone_parameters=_human_count(backbone_parameters),
        head_parameters=_human_count(head_parameters),
        color_mode="L" if int(backbone.get("num_channels", 3)) == 1 else "RGB",
        trained_steps=trained_steps,
        training_data=training_data,
        hardware=_hardware_text(training_config, metrics),
        curves=curves,
        recipe_json=json.dumps(training_config, indent=2, sort_keys=True, default=str)
        if training_config
        else "{}",
        results_table=_results_table(eval_results),
        license=license,
        data_limitation=(
            "Fashion-MNIST is 28x28 grayscale product photos, so the features say little about natural images."
            if is_fashion_mnist
            else "they inherit the biases and the domain of that data and may transfer poorly to other domains."
        ),
        data_license=(
            "Fashion-MNIST is released by Zalando Research under the MIT license."
            if is_fashion_mnist
            else "check the license of the training dataset before any use the weights' license alone would allow."
        ),
    )


def _remote_eval_results(api: Any, repo_id: str, *, revision: str | None, token: str | None) -> list[Any]:
    """The `model-index` results of the card already on the Hub ([] when there is no repo or card)."""
    from huggingface_hub import ModelCard, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        path = hf_hub_download(repo_id, "README.md", revision=revision, token=token, endpoint=api.endpoint)
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
        return []
    try:
        card = ModelCard(Path(path).read_text(encoding="utf-8"), ignore_metadata_errors=True)
    except Exception as error:  # an unparsable card on the Hub must not block a push; it gets replaced
        logger.warning("could not read the model card on the Hub (%s); its results are not kept", error)
        return []
    return list(card.data.eval_results or [])


# ------------------------------------------------------------------------------------------- staging
def _link_or_copy(source: Path, destination: Path, *, link: bool) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    if link and source.stat().st_size >= LINK_THRESHOLD_BYTES:
        try:
            os.link(source, destination)  # instant and no extra disk; the data survives checkpoint rotation
            return
        except OSError:
            pass  # another file system, or no hard links: copy
    shutil.copy2(source, destination)


def _stage_tree(source: Path, destination: Path, *, link: bool) -> None:
    for path in sorted(source.rglob("*")):
        if path.is_file():
            _link_or_copy(path, destination / path.relative_to(source), link=link)


def _has_remote_code(folder: Path) -> bool:
    config = json.loads((folder / "config.json").read_text())
    auto_map = config.get("auto_map") or {}
    code_files = {value.split(".")[0] + ".py" for value in auto_map.values() if isinstance(value, str)}
    return "AutoModel" in auto_map and all((folder / name).is_file() for name in code_files)


def stage_push_folder(
    output_dir: str | Path,
    repo_id: str,
    staging_dir: str | Path,
    *,
    existing_results: list[Any],
    include_training_state: bool = True,
    license: str = DEFAULT_LICENSE,  # noqa: A002 - the Hub's metadata field name
) -> Path:
    """Lay out the repo content in `staging_dir` (see the module docstring); reads `output_dir` only.

    Returns:
        The staging folder.
    """
    from hf_dino.convert import export_backbone

    output_dir, staging_dir = Path(output_dir), Path(staging_dir)
    checkpoint = find_latest_checkpoint(
        output_dir
    )  # looked up once: training may write a newer one meanwhile
    teacher_dir = find_teacher_dir(output_dir, checkpoint)
    in_checkpoint = checkpoint is not None and teacher_dir.parent == checkpoint  # written once, never edited
    if _has_remote_code(teacher_dir):
        _stage_tree(teacher_dir, staging_dir, link=in_checkpoint)
    else:
        # Re-save through the registered DinoModel so that the code files and auto_map are written.
        from hf_dino import DinoModel

        DinoModel.from_pretrained(teacher_dir).save_pretrained(staging_dir)
        for path in teacher_dir.iterdir():
            if path.is_file() and not (staging_dir / path.name).exists():
                _link_or_copy(path, staging_dir / path.name, link=False)
    center_file = "dino_center.safetensors"  # beside the final teacher, at the root of a checkpoint
    if in_checkpoint and not (staging_dir / center_file).exists() and (checkpoint / center_file).is_file():
        _link_or_copy(checkpoint / center_file, staging_dir / center_file, link=True)
    export_backbone(teacher_dir, staging_dir / "backbone")
    if include_training_state:
        if checkpoint is None:
            raise FileNotFoundError(
                f"{output_dir / 'checkpoints'} holds no step-* checkpoint to publish as training_state/; "
                "push with --no-training-state to publish the model alone"
            )
        _stage_tree(checkpoint, staging_dir / "training_state", link=True)
    for name in ("training_config.json", "metrics.jsonl"):
        if (output_dir / name).is_file():
            _link_or_copy(output_dir / name, staging_dir / name, link=False)
    records = load_evaluation_records(output_dir)
    local_results = [result for record in records for result in evaluation_record_to_results(record)]
    curves = plot_training_curves(read_metrics(staging_dir), staging_dir / "images")
    card = render_model_card(
        staging_dir,  # the staged training_config.json and metrics.jsonl: one consistent snapshot
        repo_id,
        teacher_dir=staging_dir,
        eval_results=merge_eval_results(existing_results, local_results),
        curves=curves,
        license=license,
    )
    card.save(staging_dir / "README.md")
    return staging_dir


# --------------------------------------------------------------------------------------------- pushing
def _commit_folder(
    api: Any,
    staging_dir: Path,
    repo_id: str,
    *,
    revision: str,
    commit_message: str,
    managed_folders: tuple[str, ...],
) -> Any:
    """One commit adding every staged file and deleting stale files in `managed_folders` (so an old
    checkpoint's leftovers never mix with the new one); other files already in the repo stay."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    staged = sorted(
        path.relative_to(staging_dir).as_posix() for path in staging_dir.rglob("*") if path.is_file()
    )
    remote = api.list_repo_files(repo_id, revision=revision)
    stale = [
        path
        for path in remote
        if path not in staged and any(path.startswith(folder + "/") for folder in managed_folders)
    ]
    operations = [CommitOperationDelete(path_in_repo=path) for path in stale]
    operations += [
        CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(staging_dir / path)) for path in staged
    ]
    return api.create_commit(repo_id, operations=operations, commit_message=commit_message, revision=revision)


def push_training_output(
    output_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    include_training_state: bool = True,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    license: str = DEFAULT_LICENSE,  # noqa: A002 - the Hub's metadata field name
    max_retries: int = 5,
    initial_backoff_seconds: float = 2.0,
) -> PushResult:
    """Publish a training output folder to the Hub repo `repo_id` in one commit (layout: module docstring).

    Args:
        output_dir: an `hf-dino train` output folder.
        repo_id: "namespace/name" of a model repo; created (private if `private`) when it does not exist.
        private: create the repo private (an existing repo keeps its visibility).
        token: a Hub token; defaults to HF_TOKEN / the token saved by `hf auth login`.
        revision: the branch to push to (created from main if missing); "main" when None.
        include_training_state: also publish the latest checkpoint as `training_state/`.
        commit_message: the commit's title.
        license: the Hub license id written in the card.
        max_retries: retries of each network step after a transient error.
        initial_backoff_seconds: the first wait between retries; doubled at each retry (capped at 60 s).

    Returns:
        A `PushResult` with the commit sha and URL.

    Raises:
        PushError: the push failed (after retries, for transient errors); the message names the command to
            retry with. Local files are never modified.
        FileNotFoundError: `output_dir` is not a training output folder.
    """
    from huggingface_hub import HfApi

    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise FileNotFoundError(f"the training output folder {output_dir} does not exist")
    find_teacher_dir(output_dir)  # fail early and clearly, before any network call
    if include_training_state and find_latest_checkpoint(output_dir) is None:
        raise FileNotFoundError(
            f"{output_dir / 'checkpoints'} holds no complete checkpoint to publish as training_state/; "
            "push with --no-training-state to publish the model alone"
        )
    if "/" not in repo_id.strip("/"):
        raise ValueError(f"repo id must look like 'namespace/name', got {repo_id!r}")
    branch = revision or "main"
    command = retry_command(
        output_dir, repo_id, private=private, revision=revision, include_training_state=include_training_state
    )
    api = HfApi(token=token)
    attempts = 0

    def network_step(action: Callable[[], ResultT], description: str) -> ResultT:
        nonlocal attempts
        result, used = call_with_retries(
            action,
            description=description,
            max_retries=max_retries,
            initial_backoff_seconds=initial_backoff_seconds,
        )
        attempts = max(attempts, used)
        return result

    try:
        network_step(lambda: api.create_repo(repo_id, private=private, exist_ok=True), f"creating {repo_id}")
        if branch != "main":
            network_step(
                lambda: api.create_branch(repo_id, branch=branch, exist_ok=True), f"creating {branch}"
            )
        existing = network_step(
            lambda: _remote_eval_results(api, repo_id, revision=branch, token=token), "reading the model card"
        )
        with tempfile.TemporaryDirectory(prefix="hf_dino_push_") as staging:
            staging_dir = stage_push_folder(
                output_dir,
                repo_id,
                Path(staging) / "repo",
                existing_results=existing,
                include_training_state=include_training_state,
                license=license,
            )
            managed = ("backbone", "images") + (("training_state",) if include_training_state else ())
            commit = network_step(
                lambda: _commit_folder(
                    api,
                    staging_dir,
                    repo_id,
                    revision=branch,
                    commit_message=commit_message,
                    managed_folders=managed,
                ),
                f"committing to {repo_id}",
            )
            paths = sorted(
                path.relative_to(staging_dir).as_posix() for path in staging_dir.rglob("*") if path.is_file()
            )
    except FileNotFoundError:
        raise  # a local problem (not a training output, a checkpoint rotated away while staging): as is
    except Exception as error:
        transient = is_transient_error(error)
        retries = f" after {max_retries + 1} attempts" if transient else ""
        raise PushError(
            f"pushing {output_dir} to the Hub repo {repo_id} failed{retries}: {_short_error(error)}\n"
            f"No local file was changed. To retry, run:\n  {command}",
            command,
        ) from error
    return PushResult(
        repo_id=repo_id,
        revision=branch,
        commit_oid=commit.oid,
        commit_url=commit.commit_url,
        paths=paths,
        attempts=max(attempts, 1),
    )


def push_evaluation_results(
    repo_id: str,
    records: Iterable[dict[str, Any]],
    *,
    token: str | None = None,
    revision: str | None = None,
    max_retries: int = 5,
    initial_backoff_seconds: float = 2.0,
) -> list[Any]:
    """Add evaluation records to the `model-index` of a repo's card, keeping the results already there.

    Returns:
        The card's results after the update.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, hf_hub_download

    api = HfApi(token=token)
    new = [result for record in records for result in evaluation_record_to_results(record)]

    def update() -> list[Any]:
        path = hf_hub_download(repo_id, "README.md", revision=revision, token=token, endpoint=api.endpoint)
        card = ModelCard(Path(path).read_text(encoding="utf-8"), ignore_metadata_errors=True)
        merged = merge_eval_results(card.data.eval_results or [], new)
        card.data.eval_results = merged
        card.data.model_name = card.data.model_name or repo_id.split("/")[-1]
        operation = CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode())
        api.create_commit(
            repo_id, operations=[operation], commit_message="Update evaluation results", revision=revision
        )
        return merged

    merged, _ = call_with_retries(
        update,
        description=f"updating the card of {repo_id}",
        max_retries=max_retries,
        initial_backoff_seconds=initial_backoff_seconds,
    )
    return merged


# ----------------------------------------------------------------------------------------- resuming
def download_training_state(
    repo_id: str, revision: str | None = None, *, token: str | None = None, max_retries: int = 5
) -> Path:
    """Download `training_state/` of a repo pushed by `hf-dino push` (into the Hugging Face cache).

    Args:
        repo_id: "namespace/name", optionally written "hub:namespace/name".
        revision: a branch, tag or commit sha; the default branch when None.
        token: a Hub token for private repos.

    Returns:
        The local checkpoint folder (student/, teacher/, dino_center.safetensors, training_state/,
        trainer_state.json), ready for `hf-dino train --resume`.
    """
    from huggingface_hub import snapshot_download

    repo_id = repo_id.removeprefix("hub:")
    snapshot, _ = call_with_retries(
        lambda: snapshot_download(
            repo_id, revision=revision, allow_patterns=["training_state/**"], token=token
        ),
        description=f"downloading the training state of {repo_id}",
        max_retries=max_retries,
        initial_backoff_seconds=2.0,
    )
    checkpoint = Path(snapshot) / "training_state"
    if not checkpoint.is_dir():
        raise FileNotFoundError(
            f"the Hub repo {repo_id} has no training_state/ folder (was it pushed with --no-training-state?)"
        )
    return checkpoint


def resolve_resume_checkpoint(value: str, *, token: str | None = None) -> Path:
    """A `--resume` value -> a local checkpoint folder: a local path as is, or a Hub repo ("hub:ns/name",
    "ns/name", optionally "@revision") downloaded with `download_training_state`."""
    if not value.startswith("hub:") and Path(value).exists():
        return Path(value)
    reference = value.removeprefix("hub:")
    repo_id, _, revision = reference.partition("@")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id) is None:
        raise FileNotFoundError(
            f"--resume {value!r} is neither an existing folder nor a Hub repo id (ns/name)"
        )
    return download_training_state(repo_id, revision or None, token=token)


# --------------------------------------------------------------------------------- training-loop pusher
class BackgroundPusher:
    """Pushes a training output folder from a background thread, so training never waits on the network.

    One push runs at a time; a push requested while another runs waits, and a newer request replaces a
    waiting one (newest wins: it publishes the latest checkpoint anyway). Errors are logged and kept in
    `errors`, never raised into the training loop. Call `wait()` at the end of training. In a distributed
    run, only the main process should own a pusher.

    Example:
        pusher = BackgroundPusher("me/dino-vits16")
        ...  # after each checkpoint
        pusher.submit(output_dir)
        ...  # at the end
        pusher.submit(output_dir, commit_message="Final model")
        pusher.wait()
    """

    def __init__(
        self,
        repo_id: str,
        *,
        push_function: Callable[..., PushResult] = push_training_output,
        **push_options: Any,
    ) -> None:
        self.repo_id = repo_id
        self.push_function = push_function
        self.push_options = push_options
        self.results: list[PushResult] = []
        self.errors: list[Exception] = []
        self._condition = threading.Condition()
        self._pending: dict[str, Any] | None = None
        self._busy = False
        self._thread: threading.Thread | None = None

    def submit(self, output_dir: str | Path, *, commit_message: str | None = None) -> None:
        """Request a push of `output_dir` (returns at once)."""
        request: dict[str, Any] = {"output_dir": Path(output_dir)}
        if commit_message is not None:
            request["commit_message"] = commit_message
        with self._condition:
            if self._pending is not None:
                logger.info("a newer push request replaces one that had not started")
            self._pending = request
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="hf-dino-push", daemon=True)
                self._thread.start()
            self._condition.notify_all()

    def _work(self) -> None:
        while True:
            with self._condition:
                if self._pending is None:
                    return  # nothing left: the thread ends; the next submit starts a new one
                request, self._pending = self._pending, None
                self._busy = True
            try:
                output_dir = request.pop("output_dir")
                result = self.push_function(output_dir, self.repo_id, **{**self.push_options, **request})
                self.results.append(result)
                logger.info("pushed %s to %s (%s)", output_dir, self.repo_id, result.commit_url)
            except Exception as error:  # never into the training loop: log it and keep training
                self.errors.append(error)
                logger.error("background push to %s failed: %s", self.repo_id, error)
            finally:
                with self._condition:
                    self._busy = False
                    self._condition.notify_all()

    @property
    def busy(self) -> bool:
        with self._condition:
            return self._busy or self._pending is not None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no push runs or waits. Returns False if `timeout` seconds passed first."""
        with self._condition:
            return self._condition.wait_for(lambda: not self._busy and self._pending is None, timeout)


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-dino push",
        description=(
            "Publish an hf-dino training output folder to the Hugging Face Hub in one commit: the teacher "
            "DinoModel with its code and a model card at the repo root, a stock transformers backbone in "
            "backbone/, and the latest checkpoint in training_state/ for continued pretraining. "
            "The token comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT selects another Hub."
        ),
    )
    parser.add_argument("output_dir", type=Path, help="training output folder (as written by hf-dino train)")
    parser.add_argument("repo_id", help="model repo to push to, 'namespace/name' (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument(
        "--revision", default=None, help="branch to push to (created from main); default main"
    )
    parser.add_argument(
        "--no-training-state",
        dest="include_training_state",
        action="store_false",
        help="publish the model only, without training_state/ (the checkpoint with optimizer state)",
    )
    parser.add_argument("--commit-message", default=DEFAULT_COMMIT_MESSAGE, help="title of the commit")
    parser.add_argument(
        "--license", default=DEFAULT_LICENSE, help="Hub license id for the card (default: %(default)s)"
    )
    parser.add_argument(
        "--max-retries", type=int, default=5, help="retries after transient errors (5xx, dropped connections)"
    )
    parser.add_argument(
        "--retry-wait", type=float, default=2.0, help="seconds before the first retry; doubled each time"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("hf_dino").setLevel(logging.INFO)  # our progress and retries, not every HTTP request
    started = datetime.datetime.now()
    try:
        result = push_training_output(
            arguments.output_dir,
            arguments.repo_id,
            private=arguments.private,
            revision=arguments.revision,
            include_training_state=arguments.include_training_state,
            commit_message=arguments.commit_message,
            license=arguments.license,
            max_retries=arguments.max_retries,
            initial_backoff_seconds=arguments.retry_wait,
        )
    except (PushError, FileNotFoundError, ValueError) as error:
        print(f"hf-dino push: error: {error}", file=sys.stderr)
        return 1
    seconds = (datetime.datetime.now() - started).total_seconds()
    print(f"Pushed {len(result.paths)} files to {result.repo_id}@{result.revision} in {seconds:.1f} s")
    print(f"Commit: {result.commit_url}")
    return 0


__all__ = [
    "BackgroundPusher",
    "PushError",
    "PushResult",
    "download_training_state",
    "evaluation_record_to_results",
    "merge_eval_results",
    "push_evaluation_results",
    "push_training_output",
    "render_model_card",
    "resolve_resume_checkpoint",
]
