"""ClassifierModel and GeneratorModel over the real torch backend and tiny real models.

`Recorder` wraps the real backend only to count rows per call (what the
engine batched); every call goes through to the model.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from headrace.server.backends.base import BackendSpec
from headrace.server.backends.registry import load_backend
from headrace.server.manifest import read_manifest
from headrace.server.models import (
    SMALL_LABELS,
    ClassifierModel,
    GeneratorModel,
    load_tokenizer,
    pad_id_of,
    softmax,
    top_labels,
)
from headrace.server.types import (
    ClassifyCall,
    FinishReason,
    GenerateCall,
    InvalidArgument,
    SamplingParams,
    Task,
    TokenEvent,
)

pytest.importorskip("torch")
pytest.importorskip("transformers")

TEXTS = [
    "I love this, it is great",
    "terrible",
    "the weather is fine today, nothing special at all, just clouds",
    "café 東京 😀",
    "a cancelled call frees its slot at the next step",
]
PROMPTS = ["the service answered", "streams of tokens", "edge boxes run", "café naïve"]


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 120))


class Recorder:
    """Counts rows per backend call, passes everything else through."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend
        self.rows: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        self.rows.append(input_ids.shape[0])
        out: np.ndarray = self._backend.forward(input_ids, attention_mask)
        return out

    def decode(self, slots: Any, last_tokens: Any) -> Any:
        self.rows.append(len(slots))
        return self._backend.decode(slots, last_tokens)


def load(version_dir: Path, task: Task) -> tuple[Any, Any, Any]:
    manifest = read_manifest(version_dir)
    spec = BackendSpec(
        task=task,
        backend="torch",
        path=version_dir / "hf",
        precision="fp32",
        device="cpu",
        manifest=manifest,
        version_dir=version_dir,
        max_slots=manifest.batching.max_batch,
    )
    return manifest, load_backend(spec), load_tokenizer(version_dir / manifest.tokenizer)


@pytest.fixture(scope="module")
def classifier_parts(tiny_models: Path) -> tuple[Any, Any, Any]:
    return load(tiny_models / "tiny-classifier" / "1", Task.CLASSIFY)


@pytest.fixture(scope="module")
def generator_parts(tiny_models: Path) -> tuple[Any, Any, Any]:
    return load(tiny_models / "tiny-generator" / "1", Task.GENERATE)


def test_classify_batches_concurrent_calls_without_padding_leaks(
    classifier_parts: tuple[Any, Any, Any],
) -> None:
    manifest, backend, tokenizer = classifier_parts
    recorder = Recorder(backend)
    model = ClassifierModel("tiny-classifier", "1", manifest, recorder, tokenizer)
    model.batcher.max_padding = 1.0  # merged rows of different lengths: padding must not leak
    assert pad_id_of(tokenizer) == tokenizer.token_to_id("[PAD]")

    async def main() -> list[Any]:
        await model.start()
        recorder.rows.clear()
        out = await asyncio.gather(*(model.classify(ClassifyCall(texts=(t,))) for t in TEXTS))
        await model.stop()
        return [items[0] for items in out]

    items = run(main())
    assert max(recorder.rows) > 1  # concurrent calls were merged
    for text, item in zip(TEXTS, items, strict=True):
        ids = np.array([tokenizer.encode(text).ids], dtype=np.int64)
        alone = backend.forward(ids, np.ones_like(ids))[0]  # no padding at all
        probs = np.exp(alone - alone.max()) / np.exp(alone - alone.max()).sum()
        got = dict(item.labels)
        for j, label in enumerate(manifest.labels):
            assert got[label] == pytest.approx(float(probs[j]), abs=1e-5)
        scores = [s for _, s in item.labels]
        assert scores == sorted(scores, reverse=True)
        assert item.input_tokens == ids.shape[1] and not item.truncated


@pytest.mark.parametrize("n_labels", [2, 3, SMALL_LABELS, SMALL_LABELS + 5])
def test_top_labels_are_the_softmax_best_first(n_labels: int) -> None:
    rng = np.random.default_rng(n_labels)
    logits = (rng.standard_normal((6, n_labels)) * 4).astype(np.float32)
    logits[0, :] = 1.5  # all tied: label order
    logits[1, -1] = 80.0  # exp would overflow without the max shift
    labels = [f"l{j}" for j in range(n_labels)]
    probs = softmax(logits)
    for keep in (1, 2, n_labels):
        got = top_labels(logits, labels, keep)
        assert len(got) == 6
        for i, row in enumerate(got):
            order = np.argsort(-probs[i], kind="stable")[:keep]
            assert [name for name, _ in row] == [labels[j] for j in order]
            assert [p for _, p in row] == pytest.approx(
                [float(probs[i, j]) for j in order], abs=1e-6
            )
    assert [n for n, _ in top_labels(logits, labels, n_labels)[0]] == labels


