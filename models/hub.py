"""Hugging Face Hub ids (`ORG/NAME[@REVISION]`) resolved to a snapshot directory of the local Hub cache.

Downloads go through `huggingface_hub.snapshot_download`, so the cache is laid out exactly as every other
Hugging Face tool lays it out (`<cache>/models--ORG--NAME/snapshots/<commit>`) and is shared with them.
`HF_HOME`, `HF_HUB_CACHE`, `HF_ENDPOINT` and `HF_HUB_OFFLINE` are read when `fetch_snapshot` runs (not only
when huggingface_hub was imported); `HF_TOKEN` is read by huggingface_hub on each request.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, constants, get_cached_repo_tree, snapshot_download
from huggingface_hub.errors import (
    CachedRepoTreeNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import tqdm as hf_tqdm
from huggingface_hub.utils import validate_repo_id

from pdserve.models.errors import ModelLoadError

logger = logging.getLogger(__name__)

# What serving reads from a checkpoint; pickled weights (*.bin, *.pt, *.pth) are never fetched.
SERVING_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "model*.safetensors",  # model.safetensors or its shards; not e.g. Mistral's consolidated.safetensors copy
    "model.safetensors.index.json",
)
# huggingface_hub's patterns let `*` cross `/`: without this, `*.safetensors` would also fetch copies kept in
# sub-folders (e.g. `original/`), which the loader never reads.
_TOP_LEVEL_ONLY = ("*/*",)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# Characters git forbids in ref names (plus whitespace); a revision holding one cannot name anything on the Hub.
_BAD_REVISION = re.compile(r"[\s~^:?*\[\\]|\.\.|@\{")


@dataclass(frozen=True)
class HubSnapshot:
    """A Hub model revision in the local Hugging Face cache."""

    repo_id: str  # "ORG/NAME"
    commit: str  # the 40-hex commit hash the revision resolved to
    path: Path  # <cache>/models--ORG--NAME/snapshots/<commit>


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """("ORG/NAME", revision or None) when `spec` reads as a Hub id `ORG/NAME[@REVISION]`, else None.

    None for anything that exists on disk, for paths (`/x`, `./x`, `../x`, `~/x`, `a/b/c`), for `*.gguf` names and
    for ids huggingface_hub's validator rejects. A valid id followed by an empty or malformed revision
    (`org/name@`, `org/name@a b`) raises ModelLoadError: it names a Hub model, but no revision the Hub could have.
    """
    if not spec or spec.startswith(("/", ".", "~", "\\")) or spec.lower().endswith(".gguf") or _exists(spec):
        return None
    repo_id, at, revision = spec.partition("@")
    if repo_id.count("/") != 1 or not _valid_repo_id(repo_id):
        return None
    if not at:
        return repo_id, None
    if not revision or _BAD_REVISION.search(revision):
        raise ModelLoadError(
            f"Hub model {spec!r}: {revision!r} is not a revision; write ORG/NAME or ORG/NAME@REVISION "
            "(a branch, a tag or a commit hash)"
        )
    return repo_id, revision


def fetch_snapshot(repo_id: str, revision: str | None = None, *, progress: bool | None = None) -> HubSnapshot:
    """Download (or find in the cache) the files serving needs of Hub model `repo_id` at `revision`.

    `revision`: a branch, tag or commit hash; None is the repo's default branch. `progress`: show download
    progress bars on stderr; None shows them only when stderr is a terminal. Offline (`HF_HUB_OFFLINE=1`) or
    with the Hub unreachable, a cached revision loads without any retry and a missing one fails at once.
    Raises ModelLoadError naming the id, the cache directory and the reason.
    """
    if not _valid_repo_id(repo_id) or repo_id.count("/") != 1:
        raise ModelLoadError(f"{repo_id!r} is not a Hub model id (ORG/NAME)")
    hub = _HubEnv.from_environ()
    request = _Request(repo_id, revision, hub)
    if hub.offline:
        path = request.from_cache(_Refusal("offline mode is on (HF_HUB_OFFLINE)", _OFFLINE_HINT))
    else:
        path = request.download(_bar_class(progress))
    snapshot = HubSnapshot(repo_id=repo_id, commit=path.name, path=path)
    _check_checkpoint(snapshot, request.label, hub.cache_dir)
    return snapshot


@dataclass(frozen=True)
class _HubEnv:
    """Where the Hub and its cache are, read from the environment at call time."""

    endpoint: str
    cache_dir: Path
    offline: bool

    @classmethod
    def from_environ(cls) -> _HubEnv:
        """Read HF_ENDPOINT / HF_HUB_CACHE / HF_HOME / HF_HUB_OFFLINE now, falling back on huggingface_hub's values."""
        endpoint = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or constants.ENDPOINT
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        # huggingface_hub fixed its offline flag at import: if it is on, every request it makes fails anyway.
        return cls(endpoint, _cache_dir(), offline or constants.is_offline_mode())


