"""`DinoTrainingArguments`: the whole training recipe in one dataclass, and its command line.

Options carry the names of the original `main_dino.py` options with dashes (`--local-crops-number`,
`--warmup-teacher-temp-epochs`, ...; the underscore spellings are accepted too) and default to the
original's values, so a user of the official script switches without relearning. The help text of each
option carries the tuning advice that users of the original code kept asking for.

Values are resolved in this order, later ones winning: the dataclass defaults (official), a named preset
(`--preset NAME`, a YAML file in `hf_dino/presets/`), a YAML config file (`--config FILE.yaml`), then the
options given on the command line. Parsing never touches the network.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRESETS_DIRECTORY = Path(__file__).resolve().parent.parent / "presets"

# Short architecture names as in the original `--arch` (timm-style names with the patch size separate) and
# the DinoConfig presets they map to; any `DinoConfig.preset_names()` entry is accepted as well.
ARCHITECTURES = ("vit_tiny", "vit_small", "vit_base", "resnet50", "resnet18")


def _option(help_text: str, **argparse_kwargs: Any) -> dict[str, Any]:
    """Field metadata: the help text and extra argparse keywords (choices, metavar, ...)."""
    return {"help": help_text, **argparse_kwargs}


@dataclass
class DinoTrainingArguments:
    """Everything a DINO run needs besides the data: architecture choice, recipe, schedules and logistics.

    Defaults are the official `main_dino.py` defaults (ViT-S/16, 100 epochs, batch 64 per device, ...),
    except where a CPU-friendly default cannot hurt the recipe (`mixed_precision="auto"` picks the
    official fp16 only on CUDA). See `hf-dino train --help` for the meaning of each field.
    """

    # ---- model -------------------------------------------------------------------------------------------
    arch: str = field(
        default="vit_small",
        metadata=_option(
            "Backbone: vit_tiny, vit_small, vit_base (with --patch-size), resnet50, resnet18, or any DinoConfig preset "
            "name such as vit_small_patch8. ViT-S/16 is the paper's workhorse; resnet50 wants the SGD/LARS "
            "recipe (see the resnet50 preset)."
        ),
    )
    patch_size: int = field(
        default=16,
        metadata=_option(
            "ViT patch size. 8 gives better features and attention maps (+~4 k-NN points for ViT-S) at "
            "about 4x the compute; keep 16 on small budgets."
        ),
    )
    out_dim: int = field(
        default=65536,
        metadata=_option(
            "K, the head's output dimension. 65536 is the official default; on small datasets or short "
            "runs a smaller K (1024-4096) learns faster. A loss stuck at ln K (11.09 for 65536) is collapse."
        ),
    )
    norm_last_layer: bool = field(
        default=True,
        metadata=_option(
            "Freeze the weight norm of the head's last layer at 1. True makes training more stable; the "
            "released ViT-S/16 used False for slightly better features (with a stable recipe)."
        ),
    )
    use_bn_in_head: bool = field(
        default=False,
        metadata=_option(
            "Batch norm in the projection head (DINO is BN-free by default; ResNets use it off too)."
        ),
    )
    drop_path_rate: float = field(
        default=0.1,
        metadata=_option(
            "Stochastic depth of the student (the teacher uses none). 0.1 is official for ViT-S."
        ),
    )
    model_config: dict[str, Any] = field(
        default_factory=dict,
        metadata=_option(
            "Extra DinoConfig / backbone fields as KEY=VALUE (e.g. image_size=28 num_channels=1 "
            "hidden_size=128 num_hidden_layers=4 hidden_dim=512 bottleneck_dim=128) for small models.",
            metavar="KEY=VALUE",
        ),
    )
    init_from: str | None = field(
        default=None,
        metadata=_option(
            "Start from a DinoModel folder (e.g. made by `hf-dino convert` from an official full "
            "checkpoint): its weights go to student and teacher, its dino_center.safetensors to the loss. "
            "A folder holding student/ and teacher/ (a checkpoint of this trainer) sets each separately. The "
            "architecture comes from the folder (--arch, --patch-size, --out-dim are ignored). Continued "
            "pretraining wants a small --lr and short --warmup-epochs."
        ),
    )
    # ---- teacher and loss ----------------------------------------------------------------------------------
    momentum_teacher: float = field(
        default=0.996,
        metadata=_option(
            "Teacher EMA momentum at step 0, raised to 1 by a cosine over training. 0.996 is right for "
            "batch 1024; with small batches raise it (the authors advise 0.9995 at batch 256, dino#104); for "
            "runs of only a few hundred steps lower it (0.99) so the teacher moves at all."
        ),
    )
    momentum_teacher_end: float = field(
        default=1.0,
        metadata=_option(
            "Teacher momentum at the last step (official 1.0). Set it equal to --momentum-teacher for a "
            "constant momentum; --momentum-teacher 0 --momentum-teacher-end 0 makes the teacher a copy of the "
            "student (the paper's ablation: it collapses)."
        ),
    )
    warmup_teacher_temp: float = field(
        default=0.04,
        metadata=_option(
            "Teacher temperature at epoch 0. Lower it (0.02-0.03) if the loss does not move early."
        ),
    )
    teacher_temp: float = field(
        default=0.04,
        metadata=_option(
            "Teacher temperature after the warm-up. 0.04 is official; the paper warms up to 0.07. Values "
            "above 0.07 make training unstable; a loss stuck at ln K means too little sharpening."
        ),
    )
    warmup_teacher_temp_epochs: int = field(
        default=0,
        metadata=_option(
            "Epochs of linear warm-up of the teacher temperature (30 in the paper, 0 by default)."
        ),
    )
    student_temp: float = field(default=0.1, metadata=_option("Student temperature (official constant 0.1)."))
    center_momentum: float = field(
        default=0.9, metadata=_option("Momentum of the teacher-output center (official constant 0.9).")
    )
    # ---- optimisation ------------------------------------------------------------------------------------
    mixed_precision: str = field(
        default="auto",
        metadata=_option(
            "no, fp16 (with loss scaling, the original's --use_fp16), bf16, or auto (fp16 on CUDA as the "
            "official default, no elsewhere). NaN losses with fp16 (dino#58): use bf16, keep --clip-grad, or "
            "lower --lr. On CPUs with bf16 instructions (AVX512-BF16, AMX) bf16 speeds the step up too (1.3x "
            "for ViT-Ti/16 on the CPU of benchmarks/README.md); fp16 has no effect on CPUs.",
            choices=("auto", "no", "fp16", "bf16"),
        ),
    )
    torch_compile: str | None = field(
        default=None,
        metadata=_option(
            "torch.compile the forward passes and the loss (and the photometric augmentation, when it runs on "
            "the accelerator) with this mode: default, "
            "max-autotune-no-cudagraphs, or reduce-overhead (CUDA graphs; on one H100 the ViT-S/16 step of this "
            "loop with 2x224 + 10x96 crops ran 2.9x an original-style baseline, 1,487 img/s, against 1.5x "
            "uncompiled, see benchmarks/README.md). Compiling takes "
            "a minute or more at the start, and again after a resume; not under FSDP; reduce-overhead needs "
            "--gradient-accumulation-steps 1.",
            metavar="MODE",
        ),
    )
    pack_crops: bool = field(
        default=False,
        metadata=_option(
            "ViT: run the student's global and local crops through the backbone in one pass over packed tokens "
            "(attention stays within each crop) instead of one pass per resolution. Same computation, with "
            "stochastic depth drawn in another order. On one H100 (ViT-S/16, 2x224 + 10x96, batch 64) 1.13x the "
            "throughput uncompiled, 1.02x with --torch-compile reduce-overhead, and a fifth less compile time "
            "(see benchmarks/README.md).",
        ),
    )
    recompute_activations: bool = field(
        default=True,
        metadata=_option(
            "ViT: recompute the blocks' GELU and layer-norm outputs in the backward instead of keeping them. "
            "On one H100 (ViT-S/16, 2x224 + 10x96, batch 64, uncompiled) the step's peak memory went from "
            "9.2 to 6.7 GiB and its throughput from 892 to 752 img/s; false trades the memory for the speed. "
            "Under --torch-compile it made no difference on the H100 (packed crops: 1,645 and 1,648 img/s, the "
            "same kernels): inductor's partitioner recomputes what it chooses either way.",
        ),
    )
    weight_decay: float = field(
        default=0.04,
        metadata=_option("Weight decay at step 0 (cosine to --weight-decay-end); none on 1-D params."),
    )
    weight_decay_end: float = field(
        default=0.4,
        metadata=_option("Final weight decay. A rising weight decay is what the ViT recipe needs."),
    )
    clip_grad: float = field(
        default=3.0,
        metadata=_option(
            "Maximal gradient norm (0 disables). Clipping helps ViTs; 0.3-1.0 tames fp16 NaNs. Per "
            "parameter tensor by default, as the original."
        ),
    )
    clip_grad_mode: str = field(
        default="per-parameter",
        metadata=_option(
            "per-parameter (the original: each tensor's gradient norm clipped alone) or global (one norm "
            "over all gradients, as torch.nn.utils.clip_grad_norm_).",
            choices=("per-parameter", "global"),
        ),
    )
    batch_size: int = field(
        default=64,
        metadata=_option(
            "Images per device per step (the original's --batch_size_per_gpu). The learning rate scales "
            "with the total batch = batch size x processes x --gradient-accumulation-steps."
        ),
    )
    gradient_accumulation_steps: int = field(
        default=1,
        metadata=_option(
            "Micro-batches per optimizer step. DINO-correct: the center and the teacher move once per step, "
            "from the whole effective batch, so 4 x 64 behaves as one batch of 256."
        ),
    )
    epochs: int = field(
        default=100, metadata=_option("Training epochs (100 official; 300-800 for top results).")
    )
    max_steps: int | None = field(
        default=None,
        metadata=_option(
            "Stop after this many optimizer steps (smoke tests, time budgets). The schedules still span "
            "--epochs, so the learning rate will not have decayed."
        ),
    )
    max_time_minutes: float | None = field(
        default=None,
        metadata=_option(
            "Stop (checkpoint, evaluate, save the teacher) once training has run this many minutes; for time "
            "budgets and benchmarks. As with --max-steps the schedules still span --epochs."
        ),
    )
    steps_per_epoch: int | None = field(
        default=None,
        metadata=_option(
            "Optimizer steps that make an epoch; needed for streamed datasets of unknown length (otherwise "
            "the dataset length / total batch)."
        ),
    )
    freeze_last_layer: float = field(
        default=1,
        metadata=_option(
            "Epochs during which the head's last layer is not updated (official 1). Raise it (2-3) if the "
            "loss does not decrease early on."
        ),
    )
    lr: float = field(
        default=0.0005,
        metadata=_option(
            "Peak learning rate for a total batch of 256 (linear scaling rule: used lr = lr x total batch / "
            "256), reached after --warmup-epochs. Official 0.0005; the released ViT-S/16 recipe sets 0.002 (batch "
            "1024). Lower it (and lengthen --warmup-epochs) if the loss becomes NaN."
        ),
    )
    warmup_epochs: float = field(
        default=10, metadata=_option("Epochs of linear learning-rate warm-up from 0.")
    )
    min_lr: float = field(default=1e-6, metadata=_option("Learning rate at the end of the cosine decay."))
    optimizer: str = field(
        default="adamw",
        metadata=_option(
            "adamw (ViTs, official), sgd (momentum 0.9), lars (ResNet-50 recipe; lr 0.3, wd 1e-6 in the "
            "paper's appendix).",
            choices=("adamw", "sgd", "lars"),
        ),
    )
    # ---- data and multi-crop -----------------------------------------------------------------------------
    dataset: str | None = field(
        default=None,
        metadata=_option(
            "Images to train on: a Hub dataset id (streamed), a local folder of images (any nesting, no class "
            "folders needed), or parquet / arrow / webdataset files. Default: the Fashion-MNIST subset "
            "embedded in the package (works offline). Labels are not needed."
        ),
    )
    dataset_split: str = field(default="train", metadata=_option("Split of --dataset to train on."))
    image_column: str | None = field(
        default=None, metadata=_option("Column holding the images (detected when omitted).")
    )
    global_crops_scale: tuple[float, float] = field(
        default=(0.4, 1.0),
        metadata=_option(
            "Area range of the 2 global crops. Official (0.4, 1); the released ViT-S/16 used (0.25, 1). "
            "Without local crops, (0.14, 1) works better.",
            nargs=2,
            metavar=("MIN", "MAX"),
        ),
    )
    local_crops_number: int = field(
        default=8,
        metadata=_option(
            "Number of small local crops seen by the student only (0 disables multi-crop). More local "
            "crops improve features at a moderate cost (paper Table 7: 2x224+10x96 best)."
        ),
    )
    local_crops_scale: tuple[float, float] = field(
        default=(0.05, 0.4),
        metadata=_option(
            "Area range of the local crops; its upper bound should meet the lower bound of the global scale.",
            nargs=2,
            metavar=("MIN", "MAX"),
        ),
    )
    global_crop_size: int = field(
        default=224, metadata=_option("Side of the global crops in pixels (official 224).")
    )
    local_crop_size: int = field(
        default=96, metadata=_option("Side of the local crops in pixels (official 96).")
    )
    num_workers: int = field(
        default=10,
        metadata=_option(
            "Data-loading worker processes per device (official 10; capped at the CPU count). 0 loads in the "
            "training process."
        ),
    )
    photometric_on: str = field(
        default="accelerator",
        metadata=_option(
            "Where colour jitter, grayscale, blur and solarisation run: 'accelerator' (batched on the training "
            "device, per-sample random parameters; frees the CPU cores that would otherwise have to feed a GPU) "
            "or 'workers' (per image in the data workers, as the original).",
            choices=("accelerator", "workers"),
        ),
    )
    augmentation: dict[str, Any] = field(
        default_factory=dict,
        metadata=_option(
            "Extra multi-crop settings as KEY=VALUE (hf_dino.augmentation.MultiCropConfig fields), e.g. "
            "blur_sigma=[0.1,0.5] for small images, mean=[0.286] std=[0.353] for Fashion-MNIST.",
            metavar="KEY=VALUE",
        ),
    )
    # ---- evaluation during training ------------------------------------------------------------------------
    eval_dataset: str | None = field(
        default=None,
        metadata=_option(
            "Labelled dataset for an online weighted k-NN of the teacher (its train split is the memory "
            "bank, its test split the queries); 'embedded' for the packaged Fashion-MNIST subset."
        ),
    )
    eval_label_column: str = field(default="label", metadata=_option("Label column of --eval-dataset."))
    eval_steps: int | None = field(
        default=None,
        metadata=_option(
            "Run the online k-NN every N optimizer steps (and at the end) when --eval-dataset is set."
        ),
    )
    eval_max_samples: int | None = field(
        default=None, metadata=_option("Cap on memory-bank and query images for the online k-NN (speed).")
    )
    eval_baselines: bool = field(
        default=True,
        metadata=_option(
            "With --eval-dataset: before training also run the k-NN on raw pixels and on the network at its "
            "random initialisation, and print all three at the end (what DINO added)."
        ),
    )
    knn_k: int = field(default=20, metadata=_option("Neighbours of the online k-NN (paper: 20)."))
    knn_temperature: float = field(
        default=0.07, metadata=_option("Temperature of the k-NN votes (paper: 0.07).")
    )
    # ---- logistics ---------------------------------------------------------------------------------------
    output_dir: str = field(
        default="outputs/dino", metadata=_option("Where metrics, checkpoints and the teacher go.")
    )
    seed: int = field(default=0, metadata=_option("Random seed (official 0)."))
    save_steps: int | None = field(
        default=None,
        metadata=_option("Write a checkpoint every N optimizer steps (default: at the end of every epoch)."),
    )
    save_total_limit: int | None = field(
        default=3, metadata=_option("Keep only the newest N checkpoints (None keeps all).")
    )
    resume: str | None = field(
        default=None,
        metadata=_option(
            "Continue a run exactly: 'auto' (the latest checkpoint in --output-dir, if any), a checkpoint "
            "folder, or a Hub repo id ('hub:ORG/NAME' or 'ORG/NAME') whose training_state/ holds one."
        ),
    )
    logging_steps: int = field(
        default=10,
        metadata=_option(
            "Refresh the progress bar, trackers and non-finite-loss check every N steps (metrics.jsonl still "
            "gets every step); each refresh is one host-device synchronisation."
        ),
    )
    report_to: str = field(
        default="auto",
        metadata=_option(
            "Trackers through accelerate: none, all, or a comma list of tensorboard, trackio, wandb. auto: "
            "tensorboard when installed."
        ),
    )
    push_to_hub: str | None = field(
        default=None,
        metadata=_option("Hub repo id to push checkpoints (in the background) and the final teacher to."),
    )
    collapse_warning_steps: int = field(
        default=50,
        metadata=_option(
            "Warn when the teacher output has sat at a collapse (entropy near ln K: uniform; near 0: one "
            "dimension) for this many consecutive steps."
        ),
    )

    def __post_init__(self) -> None:
        self.global_crops_scale = tuple(float(value) for value in self.global_crops_scale)
        self.local_crops_scale = tuple(float(value) for value in self.local_crops_scale)
        self.validate()

    def validate(self) -> None:
        """Raise a clear `ValueError` for values the recipe cannot run with."""
        positive = (
            "batch_size",
            "epochs",
            "gradient_accumulation_steps",
            "out_dim",
            "logging_steps",
            "knn_k",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "steps_per_epoch", "save_steps", "eval_steps", "save_total_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1 when set, got {value}")
        for name in ("global_crops_scale", "local_crops_scale"):
            low, high = getattr(self, name)
            if not 0 < low <= high <= 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must satisfy 0 < MIN <= MAX <= 1, got {(low, high)}"
                )
        if self.local_crops_number < 0:
            raise ValueError(f"--local-crops-number must be >= 0, got {self.local_crops_number}")
        if self.teacher_temp <= 0 or self.warmup_teacher_temp <= 0 or self.student_temp <= 0:
            raise ValueError("temperatures must be positive")
        for name in ("momentum_teacher", "momentum_teacher_end", "center_momentum"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"--{name.replace('_', '-')} must lie in [0, 1], got {getattr(self, name)}")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"--warmup-epochs ({self.warmup_epochs}) exceeds --epochs ({self.epochs})")
        if self.warmup_teacher_temp_epochs > self.epochs:
            raise ValueError(
                f"--warmup-teacher-temp-epochs ({self.warmup_teacher_temp_epochs}) exceeds --epochs ({self.epochs})"
            )
        if self.clip_grad < 0:
            raise ValueError(f"--clip-grad must be >= 0, got {self.clip_grad}")
        if self.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0, got {self.num_workers}")
        for name, choices in (
            ("mixed_precision", ("auto", "no", "fp16", "bf16")),
            ("clip_grad_mode", ("per-parameter", "global")),
            ("optimizer", ("adamw", "sgd", "lars")),
            ("photometric_on", ("accelerator", "workers")),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be one of {choices}, got {getattr(self, name)!r}"
                )
        if self.torch_compile not in (None, "default", "max-autotune-no-cudagraphs", "reduce-overhead"):
            raise ValueError(
                "--torch-compile must be one of default, max-autotune-no-cudagraphs, reduce-overhead, "
                f"got {self.torch_compile!r}"
            )
        if self.torch_compile == "reduce-overhead" and self.gradient_accumulation_steps > 1:
            raise ValueError(
                "--torch-compile reduce-overhead (CUDA graphs) cannot accumulate gradients across replays; "
                "use --torch-compile default with --gradient-accumulation-steps > 1"
            )
        if not math.isfinite(self.lr) or self.lr < 0:
            raise ValueError(f"--lr must be a non-negative number, got {self.lr}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def field_names(cls) -> list[str]:
        return [item.name for item in dataclasses.fields(cls)]


# ---- YAML config files and presets ---------------------------------------------------------------------------


def preset_names() -> list[str]:
    """Names of the recipes shipped in `hf_dino/presets/` (`demo`, `vit_small_vanilla`, ...)."""
    return sorted(path.stem for path in PRESETS_DIRECTORY.glob("*.yaml"))


def _normalise_keys(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Accept `local-crops-number` and `local_crops_number`; reject unknown keys with the valid ones listed."""
    known = set(DinoTrainingArguments.field_names())
    normalised: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ValueError(f"{source}: unknown option {key!r}; valid options: {', '.join(sorted(known))}")
        normalised[name] = value
    return normalised


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (or JSON) recipe file into a dict of `DinoTrainingArguments` fields.

    A file may name a preset to start from with `preset: NAME`; its own keys override the preset's.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    content = yaml.safe_load(path.read_text()) or {}
    if not isinstance(content, dict):
        raise ValueError(
            f"{path}: a config file must hold a mapping of option: value, got {type(content).__name__}"
        )
    content = dict(content)
    preset = content.pop("preset", None)
    values = load_preset(preset) if preset else {}
    values.update(_normalise_keys(content, str(path)))
    return values


