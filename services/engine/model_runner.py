"""Runs the model over one scheduled step: builds the packed batch, owns the paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kernels.attention_metadata import AttentionMetadata
from models.config import ModelConfig
from models.llama import LlamaForCausalLM
from models.loader import load_model


@dataclass
class ScheduledChunk:
    """One sequence's share of a step.

    token_ids: tokens to compute now (a prompt chunk, or the last sampled token);
    start_position: tokens of this sequence already in the KV cache (position of token_ids[0]);
    block_table: physical blocks covering at least start_position + len(token_ids) positions;
    needs_logits: a token is sampled after this chunk's last token.
    """

    seq_id: int
    token_ids: list[int]
    start_position: int
    block_table: list[int]
    needs_logits: bool


@dataclass
class PreparedBatch:
    """The tensors one forward takes. input_ids, positions: [T]; logits_indices: [N] rows of the
    hidden states to turn into logits (the last token of each chunk that samples)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor


def kv_cache_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block of K and V takes across all layers."""
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * elem


class ModelRunner:
    """Owns the model and its paged KV cache (per layer K and V, each [NB, BS, KVH, D]) and runs
    mixed prefill/decode steps over it."""

    def __init__(self, model: LlamaForCausalLM, config: ModelConfig, num_blocks: int,
                 block_size: int = 16, kv_dtype: torch.dtype | None = None):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        self.model = model
        self.config = config
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = next(model.parameters()).device
        self.kv_dtype = kv_dtype or next(model.parameters()).dtype
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=self.kv_dtype, device=self.device),
             torch.zeros(shape, dtype=self.kv_dtype, device=self.device))
            for _ in range(config.num_layers)
        ]

    @classmethod
    def from_dir(cls, model_dir: str | Path, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype | str | None = None, device: str = "cpu") -> ModelRunner:
        """Load a checkpoint directory and allocate a KV cache of `num_blocks` blocks."""
        model, config = load_model(model_dir, dtype=dtype, device=device)
        return cls(model, config, num_blocks, block_size)

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
                logits_indices.append(query_start[-1] - 1)
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
        """Run one step; returns logits [N, vocab] float32 for the chunks with needs_logits, in order.

        layer_done(i), if given, is called once layer i's K/V are in the cache.
        """
        batch = self.prepare(chunks)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta, layer_done)
        return self.model.compute_logits(hidden[batch.logits_indices])

    @torch.inference_mode()
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy the K/V of block src into block dst in every layer (copy-on-write)."""
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], device=self.device)
        dst = torch.tensor([d for _, d in pairs], device=self.device)
        for key_cache, value_cache in self.kv_caches:
            key_cache[dst] = key_cache[src]
            value_cache[dst] = value_cache[src]
