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
from pdserve.kvtransfer.nixl_agent import NixlAgent, NixlCounts, NixlUnavailable
from pdserve.kvtransfer.nixl_data import READ_LANES, NixlReceiveSide, NixlSendSide
from pdserve.runtime.security import kv_receiver_options, kv_sender_options
from pdserve.settings import DecodeSettings, PrefillSettings
from pdserve.telemetry.engine_collector import NixlCollector

logger = logging.getLogger("pdserve.kv_transport")


def _agents(mode: str, worker_id: str, kv_caches, count: int = 1) -> list[NixlAgent]:
    """`count` NIXL agents unless mode is tcp; under auto, none (and one log line) when NIXL cannot start or
    the ranks' caches lie on several GPUs (a NIXL offer names one device; not built yet)."""
    if mode == "tcp":
        return []
    devices = {tensor.device for caches in kv_caches for pair in caches for tensor in pair}
    if len(devices) > 1:
        reason = f"the tensor-parallel ranks' KV caches are on {len(devices)} devices, NIXL offers one"
        if mode == "nixl":
            raise RuntimeError(f"--kv-transfer nixl: {reason} (not built yet; use tcp or auto)")
        logger.info("KV transfer: tcp (%s)", reason)
        return []
    agents: list[NixlAgent] = []
    try:  # names unique per process: a restarted server is a new agent to its peers
        for lane in range(count):
            agents.append(NixlAgent(f"pdserve-{worker_id}-{os.getpid()}-{uuid.uuid4().hex[:8]}-{lane}"))
    except NixlUnavailable as exc:
        for agent in agents:
            agent.close()
        if mode == "nixl":
            raise RuntimeError(f"--kv-transfer nixl: {exc}") from exc
        logger.info("KV transfer: tcp (NIXL unavailable: %s)", exc)
        return []
    return agents


def _gauges(counts: NixlCounts, agents: int, pinned: int) -> tuple[int, int, int, int, int]:
    return agents, counts.registrations, counts.transfers_in_flight, counts.remote_agents, pinned


def kv_layout(rank_kv_caches, num_kv_heads: int) -> KVLayout:
    """The layout of a server's KV cache (rank_kv_caches: per tensor-parallel rank, per layer (K, V);
    num_kv_heads: the model's). One rank's is read off its tensors (a quantized cache's packed rows
    too); a tensor-parallel server's states the model's heads, which the transfer maps between ranks."""
    if len(rank_kv_caches) == 1:
        return KVLayout.from_kv_caches(rank_kv_caches[0])
    return KVLayout.of_ranks(rank_kv_caches, num_kv_heads)


def kv_sender(settings: PrefillSettings, worker_id: str, kv_caches, num_kv_heads: int, registry=None,
              pinned_blocks: Callable[[], int] = lambda: 0) -> TCPKVSender:
    """The prefill server's sender, per settings.kv_transfer (kv_caches: the engine's, per tensor-parallel
    rank, per layer (K, V); num_kv_heads: the model's); its NIXL counts (and pinned_blocks(), the blocks
    held for transfers) go to the Prometheus `registry`, if given."""
    layout = kv_layout(kv_caches, num_kv_heads)
    options = kv_sender_options(settings.server.tls, settings.kv_auth_token)
    agents = _agents(settings.kv_transfer, worker_id, kv_caches)
    if not agents:
        return TCPKVSender(layout, **options)
    agent = agents[0]
    nixl = NixlSendSide(agent, kv_caches)
    if registry is not None:
        registry.register(NixlCollector(lambda: _gauges(agent.counts(), 1, pinned_blocks())))
    logger.info("KV transfer: %s; NIXL agent %s, KV cache registered (%s)",
                "nixl" if settings.kv_transfer == "nixl" else "auto (nixl where the decode server takes it)",
                agent.name, nixl.offer.memory)
    return TCPKVSender(layout, **options, nixl=nixl, require_nixl=settings.kv_transfer == "nixl")


def kv_receiver(settings: DecodeSettings, worker_id: str, kv_caches, num_kv_heads: int, observer: TransferObserver,
                registry=None) -> TCPKVReceiver:
    """The decode server's receiver (not started), per settings.kv_transfer (kv_caches: per tensor-parallel
    rank, per layer (K, V); num_kv_heads: the model's); its NIXL counts go to the Prometheus `registry`,
    if given."""
    options = kv_receiver_options(settings.server.tls, settings.kv_auth_token)
    layout = kv_layout(kv_caches, num_kv_heads)
    agents = _agents(settings.kv_transfer, worker_id, kv_caches, READ_LANES)
    nixl = None
    if agents:
        nixl = NixlReceiveSide(agents, layout, kv_caches)
        if registry is not None:
            registry.register(NixlCollector(lambda: _gauges(nixl.counts(), len(agents), 0)))
        logger.info("KV transfer: %s; NIXL agents %s (%d read lanes), KV cache registered (%s)",
                    "nixl" if settings.kv_transfer == "nixl" else "auto (nixl where the prefill server offers it)",
                    agents[0].name.rsplit("-", 1)[0], len(agents), nixl.memory)
    return TCPKVReceiver(kv_caches, layout, host=settings.server.host, port=settings.kv_port, observer=observer,
                         nixl=nixl, require_nixl=settings.kv_transfer == "nixl", **options)
