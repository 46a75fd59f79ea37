"""The Gradio Space (spaces/app.py) through its real HTTP API: served on 127.0.0.1, called by gradio_client.

A tiny DinoModel saved to a temporary folder stands in for the Hub checkpoints; nothing leaves the machine.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util
import io
import json
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from hf_dino import attention

REPO_ROOT = Path(__file__).resolve().parents[1]
SPACE_DIR = REPO_ROOT / "spaces"
TINY_DINO = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 32,
    "patch_size": 8,
    "out_dim": 64,
    "hidden_dim": 32,
    "bottleneck_dim": 16,
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def load_space_app() -> ModuleType:
    """Import spaces/app.py as a module (spaces/ is not a package)."""
    spec = importlib.util.spec_from_file_location("hf_dino_space_app", SPACE_DIR / "app.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def save_tiny_dino_model(path: Path) -> Path:
    from hf_dino.configuration_dino import DinoConfig
    from hf_dino.modeling_dino import DinoModel

    torch.manual_seed(0)
    model = DinoModel(DinoConfig.from_preset("vit_tiny_patch16", **TINY_DINO))
    with torch.no_grad():  # sharper than the 0.02-std init, so the maps are not uniform
        for name, parameter in model.named_parameters():
            if ("q_proj" in name or "k_proj" in name) and name.endswith("weight"):
                parameter.normal_(0.0, 0.3)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_dino_model(tmp_path_factory.mktemp("tiny_dino"))


@pytest.fixture(scope="module")
def space(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ModuleType, Any, str]]:
    torch.set_num_threads(1)
    app = load_space_app()
    demo = app.build_demo([str(model_dir)], download_dir=tmp_path_factory.mktemp("downloads"))
    _, url, _ = demo.launch(
        prevent_thread_lock=True,
        server_name="127.0.0.1",
        server_port=free_port(),
        quiet=True,
        **app.launch_options(),
    )
    try:
        yield app, demo, url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def client(space: tuple[ModuleType, Any, str]):
    from gradio_client import Client

    return Client(space[2], verbose=False)


def predict(
    client, path: Path | None, model: Path, resolution: int = 224, mass: float = 60, pca: bool = True
):
    from gradio_client import handle_file

    image = handle_file(str(path)) if path is not None else None
    return client.predict(image, str(model), resolution, mass, pca, api_name="/attention")


def test_attention_endpoint_returns_maps_downloads_and_timing(client, model_dir: Path) -> None:
    example = attention.example_images()[1]  # chelsea.jpg, 385x256
    heads, mean, masks, pca, download, summary = predict(client, example, model_dir)
    # The page shows tiles of at most 320 px: input + 2 heads in one row.
    heads_image = Image.open(heads)
    tile_width, tile_height = 320, round(320 * 224 / 336)
    assert heads_image.size == (3 * (tile_width + 6) + 6, tile_height + 12)
    assert Image.open(masks).size == heads_image.size
    assert Image.open(mean).size == (2 * (tile_width + 6) + 6, tile_height + 12)
    assert Image.open(pca).size == Image.open(mean).size
    # Input 336x224 = 42x28 patches of 8 px; the time taken is shown.
    assert "2 heads" in summary and "336×224 px = 42×28 patches" in summary
    assert summary.startswith("**") and " s**" in summary

    with zipfile.ZipFile(download) as archive:
        names = set(archive.namelist())
        assert names == {f"chelsea_{kind}.png" for kind in ("heads", "mean", "masks", "pca", "input")} | {
            "chelsea_attention_maps.npy",
            "chelsea_masks.npy",
            "chelsea_info.json",
        }
        maps = np.load(io.BytesIO(archive.read("chelsea_attention_maps.npy")))
        masks_array = np.load(io.BytesIO(archive.read("chelsea_masks.npy")))
        info = json.loads(archive.read("chelsea_info.json"))
        full_heads = Image.open(io.BytesIO(archive.read("chelsea_heads.png")))
    assert info["patch_grid"] == [28, 42] and info["heads"] == 2 and info["mass"] == 0.6
    assert full_heads.size == (3 * (336 + 6) + 6, 224 + 12)  # the download holds full-size tiles
    # Independent computation: the same model and image through the library directly.
    reference = attention.analyze_image(attention.load_attention_model(model_dir), example, resolution=224)
    np.testing.assert_allclose(maps, reference.attention_maps, atol=1e-6)
    np.testing.assert_array_equal(masks_array, reference.masks)


def test_options_change_the_result(client, model_dir: Path) -> None:
    example = attention.example_images()[0]  # astronaut.jpg, 256x256
    *_, pca, download, summary = predict(client, example, model_dir, resolution=320, mass=30, pca=False)
    assert pca is None
    assert "320×320 px = 40×40 patches" in summary
    with zipfile.ZipFile(download) as archive:
        info = json.loads(archive.read("astronaut_info.json"))
        masks = np.load(io.BytesIO(archive.read("astronaut_masks.npy")))
        assert "astronaut_pca.png" not in archive.namelist()
    assert info["mass"] == pytest.approx(0.3) and masks.shape == (2, 40, 40)


def test_bad_inputs_get_clear_errors_and_the_server_keeps_serving(
    client, model_dir: Path, tmp_path: Path
) -> None:
    from gradio_client.exceptions import AppError

    text = tmp_path / "readme.txt"
    text.write_text("definitely not a picture")
    with pytest.raises(AppError, match="readme.txt is not an image file that can be read"):
        predict(client, text, model_dir)

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        buffer, "PNG"
    )
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(AppError, match="broken.png is corrupt or truncated"):
        predict(client, corrupt, model_dir)

    with pytest.raises(AppError, match="Upload an image"):
        predict(client, None, model_dir)
    with pytest.raises(AppError):
        predict(client, attention.example_images()[0], Path("some/other-model"))  # not in the list

    # Still serving, and unusual modes are converted rather than refused.
    sixteen_bit = tmp_path / "depth.png"
    Image.fromarray(np.arange(48 * 40, dtype=np.uint16).reshape(40, 48) * 30).save(sixteen_bit)
    *_, summary = predict(client, sixteen_bit, model_dir)
    assert "converted to 8-bit RGB" in summary and "upscaled" not in summary.split("Input:")[0]
    transparent = tmp_path / "logo.png"
    Image.new("RGBA", (20, 10), (200, 0, 0, 0)).save(transparent)
    *_, summary = predict(client, transparent, model_dir)
    assert "composited on white" in summary and "small image (20x10) upscaled" in summary


def test_event_has_a_concurrency_limit(space: tuple[ModuleType, Any, str]) -> None:
    app, demo, _ = space
    functions = [function for function in demo.fns.values() if function.api_name == "attention"]
    assert len(functions) == 1 and functions[0].concurrency_limit == app.CONCURRENCY_LIMIT == 2
    assert demo._queue.max_size == app.QUEUE_SIZE


def test_configured_models_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    app = sys.modules.get("hf_dino_space_app") or load_space_app()
    monkeypatch.setenv("HF_DINO_MODELS", " me/model-a, /data/model-b ,,")
    assert app.configured_models() == ["me/model-a", "/data/model-b"]
    monkeypatch.delenv("HF_DINO_MODELS")
    assert app.configured_models()[:2] == ["facebook/dino-vits8", "facebook/dino-vits16"]


def test_space_readme_front_matter() -> None:
    import gradio

    text = (SPACE_DIR / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    front_matter = yaml.safe_load(text.split("---\n")[1])
    assert front_matter["sdk"] == "gradio" and front_matter["sdk_version"] == gradio.__version__
    assert (SPACE_DIR / front_matter["app_file"]).is_file()
    assert {"facebook/dino-vits8", "facebook/dino-vits16"} <= set(front_matter["models"])
    assert front_matter["license"] == "apache-2.0" and len(front_matter["short_description"]) <= 60
    assert {"title", "emoji", "colorFrom", "colorTo", "python_version"} <= set(front_matter)
    requirements = (SPACE_DIR / "requirements.txt").read_text()
    assert "torch" in requirements and "transformers" in requirements and "hf_dino" not in requirements


def _folder_files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


def test_built_space_serves_hub_models_without_hf_dino(model_dir: Path, tmp_path: Path) -> None:
    """The folder build_space.py assembles, run as on the Hub: hf_dino not importable, checkpoints fetched
    from a (local, Hub-compatible) server: a hf_dino DinoModel repo through its remote code and a stock
    ViTModel."""
    from gradio_client import Client, handle_file
    from transformers import ViTConfig, ViTModel

    from hub_server import running_hub

    spec = importlib.util.spec_from_file_location("build_space", SPACE_DIR / "build_space.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    built = tmp_path / "space"
    builder.build_space(built)
    assert {path.name for path in built.iterdir()} == {
        "app.py",
        "README.md",
        "requirements.txt",
        "attention.py",
        "examples",
    }
    assert len(list((built / "examples").glob("*.jpg"))) == 3

    vit_dir = tmp_path / "tiny_vit"
    torch.manual_seed(2)
    vit_config = {key: TINY_DINO[key] for key in ("hidden_size", "num_hidden_layers", "num_attention_heads")}
    ViTModel(
        ViTConfig(**vit_config, intermediate_size=64, image_size=32, patch_size=16), add_pooling_layer=False
    ).save_pretrained(vit_dir)
    launcher = (
        "import importlib.abc, runpy, sys\n"
        "class NoHfDino(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'hf_dino' or name.startswith('hf_dino.'):\n"
        "            raise ImportError('hf_dino is not installed here')\n"
        "sys.meta_path.insert(0, NoHfDino())\n"
        "sys.path.insert(0, '.')\n"
        "runpy.run_path('app.py', run_name='__main__')\n"
    )
    with running_hub(tmp_path / "hub") as hub:
        hub.server.add_files("test-user/tiny-dino", _folder_files(model_dir))
        hub.server.add_files("test-user/tiny-vit", _folder_files(vit_dir))
        port = free_port()
        environment = {
            **hub.env,
            "HF_DINO_MODELS": "test-user/tiny-dino,test-user/tiny-vit",
            "GRADIO_SERVER_NAME": "127.0.0.1",
            "GRADIO_SERVER_PORT": str(port),
            "GRADIO_ANALYTICS_ENABLED": "False",
            "OMP_NUM_THREADS": "1",
        }
        log = (tmp_path / "space.log").open("w")
        process = subprocess.Popen(
            [sys.executable, "-c", launcher], cwd=built, env=environment, stdout=log, stderr=log
        )
        try:
            deadline = time.monotonic() + 180
            client = None
            while client is None:
                assert process.poll() is None, (tmp_path / "space.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the built Space did not start"
                try:
                    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                except Exception:
                    time.sleep(1)
            example = built / "examples" / "coffee.jpg"
            for repo_id, folder, patch_size in (
                ("test-user/tiny-dino", model_dir, 8),
                ("test-user/tiny-vit", vit_dir, 16),
            ):
                *_, download, summary = client.predict(
                    handle_file(str(example)), repo_id, 224, 60, False, api_name="/attention"
                )
                assert f"{repo_id} · 2 heads" in summary and f"patches of {patch_size} px" in summary
                # The same maps as hf_dino computes in this process from the original folder.
                with zipfile.ZipFile(download) as archive:
                    maps = np.load(io.BytesIO(archive.read("coffee_attention_maps.npy")))
                reference = attention.analyze_image(
                    attention.load_attention_model(folder), example, resolution=224
                )
                np.testing.assert_allclose(maps, reference.attention_maps, atol=1e-6)
            requested = {path for _, path, _ in hub.server.requests}
            assert any(
                "tiny-dino/resolve/" in path and path.endswith("modeling_dino.py") for path in requested
            )
        finally:
            process.terminate()
            process.wait(timeout=30)
            log.close()
