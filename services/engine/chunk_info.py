"""What a per-layer hook learns about a step: which chunks are computed, into which blocks.

The prefill server passes a hook to LLMEngine.step(layer_hook=...): after layer i has written
its K/V for every chunk of the step, layer_hook(i, infos) runs (in the engine's thread, while
the step is in progress), and the server snapshots the blocks of layer i named in `infos` to
send them on while layer i + 1 computes. The blocks are the sample's own until the step ends:
a request that finishes in this step frees them only after the hook's last call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pdserve.engine.scheduler import ScheduledSample


@dataclass(frozen=True)
class ChunkInfo:
    """One sample's chunk in the current step.

    request_id: the engine's request id; seq_id / sample_index: which sample computes it;
    start, num_tokens: the chunk covers positions [start, start + num_tokens);
    block_ids: the physical blocks covering those positions, in logical order (block_ids[k]
        is logical block first_block_index + k, first_block_index = start // block_size);
        a chunk that starts inside a block reports that block again (its earlier part holds
        KV from a previous step);
    cached_block_ids: when the request was admitted in this step with a prefix-cache hit, its
        leading blocks [0, first_block_index) whose KV (every layer) was computed earlier and
        never reported by a hook since; otherwise ();
    num_prompt_tokens: the request's prompt length;
    is_last_chunk_of_prompt: the chunk computes the prompt's last token, so once the hook has
        run for the model's last layer the prompt's whole KV is in the cache.
    """

    request_id: str
    seq_id: int
    sample_index: int
    start: int
    num_tokens: int
    first_block_index: int
    block_ids: tuple[int, ...]
    cached_block_ids: tuple[int, ...]
    num_prompt_tokens: int
    is_last_chunk_of_prompt: bool

    @property
    def end(self) -> int:
        """One past the chunk's last position."""
        return self.start + self.num_tokens


LayerHook = Callable[[int, Sequence[ChunkInfo]], None]
"""layer_hook(layer_index, infos): layer layer_index wrote its K/V for the step's chunks."""


def chunk_infos(scheduled: Sequence[ScheduledSample], block_size: int) -> list[ChunkInfo]:
    """The ChunkInfo of every scheduled chunk, in the step's order (blocks already allocated)."""
    infos = []
    for s in scheduled:
        sample = s.sample
        end = s.start + s.num_tokens
        first = s.start // block_size
        last = -(-end // block_size)
        table = sample.block_table
        cached = tuple(b.block_id for b in table[:first]) if s.admitted else ()
        prompt_len = s.request.num_prompt_tokens
        infos.append(ChunkInfo(
            request_id=s.request.request_id, seq_id=sample.seq_id, sample_index=sample.sample_index,
            start=s.start, num_tokens=s.num_tokens, first_block_index=first,
            block_ids=tuple(b.block_id for b in table[first:last]), cached_block_ids=cached,
            num_prompt_tokens=prompt_len, is_last_chunk_of_prompt=s.start < prompt_len <= end))
    return infos
