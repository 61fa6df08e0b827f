"""`pdserve bench serve|compare|simulate|peer`: the serving benchmark, the comparisons that justify
disaggregation, the simulator that sizes a deployment, and the side-by-side run against vLLM
(the work lives in services/bench)."""

from __future__ import annotations

import argparse

from pdserve.bench.serve_flags import add_dataset_flags, add_load_flags
from pdserve.cli.flags import add_client_security_flags, add_flag


def register(sub: argparse._SubParsersAction) -> None:
    """Add `bench` and its four subcommands."""
    p = sub.add_parser("bench", help="serving benchmark, deployment comparison, simulator")
    bench = p.add_subparsers(dest="bench_command", required=True)
    _register_serve(bench)
    _register_compare(bench)
    _register_simulate(bench)
    _register_peer(bench)
    _register_routing(bench)
    _register_tensor_parallel(bench)
    _register_speculative(bench)
    _register_structured(bench)


def _register_serve(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("serve", help="load a running deployment through its router and report latencies",
                         description="Send a workload to pdserve.v1.Router/Generate and report TTFT, TPOT, "
                                     "ITL, end-to-end latency, throughput and goodput.")
    add_flag(p, "--router", None, str, "HOST:PORT of the router", required=False)
    add_client_security_flags(p, api_key_help="the API key to send to the router (its --api-key)")
    add_dataset_flags(p, conversation=True)
    add_load_flags(p)
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--warmup", type=int, default=2, help="short requests sent first, not counted")
    p.add_argument("--timeout-s", type=float, default=600.0, help="per-request deadline")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--save-result", nargs="?", const="", default=None, metavar="FILE",
                   help="write the figures as JSON (to FILE, default bench-serve-<date>.json)")
    p.add_argument("--save-detailed", action="store_true", help="with --save-result: every request's timings")
    p.set_defaults(run=lambda ns: _lazy("pdserve.bench.serve_main").run(ns))


def _register_compare(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("compare", help="disaggregated vs colocated, continuous vs static batching, "
                                         "vs transformers, KV waste: JSON + Markdown + PNG report",
                         description="Run the four comparisons on this machine in one run and write "
                                     "report.json, report.md and PNG plots into --out.")
    p.add_argument("--out", default="bench-report", help="report folder (relative to the current directory; "
                   "the committed figures are in services/bench/results/cpu-2core)")
    p.add_argument("--size", default="small", help="make-tiny-model size of the served model")
    p.add_argument("--engine-size", default="small", help="model size of scenarios 2-3")
    p.add_argument("--model-dir", default=None, help="serve this checkpoint instead of making one")
    p.add_argument("--num-prompts", type=int, default=48, help="requests per serving run (scenario 1)")
    p.add_argument("--rates", default="1,2,3", help="request rates (req/s) of scenario 1, comma-separated")
    p.add_argument("--reference-rate", type=float, default=None,
                   help="the rate whose colocated run sets the SLOs (default: the middle rate)")
    p.add_argument("--engine-requests", type=int, default=48, help="requests of scenarios 2-4")
    p.add_argument("--only", default="1,2,3,4", help="scenarios to run, comma-separated")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=lambda ns: _lazy("pdserve.bench.compare_main").run(ns))


