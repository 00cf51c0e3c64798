"""The decoder scheduler's thread contract, checked against a single-threaded replay.

The worker thread alone owns the sequences; the event loop sees only StepOutputs and
its own Streams. Under random joins, cancels and slow readers, every consumer's tokens,
text and timings must agree with the StepOutputs, and a DecoderCore driven step by
step in one thread, given the same admissions and cancels, must reproduce them.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest
from headrace.server.engine.decoder_core import DecoderCore, StepOutput
from headrace.server.engine.scheduler import DecoderScheduler, Stream
from headrace.server.metrics import REGISTRY
from headrace.server.types import FinishReason, GenerateParams, SamplingParams, TokenEvent
from tokenizers import Tokenizer

from tests.server.scripted import ScriptedDecoder, byte_level_bpe

CORPUS = ["the quick brown fox jumps over the lazy dog", "tell me a story about a fox"] * 8


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return byte_level_bpe(CORPUS)


class RecordingScheduler(DecoderScheduler):
    """The real scheduler; keeps every StepOutput the event loop was handed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.outputs: list[StepOutput] = []

    def _deliver(self, out: StepOutput) -> None:
        self.outputs.append(out)
        super()._deliver(out)


def _histogram(name: str, model: str) -> tuple[float, float]:
    total = REGISTRY.get_sample_value(f"{name}_sum", {"model": model}) or 0.0
    count = REGISTRY.get_sample_value(f"{name}_count", {"model": model}) or 0.0
    return total, count


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_threaded_steps_match_a_single_threaded_replay(tokenizer: Tokenizer, seed: int) -> None:
    """Random joins, cancels and slow readers over 3 slots: what every consumer saw, and the
    timings it was given, agree with the StepOutputs, which a DecoderCore driven in this
    thread alone reproduces token for token and backend call for backend call."""
    rng = random.Random(seed)
    eos = tokenizer.token_to_id("<|endoftext|>")
    name = f"replay-{seed}"
    backend = ScriptedDecoder(tokenizer.get_vocab_size(), eos, max_slots=3, max_context=48)
    backend.delay_s = 0.001  # steps long enough for joins and cancels to land between them
    scheduler = RecordingScheduler(name, backend, tokenizer, max_batch=3, max_queue=64,
                                   eos_token_id=eos, max_context=48)  # fmt: skip
    words = " ".join(CORPUS).split()
    plans = []
    for i in range(18):
        prompt = tuple(tokenizer.encode(" ".join(rng.sample(words, rng.randint(1, 4)))).ids)
        kind = ("eos", "stop", "length", "cancel", "cancel")[i % 5]
        stop: tuple[str, ...] = ()
        if kind in ("eos", "stop"):
            text = " ".join(rng.sample(words, 6))
            backend.scripts[(*prompt, i)] = tokenizer.encode(text).ids  # then EOS
            stop = (text.split()[2][:3],) if kind == "stop" else ()
        sampling = SamplingParams(temperature=rng.choice([0.0, 0.8]), seed=rng.randrange(99))
        n = 30 if kind in ("eos", "stop") else rng.randint(4, 24)  # scripts end before 30
        params = GenerateParams((*prompt, i), n, sampling, stop)
        plans.append((params, rng.uniform(0, 0.04), kind, rng.randint(1, 3), rng.random()))

    seen: dict[int, list[tuple[float, TokenEvent]]] = {}
    streams: dict[int, Stream] = {}

    async def consume(params: GenerateParams, start: float, kind: str, keep: int, slow: float):
        await asyncio.sleep(start)
        stream = scheduler.submit(params)
        streams[stream.seq_id] = stream
        got = seen.setdefault(stream.seq_id, [])
        while True:
            if slow < 0.3:
                await asyncio.sleep(0.005)  # a reader that falls behind: tokens coalesce
            event = await stream.next_event()
            got.append((time.perf_counter(), event))
            if event.finish_reason is not None:
                return
            if kind == "cancel" and len(got) >= keep:
                scheduler.cancel(stream)
                return

    async def main() -> None:
        await scheduler.start()
        backend.calls.clear()  # forget the warm-up
        await asyncio.gather(*(consume(*plan) for plan in plans))
        await scheduler.stop()

    asyncio.run(asyncio.wait_for(main(), 60))
    outputs = scheduler.outputs
    assert backend.slots == {} and scheduler.active_slots == 0
    assert [o.step for o in outputs] == list(range(len(outputs)))

    # the replay: one DecoderCore in this thread, the same admissions and cancels per step
    params_of = {i: streams[i].params for i in streams}
    twin = ScriptedDecoder(tokenizer.get_vocab_size(), eos, max_slots=3, max_context=48)
    twin.scripts = backend.scripts
    core = DecoderCore(name, twin, tokenizer, num_slots=3, eos_token_id=eos, max_context=48)
    for out in outputs:
        cancelled = core.cancel(list(out.cancelled))
        assert cancelled == out.cancelled
        again = core.step(out.step, [(i, params_of[i]) for i in out.admitted], cancelled)
        assert again.tokens == out.tokens and not again.failed and not out.failed
        assert (again.running, again.decode_rows) == (out.running, out.decode_rows)
    assert twin.calls == backend.calls and twin.slots == {}

    # what each consumer saw against what the steps made, and when
    made: dict[int, list[tuple[float, Any]]] = {i: [] for i in streams}
    for out in outputs:
        for t in out.tokens:
            made[t.seq_id].append((out.at, t))
    ttft = itl = 0.0
    itl_count = 0
    for i, stream in streams.items():
        events = [e for _, e in seen[i]]
        ids = [t for e in events for t in e.token_ids]
        steps = made[i][: len(ids)]  # a cancelled stream may have been made a few more
        assert ids == [t.token for _, t in steps]
        assert "".join(e.text for e in events) == "".join(t.text for _, t in steps)
        finish = events[-1].finish_reason
        if finish is not None:
            assert len(steps) == len(made[i]) and finish is made[i][-1][1].finish
            assert events[-1].completion_tokens == len(ids) == stream.tokens
        stamps = [at for at, _ in steps]
        assert stamps == sorted(stamps) and stream.arrival <= stamps[0]
        at_token = 0
        for received, event in seen[i]:  # nobody is shown a token before it was made
            at_token += len(event.token_ids)
            assert stamps[at_token - 1] <= received
        assert (stream.first_at, stream.last_at) == (stamps[0], stamps[-1])
        ttft += stamps[0] - stream.arrival
        itl += stamps[-1] - stamps[0]
        itl_count += len(stamps) - 1
    assert _histogram("headrace_time_to_first_token_seconds", name) == pytest.approx(
        (ttft, len(streams))
    )
    assert _histogram("headrace_inter_token_latency_seconds", name) == pytest.approx(
        (itl, itl_count)
    )

    # the run really mixed it all: joins and cancels between decode steps, every finish
    assert any(o.admitted and o.decode_rows for o in outputs)
    assert any(o.cancelled and o.running for o in outputs)
    assert any(len(e.token_ids) > 1 for got in seen.values() for _, e in got)  # coalesced
    finishes = {got[-1][1].finish_reason for got in seen.values()}
    assert {FinishReason.EOS, FinishReason.STOP, FinishReason.LENGTH, None} <= finishes


