"""Flags with PDSERVE_* environment-variable equivalents (what compose and Kubernetes pass)."""

from __future__ import annotations

import argparse
import os


def env_default(flag: str, default=None, kind=str):
    """Default for `--some-flag`: $PDSERVE_SOME_FLAG when set (converted by `kind`), else `default`."""
    name = "PDSERVE_" + flag.lstrip("-").replace("-", "_").upper()
    raw = os.environ.get(name)
    if raw is None:
        return default
    if kind is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    try:
        return kind(raw)
    except ValueError as exc:
        raise SystemExit(f"pdserve: error: ${name}={raw!r} is not a valid {kind.__name__}") from exc


def add_flag(parser: argparse.ArgumentParser, flag: str, default=None, kind=str, help: str = "",
             **kwargs) -> None:
    """Add `flag` whose default comes from its PDSERVE_* variable; help text names the variable."""
    env = "PDSERVE_" + flag.lstrip("-").replace("-", "_").upper()
    if kind is bool:
        parser.add_argument(flag, action="store_true", default=env_default(flag, default or False, bool),
                            help=f"{help} [env {env}]", **kwargs)
    else:
        parser.add_argument(flag, type=kind, default=env_default(flag, default, kind),
                            help=f"{help} [env {env}]", **kwargs)
