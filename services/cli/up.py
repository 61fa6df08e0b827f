"""`pdserve up`: a local cluster (embedded Redis, prefill, decode, router, OpenAI-compatible HTTP
server) until Ctrl-C/SIGTERM."""

from __future__ import annotations

import argparse
import signal
import threading

from pdserve.cli.flags import add_flag


def register(sub: argparse._SubParsersAction) -> None:
    """Add the up subcommand."""
    p = sub.add_parser("up", help="run a local cluster: Redis, prefill and decode servers, router")
    add_flag(p, "--model", None, str, "Hugging Face checkpoint directory, .gguf file, or Hub id ORG/NAME[@REVISION] "
             "(default: make the tiny model)")
    add_flag(p, "--served-model-name", None, str, "the model name the APIs report (default: the Hub id, else --model)")
    add_flag(p, "--prefill", 1, int, "prefill servers")
    add_flag(p, "--decode", 1, int, "decode servers")
    add_flag(p, "--colocated", 0, int, "colocated workers (instead of prefill/decode when --prefill 0 --decode 0)")
    add_flag(p, "--port", 50051, int, "router port")
    add_flag(p, "--redis-url", None, str, "external Redis (default: an embedded valkey server)")
    add_flag(p, "--threads-per-worker", 1, int, "torch threads in each worker process")
    add_flag(p, "--openai-port", 8000, int, "port of the OpenAI-compatible HTTP API (0: do not start it)")
    add_flag(p, "--api-key", None, str, "API keys the OpenAI API requires, comma-separated (default: open)")
    add_flag(p, "--kv-transfer", "auto", str, "how KV moves from prefill to decode servers: tcp, nixl or auto "
             "(nixl when NIXL loads, else tcp)", choices=("auto", "tcp", "nixl"))
    add_flag(p, "--tensor-parallel-size", 1, int, "rank processes each worker's model is split over (gloo on CPUs)")
    add_flag(p, "--prefill-tensor-parallel-size", None, int, "the prefill servers' (default: --tensor-parallel-size); "
             "prefill and decode sizes may differ: the KV transfer maps heads between them")
    add_flag(p, "--decode-tensor-parallel-size", None, int, "the decode servers' (default: --tensor-parallel-size)")
    p.set_defaults(run=run)


def _role_env(ns: argparse.Namespace) -> dict[str, dict[str, str]]:
    """Each worker role's tensor-parallel size, and the OpenAI API's keys (not on command lines)."""
    def size_of(role_size):
        return ns.tensor_parallel_size if role_size is None else role_size

    sizes = {"prefill": size_of(ns.prefill_tensor_parallel_size), "decode": size_of(ns.decode_tensor_parallel_size),
             "colocated": ns.tensor_parallel_size}
    for role, size in sizes.items():
        if size < 1:
            raise ValueError(f"the {role} servers' tensor-parallel size must be >= 1, got {size}")
    env = {role: {"PDSERVE_TENSOR_PARALLEL_SIZE": str(size)} for role, size in sizes.items()}
    if ns.api_key:  # the OpenAI API's keys only (the router's would be its --api-key)
        env["openai"] = {"PDSERVE_API_KEY": ns.api_key}
    return env


def start_cluster(ns: argparse.Namespace):
    """Start a LocalCluster from the up flags (making the tiny model if no --model)."""
    from pdserve.cli.cluster import LocalCluster
    from pdserve.cli.demo import default_model_dir, ensure_tiny_model

    if (ns.prefill == 0) != (ns.decode == 0):
        raise ValueError("--prefill and --decode must both be > 0 (disaggregated) or both 0 (colocated)")
    if ns.prefill == 0 and ns.colocated == 0:
        raise ValueError("no workers: give --prefill/--decode or --colocated")
    model = ns.model or str(ensure_tiny_model(default_model_dir()))
    if ns.openai_port < 0:
        raise ValueError(f"--openai-port must be a port number or 0 (off), got {ns.openai_port}")
    cluster = LocalCluster(model, prefill=ns.prefill, decode=ns.decode, colocated=ns.colocated,
                           router_port=ns.port, redis_url=ns.redis_url,
                           threads_per_worker=ns.threads_per_worker, openai=ns.openai_port > 0,
                           openai_port=ns.openai_port, served_model_name=ns.served_model_name,
                           env={"PDSERVE_KV_TRANSFER": ns.kv_transfer}, role_env=_role_env(ns))
    return cluster.start()


def run(ns: argparse.Namespace) -> int:
    """Start the cluster, print where the router is, and stop everything on a signal."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    cluster = start_cluster(ns)
    try:
        print(f"pdserve cluster up: router at {cluster.router_address} "
              f"({ns.prefill} prefill, {ns.decode} decode, {ns.colocated} colocated); logs in {cluster.log_dir}")
        print(f"try: pdserve generate --router {cluster.router_address} \"Once upon a time\"", flush=True)
        if cluster.openai:
            print(f"OpenAI-compatible API at http://{cluster.openai_address}/v1 "
                  f"(model {cluster.model_dir!r})", flush=True)
        stop.wait()
    finally:
        cluster.stop()
        print("pdserve cluster stopped")
    return 0
