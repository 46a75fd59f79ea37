"""Publishing to a Hub that runs here: `hf-dino push`, model cards, evaluation results and resuming.

The real `huggingface_hub`, `transformers` and `datasets` clients talk to `hub_server.HubServer` on
127.0.0.1. Those libraries read HF_ENDPOINT (and HF_HUB_OFFLINE, which other tests may set) when they are
imported, so every client-side check runs in a fresh Python process with the environment pointing at the
server; this process only runs the server, builds the inputs and checks the results.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_dino import DinoConfig, DinoModel
from hf_dino.convert import save_dino_model
from hf_dino.hub import (
    BackgroundPusher,
    PushError,
    PushResult,
    evaluation_record_to_results,
    is_transient_error,
    merge_eval_results,
    plot_training_curves,
    render_model_card,
)
from hub_server import HubServer, LocalHub, running_hub

REPO = "test-user/dino-tiny"
CLIENT_TIMEOUT_SECONDS = 180


def tiny_config() -> DinoConfig:
    return DinoConfig.from_preset(
        "vit_tiny_patch16",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        out_dim=64,
        hidden_dim=32,
        bottleneck_dim=16,
    )


def knn_record(top1: float, top5: float | None = None, protocol: str = "knn") -> dict[str, Any]:
    results = {"top1": top1} if top5 is None else {"top1": top1, "top5": top5}
    return {
        "protocol": protocol,
        "parameters": {"k": 20, "temperature": 0.07},
        "dataset": {
            "id": "zalando-datasets/fashion_mnist",
            "split": "test",
            "revision": None,
            "label_column": "label",
        },
        "model": {"path": "outputs/dino/teacher", "revision": None},
        "results": results,
        "created": "2026-11-26T06:00:00+00:00",
        "hf_dino_version": "0.1.0",
    }


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path: equal digests mean byte-identical trees."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def make_training_output(folder: Path, *, seed: int = 0) -> Path:
    """A small but complete `hf-dino train` output folder, written without training."""
    torch.manual_seed(seed)
    teacher, student = DinoModel(tiny_config()).eval(), DinoModel(tiny_config()).eval()
    center = torch.randn(1, 64)
    checkpoint = folder / "checkpoints" / "step-00000004"
    teacher.save_pretrained(checkpoint / "teacher")
    student.save_pretrained(checkpoint / "student")
    save_file({"center": center}, str(checkpoint / "dino_center.safetensors"))
    state = checkpoint / "training_state"
    state.mkdir()
    (state / "optimizer.bin").write_bytes(
        torch.randint(0, 256, (300_000,), dtype=torch.uint8).numpy().tobytes()
    )
    (state / "random_states_0.pkl").write_bytes(b"\x80\x04fake-rng-state\x00" * 8)
    trainer_state = {"step": 4, "epoch": 1, "step_in_epoch": 0, "data_position": 256}
    (checkpoint / "trainer_state.json").write_text(json.dumps(trainer_state))
    (folder / "checkpoints" / "latest").write_text(checkpoint.name)
    save_dino_model(
        teacher, folder / "teacher", center
    )  # the final teacher, written after the last checkpoint
    recipe = {"training_arguments": {"dataset": None, "lr": 0.0005, "epochs": 1, "mixed_precision": "no"}}
    recipe["model_config"] = teacher.config.to_dict()
    (folder / "training_config.json").write_text(json.dumps(recipe))
    with open(folder / "metrics.jsonl", "w") as metrics:
        for step in range(5):
            record = {
                "step": step,
                "epoch": step // 4,
                "loss": 4.1 - 0.2 * step,
                "elapsed_seconds": 3.0 * step,
            }
            if step % 2 == 0:
                record["knn_top1"] = 0.2 + 0.05 * step
            metrics.write(json.dumps(record) + "\n")
    (folder / "eval").mkdir()
    (folder / "eval" / "knn.json").write_text(json.dumps(knn_record(0.61, 0.93)))
    return folder


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def hub_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHub]:
    with running_hub(tmp_path_factory.mktemp("hub")) as session:
        yield session


@pytest.fixture(scope="module")
def hub(hub_session: LocalHub) -> HubServer:
    return hub_session.server


@pytest.fixture(scope="module")
def client_env(hub_session: LocalHub) -> dict[str, str]:
    return {**hub_session.env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_client(code: str, environment: dict[str, str], workdir: Path, *arguments: str) -> dict[str, Any]:
    """Run `code` in a fresh interpreter; it writes a JSON result to `sys.argv[1]`, which is returned."""
    result_path = workdir / f"result-{time.monotonic_ns()}.json"
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), str(result_path), *arguments],
        env=environment,
        cwd=workdir,  # not the checkout: nothing importable by accident
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT_SECONDS,
    )
    if completed.returncode != 0 or not result_path.is_file():
        pytest.fail(
            f"client process failed ({completed.returncode}):\n{completed.stdout[-3000:]}\n{completed.stderr[-6000:]}"
        )
    return json.loads(result_path.read_text())


@pytest.fixture(scope="module")
def training_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_training_output(tmp_path_factory.mktemp("run") / "output")


@pytest.fixture(scope="module")
def reference_outputs(training_output: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Inputs and the local teacher's outputs, to compare with what comes back from the Hub."""
    torch.manual_seed(1)
    pixel_values = torch.randn(2, 3, 32, 32)
    model = DinoModel.from_pretrained(training_output / "teacher").eval()
    with torch.no_grad():
        output = model(pixel_values)
        expected = {
            "features": output.pooler_output,
            "last_hidden_state": output.last_hidden_state,
            "head": model.head(output.pooler_output),
            "attention": model.last_self_attention(pixel_values),
        }
    inputs_path = tmp_path_factory.mktemp("inputs") / "pixel_values.safetensors"
    save_file({"pixel_values": pixel_values}, str(inputs_path))
    return {"inputs_path": inputs_path, **expected}


