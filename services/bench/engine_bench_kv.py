"""KV-cache waste of an LLMEngine over a workload, sampled after every step (read-only)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class KVWasteMeter:
    """Allocated versus used KV slots of the running sequences, summed over engine steps.

    After each step: allocated = block_size * distinct blocks in the running sequences' block
    tables (a block shared by several sequences counts once); used = the slots of those blocks
    that hold a computed token (for a shared block, the most any sharer has written).
    Waste = unused / allocated, reported two ways:
      slot_weighted: sum over steps of unused / sum over steps of allocated (the share of
        slot-steps wasted, i.e. time-averaged memory waste; the headline figure);
      step_mean: the plain mean over steps of each step's unused / allocated.
    """

    allocated_slot_steps: int = 0
    unused_slot_steps: int = 0
    step_ratios: list[float] = field(default_factory=list)
    peak_allocated_slots: int = 0

    def sample(self, engine: Any) -> None:
        """Record the engine's state now (call right after engine.step())."""
        block_size = engine.config.block_size
        used_by_block: dict[int, int] = {}
        for request in engine.scheduler.running:
            for seq in request.samples:
                computed = seq.num_computed_tokens
                for k, block in enumerate(seq.block_table):
                    used = min(block_size, max(0, computed - k * block_size))
                    if used >= used_by_block.get(block.block_id, 0):
                        used_by_block[block.block_id] = used
        allocated = block_size * len(used_by_block)
        if allocated == 0:
            return
        unused = allocated - sum(used_by_block.values())
        self.allocated_slot_steps += allocated
        self.unused_slot_steps += unused
        self.step_ratios.append(unused / allocated)
        self.peak_allocated_slots = max(self.peak_allocated_slots, allocated)

    @property
    def slot_weighted(self) -> float:
        """Unused / allocated slot-steps over all sampled steps (0 before any sample)."""
        return self.unused_slot_steps / self.allocated_slot_steps if self.allocated_slot_steps else 0.0

    @property
    def step_mean(self) -> float:
        """Mean over sampled steps of each step's unused / allocated share."""
        return sum(self.step_ratios) / len(self.step_ratios) if self.step_ratios else 0.0

    def as_dict(self) -> dict:
        """The figures as plain numbers (for --json)."""
        return {"slot_weighted": self.slot_weighted, "step_mean": self.step_mean,
                "steps_sampled": len(self.step_ratios), "peak_allocated_slots": self.peak_allocated_slots}
