"""Constrained decoding with llguidance: structured-output constraints compiled for a tokenizer, and
the per-step token masks.

Why llguidance (measured against xgrammar 0.2.9 on this project's tokenizers, CPU): no runtime
dependencies (xgrammar imports transformers and pulls triton), the tokenizer comes straight from
tokenizer.json, ~1-3 ms to compile a typical constraint at 32k-128k vocabularies (a 100k-character schema:
~0.4 s, so compiled constraints are cached and compiled off the serving threads), unsupported schema
keywords named at compile time (xgrammar ignores `uniqueItems`, `not`, unknown
formats), and 150/150 schema-valid random samples where xgrammar let raw control characters into
length-bounded strings. Its masks cost more (median ~20 us, p99 ~0.6 ms per matcher at 32k), so they
are filled in parallel on an executor's threads, which release the GIL.

A matcher is one sample's grammar state. Two llguidance rules the engine keeps: a token the grammar
does not allow puts the matcher into a permanent error state (only masked draws reach it), and the
grammar's parser limits (per-step lexer fuel and Earley items) bound what one mask may cost, so no
request's grammar can stall the batch for long.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import llguidance
import torch

from pdserve.models.sampling_params import StructuredOutput

logger = logging.getLogger("pdserve.models")

GRAMMAR_CACHE_SIZE = 64  # compiled constraints kept (a constraint's text is at most 200,000 characters)
MASK_THREADS = 2  # threads filling masks (the fill releases the GIL)


class GrammarError(ValueError):
    """A constraint that does not compile (bad schema, unsupported feature, bad regex or grammar);
    the message is llguidance's, which names the offending part."""


@functools.lru_cache(maxsize=GRAMMAR_CACHE_SIZE)
def grammar_text(structured: StructuredOutput) -> str:
    """llguidance's grammar for the constraint (JSON without optional whitespace, so an output ends as
    soon as its value does). Raises GrammarError."""
    try:
        if structured.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema(
                {"type": "object"}, overrides={"whitespace_flexible": False})
        if structured.kind == "json_schema":
            schema = json.loads(structured.spec)
            if not isinstance(schema, (dict, bool)):
                raise GrammarError("a JSON schema must be an object")
            return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_flexible": False})
        if structured.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(structured.spec)
        if structured.kind == "choice":
            choices = json.loads(structured.spec)
            if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
                raise GrammarError("choice must be a non-empty list of non-empty strings")
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
        return llguidance.grammar_from("grammar", structured.spec)  # Lark, or GBNF (llama.cpp's) converted
    except (json.JSONDecodeError, RecursionError) as exc:
        raise GrammarError(f"not valid JSON: {exc}") from exc
    except GrammarError:
        raise
    except (ValueError, TypeError, RuntimeError) as exc:
        raise GrammarError(str(exc)) from exc


class GrammarCompiler:
    """Constraints compiled for one tokenizer (the model's vocabulary size, its EOS ids).

    tokenizer_json: the tokenizer.json text (pdserve.models.tokenizer.Tokenizer.backend.to_str()).
    """

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Iterable[int]) -> None:
        eos = sorted(int(t) for t in eos_token_ids)
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos or None)
        self._executor: llguidance.LLExecutor | None = None  # its threads start with the first mask

    def check(self, structured: StructuredOutput) -> None:
        """Compile the constraint (kept for matcher()); GrammarError naming what is wrong when it cannot be
        used with this tokenizer. A large schema takes a while (0.1-0.3 s for 100k characters at 128k
        tokens): callers run this off their event loop and the engine's thread."""
        self._start_state(structured)

    def matcher(self, structured: StructuredOutput) -> llguidance.LLMatcher:
        """A fresh grammar state at the output's start: a copy of the constraint's compiled start state (compiled
        once, kept for the GRAMMAR_CACHE_SIZE constraints last used). Raises GrammarError."""
        return self._start_state(structured).deep_copy()

    @functools.lru_cache(maxsize=GRAMMAR_CACHE_SIZE)  # noqa: B019 - one compiler per engine, kept for its life
    def _start_state(self, structured: StructuredOutput) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self.tokenizer, grammar_text(structured), log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return matcher

    def fill_bitmask(self, matchers: Sequence[llguidance.LLMatcher]) -> torch.Tensor:
        """[len(matchers), ceil(V / 32)] int32 on the CPU: bit t of row i set when matchers[i] allows token t."""
        if self._executor is None:
            self._executor = llguidance.LLExecutor(num_threads=MASK_THREADS)
        bitmask = torch.full((len(matchers), (self.vocab_size + 31) // 32), -1, dtype=torch.int32)
        self._executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(),
                                              bitmask.shape[1] * 4, len(matchers))
        return bitmask


def compiler_for(tokenizer: Any, vocab_size: int | None) -> GrammarCompiler | None:
    """Constraints for a pdserve Tokenizer (None without one, or when llguidance cannot read it: the
    caller then refuses constrained requests)."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None or not vocab_size:
        return None
    try:
        return GrammarCompiler(backend.to_str(), vocab_size, tokenizer.eos_token_ids)
    except (ValueError, RuntimeError, TypeError) as exc:
        logger.warning("structured outputs are off: llguidance cannot read this tokenizer (%s)", exc)
        return None


def mask_disallowed(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set logits [R, V] to -inf where the bitmask [R, ceil(V / 32)] has no bit (any device; the mask may be
    on the CPU). Tokens past the bitmask's width (a padded vocabulary) are never allowed."""
    bits = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask.to(logits.device, non_blocking=True).unsqueeze(-1) >> bits) & 1).bool()
    allowed = allowed.view(bitmask.shape[0], -1)[:, :logits.shape[1]]
    logits[:, :allowed.shape[1]].masked_fill_(~allowed, float("-inf"))
    logits[:, allowed.shape[1]:] = float("-inf")
