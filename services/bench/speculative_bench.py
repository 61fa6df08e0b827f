"""Speculative decoding (n-gram prompt lookup, a draft model) against plain decoding, on one engine, in one run.

    pdserve bench speculative [--size small] [--draft-size tiny] [--train-steps 600] [--tokens 56] [--out DIR]

The model: make-tiny-model of --size, trained --train-steps steps with copy training (half the windows teach
copying a passage from the context, as real models do: a model trained only to recite its text does not follow
a passage the prompt quotes); the draft: make-tiny-model of --draft-size with the model's tokenizer, trained the
same way. Workloads, from the training text (which both models reproduce when cued with its own words):
- "edit" (what prompt lookup is for: the output repeats the prompt, as an edit or a summary repeats its source):
  64 tokens of the text, a blank line, and their first 8 tokens again; the model repeats the passage, which
  prompt lookup finds in the prompt;
- "continue" (what a draft model is for: text both models predict): 16 tokens of the text alone;
- "random": random prompt ids, for contrast.
Each is decoded greedily at batch 1 (8 prompts one after another) and at batch 32 (all at once), without
speculation, with --speculative ngram and with --speculative draft, on the same engine settings (prefix caching
on: each prompt is prefilled once before the timed run, which then decodes); the tokens must be identical in every
run. Reported: output tokens per second (the median of --repeats alternated runs, and the range of the per-run
ratios) and the ratio to plain decoding, the acceptance rate, accepted tokens per speculative chunk, acceptance by
position. At batch 32 the default policy (--speculative-max-batch: 4 for ngram, 1 for draft) turns speculation
off; the row shows what that costs (and the noise: both sides then decode alike). The crossover rows run batches
of 2, 4, 8 and 16 with speculation on whatever the batch: where it stops paying.
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
CROSSOVER_BATCH_SIZES = (2, 4, 8, 16)
PASSAGE_TOKENS = 64
PROMPT_CUE_TOKENS = 8


def _workloads(tokenizer, vocab_size: int, count: int) -> dict[str, list[list[int]]]:
    """count prompts of each workload (see the module doc): "edit", "continue" and "random"."""
    from pdserve.models.tiny_model_train import training_tokens

    text = training_tokens(tokenizer.backend).tolist()
    generator = torch.Generator().manual_seed(0)
    separator = tokenizer.backend.encode("\n\n", add_special_tokens=False).ids
    edit, cont = [], []
    for i in range(count):
        start = (i * 97) % (len(text) - PASSAGE_TOKENS)
        passage = text[start:start + PASSAGE_TOKENS]
        edit.append(passage + separator + passage[:PROMPT_CUE_TOKENS])
        cont.append(passage[:2 * PROMPT_CUE_TOKENS])
    random = [torch.randint(3, vocab_size, (PASSAGE_TOKENS,), generator=generator).tolist() for _ in range(count)]
    return {"edit": edit, "continue": cont, "random": random}


def _decode(model, config, tokenizer, prompts: list[list[int]], batch: int, tokens: int, speculative, draft=None):
    """Greedy decode of prompts, batch at a time (draft: the draft's (model, config) for --speculative draft);
    (tokens per prompt, output tokens/s, counters of the timed runs)."""
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.engine import LLMEngine
    from pdserve.engine.model_runner import ModelRunner
    from pdserve.engine.stats import EngineCounters
    from pdserve.models.sampling_params import SamplingParams

    blocks = batch * -(-(PASSAGE_TOKENS + PROMPT_CUE_TOKENS + tokens + 32) // 16) + 64
    draft_runner = ModelRunner(*draft, blocks, 16, cpu_linear="none") if draft is not None else None
    engine = LLMEngine(ModelRunner(model, config, blocks, 16, cpu_linear="none"), tokenizer,
                       EngineConfig(block_size=16, max_num_seqs=batch, max_num_batched_tokens=2048,
                                    enable_prefix_caching=True, speculative=speculative), draft_runner)
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


def _compare(model, config, tokenizer, prompts, batch: int, methods: dict, ns: argparse.Namespace,
             workload: str) -> list[dict]:
    """Plain decoding and each method on the same prompts, --repeats alternated runs; a row per method."""
    runs: dict[str, list[float]] = {"plain": [], **{m: [] for m in methods}}
    identical, counters = dict.fromkeys(methods, True), {}
    for _ in range(ns.repeats):  # alternated, so that drifting load hits all alike
        plain, tps, _ = _decode(model, config, tokenizer, prompts, batch, ns.tokens, None)
        runs["plain"].append(tps)
        for method, (speculative, draft) in methods.items():
            tokens, tps, counters[method] = _decode(model, config, tokenizer, prompts, batch, ns.tokens,
                                                    speculative, draft)
            runs[method].append(tps)
            identical[method] &= tokens == plain
    plain_tps = statistics.median(runs["plain"])
    rows = []
    for method in methods:
        c, spec_tps = counters[method], statistics.median(runs[method])
        row = {"workload": workload, "batch": batch, "method": method, "prompts": len(prompts),
               "max_batch_seqs": methods[method][0].max_batch_seqs,
               "plain_tokens_per_s": plain_tps, "speculative_tokens_per_s": spec_tps,
               "ratio": spec_tps / plain_tps, "identical": identical[method],
               "run_ratios": [spec / plain for spec, plain in zip(runs[method], runs["plain"])],
               "acceptance_rate": c.speculative_acceptance_rate,
               "accepted_per_chunk": c.mean_speculative_accepted_length,
               "speculative_chunks": c.num_speculative_chunks,
               "accepted_by_position": [n / c.num_speculative_chunks if c.num_speculative_chunks else 0.0
                                        for n in c.speculative_accepted_by_position]}
        rows.append(row)
        print(f"{workload:8s} batch {batch:2d} {method:5s}: {plain_tps:7.1f} -> {spec_tps:7.1f} tokens/s "
              f"({row['ratio']:.2f}x, runs {min(row['run_ratios']):.2f}-{max(row['run_ratios']):.2f}x), "
              f"acceptance {row['acceptance_rate']:.2f}, "
              f"{row['accepted_per_chunk']:.2f} accepted per chunk, identical {row['identical']}", flush=True)
    return rows


def run(ns: argparse.Namespace) -> int:
    """Run every workload at both batch sizes, then the crossover batches, print, write speculative.json to
    --out; exit 1 when the tokens differ."""
    from pdserve.engine.speculation import SpeculativeConfig
    from pdserve.models.loader import load_model
    from pdserve.models.tiny_model import make_tiny_model
    from pdserve.models.tokenizer import Tokenizer

    if ns.draft_size == ns.size:
        raise ValueError("--draft-size must differ from --size (the same size, seed and training make the model itself)")
    torch.set_num_threads(ns.threads)
    work_dir = Path(tempfile.mkdtemp(prefix="pdserve-specbench-"))
    model_dir = make_tiny_model(work_dir / "model", size=ns.size, train_steps=ns.train_steps, copy_training=True)
    draft_dir = make_tiny_model(work_dir / "draft", size=ns.draft_size, train_steps=ns.train_steps,
                                tokenizer_size=ns.size, copy_training=True)
    model, config = load_model(model_dir, dtype="float32")
    draft = load_model(draft_dir, dtype="float32")
    tokenizer = Tokenizer.from_dir(model_dir)

    def methods(max_batch_seqs: int | None) -> dict:
        return {"ngram": (SpeculativeConfig(num_speculative_tokens=ns.num_speculative_tokens,
                                            max_batch_seqs=max_batch_seqs), None),
                "draft": (SpeculativeConfig("draft", num_speculative_tokens=ns.num_speculative_tokens,
                                            max_batch_seqs=max_batch_seqs, draft_model=str(draft_dir)), draft)}

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    result: dict = {"commit": commit, "date": time.strftime("%Y-%m-%d"), "model": f"make-tiny-model {ns.size} "
                    f"trained {ns.train_steps} steps with copy training", "draft": f"make-tiny-model {ns.draft_size} "
                    f"(the model's tokenizer) trained {ns.train_steps} steps with copy training",
                    "tokens": ns.tokens, "threads": ns.threads,
                    "num_speculative_tokens": ns.num_speculative_tokens,
                    "speculative_max_batch": ns.speculative_max_batch, "rows": [], "crossover": []}
    workloads = _workloads(tokenizer, config.vocab_size, max(BATCH_SIZES))
    for name, prompts in workloads.items():
        for batch in BATCH_SIZES:
            chosen = prompts[:8] if batch == 1 else prompts
            result["rows"] += _compare(model, config, tokenizer, chosen, batch, methods(ns.speculative_max_batch),
                                       ns, name)
    print("crossover: speculation on at every batch size (what --speculative-max-batch is chosen from)")
    for batch in CROSSOVER_BATCH_SIZES:
        for name in ("edit", "continue"):
            result["crossover"] += _compare(model, config, tokenizer, workloads[name][:batch], batch,
                                            methods(max(CROSSOVER_BATCH_SIZES)), ns, name)
    ok = all(row["identical"] for row in result["rows"] + result["crossover"])
    if ns.out:
        Path(ns.out).mkdir(parents=True, exist_ok=True)
        (Path(ns.out) / "speculative.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ok else 1