@dataclass(frozen=True)
class _Refusal:
    """Why the Hub could not provide a revision, and what the user can do about it."""

    reason: str
    hint: str


_OFFLINE_HINT = (
    "Unset HF_HUB_OFFLINE to download it, or fill this cache where the Hub is reachable (HF_HOME / HF_HUB_CACHE)"
)
_NETWORK_HINT = (
    "Check the network and HF_ENDPOINT, or fill this cache where the Hub is reachable (HF_HOME / HF_HUB_CACHE); "
    "set HF_HUB_OFFLINE=1 to use only the cache"
)


@dataclass(frozen=True)
class _Request:
    """One fetch of `repo_id` at `revision`: asks the Hub first, falls back on the cache when it cannot."""

    repo_id: str
    revision: str | None
    hub: _HubEnv

    @property
    def label(self) -> str:
        """The id as the user wrote it: ORG/NAME or ORG/NAME@REVISION."""
        return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"

    def download(self, bar_class: type[hf_tqdm]) -> Path:
        """Resolve the revision on the Hub and download what is missing; use the cache if the Hub refuses."""
        refusal = self._ask_hub()
        if refusal is not None:
            path = self.from_cache(refusal)
            logger.warning("Using the cached snapshot of Hub model %r: %s", self.label, refusal.reason)
            return path
        try:
            return Path(snapshot_download(self.repo_id, **self._download_args(), endpoint=self.hub.endpoint,
                                          tqdm_class=bar_class))
        except (HfHubHTTPError, LocalEntryNotFoundError, httpx2.HTTPError, OSError) as exc:
            raise ModelLoadError(
                f"Hub model {self.label!r} could not be downloaded into the Hugging Face cache ({self.hub.cache_dir}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def from_cache(self, refusal: _Refusal) -> Path:
        """The cached snapshot, without touching the network; ModelLoadError built from `refusal` when absent."""
        try:
            return Path(snapshot_download(self.repo_id, **self._download_args(), local_files_only=True))
        except LocalEntryNotFoundError as exc:
            state = "only partly in" if isinstance(exc, IncompleteSnapshotError) else "not in"
            raise ModelLoadError(
                f"Hub model {self.label!r} is {state} the Hugging Face cache ({self.hub.cache_dir}) and cannot be "
                f"downloaded: {refusal.reason}. {refusal.hint}"
            ) from exc

    def _download_args(self) -> dict:
        return {"revision": self.revision, "cache_dir": self.hub.cache_dir, "allow_patterns": list(SERVING_FILES),
                "ignore_patterns": list(_TOP_LEVEL_ONLY)}

    def _ask_hub(self) -> _Refusal | None:
        """None when the Hub knows the revision; else why not.

        snapshot_download's own first request carries no timeout, and with a commit hash it skips that request and
        lists the repo through a helper that retries connection errors with backoff (1+2+4+8+8 s). This one request, with
        a timeout and no retry, tells at once whether the Hub can be reached at all.
        """
        api = HfApi(endpoint=self.hub.endpoint)
        try:
            api.model_info(self.repo_id, revision=self.revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
        except httpx2.TransportError as exc:
            return _Refusal(f"the Hub at {self.hub.endpoint} cannot be reached ({type(exc).__name__}: {exc})",
                            _NETWORK_HINT)
        except RevisionNotFoundError:
            return _Refusal(f"the repository has no revision {self.revision!r} on {self.hub.endpoint}",
                            "Check the branch, tag or commit hash")
        except GatedRepoError:
            return _Refusal(f"the repository is gated on {self.hub.endpoint}",
                            "Accept its terms on the model's Hub page and set HF_TOKEN to a token of that account")
        except RepositoryNotFoundError:
            return _Refusal(f"no repository {self.repo_id!r} on {self.hub.endpoint}, or it is private",
                            "Check the id; for a private repository set HF_TOKEN to a token that can read it")
        except HfHubHTTPError as exc:
            detail = f": {exc.server_message}" if exc.server_message else ""
            return _Refusal(f"the Hub at {self.hub.endpoint} answered HTTP {exc.response.status_code}{detail}",
                            _NETWORK_HINT)
        except ValueError as exc:  # a reply that is not the Hub's JSON
            return _Refusal(f"{self.hub.endpoint} does not answer like the Hub ({exc})", _NETWORK_HINT)
        return None


class _ProgressBar(hf_tqdm):
    """huggingface_hub's progress bar, shown even when stderr is not a terminal."""

    disable_bar = False

    def __init__(self, *args, **kwargs) -> None:
        kwargs["disable"] = self.disable_bar
        super().__init__(*args, **kwargs)


class _NoProgressBar(_ProgressBar):
    """huggingface_hub's progress bar, never shown."""

    disable_bar = True


def _bar_class(progress: bool | None) -> type[hf_tqdm]:
    if progress is None:
        progress = sys.stderr is not None and sys.stderr.isatty()
    return _ProgressBar if progress else _NoProgressBar


def _cache_dir() -> Path:
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if value := os.environ.get(name):
            return _expand(value)
    if value := os.environ.get("HF_HOME"):
        return _expand(value) / "hub"
    return _expand(constants.HF_HUB_CACHE)


def _expand(path: str) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(path))).resolve()


