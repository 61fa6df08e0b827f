"""What every pdserve server process shares (the process runtime).

server: the grpc.aio server with health and reflection, uvloop, running until SIGTERM/SIGINT and
the graceful stop after it; lifecycle: in-flight counting and draining; health: grpc.health.v1
and reflection registration; errors: the exceptions the product raises for bad or unservable
requests (no grpc import, so the engine may raise them); status: the one place they become gRPC
status codes; malformed: undecodable messages -> INVALID_ARGUMENT; retry_hint: the retry-after
metadata; tls, channels, api_keys, security: TLS and mutual TLS, client channels, API keys, the
KV port's TLS and token; sampling_proto: proto <-> SamplingParams.
"""
