"""Command-line flags shared by `pdserve bench serve` and `pdserve bench simulate`: the workload
(dataset and lengths) and how it is offered (rate, burstiness, concurrency, SLOs)."""

from __future__ import annotations

import argparse
import math

from pdserve.bench.serve import ServeSettings
from pdserve.bench.serve_conversations import ConversationSpec
from pdserve.bench.serve_datasets import DATASETS, DatasetSpec

CONVERSATION = "conversation"  # the multi-turn dataset: sessions (pdserve.bench.serve_conversations)


def add_dataset_flags(p: argparse.ArgumentParser, conversation: bool = False) -> None:
    """--dataset-name and the length flags of each dataset (with conversation: the multi-turn one too)."""
    p.add_argument("--dataset-name", default="random", choices=(*DATASETS, CONVERSATION) if conversation else DATASETS,
                   help="random lengths, the shipped ShareGPT-like lengths, mixed (short requests "
                        "plus a share of long prompts), or conversation (multi-turn sessions sharing a system "
                        "prompt; --request-rate is then sessions per second and --num-prompts is ignored)")
    p.add_argument("--num-prompts", type=int, default=100, help="requests in the run")
    p.add_argument("--random-input-len", type=int, default=128, help="random/mixed: prompt tokens")
    p.add_argument("--random-output-len", type=int, default=64, help="random/mixed: output tokens")
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="random/mixed: lengths uniform in len*(1-r) .. len*(1+r)")
    p.add_argument("--sharegpt-output-len", type=int, default=None,
                   help="sharegpt: generate this many tokens instead of the shipped output lengths")
    p.add_argument("--mixed-long-prompt-len", type=int, default=1024, help="mixed: tokens of a long prompt")
    p.add_argument("--mixed-long-output-len", type=int, default=8, help="mixed: output tokens of a long prompt")
    p.add_argument("--mixed-long-fraction", type=float, default=0.2, help="mixed: share of long prompts")
    if conversation:
        add_conversation_flags(p)


def add_conversation_flags(p: argparse.ArgumentParser) -> None:
    """The conversation dataset's shape."""
    defaults = ConversationSpec()
    p.add_argument("--conversation-sessions", type=int, default=defaults.num_sessions, help="conversation: sessions")
    p.add_argument("--conversation-turns", type=int, default=defaults.turns, help="conversation: turns per session")
    p.add_argument("--conversation-system-prompt-len", type=int, default=defaults.system_prompt_len,
                   help="conversation: tokens of the system prompt every session shares")
    p.add_argument("--conversation-first-message-len", type=int, default=defaults.first_message_len,
                   help="conversation: tokens of a session's opening message (the document it is about)")
    p.add_argument("--conversation-user-len", type=int, default=defaults.user_len,
                   help="conversation: tokens of every later user message")
    p.add_argument("--conversation-output-len", type=int, default=defaults.output_len,
                   help="conversation: tokens of every answer")
    p.add_argument("--conversation-think-time-s", type=float, default=defaults.think_time_s,
                   help="conversation: mean pause (exponential) between an answer and the next turn")


def add_load_flags(p: argparse.ArgumentParser) -> None:
    """Arrival process, concurrency cap, seed and SLOs."""
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="mean requests per second (default inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the arrival gaps: 1 Poisson, < 1 burstier, > 1 more even")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    p.add_argument("--seed", type=int, default=0, help="seed of lengths, prompts, arrivals and sampling")
    p.add_argument("--goodput", nargs="+", default=None, metavar="METRIC:MS",
                   help="SLOs for goodput, e.g. --goodput ttft:500 tpot:50 (metrics ttft, tpot, e2el)")


def dataset_spec_from(ns: argparse.Namespace) -> DatasetSpec:
    """DatasetSpec from the parsed flags (its checks give the error messages)."""
    return DatasetSpec(name=ns.dataset_name, num_prompts=ns.num_prompts, input_len=ns.random_input_len,
                       output_len=ns.random_output_len, range_ratio=ns.random_range_ratio,
                       sharegpt_output_len=ns.sharegpt_output_len, long_prompt_len=ns.mixed_long_prompt_len,
                       long_output_len=ns.mixed_long_output_len, long_fraction=ns.mixed_long_fraction,
                       seed=ns.seed)


def conversation_spec_from(ns: argparse.Namespace) -> ConversationSpec:
    """ConversationSpec from the parsed flags."""
    return ConversationSpec(num_sessions=ns.conversation_sessions, turns=ns.conversation_turns,
                            system_prompt_len=ns.conversation_system_prompt_len,
                            first_message_len=ns.conversation_first_message_len, user_len=ns.conversation_user_len,
                            output_len=ns.conversation_output_len, think_time_s=ns.conversation_think_time_s,
                            seed=ns.seed)


def serve_settings_from(ns: argparse.Namespace) -> ServeSettings:
    """ServeSettings from the parsed flags (warmup, temperature and progress where the command has them)."""
    return ServeSettings(request_rate=ns.request_rate, burstiness=ns.burstiness,
                         max_concurrency=ns.max_concurrency, temperature=getattr(ns, "temperature", 0.0),
                         seed=ns.seed, warmup=getattr(ns, "warmup", 0),
                         timeout_s=getattr(ns, "timeout_s", 600.0),
                         progress=not getattr(ns, "no_progress", False))
