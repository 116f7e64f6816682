"""The Open Inference Protocol (KServe V2) over the gateway: REST (/v2/...) and gRPC.

tensors: datatypes and raw bytes; codec: V2 requests and answers <-> `/invocations`;
service: the protocol's operations over a `Gateway`; rest and grpc_server: the two
fronts. inference_pb2*.py are generated from inference.proto.
"""
