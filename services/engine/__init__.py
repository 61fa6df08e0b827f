"""The continuous-batching engine (used by the prefill, decode and colocated roles).

Modules, one responsibility each:
- config: EngineConfig (frozen).
- request: Request and its n Samples (one per completion of an n > 1 request).
- block_pool: KV blocks, ref counts, the O(1) free queue and the prefix cache (lazy LRU eviction).
- kv_cache_manager: block tables over the pool: prefix hits, growth, forks, copy-on-write.
- scheduler: iteration-level scheduling, chunked prefill, preemption by recompute, static batches.
- stop_checker / sample_processor: sampling rows, stop conditions, held-back text.
- engine: LLMEngine (add_request / abort_request / step / generate / stats, and for
  disaggregation reserve / release_reservation / add_prefilled_request / step(layer_hook)).
- reservations: decode-side blocks held for a prompt whose KV another server sends.
- prefilled: continuing a request started elsewhere (checks, stop-checker priming, prompt KV).
- chunk_info: ChunkInfo and the per-layer hook a prefill server streams KV with.
- async_engine / async_commands: AsyncEngine, the engine in its own thread for asyncio servers.
- model_runner: ModelRunner, the forward pass over the paged KV cache.
"""