CLIENT_SESSION = """
    import contextlib, io, json, sys
    from pathlib import Path
    import torch
    from safetensors.torch import load_file, save_file
    from huggingface_hub import HfApi, ModelCard
    from transformers import AutoModel, ViTModel
    import hf_dino
    from hf_dino import hub

    result_path, output_dir, second_output_dir, inputs_path, outputs_path, repo = sys.argv[1:7]
    torch.set_num_threads(1)
    report = {}
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        report["cli_exit_code"] = hub.main([output_dir, repo])
    report["cli_stdout"] = stdout.getvalue()
    api = HfApi()
    report["files"] = sorted(api.list_repo_files(repo))

    pixel_values = load_file(inputs_path)["pixel_values"]
    model = AutoModel.from_pretrained(repo).eval()
    backbone = ViTModel.from_pretrained(repo, subfolder="backbone", add_pooling_layer=False).eval()
    report["model_class"] = type(model).__module__ + "." + type(model).__name__
    report["backbone_class"] = type(backbone).__name__
    with torch.no_grad():
        output = model(pixel_values)
        tensors = {
            "features": output.pooler_output,
            "last_hidden_state": output.last_hidden_state,
            "head": model.head(output.pooler_output),
            "attention": model.last_self_attention(pixel_values),
            "backbone_last_hidden_state": backbone(pixel_values).last_hidden_state,
        }
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, outputs_path)

    def card_results():
        return sorted(
            [r.metric_name, r.dataset_type, r.dataset_split, r.metric_type, r.metric_value]
            for r in ModelCard.load(repo).data.eval_results
        )

    report["card_results_first"] = card_results()
    card = ModelCard.load(repo)
    report["card_text"] = card.text
    report["card_license"] = card.data.license

    state = hub.download_training_state(repo)
    report["training_state_path"] = str(state)
    report["resume_path"] = str(hub.resolve_resume_checkpoint("hub:" + repo))

    # A later push (another machine: knn.json updated without top5, linear.json new) keeps the old results.
    second = hub.push_training_output(second_output_dir, repo, initial_backoff_seconds=0.01)
    report["second_attempts"] = second.attempts
    report["card_results_second"] = card_results()
    hub.push_evaluation_results(repo, [{
        "protocol": "attention_masks", "parameters": {"mass": 0.6},
        "dataset": {"id": "zalando-datasets/fashion_mnist", "split": "test"}, "results": {"jaccard": 0.42},
    }])
    report["card_results_third"] = card_results()
    report["files_after"] = sorted(api.list_repo_files(repo))
    report["commit_titles"] = [commit.title for commit in api.list_repo_commits(repo)]

    # Failures injected by the test for three other repos: 500 twice then OK, always 500, dropped connections.
    flaky = hub.push_training_output(output_dir, "test-user/flaky", initial_backoff_seconds=0.01)
    report["flaky_attempts"] = flaky.attempts
    for failing_repo in ("test-user/down", "test-user/dropped"):
        try:
            hub.push_training_output(output_dir, failing_repo, max_retries=2, initial_backoff_seconds=0.01)
            report[failing_repo] = None
        except hub.PushError as error:
            report[failing_repo] = {
                "message": str(error), "retry_command": error.retry_command, "cause": type(error.__cause__).__name__
            }
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        arguments = [output_dir, "test-user/down", "--max-retries", "1", "--retry-wait", "0"]
        report["failing_cli_exit_code"] = hub.main(arguments)
    report["failing_cli_stderr"] = stderr.getvalue()
    # The training loop's pusher: the failure is logged and kept, never raised.
    pusher = hub.BackgroundPusher("test-user/down", max_retries=0)
    pusher.submit(output_dir)
    report["pusher_finished"] = pusher.wait(timeout=60)
    report["pusher_errors"] = [type(error).__name__ for error in pusher.errors]
    Path(result_path).write_text(json.dumps(report))
"""


