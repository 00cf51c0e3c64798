"""GeneratorModel.forward: generate()'s events, taken in the scheduler's delivery itself.

The engine process forwards each stream's events this way (no task wakes per token), so
forward must give what generate gives: the same tokens and text, the same finish and
usage, stream_interval's rules, the same errors, and a slot freed when it is cancelled.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence

import numpy as np
import pytest
from headrace.server.models import GeneratorModel
from headrace.server.types import (
    BackendFailure,
    FinishReason,
    GenerateCall,
    GenerateParams,
    QueueFull,
    SamplingParams,
    ShuttingDown,
    TokenEvent,
)
from tokenizers import Tokenizer

from tests.server.scripted import ScriptedDecoder, byte_level_bpe
from tests.server.test_scheduler import (
    CORPUS,
    collect,
    joined,
    make_model,
    params_for,
    run,
    until,
)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return byte_level_bpe(CORPUS)


async def forwarded(model: GeneratorModel, params: GenerateParams) -> list[TokenEvent]:
    events: list[TokenEvent] = []
    await model.forward(params, events.append)
    return events


def interval_params(
    model: GeneratorModel, prompt: str, n: int, *, tokens: int = 1, ms: int = 0
) -> GenerateParams:
    call = GenerateCall(
        prompt=prompt, max_new_tokens=n, sampling=SamplingParams(seed=7, temperature=0.8),
        stream_interval=tokens, stream_interval_ms=ms,
    )  # fmt: skip
    return model.prepare(call)[0]


def test_forward_gives_what_generate_gives(tokenizer: Tokenizer) -> None:
    model, backend = make_model(tokenizer)
    scripted = params_for(model, "tell me", 12, stop=["lazy"])
    backend.scripts[scripted.prompt_ids] = tokenizer.encode(
        "the quick brown fox jumps over the lazy dog"
    ).ids
    cases = [params_for(model, p, 9, seed=3, temperature=0.9) for p in ("the fox", "a story")]
    cases.append(scripted)

    async def main() -> tuple[list[list[TokenEvent]], list[list[TokenEvent]]]:
        await model.start()
        pushed = await asyncio.gather(*(forwarded(model, p) for p in cases))
        pulled = await asyncio.gather(*(collect(model.generate(p)) for p in cases))
        await model.stop()
        return pushed, pulled

    pushed, pulled = run(main())
    for a, b in zip(pushed, pulled, strict=True):
        assert joined(a) == joined(b) and joined(a)[1]
        assert (a[-1].finish_reason, a[-1].completion_tokens, a[-1].prompt_tokens) == (
            b[-1].finish_reason, b[-1].completion_tokens, b[-1].prompt_tokens,
        )  # fmt: skip
        assert all(e.finish_reason is None for e in a[:-1])
        assert all(len(e.token_times_us) == len(e.token_ids) for e in a)
    assert pushed[-1][-1].finish_reason is FinishReason.STOP
    assert "lazy" not in joined(pushed[-1])[0]
    assert backend.slots == {} and model.active_slots == 0


def test_forward_keeps_the_tokens_rule(tokenizer: Tokenizer) -> None:
    model, _ = make_model(tokenizer)

    async def main() -> list[TokenEvent]:
        await model.start()
        events = await forwarded(model, interval_params(model, "the dog", 11, tokens=4))
        await model.stop()
        return events

    events = run(main())
    # taken as soon as due: 4 tokens a message, the last takes what is left
    assert [len(e.token_ids) for e in events] == [4, 4, 3]
    assert events[-1].completion_tokens == 11


def test_forward_keeps_the_ms_rule(tokenizer: Tokenizer) -> None:
    model, backend = make_model(tokenizer)
    backend.delay_s = 0.01  # a token each 10 ms, a message each 60 ms at most

    async def main() -> tuple[list[TokenEvent], list[float]]:
        await model.start()
        events: list[TokenEvent] = []
        times: list[float] = []

        def send(event: TokenEvent) -> None:
            events.append(event)
            times.append(time.perf_counter())

        await model.forward(interval_params(model, "the fox", 20, ms=60), send)
        await model.stop()
        return events, times

    events, times = run(main())
    assert sum(len(e.token_ids) for e in events) == 20
    assert 2 <= len(events) <= 6  # 200 ms of tokens in messages at least 60 ms apart
    gaps = [b - a for a, b in itertools.pairwise(times[:-1])]  # the last goes at once
    assert all(gap >= 0.055 for gap in gaps), gaps


class HeldDecoder(ScriptedDecoder):
    """Its decode steps wait on the gate from the `hold_at`-th on (the warm-up runs none)."""

    hold_at = 0
    decodes = 0

    def decode(self, slots: Sequence[int], last_tokens: Sequence[int]) -> np.ndarray:
        self.decodes += 1
        if self.decodes == self.hold_at:
            self.gate.clear()
        return super().decode(slots, last_tokens)


def held_model(
    tokenizer: Tokenizer, hold_at: int, **kwargs: int
) -> tuple[GeneratorModel, HeldDecoder]:
    model, plain = make_model(tokenizer, **kwargs)
    backend = HeldDecoder(plain.vocab_size, plain.eos, max_slots=plain.max_slots)
    backend.hold_at = hold_at
    model.scheduler.core.backend = model.scheduler.backend = backend
    return model, backend


def test_tokens_held_by_the_ms_rule_go_when_it_ends(tokenizer: Tokenizer) -> None:
    model, backend = held_model(tokenizer, 4)  # tokens 2-4 come at once, then no token comes

    async def main() -> list[TokenEvent]:
        await model.start()
        sent: list[TokenEvent] = []
        task = asyncio.create_task(
            model.forward(interval_params(model, "the fox", 10, ms=50), sent.append)
        )
        # while the engine makes nothing, the interval's end alone must send what waits
        await until(lambda: len(sent) == 2)
        held = list(sent)
        backend.gate.set()
        await task
        await model.stop()
        return held

    first, second = run(main())
    assert len(first.token_ids) == 1  # the first token goes at once
    assert len(second.token_ids) == 3


def test_forward_raises_what_generate_raises(tokenizer: Tokenizer) -> None:
    model, backend = make_model(tokenizer, slots=1, queue=0)

    async def main() -> None:
        await model.start()
        backend.fail_decodes = 1
        with pytest.raises(BackendFailure) as failed:
            await forwarded(model, params_for(model, "the fox", 5))
        assert "/secret" not in str(failed.value)
        backend.gate.clear()  # the next stream holds the only slot
        holder = asyncio.create_task(forwarded(model, params_for(model, "the dog", 5)))
        await until(lambda: model.active_slots == 1)
        with pytest.raises(QueueFull):
            await forwarded(model, params_for(model, "a story", 5))
        stopping = asyncio.create_task(model.stop(drain=False))
        await asyncio.sleep(0.01)
        backend.gate.set()
        await stopping
        with pytest.raises(ShuttingDown):
            await holder

    run(main())
    assert backend.slots == {}


def test_cancelled_forward_frees_the_slot(tokenizer: Tokenizer) -> None:
    model, backend = held_model(tokenizer, 3, slots=1)  # the 3rd decode waits for the cancel

    async def main() -> tuple[list[TokenEvent], list[TokenEvent]]:
        await model.start()
        sent: list[TokenEvent] = []
        task = asyncio.create_task(model.forward(params_for(model, "the fox", 60), sent.append))
        await until(lambda: len(sent) == 3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        backend.gate.set()
        after_cancel = len(sent)
        # the only slot must come back, or this waits forever
        events = await forwarded(model, params_for(model, "the dog", 3))
        await asyncio.sleep(0.05)
        assert len(sent) == after_cancel  # nothing delivered to a cancelled consumer
        await model.stop()
        return sent, events

    sent, events = run(main())
    assert sent[-1].finish_reason is None
    assert events[-1].completion_tokens == 3
    # the held step, then the slot freed: not the 59 steps of the cancelled stream's 60
    assert len(backend.decode_sizes()) == 3 + 2
    assert backend.slots == {} and model.active_slots == 0


def test_a_failing_send_ends_its_stream_alone(tokenizer: Tokenizer) -> None:
    model, backend = make_model(tokenizer)

    async def main() -> tuple[BaseException | None, list[TokenEvent]]:
        await model.start()
        sent: list[TokenEvent] = []

        def send(event: TokenEvent) -> None:
            sent.append(event)
            if len(sent) == 2:
                raise RuntimeError("the connection's buffer is gone")

        results = await asyncio.gather(
            model.forward(params_for(model, "the fox", 20), send),
            forwarded(model, params_for(model, "the dog", 20)),
            return_exceptions=True,
        )
        await model.stop()
        failed, other = results
        assert isinstance(other, list)
        return failed if isinstance(failed, BaseException) else None, other

    failed, other = run(main())
    assert isinstance(failed, RuntimeError)
    assert other[-1].completion_tokens == 20  # the stream beside it, delivered in the same steps
    assert backend.slots == {} and model.active_slots == 0
