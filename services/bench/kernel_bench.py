"""Kernel benchmark (issue 5): the Triton GPU path against its targets, on one CUDA GPU.

    python -m pdserve.bench.kernel_bench [--json results.json] [--peak-gb-per-s 3350] [--sweep]
        [--only bandwidth,decode,prefill,model]

Measured in one run, each against a baseline from the same run:
  bandwidth  the GPU's peak memory bandwidth (a table of known GPUs, or --peak-gb-per-s) and what
             a large device-to-device copy reaches;
  decode     paged decode attention, batch 64 x 4096-token contexts, Llama-3-8B heads (32 query /
             8 KV heads of 128), bf16 / int8 / fp8 caches, blocks of 16: K/V bytes read per
             second as % of peak (target >= 70% for bf16), and against SDPA on the same K/V
             gathered into contiguous tensors (target: faster);
  prefill    one 4096-token prompt through the paged prefill kernel against SDPA's flash backend
             on contiguous K/V (target: within 1.25x);
  model      a 1B-class Llama (Llama-3.2-1B shape, random weights, bf16) decoding at batch 1 via
             ModelRunner with CUDA graphs: ms per token against weight bytes / peak bandwidth
             (target >= 50% of roofline), then output tokens/s of 64 concurrent requests (256
             prompt + 256 output tokens, greedy) in the pdserve engine against transformers
             `generate` of the same batch on the same GPU and weights.
--sweep also tries a grid of tile sizes and launch options for the attention kernels and reports
the best (use it to retune the defaults on a new GPU). Needs CUDA: without a GPU it exits with
status 2 and says so. The figures printed (and written with --json) carry the device, the commit
and the command line.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
PARTS = ("bandwidth", "decode", "prefill", "model")
# Peak DRAM bandwidth, GB/s, by a substring of torch.cuda.get_device_name() (first match wins).
PEAK_GB_PER_S = (("GH200", 4000.0), ("H200", 4800.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0),
                 ("H100", 3350.0), ("A100-SXM4-80GB", 2039.0), ("A100 80GB PCIe", 1935.0),
                 ("A100", 1555.0), ("L40S", 864.0), ("L40", 864.0), ("L4", 300.0), ("A10G", 600.0),
                 ("A10", 600.0), ("RTX 4090", 1008.0), ("RTX 3090", 936.0))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pdserve.bench.kernel_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {PARTS}")
    p.add_argument("--peak-gb-per-s", type=float, default=None, help="the GPU's peak bandwidth (default: table)")
    p.add_argument("--sweep", action="store_true", help="try a grid of kernel configs, report the best")
    p.add_argument("--json", default=None, help="also write the results to this file")
    ns = p.parse_args(argv)
    ns.parts = [part.strip() for part in ns.only.split(",") if part.strip()]
    unknown = sorted(set(ns.parts) - set(PARTS))
    if unknown:
        p.error(f"--only: unknown parts {unknown}; choose from {', '.join(PARTS)}")
    return ns


def peak_bandwidth(name: str, override: float | None) -> tuple[float, str]:
    """(GB/s, where the figure came from) for the device called `name`."""
    if override:
        return override, "--peak-gb-per-s"
    for key, value in PEAK_GB_PER_S:
        if key in name:
            return value, f"table ({key})"
    raise SystemExit(f"kernel_bench: no peak bandwidth known for {name!r}; pass --peak-gb-per-s")


def copy_bandwidth(do_bench) -> float:
    """GB/s of a 4 GiB device-to-device copy (bytes read + bytes written per second)."""
    src = torch.empty(2**31, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=5, rep=100, return_mode="median")  # noqa: F821 (del is after)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * 2**31 / ms / 1e6


def report(results: dict) -> list[str]:
    """Human-readable lines with the ratios and targets."""
    lines, peak = [], results["peak_gb_per_s"]
    if "copy_gb_per_s" in results:
        lines.append(f"copy bandwidth {results['copy_gb_per_s']:.0f} GB/s "
                     f"({results['copy_gb_per_s'] / peak:.0%} of peak {peak:.0f})")
    if "decode" in results:
        d = results["decode"]
        for name in ("bfloat16", "int8", "float8_e4m3fn"):
            r = d[name]
            lines.append(f"decode {d['batch']}x{d['context']} {name}: {r['ms']:.3f} ms, {r['gb_per_s']:.0f} GB/s "
                         f"= {r['gb_per_s'] / peak:.0%} of peak, {d['sdpa_gathered_ms'] / r['ms']:.2f}x faster "
                         f"than SDPA on gathered K/V ({d['sdpa_gathered_ms']:.3f} ms) [{r['config']}]")
        lines.append("  targets (bf16): >= 70% of peak, faster than SDPA")
    if "prefill" in results:
        r = results["prefill"]
        lines.append(f"prefill {r['tokens']} tokens: {r['ms']:.3f} ms vs SDPA flash {r['sdpa_flash_ms']:.3f} ms "
                     f"= {r['ms'] / r['sdpa_flash_ms']:.2f}x (target <= 1.25x) [{r['config']}]")
    if "model" in results:
        m = results["model"]
        for name in ("bf16_kv", "int8_kv"):
            r = m[f"decode_batch1_{name}"]
            lines.append(f"1B decode batch 1 ({name}): {r['ms_per_token']:.3f} ms/token, roofline "
                         f"{m['roofline_ms_per_token']:.3f} ms = {r['fraction_of_roofline']:.0%} of roofline "
                         f"(target >= 50%; CUDA graphs {r['cuda_graphs']})")
        t = m["throughput"]
        lines.append(f"1B throughput at {t['concurrency']} concurrent: pdserve {t['pdserve']['tokens_per_s']:.0f} "
                     f"tok/s, transformers generate {t['transformers_generate']['tokens_per_s']:.0f} tok/s "
                     f"= {t['ratio']:.2f}x; first tokens equal {t['first_token_agreement']:.0%}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_bench: needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured",
              file=sys.stderr)
        return 2
    import triton
    from triton.testing import do_bench

    from pdserve.bench.engine_bench_report import git_commit, now_utc
    from pdserve.bench.kernel_bench_attention import decode_attention, prefill_attention
    from pdserve.bench.kernel_bench_model import model_benchmarks

    name = torch.cuda.get_device_name()
    peak, peak_source = peak_bandwidth(name, ns.peak_gb_per_s)
    results: dict = {"device": name, "peak_gb_per_s": peak, "peak_source": peak_source,
                     "commit": git_commit(REPO_ROOT), "time": now_utc(),
                     "command": "python -m pdserve.bench.kernel_bench " + shlex.join(argv or sys.argv[1:]),
                     "torch": torch.__version__, "triton": triton.__version__}
    if "bandwidth" in ns.parts:
        results["copy_gb_per_s"] = copy_bandwidth(do_bench)
    if "decode" in ns.parts:
        results["decode"] = decode_attention(do_bench, sweep=ns.sweep)
    if "prefill" in ns.parts:
        results["prefill"] = prefill_attention(do_bench, sweep=ns.sweep)
    if "model" in ns.parts:
        results["model"] = model_benchmarks(peak)
    print(f"{name} | commit {results['commit']} | {results['time']} | {results['command']}")
    for line in report(results):
        print(line)
    if ns.json:
        Path(ns.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
