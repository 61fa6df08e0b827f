"""A tensor-parallel engine: the engine's process is rank 0 (it schedules and samples) and drives N-1
rank processes that hold the other shards of the model and of the KV cache.

Every model call rank 0 makes (a step's chunks, a copy-on-write block copy) goes to the other ranks over
a pipe before rank 0 runs it; all ranks then run the same forward, meeting in its all-reduces
(pdserve.models.tensor_parallel). The pipes only carry the step's description (token ids, positions,
block tables), so the block tables stay rank 0's and the ranks need no scheduler. A rank that dies
breaks the next collective on the others (gloo reports the lost peer; the group's timeout bounds any
wait), and a rank whose pipe closes (rank 0 gone) exits.

Each rank's KV cache is shared with rank 0 (shared memory on CPUs; torch.multiprocessing would share
CUDA memory by IPC handles), so rank 0's KV transfer reads and writes every rank's heads in place
(`rank_kv_caches`) while the ranks compute with them.

On GPUs (backend nccl) rank r runs on cuda:r: a server of N ranks needs N GPUs, and asking for more ranks
than the machine has GPUs is refused (two ranks on one GPU would only be slower). Written for the first
session with GPUs and not yet run on one; CUDA graphs are off under tensor parallelism (a capture would
have to meet the other ranks in each collective), and a step is not cut short mid-layer (a request that
leaves during a step has its results dropped after the step instead).
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp

from pdserve.engine.model_runner import ModelRunner, ScheduledChunk
from pdserve.kernels.kv_quant import kv_cache_torch_dtype
from pdserve.models.loader import load_model
from pdserve.models.tensor_parallel import DEFAULT_TIMEOUT_S, TensorParallelGroup, shard_model
from pdserve.state.embedded_redis import free_port

logger = logging.getLogger(__name__)

READY = "ready"
LOAD_TIMEOUT_S = 600.0  # a rank loads the whole checkpoint, then cuts its shard


@dataclass(frozen=True)
class TensorParallelSettings:
    """size: ranks (processes) per server; backend: gloo (CPU) or nccl (GPU); timeout_s bounds every
    collective (a rank that stops answering fails the step instead of hanging it)."""

    size: int = 1
    backend: str = "gloo"
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"--tensor-parallel-size must be >= 1, got {self.size}")
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"tensor parallel backend must be gloo or nccl, got {self.backend!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"tensor parallel timeout must be > 0, got {self.timeout_s}")


def rank_device(settings: TensorParallelSettings, rank: int) -> torch.device:
    """Where rank `rank` computes: the CPU under gloo, cuda:rank under nccl."""
    return torch.device("cuda", rank) if settings.backend == "nccl" else torch.device("cpu")


def check_devices(settings: TensorParallelSettings) -> None:
    """ValueError unless this machine has a GPU for every rank (nccl)."""
    if settings.backend != "nccl":
        return
    count = torch.cuda.device_count()
    if count < settings.size:
        raise ValueError(f"--tensor-parallel-size {settings.size} on GPUs needs {settings.size} GPUs (one per rank); "
                         f"this machine has {count}")


def _load_shard(model_dir: str, dtype: torch.dtype, tp: TensorParallelGroup, kv_cache_dtype: str,
                device: torch.device):
    """(this rank's shard of the model, its local config, its KV cache dtype): what every rank builds its
    ModelRunner from."""
    model, _ = load_model(model_dir, dtype=dtype)  # on the CPU: a GPU holds only its shard
    kv_dtype = kv_cache_torch_dtype(kv_cache_dtype, model.embed_tokens.weight.dtype)
    local = shard_model(model, tp)
    return model.to(device), local, kv_dtype


def _rank_main(rank: int, settings: TensorParallelSettings, init_method: str, model_dir: str,
               dtype: torch.dtype, num_blocks: int, block_size: int, threads: int, kv_cache_dtype: str,
               runner_options: dict, conn) -> None:
    """Ranks 1..N-1: hold a shard, run what rank 0 sends until it says stop or its pipe closes."""
    # A terminal's Ctrl-C or a SIGTERM to the group is rank 0's to handle (it drains, then stops the ranks).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(threads)
    device = rank_device(settings, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the group forms: NCCL binds each rank to its current device
    tp = TensorParallelGroup.join(rank, settings.size, init_method, settings.backend, settings.timeout_s)
    told_to_stop = False
    try:
        model, local, kv_dtype = _load_shard(model_dir, dtype, tp, kv_cache_dtype, device)
        runner = ModelRunner(model, local, num_blocks, block_size, kv_dtype, cuda_graphs=False, **runner_options)
        for pair in runner.kv_caches:  # before any step: the views the model computes with follow (CPU only:
            for cache in pair:  # CUDA memory goes to rank 0 as an IPC handle)
                cache.share_memory_()
        conn.send((READY, runner.kv_caches))
        while True:
            try:
                command, payload = conn.recv()
            except EOFError:  # rank 0 is gone
                return
            if command == "execute":
                runner.execute(payload)
            elif command == "copy_blocks":
                runner.copy_blocks(payload)
            else:
                told_to_stop = True
                return
    finally:
        tp.leave(synchronize=told_to_stop)  # rank 0 meets the others at the final barrier when it stops them


class RankProcesses:
    """Rank 0's handle on the other ranks: starts them, sends them each model call, stops them."""

    def __init__(self, settings: TensorParallelSettings):
        self.settings = settings
        self.processes: list = []
        self.pipes: list = []
        self.kv_caches: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # ranks 1..N-1's, shared with us

    def start(self, model_dir: str, dtype: torch.dtype, num_blocks: int, block_size: int,
              threads: int = 1, kv_cache_dtype: str = "auto", runner_options: dict | None = None,
              load_timeout_s: float = LOAD_TIMEOUT_S) -> TensorParallelGroup:
        """Start ranks 1..N-1 and join the group as rank 0 (the model loads on every rank meanwhile);
        returns rank 0's group once every rank holds its shard (RuntimeError when one exits first or
        takes longer than load_timeout_s). runner_options: ModelRunner keywords, the same on every rank."""
        check_devices(self.settings)
        init_method = f"tcp://127.0.0.1:{free_port()}"
        context = mp.get_context("spawn")
        for rank in range(1, self.settings.size):
            ours, theirs = context.Pipe()
            process = context.Process(target=_rank_main, daemon=True, name=f"pdserve-tp-rank-{rank}",
                                      args=(rank, self.settings, init_method, model_dir, dtype, num_blocks,
                                            block_size, threads, kv_cache_dtype, runner_options or {}, theirs))
            process.start()
            theirs.close()
            self.processes.append(process)
            self.pipes.append(ours)
        tp = None
        try:
            if self.settings.backend == "nccl":
                torch.cuda.set_device(rank_device(self.settings, 0))
            tp = TensorParallelGroup.join(0, self.settings.size, init_method, self.settings.backend,
                                          self.settings.timeout_s)
            deadline = time.monotonic() + load_timeout_s
            for rank, (pipe, process) in enumerate(zip(self.pipes, self.processes), start=1):
                while not pipe.poll(1.0):
                    if not process.is_alive():
                        raise RuntimeError(f"tensor parallel rank {rank} exited (code {process.exitcode}) "
                                           "while loading its shard")
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"tensor parallel rank {rank} did not load its shard in {load_timeout_s:.0f} s")
                message = pipe.recv()
                if not (isinstance(message, tuple) and message[0] == READY):
                    raise RuntimeError(f"tensor parallel rank {rank} did not load its shard")
                self.kv_caches.append(message[1])
        except BaseException:
            self.stop(before_join=(lambda: tp.leave(synchronize=False)) if tp is not None else None)
            raise
        return tp

    def send(self, command: str, payload) -> None:
        """Send one model call to every other rank (BrokenPipeError when one is gone)."""
        for pipe in self.pipes:
            pipe.send((command, payload))

    def stop(self, timeout_s: float = 10.0, before_join: Callable[[], None] | None = None) -> None:
        """Tell the ranks to stop, call before_join (rank 0 leaving the group: the ranks wait for it at
        the final barrier), wait for them, and kill (by pid) any that do not exit."""
        for pipe in self.pipes:
            try:
                pipe.send(("stop", None))
            except (BrokenPipeError, OSError):
                pass
            pipe.close()
        if before_join is not None:
            before_join()
        for process in self.processes:
            process.join(timeout_s)
            if process.is_alive():
                logger.warning("tensor parallel rank process %d did not stop; killing it", process.pid)
                process.kill()
                process.join()
        self.processes, self.pipes, self.kv_caches = [], [], []


