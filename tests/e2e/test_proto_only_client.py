"""A client built from protos/ alone (protoc at test time) speaks to the server.

The client runs in a subprocess that never imports headrace.client: it gets
`headrace.v1.inference_pb2` from code generated into tmp_path, as a user in
another repository would. It calls all five RPCs and reports what it saw.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.e2e.conftest import RunningServer

ROOT = Path(__file__).resolve().parents[2]

CLIENT = textwrap.dedent(
    """
    import json, sys, types
    gen = sys.argv[1]
    # `headrace` is the installed package here; point its name at the generated code only
    pkg = types.ModuleType("headrace")
    pkg.__path__ = [gen + "/headrace"]
    sys.modules["headrace"] = pkg
    import grpc
    from google.rpc import error_details_pb2, status_pb2
    from headrace.v1 import inference_pb2 as pb, inference_pb2_grpc as pbg

    def field(err):
        for key, value in err.trailing_metadata():
            if key == "grpc-status-details-bin":
                for d in status_pb2.Status.FromString(value).details:
                    bad = error_details_pb2.BadRequest()
                    if d.Unpack(bad):
                        return bad.field_violations[0].field
        return None

    def error(fn):
        try:
            fn()
        except grpc.RpcError as err:
            return [err.code().name, field(err)]
        return ["OK", None]

    out = {}
    with grpc.insecure_channel(sys.argv[2]) as channel:
        stub = pbg.InferenceStub(channel)
        models = stub.ListModels(pb.ListModelsRequest()).models
        out["models"] = sorted(m.name for m in models)
        r = stub.Classify(pb.ClassifyRequest(texts=["good", "bad"], top_k=2, request_id="c1"))
        out["classify"] = [r.request_id, [len(x.labels) for x in r.results]]
        reqs = [pb.ClassifyRequest(texts=["x"] * (i + 1), request_id=str(i)) for i in range(5)]
        out["classify_stream"] = [[s.request_id, len(s.results)] for s in stub.ClassifyStream(iter(reqs))]
        g = stub.Generate(pb.GenerateRequest(prompt="the service", max_new_tokens=5))
        out["generate"] = [g.text, pb.FinishReason.Name(g.finish_reason), g.usage.completion_tokens]
        chunks = list(stub.GenerateStream(pb.GenerateRequest(prompt="the service", max_new_tokens=5)))
        out["stream"] = ["".join(c.text for c in chunks), pb.FinishReason.Name(chunks[-1].finish_reason)]
        out["empty_texts"] = error(lambda: stub.Classify(pb.ClassifyRequest(texts=[])))
        out["bad_top_p"] = error(lambda: stub.Generate(pb.GenerateRequest(
            prompt="x", sampling=pb.SamplingParams(top_p=2.0))))
        out["unknown_model"] = error(lambda: list(stub.GenerateStream(pb.GenerateRequest(
            model="nope", prompt="x"))))
    out["imported_headrace_client"] = any(m.startswith("headrace.client") for m in sys.modules)
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    grpc_tools = pytest.importorskip("grpc_tools")
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("proto-only")
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    protos = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto"))
    rc = protoc.main(
        ["protoc", f"-I{ROOT / 'protos'}", f"-I{include}", f"--python_out={out}",
         f"--grpc_python_out={out}", *protos]
    )  # fmt: skip
    assert rc == 0
    assert (out / "headrace" / "v1" / "inference_pb2_grpc.py").is_file()
    return out


def test_proto_only_client(generated: Path, server: RunningServer) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT, str(generated), server.address],
        capture_output=True, text=True, timeout=60, cwd=generated,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["imported_headrace_client"] is False
    assert out["models"] == ["tiny-classifier", "tiny-generator"]
    assert out["classify"] == ["c1", [2, 2]]
    assert out["classify_stream"] == [[str(i), i + 1] for i in range(5)]
    text, reason, tokens = out["generate"]
    assert reason in ("LENGTH", "EOS") and tokens <= 5
    assert out["stream"] == [text, reason]
    assert out["empty_texts"] == ["INVALID_ARGUMENT", "texts"]
    assert out["bad_top_p"] == ["INVALID_ARGUMENT", "sampling.top_p"]
    assert out["unknown_model"] == ["NOT_FOUND", None]
