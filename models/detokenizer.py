"""Incremental (streaming) detokenization: token ids in, text deltas out.

This is vLLM's prefix/read-offset scheme.  The detokenizer keeps two offsets into its token list:
text up to `read_offset` has been emitted, and `prefix_offset <= read_offset` marks where the small
window that gets re-decoded starts.  On each push it decodes `ids[prefix_offset:]` and
`ids[prefix_offset:read_offset]`; the difference is the new text.  While the window's decode ends in
U+FFFD (a UTF-8 character whose remaining bytes are in tokens not seen yet) nothing is emitted.

Why the deltas add up to the full decode: text is emitted only up to a point where the decode ends
with a complete character, and a UTF-8 decoder restarts cleanly after a complete character, so
`decode(ids) == decode(ids[:r]) + decode(ids[r:])` at every such point `r`.  Decoders that strip a
leading space from their first token (SentencePiece `Metaspace`/`Strip`) strip it from both windows
alike, so the difference is unaffected.  Each push costs O(window), not O(output length).
"""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.models.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
PROMPT_CONTEXT_TOKENS = 4


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text deltas for streaming.

    Without `prompt_ids`, the concatenation of all deltas from `push` and the final `flush` equals
    exactly `tokenizer.decode(output_ids, skip_special_tokens=...)`.  With `prompt_ids`, the last few
    prompt tokens are decoded as leading context, so the output reads as a continuation of the prompt
    (a SentencePiece tokenizer keeps the space before the first output word); the text then equals
    `decode(context + output_ids)[len(decode(context)):]`, which for byte-level tokenizers (Llama 3,
    Qwen2) is the same as `decode(output_ids)`.  If the prompt ends inside a UTF-8 character the
    context is dropped.  No delta ever ends in half a character: text is held back while the decode
    ends in U+FFFD, and only `flush` releases such text (when the output really ends that way).

    Attributes:
        text: all text emitted so far (deltas concatenated); stop strings can be matched on it.
        output_ids: all output token ids pushed so far.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        """Start a stream; `prompt_ids` (optional) supply decoding context only, never output text."""
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # SentencePiece ByteFallback decodes a run of <0xNN> tokens as one unit (an invalid run turns
        # every byte into U+FFFD), so text must not be emitted while the run may still grow.
        self._byte_ids = tokenizer.byte_fallback_ids
        self._inert_ids = tokenizer.special_token_ids if (self._byte_ids and skip_special_tokens) else frozenset()
        self._vocab_size = tokenizer.vocab_size
        self._ends_in_byte_run = False
        context = self._context(prompt_ids)
        self._ids: list[int] = context  # context tokens followed by output tokens
        self._num_context = len(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text = self._decode(context)
        self._flushed = False
        self.text = ""

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _context(self, prompt_ids: Sequence[int] | None) -> list[int]:
        """The last prompt tokens, or [] when they decode to nothing or end mid-character."""
        if not prompt_ids:
            return []
        context = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        text = self._decode(context)
        if not text or text.endswith(REPLACEMENT_CHAR) or self._track_byte_run(context):
            self._ends_in_byte_run = False
            return []
        return context

    def _track_byte_run(self, token_ids: Sequence[int]) -> bool:
        """Update and return whether the last token that reaches the decoder is a byte-fallback token."""
        if self._byte_ids:
            for token_id in reversed(token_ids):
                if 0 <= token_id < self._vocab_size and token_id not in self._inert_ids:
                    self._ends_in_byte_run = token_id in self._byte_ids
                    break
        return self._ends_in_byte_run

    @property
    def output_ids(self) -> list[int]:
        """The output token ids pushed so far (a copy)."""
        return self._ids[self._num_context :]

    def push(self, token_ids: Sequence[int]) -> str:
        """Append output tokens; return the text they complete ('' while a character is incomplete)."""
        if self._flushed:
            raise RuntimeError("push() after flush(): the stream is finished")
        self._ids.extend(token_ids)
        if self._track_byte_run(token_ids):
            return ""
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        return self._emit(new_text)

    def flush(self) -> str:
        """End the stream: return the text still held back (possibly ending in U+FFFD)."""
        if self._flushed:
            return ""
        self._flushed = True
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(self._prefix_text):
            return ""
        return self._emit(new_text)

    def _emit(self, new_text: str) -> str:
        """Emit `new_text` beyond the prefix window and slide the window to the new read point."""
        delta = new_text[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        self.text += delta
        return delta