@pytest.fixture(scope="module")
def published(
    hub: HubServer,
    client_env: dict[str, str],
    training_output: Path,
    reference_outputs: dict[str, Any],
) -> dict[str, Any]:
    """One client process (imports are the slow part): push the training output with the CLI, load it
    back, push again, then push to repos whose commits fail. Returns what the client saw."""
    workdir = training_output.parent
    second = workdir / "second_output"
    shutil.copytree(training_output, second)
    (second / "eval" / "knn.json").write_text(json.dumps(knn_record(0.65)))
    (second / "eval" / "linear.json").write_text(json.dumps(knn_record(0.7, 0.95, protocol="linear")))
    outputs_path = workdir / "hub_outputs.safetensors"
    before = tree_digest(training_output)
    hub.inject_failure("commit", count=2, repo_id="test-user/flaky")
    hub.inject_failure("commit", count=None, repo_id="test-user/down")
    hub.inject_failure("commit", count=None, kind="drop", repo_id="test-user/dropped")
    try:
        report = run_client(
            CLIENT_SESSION,
            client_env,
            workdir,
            str(training_output),
            str(second),
            str(reference_outputs["inputs_path"]),
            str(outputs_path),
            REPO,
        )
    finally:
        hub.clear_failures()
    report["outputs"] = load_file(str(outputs_path))
    report["local_unchanged"] = tree_digest(training_output) == before
    return report


