"""The Open Inference Protocol (KServe v2, `inference.GRPCInferenceService`) front.

proto:     protos/kserve/inference/grpc_service.proto -> pb/ (generated, server only)
tensors:   tensors.py  (typed contents and raw bytes <-> arrays)
convert:   convert.py  (tensors <-> engine arguments and results, metadata)
servicer:  service.py  (registered by server/app.py on the native API's port)
"""
