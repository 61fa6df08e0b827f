"""Tensor parallelism's two costs, each against its baseline measured in the same run.

    pdserve bench tensor-parallel [--size small] [--requests 16] [--payload-mb 64] [--repeats 7] [--out DIR]

1. control: an engine whose model is split over --tensor-parallel-size ranks (gloo; nccl with --device cuda,
   one GPU per rank: TP=2 needs two GPUs, and is refused on one) serves a batch of
   requests; the control overhead is the time rank 0 spends sending each step's description to the other
   ranks as a fraction of the step (TensorParallelRunner.control_seconds / step_seconds). The same requests
   on one process give the tokens the split engine must match and the step time it is compared with (on a
   2-core machine two ranks share the cores the one process had: the ratio says what splitting costs there,
   not what it gains on a GPU per rank).
2. transfer: one prompt's KV (--payload-mb, a Llama-8B-like layout: 8 KV heads of 128, bf16, block 16)
   from a prefill server of 2 ranks into a decode server of 1, 2 and 4 ranks (another process), over TCP and,
   where NIXL loads, NIXL: 2 -> 2 moves each rank's blocks as they are (no mapping); 2 -> 1 and 2 -> 4 map
   heads (TCP: the sender assembles each LAYER frame in the receiver's layout; NIXL: the receiver READs the
   heads of each token). Sent as a prefill server sends: over TCP each layer's blocks are copied when they
   are queued (unmapped: as they are; mapped: into the receiver's layout), over NIXL read in place.
   Reported: the median seconds of each and the ratio mapped / unmapped.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import torch

from pdserve.bench.kv_transfer_bench import blocks_digest, make_caches, nixl_loads
from pdserve.kvtransfer import KVLayout, TCPKVReceiver, TCPKVSender
from pdserve.kvtransfer.layout import kv_heads_of_rank
from pdserve.kvtransfer.nixl_agent import NixlAgent
from pdserve.kvtransfer.nixl_data import READ_LANES, NixlReceiveSide, NixlSendSide

TRANSFER_LAYOUT = dict(num_layers=8, num_kv_heads=8, head_dim=128, block_size=16, dtype="bfloat16")
SENDER_RANKS = 2
RECEIVER_RANKS = (2, 1, 4)  # the first is the unmapped baseline


def bench_control(ns: argparse.Namespace) -> dict:
    """One batch on a split engine vs one process: control overhead, step-time ratio, identical tokens."""
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.engine import LLMEngine
    from pdserve.engine.model_runner import ModelRunner, kv_cache_bytes_per_block
    from pdserve.engine.tensor_parallel import TensorParallelSettings, tensor_parallel_runner
    from pdserve.models.loader import load_model
    from pdserve.models.sampling_params import SamplingParams
    from pdserve.models.tensor_parallel import local_config
    from pdserve.models.tiny_model import make_tiny_model

    model_dir = str(make_tiny_model(Path(tempfile.mkdtemp(prefix="pdserve-tpbench-")) / "model", size=ns.size,
                                    train_steps=ns.train_steps))
    generator = torch.Generator().manual_seed(0)
    model, config = load_model(model_dir, dtype="float32", device=ns.device)
    prompts = [torch.randint(3, config.vocab_size, (ns.prompt_tokens,), generator=generator).tolist()
               for _ in range(ns.requests)]
    blocks = ns.requests * -(-(ns.prompt_tokens + ns.max_tokens) // 16) + 16
    params = SamplingParams(max_tokens=ns.max_tokens, temperature=0.0, ignore_eos=True)
    engine_config = EngineConfig(block_size=16, max_num_seqs=ns.requests, max_num_batched_tokens=2048)

    def serve(runner) -> tuple[list[list[int]], float, int]:
        engine = LLMEngine(runner, None, engine_config)
        start = time.perf_counter()
        results = engine.generate(prompts, params)
        return ([r.samples[0].token_ids for r in results], time.perf_counter() - start,
                engine.counters.num_steps)

    whole_tokens, whole_s, steps = serve(ModelRunner(model, config, blocks, 16, cpu_linear="none"))
    del model
    settings = TensorParallelSettings(size=ns.tensor_parallel_size, backend="nccl" if ns.device == "cuda" else "gloo")
    per_block = kv_cache_bytes_per_block(local_config(config, settings.size), 16, torch.float32)
    runner = tensor_parallel_runner(model_dir, settings, blocks, 16, torch.float32, cpu_linear="none")
    try:
        split_tokens, split_s, _ = serve(runner)
        control, step = runner.control_seconds, runner.step_seconds
    finally:
        runner.close()
    return {"model": f"make-tiny-model {ns.size}", "device": ns.device, "backend": settings.backend,
            "tensor_parallel_size": settings.size, "requests": len(prompts),
            "steps": steps, "control_fraction": control / step, "control_ms_per_step": 1e3 * control / steps,
            "step_ms_split": 1e3 * step / steps, "wall_s_whole": whole_s, "wall_s_split": split_s,
            "split_over_whole": split_s / whole_s, "tokens_identical": split_tokens == whole_tokens,
            "kv_bytes_per_block_per_rank": per_block}


def _receiver_main(pipe, layout_dict: dict, num_blocks: int) -> None:
    """The decode side: a receiver over `layout`'s rank caches (NIXL too where it loads)."""
    torch.set_num_threads(1)
    layout = KVLayout(**layout_dict)
    one_rank = KVLayout(layout.num_layers, layout.heads_per_rank, layout.head_dim, layout.block_size, layout.dtype)
    caches = [make_caches(one_rank, num_blocks, random_bytes=False) for _ in range(layout.tensor_parallel_size)]
    nixl = (NixlReceiveSide([NixlAgent(f"tpbench-recv-{uuid.uuid4().hex[:8]}") for _ in range(READ_LANES)],
                            layout, caches) if nixl_loads() else None)
    receiver = TCPKVReceiver(caches, layout, nixl=nixl)
    pipe.send(receiver.start())
    done: dict = {}
    while True:
        command, *args = pipe.recv()
        if command == "expect":
            receiver.expect(*args, on_complete=lambda rid, err: done.__setitem__(rid, err))
            pipe.send("ok")
        elif command == "check":
            pipe.send([blocks_digest(rank, args[0]) for rank in caches])
        else:
            receiver.stop()
            pipe.send("stopped")
            return


