"""`pdserve` command line: one subcommand per job; each subcommand's flags live in its own module."""

from __future__ import annotations

import argparse
import sys

from services import cli_demo, cli_generate, cli_models, cli_serve, cli_up
from services import cli_bench


def build_parser() -> argparse.ArgumentParser:
    """The full parser; every flag also reads a PDSERVE_* environment variable (see cli_env)."""
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    cli_models.register(sub)
    cli_generate.register(sub)
    cli_demo.register(sub)
    cli_serve.register(sub)
    cli_up.register(sub)
    cli_bench.register(sub)
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
        from models.config import ModelLoadError
        from models.sampling_params import SamplingParamsError

        if isinstance(exc, (ModelLoadError, SamplingParamsError, ValueError, FileNotFoundError)):
            print(f"pdserve {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
