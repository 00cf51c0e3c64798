"""headrace client SDK: typed sync and asyncio clients of the headrace.v1 Inference API.

from . import Client

with Client("localhost:50051") as client:
    print(client.classify("what a day").results[0].top)
"""

from ._async_client import AsyncClient
from ._channel import Metadata, RetryPolicy
from ._client import Client
from ._errors import (
    Cancelled,
    DeadlineExceeded,
    FieldViolation,
    HeadraceError,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from ._streams import AsyncResponseStream, ResponseStream
from ._types import (
    Classification,
    ClassifyInput,
    ClassifyResult,
    FinishReason,
    GenerateChunk,
    GenerateResult,
    HealthStatus,
    Label,
    ModelInfo,
    ModelLimits,
    ModelState,
    ModelVersionStatus,
    Task,
    Usage,
)

__all__ = [
    "AsyncClient",
    "AsyncResponseStream",
    "Cancelled",
    "Classification",
    "ClassifyInput",
    "ClassifyResult",
    "Client",
    "DeadlineExceeded",
    "FieldViolation",
    "FinishReason",
    "GenerateChunk",
    "GenerateResult",
    "HeadraceError",
    "HealthStatus",
    "Internal",
    "InvalidArgument",
    "Label",
    "Metadata",
    "ModelInfo",
    "ModelLimits",
    "ModelState",
    "ModelVersionStatus",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "ResponseStream",
    "RetryPolicy",
    "Task",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Usage",
]
