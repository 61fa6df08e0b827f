"""CUDA graphs for decode steps: the model forward of a batch of single-token sequences, captured
once per padded batch size and replayed with the step's inputs copied into static buffers.

Only on CUDA with the Triton kernels; PDSERVE_CUDA_GRAPHS=0 turns it off. Padding rows write no
KV (slot -1) and attend to nothing (length 0). The decode kernel's split count is fixed at capture
(pdserve.kernels.ops.DECODE_NUM_SPLITS), each sequence's share of its context is worked out on the GPU.

UNTESTED on a GPU so far (written on a CPU-only machine): the CPU path never builds it.
"""

from __future__ import annotations

import logging
import os

import torch

from pdserve.kernels import ops
from pdserve.kernels.attention_metadata import AttentionMetadata

logger = logging.getLogger("pdserve.cuda_graphs")
BATCH_SIZES = (1, 2, 4, 8) + tuple(range(16, 257, 16))


def cuda_graphs_enabled(device: torch.device) -> bool:
    """Graphs are used on CUDA devices with the Triton ops unless PDSERVE_CUDA_GRAPHS=0."""
    return (device.type == "cuda" and os.environ.get("PDSERVE_CUDA_GRAPHS", "1") != "0"
            and ops.use_triton(torch.empty(0, device=device)))


class DecodeGraphs:
    """Captured decode forwards of `model` over the runner's caches, keyed by padded batch size.

    kv_data/kv_scales: the runner's per-layer cache views (the graphs read and write them in
    place); max_blocks: block-table width (blocks of the longest sequence the model allows).
    """

    def __init__(self, model, kv_data, kv_scales, max_blocks: int, device: torch.device):
        self.model = model
        self.kv_data = kv_data
        self.kv_scales = kv_scales
        self.device = device
        size = BATCH_SIZES[-1]
        self.input_ids = torch.zeros(size, dtype=torch.int64, device=device)
        self.positions = torch.zeros(size, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((size,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(size, max_blocks, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(size, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(size + 1, dtype=torch.int32, device=device)
        self.num_kv_heads = kv_data[0][0].shape[2]
        self.max_len = max_blocks * kv_data[0][0].shape[1]
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.failed = False

    def padded_size(self, batch: int, width: int) -> int | None:
        """The captured size a batch of `batch` decode rows with tables `width` wide runs at."""
        if self.failed or width > self.block_tables.shape[1]:
            return None
        return next((s for s in BATCH_SIZES if s >= batch), None)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor | None:
        """Hidden states [n, hidden] of a decode-only step, or None when no graph fits (the
        caller then runs eagerly)."""
        n, width = input_ids.shape[0], meta.block_tables.shape[1]
        size = self.padded_size(n, width)
        if size is None:
            return None
        if size not in self.graphs and not self._capture(size):
            return None
        self._load_inputs(input_ids, positions, meta, size)
        graph, hidden = self.graphs[size]
        graph.replay()
        return hidden[:n]

    def _load_inputs(self, input_ids, positions, meta: AttentionMetadata, size: int) -> None:
        n, width = input_ids.shape[0], meta.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:size].fill_(-1)
        self.block_tables[:n, :width].copy_(meta.block_tables)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.seq_lens[n:size].zero_()  # padding rows attend to nothing

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables[:size],
            seq_lens=self.seq_lens[:size], query_start_loc=self.query_start_loc[:size + 1],
            query_lens_cpu=[1] * size, seq_lens_cpu=[self.max_len] * size)

    def _capture(self, size: int) -> bool:
        """Warm up (compiles the kernels) and capture the forward at `size`; on failure log it,
        stop using graphs, and let steps run eagerly."""
        from pdserve.kernels.triton_decode_attention import choose_num_splits

        self.slot_mapping[:size].fill_(-1)  # capture-time runs must not write the cache
        self.seq_lens[:size].zero_()
        splits = choose_num_splits(size, self.num_kv_heads, self.max_len, 64,
                                   torch.cuda.get_device_properties(self.device).multi_processor_count)
        previous, ops.DECODE_NUM_SPLITS = ops.DECODE_NUM_SPLITS, splits
        try:
            meta = self._meta(size)
            args = (self.input_ids[:size], self.positions[:size], self.kv_data, meta)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self.model(*args, kv_scales=self.kv_scales)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self.pool):
                hidden = self.model(*args, kv_scales=self.kv_scales)
        except Exception:  # noqa: BLE001 -- any capture failure falls back to eager decode
            logger.exception("CUDA graph capture at batch %d failed; decoding eagerly from now on", size)
            self.failed = True
            return False
        finally:
            ops.DECODE_NUM_SPLITS = previous
        self.graphs[size] = (graph, hidden)
        return True
