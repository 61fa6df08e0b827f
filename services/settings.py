"""The typed settings of each server role, frozen once built. `pdserve serve ROLE` builds one from its
flags and PDSERVE_* variables (pdserve.cli.serve); a program that embeds a server builds it directly.

    RouterSettings     the router: request validation, dispatch, failover, admission
    PrefillSettings    a prefill server: its engine, queue bound, KV sending
    DecodeSettings     a decode server: its engine, queue bound, KV receiving port
    ColocatedSettings  a colocated worker (both phases in one engine)
    OpenAISettings     the OpenAI-compatible HTTP front end (a client of the router)

Each holds a ServerSettings (where and how the process listens, its telemetry, its graceful stop);
the router and workers also hold a RedisSettings.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pdserve.engine.config import EngineArgs
from pdserve.runtime.retry_hint import DEFAULT_RETRY_AFTER_MS
from pdserve.runtime.tls import TlsConfig, TlsConfigError
from pdserve.workers.queue_bound import DEFAULT_MAX_QUEUED_REQUESTS, QueueBound

if TYPE_CHECKING:
    from pdserve.openai.frontend import FrontendConfig
    from pdserve.openai.limits import HttpOptions

WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")
ROUTING_POLICIES = ("kv", "load")
KV_TRANSFER_MODES = ("auto", "tcp", "nixl")  # auto: NIXL where it loads and the peer takes it, else TCP
KV_CONNECT_TIMEOUT_S = 10.0  # connect + handshake with a decode server's KV receiver


@dataclass(frozen=True)
class TelemetrySettings:
    """Logging, tracing and /metrics of one process. otlp_endpoint None: $OTEL_EXPORTER_OTLP_ENDPOINT,
    or tracing off; metrics_port None: no /metrics (0: any free port); metrics_host None: the
    server's host."""

    otlp_endpoint: str | None = None
    metrics_port: int | None = None
    metrics_host: str | None = None
    log_json: bool = False
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"--metrics-port {self.metrics_port} is not a port number (0-65535)")


@dataclass(frozen=True)
class ServerSettings:
    """Where and how a server process listens. port 0: any free port; advertise_host: the host
    other services reach it at (default: host, or this machine's address when host is a
    wildcard); tls None: plaintext (a server's TLS needs its own certificate)."""

    host: str = "127.0.0.1"
    port: int = 0
    advertise_host: str | None = None
    tls: TlsConfig | None = None
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    drain_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.tls is not None and not self.tls.cert_file:
            raise TlsConfigError("a pdserve server with --tls-ca or --tls also needs --tls-cert and --tls-key "
                                 "(its own identity)")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port {self.port} is not a port number (0-65535)")

    def advertised_host(self) -> str:
        """The host other services reach this server at: advertise_host; else host, unless that is
        a wildcard address (0.0.0.0, ::), then this machine's hostname resolved, which in a
        container is its own IP (so replicas scaled by compose register distinct addresses)."""
        if self.advertise_host:
            return self.advertise_host
        if self.host not in WILDCARD_HOSTS:
            return self.host
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return socket.gethostname()


@dataclass(frozen=True)
class RedisSettings:
    """The Redis holding request state and the worker registry: url (rediss:// for TLS,
    user:password@ for AUTH/ACL), the key prefix, and a CA bundle for rediss:// (None: system roots)."""

    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "pdserve"
    ca_file: str | None = None


@dataclass(frozen=True)
class RoutingWeights:
    """How --routing kv weighs load against cache hits, in prompt tokens. prefill_queue_weight: a
    prompt token queued on a prefill server counts as this many tokens to compute.
    decode_running_weight: a sequence running on a decode server counts as this many prompt tokens
    to transfer. full_kv_fraction: a decode server with less than this share of its KV blocks free
    gets no credit for what it holds (it is saturated: load alone decides).

    The defaults lean to the cache: a prompt sent away from the server holding it is computed (or
    transferred) twice and then cached twice, which costs every later request, not just this one
    (`pdserve bench routing`: with 1.0 and 1024 a quarter of the turns left their holders and the
    cluster computed a third more; services/bench/RESULTS.md)."""

    prefill_queue_weight: float = 0.5
    decode_running_weight: float = 256.0
    full_kv_fraction: float = 0.1


