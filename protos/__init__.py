"""pdserve's gRPC protocol: the .proto files and their generated Python code.

The .proto files use import paths relative to this directory ("pdserve/v1/router.proto");
the generated modules import as `pdserve.v1.<name>_pb2` / `<name>_pb2_grpc`.
Regenerate with `python -m pdserve.protos.generate` (see protos/generate.py).
"""