# ---------------------------------------------------------------------------------- the server itself
def test_server_speaks_the_hub_protocol(hub: HubServer) -> None:
    """404s carry X-Error-Code, files carry X-Repo-Commit / ETag, Range works, and keep-alive survives bodies."""
    commit = hub.add_files(
        "test-user/raw", {"notes.txt": b"0123456789", "weights.bin": bytes(range(256)) * 8}
    )
    connection = http.client.HTTPConnection(hub.server_address[0], hub.server_address[1], timeout=10)

    def request(method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> Any:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response, response.read()

    response, body = request("GET", "/test-user/raw/resolve/main/notes.txt")
    assert (response.status, body) == (200, b"0123456789")
    assert response.getheader("X-Repo-Commit") == commit
    etag = hashlib.sha1(b"blob 10\0" + b"0123456789").hexdigest()  # git's blob id for a regular file
    assert response.getheader("ETag") == f'"{etag}"'
    response, body = request(
        "GET", f"/test-user/raw/resolve/{commit}/notes.txt", headers={"Range": "bytes=2-4"}
    )
    assert (response.status, body, response.getheader("Content-Range")) == (206, b"234", "bytes 2-4/10")
    response, body = request("HEAD", "/test-user/raw/resolve/main/weights.bin")
    assert response.getheader("X-Linked-Etag") == f'"{hashlib.sha256(bytes(range(256)) * 8).hexdigest()}"'
    assert response.getheader("X-Linked-Size") == "2048" and body == b""
    # A POST body on the same connection must be consumed, or the next request would be garbage.
    response, body = request(
        "POST", "/api/validate-yaml", json.dumps({"content": "---\na: 1\n---\n"}).encode()
    )
    assert json.loads(body) == {"errors": [], "warnings": []}
    for path, code in [
        ("/test-user/missing/resolve/main/notes.txt", "RepoNotFound"),
        ("/test-user/raw/resolve/no-such-branch/notes.txt", "RevisionNotFound"),
        ("/test-user/raw/resolve/main/absent.txt", "EntryNotFound"),
        ("/api/models/test-user/raw/tree/main/absent", "EntryNotFound"),
    ]:
        response, _ = request("GET", path)
        assert (response.status, response.getheader("X-Error-Code")) == (404, code), path
    response, body = request("GET", "/api/models/test-user/raw/tree/main?recursive=true")
    entries = {entry["path"]: entry for entry in json.loads(body)}
    assert entries["weights.bin"]["lfs"]["oid"] == hashlib.sha256(bytes(range(256)) * 8).hexdigest()
    assert "lfs" not in entries["notes.txt"]

    # The Git LFS batch API: announce, PUT a chunked body, verify, then commit the pointer (NDJSON).
    content = b"large file content " * 100
    oid = hashlib.sha256(content).hexdigest()
    batch = {"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": len(content)}]}
    response, body = request("POST", "/test-user/raw.git/info/lfs/objects/batch", json.dumps(batch).encode())
    actions = json.loads(body)["objects"][0]["actions"]
    upload_path = actions["upload"]["href"].removeprefix(hub.url)
    connection.request("PUT", upload_path, body=iter([content[:700], content[700:]]), encode_chunked=True)
    upload = connection.getresponse()
    assert (upload.status, upload.read()) == (200, b"")
    response, _ = request(
        "POST", actions["verify"]["href"].removeprefix(hub.url), json.dumps({"oid": oid}).encode()
    )
    assert response.status == 200
    lines = [
        {"key": "header", "value": {"summary": "add big.bin", "parentCommit": commit}},
        {"key": "lfsFile", "value": {"path": "big.bin", "algo": "sha256", "oid": oid, "size": len(content)}},
        {"key": "deletedFile", "value": {"path": "notes.txt"}},
    ]
    payload = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    response, body = request("POST", "/api/models/test-user/raw/commit/main", payload)
    new_commit = json.loads(body)["commitOid"]
    assert response.status == 200 and new_commit != commit
    response, body = request("GET", "/test-user/raw/resolve/main/big.bin")
    assert body == content and response.getheader("X-Repo-Commit") == new_commit
    response, _ = request("GET", "/test-user/raw/resolve/main/notes.txt")
    assert response.status == 404
    response, body = request("GET", f"/test-user/raw/resolve/{commit}/notes.txt")  # history is kept
    assert body == b"0123456789"
    response, body = request("POST", "/api/models/test-user/raw/commit/main", payload)  # stale parentCommit
    assert response.status == 412
    connection.close()


