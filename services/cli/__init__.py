"""`pdserve` command line: one subcommand per job; each subcommand's flags live in its own module
(the shared flag groups in pdserve.cli.flags). Also here: the local cluster that `up`, the demo
and the tests start (cluster.py) and the Docker healthcheck (`python -m pdserve.cli.healthcheck`)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """The full parser; every flag also reads a PDSERVE_* environment variable (see pdserve.cli.flags)."""
    from pdserve.cli import bench, demo, generate, serve, tiny_model, up

    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tiny_model.register(sub)
    generate.register(sub)
    demo.register(sub)
    serve.register(sub)
    up.register(sub)
    bench.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `pdserve` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line for the user, not a traceback
        from pdserve.models.config import ModelLoadError
        from pdserve.models.sampling_params import SamplingParamsError

        if isinstance(exc, (ModelLoadError, SamplingParamsError, ValueError, FileNotFoundError)):
            print(f"pdserve {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise

