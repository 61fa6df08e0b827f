"""Engine benchmark (issue 3): output tokens/s of the pdserve engine against three baselines
measured in the same run, on the same prompts and output lengths, plus the engine's KV waste.

    python -m pdserve.bench.engine_bench --size base --num-requests 64 --hf-single-requests 16
        [--dtype bfloat16] [--threads N] [--json out.json]        (one command line)

Workload: num_requests prompts of prompt_len random token ids (fixed seed), output lengths from
an exponential of mean 128 capped at 512, greedy with ignore_eos, all submitted at once.
Systems: (a) the pdserve LLMEngine (continuous batching); (b) transformers `generate` one request
at a time; (c) `generate` in static batches of 16 (each batch runs to its longest member);
(d) the pdserve engine forced to static batches of 16. Printed: each system's output tokens,
seconds, tokens/s; the ratios a/b (target >= 8), a/c (target >= 2), a/d; the engine's KV waste
(unused / allocated slots of the running sequences, after every step; target < 4%); greedy-token
parity between the systems. Not a timed test: the figures are printed, and the ratios compare
systems measured in one run on the same machine. Every system runs in the same dtype with the
same torch threads; in bfloat16 the pdserve engine's CPU linear layers are packed for oneDNN
(models/cpu_packed_linear.py), transformers runs its own code as users run it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from pdserve.bench.engine_bench_report import (
    format_parity,
    format_table,
    git_commit,
    now_utc,
    parity,
    ratio_lines,
)
from pdserve.bench.engine_bench_systems import (
    SystemResult,
    hf_generate,
    run_hf_single,
    run_hf_static,
    run_pdserve,
)
from pdserve.bench.engine_bench_workload import Workload, make_workload, spread_subset
from pdserve.engine.model_runner import ModelRunner
from pdserve.models.loader import load_model
from pdserve.models.tiny_model import SIZES, make_tiny_model
from pdserve.models.tokenizer import Tokenizer

BLOCK_SIZE = 16
TARGETS = {"b": 8.0, "c": 2.0}
KV_WASTE_TARGET = 0.04
REPO_ROOT = Path(__file__).resolve().parents[2]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The benchmark's flags (defaults: the issue's workload)."""
    p = argparse.ArgumentParser(prog="python -m pdserve.bench.engine_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="base", choices=SIZES, help="make-tiny-model size (default base)")
    p.add_argument("--arch", default="llama", help="make-tiny-model architecture (default llama)")
    p.add_argument("--model-dir", default=None, help="use this checkpoint instead of making one")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--mean-output", type=float, default=128.0)
    p.add_argument("--max-output", type=int, default=512)
    p.add_argument("--static-batch", type=int, default=16, help="batch size of (c) and (d)")
    p.add_argument("--hf-single-requests", type=int, default=None,
                   help="run (b) on this many requests spread over the workload and estimate the "
                        "rest from them (default: all)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES),
                   help="weights and activations of every system (default bfloat16, what models are "
                        "served in)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch CPU threads, the same for every system (default: all cores; on a "
                        "machine busy with other work fewer threads are steadier)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and output lengths")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    for name in ("num_requests", "prompt_len", "max_output", "static_batch", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def blocks_for_workload(workload: Workload, block_size: int) -> int:
    """KV blocks that hold every request at full length at once (so nothing is preempted)."""
    return sum(-(-(len(p) + n) // block_size) for p, n in zip(workload.prompts, workload.output_lens))


def warm_up(runner: ModelRunner, tokenizer: Tokenizer, hf_model, workload: Workload, batch: int) -> None:
    """A short run of each code path at the sizes the timed runs start with (the first `batch`
    prompts together, then one alone), so that one-time costs (allocations, oneDNN kernels built
    for a new shape) are not timed."""
    first = Workload(workload.prompts[:batch], (2,) * min(batch, workload.num_requests))
    run_pdserve("warm-up", runner, tokenizer, first, None)
    hf_generate(hf_model, list(first.prompts), 2)
    hf_generate(hf_model, list(first.prompts[:1]), 4)


def load_hf(model_dir: Path, dtype: torch.dtype):
    """The transformers model in `dtype` with EOS stopping off (ignore_eos: every request runs to
    its length; min_new_tokens would instead mask EOS and change the greedy tokens)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    return model


def run_all(args: argparse.Namespace, model_dir: Path) -> tuple[Workload, dict[str, SystemResult], dict]:
    """Load both models, build the workload, run (a), (d), (c), (b); returns the results."""
    dtype = DTYPES[args.dtype]
    model, model_config = load_model(model_dir, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())  # before the runner packs the linear layers
    tokenizer = Tokenizer.from_dir(model_dir)
    workload = make_workload(args.num_requests, args.prompt_len, args.mean_output, args.max_output,
                             model_config.vocab_size, args.seed)
    runner = ModelRunner(model, model_config, blocks_for_workload(workload, BLOCK_SIZE) + 1, BLOCK_SIZE)
    hf_model = load_hf(model_dir, dtype)
    k = args.static_batch
    warm_up(runner, tokenizer, hf_model, workload, k)
    # (b) runs last: it is the slowest.
    a = run_pdserve("(a) pdserve engine, continuous batching", runner, tokenizer, workload, None)
    c = run_hf_static(hf_model, workload, k)
    d = run_pdserve(f"(d) pdserve engine, static batches of {k}", runner, tokenizer, workload, k)
    subset = spread_subset(workload.num_requests, args.hf_single_requests or workload.num_requests)
    b = run_hf_single(hf_model, workload, subset)
    results = {"a": a, "b": b, "c": c, "d": d}
    model_info = {"params": params, "packed_linears": runner.packed_linears,
                  "hidden_size": model_config.hidden_size, "num_layers": model_config.num_layers,
                  "kv_blocks": runner.num_blocks}
    return workload, results, model_info


def header_lines(args, command: str, stamp: dict, workload: Workload, model_info: dict) -> list[str]:
    """Provenance, model and workload lines that head the report."""
    mean = workload.total_output_tokens / workload.num_requests
    return [f"engine benchmark  {stamp['date']}  commit {stamp['commit']}",
            f"command: {command}",
            f"model: make-tiny-model --arch {args.arch} --size {args.size} "
            f"({model_info['params'] / 1e6:.1f}M params, hidden {model_info['hidden_size']}, "
            f"{model_info['num_layers']} layers), {args.dtype}, CPU, torch threads {args.threads}, "
            f"{model_info['packed_linears']} pdserve linear layers packed for oneDNN",
            f"workload: {workload.num_requests} requests x {args.prompt_len}-token prompts, output "
            f"lengths capped exponential (mean {args.mean_output:g}, cap {args.max_output}): total "
            f"{workload.total_output_tokens}, mean {mean:.1f}, max {max(workload.output_lens)}; "
            f"greedy, ignore_eos, all submitted at once", ""]


def engine_lines(results: dict[str, SystemResult]) -> list[str]:
    """KV waste against its target, and what the engine and the static baseline did."""
    a, c, d = results["a"], results["c"], results["d"]
    waste = a.kv_waste
    verdict = "met" if waste.slot_weighted < KV_WASTE_TARGET else "NOT met"
    return [f"KV waste of (a): {waste.slot_weighted:.2%} of allocated slot-steps unused "
            f"(target < {KV_WASTE_TARGET:.0%}: {verdict}); per-step mean {waste.step_mean:.2%} over "
            f"{len(waste.step_ratios)} steps; KV waste of (d): {d.kv_waste.slot_weighted:.2%}",
            f"engine (a): {a.extra['steps']} steps, {a.extra['preemptions']} preemptions; "
            f"(c) generated {c.extra['generated_incl_discarded']} tokens to deliver {c.output_tokens}"]


def report(args, argv: list[str], workload: Workload, results: dict[str, SystemResult],
           model_info: dict, runtime_s: float) -> dict:
    """Print everything and return it as a JSON-ready dict."""
    command = "python -m pdserve.bench.engine_bench " + shlex.join(argv)
    stamp = {"date": now_utc(), "commit": git_commit(REPO_ROOT)}
    a = results["a"]
    parities = {f"a_vs_{k}": parity(results[k].outputs, a.outputs) for k in ("b", "c", "d")}
    ratio_text, ratios = ratio_lines(results, TARGETS)
    lines = header_lines(args, command, stamp, workload, model_info) + format_table(results) + [""]
    lines += ratio_text + engine_lines(results)
    lines += [format_parity(f"(a) vs ({k})", parities[f"a_vs_{k}"]) for k in ("b", "c", "d")]
    lines.append(f"total runtime {runtime_s:.0f} s")
    print("\n".join(lines), flush=True)
    systems = {k: {"name": r.name, "output_tokens": r.output_tokens, "seconds": r.seconds,
                   "tokens_per_s": r.tokens_per_s, "estimated": r.estimated, "note": r.note,
                   "extra": r.extra} for k, r in results.items()}
    return {"command": command, **stamp, "size": args.size, "dtype": args.dtype, "threads": args.threads,
            "model": model_info,
            "num_requests": workload.num_requests, "total_output_tokens": workload.total_output_tokens,
            "ratios": ratios, "systems": systems, "kv_waste": a.kv_waste.as_dict(),
            "kv_waste_static": results["d"].kv_waste.as_dict(), "parity": parities,
            "runtime_s": runtime_s}


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and print its figures; returns them (also written to --json)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="engine-bench-") as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else make_tiny_model(
            Path(tmp) / "model", arch=args.arch, seed=0, size=args.size)
        workload, results, model_info = run_all(args, model_dir)
    figures = report(args, argv, workload, results, model_info, time.perf_counter() - started)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return figures


if __name__ == "__main__":
    main()
