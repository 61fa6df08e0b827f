"""`pdserve demo`: the main job on a fresh machine: make the tiny model if needed, start a local
cluster (embedded Redis, a prefill and a decode server, the router), stream a generation
through the router's public API, and stop the cluster."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pdserve.models.sampling_params import SamplingParams

# The default model learned the start of the packaged short story by heart (see ensure_tiny_model),
# so a prompt from it shows real words streaming; other prompts get English-like fragments.
DEFAULT_PROMPT = "Every evening at a quarter past six, Ansel Morrow"
TINY_MODEL_TRAIN_STEPS = 600  # about 20 s on 2 CPU cores, once


def default_model_dir() -> Path:
    """Where the demo keeps its tiny model ($PDSERVE_HOME or ~/.cache/pdserve)."""
    home = Path(os.environ.get("PDSERVE_HOME", Path.home() / ".cache" / "pdserve"))
    return home / "tiny-llama-trained"


def ensure_tiny_model(model_dir: Path) -> Path:
    """Make the default checkpoint once (later runs reuse it): the tiny Llama (about 1.6M
    parameters) trained briefly on the start of the packaged corpus, so that it writes words
    rather than the byte soup of random weights. It knows only that text: a demo, not a model."""
    if not (model_dir / "model.safetensors").is_file():
        from pdserve.models.tiny_model import make_tiny_model

        print(f"making the demo model in {model_dir}: a tiny Llama trained {TINY_MODEL_TRAIN_STEPS} steps "
              "on the start of a short story (about 20 s, once)", flush=True)
        make_tiny_model(model_dir, arch="llama", seed=0, size="tiny", train_steps=TINY_MODEL_TRAIN_STEPS)
    return model_dir


def register(sub: argparse._SubParsersAction) -> None:
    """Add the demo subcommand."""
    p = sub.add_parser("demo", help="make the tiny model if needed and stream a generation")
    p.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    p.add_argument("--model", default=None, help="checkpoint directory, .gguf file or Hub id ORG/NAME[@REVISION] "
                                                 "(default: the tiny demo model, trained on the start of the "
                                                 "packaged short story)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--in-process", action="store_true", help="no cluster: run the engine in this process")
    p.set_defaults(run=run)


def run(ns: argparse.Namespace) -> int:
    """Stream the generation to the terminal."""
    from pdserve.cli.generate import print_outputs

    model_dir = ns.model or ensure_tiny_model(default_model_dir())
    params = SamplingParams(max_tokens=ns.max_tokens, temperature=0.7, top_p=0.95, seed=0)
    if ns.in_process:
        from pdserve.llm import LLM

        print(f"prompt: {ns.prompt}")
        print_outputs(LLM(str(model_dir)).stream(ns.prompt, params), 1, as_json=False)
        return 0
    from pdserve.cli.cluster import LocalCluster
    from pdserve.router.client import stream_from_router

    with LocalCluster(str(model_dir), prefill=1, decode=1) as cluster:
        print(f"cluster up: router {cluster.router_address}, 1 prefill, 1 decode, embedded Redis")
        print(f"prompt: {ns.prompt}")
        print_outputs(stream_from_router(cluster.router_address, ns.prompt, params), 1, as_json=False)
    print("cluster stopped")
    return 0
