"""Prompt logprobs: the model's log probability of each prompt token given the tokens before it.

Asked with SamplingParams.prompt_logprobs (the top-N alternatives per position besides the
token's own logprob), computed while the prompt is (chunk by chunk) run through the model:
a prompt chunk of such a request asks the runner for logits rows at its positions, position p
scoring prompt token p + 1, so a chunk that ends the prompt has them followed by its sampling row
(position P - 1), all one run of trailing rows. The prompt's first token has no logprob (nothing
precedes it). A request scoring its prompt never reads the prefix cache (a cached token has no
logits); once scored, a recomputation (after preemption) scores nothing again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAX_SCORED_TOKENS_PER_STEP = 512


@dataclass
class PromptLogprobs:
    """The scores of prompt tokens 1 .. P-1 (token 0 has none), filled in position order.

    token_ids: the whole prompt (P ids); logprobs[i] is the raw logprob of token_ids[i + 1]
    (log_softmax of the logits at position i, before any sampling adjustment); top_logprobs[i] the
    top-N (token id, logprob) pairs at position i, most likely first (empty lists when N is 0).
    """

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)

    @property
    def num_scored(self) -> int:
        """Positions scored so far (position p scores prompt token p + 1)."""
        return len(self.logprobs)


def prompt_rows(scores: PromptLogprobs | None, prompt_len: int, start: int, end: int) -> int:
    """How many positions of the chunk [start, end) still need scoring: the chunk's trailing ones
    from max(start, already scored) up to min(end, prompt_len - 1); 0 when the request does not
    score its prompt or the chunk holds no unscored prompt position."""
    if scores is None:
        return 0
    first, last = max(start, scores.num_scored), min(end, prompt_len - 1)
    return max(0, last - first)


def score_prompt_rows(scores: PromptLogprobs, logits: torch.Tensor, top_n: int) -> None:
    """Append the scores of the next logits.shape[0] positions to `scores`.

    logits: [R, V] rows of positions num_scored .. num_scored + R - 1 (any float dtype)."""
    first = scores.num_scored
    targets = scores.token_ids[first + 1:first + 1 + logits.shape[0]]
    if len(targets) != logits.shape[0]:
        raise RuntimeError(f"{logits.shape[0]} prompt logits rows from position {first} overrun a prompt of "
                           f"{len(scores.token_ids)} tokens")
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    index = torch.tensor(targets, dtype=torch.int64, device=logits.device)
    scores.logprobs.extend(logprobs.gather(1, index[:, None]).squeeze(1).tolist())
    if top_n <= 0:
        scores.top_logprobs.extend([] for _ in targets)
        return
    values, ids = logprobs.topk(min(top_n, logprobs.shape[1]), dim=-1, sorted=True)
    scores.top_logprobs.extend([list(zip(row_ids, row_values)) for row_ids, row_values in
                                zip(ids.tolist(), values.tolist())])
