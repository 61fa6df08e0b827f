"""What structured outputs cost a batch: half of its requests under a JSON schema against none, on one engine.

    pdserve bench structured [--size base] [--batch 32] [--tokens 64] [--repeats 5] [--out DIR]

The model: make-tiny-model of --size (random weights: the cost does not depend on what is written). A batch of
--batch prompts is decoded greedily for exactly --tokens tokens per request, in two configurations alternated
--repeats times: "none" (no request constrained) and "half" (every other request under a nested JSON schema
whose shortest valid output is longer than --tokens, so a constrained request also decodes exactly --tokens
tokens and both configurations do the same model work). Each prompt is prefilled before the timed run (prefix
caching), which then decodes. Reported: output tokens per second (median over the repeats, and the range of the
per-run ratios), the ratio half/none, and llguidance's mask time per constrained row and step (the fill runs on
llguidance's threads). Masks cost more with larger vocabularies (llguidance: ~20 us median, ~0.6 ms p99 per
mask at 32k tokens, ~3x that at 128k); this model's vocabulary is --size's (512 to 2048 tokens).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

PROMPT_TOKENS = 32
ITEMS = 16  # fixed-size array items in the schema: its shortest valid output is hundreds of tokens
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "minLength": 24, "maxLength": 24},
        "items": {"type": "array", "minItems": ITEMS, "maxItems": ITEMS, "items": {
            "type": "object",
            "properties": {"name": {"type": "string", "minLength": 8, "maxLength": 8},
                           "size": {"enum": ["small", "medium", "large"]},
                           "score": {"type": "integer", "minimum": 100, "maximum": 999}},
            "required": ["name", "size", "score"], "additionalProperties": False}},
    },
    "required": ["title", "items"],
    "additionalProperties": False,
}


class _TimedMasks:
    """Wraps a GrammarCompiler's fill_bitmask to add up its time and rows."""

    def __init__(self, grammars) -> None:
        self.fill = grammars.fill_bitmask
        self.seconds = 0.0
        self.rows = 0
        grammars.fill_bitmask = self

    def __call__(self, matchers):
        start = time.perf_counter()
        bitmask = self.fill(matchers)
        self.seconds += time.perf_counter() - start
        self.rows += len(matchers)
        return bitmask


def _decode(model, config, tokenizer, prompts: list[list[int]], tokens: int, constrained: bool):
    """(per-request token ids, output tokens/s of the timed decode, mask seconds, mask rows)."""
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.engine import LLMEngine
    from pdserve.engine.model_runner import ModelRunner
    from pdserve.models.sampling_params import SamplingParams, StructuredOutput

    blocks = len(prompts) * -(-(PROMPT_TOKENS + tokens + 16) // 16) + 16
    engine = LLMEngine(ModelRunner(model, config, blocks, 16, cpu_linear="none"), tokenizer,
                       EngineConfig(block_size=16, max_num_seqs=len(prompts), max_num_batched_tokens=4096,
                                    enable_prefix_caching=True))
    timed = _TimedMasks(engine.grammars)
    schema = StructuredOutput("json_schema", json.dumps(SCHEMA))
    params = [SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True,
                             structured=schema if constrained and i % 2 == 0 else None) for i in range(len(prompts))]
    engine.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))  # prefill apart
    timed.seconds, timed.rows = 0.0, 0
    start = time.perf_counter()
    results = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    out = [r.samples[0].token_ids for r in results]
    if any(len(ids) != tokens for ids in out):
        raise RuntimeError("a request did not decode exactly --tokens tokens (the schema must outlast them)")
    return out, len(prompts) * tokens / elapsed, timed.seconds, timed.rows


def run(ns: argparse.Namespace) -> int:
    """Build the model, alternate the two configurations, print the table; write structured.json into --out."""
    from pdserve.models.loader import load_model
    from pdserve.models.tiny_model import make_tiny_model
    from pdserve.models.tokenizer import Tokenizer

    torch.set_num_threads(ns.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_model(Path(tmp) / "model", arch="llama", seed=0, size=ns.size)
        model, config = load_model(path)
        tokenizer = Tokenizer.from_dir(path)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, config.vocab_size, (PROMPT_TOKENS,), generator=generator).tolist()
               for _ in range(ns.batch)]
    rates: dict[str, list[float]] = {"none": [], "half": []}
    mask_seconds, mask_rows = 0.0, 0
    reference = None
    for _ in range(ns.repeats):
        for name in ("none", "half"):
            ids, rate, seconds, rows = _decode(model, config, tokenizer, prompts, ns.tokens, name == "half")
            rates[name].append(rate)
            mask_seconds, mask_rows = mask_seconds + seconds, mask_rows + rows
            unconstrained = ids[1::2]  # the odd requests are never constrained
            if reference is not None and unconstrained != reference:
                raise RuntimeError("the unconstrained requests' tokens differ between runs")
            reference = unconstrained
    ratios = [h / n for h, n in zip(rates["half"], rates["none"])]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    result = {
        "commit": commit, "size": ns.size, "vocab_size": config.vocab_size, "batch": ns.batch, "tokens": ns.tokens,
        "threads": ns.threads, "repeats": ns.repeats,
        "tokens_per_s": {name: statistics.median(values) for name, values in rates.items()},
        "ratio_half_to_none": statistics.median(rates["half"]) / statistics.median(rates["none"]),
        "ratio_range": [min(ratios), max(ratios)],
        "mask_us_per_row": 1e6 * mask_seconds / max(1, mask_rows),
        "command": f"pdserve bench structured --size {ns.size} --batch {ns.batch} --tokens {ns.tokens} "
                   f"--repeats {ns.repeats} --threads {ns.threads}",
    }
    print(f"batch {ns.batch}, {ns.tokens} tokens each, model {ns.size} (vocab {config.vocab_size}), "
          f"{ns.threads} thread(s), median of {ns.repeats}")
    print(f"  none constrained : {result['tokens_per_s']['none']:8.1f} tok/s")
    print(f"  half constrained : {result['tokens_per_s']['half']:8.1f} tok/s   ratio {result['ratio_half_to_none']:.3f} "
          f"(runs {min(ratios):.3f}-{max(ratios):.3f})")
    print(f"  mask fill        : {result['mask_us_per_row']:.1f} us per constrained row and step")
    if ns.out:
        Path(ns.out).mkdir(parents=True, exist_ok=True)
        (Path(ns.out) / "structured.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0
