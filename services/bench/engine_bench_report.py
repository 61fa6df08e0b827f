"""Printing and collecting the engine benchmark's figures: table, ratios, parity, provenance."""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

from pdserve.bench.engine_bench_systems import SystemResult


def git_commit(repo: Path) -> str:
    """HEAD's commit id, with '+dirty' when the tree has changes; 'unknown' outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def now_utc() -> str:
    """The current time, ISO 8601 in UTC, to the second."""
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()


def parity(reference: dict[int, list[int]], other: dict[int, list[int]]) -> dict:
    """How far `other`'s greedy tokens agree with `reference`'s over the requests both ran.

    identical: requests whose tokens are all equal; agreeing_prefix_tokens: tokens equal before
    each request's first difference, summed; first_divergence: (request, position) of the first.
    """
    common = sorted(set(reference) & set(other))
    identical, agreeing, total, first = 0, 0, 0, None
    for i in common:
        a, b = reference[i], other[i]
        prefix = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        if a == b:
            identical += 1
        elif first is None:
            first = (i, prefix)
        agreeing += prefix
        total += len(a)
    return {"requests": len(common), "identical": identical, "agreeing_prefix_tokens": agreeing,
            "tokens": total, "first_divergence": first}


def format_parity(label: str, p: dict) -> str:
    """One line for a parity() result."""
    line = (f"parity {label}: {p['identical']}/{p['requests']} requests token-identical, "
            f"{p['agreeing_prefix_tokens']}/{p['tokens']} tokens before any divergence")
    if p["first_divergence"] is not None:
        line += f" (first divergence: request {p['first_divergence'][0]} at token {p['first_divergence'][1]})"
    return line


def format_table(results: dict[str, SystemResult]) -> list[str]:
    """The systems table: output tokens, seconds, tokens/s, and a's ratio over each baseline."""
    a = results["a"].tokens_per_s
    lines = [f"{'system':<52} {'out tokens':>10} {'seconds':>9} {'tok/s':>9} {'a/x':>7}"]
    for key, r in results.items():
        ratio = "" if key == "a" else f"{a / r.tokens_per_s:.2f}"
        mark = " *" if r.estimated else ""
        lines.append(f"{r.name + mark:<52} {r.output_tokens:>10d} {r.seconds:>9.1f} "
                     f"{r.tokens_per_s:>9.2f} {ratio:>7}")
    for key, r in results.items():
        if r.note:
            lines.append(f"  * ({key}) {r.note}")
    return lines


def ratio_lines(results: dict[str, SystemResult], targets: dict[str, float]) -> tuple[list[str], dict]:
    """'a/x = r (target >= t: met)' lines and the ratios as a dict."""
    a = results["a"].tokens_per_s
    ratios, lines = {}, []
    for key in ("b", "c", "d"):
        if key not in results:
            continue
        ratio = a / results[key].tokens_per_s
        ratios[f"a/{key}"] = ratio
        target = targets.get(key)
        verdict = ""
        if target is not None:
            verdict = f"  (target >= {target:g}: {'met' if ratio >= target else 'NOT met'})"
        lines.append(f"a/{key} = {ratio:.2f}{verdict}")
    return lines, ratios
