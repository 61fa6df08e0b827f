"""What `--model` names, resolved: a Hugging Face directory, a GGUF file, or a Hub id fetched into the cache.

Every process of a cluster (router, OpenAI front end, prefill and decode servers) resolves its `--model` with
`resolve_model`, then reads the configuration, the tokenizer and the weights through the ModelSource, so the
three forms behave the same everywhere. A Hub id resolves to a commit; `ModelSource.pinned` names that commit
(`ORG/NAME@<hash>`), which is what a launcher passes on so that every server loads the same revision.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pdserve.models.errors import ModelLoadError

if TYPE_CHECKING:  # torch, gguf and huggingface_hub load only when a source needs them (the OpenAI front end
    # reads a directory's tokenizer without torch)
    from pdserve.models.config import ModelConfig
    from pdserve.models.gguf_checkpoint import GGUFCheckpoint
    from pdserve.models.hub import HubSnapshot
    from pdserve.models.tokenizer import Tokenizer

GGUF_SUFFIX = ".gguf"
_SPLIT_FILE = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)


@dataclass(frozen=True)
class ModelSource:
    """A checkpoint pdserve can serve.

    spec: what the user named; path: the Hugging Face directory, or the .gguf file (`format` "hf" / "gguf");
    hub: the Hub revision it came from, when `spec` was a Hub id.
    """

    spec: str
    path: Path
    format: Literal["hf", "gguf"]
    hub: HubSnapshot | None = None

    @property
    def pinned(self) -> str:
        """The spec to hand to other processes: `ORG/NAME@<commit>` for a Hub model, else the absolute path."""
        if self.hub is not None:
            return f"{self.hub.repo_id}@{self.hub.commit}"
        return str(self.path.resolve())

    @property
    def served_name(self) -> str:
        """The model name the APIs report by default: the Hub id (no revision), else what the user typed."""
        return self.hub.repo_id if self.hub is not None else self.spec

    @cached_property
    def gguf(self) -> GGUFCheckpoint:
        """The opened GGUF file (format "gguf" only)."""
        from pdserve.models.gguf_checkpoint import GGUFCheckpoint

        if self.format != "gguf":
            raise ValueError(f"{self.path} is not a GGUF file")
        return GGUFCheckpoint(self.path)

    def model_config(self) -> ModelConfig:
        """The network's configuration (config.json, or the GGUF metadata)."""
        from pdserve.models.config import ModelConfig

        return self.gguf.model_config if self.format == "gguf" else ModelConfig.from_dir(self.path)

    def tokenizer(self) -> Tokenizer:
        """The checkpoint's tokenizer (its tokenizer files, or rebuilt from the GGUF metadata)."""
        if self.format == "gguf":
            from pdserve.models.gguf_tokenizer import tokenizer_from_gguf

            return tokenizer_from_gguf(self.gguf)
        from pdserve.models.tokenizer import Tokenizer

        return Tokenizer.from_dir(self.path)


def names_a_model(spec: str) -> bool:
    """Whether `spec` is an existing local path or reads as a Hub id (what `resolve_model` accepts, before any
    file is read or anything downloaded)."""
    from pdserve.models.hub import parse_hub_id

    return Path(spec).expanduser().exists() or parse_hub_id(spec) is not None


def resolve_model(spec: str | Path | ModelSource) -> ModelSource:
    """The ModelSource `spec` names: a local directory or .gguf file first, else a Hub id `ORG/NAME[@REV]`
    (downloaded into the shared Hugging Face cache, or found there offline).

    Raises ModelLoadError (or FileNotFoundError for a path that does not exist) with a message naming `spec`.
    """
    if isinstance(spec, ModelSource):
        return spec
    text = str(spec)
    if not text:
        raise ValueError("--model is empty")
    path = Path(text).expanduser()
    if path.exists():
        gguf_file = find_gguf_file(path)
        if gguf_file is not None:
            return ModelSource(spec=text, path=gguf_file, format="gguf")
        if path.is_dir():
            return ModelSource(spec=text, path=path, format="hf")
        raise ModelLoadError(f"--model {text}: not a checkpoint directory or a .gguf file")
    from pdserve.models.hub import fetch_snapshot, parse_hub_id

    hub_id = parse_hub_id(text)
    if hub_id is None:
        raise FileNotFoundError(f"--model {text}: no such file or directory (and not a Hub id ORG/NAME[@REVISION])")
    try:
        snapshot = fetch_snapshot(*hub_id)
    except ModelLoadError as exc:  # a mistyped relative path reads as an id too: say both
        raise ModelLoadError(f"--model {text}: no such local path, and as a Hub id: {exc}") from exc
    return ModelSource(spec=text, path=snapshot.path, format="hf", hub=snapshot)


def find_gguf_file(path: Path) -> Path | None:
    """The GGUF file `path` names: itself if it is one, the single *.gguf in a directory without a
    config.json, else None. Raises ModelLoadError when a directory holds several, or for split files."""
    if path.is_file() and path.suffix.lower() == GGUF_SUFFIX:
        gguf_file = path
    elif path.is_dir() and not (path / "config.json").is_file():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() == GGUF_SUFFIX and p.is_file())
        if not found:
            return None
        if len(found) > 1:
            names = ", ".join(p.name for p in found[:5])
            raise ModelLoadError(f"{path}: holds {len(found)} GGUF files ({names}); name the one to serve "
                                 f"with --model {path}/FILE.gguf")
        gguf_file = found[0]
    else:
        return None
    if _SPLIT_FILE.search(gguf_file.name):
        raise ModelLoadError(f"{gguf_file}: a split GGUF file; pdserve loads single files (merge the parts with "
                             "llama.cpp's `llama-gguf-split --merge`)")
    return gguf_file
