"""GGUF files, written with the `gguf` package's writer the way llama.cpp's converter lays them out, served by
pdserve: greedy tokens and tokenizers equal `transformers` loading the same file (`gguf_file=`)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.gguf_files import GGUF_TENSOR_TYPES, make_sentencepiece_checkpoint, write_gguf
from helpers.hf_reference import hf_greedy
from pdserve.llm import LLM
from pdserve.models.config import ModelLoadError
from pdserve.models.gguf_checkpoint import GGUFCheckpoint
from pdserve.models.sampling_params import SamplingParams
from pdserve.models.source import resolve_model
from pdserve.models.tiny_model import make_tiny_model

NUM_PROMPTS = 8
NEW_TOKENS = 32
# Every Unicode block a tokenizer treats differently: letters, digits, punctuation, whitespace runs, accents,
# CJK, Hangul, emoji (4-byte UTF-8), the SentencePiece space mark, and text that spells special tokens.
ALPHABET = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n\t.,;:!?'\"-_()[]{}<>/\\@#$%^&*+="
            "éèüöäßçñøåÆ日本語中文字한국어😀🎉🚀\u00a0\u2581\u3000")
# Not "<|endoftext|>": transformers' GPT-2 tokenizer class adds it as a special token when the file's vocabulary
# lacks it, with an id past the model's vocabulary (see test_text_naming_no_vocabulary_token_stays_text).
SPECIAL_PIECES = ("<s>", "</s>", "<unk>", "'s", "'LL", "  ", "\n\n")


def _random_strings(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        pieces = [rng.choice(SPECIAL_PIECES) if rng.random() < 0.05 else rng.choice(ALPHABET)
                  for _ in range(rng.randint(0, 48))]
        out.append("".join(pieces))
    return out


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """Small Llama and Qwen2 checkpoints (256 wide: every block format fits) with the default rotary
    embedding (transformers' GGUF loader reads no rope scaling for Llama)."""
    root = tmp_path_factory.mktemp("gguf-hf")
    dirs = {arch: make_tiny_model(root / arch, arch=arch, seed=3, size="small") for arch in ("llama", "qwen2")}
    config_path = dirs["llama"] / "config.json"
    config = json.loads(config_path.read_text())
    config.update(rope_scaling=None, rope_theta=10000.0)
    config_path.write_text(json.dumps(config, indent=2))
    return dirs


def _prompts(vocab_size: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(3, vocab_size, (int(n),), generator=gen).tolist()
            for n in torch.randint(4, 40, (NUM_PROMPTS,), generator=gen)]


def _transformers_greedy(gguf_path: Path, prompts: list[list[int]]) -> list[list[int]]:
    return hf_greedy(str(gguf_path.parent), prompts, NEW_TOKENS, gguf_file=gguf_path.name)


def _pdserve_greedy(model: str | Path, prompts: list[list[int]]) -> list[list[int]]:
    llm = LLM(str(model), dtype="float32", kv_cache_mb=16)
    results = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
    return [list(r.samples[0].token_ids) for r in results]


@pytest.mark.parametrize("tensor_type", GGUF_TENSOR_TYPES)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_tokens_equal_transformers_on_the_same_gguf_file(hf_dirs, tmp_path, arch, tensor_type):
    path = write_gguf(hf_dirs[arch], tmp_path / f"{arch}-{tensor_type}.gguf", tensor_type)
    stored = GGUFCheckpoint(path).quantization_summary()
    assert stored.get(tensor_type, 0) >= 4, stored  # the matrices really are in that format
    prompts = _prompts(resolve_model(path).model_config().vocab_size)
    assert _pdserve_greedy(path, prompts) == _transformers_greedy(path, prompts)


def _assert_tokenizers_equal(gguf_path: Path, strings: list[str]) -> None:
    import transformers

    theirs = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    ours = resolve_model(gguf_path).tokenizer()
    for text in strings:
        ids = theirs.encode(text)
        assert ours.encode(text) == ids, text
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids), text


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_byte_level_bpe_tokenizer_equals_transformers_on_1000_strings(hf_dirs, tmp_path, arch):
    path = write_gguf(hf_dirs[arch], tmp_path / f"{arch}.gguf", "F16")
    assert GGUFCheckpoint(path).field("tokenizer.ggml.model") == "gpt2"
    _assert_tokenizers_equal(path, _random_strings(1000, seed=1))


def test_text_naming_no_vocabulary_token_stays_text(hf_dirs, tmp_path):
    path = write_gguf(hf_dirs["llama"], tmp_path / "llama.gguf", "F16")
    tokenizer = resolve_model(path).tokenizer()
    ids = tokenizer.encode("a<|endoftext|>b")
    assert max(ids) < 1024 and tokenizer.decode(ids) == "a<|endoftext|>b"  # every id is one the model has


def test_sentencepiece_tokenizer_equals_transformers_on_1000_strings(tmp_path):
    hf_dir = make_sentencepiece_checkpoint(tmp_path / "spm", "llama", "tiny", vocab_size=512)
    path = write_gguf(hf_dir, tmp_path / "spm.gguf", "F32", tokenizer="sentencepiece")
    checkpoint = GGUFCheckpoint(path)
    assert checkpoint.field("tokenizer.ggml.model") == "llama" and not checkpoint.field("tokenizer.ggml.merges")
    _assert_tokenizers_equal(path, _random_strings(1000, seed=2))
    ours = resolve_model(path).tokenizer()
    assert ours.adds_bos_token and ours.byte_fallback_ids  # SentencePiece files: BOS added, <0xNN> decoded