def _register_simulate(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("simulate", help="predict TTFT/TPOT/goodput of N prefill + M decode servers "
                                          "and recommend the prefill:decode ratio",
                         description="A discrete-event model of a deployment whose step costs are fitted "
                                     "from engine runs on this machine.")
    p.add_argument("--profile", default=None, help="fitted step costs (JSON from --save-profile)")
    p.add_argument("--model", default=None, help="fit the step costs now on this checkpoint")
    p.add_argument("--size", default=None, help="fit on make-tiny-model --size SIZE (made in a temp dir)")
    p.add_argument("--device", default="cpu", help="device of the fit (cpu or cuda)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the fit (one per server)")
    p.add_argument("--calibrate-router", default=None, metavar="HOST:PORT",
                   help="also measure the service path's overheads on this running deployment")
    p.add_argument("--calibrate-rate", type=float, default=None,
                   help="with --calibrate-router: also run the workload (other seed) at this rate there and "
                        "refine the costs to its median TTFT and TPOT (the router's deployment must be the "
                        "one given by --prefill/--decode/--colocated)")
    p.add_argument("--save-profile", default=None, help="write the fitted step costs to this JSON file")
    add_dataset_flags(p)
    add_load_flags(p)
    p.add_argument("--prefill", type=int, default=1, help="prefill servers")
    p.add_argument("--decode", type=int, default=1, help="decode servers")
    p.add_argument("--colocated", type=int, default=0, help="colocated workers (instead of prefill/decode)")
    p.add_argument("--recommend", action="store_true",
                   help="search prefill:decode splits for the smallest deployment meeting --attainment")
    p.add_argument("--max-servers", type=int, default=8, help="--recommend: most servers in all")
    p.add_argument("--attainment", type=float, default=0.9, help="--recommend: share of requests meeting the SLOs")
    p.add_argument("--save-result", default=None, metavar="FILE", help="write the predictions as JSON")
    p.set_defaults(run=lambda ns: _lazy("pdserve.bench.simulate_main").run(ns))


def _register_peer(bench: argparse._SubParsersAction) -> None:
    from pdserve.bench import peer

    p = bench.add_parser("peer", help="pdserve vs vLLM's CPU build on the same checkpoint, by vLLM's own client",
                         description=peer.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    peer.add_flags(p)
    p.set_defaults(run=lambda ns: peer.run(ns))


def _register_routing(bench: argparse._SubParsersAction) -> None:
    from pdserve.bench import routing_compare

    p = bench.add_parser("routing", help="--routing kv vs --routing load on 2 prefill + 2 decode servers: "
                                         "multi-turn and no-shared-prefix workloads, one run",
                         description=routing_compare.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    routing_compare.add_flags(p)
    p.set_defaults(run=lambda ns: routing_compare.run(ns))


def _register_tensor_parallel(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("tensor-parallel", help="tensor parallelism's control overhead and the KV transfer time "
                                                 "with head mapping (prefill and decode of different sizes)",
                         description="1. control: rank 0's time sending each step to the other ranks, as a fraction "
                                     "of the step, and tokens vs one process; 2. transfer: one prompt's KV from 2 "
                                     "ranks into 1, 2 and 4 ranks over TCP and NIXL, mapped vs unmapped "
                                     "(services/bench/tensor_parallel_bench.py)")
    p.add_argument("--part", choices=("all", "control", "transfer"), default="all")
    p.add_argument("--size", default="small", help="make-tiny-model size of the control part's model")
    p.add_argument("--train-steps", type=int, default=0, help="train that model this many steps first")
    p.add_argument("--tensor-parallel-size", type=int, default=2)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="control part: cuda splits over one GPU per rank (nccl); refused with fewer GPUs")
    p.add_argument("--requests", type=int, default=16, help="requests of the control part")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--payload-mb", type=int, default=64, help="KV bytes of the transfer part's prompt")
    p.add_argument("--repeats", type=int, default=7, help="timed transfers per configuration")
    p.add_argument("--out", default=None, help="write tensor_parallel.json into this folder")
    p.set_defaults(run=lambda ns: _lazy("pdserve.bench.tensor_parallel_bench").run(ns))


def _register_speculative(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("speculative", help="n-gram and draft-model speculative decoding against plain decoding: "
                                             "batch 1 and 32, edit-like, continuation and random workloads, one run",
                         description="Greedy decoding with --speculative ngram, draft and without on one engine "
                                     "(services/bench/speculative_bench.py): tokens/s ratio, acceptance, identical tokens")
    p.add_argument("--size", default="small", help="make-tiny-model size")
    p.add_argument("--draft-size", default="tiny", help="make-tiny-model size of the draft (the model's tokenizer)")
    p.add_argument("--train-steps", type=int, default=600, help="train the model this many steps (it then continues "
                   "its training text, which the edit workload quotes)")
    p.add_argument("--tokens", type=int, default=56, help="output tokens per request (the edit workload's passage: 64)")
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--speculative-max-batch", type=int, default=None, help="default: each method's own")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--repeats", type=int, default=5, help="alternated runs of each configuration (median)")
    p.add_argument("--out", default=None, help="write speculative.json into this folder")
    p.set_defaults(run=lambda ns: _lazy("pdserve.bench.speculative_bench").run(ns))


def _register_structured(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("structured", help="the throughput cost of structured outputs: half a batch under a JSON "
                                            "schema against none, one run",
                         description="Greedy decoding of a batch with every other request under a JSON schema, "
                                     "and with none (services/bench/structured_bench.py): tokens/s ratio, mask time")
    p.add_argument("--size", default="base", help="make-tiny-model size (random weights)")
    p.add_argument("--batch", type=int, default=32, help="requests decoded together")
    p.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--repeats", type=int, default=5, help="alternated runs of each configuration (median)")
    p.add_argument("--out", default=None, help="write structured.json into this folder")
    p.set_defaults(run=lambda ns: _lazy("pdserve.bench.structured_bench").run(ns))


def _lazy(module: str):
    """Import a subcommand's module when it runs (keeps `pdserve --help` fast)."""
    import importlib

    return importlib.import_module(module)
