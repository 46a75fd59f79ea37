"""A small Hugging Face Hub-compatible HTTP server for tests.

No machine that runs these tests reaches huggingface.co, and no open-source Hub server with uploads exists,
so this module speaks just enough of the Hub's HTTP protocol for the real `huggingface_hub`, `transformers`
and `datasets` clients to create repos, commit files (the "regular" base64 mode and the Git LFS batch API),
and download them again (`from_pretrained`, `snapshot_download`, `load_dataset(..., streaming=True)`).

In tests, use the `local_hub` fixture (import it into a conftest.py), or `with running_hub(tmp_dir) as hub:`;
both give `.url`, `.server` and `.env`, the environment for client subprocesses. Or by hand:

    url, server, stop = start_hub_server()
    env = subprocess_environment(url, home=tmp_path)  # HF_ENDPOINT, HF_HOME, HF_HUB_DISABLE_XET=1, HF_TOKEN...
    subprocess.run([sys.executable, "client.py"], env=env, check=True)
    stop()

`huggingface_hub` reads `HF_ENDPOINT` when it is imported, which is why clients are best run in a fresh
process. Without `HF_HUB_DISABLE_XET=1` a client would try to upload "lfs" files through Xet, which this
server does not speak; `HubServer(upload_mode="regular")` makes every upload "regular" for such clients.

What is stored: every repo (model, dataset or space) is a list of commits, each a full snapshot
`{path: blob}`, and a set of branches pointing at commits; blobs live content-addressed (by sha256) in a
folder on disk. A revision is a branch name or a full 40-character commit sha.

Test hooks: `server.inject_failure("commit", count=2)` makes the next two commit calls answer HTTP 500,
`kind="drop"` closes the connection without an answer, `count=None` fails forever; `repo_id=` restricts a
failure to one repo. `server.requests` records `(method, path, status)` of every request, and
`server.add_files(...)` commits files directly (to seed a repo without going through a client).

Run `python tests/hub_server.py` to serve on a free port until interrupted (handy for manual checks).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

REPO_TYPES = ("model", "dataset", "space")
# URL prefix of each repo type in file URLs (`/{prefix}{namespace}/{name}/resolve/...`); models have none.
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
DEFAULT_NAMESPACE = "test-user"
COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
# Files with these suffixes go through Git LFS, as the Hub's default .gitattributes does.
LFS_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npy", ".npz", ".pkl", ".h5", ".onnx", ".msgpack",
    ".parquet", ".arrow", ".zip", ".tar", ".gz", ".png", ".jpg", ".jpeg", ".webp",
)  # fmt: skip


class HubError(Exception):
    """An HTTP error answer: status, the Hub's `X-Error-Code` (required on every 404) and a message."""

    def __init__(self, status: int, message: str, error_code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code


@dataclass
class Blob:
    """One stored file version: its content lives in the blob store under its sha256.

    `git_oid` is the git blob id: of the content for regular files, of the LFS pointer file for LFS files.
    """

    sha256: str
    size: int
    lfs: bool
    git_oid: str

    @property
    def lfs_pointer(self) -> bytes:
        return lfs_pointer_file(self.sha256, self.size)


def lfs_pointer_file(sha256: str, size: int) -> bytes:
    """The small text file git stores in place of an LFS object."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def git_blob_sha1(data: bytes) -> str:
    """The id git gives a blob with this content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def make_blob(sha256: str, size: int, *, lfs: bool, content: bytes | None = None) -> Blob:
    """A Blob record; regular files need their `content` for the git id."""
    if lfs:
        return Blob(sha256, size, True, git_blob_sha1(lfs_pointer_file(sha256, size)))
    assert content is not None, "a regular file's git id is computed from its content"
    return Blob(sha256, size, False, git_blob_sha1(content))


@dataclass
class Commit:
    """A full snapshot of the repo: `files` maps every path to its blob."""

    oid: str
    parent: str | None
    title: str
    description: str
    date: str
    files: dict[str, Blob]


@dataclass
class Repo:
    """Commits by sha and branches (name -> commit sha) of one repo."""

    repo_type: str
    repo_id: str
    private: bool
    created: str
    space_sdk: str | None = None
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)


