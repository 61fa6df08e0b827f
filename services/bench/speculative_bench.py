"""Speculative decoding (n-gram prompt lookup) against plain decoding, on one engine, in one run.

    pdserve bench speculative [--size small] [--train-steps 600] [--tokens 56] [--out DIR]

Workload "edit" (what prompt lookup is for: an edit or a summary repeats its source): each prompt is a passage of
the text the model was trained on, a separator, and the passage's first words again; the model continues the
passage, and prompt lookup proposes it from the prompt. Workload "random" (random prompt ids, for contrast). Each
is decoded greedily at batch 1 (prompts one after another) and at batch 32 (all at once), with --speculative
ngram and without, on the same engine settings; the tokens must be identical. Reported: output tokens per second
of each (the median of --repeats alternated runs) and the ratio, the acceptance rate, accepted tokens per
speculative chunk, and acceptance by position.
At batch 32 the default policy (--speculative-max-batch 8) turns speculation off; the row shows what that costs.
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

BATCH_SIZES = (1, 32)
PASSAGE_TOKENS = 64
PROMPT_CUE_TOKENS = 8


def _workloads(tokenizer, vocab_size: int, count: int) -> dict[str, list[list[int]]]:
    """count "edit" prompts (a training-text passage, a separator, its first words) and count random ones."""
    from pdserve.models.tiny_model_train import training_tokens

    text = training_tokens(tokenizer.backend).tolist()
    generator = torch.Generator().manual_seed(0)
    separator = tokenizer.backend.encode("\n\n", add_special_tokens=False).ids
    edit = []
    for i in range(count):
        start = (i * 97) % (len(text) - PASSAGE_TOKENS)
        passage = text[start:start + PASSAGE_TOKENS]
        edit.append(passage + separator + passage[:PROMPT_CUE_TOKENS])
    random = [torch.randint(3, vocab_size, (PASSAGE_TOKENS,), generator=generator).tolist() for _ in range(count)]
    return {"edit": edit, "random": random}


def _decode(model, config, tokenizer, prompts: list[list[int]], batch: int, tokens: int, speculative):
    """Greedy decode of prompts, batch at a time; (tokens per prompt, output tokens/s, counters)."""
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.engine import LLMEngine
    from pdserve.engine.model_runner import ModelRunner
    from pdserve.engine.stats import EngineCounters
    from pdserve.models.sampling_params import SamplingParams

    blocks = batch * -(-(PASSAGE_TOKENS + PROMPT_CUE_TOKENS + tokens + 32) // 16) + 64
    engine = LLMEngine(ModelRunner(model, config, blocks, 16, cpu_linear="none"), tokenizer,
                       EngineConfig(block_size=16, max_num_seqs=batch, max_num_batched_tokens=2048,
                                    enable_prefix_caching=False, speculative=speculative))
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    engine.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # warm up
    engine.counters = EngineCounters()  # count the timed runs only
    out: list[list[int]] = []
    decode_s = 0.0
    for first in range(0, len(prompts), batch):
        group = prompts[first:first + batch]
        engine.generate(group, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))  # prefill cost apart
        start = time.perf_counter()
        results = engine.generate(group, params)
        decode_s += time.perf_counter() - start
        out += [r.samples[0].token_ids for r in results]
    return out, len(prompts) * tokens / decode_s, engine.stats().counters


def run(ns: argparse.Namespace) -> int:
    """Run every workload at both batch sizes, print, write speculative.json to --out; exit 1 when the
    tokens differ."""
    from pdserve.engine.speculation import SpeculativeConfig
    from pdserve.models.loader import load_model
    from pdserve.models.tiny_model import make_tiny_model
    from pdserve.models.tokenizer import Tokenizer

    torch.set_num_threads(ns.threads)
    model_dir = make_tiny_model(Path(tempfile.mkdtemp(prefix="pdserve-specbench-")) / "model", size=ns.size,
                                train_steps=ns.train_steps)
    model, config = load_model(model_dir, dtype="float32")
    tokenizer = Tokenizer.from_dir(model_dir)
    speculative = SpeculativeConfig(num_speculative_tokens=ns.num_speculative_tokens,
                                    max_batch_seqs=ns.speculative_max_batch)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    result: dict = {"commit": commit, "date": time.strftime("%Y-%m-%d"), "model": f"make-tiny-model {ns.size} "
                    f"trained {ns.train_steps} steps", "tokens": ns.tokens, "threads": ns.threads,
                    "speculative": vars(speculative), "rows": []}
    ok = True
    for name, prompts in _workloads(tokenizer, config.vocab_size, max(BATCH_SIZES)).items():
        for batch in BATCH_SIZES:
            chosen = prompts[:8] if batch == 1 else prompts
            plain_runs, spec_runs = [], []
            for _ in range(ns.repeats):  # alternated, so that drifting load hits both alike
                plain_tokens, tps, _ = _decode(model, config, tokenizer, chosen, batch, ns.tokens, None)
                plain_runs.append(tps)
                spec_tokens, tps, c = _decode(model, config, tokenizer, chosen, batch, ns.tokens, speculative)
                spec_runs.append(tps)
            plain_tps, spec_tps = statistics.median(plain_runs), statistics.median(spec_runs)
            row = {"workload": name, "batch": batch, "prompts": len(chosen), "plain_tokens_per_s": plain_tps,
                   "speculative_tokens_per_s": spec_tps, "ratio": spec_tps / plain_tps,
                   "identical": spec_tokens == plain_tokens, "acceptance_rate": c.speculative_acceptance_rate,
                   "accepted_per_chunk": c.mean_speculative_accepted_length,
                   "speculative_chunks": c.num_speculative_chunks,
                   "accepted_by_position": [n / c.num_speculative_chunks if c.num_speculative_chunks else 0.0
                                            for n in c.speculative_accepted_by_position]}
            result["rows"].append(row)
            ok &= row["identical"]
            print(f"{name:6s} batch {batch:2d}: {plain_tps:7.1f} -> {spec_tps:7.1f} tokens/s ({row['ratio']:.2f}x), "
                  f"acceptance {row['acceptance_rate']:.2f}, {row['accepted_per_chunk']:.2f} accepted per chunk, "
                  f"identical {row['identical']}", flush=True)
    if ns.out:
        Path(ns.out).mkdir(parents=True, exist_ok=True)
        (Path(ns.out) / "speculative.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ok else 1
