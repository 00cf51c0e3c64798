"""The decoder scheduler on CPU with scripted model outputs (as vLLM tests its scheduler):
`ScriptedDecoder` (tests/server/scripted.py) emits a script or history-seeded logits.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

import pytest
from headrace.server.manifest import Artifact, Batching, Generation, Limits, Manifest
from headrace.server.models import GeneratorModel
from headrace.server.types import (
    BackendFailure,
    FinishReason,
    GenerateCall,
    GenerateParams,
    InvalidArgument,
    QueueFull,
    SamplingParams,
    ShuttingDown,
    Task,
    TokenEvent,
)
from tokenizers import Tokenizer

from tests.server.scripted import ScriptedDecoder, byte_level_bpe

CORPUS = ["the quick brown fox jumps over the lazy dog", "tell me a story about a fox"] * 8


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return byte_level_bpe(CORPUS)


def make_model(
    tok: Tokenizer, *, slots: int = 4, queue: int = 8, context: int = 64
) -> tuple[GeneratorModel, ScriptedDecoder]:
    eos = tok.token_to_id("<|endoftext|>")
    backend = ScriptedDecoder(tok.get_vocab_size(), eos, max_slots=slots, max_context=context)
    manifest = Manifest(
        task=Task.GENERATE,
        tokenizer="tokenizer.json",
        artifacts=(Artifact(backend="scripted", path="-"),),
        limits=Limits(max_input_tokens=context, max_new_tokens=64, default_new_tokens=8),
        batching=Batching(max_batch=slots, max_queue=queue),
        generation=Generation(eos_token_id=eos, max_context=context),
    )
    return GeneratorModel("scripted", "1", manifest, backend, tok), backend


def params_for(
    model: GeneratorModel, prompt: str, n: int = 8, stop: Sequence[str] = (), **sampling: Any
) -> GenerateParams:
    call = GenerateCall(
        prompt=prompt, max_new_tokens=n, sampling=SamplingParams(**sampling), stop=tuple(stop)
    )
    return model.prepare(call)[0]


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(4000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never held")


async def collect(events: AsyncIterator[TokenEvent]) -> list[TokenEvent]:
    return [e async for e in events]


def joined(events: list[TokenEvent]) -> tuple[str, list[int]]:
    return "".join(e.text for e in events), [t for e in events for t in e.token_ids]


def test_concurrent_requests_share_decode_steps(tokenizer: Tokenizer) -> None:
    model, backend = make_model(tokenizer)

    async def main() -> list[list[TokenEvent]]:
        await model.start()
        prompts = ["the fox", "the dog", "a story", "tell me"]
        runs = [collect(model.generate(params_for(model, p, 6))) for p in prompts]
        out = await asyncio.gather(*runs)
        await model.stop()
        return out

    for events in run(main()):
        last = events[-1]
        assert last.finish_reason is FinishReason.LENGTH
        assert last.completion_tokens == 6 == len(joined(events)[1])
        assert all(e.finish_reason is None for e in events[:-1])
    assert max(backend.decode_sizes()) > 1
    assert backend.slots == {}  # every slot released


def test_seeded_sampling_ignores_batch_neighbours(tokenizer: Tokenizer) -> None:
    def generate(prompts: list[tuple[str, int | None, float]]) -> list[list[int]]:
        model, _ = make_model(tokenizer)

        async def main() -> list[list[int]]:
            await model.start()
            runs = [
                collect(model.generate(params_for(model, p, 10, temperature=t, seed=seed)))
                for p, seed, t in prompts
            ]
            out = await asyncio.gather(*runs)
            await model.stop()
            return [joined(events)[1] for events in out]

        result: list[list[int]] = run(main())
        return result

    alone = generate([("the fox", 7, 1.0)])[0]
    crowded = generate([("the dog", 1, 1.0), ("the fox", 7, 1.0), ("a", None, 0.0), ("b", 3, 0.7)])
    assert crowded[1] == alone
    assert generate([("the fox", 8, 1.0)])[0] != alone  # the seed matters


def test_stop_string_across_tokens_is_not_emitted(tokenizer: Tokenizer) -> None:
    model, backend = make_model(tokenizer)
    prompt = params_for(model, "the fox", 30, stop=["END!"])
    script = tokenizer.encode("we END here 東京 END! and more").ids
    pieces = [tokenizer.decode([i]) for i in script]
    assert "END!" not in pieces and "END" not in pieces  # really split over tokens
    backend.scripts[prompt.prompt_ids] = script

    async def main() -> list[TokenEvent]:
        await model.start()
        events = await collect(model.generate(prompt))
        await model.stop()
        return events

    events = run(main())
    text, ids = joined(events)
    assert text == "we END here 東京 "
    assert events[-1].finish_reason is FinishReason.STOP
    assert not any("\ufffd" in e.text for e in events)
    assert ids == script[: len(ids)] and events[-1].completion_tokens == len(ids)
    assert ids[-1] == script[len(tokenizer.encode("we END here 東京 END!").ids) - 1]


def test_multibyte_text_and_eos(tokenizer: Tokenizer) -> None:
    model, backend = make_model(tokenizer)
    prompt = params_for(model, "tell me", 40)
    text = "café naïve 東京 😀"
    script = tokenizer.encode(text).ids
    assert len(script) > len(text)  # multi-byte characters span several tokens
    backend.scripts[prompt.prompt_ids] = script  # then EOS

    events = run(_start_collect_stop(model, prompt))
    got, ids = joined(events)
    assert got == text
    assert not any("\ufffd" in e.text for e in events)
    assert events[-1].finish_reason is FinishReason.EOS
    assert ids == [*script, backend.eos]
    assert events[-1].prompt_tokens == len(prompt.prompt_ids)


def test_ignore_eos_runs_to_max_new_tokens(tokenizer: Tokenizer) -> None:
    model, backend = make_model(tokenizer)
    prompt = params_for(model, "tell me", 12, ignore_eos=True)
    backend.scripts[prompt.prompt_ids] = tokenizer.encode("a fox").ids  # then EOS, EOS, ...

    events = run(_start_collect_stop(model, prompt))
    _, ids = joined(events)
    assert events[-1].finish_reason is FinishReason.LENGTH
    assert len(ids) == 12 and backend.eos in ids


async def _start_collect_stop(model: GeneratorModel, params: GenerateParams) -> list[TokenEvent]:
    await model.start()
    events = await collect(model.generate(params))
    await model.stop()
    return events


def test_full_context_finishes_with_length(tokenizer: Tokenizer) -> None:
    model, _ = make_model(tokenizer, context=16)
    params = GenerateParams(prompt_ids=tuple(range(1, 13)), max_new_tokens=50)
    events = run(_start_collect_stop(model, params))
    assert events[-1].finish_reason is FinishReason.LENGTH
    assert events[-1].completion_tokens == 4  # 12 prompt + 4 = the 16-token context


def test_aclose_mid_stream_frees_the_slot(tokenizer: Tokenizer) -> None:
    model, backend = make_model(tokenizer, slots=1)

    async def main() -> list[TokenEvent]:
        await model.start()
        stream = model.generate(params_for(model, "the fox", 50))
        await anext(stream)
        await anext(stream)
        await stream.aclose()
        # the only slot must come back, or this waits forever
        events = await collect(model.generate(params_for(model, "the dog", 3)))
        await model.stop()
        return events

    events = run(main())
    assert events[-1].completion_tokens == 3
    assert ("release", (0,)) in backend.calls[:-2]
    assert backend.slots == {} and model.active_slots == 0


def test_cancelled_consumer_frees_the_slot(tokenizer: Tokenizer) -> None:
    model, backend = make_model(tokenizer, slots=1)

    async def main() -> list[TokenEvent]:
        await model.start()
        first = asyncio.Event()

        async def consume() -> None:
            async for _ in model.generate(params_for(model, "the fox", 60)):
                first.set()

        task = asyncio.create_task(consume())
        await first.wait()
        task.cancel()
        events = await collect(model.generate(params_for(model, "the dog", 3)))
        await model.stop()
        return events

    assert run(main())[-1].completion_tokens == 3
    assert backend.slots == {}


def test_full_queue_is_refused_at_once(tokenizer: Tokenizer) -> None:
    model, backend = make_model(tokenizer, slots=1, queue=1)

    async def main() -> None:
        await model.start()
        backend.calls.clear()  # forget the warm-up
        backend.gate.clear()  # a cannot finish (and free slot 0) before b is cancelled
        a = model.scheduler.submit(params_for(model, "the fox", 3))
        b = model.scheduler.submit(params_for(model, "the dog", 3))  # slot 0 is a's, b waits
        with pytest.raises(QueueFull):
            await anext(model.generate(params_for(model, "a story", 3)))
        model.scheduler.cancel(b)  # leaves the queue at once
        await until(lambda: model.queue_depth == 0)  # a was admitted, b is gone
        backend.gate.set()
        while (await a.next_event()).finish_reason is None:
            pass
        await model.stop()

    run(main())
    assert [c for c in backend.calls if c[0] == "prefill"] == [("prefill", (0,))]


def test_backend_failure_fails_that_step_and_serving_goes_on(tokenizer: Tokenizer) -> None:
    model, backend = make_model(tokenizer)
    backend.fail_decodes = 1

    async def main() -> tuple[list[BaseException | list[TokenEvent]], list[TokenEvent]]:
        await model.start()
        runs = [collect(model.generate(params_for(model, p, 5))) for p in ("the fox", "the dog")]
        failed = await asyncio.gather(*runs, return_exceptions=True)
        after = await collect(model.generate(params_for(model, "a story", 5)))
        await model.stop()
        return failed, after

    failed, after = run(main())
    for result in failed:
        assert isinstance(result, BackendFailure)
        assert "/secret" not in str(result)
        assert isinstance(result.__cause__, RuntimeError)
    assert after[-1].finish_reason is FinishReason.LENGTH
    assert backend.slots == {} and model.active_slots == 0


def test_prefill_failure_fails_only_its_sequence(tokenizer: Tokenizer) -> None:
    model, backend = make_model(tokenizer)
    bad = params_for(model, "a story", 5)
    backend.fail_prompt = bad.prompt_ids

    async def main() -> list[BaseException | list[TokenEvent]]:
        await model.start()
        runs = [collect(model.generate(p)) for p in (params_for(model, "the fox", 5), bad)]
        out = await asyncio.gather(*runs, return_exceptions=True)
        await model.stop()
        return out

    good, failed = run(main())
    assert isinstance(failed, BackendFailure)
    assert isinstance(good, list) and good[-1].completion_tokens == 5


def test_slow_reader_gets_pending_tokens_coalesced(tokenizer: Tokenizer) -> None:
    model, backend = make_model(tokenizer)
    params = params_for(model, "tell me", 12)
    backend.scripts[params.prompt_ids] = tokenizer.encode("the quick brown fox jumps over").ids

    async def main() -> list[TokenEvent]:
        await model.start()
        stream = model.generate(params)
        first = await anext(stream)
        await until(lambda: not model.active_slots)  # the engine finishes; nobody reads
        rest = await collect(stream)
        await model.stop()
        return [first, *rest]

    events = run(main())
    # every token after the first read came in one event (on a loaded box the engine can
    # even finish before the first read returns: then that one event holds them all)
    assert len(events) <= 2
    assert sum(len(e.token_ids) for e in events) == events[-1].completion_tokens > 2
    assert "".join(e.text for e in events).startswith("the quick brown fox")


def test_stop_with_drain_finishes_in_flight_work(tokenizer: Tokenizer) -> None:
    model, _ = make_model(tokenizer, slots=2)

    async def main() -> list[list[TokenEvent]]:
        await model.start()
        runs = [
            asyncio.create_task(collect(model.generate(params_for(model, p, 6))))
            for p in ("the fox", "the dog", "a story")  # the third waits for a slot
        ]
        await asyncio.sleep(0)
        await model.stop(drain=True)
        with pytest.raises(ShuttingDown):
            await anext(model.generate(params_for(model, "late", 3)))
        return await asyncio.gather(*runs)

    for events in run(main()):
        assert events[-1].finish_reason is FinishReason.LENGTH


def test_stop_without_drain_fails_in_flight_work(tokenizer: Tokenizer) -> None:
    model, backend = make_model(tokenizer, slots=1)

    async def main() -> list[BaseException | list[TokenEvent]]:
        await model.start()
        backend.gate.clear()  # hold the first decode step
        runs = [
            asyncio.create_task(collect(model.generate(params_for(model, p, 6))))
            for p in ("the fox", "the dog")
        ]
        await until(lambda: model.active_slots > 0)
        stopping = asyncio.create_task(model.stop(drain=False))
        await asyncio.sleep(0.01)
        backend.gate.set()
        await stopping
        return await asyncio.gather(*runs, return_exceptions=True)

    results = run(main())
    assert all(isinstance(r, ShuttingDown) for r in results)
    assert backend.slots == {}


def test_prepare_checks_and_truncates(tokenizer: Tokenizer) -> None:
    model, _ = make_model(tokenizer, context=16)
    long_prompt = "the quick brown fox jumps over the lazy dog " * 4
    params, truncated = model.prepare(GenerateCall(prompt=long_prompt))
    ids = tokenizer.encode(long_prompt).ids
    assert truncated and params.prompt_ids == tuple(ids[-15:])  # keeps the end
    assert params.max_new_tokens == 8  # the manifest's default
    for call, field in [
        (GenerateCall(prompt=long_prompt, reject_overlong=True), "prompt"),
        (GenerateCall(prompt="x", max_new_tokens=65), "max_new_tokens"),
        (GenerateCall(prompt="x", max_new_tokens=-1), "max_new_tokens"),
        (GenerateCall(prompt="x", stop=("ok", "")), "stop[1]"),
        (GenerateCall(prompt="x", sampling=SamplingParams(top_k=10**6)), "sampling.top_k"),
    ]:
        with pytest.raises(InvalidArgument) as err:
            model.prepare(call)
        assert err.value.field == field, call


def test_an_inconsistent_backend_fails_running_work_and_the_engine_recovers(
    tokenizer: Tokenizer,
) -> None:
    model, backend = make_model(tokenizer, slots=2)
    backend.short_samples = 1  # a backend bug the step cannot attribute to one sequence

    async def main() -> tuple[list[BaseException | list[TokenEvent]], list[TokenEvent]]:
        await model.start()
        runs = [collect(model.generate(params_for(model, p, 5))) for p in ("the fox", "the dog")]
        failed = await asyncio.gather(*runs, return_exceptions=True)
        after = await asyncio.gather(
            *(collect(model.generate(params_for(model, p, 5))) for p in ("a", "b"))
        )
        await model.stop()
        return failed, after[1]

    failed, after = run(main())
    assert all(isinstance(r, BackendFailure) for r in failed)
    assert after[-1].completion_tokens == 5
