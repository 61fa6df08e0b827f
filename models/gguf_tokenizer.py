"""Rebuild a checkpoint's tokenizer from a GGUF file's `tokenizer.*` metadata, as a `tokenizers` pipeline.

A GGUF file has no tokenizer.json: it stores the vocabulary in id order (`tokenizer.ggml.tokens`), each token's
kind (`token_type`: 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte), and either merges (`model` "gpt2":
byte-level BPE, as Llama 3 and Qwen2 use) or scores (`model` "llama": SentencePiece BPE with byte fallback, as
Llama 2 and Mistral use). The pipelines built here are the ones `transformers` builds from the same metadata
(the tests hold them equal on random text), so a GGUF file tokenizes the same in both:
- gpt2: the byte-level alphabet, the merges, and the split regex that `tokenizer.ggml.pre` names;
- llama: merges recovered from the scores (best score first), a "▁" prepended to the text, byte fallback;
- control tokens become special added tokens, user-defined ones plain added tokens, and a BOS/EOS template is
  added when `tokenizer.ggml.add_bos_token` (default: true for SentencePiece vocabularies) / `add_eos_token` ask.
Where transformers is wrong for real files, pdserve follows llama.cpp instead: tokens typed unknown are special
too, control tokens written outside the byte alphabet (DeepSeek-R1 distills' `<｜begin▁of▁sentence｜>`) keep
their ids, and no token the file lacks (transformers' `<|endoftext|>`) is added past the model's vocabulary.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE

from pdserve.models.config import ModelLoadError
from pdserve.models.tokenizer import Tokenizer

if TYPE_CHECKING:
    from pdserve.models.gguf_checkpoint import GGUFCheckpoint

logger = logging.getLogger(__name__)

TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
METASPACE = "\u2581"

# Split regexes of the `tokenizer.ggml.pre` names llama.cpp writes for Llama-family vocabularies.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O_SPLIT),
}
_GPT2_SPLIT_NAMES = (None, "default", "gpt-2", "gpt2")


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes stand for themselves, the other
    bytes (controls, space, ...) take the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tokenizer_from_gguf(checkpoint: GGUFCheckpoint) -> Tokenizer:
    """The Tokenizer that `checkpoint`'s metadata describes; ModelLoadError for a vocabulary kind pdserve
    cannot rebuild (anything but "gpt2" and "llama")."""
    kind = checkpoint.field("tokenizer.ggml.model")
    tokens: list[str] = checkpoint.field("tokenizer.ggml.tokens") or []
    if not tokens:
        raise ModelLoadError(f"{checkpoint.path}: no tokenizer.ggml.tokens in the GGUF metadata")
    token_types: list[int] = checkpoint.field("tokenizer.ggml.token_type") or [1] * len(tokens)
    if kind == "gpt2":
        backend = _byte_level_bpe(checkpoint, tokens, token_types)
        add_bos_default = False
    elif kind == "llama":
        backend = _sentencepiece_bpe(checkpoint, tokens)
        add_bos_default = True
    else:
        raise ModelLoadError(f"{checkpoint.path}: tokenizer.ggml.model={kind!r} is not supported "
                             "(gpt2: byte-level BPE, llama: SentencePiece BPE)")

    def token_at(key: str) -> str | None:
        """The vocabulary's spelling of the token whose id the metadata key holds (None when absent)."""
        index = checkpoint.field(key)
        if index is None:
            return None
        if not isinstance(index, int) or not 0 <= index < len(tokens):
            raise ModelLoadError(f"{checkpoint.path}: {key}={index!r} is not an id of its {len(tokens)} tokens")
        return backend.id_to_token(index)

    bos = token_at("tokenizer.ggml.bos_token_id")
    eos = token_at("tokenizer.ggml.eos_token_id")
    named = [token_at(f"tokenizer.ggml.{key}_token_id") for key in ("unknown", "padding")]
    _add_special_tokens(backend, tokens, token_types, [t for t in (bos, eos, *named) if t is not None])
    add_bos = bos is not None and checkpoint.field("tokenizer.ggml.add_bos_token", add_bos_default)
    add_eos = eos is not None and checkpoint.field("tokenizer.ggml.add_eos_token", False)
    if add_bos or add_eos:
        head, tail = (f"{bos}:0 " if add_bos else ""), (f" {eos}:0" if add_eos else "")
        pair_head, pair_tail = (f" {bos}:1" if add_bos else ""), (f" {eos}:1" if add_eos else "")
        specials = [(t, backend.token_to_id(t)) for t, wanted in ((bos, add_bos), (eos, add_eos)) if wanted]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{head}$A:0{tail}", pair=f"{head}$A:0{tail}{pair_head} $B:1{pair_tail}",
            special_tokens=list(dict(specials).items()))
    return Tokenizer(backend, bos_token=bos, eos_token=eos, extra_eos_token_ids=checkpoint.eos_token_ids,
                     chat_template=checkpoint.field("tokenizer.chat_template"))


