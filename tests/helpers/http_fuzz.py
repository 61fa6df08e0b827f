"""Seeded generation of malformed and extreme requests for the OpenAI-compatible HTTP front end
(`hypothesis` is not installed in this environment, so this is a plain seeded generator: the same
seed gives the same cases, and a failure names its seed and case number).

A case starts from a small valid completions or chat request (a few tokens at most, so the ones
that pass validation stay cheap) and mutates it: fields set to extreme values (ints beyond
int32/uint32/uint64, integers of thousands of digits, subnormal floats, NaN and infinities, lone
UTF-16 surrogates, deep nesting, long lists, wrong types), fields dropped, bytes flipped or the
body cut short, odd headers (content types, gzip of garbage, a gzip bomb).
"""

from __future__ import annotations

import functools
import gzip
import json
import random
from dataclasses import dataclass, field
from typing import Any

# Fields the front end reads; the fuzzer also invents unknown ones.
COMPLETION_FIELDS = ("prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty", "seed", "n", "stop", "stop_token_ids", "ignore_eos",
                     "min_tokens", "logprobs", "stream", "stream_options", "echo", "suffix", "logit_bias",
                     "best_of", "model", "user")
CHAT_FIELDS = tuple(f for f in COMPLETION_FIELDS if f not in ("prompt", "echo", "suffix", "best_of")) + (
    "messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "response_format",
    "chat_template_kwargs", "add_generation_prompt")
# Fields whose valid values could make a request long-running: never set to a large valid count.
LENGTH_FIELDS = ("max_tokens", "max_completion_tokens", "min_tokens")


@dataclass
class Raw:
    """JSON text put into the body as is (what json.dumps cannot write: 5,000-digit integers,
    100,000-deep nesting)."""

    text: str


@dataclass
class FuzzCase:
    """One request: the path, the body bytes and extra headers; `what` says how it was made."""

    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    what: str = ""


def dumps(value: Any) -> bytes:
    """JSON of `value`, with each Raw placed verbatim (lone surrogates come out as \\udXXX escapes)."""
    raws: list[str] = []

    def swap(v: Any) -> Any:
        if isinstance(v, Raw):
            raws.append(v.text)
            return f"__raw_{len(raws) - 1}__"
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        if isinstance(v, list):
            return [swap(x) for x in v]
        return v

    text = json.dumps(swap(value))
    for i, raw in enumerate(raws):
        text = text.replace(f'"__raw_{i}__"', raw, 1)
    return text.encode("utf-8", "surrogatepass")


