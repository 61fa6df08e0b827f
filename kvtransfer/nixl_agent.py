"""A NIXL agent as the KV transfer layer uses it: one per server, UCX backend, no progress thread.

NIXL (NVIDIA's inference transfer library, UCX underneath) moves bytes between registered memory
of two processes: shared memory or CMA on one host, RDMA between hosts, CUDA IPC and GPUDirect for
GPU memory. pdserve uses one operation only: READ, posted by the decode side from a prefill server's
registered KV cache into its own cache blocks (see nixl_data.py for why pull).

NIXL's own progress thread busy-waits a core, so it is off: the side that posts a READ polls it to
completion, and the passive side calls `progress()` while it has transfers open (UCX needs the
target's progress to set up a connection, and for the data itself on transports without one-sided
reads). Every agent call holds one lock: sessions on several threads share the agent.

The optional dependency is `nixl-cu12` (`pip install pdserve[nixl]`); the `nixl` meta package,
which picks the CUDA 12 or 13 build, works too.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from pdserve.kvtransfer.errors import KVTransferError

log = logging.getLogger(__name__)

_API_MODULES = ("nixl._api", "nixl_cu12._api", "nixl_cu13._api")
# Where the bytes move by the CPU (shared memory, CMA), UCX copies them inside our progress calls:
# poll without pause for this long, yielding the GIL every READ_POLLS_PER_YIELD polls (the engine
# thread must not wait a whole switch interval for it), then every READ_POLL_SLEEP_S (a READ that
# slow waits on a NIC or a peer). On one host (256 MiB, 2 cores): sleeping 50 us between polls
# gave 3.8 GB/s, a yield at every poll 4.2, a yield every 4 polls 4.5, no yield 4.5.
READ_POLL_SPIN_S = 0.05
READ_POLL_SLEEP_S = 50e-6
READ_POLLS_PER_YIELD = 4


class NixlUnavailable(RuntimeError):
    """NIXL cannot be used in this process (not installed, or its UCX backend failed to load)."""


@cache
def nixl_api():
    """The nixl._api module (or the CUDA-specific build's); NixlUnavailable says why not."""
    reasons = []
    for name in _API_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            reasons.append(f"{name}: {exc}")
    raise NixlUnavailable("NIXL is not installed (pip install 'pdserve[nixl]'): " + "; ".join(reasons))


def memory_type(device: torch.device) -> tuple[str, int]:
    """NIXL's memory type and device id for tensors on `device`: ('DRAM', 0) or ('VRAM', index)."""
    if device.type == "cpu":
        return "DRAM", 0
    if device.type == "cuda":
        return "VRAM", device.index if device.index is not None else torch.cuda.current_device()
    raise ValueError(f"NIXL moves CPU or CUDA memory, not {device.type}")


@dataclass(frozen=True)
class NixlCounts:
    """What an agent holds now: memory registrations, READs posted and not yet released, remote
    agents it knows. All three return to their baseline when transfers end; a leak shows here."""

    registrations: int
    transfers_in_flight: int
    remote_agents: int


class NixlAgent:
    """One NIXL agent (UCX backend, progress thread off) with counted registrations and READs.

    name: unique in the cluster (peers key their view of this agent by it)."""

    def __init__(self, name: str):
        api = nixl_api()
        started = time.perf_counter()
        try:
            config = api.nixl_agent_config(enable_prog_thread=False, backends=["UCX"])
            self._agent = api.nixl_agent(name, config)
        except Exception as exc:  # UCX missing or broken: the caller falls back to TCP or fails
            raise NixlUnavailable(f"NIXL agent with the UCX backend could not start: {exc}") from exc
        if "UCX" not in self._agent.backends:  # nixl_agent skips a backend whose plugin is missing
            raise NixlUnavailable("NIXL started without its UCX backend (plugin not found)")
        self.name = name
        self._lock = threading.Lock()
        self._registrations: list = []
        self._in_flight = 0
        self.reads_completed = 0  # READs that finished DONE, over the agent's life
        self._peers: dict[str, bytes] = {}  # remote agent name -> the metadata it was added with
        self._closed = False
        log.info("NIXL agent %s started (UCX) in %.2f s", name, time.perf_counter() - started)

    @property
    def metadata(self) -> bytes:
        """This agent's metadata (its UCX address and registered memory keys) for a peer's add_peer."""
        with self._lock:
            return self._agent.get_agent_metadata()

    def register(self, tensors: list[torch.Tensor]):
        """Register contiguous tensors' memory with NIXL (one call); returns a handle for deregister."""
        with self._lock:
            handle = self._agent.register_memory(tensors)
            self._registrations.append(handle)
        return handle

    def deregister(self, handle) -> None:
        """Undo one register."""
        with self._lock:
            self._registrations.remove(handle)
            self._agent.deregister_memory(handle)

    def add_peer(self, metadata: bytes) -> str:
        """Make a remote agent known (its metadata came over the authenticated control connection);
        returns its name. A name seen before with other metadata (the peer restarted) is replaced."""
        with self._lock:
            if metadata in self._peers.values():
                return next(name for name, known in self._peers.items() if known == metadata)
            try:
                name = self._agent.add_remote_agent(metadata)
            except Exception as exc:
                raise KVTransferError(f"the sender's NIXL metadata was refused: {exc}",
                                      code="protocol_error") from None
            name = name.decode() if isinstance(name, bytes) else str(name)
            self._peers[name] = metadata
            return name

    def forget_peer(self, name: str) -> None:
        """Drop a remote agent (it failed a transfer, or went quiet); the next add_peer re-adds it."""
        with self._lock:
            if self._peers.pop(name, None) is not None:
                try:
                    self._agent.remove_remote_agent(name)
                except Exception as exc:  # already gone on NIXL's side
                    log.debug("removing NIXL peer %s: %s", name, exc)

    def read(self, local_rows: np.ndarray, local_memory: str, remote_rows: np.ndarray, remote_memory: str,
             peer: str, timeout_s: float) -> None:
        """READ remote_rows of `peer`'s registered memory into local_rows of ours and wait until done.

        local_rows, remote_rows: uint64 [n, 3] rows of (address, bytes, device id), pairwise of
        equal length. Raises KVTransferError when NIXL reports an error or after timeout_s (the
        READ is then released, which aborts it). Returns only once the READ no longer writes."""
        deadline = time.monotonic() + timeout_s
        done = False
        with self._lock:
            handle = self._agent.initialize_xfer("READ", self._agent.get_xfer_descs(local_rows, local_memory),
                                                 self._agent.get_xfer_descs(remote_rows, remote_memory), peer)
            self._in_flight += 1
        try:
            with self._lock:
                state = self._agent.transfer(handle)
            spin_until = time.monotonic() + READ_POLL_SPIN_S
            polls = 0
            while state == "PROC":
                now = time.monotonic()
                if now > deadline:
                    raise KVTransferError(f"NIXL READ from {peer} did not complete within {timeout_s:g} s",
                                          code="connection_lost")
                polls += 1
                if now >= spin_until:
                    time.sleep(READ_POLL_SLEEP_S)
                elif polls % READ_POLLS_PER_YIELD == 0:
                    time.sleep(0)  # let the engine thread have the GIL
                with self._lock:
                    state = self._agent.check_xfer_state(handle)
            if state != "DONE":
                raise KVTransferError(f"NIXL READ from {peer} failed (state {state})", code="connection_lost")
            done = True
        except KVTransferError:
            raise
        except Exception as exc:  # nixlRemoteDisconnectError and friends: the peer is gone
            raise KVTransferError(f"NIXL READ from {peer} failed: {exc}", code="connection_lost") from None
        finally:
            with self._lock:
                self._in_flight -= 1
                self.reads_completed += done
                try:
                    self._agent.release_xfer_handle(handle)
                except Exception as exc:
                    log.warning("releasing a NIXL transfer handle failed: %s", exc)

    def progress(self) -> None:
        """Drive UCX progress once (the passive side of READs calls this while transfers are open)."""
        with self._lock:
            if not self._closed:
                self._agent.get_new_notifs()

    def counts(self) -> NixlCounts:
        """Live registrations, READs and remote agents (for leak checks and metrics)."""
        with self._lock:
            return NixlCounts(len(self._registrations), self._in_flight, len(self._peers))

    def close(self) -> None:
        """Deregister everything and forget every peer. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for name in list(self._peers):
                try:
                    self._agent.remove_remote_agent(name)
                except Exception:
                    pass
            self._peers.clear()
            for handle in self._registrations:
                try:
                    self._agent.deregister_memory(handle)
                except Exception:
                    pass
            self._registrations.clear()
