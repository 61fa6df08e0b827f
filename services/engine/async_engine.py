"""AsyncEngine: drives an LLMEngine from asyncio without ever blocking the event loop.

The engine lives in one dedicated thread, the only one that touches it. The event loop sends
commands (add, add prefilled, abort, reservation calls, stop) through a thread-safe queue; the
engine thread applies them in order between steps, runs step(), and hands the outputs back with
loop.call_soon_threadsafe to one asyncio.Queue per request (or to the future of a call). While
nothing is running the thread blocks on the command queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from pdserve.engine.async_commands import Abort, Add, Call, CallerIdHook, Stop, settle
from pdserve.engine.chunk_info import LayerHook
from pdserve.engine.engine import LLMEngine
from pdserve.engine.outputs import RequestOutput
from pdserve.engine.stats import EngineStats
from pdserve.models.sampling_params import SamplingParams
from pdserve.runtime.errors import PdserveError


class EngineDeadError(RuntimeError):
    """The engine thread failed; every open stream gets this error."""


class AsyncEngine:
    """The engine for asyncio servers.

    generate() / generate_prefilled() yield RequestOutput deltas until the request finishes;
    leaving the iteration early (client gone, task cancelled) aborts the request. start() must
    run inside the event loop that will consume the outputs. layer_hook (a prefill server's),
    if given, is passed to every step; it runs in the engine thread and sees the callers'
    request ids in its ChunkInfos.
    """

    def __init__(self, engine: LLMEngine, layer_hook: LayerHook | None = None) -> None:
        self.engine = engine
        self._layer_hook = CallerIdHook(layer_hook) if layer_hook is not None else None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}  # engine-side id -> the request's stream
        self._engine_ids: dict[str, str] = {}  # caller's request id -> engine-side id
        self._submissions = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stats = engine.stats()
        self._error: BaseException | None = None
        self._calls: set[asyncio.Future] = set()  # futures of Call commands not yet settled
        self._aborting: set[str] = set()  # engine-side ids with an Abort queued, not yet applied
        self._aborting_lock = threading.Lock()  # the loop adds, the engine thread reads and removes
        self.on_failure: Callable[[BaseException], None] | None = None  # called on the loop when the thread fails

    def start(self) -> None:
        """Start the engine thread, bound to the running event loop."""
        if self._thread is not None:
            raise RuntimeError("AsyncEngine already started")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="pdserve-engine", daemon=True)
        self._thread.start()

    @property
    def failed(self) -> bool:
        """True once the engine thread has failed (every stream then got EngineDeadError)."""
        return self._error is not None

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop the engine thread after its current step (running requests are dropped)."""
        if self._thread is None:
            return
        self._commands.put(Stop())
        self._thread.join(timeout)
        self._thread = None

    @property
    def is_running(self) -> bool:
        """True while the engine thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> EngineStats:
        """The snapshot taken after the engine's latest step (safe from any thread)."""
        return self._stats

    async def generate(self, request_id: str, prompt_token_ids: Sequence[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs as steps produce them.

        Raises ValueError (from the first iteration) for a request the engine rejects.
        """
        self._check_open(request_id)
        self.engine.validate_request(prompt_token_ids, params)  # pure: reads only config
        await self._prepare_constraint(params)
        prompt = [int(t) for t in prompt_token_ids]

        def command(engine_id: str) -> Add:
            return Add(engine_id, lambda engine: engine.add_request(engine_id, prompt, params))

        # aclosing: leaving this stream early must close the inner one now (its cleanup aborts).
        async with contextlib.aclosing(self._stream(request_id, command)) as outputs:
            async for output in outputs:
                yield output

    async def generate_prefilled(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams,
                                 generated: Sequence[Sequence[int]], sample_indices: Sequence[int] | None = None,
                                 reservation_id: str | None = None, cached_tokens: int = 0
                                 ) -> AsyncIterator[RequestOutput]:
        """Continue a request another server started (see LLMEngine.add_prefilled_request) and
        yield its outputs; the first output of each sample carries the generated tokens' text.

        The reservation is consumed once the iteration starts, whatever happens. Raises (from
        the first iteration) NotFoundError for a reservation that is not open, ValueError for
        a request the engine rejects.
        """
        try:
            self._check_open(request_id)
            await self._prepare_constraint(params)
        except BaseException:
            if reservation_id is not None and self._thread is not None:
                self._commands.put(Call(lambda engine: engine.release_reservation(reservation_id)))
            raise
        prompt = [int(t) for t in prompt_token_ids]
        progress = [[int(t) for t in tokens] for tokens in generated]
        indices = None if sample_indices is None else list(sample_indices)

        def command(engine_id: str) -> Add:
            return Add(engine_id, lambda engine: engine.add_prefilled_request(
                engine_id, prompt, params, progress, indices, reservation_id, cached_tokens))

        # aclosing: leaving this stream early must close the inner one now (its cleanup aborts).
        async with contextlib.aclosing(self._stream(request_id, command)) as outputs:
            async for output in outputs:
                yield output

    async def _prepare_constraint(self, params: SamplingParams) -> None:
        """Compile a structured-output constraint on a worker thread (it may take long: off the event loop and the
        engine's thread); unconstrained requests go on at once (no thread hop)."""
        if params.structured is not None:
            await asyncio.to_thread(self.engine.prepare_constraint, params)

    def _check_open(self, request_id: str) -> None:
        """Raise unless a new stream with this id may open now."""
        if self._thread is None:
            raise RuntimeError("AsyncEngine.start() was not called")
        if self._error is not None:
            raise EngineDeadError(f"the engine thread failed: {self._error!r}")
        if request_id in self._engine_ids:
            raise ValueError(f"request id {request_id!r} is already in use")

    async def _stream(self, request_id: str, make_command: Callable[[str], Add]
                      ) -> AsyncIterator[RequestOutput]:
        """Send the command that adds the request (under a fresh engine-side id) and relay its
        outputs; leaving early aborts it."""
        # A unique engine-side id, so a reused caller id never receives an old request's output.
        engine_id = f"{request_id}#{next(self._submissions)}"
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[engine_id] = stream
        self._engine_ids[request_id] = engine_id
        self._commands.put(make_command(engine_id))
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
                self._send_abort(engine_id)

    async def abort(self, request_id: str) -> bool:
        """Abort a request; its stream ends with a finish_reason "abort" output. False when
        no stream of this id is open."""
        engine_id = self._engine_ids.get(request_id)
        if engine_id is None:
            return False
        self._send_abort(engine_id)
        return True

    def _send_abort(self, engine_id: str) -> None:
        """Queue an Abort; until the engine thread applies it, a step computing the request
        drops it after the current layer (LLMEngine.step's aborting)."""
        with self._aborting_lock:
            self._aborting.add(engine_id)
        self._commands.put(Abort(engine_id))

    async def reserve(self, reservation_id: str, num_prompt_tokens: int,
                      expires_at: float | None = None) -> list[int]:
        """LLMEngine.reserve in the engine thread: the reserved block ids, in logical order.
        Raises what it raises (OverloadedError when too few blocks are free). If the caller is
        cancelled meanwhile, the reservation is released."""
        return await self._reserve(reservation_id, lambda e: e.reserve(reservation_id, num_prompt_tokens, expires_at))

    async def reserve_prompt(self, reservation_id: str, prompt_token_ids: Sequence[int],
                             expires_at: float | None = None) -> tuple[list[int], int]:
        """LLMEngine.reserve_prompt in the engine thread: (the reserved block ids in logical order,
        how many leading ones already hold the prompt's KV). Errors and cancellation as reserve()."""
        def reserve(engine: LLMEngine) -> tuple[list[int], int]:
            reservation = engine.reserve_prompt(reservation_id, prompt_token_ids, expires_at)
            return reservation.block_ids, reservation.held_blocks

        return await self._reserve(reservation_id, reserve)

    async def _reserve(self, reservation_id: str, reserve: Callable[[LLMEngine], Any]) -> Any:
        made: list[bool] = []  # set in the engine thread once the reservation exists

        def reserve_and_note(engine: LLMEngine) -> Any:
            result = reserve(engine)
            made.append(True)
            return result

        try:
            return await self._call(reserve_and_note)
        except asyncio.CancelledError:
            # Runs after `reserve` in the engine thread, so `made` is final by then.
            self._commands.put(Call(lambda engine: made and engine.release_reservation(reservation_id)))
            raise

    async def release_reservation(self, reservation_id: str) -> bool:
        """LLMEngine.release_reservation in the engine thread (False when not open)."""
        return await self._call(lambda e: e.release_reservation(reservation_id))

    async def extend_reservations(self, expiries: dict[str, float]) -> None:
        """LLMEngine.extend_reservation in the engine thread, for each (reservation id, expires_at)."""
        await self._call(lambda e: [e.extend_reservation(rid, at) for rid, at in expiries.items()])

    async def expire_reservations(self, now: float) -> list[str]:
        """LLMEngine.expire_reservations in the engine thread: the ids it released."""
        return await self._call(lambda e: e.expire_reservations(now))

    async def run_between_steps(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """fn(engine) in the engine thread, between steps (after the step running now, whose layer
        hooks have all returned by then); its result."""
        return await self._call(fn)

    async def _call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run fn(engine) in the engine thread, between steps, and return its result."""
        if self._thread is None:
            raise RuntimeError("AsyncEngine.start() was not called")
        if self._error is not None:
            raise EngineDeadError(f"the engine thread failed: {self._error!r}")
        future = asyncio.get_running_loop().create_future()
        self._calls.add(future)
        self._commands.put(Call(fn, future))
        try:
            return await future
        finally:
            self._calls.discard(future)

    # ---- engine thread ----

    def _run(self) -> None:
        try:
            while True:
                idle = not self.engine.has_unfinished_requests()
                if not self._apply_commands(block=idle):
                    return
                if not self.engine.has_unfinished_requests():
                    continue
                outputs = self.engine.step(layer_hook=self._layer_hook, aborting=self._aborting_of)
                self._stats = self.engine.stats()
                if outputs:
                    self._loop.call_soon_threadsafe(self._deliver, outputs)
        except BaseException as exc:  # noqa: BLE001 - every stream must learn the engine is gone
            self._error = exc
            self._loop.call_soon_threadsafe(self._fail_all, exc)

    def _aborting_of(self, engine_ids: set[str]) -> set[str]:
        """Those of engine_ids with an Abort queued (engine thread; LLMEngine.step's aborting)."""
        with self._aborting_lock:
            return engine_ids & self._aborting

    def _apply_commands(self, block: bool) -> bool:
        """Apply queued commands (waiting for one if block); False on stop."""
        try:
            command = self._commands.get() if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if isinstance(command, Stop):
                return False
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                self._stats = self.engine.stats()
                return True

    def _apply(self, command: Add | Abort | Call) -> None:
        """Apply one command; a request the engine refuses gets the error on its stream, a
        call's error goes to its caller."""
        if isinstance(command, Add):
            try:
                command.add(self.engine)
            except (ValueError, PdserveError) as exc:
                self._loop.call_soon_threadsafe(self._deliver_error, command.request_id, exc)
        elif isinstance(command, Abort):
            self.engine.abort_request(command.request_id)
            with self._aborting_lock:
                self._aborting.discard(command.request_id)
        else:
            try:
                result, error = command.fn(self.engine), None
            except (ValueError, PdserveError) as exc:
                result, error = None, exc
            self._stats = self.engine.stats()  # the caller may read stats() as soon as it resumes
            if command.future is not None:
                self._loop.call_soon_threadsafe(settle, command.future, result, error)

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
        for future in self._calls:
            settle(future, None, error)
        if self.on_failure is not None:
            self.on_failure(exc)

