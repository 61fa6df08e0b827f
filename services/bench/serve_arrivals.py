"""When the serving benchmark sends each request: Poisson or gamma (bursty) arrivals at a mean rate,
as `vllm bench serve` draws them."""

from __future__ import annotations

import math
import random


def arrival_offsets(num_requests: int, request_rate: float, burstiness: float = 1.0,
                    seed: int = 0) -> list[float]:
    """Seconds from the start at which each request is sent (the first at 0).

    Gaps are gamma-distributed with shape `burstiness` and mean 1 / request_rate: burstiness 1 is a
    Poisson process; below 1 the arrivals come in bursts, above 1 they are more even. An infinite
    rate sends everything at once (all offsets 0).
    """
    if num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests}")
    if not request_rate > 0:
        raise ValueError(f"request rate must be > 0 (or inf), got {request_rate}")
    if not burstiness > 0 or math.isinf(burstiness):
        raise ValueError(f"burstiness must be a finite number > 0, got {burstiness}")
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = random.Random(seed)
    scale = 1.0 / (request_rate * burstiness)
    offsets, now = [], 0.0
    for i in range(num_requests):
        if i:
            now += rng.gammavariate(burstiness, scale)
        offsets.append(now)
    return offsets
