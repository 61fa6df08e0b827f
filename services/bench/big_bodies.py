"""Huge requests against the OpenAI front end: each must be refused with a 4xx at once, /health
must stay fast while they arrive, and no process may grow.

    python -m pdserve.bench.big_bodies                 # 5 x 30 MB chat messages, then 5 x 12M stop_token_ids

A local cluster (1 prefill + 1 decode + the front end, tiny model). In each round --at-once
clients upload the body back to back for --seconds, as a client would (Content-Length, whole
body without waiting), while /health is called in a loop. Reported per round: the slowest time
from a request's first byte to its 4xx status line, /health p99 and max during the round, and the
largest growth of any cluster process's resident memory (VmRSS) from before the round to its end.
Exit 1 when a body is not refused with a 4xx within --max-refusal-ms, /health p99 is over
--max-health-p99-ms, or a process grew more than --max-growth-mb. Prints one JSON line at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pdserve.cli.cluster import LocalCluster


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _post(address: str, body: bytes) -> tuple[int, float]:
    """Upload `body` as a client does (headers, then the body at once, without waiting) and
    return (status, seconds from the first byte sent to the status line's arrival)."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        started = time.perf_counter()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        sender = threading.Thread(target=_send_quietly, args=(sock, body), daemon=True)
        sender.start()
        head = sock.recv(65536)
        took = time.perf_counter() - started
        sock.shutdown(socket.SHUT_RDWR)
        sender.join()
    return int(head.split(b" ", 2)[1]), took


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass  # the server refused and closed: the rest of the body is not wanted


def _health_ms(address: str) -> float:
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    started = time.perf_counter()
    connection.request("GET", "/health")
    connection.getresponse().read()
    connection.close()
    return (time.perf_counter() - started) * 1000


def _round(cluster: LocalCluster, body: bytes, at_once: int, seconds: float) -> dict:
    """`at_once` clients upload `body` back to back for `seconds` while /health is polled."""
    pids = [p.process.pid for p in cluster.processes]
    before = {pid: _rss_mb(pid) for pid in pids}
    address = cluster.openai_address
    stop_at = time.monotonic() + seconds

    def uploader() -> list[tuple[int, float]]:
        results = [_post(address, body)]
        while time.monotonic() < stop_at:
            results.append(_post(address, body))
        return results

    with ThreadPoolExecutor(at_once) as pool:
        uploads = [pool.submit(uploader) for _ in range(at_once)]
        health = [_health_ms(address)]
        while not all(u.done() for u in uploads):
            health.append(_health_ms(address))
        results = [r for u in uploads for r in u.result()]
    ordered = sorted(health)
    return {"uploads": len(results), "statuses": sorted({status for status, _ in results}),
            "slowest_refusal_ms": round(max(s for _, s in results) * 1000, 1),
            "health_calls": len(health), "health_p99_ms": round(ordered[max(0, int(0.99 * len(ordered)) - 1)], 1),
            "health_max_ms": round(ordered[-1], 1),
            "max_growth_mb": round(max(_rss_mb(pid) - before[pid] for pid in pids), 1)}


def main(argv: list[str] | None = None) -> int:
    """CLI: the two rounds on a fresh local cluster."""
    p = argparse.ArgumentParser(prog="python -m pdserve.bench.big_bodies", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--at-once", type=int, default=5, help="clients uploading at once")
    p.add_argument("--seconds", type=float, default=10.0, help="each round's length")
    p.add_argument("--max-refusal-ms", type=float, default=200.0)
    p.add_argument("--max-health-p99-ms", type=float, default=100.0)
    p.add_argument("--max-growth-mb", type=float, default=50.0)
    p.add_argument("--model", default=None, help="checkpoint (default: a fresh tiny model)")
    args = p.parse_args(argv)
    from pdserve.models.tiny_model import make_tiny_model

    model_dir = args.model or str(make_tiny_model(tempfile.mkdtemp(prefix="pdserve-big-") + "/tiny", seed=0))
    chat = json.dumps({"model": "any", "messages": [{"role": "user", "content": "x" * 30_000_000}]}).encode()
    stops = json.dumps({"model": "any", "messages": [{"role": "user", "content": "hi"}],
                        "stop_token_ids": [7] * 12_000_000}).encode()
    with LocalCluster(model_dir, prefill=1, decode=1, openai=True) as cluster:
        _health_ms(cluster.openai_address)
        rounds = {"chat_30mb": _round(cluster, chat, args.at_once, args.seconds),
                  "stop_token_ids_12m": _round(cluster, stops, args.at_once, args.seconds)}
    ok = all(all(400 <= s < 500 for s in r["statuses"]) and r["slowest_refusal_ms"] <= args.max_refusal_ms
             and r["health_p99_ms"] <= args.max_health_p99_ms and r["max_growth_mb"] <= args.max_growth_mb
             for r in rounds.values())
    for name, r in rounds.items():
        print(f"{name}, {args.at_once} clients for {args.seconds:g} s: {r['uploads']} uploads, "
              f"statuses {r['statuses']}, slowest refusal {r['slowest_refusal_ms']} ms, "
              f"/health p99 {r['health_p99_ms']} ms (max {r['health_max_ms']}, {r['health_calls']} calls), "
              f"largest process growth {r['max_growth_mb']} MB")
    print(json.dumps({**rounds, "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