def bench_transfer(payload_mb: int, repeats: int) -> dict:
    """Median seconds of one prompt's KV from 2 ranks into 1, 2 and 4 ranks; ratios to 2 -> 2."""
    whole = KVLayout(**TRANSFER_LAYOUT)
    num_blocks = max(1, payload_mb * (1 << 20) // (2 * whole.num_layers * whole.block_bytes))
    whole_caches = make_caches(whole, num_blocks, random_bytes=True)
    send_layout = KVLayout(**TRANSFER_LAYOUT, tensor_parallel_size=SENDER_RANKS)
    src = [[tuple(t[:, :, heads.start:heads.stop].contiguous() for t in pair) for pair in whole_caches]
           for heads in (kv_heads_of_rank(whole.num_kv_heads, r, SENDER_RANKS) for r in range(SENDER_RANKS))]
    paths = {"tcp": TCPKVSender(send_layout)}
    if nixl_loads():
        side = NixlSendSide(NixlAgent(f"tpbench-send-{uuid.uuid4().hex[:8]}"), src)
        paths["nixl"] = TCPKVSender(send_layout, nixl=side, require_nixl=True)
    ids = list(range(num_blocks))
    out: dict = {"bytes": 2 * whole.num_layers * num_blocks * whole.block_bytes, "sender_ranks": SENDER_RANKS,
                 "layout": TRANSFER_LAYOUT, "paths": {}}
    try:
        for receiver_ranks in RECEIVER_RANKS:
            layout = KVLayout(**TRANSFER_LAYOUT, tensor_parallel_size=receiver_ranks)
            context = mp.get_context("spawn")
            pipe, child = context.Pipe()
            process = context.Process(target=_receiver_main, args=(child, vars(layout), num_blocks), daemon=True)
            process.start()
            endpoint = pipe.recv()
            try:
                for name, sender in paths.items():
                    seconds = [_time_transfer(pipe, endpoint, sender, src, ids) for _ in range(repeats + 1)][1:]
                    pipe.send(("check", ids))
                    correct = pipe.recv() == _expected_digests(whole_caches, whole, receiver_ranks, ids)
                    out["paths"].setdefault(name, {})[f"2->{receiver_ranks}"] = {
                        "median_s": statistics.median(seconds), "correct": correct}
            finally:
                pipe.send(("stop",))
                pipe.recv()
                process.join(30)
    finally:
        if "nixl" in paths:
            paths["nixl"].close()
    for rows in out["paths"].values():
        base = rows[f"2->{RECEIVER_RANKS[0]}"]["median_s"]
        for row in rows.values():
            row["over_unmapped"] = row["median_s"] / base
            row["gbs"] = out["bytes"] / row["median_s"] / 1e9
    return out


def _expected_digests(whole_caches, whole: KVLayout, receiver_ranks: int, ids: list[int]) -> list[str]:
    """Per rank of a receiver of receiver_ranks ranks, the digest its blocks must have: the whole cache's
    blocks at that rank's heads."""
    return [blocks_digest([tuple(t[:, :, heads.start:heads.stop].contiguous() for t in pair) for pair in whole_caches],
                          ids)
            for heads in (kv_heads_of_rank(whole.num_kv_heads, r, receiver_ranks) for r in range(receiver_ranks))]


def _time_transfer(pipe, endpoint: str, sender: TCPKVSender, src, ids: list[int]) -> float:
    """Seconds from open() until the receiver confirmed every layer of every rank."""
    rid, tokens = f"tp-{uuid.uuid4().hex[:12]}", len(ids) * sender.layout.block_size
    pipe.send(("expect", rid, ids, tokens))
    pipe.recv()
    start = time.perf_counter()
    transfer = sender.open(endpoint, rid, tokens)
    for layer in range(sender.layout.num_layers):  # as a prefill server sends: TCP copies the blocks at once
        transfer.send_layer_ranks(layer, [rank[layer] for rank in src], ids, snapshot=sender.nixl is None)
    transfer.finish(timeout=300)
    return time.perf_counter() - start


def run(ns: argparse.Namespace) -> int:
    """Run the parts asked for, print them, write JSON to --out; exit 1 when a split engine's tokens or
    a mapped transfer's bytes are wrong."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    result: dict = {"commit": commit, "date": time.strftime("%Y-%m-%d"), "torch_threads": torch.get_num_threads()}
    ok = True
    if ns.part in ("all", "control"):
        control = result["control"] = bench_control(ns)
        print(f"control: {control['control_fraction']:.2%} of each step ({control['control_ms_per_step']:.3f} ms of "
              f"{control['step_ms_split']:.1f} ms) at TP={control['tensor_parallel_size']}; split/whole wall "
              f"{control['split_over_whole']:.2f}; tokens identical: {control['tokens_identical']}")
        ok &= control["tokens_identical"]
    if ns.part in ("all", "transfer"):
        transfer = result["transfer"] = bench_transfer(ns.payload_mb, ns.repeats)
        for path, rows in transfer["paths"].items():
            for pair, row in rows.items():
                print(f"transfer {path} {pair}: {row['median_s'] * 1e3:.1f} ms ({row['gbs']:.2f} GB/s), "
                      f"{row['over_unmapped']:.2f}x of unmapped, correct: {row['correct']}")
                ok &= row["correct"]
    if ns.out:
        Path(ns.out).mkdir(parents=True, exist_ok=True)
        (Path(ns.out) / "tensor_parallel.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ok else 1