def _exists(spec: str) -> bool:
    try:
        return Path(spec).exists()
    except OSError:  # e.g. a name too long for the file system
        return False


def _valid_repo_id(repo_id: str) -> bool:
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return True


def _check_checkpoint(snapshot: HubSnapshot, label: str, cache_dir: Path) -> None:
    """ModelLoadError unless the snapshot holds a config.json and safetensors weights."""
    missing = [what for what, present in (
        ("no config.json", (snapshot.path / "config.json").is_file()),
        ("no model*.safetensors weights", any(snapshot.path.glob("model*.safetensors"))),
    ) if not present]
    if missing:
        raise ModelLoadError(
            f"Hub model {label!r} (commit {snapshot.commit}) has no safetensors Llama-family checkpoint: "
            f"{' and '.join(missing)}{_held_instead(snapshot, cache_dir)}"
        )


def _held_instead(snapshot: HubSnapshot, cache_dir: Path) -> str:
    """What weights the repo holds instead, from the file listing snapshot_download cached ('' if unknown)."""
    try:
        files = [f.path for f in get_cached_repo_tree(snapshot.repo_id, revision=snapshot.commit, cache_dir=cache_dir)]
    except CachedRepoTreeNotFoundError:
        return ""
    pickles = [name for name in files if name.endswith(_PICKLE_SUFFIXES)]
    ggufs = [name for name in files if name.lower().endswith(".gguf")]
    held = [f"PyTorch pickles ({', '.join(pickles)}), which pdserve never loads"] if pickles else []
    held += [f"GGUF files ({', '.join(ggufs)}): download one and pass its path, --model FILE.gguf"] if ggufs else []
    return f"; the repository holds {', and '.join(held)}" if held else ""
