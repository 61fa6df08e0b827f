"""Helpers for the observability and deployment tests: generate through a router, scrape a
server's /metrics, wait for a condition."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from pdserve.runtime.channels import CHANNEL_OPTIONS, PLAINTEXT, ClientSecurity
from pdserve.telemetry.scrape import scrape_metrics
from pdserve.v1 import router_pb2, router_pb2_grpc


@dataclass
class Generated:
    """One Generate call's outcome: tokens of sample 0, completions, and the error if it failed."""

    request_id: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    error: str | None = None


def request_for(prompt_ids: list[int], max_tokens: int, request_id: str = "", **sampling) -> router_pb2.GenerateRequest:
    """A GenerateRequest for token ids (ignore_eos, so exactly max_tokens come back)."""
    return router_pb2.GenerateRequest(
        request_id=request_id, prompt_token_ids=router_pb2.TokenIds(ids=prompt_ids),
        sampling=router_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sampling))


async def generate(stub: router_pb2_grpc.RouterStub, request: router_pb2.GenerateRequest,
                   metadata=None, on_chunk: Callable[[int], None] | None = None) -> Generated:
    """Stream one request; on_chunk(tokens so far) after every chunk. Errors are recorded."""
    out = Generated(request.request_id)
    try:
        async for response in stub.Generate(request, metadata=metadata, timeout=120):
            out.request_id = response.request_id
            if response.HasField("chunk"):
                out.token_ids += list(response.chunk.token_ids)
                if on_chunk is not None:
                    on_chunk(len(out.token_ids))
            else:
                out.finish_reasons.append(response.complete.finish_reason)
    except grpc.aio.AioRpcError as exc:
        out.error = f"{exc.code().name}: {exc.details()}"
    return out


def generate_all(address: str, requests: list[router_pb2.GenerateRequest], metadata=None,
                 security: ClientSecurity = PLAINTEXT) -> list[Generated]:
    """Run the requests concurrently through the router at address (dialled with `security`:
    a LocalCluster's client_security() when it is secured)."""
    async def run():
        async with security.aio_channel(address, CHANNEL_OPTIONS) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            return await asyncio.gather(*(generate(stub, r, metadata) for r in requests))

    return asyncio.run(run())


def scrape(address: str) -> dict[str, float]:
    """Every sample at http://address/metrics, keyed "name{label=value,...}" (labels sorted)."""
    return scrape_metrics(address)


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.05) -> None:
    """Poll condition() until it holds; AssertionError naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(poll_s)


def serve_env_names() -> set[str]:
    """PDSERVE_* names of every `pdserve serve` flag."""
    from pdserve.cli import build_parser

    parser = build_parser()
    serve = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith(" serve"))
    return {"PDSERVE_" + opt.lstrip("-").replace("-", "_").upper()
            for action in serve._actions for opt in action.option_strings if opt.startswith("--")}
