"""What attention needs to know about a packed batch of sequences over the paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    """Per-step batch layout, built by the model runner.

    slot_mapping: [T] flat cache slot (block * block_size + offset) of each new token, -1 to skip.
    block_tables: [B, max_blocks] physical block ids per sequence (padded with 0).
    seq_lens: [B] tokens of each sequence in the cache after this step (prefix + new).
    query_start_loc: [B+1] cumulative new-token counts (cu_seqlens of the queries).
    query_lens_cpu / seq_lens_cpu: the same lengths as Python lists, so the CPU path does not
    synchronise on tensors.
    step_cache: scratch space for this step only: what the CPU attention derives from the batch
    layout once and every layer reuses.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    step_cache: dict = field(default_factory=dict, repr=False)
