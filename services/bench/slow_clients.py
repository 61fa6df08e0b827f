"""Slow clients against the OpenAI front end: connections that drip their headers or their body
must be closed within the HTTP timeouts, and a normal request meanwhile must stay near its quiet
latency.

    python -m pdserve.bench.slow_clients                       # 250 slow-header + 250 slow-body connections
    python -m pdserve.bench.slow_clients --connections 100 --requests 10

A local cluster (1 prefill + 1 decode + the front end, tiny model, default HTTP timeouts: 15 s for
headers, 30 s for a body). First --requests greedy completions one after another (the quiet
latency), then the attack: half the connections send a request line and one header byte per
second, never ending the headers; the other half send whole headers with a 100,000-byte
Content-Length and then 10 bytes per second. While they drip, the same completions run again.
Reported: quiet and attacked median latency and their ratio, how many attack connections the
server closed and the latest close per kind. Exit 1 when a connection outlived its timeout by more
than --slack-s or the ratio is over --max-ratio. Prints one JSON line at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import urllib.request

from pdserve.cli.cluster import LocalCluster
from pdserve.openai.limits import HttpOptions

BODY_BYTES = 100_000


def _completion_seconds(address: str) -> float:
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}).encode()
    request = urllib.request.Request(f"http://{address}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as response:
        response.read()
    return time.perf_counter() - started


def _latencies(address: str, count: int) -> list[float]:
    return [_completion_seconds(address) for _ in range(count)]


async def _drip(address: str, kind: str, stop_at: float) -> float | None:
    """One slow connection; seconds until the server closed it (None: still open at stop_at)."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    started = time.monotonic()
    if kind == "header":
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        chunk = b"a"
    else:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % BODY_BYTES)
        chunk = b" " * 10

    async def closed() -> None:
        while await reader.read(65536):
            pass  # a 408 or the like may come first; the end of the stream is the close

    watch = asyncio.ensure_future(closed())
    try:
        while time.monotonic() < stop_at and not watch.done():
            try:
                writer.write(chunk)
                await writer.drain()
            except OSError:
                break
            await asyncio.wait({watch}, timeout=1.0)
        if not watch.done():
            await asyncio.wait({watch}, timeout=max(0.0, stop_at - time.monotonic()))
        return time.monotonic() - started if watch.done() else None
    finally:
        watch.cancel()
        writer.transport.abort()


async def _attack(address: str, connections: int, requests: int, stop_after_s: float):
    stop_at = time.monotonic() + stop_after_s
    kinds = ["header" if i % 2 == 0 else "body" for i in range(connections)]
    drips = [asyncio.ensure_future(_drip(address, kind, stop_at)) for kind in kinds]
    await asyncio.sleep(2.0)  # every connection open and dripping before the measured requests
    attacked = await asyncio.to_thread(_latencies, address, requests)
    closes = await asyncio.gather(*drips)
    return attacked, list(zip(kinds, closes))


def main(argv: list[str] | None = None) -> int:
    """CLI: quiet latency, then the attack on a fresh local cluster."""
    p = argparse.ArgumentParser(prog="python -m pdserve.bench.slow_clients", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=500, help="slow connections, half of each kind")
    p.add_argument("--requests", type=int, default=20, help="normal completions per phase")
    p.add_argument("--slack-s", type=float, default=5.0, help="allowed lateness of a close past its timeout")
    p.add_argument("--max-ratio", type=float, default=1.5)
    p.add_argument("--model", default=None, help="checkpoint (default: a fresh tiny model)")
    args = p.parse_args(argv)
    from pdserve.models.tiny_model import make_tiny_model

    options = HttpOptions()
    limits = {"header": options.keepalive_timeout_s, "body": options.body_read_timeout_s}
    model_dir = args.model or str(make_tiny_model(tempfile.mkdtemp(prefix="pdserve-slow-") + "/tiny", seed=0))
    with LocalCluster(model_dir, prefill=1, decode=1, openai=True) as cluster:
        _latencies(cluster.openai_address, 3)  # warm up
        quiet = _latencies(cluster.openai_address, args.requests)
        attacked, closes = asyncio.run(_attack(cluster.openai_address, args.connections, args.requests,
                                               max(limits.values()) + 2 * args.slack_s))
    ratio = statistics.median(attacked) / statistics.median(quiet)
    late = {kind: max((s if s is not None else float("inf")) for k, s in closes if k == kind) for kind in limits}
    open_left = sum(1 for _, s in closes if s is None)
    ok = open_left == 0 and all(late[k] <= limits[k] + args.slack_s for k in limits) and ratio <= args.max_ratio
    summary = {"connections": args.connections, "quiet_median_ms": round(statistics.median(quiet) * 1000, 1),
               "attacked_median_ms": round(statistics.median(attacked) * 1000, 1), "ratio": round(ratio, 2),
               "latest_close_s": {k: round(v, 1) for k, v in late.items()}, "timeouts_s": limits,
               "still_open": open_left, "ok": ok}
    print(f"{args.connections} slow connections: normal completion median {summary['quiet_median_ms']} ms quiet, "
          f"{summary['attacked_median_ms']} ms under attack (x{ratio:.2f}); latest close {summary['latest_close_s']} "
          f"for timeouts {limits}; {open_left} still open")
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