def test_server_fault_injection(hub: HubServer) -> None:
    hub.add_files("test-user/faulty", {"a.txt": b"a"})
    hub.inject_failure("resolve", count=1, repo_id="test-user/faulty")
    hub.inject_failure("resolve", count=1, kind="drop", repo_id="test-user/faulty")
    connection = http.client.HTTPConnection(hub.server_address[0], hub.server_address[1], timeout=10)
    connection.request("GET", "/test-user/faulty/resolve/main/a.txt")
    assert connection.getresponse().status == 500
    connection.close()
    connection = http.client.HTTPConnection(hub.server_address[0], hub.server_address[1], timeout=10)
    connection.request("GET", "/test-user/faulty/resolve/main/a.txt")
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        connection.getresponse()
    connection.close()
    connection = http.client.HTTPConnection(hub.server_address[0], hub.server_address[1], timeout=10)
    connection.request("GET", "/test-user/faulty/resolve/main/a.txt")
    assert connection.getresponse().read() == b"a"  # both failures consumed
    connection.close()


# --------------------------------------------------------------------------------- publishing a model
def test_push_layout(published: dict[str, Any]) -> None:
    assert published["cli_exit_code"] == 0, published["cli_stdout"]
    assert f"to {REPO}@main" in published["cli_stdout"]
    files = set(published["files"])
    # Root: the teacher DinoModel with its code, the card and the run's logs.
    assert {
        "config.json",
        "model.safetensors",
        "configuration_dino.py",
        "modeling_dino.py",
        "README.md",
    } <= files
    assert {
        "dino_center.safetensors",
        "training_config.json",
        "metrics.jsonl",
        "images/loss_curve.png",
    } <= files
    assert "images/knn_curve.png" in files
    assert {"backbone/config.json", "backbone/model.safetensors"} <= files
    expected_state = {
        "training_state/" + name
        for name in (
            "trainer_state.json",
            "dino_center.safetensors",
            "teacher/model.safetensors",
            "student/config.json",
            "training_state/optimizer.bin",
        )
    }
    assert expected_state <= files
    assert published["local_unchanged"], "a push must never modify the training output folder"


def test_from_pretrained_gives_identical_outputs(published: dict[str, Any], reference_outputs: dict) -> None:
    assert published["model_class"] == "hf_dino.modeling_dino.DinoModel"
    for name in ("features", "last_hidden_state", "head", "attention"):
        assert torch.equal(published["outputs"][name], reference_outputs[name]), name


def test_exported_backbone_loads_in_vit_model(published: dict[str, Any], reference_outputs: dict) -> None:
    assert published["backbone_class"] == "ViTModel"
    # Same modules, same weights, training resolution (no positional interpolation): the same tokens.
    torch.testing.assert_close(
        published["outputs"]["backbone_last_hidden_state"],
        reference_outputs["last_hidden_state"],
        rtol=1e-5,
        atol=1e-5,
    )


def test_card_carries_results_as_model_index(published: dict[str, Any]) -> None:
    knn = "k-NN top-1 accuracy", "k-NN top-5 accuracy"
    dataset = "zalando-datasets/fashion_mnist"
    assert published["card_results_first"] == sorted(
        [[knn[0], dataset, "test", "accuracy", 0.61], [knn[1], dataset, "test", "top_5_accuracy", 0.93]]
    )
    text = published["card_text"]
    for section in (
        "## Which outputs to use",
        "## Training data",
        "### Full recipe",
        "## How to use",
        "## Citation",
    ):
        assert section in text
    assert "![DINO loss](images/loss_curve.png)" in text and "Caron" in text and "Fashion-MNIST" in text
    assert '"lr": 0.0005' in text  # the full recipe
    assert f'AutoModel.from_pretrained("{REPO}", trust_remote_code=True)' in text
    assert published["card_license"] == "apache-2.0"


