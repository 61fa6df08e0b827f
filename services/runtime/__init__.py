"""Helpers every pdserve gRPC server shares.

errors: the exceptions the product raises for bad or unservable requests (no grpc import, so
the engine may raise them); status: the one place they become gRPC status codes; health:
grpc.health.v1 and server reflection registration; convert: proto <-> SamplingParams.
"""
