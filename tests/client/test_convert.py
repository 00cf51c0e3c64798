"""Proto <-> dataclass mapping and error decoding, without a server."""

from __future__ import annotations

import grpc
import pytest
from headrace.client import (
    ClassifyInput,
    FinishReason,
    HeadraceError,
    InvalidArgument,
    Task,
    Unavailable,
    _convert,
)
from headrace.client._errors import error_from_status
from headrace.v1 import inference_pb2 as pb

from tests.client.conftest import rich_abort_metadata


def test_finish_reason_mapping_tolerates_new_values() -> None:
    assert _convert.finish_reason(pb.LENGTH) is FinishReason.LENGTH
    assert _convert.finish_reason(pb.EOS) is FinishReason.EOS
    assert _convert.finish_reason(pb.FINISH_REASON_UNSPECIFIED) is None
    assert _convert.finish_reason(99) is None
    assert FinishReason.STOP == "stop"


def test_chunk_usage_only_when_set() -> None:
    assert _convert.generate_chunk(pb.GenerateChunk(text="a")).usage is None
    last = pb.GenerateChunk(text="", finish_reason=pb.EOS, usage=pb.Usage(completion_tokens=4))
    chunk = _convert.generate_chunk(last)
    assert chunk.usage is not None and chunk.usage.total_tokens == 4


def test_classify_stream_request_defaults_fill_unset_fields() -> None:
    kw = {"model": "m", "version": "2", "top_k": 3, "reject_overlong": False}
    req = _convert.classify_stream_request(ClassifyInput("t", request_id="r"), **kw)  # type: ignore[arg-type]
    assert (req.model, req.model_version, req.top_k, req.request_id) == ("m", "2", 3, "r")
    assert list(req.texts) == ["t"]
    req = _convert.classify_stream_request(("a", "b"), **kw)  # type: ignore[arg-type]
    assert list(req.texts) == ["a", "b"] and req.request_id == ""
    with pytest.raises(TypeError):
        _convert.classify_request(
            [b"bytes"], model="", version="", top_k=0, request_id=None, reject_overlong=False
        )  # type: ignore[list-item]


def test_list_models_request() -> None:
    assert _convert.list_models_request(None).task == pb.TASK_UNSPECIFIED
    assert _convert.list_models_request("classify").task == pb.TASK_CLASSIFY
    assert _convert.list_models_request(Task.GENERATE).task == pb.TASK_GENERATE
    with pytest.raises(ValueError):
        _convert.list_models_request("translate")


def test_error_from_status_decodes_rich_details() -> None:
    md = rich_abort_metadata(
        grpc.StatusCode.INVALID_ARGUMENT, "bad", field_name="stop[2]", retry_delay=1.5
    )
    err = error_from_status(grpc.StatusCode.INVALID_ARGUMENT, "bad", (*md, ("x-request-id", "t-1")))
    assert isinstance(err, InvalidArgument)
    assert err.field == "stop[2]" and err.retry_after == pytest.approx(1.5)
    assert err.request_id == "t-1"
    assert "INVALID_ARGUMENT: bad" in str(err) and "stop[2]" in repr(err)


def test_error_from_status_survives_garbage_details() -> None:
    md = (("grpc-status-details-bin", b"\xff\x00not a status"),)
    err = error_from_status(grpc.StatusCode.UNAVAILABLE, "down", md, request_id="mine")
    assert type(err) is Unavailable and err.field is None and err.request_id == "mine"
    other = error_from_status(grpc.StatusCode.DATA_LOSS, "", None)
    assert type(other) is HeadraceError and str(other) == "DATA_LOSS"
