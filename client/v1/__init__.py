"""Generated Protobuf and gRPC code for headrace.v1 (regenerate with `make protos`)."""
