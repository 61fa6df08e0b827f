"""Runs the model over one scheduled step: builds the packed batch, owns the paged KV cache."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch

from pdserve.kernels.attention_metadata import AttentionMetadata
from pdserve.kernels.kv_cache_alloc import allocate_cache, cache_block_bytes
from pdserve.kernels.kv_quant import kv_cache_torch_dtype
from pdserve.models.config import ModelConfig
from pdserve.models.cpu_packed_linear import NativePackedLinear, PackedLinear, pack_linears_for_cpu
from pdserve.models.llama import LlamaForCausalLM
from pdserve.models.loader import load_model


@dataclass
class ScheduledChunk:
    """One sequence's share of a step.

    token_ids: tokens to compute now (a prompt chunk, or the last sampled token, maybe followed by
    speculative proposals);
    start_position: tokens of this sequence already in the KV cache (position of token_ids[0]);
    block_table: physical blocks covering at least start_position + len(token_ids) positions;
    needs_logits: a token is sampled after this chunk's last token;
    num_logits: logits rows of the chunk's last num_logits tokens (1 + proposals, when speculating).
    """

    seq_id: int
    token_ids: list[int]
    start_position: int
    block_table: list[int]
    needs_logits: bool
    num_logits: int = 1


@dataclass
class PreparedBatch:
    """The tensors one forward takes. input_ids, positions: [T]; logits_indices: [N] rows of the
    hidden states to turn into logits (the last token of each chunk that samples)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor


