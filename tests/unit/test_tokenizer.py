"""Tokenizer parity with transformers, loading errors, and the incremental detokenizer's guarantees."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, normalizers, processors, trainers

from pdserve.models.detokenizer import IncrementalDetokenizer
from pdserve.models.tiny_model import make_tiny_model
from pdserve.models.tiny_tokenizer_train import _corpus_lines
from pdserve.models.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "",
    "Hello world",
    " leading space and trailing  ",
    "The lighthouse at Garrow Point flashed twice.",
    "café naïve résumé Ångström Łódź",
    "東京 Tokyo 서울 Seoul Москва Αθήνα",
    "emoji 🐝🍯 family 👨‍👩‍👧‍👦 flag 🇯🇵",
    "<s> special tokens inside </s> the text",
    "line one\n\nline two\r\n\ttabbed",
    "def f(x):\n    return x ** 2  # square",
    "x" * 300,
]
PLAIN_TEXT = " ".join(t for t in TEXTS if "<s>" not in t)  # no special-token markup


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama checkpoint directory shared by this module's tests."""
    return make_tiny_model(tmp_path_factory.mktemp("tok") / "llama", arch="llama", seed=0)


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


def _copy_with_config(src: Path, dst: Path, **changes: object) -> Path:
    """Copy the tokenizer files of `src` to `dst`, editing tokenizer_config.json (None deletes a key)."""
    dst.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, dst / name)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(model_dir: Path, tok: Tokenizer, text: str) -> None:
    hf = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = tok.encode(text)
    assert ids == hf.encode(text)
    assert ids[0] == tok.bos_token_id == hf.bos_token_id
    assert tok.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    if "<" not in text:  # byte-level BPE round-trips any text without special tokens
        assert tok.decode(ids) == text


def test_attributes_match_transformers(model_dir: Path, tok: Tokenizer) -> None:
    hf = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert tok.vocab_size == len(hf) == 512
    assert tok.eos_token_id == hf.eos_token_id
    assert tok.eos_token_ids == frozenset({hf.eos_token_id})
    assert tok.chat_template == hf.chat_template
    assert tok.id_to_token(tok.bos_token_id) == "<s>"
    assert tok.special_token_ids == frozenset({tok.bos_token_id, tok.eos_token_id})
    assert tok.byte_fallback_ids == frozenset()
    assert tok.adds_bos_token


def test_random_ids_decode_like_transformers(model_dir: Path, tok: Tokenizer) -> None:
    hf = transformers.AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(1)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 30))]
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize(
    ("changes", "drop_post_processor"),
    [
        ({"add_bos_token": False}, False),
        ({"add_bos_token": None, "add_eos_token": None}, False),
        ({"add_eos_token": True}, False),
        ({}, True),
        ({"add_bos_token": None}, True),
    ],
    ids=["no-bos-flag", "no-flags", "eos-flag", "no-post-processor", "no-post-processor-no-flags"],
)
def test_special_tokens_follow_transformers(
    model_dir: Path, tmp_path: Path, changes: dict, drop_post_processor: bool
) -> None:
    directory = _copy_with_config(model_dir, tmp_path / "variant", **changes)
    if drop_post_processor:
        data = json.loads((directory / "tokenizer.json").read_text())
        data["post_processor"] = None
        (directory / "tokenizer.json").write_text(json.dumps(data))
    ours = Tokenizer.from_dir(directory)
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    assert ours.adds_bos_token == (not drop_post_processor)
    for text in TEXTS[:6]:
        assert ours.encode(text) == hf.encode(text), (changes, text)


def test_eos_ids_from_generation_config(model_dir: Path, tmp_path: Path) -> None:
    directory = _copy_with_config(model_dir, tmp_path / "eos", eos_token=None, bos_token=None)
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, 7]}))
    (directory / "config.json").write_text(json.dumps({"eos_token_id": 9}))
    loaded = Tokenizer.from_dir(directory)
    assert loaded.eos_token_ids == frozenset({1, 7, 9})
    assert loaded.bos_token_id == 0
    assert loaded.eos_token_id == 1


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer.from_dir(missing)


