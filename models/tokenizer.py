"""Tokenizer for Hugging Face checkpoints, built on the `tokenizers` library (no `transformers`).

`Tokenizer.from_dir(path)` reads the files a checkpoint ships:
- `tokenizer.json` (required): the fast tokenizer itself;
- `tokenizer_config.json` (optional): bos/eos tokens, chat template;
- `chat_template.jinja` (optional): the chat template in the newer standalone form;
- `generation_config.json` and `config.json` (optional): extra eos token ids (an int or a list).

Encoding follows what `transformers.AutoTokenizer` (v5, fast backend) does with the same directory:
special tokens come from the post-processor in `tokenizer.json` (e.g. Llama 3's BOS template);
`add_bos_token`/`add_eos_token` in `tokenizer_config.json` do not change it (transformers v5 ignores
them too).  Decoding never applies `clean_up_tokenization_spaces` (transformers also ignores it for
BPE tokenizers, which all Llama-family checkpoints use).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
MODEL_CONFIG_FILES = ("generation_config.json", "config.json")


def _read_json(path: Path) -> dict[str, Any] | None:
    """Return the JSON object in `path`, None if the file is absent; ValueError naming it if corrupt."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"cannot read {path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    """A special token in tokenizer_config.json is a string or a serialised AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value: Any) -> list[int]:
    """An `eos_token_id` field may be null, an int or a list of ints."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return list(value)
    raise ValueError(f"eos_token_id must be an int or a list of ints, got {value!r}")


def _model_config_special_ids(directory: Path) -> tuple[int | None, list[int]]:
    """(bos id, eos ids) from generation_config.json and config.json (both optional)."""
    bos_id: int | None = None
    eos_ids: list[int] = []
    for name in MODEL_CONFIG_FILES:
        data = _read_json(directory / name) or {}
        try:
            eos_ids.extend(_as_id_list(data.get("eos_token_id")))
        except ValueError as exc:
            raise ValueError(f"{directory / name}: {exc}") from exc
        if bos_id is None and isinstance(data.get("bos_token_id"), int):
            bos_id = data["bos_token_id"]
    return bos_id, eos_ids


def _chat_template(config: dict[str, Any], directory: Path) -> str | None:
    """The chat template: tokenizer_config's (a string, or a list of named ones) or chat_template.jinja."""
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    jinja_path = directory / CHAT_TEMPLATE_FILE
    if jinja_path.is_file():
        return jinja_path.read_text(encoding="utf-8")
    return None


class Tokenizer:
    """Text <-> token ids for one checkpoint.

    Attributes:
        bos_token_id: id of the BOS token, or None when the checkpoint has none.
        eos_token_ids: every id that ends generation (tokenizer eos + generation/model config eos).
        chat_template: the Jinja chat template source, or None.
        adds_bos_token: whether `encode(..., add_special_tokens=True)` starts with the BOS token.
        byte_fallback_ids: ids of the `<0xNN>` byte tokens when the decoder has a ByteFallback step
            (SentencePiece-style checkpoints such as Llama 2 / Mistral), else empty.
        backend: the underlying `tokenizers.Tokenizer`.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        bos_token: str | None = None,
        eos_token: str | None = None,
        extra_eos_token_ids: Sequence[int] = (),
        chat_template: str | None = None,
    ) -> None:
        """Wrap `backend`; bos/eos tokens missing from its vocabulary are added as special tokens."""
        self.backend = backend
        self._add_missing_special_tokens([t for t in (bos_token, eos_token) if t is not None])
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token is not None else None
        eos_ids = set(extra_eos_token_ids)
        if eos_token is not None:
            eos_ids.add(backend.token_to_id(eos_token))
        self.eos_token_ids: frozenset[int] = frozenset(eos_ids)
        self.chat_template = chat_template
        self.byte_fallback_ids = self._find_byte_fallback_ids()
        bos_probe = backend.encode("", add_special_tokens=True).ids
        self.adds_bos_token = self.bos_token_id is not None and bos_probe[:1] == [self.bos_token_id]

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer of the Hugging Face checkpoint directory `path`.

        Raises FileNotFoundError if the directory or its tokenizer.json is missing, and ValueError
        naming the file if one of the files cannot be parsed.
        """
        directory = Path(path)
        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer directory does not exist: {directory}")
        tokenizer_path = directory / TOKENIZER_FILE
        if not tokenizer_path.is_file():
            raise FileNotFoundError(f"{TOKENIZER_FILE} not found in {directory} (is it a Hugging Face checkpoint?)")
        try:
            backend = BackendTokenizer.from_file(str(tokenizer_path))
        except Exception as exc:  # the Rust side raises a bare Exception on bad JSON
            raise ValueError(f"cannot parse {tokenizer_path}: {exc}") from exc
        config = _read_json(directory / TOKENIZER_CONFIG_FILE) or {}
        bos_id, eos_ids = _model_config_special_ids(directory)
        bos_token = _token_content(config.get("bos_token"))
        if bos_token is None and bos_id is not None:
            bos_token = backend.id_to_token(bos_id)
        eos_token = _token_content(config.get("eos_token"))
        if eos_token is None and eos_ids:
            eos_token = backend.id_to_token(eos_ids[0])
        return cls(
            backend,
            bos_token=bos_token,
            eos_token=eos_token,
            extra_eos_token_ids=eos_ids,
            chat_template=_chat_template(config, directory),
        )

    def _add_missing_special_tokens(self, tokens: list[str]) -> None:
        """Like transformers: a configured bos/eos token missing from the vocab is added as special."""
        missing = [t for t in tokens if self.backend.token_to_id(t) is None]
        if missing:
            self.backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])

    def _find_byte_fallback_ids(self) -> frozenset[int]:
        """Ids of `<0x00>`..`<0xFF>` if the decoder turns them into raw bytes (ByteFallback)."""
        decoder = self.backend.decoder
        if decoder is None or b'"ByteFallback"' not in decoder.__getstate__():
            return frozenset()
        ids = (self.backend.token_to_id(f"<0x{b:02X}>") for b in range(256))
        return frozenset(i for i in ids if i is not None)

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows, added tokens included (the model's may be larger)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's own eos token id (one of `eos_token_ids`), or None."""
        return self.backend.token_to_id(self.eos_token) if self.eos_token is not None else None

    @functools.cached_property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of added tokens marked special (dropped by `decode(..., skip_special_tokens=True)`)."""
        decoder = self.backend.get_added_tokens_decoder()
        return frozenset(i for i, token in decoder.items() if token.special)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens` the checkpoint's BOS/EOS rule applies."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; ids outside the vocabulary are ignored (as the `tokenizers` library does)."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The token string (in the tokenizer's own alphabet, e.g. 'Ġthe') of `token_id`, or None."""
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        """The id of the token string `token`, or None if it is not in the vocabulary."""
        return self.backend.token_to_id(token)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        """`id_to_token` for each of `ids`."""
        return [self.backend.id_to_token(i) for i in ids]