def kv_cache_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block of K and V takes across all layers (with an int8/fp8 cache, its
    per-block, per-head float32 scales included)."""
    return 2 * config.num_layers * cache_block_bytes(block_size, config.num_kv_heads, config.head_dim, dtype)


class ModelRunner:
    """Owns the model and its paged KV cache (per layer K and V, each [NB, BS, KVH, D]) and runs
    mixed prefill/decode steps over it.

    kv_dtype: the cache dtype (default: the model's); int8 or float8_e4m3fn make a quantized
    cache with per-block, per-head scales, stored inside each block (kernels/kv_cache_alloc.py).
    kv_caches: per layer (K, V), the tensors that hold the cache, what the KV transfer and
        copy-on-write move: [NB, BS, KVH, D] for a float cache; for a quantized one the packed
        blocks [NB, BS, 1, row_bytes] (values and scales).
    kv_data: per layer (K, V) [NB, BS, KVH, D] views the model reads and writes (= kv_caches
        for a float cache); kv_scales: per layer (K, V) [NB, KVH] float32 views, or None.
    On the CPU, a bfloat16 model's linear layers are repacked in place for cpu_linear's kernel
    ("auto": the native one where it runs, else oneDNN; "none" leaves them; models/cpu_packed_linear.py);
    packed_linears: how many of the model's layers are packed (a model shared by several runners is
    packed once).
    cuda_graphs: capture decode steps in CUDA graphs on a GPU (tensor-parallel ranks run without: a
    capture would have to meet the other ranks' in every collective, which is not built yet).
    single_thread_step_tokens: on the CPU, a step of fewer tokens runs on one torch thread and a
    larger one on the threads torch had when the runner was built. A small decode step is a row of
    matrix-vector products that a second thread barely speeds up, and on a machine whose other
    cores also serve (the router, the HTTP front end, the client) a descheduled OpenMP thread
    stalls every op of the step: measured here, a batch-1 step of a ~100M model went from 24 ms on
    one thread to 58 ms on two with one other busy process. 0 keeps every step on all threads.
    """

    def __init__(self, model: LlamaForCausalLM, config: ModelConfig, num_blocks: int,
                 block_size: int = 16, kv_dtype: torch.dtype | None = None, cpu_linear: str = "auto",
                 single_thread_step_tokens: int = 0, cuda_graphs: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        if single_thread_step_tokens < 0:
            raise ValueError(f"single_thread_step_tokens must be >= 0, got {single_thread_step_tokens}")
        self.single_thread_step_tokens = single_thread_step_tokens
        self.max_threads = torch.get_num_threads()
        self.model = model
        self.config = config
        pack_linears_for_cpu(model, cpu_linear)
        self.packed_linears = sum(isinstance(m, (PackedLinear, NativePackedLinear)) for m in model.modules())
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = next(model.parameters()).device
        self.kv_dtype = kv_dtype or next(model.parameters()).dtype
        layers = [tuple(allocate_cache(num_blocks, block_size, config.num_kv_heads, config.head_dim,
                                       self.kv_dtype, self.device) for _ in range(2))
                  for _ in range(config.num_layers)]
        self.kv_caches = [(k.storage, v.storage) for k, v in layers]
        self.kv_data = [(k.data, v.data) for k, v in layers]
        self.kv_scales = [(k.scales, v.scales) for k, v in layers] if layers[0][0].scales is not None else None
        self.decode_graphs = self._decode_graphs() if cuda_graphs else None

    def _decode_graphs(self):
        """CUDA graphs for decode steps on a GPU (services/engine/cuda_graphs.py), else None."""
        if self.device.type != "cuda":
            return None
        from pdserve.engine.cuda_graphs import DecodeGraphs, cuda_graphs_enabled

        if not cuda_graphs_enabled(self.device):
            return None
        max_blocks = -(-self.config.max_position_embeddings // self.block_size)
        return DecodeGraphs(self.model, self.kv_data, self.kv_scales, max_blocks, self.device)

    @property
    def rank_kv_caches(self) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """The KV cache of every tensor-parallel rank (here one): what a KV transfer moves."""
        return [self.kv_caches]

    def kv_cache_bytes(self) -> int:
        """Bytes the KV cache holds: K and V of every layer (scales included when quantized)."""
        return sum(t.numel() * t.element_size() for pair in self.kv_caches for t in pair)

    @classmethod
    def from_dir(cls, model_dir: str | Path, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype | str | None = None, device: str = "cpu",
                 kv_cache_dtype: str = "auto") -> ModelRunner:
        """Load a checkpoint (directory, GGUF file or Hub id) and allocate a KV cache of `num_blocks` blocks
        (kv_cache_dtype: "auto" | "int8" | "fp8")."""
        model, config = load_model(model_dir, dtype=dtype, device=device)
        kv_dtype = kv_cache_torch_dtype(kv_cache_dtype, model.embed_tokens.weight.dtype)
        return cls(model, config, num_blocks, block_size, kv_dtype)

    def prepare(self, chunks: list[ScheduledChunk]) -> PreparedBatch:
        """Pack the chunks into flat tensors and attention metadata (no padding)."""
        if not chunks:
            raise ValueError("a step needs at least one scheduled chunk")
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        logits_indices: list[int] = []
        max_blocks = 0
        for chunk in chunks:
            n = len(chunk.token_ids)
            end = chunk.start_position + n
            if n == 0 or (end + bs - 1) // bs > len(chunk.block_table):
                raise ValueError(f"sequence {chunk.seq_id}: {n} new tokens at position "
                                 f"{chunk.start_position} do not fit its {len(chunk.block_table)} blocks")
            input_ids.extend(chunk.token_ids)
            table = chunk.block_table
            for pos in range(chunk.start_position, end):
                positions.append(pos)
                slots.append(table[pos // bs] * bs + pos % bs)
            query_start.append(query_start[-1] + n)
            seq_lens.append(end)
            if chunk.needs_logits:
                logits_indices.extend(range(query_start[-1] - chunk.num_logits, query_start[-1]))
            max_blocks = max(max_blocks, (end + bs - 1) // bs)
        tables = torch.zeros(len(chunks), max_blocks, dtype=torch.int32)
        for row, chunk in enumerate(chunks):
            used = chunk.block_table[:max_blocks]
            tables[row, :len(used)] = torch.tensor(used, dtype=torch.int32)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=tables.to(dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=dev),
            query_lens_cpu=[len(c.token_ids) for c in chunks],
            seq_lens_cpu=seq_lens,
        )
        return PreparedBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            meta=meta,
            logits_indices=torch.tensor(logits_indices, dtype=torch.int64, device=dev),
        )

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk], layer_done=None) -> torch.Tensor:
        """Run one step; returns logits [N, vocab] float32 for the chunks with needs_logits, in order
        (num_logits rows each).

        layer_done(i), if given, is called once layer i's K/V are in the cache. It may return
        indices into `chunks` to drop from the rest of the step (never all of the chunks still in
        it): their later layers are not computed and they get no logits row.
        """
        batch = self.prepare(chunks)
        if self.device.type == "cpu" and self.max_threads > 1:
            self._set_threads(batch.input_ids.numel())
        hidden = None
        if self.decode_graphs is not None and layer_done is None and max(batch.meta.query_lens_cpu) == 1:
            hidden = self.decode_graphs.run(batch.input_ids, batch.positions, batch.meta)
        if hidden is None:
            step = _NarrowingStep(self, chunks, batch, layer_done) if layer_done is not None else None
            hidden = self.model(batch.input_ids, batch.positions, self.kv_data, batch.meta,
                                step.after_layer if step is not None else None, kv_scales=self.kv_scales)
            if step is not None:
                batch = step.batch
        return self.model.compute_logits(hidden[batch.logits_indices])

    def _set_threads(self, num_tokens: int) -> None:
        """One torch thread for a small step, all of them for a large one (see the class doc)."""
        threads = 1 if num_tokens < self.single_thread_step_tokens else self.max_threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    @torch.inference_mode()
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy the K/V of block src into block dst in every layer (copy-on-write; the scales of
        a quantized cache are part of the block)."""
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], device=self.device)
        dst = torch.tensor([d for _, d in pairs], device=self.device)
        for key_cache, value_cache in self.kv_caches:
            key_cache[dst] = key_cache[src]
            value_cache[dst] = value_cache[src]


class _NarrowingStep:
    """One forward's batch as chunks leave it mid-step: after each layer, the chunks
    layer_done(i) drops are cut out of the hidden states and the rest carry on."""

    def __init__(self, runner: ModelRunner, chunks: list[ScheduledChunk], batch: PreparedBatch, layer_done):
        self.runner = runner
        self.chunks = chunks
        self.batch = batch  # the layout of the chunks still in the step
        self.kept = list(range(len(chunks)))  # indices into chunks, in the batch's order
        self.layer_done = layer_done

    def after_layer(self, layer_index: int):
        """The model's layer_done: None to go on unchanged, else (rows [T'], positions [T'], meta)."""
        dropped = self.layer_done(layer_index)
        if not dropped:
            return None
        keep = [p for p, j in enumerate(self.kept) if j not in dropped]
        if len(keep) == len(self.kept):
            return None
        if not keep:
            raise ValueError("layer_done dropped every chunk of the step")
        offsets = [0, *itertools.accumulate(self.batch.meta.query_lens_cpu)]
        rows = torch.cat([torch.arange(offsets[p], offsets[p + 1]) for p in keep]).to(self.runner.device)
        self.kept = [self.kept[p] for p in keep]
        self.batch = self.runner.prepare([self.chunks[j] for j in self.kept])
        return rows, self.batch.positions, self.batch.meta