@dataclass(frozen=True, kw_only=True)
class RouterSettings:
    """The router. model: the checkpoint directory its tokenizer and config come from; model_name:
    what GetModelInfo reports (default: model); redis_wait_s: how long a new request waits for an
    unreachable Redis before UNAVAILABLE; lease_ms: how long a decode reservation waits for its KV;
    max_attempts / stream_idle_timeout_s: the failover budget; rpc_timeout_s: the deadline of a
    Reserve, and how often a Prefill still waiting probes its server; max_inflight_requests and
    overload_retry_after_ms: admission control; api_keys: keys gRPC clients must send (empty: open);
    routing: "kv" chooses prefill and decode servers by what their prefix caches hold
    (pdserve.state.kv_events) weighed against their load by routing_weights, "load" by load alone."""

    server: ServerSettings
    redis: RedisSettings
    model: str
    model_name: str | None = None
    block_size: int = 16
    max_model_len: int | None = None
    redis_wait_s: float = 5.0
    lease_ms: int = 30_000
    max_attempts: int = 5
    stream_idle_timeout_s: float = 60.0
    rpc_timeout_s: float = 60.0
    max_inflight_requests: int = 256
    overload_retry_after_ms: int = DEFAULT_RETRY_AFTER_MS
    api_keys: tuple[str, ...] = ()
    routing: str = "kv"
    routing_weights: RoutingWeights = field(default_factory=RoutingWeights)

    def __post_init__(self) -> None:
        if not self.rpc_timeout_s > 0:
            raise ValueError(f"--rpc-timeout-s must be > 0, got {self.rpc_timeout_s}")
        if self.routing not in ROUTING_POLICIES:
            raise ValueError(f"--routing must be one of {', '.join(ROUTING_POLICIES)}, got {self.routing!r}")
        weights = self.routing_weights
        if weights.prefill_queue_weight < 0 or weights.decode_running_weight < 0:
            raise ValueError("--prefill-queue-weight and --decode-running-weight must be >= 0")


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    """What the prefill, decode and colocated servers share: the engine, the registry entry
    (worker_id None: role + a random suffix; heartbeat_s: a worker silent 3 beats is dropped),
    the bound on requests queued at once (beyond it RESOURCE_EXHAUSTED with the retry hint), and
    stream_keepalive_s: how often a request stream with nothing to send (waiting for a batch slot)
    sends an empty output, well under the router's --stream-idle-timeout-s."""

    server: ServerSettings
    redis: RedisSettings
    engine: EngineArgs
    worker_id: str | None = None
    heartbeat_s: float = 1.0
    max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS
    overload_retry_after_ms: int = DEFAULT_RETRY_AFTER_MS
    stream_keepalive_s: float = 5.0

    role = ""  # each role's name in the registry, set by the subclass (a class attribute, not a field)

    def __post_init__(self) -> None:
        if not self.heartbeat_s > 0:
            raise ValueError(f"--heartbeat-s must be > 0, got {self.heartbeat_s}")
        if not self.stream_keepalive_s > 0:
            raise ValueError(f"--stream-keepalive-s must be > 0, got {self.stream_keepalive_s}")
        self.queue_bound("queue")  # the bound's own checks, at start

    def queue_bound(self, what: str) -> QueueBound:
        """The bound on requests queued at once; `what` names the queue in the refusal."""
        return QueueBound(self.max_queued_requests, what, self.overload_retry_after_ms)


@dataclass(frozen=True, kw_only=True)
class PrefillSettings(WorkerSettings):
    """A prefill server: kv_connect_timeout_s bounds connecting to a decode server's KV port and
    its handshake; kv_auth_token is the shared secret that port requires (None: none);
    kv_transfer how the K/V bytes move (KV_TRANSFER_MODES)."""

    kv_connect_timeout_s: float = KV_CONNECT_TIMEOUT_S
    kv_auth_token: str | None = None
    kv_transfer: str = "auto"

    role = "prefill"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.kv_connect_timeout_s > 0:
            raise ValueError(f"--kv-connect-timeout-s must be > 0, got {self.kv_connect_timeout_s}")
        check_kv_transfer(self.kv_transfer)


@dataclass(frozen=True, kw_only=True)
class DecodeSettings(WorkerSettings):
    """A decode server: kv_port is its KV transfer port (0: any free port), kv_auth_token the
    secret senders must present (None: none), kv_transfer how the K/V bytes move
    (KV_TRANSFER_MODES)."""

    kv_port: int = 0
    kv_auth_token: str | None = None
    kv_transfer: str = "auto"

    role = "decode"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_kv_transfer(self.kv_transfer)


def check_kv_transfer(mode: str) -> None:
    """ValueError unless mode is one of KV_TRANSFER_MODES."""
    if mode not in KV_TRANSFER_MODES:
        raise ValueError(f"--kv-transfer must be one of {', '.join(KV_TRANSFER_MODES)}, got {mode!r}")


@dataclass(frozen=True, kw_only=True)
class ColocatedSettings(WorkerSettings):
    """A colocated worker: one engine doing both phases (chunked prefill), no KV transfer."""

    role = "colocated"


@dataclass(frozen=True, kw_only=True)
class OpenAISettings:
    """The OpenAI-compatible HTTP front end: where it listens, how it reaches the router, and its
    HTTP transport's bounds (body size and read time, keep-alive, connections; None: the defaults
    of pdserve.openai.limits)."""

    server: ServerSettings
    frontend: FrontendConfig
    http: HttpOptions | None = None
