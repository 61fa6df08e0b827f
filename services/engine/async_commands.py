"""The commands AsyncEngine's event loop sends to its engine thread, and their small helpers."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pdserve.engine.chunk_info import ChunkInfo, LayerHook

if TYPE_CHECKING:
    from pdserve.engine.engine import LLMEngine


@dataclass
class Add:
    """Command: add a request; add(engine) calls add_request or add_prefilled_request with the
    engine-side request_id, whose stream receives the error if the engine rejects it."""

    request_id: str
    add: Callable[[LLMEngine], None]


@dataclass
class Call:
    """Command: run fn(engine) and settle `future` (if any) with its result or error."""

    fn: Callable[[LLMEngine], Any]
    future: asyncio.Future | None = None


@dataclass
class Abort:
    """Command: abort a request (engine-side id)."""

    request_id: str


class Stop:
    """Command: end the engine thread."""


def settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    """Set a call's result or error unless its caller gave up on it (event loop thread)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def caller_request_id(engine_id: str) -> str:
    """The caller's request id inside an engine-side id ("<caller id>#<submission number>")."""
    return engine_id.rsplit("#", 1)[0]


class CallerIdHook:
    """Wraps a layer hook so that it sees the callers' request ids, not the engine-side ones."""

    def __init__(self, hook: LayerHook) -> None:
        self.hook = hook
        self._source: object = None
        self._translated: list[ChunkInfo] = []

    def __call__(self, layer_index: int, infos: Sequence[ChunkInfo]) -> None:
        if infos is not self._source:  # a new step: translate once, reuse for every layer
            self._source = infos
            self._translated = [dataclasses.replace(i, request_id=caller_request_id(i.request_id))
                                for i in infos]
        self.hook(layer_index, self._translated)
