"""In-process generation: the continuous-batching engine in this process, no servers.

    llm = LLM("path/to/checkpoint")
    for piece in llm.stream("Once upon a time", SamplingParams(max_tokens=32)):
        print(piece, end="")
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from pdserve.engine.outputs import GenerationResult, RequestOutput
from pdserve.engine.setup import EngineArgs, build_engine
from pdserve.models.sampling_params import SamplingParams


class LLM:
    """A model and its engine in this process; prompts are text or token-id lists."""

    def __init__(self, model: str | None = None, *, engine_args: EngineArgs | None = None, **kwargs):
        args = engine_args or EngineArgs(model=model, **kwargs)
        self.engine, self.tokenizer = build_engine(args)
        self._ids = itertools.count()

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def generate(self, prompts: str | list[int] | list[str | list[int]],
                 params: SamplingParams | None = None) -> list[GenerationResult]:
        """Run prompts to completion together (continuous batching); results in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self.engine.generate([self._prompt_ids(p) for p in prompts], params or SamplingParams())

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield the request's per-step outputs (new tokens and text of each sample) as they come."""
        request_id = f"llm-{next(self._ids)}"
        self.engine.add_request(request_id, self._prompt_ids(prompt), params or SamplingParams())
        try:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.request_id == request_id:
                        yield output
        finally:
            if self.engine.has_unfinished_requests():  # the caller stopped early
                self.engine.abort_request(request_id)
                while self.engine.has_unfinished_requests():
                    self.engine.step()
