"""The edge profile serves without torch or transformers.

1. In the development environment (where torch is installed), serving with
   profile edge never imports torch or transformers (edge_probe.py, in a subprocess).
2. `headrace.server` and `headrace.edge` import with onnxruntime, torch,
   transformers and tensorrt all blocked.
3. (slow) A fresh virtualenv with only `headrace[edge]` installed holds no torch and no
   transformers, and serves: the probe in-process, and `headrace serve --config
   deploy/edge/headrace-edge.toml` as a real process stopped by SIGTERM.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("edge_probe.py")
HEAVY = ("torch", "transformers")


def _probe(python: str, models: Path) -> dict:
    done = subprocess.run(
        [python, str(PROBE), str(models)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=PROBE.parent,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _check_probe(result: dict) -> None:
    assert result["heavy_modules"] == []
    assert result["models"] == {
        "tiny-classifier": ["onnxruntime", "int8", "edge"],
        "tiny-generator": ["onnxruntime", "int8", "edge"],
    }
    assert len(result["labels"]) == 2
    assert result["generated_tokens"] > 0 and result["streamed_tokens"] > 0


def test_edge_serving_imports_no_torch(onnx_models: Path) -> None:
    _check_probe(_probe(sys.executable, onnx_models))


BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "transformers", "onnxruntime", "tensorrt"}:
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
import headrace.edge, headrace.edge.ort_backend
import headrace.server.app, headrace.server.service, headrace.server.repository
import headrace.server.cli, headrace.server.backends.registry
print("ok")
"""


def test_server_and_edge_import_without_runtimes() -> None:
    done = subprocess.run(
        [sys.executable, "-c", BLOCKER], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"


def _build_wheel(tmp: Path) -> Path:
    """Our wheel, built from a copy of the sources (the checkout stays untouched)."""
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("client", "server", "edge", "build", "protos"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    shutil.copytree(ROOT / "src", src / "src", symlinks=True)  # the links to the folders above
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp / "wheels"), str(src)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = (tmp / "wheels").glob("headrace-*.whl")
    return wheel


@pytest.mark.slow
def test_torch_free_virtualenv_serves(onnx_models: Path, tmp_path: Path) -> None:
    """About 45 s here: venv (~9 s), `pip install headrace[edge]` from the package index
    (~30 s), two short servers."""
    wheel = _build_wheel(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python, pip = str(venv / "bin" / "python"), str(venv / "bin" / "pip")
    install = subprocess.run(
        [pip, "install", "-q", f"headrace[edge] @ {wheel.as_uri()}"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    listed = subprocess.run(
        [pip, "list", "--format", "json"], capture_output=True, text=True, check=True
    )
    installed = {d["name"].lower() for d in json.loads(listed.stdout)}
    assert "onnxruntime" in installed and "headrace" in installed
    assert not installed & {"torch", "transformers", "tensorrt", "onnx"}, installed

    _check_probe(_probe(python, onnx_models))

    # the deployed shape: the console script with the example config, stopped by SIGTERM
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [str(venv / "bin" / "headrace"), "serve", "--config",
         str(ROOT / "deploy" / "edge" / "headrace-edge.toml"), "--models", str(onnx_models),
         "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
         "--port-file", str(port_file)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert port_file.exists(), proc.stdout.read() if proc.poll() is not None else "no port"
        port = int(port_file.read_text())
        check = (
            "import sys; from headrace.client import Client\n"
            f"c = Client('127.0.0.1:{port}', timeout=30)\n"
            "print(c.health().value, c.classify('ok').results[0].labels[0].name)\n"
        )
        done = subprocess.run([python, "-c", check], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-3000:]
        health, label = done.stdout.split()
        assert health == "serving" and label in {"negative", "neutral", "positive"}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0
