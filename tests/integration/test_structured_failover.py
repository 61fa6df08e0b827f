"""A decode server SIGKILLed while it decodes constrained requests: the router resumes them on the other one,
which re-enters each grammar at the tokens already sent, so every stream ends exactly as in a fault-free run."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest

from pdserve.bench.chaos import ProgressWatch, stream_one, wait_all_blocks_free
from pdserve.cli.cluster import LocalCluster
from pdserve.models.tiny_model import make_tiny_model
from pdserve.v1 import router_pb2, router_pb2_grpc

SCHEMA = {
    "type": "object",
    "properties": {"items": {"type": "array", "minItems": 6, "maxItems": 6, "items": {
        "type": "object", "properties": {"name": {"type": "string", "minLength": 3, "maxLength": 6},
                                         "size": {"enum": ["small", "medium", "large"]}},
        "required": ["name", "size"], "additionalProperties": False}}},
    "required": ["items"],
    "additionalProperties": False,
}
REQUESTS = 24


def _request(i: int) -> router_pb2.GenerateRequest:
    return router_pb2.GenerateRequest(prompt=f"Inventory {i}:", sampling=router_pb2.SamplingParams(
        max_tokens=400, temperature=1.0, seed=100 + i,
        structured_output=router_pb2.StructuredOutput(json_schema=json.dumps(SCHEMA))))


async def _streams(cluster: LocalCluster, kill=None):
    watch = ProgressWatch()
    async with cluster.aio_channel(cluster.router_address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        streams = asyncio.gather(*(stream_one(stub, _request(i), watch) for i in range(REQUESTS)))
        if kill is not None:
            await watch.reached("tokens", REQUESTS * 20)
            kill()
        return await streams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("structured-failover") / "tiny", arch="llama", seed=0,
                               train_steps=100))


def test_constrained_streams_survive_a_decode_server_kill(model_dir):
    with LocalCluster(model_dir, prefill=1, decode=2) as cluster:
        calm = asyncio.run(_streams(cluster))
        assert all(r.error is None and r.finish == "stop" for r in calm), calm
        for result in calm:
            jsonschema.validate(json.loads(result.text), SCHEMA)
        victim = cluster.servers("decode")[0]
        stormy = asyncio.run(_streams(cluster, lambda: cluster.kill(victim)))
        assert [r.error for r in stormy if r.error] == []
        assert [r.text for r in stormy] == [r.text for r in calm]
        assert "retrying" in cluster.servers("router")[0].log_path.read_text()
        loads = asyncio.run(wait_all_blocks_free(cluster))
        assert all(load.num_blocks_free == load.num_blocks_total for load in loads.values()), loads
