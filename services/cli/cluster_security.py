"""Security settings for a LocalCluster: mutual TLS on every gRPC server, channel and KV transfer,
an API key on the router (the OpenAI front end sends it too), a KV transfer token, and a Redis
password on the embedded server. Secrets reach the children through PDSERVE_* environment
variables, never their command lines."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.runtime.channels import ClientSecurity
from pdserve.runtime.tls import TlsConfig


@dataclass(frozen=True)
class ClusterSecurity:
    """What every process of the cluster is started with.

    ca_file: the CA bundle (verifies every peer; servers require client certificates);
    cert_file/key_file: the identity every process uses, as server and as client (its
    certificate must name 127.0.0.1 and carry both key usages); api_key: the router's only key
    (the OpenAI front end sends it); kv_auth_token: the KV transfer port's token;
    redis_password: requirepass of the embedded Redis (ignored with an external redis_url).
    """

    ca_file: str
    cert_file: str
    key_file: str
    api_key: str | None = None
    kv_auth_token: str | None = None
    redis_password: str | None = None

    def __post_init__(self) -> None:
        TlsConfig(self.cert_file, self.key_file, self.ca_file)  # validates the files now

    def args(self) -> list[str]:
        """Command-line flags for every `pdserve serve ROLE` (file paths only)."""
        return ["--tls-cert", self.cert_file, "--tls-key", self.key_file, "--tls-ca", self.ca_file]

    def env(self, role: str) -> dict[str, str]:
        """The secrets for `role`, as environment variables."""
        env = {"PDSERVE_KV_AUTH_TOKEN": self.kv_auth_token} if self.kv_auth_token else {}
        if self.api_key and role == "router":
            env["PDSERVE_API_KEY"] = self.api_key
        if self.api_key and role == "openai":
            env["PDSERVE_ROUTER_API_KEY"] = self.api_key
        return env

    def client(self, with_api_key: bool = True) -> ClientSecurity:
        """How a test client dials the cluster: mutual TLS with the cluster's identity, and the
        router's API key unless with_api_key is False (health checks, worker services)."""
        return ClientSecurity(TlsConfig(self.cert_file, self.key_file, self.ca_file),
                              self.api_key if with_api_key else None)
