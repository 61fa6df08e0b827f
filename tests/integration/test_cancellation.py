"""Clients that leave at random moments (before, during and after prefill; multi-prompt HTTP
requests, each prompt its own router request): within 2 s of a wave's last disconnect the front
end, the router, the prefill and the decode server hold nothing. The 1,000-request run with a
~100M model is `python -m pdserve.bench.cancel_storm --size base`."""

from __future__ import annotations

import asyncio
from argparse import Namespace

from pdserve.bench.cancel_storm import storm
from pdserve.cli.cluster import LocalCluster
from pdserve.models.tiny_model import make_tiny_model

LIMIT_S = 2.0


def test_every_block_is_free_soon_after_random_disconnects(tmp_path):
    model_dir = str(make_tiny_model(tmp_path / "tiny", arch="llama", seed=0))
    args = Namespace(requests=48, wave=16, max_delay_s=0.6, limit_s=LIMIT_S, seed=5)
    with LocalCluster(model_dir, prefill=1, decode=1, openai=True, extra_args=["--kv-cache-mb", "64"]) as cluster:
        summary = asyncio.run(storm(cluster, args))
    assert summary["requests"] == 48 and summary["over_limit"] == 0, summary
