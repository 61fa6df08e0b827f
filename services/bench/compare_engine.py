"""Compare scenarios 2-4, on the engine benchmark's pieces:
2. continuous vs static batching (same engine) and 3. pdserve vs transformers `generate`: the
   engine benchmark itself (pdserve.bench.engine_bench) at the compare's scale;
4. KV waste of paged allocation vs contiguous max-length allocation: one engine run over the same
   workload, sampling after every step both the paged waste (KVWasteMeter) and what a contiguous
   allocator reserving each running request's maximum length would leave unused.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdserve.bench import engine_bench
from pdserve.bench.engine_bench_kv import KVWasteMeter
from pdserve.bench.engine_bench_systems import greedy_params
from pdserve.bench.engine_bench_workload import make_workload
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.model_runner import ModelRunner

BLOCK_SIZE = 16


def run_engine_bench(size: str, num_requests: int, seed: int, threads: int = 1) -> dict:
    """Scenarios 2 and 3: the engine benchmark's figures (it prints its own report too)."""
    hf_single = max(4, num_requests // 4)
    return engine_bench.main(["--size", size, "--num-requests", str(num_requests), "--hf-single-requests",
                              str(hf_single), "--threads", str(threads), "--seed", str(seed)])


@dataclass
class ContiguousKVMeter:
    """Slots a contiguous allocator would hold for the running requests, and how many hold a
    token, summed over steps. Each running request reserves reserve(prompt_len) slots (its
    maximum length) from admission to finish; used = its computed tokens."""

    reserve_output: int | None  # reserve prompt + this many output slots; None: max_model_len
    max_model_len: int
    allocated_slot_steps: int = 0
    used_slot_steps: int = 0
    peak_allocated_slots: int = 0

    def sample(self, engine: Any) -> None:
        """Record the engine's running requests now (call right after engine.step())."""
        allocated = used = 0
        for request in engine.scheduler.running:
            prompt = len(request.prompt_token_ids)
            allocated += (self.max_model_len if self.reserve_output is None
                          else min(self.max_model_len, prompt + self.reserve_output))
            used += max(seq.num_computed_tokens for seq in request.samples)
        self.allocated_slot_steps += allocated
        self.used_slot_steps += used
        self.peak_allocated_slots = max(self.peak_allocated_slots, allocated)

    @property
    def waste(self) -> float:
        """Unused / allocated slot-steps."""
        return 1.0 - self.used_slot_steps / self.allocated_slot_steps if self.allocated_slot_steps else 0.0


def run_kv_waste(num_requests: int, seed: int, prompt_len: int = 128, mean_output: float = 128.0,
                 max_output: int = 512, size: str = "tiny") -> dict:
    """Scenario 4 on the engine benchmark's workload (same lengths as scenarios 2-3). The schedule,
    and so the accounting, does not depend on the weights: the tiny model keeps it fast."""
    from pdserve.models.loader import load_model
    from pdserve.models.tiny_model import make_tiny_model
    from pdserve.models.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory(prefix="compare-kv-") as tmp:
        model_dir = make_tiny_model(Path(tmp) / "model", arch="llama", seed=0, size=size)
        model, config = load_model(model_dir)
        tokenizer = Tokenizer.from_dir(model_dir)
        workload = make_workload(num_requests, prompt_len, mean_output, max_output, config.vocab_size, seed)
        blocks = engine_bench.blocks_for_workload(workload, BLOCK_SIZE) + 1
        engine = LLMEngine(ModelRunner(model, config, blocks, BLOCK_SIZE), tokenizer,
                           EngineConfig(block_size=BLOCK_SIZE, num_blocks=blocks))
        paged = KVWasteMeter()
        capped = ContiguousKVMeter(max_output, config.max_position_embeddings)
        full = ContiguousKVMeter(None, config.max_position_embeddings)
        for i, (prompt, length) in enumerate(zip(workload.prompts, workload.output_lens)):
            engine.add_request(str(i), prompt, greedy_params(length))
        while engine.has_unfinished_requests():
            engine.step()
            for meter in (paged, capped, full):
                meter.sample(engine)
    return {"num_requests": num_requests, "prompt_len": prompt_len, "mean_output": mean_output,
            "max_output": max_output, "max_model_len": config.max_position_embeddings, "block_size": BLOCK_SIZE,
            "paged": paged.as_dict(),
            "contiguous_prompt_plus_max_output": {"waste": capped.waste, "peak_allocated_slots":
                                                  capped.peak_allocated_slots},
            "contiguous_max_model_len": {"waste": full.waste, "peak_allocated_slots": full.peak_allocated_slots}}