def load_preset(name: str) -> dict[str, Any]:
    """The option values of a named preset (a YAML file in `hf_dino/presets/`)."""
    path = PRESETS_DIRECTORY / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(preset_names())}")
    return load_config_file(path)


# ---- the command line ------------------------------------------------------------------------------------------


def _parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on", "y"):
        return True
    if lowered in ("0", "false", "no", "off", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _parse_optional_int(text: str) -> int | None:
    return None if str(text).lower() in ("none", "null", "") else int(text)


def _parse_optional_float(text: str) -> float | None:
    return None if str(text).lower() in ("none", "null", "") else float(text)


def _parse_optional_str(text: str) -> str | None:
    return None if str(text).lower() in ("none", "null", "") else text


def _parse_key_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)  # numbers, booleans and lists parse as in YAML


# Spellings of the original script that map onto our options (besides every underscore spelling).
_ALIASES = {
    "batch_size": ["--batch_size_per_gpu"],
    "dataset": ["--data-path", "--data_path"],
}


def build_parser() -> argparse.ArgumentParser:
    """The `hf-dino train` parser. Every option defaults to "not given" so that presets and config files
    can be told apart from explicit command-line values."""
    parser = argparse.ArgumentParser(
        prog="hf-dino train",
        description=(
            "DINO self-supervised pretraining (Caron et al., ICCV 2021) with accelerate. Runs on one CPU as "
            "`hf-dino train --preset demo`, on GPUs as `accelerate launch -m hf_dino.cli train ...` or "
            "`accelerate launch scripts/train.py ...`. Watch the loss against ln K: sitting there is collapse."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--preset",
        help=f"Start from a named recipe: {', '.join(preset_names())}. --config and options override it.",
    )
    parser.add_argument(
        "--config", help="YAML file of options (keys as the option names); options override it."
    )
    parser.add_argument(
        "--use-fp16",
        "--use_fp16",
        dest="use_fp16",
        type=_parse_bool,
        nargs="?",
        const=True,
        help="The original's flag: true means --mixed-precision fp16, false --mixed-precision no.",
    )
    for item in dataclasses.fields(DinoTrainingArguments):
        dashed = "--" + item.name.replace("_", "-")
        names = [dashed]
        if "_" in item.name:
            names.append("--" + item.name)
        names += _ALIASES.get(item.name, [])
        metadata = dict(item.metadata)
        help_text = metadata.pop("help", "")
        default = item.default if item.default is not dataclasses.MISSING else item.default_factory()  # type: ignore[misc]
        kwargs: dict[str, Any] = {"dest": item.name, "help": f"{help_text} (default: {default})", **metadata}
        annotation = str(item.type)
        if annotation == "bool":
            kwargs.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
        elif annotation.startswith("tuple"):
            kwargs.update(type=float)
        elif annotation.startswith("dict"):
            kwargs.update(type=_parse_key_value, nargs="+")
        elif annotation == "int":
            kwargs.update(type=int)
        elif annotation == "int | None":
            kwargs.update(type=_parse_optional_int)
        elif annotation == "float":
            kwargs.update(type=float)
        elif annotation == "float | None":
            kwargs.update(type=_parse_optional_float)
        elif annotation == "str | None":
            kwargs.update(type=_parse_optional_str)
        elif annotation == "str":
            kwargs.update(type=str)
        else:
            raise TypeError(f"no command-line parser for {item.name}: {annotation}")
        if item.name == "resume":
            kwargs.update(nargs="?", const="auto")
        parser.add_argument(*names, **kwargs)
    return parser


def parse_arguments(argv: list[str] | None = None) -> DinoTrainingArguments:
    """Resolve defaults < preset < config file < command line into `DinoTrainingArguments`.

    Args:
        argv: command-line arguments without the program name (`None`: `sys.argv[1:]`).
    """
    namespace = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    preset = namespace.pop("preset", None)
    config = namespace.pop("config", None)
    if preset:
        values.update(load_preset(preset))
    if config:
        values.update(load_config_file(config))
    use_fp16 = namespace.pop("use_fp16", None)
    if use_fp16 is not None:
        values["mixed_precision"] = "fp16" if use_fp16 else "no"
    for name in ("model_config", "augmentation"):  # KEY=VALUE options add to the preset's mapping
        if name in namespace:
            merged = dict(values.get(name) or {})
            merged.update(dict(namespace.pop(name)))
            values[name] = merged
        if name in values and not isinstance(values[name], dict):
            raise ValueError(f"{name} must be a mapping of KEY: VALUE, got {values[name]!r}")
    values.update(namespace)
    try:
        return DinoTrainingArguments(**values)
    except TypeError as error:  # a YAML value of the wrong shape
        raise ValueError(f"invalid training options: {error}") from error
