"""The PDSERVE_TEST_SECURE=1 switch: every LocalCluster the tests start without an explicit
`security` runs secured (mutual TLS everywhere, an API key on the router, a KV transfer token,
a Redis password) with throwaway certificates made once per test session (tests/conftest.py
installs it). Tests dial a cluster with cluster.channel / cluster.aio_channel, which carry the
credentials when it is secured and are plain channels when not; `pdserve` client commands run
as subprocesses get client_flags(cluster) and client_env(cluster)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from helpers.security_testing import make_pki
from pdserve.cli.cluster import LocalCluster
from pdserve.cli.cluster_security import ClusterSecurity

SECURE_ENV = "PDSERVE_TEST_SECURE"


def secure_requested() -> bool:
    """Whether $PDSERVE_TEST_SECURE asks for secured clusters (1, true, yes or on)."""
    return os.environ.get(SECURE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def throwaway_security(directory: Path) -> ClusterSecurity:
    """A fresh CA and identity for 127.0.0.1 in `directory`, and random secrets."""
    pki = make_pki(directory, name="pdserve-suite")
    return ClusterSecurity(pki.ca_file, pki.cert_file, pki.key_file, api_key=f"sk-suite-{secrets.token_hex(8)}",
                           kv_auth_token=f"kv-suite-{secrets.token_hex(8)}",
                           redis_password=f"redis-suite-{secrets.token_hex(8)}")


def default_security_to(monkeypatch: pytest.MonkeyPatch, security: ClusterSecurity) -> None:
    """Make `security` what a LocalCluster built without one runs with (until monkeypatch undoes it)."""
    original = LocalCluster.__post_init__

    def post_init(cluster: LocalCluster) -> None:
        if cluster.security is None:
            cluster.security = security
        original(cluster)

    monkeypatch.setattr(LocalCluster, "__post_init__", post_init)


def client_flags(cluster: LocalCluster) -> list[str]:
    """The TLS flags a `pdserve generate` / `pdserve bench serve` needs to dial `cluster` (none
    when it is not secured). The API key goes by environment: see client_env."""
    return cluster.security.args() if cluster.security else []


def client_env(cluster: LocalCluster) -> dict[str, str]:
    """This process's environment plus, when `cluster` is secured, the router's API key as
    $PDSERVE_API_KEY (client commands read --api-key from it; it stays off command lines and
    out of the results files that record them)."""
    key = cluster.security.api_key if cluster.security else None
    return {**os.environ, **({"PDSERVE_API_KEY": key} if key else {})}

