"""Tensor parallelism for the Llama-family network: one model split over N rank processes.

The split is the reference systems' (Megatron-style): each rank holds num_heads / N query heads and
the KV heads they read (num_kv_heads / N of them, or one replicated head when there are fewer KV heads
than ranks), the matching slices of the column-parallel q|k|v and gate|up projections, and the row
slices of o_proj and down_proj, whose partial outputs one all-reduce each sums; the embedding and the
output head are split by vocabulary (the embedding's partial rows are summed, the head's logits
gathered). Every rank therefore keeps the KV of its own heads only: its paged KV cache holds
`local_config(...).num_kv_heads` heads, with the same block tables on every rank.

Collectives run on torch.distributed (gloo on CPUs, NCCL on GPUs) with a timeout, so a dead rank
ends the others' step with an error instead of a hang.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn

from pdserve.kvtransfer.layout import kv_heads_of_rank as layout_kv_heads_of_rank
from pdserve.models.config import ModelConfig
from pdserve.models.llama import LlamaForCausalLM

DEFAULT_TIMEOUT_S = 60.0

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorParallelGroup:
    """This process's place in a tensor-parallel group: its rank, the group's size, and the
    torch.distributed process group the collectives run on (None: the default group)."""

    rank: int
    size: int
    group: object | None = None

    @classmethod
    def join(cls, rank: int, size: int, init_method: str, backend: str = "gloo",
             timeout_s: float = DEFAULT_TIMEOUT_S) -> TensorParallelGroup:
        """Join (and, with every rank, form) the group at init_method (e.g. tcp://127.0.0.1:PORT).
        Every collective after it fails once timeout_s pass without all ranks taking part."""
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} is outside a group of {size}")
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        return cls(rank, size)

    def leave(self, synchronize: bool = True) -> None:
        """Tear the process group down (every rank calls it at the end). synchronize: meet the other
        ranks at a barrier first, so that none tears its connections down while a peer still uses them
        (gloo then aborts the process); False when a rank is known dead."""
        if not dist.is_initialized():
            return
        if synchronize:
            try:
                dist.barrier(group=self.group)
            except RuntimeError:
                logger.warning("tensor parallel group: a rank did not reach the final barrier")
        dist.destroy_process_group(self.group)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum tensor over the ranks, in place; returns it."""
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        """[..., n] on each rank -> [..., size * n], rank 0's slice first."""
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


def check_splittable(config: ModelConfig, size: int) -> None:
    """ValueError naming the dimension when config cannot be split over `size` ranks."""
    if size < 1:
        raise ValueError(f"tensor parallel size must be >= 1, got {size}")
    problems = []
    if config.num_heads % size:
        problems.append(f"{config.num_heads} attention heads")
    if config.intermediate_size % size:
        problems.append(f"an intermediate size of {config.intermediate_size}")
    kv = config.num_kv_heads
    if (kv >= size and kv % size) or (kv < size and size % kv):
        problems.append(f"{kv} KV heads (they must divide among the ranks, or the ranks among them)")
    if problems:
        raise ValueError(f"tensor parallel size {size} does not divide {', '.join(problems)} of this model")


def local_config(config: ModelConfig, size: int) -> ModelConfig:
    """The configuration one rank's shard runs (and sizes its KV cache) with: its heads, its KV
    heads and its slice of the MLP; the vocabulary stays whole (the logits are gathered)."""
    check_splittable(config, size)
    return replace(config, num_heads=config.num_heads // size, num_kv_heads=max(1, config.num_kv_heads // size),
                   intermediate_size=config.intermediate_size // size)


def kv_heads_of_rank(config: ModelConfig, rank: int, size: int) -> range:
    """The model's KV heads that rank holds (a replicated head when there are fewer than ranks); the
    KV transfer maps heads between servers by the same rule (pdserve.kvtransfer.layout)."""
    return layout_kv_heads_of_rank(config.num_kv_heads, rank, size)


class VocabParallelEmbedding(nn.Module):
    """One rank's rows of the embedding (ids [start, start + rows)); ids outside contribute zeros and
    the all-reduce adds the owning rank's rows."""

    def __init__(self, weight: torch.Tensor, start: int, vocab_size: int, tp: TensorParallelGroup):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.start, self.vocab_size, self.tp = start, vocab_size, tp

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] -> embeddings [T, hidden]."""
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        rows = torch.nn.functional.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(rows.masked_fill(outside.unsqueeze(-1), 0.0))


class VocabParallelHead(nn.Module):
    """One rank's rows of the output head; forward gathers every rank's logits into [N, vocab]."""

    def __init__(self, weight: nn.Parameter, vocab_size: int, tp: TensorParallelGroup):
        super().__init__()
        self.weight = weight
        self.vocab_size, self.tp = vocab_size, tp

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab]."""
        logits = torch.nn.functional.linear(hidden, self.weight)
        return self.tp.all_gather_last_dim(logits)[..., :self.vocab_size]


def _rows(weight: torch.Tensor, start: int, count: int) -> torch.Tensor:
    return weight[start:start + count]


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.clone(memory_format=torch.contiguous_format), requires_grad=False)
    if bias is not None:  # clones: a view would keep the whole model's weights alive
        layer.bias = nn.Parameter(bias.clone(), requires_grad=False)
    return layer


