"""AsyncEngine: drives an LLMEngine from asyncio without ever blocking the event loop.

The engine lives in one dedicated thread, the only one that touches it. The event loop sends
commands (add, abort, stop) through a thread-safe queue; the engine thread applies them between
steps, runs step(), and hands the outputs back with loop.call_soon_threadsafe to one
asyncio.Queue per request. While nothing is running the thread blocks on the command queue.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Sequence as Seq
from dataclasses import dataclass

from models.sampling_params import SamplingParams
from services.engine.engine import LLMEngine
from services.engine.outputs import RequestOutput
from services.engine.stats import EngineStats


@dataclass
class _Add:
    """Command: add a request to the engine."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class _Abort:
    """Command: abort a request."""

    request_id: str


class _Stop:
    """Command: end the engine thread."""


class EngineDeadError(RuntimeError):
    """The engine thread failed; every open stream gets this error."""


class AsyncEngine:
    """The engine for asyncio servers.

    generate() yields RequestOutput deltas until the request finishes; leaving the iteration
    early (client gone, task cancelled) aborts the request. start() must run inside the event
    loop that will consume the outputs.
    """

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}  # engine-side id -> the request's stream
        self._engine_ids: dict[str, str] = {}  # caller's request id -> engine-side id
        self._submissions = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stats = engine.stats()
        self._error: BaseException | None = None

    def start(self) -> None:
        """Start the engine thread, bound to the running event loop."""
        if self._thread is not None:
            raise RuntimeError("AsyncEngine already started")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="pdserve-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop the engine thread after its current step (running requests are dropped)."""
        if self._thread is None:
            return
        self._commands.put(_Stop())
        self._thread.join(timeout)
        self._thread = None

    @property
    def is_running(self) -> bool:
        """True while the engine thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> EngineStats:
        """The snapshot taken after the engine's latest step (safe from any thread)."""
        return self._stats

    async def generate(self, request_id: str, prompt_token_ids: Seq[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs as steps produce them.

        Raises ValueError (from the first iteration) for a request the engine rejects.
        """
        if self._thread is None:
            raise RuntimeError("AsyncEngine.start() was not called")
        if self._error is not None:
            raise EngineDeadError(f"the engine thread failed: {self._error!r}")
        if request_id in self._engine_ids:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.engine.validate_request(prompt_token_ids, params)  # pure: reads only config
        # A unique engine-side id, so a reused caller id never receives an old request's output.
        engine_id = f"{request_id}#{next(self._submissions)}"
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[engine_id] = stream
        self._engine_ids[request_id] = engine_id
        self._commands.put(_Add(engine_id, [int(t) for t in prompt_token_ids], params))
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine never accepted it, or died: nothing to abort
                    raise item
                finished = item.finished
                item.request_id = request_id
                yield item
        finally:
            del self._streams[engine_id]
            del self._engine_ids[request_id]
            if not finished:
                self._commands.put(_Abort(engine_id))

    async def abort(self, request_id: str) -> bool:
        """Abort a request; its stream ends with a finish_reason "abort" output. False when
        no stream of this id is open."""
        engine_id = self._engine_ids.get(request_id)
        if engine_id is None:
            return False
        self._commands.put(_Abort(engine_id))
        return True

    # ---- engine thread ----

    def _run(self) -> None:
        try:
            while True:
                idle = not self.engine.has_unfinished_requests()
                if not self._apply_commands(block=idle):
                    return
                if not self.engine.has_unfinished_requests():
                    continue
                outputs = self.engine.step()
                self._stats = self.engine.stats()
                if outputs:
                    self._loop.call_soon_threadsafe(self._deliver, outputs)
        except BaseException as exc:  # noqa: BLE001 - every stream must learn the engine is gone
            self._error = exc
            self._loop.call_soon_threadsafe(self._fail_all, exc)

    def _apply_commands(self, block: bool) -> bool:
        """Apply queued commands (waiting for one if block); False on stop."""
        try:
            command = self._commands.get() if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if isinstance(command, _Stop):
                return False
            if isinstance(command, _Add):
                try:
                    self.engine.add_request(command.request_id, command.prompt_token_ids, command.params)
                except ValueError as exc:
                    self._loop.call_soon_threadsafe(self._deliver_error, command.request_id, exc)
            elif isinstance(command, _Abort):
                self.engine.abort_request(command.request_id)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    # ---- event loop side ----

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.put_nowait(output)

    def _deliver_error(self, request_id: str, exc: BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(exc)

    def _fail_all(self, exc: BaseException) -> None:
        error = EngineDeadError(f"the engine thread failed: {exc!r}")
        error.__cause__ = exc
        for stream in self._streams.values():
            stream.put_nowait(error)
