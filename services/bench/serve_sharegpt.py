"""The synthetic ShareGPT-like length distribution the project ships.

No ShareGPT text or data is used: the pairs are drawn from two independent log-normals shaped
after the statistics published for ShareGPT in the vLLM paper (Kwon et al., SOSP 2023: mean
input 161 and mean output 338 tokens), then filtered as `vllm bench serve` filters ShareGPT
(both lengths >= 4, prompt <= 1024, prompt + output <= 2048). The result: mean prompt ~161
(median ~102, p99 ~810), mean output ~340 (median ~248, p99 ~1490).

The shipped file services/bench/data/sharegpt_like_lengths.csv is exactly
`synthesize_sharegpt_like()` (a test checks this); regenerate it with
`python -m pdserve.bench.serve_sharegpt`.
"""

from __future__ import annotations

import functools
import math
import random
from pathlib import Path

DATA_FILE = Path(__file__).resolve().parent / "data" / "sharegpt_like_lengths.csv"
NUM_PAIRS = 1000
PROMPT_MEDIAN, PROMPT_SIGMA = 105.0, 1.05
OUTPUT_MEDIAN, OUTPUT_SIGMA = 250.0, 0.85
MIN_LEN, MAX_PROMPT, MAX_TOTAL = 4, 1024, 2048
HEADER = "prompt_len,output_len"


def synthesize_sharegpt_like(num_pairs: int = NUM_PAIRS, seed: int = 0) -> list[tuple[int, int]]:
    """num_pairs (prompt_len, output_len) pairs from the log-normals above, filtered like ShareGPT."""
    rng = random.Random(seed)
    pairs: list[tuple[int, int]] = []
    while len(pairs) < num_pairs:
        prompt = round(rng.lognormvariate(math.log(PROMPT_MEDIAN), PROMPT_SIGMA))
        output = round(rng.lognormvariate(math.log(OUTPUT_MEDIAN), OUTPUT_SIGMA))
        if min(prompt, output) < MIN_LEN or prompt > MAX_PROMPT or prompt + output > MAX_TOTAL:
            continue
        pairs.append((prompt, output))
    return pairs


def format_csv(pairs: list[tuple[int, int]]) -> str:
    """The CSV text of the pairs (a header line, then one `prompt,output` line per pair)."""
    return "\n".join([HEADER, *(f"{p},{o}" for p, o in pairs)]) + "\n"


@functools.cache
def load_sharegpt_like(path: Path = DATA_FILE) -> tuple[tuple[int, int], ...]:
    """The shipped (prompt_len, output_len) pairs; a clear error when the file is missing or bad."""
    if not path.is_file():
        raise FileNotFoundError(f"ShareGPT-like length file {path} is missing (reinstall pdserve, or "
                                f"regenerate it with `python -m pdserve.bench.serve_sharegpt`)")
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].strip() != HEADER:
        raise ValueError(f"{path}: the first line must be {HEADER!r}")
    pairs = []
    for number, line in enumerate(lines[1:], start=2):
        try:
            prompt, output = (int(x) for x in line.split(","))
        except ValueError:
            raise ValueError(f"{path}:{number}: expected two integers 'prompt_len,output_len', got {line!r}") from None
        if prompt < 1 or output < 1:
            raise ValueError(f"{path}:{number}: lengths must be >= 1, got {line!r}")
        pairs.append((prompt, output))
    if not pairs:
        raise ValueError(f"{path}: no length pairs")
    return tuple(pairs)


if __name__ == "__main__":
    DATA_FILE.parent.mkdir(parents=True, exist_ok=True)
    DATA_FILE.write_text(format_csv(synthesize_sharegpt_like()), encoding="utf-8")
    print(f"wrote {NUM_PAIRS} pairs to {DATA_FILE}")
