"""Generator versions measured: held-out perplexity (torch), greedy agreement of each ONNX
form with torch, and the decode-step latency of each ONNX form at batch 1 and 16."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from headrace.build.data import SPLIT_NAME, Split
from headrace.build.generator import pack, prompt_ids
from headrace.build.steps import log


def evaluate_generator_version(
    version_dir: Path,
    *,
    threads: int = 2,
    limit: int | None = None,
    prompts: int | None = None,
    greedy_tokens: int | None = None,
) -> list[dict[str, Any]]:
    """Perplexity (torch), greedy agreement with torch and decode-step latency (ONNX forms).

    `prompts` and `greedy_tokens` default to the values the version was built with."""
    import torch
    from headrace.build.evaluate import (
        decode_step_latency,
        file_bytes,
        greedy_agreement,
        lm_perplexity,
    )
    from headrace.server.manifest import read_manifest
    from tokenizers import Tokenizer
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(threads)
    version_dir = Path(version_dir)
    m = read_manifest(version_dir)
    role = str(m.provenance.get("role", "")) or version_dir.parent.name
    built = m.provenance.get("evaluation", {})
    prompts = prompts or int(built.get("prompts", 8))
    greedy_tokens = greedy_tokens or int(built.get("greedy_tokens", 64))
    split = Split.load(version_dir / SPLIT_NAME)
    test = list(split.test[:limit] if limit else split.test)
    tok = Tokenizer.from_file(str(version_dir / m.tokenizer))
    model = GPT2LMHeadModel.from_pretrained(version_dir / "hf").eval()  # type: ignore[no-untyped-call]
    block = int(model.config.n_positions)
    held_out = pack(tok, [e.text for e in test], block)
    ppl = lm_perplexity(model, held_out)
    forms = []
    for art in sorted(m.artifacts, key=lambda a: a.backend != "torch"):
        size = file_bytes(version_dir / art.path)
        form: dict[str, Any] = {
            "form": f"{role} {art.precision} ({art.backend})",
            "model": version_dir.parent.name,
            "backend": art.backend,
            "precision": art.precision,
            "path": art.path,
            "bytes": size,
            "megabytes": round(size / 1e6, 2),
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        if art.backend == "torch":
            form.update(perplexity=round(ppl, 2), heldout_tokens=int(held_out.size))
        else:
            log(f"  measuring {form['form']}")
            onnx = version_dir / art.path
            form.update(
                greedy_agreement(
                    model, onnx, prompt_ids(tok, split, prompts), greedy_tokens, threads
                )
            )
            form["decode_ms_batch1"] = decode_step_latency(onnx, batch=1, threads=threads)
            form["decode_ms_batch16"] = decode_step_latency(onnx, batch=16, threads=threads)
            form["runtime"] = "onnxruntime InferenceSession (decoder graph, past 32)"
        forms.append(form)
    return forms
