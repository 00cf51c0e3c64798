"""Settings of the demo generator measured side by side, outside the pipeline.

    python -m bench.gpt_sweep step '{"vocab": 4096, "bf16": true}' '{"vocab": 8192}'
    python -m bench.gpt_sweep train --vocab 4096 --bf16 --steps 100 --out sweep.jsonl
    python -m bench.gpt_sweep samples models/tweetgpt/1

step: CPU-seconds of one AdamW training step (median of 6 after 2 warm-up steps) of a
GPT-2 at each JSON setting (keys: vocab, embd, layers, heads, block, batch, bf16), on
random token ids. CPU-seconds count both threads, so an idle 2-core box takes about half
of that in wall time; a loaded one inflates them too (cache and core sharing).

train: the tweets' split and a byte-level BPE of `--vocab` tokens, as `headrace build
generator` makes them; a GPT-2 trained like the pipeline's teacher (seed 0, same batches
and schedule); then held-out perplexity (per token, and bits per byte, which compares
vocabularies) on the first `--test` test tweets, and greedy and sampled (T 0.8, top-k 40,
seed 0) continuations of the demo prompts. One JSON line a run is appended to `--out`.

samples: those continuations from a written version's `hf/` and `tokenizer.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from pathlib import Path
from typing import Any

PROMPTS = (
    "good morning",
    "I love my",
    "the weather today is",
    "can't wait to",
    "user: good morning!\nassistant:",  # the chat page's plain template
)


def step_cost(
    vocab: int = 4096,
    embd: int = 256,
    layers: int = 4,
    heads: int = 4,
    block: int = 128,
    batch: int = 16,
    bf16: bool = False,
) -> float:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=block,
        n_embd=embd,
        n_layer=layers,
        n_head=heads,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(cfg)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, vocab, (batch, block))
    times = []
    for i in range(8):
        start = time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
        if i >= 2:
            times.append(time.process_time() - start)
    return sorted(times)[len(times) // 2]


def continuations(model: Any, tok: Any, eos: int, tokens: int = 30) -> dict[str, dict[str, str]]:
    import torch

    out = {}
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = torch.tensor([tok.encode(prompt).ids])
            kw = {"max_new_tokens": tokens, "eos_token_id": eos, "pad_token_id": eos}
            greedy = model.generate(ids, do_sample=False, **kw)
            torch.manual_seed(0)
            sampled = model.generate(ids, do_sample=True, temperature=0.8, top_k=40, **kw)
            out[prompt] = {
                name: tok.decode(seq[0, ids.shape[1] :].tolist()).split("\nuser:")[0]
                for name, seq in (("greedy", greedy), ("sampled", sampled))
            }
    return out


def train(a: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    from headrace.build.generator import GeneratorConfig, make_split, pack, train_tokenizer
    from headrace.build.generator_train import EOS, autocast, model_config, random_blocks
    from headrace.build.steps import seed_everything
    from headrace.build.training import train_loop
    from tokenizers import Tokenizer
    from transformers import GPT2LMHeadModel

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    cached = work / "split.pkl"
    if not cached.exists():
        cached.write_bytes(pickle.dumps(make_split(GeneratorConfig(out=work))))
    split = pickle.loads(cached.read_bytes())
    texts = [e.text for e in split.train]
    test = [e.text for e in split.test[: a.test]]
    tok_path = work / f"tokenizer-{a.vocab}.json"
    if not tok_path.exists():
        train_tokenizer(texts, a.vocab, tok_path)
    tok = Tokenizer.from_file(str(tok_path))
    eos = tok.token_to_id(EOS)
    blocks, held = pack(tok, texts, a.block), pack(tok, test, a.block)
    cfg = GeneratorConfig(
        out=work, block_size=a.block, n_embd=a.embd, n_layer=a.layers, n_head=a.heads
    )
    seed_everything(0)
    model = GPT2LMHeadModel(model_config(cfg, tok.get_vocab_size(), eos))
    data = torch.from_numpy(blocks)
    precision = "bf16" if a.bf16 else "fp32"

    def loss_fn(m: Any, idx: Any) -> Any:
        ids = data[torch.from_numpy(idx)]
        with autocast(precision):
            return m(input_ids=ids, labels=ids).loss

    curve: list[tuple[int, float]] = []

    def checkpoint(step: int, loss: float) -> bool:
        curve.append((step, round(loss, 3)))
        return False

    wall, cpu = time.perf_counter(), time.process_time()
    result = train_loop(
        model,
        random_blocks(len(blocks), a.batch, 0),
        loss_fn,
        steps=a.steps,
        lr=a.lr,
        weight_decay=0.1,
        desc="sweep",
        every=50,
        checkpoint=checkpoint,
    )
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(held), 32):
            ids = torch.from_numpy(held[i : i + 32])
            logits = model(input_ids=ids).logits[:, :-1].float()
            total += float(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
                )
            )
            count += ids[:, 1:].numel()
    tokens = sum(len(e.ids) + 1 for e in tok.encode_batch(test))  # + the end of each text
    nbytes = sum(len(t.encode()) + 1 for t in test)
    return {
        **vars(a),
        "parameters": sum(p.numel() for p in model.parameters()),
        "epochs": round(a.steps * a.batch / len(blocks), 2),
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "cpu_s_per_step": round(cpu / a.steps, 3),
        "train_loss": result["loss"],
        "curve": curve,
        "perplexity": round(float(np.exp(total / count)), 1),
        "bits_per_byte": round(total / count * tokens / nbytes / float(np.log(2)), 3),
        "samples": continuations(model, tok, eos),
    }


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("step", help="CPU-seconds of one training step per setting")
    s.add_argument("settings", nargs="+", help="JSON objects of step_cost keywords")
    t = sub.add_parser("train", help="train one setting; perplexity, bits/byte, samples")
    for flag, kind, default in (
        ("--vocab", int, 4096),
        ("--embd", int, 256),
        ("--layers", int, 4),
        ("--heads", int, 4),
        ("--block", int, 128),
        ("--batch", int, 16),
        ("--steps", int, 300),
        ("--lr", float, 2e-3),
        ("--test", int, 1000),
    ):
        t.add_argument(flag, type=kind, default=default)
    t.add_argument("--bf16", action="store_true")
    t.add_argument("--work", default=".cache/bench/gpt_sweep")
    t.add_argument("--out", default=".cache/bench/gpt_sweep/runs.jsonl")
    v = sub.add_parser("samples", help="continuations of the demo prompts from a version")
    v.add_argument("version", type=Path)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    if a.cmd == "step":
        for spec in a.settings:
            print(json.dumps({**json.loads(spec), "cpu_s_per_step": step_cost(**json.loads(spec))}))
        return 0
    if a.cmd == "samples":
        from tokenizers import Tokenizer
        from transformers import GPT2LMHeadModel

        tok = Tokenizer.from_file(str(a.version / "tokenizer.json"))
        model = GPT2LMHeadModel.from_pretrained(a.version / "hf").eval()
        print(json.dumps(continuations(model, tok, tok.token_to_id("<|endoftext|>")), indent=1))
        return 0
    row = train(a)
    print(json.dumps(row, indent=1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
