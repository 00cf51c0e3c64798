from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from headrace.build.distill import kd_loss, pick_layers, student_from_teacher
from headrace.build.training import pad_batch, shuffled_batches, train_loop


def test_pick_layers_spreads_evenly() -> None:
    assert pick_layers(6, 3) == [0, 2, 5]
    assert pick_layers(6, 2) == [0, 5]
    assert pick_layers(4, 4) == [0, 1, 2, 3]
    assert pick_layers(6, 1) == [5]
    with pytest.raises(ValueError):
        pick_layers(2, 3)


def test_student_copies_the_chosen_teacher_layers(tiny_models: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    teacher = AutoModelForSequenceClassification.from_pretrained(
        tiny_models / "tiny-classifier" / "1" / "hf"
    )
    student = student_from_teacher(teacher, [1])
    assert student.config.num_hidden_layers == 1
    t, s = teacher.state_dict(), student.state_dict()
    for key, value in s.items():
        source = key.replace("encoder.layer.0.", "encoder.layer.1.")
        assert torch.equal(value, t[source]), key


def test_student_of_a_gpt_keeps_tied_head(tiny_models: Path) -> None:
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(tiny_models / "tiny-generator" / "1" / "hf")
    student = student_from_teacher(teacher, [0])
    assert student.config.n_layer == 1
    assert student.lm_head.weight.data_ptr() == student.transformer.wte.weight.data_ptr()
    ids = torch.tensor([[1, 2, 3]])
    assert student(input_ids=ids).logits.shape == (1, 3, teacher.config.vocab_size)


def test_kd_loss() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 1])
    assert float(kd_loss(logits, logits, None)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_loss(logits, logits.flip(-1), None)) > 0.1
    hard = torch.nn.functional.cross_entropy(logits, labels)
    mixed = kd_loss(logits, logits, labels, alpha=0.5)
    assert float(mixed) == pytest.approx(0.5 * float(hard), rel=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_few_distillation_steps_move_the_student_towards_the_teacher(
    tiny_models: Path, precision: str
) -> None:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    teacher = AutoModelForSequenceClassification.from_pretrained(
        tiny_models / "tiny-classifier" / "1" / "hf"
    ).eval()
    student = student_from_teacher(teacher, [0])
    for p in student.classifier.parameters():  # start away from the teacher's head
        torch.nn.init.normal_(p, std=0.5)
    rng = np.random.default_rng(0)
    rows = [list(rng.integers(5, 100, rng.integers(3, 12))) for _ in range(32)]
    ids, mask = pad_batch(rows)
    with torch.no_grad():
        soft = teacher(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
        ).logits

    dtypes: set[torch.dtype] = set()

    def loss_fn(m, idx):
        b_ids, b_mask = pad_batch([rows[i] for i in idx])
        out = m(input_ids=torch.from_numpy(b_ids), attention_mask=torch.from_numpy(b_mask)).logits
        dtypes.add(out.dtype)
        return kd_loss(out, soft[idx], None, temperature=2.0, alpha=1.0)

    def full_loss() -> float:
        with torch.no_grad():
            return float(loss_fn(student, list(range(32))))

    before = full_loss()
    dtypes.clear()
    train_loop(
        student,
        shuffled_batches(32, 8, 0),
        loss_fn,
        steps=30,
        lr=1e-2,
        desc="distill",
        precision=precision,
    )
    # bf16: the forward ran under autocast; the weights stay fp32 (mixed precision)
    assert dtypes == {torch.bfloat16 if precision == "bf16" else torch.float32}
    assert full_loss() < 0.5 * before
    assert all(p.dtype == torch.float32 for p in student.parameters())


def test_train_precision_resolves() -> None:
    from headrace.build.training import bf16_is_native, resolve_precision

    assert resolve_precision("fp32") == "fp32"
    assert resolve_precision("bf16") == "bf16"
    assert resolve_precision("auto") == ("bf16" if bf16_is_native() else "fp32")
    with pytest.raises(ValueError, match="one of auto, fp32, bf16"):
        resolve_precision("fp16")


def test_shuffled_batches_cover_every_index_each_epoch() -> None:
    batches = shuffled_batches(10, 5, seed=1, lengths=list(range(10)))
    epoch = [next(batches), next(batches)]
    assert sorted(i for b in epoch for i in b) == list(range(10))
    assert [next(shuffled_batches(10, 5, seed=1)) for _ in range(2)] == [
        next(shuffled_batches(10, 5, seed=1))
    ] * 2


def test_classifier_logits_in_bf16_are_float32_and_close_to_fp32(tiny_models: Path) -> None:
    from headrace.build.training import classifier_logits
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_models / "tiny-classifier" / "1" / "hf"
    )
    seen: set[torch.dtype] = set()
    model.classifier.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
    rng = np.random.default_rng(1)
    rows = [list(rng.integers(5, 100, rng.integers(3, 12))) for _ in range(20)]
    fp32 = classifier_logits(model, rows, batch_size=8)
    assert seen == {torch.float32}
    seen.clear()
    bf16 = classifier_logits(model, rows, batch_size=8, precision="bf16")
    assert seen == {torch.bfloat16}  # the forward ran under autocast
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape
    assert np.abs(bf16 - fp32).max() < 0.1
    assert not np.array_equal(bf16, fp32)
