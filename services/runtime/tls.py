"""TLS and mutual TLS for every pdserve connection, from one set of flags (pdserve.cli.flags).

--tls-cert/--tls-key: this process's identity (PEM). A server listens with TLS when they are
set, and the same pair is the client certificate it presents when it dials a peer (so the
certificate needs both the serverAuth and clientAuth key usages, or none).
--tls-ca: the CA bundle that verifies peers. On a server, setting it makes client
certificates REQUIRED (mutual TLS); on a client, it verifies the server.
--tls: a client-only switch to dial with TLS using the system's root CAs (no --tls-ca).
--tls-server-name: the name expected in peers' certificates (default: the host dialled).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc


class TlsConfigError(ValueError):
    """A TLS flag is missing, inconsistent, or names an unreadable or invalid file."""


def _read(path: str, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from exc
    if b"-----BEGIN" not in data:
        raise TlsConfigError(f"{flag} {path}: not a PEM file")
    return data


@dataclass(frozen=True)
class TlsConfig:
    """Paths of this process's certificate, key and trusted CA bundle (PEM), and the
    certificate name to expect from peers (the CLI builds it from the flags above:
    pdserve.cli.flags.tls_from)."""

    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise TlsConfigError("--tls-cert and --tls-key go together: set both or neither")
        if self.cert_file:
            _read(self.cert_file, "--tls-cert")
            _read(self.key_file, "--tls-key")
            try:  # the pair must match: fail at start, not at the first handshake
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.cert_file, self.key_file)
            except ssl.SSLError as exc:
                raise TlsConfigError(f"--tls-cert {self.cert_file} / --tls-key {self.key_file}: "
                                     f"not a matching certificate and key ({exc.reason or exc})") from exc
        if self.ca_file:
            _read(self.ca_file, "--tls-ca")

    @property
    def mutual(self) -> bool:
        """Whether a server with this config requires client certificates."""
        return bool(self.ca_file)

    def _pem(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """(certificate, key, CA) bytes, read now (so new channels see rotated files)."""
        files = ((self.cert_file, "--tls-cert"), (self.key_file, "--tls-key"), (self.ca_file, "--tls-ca"))
        cert, key, ca = (_read(path, flag) if path else None for path, flag in files)
        return cert, key, ca

    def server_credentials(self) -> grpc.ServerCredentials:
        """gRPC server credentials: this identity; client certificates required when a CA is set."""
        cert, key, ca = self._pem()
        if cert is None:
            raise TlsConfigError("a TLS server needs --tls-cert and --tls-key")
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials: verify the server with the CA (system roots without one) and
        present this identity as the client certificate when there is one."""
        cert, key, ca = self._pem()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def channel_options(self) -> list[tuple[str, str]]:
        """Extra channel options (the expected certificate name, when set)."""
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def kv_server_context(self) -> ssl.SSLContext:
        """Server-side context for the KV transfer port (decode): client certificates required
        when a CA is set."""
        if not self.cert_file:
            raise TlsConfigError("a TLS KV receiver needs --tls-cert and --tls-key")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        if self.ca_file:
            context.load_verify_locations(cafile=self.ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def kv_client_context(self) -> ssl.SSLContext:
        """Client-side context for KV senders (prefill): verifies the receiver (hostname included)
        and presents this identity."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context
