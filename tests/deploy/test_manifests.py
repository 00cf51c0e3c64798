"""The datacenter deployment files agree with each other and with the server.

Docker and kubectl do not run on CI machines: these checks read the files (YAML, TOML,
Dockerfile) and compare them with the server's own names (health services, config keys,
metrics), so a rename on either side fails here.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

from headrace.server.config import load_config  # noqa: E402
from headrace.v1 import inference_pb2 as pb  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "datacenter"
K8S = DEPLOY / "k8s"
INFERENCE = pb.DESCRIPTOR.services_by_name["Inference"].full_name  # "headrace.v1.Inference"


def _docs() -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs[doc["kind"]] = doc
    return docs


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict[str, Any]]:
    return _docs()


@pytest.fixture(scope="module")
def container(k8s: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (c,) = k8s["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


@pytest.fixture(scope="module")
def server_toml(k8s: dict[str, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Any:
    text = k8s["ConfigMap"]["data"]["headrace.toml"]
    path = tmp_path_factory.mktemp("cfg") / "headrace.toml"
    path.write_text(text)
    return load_config(path).validate()


def test_every_manifest_parses_and_kustomization_lists_them(k8s: dict[str, Any]) -> None:
    assert set(k8s) >= {
        "Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap", "PodDisruptionBudget",
        "Kustomization",
    }  # fmt: skip
    listed = set(k8s["Kustomization"]["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_probes_speak_grpc_health_on_the_grpc_port(container: dict[str, Any]) -> None:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc_probe = container[probe]["grpc"]
        assert grpc_probe["port"] == ports["grpc"] == 50051, probe
    # readiness and startup wait for the Inference service (models loaded, not draining)
    assert container["readinessProbe"]["grpc"]["service"] == INFERENCE
    assert container["startupProbe"]["grpc"]["service"] == INFERENCE
    # liveness asks for the whole server ("" in grpc.health.v1)
    assert container["livenessProbe"]["grpc"]["service"] == ""


def test_server_config_matches_the_pod(
    k8s: dict[str, Any], container: dict[str, Any], server_toml: Any
) -> None:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert server_toml.port == ports["grpc"]
    assert server_toml.metrics_port == ports["metrics"]
    assert server_toml.host == "0.0.0.0"  # reachable from outside the pod
    assert server_toml.profile == "datacenter"
    annotations = k8s["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == server_toml.metrics_port
    pod = k8s["Deployment"]["spec"]["template"]["spec"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pod["terminationGracePeriodSeconds"] > server_toml.grace_period_s + int(pre_stop[-1])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["securityContext"]["runAsNonRoot"] is True
    # the same settings as the file baked into the image
    baked = tomllib.loads((DEPLOY / "headrace-datacenter.toml").read_text())
    assert tomllib.loads(k8s["ConfigMap"]["data"]["headrace.toml"]) == baked
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert container["args"][container["args"].index("--config") + 1].startswith(mounts["config"])


def test_headless_service_selects_the_pods(k8s: dict[str, Any], container: dict[str, Any]) -> None:
    svc = k8s["Service"]["spec"]
    assert svc["clusterIP"] == "None"  # DNS returns every pod: client-side round_robin
    labels = k8s["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert svc["selector"].items() <= labels.items()
    assert k8s["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    names = {p["name"] for p in container["ports"]}
    grpc_port = next(p for p in svc["ports"] if p["name"] == "grpc")
    assert grpc_port["targetPort"] in names and grpc_port["port"] == 50051
    assert k8s["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_autoscaler_targets_the_deployment_on_a_metric_the_server_exports(
    k8s: dict[str, Any],
) -> None:
    from headrace.server import metrics

    hpa = k8s["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == k8s["Deployment"]["metadata"]["name"]
    assert hpa["minReplicas"] <= k8s["Deployment"]["spec"]["replicas"] <= hpa["maxReplicas"]
    exported = {m.name for m in metrics.REGISTRY.collect()}
    pods_metrics = [m["pods"]["metric"]["name"] for m in hpa["metrics"] if m["type"] == "Pods"]
    assert pods_metrics and set(pods_metrics) <= exported


def test_dockerfile_non_root_with_grpc_healthcheck() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    assert re.search(r"^ARG BASE_IMAGE=nvcr\.io/nvidia/", text, re.M)
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and not user[-1].startswith(("0", "root"))
    health = re.search(r"^HEALTHCHECK .*?CMD (\[.*?\])", text, re.M | re.S)
    assert health is not None
    cmd = health.group(1)
    assert "headrace.edge.healthcheck" in cmd and INFERENCE in cmd and "50051" in cmd
    assert re.search(r"^EXPOSE .*\b50051\b.*\b9464\b", text, re.M)
    for src in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
        assert list(ROOT.glob(src.replace("[d]", "d"))) or src.endswith("[d]"), src
    assert "pip install torch" not in text  # the base image's CUDA torch is kept