def test_classify_truncates_or_rejects_overlong_texts(
    classifier_parts: tuple[Any, Any, Any],
) -> None:
    manifest, backend, tokenizer = classifier_parts
    model = ClassifierModel("tiny-classifier", "1", manifest, backend, tokenizer)
    long_text = "the service answered every request " * 40
    limit = manifest.limits.max_input_tokens

    async def main() -> tuple[list[Any], InvalidArgument]:
        await model.start()
        items = await model.classify(ClassifyCall(texts=("short", long_text), top_k=2))
        with pytest.raises(InvalidArgument) as err:
            await model.classify(ClassifyCall(texts=("short", long_text), reject_overlong=True))
        await model.stop()
        return items, err.value

    items, error = run(main())
    assert not items[0].truncated and items[1].truncated
    assert items[1].input_tokens == limit
    ids = model.tokenizer.encode(long_text).ids[: limit - 1]  # a text of exactly `limit` tokens
    exact = model.tokenizer.decode(ids[1:], skip_special_tokens=True)
    assert len(model.tokenizer.encode(exact).ids) == limit
    assert model.tokenize([exact, "short"]) == [
        (model.tokenizer.encode(exact).ids, False),
        (model.tokenizer.encode("short").ids, False),
    ]
    assert len(items[0].labels) == 2
    assert error.field == "texts[1]" and error.message.startswith("texts[1] has ")


def stream_all(model: GeneratorModel, params: Any) -> Coroutine[Any, Any, list[TokenEvent]]:
    async def go() -> list[TokenEvent]:
        return [e async for e in model.generate(params)]

    return go()


def test_generation_is_the_same_alone_or_batched(generator_parts: tuple[Any, Any, Any]) -> None:
    manifest, backend, tokenizer = generator_parts
    recorder = Recorder(backend)
    model = GeneratorModel("tiny-generator", "1", manifest, recorder, tokenizer)

    def prepare(prompt: str, **sampling: Any) -> Any:
        call = GenerateCall(prompt=prompt, max_new_tokens=12, sampling=SamplingParams(**sampling))
        return model.prepare(call)[0]

    requests = [prepare(p) for p in PROMPTS] + [prepare(PROMPTS[0], temperature=1.0, seed=5)]

    async def main() -> tuple[list[list[TokenEvent]], list[list[TokenEvent]]]:
        await model.start()
        alone = [await stream_all(model, r) for r in requests]
        recorder.rows.clear()
        together = await asyncio.gather(*(stream_all(model, r) for r in requests))
        await model.stop()
        return alone, list(together)

    alone, together = run(main())
    assert max(recorder.rows) > 1  # decode steps really were shared
    for a, b in zip(alone, together, strict=True):
        ids_a = [t for e in a for t in e.token_ids]
        assert ids_a == [t for e in b for t in e.token_ids]
        assert a[-1].finish_reason is not None and a[-1].completion_tokens == len(ids_a)
        text = "".join(e.text for e in a)
        eos = manifest.generation.eos_token_id
        assert text == tokenizer.decode([t for t in ids_a if t != eos])
    assert model.active_slots == 0


def test_stop_string_on_a_real_model(generator_parts: tuple[Any, Any, Any]) -> None:
    manifest, backend, tokenizer = generator_parts
    model = GeneratorModel("tiny-generator", "1", manifest, backend, tokenizer)

    def params(stop: tuple[str, ...]) -> Any:
        return model.prepare(GenerateCall(prompt=PROMPTS[1], max_new_tokens=24, stop=stop))[0]

    async def main() -> tuple[str, list[TokenEvent] | None, str]:
        await model.start()
        free = "".join(e.text for e in await stream_all(model, params(())))
        clean = [i for i in range(2, len(free) - 2) if "\ufffd" not in free[i - 2 : i + 2]]
        if not clean:
            await model.stop()
            return free, None, ""
        stop = free[clean[len(clean) // 2] - 2 : clean[len(clean) // 2] + 2]
        stopped = await stream_all(model, params((stop,)))
        await model.stop()
        return free, stopped, stop

    free, stopped, stop = run(main())
    assert stopped is not None, f"greedy output too short or garbled to pick a stop: {free!r}"
    assert stopped[-1].finish_reason is FinishReason.STOP
    assert "".join(e.text for e in stopped) == free[: free.find(stop)]