def test_new_evaluations_update_the_card_without_losing_old_ones(published: dict[str, Any]) -> None:
    dataset = "zalando-datasets/fashion_mnist"
    second = [
        ["k-NN top-1 accuracy", dataset, "test", "accuracy", 0.65],  # updated
        ["k-NN top-5 accuracy", dataset, "test", "top_5_accuracy", 0.93],  # only on the Hub: kept
        ["Linear probe top-1 accuracy", dataset, "test", "accuracy", 0.7],  # new
        ["Linear probe top-5 accuracy", dataset, "test", "top_5_accuracy", 0.95],
    ]
    assert published["card_results_second"] == sorted(second)
    masks = ["Attention-mask Jaccard index", dataset, "test", "jaccard", 0.42]
    assert published["card_results_third"] == sorted([*second, masks])
    assert published["commit_titles"][0] == "Update evaluation results"


def test_training_state_round_trip(published: dict[str, Any], training_output: Path) -> None:
    downloaded = Path(published["training_state_path"])
    assert tree_digest(downloaded) == tree_digest(training_output / "checkpoints" / "step-00000004")
    assert Path(published["resume_path"]) == downloaded


REMOTE_CODE_SESSION = """
    import importlib.abc, sys

    class BlockHfDino(importlib.abc.MetaPathFinder):
        # Stands for an environment where hf_dino is not installed (it is installed editable in this venv).
        def find_spec(self, name, path=None, target=None):
            if name == "hf_dino" or name.startswith("hf_dino."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, BlockHfDino())
    import json
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    result_path, inputs_path, outputs_path, repo = sys.argv[1:5]
    try:
        import hf_dino  # noqa: F401
        blocked = False
    except ModuleNotFoundError:
        blocked = True
    model = AutoModel.from_pretrained(repo, trust_remote_code=True).eval()
    pixel_values = load_file(inputs_path)["pixel_values"]
    with torch.no_grad():
        output = model(pixel_values)
        save_file({"features": output.pooler_output.contiguous(), "head": model.head(output.pooler_output).contiguous(),
                   "attention": model.last_self_attention(pixel_values).contiguous()}, outputs_path)
    report = {"blocked": blocked, "module": type(model).__module__,
              "hf_dino_loaded": any(name.split(".")[0] == "hf_dino" for name in sys.modules)}
    open(result_path, "w").write(json.dumps(report))
"""


def test_remote_code_loads_without_hf_dino(
    published: dict[str, Any], client_env: dict[str, str], reference_outputs: dict, tmp_path: Path
) -> None:
    outputs_path = tmp_path / "remote_outputs.safetensors"
    report = run_client(
        REMOTE_CODE_SESSION,
        client_env,
        tmp_path,
        str(reference_outputs["inputs_path"]),
        str(outputs_path),
        REPO,
    )
    assert report["blocked"] and not report["hf_dino_loaded"]
    assert report["module"].startswith("transformers_modules.")
    outputs = load_file(str(outputs_path))
    for name in ("features", "head", "attention"):
        assert torch.equal(outputs[name], reference_outputs[name]), name


