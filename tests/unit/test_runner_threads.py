"""ModelRunner(single_thread_step_tokens=...): on the CPU a small step runs on one torch thread and
a large one on the threads torch had when the runner was built; the logits do not depend on which."""

from __future__ import annotations

import contextlib

import pytest
import torch

from pdserve.engine.model_runner import ModelRunner, ScheduledChunk
from pdserve.models.loader import load_model
from pdserve.models.tiny_model import make_tiny_model

BLOCK_SIZE = 16


@contextlib.contextmanager
def torch_threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("threads") / "tiny", arch="llama", seed=0)


def _chunk(num_tokens: int, seq_id: int = 0) -> ScheduledChunk:
    return ScheduledChunk(seq_id=seq_id, token_ids=[5 + i % 50 for i in range(num_tokens)], start_position=0,
                          block_table=list(range(seq_id * 8, seq_id * 8 + 8)), needs_logits=True)


def test_small_steps_run_on_one_thread_and_large_ones_on_all(model_dir):
    with torch_threads(2):
        model, config = load_model(model_dir)
        runner = ModelRunner(model, config, 64, BLOCK_SIZE, single_thread_step_tokens=32)
        assert runner.max_threads == 2
        runner.execute([_chunk(3)])
        assert torch.get_num_threads() == 1
        runner.execute([_chunk(40)])
        assert torch.get_num_threads() == 2
        runner.execute([_chunk(31, seq_id=1)])
        assert torch.get_num_threads() == 1


def test_zero_keeps_every_step_on_all_threads_and_the_logits_are_the_same(model_dir):
    with torch_threads(2):
        model, config = load_model(model_dir)
        always_all = ModelRunner(model, config, 64, BLOCK_SIZE, single_thread_step_tokens=0)
        small_on_one = ModelRunner(model, config, 64, BLOCK_SIZE, single_thread_step_tokens=32)
        want = always_all.execute([_chunk(3)])
        assert torch.get_num_threads() == 2
        got = small_on_one.execute([_chunk(3)])
        assert torch.get_num_threads() == 1
    torch.testing.assert_close(got, want)


def test_a_negative_threshold_is_refused(model_dir):
    model, config = load_model(model_dir)
    with pytest.raises(ValueError, match="single_thread_step_tokens"):
        ModelRunner(model, config, 8, BLOCK_SIZE, single_thread_step_tokens=-1)