class TensorParallelRunner(ModelRunner):
    """Rank 0's ModelRunner: each call goes to the other ranks first, then runs here on rank 0's shard
    (its logits are the whole vocabulary's: the output head gathers them). Under tensor parallelism a
    step is not narrowed mid-way: layer_done runs for every layer once the whole step is computed (every
    rank's K/V are then in its cache: each rank wrote them before joining the step's collectives), and
    the chunks it drops lose their logits rows as a narrowed step would have."""

    def __init__(self, model, local_config, num_blocks: int, block_size: int, ranks: RankProcesses, **kwargs):
        super().__init__(model, local_config, num_blocks, block_size, **kwargs)
        self.ranks = ranks
        self.control_seconds = 0.0  # spent sending steps to the other ranks (the control overhead)
        self.step_seconds = 0.0  # spent in execute, sending included

    @property
    def rank_kv_caches(self) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Every rank's KV cache, rank 0's first: per layer (K, V), each [NB, BS, heads_per_rank, D]."""
        return [self.kv_caches, *self.ranks.kv_caches]

    def execute(self, chunks: list[ScheduledChunk], layer_done=None) -> torch.Tensor:
        """Run one step on every rank; returns logits [N, vocab] float32 (see ModelRunner.execute)."""
        start = time.perf_counter()
        self.ranks.send("execute", chunks)
        sent = time.perf_counter()
        logits = super().execute(chunks)
        self.control_seconds += sent - start
        self.step_seconds += time.perf_counter() - start
        if layer_done is None:
            return logits
        if self.device.type == "cuda":  # the hook reads every rank's KV: rank 0's last collective follows their writes
            torch.cuda.current_stream(self.device).synchronize()
        dropped: set[int] = set()
        for layer in range(self.config.num_layers):
            dropped |= layer_done(layer) or set()
        if not dropped:
            return logits
        rows_of = [j for j, chunk in enumerate(chunks) if chunk.needs_logits for _ in range(chunk.num_logits)]
        return logits[[row for row, j in enumerate(rows_of) if j not in dropped]]

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write on every rank's shard of the KV cache."""
        if pairs:
            self.ranks.send("copy_blocks", pairs)
        super().copy_blocks(pairs)

    def close(self) -> None:
        """Stop the other ranks and leave the group (at a barrier with them when all are alive)."""
        alive = all(process.is_alive() for process in self.ranks.processes)
        self.ranks.stop(before_join=lambda: self.model.tensor_parallel.leave(synchronize=alive))


def tensor_parallel_runner(model_dir: str, settings: TensorParallelSettings, num_blocks: int, block_size: int,
                           dtype: torch.dtype = torch.float32, threads: int = 1,
                           kv_cache_dtype: str = "auto", **runner_options) -> TensorParallelRunner:
    """Start settings.size ranks for the checkpoint at model_dir (this process is rank 0) and return
    rank 0's runner; num_blocks is every rank's count of KV blocks (each holding its own heads);
    kv_cache_dtype: auto | int8 | fp8, as --kv-cache-dtype; runner_options: ModelRunner keywords
    (cpu_linear, single_thread_step_tokens), the same on every rank."""
    ranks = RankProcesses(settings)
    tp = ranks.start(model_dir, dtype, num_blocks, block_size, threads, kv_cache_dtype, runner_options)
    try:
        model, local, kv_dtype = _load_shard(model_dir, dtype, tp, kv_cache_dtype, rank_device(settings, 0))
        return TensorParallelRunner(model, local, num_blocks, block_size, ranks, kv_dtype=kv_dtype, cuda_graphs=False,
                                    **runner_options)
    except BaseException:
        ranks.stop(before_join=lambda: tp.leave(synchronize=False))
        raise
