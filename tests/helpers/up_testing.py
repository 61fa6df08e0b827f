"""Run `pdserve up` as a user does, in a process group of its own that the test can always end."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

UP_LINE = "pdserve cluster up: router at "
OPENAI_LINE = "OpenAI-compatible API at "


@contextlib.contextmanager
def pdserve_up(*args: str, until: str = UP_LINE, cwd: Path | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    """Start `pdserve up ARGS` and read its output up to the line starting with `until`; yields (the process,
    that line). If `up` exits first, AssertionError with its output. On leaving, `up` and whatever it started
    are killed by process group unless the test has already stopped it."""
    up = subprocess.Popen([sys.executable, "-P", "-m", "pdserve.cli", "up", *args], cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = []
        for line in up.stdout:  # ends at EOF if `up` dies, with its output kept for the message
            lines.append(line)
            if line.startswith(until):
                break
        assert lines and lines[-1].startswith(until), "".join(lines)[-3000:]
        yield up, lines[-1]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(up.pid, signal.SIGKILL)  # the group up leads: up and what it started, on failure
        up.wait()


def stop_up(up: subprocess.Popen) -> str:
    """SIGINT `up` (Ctrl-C) and return the rest of its output, asserting it stopped cleanly."""
    up.send_signal(signal.SIGINT)
    rest = up.communicate(timeout=60)[0]
    assert up.returncode == 0 and "pdserve cluster stopped" in rest, rest[-3000:]
    return rest
