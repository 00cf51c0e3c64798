"""The generator's model card: perplexity, agreement with torch and decode speed of every form."""

from __future__ import annotations

from typing import Any

from headrace.build.card import environment, target


def _find(forms: list[dict[str, Any]], backend: str, precision: str) -> dict[str, Any]:
    return next(f for f in forms if f["backend"] == backend and f["precision"] == precision)


def choose(cfg: Any, evaluation: dict[str, Any]) -> tuple[str, str]:
    """-> (role to serve, why). "auto" serves the student unless its held-out perplexity is
    more than 5% worse than the teacher's: it is smaller and decodes faster."""
    ppl = {r: _find(evaluation[r], "torch", "fp32")["perplexity"] for r in evaluation}
    step = {r: _find(evaluation[r], "onnxruntime", "int8")["decode_ms_batch1"] for r in evaluation}
    size = {r: _find(evaluation[r], "onnxruntime", "int8")["megabytes"] for r in evaluation}
    if "student" not in evaluation:
        return "teacher", (
            f"the teacher, the only model built (--student-steps 0): held-out perplexity "
            f"{ppl['teacher']:.1f}, int8 decode step at batch 1 {step['teacher']} ms, int8 "
            f"size {size['teacher']} MB."
        )
    facts = (
        f"held-out perplexity {ppl['student']:.1f} (student) vs {ppl['teacher']:.1f} "
        f"(teacher); int8 decode step at batch 1 {step['student']} vs {step['teacher']} ms; "
        f"int8 size {size['student']} vs {size['teacher']} MB"
    )
    if cfg.serve != "auto":
        return cfg.serve, f"chosen by --serve {cfg.serve}: {facts}."
    if ppl["student"] <= 1.05 * ppl["teacher"]:
        return "student", (
            f"the student: its quality is within 5% of the teacher's or better at a smaller "
            f"size and a cheaper decode step ({facts})."
        )
    return "teacher", (
        f"the teacher: the student's perplexity is more than 5% worse, and a model this "
        f"small decodes in about a millisecond a step either way, so quality wins ({facts})."
    )


def generator_card(
    cfg: Any,
    data: dict[str, Any],
    tokenizer: dict[str, Any],
    teacher: dict[str, Any],
    student: dict[str, Any],
    export: dict[str, Any],
    evaluation: dict[str, Any],
) -> dict[str, Any]:
    serve, why = choose(cfg, evaluation)
    served = evaluation[serve]
    ppl = {role: _find(evaluation[role], "torch", "fp32")["perplexity"] for role in evaluation}
    others = "; ".join(f"the {r}: {ppl[r]:.1f}" for r in evaluation if r != serve)
    int8 = _find(served, "onnxruntime", "int8")
    fp32 = _find(served, "onnxruntime", "fp32")
    check = export[serve]["onnx"]
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
        "perplexity": ppl[serve],
        "megabytes": int8["megabytes"],
        "decode_ms_batch1": int8["decode_ms_batch1"],
        "decode_ms_batch16": int8["decode_ms_batch16"],
        "greedy_agreement_int8": int8["greedy_agreement"],
    }
    return {
        "model": cfg.name,
        "served": serve,
        "summary": (
            f"A small GPT-2 causal LM trained from scratch on tweets with its own byte-level BPE "
            f"tokenizer; this version holds the {serve} ({ppl[serve]:.1f} held-out "
            f"perplexity{'; ' + others if others else ''})."
        ),
        "headline": {"form": int8["form"], **headline},
        **headline,
        "forms": [form for role in evaluation for form in evaluation[role]],
        "targets": targets,
        "targets_met": all(t["met"] for t in targets),
        "data": {**data, "tokenizer": tokenizer, "block_size": cfg.block_size},
        "training": {
            "teacher": {
                "n_embd": cfg.n_embd,
                "n_layer": cfg.n_layer,
                "n_head": cfg.n_head,
                "lr": cfg.teacher_lr,
                "warmup_fraction": cfg.warmup_fraction,
                "batch_size": cfg.batch_size,
                **teacher,
            },
            **(
                {
                    "student": {
                        "layers": cfg.student_layers,
                        "lr": cfg.student_lr,
                        "temperature": cfg.temperature,
                        "alpha_soft": cfg.alpha,
                        **student,
                    }
                }
                if student
                else {}
            ),
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
            f"Served: {why}",
            (
                f"Student: layers {student.get('layers_kept')} of the teacher's {cfg.n_layer}, "
                f"distilled on the teacher's next-token distributions (KL at "
                f"T={cfg.temperature}, weight {cfg.alpha}) plus the next-token loss."
                if student
                else "No student: at this size the teacher's int8 decode step is already "
                "well under the server's own per-token cost, and the build's minutes buy "
                "more by training the teacher longer (docs/build.md has the measurements)."
            ),
            "Perplexity: exp(mean next-token loss) over the held-out test texts, packed into "
            f"blocks of {cfg.block_size} tokens like the training data.",
            "Greedy agreement below 1 for int8 is expected: dynamic quantisation moves "
            "near-tied logits, and one changed token changes the rest of the sequence; the "
            "fp32 graph matches torch token for token.",
            "Decode step: one token for every sequence with 32 cached tokens, p50 of 50 steps, "
            "straight on the ONNX graph; greedy agreement: tokens equal to torch's greedy "
            "tokens, position by position, over the test prompts.",
        ],
        "reproduce": f"headrace build evaluate {cfg.out}/{cfg.name}/{cfg.version}",
    }
