"""Generated Protobuf and gRPC code of protos/headrace/v1 (regenerate with `make protos`).

The contract's own package: importing it pulls in grpcio and protobuf, nothing of the SDK.
"""
