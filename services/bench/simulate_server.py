"""One simulated server: the engine's iteration-level scheduler (running decodes first, then
waiting prompts in arrival order, chunked under the token budget) for the prefill, decode and
colocated roles, with step times from a StepCosts model. KV capacity is not modelled (the
servers are assumed to have blocks for every admitted request)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pdserve.bench.simulate_costs import StepCosts, StepShape

ROLES = ("prefill", "decode", "colocated")


@dataclass(eq=False)
class SimRequest:
    """A request moving through the simulated deployment (times in seconds)."""

    index: int
    arrival: float
    prompt_len: int
    output_len: int
    computed: int = 0  # prompt tokens computed so far
    token_times: list[float] = field(default_factory=list)

    @property
    def generated(self) -> int:
        """Output tokens produced so far."""
        return len(self.token_times)

    @property
    def done(self) -> bool:
        """All output tokens produced."""
        return self.generated >= self.output_len


@dataclass
class PlannedStep:
    """A step being computed: its shape, the requests whose prompt chunk it computes (with the
    chunk size), and the decoding requests it gives a token."""

    shape: StepShape
    prompt_work: list[tuple[SimRequest, int]]
    decoding: list[SimRequest]


class SimServer:
    """A prefill, decode or colocated server: queues, the step it is computing, and its load."""

    def __init__(self, name: str, role: str, costs: StepCosts):
        if role not in ROLES:
            raise ValueError(f"server role must be one of {ROLES}, got {role!r}")
        self.name, self.role, self.costs = name, role, costs
        self.waiting: deque[SimRequest] = deque()  # prompts to compute (prefill, colocated)
        self.running: list[SimRequest] = []  # requests producing tokens (decode, colocated)
        self.step: PlannedStep | None = None
        self.assigned = 0  # requests routed here and not yet gone (the router's in-flight count)

    @property
    def busy(self) -> bool:
        """A step is being computed."""
        return self.step is not None

    @property
    def queued_prompt_tokens(self) -> int:
        """Prompt tokens still to compute here."""
        return sum(r.prompt_len - r.computed for r in self.waiting)

    def plan_step(self) -> PlannedStep | None:
        """The next step under the scheduler's policy, or None when there is nothing to do."""
        budget = self.costs.max_num_batched_tokens
        seats = self.costs.max_num_seqs
        decoding = self.running[:seats] if self.role != "prefill" else []
        budget -= len(decoding)
        seats -= len(decoding)
        prompt_work = []
        for request in self.waiting:
            if budget <= 0 or seats <= 0:
                break
            n = min(request.prompt_len - request.computed, budget)
            prompt_work.append((request, n))
            budget -= n
            seats -= 1
        if not decoding and not prompt_work:
            return None
        shape = StepShape(tuple((n, r.computed) for r, n in prompt_work),
                          tuple(r.prompt_len + r.generated for r in decoding))
        return PlannedStep(shape, prompt_work, decoding)

    def start_step(self) -> float | None:
        """Plan and begin the next step; returns its duration (None when idle)."""
        self.step = self.plan_step()
        return None if self.step is None else self.costs.step_time(self.step.shape)

    def finish_step(self, now: float) -> tuple[list[SimRequest], list[SimRequest]]:
        """Apply the step's effects at time `now`: returns (prompts finished here, requests done).

        A finished prompt gets its first token now; on a colocated server it then decodes here,
        on a prefill server it leaves (the caller hands it to a decode server).
        """
        step, self.step = self.step, None
        prefilled, done = [], []
        for request, n in step.prompt_work:
            request.computed += n
            if request.computed >= request.prompt_len:
                self.waiting.remove(request)
                request.token_times.append(now)
                prefilled.append(request)
        for request in step.decoding:
            request.token_times.append(now)
        for request in step.decoding + [r for r in prefilled if self.role == "colocated"]:
            if request.done:
                if request in self.running:
                    self.running.remove(request)
                done.append(request)
            elif request not in self.running:
                self.running.append(request)
        return prefilled, done
