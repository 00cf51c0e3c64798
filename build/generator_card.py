"""The generator's model card: perplexity, agreement with torch and decode speed of every form."""

from __future__ import annotations

from typing import Any

from headrace.build.card import environment, target


def _find(forms: list[dict[str, Any]], backend: str, precision: str) -> dict[str, Any]:
    return next(f for f in forms if f["backend"] == backend and f["precision"] == precision)


def generator_card(
    cfg: Any,
    data: dict[str, Any],
    tokenizer: dict[str, Any],
    teacher: dict[str, Any],
    student: dict[str, Any],
    export: dict[str, Any],
    evaluation: dict[str, Any],
) -> dict[str, Any]:
    served = evaluation[cfg.serve]
    other = "student" if cfg.serve == "teacher" else "teacher"
    ppl = {role: _find(evaluation[role], "torch", "fp32")["perplexity"] for role in evaluation}
    int8 = _find(served, "onnxruntime", "int8")
    fp32 = _find(served, "onnxruntime", "fp32")
    check = export[cfg.serve]["onnx"]
    targets = [
        target(
            "ONNX fp32 vs torch: max abs logit diff <= 1e-4",
            f"{float(check['max_abs_diff']):.2e}",
            float(check["max_abs_diff"]) <= 1e-4,
        ),
        target(
            f"greedy generation identical to torch for {cfg.greedy_tokens} tokens (fp32 ONNX)",
            f"{fp32['greedy_identical']} prompts, {fp32['greedy_agreement']:.1%} of tokens",
            fp32["greedy_agreement"] == 1.0,
        ),
    ]
    headline = {
        "perplexity": ppl[cfg.serve],
        "megabytes": int8["megabytes"],
        "decode_ms_batch1": int8["decode_ms_batch1"],
        "decode_ms_batch16": int8["decode_ms_batch16"],
        "greedy_agreement_int8": int8["greedy_agreement"],
    }
    return {
        "model": cfg.name,
        "summary": (
            f"A small GPT-2 causal LM trained from scratch on tweets with its own byte-level BPE "
            f"tokenizer; this version holds the {cfg.serve} ({ppl[cfg.serve]:.1f} held-out "
            f"perplexity; the {other}: {ppl[other]:.1f})."
        ),
        "headline": {"form": int8["form"], **headline},
        **headline,
        "forms": evaluation["teacher"] + evaluation["student"],
        "targets": targets,
        "targets_met": all(t["met"] for t in targets),
        "data": {**data, "tokenizer": tokenizer, "block_size": cfg.block_size},
        "training": {
            "teacher": {
                "n_embd": cfg.n_embd,
                "n_layer": cfg.n_layer,
                "n_head": cfg.n_head,
                "lr": cfg.teacher_lr,
                "batch_size": cfg.batch_size,
                **teacher,
            },
            "student": {
                "layers": cfg.student_layers,
                "lr": cfg.student_lr,
                "temperature": cfg.temperature,
                "alpha_soft": cfg.alpha,
                **student,
            },
            "seed": cfg.seed,
        },
        "export": {
            role: {
                "onnx_max_abs_diff": export[role]["onnx"].get("max_abs_diff"),
                "onnx_greedy_match": export[role]["onnx"].get("greedy_match"),
                "int8_ratio": export[role]["int8"].get("ratio"),
            }
            for role in export
        },
        "environment": environment(cfg.threads),
        "notes": [
            f"Served: the {cfg.serve}. "
            + (
                "Its perplexity is clearly better and a decode step of a model this small "
                "costs well under a millisecond either way, so quality wins over the "
                "student's small speed gain."
                if cfg.serve == "teacher"
                else "The student's perplexity is close to the teacher's at a lower step cost."
            ),
            f"Student: layers {student.get('layers_kept')} of the teacher's {cfg.n_layer}, "
            f"distilled on the teacher's next-token distributions (KL at T={cfg.temperature}, "
            f"weight {cfg.alpha}) plus the next-token loss.",
            "Perplexity: exp(mean next-token loss) over the held-out test texts, packed into "
            f"blocks of {cfg.block_size} tokens like the training data.",
            "Decode step: one token for every sequence with 32 cached tokens, p50 of 50 steps, "
            "straight on the ONNX graph; greedy agreement: tokens equal to torch's greedy "
            "tokens, position by position, over the test prompts.",
        ],
        "reproduce": f"headrace build evaluate {cfg.out}/{cfg.name}/{cfg.version}",
    }
