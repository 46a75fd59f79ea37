"""Atomic, resumable checkpoints in the agreed layout.

```
OUTPUT_DIR/checkpoints/
  step-00000100/
    student/  teacher/        DinoModel.save_pretrained folders (backbone + head)
    dino_center.safetensors   the loss center, key "center", shape (1, out_dim)
    training_state/           accelerator.save_state: optimizer, grad scaler, RNG states of every process
    trainer_state.json        {"step", "epoch", "step_in_epoch", "data_position", ...}; written last
  latest                      the name of the newest complete checkpoint; replaced last
```

A checkpoint is written to `checkpoints/.tmp-step-...`, flushed to disk (fsync), and renamed into place
with `os.replace`; the `latest` pointer is replaced after that. A crash at any moment leaves either the
previous checkpoint or the new one, never a half-written one behind `latest`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS_DIRECTORY = "checkpoints"
LATEST_POINTER = "latest"
TRAINER_STATE_FILE = "trainer_state.json"
CENTER_FILE = "dino_center.safetensors"
_STEP_PATTERN = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_directory(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (no-op where directories cannot be opened)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def fsync_tree(path: Path) -> None:
    """Flush every file and directory under `path` to disk."""
    for directory, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_directory(Path(directory))


def write_json_atomically(path: Path, content: Any) -> None:
    """Write JSON to `path` through a temporary file and `os.replace` (readers never see half a file)."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w") as handle:
        json.dump(content, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_directory(path.parent)


def save_center(center: torch.Tensor, path: Path) -> None:
    """Save the DINO center `(1, out_dim)` as safetensors under the key "center"."""
    save_file({"center": center.detach().float().cpu().contiguous()}, str(path))


def load_center(path: Path) -> torch.Tensor:
    """Load a center saved by `save_center` (or by `hf-dino convert`)."""
    tensors = load_file(str(path))
    if "center" not in tensors:
        raise ValueError(f"{path} holds no 'center' tensor (keys: {sorted(tensors)})")
    center = tensors["center"]
    return center.reshape(1, -1)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those with a trainer_state.json), oldest first."""
    directory = Path(output_dir) / CHECKPOINTS_DIRECTORY
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _STEP_PATTERN.match(path.name)
        if match and (path / TRAINER_STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint named by the `latest` pointer, or the newest complete one when the pointer is missing."""
    directory = Path(output_dir) / CHECKPOINTS_DIRECTORY
    pointer = directory / LATEST_POINTER
    if pointer.is_file():
        candidate = directory / pointer.read_text().strip()
        if (candidate / TRAINER_STATE_FILE).is_file():
            return candidate
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def remove_stale_temporaries(output_dir: str | Path) -> None:
    """Delete half-written checkpoints left by a crash (`.tmp-*` folders)."""
    directory = Path(output_dir) / CHECKPOINTS_DIRECTORY
    if directory.is_dir():
        for path in directory.glob(".tmp-*"):
            shutil.rmtree(path, ignore_errors=True)


def publish_checkpoint(temporary: Path, final: Path, total_limit: int | None) -> None:
    """Move a fully written checkpoint into place, point `latest` at it, and drop the oldest ones.

    Called by the main process once every process has finished writing into `temporary`.
    """
    fsync_tree(temporary)
    if final.exists():  # the same step saved again (e.g. after a resume): swap it out atomically too
        retired = final.with_name(f".tmp-retired-{final.name}")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(final, retired)
        os.replace(temporary, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(temporary, final)
    _fsync_directory(final.parent)
    pointer = final.parent / LATEST_POINTER
    temporary_pointer = final.parent / f".{LATEST_POINTER}.tmp"
    with open(temporary_pointer, "w") as handle:
        handle.write(final.name)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary_pointer, pointer)
    _fsync_directory(final.parent)
    if total_limit is not None:
        checkpoints = [path for path in list_checkpoints(final.parent.parent) if path != final]
        for path in checkpoints[: max(0, len(checkpoints) + 1 - total_limit)]:
            shutil.rmtree(path, ignore_errors=True)


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    path = Path(checkpoint) / TRAINER_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint: {TRAINER_STATE_FILE} is missing")
    return json.loads(path.read_text())


def read_model_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The safetensors weights of a `save_pretrained` folder (every shard, without the DINO center)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    files = [path for path in files if path.name != CENTER_FILE]
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    state_dict: dict[str, torch.Tensor] = {}
    for path in files:
        state_dict.update(load_file(str(path)))
    return state_dict


def load_model_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load the safetensors weights of a `save_pretrained` folder into an existing module (strictly)."""
    state_dict = read_model_weights(folder)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"weights in {folder} do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def resolve_resume_source(resume: str, output_dir: str | Path) -> Path | None:
    """Turn `--resume` into a local checkpoint folder.

    Args:
        resume: "auto" (latest checkpoint in `output_dir`, None if there is none), a checkpoint folder, an
            output directory (its latest checkpoint), or a Hub repo id ("hub:ORG/NAME" or "ORG/NAME") whose
            `training_state/` folder holds a checkpoint (downloaded with huggingface_hub).
        output_dir: the run's output directory.

    Returns:
        The checkpoint folder, or None for "auto" without any checkpoint (a fresh start).
    """
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume).expanduser()
    if path.is_dir():
        if (path / TRAINER_STATE_FILE).is_file():
            return path
        if (path / "training_state" / TRAINER_STATE_FILE).is_file():  # a downloaded Hub repo
            return path / "training_state"
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"--resume {resume}: no complete checkpoint in this folder")
        return found
    repo_id = resume[len("hub:") :] if resume.startswith("hub:") else resume
    if repo_id.count("/") != 1 or resume.startswith((".", "/")):
        raise FileNotFoundError(f"--resume {resume}: no such folder, and not a Hub repo id (ORG/NAME)")
    from huggingface_hub import snapshot_download

    local = Path(snapshot_download(repo_id, allow_patterns=["training_state/**"]))
    checkpoint = local / "training_state"
    if not (checkpoint / TRAINER_STATE_FILE).is_file():
        raise FileNotFoundError(
            f"--resume {resume}: the repo has no training_state/ checkpoint to resume from"
        )
    return checkpoint
