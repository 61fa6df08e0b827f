"""`pdserve make-tiny-model`: write a small random-weight Hugging Face checkpoint."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the make-tiny-model subcommand."""
    p = sub.add_parser("make-tiny-model", help="write a random-weight Llama-family checkpoint directory")
    p.add_argument("dir", help="output directory (created)")
    p.add_argument("--arch", choices=["llama", "qwen2", "mistral"], default="llama")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="tiny", help="tiny (default, fast on 2 CPU cores), small, or base")
    p.add_argument("--train-steps", type=int, default=0, metavar="N",
                   help="then train the random weights N AdamW steps on the start of the packaged corpus "
                        "(peaked, real-model-like distributions; tiny: 600 steps ~20 s); default 0: random")
    p.add_argument("--tokenizer-size", default=None, help="use this size's tokenizer (a draft model for "
                   "--speculative draft shares its model's: e.g. --size tiny --tokenizer-size small)")
    p.add_argument("--copy-training", action="store_true", help="half the training windows teach copying a passage "
                   "from the context, as real models do (what n-gram speculation relies on)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Write the checkpoint and say where it is."""
    from pdserve.models.tiny_model import make_tiny_model

    path = make_tiny_model(args.dir, arch=args.arch, seed=args.seed, size=args.size, train_steps=args.train_steps,
                           tokenizer_size=args.tokenizer_size, copy_training=args.copy_training)
    trained = f", trained {args.train_steps} steps" if args.train_steps else ""
    print(f"wrote {args.arch} ({args.size}, seed {args.seed}{trained}) checkpoint to {path}")
    return 0
