#!/usr/bin/env bash
# Classify calls/s with one text per call on the torch CUDA backend, with 1 and with several
# front-end processes (`headrace serve --workers N`, SO_REUSEPORT on one port), as whole
# servers or as front ends of one engine process (`--engine-process`).
#
#   bench/gpu_workers.sh                                   # a tiny random classifier
#   MODELS=models MODEL=sentiment bench/gpu_workers.sh     # a real repository and model
#   RUNS="1:whole 2:whole 2:engine 4:engine 8:engine" LOADGENS=8 CONC=8 bench/gpu_workers.sh
#   PROFILE=cpu BACKEND=onnxruntime RUNS="1:whole 2:whole 2:engine" LOADGENS=2 CONC=32 \
#     bench/gpu_workers.sh                                 # the same run on a CPU box
#   TASK=generate STREAMS=64 bench/gpu_workers.sh          # GenerateStream (a tiny generator)
#
# Needs an NVIDIA GPU and a CUDA build of torch in the environment that runs it
# (DEVELOPERS.md, "GPU tests"), unless PROFILE=cpu.
#
# Each N:MODE: the server with --workers N, MODE whole (each worker its own CUDA context,
# model copy and batcher) or engine (one engine process owns the model and the batcher, N
# front ends reach it over a Unix socket), then LOADGENS load generator processes at once, CONC callers each (one gRPC
# connection per process: the kernel hands each connection to one worker, so use more
# processes than workers), DURATION seconds measured after a warm-up; then one caller
# alone for the latency. Prints one JSON line per N (calls/s summed over the processes,
# p50 of one caller) and writes them to $OUT/summary.jsonl.
#
# TASK=generate: the same layouts serve a generate model (a tiny random one unless MODELS
# and MODEL say); first the raw batched decode limit of its backend in-process
# (bench/limits.py, STREAMS slots), then per N:MODE: STREAMS GenerateStreams of 64 tokens at
# INTERVAL tokens per message (1: a message per token) from LOADGENS processes, tokens/s
# against that limit, and one stream alone for the time to first token.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
RUNS=${RUNS:-"1:whole 1:engine 2:whole 2:engine 4:whole 4:engine"}
LOADGENS=${LOADGENS:-8}
CONC=${CONC:-8}
DURATION=${DURATION:-15}
WARMUP=${WARMUP:-3}
OUT=${OUT:-/tmp/headrace-gpu-workers}
PROFILE=${PROFILE:-datacenter}  # PROFILE=cpu BACKEND=onnxruntime: the same run on a CPU box
BACKEND=${BACKEND:-torch}
TASK=${TASK:-classify}  # or generate
STREAMS=${STREAMS:-16}  # TASK=generate: concurrent streams over all load generators
INTERVAL=${INTERVAL:-1}  # TASK=generate: tokens per message
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [ "$PROFILE" = datacenter ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
fi
if [ -z "${MODELS:-}" ]; then
  MODELS=$WORK/models
  MODEL=tiny-$([ "$TASK" = generate ] && echo generator || echo classifier)
  "$PY" -c "
from pathlib import Path
from headrace.build import tiny
make = tiny.make_tiny_generator if '$MODEL' == 'tiny-generator' else tiny.make_tiny_classifier
make(Path('$MODELS') / '$MODEL' / '1')"
  if [ "$BACKEND" = onnxruntime ]; then
    "$PY" -c "
from pathlib import Path
from headrace.build.export import export_version
export_version(Path('$MODELS') / '$MODEL' / '1')"
  fi
fi
MODEL=${MODEL:?set MODEL to a $TASK model of \$MODELS}
: > "$OUT/summary.jsonl"
if [ "$TASK" = generate ]; then
  "$PY" -m bench.limits generate --model-dir "$MODELS/$MODEL" --profile "$PROFILE" \
    --batches "1,$STREAMS" --out "$OUT/decode-limit.json" > "$OUT/decode-limit.log"
  CONC=$(( (STREAMS + LOADGENS - 1) / LOADGENS ))
fi

for run in $RUNS; do
  n=${run%%:*}
  mode=${run#*:}
  engine=--no-engine-process
  [ "$mode" = engine ] && engine=--engine-process
  rm -f "$WORK/port"
  "$PY" -m headrace.server serve --models "$MODELS" --workers "$n" --profile "$PROFILE" \
    --backend "$BACKEND" $engine --port 0 --port-file "$WORK/port" --poll-interval 0 \
    --log-level warning 2> "$OUT/server-$n-$mode.log" &
  server=$!
  for _ in $(seq 600); do [ -s "$WORK/port" ] && break; sleep 0.5; done
  [ -s "$WORK/port" ] || { echo "server with --workers $n did not start"; kill $server; exit 1; }
  target=127.0.0.1:$(cat "$WORK/port")
  pids=()
  gen=()
  [ "$TASK" = generate ] && gen=(--new-tokens 64 --stream-interval "$INTERVAL")
  for i in $(seq "$LOADGENS"); do
    "$PY" -m bench.loadgen "$TASK" --target "$target" --model "$MODEL" --concurrency "$CONC" \
      "${gen[@]}" --duration "$DURATION" --warmup "$WARMUP" \
      --out "$OUT/load-$n-$mode-$i.json" > /dev/null &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  "$PY" -m bench.loadgen "$TASK" --target "$target" --model "$MODEL" --concurrency 1 \
    "${gen[@]}" --duration "$DURATION" --warmup "$WARMUP" --out "$OUT/one-$n-$mode.json" \
    > /dev/null
  kill -TERM $server
  wait $server || true
  "$PY" - "$OUT" "$n" "$LOADGENS" "$CONC" "$PROFILE" "$BACKEND" "$mode" "$TASK" <<'EOF' | tee -a "$OUT/summary.jsonl"
import json, sys
from pathlib import Path
out, n, loadgens, conc = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
mode, task = sys.argv[7], sys.argv[8]
points = [json.loads((out / f"load-{n}-{mode}-{i}.json").read_text())["points"][0]
          for i in range(1, loadgens + 1)]
one = json.loads((out / f"one-{n}-{mode}.json").read_text())["points"][0]
errors = {}
for p in points:
    for code, count in p["errors"].items():
        errors[code] = errors.get(code, 0) + count
row = {"workers": n, "mode": mode, "profile": sys.argv[5], "backend": sys.argv[6],
       "callers": loadgens * conc, "errors": errors}
if task == "generate":
    limit = json.loads((out / "decode-limit.json").read_text())
    raw = max(r["tokens_per_s"] for r in limit["by_batch"])
    tokens = sum(p["tokens_per_s"] for p in points)
    row.update(tokens_per_s=round(tokens, 1), raw_decode_tokens_per_s=round(raw, 1),
               share_of_raw=round(tokens / raw, 3),
               messages_per_s=round(sum(p["messages_per_s"] for p in points), 1),
               ttft_p50_ms=one["ttft_p50_ms"], itl_p50_ms=one["itl_p50_ms"],
               raw_prefill_ms=limit["by_batch"][0]["prefill_ms"])
else:
    row.update(calls_per_s=round(sum(p["throughput"] for p in points), 1),
               per_process_calls_per_s=[round(p["throughput"], 1) for p in points],
               one_caller_p50_ms=one["p50_ms"], one_caller_p99_ms=one["p99_ms"])
print(json.dumps(row))
EOF
done
# the IPC's own cost: round trips of an empty request to an engine process on this repository
"$PY" -m bench.ipc_roundtrip --models "$MODELS" --profile "$PROFILE" --backend "$BACKEND" \
  --out "$OUT/ipc.json" 2> "$OUT/ipc.log" | sed 's/^/{"ipc_roundtrip": /; s/$/}/' | tee -a "$OUT/summary.jsonl"