@dataclass
class Failure:
    """A pending injected failure: `remaining` None means forever."""

    endpoint: str
    kind: str
    remaining: int | None
    repo_id: str | None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class HubServer(ThreadingHTTPServer):
    """The server state: repos, the blob store on disk, injected failures and a request log.

    Args:
        storage_dir: where blobs and repo records are kept (a temporary folder when None).
        upload_mode: "auto" (LFS for binary or large files, regular otherwise, like the Hub),
            "regular" (everything base64 in the commit) or "lfs" (everything through the LFS batch API).
        lfs_threshold: files at least this many bytes go through LFS in "auto" mode.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        storage_dir: str | Path | None = None,
        *,
        upload_mode: str = "auto",
        lfs_threshold: int = 1 << 20,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if upload_mode not in ("auto", "regular", "lfs"):
            raise ValueError(f"upload_mode must be 'auto', 'regular' or 'lfs', not {upload_mode!r}")
        super().__init__((host, port), HubRequestHandler)
        self._owns_storage = storage_dir is None
        self.storage_dir = Path(
            tempfile.mkdtemp(prefix="hub_server_") if storage_dir is None else storage_dir
        )
        self.blob_dir = self.storage_dir / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.upload_mode = upload_mode
        self.lfs_threshold = lfs_threshold
        self.repos: dict[tuple[str, str], Repo] = {}
        self.failures: list[Failure] = []
        self.requests: list[tuple[str, str, int]] = []
        self.lock = threading.RLock()
        self._commit_counter = 0

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    # ----------------------------------------------------------------------------------------- test hooks
    def inject_failure(
        self,
        endpoint: str = "commit",
        *,
        count: int | None = 1,
        kind: str = "http_500",
        repo_id: str | None = None,
    ) -> None:
        """Make the next `count` calls of `endpoint` fail (`count=None`: every call, until cleared).

        Args:
            endpoint: "commit", "preupload", "lfs_batch", "lfs_upload", "create_repo", "resolve" (file
                downloads), "info" (GET /api/{type}s/{repo}), or another /api/{type}s/{repo}/NAME route
                by its NAME: "revision", "tree", "paths-info", "commits", "refs", "branch".
            count: how many calls fail; None for all of them.
            kind: "http_500" (an error answer) or "drop" (the connection is closed without an answer).
            repo_id: only calls for this repo fail (any repo when None).
        """
        if kind not in ("http_500", "drop"):
            raise ValueError(f"kind must be 'http_500' or 'drop', not {kind!r}")
        with self.lock:
            self.failures.append(Failure(endpoint, kind, count, repo_id))

    def clear_failures(self) -> None:
        with self.lock:
            self.failures.clear()

    def count_requests(self, method: str, pattern: str) -> int:
        """How many recorded requests had this method and a path matching the regular expression."""
        return sum(1 for m, path, _ in self.requests if m == method and re.search(pattern, path))

    def add_files(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        repo_type: str = "model",
        message: str = "Add files",
        branch: str = "main",
    ) -> str:
        """Create the repo if needed and commit `files` ({path: content}) directly; returns the commit sha."""
        with self.lock:
            repo = self.repos.get((repo_type, repo_id)) or self.create_repo(repo_type, repo_id)
            snapshot = dict(self.head(repo, branch).files) if branch in repo.branches else {}
            for path, content in files.items():
                snapshot[path] = self.store_blob(content, lfs=self.is_lfs(path, content))
            return self.commit(repo, branch, snapshot, message, "")

    def close(self) -> None:
        """Stop serving and delete the storage folder if the server created it."""
        self.shutdown()
        self.server_close()
        if self._owns_storage:
            shutil.rmtree(self.storage_dir, ignore_errors=True)

    # --------------------------------------------------------------------------------- failures, storage
    def take_failure(self, endpoint: str, repo_id: str | None) -> str | None:
        """The kind of failure to apply to this call, consuming one count; None to answer normally."""
        with self.lock:
            for failure in self.failures:
                if failure.endpoint != endpoint or (failure.repo_id not in (None, repo_id)):
                    continue
                if failure.remaining is not None:
                    failure.remaining -= 1
                    if failure.remaining <= 0:
                        self.failures.remove(failure)
                return failure.kind
        return None

    def is_lfs(self, path: str, content_or_sample: bytes, size: int | None = None) -> bool:
        if self.upload_mode != "auto":
            return self.upload_mode == "lfs"
        size = len(content_or_sample) if size is None else size
        return path.lower().endswith(LFS_SUFFIXES) or size >= self.lfs_threshold or b"\0" in content_or_sample

    def blob_path(self, sha256: str) -> Path:
        return self.blob_dir / sha256

    def has_blob(self, sha256: str) -> bool:
        return self.blob_path(sha256).is_file()

    def store_blob(self, content: bytes, *, lfs: bool) -> Blob:
        sha256 = hashlib.sha256(content).hexdigest()
        path = self.blob_path(sha256)
        if not path.exists():
            temporary = path.with_suffix(f".tmp{threading.get_ident()}")
            temporary.write_bytes(content)
            temporary.replace(path)
        return make_blob(sha256, len(content), lfs=lfs, content=content)

    def read_blob(self, sha256: str) -> bytes:
        return self.blob_path(sha256).read_bytes()

    def create_repo(
        self, repo_type: str, repo_id: str, *, private: bool = False, space_sdk: str | None = None
    ) -> Repo:
        with self.lock:
            repo = Repo(
                repo_type=repo_type, repo_id=repo_id, private=private, created=_now(), space_sdk=space_sdk
            )
            self.repos[(repo_type, repo_id)] = repo
            # The Hub starts every repo with one commit holding a .gitattributes file.
            gitattributes = self.store_blob(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", lfs=False)
            self.commit(repo, "main", {".gitattributes": gitattributes}, "initial commit", "")
            return repo

    def get_repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository Not Found: {repo_type} {repo_id}", "RepoNotFound")
        return repo

    def head(self, repo: Repo, branch: str) -> Commit:
        return repo.commits[repo.branches[branch]]

    def resolve(self, repo: Repo, revision: str) -> Commit:
        """A branch name or a full commit sha -> the commit; 404 RevisionNotFound otherwise."""
        if revision in repo.branches:
            return repo.commits[repo.branches[revision]]
        if COMMIT_SHA.match(revision) and revision in repo.commits:
            return repo.commits[revision]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def commit(self, repo: Repo, branch: str, files: dict[str, Blob], title: str, description: str) -> str:
        with self.lock:
            parent = repo.branches.get(branch)
            self._commit_counter += 1
            listing = sorted((path, blob.sha256) for path, blob in files.items())
            digest = json.dumps([parent, listing, title, description, self._commit_counter, _now()])
            oid = hashlib.sha1(digest.encode()).hexdigest()
            repo.commits[oid] = Commit(oid, parent, title, description, _now(), dict(files))
            repo.branches[branch] = oid
            self._save_record(repo)
            return oid

    def _save_record(self, repo: Repo) -> None:
        """Keep a readable record of each repo next to the blobs (for debugging failed tests)."""
        record_path = self.storage_dir / "repos" / f"{repo.repo_type}s" / f"{repo.repo_id}.json"
        record_path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "branches": repo.branches,
            "commits": [
                {
                    "oid": c.oid,
                    "parent": c.parent,
                    "title": c.title,
                    "files": {p: b.sha256 for p, b in c.files.items()},
                }
                for c in repo.commits.values()
            ],
        }
        record_path.write_text(json.dumps(record, indent=1))


def _directories(files: dict[str, Blob]) -> set[str]:
    """Every folder that holds at least one file (folders do not exist on their own in git)."""
    folders = set()
    for path in files:
        parts = path.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            folders.add("/".join(parts[:depth]))
    return folders


def _file_entry(path: str, blob: Blob) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "file", "path": path, "size": blob.size, "oid": blob.git_oid}
    if blob.lfs:
        entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": len(blob.lfs_pointer)}
    return entry


def _folder_entry(path: str, files: dict[str, Blob]) -> dict[str, Any]:
    inside = sorted((p, b.sha256) for p, b in files.items() if p.startswith(path + "/"))
    return {
        "type": "directory",
        "path": path,
        "size": 0,
        "oid": hashlib.sha1(json.dumps(inside).encode()).hexdigest(),
    }


def _front_matter(text: str) -> dict[str, Any] | None:
    """The YAML block at the top of a README, as the Hub shows it in `cardData`; None when absent."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, flags=re.DOTALL)
    if match is None:
        return None
    import yaml  # a test dependency of the project; only needed for cards

    data = yaml.safe_load(match.group(1))
    return data if isinstance(data, dict) else None