# ------------------------------------------------------------------------------------------ failures
def test_failed_commits_are_retried_then_reported(
    published: dict[str, Any], hub: HubServer, training_output: Path
) -> None:
    """500 twice then OK: the push succeeds on the 3rd attempt. Always 500, or the connection dropped:
    a clear error naming the command to retry, and the local checkpoint byte-identical."""
    assert published["flaky_attempts"] == 3
    assert hub.count_requests("POST", r"^/api/models/test-user/flaky/commit/") == 3
    for repo, cause in (("test-user/down", "HfHubHTTPError"), ("test-user/dropped", "RemoteProtocolError")):
        failure = published[repo]
        assert failure is not None, f"the push to {repo} should have failed"
        assert failure["cause"] == cause
        assert failure["retry_command"] == f"hf-dino push {training_output} {repo}"
        assert "after 3 attempts" in failure["message"] and failure["retry_command"] in failure["message"]
        assert "No local file was changed" in failure["message"]
    assert hub.count_requests("POST", r"^/api/models/test-user/dropped/commit/") == 3
    assert published["failing_cli_exit_code"] == 1
    assert f"hf-dino push {training_output} test-user/down" in published["failing_cli_stderr"]
    assert published["pusher_finished"] and published["pusher_errors"] == ["PushError"]
    assert published["local_unchanged"]


# ------------------------------------------------------------------------------------------- datasets
DATASET_AND_SPACE_SESSION = """
    import json, sys
    import datasets
    import numpy as np
    from huggingface_hub import HfApi, hf_hub_download
    from PIL import Image

    result_path, repo, space = sys.argv[1:4]
    datasets.disable_progress_bars()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)) for _ in range(10)]
    dataset = datasets.Dataset.from_dict({"image": images, "label": list(range(10))})
    dataset = dataset.cast_column("image", datasets.Image())
    dataset.push_to_hub(repo)
    stream = datasets.load_dataset(repo, split="train", streaming=True)
    rows = list(stream)
    api = HfApi()
    api.create_repo(space, repo_type="space", space_sdk="gradio", exist_ok=True)
    api.upload_file(path_or_fileobj=b"import gradio", path_in_repo="app.py", repo_id=space, repo_type="space")
    report = {
        "streaming": isinstance(stream, datasets.IterableDataset),
        "labels": [row["label"] for row in rows],
        "pixels_equal": all(np.array_equal(np.asarray(row["image"]), np.asarray(image))
                            for row, image in zip(rows, images)),
        "space_app": open(hf_hub_download(space, "app.py", repo_type="space")).read(),
        "space_sdk": api.space_info(space).sdk,
    }
    open(result_path, "w").write(json.dumps(report))
"""


def test_dataset_push_to_hub_then_stream_and_a_space(
    hub: HubServer, client_env: dict[str, str], tmp_path: Path
) -> None:
    report = run_client(
        DATASET_AND_SPACE_SESSION, client_env, tmp_path, "test-user/tiny-images", "test-user/demo"
    )
    assert report == {
        "streaming": True,
        "labels": list(range(10)),
        "pixels_equal": True,
        "space_app": "import gradio",
        "space_sdk": "gradio",
    }
    # Parquet shards went through the LFS batch API (datasets deletes its temporary files before committing).
    assert hub.count_requests("POST", r"^/datasets/test-user/tiny-images\.git/info/lfs/objects/batch$") >= 1


# -------------------------------------------------------------------------- pieces, without a server
def test_evaluation_records_become_eval_results_and_merge() -> None:
    old = evaluation_record_to_results(knn_record(0.5, 0.9))
    assert [(r.task_type, r.metric_type, r.metric_value, r.metric_args) for r in old] == [
        ("image-classification", "accuracy", 0.5, {"k": 20, "temperature": 0.07}),
        ("image-classification", "top_5_accuracy", 0.9, {"k": 20, "temperature": 0.07}),
    ]
    new = evaluation_record_to_results(knn_record(0.6)) + evaluation_record_to_results(
        knn_record(0.7, protocol="linear")
    )
    merged = merge_eval_results(old, new)
    assert [(r.metric_name, r.metric_value) for r in merged] == [
        ("k-NN top-1 accuracy", 0.6),
        ("k-NN top-5 accuracy", 0.9),
        ("Linear probe top-1 accuracy", 0.7),
    ]
    record = knn_record(0.5)
    record["results"].update({"note": "text", "nan": float("nan"), "flag": True})
    assert len(evaluation_record_to_results(record)) == 1  # only finite numbers become results


