"""Model parts of the kernel benchmark (services/bench/kernel_bench.py): a 1B-class Llama (the
Llama-3.2-1B shape, random weights, bf16) decoding at batch 1 against the memory-bandwidth
roofline, and its output throughput at 64 concurrent requests against transformers `generate`
on the same GPU and weights."""

from __future__ import annotations

import random
import tempfile
import time

import torch

LLAMA_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
    rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
)
BLOCK_SIZE = 16


def make_models(directory: str):
    """(transformers model, pdserve model, pdserve config) sharing one random checkpoint."""
    import transformers

    from pdserve.models.loader import load_model

    config = transformers.LlamaConfig(**LLAMA_1B)
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    hf.save_pretrained(directory)
    model, model_config = load_model(directory, dtype="bfloat16", device="cuda")
    return hf.eval(), model, model_config


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters (a tied embedding counted once): what one decode step reads."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def decode_batch1(model, config, kv_dtype: torch.dtype | None, prompt_len: int = 512, steps: int = 256) -> dict:
    """Milliseconds per token of one sequence decoding after a prompt_len-token prompt, through
    ModelRunner.execute (prepare, CUDA graph replay, logits) and a greedy argmax."""
    from pdserve.engine.model_runner import ModelRunner, ScheduledChunk

    num_blocks = -(-(prompt_len + steps + 16) // BLOCK_SIZE)
    runner = ModelRunner(model, config, num_blocks, BLOCK_SIZE, kv_dtype)
    table = list(range(num_blocks))
    prompt = [random.Random(0).randrange(config.vocab_size) for _ in range(prompt_len)]
    token = int(runner.execute([ScheduledChunk(0, prompt, 0, table, True)]).argmax())
    position = prompt_len

    def step() -> int:
        nonlocal position
        logits = runner.execute([ScheduledChunk(0, [token], position, table, True)])
        position += 1
        return int(logits.argmax())

    for _ in range(8):  # warm-up: compiles, captures the batch-1 graph
        token = step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps - 8):
        token = step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - start) * 1e3 / (steps - 8)
    return {"ms_per_token": ms, "cuda_graphs": runner.decode_graphs is not None
            and bool(runner.decode_graphs.graphs), "prompt_len": prompt_len}


def pdserve_throughput(model, config, prompts: list[list[int]], output_len: int) -> dict:
    """All prompts submitted at once to an LLMEngine (greedy, exactly output_len tokens each)."""
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.engine import LLMEngine
    from pdserve.engine.model_runner import ModelRunner
    from pdserve.models.sampling_params import SamplingParams

    tokens_needed = sum(len(p) + output_len for p in prompts)
    runner = ModelRunner(model, config, 2 * tokens_needed // BLOCK_SIZE, BLOCK_SIZE)
    engine_config = EngineConfig(block_size=BLOCK_SIZE, max_num_seqs=len(prompts), max_num_batched_tokens=8192)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)

    def run() -> tuple[dict[int, list[int]], float]:
        engine = LLMEngine(runner, None, engine_config)
        outputs: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                outputs[int(out.request_id)].extend(out.samples[0].token_ids)
        torch.cuda.synchronize()
        return outputs, time.perf_counter() - start

    run()  # warm-up: kernel compiles and graph captures are not throughput
    outputs, seconds = run()
    produced = sum(len(t) for t in outputs.values())
    return {"seconds": seconds, "output_tokens": produced, "tokens_per_s": produced / seconds,
            "outputs": outputs}


def hf_throughput(hf, prompts: list[list[int]], output_len: int) -> dict:
    """transformers `generate` of the whole batch at once (equal-length prompts: no padding)."""
    ids = torch.tensor(prompts, dtype=torch.long, device="cuda")

    def run() -> tuple[torch.Tensor, float]:
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                              min_new_tokens=output_len, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return out[:, ids.shape[1]:], time.perf_counter() - start

    with torch.inference_mode():
        hf.generate(ids[:2], max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
    new, seconds = run()
    return {"seconds": seconds, "output_tokens": new.numel(), "tokens_per_s": new.numel() / seconds,
            "outputs": {i: row.tolist() for i, row in enumerate(new)}}


def model_benchmarks(peak_gb_per_s: float, concurrency: int = 64, prompt_len: int = 256,
                     output_len: int = 256) -> dict:
    """Batch-1 decode (bf16 and int8 KV) against the roofline, then throughput at `concurrency`."""
    with tempfile.TemporaryDirectory() as directory, torch.inference_mode():
        hf, model, config = make_models(directory)
        weights = weight_bytes(model)
        roofline_ms = weights / peak_gb_per_s / 1e6
        results: dict = {"weight_bytes": weights, "roofline_ms_per_token": roofline_ms}
        for name, kv_dtype in (("bf16_kv", None), ("int8_kv", torch.int8)):
            r = decode_batch1(model, config, kv_dtype)
            r["fraction_of_roofline"] = roofline_ms / r["ms_per_token"]
            results[f"decode_batch1_{name}"] = r
        rng = random.Random(1)
        prompts = [[rng.randrange(config.vocab_size) for _ in range(prompt_len)] for _ in range(concurrency)]
        ours = pdserve_throughput(model, config, prompts, output_len)
        theirs = hf_throughput(hf, prompts, output_len)
    first_equal = sum(ours["outputs"][i][:1] == theirs["outputs"][i][:1] for i in range(concurrency))
    results["throughput"] = {
        "concurrency": concurrency, "prompt_len": prompt_len, "output_len": output_len,
        "pdserve": {k: v for k, v in ours.items() if k != "outputs"},
        "transformers_generate": {k: v for k, v in theirs.items() if k != "outputs"},
        "ratio": ours["tokens_per_s"] / theirs["tokens_per_s"],
        "first_token_agreement": first_equal / concurrency,
    }
    return results
