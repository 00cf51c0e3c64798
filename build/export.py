"""HF checkpoint -> ONNX, checked against torch on the way out.

Two graphs, both through the legacy (TorchScript) exporter:

- encoder: `input_ids, attention_mask [B, S] -> logits [B, labels]`, exported
  with eager attention so ONNX Runtime's BERT optimizer can fuse attention;
- decoder (GPT-2 family): one graph with KV-cache inputs and outputs that
  serves prefill (zero-length past) and decode alike:

      input_ids [B, S], attention_mask [B, P + S], position_ids [B, S],
      past_key_values.{i}.key / .value [B, H, P, D]
        -> logits [B, V] (last position only), present.{i}.key / .value [B, H, P + S, D]

The facts the edge runtime needs (layers, heads, head dim, vocabulary,
context, eos, labels) are stored as ONNX metadata_props, so serving never
reads a transformers config.

Build-time only: imports torch and transformers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

ENCODER_TEXTS = (
    "the service answered every request before the deadline",
    "I love this, it is great and wonderful",
    "this is terrible, I hate it and it is awful",
    "café naïve façade — über straße 東京 😀",
    "ok",
)

# config.model_type -> onnxruntime.transformers.optimizer model_type
_ORT_OPTIMIZER_TYPES = {
    "bert": "bert",
    "distilbert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "electra": "bert",
    "mpnet": "bert",
}


def _metadata(model_path: Path, props: dict[str, Any]) -> None:
    """Store `props` as the ONNX file's metadata_props (values as strings)."""
    import onnx

    model = onnx.load(str(model_path))
    existing = {p.key: p for p in model.metadata_props}
    for key, value in props.items():
        text = value if isinstance(value, str) else json.dumps(value)
        if key in existing:
            existing[key].value = text
        else:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, text
    onnx.save(model, str(model_path))


@contextlib.contextmanager
def _quiet_trace() -> Any:
    """The tracer warns on every Python-level branch of transformers' masking and cache code;
    those branches are fixed by design here (checked against torch after export)."""
    from torch.jit._trace import TracerWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TracerWarning)
        warnings.filterwarnings("ignore", message=".*aten::index.*", category=UserWarning)
        yield


def _session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _tokenizer(hf_dir: Path) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(hf_dir) / "tokenizer.json"))


# --------------------------------------------------------------------------- encoder


