"""Logprobs in OpenAI's two shapes, from the router's per-token logprobs and top alternatives.

Completions (legacy): {"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}.
Chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}.
"""

from __future__ import annotations

import functools
from typing import Any

from pdserve.models.tokenizer import Tokenizer


@functools.lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: printable character -> the byte it stands for."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenStrings:
    """Each token id's text and raw bytes, as logprobs show them (cached per id)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        decoder = tokenizer.backend.decoder
        self.byte_level = decoder is not None and b'"ByteLevel"' in decoder.__getstate__()

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one instance per server process
    def text(self, token_id: int) -> str:
        """The token decoded alone (special tokens kept); a partial UTF-8 character shows as U+FFFD."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    @functools.lru_cache(maxsize=65536)  # noqa: B019
    def raw_bytes(self, token_id: int) -> list[int]:
        """The token's exact bytes: byte-level BPE and `<0xNN>` byte-fallback tokens map back to
        their bytes; other tokens give the UTF-8 of their text."""
        if token_id in self.tokenizer.byte_fallback_ids:
            return [int(self.tokenizer.id_to_token(token_id)[3:5], 16)]
        piece = self.tokenizer.id_to_token(token_id)
        if self.byte_level and piece is not None and token_id not in self.tokenizer.special_token_ids:
            table = _byte_level_decoder()
            if all(ch in table for ch in piece):
                return [table[ch] for ch in piece]
        return list(self.text(token_id).encode("utf-8"))


def completion_logprobs(strings: TokenStrings, token_ids: list[int], logprobs: list[float],
                        top: list[list[tuple[int, float]]], text_offset: int) -> dict[str, Any]:
    """The legacy completions `logprobs` object for these tokens; offsets start at text_offset.
    Each top_logprobs dict holds the top-N alternatives plus the chosen token."""
    tokens = [strings.text(t) for t in token_ids]
    offsets, pos = [], text_offset
    for token in tokens:
        offsets.append(pos)
        pos += len(token)
    tops = []
    for i in range(len(token_ids)):
        alternatives = {strings.text(t): lp for t, lp in (top[i] if i < len(top) else [])}
        alternatives.setdefault(tokens[i], logprobs[i])
        tops.append(alternatives)
    return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(strings: TokenStrings, token_ids: list[int], logprobs: list[float],
                  top: list[list[tuple[int, float]]]) -> dict[str, Any]:
    """The chat `logprobs` object ({"content": [...], "refusal": None}) for these tokens."""
    content = []
    for i, token_id in enumerate(token_ids):
        alternatives = [{"token": strings.text(t), "logprob": lp, "bytes": strings.raw_bytes(t)}
                        for t, lp in (top[i] if i < len(top) else [])]
        content.append({"token": strings.text(token_id), "logprob": logprobs[i],
                        "bytes": strings.raw_bytes(token_id), "top_logprobs": alternatives})
    return {"content": content, "refusal": None}


def merge_completion_logprobs(parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One completions logprobs object from the per-chunk ones, in order (None if none)."""
    if not parts:
        return None
    return {key: [v for part in parts for v in part[key]] for key in parts[0]}
