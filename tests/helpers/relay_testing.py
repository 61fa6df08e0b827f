"""Drives a ProgressRecorder the way the router's relay does: per-sample state that grows as
chunks and completions go to the client, followed by the recorder after each step."""

from __future__ import annotations

from pdserve.router.progress import ProgressRecorder
from pdserve.router.responses import SampleProgressState


class Relay:
    """The relay's sample states for one request (starting from `sent`, as after a resume)."""

    def __init__(self, recorder: ProgressRecorder, n: int, sent: list[list[int]] | None = None):
        self.recorder = recorder
        self.samples = [SampleProgressState(token_ids=list(tokens)) for tokens in (sent or [[] for _ in range(n)])]

    def chunk(self, index: int, token_ids: list[int]) -> None:
        """Tokens of sample `index` went to the client."""
        self.samples[index].token_ids.extend(token_ids)
        self.recorder.follow(self.samples)

    def done(self, index: int, reason: str) -> None:
        """Sample `index` finished with `reason`."""
        self.samples[index].finish_reason = reason
        self.recorder.follow(self.samples)
