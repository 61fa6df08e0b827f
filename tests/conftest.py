"""Shared fixtures: small checkpoints written by `transformers` itself (the correctness reference)."""

from __future__ import annotations

import pytest
import torch

# The suite runs many small forwards on a 2-core CI machine: one intra-op thread is several
# times faster there than torch's default, and leaves a core for the servers tests start.
torch.set_num_threads(1)

HF_CONFIGS = {
    # GQA (4 query heads over 2 KV heads), llama3 rope scaling, tied embeddings.
    "llama": dict(
        cls="LlamaConfig", vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    ),
    # q/k/v bias, MHA-free GQA 6:2, untied head.
    "qwen2": dict(
        cls="Qwen2Config", vocab_size=400, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=10000.0,
    ),
    # MQA (one KV head), linear rope scaling is a Llama feature: mistral keeps plain rope.
    "mistral": dict(
        cls="MistralConfig", vocab_size=352, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=1024,
        tie_word_embeddings=False, sliding_window=None, rms_norm_eps=1e-5, rope_theta=10000.0,
    ),
    # MHA with linear rope scaling.
    "llama_linear_mha": dict(
        cls="LlamaConfig", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
        tie_word_embeddings=False, rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
}


def write_hf_checkpoint(out_dir, name: str, seed: int = 0, dtype=torch.float32, **save_kwargs):
    """Random weights from `transformers` itself, saved with save_pretrained (safetensors)."""
    import transformers

    spec = dict(HF_CONFIGS[name])
    config = getattr(transformers, spec.pop("cls"))(**spec)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with torch.no_grad():  # wider weights than HF's 0.02 init, so greedy picks are not near-ties
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.15)
            else:
                param.normal_(1.0 if param.abs().mean() > 0.5 else 0.0, 0.1)
    model = model.to(dtype)
    model.save_pretrained(out_dir, **save_kwargs)
    return out_dir


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Factory: hf_checkpoint(name) -> directory of a transformers-written checkpoint (cached)."""
    cache = {}

    def make(name: str):
        if name not in cache:
            cache[name] = write_hf_checkpoint(tmp_path_factory.mktemp(name), name)
        return cache[name]

    return make


def pytest_report_header(config):
    from tests.secure_switch import SECURE_ENV, secure_requested

    if secure_requested():
        return f"pdserve: {SECURE_ENV}=1: clusters run with mTLS, an API key, a KV token and a Redis password"
    return None


@pytest.fixture(scope="session", autouse=True)
def secure_clusters(tmp_path_factory):
    """With PDSERVE_TEST_SECURE=1, every LocalCluster started without its own `security` runs
    secured with this session's throwaway certificates and secrets (tests/secure_switch.py);
    yields that ClusterSecurity, or None when the switch is off."""
    from tests.secure_switch import default_security_to, secure_requested, throwaway_security

    if not secure_requested():
        yield None
        return
    with pytest.MonkeyPatch.context() as monkeypatch:
        security = throwaway_security(tmp_path_factory.mktemp("secure-suite-pki"))
        default_security_to(monkeypatch, security)
        yield security
