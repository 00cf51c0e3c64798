#!/usr/bin/env bash
# One-time install of the peer servers that `make bench` compares headrace against.
#
# Seldon MLServer + its Hugging Face runtime live in their own virtualenv: their pins
# (transformers<4.42, tensorflow, uvloop) clash with the project's. Idempotent: an
# existing, importable venv is kept. Installs nothing from a model hub.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${MLSERVER_VENV:-$ROOT/.cache/bench/mlserver-venv}"
PY="${PYTHON:-python3.11}"
STAMP="$VENV/.headrace-ready"

if [[ -f "$STAMP" ]] && "$VENV/bin/python" -c "import mlserver, mlserver_huggingface" 2>/dev/null; then
    echo "setup_peers: MLServer venv ready at $VENV"
    exit 0
fi

echo "setup_peers: installing MLServer into $VENV (one time; pulls ~4 GB)"
mkdir -p "$(dirname "$VENV")"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch first and pinned: a bare torch resolves to a multi-GB CUDA build.
"${PIP[@]}" "torch==2.13.0"
# 4.41 is the newest transformers whose pipelines still export Conversation (the stock
# runtime imports it); optimum 1.27 fails to import with torch 2.13.
"${PIP[@]}" "torch==2.13.0" "mlserver==1.7.1" "mlserver-huggingface==1.7.1" \
    "transformers<4.42" "optimum[onnxruntime]<1.22"
# uvloop 0.23 crashes the MLServer worker at start.
"${PIP[@]}" "uvloop==0.21.0"
"$VENV/bin/python" -c "import mlserver, mlserver_huggingface, transformers; print('setup_peers: mlserver', mlserver.__version__, 'transformers', transformers.__version__)" 2>&1 | tail -n 5
touch "$STAMP"
