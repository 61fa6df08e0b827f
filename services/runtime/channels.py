"""Client channels to pdserve servers: plaintext, TLS or mutual TLS, with or without an API key.
Every pdserve client (router -> workers, front end -> router, `pdserve generate`, the
healthcheck, the benchmarks) opens its channels here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from pdserve.runtime.api_keys import BearerKeyInterceptor, bearer_key_aio_interceptors
from pdserve.runtime.tls import TlsConfig

ChannelOptions = Sequence[tuple[str, object]]

MAX_MESSAGE_BYTES = 64 * 2**20
# The options of every channel between pdserve processes (and of the servers' side, runtime/server.py).
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
                   # A worker restarted at the same address is reachable again within a second or two
                   # (gRPC's default reconnect backoff grows to minutes).
                   ("grpc.initial_reconnect_backoff_ms", 500), ("grpc.min_reconnect_backoff_ms", 500),
                   ("grpc.max_reconnect_backoff_ms", 2_000)]


@dataclass(frozen=True)
class ClientSecurity:
    """How a client dials: `tls` (None: plaintext) and `api_key` (sent as
    `authorization: Bearer KEY` on every call; None: no key)."""

    tls: TlsConfig | None = None
    api_key: str | None = None

    def _options(self, options: ChannelOptions) -> list[tuple[str, object]]:
        return [*options, *(self.tls.channel_options() if self.tls else [])]

    def aio_channel(self, address: str, options: ChannelOptions) -> grpc.aio.Channel:
        """A grpc.aio channel to `address` (host:port) with `options` (message size limits...)."""
        interceptors = bearer_key_aio_interceptors(self.api_key) if self.api_key else None
        if self.tls is None:
            return grpc.aio.insecure_channel(address, options=self._options(options), interceptors=interceptors)
        return grpc.aio.secure_channel(address, self.tls.channel_credentials(), options=self._options(options),
                                       interceptors=interceptors)

    def channel(self, address: str, options: ChannelOptions) -> grpc.Channel:
        """A synchronous channel to `address`; closing it (or `with`) closes the connection."""
        if self.tls is None:
            channel = grpc.insecure_channel(address, options=self._options(options))
        else:
            channel = grpc.secure_channel(address, self.tls.channel_credentials(), options=self._options(options))
        if self.api_key:
            return grpc.intercept_channel(channel, BearerKeyInterceptor(self.api_key))  # close() closes both
        return channel


PLAINTEXT = ClientSecurity()

