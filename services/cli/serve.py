"""`pdserve serve router|prefill|decode|colocated|openai`: run one server process. The flags (and
their PDSERVE_* variables) become the role's typed settings (pdserve.settings) here, once."""

from __future__ import annotations

import argparse
import dataclasses

from pdserve.cli.flags import (
    add_engine_flags,
    add_flag,
    add_server_security_flags,
    add_telemetry_flags,
    client_security_from,
    engine_args_from,
    telemetry_from,
    tls_from,
)

ROLES = ("router", "prefill", "decode", "colocated", "openai")
ROLE_ALIASES = {"worker": "colocated"}  # the colocated role's first name, still accepted
OPENAI_DEFAULT_PORT = 8000


def register(sub: argparse._SubParsersAction) -> None:
    """Add `serve ROLE` with the flags every role takes (each reads PDSERVE_<FLAG> too)."""
    p = sub.add_parser("serve", help="run one pdserve server: router, prefill, decode, colocated "
                                     "or openai (the OpenAI-compatible HTTP API)")
    p.add_argument("role", choices=(*ROLES, *ROLE_ALIASES), help="the server to run ('worker' is 'colocated')")
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
    add_flag(p, "--kv-transfer", "auto", str, "prefill/decode: how KV bytes move: tcp, nixl (NIXL READs over UCX; "
                                              "fails where NIXL or the peer lacks it) or auto (nixl when it "
                                              "loads and the peer takes it, else tcp)",
             choices=("auto", "tcp", "nixl"))
    add_flag(p, "--lease-ms", 30000, int, "router: how long a decode reservation waits for its KV")
    add_flag(p, "--max-attempts", 5, int, "router: tries of one request on the workers (a worker that fails "
                                         "mid-stream: the rest goes on elsewhere) before it fails UNAVAILABLE")
    add_flag(p, "--stream-idle-timeout-s", 60.0, float, "router: a worker stream silent this long counts "
                                                         "as failed (the request goes on elsewhere)")
    add_flag(p, "--rpc-timeout-s", 60.0, float, "router: deadline of a Reserve call; a Prefill call waiting this "
                                                "long probes its server, and fails only if the probe does")
    add_flag(p, "--stream-keepalive-s", 5.0, float, "decode, colocated: a request stream with nothing to send "
                                                    "(waiting for a batch slot) sends an empty output this often, "
                                                    "so the router does not take it for a hung worker")
    add_flag(p, "--max-inflight-requests", 256, int, "router: Generate calls served at once; beyond it a "
                                                     "call gets RESOURCE_EXHAUSTED at once, with a retry hint")
    add_flag(p, "--routing", "kv", str, "router: kv chooses the prefill server whose prefix cache holds most of "
                                        "the prompt (as its workers publish it), weighed against its queue; "
                                        "load: by queued prompt tokens alone", choices=("kv", "load"))
    add_flag(p, "--prefill-queue-weight", 0.5, float, "router, --routing kv: a prompt token queued on a prefill "
                                                      "server counts as this many tokens to compute")
    add_flag(p, "--decode-running-weight", 256.0, float, "router, --routing kv: a sequence running on a decode "
                                                         "server counts as this many prompt tokens of KV to transfer")
    add_flag(p, "--max-queued-requests", 256, int, "workers: requests waiting at once (prefill: Prefill calls "
                                                   "not yet answered; decode: reservations + requests waiting for "
                                                   "a batch slot; colocated: the engine's waiting queue); beyond "
                                                   "it RESOURCE_EXHAUSTED at once, with a retry hint")
    add_flag(p, "--overload-retry-after-ms", 1000, int, "the retry hint (trailing metadata retry-after-ms) "
                                                        "sent with RESOURCE_EXHAUSTED")
    add_flag(p, "--model-name", None, str, "router: the name GetModelInfo reports (default: --model); "
                                           "openai: the name clients use (default: the router's)")
    p.add_argument("--served-model-name", dest="model_name", help="the same as --model-name (vLLM's spelling)")
    add_flag(p, "--router", "127.0.0.1:50051", str, "openai: the router's host:port")
    add_flag(p, "--api-key", None, str, "router: API keys gRPC clients must send as metadata 'authorization: "
                                        "Bearer KEY' (health and reflection stay open); openai: keys HTTP clients "
                                        "must send as 'Authorization: Bearer KEY'; comma-separated (default: "
                                        "none, the API is open; the openai server's key for the router is "
                                        "--router-api-key)")
    add_flag(p, "--router-wait-s", 120.0, float, "openai: how long to wait for the router at start")
    _add_http_flags(p)
    add_server_security_flags(p)  # --tls-cert/--tls-key/--tls-ca..., --kv-auth-token, --router-api-key, --redis-ca
    add_engine_flags(p)
    add_telemetry_flags(p)  # --otlp-endpoint, --metrics-port, --log-json, --drain-timeout-s, ...
    p.set_defaults(run=run)


