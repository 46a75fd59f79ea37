"""`hf-dino train` against the local Hub-compatible server: a Hub dataset streamed into training,
`--push-to-hub` publishing the run, and `--resume hub:REPO` continuing from the pushed training state."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hub_server import LocalHub, running_hub

TINY_RUN = [
    "--arch", "vit_tiny", "--patch-size", "4", "--out-dim", "16",
    "--model-config", "image_size=8", "num_channels=1", "hidden_size=16", "num_hidden_layers=2",
    "num_attention_heads=2", "intermediate_size=32", "hidden_dim=32", "bottleneck_dim=8",
    "--global-crop-size", "8", "--local-crop-size", "4", "--local-crops-number", "2",
    "--batch-size", "4", "--steps-per-epoch", "3", "--warmup-epochs", "0", "--save-steps", "3",
    "--num-workers", "0", "--mixed-precision", "no", "--report-to", "none", "--logging-steps", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def hub_session(tmp_path_factory: pytest.TempPathFactory):
    with running_hub(tmp_path_factory.mktemp("hub")) as session:
        yield session


def run(arguments: list[str], environment: dict[str, str], workdir: Path) -> subprocess.CompletedProcess:
    completed = subprocess.run(
        [sys.executable, *arguments], env={**environment, "OMP_NUM_THREADS": "1"}, cwd=workdir,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed


def test_hub_dataset_push_and_resume_from_hub(hub_session: LocalHub, tmp_path: Path) -> None:
    environment = hub_session.env
    make_dataset = textwrap.dedent(
        """
        import datasets, numpy as np
        from PIL import Image
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)) for _ in range(16)]
        dataset = datasets.Dataset.from_dict({"picture": images}).cast_column("picture", datasets.Image())
        dataset.push_to_hub("test-user/unlabelled-images")
        """
    )
    run(["-c", make_dataset], environment, tmp_path)

    first = tmp_path / "first"
    train = ["-m", "hf_dino.cli", "train", *TINY_RUN, "--dataset", "test-user/unlabelled-images"]
    run([*train, "--epochs", "1", "--output-dir", str(first), "--push-to-hub", "test-user/tiny-dino"], environment,
        tmp_path)  # fmt: skip
    assert json.loads((first / "teacher" / "config.json").read_text())["model_type"] == "dino"

    inspect = textwrap.dedent(
        """
        import json, sys
        from huggingface_hub import HfApi
        files = sorted(HfApi().list_repo_files("test-user/tiny-dino"))
        print(json.dumps(files))
        """
    )
    files = json.loads(run(["-c", inspect], environment, tmp_path).stdout.strip().splitlines()[-1])
    for expected in ("config.json", "model.safetensors", "modeling_dino.py", "README.md", "backbone/config.json",
                     "training_state/trainer_state.json"):  # fmt: skip
        assert expected in files, files

    second = tmp_path / "second"
    run([*train, "--epochs", "2", "--output-dir", str(second), "--resume", "hub:test-user/tiny-dino"], environment,
        tmp_path)  # fmt: skip
    steps = [json.loads(line)["step"] for line in (second / "metrics.jsonl").read_text().splitlines()]
    assert steps and min(steps) == 4 and max(steps) == 6, steps  # continued after the pushed step 3
