"""`pdserve serve router|prefill|decode|worker|openai`: run one server process."""

from __future__ import annotations

import argparse

from pdserve.cli.env import add_flag
from pdserve.engine.setup import add_engine_flags
from pdserve.runtime.security import add_server_security_flags
from pdserve.telemetry.flags import add_telemetry_flags

ROLES = ("router", "prefill", "decode", "worker", "openai")
OPENAI_DEFAULT_PORT = 8000


def register(sub: argparse._SubParsersAction) -> None:
    """Add `serve ROLE` with the flags every role takes (each reads PDSERVE_<FLAG> too)."""
    p = sub.add_parser("serve", help="run one pdserve server: router, prefill, decode, worker (colocated) "
                                     "or openai (the OpenAI-compatible HTTP API)")
    p.add_argument("role", choices=ROLES)
    add_flag(p, "--host", "127.0.0.1", str, "address to listen on")
    add_flag(p, "--port", None, int, "port (0: any free port; default 0, openai 8000; the router's in `up` is 50051)")
    add_flag(p, "--advertise-host", None, str, "host other services use to reach this one (default: --host)")
    add_flag(p, "--redis-url", "redis://127.0.0.1:6379/0", str, "Redis holding request state and the registry")
    add_flag(p, "--redis-prefix", "pdserve", str, "key prefix in Redis")
    add_flag(p, "--redis-wait-s", 5.0, float, "router: how long a new request waits for an unreachable Redis "
                                              "before it fails with UNAVAILABLE")
    add_flag(p, "--worker-id", None, str, "worker id in the registry (default: role + random suffix)")
    add_flag(p, "--heartbeat-s", 1.0, float, "worker heartbeat interval; a worker silent for 3 beats is dropped")
    add_flag(p, "--kv-port", 0, int, "decode: KV transfer port (0: any free port)")
    add_flag(p, "--kv-connect-timeout-s", 10.0, float, "prefill: how long a decode server's KV receiver may take "
                                                      "to accept and answer the handshake (then UNAVAILABLE)")
    add_flag(p, "--lease-ms", 30000, int, "router: how long a decode reservation waits for its KV")
    add_flag(p, "--max-attempts", 5, int, "router: tries of one request on the workers (a worker that fails "
                                         "mid-stream: the rest goes on elsewhere) before it fails UNAVAILABLE")
    add_flag(p, "--stream-idle-timeout-s", 60.0, float, "router: a worker stream silent this long counts "
                                                         "as failed (the request goes on elsewhere)")
    add_flag(p, "--max-inflight-requests", 256, int, "router: Generate calls served at once; beyond it a "
                                                     "call gets RESOURCE_EXHAUSTED at once, with a retry hint")
    add_flag(p, "--max-queued-requests", 256, int, "workers: requests waiting at once (prefill: Prefill calls "
                                                   "not yet answered; decode: reservations + requests waiting for "
                                                   "a batch slot; colocated: the engine's waiting queue); beyond "
                                                   "it RESOURCE_EXHAUSTED at once, with a retry hint")
    add_flag(p, "--overload-retry-after-ms", 1000, int, "the retry hint (trailing metadata retry-after-ms) "
                                                        "sent with RESOURCE_EXHAUSTED")
    add_flag(p, "--model-name", None, str, "router: the name GetModelInfo reports (default: --model); "
                                           "openai: the name clients use (default: the router's)")
    add_flag(p, "--router", "127.0.0.1:50051", str, "openai: the router's host:port")
    add_flag(p, "--api-key", None, str, "router: API keys gRPC clients must send as metadata 'authorization: "
                                        "Bearer KEY' (health and reflection stay open); openai: keys HTTP clients "
                                        "must send as 'Authorization: Bearer KEY'; comma-separated (default: "
                                        "none, the API is open; the openai server's key for the router is "
                                        "--router-api-key)")
    add_flag(p, "--router-wait-s", 120.0, float, "openai: how long to wait for the router at start")
    add_server_security_flags(p)  # --tls-cert/--tls-key/--tls-ca..., --kv-auth-token, --router-api-key, --redis-ca
    add_engine_flags(p)
    add_telemetry_flags(p)  # --otlp-endpoint, --metrics-port, --log-json, --drain-timeout-s, ...
    p.set_defaults(run=run)


def run(ns: argparse.Namespace) -> int:
    """Start the chosen server and serve until SIGTERM/SIGINT."""
    from pdserve.runtime.server import run_server

    if not ns.model:
        raise ValueError("--model DIR (or PDSERVE_MODEL) is required")
    if ns.port is None:
        ns.port = OPENAI_DEFAULT_PORT if ns.role == "openai" else 0
    if ns.role == "openai":
        from pdserve.openai.server import serve_openai

        return run_server(lambda: serve_openai(ns))
    if ns.role == "router":
        from pdserve.router.server import serve_router

        return run_server(lambda: serve_router(ns))
    return run_server(lambda: _serve_worker(ns))


async def _serve_worker(ns: argparse.Namespace) -> None:
    from pdserve.workers.runtime import WorkerContext, serve_worker

    ctx = WorkerContext(ns, ns.role)
    if ns.role == "worker":
        from pdserve.workers import colocated as role_module
    elif ns.role == "prefill":
        from pdserve.workers import prefill as role_module
    else:
        from pdserve.workers import decode as role_module
    register, names = await role_module.setup(ctx, ns)
    await serve_worker(ns, ctx, register, names)