def test_missing_tokenizer_json_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_files_are_clear_errors(model_dir: Path, tmp_path: Path) -> None:
    directory = _copy_with_config(model_dir, tmp_path / "bad")
    (directory / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_dir(directory)
    (directory / "tokenizer_config.json").unlink()
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": "two"}))
    with pytest.raises(ValueError, match="generation_config.json"):
        Tokenizer.from_dir(directory)
    (directory / "generation_config.json").unlink()
    (directory / "tokenizer.json").write_text('{"version": "1.0", "truncated')
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(directory)


# ---------------------------------------------------------------- incremental detokenizer


def _stream(det: IncrementalDetokenizer, ids: list[int], rng: random.Random) -> list[str]:
    """Push `ids` in random chunks of 1-3 tokens, then flush; return every piece returned."""
    pieces, i = [], 0
    while i < len(ids):
        size = rng.randint(1, 3)
        pieces.append(det.push(ids[i : i + size]))
        i += size
    pieces.append(det.flush())
    return pieces


def _check_random_streams(tok: Tokenizer, trials: int, seed: int, prompt: list[int] | None = None) -> None:
    rng = random.Random(seed)
    for _ in range(trials):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 48))]
        det = IncrementalDetokenizer(tok, prompt_ids=prompt)
        pieces = _stream(det, ids, rng)
        full = tok.decode(ids)
        assert "".join(pieces) == full == det.text, ids
        assert det.output_ids == ids
        if "\ufffd" not in full:
            assert not any("\ufffd" in piece for piece in pieces), ids


def test_detokenizer_random_sequences_equal_full_decode(tok: Tokenizer) -> None:
    _check_random_streams(tok, trials=1000, seed=0)


def test_detokenizer_with_prompt_context_equals_output_decode(tok: Tokenizer) -> None:
    # Byte-level BPE: decoding with prompt context gives exactly the output's own decode.
    _check_random_streams(tok, trials=200, seed=1, prompt=tok.encode("Once upon a time"))


def test_detokenizer_streams_multibyte_text_without_replacement_chars(tok: Tokenizer) -> None:
    text = PLAIN_TEXT
    ids = tok.encode(text, add_special_tokens=False)
    split_chars = sum("\ufffd" in tok.decode([i]) for i in ids)
    assert split_chars > 10  # the text really has characters split across tokens
    det = IncrementalDetokenizer(tok)
    for token_id in ids:
        piece = det.push([token_id])
        assert "\ufffd" not in piece
        assert text.startswith(det.text)
    det.flush()
    assert det.text == text


class _RecordingTokenizer(Tokenizer):
    """The real tokenizer, also recording how many ids each decode call was given."""

    def __init__(self, inner: Tokenizer) -> None:
        self.__dict__.update(inner.__dict__)
        self.decode_lengths: list[int] = []

    def decode(self, ids, skip_special_tokens=True):  # type: ignore[override]
        self.decode_lengths.append(len(ids))
        return super().decode(ids, skip_special_tokens)


def test_detokenizer_decodes_a_small_window_per_token(tok: Tokenizer) -> None:
    recording = _RecordingTokenizer(tok)
    ids = tok.encode(PLAIN_TEXT * 8, add_special_tokens=False)
    assert len(ids) > 1500
    det = IncrementalDetokenizer(recording)
    for token_id in ids:
        det.push([token_id])
    det.flush()
    assert det.text == tok.decode(ids)
    assert max(recording.decode_lengths) <= 8


def test_detokenizer_rejects_push_after_flush(tok: Tokenizer) -> None:
    det = IncrementalDetokenizer(tok)
    det.push(tok.encode("hi", add_special_tokens=False))
    det.flush()
    assert det.flush() == ""
    with pytest.raises(RuntimeError, match="flush"):
        det.push([5])


@pytest.fixture(scope="module")
def sentencepiece_style_tok() -> Tokenizer:
    """A Llama-2/Mistral-style tokenizer: '▁' spaces, <0xNN> byte fallback, leading-space strip."""
    base = BackendTokenizer(models.BPE(unk_token="<unk>"))
    base.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=60, show_progress=False
    )
    base.train_from_iterator(_corpus_lines(), trainer=trainer)
    model = json.loads(base.to_str())["model"]
    vocab = model["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    backend = BackendTokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    backend.normalizer = base.normalizer
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>")


def test_detokenizer_sentencepiece_byte_fallback_random_sequences(sentencepiece_style_tok: Tokenizer) -> None:
    assert len(sentencepiece_style_tok.byte_fallback_ids) == 256
    assert sentencepiece_style_tok.decode(sentencepiece_style_tok.encode("東京 🐝 bees")) == "東京 🐝 bees"
    _check_random_streams(sentencepiece_style_tok, trials=500, seed=2)


def test_detokenizer_prompt_context_keeps_sentencepiece_leading_space(sentencepiece_style_tok: Tokenizer) -> None:
    tok = sentencepiece_style_tok
    output = tok.encode("a time there was", add_special_tokens=False)
    without = IncrementalDetokenizer(tok)
    with_prompt = IncrementalDetokenizer(tok, prompt_ids=tok.encode("Once upon"))
    for token_id in output:
        without.push([token_id])
        with_prompt.push([token_id])
    assert without.text + without.flush() == "a time there was" == tok.decode(output)
    assert with_prompt.text + with_prompt.flush() == " a time there was"
