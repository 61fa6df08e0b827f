"""Resuming a request from its Redis record when its client reconnects (to any router replica)
with how many tokens of each sample it already received.

The record may lag the client by the last tokens the failed router had not written yet, or
hold tokens the client never got. Either way the continuation starts from tokens both agree
on: an unfinished sample goes on from min(received, recorded) tokens, and tokens the client
already holds beyond that are re-generated (identically: greedy or seeded draws depend only on
seed, sample and position) and dropped. The text a client holds with its tokens is what the
sample's stop checker released through them, computed here the way the engine does.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.engine.stop_checker import StopChecker
from pdserve.models.detokenizer import IncrementalDetokenizer
from pdserve.models.sampling_params import SamplingParams, StructuredOutput
from pdserve.models.tokenizer import Tokenizer
from pdserve.router.responses import SampleProgressState, StreamState, completion
from pdserve.runtime.errors import InvalidRequestError
from pdserve.state.request_store import RequestRecord
from pdserve.v1 import router_pb2


def params_from_record(record: RequestRecord) -> SamplingParams:
    """The request's SamplingParams from its record's params (dataclasses.asdict form)."""
    fields = dict(record.params)
    for name in ("stop", "stop_token_ids"):
        fields[name] = tuple(fields.get(name, ()))
    fields["logit_bias"] = tuple(tuple(pair) for pair in fields.get("logit_bias", ()))
    structured = fields.get("structured")
    fields["structured"] = StructuredOutput(**structured) if structured else None
    fields["seed"] = record.seed
    return SamplingParams(**fields)


def released_text(tokenizer: Tokenizer, prompt: Sequence[int], params: SamplingParams,
                  tokens: Sequence[int], finished: bool = False) -> list[str]:
    """The text a stream of one sample released with each of `tokens` (same length); `finished`: the sample
    ended with its last token, so that token released all the text held (also when it ended for a reason the
    checker cannot see here: its structured-output constraint completed)."""
    checker = StopChecker(IncrementalDetokenizer(tokenizer, prompt_ids=list(prompt)), params,
                          tokenizer.eos_token_ids)
    texts = []
    for i, token in enumerate(tokens):
        check = checker.append(int(token), constraint_complete=finished and i == len(tokens) - 1)
        texts.append(check.text_delta)
    return texts


def resumed_state(record: RequestRecord, params: SamplingParams, received: Sequence[int],
                  tokenizer: Tokenizer) -> tuple[StreamState, list[router_pb2.GenerateResponse]]:
    """The relay state to continue `record` for a client holding received[i] tokens of sample i,
    and the responses to send it first (recorded tokens of finished samples it lacks, and
    their completions). Raises InvalidRequestError when `received` contradicts the record."""
    if len(received) > params.n:
        raise InvalidRequestError(f"received_tokens has {len(received)} entries; the request has n={params.n}")
    counts = list(received) + [0] * (params.n - len(received))
    for index, (have, tokens, finished) in enumerate(zip(counts, record.sent_tokens, record.finished)):
        if finished is not None and have > len(tokens):
            raise InvalidRequestError(f"received_tokens[{index}] = {have}, but sample {index} finished "
                                      f"with {len(tokens)} tokens")
    # Redis keeps no logprobs: with logprobs asked for, tokens the client lacks are generated
    # again (identically) rather than replayed from the record.
    finished_list = [None if f is not None and params.logprobs is not None and have < len(tokens) else f
                     for have, tokens, f in zip(counts, record.sent_tokens, record.finished)]
    # Unfinished samples continue either all from tokens or all from the prompt alone (what a
    # worker can continue); if one has no agreed token, all restart and skip what the client has.
    unfinished = [i for i, f in enumerate(finished_list) if f is None]
    restart = any(min(counts[i], len(record.sent_tokens[i])) == 0 for i in unfinished)
    state = StreamState(record.request_id, len(record.prompt_token_ids), [SampleProgressState() for _ in counts],
                        owner=record.owner)
    replay = []
    for index, (have, tokens, finished) in enumerate(zip(counts, record.sent_tokens, finished_list)):
        if have > params.max_tokens:
            raise InvalidRequestError(f"received_tokens[{index}] = {have} exceeds max_tokens {params.max_tokens}")
        sample = state.samples[index]
        agreed = 0 if restart and finished is None else min(have, len(tokens))
        texts = released_text(tokenizer, record.prompt_token_ids, params, tokens if finished else tokens[:agreed],
                              finished == "stop")
        sample.token_ids = list(tokens[:agreed])
        sample.text_chars = sum(len(t) for t in texts[:agreed])
        sample.skip_tokens = have - agreed
        if finished is not None:
            missing = tokens[agreed:]
            if missing:
                replay.append(router_pb2.GenerateResponse(request_id=record.request_id, chunk=router_pb2.TokenChunk(
                    index=index, token_ids=missing, text="".join(texts[agreed:]))))
                sample.token_ids = list(tokens)
            sample.finish_reason = finished
            replay.append(completion(state, index))
    return state, replay
