"""How a prefill or a decode server moves KV: the TCP sender or receiver, with a NIXL side when
--kv-transfer asks for one (nixl: required; auto: when NIXL loads; tcp: never). The choice is
logged once at start; each transfer's own data path shows in metrics labels and its span."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable

from pdserve.kvtransfer import KVLayout, TCPKVReceiver, TCPKVSender
from pdserve.kvtransfer.backend import TransferObserver
from pdserve.kvtransfer.nixl_agent import NixlAgent, NixlUnavailable
from pdserve.kvtransfer.nixl_data import NixlReceiveSide, NixlSendSide
from pdserve.runtime.security import kv_receiver_options, kv_sender_options
from pdserve.settings import DecodeSettings, PrefillSettings
from pdserve.telemetry.engine_collector import NixlCollector

logger = logging.getLogger("pdserve.kv_transport")


def _agent(mode: str, worker_id: str) -> NixlAgent | None:
    """A NIXL agent unless mode is tcp; under auto, None (and one log line) when NIXL cannot start."""
    if mode == "tcp":
        return None
    try:  # unique per process: a restarted server is a new agent to its peers
        return NixlAgent(f"pdserve-{worker_id}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    except NixlUnavailable as exc:
        if mode == "nixl":
            raise RuntimeError(f"--kv-transfer nixl: {exc}") from exc
        logger.info("KV transfer: tcp (NIXL unavailable: %s)", exc)
        return None


def _agent_counts(agent: NixlAgent) -> tuple[int, int, int]:
    counts = agent.counts()
    return counts.registrations, counts.transfers_in_flight, counts.remote_agents


def kv_sender(settings: PrefillSettings, worker_id: str, kv_caches, registry=None,
              pinned_blocks: Callable[[], int] = lambda: 0) -> TCPKVSender:
    """The prefill server's sender, per settings.kv_transfer (kv_caches: the engine's, per layer (K, V));
    its NIXL counts (and pinned_blocks(), the blocks held for transfers) go to the Prometheus
    `registry`, if given."""
    layout = KVLayout.from_kv_caches(kv_caches)
    options = kv_sender_options(settings.server.tls, settings.kv_auth_token)
    agent = _agent(settings.kv_transfer, worker_id)
    if agent is None:
        return TCPKVSender(layout, **options)
    nixl = NixlSendSide(agent, kv_caches)
    if registry is not None:
        registry.register(NixlCollector(lambda: (*_agent_counts(agent), pinned_blocks())))
    logger.info("KV transfer: %s; NIXL agent %s, KV cache registered (%s)",
                "nixl" if settings.kv_transfer == "nixl" else "auto (nixl where the decode server takes it)",
                agent.name, nixl.offer.memory)
    return TCPKVSender(layout, **options, nixl=nixl, require_nixl=settings.kv_transfer == "nixl")


def kv_receiver(settings: DecodeSettings, worker_id: str, kv_caches, observer: TransferObserver,
                registry=None) -> TCPKVReceiver:
    """The decode server's receiver (not started), per settings.kv_transfer; its NIXL counts go to
    the Prometheus `registry`, if given."""
    options = kv_receiver_options(settings.server.tls, settings.kv_auth_token)
    agent = _agent(settings.kv_transfer, worker_id)
    nixl = None
    if agent is not None:
        nixl = NixlReceiveSide(agent, KVLayout.from_kv_caches(kv_caches), kv_caches)
        if registry is not None:
            registry.register(NixlCollector(lambda: (*_agent_counts(agent), 0)))
        logger.info("KV transfer: %s; NIXL agent %s, KV cache registered (%s)",
                    "nixl" if settings.kv_transfer == "nixl" else "auto (nixl where the prefill server offers it)",
                    agent.name, nixl.memory)
    return TCPKVReceiver(kv_caches, host=settings.server.host, port=settings.kv_port, observer=observer,
                         nixl=nixl, require_nixl=settings.kv_transfer == "nixl", **options)
