"""The engine's configuration (frozen once built): EngineArgs, what a process needs to build its
engine from a checkpoint, and EngineConfig, the limits and policies of the engine itself."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.speculation import SpeculativeConfig


@dataclass(frozen=True)
class EngineConfig:
    """Limits and policies of one engine.

    num_blocks: KV blocks the engine may use (None: all the runner has).
    max_num_seqs: running sequences at once (each of a request's n samples counts).
    max_num_batched_tokens: tokens computed per step (prompt chunks + decode tokens).
    max_model_len: prompt + max_tokens limit per request (None: the model's
        max_position_embeddings, or the pool's capacity when the runner does not say).
    static_batch_size: None for continuous batching; k for the static baseline, which admits
        up to k waiting requests only when the previous batch has fully finished.
    speculative: speculative decoding's settings (None: off); see pdserve.engine.speculation.
    """

    block_size: int = 16
    num_blocks: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    max_model_len: int | None = None
    static_batch_size: int | None = None
    speculative: SpeculativeConfig | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}"),
            (self.num_blocks is None or self.num_blocks >= 1,
             f"num_blocks must be >= 1, got {self.num_blocks}"),
            (self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}"),
            (self.max_num_batched_tokens >= 1,
             f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"),
            (self.max_model_len is None or self.max_model_len >= 2,
             f"max_model_len must be >= 2, got {self.max_model_len}"),
            (self.static_batch_size is None or self.static_batch_size >= 1,
             f"static_batch_size must be >= 1 or None, got {self.static_batch_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"EngineConfig: {message}")


@dataclass(frozen=True)
class EngineArgs:
    """What a process needs to build its engine (the `engine` section of the config)."""

    model: str
    dtype: str | None = None
    device: str = "cpu"  # or "cuda"
    block_size: int = 16
    kv_cache_mb: int = 512
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    threads: int | None = None
    kv_cache_dtype: str = "auto"
    single_thread_step_tokens: int = 32  # CPU steps of fewer tokens run on one torch thread (0: never)
    cpu_linear: str = "auto"  # bfloat16 CPU linear layers: auto | native | onednn | none (cpu_packed_linear.py)
    tensor_parallel_size: int = 1  # rank processes the model is split over (pdserve.engine.tensor_parallel)
    speculative: str = "none"  # none | ngram | draft (pdserve.engine.speculation)
    num_speculative_tokens: int = 4
    speculative_max_batch: int | None = None  # speculate only in steps of at most this many samples (None: per method)
    draft_model: str | None = None  # the draft checkpoint for --speculative draft

    def __post_init__(self) -> None:
        if self.draft_model and self.speculative != "draft":
            raise ValueError(f"--draft-model is for --speculative draft (this server has --speculative {self.speculative})")

    def speculative_config(self) -> SpeculativeConfig | None:
        """The engine's speculative decoding settings (None when --speculative none)."""
        if self.speculative == "none":
            return None
        return SpeculativeConfig(self.speculative, self.num_speculative_tokens, self.speculative_max_batch,
                                 draft_model=self.draft_model)
