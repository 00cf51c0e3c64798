"""REPORT.md and PNG plots from one run's results (results.raw.json).

python -m bench.report bench/results/results.raw.json --out bench/results
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bench.common import read_json

RSS_NOISE_MB = 20.0  # growth below max(this, 5% of RSS) counts as noise


def _f(x: Any, digits: int = 1) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def _point(res: dict[str, Any] | None, c: int) -> dict[str, Any] | None:
    if not res:
        return None
    return next((p for p in res.get("points", []) if p["concurrency"] == c), None)


def _limit(res: dict[str, Any] | None, batch: int) -> float | None:
    if not res:
        return None
    row = next((r for r in res.get("by_batch", []) if r["batch"] == batch), None)
    return row["tokens_per_s"] if row else None


def _verdict(ok: bool | None) -> str:
    return "–" if ok is None else ("**pass**" if ok else "**FAIL**")


def targets(r: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(target, required, measured, passed) rows of the headline table."""
    rows: list[tuple[str, str, str, bool | None]] = []
    lim = (r.get("classify_limit") or {}).get("limit_texts_per_s")
    c64 = _point(r.get("classify_headrace"), 64)
    if lim and c64:
        ratio = c64["throughput"] / lim
        rows.append(
            (
                "classify, 64 callers: throughput / raw limit",
                ">= 85%",
                f"{100 * ratio:.0f}% ({c64['throughput']:,.0f} of {lim:,.0f} texts/s)",
                ratio >= 0.85,
            )
        )
        tail = c64["p99_ms"] / c64["p50_ms"]
        rows.append(
            (
                "classify, 64 callers: p99 / p50",
                "<= 3x",
                f"{tail:.2f}x (p50 {c64['p50_ms']:.1f} ms, p99 {c64['p99_ms']:.1f} ms)",
                tail <= 3.0,
            )
        )
    ks = r.get("classify_kserve")
    if ks and ks.get("ratio") is not None:
        rows.append(
            (
                f"classify, {ks['concurrency']} callers: KServe v2 / native API",
                ">= 90%, same labels",
                f"{100 * ks['ratio']:.0f}% ({ks['kserve_throughput']:,.0f} vs "
                f"{ks['native_throughput']:,.0f} req/s); labels "
                + ("agree" if ks["labels_agree"] else "DIFFER"),
                ks["ratio"] >= 0.9 and bool(ks["labels_agree"]),
            )
        )
    hr = _point(r.get("teacher_headrace"), 64)
    for tag in ("stock", "batched"):
        ml = _point(r.get(f"teacher_mlserver_{tag}"), 64)
        if hr and ml:
            ratio = hr["throughput"] / ml["throughput"] if ml["throughput"] else float("inf")
            ml_p99 = ml["p99_ms"] if ml["p99_ms"] is not None else float("inf")
            rows.append(
                (
                    f"fp32 teacher, 64 callers: headrace / MLServer ({tag})",
                    ">= 2x, p99 no worse",
                    f"{ratio:.1f}x ({hr['throughput']:,.0f} vs {ml['throughput']:,.0f} req/s); "
                    f"p99 {hr['p99_ms']:.0f} vs {_f(ml['p99_ms'], 0)} ms",
                    ratio >= 2.0 and hr["p99_ms"] <= ml_p99,
                )
            )
    gen = r.get("generate_headrace")
    g16, g1 = _point(gen, 16), _point(gen, 1)
    lim16 = _limit(r.get("generate_limit"), 16)
    if g16 and lim16:
        ratio = g16["tokens_per_s"] / lim16
        rows.append(
            (
                "generate, 16 streams: tokens/s / raw batch-16 decode limit",
                ">= 80%",
                f"{100 * ratio:.0f}% ({g16['tokens_per_s']:,.0f} of {lim16:,.0f} tok/s)",
                ratio >= 0.8,
            )
        )
    if g16 and g1 and g1["tokens_per_s"]:
        ratio = g16["tokens_per_s"] / g1["tokens_per_s"]
        rows.append(
            (
                "generate, 16 streams / 1 stream",
                ">= 3x",
                f"{ratio:.1f}x ({g16['tokens_per_s']:,.0f} vs {g1['tokens_per_s']:,.0f} tok/s)",
                ratio >= 3.0,
            )
        )
    cancel = (gen or {}).get("cancel")
    if cancel:
        slots = cancel.get("active_slots_after")
        rows.append(
            (
                f"{cancel['streams']} streams cancelled mid-generation: slots in use after",
                "0",
                _f(slots, 0),
                None if slots is None else slots == 0,
            )
        )
        growth = cancel["rss_after_mb"] - cancel["rss_before_mb"]
        noise = max(RSS_NOISE_MB, 0.05 * cancel["rss_before_mb"])
        rows.append(
            (
                "... server RSS growth",
                f"noise (< {noise:.0f} MiB)",
                f"{growth:+.1f} MiB ({cancel['rss_before_mb']:.0f} -> {cancel['rss_after_mb']:.0f} MiB)",
                growth < noise,
            )
        )
    return rows


