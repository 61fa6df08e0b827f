"""Driving an HTTP server from tests: a Frontend served in this process on its own event loop
thread (so tests can shorten its timeouts and caps), one-shot requests, OpenAI error checks, and
a client that drips bytes the way a slow or hostile one does."""

from __future__ import annotations

import asyncio
import http.client
import json
import select
import socket
import threading
import time
from typing import Any

from pdserve.cli.cluster import LocalCluster
from pdserve.openai.frontend import Frontend, FrontendConfig
from pdserve.openai.limits import HttpOptions
from pdserve.openai.server import start_http


class InProcessFrontEnd:
    """A Frontend served by start_http on an event loop of its own thread, in this process."""

    def __init__(self, cluster: LocalCluster, model_dir: str, options: HttpOptions, **pool: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        config = FrontendConfig(router=cluster.router_address, model_dir=model_dir,
                                router_security=cluster.client_security(), **pool)
        self.front: Frontend = self._run(Frontend.connect(config))
        self.runner = self._run(start_http(self.front, "127.0.0.1", 0, options))
        host, port = self.runner.addresses[0][:2]
        self.address = f"{host}:{port}"

    def _run(self, coro) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def close(self) -> None:
        """Stop serving, close the Frontend, end the loop's thread."""
        self._run(self.runner.cleanup())
        self._run(self.front.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def call(address: str, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
         timeout: float = 120) -> tuple[int, dict[str, str], Any]:
    """(status, headers, JSON or text) of one request on a new connection. `body`: bytes, a dict
    (sent as JSON), or an iterator of bytes (sent chunked)."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    headers = {"Content-Type": "application/json", **(headers or {})}
    chunked = body is not None and not isinstance(body, (bytes, dict))
    if chunked:
        headers["Transfer-Encoding"] = "chunked"
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        conn.request(method, path, body=data, headers=headers, encode_chunked=chunked)
        response = conn.getresponse()
        raw = response.read().decode("utf-8", "replace")
        try:
            parsed: Any = json.loads(raw)
        except json.JSONDecodeError:
            parsed = raw
        return response.status, dict(response.headers), parsed
    finally:
        conn.close()


def assert_openai_error(status: int, body: Any, want_status: int, param: str | None = "any") -> None:
    """An OpenAI error body with `want_status` (and `param`, unless "any")."""
    assert status == want_status, (status, body)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"], body
    if param != "any":
        assert body["error"]["param"] == param, body


def health_latency(address: str) -> float:
    """Seconds GET /health took; it must answer 200 ok."""
    start = time.perf_counter()
    status, _, body = call(address, "GET", "/health", timeout=30)
    assert (status, body) == (200, {"status": "ok"})
    return time.perf_counter() - start


def drip(address: str, head: bytes, drip: bytes, limit_s: float) -> tuple[bytes, float | None]:
    """Send `head`, then `drip` every 0.1 s until the server closes the connection; returns what
    the server sent and when it closed (seconds after `head`; None if still open after limit_s)."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        start = time.monotonic()
        sock.sendall(head)
        received = b""
        while time.monotonic() - start < limit_s:
            try:
                if drip:
                    sock.sendall(drip)
                readable, _, _ = select.select([sock], [], [], 0.1)
                if readable:
                    data = sock.recv(65536)
                    if not data:
                        return received, time.monotonic() - start
                    received += data
            except (BrokenPipeError, ConnectionResetError):
                return received, time.monotonic() - start
        return received, None