def test_card_renders_without_hub(training_output: Path, tmp_path: Path) -> None:
    curves = plot_training_curves(
        [json.loads(line) for line in (training_output / "metrics.jsonl").read_text().splitlines()],
        tmp_path / "images",
    )
    assert [curve["path"] for curve in curves] == ["images/loss_curve.png", "images/knn_curve.png"]
    from PIL import Image

    with Image.open(tmp_path / "images" / "loss_curve.png") as image:
        assert image.size[0] >= 300 and image.format == "PNG"
    results = evaluation_record_to_results(knn_record(0.61, 0.93))
    card = render_model_card(
        training_output,
        "me/model",
        teacher_dir=training_output / "teacher",
        eval_results=results,
        curves=curves,
    )
    assert card.data.eval_results == results
    assert card.data.to_dict()["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.61
    assert "ViT (2 layers, width 32, patch 8)" in card.text and "4x4 grid" in card.text
    assert "| Trained for | 5 optimizer steps |" in card.text and "Training time: 0 min 12 s" in card.text
    assert (
        "| zalando-datasets/fashion_mnist | test | k-NN top-1 accuracy | 0.61 | k=20, temperature=0.07 |"
        in card.text
    )


def test_transient_error_classification() -> None:
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    def http_error(status: int) -> HfHubHTTPError:
        request = httpx.Request("POST", "http://127.0.0.1/api/models/a/b/commit/main")
        return HfHubHTTPError(f"{status}", response=httpx.Response(status, request=request))

    assert is_transient_error(http_error(500)) and is_transient_error(http_error(503))
    assert not is_transient_error(http_error(404)) and not is_transient_error(http_error(401))
    assert is_transient_error(ConnectionResetError()) and not is_transient_error(ValueError("bad"))
    wrapped = RuntimeError("Error while uploading 'x' to the Hub.")
    wrapped.__cause__ = http_error(502)
    assert is_transient_error(wrapped)


def test_background_pusher_runs_one_at_a_time_newest_wins(caplog: pytest.LogCaptureFixture) -> None:
    started, release = threading.Event(), threading.Event()
    calls: list[tuple[str, str]] = []

    def fake_push(output_dir: Path, repo_id: str, **options: Any) -> Any:
        calls.append((output_dir.name, options.get("commit_message", "")))
        if output_dir.name == "first":
            started.set()
            assert release.wait(10)
        if output_dir.name == "broken":
            raise PushError(
                "pushing broken failed; to retry run: hf-dino push broken me/x", "hf-dino push broken me/x"
            )
        return PushResult(repo_id, "main", "0" * 40, f"http://hub/{repo_id}/commit/{output_dir.name}")

    pusher = BackgroundPusher("me/x", push_function=fake_push)
    pusher.submit("first")
    assert started.wait(10)
    pusher.submit("second")  # waits behind "first" ...
    pusher.submit("third", commit_message="newest")  # ... and is replaced by the newest request
    assert pusher.busy
    release.set()
    with caplog.at_level(logging.ERROR, logger="hf_dino.hub"):
        assert pusher.wait(timeout=10)
        pusher.submit("broken")
        assert pusher.wait(timeout=10)
    assert calls == [("first", ""), ("third", "newest"), ("broken", "")]
    assert [result.commit_url.split("/")[-1] for result in pusher.results] == ["first", "third"]
    assert [type(error) for error in pusher.errors] == [PushError]
    assert "hf-dino push broken me/x" in caplog.text


def test_push_refuses_a_folder_that_is_not_a_training_output(tmp_path: Path) -> None:
    from hf_dino.hub import push_training_output

    with pytest.raises(FileNotFoundError, match="no teacher model"):
        push_training_output(tmp_path, "me/x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        push_training_output(tmp_path / "missing", "me/x")
