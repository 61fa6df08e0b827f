"""Folding TokenEvents into whole choices (non-streaming responses) and into usage counts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pdserve.openai.router_link import TokenEvent


@dataclass
class ChoiceResult:
    """Everything one choice produced: text, token ids, per-token logprobs and alternatives."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class Usage:
    """Token counts of a request: prompt tokens once per prompt, completion tokens per choice."""

    prompt_tokens_by_prompt: dict[int, int] = field(default_factory=dict)
    cached_tokens_by_prompt: dict[int, int] = field(default_factory=dict)
    completion_tokens: int = 0

    def add(self, event: TokenEvent) -> None:
        """Count a final event (finish_reason set); chunks count nothing."""
        if event.finish_reason is None:
            return
        self.prompt_tokens_by_prompt[event.prompt_index] = event.prompt_tokens
        self.cached_tokens_by_prompt[event.prompt_index] = event.cached_tokens
        self.completion_tokens += event.completion_tokens

    def as_json(self) -> dict[str, Any]:
        """OpenAI's usage object."""
        prompt = sum(self.prompt_tokens_by_prompt.values())
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": sum(self.cached_tokens_by_prompt.values())}}


async def collect(events: AsyncIterator[TokenEvent], num_choices: int) -> tuple[list[ChoiceResult], Usage]:
    """Run `events` to the end; returns the choices (by index) and the usage."""
    choices = [ChoiceResult() for _ in range(num_choices)]
    usage = Usage()
    async for event in events:
        choice = choices[event.choice]
        choice.text += event.text
        choice.token_ids += event.token_ids
        choice.logprobs += event.logprobs
        choice.top_logprobs += event.top_logprobs
        if event.finish_reason is not None:
            choice.finish_reason = event.finish_reason
        usage.add(event)
    return choices, usage