def _encode_batch(
    hf_dir: Path, texts: Sequence[str], max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    tok = _tokenizer(hf_dir)
    pad_id = tok.token_to_id("[PAD]") or 0
    tok.enable_truncation(max_len)
    tok.enable_padding(pad_id=pad_id)
    encs = tok.encode_batch(list(texts))
    ids = np.array([e.ids for e in encs], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
    return ids, mask


def export_encoder(
    hf_dir: Path,
    out: Path,
    *,
    opset: int = 17,
    optimize: bool = True,
    check_texts: Sequence[str] | None = None,
    dtype: str = "fp32",
) -> dict[str, Any]:
    """Export a sequence classifier (pruned or not) to `out` (.onnx); returns the check
    against torch.

    Returns {"path", "optimized", "max_abs_diff", "labels_match", "seconds", ...}.
    `max_abs_diff` is the largest |logit| difference, ONNX Runtime vs torch, on
    `check_texts` (a padded batch, so masking is checked too). `dtype="fp16"` casts the
    model before tracing, so every float tensor of the graph is fp16 (for TensorRT; not
    optimised, and not checked here: ONNX Runtime's CPU kernels are fp32).
    """
    import torch
    from headrace.build.prune import is_pruned, load_classifier

    hf_dir, out = Path(hf_dir), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = load_classifier(hf_dir, attn_implementation="eager").eval()
    pruned = is_pruned(hf_dir)
    half = dtype == "fp16"
    if half:
        model = model.half()
        optimize = False
    elif dtype != "fp32":
        raise ValueError(f"dtype must be fp32 or fp16, not {dtype!r}")
    config = model.config

    class _Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            logits: torch.Tensor = self.model(
                input_ids=input_ids, attention_mask=attention_mask
            ).logits  # [B, labels]
            return logits

    wrapper = _Wrapper().eval()  # the exporter restores train mode on the module it was given
    max_len = int(getattr(config, "max_position_embeddings", 512))
    texts = list(check_texts or ENCODER_TEXTS)
    ids, mask = _encode_batch(hf_dir, texts, max_len)
    raw = out.with_suffix(".raw.onnx") if optimize else out
    with torch.no_grad(), _quiet_trace():
        torch.onnx.export(
            wrapper,
            (torch.from_numpy(ids), torch.from_numpy(mask)),
            str(raw),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "logits": {0: "batch"},
            },
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
        expected = wrapper(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()

    optimized = False
    if optimize:
        opt_type = _ORT_OPTIMIZER_TYPES.get(config.model_type)
        if opt_type is not None:
            from onnxruntime.transformers.optimizer import optimize_model

            opt = optimize_model(
                str(raw),
                model_type=opt_type,
                # pruned layers differ in heads: 0 lets the optimiser read each from the graph
                num_heads=0 if pruned else int(config.num_attention_heads),
                hidden_size=0 if pruned else int(config.hidden_size),
                opt_level=0,  # graph fusions only; ORT applies its own levels at load
            )
            opt.save_model_to_file(str(out))
            fused = opt.get_fused_operator_statistics()
            optimized = True
            log.info("encoder fusions: %s", {k: v for k, v in fused.items() if v})
        else:
            raw.replace(out)
        raw.unlink(missing_ok=True)

    labels = [config.id2label[i] for i in range(int(config.num_labels))]
    _metadata(
        out,
        {
            "headrace.kind": "encoder",
            "model_type": str(config.model_type),
            "num_labels": int(config.num_labels),
            "labels": labels,
            "max_position_embeddings": max_len,
            "precision": dtype,
        },
    )
    if half:
        return {"path": str(out), "dtype": dtype, "optimized": False, "opset": opset,
                "bytes": out.stat().st_size, "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip
    got = _session(out).run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
    diff = float(np.max(np.abs(got - expected)))
    return {
        "path": str(out),
        "optimized": optimized,
        "max_abs_diff": diff,
        "labels_match": bool((got.argmax(-1) == expected.argmax(-1)).all()),
        "checked_texts": len(texts),
        "opset": opset,
        "bytes": out.stat().st_size,
        "seconds": round(time.perf_counter() - start, 2),
    }


# --------------------------------------------------------------------------- decoder


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def _decoder_wrapper(model: Any, num_layers: int) -> Any:
    """Flat past tensors in, flat presents out; transformers 5.x wants a Cache object."""
    import torch
    from headrace.server.backends.torch_cache import cache_keyword, output_cache
    from transformers import DynamicCache

    keyword = cache_keyword(model)

    class _Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(
            self,
            input_ids: torch.Tensor,  # [B, S]
            attention_mask: torch.Tensor,  # [B, P + S]
            position_ids: torch.Tensor,  # [B, S]
            *past: torch.Tensor,  # 2 * layers of [B, H, P, D]
        ) -> tuple[torch.Tensor, ...]:
            cache = DynamicCache()
            for i in range(num_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                logits_to_keep=1,
                **{keyword: cache},
            )
            presents: list[torch.Tensor] = []
            for i in range(num_layers):
                layer = output_cache(out).layers[i]
                presents += [layer.keys, layer.values]
            return (out.logits[:, -1, :], *presents)  # logits: [B, V]

    return _Wrapper().eval()


def _decoder_facts(config: Any) -> dict[str, int]:
    num_layers = int(getattr(config, "n_layer", None) or config.num_hidden_layers)
    num_heads = int(getattr(config, "n_head", None) or config.num_attention_heads)
    hidden = int(getattr(config, "n_embd", None) or config.hidden_size)
    max_context = int(getattr(config, "n_positions", None) or config.max_position_embeddings)
    return {
        "num_layers": num_layers,
        "num_heads": num_heads,
        "head_dim": hidden // num_heads,
        "vocab_size": int(config.vocab_size),
        "max_context": max_context,
    }


def greedy_onnx(session: Any, facts: dict[str, int], prompt: Sequence[int], n: int) -> list[int]:
    """Greedy tokens from a decoder graph: one prefill with zero-length past, then steps."""
    layers, heads, dim = facts["num_layers"], facts["num_heads"], facts["head_dim"]
    ids = np.array([list(prompt)], dtype=np.int64)
    feeds: dict[str, np.ndarray] = {
        name: np.zeros((1, heads, 0, dim), dtype=np.float32) for name in past_names(layers)
    }
    pos = 0
    out: list[int] = []
    for _ in range(n):
        seq = ids.shape[1]
        feeds["input_ids"] = ids
        feeds["position_ids"] = np.arange(pos, pos + seq, dtype=np.int64)[None, :]
        feeds["attention_mask"] = np.ones((1, pos + seq), dtype=np.int64)
        results = session.run(None, feeds)
        token = int(np.argmax(results[0][0]))
        out.append(token)
        feeds.update(zip(past_names(layers), results[1:], strict=True))
        pos += seq
        ids = np.array([[token]], dtype=np.int64)
    return out


def export_decoder(
    hf_dir: Path,
    out: Path,
    *,
    opset: int = 17,
    check_prompt_ids: Sequence[int] | None = None,
    check_tokens: int = 64,
    dtype: str = "fp32",
) -> dict[str, Any]:
    """Export a GPT-2-family causal LM to one KV-cache decoder graph at `out`.

    Returns {"path", "max_abs_diff" (prefill logits vs torch), "greedy_match": "k/n",
    "facts", ...}. The greedy check runs min(check_tokens, context left) tokens.
    `dtype="fp16"` casts the model before tracing: logits and the past/present KV tensors
    are fp16 at the graph's boundary (for TensorRT; not checked here, ONNX Runtime's CPU
    kernels being fp32).
    """
    import torch
    from transformers import AutoModelForCausalLM

    hf_dir, out = Path(hf_dir), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model: Any = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager")
    model.eval()
    if dtype not in ("fp32", "fp16"):
        raise ValueError(f"dtype must be fp32 or fp16, not {dtype!r}")
    float_type = torch.float16 if dtype == "fp16" else torch.float32
    model = model.to(float_type)
    config = model.config
    facts = _decoder_facts(config)
    layers, heads, dim = facts["num_layers"], facts["num_heads"], facts["head_dim"]
    wrapper = _decoder_wrapper(model, layers)

    # Trace with a non-empty past and a multi-token input so no size is frozen at 0 or 1.
    batch, past_len, seq = 2, 3, 4
    gen = torch.Generator().manual_seed(0)
    sample_ids = torch.randint(0, facts["vocab_size"], (batch, seq), generator=gen)
    sample_mask = torch.ones(batch, past_len + seq, dtype=torch.int64)
    sample_pos = torch.arange(past_len, past_len + seq).expand(batch, seq).contiguous()
    sample_past = [
        torch.randn(batch, heads, past_len, dim, generator=gen).to(float_type)
        for _ in range(2 * layers)
    ]
    dynamic_axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch"},
    }
    for name in past_names(layers):
        dynamic_axes[name] = {0: "batch", 2: "past_sequence"}
    for name in present_names(layers):
        dynamic_axes[name] = {0: "batch", 2: "total_sequence"}
    with torch.no_grad(), _quiet_trace():
        torch.onnx.export(
            wrapper,
            (sample_ids, sample_mask, sample_pos, *sample_past),
            str(out),
            input_names=["input_ids", "attention_mask", "position_ids", *past_names(layers)],
            output_names=["logits", *present_names(layers)],
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )

    gen_config = getattr(model, "generation_config", None)
    eos = getattr(gen_config, "eos_token_id", None)
    if eos is None:
        eos = config.eos_token_id
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    _metadata(
        out,
        {
            "headrace.kind": "decoder",
            "model_type": str(config.model_type),
            **facts,
            "eos_token_id": -1 if eos is None else int(eos),
            "logits": "last",
            "precision": dtype,
        },
    )
    if dtype != "fp32":
        return {"path": str(out), "dtype": dtype, "facts": facts, "eos_token_id": eos,
                "opset": opset, "bytes": out.stat().st_size,
                "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip

    session = _session(out)
    prompt = list(check_prompt_ids or [1, 2, 3, 4, 5, 6, 7, 8])
    n = max(1, min(check_tokens, facts["max_context"] - len(prompt)))
    with torch.no_grad():
        ref_logits = model(torch.tensor([prompt])).logits[0, -1].numpy()
        # reference: greedy without a cache (full recompute), through EOS alike
        seq_ids = list(prompt)
        for _ in range(n):
            seq_ids.append(int(model(torch.tensor([seq_ids])).logits[0, -1].argmax()))
        ref_tokens = seq_ids[len(prompt) :]
    feeds: dict[str, np.ndarray] = {
        name: np.zeros((1, heads, 0, dim), dtype=np.float32) for name in past_names(layers)
    }
    feeds["input_ids"] = np.array([prompt], dtype=np.int64)
    feeds["attention_mask"] = np.ones((1, len(prompt)), dtype=np.int64)
    feeds["position_ids"] = np.arange(len(prompt), dtype=np.int64)[None, :]
    got_logits = session.run(["logits"], feeds)[0][0]
    got_tokens = greedy_onnx(session, facts, prompt, n)
    same = sum(a == b for a, b in zip(got_tokens, ref_tokens, strict=False))
    return {
        "path": str(out),
        "max_abs_diff": float(np.max(np.abs(got_logits - ref_logits))),
        "greedy_match": f"{same}/{len(ref_tokens)}",
        "greedy_identical": got_tokens == ref_tokens,
        "facts": facts,
        "eos_token_id": eos,
        "opset": opset,
        "bytes": out.stat().st_size,
        "seconds": round(time.perf_counter() - start, 2),
    }


# --------------------------------------------------------------------------- model versions


def export_version(version_dir: Path, *, int8: bool = True, opset: int = 17) -> dict[str, Any]:
    """Add ONNX artifacts to a model version whose manifest has a torch ("hf") artifact.

    Writes model.onnx (and model.int8.onnx) beside it and lists them in the
    manifest, int8 first (the edge profile's choice), then fp32. Returns the
    export (and quantization) reports.
    """
    import dataclasses

    from headrace.build.quantize import quantize_int8
    from headrace.server.manifest import Artifact, read_manifest
    from headrace.server.types import Task

    version_dir = Path(version_dir)
    manifest = read_manifest(version_dir)
    hf = manifest.artifact("torch")
    if hf is None:
        raise ValueError(f"{version_dir} has no torch artifact to export")
    fp32 = version_dir / "model.onnx"
    report: dict[str, Any] = {}
    if manifest.task is Task.CLASSIFY:
        report["export"] = export_encoder(version_dir / hf.path, fp32, opset=opset)
        extra: dict[str, Any] = {}
    else:
        report["export"] = export_decoder(version_dir / hf.path, fp32, opset=opset)
        extra = {"kv_cache": True}
    onnx_artifacts = [Artifact("onnxruntime", fp32.name, "fp32", dict(extra))]
    if int8:
        q8 = version_dir / "model.int8.onnx"
        report["quantize"] = quantize_int8(fp32, q8)
        onnx_artifacts.insert(0, Artifact("onnxruntime", q8.name, "int8", dict(extra)))
    kept = tuple(a for a in manifest.artifacts if a.backend != "onnxruntime")
    dataclasses.replace(manifest, artifacts=kept + tuple(onnx_artifacts)).write(version_dir)
    return report
