"""A local stand-in for the Hugging Face Hub: serves model repos from folders on disk over HTTP, answering the
requests huggingface_hub's `snapshot_download` / `hf_hub_download` make, so tests fill a real Hub cache with
huggingface_hub's own download code and no network.

Endpoints (as huggingface_hub 2.4 calls them; `{rev}` is URL-quoted with no safe characters):
  GET  /api/models/{org}/{name}[/revision/{rev}]         model info JSON; `sha` is the commit the revision names
  GET  /api/models/{org}/{name}/tree/{rev}?recursive=..  JSON list of {"type", "path", "oid", "size"[, "lfs"]}
  HEAD /{org}/{name}/resolve/{rev}/{file}                headers X-Repo-Commit, ETag (+ X-Linked-Etag/-Size
  GET  /{org}/{name}/resolve/{rev}/{file}                for LFS files), Content-Length; GET also sends the bytes
Errors carry the X-Error-Code huggingface_hub maps to its exceptions: RepoNotFound, GatedRepo, RevisionNotFound,
EntryNotFound.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

# Files the Hub keeps in LFS (as a repo's .gitattributes would name them): their ETag is the content's sha256.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass(frozen=True)
class RepoFile:
    """One file of a served repo with the ids the Hub reports for it."""

    path: str  # "/"-separated, relative to the repo root
    data: bytes
    blob_id: str  # git blob sha1
    sha256: str | None  # set for LFS files

    @classmethod
    def read(cls, root: Path, file: Path) -> RepoFile:
        """The file `file` of the repo folder `root`."""
        data = file.read_bytes()
        blob_id = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        sha256 = hashlib.sha256(data).hexdigest() if file.name.endswith(LFS_SUFFIXES) else None
        return cls(file.relative_to(root).as_posix(), data, blob_id, sha256)

    @property
    def etag(self) -> str:
        """What the Hub's ETag names: the sha256 of an LFS file, the git blob id of any other."""
        return self.sha256 or self.blob_id

    def tree_entry(self) -> dict:
        """The file as the tree listing endpoint describes it."""
        entry = {"type": "file", "path": self.path, "oid": self.blob_id, "size": len(self.data)}
        if self.sha256 is not None:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": 134}
        return entry


@dataclass
class ServedRepo:
    """A model repo at one commit, with the branches and tags that point at it."""

    repo_id: str
    files: dict[str, RepoFile]
    commit: str
    refs: tuple[str, ...]
    gated: bool = False

    def resolve(self, revision: str) -> str | None:
        """The commit `revision` (a ref or the commit hash) names, None if it names none."""
        return self.commit if revision == self.commit or revision in self.refs else None

    def tree(self) -> list[dict]:
        """The recursive tree listing: every file and every folder above one."""
        folders = {parent.as_posix() for path in self.files for parent in Path(path).parents if parent != Path(".")}
        entries = [{"type": "directory", "path": folder, "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0}
                   for folder in sorted(folders)]
        return entries + [file.tree_entry() for _, file in sorted(self.files.items())]


@dataclass
class LocalHub:
    """The Hub's download API for the repos added to it, on 127.0.0.1 at a free port, served by a thread.

    Use as a context manager, or call `start()` and `stop()`. `requests` records "METHOD /path" of each request.
    """

    repos: dict[str, ServedRepo] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    def add_repo(self, repo_id: str, folder: Path, refs: tuple[str, ...] = ("main",), gated: bool = False) -> str:
        """Serve the files under `folder` as repo `repo_id`, with `refs` naming its one commit; return that commit."""
        files = {f.path: f for f in (RepoFile.read(folder, p) for p in sorted(folder.rglob("*")) if p.is_file())}
        listing = "".join(f"{path} {file.blob_id}\n" for path, file in sorted(files.items()))
        commit = hashlib.sha1(f"{repo_id}\n{listing}".encode()).hexdigest()
        self.repos[repo_id] = ServedRepo(repo_id, files, commit, refs, gated)
        return commit

    @property
    def endpoint(self) -> str:
        """The base URL to put in HF_ENDPOINT."""
        assert self._server is not None, "LocalHub is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LocalHub:
        """Start serving in a daemon thread."""
        hub = self

        class Handler(_HubHandler):
            local_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket (the port then refuses connections)."""
        if self._server is not None and self._thread is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def closed_port_endpoint() -> str:
    """An http://127.0.0.1:PORT URL where nothing listens: connections to it are refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class _HubHandler(BaseHTTPRequestHandler):
    """Answers one request the way the Hub does, for the repos of `local_hub`."""

    local_hub: LocalHub

    def do_GET(self) -> None:
        """Model info, tree listing or file download."""
        self._route(send_body=True)

    def do_HEAD(self) -> None:
        """File metadata (huggingface_hub's ETag / size / commit request)."""
        self._route(send_body=False)

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""

    def _route(self, send_body: bool) -> None:
        self.local_hub.requests.append(f"{self.command} {self.path}")
        parts = [unquote(part) for part in urlsplit(self.path).path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            self._api(parts[2] + "/" + parts[3], parts[4:])
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._resolve(parts[0] + "/" + parts[1], parts[3], "/".join(parts[4:]), send_body)
        else:
            self._error(404, "", "Not found")

    def _repo(self, repo_id: str) -> ServedRepo | None:
        repo = self.local_hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
        elif repo.gated:
            self._error(401, "GatedRepo", "Access to model is restricted: you must be authenticated")
        else:
            return repo
        return None

    def _commit(self, repo: ServedRepo, revision: str) -> str | None:
        commit = repo.resolve(revision)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def _api(self, repo_id: str, rest: list[str]) -> None:
        if (repo := self._repo(repo_id)) is None:
            return
        if not rest or rest[0] == "revision" and len(rest) == 2:
            if (commit := self._commit(repo, rest[1] if rest else "main")) is not None:
                siblings = [{"rfilename": path} for path in sorted(repo.files)]
                self._json({"_id": commit[:24], "id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                            "gated": False, "disabled": False, "tags": [], "siblings": siblings})
        elif rest[0] == "tree" and len(rest) >= 2:
            if self._commit(repo, rest[1]) is not None:
                self._json(repo.tree())
        else:
            self._error(404, "", "Not found")

    def _resolve(self, repo_id: str, revision: str, path: str, send_body: bool) -> None:
        if (repo := self._repo(repo_id)) is None or (commit := self._commit(repo, revision)) is None:
            return
        file = repo.files.get(path)
        if file is None:
            self._error(404, "EntryNotFound", f"{path} does not exist on {revision}", {"X-Repo-Commit": commit})
            return
        headers = {"X-Repo-Commit": commit, "ETag": f'"{file.etag}"', "Content-Type": "application/octet-stream"}
        if file.sha256 is not None:
            headers |= {"X-Linked-Etag": f'"{file.sha256}"', "X-Linked-Size": str(len(file.data))}
        self._send(200, file.data, headers, send_body)

    def _json(self, payload: object) -> None:
        self._send(200, json.dumps(payload).encode(), {"Content-Type": "application/json"}, True)

    def _error(self, status: int, code: str, message: str, extra: dict[str, str] | None = None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers, self.command != "HEAD")

    def _send(self, status: int, body: bytes, headers: dict[str, str], send_body: bool) -> None:
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)
