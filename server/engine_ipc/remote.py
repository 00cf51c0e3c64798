"""What a front end's services call when the models live in the engine process.

`RemoteRepository` is a ModelRepository whose served set is the engine's catalog: the
lookups, leases, defaults, model lists and states the services use are the repository's
own, unchanged. Its models are `RemoteClassifierModel` / `RemoteGeneratorModel`,
subclasses of the local ones with the same `classify`, `prepare` and `generate`; the
front end keeps the per-request host work (checks, tokenization, label scores,
conversion, logs, metrics) and sends token ids to the engine:

    transport -> service -> RemoteRepository.lease -> Remote*Model -> EngineClient
              -> (Unix socket) -> engine process -> EncoderBatcher / DecoderScheduler -> backend

Each version's manifest and tokenizer are read from its folder (the engine names it in
the catalog). While the engine is gone every served version shows as loading: calls get
UNAVAILABLE (retryable), health says NOT_SERVING, until the restarted engine's catalog.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

from headrace.server import metrics
from headrace.server.calls import check_classify
from headrace.server.engine_ipc.client import EngineClient
from headrace.server.engine_ipc.tokenize import TokenizeQueue
from headrace.server.loader import LoadedVersion
from headrace.server.manifest import Manifest, read_manifest
from headrace.server.model_state import ModelState, ModelStates
from headrace.server.models import (
    ClassifierModel,
    GeneratorModel,
    ServedModel,
    _private_copy,
    load_tokenizer,
    pad_id_of,
    top_labels,
)
from headrace.server.profiles import Choice
from headrace.server.repository import ModelRepository
from headrace.server.types import (
    BackendFailure,
    ClassifyCall,
    ClassifyItem,
    GenerateParams,
    StreamInterval,
    Task,
    TokenEvent,
)
from tokenizers import Tokenizer


class _RemoteEngine:
    """What ServedModel asks of its engine, for a model whose engine is elsewhere."""

    queue_depth = 0

    async def start(self) -> None:
        return None

    async def stop(self, *, drain: bool = True) -> None:
        return None


class _DecoderFacts:
    """The two facts of the engine's decoder backend that a front end's checks need."""

    def __init__(self, vocab_size: int | None, max_context: int) -> None:
        self.vocab_size = vocab_size
        self.max_context = max_context

    def close(self) -> None:
        return None


_ENGINE = _RemoteEngine()


class RemoteClassifierModel(ClassifierModel):
    """ClassifierModel.classify, with the batch run by the engine process."""

    def __init__(
        self, name: str, version: str, manifest: Manifest, tokenizer: Tokenizer,
        client: EngineClient,
    ) -> None:  # fmt: skip
        ServedModel.__init__(self, name, version, manifest, tokenizer)
        self.client = client
        self.pad_id = pad_id_of(tokenizer)
        self.max_tokens = manifest.limits.max_input_tokens
        self._truncating = _private_copy(tokenizer)
        self._truncating.enable_truncation(max_length=self.max_tokens)
        self._prompt_tokens = metrics.PROMPT_TOKENS.labels(name)
        self._tokenizing = TokenizeQueue(self.tokenize, name)  # off the loop, batched
        self._running = 0  # classify calls in flight here

    @property
    def engine(self) -> Any:
        return _ENGINE

    def close(self) -> None:
        self._tokenizing.close()

    async def classify(self, call: ClassifyCall) -> list[ClassifyItem]:
        check_classify(call, self.manifest.limits)
        self._running += 1
        try:
            if call.reject_overlong:  # an overlong text fails here, before the engine
                encoded = self.encode(call.texts, reject_overlong=True)
            else:
                encoded = await self._tokenizing.encode(call.texts, alone=self._running == 1)
            logits, tokens = await self.client.classify(
                self.name, self.version, [ids for ids, _ in encoded]
            )
        finally:
            self._running -= 1
        labels = self.manifest.labels
        if logits.shape[1] != len(labels):
            raise BackendFailure(
                f"the model returned {logits.shape[1]} scores for {len(labels)} labels"
            )
        keep = len(labels) if call.top_k <= 0 else min(call.top_k, len(labels))
        best = top_labels(logits, labels, keep)
        items = [
            ClassifyItem(row, truncated, n)
            for row, n, (_, truncated) in zip(best, tokens, encoded, strict=True)
        ]
        self._prompt_tokens.inc(sum(tokens))
        return items


class RemoteGeneratorModel(GeneratorModel):
    """GeneratorModel.prepare here, its sequence decoded by the engine process."""

    def __init__(
        self, name: str, version: str, manifest: Manifest, tokenizer: Tokenizer,
        client: EngineClient, *, vocab_size: int | None, max_context: int,
    ) -> None:  # fmt: skip
        ServedModel.__init__(self, name, version, manifest, tokenizer)
        self.client = client
        self.backend = _DecoderFacts(vocab_size, max_context)  # type: ignore[assignment]
        self.stream = StreamInterval()
        self.max_context = max_context

    @property
    def engine(self) -> Any:
        return _ENGINE

    @property
    def active_slots(self) -> int:
        return 0

    def close(self) -> None:
        return None

    async def generate(
        self, params: GenerateParams, on_queued: Callable[[], None] | None = None
    ) -> AsyncGenerator[TokenEvent, None]:
        events = self.client.generate(self.name, self.version, params)
        if on_queued is not None:  # sent to the engine with the first step below
            on_queued()
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()  # CANCEL: the engine frees the slot at its next step


class RemoteRepository(ModelRepository):
    """The engine's catalog as a ModelRepository (see the module's docstring)."""

    def __init__(
        self,
        socket_path: Path,
        *,
        profile: str = "auto",
        defaults: dict[Task, str] | None = None,
        stream: StreamInterval | None = None,
        connect_timeout_s: float = 300.0,
    ) -> None:
        super().__init__(
            socket_path.parent, profile=profile, poll_interval_s=0, defaults=defaults,
            stream=stream,
        )  # fmt: skip
        self.client = EngineClient(socket_path, self._apply)
        self.connect_timeout_s = connect_timeout_s
        self._built: dict[tuple[str, str, str], LoadedVersion] = {}

    async def start(self) -> None:
        await self.client.start(self.connect_timeout_s or None)

    async def stop(self, *, drain: bool = True) -> None:
        await self.client.close()
        for built in self._built.values():
            built.model.close()

    async def refresh(self) -> bool:
        return False  # the engine rescans; its catalog comes when it changes

    async def _apply(self, catalog: dict[str, Any] | None) -> None:
        """A new catalog from the engine, or None: the engine is gone."""
        states = ModelStates()
        served: dict[str, dict[str, LoadedVersion]] = {}
        if catalog is None:
            for name, versions in self._served.items():
                for v in versions.values():
                    states.set(name, v.version, ModelState.LOADING, task=v.manifest.task)
        else:
            self.profile = catalog["profile"]
            for s in catalog["states"]:
                task = Task(s["task"]) if s["task"] else None
                states.set(s["name"], s["version"], ModelState(s["state"]), reason=s["reason"],
                           task=task)  # fmt: skip
            for entry in catalog["versions"]:
                loaded = await self._version(entry)
                served.setdefault(loaded.name, {})[loaded.version] = loaded
            live = {(v.name, v.version, str(v.path)) for vs in served.values() for v in vs.values()}
            for key in set(self._built) - live:
                self._built.pop(key).model.close()  # a front end's own threads, if any
        self.states = states
        self._served = served
        await self._notify()

    async def _version(self, entry: dict[str, Any]) -> LoadedVersion:
        key = (entry["name"], entry["version"], entry["path"])
        if key not in self._built:
            self._built[key] = await asyncio.to_thread(self._build, entry)
        return self._built[key]

    def _build(self, entry: dict[str, Any]) -> LoadedVersion:
        name, version, path = entry["name"], entry["version"], Path(entry["path"])
        manifest = read_manifest(path)
        tokenizer = load_tokenizer(path / manifest.tokenizer)
        model: ServedModel
        if manifest.task is Task.CLASSIFY:
            model = RemoteClassifierModel(name, version, manifest, tokenizer, self.client)
        else:
            model = RemoteGeneratorModel(
                name, version, manifest, tokenizer, self.client,
                vocab_size=entry.get("vocab_size"), max_context=int(entry["max_context"]),
            )  # fmt: skip
            model.stream = self.stream
        choice = Choice(entry["backend"], manifest.artifacts[entry["artifact"]], entry["device"])
        return LoadedVersion(name, version, path, manifest, choice, model)

