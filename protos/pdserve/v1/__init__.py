"""Generated Python code of proto package pdserve.v1.

Public API: router_pb2 / router_pb2_grpc (service pdserve.v1.Router). Internal worker APIs:
worker_pb2 / worker_pb2_grpc (WorkerControl and shared messages), prefill_pb2 / prefill_pb2_grpc
(PrefillWorker), decode_pb2 / decode_pb2_grpc (DecodeWorker), colocated_pb2 / colocated_pb2_grpc
(ColocatedWorker). Do not edit the *_pb2* files: `python -m pdserve.protos.generate` writes them.
"""
