"""Per-request timings of a serving run and the figures made from them (as `vllm bench serve`
defines them): TTFT, TPOT (excluding the first token), ITL, end-to-end latency, throughput and
goodput under SLOs. The simulator produces the same RequestRecords, so both are measured alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)
SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class RequestRecord:
    """What one request did, in seconds from its send.

    ttft: time to the first token; itl: gaps between later tokens (one per token after the first,
    so len(itl) == output_tokens - 1; a chunk of k tokens counts its gap split evenly over them);
    e2e: time to the last token. success False means the request failed (error says why).
    """

    prompt_len: int
    output_len: int
    send_time: float = 0.0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    e2e: float = 0.0
    output_tokens: int = 0
    success: bool = False
    error: str = ""

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None with fewer than two tokens."""
        if self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def parse_slos(items: list[str] | None) -> dict[str, float]:
    """`["ttft:500", "tpot:50"]` -> {"ttft": 0.5, "tpot": 0.05} (milliseconds in, seconds out)."""
    slos: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"--goodput takes METRIC:MILLISECONDS with METRIC one of "
                             f"{', '.join(SLO_METRICS)}; got {item!r}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number of milliseconds") from None
        if not ms > 0:
            raise ValueError(f"--goodput {item!r}: the SLO must be > 0 ms")
        slos[name] = ms / 1000.0
    return slos


def meets_slos(record: RequestRecord, slos: dict[str, float]) -> bool:
    """True when the request succeeded and each given SLO holds (a request of one token has no
    TPOT and passes that SLO)."""
    if not record.success:
        return False
    values = {"ttft": record.ttft, "tpot": record.tpot, "e2el": record.e2e}
    return all(values[name] is None or values[name] <= limit for name, limit in slos.items())


def summarize(values: list[float]) -> dict[str, float]:
    """mean, std, median, p90, p99 (milliseconds; zeros when empty) of values given in seconds."""
    if not values:
        return {"mean_ms": 0.0, "std_ms": 0.0, **{f"p{p}_ms": 0.0 for p in PERCENTILES}}
    ms = np.asarray(values, dtype=np.float64) * 1000.0
    out = {"mean_ms": float(ms.mean()), "std_ms": float(ms.std())}
    out.update({f"p{p}_ms": float(np.percentile(ms, p)) for p in PERCENTILES})
    return out


@dataclass
class ServeMetrics:
    """The figures of one run (latencies in ms, rates per second)."""

    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft: dict[str, float]
    tpot: dict[str, float]
    itl: dict[str, float]
    e2el: dict[str, float]
    slos_ms: dict[str, float]
    good_requests: int
    goodput: float
    slo_attainment: float

    def as_dict(self) -> dict:
        """Plain JSON-ready figures."""
        return asdict(self)


def compute_metrics(records: list[RequestRecord], duration_s: float,
                    slos: dict[str, float] | None = None) -> ServeMetrics:
    """Figures of a run that lasted duration_s (first send to last token); goodput counts the
    requests meeting every SLO in `slos` (seconds) per second, slo_attainment their share of all."""
    if duration_s <= 0:
        raise ValueError(f"duration must be > 0, got {duration_s}")
    slos = slos or {}
    ok = [r for r in records if r.success]
    inputs = sum(r.prompt_len for r in ok)
    outputs = sum(r.output_tokens for r in ok)
    good = sum(meets_slos(r, slos) for r in records) if slos else len(ok)
    return ServeMetrics(
        completed=len(ok), failed=len(records) - len(ok), duration_s=duration_s,
        total_input_tokens=inputs, total_output_tokens=outputs,
        request_throughput=len(ok) / duration_s, output_throughput=outputs / duration_s,
        total_token_throughput=(inputs + outputs) / duration_s,
        ttft=summarize([r.ttft for r in ok]),
        tpot=summarize([r.tpot for r in ok if r.tpot is not None]),
        itl=summarize([gap for r in ok for gap in r.itl]),
        e2el=summarize([r.e2e for r in ok]),
        slos_ms={k: v * 1000.0 for k, v in slos.items()}, good_requests=good,
        goodput=good / duration_s, slo_attainment=good / len(records) if records else 0.0)


def run_duration(records: list[RequestRecord]) -> float:
    """Seconds from the first send to the last finished request (a tiny floor for empty runs)."""
    if not records:
        return 1e-9
    start = min(r.send_time for r in records)
    end = max(r.send_time + (r.e2e if r.success else 0.0) for r in records)
    return max(end - start, 1e-9)
