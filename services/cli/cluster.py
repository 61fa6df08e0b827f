"""A local cluster as subprocesses: Redis (embedded unless a URL is given), prefill and decode
servers (or colocated workers), the router, and optionally the OpenAI-compatible HTTP server.
Used by `pdserve up`, the demo and the tests."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.cli.cluster_security import ClusterSecurity
from pdserve.runtime.channels import CHANNEL_OPTIONS, PLAINTEXT, ClientSecurity
from pdserve.state.embedded_redis import EmbeddedRedis, free_port
from pdserve.state.redis_connect import url_has_secret


@dataclass
class ServerProcess:
    """One child server: its role, process, log file and the address it announced."""

    role: str
    process: subprocess.Popen
    log_path: Path
    address: str = ""
    kv_endpoint: str = ""
    metrics_address: str = ""  # host:port of its Prometheus /metrics, when it serves one


@contextlib.contextmanager
def _environment(overrides: dict[str, str]) -> Iterator[None]:
    """os.environ with `overrides` applied, restored afterwards."""
    saved = {key: os.environ.get(key) for key in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class LocalCluster:
    """Start and stop a whole pdserve cluster on this machine (all on 127.0.0.1)."""

    model_dir: str
    prefill: int = 1
    decode: int = 1
    colocated: int = 0
    router_port: int = 0
    redis_url: str | None = None
    threads_per_worker: int = 1
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    role_env: dict[str, dict[str, str]] = field(default_factory=dict)  # role -> extra env (e.g. its secrets)
    openai: bool = False  # also start `serve openai` in front of the router
    openai_port: int = 0  # its HTTP port (0: any free port)
    openai_args: list[str] = field(default_factory=list)  # e.g. ["--api-key", "KEY"]
    security: ClusterSecurity | None = None  # mutual TLS + API key + KV token + Redis password everywhere
    served_model_name: str | None = None  # the name the APIs report (default: the Hub id, or model_dir)
    processes: list[ServerProcess] = field(default_factory=list)
    redis: EmbeddedRedis | None = None

    def __post_init__(self) -> None:
        from pdserve.models.source import names_a_model, resolve_model

        # The servers resolve --model from their own working directory: they get an absolute path. A Hub id is
        # fetched here, once, and passed on pinned to the commit it resolved to (every server, same weights).
        if names_a_model(self.model_dir):  # anything else fails in the servers, with their message
            with _environment(self.env):  # fetch with the servers' HF_* settings (cache, endpoint, offline)
                self.model_dir = resolve_model(self.model_dir).pinned
        self.log_dir = Path(tempfile.mkdtemp(prefix="pdserve-cluster-"))
        self.prefix = f"pdserve-{os.getpid()}-{int(time.time() * 1000)}"

    @property
    def router_address(self) -> str:
        """host:port of the router."""
        return next(p.address for p in self.processes if p.role == "router")

    @property
    def openai_address(self) -> str:
        """host:port of the OpenAI-compatible HTTP server (clients use http://HOST:PORT/v1)."""
        return next(p.address for p in self.processes if p.role == "openai")

    def start(self, timeout_s: float = 120.0) -> LocalCluster:
        """Start everything; returns when the router's health check says SERVING."""
        try:
            if not self.redis_url:
                self.redis = EmbeddedRedis(password=self.security.redis_password if self.security else None).start()
                self.redis_url = self.redis.url
            roles = ["prefill"] * self.prefill + ["decode"] * self.decode + ["colocated"] * self.colocated
            workers = [self._spawn(role, i, 0) for i, role in enumerate(roles)]
            for proc in workers:
                self._wait_ready(proc, timeout_s)
            router = self._spawn("router", 0, self.router_port or free_port())
            self._wait_ready(router, timeout_s)
            self._wait_serving(router.address, timeout_s)
            if self.openai:
                self.add_openai_server(self.openai_args, self.openai_port, timeout_s=timeout_s)
            return self
        except BaseException:
            self.stop()
            raise

    def add_openai_server(self, args: list[str], port: int = 0, model_dir: str | None = None,
                          timeout_s: float = 120.0) -> ServerProcess:
        """Start (another) `serve openai` in front of the running router; `model_dir` (default the cluster's) gives
        its tokenizer and chat template, which may differ from the workers' checkpoint only in the template."""
        router = next(p for p in self.processes if p.role == "router")
        index = sum(p.role == "openai" for p in self.processes)
        proc = self._spawn("openai", index, port or free_port(), ["--router", router.address, *args], model_dir)
        self._wait_ready(proc, timeout_s)
        return proc

    def _spawn(self, role: str, index: int, port: int, args: list[str] | None = None,
               model_dir: str | None = None) -> ServerProcess:
        """Start `pdserve serve ROLE`; `args` replace the cluster's extra_args (engine flags)."""
        log_path = self.log_dir / f"{role}-{index}.log"
        # -P: the caller's directory stays off sys.path (a checkout's kernels/ or models/ would shadow).
        cmd = [sys.executable, "-P", "-m", "pdserve.cli", "serve", role, "--model", model_dir or self.model_dir,
               "--port", str(port), *self._redis_url_arg(), "--redis-prefix", self.prefix,
               "--worker-id", f"{role}-{index}", "--threads", str(self.threads_per_worker),
               "--metrics-port", "0", *(self.security.args() if self.security else []),
               *(["--model-name", self.served_model_name] if self.served_model_name and role in ("router", "openai")
                 else []),
               *(self.extra_args if args is None else args)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env, **self._secret_env(role)}
        with log_path.open("wb") as log:
            process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env)
        proc = ServerProcess(role, process, log_path)
        self.processes.append(proc)
        return proc

    def _wait_ready(self, proc: ServerProcess, timeout_s: float) -> None:
        """Wait for the child's READY line (polling its log: it is another process)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in proc.log_path.read_text(errors="replace").splitlines():
                if line.startswith("METRICS "):  # printed before READY by servers with /metrics
                    proc.metrics_address = line.split()[2]
                if line.startswith("READY "):
                    parts = line.split()
                    proc.address = parts[2]
                    proc.kv_endpoint = parts[3] if len(parts) > 3 else ""
                    return
            if proc.process.poll() is not None:
                raise RuntimeError(f"{proc.role} exited with {proc.process.returncode}:\n"
                                   f"{proc.log_path.read_text(errors='replace')[-4000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"{proc.role} not ready in {timeout_s}s; log: {proc.log_path}")

    def _redis_url_arg(self) -> list[str]:
        return [] if url_has_secret(self.redis_url) else ["--redis-url", self.redis_url]

    def _secret_env(self, role: str) -> dict[str, str]:
        """Secrets go to the children by environment, not on their (world-readable) command lines."""
        env = {"PDSERVE_REDIS_URL": self.redis_url} if url_has_secret(self.redis_url) else {}
        return {**env, **(self.security.env(role) if self.security else {}), **self.role_env.get(role, {})}

    def client_security(self, with_api_key: bool = True) -> ClientSecurity:
        """How a client dials this cluster's servers (plaintext unless `security` is set)."""
        return self.security.client(with_api_key) if self.security else PLAINTEXT

    def channel(self, address: str, with_api_key: bool = True) -> grpc.Channel:
        """A synchronous channel to one of the cluster's servers (TLS and API key when secured)."""
        return self.client_security(with_api_key).channel(address, CHANNEL_OPTIONS)

    def aio_channel(self, address: str, with_api_key: bool = True) -> grpc.aio.Channel:
        """A grpc.aio channel to one of the cluster's servers (TLS and API key when secured)."""
        return self.client_security(with_api_key).aio_channel(address, CHANNEL_OPTIONS)

    def _wait_serving(self, address: str, timeout_s: float) -> None:
        with self.channel(address, with_api_key=False) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s,
                                  wait_for_ready=True)
            if response.status != health_pb2.HealthCheckResponse.SERVING:
                raise RuntimeError(f"router at {address} is not SERVING ({response.status})")

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM every child (by pid), wait, SIGKILL stragglers, stop embedded Redis."""
        for proc in reversed(self.processes):
            if proc.process.poll() is None:
                proc.process.terminate()
        for proc in reversed(self.processes):
            try:
                proc.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.process.kill()
                proc.process.wait()
        self.processes.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def add_server(self, role: str, timeout_s: float = 120.0) -> ServerProcess:
        """Start one more server of `role` (prefill, decode, worker or router) and wait until it
        is ready; workers register themselves, a router serves at once."""
        index = sum(1 for _ in self.log_dir.glob("*.log"))  # unique: every server wrote one
        proc = self._spawn(role, index, free_port() if role == "router" else 0)
        self._wait_ready(proc, timeout_s)
        return proc

    def kill(self, proc: ServerProcess) -> None:
        """SIGKILL one server (by its pid), as a crash would, and forget it."""
        proc.process.kill()
        proc.process.wait()
        self.processes.remove(proc)

    def servers(self, role: str) -> list[ServerProcess]:
        """The running servers of `role` that are ready (announced their address)."""
        return [p for p in self.processes if p.role == role and p.address]

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
