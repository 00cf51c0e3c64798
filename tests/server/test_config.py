"""ServerConfig: defaults, TOML file, flags over file, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from headrace.server.config import ConfigError, ServerConfig, load_config
from headrace.server.types import Task


def test_defaults() -> None:
    config = load_config()
    assert config == ServerConfig()
    assert (config.host, config.port, config.profile) == ("127.0.0.1", 50051, "auto")
    assert config.metrics_port == 0 and config.grace_period_s == 10.0
    assert config.load_timeout_s == 300.0
    assert config.backend_options() == {} and config.defaults() == {}


def test_file_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text(
        'models = "repo"\nport = 6000\nprofile = "edge"\ngrace_period_s = 3\n'
        "intra_op_threads = 2\n"
        'default_generate_model = "lm"\n'
        '[extra_backend_options]\ngraph_optimization = "all"\n'
    )
    config = load_config(path, {"port": 7000, "profile": None, "log_format": "console"})
    assert config.models == tmp_path / "repo"  # relative to the file's folder
    assert config.port == 7000  # the flag wins
    assert config.profile == "edge"  # a flag left unset (None) keeps the file's value
    assert config.grace_period_s == 3.0 and isinstance(config.grace_period_s, float)
    assert config.log_format == "console"
    assert config.backend_options() == {"graph_optimization": "all", "intra_op_threads": 2}
    assert config.defaults() == {Task.GENERATE: "lm"}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("portt = 1", "'portt'"),
        ('port = "x"', "port"),
        ('profile = "gpu"', "profile"),
        ("port = 70000", "port"),
        ("grace_period_s = -1", "grace_period_s"),
        ("load_timeout_s = -1", "load_timeout_s"),
        ('load_timeout_s = "soon"', "load_timeout_s"),
        ("intra_op_threads = 0", "intra_op_threads"),
        ("decoder_intra_op_threads = 0", "decoder_intra_op_threads"),
        ('log_level = "loud"', "log_level"),
        ("port = [", "TOML"),
        ("http_port = 70000", "http_port"),
        ("port = 8000\nhttp_port = 8000", "http_port"),
    ],
)
def test_bad_file_names_the_key(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "server.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=needle):
        load_config(path)


def test_missing_file_and_unknown_flag(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="'colour'"):
        load_config(None, {"colour": "blue"})


def test_decoder_threads_only_for_generate_models(tmp_path: Path) -> None:
    from headrace.server.backends.base import task_options

    path = tmp_path / "server.toml"
    path.write_text("intra_op_threads = 2\ndecoder_intra_op_threads = 1\n")
    options = load_config(path).backend_options()
    ort = "onnxruntime"
    assert task_options(options, Task.CLASSIFY, ort) == {"intra_op_threads": 2}
    assert task_options(options, Task.GENERATE, ort) == {"intra_op_threads": 1}
    # torch's thread count is one per process: a torch generator keeps intra_op_threads
    assert task_options(options, Task.GENERATE, "torch") == {"intra_op_threads": 2}
    unset = load_config(None, {"decoder_intra_op_threads": 3}).backend_options()
    assert task_options(unset, Task.CLASSIFY, ort) == {}  # the backend's own default
    assert task_options(unset, Task.GENERATE, ort) == {"intra_op_threads": 3}


def test_workers_split_decoder_threads_too(tmp_path: Path) -> None:
    from headrace.server.workers import cores, worker_config

    config = load_config(None, {"decoder_intra_op_threads": 64})
    each = worker_config(config, 2, 50051, tmp_path / "port")
    assert each.intra_op_threads == max(1, cores() // 2)
    assert each.decoder_intra_op_threads == each.intra_op_threads  # never more than its share
    alone = worker_config(load_config(None, {}), 2, 50051, tmp_path / "port")
    assert alone.decoder_intra_op_threads is None


def test_engine_tasks_from_file_or_flag(tmp_path: Path) -> None:
    assert load_config().engine_task_set() == {Task.CLASSIFY, Task.GENERATE}
    path = tmp_path / "h.toml"
    path.write_text('engine_tasks = ["generate"]\n')
    assert load_config(path).engine_task_set() == {Task.GENERATE}
    flag = load_config(path, {"engine_tasks": "classify, generate"})
    assert flag.engine_tasks == ("classify", "generate")
    for bad in ("", "generate,chat", ["embed"]):
        with pytest.raises(ConfigError, match="engine_tasks takes one or more of classify, generate"):
            load_config(None, {"engine_tasks": bad})
