"""`pdserve demo`: the main job on a fresh machine: make the tiny model if needed, start a local
cluster (embedded Redis, a prefill and a decode server, the router), stream a generation
through the router's public API, and stop the cluster."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from models.sampling_params import SamplingParams

DEFAULT_PROMPT = "Once upon a time, in a city of servers,"


def default_model_dir() -> Path:
    """Where the demo keeps its tiny model ($PDSERVE_HOME or ~/.cache/pdserve)."""
    home = Path(os.environ.get("PDSERVE_HOME", Path.home() / ".cache" / "pdserve"))
    return home / "tiny-llama"


def ensure_tiny_model(model_dir: Path) -> Path:
    """Make the default tiny checkpoint once; later runs reuse it."""
    if not (model_dir / "model.safetensors").is_file():
        from models.tiny_model import make_tiny_model

        make_tiny_model(model_dir, arch="llama", seed=0, size="tiny")
        print(f"made a tiny llama checkpoint in {model_dir}")
    return model_dir


def register(sub: argparse._SubParsersAction) -> None:
    """Add the demo subcommand."""
    p = sub.add_parser("demo", help="make the tiny model if needed and stream a generation")
    p.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the tiny model)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--in-process", action="store_true", help="no cluster: run the engine in this process")
    p.set_defaults(run=run)


def run(ns: argparse.Namespace) -> int:
    """Stream the generation to the terminal."""
    from services.cli_generate import print_outputs

    model_dir = Path(ns.model) if ns.model else ensure_tiny_model(default_model_dir())
    params = SamplingParams(max_tokens=ns.max_tokens, temperature=0.8, top_p=0.95, seed=0)
    if ns.in_process:
        from services.llm import LLM

        print(f"prompt: {ns.prompt}")
        print_outputs(LLM(str(model_dir)).stream(ns.prompt, params), 1, as_json=False)
        return 0
    from services.cluster import LocalCluster
    from services.router_client import stream_from_router

    with LocalCluster(str(model_dir), prefill=1, decode=1) as cluster:
        print(f"cluster up: router {cluster.router_address}, 1 prefill, 1 decode, embedded Redis")
        print(f"prompt: {ns.prompt}")
        print_outputs(stream_from_router(cluster.router_address, ns.prompt, params), 1, as_json=False)
    print("cluster stopped")
    return 0
