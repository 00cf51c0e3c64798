"""Shared training pieces: tokenization, padded batches, a seeded AdamW loop with a progress bar.

Build-time only (imports torch lazily inside functions so the CLI imports cheaply).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from headrace.build.steps import log


def load_tokenizer(path: Path, *, max_len: int | None = None) -> Any:
    """A `tokenizers.Tokenizer` from a tokenizer.json, unpadded, truncated to `max_len`."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    if max_len is not None:
        tok.enable_truncation(max_len)
    else:
        tok.no_truncation()
    return tok


def save_serving_tokenizer(src: Path, *dests: Path) -> None:
    """Copy a tokenizer.json without padding or truncation: the server applies its own limits."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(src))
    tok.no_padding()
    tok.no_truncation()
    for dest in dests:
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(dest))


def encode_texts(tok: Any, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(list(texts))]


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """-> input_ids, attention_mask: int64 [B, longest row]."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


def shuffled_batches(
    n: int, batch_size: int, seed: int, lengths: Sequence[int] | None = None
) -> Iterator[list[int]]:
    """Endless index batches, reshuffled each epoch with a seeded RNG.

    With `lengths`, each window of 50 batches is sorted by length before it is cut,
    so a batch pads to similar lengths (about a third less compute on tweets).
    """
    rng = random.Random(seed)
    order = list(range(n))
    window = batch_size * 50
    while True:
        rng.shuffle(order)
        batches: list[list[int]] = []
        for w in range(0, n, window):
            chunk = order[w : w + window]
            if lengths is not None:
                chunk.sort(key=lambda i: lengths[i])
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        rng.shuffle(batches)
        yield from (b for b in batches if len(b) == batch_size or n < batch_size)


TRAIN_PRECISIONS = ("auto", "fp32", "bf16")


def add_train_precision_flag(parser: Any, *aliases: str) -> None:
    """`--train-precision` (and `aliases`) on a build command's argparse parser."""
    parser.add_argument(
        "--train-precision",
        *aliases,
        dest="train_precision",
        choices=TRAIN_PRECISIONS,
        default=None,
        help="training steps in fp32 or under bf16 autocast (fp32 weights and optimizer); "
        "auto: bf16 where the CPU has native bf16 (AVX512-BF16, AMX), else fp32 (default auto)",
    )


def bf16_is_native() -> bool:
    """True where the CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX). There a
    MiniLM-L6 training step under bf16 autocast took 0.55-0.65 of the fp32 step's time; on
    CPUs without it bf16 is emulated and slower."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def autocast(precision: str) -> Any:
    """CPU bf16 autocast for precision "bf16"; a no-op context for "fp32"."""
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def resolve_precision(choice: str) -> str:
    """'auto' -> 'bf16' where the CPU has native bf16, else 'fp32'."""
    if choice not in TRAIN_PRECISIONS:
        raise ValueError(f"train precision must be one of {', '.join(TRAIN_PRECISIONS)}")
    if choice == "auto":
        return "bf16" if bf16_is_native() else "fp32"
    return choice


def train_loop(
    model: Any,
    batches: Iterator[Any],
    loss_fn: Callable[[Any, Any], Any],
    *,
    steps: int,
    lr: float,
    warmup_fraction: float = 0.06,
    weight_decay: float = 0.01,
    desc: str = "train",
    max_grad_norm: float = 1.0,
    every: int = 0,
    checkpoint: Callable[[int, float], bool] | None = None,
    precision: str = "fp32",
) -> dict[str, float]:
    """AdamW with linear warmup and linear decay for `steps` steps -> {"loss": mean of last 50,
    "steps": steps run}.

    With `checkpoint`, `checkpoint(step, recent loss)` runs every `every` steps (the model in
    eval mode, back to train mode after); returning True stops training there.

    precision "bf16": forward and loss under CPU bf16 autocast (weights, gradients and the
    optimizer stay fp32: mixed precision); "fp32": plain."""
    import torch
    from tqdm import tqdm

    model.train()
    decay: list[Any] = []
    no_decay: list[Any] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (
            no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith("bias") else decay
        ).append(p)
    optim = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
    )
    warmup = max(1, int(steps * warmup_fraction))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(optim, schedule)
    recent: list[float] = []
    bar = tqdm(range(steps), desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0)
    ran = 0
    for step in bar:
        batch = next(batches)
        with autocast(precision):
            loss = loss_fn(model, batch)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optim.step()
        sched.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise RuntimeError(f"{desc}: loss became {value}")
        recent = [*recent[-49:], value]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}", refresh=False)
        ran = step + 1
        if checkpoint is not None and every > 0 and (ran % every == 0 or ran == steps):
            model.eval()
            stop = checkpoint(ran, sum(recent) / len(recent))
            model.train()
            if stop:
                break
    bar.close()
    model.eval()
    final = sum(recent) / max(1, len(recent))
    log(f"{desc}: {ran} steps, loss {final:.4f}")
    return {"loss": round(final, 5), "steps": ran}


def classifier_logits(
    model: Any,
    rows: Sequence[Sequence[int]],
    *,
    batch_size: int = 64,
    desc: str = "predict",
    precision: str = "fp32",
) -> np.ndarray:
    """Torch logits float32 [N, labels] for token-id rows, batched by length (less padding).

    precision "bf16": the forward under CPU bf16 autocast, for the build's own passes
    (validation during training, the teacher's soft targets), never for a measured form.
    On the demo teacher: 0.60 of the fp32 time, argmax the same on 99.93 % of 3,000
    training texts, max |logit| difference 0.02, KL at temperature 2 about 1e-6."""
    import torch
    from tqdm import tqdm

    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out: np.ndarray | None = None
    with torch.inference_mode(), autocast(precision):
        for i in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
            idx = order[i : i + batch_size]
            ids, mask = pad_batch([rows[j] for j in idx])
            logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
            values = logits.logits.float().numpy()
            if out is None:
                out = np.zeros((len(rows), values.shape[1]), dtype=np.float32)
            out[idx] = values
    assert out is not None
    return out
