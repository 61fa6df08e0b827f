"""EleutherAI's lm-evaluation-harness against `pdserve up`: its `local-completions` model (echo + logprobs for
loglikelihoods, stop strings for generations) must score every item as its `hf` model does on the same
checkpoint (transformers in float32, the correctness reference)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.up_testing import OPENAI_LINE, pdserve_up, stop_up
from pdserve.models.tiny_model import make_tiny_model
from pdserve.state.embedded_redis import free_port

pytest.importorskip("lm_eval")

SERVED_NAME = "tiny-eval"
LOGLIKELIHOOD_TOLERANCE = 1e-4


def _sentences() -> list[str]:
    """Sentences of the start of the corpus the trained checkpoint learned (so its predictions are peaked)."""
    text = (Path(__file__).parents[2] / "models" / "data" / "corpus.txt").read_text()[:4000]
    return [s.strip() + "." for s in text.replace("\n", " ").split(".") if len(s.split()) >= 8][:12]


def _write_tasks(directory: Path) -> None:
    """A multiple-choice (loglikelihood) task and a generate-until task, from local JSONL files."""
    rng = random.Random(0)
    sentences = _sentences()
    words = sorted({w for s in sentences for w in s.split()[3:]})
    choice_rows, generation_rows = [], []
    for sentence in sentences:
        parts = sentence.split()
        cut = rng.randrange(4, len(parts) - 1)
        context, answer = " ".join(parts[:cut]), " " + parts[cut]
        choices = [answer] + [" " + w for w in rng.sample([w for w in words if w != parts[cut]], 3)]
        rng.shuffle(choices)
        choice_rows.append({"context": context, "choices": choices, "label": choices.index(answer)})
        generation_rows.append({"prompt": " ".join(parts[:cut]), "target": " ".join(parts[cut:])})
    for name, rows in (("choices", choice_rows), ("generations", generation_rows)):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = "dataset_path: json\ndataset_name: null\ntest_split: test\nmetadata: {version: 1.0}\n"
    (directory / "pdserve_choices.yaml").write_text(
        f"task: pdserve_choices\n{data}dataset_kwargs: {{data_files: {{test: {directory / 'choices.jsonl'}}}}}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ntarget_delimiter: ''\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]\n")
    (directory / "pdserve_generations.yaml").write_text(
        f"task: pdserve_generations\n{data}dataset_kwargs: {{data_files: {{test: {directory / 'generations.jsonl'}}}}}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\ntarget_delimiter: ''\n"
        "generation_kwargs: {until: ['.', '\\n'], max_gen_toks: 12, do_sample: false}\n"
        "metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]\n")


def _run_lm_eval(model: str, model_args: str, tasks: Path, out: Path) -> dict[str, list[dict]]:
    """Run the harness; per task, its logged samples in doc order."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OPENAI_API_KEY": "unused", "HF_DATASETS_CACHE": str(out / "datasets-cache")}
    run = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args,
         "--tasks", "pdserve_choices,pdserve_generations", "--include_path", str(tasks), "--log_samples",
         "--output_path", str(out), "--device", "cpu", "--batch_size", "1"],
        env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    samples = {}
    for task in ("pdserve_choices", "pdserve_generations"):
        [path] = out.rglob(f"samples_{task}_*.jsonl")
        samples[task] = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])
    return samples


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("lm-eval") / "tiny", arch="llama", seed=0, train_steps=300)


def test_local_completions_against_pdserve_up_scores_every_item_as_transformers_does(model_dir, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write_tasks(tasks)
    reference = _run_lm_eval("hf", f"pretrained={model_dir},dtype=float32,add_bos_token=True", tasks,
                             tmp_path / "hf")
    args = ("--model", str(model_dir), "--port", "0", "--openai-port", str(free_port()),
            "--served-model-name", SERVED_NAME)
    with pdserve_up(*args, until=OPENAI_LINE) as (up, ready):
        base = ready.split()[3].removesuffix("/")
        served = _run_lm_eval(
            "local-completions", f"model={SERVED_NAME},base_url={base}/completions,tokenizer={model_dir},"
            "tokenizer_backend=huggingface,tokenized_requests=True,add_bos_token=True,num_concurrent=1,max_retries=1",
            tasks, tmp_path / "served")
        stop_up(up)

    choices = zip(reference["pdserve_choices"], served["pdserve_choices"], strict=True)
    greedy_items = 0
    for expected, got in choices:
        assert len(expected["resps"]) == len(got["resps"]) == len(expected["doc"]["choices"])
        for (want,), (have,) in zip(expected["resps"], got["resps"]):
            assert abs(float(want[0]) - float(have[0])) <= LOGLIKELIHOOD_TOLERANCE, (expected["doc"], want, have)
            assert want[1] == have[1], f"is_greedy differs for {expected['doc']}"
            greedy_items += want[1] == "True"
    assert greedy_items > 0, "the checkpoint should predict some answers greedily (a trained model)"
    generations = zip(reference["pdserve_generations"], served["pdserve_generations"], strict=True)
    for expected, got in generations:
        assert got["resps"] == expected["resps"], expected["doc"]
    assert any(e["resps"][0][0].strip() for e in reference["pdserve_generations"]), "empty generations prove nothing"