def headline_table(r: dict[str, Any]) -> str:
    lines = ["| target | required | measured | |", "|---|---|---|---|"]
    lines += [f"| {t} | {req} | {m} | {_verdict(ok)} |" for t, req, m, ok in targets(r)]
    return "\n".join(lines)


def _classify_table(rows: list[tuple[str, dict[str, Any] | None]]) -> str:
    out = [
        "| server | callers | req/s (= texts/s) | p50 ms | p90 ms | p99 ms | errors | server cores | client cores |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for name, res in rows:
        for p in (res or {}).get("points", []):
            out.append(
                f"| {name} | {p.get('concurrency')} | {_f(p.get('throughput'))} | {_f(p.get('p50_ms'))} | "
                f"{_f(p.get('p90_ms'))} | {_f(p.get('p99_ms'))} | {p.get('errors') or '0'} | "
                f"{_f(p.get('server_cores'), 2)} | {_f(p.get('client_cores'), 2)} |"
            )
    return "\n".join(out)


def _generate_table(rows: list[tuple[str, dict[str, Any] | None]]) -> str:
    out = [
        "| server | streams | tokens/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | ITL p50 ms | "
        "ITL p99 ms | tokens per stream | errors | server cores | client cores |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for name, res in rows:
        for p in (res or {}).get("points", []):
            out.append(
                f"| {name} | {p.get('concurrency')} | {_f(p.get('tokens_per_s'))} | {_f(p.get('ttft_p50_ms'))} | "
                f"{_f(p.get('ttft_p99_ms'))} | {_f(p.get('tpot_p50_ms'), 2)} | {_f(p.get('itl_p50_ms'), 2)} | "
                f"{_f(p.get('itl_p99_ms'), 2)} | {_f(p.get('mean_tokens_per_stream'))} | {p.get('errors') or '0'} | {_f(p.get('server_cores'), 2)} | "
                f"{_f(p.get('client_cores'), 2)} |"
            )
    return "\n".join(out)


def _served_by(res: dict[str, Any] | None) -> str:
    info = (res or {}).get("info") or {}
    if not info:
        return "?"
    return f"{info.get('backend')} {info.get('precision')} on {info.get('device')} (max_batch {info.get('max_batch')})"


def plots(r: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []

    def series(res: dict[str, Any] | None, key: str) -> tuple[list[int], list[float]]:
        pts = [p for p in (res or {}).get("points", []) if p.get(key) is not None]
        return [p["concurrency"] for p in pts], [p[key] for p in pts]

    if r.get("classify_headrace"):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        x, y = series(r["classify_headrace"], "throughput")
        ax1.plot(x, y, "o-", label="headrace over gRPC")
        lim = (r.get("classify_limit") or {}).get("limit_texts_per_s")
        if lim:
            ax1.axhline(lim, color="k", ls="--", label=f"raw backend limit ({lim:,.0f})")
            ax1.axhline(0.85 * lim, color="grey", ls=":", label="85% of limit")
        ax1.set_ylim(bottom=0)
        ax1.set(
            xscale="log",
            xlabel="concurrent callers (1 text each)",
            ylabel="texts/s",
            title=f"classify: {r['classify_headrace'].get('model')}",
        )
        ax1.set_xticks(x, [str(v) for v in x])
        ax1.legend()
        for key, style in (("p50_ms", "o-"), ("p99_ms", "s--")):
            xs, ys = series(r["classify_headrace"], key)
            ax2.plot(xs, ys, style, label=key.replace("_ms", ""))
        ax2.set(
            xscale="log", xlabel="concurrent callers", ylabel="latency ms", title="classify latency"
        )
        ax2.set_xticks(x, [str(v) for v in x])
        ax2.legend()
        fig.tight_layout()
        fig.savefig(out / "classify.png", dpi=110)
        plt.close(fig)
        made.append("classify.png")

    peers = [
        ("headrace", r.get("teacher_headrace")),
        ("MLServer stock", r.get("teacher_mlserver_stock")),
        ("MLServer batch restored", r.get("teacher_mlserver_batched")),
    ]
    if any(res for _, res in peers):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for k, (name, res) in enumerate(peers):
            if res:
                x, y = series(res, "throughput")
                ax1.plot(x, y, "o-", color=f"C{k}", label=name)
                x, y = series(res, "p99_ms")
                ax2.plot(x, y, "o-", color=f"C{k}", label=name)
        tlim = (r.get("teacher_limit") or {}).get("limit_texts_per_s")
        if tlim:
            ax1.axhline(
                tlim, color="k", ls="--", label=f"raw limit of headrace's backend ({tlim:,.0f})"
            )
        ax1.set_ylim(bottom=0)
        ax1.set(
            xscale="log",
            xlabel="concurrent callers",
            ylabel="requests/s",
            title="same fp32 teacher: throughput",
        )
        ax2.set(
            xscale="log",
            yscale="log",
            xlabel="concurrent callers",
            ylabel="p99 ms",
            title="p99 latency",
        )
        for ax in (ax1, ax2):
            ax.set_xticks([1, 4, 16, 64], ["1", "4", "16", "64"])
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "peers.png", dpi=110)
        plt.close(fig)
        made.append("peers.png")

    gens = [
        ("headrace", r.get("generate_headrace")),
        ("naive transformers", r.get("generate_naive")),
    ]
    if any(res for _, res in gens):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for k, (name, res) in enumerate(gens):
            if res:
                x, y = series(res, "tokens_per_s")
                ax1.plot(x, y, "o-", color=f"C{k}", label=name)
                x, y = series(res, "tpot_p50_ms")
                ax2.plot(x, y, "o-", color=f"C{k}", label=f"{name} TPOT p50")
                x, y = series(res, "ttft_p50_ms")
                ax2.plot(x, y, "s--", color=f"C{k}", label=f"{name} TTFT p50")
        for b, style in ((16, "--"), (1, ":")):
            lim = _limit(r.get("generate_limit"), b)
            if lim:
                ax1.axhline(
                    lim, color="k", ls=style, label=f"raw decode limit, batch {b} ({lim:,.0f})"
                )
        ax1.set_ylim(bottom=0)
        ax1.set(
            xscale="log",
            xlabel="concurrent streams",
            ylabel="tokens/s (aggregate)",
            title="generate throughput",
        )
        ax2.set(
            xscale="log",
            yscale="log",
            xlabel="concurrent streams",
            ylabel="ms",
            title="generate latency",
        )
        for ax in (ax1, ax2):
            ax.set_xticks([1, 4, 16], ["1", "4", "16"])
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "generate.png", dpi=110)
        plt.close(fig)
        made.append("generate.png")
    return made


def _limit_table(res: dict[str, Any] | None, unit: str) -> str:
    if not res:
        return "(not measured)"
    if unit == "texts/s":
        rows = ["| batch | texts/s | ms per call |", "|---:|---:|---:|"]
        rows += [
            f"| {b['batch']} | {_f(b['texts_per_s'])} | {_f(b['ms_per_call'], 2)} |"
            for b in res["by_batch"]
        ]
    else:
        rows = ["| batch | ms per decode step | tokens/s |", "|---:|---:|---:|"]
        rows += [
            f"| {b['batch']} | {_f(b['step_ms'], 2)} | {_f(b['tokens_per_s'])} |"
            for b in res["by_batch"]
        ]
    return "\n".join(rows)


def render(r: dict[str, Any], images: list[str]) -> str:
    env = r.get("environment", {})
    lim = r.get("classify_limit") or {}
    tl = r.get("teacher_limit") or {}
    gl = r.get("generate_limit") or {}
    gen = r.get("generate_headrace") or {}
    cancel = gen.get("cancel") or {}
    loads = [
        v.get("load_avg_1m_before")
        for v in r.values()
        if isinstance(v, dict) and "load_avg_1m_before" in v
    ]
    md = [
        "# headrace benchmark report",
        "",
        f"Measured {env.get('date', '?')} on {env.get('cores', '?')} cores ({env.get('cpu', '?')}), "
        f"commit `{env.get('commit', '?')}`, `headrace serve --profile {env.get('profile', '?')}"
        f"{''.join(' ' + x for x in env.get('server_args') or [])}` (backend threads at their "
        "defaults unless given there), by `make bench` "
        f"(`{env.get('command', '')}`). Each point: {env.get('warmup_s')} s warm-up, then "
        f"{env.get('duration_s')} s measured. One run; numbers move by several percent between runs.",
        "",
        "**Machine caveat.** The load generator runs on the same 2 cores as the server it measures "
        "(one process, grpc.aio with "
        + str((env.get("versions", {}).get("uvloop") and "uvloop") or "asyncio")
        + ", requests serialized before the run, responses unparsed): every core-second it spends is "
        "one the server does not get, while the raw limit is measured with no client at all. The "
        "`client cores` column shows what it took. 1-minute load average at the start of each phase: "
        + ", ".join(_f(x, 1) for x in loads)
        + " (above 2 means other work shared the machine).",
        "",
        *(
            [
                f"**This run shared the machine with other work** (1-minute load average up to "
                f"{max(loads):.1f} on {env.get('cores', '?')} cores): its figures understate every "
                "server, and by different amounts. Rerun on an idle machine before quoting them.",
                "",
            ]
            if loads and max(x or 0.0 for x in loads) > 2.5
            else []
        ),
        *[
            f"The {', '.join(x['phases'])} phases were rerun on {x['date']} (after a change to "
            "the bench) into this run's results; the load averages above include that rerun." + "\n"
            for x in r.get("reruns", [])
        ],
        "## Headline",
        "",
        headline_table(r),
        "",
    ]
    if r.get("errors"):
        md += ["**Phases that failed in this run:**", ""]
        md += [f"- `{k}`: {v.splitlines()[0][:300]}" for k, v in r["errors"].items()]
        md += [""]
    md += [
        "## Classify: headrace vs the raw backend limit",
        "",
        f"Model `{lim.get('model', '?')}` ({lim.get('backend', '?')} {lim.get('precision', '?')}, "
        f"`{lim.get('artifact', '?')}`). The raw limit is `backend.forward` called in-process on "
        "pre-tokenized batches of real tweets (padded to the batch's longest), no server, no "
        f"tokenizer: best {_f(lim.get('limit_texts_per_s'))} texts/s at batch {lim.get('best_batch', '?')}. "
        "headrace is measured over gRPC: N concurrent callers, each sending one text per request "
        "and waiting for the answer before sending the next (closed loop); served by "
        f"{_served_by(r.get('classify_headrace'))}.",
        "",
        _limit_table(lim or None, "texts/s"),
        "",
        _classify_table([("headrace", r.get("classify_headrace"))]),
        "",
    ]
    if "classify.png" in images:
        md += ["![classify](classify.png)", ""]
    md += [
        "## Same fp32 teacher: headrace vs Seldon MLServer",
        "",
        f"Checkpoint `{tl.get('model', '?')}`. headrace serves it with {_served_by(r.get('teacher_headrace'))} "
        f"(raw limit of that backend: {_f(tl.get('limit_texts_per_s'))} texts/s at batch {tl.get('best_batch', '?')}). "
        "MLServer 1.7.1 serves the HF checkpoint (fp32 torch) with its Hugging Face runtime, "
        "KServe v2 gRPC, adaptive batching on "
        f"(max_batch_size {(r.get('teacher_mlserver_stock') or r.get('teacher_mlserver_batched') or {}).get('max_batch_size', '?')}, "
        f"max_batch_time {(r.get('teacher_mlserver_stock') or r.get('teacher_mlserver_batched') or {}).get('max_batch_time_s', '?')} s). "
        "*stock*: the runtime as shipped, which drops the pipeline's batch size to 1 for BERT "
        "(it reads pad id 0 as 'no pad token'), so merged requests still run one text per "
        "forward. *batch restored*: the same runtime with the batch size set back after load. "
        "Same load generator, same texts, one text per request.",
        "",
    ]
    if any(
        (r.get(k) or {}).get("checkpoint_converted")
        for k in ("teacher_mlserver_stock", "teacher_mlserver_batched")
    ):
        md += [
            "MLServer's transformers 4.41 could not load the checkpoint as saved by transformers 5.x; "
            "the bench served it a compatible copy (same weights; `dtype` renamed `torch_dtype`, a "
            "BERT tokenizer_config.json added).",
            "",
        ]
    ref = (r.get("teacher_headrace") or {}).get("sample_labels")
    for tag in ("stock", "batched"):
        other = (r.get(f"teacher_mlserver_{tag}") or {}).get("sample_labels")
        if ref and other:
            same = sum(a == b for a, b in zip(ref, other, strict=False))
            md += [
                f"Same model check: MLServer ({tag}) and headrace gave the same top label to "
                f"{same} of {len(ref)} sample tweets before the load run.",
                "",
            ]
    md += [
        _classify_table(
            [
                ("headrace", r.get("teacher_headrace")),
                ("MLServer stock", r.get("teacher_mlserver_stock")),
                ("MLServer batch restored", r.get("teacher_mlserver_batched")),
            ]
        ),
        "",
    ]
    if "peers.png" in images:
        md += ["![peers](peers.png)", ""]
    ks = r.get("classify_kserve")
    if ks:
        md += [
            "## Classify: the KServe v2 front vs the native API",
            "",
            f"One headrace server with `{ks['model']}` (served by {_served_by(ks)}), "
            f"{ks['concurrency']} callers, one text per call; after one unrecorded warm-up round, "
            "runs in the order native, KServe, KServe, native. Native: `headrace.v1.Inference/Classify`. KServe: "
            "`inference.GRPCInferenceService/ModelInfer` with `text` as raw BYTES, answered "
            "with `label` and raw FP32 `probabilities`, as tritonclient sends and reads them. "
            "Both enter the same batcher.",
            "",
            "| run | API | req/s | p50 ms | p99 ms | server cores | client cores |",
            "|---|---|---|---|---|---|---|",
        ]
        order = [("headrace", 0), ("kserve", 0), ("kserve", 1), ("headrace", 1)]
        for n, (api, i) in enumerate(order, 1):
            pts = ks["points"].get(api, [])
            if i < len(pts):
                p = pts[i]
                md.append(
                    f"| {n} | {'native' if api == 'headrace' else 'KServe v2'} | "
                    f"{p['throughput']:,.0f} | {_f(p['p50_ms'])} | {_f(p['p99_ms'])} | "
                    f"{_f(p.get('server_cores'), 2)} | {_f(p.get('client_cores'), 2)} |"
                )
        md += [""]
    md += [
        "## Generate: headrace vs the raw decode limit and a naive server",
        "",
        f"Model `{gl.get('model', '?')}` ({gl.get('backend', '?')} {gl.get('precision', '?')}, "
        f"`{gl.get('artifact', '?')}`), up to {gl.get('new_tokens', '?')} new tokens per request, "
        "greedy with `ignore_eos`, so every stream carries exactly that many tokens (greedy "
        "decoding of this tweet model would end after about 4); headrace still pays one "
        "prefill per stream, while the raw limit decodes every slot for all its steps. "
        "The raw limit: prefill B slots, then decode steps for all B at once, in-process; "
        "tokens/s = B x steps / time inside `decode` (sampling and prefill excluded). headrace: "
        "N concurrent GenerateStream calls, each starting a new one when it ends; tokens/s counts "
        "tokens received inside the window; TTFT is send -> first token; TPOT is one stream's "
        "(last token - first token) / (tokens after the first); ITL is the gap between "
        f"token-bearing chunks of one stream, per token. Served by {_served_by(gen)}. The naive baseline "
        "(`bench/naive_server.py`) is a plain `transformers` `generate` with a "
        "`TextIteratorStreamer`, one thread per request behind a grpc sync server, same HF "
        "checkpoint (fp32 torch).",
        "",
        _limit_table(gl or None, "tokens/s"),
        "",
        _generate_table(
            [
                ("headrace", r.get("generate_headrace")),
                ("naive transformers", r.get("generate_naive")),
            ]
        ),
        "",
    ]
    if "generate.png" in images:
        md += ["![generate](generate.png)", ""]
    if cancel:
        md += [
            "## Cancellation",
            "",
            f"{cancel.get('streams')} GenerateStream calls (64 at a time, {cancel.get('new_tokens')} new tokens asked), "
            "each cancelled by the client after 0-6 tokens (0: before or during prefill), after "
            "a 100-stream warm-up round. Then the server's `/metrics`: "
            f"`headrace_active_slots` = {_f(cancel.get('active_slots_after'), 0)}, "
            f"`headrace_queue_depth` = {_f(cancel.get('queue_depth_after'), 0)}; server RSS "
            f"{_f(cancel.get('rss_before_mb'))} -> {_f(cancel.get('rss_after_mb'))} MiB. "
            f"Took {_f(cancel.get('seconds'))} s; outcomes {cancel.get('outcome')}.",
            "",
        ]
    md += [
        "## How to read this",
        "",
        "See `docs/bench.md`: what each figure means, how to rerun one phase, and why a 2-core "
        "machine understates every server here (the client takes CPU from it).",
        "",
    ]
    return "\n".join(md)


def write_report(results: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    images = plots(results, out)
    path = out / "REPORT.md"
    path.write_text(render(results, images))
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("raw", type=Path)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    a = p.parse_args(argv)
    print(write_report(read_json(a.raw), a.out))


if __name__ == "__main__":
    main()