def _byte_level_bpe(checkpoint: GGUFCheckpoint, tokens: list[str], token_types: list[int]) -> BackendTokenizer:
    """Byte-level BPE. Control, unknown and user-defined tokens keep their raw spelling (they are matched whole,
    as added tokens: DeepSeek's `<｜begin▁of▁sentence｜>` must keep its id); a normal token written outside the
    byte alphabet is respelled in it."""
    spelling = byte_level_alphabet()
    alphabet = set(spelling.values())
    whole = (TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)
    vocab = {}
    for index, (token, kind) in enumerate(zip(tokens, token_types)):
        raw = kind in whole or set(token) <= alphabet
        vocab.setdefault(token if raw else "".join(spelling[b] for b in token.encode("utf-8")), index)
    merges = [tuple(merge.split(" ", 1)) for merge in checkpoint.field("tokenizer.ggml.merges") or []]
    backend = BackendTokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                   end_of_word_suffix="", fuse_unk=False))
    pre = checkpoint.field("tokenizer.ggml.pre")
    split = PRE_TOKENIZER_SPLITS.get(pre)
    if split is None and pre not in _GPT2_SPLIT_NAMES:
        logger.warning("%s: tokenizer.ggml.pre=%r is not one pdserve knows; splitting text with GPT-2's regex "
                       "(tokens may differ from llama.cpp's)", checkpoint.path, pre)
    if split is None:  # GPT-2's own regex, inside the ByteLevel step
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(checkpoint: GGUFCheckpoint, tokens: list[str]) -> BackendTokenizer:
    """SentencePiece BPE: merges from the file, or rebuilt from the scores (a token's score ranks the merge
    that makes it), "▁" for spaces, `<0xNN>` byte fallback."""
    vocab = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    merges = checkpoint.field("tokenizer.ggml.merges")
    if merges:
        pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    else:
        scores = checkpoint.field("tokenizer.ggml.scores") or [0.0] * len(tokens)
        pairs = merges_from_scores(vocab, dict(zip(tokens, scores)))
    backend = BackendTokenizer(BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True, dropout=None))
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace(METASPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
    return backend


def merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies: every split of a token into two vocabulary pieces,
    ordered by the token's score, then by the pieces' lengths (highest and longest first), then by their ids."""
    candidates = []
    for token, score in scores.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        splits.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        candidates.extend((left, right, score) for left, right in splits)
    candidates.sort(key=lambda c: (c[2], len(c[0]), len(c[1])), reverse=True)
    return [(left, right) for left, right, _ in candidates]


def _add_special_tokens(backend: BackendTokenizer, tokens: list[str], token_types: list[int], named: list[str]) -> None:
    """Control and unknown tokens, and the bos/eos/unk/pad tokens `named` (in the vocabulary's spelling), match
    whole and are special; user-defined ones match whole and are not. Each keeps its id (all are in the
    vocabulary under the spelling used here, so nothing is appended past the model's vocabulary)."""
    typed = [token for token, kind in zip(tokens, token_types) if kind in (TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL)]
    control = [AddedToken(token, normalized=False, special=True) for token in dict.fromkeys([*typed, *named])]
    if control:
        backend.add_special_tokens(control)
    vocab = backend.get_vocab()
    user_defined = [AddedToken(token, normalized=False, special=False)
                    for token, kind in zip(tokens, token_types) if kind == TOKEN_TYPE_USER_DEFINED and token in vocab]
    if user_defined:
        backend.add_tokens(user_defined)