class RequestFuzzer:
    """Fuzz cases from `seed`; `vocab_size` keeps some token ids valid."""

    def __init__(self, seed: int, vocab_size: int) -> None:
        self.rng = random.Random(seed)
        self.vocab_size = vocab_size

    def cases(self, count: int) -> list[FuzzCase]:
        """`count` cases, each a mutation of a small valid request."""
        return [self.case() for _ in range(count)]

    def case(self) -> FuzzCase:
        """One case."""
        chat = self.rng.random() < 0.5
        body = self._valid_chat() if chat else self._valid_completion()
        path = "/v1/chat/completions" if chat else "/v1/completions"
        names = CHAT_FIELDS if chat else COMPLETION_FIELDS
        kind = self.rng.choice(["fields", "fields", "fields", "bytes", "headers"])
        notes = []
        for _ in range(self.rng.randint(1, 3)):
            name = self.rng.choice(names + (f"x_{self.rng.randint(0, 99)}",))
            if name in LENGTH_FIELDS and self.rng.random() < 0.5:
                continue  # (keep a small max_tokens most of the time)
            if self.rng.random() < 0.1 and not (chat and name in LENGTH_FIELDS):
                body.pop(name, None)
                notes.append(f"drop {name}")
            else:
                body[name] = self.value(name)
                notes.append(f"{name}={_short(body[name])}")
        data, headers = dumps(body), {"Content-Type": "application/json"}
        if kind == "bytes":
            data = self._mutate_bytes(data)
            notes.append("bytes mutated")
        elif kind == "headers":
            data, headers, note = self._odd_headers(data)
            notes.append(note)
        return FuzzCase(path, data, headers, "; ".join(notes))

    def value(self, name: str) -> Any:
        """An extreme or malformed value for field `name` (sometimes an ordinary one)."""
        r = self.rng
        pools = [
            lambda: r.choice([None, True, False, 0, -1, 1, 2, 0.5, -0.0, 100, 101]),
            lambda: r.choice([2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63, 2**64, -(2**63) - 1, 10**30, -(10**30)]),
            lambda: Raw(r.choice("123456789") + "0" * r.choice([40, 4299, 4300, 5000, 20000])),
            lambda: r.choice([1e-300, -1e-300, 5e-324, 1e-40, 1e-38, 1e308, -1e308, 1e-5]),
            lambda: Raw(r.choice(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1e-999"])),
            lambda: r.choice(["", "x", "\ud800", "a\udc00b", "\ud83d\ude00", "\x00", "é" * 300, "stop"]),
            lambda: "y" * r.choice([257, 10_000, 300_000]),
            lambda: Raw("[" * (d := r.choice([500, 990, 1001, 5000, 100_000])) + "]" * d),
            lambda: Raw('{"a":' * (d := r.choice([500, 2000])) + "1" + "}" * d),
            lambda: [r.randrange(self.vocab_size) for _ in range(r.choice([0, 1, 17, 1025, 5000]))],
            lambda: [r.choice([1, -1, 2**32, "a", None, 1.5]) for _ in range(r.randint(1, 8))],
            lambda: ["s"] * r.choice([17, 1000, 100_000]),
            lambda: {"role": "user", "content": "hi"} if r.random() < 0.5 else {"type": r.choice(["text", "x"])},
            lambda: self._messages(),
        ]
        return r.choice(pools)()

    def _messages(self) -> Any:
        r = self.rng
        choice = r.randrange(6)
        if choice == 0:
            return [{"role": "user", "content": "hi"}] * r.choice([2049, 3000])
        if choice == 1:
            return [{"role": "user", "content": [{"type": "text", "text": "a"}] * r.choice([2, 257])}]
        if choice == 2:
            return [{"role": "user", "content": "z" * r.choice([1000, 1_000_001])}]
        if choice == 3:
            return [{"role": "user", "content": "hi", "name": r.choice(["\ud800", "n", Raw("[" * 900 + "]" * 900)])}]
        if choice == 4:
            return [{"role": r.choice(["user", "robot", "", None, 3]), "content": r.choice(["x", None, 3, [], {}])}]
        return [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]

    def _valid_completion(self) -> dict[str, Any]:
        r = self.rng
        prompt: Any = r.choice(["Once upon a time", "Hello", [r.randrange(self.vocab_size) for _ in range(5)]])
        return {"prompt": prompt, "max_tokens": r.randint(1, 4), "temperature": r.choice([0, 0.7]), "ignore_eos": True}

    def _valid_chat(self) -> dict[str, Any]:
        r = self.rng
        return {"messages": [{"role": "user", "content": r.choice(["Hi", "Tell me a story"])}],
                "max_tokens": r.randint(1, 4), "temperature": r.choice([0, 0.7]), "ignore_eos": True}

    def _mutate_bytes(self, data: bytes) -> bytes:
        r = self.rng
        buf = bytearray(data)
        for _ in range(r.randint(1, 8)):
            op = r.randrange(3)
            if op == 0 and buf:
                buf[r.randrange(len(buf))] = r.randrange(256)
            elif op == 1 and buf:
                del buf[r.randrange(len(buf)):]
            else:
                buf[r.randrange(len(buf) + 1):0] = bytes(r.randrange(256) for _ in range(r.randint(1, 8)))
        return bytes(buf)

    def _odd_headers(self, data: bytes) -> tuple[bytes, dict[str, str], str]:
        r = self.rng
        choice = r.randrange(4)
        if choice == 0:
            return data, {"Content-Type": r.choice(["text/plain", "application/x-www-form-urlencoded", "", "a/b; x"])}, \
                "content type"
        if choice == 1:
            return bytes(r.randrange(256) for _ in range(64)), {"Content-Encoding": "gzip"}, "gzip of garbage"
        if choice == 2:
            return _gzip_bomb(), {"Content-Encoding": "gzip"}, "gzip bomb (64 MiB of spaces)"
        return gzip.compress(data), {"Content-Encoding": "gzip", "Content-Type": "application/json"}, "gzip of the body"


@functools.cache
def _gzip_bomb() -> bytes:
    return gzip.compress(b" " * (64 * 2**20), 9)


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, Raw) else f"Raw({value.text[:20]}... {len(value.text)} chars)"
    return text if len(text) <= 60 else text[:57] + "..."
