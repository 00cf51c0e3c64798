"""deploy/datacenter/kserve/: the KServe ServingRuntime and InferenceServices, validated.

Two validators, no cluster:
- the Kubernetes parts (the runtime's containers, the predictor's container fields) go
  through `kubernetes-validate` (the Kubernetes OpenAPI schemas, strict: unknown fields fail),
  wrapped in a Pod;
- the KServe parts through JSON schemas of the fields KServe documents for
  serving.kserve.io/v1alpha1 ServingRuntime/ClusterServingRuntime and v1beta1
  InferenceService (unknown fields fail), written below from KServe's API reference.
Then the files are checked against the server: the port the args bind, the health service
the probes ask for, the protocol versions the server speaks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

from headrace.server.cli import make_parser  # noqa: E402
from headrace.server.kserve.pb import grpc_service_pb2 as kserve_pb  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
KSERVE = ROOT / "deploy" / "datacenter" / "kserve"
K8S_VERSION = "1.30"
SERVICE = kserve_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

_OBJECT = {"type": "object"}
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": _STRINGS,
        "annotations": _STRINGS,
    },
    "additionalProperties": False,
}
# ServingRuntimeSpec (v1alpha1), with the inlined ServingRuntimePodSpec
RUNTIME_SPEC = {
    "type": "object",
    "required": ["containers", "supportedModelFormats"],
    "properties": {
        "supportedModelFormats": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string"},
                    "version": {"type": "string"},
                    "autoSelect": {"type": "boolean"},
                    "priority": {"type": "integer", "minimum": 1},
                },
                "additionalProperties": False,
            },
        },
        "protocolVersions": {
            "type": "array",
            "items": {"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]},
        },
        "multiModel": {"type": "boolean"},
        "disabled": {"type": "boolean"},
        "grpcEndpoint": {"type": "string"},
        "grpcDataEndpoint": {"type": "string"},
        "httpDataEndpoint": {"type": "string"},
        "replicas": {"type": "integer", "minimum": 0},
        "storageHelper": {"type": "object", "properties": {"disabled": {"type": "boolean"}}},
        "builtInAdapter": _OBJECT,
        "labels": _STRINGS,
        "annotations": _STRINGS,
        # core v1 PodSpec fields: checked by kubernetes-validate
        "containers": {"type": "array", "minItems": 1},
        "volumes": {"type": "array"},
        "nodeSelector": _STRINGS,
        "affinity": _OBJECT,
        "tolerations": {"type": "array"},
        "imagePullSecrets": {"type": "array"},
    },
    "additionalProperties": False,
}
POD_FIELDS = (
    "containers",
    "volumes",
    "nodeSelector",
    "affinity",
    "tolerations",
    "imagePullSecrets",
)
# InferenceService predictor: ComponentExtensionSpec + PodSpec fields + `model` (ModelSpec:
# modelFormat, runtime, storageUri, protocolVersion, and inlined core v1 Container fields)
MODEL_SPEC_OWN = ("modelFormat", "runtime", "storageUri", "protocolVersion")
PREDICTOR_SPEC = {
    "type": "object",
    "required": ["model"],
    "properties": {
        "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 0},
        "scaleTarget": {"type": "integer", "minimum": 1},
        "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
        "containerConcurrency": {"type": "integer", "minimum": 0},
        "timeout": {"type": "integer", "minimum": 0},
        "canaryTrafficPercent": {"type": "integer", "minimum": 0, "maximum": 100},
        "labels": _STRINGS,
        "annotations": _STRINGS,
        "serviceAccountName": {"type": "string"},
        "terminationGracePeriodSeconds": {"type": "integer", "minimum": 0},  # a PodSpec field
        "nodeSelector": _STRINGS,
        "tolerations": {"type": "array"},
        "model": {
            "type": "object",
            "required": ["modelFormat"],
            "properties": {
                "modelFormat": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": {"type": "string"}, "version": {"type": "string"}},
                    "additionalProperties": False,
                },
                "runtime": {"type": "string"},
                "storageUri": {"type": "string", "pattern": "^(pvc|gs|s3|https?|hdfs|oci)://"},
                "protocolVersion": {"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]},
            },
            # the rest are core v1 Container fields: checked by kubernetes-validate
        },
    },
    "additionalProperties": False,
}


def _resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
        "additionalProperties": False,
    }


SCHEMAS = {
    "ClusterServingRuntime": _resource(
        "serving.kserve.io/v1alpha1", "ClusterServingRuntime", RUNTIME_SPEC
    ),
    "InferenceService": _resource(
        "serving.kserve.io/v1beta1",
        "InferenceService",
        {
            "type": "object",
            "required": ["predictor"],
            "properties": {"predictor": PREDICTOR_SPEC},
            "additionalProperties": False,
        },
    ),
}


def _docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(KSERVE.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def _pod(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return _docs()


@pytest.fixture(scope="module")
def runtime(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == "ClusterServingRuntime"]
    return found


def test_kustomization_lists_every_file(docs: list[dict[str, Any]]) -> None:
    (kust,) = [d for d in docs if d["kind"] == "Kustomization"]
    assert set(kust["resources"]) == {p.name for p in KSERVE.glob("*.yaml")} - {
        "kustomization.yaml"
    }


def test_kserve_fields_match_the_documented_schema(docs: list[dict[str, Any]]) -> None:
    kinds = [d["kind"] for d in docs if d["kind"] != "Kustomization"]
    assert sorted(kinds) == ["ClusterServingRuntime", "InferenceService", "InferenceService"]
    for doc in docs:
        if doc["kind"] in SCHEMAS:
            jsonschema.validate(doc, SCHEMAS[doc["kind"]])


def test_the_schema_catches_a_misspelt_field(runtime: dict[str, Any]) -> None:
    broken = {**runtime, "spec": {**runtime["spec"], "protocolVersion": ["grpc-v2"]}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMAS["ClusterServingRuntime"])


def test_kubernetes_parts_validate_strictly(docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        if doc["kind"] == "ClusterServingRuntime":
            spec = {k: v for k, v in doc["spec"].items() if k in POD_FIELDS}
            kubernetes_validate.validate(_pod("runtime", spec), K8S_VERSION, strict=True)
        elif doc["kind"] == "InferenceService":
            model = doc["spec"]["predictor"]["model"]
            container = {k: v for k, v in model.items() if k not in MODEL_SPEC_OWN}
            container["name"] = "kserve-container"
            container["image"] = "set-by-the-runtime"
            pod = _pod(doc["metadata"]["name"], {"containers": [container]})
            kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    bad = _pod("x", {"containers": [{"name": "c", "image": "i", "resource": {}}]})
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_the_runtime_serves_what_it_declares(runtime: dict[str, Any]) -> None:
    spec = runtime["spec"]
    assert {"v2", "grpc-v2"} <= set(spec["protocolVersions"])
    (container,) = spec["containers"]
    args = make_parser().parse_args(container["args"])
    assert args.command == "serve"
    assert str(args.models) == "/mnt/models"  # where KServe's storage initializer puts storageUri
    assert args.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["h2c"] == args.port  # KServe sends gRPC to the port named h2c
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["grpc"] == {"port": args.port, "service": SERVICE}
    assert container["livenessProbe"]["grpc"]["service"] == ""
    assert spec["annotations"]["prometheus.kserve.io/port"] == str(args.metrics_port)


def test_inference_services_use_the_runtime(
    docs: list[dict[str, Any]], runtime: dict[str, Any]
) -> None:
    formats = {(f["name"], f.get("version")) for f in runtime["spec"]["supportedModelFormats"]}
    services = [d for d in docs if d["kind"] == "InferenceService"]
    assert {s["metadata"]["name"] for s in services} == {"sentiment", "tweetgpt"}
    for isvc in services:
        model = isvc["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime["metadata"]["name"]
        assert (model["modelFormat"]["name"], model["modelFormat"].get("version")) in formats
        assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
        # the repository under storageUri holds the model named like the InferenceService
        assert model["storageUri"].rstrip("/").endswith("/" + isvc["metadata"]["name"])


def test_a_rolling_restart_has_time_to_drain(
    docs: list[dict[str, Any]], runtime: dict[str, Any]
) -> None:
    (container,) = runtime["spec"]["containers"]
    grace = make_parser().parse_args(container["args"]).grace_period_s
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[:1] == ["sleep"] and int(pre_stop[-1]) > 0
    for isvc in (d for d in docs if d["kind"] == "InferenceService"):
        period = isvc["spec"]["predictor"]["terminationGracePeriodSeconds"]
        assert period > grace + int(pre_stop[-1]), isvc["metadata"]["name"]
