"""The simulator's cost model: how long one engine step takes, from what the step computes, plus
the service path's overheads. Fitted on a machine (simulate_fit) and saved as a JSON profile.

A step computes chunks: prompt chunks (n new tokens after s already computed) and decode tokens
(n = 1 at context c). Its time is linear in five features:
    t = base + per_token * T + per_prefill_pair * P + per_decode_ctx * D + per_seq * S
T: tokens computed; P: sum over prompt chunks of n * (s + n) (attention pairs, quadratic in the
prompt); D: sum over decode tokens of their context; S: sequences in the step (sampling, outputs).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

FEATURES = ("base", "per_token", "per_prefill_pair", "per_decode_ctx", "per_seq")


@dataclass(frozen=True)
class StepShape:
    """What one step computes: prompt chunks as (new tokens, tokens before them), decode contexts."""

    prompt_chunks: tuple[tuple[int, int], ...] = ()
    decode_contexts: tuple[int, ...] = ()

    def features(self) -> tuple[float, float, float, float, float]:
        """(1, T, P, D, S) as in the module docstring."""
        tokens = sum(n for n, _ in self.prompt_chunks) + len(self.decode_contexts)
        pairs = sum(n * (s + n) for n, s in self.prompt_chunks)
        return (1.0, float(tokens), float(pairs), float(sum(self.decode_contexts)),
                float(len(self.prompt_chunks) + len(self.decode_contexts)))


@dataclass(frozen=True)
class Overheads:
    """Service-path costs an in-process engine does not see (calibrated on a running deployment).

    request_s: added to every request's TTFT (router, Redis, RPCs, KV transfer set-up);
    handoff_s: disaggregated only, from the first token until the decode server can step the
        request (KV completion, Decode RPC, admission);
    decode_step_s, decode_per_seq_s: extra time of each decode-carrying step, and per decode
        sequence in it (turning outputs into gRPC messages, relaying them);
    prefill_scale: factor on the engine cost of steps with prompt chunks (a server's prefill is
        slower than the in-process one when it also streams KV and shares the CPU).
    """

    request_s: float = 0.0
    handoff_s: float = 0.0
    decode_step_s: float = 0.0
    decode_per_seq_s: float = 0.0
    prefill_scale: float = 1.0


@dataclass(frozen=True)
class StepCosts:
    """Fitted coefficients (seconds per feature unit), the engine limits the fit ran under, the
    service overheads, and where the figures come from (machine, model, date)."""

    coefficients: dict[str, float]
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    overheads: Overheads = field(default_factory=Overheads)
    source: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [f for f in FEATURES if f not in self.coefficients]
        if missing:
            raise ValueError(f"step costs: missing coefficients {missing}")
        negative = {k: v for k, v in self.coefficients.items() if v < 0}
        if negative:
            raise ValueError(f"step costs: coefficients must be >= 0, got {negative}")

    def engine_time(self, shape: StepShape) -> float:
        """Seconds the engine takes for the step (no service overheads)."""
        return sum(self.coefficients[name] * x for name, x in zip(FEATURES, shape.features()))

    def step_time(self, shape: StepShape) -> float:
        """Seconds the step takes inside a server: the engine time (scaled when it prefills) plus
        the per-step and per-sequence service cost of its decode tokens."""
        o = self.overheads
        t = self.engine_time(shape) * (o.prefill_scale if shape.prompt_chunks else 1.0)
        if shape.decode_contexts:
            t += o.decode_step_s + o.decode_per_seq_s * len(shape.decode_contexts)
        return t

    def with_overheads(self, overheads: Overheads) -> StepCosts:
        """The same fit with other overheads."""
        return StepCosts(self.coefficients, self.max_num_batched_tokens, self.max_num_seqs, overheads,
                         self.source)

    def as_dict(self) -> dict:
        """JSON-ready."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> StepCosts:
        """Inverse of as_dict (a clear error for a file that is not a profile)."""
        try:
            return cls(coefficients=dict(data["coefficients"]),
                       max_num_batched_tokens=int(data.get("max_num_batched_tokens", 2048)),
                       max_num_seqs=int(data.get("max_num_seqs", 64)),
                       overheads=Overheads(**data.get("overheads", {})), source=dict(data.get("source", {})))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a step-cost profile: {exc}") from exc


def save_costs(costs: StepCosts, path: str | Path) -> Path:
    """Write the profile as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(costs.as_dict(), indent=2) + "\n", encoding="utf-8")
    return path


def load_costs(path: str | Path) -> StepCosts:
    """Read a profile written by save_costs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"step-cost profile {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from exc
    return StepCosts.from_dict(data)
