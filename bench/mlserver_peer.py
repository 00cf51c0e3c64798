"""Seldon MLServer (its stock Hugging Face runtime) serving the fp32 teacher checkpoint.

MLServer runs from its own virtualenv (bench/setup_peers.sh), offline, bound to 127.0.0.1,
KServe v2 over gRPC. Two configurations, both with MLServer's adaptive batching on
(`max_batch_size`, `max_batch_time` in model-settings.json):

- "stock": `mlserver_huggingface.HuggingFaceRuntime` as shipped. For a BERT tokenizer
  it sets the pipeline's batch size back to 1 after load (it reads pad id 0 as "no pad
  token"), so a merged batch of requests still runs one text per forward.
- "batched": the same runtime with the pipeline's batch size restored to
  `max_batch_size` after load (a 6-line subclass written next to the model settings).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from bench.servers import ROOT, ServerProcess, free_port, http_ok

VENV = Path(os.environ.get("MLSERVER_VENV", ROOT / ".cache" / "bench" / "mlserver-venv"))
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "TOKENIZERS_PARALLELISM": "false",
}

RUNTIME_SRC = '''\
"""The stock Hugging Face runtime with the pipeline batch size it was configured with."""
from mlserver.logging import logger
from mlserver_huggingface import HuggingFaceRuntime


class BatchedHuggingFaceRuntime(HuggingFaceRuntime):
    async def load(self) -> bool:
        ok = await super().load()
        # The stock loader sets 1 when the tokenizer's pad id is 0 (falsy); BERT's is 0.
        self._model._batch_size = max(1, self.settings.max_batch_size)
        logger.info("pipeline batch size restored to %d", self._model._batch_size)
        return ok
'''


def available() -> bool:
    return (VENV / "bin" / "mlserver").exists() and (VENV / ".headrace-ready").exists()


def venv_python() -> str:
    return str(VENV / "bin" / "python")


def check_checkpoint(hf_dir: Path) -> str | None:
    """Load `hf_dir` in MLServer's transformers and classify one text -> None, or the error."""
    code = (
        "import sys; from transformers import pipeline;"
        "p = pipeline('text-classification', model=sys.argv[1], batch_size=2);"
        "print(p(['I love it', 'I hate it']))"
    )
    proc = subprocess.run(
        [venv_python(), "-c", code, str(hf_dir)],
        capture_output=True,
        text=True,
        env={**os.environ, **OFFLINE},
        timeout=300,
        check=False,
    )
    return None if proc.returncode == 0 else proc.stderr.strip().splitlines()[-1:][0]


def compatible_copy(hf_dir: Path, dest: Path) -> Path:
    """A copy of a BERT checkpoint saved by transformers 5.x that transformers 4.41 loads:
    `dtype` renamed `torch_dtype` in config.json, and a tokenizer_config.json naming the
    fast BERT tokenizer around the same tokenizer.json. Weights (safetensors) are shared."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for f in hf_dir.iterdir():
        if f.name not in ("config.json", "tokenizer_config.json"):
            (dest / f.name).symlink_to(f.resolve())
    config = json.loads((hf_dir / "config.json").read_text())
    if "dtype" in config:
        config["torch_dtype"] = config.pop("dtype")
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    tok_cfg = {
        "tokenizer_class": "BertTokenizerFast",
        "do_lower_case": True,
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
        "model_max_length": config.get("max_position_embeddings", 512),
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    return dest


def prepare(
    work: Path, name: str, hf_dir: Path, *, batched: bool, max_batch: int, max_batch_time_s: float
) -> tuple[Path, int, int]:
    """Write settings.json and NAME/model-settings.json under `work` -> (folder, grpc, http port)."""
    if work.exists():
        shutil.rmtree(work)
    model_dir = work / name
    model_dir.mkdir(parents=True)
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    settings = {
        "host": "127.0.0.1",
        "grpc_port": grpc_port,
        "http_port": http_port,
        "metrics_port": metrics_port,
        "debug": False,
    }
    (work / "settings.json").write_text(json.dumps(settings, indent=2))
    impl = "mlserver_huggingface.HuggingFaceRuntime"
    if batched:
        (model_dir / "headrace_bench_runtime.py").write_text(RUNTIME_SRC)
        impl = "headrace_bench_runtime.BatchedHuggingFaceRuntime"
    model_settings = {
        "name": name,
        "implementation": impl,
        "max_batch_size": max_batch,
        "max_batch_time": max_batch_time_s,
        "parameters": {"extra": {"task": "text-classification", "pretrained_model": str(hf_dir)}},
    }
    (model_dir / "model-settings.json").write_text(json.dumps(model_settings, indent=2))
    return work, grpc_port, http_port


def start(
    work: Path, name: str, http_port: int, log_path: Path, timeout: float = 300
) -> ServerProcess:
    proc = ServerProcess(
        f"mlserver ({work.name})",
        [str(VENV / "bin" / "mlserver"), "start", str(work)],
        log_path,
        env=OFFLINE,
        cwd=work,
    )
    try:
        proc.wait_ready(
            lambda: http_ok(f"http://127.0.0.1:{http_port}/v2/models/{name}/ready"), timeout
        )
    except BaseException:
        proc.stop()
        raise
    return proc