def shard_model(model: LlamaForCausalLM, tp: TensorParallelGroup) -> ModelConfig:
    """Cut a whole (loaded) model down to rank tp.rank's shard, in place; returns the shard's
    local_config (what its ModelRunner and KV cache are built with). Every rank must shard the same
    weights. The network's forward is unchanged but for the all-reduces and the gathered logits."""
    config = model.config
    local = local_config(config, tp.size)
    rank, d = tp.rank, config.head_dim
    q_heads = range(rank * local.num_heads, (rank + 1) * local.num_heads)
    kv_heads = kv_heads_of_rank(config, rank, tp.size)
    q_size, kv_size = config.num_heads * d, config.num_kv_heads * d
    inter = local.intermediate_size
    with torch.no_grad():
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if attn.o_proj.bias is not None or mlp.down_proj.bias is not None:
                raise ValueError("a row-parallel projection with a bias is not supported")
            w, b = attn.qkv_proj.weight, attn.qkv_proj.bias
            pieces = [(q_heads.start * d, len(q_heads) * d), (q_size + kv_heads.start * d, len(kv_heads) * d),
                      (q_size + kv_size + kv_heads.start * d, len(kv_heads) * d)]
            attn.qkv_proj = _linear(torch.cat([_rows(w, s, n) for s, n in pieces]),
                                    None if b is None else torch.cat([b[s:s + n] for s, n in pieces]))
            attn.o_proj = _linear(attn.o_proj.weight[:, q_heads.start * d:q_heads.stop * d], None)
            attn.num_heads, attn.num_kv_heads = local.num_heads, local.num_kv_heads
            attn.q_size, attn.kv_size = local.num_heads * d, local.num_kv_heads * d
            attn.tp = tp
            gate_up = mlp.gate_up_proj.weight
            mlp.gate_up_proj = _linear(torch.cat([_rows(gate_up, rank * inter, inter),
                                                  _rows(gate_up, config.intermediate_size + rank * inter, inter)]),
                                       None)
            mlp.down_proj = _linear(mlp.down_proj.weight[:, rank * inter:(rank + 1) * inter], None)
            mlp.tp = tp
        rows = -(-config.vocab_size // tp.size)  # the last rank's shard is padded with zero rows
        start = rank * rows

        def vocab_rows(weight: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
            part = weight[start:min(start + rows, config.vocab_size)]
            out[:part.shape[0]] = part
            return out

        embedding = VocabParallelEmbedding(vocab_rows(model.embed_tokens.weight), start, config.vocab_size, tp)
        head_weight = (embedding.weight if config.tie_word_embeddings
                       else nn.Parameter(vocab_rows(model.lm_head.weight), requires_grad=False))
        model.embed_tokens = embedding
        model.lm_head = VocabParallelHead(head_weight, config.vocab_size, tp)
    model.tensor_parallel = tp
    return local