class HubRequestHandler(BaseHTTPRequestHandler):
    """Routes one request; every answer carries Content-Length so that connections stay alive."""

    protocol_version = "HTTP/1.1"
    server: HubServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        pass  # keep pytest output clean; `server.requests` has the log

    # ------------------------------------------------------------------------------------------ plumbing
    def _read_body(self) -> bytes:
        """Read the whole body (Content-Length or chunked): unread bytes would corrupt the next request."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size_line = self.rfile.readline().strip()
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers end with an empty line
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # the CRLF after each chunk
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.server.requests.append((self.command, self.path, status))

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _send_error(self, error: HubError, headers: dict[str, str] | None = None) -> None:
        extra = dict(headers or {})
        if error.error_code is not None:
            extra["X-Error-Code"] = error.error_code
        extra["X-Error-Message"] = error.message
        self._send_json(error.status, {"error": error.message}, extra)

    def _base_url(self) -> str:
        return f"http://{self.headers.get('Host') or self.server.url.removeprefix('http://')}"

    def _apply_failure(self, endpoint: str, repo_id: str | None) -> bool:
        """Answer with an injected failure if one is pending; True when the request was handled so."""
        kind = self.server.take_failure(endpoint, repo_id)
        if kind is None:
            return False
        if kind == "drop":
            self.server.requests.append((self.command, self.path, 0))
            self.close_connection = True
            with contextlib.suppress(OSError):  # the client may already be gone
                self.connection.shutdown(socket.SHUT_RDWR)
        else:
            self._send_json(500, {"error": f"injected failure of {endpoint}"})
        return True

    def _dispatch(self) -> None:
        body = self._read_body()  # always first: see _read_body
        parsed = urllib.parse.urlsplit(self.path)
        segments = [urllib.parse.unquote(part) for part in parsed.path.split("/")[1:]]
        query = urllib.parse.parse_qs(parsed.query)
        try:
            if segments and segments[0] == "api":
                self._route_api(segments[1:], query, body)
            else:
                self._route_files(segments, query, body)
        except HubError as error:
            self._send_error(error)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as error:  # a server bug must show up as a clear answer, not a hung client
            self._send_json(500, {"error": f"{type(error).__name__}: {error}"})

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    # ----------------------------------------------------------------------------------------- API routes
    def _route_api(self, segments: list[str], query: dict[str, list[str]], body: bytes) -> None:
        if segments == ["whoami-v2"]:
            return self._send_json(
                200,
                {
                    "type": "user",
                    "name": DEFAULT_NAMESPACE,
                    "fullname": "Test User",
                    "orgs": [],
                    "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
                },
            )
        if segments == ["validate-yaml"]:
            return self._validate_yaml(body)
        if segments[:1] == ["repos"] and self.command in ("POST", "DELETE"):
            if segments[1:] == ["create"]:
                return self._create_repo(body)
            if segments[1:] == ["delete"]:
                return self._delete_repo(body)
        if len(segments) >= 3 and segments[0].rstrip("s") in REPO_TYPES:
            repo_type = segments[0][:-1]
            repo_id = f"{segments[1]}/{segments[2]}"
            rest = segments[3:]
            return self._route_repo_api(repo_type, repo_id, rest, query, body)
        raise HubError(404, f"No such API route: {self.command} {self.path}", "EntryNotFound")

    def _validate_yaml(self, body: bytes) -> None:
        content = json.loads(body or b"{}").get("content", "")
        try:
            _front_matter(content)
        except Exception as error:  # yaml.YAMLError; imported lazily
            return self._send_json(400, {"errors": [{"message": f"Invalid YAML: {error}"}], "warnings": []})
        self._send_json(200, {"errors": [], "warnings": []})

    def _create_repo(self, body: bytes) -> None:
        payload = json.loads(body or b"{}")
        repo_type = payload.get("type") or "model"
        name = payload.get("name")
        if repo_type not in REPO_TYPES or not name:
            raise HubError(400, f"Invalid repo type {repo_type!r} or name {name!r}")
        repo_id = f"{payload.get('organization') or DEFAULT_NAMESPACE}/{name}"
        url = f"{self._base_url()}/{URL_PREFIXES[repo_type]}{repo_id}"
        if self._apply_failure("create_repo", repo_id):
            return None
        with self.server.lock:
            if (repo_type, repo_id) in self.server.repos:
                return self._send_json(409, {"error": "You already created this repo", "url": url})
            private = payload.get("private") or payload.get("visibility") == "private"
            self.server.create_repo(repo_type, repo_id, private=bool(private), space_sdk=payload.get("sdk"))
        self._send_json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self, body: bytes) -> None:
        payload = json.loads(body or b"{}")
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or DEFAULT_NAMESPACE}/{payload.get('name')}"
        with self.server.lock:
            self.server.get_repo(repo_type, repo_id)
            del self.server.repos[(repo_type, repo_id)]
        self._send_json(200, {})

    def _route_repo_api(
        self, repo_type: str, repo_id: str, rest: list[str], query: dict[str, list[str]], body: bytes
    ) -> None:
        endpoint = rest[0] if rest else "info"
        if self._apply_failure(endpoint, repo_id):
            return None
        repo = self.server.get_repo(repo_type, repo_id)
        if endpoint == "info" or (endpoint == "revision" and len(rest) >= 2):
            return self._repo_info(repo, rest[1] if len(rest) >= 2 else "main")
        if endpoint == "tree" and len(rest) >= 2:
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            return self._tree(repo, rest[1], "/".join(rest[2:]).strip("/"), recursive)
        if endpoint == "paths-info" and len(rest) == 2:
            return self._paths_info(repo, rest[1], body)
        if endpoint == "preupload" and len(rest) == 2:
            return self._preupload(repo, rest[1], body)
        if endpoint == "commit" and len(rest) == 2:
            return self._commit(repo, rest[1], query, body)
        if endpoint == "commits" and len(rest) == 2:
            return self._list_commits(repo, rest[1])
        if endpoint == "branch" and len(rest) == 2:
            return self._branch(repo, rest[1], body)
        if endpoint == "refs" and len(rest) == 1:
            branches = [
                {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
                for name, oid in repo.branches.items()
            ]
            return self._send_json(200, {"branches": branches, "converts": [], "tags": []})
        raise HubError(404, f"No such API route: {self.command} {self.path}", "EntryNotFound")

    def _repo_info(self, repo: Repo, revision: str) -> None:
        commit = self.server.resolve(repo, revision)
        namespace, name = repo.repo_id.split("/")
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path, "size": blob.size, "blobId": blob.git_oid}
            if blob.lfs:
                sibling["lfs"] = {
                    "sha256": blob.sha256,
                    "size": blob.size,
                    "pointerSize": len(blob.lfs_pointer),
                }
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": namespace,
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(blob.size for blob in commit.files.values()),
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        if repo.repo_type == "space":
            info["sdk"] = repo.space_sdk
            info["subdomain"] = f"{namespace}-{name}".lower()
        readme = commit.files.get("README.md")
        if readme is not None:
            try:
                card_data = _front_matter(
                    self.server.read_blob(readme.sha256).decode("utf-8", errors="replace")
                )
            except Exception:  # an unparsable card is the client's problem, not the listing's
                card_data = None
            if card_data is not None:
                info["cardData"] = card_data
                info["tags"] = list(card_data.get("tags") or [])
        self._send_json(200, info)

    def _tree(self, repo: Repo, revision: str, folder: str, recursive: bool) -> None:
        commit = self.server.resolve(repo, revision)
        folders = _directories(commit.files)
        if folder and folder not in folders:
            raise HubError(404, f"{folder} does not exist on {revision}", "EntryNotFound")
        prefix = f"{folder}/" if folder else ""
        entries = []
        for path in sorted(folders):
            if path.startswith(prefix) and (recursive or "/" not in path[len(prefix) :]):
                entries.append(_folder_entry(path, commit.files))
        for path, blob in sorted(commit.files.items()):
            if path.startswith(prefix) and (recursive or "/" not in path[len(prefix) :]):
                entries.append(_file_entry(path, blob))
        self._send_json(200, entries, {"X-Repo-Commit": commit.oid})

    def _paths_info(self, repo: Repo, revision: str, body: bytes) -> None:
        commit = self.server.resolve(repo, revision)
        content_type = self.headers.get("Content-Type", "")
        if content_type.startswith("application/json"):
            paths = json.loads(body or b"{}").get("paths", [])
        else:
            paths = urllib.parse.parse_qs(body.decode()).get("paths", [])
        folders = _directories(commit.files)
        entries = []
        for path in paths:
            path = path.strip("/")
            if path in commit.files:
                entries.append(_file_entry(path, commit.files[path]))
            elif path in folders:
                entries.append(_folder_entry(path, commit.files))
        self._send_json(200, entries, {"X-Repo-Commit": commit.oid})

    def _preupload(self, repo: Repo, revision: str, body: bytes) -> None:
        files = json.loads(body or b"{}").get("files", [])
        existing = self.server.resolve(repo, revision).files if revision in repo.branches else {}
        answers = []
        for file in files:
            sample = base64.b64decode(file.get("sample", ""))
            lfs = self.server.is_lfs(file["path"], sample, size=int(file.get("size", len(sample))))
            current = existing.get(file["path"])
            oid = None
            if current is not None:
                oid = current.sha256 if current.lfs else current.git_oid
            answers.append(
                {
                    "path": file["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": oid,
                }
            )
        self._send_json(200, {"files": answers, "commitOid": repo.branches.get(revision)})

    def _commit(self, repo: Repo, revision: str, query: dict[str, list[str]], body: bytes) -> None:
        if query.get("create_pr", ["0"])[0] not in ("0", "false", ""):
            raise HubError(400, "This test server does not implement pull requests (create_pr)")
        header: dict[str, Any] = {}
        operations: list[tuple[str, dict[str, Any]]] = []
        for line in body.splitlines():
            if line.strip():
                item = json.loads(line)
                if item["key"] == "header":
                    header = item["value"]
                else:
                    operations.append((item["key"], item["value"]))
        with self.server.lock:
            if revision in repo.branches:
                head_oid = repo.branches[revision]
            elif COMMIT_SHA.match(revision):
                raise HubError(400, f"Cannot commit to a commit sha ({revision}); name a branch")
            else:
                raise HubError(404, f"Branch {revision} does not exist", "RevisionNotFound")
            parent_commit = header.get("parentCommit")
            if parent_commit is not None and parent_commit != head_oid:
                raise HubError(
                    412, f"parentCommit {parent_commit} is not the head of {revision} ({head_oid})"
                )
            files = dict(repo.commits[head_oid].files)
            for key, value in operations:
                path = value["path"].strip("/")
                if key == "file":
                    content = base64.b64decode(value["content"])
                    files[path] = self.server.store_blob(content, lfs=False)
                elif key == "lfsFile":
                    sha256 = value["oid"]
                    if not self.server.has_blob(sha256):
                        raise HubError(422, f"LFS object {sha256} for {path} was never uploaded")
                    size = self.server.blob_path(sha256).stat().st_size
                    files[path] = make_blob(sha256, size, lfs=True)
                elif key == "deletedFile":
                    if path not in files:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del files[path]
                elif key == "deletedFolder":
                    files = {p: b for p, b in files.items() if not p.startswith(path + "/")}
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}")
            oid = self.server.commit(
                repo, revision, files, header.get("summary") or "", header.get("description") or ""
            )
        commit_url = f"{self._base_url()}/{URL_PREFIXES[repo.repo_type]}{repo.repo_id}/commit/{oid}"
        self._send_json(
            200, {"commitOid": oid, "commitUrl": commit_url, "success": True, "pullRequestUrl": None}
        )

    def _branch(self, repo: Repo, branch: str, body: bytes) -> None:
        """POST creates `branch` at `startingPoint` (default: the head of main); DELETE removes it."""
        with self.server.lock:
            if self.command == "DELETE":
                if branch not in repo.branches or branch == "main":
                    raise HubError(
                        404 if branch not in repo.branches else 400, f"Cannot delete branch {branch}"
                    )
                del repo.branches[branch]
                return self._send_json(200, {})
            if branch in repo.branches:
                return self._send_json(409, {"error": f"Reference already exists: refs/heads/{branch}"})
            starting_point = json.loads(body or b"{}").get("startingPoint") or "main"
            repo.branches[branch] = self.server.resolve(repo, starting_point).oid
        self._send_json(200, {})

    def _list_commits(self, repo: Repo, revision: str) -> None:
        commit: Commit | None = self.server.resolve(repo, revision)
        history = []
        while commit is not None:
            history.append(
                {
                    "id": commit.oid,
                    "title": commit.title,
                    "message": commit.description,
                    "authors": [{"user": DEFAULT_NAMESPACE}],
                    "date": commit.date,
                }
            )
            commit = repo.commits[commit.parent] if commit.parent else None
        self._send_json(200, history)

    # ----------------------------------------------------------------------------- file and LFS routes
    def _route_files(self, segments: list[str], query: dict[str, list[str]], body: bytes) -> None:
        if segments[:1] == ["lfs-upload"] and len(segments) == 4 and self.command == "PUT":
            # /lfs-upload/{namespace}/{name}/{oid}: the repo is in the URL so that failures can target it
            return self._lfs_upload(f"{segments[1]}/{segments[2]}", segments[3], body)
        if segments[:1] == ["lfs-verify"] and len(segments) == 2 and self.command == "POST":
            sha256 = segments[1]
            if not self.server.has_blob(sha256):
                raise HubError(404, f"LFS object {sha256} not found", "EntryNotFound")
            return self._send_json(200, {"success": True})
        repo_type = "model"
        if segments[:1] in (["datasets"], ["spaces"]):
            repo_type = segments[0][:-1]
            segments = segments[1:]
        if (
            len(segments) == 6
            and segments[2:] == ["info", "lfs", "objects", "batch"]
            and segments[1].endswith(".git")
        ):
            return self._lfs_batch(repo_type, f"{segments[0]}/{segments[1][: -len('.git')]}", body)
        if len(segments) >= 5 and segments[2] in ("resolve", "raw"):
            repo_id = f"{segments[0]}/{segments[1]}"
            return self._resolve(repo_type, repo_id, segments[3], "/".join(segments[4:]))
        raise HubError(404, f"Not found: {self.path}", "EntryNotFound")

    def _lfs_batch(self, repo_type: str, repo_id: str, body: bytes) -> None:
        if self._apply_failure("lfs_batch", repo_id):
            return None
        self.server.get_repo(repo_type, repo_id)
        payload = json.loads(body or b"{}")
        if payload.get("operation") != "upload":
            raise HubError(400, "This test server only implements LFS uploads")
        objects = []
        for item in payload.get("objects", []):
            oid, size = item["oid"], int(item["size"])
            answer: dict[str, Any] = {"oid": oid, "size": size}
            if not self.server.has_blob(oid):  # present objects get no actions: the client skips them
                answer["authenticated"] = True
                answer["actions"] = {
                    "upload": {"href": f"{self._base_url()}/lfs-upload/{repo_id}/{oid}"},
                    "verify": {"href": f"{self._base_url()}/lfs-verify/{oid}"},
                }
            objects.append(answer)
        self._send(
            200,
            json.dumps({"transfer": "basic", "objects": objects}).encode(),
            content_type="application/vnd.git-lfs+json",
        )

    def _lfs_upload(self, repo_id: str, sha256: str, body: bytes) -> None:
        if self._apply_failure("lfs_upload", repo_id):
            return None
        if hashlib.sha256(body).hexdigest() != sha256:
            raise HubError(400, f"Uploaded content does not match its sha256 {sha256}")
        self.server.store_blob(body, lfs=True)
        self._send(200, b"", {"ETag": f'"{sha256}"'})

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        if self.command not in ("GET", "HEAD"):
            raise HubError(405, f"{self.command} is not allowed on files")
        if self._apply_failure("resolve", repo_id):
            return None
        repo = self.server.get_repo(repo_type, repo_id)
        commit = self.server.resolve(repo, revision)
        blob = commit.files.get(path)
        if blob is None:
            error = HubError(404, f"Entry not found: {path} at {revision}", "EntryNotFound")
            return self._send_error(error, {"X-Repo-Commit": commit.oid})
        etag = blob.sha256 if blob.lfs else blob.git_oid
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if blob.lfs:
            headers["X-Linked-Etag"] = f'"{blob.sha256}"'
            headers["X-Linked-Size"] = str(blob.size)
        content = self.server.read_blob(blob.sha256)
        status = 200
        range_header = self.headers.get("Range")
        if range_header:
            byte_range = _parse_range(range_header, blob.size)
            if byte_range is None:
                headers["Content-Range"] = f"bytes */{blob.size}"
                return self._send(416, b"", headers, content_type="application/octet-stream")
            start, end = byte_range
            content = content[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{blob.size}"
            status = 206
        self._send(status, content, headers, content_type="application/octet-stream")


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """`bytes=a-b`, `bytes=a-` or `bytes=-n` -> inclusive (start, end); None when unsatisfiable."""
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if match is None or (match.group(1) == "" and match.group(2) == ""):
        return None
    if match.group(1) == "":
        length = int(match.group(2))
        if length == 0:
            return None
        return max(size - length, 0), size - 1
    start = int(match.group(1))
    end = int(match.group(2)) if match.group(2) else size - 1
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)


def start_hub_server(
    storage_dir: str | Path | None = None, *, upload_mode: str = "auto", lfs_threshold: int = 1 << 20
) -> tuple[str, HubServer, Any]:
    """Start a `HubServer` on 127.0.0.1 and a free port, serving from a daemon thread.

    Returns:
        (url, server, stop): the endpoint to use as HF_ENDPOINT, the server (for the test hooks), and a
        function that stops it and removes its storage.
    """
    server = HubServer(storage_dir, upload_mode=upload_mode, lfs_threshold=lfs_threshold)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()

    def stop() -> None:
        server.close()
        thread.join(timeout=5)

    return server.url, server, stop


def client_environment(
    url: str, home: str | Path, token: str = "hf_test_token_for_local_hub"
) -> dict[str, str]:
    """The environment variables that point the Hugging Face clients at this server (set before import)."""
    return {
        "HF_ENDPOINT": url,
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_XET": "1",  # the LFS batch API instead of Xet, which this server does not speak
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_TOKEN": token,
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


def subprocess_environment(url: str, home: str | Path) -> dict[str, str]:
    """This process's environment without its Hugging Face settings (HF_*, TRANSFORMERS_*: other tests may
    run offline), plus `client_environment`: what a client subprocess of this server needs."""
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith(("HF_", "TRANSFORMERS_"))
    }
    environment.update(client_environment(url, home))
    return environment


@dataclass
class LocalHub:
    """A running server for a test: `url`, the `server` (hooks, request log) and `env`, the environment for
    client subprocesses (`subprocess.run([...], env=local_hub.env)`)."""

    url: str
    server: HubServer
    env: dict[str, str]


@contextlib.contextmanager
def running_hub(folder: str | Path, **server_options: Any) -> Iterator[LocalHub]:
    """Serve a HubServer for the duration of a `with` block; its blobs and client cache live in `folder`."""
    folder = Path(folder)
    url, server, stop = start_hub_server(folder / "storage", **server_options)
    try:
        yield LocalHub(url, server, subprocess_environment(url, folder / "hf_home"))
    finally:
        stop()


@pytest.fixture(scope="module")
def local_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHub]:
    """A HubServer for a test module; import it into a conftest.py (`from hub_server import local_hub`) to
    offer it to every test file."""
    with running_hub(tmp_path_factory.mktemp("local_hub")) as hub:
        yield hub


if __name__ == "__main__":
    import argparse
    import time

    parser = argparse.ArgumentParser(description="Serve a local Hub-compatible server until interrupted.")
    parser.add_argument(
        "--storage", default=None, help="folder for blobs and repo records (temporary if unset)"
    )
    parser.add_argument("--upload-mode", default="auto", choices=["auto", "regular", "lfs"])
    arguments = parser.parse_args()
    url, server, stop = start_hub_server(arguments.storage, upload_mode=arguments.upload_mode)
    print(f"HF_ENDPOINT={url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stop()
