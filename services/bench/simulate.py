"""A discrete-event model of a pdserve deployment: N prefill + M decode servers (or K colocated
workers) behind the router's load-aware choice, each stepping its engine with step times from a
fitted StepCosts model. It turns a workload and arrival times into the same RequestRecords the
real benchmark measures, so TTFT/TPOT/ITL and goodput come out of the same code."""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

from pdserve.bench.serve_metrics import RequestRecord
from pdserve.bench.simulate_costs import StepCosts
from pdserve.bench.simulate_server import SimRequest, SimServer


@dataclass(frozen=True)
class Deployment:
    """Server counts: prefill + decode (disaggregated) or colocated workers, not both."""

    prefill: int = 1
    decode: int = 1
    colocated: int = 0

    def __post_init__(self) -> None:
        counts = (self.prefill, self.decode, self.colocated)
        if min(counts) < 0:
            raise ValueError(f"server counts must be >= 0, got {counts}")
        disaggregated = self.prefill > 0 and self.decode > 0
        if disaggregated == (self.colocated > 0) or (not disaggregated and (self.prefill or self.decode)):
            raise ValueError(f"a deployment is prefill >= 1 and decode >= 1, or colocated >= 1 alone; "
                             f"got prefill={self.prefill} decode={self.decode} colocated={self.colocated}")

    @property
    def label(self) -> str:
        """'1P+2D' or '2 colocated'."""
        return f"{self.colocated} colocated" if self.colocated else f"{self.prefill}P+{self.decode}D"


class Simulation:
    """One run of the model over a workload; run() returns a RequestRecord per request."""

    def __init__(self, deployment: Deployment, costs: StepCosts):
        self.costs = costs
        self.prefill = [SimServer(f"prefill-{i}", "prefill", costs) for i in range(deployment.prefill)]
        self.decode = [SimServer(f"decode-{i}", "decode", costs) for i in range(deployment.decode)]
        self.colocated = [SimServer(f"worker-{i}", "colocated", costs) for i in range(deployment.colocated)]
        self.events: list = []
        self.sequence = itertools.count()  # ties broken in the order events were made
        self.decode_of: dict[int, SimServer] = {}
        self.pending_prompt_tokens: dict[str, int] = {}  # prefill server -> routed, not yet prefilled

    def _at(self, time: float, handler, *args) -> None:
        heapq.heappush(self.events, (time, next(self.sequence), handler, args))

    def run(self, lengths: list[tuple[int, int]], offsets: list[float]) -> list[RequestRecord]:
        """Simulate requests (prompt_len, output_len) arriving at offsets (seconds)."""
        if len(lengths) != len(offsets):
            raise ValueError(f"{len(offsets)} arrival offsets for {len(lengths)} requests")
        requests = [SimRequest(i, t, p, o) for i, ((p, o), t) in enumerate(zip(lengths, offsets))]
        for r in requests:
            self._at(r.arrival, self._arrive, r)
        while self.events:
            now, _, handler, args = heapq.heappop(self.events)
            handler(now, *args)
        return [_record(r) for r in requests]

    def _arrive(self, now: float, request: SimRequest) -> None:
        """The router picks the servers at once; the request reaches its first server after the
        request overhead."""
        if self.colocated:
            server = min(self.colocated, key=lambda s: s.assigned)
        else:
            server = min(self.prefill, key=lambda s: self.pending_prompt_tokens.get(s.name, 0))
            decode = min(self.decode, key=lambda s: s.assigned)
            decode.assigned += 1
            self.decode_of[request.index] = decode
            self.pending_prompt_tokens[server.name] = (self.pending_prompt_tokens.get(server.name, 0)
                                                       + request.prompt_len)
        server.assigned += 1
        self._at(now + self.costs.overheads.request_s, self._enqueue, request, server)

    def _enqueue(self, now: float, request: SimRequest, server: SimServer) -> None:
        server.waiting.append(request)
        self._kick(now, server)

    def _kick(self, now: float, server: SimServer) -> None:
        if not server.busy:
            duration = server.start_step()
            if duration is not None:
                self._at(now + duration, self._step_done, server)

    def _step_done(self, now: float, server: SimServer) -> None:
        prefilled, done = server.finish_step(now)
        for request in done:
            server.assigned -= 1
        if server.role == "prefill":
            for request in prefilled:
                server.assigned -= 1
                self.pending_prompt_tokens[server.name] -= request.prompt_len
                decode = self.decode_of.pop(request.index)
                if request.done:
                    decode.assigned -= 1
                else:
                    self._at(now + self.costs.overheads.handoff_s, self._admit, request, decode)
        self._kick(now, server)

    def _admit(self, now: float, request: SimRequest, server: SimServer) -> None:
        server.running.append(request)
        self._kick(now, server)


def _record(request: SimRequest) -> RequestRecord:
    times = request.token_times
    itl = [b - a for a, b in zip(times, times[1:])]
    return RequestRecord(request.prompt_len, request.output_len, send_time=request.arrival,
                         ttft=times[0] - request.arrival, itl=itl, e2e=times[-1] - request.arrival,
                         output_tokens=len(times), success=True)


def simulate(lengths: list[tuple[int, int]], offsets: list[float], deployment: Deployment,
             costs: StepCosts) -> list[RequestRecord]:
    """Records of the workload served by `deployment` under `costs` (see Simulation)."""
    return Simulation(deployment, costs).run(lengths, offsets)
