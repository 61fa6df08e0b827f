"""Train the byte-level BPE tokenizer shipped with the tiny test models.

The tokenizer is trained with the `tokenizers` library on `models/data/corpus.txt` and is shaped
like a Llama-3 tokenizer: a regex split, byte-level pieces (so rare characters such as CJK or
emoji split into several tokens that each hold part of a UTF-8 character), a byte-level decoder,
and a post-processor that prepends the BOS token.  Training is deterministic: the trainer breaks
ties between equally frequent pairs by pair id, and the initial alphabet is all 256 bytes.
"""

from __future__ import annotations

import functools
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS_PATH = Path(__file__).parent / "data" / "corpus.txt"

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN)

# The pre-tokenizer split used by Llama 3 (a GPT-4 style pattern).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# A minimal chat template: role headers and an EOS after each message.  It does not emit the BOS
# token because `Tokenizer.encode(..., add_special_tokens=True)` already prepends it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _corpus_lines() -> list[str]:
    """Return the training corpus as a list of lines (newlines kept, so they get merged too)."""
    if not CORPUS_PATH.is_file():
        raise FileNotFoundError(f"tokenizer training corpus not found: {CORPUS_PATH}")
    return CORPUS_PATH.read_text(encoding="utf-8").splitlines(keepends=True)


@functools.lru_cache(maxsize=8)
def train_tokenizer_json(vocab_size: int) -> str:
    """Train a byte-level BPE with `vocab_size` entries (special tokens included).

    Returns the tokenizer serialised as a `tokenizer.json` string; the same `vocab_size` always gives
    the same string.  Raises ValueError if the corpus cannot support that many tokens.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus_lines(), trainer=trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise ValueError(
            f"corpus {CORPUS_PATH} supports only {tokenizer.get_vocab_size()} tokens, asked for {vocab_size}"
        )
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN}:0 $A:0",
                pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
                special_tokens=[(BOS_TOKEN, bos_id)],
            ),
        ]
    )
    return tokenizer.to_str(pretty=True)


def tokenizer_config(model_max_length: int) -> dict:
    """Return the `tokenizer_config.json` contents matching `train_tokenizer_json`."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
