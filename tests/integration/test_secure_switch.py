"""The PDSERVE_TEST_SECURE switch (tests/secure_switch.py): clusters built without `security`
get the session's, those built with one keep it, and client commands get the credentials."""

from __future__ import annotations

import shutil

import pytest

from helpers.secure_switch import client_env, client_flags, default_security_to, secure_requested, throwaway_security
from pdserve.cli.cluster import LocalCluster
from pdserve.runtime.channels import PLAINTEXT


def _unstarted(**kwargs) -> LocalCluster:
    cluster = LocalCluster("no-model-needed", **kwargs)  # building one starts nothing
    shutil.rmtree(cluster.log_dir)
    return cluster


def test_the_session_follows_the_switch(secure_clusters):
    cluster = _unstarted()
    assert (cluster.security is not None) == secure_requested()
    assert cluster.security is secure_clusters
    if secure_clusters is None:
        assert cluster.client_security() is PLAINTEXT
        assert client_flags(cluster) == [] and "PDSERVE_API_KEY" not in client_env(cluster)


def test_default_security_applies_only_where_none_was_given(tmp_path, secure_clusters):
    session, own = throwaway_security(tmp_path / "session"), throwaway_security(tmp_path / "own")
    with pytest.MonkeyPatch.context() as monkeypatch:
        default_security_to(monkeypatch, session)
        assert _unstarted().security is session
        assert _unstarted(security=own).security is own
        secured = _unstarted()
    assert _unstarted().security is secure_clusters  # undone with the monkeypatch
    assert client_flags(secured) == ["--tls-cert", session.cert_file, "--tls-key", session.key_file,
                                     "--tls-ca", session.ca_file]
    assert client_env(secured)["PDSERVE_API_KEY"] == session.api_key
    assert session.api_key not in " ".join(client_flags(secured))
    client = secured.client_security()
    assert client.api_key == session.api_key and client.tls is not None
    assert secured.client_security(with_api_key=False).api_key is None
