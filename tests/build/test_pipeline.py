"""The classifier and generator pipelines end to end on tiny models and tiny data (seconds)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from headrace.build.card import CARD_NAME
from headrace.build.classifier import ClassifierConfig, build_classifier, is_built
from headrace.build.data import SPLIT_NAME, Split
from headrace.build.generator import GeneratorConfig, build_generator
from headrace.build.steps import read_step
from headrace.server.manifest import read_manifest
from headrace.server.types import Task


@pytest.fixture()
def classifier_cfg(tmp_path: Path, tiny_models: Path, labelled_csv: Path) -> ClassifierConfig:
    return ClassifierConfig(
        out=tmp_path / "models",
        name="senti",
        data=labelled_csv,
        text_column="review",
        label_column="stars",
        base=tiny_models / "tiny-classifier" / "1" / "hf",
        max_input_tokens=32,
        batch_size=8,
        teacher_epochs=1.0,
        teacher_lr=1e-3,
        teacher_eval_every=0.5,
        teacher_eval_texts=None,
        plateau_patience=1,
        freeze_embeddings=False,
        student_layers=(1,),
        student_epochs=1.0,
        student_lr=1e-3,
        prune_target="1.2x",
        prune_epochs=0.5,
        prune_texts=16,
        calibration_texts=16,
        latency_samples=5,
    )


FORMS = ("fp32 (onnxruntime)", "int8 dynamic (onnxruntime)", "int8 static (onnxruntime)")


def test_classifier_pipeline_writes_two_versions_with_a_card(
    classifier_cfg: ClassifierConfig,
) -> None:
    card = build_classifier(classifier_cfg)
    out = classifier_cfg.out
    student, teacher = out / "senti" / "1", out / "senti-teacher" / "1"
    s_man, t_man = read_manifest(student), read_manifest(teacher)
    assert s_man.task is Task.CLASSIFY and s_man.labels == ("negative", "neutral", "positive")
    assert t_man.artifact("onnxruntime").path == "model.onnx"
    # the served form is listed first, and it is the card's choice
    served = card["served"]
    assert s_man.artifact("onnxruntime").path == served["path"]
    assert s_man.provenance["role"] == served["model"] in ("student-1L", "pruned-1L")
    for version in (student, teacher):
        for name in ("model.onnx", "model.int8.onnx", "model.qdq.onnx", "tokenizer.json",
                     SPLIT_NAME, CARD_NAME, "tradeoff.png"):  # fmt: skip
            assert (version / name).exists(), version / name
        tok = json.loads((version / "tokenizer.json").read_text())
        assert tok["padding"] is None and tok["truncation"] is None
    assert (teacher / "hf" / "config.json").exists()
    # every form of every model, measured on the one test split saved beside the models
    split = Split.load(student / SPLIT_NAME)
    assert Split.load(teacher / SPLIT_NAME) == split
    forms = {f["form"]: f for f in card["forms"]}
    models = ("teacher", "student-1L", "pruned-1L", "student-1L-full-vocab")
    expected = {f"{m} {f}" for m in models for f in FORMS}
    expected |= {f"{m} fp32 (torch)" for m in models if m != "pruned-1L"}  # pruned: no torch
    assert set(forms) == expected
    for form in forms.values():
        assert form["test_texts"] == len(split.test) == 15
        assert 0.0 <= form["accuracy"] <= 1.0 and form["p50_ms_batch1"] > 0
        assert form["bytes"] > 0 and form["throughput_batch32"] > 0
        assert form["speedup_vs_teacher"] > 0 and form["accuracy_vs_teacher"] is not None
    assert forms["teacher fp32 (onnxruntime)"]["max_abs_diff"] < 1e-4
    assert (
        forms["pruned-1L fp32 (onnxruntime)"]["bytes"]
        < forms["student-1L fp32 (onnxruntime)"]["bytes"]
    )
    pruned = card["training"]["pruned-1L"]
    assert (
        pruned["heads_kept"] <= 2 and pruned["ffn_kept"] < 64 and card["training"]["pruning_search"]
    )
    assert card["training"]["student-1L"]["layers_kept"] == [1]
    assert card["teacher_curve"] and card["baselines"]["bow_logreg"]["accuracy"] > 0
    assert s_man.card["headline"]["form"] == served["form"]
    text = (student / CARD_NAME).read_text()
    assert f"| {served['form']} |" in text and "](tradeoff.png)" in text
    assert (student / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_classifier_pipeline_resumes_and_skips(classifier_cfg: ClassifierConfig) -> None:
    classifier_cfg.prune_target = ""  # no pruned form: quicker
    build_classifier(classifier_cfg)
    work = classifier_cfg.work_dir()
    first = read_step(work / "teacher")["finished_at"]
    assert is_built(classifier_cfg)
    # a finished build returns at once; with the versions gone, every step is reused
    build_classifier(classifier_cfg)
    for version in ("senti", "senti-teacher"):
        import shutil

        shutil.rmtree(classifier_cfg.out / version)
    assert not is_built(classifier_cfg)
    build_classifier(classifier_cfg)
    assert read_step(work / "teacher")["finished_at"] == first
    assert is_built(classifier_cfg)
    # a changed student setting reruns the student, not the teacher
    classifier_cfg.student_epochs = 2.0
    assert not is_built(classifier_cfg)
    build_classifier(classifier_cfg)
    assert read_step(work / "teacher")["finished_at"] == first
    assert read_step(work / "student-1L")["params"]["student_epochs"] == 2.0


def test_generator_pipeline(tmp_path: Path, text_file: Path) -> None:
    cfg = GeneratorConfig(
        out=tmp_path / "models",
        name="gpt",
        data=text_file,
        vocab_size=300,
        block_size=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        batch_size=4,
        teacher_steps=6,
        student_steps=3,
        student_layers=1,
        prompts=2,
        greedy_tokens=8,
    )
    card = build_generator(cfg)
    version = tmp_path / "models" / "gpt" / "1"
    m = read_manifest(version)
    assert m.task is Task.GENERATE and m.generation.max_context == 32
    assert m.artifact("onnxruntime").path == "model.int8.onnx"
    assert m.artifact("onnxruntime").extra == {"kv_cache": True}
    assert m.limits.max_input_tokens + m.limits.max_new_tokens <= 32
    assert m.provenance["role"] == card["served"] in ("teacher", "student")
    forms = {f["form"]: f for f in card["forms"]}
    assert forms["teacher fp32 (torch)"]["perplexity"] > 1
    assert forms["student fp32 (torch)"]["perplexity"] > 1
    assert forms["teacher fp32 (onnxruntime)"]["greedy_agreement"] == 1.0
    assert forms["student int8 (onnxruntime)"]["decode_ms_batch16"] > 0
    assert card["targets_met"], card["targets"]
    assert (version / CARD_NAME).exists() and (version / "hf" / "config.json").exists()
    # the card's figures are reproducible from the written version
    from headrace.build.evaluate import evaluate_version

    role = card["served"]
    again = {f["form"]: f for f in evaluate_version(version)}
    key = f"{role} fp32 (torch)"
    assert again[key]["perplexity"] == forms[key]["perplexity"]


def test_generator_without_a_student_holds_the_teacher(tmp_path: Path, text_file: Path) -> None:
    cfg = GeneratorConfig(
        out=tmp_path / "models",
        name="gpt",
        data=text_file,
        vocab_size=300,
        block_size=32,
        n_embd=32,
        n_layer=1,
        n_head=2,
        batch_size=4,
        teacher_steps=4,
        student_steps=0,
        train_precision="bf16",
        prompts=1,
        greedy_tokens=4,
    )
    card = build_generator(cfg)
    assert card["served"] == "teacher" and "only model built" in card["notes"][0]
    assert [f["form"] for f in card["forms"]] == [
        "teacher fp32 (torch)",
        "teacher int8 (onnxruntime)",
        "teacher fp32 (onnxruntime)",
    ]
    assert card["training"]["teacher"]["precision"] == "bf16" and "student" not in card["training"]
    assert not (cfg.work_dir() / "student").exists()
    assert card["targets_met"], card["targets"]
    with pytest.raises(ValueError, match="student-steps"):
        build_generator(replace(cfg, serve="student", force=True))


def _evaluation(ppl_teacher: float, ppl_student: float) -> dict:
    def forms(ppl: float, ms: float) -> list[dict]:
        return [
            {"backend": "torch", "precision": "fp32", "perplexity": ppl},
            {
                "backend": "onnxruntime",
                "precision": "int8",
                "decode_ms_batch1": ms,
                "megabytes": 5.0,
            },
        ]

    return {"teacher": forms(ppl_teacher, 0.7), "student": forms(ppl_student, 0.4)}


@pytest.mark.parametrize(
    ("serve", "teacher", "student", "expected"),
    [
        ("auto", 190.0, 182.0, "student"),
        ("auto", 190.0, 199.0, "student"),  # within 5%
        ("auto", 190.0, 210.0, "teacher"),
        ("teacher", 190.0, 150.0, "teacher"),
    ],
)
def test_which_generator_is_served(
    serve: str, teacher: float, student: float, expected: str
) -> None:
    from headrace.build.generator_card import choose

    role, why = choose(GeneratorConfig(out=Path("m"), serve=serve), _evaluation(teacher, student))
    assert role == expected
    assert f"{student:.1f} (student) vs {teacher:.1f} (teacher)" in why


def test_vocab_pruned_student_serves_and_reevaluates(
    classifier_cfg: ClassifierConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every step after vocabulary pruning reads the student's own tokenizer: the server,
    `headrace build evaluate` (timing teacher and student together) and the card agree."""
    import numpy as np
    from headrace.build.cli import main
    from headrace.build.evaluate import ort_session
    from headrace.build.training import load_tokenizer
    from headrace.client import Client

    from tests.e2e.conftest import RunningServer, make_config

    classifier_cfg.prune_target = ""  # no structurally pruned form: quicker
    card = build_classifier(classifier_cfg)
    out, work = classifier_cfg.out, classifier_cfg.work_dir()
    student, teacher = out / "senti" / "1", out / "senti-teacher" / "1"
    assert card["served"]["model"] == "student-1L"
    vocab = card["vocabulary_pruning"]
    assert vocab["tokens_after"] < vocab["tokens_before"]
    assert vocab["held_out_unk_pruned"] == vocab["held_out_unk_full"]
    rows = {r["form"]: r for r in vocab["forms"]}
    assert set(rows) == {f"student-1L {f}" for f in FORMS} | {"student-1L fp32 (torch)"}
    assert all(r["bytes"] < r["bytes_full"] for r in rows.values())
    pieces = json.loads((student / "tokenizer.json").read_text())["model"]["vocab"]
    assert (
        len(pieces)
        == vocab["tokens_after"]
        == json.loads((student / "hf" / "config.json").read_text())["vocab_size"]
    )
    assert "## Vocabulary pruning" in (student / CARD_NAME).read_text()
    assert f"keep the {vocab['tokens_after']:,} of {vocab['tokens_before']:,}" in card["summary"]

    # served: the same probabilities as the full-vocabulary copy on training texts
    split = Split.load(student / SPLIT_NAME)
    texts = [e.text for e in split.train[:8]]
    running = RunningServer(make_config(out))
    try:
        with Client(running.address, timeout=60) as client:
            client.wait_ready(timeout=30)
            served = client.classify(texts, model="senti")
    finally:
        running.stop()
    labels = list(split.labels)
    got = np.array([[r.scores()[n] for n in labels] for r in served.results])
    copy = work / "staged" / "student-1L-full-vocab" / "1"
    tok = load_tokenizer(copy / "tokenizer.json")
    session = ort_session(copy / card["served"]["path"], 1)
    want = []
    for text in texts:
        ids = np.asarray([tok.encode(text).ids], dtype=np.int64)
        logits = session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        z = np.exp(logits[0][0] - logits[0][0].max())
        want.append(z / z.sum())
    np.testing.assert_allclose(got, np.array(want), atol=0.02)

    # re-measured, teacher and student timed together: the card's accuracy again
    capsys.readouterr()
    assert main(["evaluate", str(student), str(teacher), "--latency-samples", "5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    forms = {f["form"]: f for f in card["forms"]}
    for entry in report:
        for form in entry["forms"]:
            assert form["accuracy"] == forms[form["form"]]["accuracy"], form["form"]
            assert form["p50_ms_batch1"] > 0
