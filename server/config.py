"""Server settings: defaults, a TOML file, then command-line flags (last wins).

    # headrace.toml
    models = "/srv/models"
    host = "0.0.0.0"
    port = 50051
    profile = "edge"
    metrics_port = 9464
    http_port = 8000
    grace_period_s = 15
    load_timeout_s = 120                        # a version loading longer is marked failed
    intra_op_threads = 2
    default_classify_model = "sentiment"
    tls_cert = "/etc/headrace/tls/tls.crt"      # TLS on every port (metrics: with metrics_tls)
    tls_key = "/etc/headrace/tls/tls.key"
    tls_client_ca = "/etc/headrace/tls/ca.crt"  # mTLS: client certificates required
    api_key_file = "/etc/headrace/keys"         # "KEY" or "KEY model1,model2" per line
    auth_exempt = ["health"]                    # of health, reflection, metrics
    otlp_endpoint = "http://otel-collector:4317"  # OpenTelemetry traces (OTLP/gRPC); off unset

Keys are the field names of `ServerConfig`; an unknown key is an error that
names it. Relative paths in a file are resolved against the file's folder.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from headrace.server import profiles
from headrace.server.backends.base import DECODER_THREADS
from headrace.server.backends.registry import backend_names
from headrace.server.types import (
    MAX_STREAM_INTERVAL,
    MAX_STREAM_INTERVAL_MS,
    StreamInterval,
    Task,
)

PROFILES = ("auto", *profiles.PROFILES)
LOG_FORMATS = ("json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
AUTH_EXEMPT_GROUPS = ("health", "reflection", "metrics")


class ConfigError(ValueError):
    """A setting is unknown or has a wrong value; the message names it."""


@dataclass
class ServerConfig:
    models: Path | None = None  # the model repository: NAME/VERSION/headrace.json
    # Loopback by default: exposing a model server is a decision ("0.0.0.0" to listen everywhere).
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port (see port_file and the "serving" log line)
    profile: str = "auto"  # auto | edge | datacenter | cpu
    device: str | None = None  # "cpu", "cuda", "cuda:1"; None lets the profile decide
    backend: str | None = None  # serve only this backend of the profile's; None: its order
    metrics_port: int = 0  # Prometheus /metrics on this port; 0: off (or on http_port)
    http_port: int = 0  # the OpenAI-compatible HTTP API, health and chat page; 0 turns it off
    grace_period_s: float = 10.0  # in-flight calls get this long to finish on shutdown
    poll_interval_s: float = 2.0  # model repository rescan period; 0 turns hot reload off
    # a version whose load (manifest, tokenizer, backend, warm-up) takes longer is marked
    # failed ("load timed out after N s") and the others keep serving; 0: no limit
    load_timeout_s: float = 300.0
    intra_op_threads: int | None = None  # threads inside one backend op (ORT / torch)
    inter_op_threads: int | None = None  # threads across ops (ORT / torch)
    # intra-op threads of generate models on ONNX Runtime (None: intra_op_threads; torch
    # has one count per process): a streaming server's event loop is busy while they
    # decode, so on few cores fewer threads can win (docs/bench.md)
    decoder_intra_op_threads: int | None = None
    default_classify_model: str | None = None  # model for a ClassifyRequest with no `model`
    default_generate_model: str | None = None  # model for a GenerateRequest with no `model`
    log_format: str = "json"  # json | console
    log_level: str = "info"  # debug | info | warning | error
    port_file: Path | None = None  # write the bound port here once serving
    max_message_mb: int = 16  # largest request or response message
    # close connections after about this long (0: never), so L4 balancers spread clients
    # over new replicas; running calls get grace_period_s first (server/transport.py)
    max_connection_age_s: float = 0.0
    extra_backend_options: dict[str, Any] = field(default_factory=dict)
    # GenerateStream messages (a request's stream_interval* fields override these): one
    # waits for this many tokens and this many ms since the previous one (docs/serving.md)
    stream_interval: int = 1
    stream_interval_ms: int = 0
    # front-end processes on the one port (server/workers.py); None: one per 2 cores (capped),
    # 1 on the datacenter profile
    workers: int | None = None
    reuse_port: bool = False  # share the ports with other processes (set for each worker)
    # with workers > 1: one engine process owns the models, batchers and decode loops and
    # the workers are front ends reaching it over a Unix socket (server/engine_ipc/);
    # None: on for the datacenter profile, off elsewhere
    engine_process: bool | None = None
    # the tasks whose models the engine process serves; the front ends load the others
    # themselves (["generate"]: decoding in the engine, Classify with no extra hop)
    engine_tasks: tuple[str, ...] = ("classify", "generate")
    engine_socket: Path | None = None  # a front end's engine (set by the supervisor)
    # Security (docs/serving.md#security). TLS files are re-read when they change.
    tls_cert: Path | None = None  # PEM certificate chain: TLS on the gRPC and HTTP ports
    tls_key: Path | None = None  # PEM private key of tls_cert (unencrypted)
    tls_client_ca: Path | None = None  # PEM CA bundle: client certificates required (mTLS)
    metrics_tls: bool = False  # the metrics port speaks TLS too (same files)
    api_key_file: Path | None = None  # API keys, one per line ("KEY" or "KEY model1,model2")
    auth_exempt: tuple[str, ...] = (
        "health",
    )  # call groups needing no key: health, reflection, metrics
    # OpenTelemetry traces to this OTLP/gRPC collector (docs/serving.md#tracing); None: off,
    # unless OTEL_EXPORTER_OTLP_ENDPOINT is set
    otlp_endpoint: str | None = None

    def validate(self) -> ServerConfig:
        if self.profile not in PROFILES:
            raise ConfigError(f"profile must be one of {', '.join(PROFILES)}, not {self.profile!r}")
        if self.backend is not None and self.backend not in backend_names():
            raise ConfigError(
                f"backend must be one of {', '.join(backend_names())}, not {self.backend!r}"
            )
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"log_format must be one of {', '.join(LOG_FORMATS)}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], not {self.port}")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be in [0, 65535], not {self.metrics_port}")
        if not 0 <= self.http_port <= 65535:
            raise ConfigError(f"http_port must be in [0, 65535], not {self.http_port}")
        if self.http_port and self.http_port in (self.port, self.metrics_port):
            raise ConfigError(f"http_port {self.http_port} is already the gRPC or metrics port")
        if self.grace_period_s < 0:
            raise ConfigError("grace_period_s must be >= 0")
        if self.poll_interval_s < 0:
            raise ConfigError("poll_interval_s must be >= 0")
        if self.load_timeout_s < 0:
            raise ConfigError("load_timeout_s must be >= 0 (0: no limit)")
        for name in ("intra_op_threads", "inter_op_threads", "decoder_intra_op_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1")
        if self.max_connection_age_s < 0:
            raise ConfigError("max_connection_age_s must be >= 0")
        if not 1 <= self.stream_interval <= MAX_STREAM_INTERVAL:
            raise ConfigError(f"stream_interval must be in [1, {MAX_STREAM_INTERVAL}]")
        if not 0 <= self.stream_interval_ms <= MAX_STREAM_INTERVAL_MS:
            raise ConfigError(f"stream_interval_ms must be in [0, {MAX_STREAM_INTERVAL_MS}]")
        if self.workers is not None and not 1 <= self.workers <= 256:
            raise ConfigError("workers must be in [1, 256]")
        if self.max_message_mb < 1:
            raise ConfigError("max_message_mb must be >= 1")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert (--tls-cert) and tls_key (--tls-key) go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("tls_client_ca (--tls-client-ca) needs tls_cert and tls_key")
        if self.metrics_tls and self.tls_cert is None:
            raise ConfigError("metrics_tls (--metrics-tls) needs tls_cert and tls_key")
        tasks = [t.value for t in Task]
        odd = sorted(set(self.engine_tasks) - set(tasks))
        if odd or not self.engine_tasks:
            raise ConfigError(
                f"engine_tasks takes one or more of {', '.join(tasks)}"
                + (f", not {', '.join(odd)}" if odd else "")
            )
        unknown = sorted(set(self.auth_exempt) - set(AUTH_EXEMPT_GROUPS))
        if unknown:
            raise ConfigError(
                f"auth_exempt takes {', '.join(AUTH_EXEMPT_GROUPS)}, not {', '.join(unknown)}"
            )
        return self

    def backend_options(self) -> dict[str, Any]:
        """What every backend gets in BackendSpec.options."""
        options = dict(self.extra_backend_options)
        if self.intra_op_threads is not None:
            options["intra_op_threads"] = self.intra_op_threads
        if self.inter_op_threads is not None:
            options["inter_op_threads"] = self.inter_op_threads
        if self.decoder_intra_op_threads is not None:  # the loader's, for generate models
            options[DECODER_THREADS] = self.decoder_intra_op_threads
        return options

    def stream_defaults(self) -> StreamInterval:
        return StreamInterval(self.stream_interval, self.stream_interval_ms)

    def engine_task_set(self) -> frozenset[Task]:
        """The tasks the engine process serves (all of them unless `engine_tasks` says)."""
        return frozenset(Task(t) for t in self.engine_tasks)

    def defaults(self) -> dict[Task, str]:
        out: dict[Task, str] = {}
        if self.default_classify_model:
            out[Task.CLASSIFY] = self.default_classify_model
        if self.default_generate_model:
            out[Task.GENERATE] = self.default_generate_model
        return out


_FIELDS = {f.name: f for f in dataclasses.fields(ServerConfig)}
_PATHS = {"models", "port_file", "engine_socket", "tls_cert", "tls_key", "tls_client_ca", "api_key_file"}
_INTS = {
    "port",
    "metrics_port",
    "http_port",
    "intra_op_threads",
    "inter_op_threads",
    "decoder_intra_op_threads",
    "max_message_mb",
    "stream_interval",
    "stream_interval_ms",
    "workers",
}
_FLOATS = {"grace_period_s", "poll_interval_s", "max_connection_age_s", "load_timeout_s"}
_BOOLS = {"metrics_tls", "reuse_port", "engine_process"}
_LISTS = {"auth_exempt", "engine_tasks"}  # a TOML array of strings, or one comma separated string


def _coerce(key: str, value: Any, base: Path | None) -> Any:
    if key in _PATHS:
        if not isinstance(value, str | Path):
            raise ConfigError(f"{key} must be a path string")
        path = Path(value).expanduser()
        return (base / path) if base is not None and not path.is_absolute() else path
    if key in _INTS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, not {value!r}")
        return value
    if key in _FLOATS:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, not {value!r}")
        return float(value)
    if key in _BOOLS:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, not {value!r}")
        return value
    if key in _LISTS:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
            raise ConfigError(f"{key} must be a list of strings, not {value!r}")
        names = (item.strip() for item in items)
        return tuple(name for name in names if name and name != "none")
    if key == "extra_backend_options":
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table")
        return dict(value)
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, not {value!r}")
    return value


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> ServerConfig:
    """Defaults, then the TOML file at `path`, then `overrides` (flags; None values skipped)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        for key, value in data.items():
            if key not in _FIELDS:
                raise ConfigError(f"unknown key {key!r} in config file {path}")
            values[key] = _coerce(key, value, path.parent)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in _FIELDS:
            raise ConfigError(f"unknown setting {key!r}")
        values[key] = _coerce(key, value, None)
    return ServerConfig(**values).validate()
