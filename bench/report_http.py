"""The HTTP phase of REPORT.md: SSE (the HTTP front) vs gRPC, one server, same model, same run."""

from __future__ import annotations

from typing import Any

from bench.report import _generate_table, _point, _served_by


def http_targets(r: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    res = r.get("http_generate") or {}
    rows: list[tuple[str, str, str, bool | None]] = []
    g16, s16 = _point(res.get("grpc"), 16), _point(res.get("sse"), 16)
    if g16 and s16 and g16["tokens_per_s"]:
        ratio = s16["tokens_per_s"] / g16["tokens_per_s"]
        rows.append((
            "generate, 16 streams: SSE tokens/s / gRPC tokens/s",
            ">= 90%",
            f"{100 * ratio:.0f}% ({s16['tokens_per_s']:,.0f} vs {g16['tokens_per_s']:,.0f} tok/s)",
            ratio >= 0.9,
        ))  # fmt: skip
    g1, s1 = _point(res.get("grpc"), 1), _point(res.get("sse"), 1)
    if g1 and s1 and g1.get("ttft_p50_ms") is not None and s1.get("ttft_p50_ms") is not None:
        delta = s1["ttft_p50_ms"] - g1["ttft_p50_ms"]
        rows.append((
            "generate, 1 stream: TTFT p50 over SSE - over gRPC",
            "<= 1 ms",
            f"{delta:+.2f} ms ({s1['ttft_p50_ms']:.2f} vs {g1['ttft_p50_ms']:.2f} ms)",
            delta <= 1.0,
        ))  # fmt: skip
    return rows


def http_section(r: dict[str, Any]) -> list[str]:
    res = r.get("http_generate")
    if not res:
        return []
    return [
        "## Generate over HTTP (SSE) vs gRPC",
        "",
        f"One `headrace serve --http-port` process serving `{res.get('model', '?')}` "
        f"({_served_by(res)}) on both doors; the points alternate (gRPC 1, SSE 1, gRPC 16, "
        "SSE 16). gRPC: `bench.loadgen generate` (GenerateStream, as above). SSE: "
        "`bench.sse_loadgen` (`POST /v1/completions` with `stream: true`, greedy, `ignore_eos`, "
        "`return_token_ids`; raw asyncio keep-alive connections, one per caller, events parsed "
        "by orjson). Same prompts, same window, same figures.",
        "",
        _generate_table([("gRPC", res.get("grpc")), ("SSE", res.get("sse"))]),
        "",
        *[f"- {t}: {m} ({'pass' if ok else 'FAIL'})" for t, _, m, ok in http_targets(r)],
        "",
    ]
