"""`headrace`: serve a model repository, list it, build models.

    headrace serve --models ./models [--port 50051] [--profile auto] [--config server.toml]
    headrace models --models ./models [--json]
    headrace models --server HOST:PORT [--json]      (a live server: every version's state)
    headrace build ...          (with the `build` extra installed)

Only argparse is imported at module level; each command imports what it needs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# flag dest -> ServerConfig field (the dest is the field name unless listed)
SERVE_FIELDS = (
    "models", "host", "port", "profile", "device", "backend", "metrics_port", "http_port",
    "grace_period_s",
    "poll_interval_s", "load_timeout_s", "intra_op_threads", "inter_op_threads",
    "decoder_intra_op_threads", "default_classify_model",
    "default_generate_model", "log_format", "log_level", "port_file", "max_message_mb",
    "tls_cert", "tls_key", "tls_client_ca", "metrics_tls", "api_key_file", "auth_exempt",
    "stream_interval", "stream_interval_ms", "workers", "engine_process", "engine_tasks",
    "otlp_endpoint",
)  # fmt: skip


def _add_serve(subparsers: Any) -> None:
    from headrace.server.backends.registry import backend_names
    from headrace.server.config import PROFILES

    p = subparsers.add_parser(
        "serve",
        help="serve a model repository over gRPC",
        description=(
            "Serve every model of a repository (NAME/VERSION/headrace.json) over gRPC: the "
            "headrace.v1.Inference service, the Open Inference Protocol (KServe v2), "
            "grpc.health.v1 and server reflection; with --http-port also the "
            "OpenAI-compatible HTTP API and a chat page. Values come "
            "from the defaults, then --config FILE, then these flags."
        ),
    )
    p.add_argument("--config", type=Path, metavar="FILE", help="TOML file of settings")
    p.add_argument("--models", type=Path, metavar="DIR", help="model repository folder")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, help="gRPC port (default 50051; 0 picks a free one)")
    p.add_argument(
        "--profile",
        choices=PROFILES,
        help="which artifacts to serve (default auto: datacenter with CUDA, else cpu)",
    )
    p.add_argument("--device", help="backend device, e.g. cpu, cuda:1 (default: from profile)")
    p.add_argument(
        "--backend",
        choices=backend_names(),
        help="serve only this backend of the profile's (default: cpu prefers onnxruntime, "
        "then torch; datacenter tensorrt, then torch)",
    )
    p.add_argument(
        "--metrics-port", type=int,
        help="Prometheus /metrics port (default 0: off, or /metrics on --http-port)",
    )  # fmt: skip
    p.add_argument(
        "--http-port", type=int,
        help="OpenAI-compatible HTTP API, health and chat page on this port (default 0: off)",
    )  # fmt: skip
    p.add_argument(
        "--grace-period", dest="grace_period_s", type=float, metavar="SECONDS",
        help="time in-flight calls get to finish on SIGTERM/SIGINT (default 10)",
    )  # fmt: skip
    p.add_argument(
        "--poll-interval", dest="poll_interval_s", type=float, metavar="SECONDS",
        help="rescan the repository for new/removed versions this often (default 2; 0: never)",
    )  # fmt: skip
    p.add_argument(
        "--load-timeout", dest="load_timeout_s", type=float, metavar="SECONDS",
        help="a model version whose load takes longer is marked failed and skipped; the "
        "others keep serving (default 300; 0: no limit)",
    )  # fmt: skip
    p.add_argument("--intra-op-threads", type=int, help="threads inside one backend op")
    p.add_argument("--inter-op-threads", type=int, help="threads across backend ops")
    p.add_argument(
        "--decoder-intra-op-threads", type=int, metavar="N",
        help="intra-op threads of generate models on ONNX Runtime (default: --intra-op-threads)",
    )  # fmt: skip
    p.add_argument(
        "--default-classify-model",
        metavar="NAME",
        help="model for classify requests that name none (default: first by name)",
    )
    p.add_argument(
        "--default-generate-model",
        metavar="NAME",
        help="model for generate requests that name none (default: first by name)",
    )
    p.add_argument("--log-format", choices=("json", "console"), help="log format (default json)")
    p.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        help="lowest level logged (default info)",
    )
    p.add_argument(
        "--port-file",
        type=Path,
        metavar="FILE",
        help="write the bound port to FILE once serving (useful with --port 0)",
    )
    p.add_argument("--max-message-mb", type=int, help="largest gRPC message (default 16)")
    p.add_argument(
        "--workers", type=int, metavar="N",
        help="front-end processes sharing the ports (SO_REUSEPORT), each with every front and "
        "its own backend sessions, under one supervisor (default: one per 2 cores, at most 8; "
        "1 on the datacenter profile)",
    )  # fmt: skip
    p.add_argument(
        "--engine-process", action=argparse.BooleanOptionalAction, default=None,
        help="one engine process loads the models and runs their batchers and decode loops "
        "(one batch for every worker's calls, one copy of each model on the device), and the "
        "--workers N processes are front ends (parsing, tokenizing, checks, logs, metrics) "
        "reaching it over a Unix socket (default: on for the datacenter profile with "
        "--workers N > 1, off for edge and cpu)",
    )  # fmt: skip
    p.add_argument(
        "--engine-tasks", metavar="TASKS",
        help="with --engine-process: the tasks whose models the engine serves, comma "
        "separated (default classify,generate); the front ends load the others themselves. "
        "'generate' decodes in the engine's own process and leaves Classify without the "
        "extra hop (docs/edge.md)",
    )  # fmt: skip
    p.add_argument(
        "--stream-interval", type=int, metavar="TOKENS",
        help="GenerateStream: tokens per message unless a request sets its own (default 1)",
    )  # fmt: skip
    p.add_argument(
        "--stream-interval-ms", type=int, metavar="MS",
        help="GenerateStream: at most one message per MS per stream after the first, each "
        "with every token made meanwhile, unless a request sets its own (default 0: off)",
    )  # fmt: skip
    p.add_argument(
        "--otlp-endpoint", metavar="URL",
        help="send OpenTelemetry traces to this OTLP/gRPC collector, e.g. http://localhost:4317 "
        "(default: off, or OTEL_EXPORTER_OTLP_ENDPOINT; needs headrace[tracing])",
    )  # fmt: skip
    _add_security(p)
    p.set_defaults(func=cmd_serve)


def _add_security(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "security",
        "TLS and API keys (docs/serving.md#security). The certificate, key and API key "
        "files are re-read when they change: rotation needs no restart.",
    )
    g.add_argument(
        "--tls-cert", type=Path, metavar="PEM",
        help="certificate chain (PEM): serve TLS on the gRPC port and the HTTP port",
    )  # fmt: skip
    g.add_argument("--tls-key", type=Path, metavar="PEM", help="private key of --tls-cert (PEM)")
    g.add_argument(
        "--tls-client-ca", type=Path, metavar="PEM",
        help="CA bundle (PEM): mutual TLS, every client must present a certificate it signed",
    )  # fmt: skip
    g.add_argument(
        "--metrics-tls", action="store_true", default=None,
        help="serve the --metrics-port over TLS too, with the same files",
    )  # fmt: skip
    g.add_argument(
        "--api-key-file", type=Path, metavar="FILE",
        help="require an API key (authorization: Bearer KEY) on every call; FILE holds one "
        "key per line, 'KEY model1,model2' to limit a key to models, '#' for comments",
    )  # fmt: skip
    g.add_argument(
        "--auth-exempt", metavar="GROUPS",
        help="comma separated call groups that need no API key, of health (grpc.health.v1, "
        "KServe ServerLive/ServerReady, /health/*), reflection, metrics; 'none' for no "
        "exemption (default: health)",
    )  # fmt: skip


def cmd_serve(args: argparse.Namespace) -> int:
    from headrace.server.config import ConfigError, load_config
    from headrace.server.logs import configure_logging, get_logger

    overrides = {name: getattr(args, name, None) for name in SERVE_FIELDS}
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"headrace serve: {exc}", file=sys.stderr)
        return 2
    if config.models is None:
        print("headrace serve: no model repository; pass --models DIR", file=sys.stderr)
        return 2
    configure_logging(config.log_format, config.log_level)
    from headrace.server.app import run
    from headrace.server.profiles import ProfileError
    from headrace.server.types import Task
    from headrace.server.workers import default_workers, run_workers

    workers = config.workers or default_workers(config.profile)
    try:
        engine = config.engine_process
        if engine is None:  # the default: on for the datacenter profile with several workers
            engine = workers > 1 and config.profile == "datacenter"
        if not engine and config.engine_task_set() != set(Task):
            get_logger("headrace.server").warning(
                "engine_tasks_ignored", reason="engine_tasks needs --engine-process"
            )
        if engine:
            from headrace.server.engine_ipc.supervisor import run_engine_workers

            return run_engine_workers(config, workers)
        if workers > 1:
            return run_workers(config, workers)
        return run(config)
    except ConfigError as exc:  # a TLS or key file that cannot be used
        print(f"headrace serve: {exc}", file=sys.stderr)
        return 2
    except (ProfileError, OSError) as exc:
        get_logger("headrace.server").error("startup_failed", reason=str(exc))
        return 1


def _add_models(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "models",
        help="list the models of a local repository, or of a running server (--server)",
        description="List NAME/VERSION folders of a model repository with task and artifacts; "
        "with --server, the models a running server knows, every version with its state "
        "(loading, ready, failed and why, retiring).",
    )
    p.add_argument("--models", type=Path, metavar="DIR", help="model repository folder")
    p.add_argument(
        "--server", metavar="HOST:PORT",
        help="ask this running server (gRPC, plaintext unless --tls-ca; the API key from "
        "$HEADRACE_API_KEY if set)",
    )  # fmt: skip
    p.add_argument("--tls-ca", type=Path, metavar="PEM",
                   help="with --server: TLS, verifying the server against this CA")  # fmt: skip
    p.add_argument("--tls-cert", type=Path, metavar="PEM",
                   help="with --tls-ca: this client certificate, for a server that asks (mTLS)")  # fmt: skip
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="the key of --tls-cert")
    p.add_argument("--config", type=Path, metavar="FILE", help="TOML file naming `models`")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_models)


def _server_models(args: argparse.Namespace) -> int:
    import os

    from headrace.client import Client, HeadraceError

    address: str = args.server
    if (args.tls_cert is None) != (args.tls_key is None) or (args.tls_cert and not args.tls_ca):
        print("headrace models: --tls-cert and --tls-key go together, with --tls-ca",
              file=sys.stderr)  # fmt: skip
        return 2
    tls: dict[str, Any] = {}
    try:
        if args.tls_ca is not None:
            tls = {"tls": True, "root_certificates": args.tls_ca.read_bytes()}
        if args.tls_cert is not None:
            tls.update(client_cert=args.tls_cert.read_bytes(), client_key=args.tls_key.read_bytes())
    except OSError as exc:
        print(f"headrace models: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        key = os.environ.get("HEADRACE_API_KEY") or None
        with Client(address, api_key=key, **tls) as client:
            models = client.models(timeout=10)
    except HeadraceError as exc:
        print(f"headrace models: {address}: {exc}", file=sys.stderr)
        return 1
    rows: list[dict[str, Any]] = []
    for m in models:
        statuses = m.version_status or tuple(_ready_status(v) for v in m.versions)
        for s in statuses:
            rows.append({
                "name": m.name,
                "version": s.version,
                "state": s.state.value,
                "task": m.task.value if m.task is not None else None,
                "reason": s.reason,
                "backend": m.backend if s.version in m.versions else "",
            })  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no models on {address}")
        return 0
    print(f"{'NAME':<24} {'VERSION':>7}  {'STATE':<9} {'TASK':<9} DETAIL")
    for r in rows:
        detail = r["reason"] or r["backend"]
        print(f"{r['name']:<24} {r['version']:>7}  {r['state']:<9} {r['task'] or '-':<9} {detail}")
    return 0


def _ready_status(version: str) -> Any:
    from headrace.client import ModelState, ModelVersionStatus

    return ModelVersionStatus(version=version, state=ModelState.READY)


def cmd_models(args: argparse.Namespace) -> int:
    if args.server:
        if args.models is not None or args.config is not None:
            print("headrace models: --server or --models/--config, not both", file=sys.stderr)
            return 2
        return _server_models(args)
    if args.tls_ca or args.tls_cert or args.tls_key:
        print("headrace models: --tls-ca, --tls-cert and --tls-key go with --server",
              file=sys.stderr)  # fmt: skip
        return 2
    from headrace.server.config import ConfigError, load_config
    from headrace.server.manifest import ManifestError, read_manifest
    from headrace.server.repository import scan

    try:
        config = load_config(args.config, {"models": args.models})
    except ConfigError as exc:
        print(f"headrace models: {exc}", file=sys.stderr)
        return 2
    if config.models is None or not config.models.is_dir():
        print("headrace models: pass --models DIR (an existing folder)", file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []
    for (name, version), path in sorted(
        scan(config.models).items(), key=lambda kv: (kv[0][0], -int(kv[0][1]))
    ):
        try:
            m = read_manifest(path)
        except ManifestError as exc:
            rows.append({"name": name, "version": version, "error": str(exc)})
            continue
        rows.append({
            "name": name,
            "version": version,
            "task": m.task.value,
            "labels": list(m.labels),
            "artifacts": [f"{a.backend}:{a.precision}:{a.path}" for a in m.artifacts],
        })  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no models in {config.models}")
        return 0
    print(f"{'NAME':<24} {'VERSION':>7}  {'TASK':<9} ARTIFACTS")
    for r in rows:
        what = (r.get("error") and f"error: {r['error']}") or ", ".join(r["artifacts"])
        print(f"{r['name']:<24} {r['version']:>7}  {r.get('task', '-'):<9} {what}")
    return 0


def _add_build(subparsers: Any) -> None:
    try:
        from headrace.build.cli import register  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        p = subparsers.add_parser("build", help="build models (needs headrace[build])")
        p.set_defaults(func=_build_missing)
        return
    register(subparsers)


def _build_missing(args: argparse.Namespace) -> int:
    print("headrace build needs the build extra: pip install 'headrace[build]'", file=sys.stderr)
    return 2


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="headrace",
        description="headrace: a gRPC model server for transformer models (classify, generate).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_serve(subparsers)
    _add_models(subparsers)
    _add_build(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
