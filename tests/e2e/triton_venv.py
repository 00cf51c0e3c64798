"""The virtualenv holding the real tritonclient[grpc], made once from its hashed lock and cached.

tritonclient pins protobuf<7 while headrace needs 7.x, so it cannot share the test
environment; it runs from its own interpreter, as a user's client would (which also
shows the wire works across protobuf majors). The venv lives in
.cache/tritonclient-venv and is remade when requirements/tritonclient.lock changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "tritonclient.lock"
VENV = Path(os.environ.get("TRITONCLIENT_VENV", ROOT / ".cache" / "tritonclient-venv"))


def _stamp() -> Path:
    digest = hashlib.sha256(LOCK.read_bytes()).hexdigest()[:12]
    return VENV / f".installed-{digest}"


def ensure_venv() -> Path:
    """The venv's python, creating the venv first when it is missing or stale."""
    python = VENV / "bin" / "python"
    if _stamp().exists() and python.exists():
        return python
    tmp = VENV.with_name(VENV.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True)
    pip = [str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    done = subprocess.run(
        [*pip, "--require-hashes", "--no-deps", "-r", str(LOCK)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"installing {LOCK.name} failed:\n{done.stderr[-3000:]}")
    shutil.rmtree(VENV, ignore_errors=True)
    tmp.rename(VENV)  # the venv's scripts name their folder: run them through `python -m`
    _stamp().touch()
    return python


def run_json(script: Path, *args: str, timeout: float = 240) -> Any:
    """Run `script` with the tritonclient venv's python -> the JSON it printed last."""
    python = ensure_venv()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        [str(python), str(script), *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    if done.returncode != 0:
        raise AssertionError(f"{script.name} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
