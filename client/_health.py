"""The standard grpc.health.v1.Health Check call, without grpcio-health-checking.

The client depends on grpcio and protobuf alone, so the two health messages are
built here from a descriptor in a private pool (no clash with grpc_health when a
process imports both).
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

from ._types import HealthStatus

CHECK_METHOD = "/grpc.health.v1.Health/Check"

_STATUS_FROM_PB = {
    0: HealthStatus.UNKNOWN,
    1: HealthStatus.SERVING,
    2: HealthStatus.NOT_SERVING,
    3: HealthStatus.SERVICE_UNKNOWN,
}


def _message_classes() -> tuple[type[Message], type[Message]]:
    f = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="grpc/health/v1/health.proto")
    file.package = "grpc.health.v1"
    file.syntax = "proto3"
    request = file.message_type.add(name="HealthCheckRequest")
    request.field.add(name="service", number=1, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    response = file.message_type.add(name="HealthCheckResponse")
    status_enum = response.enum_type.add(name="ServingStatus")
    for number, name in enumerate(("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")):
        status_enum.value.add(name=name, number=number)
    response.field.add(
        name="status",
        number=1,
        type=f.TYPE_ENUM,
        label=f.LABEL_OPTIONAL,
        type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return (
        message_factory.GetMessageClass(
            pool.FindMessageTypeByName(f"{file.package}.{request.name}")
        ),
        message_factory.GetMessageClass(
            pool.FindMessageTypeByName(f"{file.package}.{response.name}")
        ),
    )


HealthCheckRequest, HealthCheckResponse = _message_classes()


def check_request(service: str) -> bytes:
    msg: Any = HealthCheckRequest(service=service)
    data: bytes = msg.SerializeToString()
    return data


def check_response(data: bytes) -> HealthStatus:
    msg: Any = HealthCheckResponse.FromString(data)
    return _STATUS_FROM_PB.get(int(msg.status), HealthStatus.UNKNOWN)
