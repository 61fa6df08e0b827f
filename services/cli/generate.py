"""`pdserve generate`: stream a completion to the terminal, in-process (--model) or through a
running cluster's router (--router)."""

from __future__ import annotations

import argparse
import json
import sys

from pdserve.cli.flags import add_client_security_flags, add_engine_flags, add_flag, client_security_from, engine_args_from


def register(sub: argparse._SubParsersAction) -> None:
    """Add the generate subcommand."""
    p = sub.add_parser("generate", help="generate text in-process (--model) or through a router (--router)")
    p.add_argument("prompt")
    add_flag(p, "--router", None, str, "HOST:PORT of a running pdserve router (instead of --model)")
    add_client_security_flags(p, api_key_help="with --router: the API key to send (the router's --api-key)")
    add_sampling_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object per completion")
    add_engine_flags(p)
    p.set_defaults(run=run)


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """The sampling flags shared by generate and the benchmarks."""
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")


def sampling_params_from(ns: argparse.Namespace):
    """SamplingParams from the sampling flags (validated)."""
    from pdserve.models.sampling_params import SamplingParams

    return SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p,
                          top_k=ns.top_k, min_p=ns.min_p, seed=ns.seed, n=ns.n, stop=tuple(ns.stop),
                          ignore_eos=ns.ignore_eos)


def run(ns: argparse.Namespace) -> int:
    """Generate and print: text as it streams, or JSON lines with --json."""
    params = sampling_params_from(ns)
    if ns.router:
        from pdserve.router.client import stream_from_router

        outputs = stream_from_router(ns.router, ns.prompt, params, security=client_security_from(ns))
    else:
        from pdserve.llm import LLM

        outputs = LLM(engine_args=engine_args_from(ns)).stream(ns.prompt, params)
    print_outputs(outputs, params.n, as_json=ns.json)
    return 0


def print_outputs(outputs, n: int, as_json: bool) -> None:
    """Print RequestOutput-like deltas: sample 0 streams live, other samples print when done."""
    completions = [{"index": i, "token_ids": [], "text": "", "finish_reason": None} for i in range(n)]
    for output in outputs:
        for delta in output.samples:
            done = completions[delta.index]
            done["token_ids"].extend(delta.token_ids)
            done["text"] += delta.text
            done["finish_reason"] = delta.finish_reason or done["finish_reason"]
            if not as_json and n == 1:
                sys.stdout.write(delta.text)
                sys.stdout.flush()
    if as_json:
        for done in completions:
            print(json.dumps(done, ensure_ascii=False))
    elif n == 1:
        print(f"\n[finish_reason: {completions[0]['finish_reason']}]", file=sys.stderr)
    else:
        for done in completions:
            print(f"--- sample {done['index']} ({done['finish_reason']})\n{done['text']}")