def test_a_first_token_is_handed_over_before_the_next_step(tokenizer: Tokenizer) -> None:
    """While the event loop is busy, the worker waits with the next step until the first
    token is taken: the consumer's first event holds that token alone, not every token
    made while the loop was away (the later ones coalesce as before)."""
    eos = tokenizer.token_to_id("<|endoftext|>")
    backend = ScriptedDecoder(tokenizer.get_vocab_size(), eos, max_slots=2, max_context=48)
    scheduler = DecoderScheduler("handoff", backend, tokenizer, max_batch=2, max_queue=4,
                                 eos_token_id=eos, max_context=48)  # fmt: skip
    scheduler.first_token_handoff_s = 30.0  # the bound out of the way: no timing in the test
    prompt = tuple(tokenizer.encode("the quick fox").ids)
    params = GenerateParams(prompt, 20, SamplingParams(ignore_eos=True))

    async def main() -> list[TokenEvent]:
        await scheduler.start()
        await asyncio.sleep(0.05)  # the worker thread runs its step loop
        stream = scheduler.submit(params)
        time.sleep(0.1)  # noqa: ASYNC251 - the loop is busy; the worker has prefilled and waits for it
        events = [await stream.next_event()]
        await asyncio.sleep(0)  # the loop tells the worker that the first token is out
        time.sleep(0.1)  # noqa: ASYNC251 - busy again: the other tokens are made meanwhile, and coalesce
        while events[-1].finish_reason is None:
            events.append(await stream.next_event())
        await scheduler.stop()
        return events

    events = asyncio.run(asyncio.wait_for(main(), 60))
    assert len(events[0].token_ids) == 1
    assert sum(len(e.token_ids) for e in events) == 20 and len(events) <= 3
