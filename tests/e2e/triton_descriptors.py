"""Runs in the tritonclient virtualenv: tritonclient's compiled protos as JSON.

{"messages": {"inference.ModelInferRequest": {"id": [3, TYPE, LABEL, TYPE_NAME]}, ...},
 "methods": {"ModelInfer": ["inference.ModelInferRequest", "...Response", false, false]}}
"""

import json

from tritonclient.grpc import model_config_pb2, service_pb2


def walk(desc, out):
    out[desc.full_name] = {
        f.name: [
            f.number,
            f.type,
            f.is_repeated,
            (f.message_type or f.enum_type).full_name if (f.message_type or f.enum_type) else "",
        ]
        for f in desc.fields
    }
    for nested in desc.nested_types:
        walk(nested, out)


messages, methods = {}, {}
for module in (service_pb2, model_config_pb2):
    for desc in module.DESCRIPTOR.message_types_by_name.values():
        walk(desc, messages)
    for enum in module.DESCRIPTOR.enum_types_by_name.values():
        messages[enum.full_name] = {v.name: [v.number] for v in enum.values}
service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
for m in service.methods:
    methods[m.name] = [m.input_type.full_name, m.output_type.full_name,
                       m.client_streaming, m.server_streaming]  # fmt: skip
print(json.dumps({"messages": messages, "methods": methods}))
