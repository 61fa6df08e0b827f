"""Shared by the bad-input table and the fuzz tests: a small real cluster, its workers' loads,
the "nothing leaked" check, and a reference request whose tokens must not change."""

from __future__ import annotations

import time

from pdserve.cli.cluster import LocalCluster
from pdserve.runtime.channels import CHANNEL_OPTIONS, PLAINTEXT, ClientSecurity
from pdserve.v1 import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

MAX_MODEL_LEN = 256
VOCAB_SIZE = 512  # the tiny llama's (pdserve.models.tiny_model)
# A small KV pool (2 MiB: 128 blocks of 16 tokens on the tiny model) so "more blocks than the
# server has" is easy to ask for, and a short KV handshake bound so a silent peer costs 2 s.
CLUSTER_FLAGS = ["--kv-cache-mb", "2", "--max-model-len", str(MAX_MODEL_LEN), "--kv-connect-timeout-s", "2"]
WORKER_ROLES = ("prefill", "decode", "colocated")
REFERENCE_PROMPT = [5, 17, 42, 99, 3, 250, 7, 64]


def start_cluster(model_dir: str, colocated: int = 0) -> LocalCluster:
    """1 prefill + 1 decode (+ colocated workers) + the router, as real processes."""
    return LocalCluster(model_dir, prefill=1, decode=1, colocated=colocated, extra_args=list(CLUSTER_FLAGS)).start()


def worker_loads(cluster: LocalCluster) -> dict[str, worker_pb2.WorkerLoad]:
    """WorkerControl.GetLoad of every worker, by "role@address"."""
    loads = {}
    for proc in cluster.processes:
        if proc.role in WORKER_ROLES:
            with cluster.channel(proc.address, with_api_key=False) as channel:
                stub = worker_pb2_grpc.WorkerControlStub(channel)
                loads[f"{proc.role}@{proc.address}"] = stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=10)
    return loads


def _idle(load: worker_pb2.WorkerLoad) -> bool:
    return (load.num_blocks_free == load.num_blocks_total and load.num_reservations == 0
            and load.num_blocks_reserved == 0 and load.num_running_requests == 0
            and load.num_waiting_requests == 0)


def wait_nothing_held(cluster: LocalCluster, timeout_s: float = 30.0) -> dict[str, worker_pb2.WorkerLoad]:
    """Poll every worker's GetLoad (other processes) until all KV blocks are free, no
    reservation is open and no request runs or waits; AssertionError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        loads = worker_loads(cluster)
        if all(_idle(load) for load in loads.values()):
            return loads
        if time.monotonic() > deadline:
            raise AssertionError(f"KV blocks or requests still held after {timeout_s} s: {loads}")
        time.sleep(0.1)


def assert_all_alive(cluster: LocalCluster) -> None:
    """Every process the cluster started is still running."""
    dead = [(p.role, p.process.returncode) for p in cluster.processes if p.process.poll() is not None]
    assert not dead, f"processes exited: {dead}; logs in {cluster.log_dir}"


def reference_tokens(router_address: str, security: ClientSecurity = PLAINTEXT) -> list[int]:
    """A greedy request's tokens through the router (compared before and after the abuse);
    security: the cluster's client_security() when it is secured."""
    request = router_pb2.GenerateRequest(
        prompt_token_ids=router_pb2.TokenIds(ids=REFERENCE_PROMPT),
        sampling=router_pb2.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    with security.channel(router_address, CHANNEL_OPTIONS) as channel:
        tokens, finish = [], None
        for response in router_pb2_grpc.RouterStub(channel).Generate(request, timeout=60):
            if response.HasField("chunk"):
                tokens += list(response.chunk.token_ids)
            else:
                finish = response.complete.finish_reason
    assert finish == "length" and len(tokens) == 12, (tokens, finish)
    return tokens


def log_tails(cluster: LocalCluster, chars: int = 3000) -> str:
    """The end of every process's log (for assertion messages)."""
    return "\n".join(f"--- {p.role} ---\n{p.log_path.read_text(errors='replace')[-chars:]}" for p in cluster.processes)
