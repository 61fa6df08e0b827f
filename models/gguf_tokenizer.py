"""Rebuild a checkpoint's tokenizer from a GGUF file's `tokenizer.*` metadata, as a `tokenizers` pipeline.

A GGUF file has no tokenizer.json: it stores the vocabulary in id order (`tokenizer.ggml.tokens`), each token's
kind (`token_type`: 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte), and either merges (`model` "gpt2":
byte-level BPE, as Llama 3 and Qwen2 use) or scores (`model` "llama": SentencePiece BPE with byte fallback, as
Llama 2 and Mistral use). The pipelines built here are the ones `transformers` builds from the same metadata
(the tests hold them equal on random text), so a GGUF file tokenizes the same in both:
- gpt2: the byte-level alphabet, the merges, and the split regex that `tokenizer.ggml.pre` names;
- llama: merges recovered from the scores (best score first), a "▁" prepended to the text, byte fallback;
- control tokens become special added tokens, user-defined ones plain added tokens, and a BOS template is
  added when `tokenizer.ggml.add_bos_token` (default: true for SentencePiece vocabularies) asks for one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE

from pdserve.models.config import ModelLoadError
from pdserve.models.tokenizer import Tokenizer

if TYPE_CHECKING:
    from pdserve.models.gguf_checkpoint import GGUFCheckpoint

TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
METASPACE = "\u2581"

# Split regexes of the `tokenizer.ggml.pre` names llama.cpp writes for Llama-family vocabularies.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}


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
        backend = _byte_level_bpe(checkpoint, tokens)
        add_bos_default = False
    elif kind == "llama":
        backend = _sentencepiece_bpe(checkpoint, tokens)
        add_bos_default = True
    else:
        raise ModelLoadError(f"{checkpoint.path}: tokenizer.ggml.model={kind!r} is not supported "
                             "(gpt2: byte-level BPE, llama: SentencePiece BPE)")

    def token_at(key: str) -> str | None:
        index = checkpoint.field(key)
        return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else None

    bos = token_at("tokenizer.ggml.bos_token_id")
    eos = token_at("tokenizer.ggml.eos_token_id")
    named = [token_at(f"tokenizer.ggml.{key}_token_id") for key in ("unknown", "padding")]
    _add_special_tokens(backend, tokens, token_types, [t for t in (bos, eos, *named) if t is not None],
                        byte_level=kind == "gpt2")
    if bos is not None and checkpoint.field("tokenizer.ggml.add_bos_token", add_bos_default):
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, checkpoint.field("tokenizer.ggml.bos_token_id"))])
    return Tokenizer(backend, bos_token=bos, eos_token=eos, extra_eos_token_ids=checkpoint.eos_token_ids,
                     chat_template=checkpoint.field("tokenizer.chat_template"))


def _byte_level_bpe(checkpoint: GGUFCheckpoint, tokens: list[str]) -> BackendTokenizer:
    """Byte-level BPE: tokens outside the byte alphabet (added tokens written as plain text) are respelled in it."""
    spelling = byte_level_alphabet()
    alphabet = set(spelling.values())
    vocab = {}
    for index, token in enumerate(tokens):
        spelled = token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(spelled, index)
    merges = [tuple(merge.split(" ", 1)) for merge in checkpoint.field("tokenizer.ggml.merges") or []]
    backend = BackendTokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                   end_of_word_suffix="", fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(checkpoint.field("tokenizer.ggml.pre"))
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


def _add_special_tokens(backend: BackendTokenizer, tokens: list[str], token_types: list[int], named: list[str],
                        byte_level: bool) -> None:
    """Control and unknown tokens, and the bos/eos/unk/pad tokens `named`, match whole and are special;
    user-defined ones match whole and are not. A special token spelled outside a byte-level alphabet is a
    mislabelled piece of text and is left alone."""
    alphabet = set(byte_level_alphabet().values()) if byte_level else None
    typed = [token for token, kind in zip(tokens, token_types) if kind in (TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL)]
    control = [AddedToken(token, normalized=False, special=True) for token in dict.fromkeys([*typed, *named])
               if alphabet is None or set(token) <= alphabet]
    if control:
        backend.add_special_tokens(control)
    vocab = backend.get_vocab()
    user_defined = [AddedToken(token, normalized=False, special=False)
                    for token, kind in zip(tokens, token_types) if kind == TOKEN_TYPE_USER_DEFINED and token in vocab]
    if user_defined:
        backend.add_tokens(user_defined)
