"""Knowledge distillation: a student made from a subset of the teacher's layers,
trained on the teacher's temperature-softened outputs plus the hard labels.

The student starts as the teacher with fewer blocks (DistilBERT's recipe:
keep, e.g., layers 0, 2, 4 of 6, and every embedding and head weight), so it
begins close to the teacher rather than from scratch.

Loss (Hinton et al.):  alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

# BERT: bert.encoder.layer.{i}.   GPT-2: transformer.h.{i}.
_LAYER = re.compile(r"^(.*?(?:encoder\.layer|transformer\.h))\.(\d+)\.(.*)$")


def pick_layers(num_layers: int, keep: int) -> list[int]:
    """Evenly spread layer indices, first and last included when keep >= 2 (6, 3 -> 0, 2, 5)."""
    if not 1 <= keep <= num_layers:
        raise ValueError(f"cannot keep {keep} of {num_layers} layers")
    if keep == 1:
        return [num_layers - 1]
    step = (num_layers - 1) / (keep - 1)
    return sorted({round(i * step) for i in range(keep)})


def student_from_teacher(teacher: Any, layers: Sequence[int]) -> Any:
    """A copy of `teacher` (a transformers PreTrainedModel) keeping only `layers` blocks."""
    config = copy.deepcopy(teacher.config)
    attr = "n_layer" if hasattr(config, "n_layer") else "num_hidden_layers"
    total = int(getattr(config, attr))
    if not layers or any(not 0 <= i < total for i in layers):
        raise ValueError(f"layers {list(layers)} out of range for {total} layers")
    setattr(config, attr, len(layers))
    student = type(teacher)(config)
    remap = {old: new for new, old in enumerate(layers)}
    state: dict[str, Any] = {}
    for key, value in teacher.state_dict().items():
        m = _LAYER.match(key)
        if m is None:
            state[key] = value
        elif int(m.group(2)) in remap:
            state[f"{m.group(1)}.{remap[int(m.group(2))]}.{m.group(3)}"] = value
    missing, unexpected = student.load_state_dict(state, strict=False)
    # tied weights (lm_head) may be reported missing; anything else is a bug
    real_missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if real_missing or unexpected:
        raise RuntimeError(f"student init: missing {real_missing}, unexpected {unexpected}")
    if hasattr(student, "tie_weights"):
        student.tie_weights()
    return student.eval()


def kd_loss(
    student_logits: Any,
    teacher_logits: Any,
    labels: Any | None,
    *,
    temperature: float = 2.0,
    alpha: float = 0.5,
) -> Any:
    """student_logits, teacher_logits: [N, C]; labels: [N] (or None: soft targets only)."""
    import torch.nn.functional as F

    t = temperature
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=-1),
        F.log_softmax(teacher_logits / t, dim=-1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)
    if labels is None or alpha >= 1.0:
        return soft
    hard = F.cross_entropy(student_logits, labels)
    return alpha * soft + (1.0 - alpha) * hard
