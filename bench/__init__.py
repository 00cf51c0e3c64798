"""`make bench`: headrace under load against the raw backend limit and against peer servers.

    python -m bench.run --models models --out bench/results

Modules: `limits` (in-process backend throughput), `loadgen` (the asyncio gRPC load
generator, its own process), `servers` (starting and watching the servers under test),
`naive_server` (a plain transformers streaming server), `mlserver_peer` (Seldon MLServer
settings), `report` (REPORT.md and the plots).
"""
