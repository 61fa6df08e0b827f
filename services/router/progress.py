"""Records a stream's progress in Redis off the relay path: the relay lets the recorder follow its
per-sample state without waiting, and one background writer sends whatever accumulated in a
single round trip.

The recorder keeps the whole request (prompt, parameters, seed, every token sent, finish
reasons), so when Redis loses the record (it restarted empty) or a write fails, it rewrites the
record whole, TTLs included, as soon as Redis answers again."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from pdserve.state.request_store import RequestRecord, RequestStore

logger = logging.getLogger("pdserve.router")

# Writers still retrying after their stream ended (Redis away): the loop holds tasks only weakly.
_LINGERING: set[asyncio.Task] = set()


class ProgressRecorder:
    """Coalesces a request's tokens and finish reasons and writes them in order, in the
    background; close() flushes the rest. A Redis error is logged, never raised into the stream:
    the client's tokens keep flowing while Redis is away, and the record is rewritten whole once
    it answers again.

    prompt_token_ids, params (the dict given to RequestStore.create, with "n"), seed and owner
    (the identity the request is bound to) are what a rewrite needs besides the tokens.
    resume_from: the record as Redis holds it when this recorder continues a request another
    one started (its tokens count as written).
    close_wait_s: how long close() waits for the last write; after that the writer keeps
    retrying in the background for up to give_up_s, so the stream's end never waits on Redis."""

    def __init__(self, store: RequestStore, request_id: str, prompt_token_ids: list[int], params: dict,
                 seed: int, *, owner: str = "", resume_from: RequestRecord | None = None,
                 close_wait_s: float = 2.0, give_up_s: float = 60.0):
        n = int(params.get("n", 1))
        self.store = store
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = dict(params)
        self.seed = seed
        self.owner = owner
        self.close_wait_s = close_wait_s
        self.give_up_s = give_up_s
        base = resume_from.sent_tokens if resume_from else [[] for _ in range(n)]
        self.sent: list[list[int]] = [list(tokens) for tokens in base]  # everything sent, per sample
        self.finished: list[str | None] = list(resume_from.finished) if resume_from else [None] * n
        self._written = [len(tokens) for tokens in self.sent]  # how much of self.sent Redis holds
        self._finished_written = [r is not None for r in self.finished]
        self._needs_rewrite = False
        self._failing_since: float | None = None
        self._closed_at: float | None = None
        self._wake = asyncio.Event()
        self._writer = asyncio.create_task(self._write_forever())

    def follow(self, samples) -> None:
        """Catch up with the relay's per-sample state (token_ids, finish_reason): what the
        client holds, including re-generated tokens a resume dropped because it had them."""
        changed = False
        for index, sample in enumerate(samples):
            known = self.sent[index]
            if len(sample.token_ids) > len(known):
                known.extend(sample.token_ids[len(known):])
                changed = True
            if sample.finish_reason is not None and self.finished[index] is None:
                self.finished[index] = sample.finish_reason
                changed = True
        if changed:
            self._wake.set()

    def synced(self) -> bool:
        """Whether Redis holds everything recorded so far (as far as this recorder knows)."""
        return (not self._needs_rewrite and self._written == [len(t) for t in self.sent]
                and self._finished_written == [r is not None for r in self.finished])

    def snapshot(self) -> RequestRecord:
        """The whole request as this recorder knows it (what a rewrite writes)."""
        return RequestRecord(self.request_id, self.prompt_token_ids, self.params, self.seed,
                             [list(tokens) for tokens in self.sent], list(self.finished), self.owner)

    async def _write_forever(self) -> None:
        loop = asyncio.get_running_loop()
        backoff: float | None = None  # None: in sync, wait for news; else: retry after this long
        while True:
            if backoff is None:
                await self._wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), backoff)
            self._wake.clear()
            if await self._flush():
                backoff = None
                if self._closed_at is not None and self.synced():
                    return
            elif self._closed_at is not None and loop.time() - self._closed_at > self.give_up_s:
                logger.warning("gave up recording the end of %s in Redis after %.0f s: its record "
                               "there is incomplete", self.request_id, self.give_up_s)
                return
            else:
                backoff = min(2 * (backoff or 0.05), 2.0)

    async def _flush(self) -> bool:
        """Write what Redis lacks; True when Redis holds everything recorded so far."""
        try:
            if not self._needs_rewrite:
                if await self._append():
                    return self._recovered()
                logger.warning("the Redis record of %s is gone or differs (Redis restarted?): "
                               "rewriting it whole", self.request_id)
            await self._rewrite()
            return self._recovered()
        except Exception as exc:  # noqa: BLE001 - Redis away or failing: the stream goes on
            self._needs_rewrite = True  # we cannot know what reached Redis: rewrite it all
            if self._failing_since is None:
                self._failing_since = asyncio.get_running_loop().time()
                logger.warning("recording progress of %s in Redis failed (will rewrite it when "
                               "Redis answers): %s", self.request_id, exc)
            return False

    async def _append(self) -> bool:
        """Append what was recorded since the last write; False when Redis lacks the record."""
        counts = [len(tokens) for tokens in self.sent]
        tokens = {i: self.sent[i][self._written[i]:counts[i]] for i in range(len(counts))
                  if counts[i] > self._written[i]}
        finished = {i: r for i, r in enumerate(self.finished) if r is not None and not self._finished_written[i]}
        if not tokens and not finished:
            return True
        offsets = {i: self._written[i] for i in tokens}
        if not await self.store.record_progress(self.request_id, tokens, finished, offsets, n=len(counts)):
            return False
        self._written = counts
        for i in finished:
            self._finished_written[i] = True
        return True

    async def _rewrite(self) -> None:
        record = self.snapshot()  # taken before the await: later tokens stay pending
        await self.store.rewrite(record)
        self._written = [len(tokens) for tokens in record.sent_tokens]
        self._finished_written = [r is not None for r in record.finished]
        self._needs_rewrite = False

    def _recovered(self) -> bool:
        if self._failing_since is not None:
            logger.info("recording progress of %s in Redis works again; its record is whole", self.request_id)
            self._failing_since = None
        return True

    async def close(self) -> None:
        """Write what is still pending, waiting up to close_wait_s; if Redis is away the writer
        goes on retrying in the background (up to give_up_s) and this returns."""
        if self._closed_at is None:
            self._closed_at = asyncio.get_running_loop().time()
        self._wake.set()
        done, _ = await asyncio.wait({self._writer}, timeout=self.close_wait_s)
        if not done:
            _LINGERING.add(self._writer)
            self._writer.add_done_callback(_LINGERING.discard)

    async def wait_closed(self) -> None:
        """After close(): wait until the writer has stopped (everything written, or given up)."""
        await asyncio.shield(self._writer)


async def wait_for_lingering_writers(timeout_s: float) -> int:
    """Give recorders still retrying after their streams ended (Redis away) up to timeout_s to
    finish, e.g. at router shutdown; returns how many were still retrying when it returned."""
    if _LINGERING:
        await asyncio.wait(set(_LINGERING), timeout=timeout_s)
    return len(_LINGERING)
