"""A cluster started on a Hub id: the launcher fetches it once through huggingface_hub (from a local stand-in
for the Hub), pins the commit, and every server loads that revision from the cache with the Hub gone."""

from __future__ import annotations

import pytest
from huggingface_hub import constants

from helpers.http_testing import call
from helpers.hub_testing import LocalHub
from pdserve.cli.cluster import LocalCluster
from pdserve.llm import LLM
from pdserve.models.sampling_params import SamplingParams
from pdserve.models.tiny_model import make_tiny_model

REPO = "pdserve-test/tiny-llama"


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return monkeypatch


def test_a_cluster_on_a_hub_id_serves_the_pinned_revision_offline(tmp_path, hub_env):
    hf_dir = make_tiny_model(tmp_path / "repo", arch="llama", seed=0, size="tiny")
    with LocalHub() as hub:
        commit = hub.add_repo(REPO, hf_dir)
        hub_env.setenv("HF_ENDPOINT", hub.endpoint)
        cluster = LocalCluster(REPO, prefill=1, decode=1, openai=True)
    assert cluster.model_dir == f"{REPO}@{commit}"  # what every server is told to load
    hub_env.setenv("HF_HUB_OFFLINE", "1")  # the servers (children) find the revision in the cache
    with cluster:
        status, _, models = call(cluster.openai_address, "GET", "/v1/models")
        assert status == 200 and [m["id"] for m in models["data"]] == [REPO], models
        status, _, reply = call(cluster.openai_address, "POST", "/v1/completions", {
            "model": REPO, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "ignore_eos": True})
        assert status == 200, reply
    [expected] = LLM(str(hf_dir), threads=1).generate("Once upon a time", SamplingParams(
        max_tokens=8, temperature=0, ignore_eos=True))
    assert reply["choices"][0]["text"] == expected.samples[0].text