def test_sentencepiece_gguf_greedy_tokens_equal_transformers(tmp_path):
    hf_dir = make_sentencepiece_checkpoint(tmp_path / "spm", "llama", "tiny", vocab_size=512)
    config_path = hf_dir / "config.json"
    config = json.loads(config_path.read_text())
    config.update(rope_scaling=None, rope_theta=10000.0)
    config_path.write_text(json.dumps(config))
    path = write_gguf(hf_dir, tmp_path / "spm.gguf", "Q8_0", tokenizer="sentencepiece")
    tokenizer = resolve_model(path).tokenizer()
    texts = ("Once upon a time", "The server said", "日本語 text", "a b c", "  two spaces", "Numbers 1234567",
             "emoji 😀 here", "Ünïcödé and ß")
    assert len(texts) == NUM_PROMPTS
    prompts = [tokenizer.encode(text) for text in texts]
    assert _pdserve_greedy(path, prompts) == _transformers_greedy(path, prompts)


def test_llama3_rope_scaling_survives_the_gguf_round_trip(tmp_path):
    """llama.cpp stores Llama 3.1 rope scaling as a `rope_freqs` tensor; pdserve applies it, so the F32 file
    generates what the Hugging Face directory does (transformers' GGUF loader ignores that tensor)."""
    hf_dir = make_tiny_model(tmp_path / "llama3", arch="llama", seed=0, size="tiny")
    assert json.loads((hf_dir / "config.json").read_text())["rope_scaling"]["rope_type"] == "llama3"
    path = write_gguf(hf_dir, tmp_path / "llama3.gguf", "F32")
    assert GGUFCheckpoint(path).model_config.rope_scaling.rope_type == "frequency_divisors"
    prompts = _prompts(512)
    assert _pdserve_greedy(path, prompts) == _pdserve_greedy(hf_dir, prompts)


def test_a_directory_holding_one_gguf_file_loads_it(hf_dirs, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    path = write_gguf(hf_dirs["qwen2"], folder / "model.gguf", "Q4_0")
    source = resolve_model(folder)
    assert (source.format, source.path) == ("gguf", path)
    assert source.model_config().architecture == "Qwen2ForCausalLM"
    assert source.tokenizer().chat_template  # the checkpoint's chat template travels in the file


def _write_raw_gguf(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, object]],
                    tokens: list[str] | None = None, token_types: list[int] | None = None,
                    bos_eos: tuple[int, int] | None = None) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_block_count(1)
    writer.add_feed_forward_length(64)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens or [chr(ord("a") + i) for i in range(16)])
    if token_types:
        writer.add_token_types(token_types)
    if bos_eos:
        writer.add_bos_token_id(bos_eos[0])
        writer.add_eos_token_id(bos_eos[1])
        writer.add_add_bos_token(True)
    writer.add_token_merges([])
    for name, (data, raw_type) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_special_tokens_written_outside_the_byte_alphabet_keep_their_ids(tmp_path):
    """DeepSeek-R1 distills store `<｜begin▁of▁sentence｜>` raw in a byte-level vocabulary: it must encode to its
    own id (transformers appends a new id past the model's vocabulary instead)."""
    from pdserve.models.gguf_tokenizer import byte_level_alphabet

    specials = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>"]
    tokens = specials + sorted(set(byte_level_alphabet().values()))
    types = [3, 3, 4] + [1] * (len(tokens) - 3)
    path = _write_raw_gguf(tmp_path / "deepseek.gguf", "qwen2",
                           {"token_embd.weight": (np.zeros((len(tokens), 32), np.float32), None)},
                           tokens=tokens, token_types=types, bos_eos=(0, 1))
    tokenizer = resolve_model(path).tokenizer()
    assert (tokenizer.vocab_size, tokenizer.bos_token_id, tokenizer.eos_token_ids) == (len(tokens), 0, {1})
    text = "Hi<｜User｜>yo<｜end▁of▁sentence｜>"
    ids = tokenizer.encode(text)
    assert ids == [0, tokens.index("H"), tokens.index("i"), 2, tokens.index("y"), tokens.index("o"), 1]
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<｜begin▁of▁sentence｜>" + text
    assert tokenizer.decode(ids) == "Hi<｜User｜>yo"  # only the control tokens are skipped


def test_an_unsupported_tensor_type_fails_naming_the_tensor_and_type(tmp_path):
    import gguf

    q2k_block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q2_K][1]
    raw = np.zeros((16, q2k_block), dtype=np.uint8)  # 16 rows of one 256-wide Q2_K block
    path = _write_raw_gguf(tmp_path / "q2k.gguf", "llama", {"token_embd.weight": (raw, gguf.GGMLQuantizationType.Q2_K)})
    with pytest.raises(ModelLoadError, match=r"'token_embd.weight' is stored as Q2_K"):
        list(GGUFCheckpoint(path).tensors())


def test_an_unsupported_architecture_fails_at_once(tmp_path):
    path = _write_raw_gguf(tmp_path / "gemma.gguf", "gemma", {"token_embd.weight": (np.zeros((16, 32), np.float32), None)})
    with pytest.raises(ModelLoadError, match=r"general.architecture='gemma' is not supported"):
        resolve_model(path).model_config()


def test_broken_and_truncated_files_are_named(hf_dirs, tmp_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGML" + b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="garbage.gguf: not a GGUF file"):
        resolve_model(garbage).model_config()
    whole = write_gguf(hf_dirs["qwen2"], tmp_path / "whole.gguf", "Q8_0").read_bytes()
    for name, size in (("cut-header.gguf", 200), ("cut-data.gguf", len(whole) - 1000)):
        cut = tmp_path / name
        cut.write_bytes(whole[:size])
        with pytest.raises(ModelLoadError, match=f"{name}: (not a readable GGUF file|truncated GGUF file)"):
            resolve_model(cut).model_config()
