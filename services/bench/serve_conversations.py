"""The conversation workload of the serving benchmark: multi-turn chat sessions.

Every session opens with the same system prompt (a deployment's shared prefix: the instructions and
tool definitions an agent resends). Each turn's prompt is the whole conversation so far (system
prompt, earlier user messages and the answers the server gave) plus a new user message, as a chat
client resends it; a session waits a think time (exponential, mean think_time_s) after each answer
before its next turn. Sessions start on the benchmark's arrival process (rate in sessions per
second). Prompts are random token ids; the answers are the served tokens themselves, so two runs
that return the same tokens send the same prompts.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass

from pdserve.bench.serve_arrivals import arrival_offsets
from pdserve.bench.serve_client import Progress, generate_request, send_one
from pdserve.bench.serve_datasets import FIRST_TOKEN_ID, BenchRequest
from pdserve.bench.serve_metrics import RequestRecord
from pdserve.runtime.channels import CHANNEL_OPTIONS, PLAINTEXT, ClientSecurity
from pdserve.v1 import router_pb2_grpc


@dataclass(frozen=True)
class ConversationSpec:
    """Sessions of `turns` turns: a system prompt of system_prompt_len tokens shared by all of them, an
    opening user message of first_message_len tokens (a document or a file the session is about),
    later user messages of user_len tokens, answers of output_len tokens, think_time_s mean pause."""

    num_sessions: int = 16
    turns: int = 4
    system_prompt_len: int = 256
    first_message_len: int = 256
    user_len: int = 32
    output_len: int = 32
    think_time_s: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_sessions < 1 or self.turns < 1:
            raise ValueError(f"conversation: need sessions and turns >= 1, got {self.num_sessions}, {self.turns}")
        if self.system_prompt_len < 0 or min(self.first_message_len, self.user_len, self.output_len) < 1:
            raise ValueError("conversation: system_prompt_len must be >= 0; first_message_len, user_len and "
                             "output_len >= 1")
        if not 0 <= self.think_time_s < math.inf:
            raise ValueError(f"conversation: think_time_s must be finite and >= 0, got {self.think_time_s}")

    @property
    def longest_request(self) -> int:
        """Prompt + output tokens of a session's last turn."""
        return (self.system_prompt_len + self.first_message_len + (self.turns - 1) * self.user_len
                + self.turns * self.output_len)

    @property
    def num_requests(self) -> int:
        """Requests in the workload (every turn of every session)."""
        return self.num_sessions * self.turns


@dataclass
class Conversations:
    """A run's results: a record per request and the tokens each answer had, both in (session, turn)
    order."""

    records: list[RequestRecord]
    answers: list[list[int]]


def session_messages(spec: ConversationSpec, vocab_size: int) -> tuple[list[int], list[list[list[int]]]]:
    """(the shared system prompt, each session's user messages), reproducible from spec.seed."""
    if vocab_size <= FIRST_TOKEN_ID:
        raise ValueError(f"vocab_size {vocab_size} leaves no ordinary token ids")
    rng = random.Random(spec.seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(n)]

    system = tokens(spec.system_prompt_len)
    return system, [[tokens(spec.first_message_len if turn == 0 else spec.user_len) for turn in range(spec.turns)]
                    for _ in range(spec.num_sessions)]


async def run_conversations(address: str, spec: ConversationSpec, vocab_size: int, max_model_len: int,
                            session_rate: float, burstiness: float = 1.0, temperature: float = 0.0,
                            timeout_s: float = 600.0, progress: bool = True,
                            security: ClientSecurity = PLAINTEXT) -> Conversations:
    """Run every session (each starting at its arrival offset) and return the per-request records and
    answers; send_time is seconds from the first send. A failed turn ends its session (the next turn
    would have no answer to resend): the turns left are recorded as failed."""
    if spec.longest_request > max_model_len:
        raise ValueError(f"conversation: a last turn needs {spec.longest_request} tokens, the model's context "
                         f"is {max_model_len}")
    system, messages = session_messages(spec, vocab_size)
    offsets = arrival_offsets(spec.num_sessions, session_rate, burstiness, spec.seed)
    think = random.Random(spec.seed + 1)
    pauses = [[think.expovariate(1.0 / spec.think_time_s) if spec.think_time_s else 0.0
               for _ in range(spec.turns)] for _ in range(spec.num_sessions)]
    records = [RequestRecord(0, spec.output_len) for _ in range(spec.num_requests)]
    answers: list[list[int]] = [[] for _ in range(spec.num_requests)]
    bar = Progress(spec.num_requests, progress)
    async with security.aio_channel(address, CHANNEL_OPTIONS) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        await channel.channel_ready()
        start = time.perf_counter()

        async def session(s: int) -> None:
            await asyncio.sleep(max(0.0, start + offsets[s] - time.perf_counter()))
            history = list(system)
            for turn in range(spec.turns):
                i = s * spec.turns + turn
                prompt = history + messages[s][turn]
                records[i].prompt_len, records[i].send_time = len(prompt), time.perf_counter() - start
                message = generate_request(BenchRequest(tuple(prompt), spec.output_len), temperature,
                                           spec.seed + i)
                await send_one(stub, message, records[i], timeout_s, answers[i])
                bar.advance(records[i].success)
                if not records[i].success:
                    for rest in records[i + 1:(s + 1) * spec.turns]:
                        rest.error = "an earlier turn of its session failed"
                    return
                history = prompt + answers[i]
                await asyncio.sleep(pauses[s][turn])

        await asyncio.gather(*(session(s) for s in range(spec.num_sessions)))
    return Conversations(records, answers)
