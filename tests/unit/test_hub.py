"""Hub ids (ORG/NAME[@REVISION]): a Hub cache filled by huggingface_hub's own download code from a local
stand-in for the Hub, then loaded offline or with the Hub unreachable, and missing ids failing at once."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import constants
from huggingface_hub.utils import are_progress_bars_disabled

from helpers.hub_testing import LocalHub, closed_port_endpoint
from pdserve.models.config import ModelLoadError
from pdserve.models.hub import HubSnapshot, fetch_snapshot, parse_hub_id
from pdserve.models.tiny_model import make_tiny_model

REPO = "pdserve-test/tiny-llama"
BIN_ONLY = "pdserve-test/bin-only"
GATED = "pdserve-test/gated"
MISSING = "pdserve-test/missing"
SERVED_FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "chat_template.jinja", "model.safetensors"}
FAST_S = 1.0


@pytest.fixture(scope="module")
def checkpoint_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repo folder: a tiny safetensors checkpoint plus files serving must not fetch."""
    repo = make_tiny_model(tmp_path_factory.mktemp("tiny_llama"), arch="llama", size="tiny")
    (repo / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (repo / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle")
    (repo / "README.md").write_text("# tiny llama\n")
    (repo / "original").mkdir()
    shutil.copy(repo / "model.safetensors", repo / "original" / "model.safetensors")
    shutil.copy(repo / "model.safetensors", repo / "consolidated.safetensors")  # Mistral repos ship such a copy
    return repo


@pytest.fixture(scope="module")
def bin_only_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repo folder with a config and only pickled weights."""
    repo = tmp_path_factory.mktemp("bin_only")
    (repo / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (repo / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle")
    return repo


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private HF_HOME, online and without a token; returns the Hub cache inside it."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN",
                 "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    # huggingface_hub read HF_HUB_OFFLINE once, at import; a suite run offline must still reach the local Hub.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return (tmp_path / "hf_home" / "hub").resolve()


@pytest.fixture
def hub(checkpoint_repo: Path, bin_only_repo: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalHub]:
    """The local Hub serving the test repos, with HF_ENDPOINT pointing at it."""
    with LocalHub() as local:
        local.add_repo(REPO, checkpoint_repo, refs=("main", "v1.0"))
        local.add_repo(BIN_ONLY, bin_only_repo)
        local.add_repo(GATED, checkpoint_repo, gated=True)
        monkeypatch.setenv("HF_ENDPOINT", local.endpoint)
        yield local


def _fetch(spec: str, progress: bool | None = None) -> HubSnapshot:
    parsed = parse_hub_id(spec)
    assert parsed is not None, spec
    return fetch_snapshot(*parsed, progress=progress)


def _timed_fetch(spec: str) -> tuple[HubSnapshot, float]:
    start = time.monotonic()
    snapshot = _fetch(spec)
    return snapshot, time.monotonic() - start


def _timed_failure(spec: str) -> tuple[str, float]:
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        _fetch(spec)
    return str(info.value), time.monotonic() - start


def _downloads(hub: LocalHub) -> list[str]:
    return [request for request in hub.requests if "/resolve/" in request]


def test_download_fills_the_hub_cache_with_the_serving_files_only(hub: LocalHub, cache_dir: Path,
                                                                   checkpoint_repo: Path) -> None:
    served = hub.repos[REPO]
    snapshot = _fetch(REPO)

    repo_cache = cache_dir / "models--pdserve-test--tiny-llama"
    assert re.fullmatch("[0-9a-f]{40}", served.commit)
    assert snapshot == HubSnapshot(REPO, served.commit, repo_cache / "snapshots" / served.commit)
    assert {path.name for path in snapshot.path.iterdir()} == SERVED_FILES
    assert (repo_cache / "refs" / "main").read_text() == served.commit
    weights = snapshot.path / "model.safetensors"
    assert weights.is_symlink()
    assert weights.resolve() == repo_cache / "blobs" / served.files["model.safetensors"].sha256
    assert weights.read_bytes() == (checkpoint_repo / "model.safetensors").read_bytes()
    skipped = ("pytorch_model.bin", "README.md", "original/")
    assert not [request for request in _downloads(hub) if any(name in request for name in skipped)]


def test_hf_hub_cache_is_read_at_call_time(hub: LocalHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    snapshot = _fetch(REPO)
    assert snapshot.path.is_relative_to((tmp_path / "elsewhere").resolve())


def test_cached_revisions_load_offline_by_id_branch_tag_and_commit(hub: LocalHub,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    first = _fetch(REPO)
    assert _fetch(f"{REPO}@v1.0") == first
    hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    for spec in (REPO, f"{REPO}@main", f"{REPO}@v1.0", f"{REPO}@{first.commit}"):
        snapshot, elapsed = _timed_fetch(spec)
        assert snapshot == first, spec
        assert elapsed < FAST_S, (spec, elapsed)


@pytest.mark.parametrize("spec", [MISSING, f"{MISSING}@{'0' * 40}", f"{REPO}@v2.0"])
def test_uncached_ids_fail_at_once_offline(hub: LocalHub, cache_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                           spec: str) -> None:
    _fetch(REPO)
    hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    message, elapsed = _timed_failure(spec)
    assert elapsed < FAST_S
    assert f"Hub model {spec!r} is not in the Hugging Face cache ({cache_dir})" in message
    assert "cannot be downloaded: offline mode is on (HF_HUB_OFFLINE)" in message


def test_unreachable_hub_serves_the_cache_and_fails_at_once_without_it(hub: LocalHub, cache_dir: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    cached = _fetch(REPO)
    requests_before = len(hub.requests)
    monkeypatch.setenv("HF_ENDPOINT", closed_port_endpoint())

    for spec in (REPO, f"{REPO}@main", f"{REPO}@{cached.commit}"):
        snapshot, elapsed = _timed_fetch(spec)
        assert snapshot == cached, spec
        assert elapsed < FAST_S, (spec, elapsed)
    # With a commit hash, huggingface_hub alone would retry the tree listing with backoff for ~25 s.
    for spec in (MISSING, f"{MISSING}@{'0' * 40}"):
        message, elapsed = _timed_failure(spec)
        assert elapsed < FAST_S, (spec, elapsed)
        assert f"Hub model {spec!r} is not in the Hugging Face cache ({cache_dir})" in message
        assert "cannot be reached" in message
    assert len(hub.requests) == requests_before


@pytest.mark.parametrize(("spec", "reason"), [
    (MISSING, f"no repository {MISSING!r}"),
    (GATED, "the repository is gated"),
    (f"{REPO}@no-such-branch", "the repository has no revision 'no-such-branch'"),
])
def test_hub_refusals_say_which(hub: LocalHub, cache_dir: Path, spec: str, reason: str) -> None:
    message, _ = _timed_failure(spec)
    assert f"Hub model {spec!r} is not in the Hugging Face cache ({cache_dir})" in message
    assert reason in message


def test_repo_with_only_pickled_weights_is_refused(hub: LocalHub) -> None:
    with pytest.raises(ModelLoadError, match="has no safetensors Llama-family checkpoint") as info:
        _fetch(BIN_ONLY)
    assert BIN_ONLY in str(info.value)
    assert "pytorch_model.bin" in str(info.value)
    assert not [request for request in _downloads(hub) if "pytorch_model.bin" in request]


def test_progress_bars_only_on_a_terminal_or_when_asked(hub: LocalHub, capsys: pytest.CaptureFixture[str]) -> None:
    _fetch(REPO)  # progress=None, and pytest's stderr is no terminal
    assert capsys.readouterr().err == ""
    if are_progress_bars_disabled():
        pytest.skip("HF_HUB_DISABLE_PROGRESS_BARS is set")
    _fetch(REPO, progress=True)
    assert "Fetching" in capsys.readouterr().err


@pytest.mark.parametrize(("spec", "expected"), [
    ("meta-llama/Llama-3.2-1B-Instruct", ("meta-llama/Llama-3.2-1B-Instruct", None)),
    ("org/name@v1.0", ("org/name", "v1.0")),
    ("org/name@refs/pr/1", ("org/name", "refs/pr/1")),
    (f"org/name@{'a' * 40}", ("org/name", "a" * 40)),
    ("a/b/c", None),
    ("/abs/x", None),
    ("./x", None),
    ("../x/y", None),
    ("~/x", None),
    ("x.gguf", None),
    ("org/model-Q4_K_M.gguf", None),
    ("name-without-org", None),
    ("org/na--me", None),
    ("org/name.git", None),
    ("", None),
])
def test_parse_hub_id(spec: str, expected: tuple[str, str | None] | None) -> None:
    assert parse_hub_id(spec) == expected


def test_parse_hub_id_leaves_existing_paths_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    (tmp_path / "org" / "file@v1").write_text("")
    assert parse_hub_id("org/name") is None
    assert parse_hub_id("org/file@v1") is None
    assert parse_hub_id(str(tmp_path / "org" / "name")) is None


@pytest.mark.parametrize("spec", ["org/name@", "org/name@two words", "org/name@a..b"])
def test_parse_hub_id_refuses_a_hub_id_with_a_broken_revision(spec: str) -> None:
    with pytest.raises(ModelLoadError, match="is not a revision"):
        parse_hub_id(spec)
