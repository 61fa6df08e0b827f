"""Shared fixtures: small checkpoints written by `transformers` itself (the correctness reference)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from helpers.hf_checkpoints import write_hf_checkpoint
from helpers.paths import REPO_ROOT

# `python -m pytest` puts the working directory first on sys.path; from the checkout's root its
# kernels/ and models/ folders would then shadow other packages (transformers imports Hugging
# Face's `kernels`). pdserve itself is imported as the installed `pdserve` package.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != REPO_ROOT]

# The suite runs many small forwards on a 2-core CI machine: one intra-op thread is several
# times faster there than torch's default, and leaves a core for the servers tests start.
torch.set_num_threads(1)


KV_TRANSFERS = ("tcp", "nixl")


@pytest.fixture(scope="module", params=KV_TRANSFERS)
def kv_transfer(request):
    """Each KV data path in turn ("tcp", then "nixl", required on both sides): a module whose cluster
    fixture takes this runs its tests once per backend. Pass it to LocalCluster as env PDSERVE_KV_TRANSFER."""
    return request.param


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
    from helpers.secure_switch import SECURE_ENV, secure_requested

    if secure_requested():
        return f"pdserve: {SECURE_ENV}=1: clusters run with mTLS, an API key, a KV token and a Redis password"
    return None


@pytest.fixture(scope="session", autouse=True)
def secure_clusters(tmp_path_factory):
    """With PDSERVE_TEST_SECURE=1, every LocalCluster started without its own `security` runs
    secured with this session's throwaway certificates and secrets (tests/secure_switch.py);
    yields that ClusterSecurity, or None when the switch is off."""
    from helpers.secure_switch import default_security_to, secure_requested, throwaway_security

    if not secure_requested():
        yield None
        return
    with pytest.MonkeyPatch.context() as monkeypatch:
        security = throwaway_security(tmp_path_factory.mktemp("secure-suite-pki"))
        default_security_to(monkeypatch, security)
        yield security