# openai: (flag, HttpOptions field, type, help); unset flags keep pdserve.openai.limits' defaults.
HTTP_FLAGS = (
    ("--http-max-body-mb", "max_body_bytes", float, "largest request body in MiB (default 8); over it 413"),
    ("--http-body-timeout-s", "body_read_timeout_s", float, "a request body must arrive within this "
                                                            "(default 30); else 408 and the connection closes"),
    ("--http-keepalive-timeout-s", "keepalive_timeout_s", float, "idle keep-alive connections, and requests "
                                                                 "whose headers are still arriving, close "
                                                                 "after this (default 15)"),
    ("--http-stream-write-timeout-s", "stream_write_timeout_s", float, "a streaming client that reads nothing "
                                                                       "this long is dropped and its request "
                                                                       "cancelled (default 30)"),
    ("--http-linger-s", "linger_s", float, "after an early answer (413, 408), unread body bytes are drained "
                                           "this long, then the connection closes (default 2)"),
    ("--http-max-connections", "max_connections", int, "open connections; a request on one beyond it gets 503 "
                                                       "with Retry-After (default 512)"),
)
CHAT_FLAGS = (
    ("--chat-prepare-threads", "prepare_threads", int, "threads that render and tokenize chat prompts, off the "
                                                       "event loop (default 2)"),
    ("--chat-max-preparing", "max_preparing", int, "chat prompts being prepared or waiting for a thread; beyond "
                                                   "it 503 with Retry-After (default 16)"),
    ("--tool-call-parser", "tool_call_parser", str, "the format the model writes tool calls in: hermes, "
                                                    "llama3_json or mistral (default: the chat template's)"),
)


def _add_http_flags(p: argparse.ArgumentParser) -> None:
    for flag, _, kind, text in (*HTTP_FLAGS, *CHAT_FLAGS):
        add_flag(p, flag, None, kind, "openai: " + text)


def _given(ns: argparse.Namespace, flags) -> dict:
    """{field: value} of the flags set on the command line or in the environment."""
    given = {}
    for flag, name, _, _ in flags:
        value = getattr(ns, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            given[name] = int(value * 2**20) if flag == "--http-max-body-mb" else value
    return given


def run(ns: argparse.Namespace) -> int:
    """Start the chosen server and serve until SIGTERM/SIGINT."""
    settings = settings_from(ns)
    role = ROLE_ALIASES.get(ns.role, ns.role)
    if role == "openai":
        from pdserve.openai.server import run_openai

        return run_openai(settings)
    if role == "router":
        from pdserve.router.server import run_router

        return run_router(settings)
    from pdserve.workers.runtime import run_worker

    return run_worker(settings)


def settings_from(ns: argparse.Namespace):
    """The role's settings object (pdserve.settings) from the `serve` flags, validated."""
    from pdserve import settings as s
    from pdserve.runtime.api_keys import parse_api_keys

    role = ROLE_ALIASES.get(ns.role, ns.role)
    if not ns.model:
        raise ValueError("--model (a checkpoint directory, .gguf file or Hub id; or PDSERVE_MODEL) is required")
    port = ns.port if ns.port is not None else (OPENAI_DEFAULT_PORT if role == "openai" else 0)
    server = s.ServerSettings(host=ns.host, port=port, advertise_host=ns.advertise_host, tls=tls_from(ns),
                              telemetry=telemetry_from(ns), drain_timeout_s=ns.drain_timeout_s)
    if role == "openai":
        from pdserve.openai.frontend import FrontendConfig

        if not ns.router:
            raise ValueError("--router HOST:PORT (or PDSERVE_ROUTER) is required")
        from pdserve.openai.limits import HttpOptions

        frontend = FrontendConfig(router=ns.router, model_dir=ns.model, model_name=ns.model_name,
                                  api_keys=parse_api_keys(ns.api_key), router_wait_s=ns.router_wait_s,
                                  router_security=client_security_from(ns, api_key_flag="router_api_key"),
                                  **_given(ns, CHAT_FLAGS))
        return s.OpenAISettings(server=server, frontend=frontend, http=HttpOptions(**_given(ns, HTTP_FLAGS)))
    redis = s.RedisSettings(url=ns.redis_url, prefix=ns.redis_prefix, ca_file=ns.redis_ca)
    if role == "router":
        return s.RouterSettings(server=server, redis=redis, model=ns.model, model_name=ns.model_name,
                                block_size=ns.block_size, max_model_len=ns.max_model_len,
                                redis_wait_s=ns.redis_wait_s, lease_ms=ns.lease_ms, max_attempts=ns.max_attempts,
                                stream_idle_timeout_s=ns.stream_idle_timeout_s, rpc_timeout_s=ns.rpc_timeout_s,
                                max_inflight_requests=ns.max_inflight_requests,
                                overload_retry_after_ms=ns.overload_retry_after_ms,
                                api_keys=parse_api_keys(ns.api_key), routing=ns.routing,
                                routing_weights=s.RoutingWeights(prefill_queue_weight=ns.prefill_queue_weight,
                                                                 decode_running_weight=ns.decode_running_weight))
    worker = dict(server=server, redis=redis, engine=engine_args_from(ns), worker_id=ns.worker_id,
                  heartbeat_s=ns.heartbeat_s, max_queued_requests=ns.max_queued_requests,
                  overload_retry_after_ms=ns.overload_retry_after_ms, stream_keepalive_s=ns.stream_keepalive_s)
    if role == "prefill":
        # A prefill server computes each prompt's first token only: speculation (and a draft model to load) is the
        # decode servers' (a cluster given PDSERVE_SPECULATIVE / PDSERVE_DRAFT_MODEL sets them for every role).
        worker["engine"] = dataclasses.replace(worker["engine"], speculative="none", draft_model=None)
        return s.PrefillSettings(**worker, kv_connect_timeout_s=ns.kv_connect_timeout_s,
                                 kv_auth_token=ns.kv_auth_token or None, kv_transfer=ns.kv_transfer)
    if role == "decode":
        return s.DecodeSettings(**worker, kv_port=ns.kv_port, kv_auth_token=ns.kv_auth_token or None,
                                kv_transfer=ns.kv_transfer)
    return s.ColocatedSettings(**worker)
