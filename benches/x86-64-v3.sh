#!/usr/bin/env bash
# tfc built for x86-64-v3 (AVX2, FMA, F16C; no AVX-512: `--target-cpu x86-64-v3`) against
# llama.cpp built for the same level (GGML_NATIVE off; AVX, AVX2, FMA, F16C, BMI2 on;
# AVX-512 off), in one run on this machine: W1 (GPT-2 small) and W2 (LLaMA-style 0.85B),
# made from a seed as benches/peers.sh makes them, in f32 and Q8_0, and W2 in Q4_0. Each
# engine quantises the same f32 checkpoint (tfc `--dtype q8_0|q4_0` when it binds it;
# llama.cpp's converter for Q8_0 and its quantiser, every matrix, for Q4_0: the same
# blocks, as both follow ggml's reference rounding). Batch 1, the same 128-token prompt,
# 64 greedily decoded tokens, THREADS (default 2), median (min–max) of RUNS (default 5).
# llama.cpp (llama-cpp-python, the version benches/peers/setup.sh pins) is built into a
# virtual environment of its own, target/peers-venv-v3, on first use (several minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-5}
threads=${THREADS:-2}
seed=${SEED:-0}
source benches/peers/setup.sh
cargo build --release --quiet --bin tfc
v3=target/peers-venv-v3
if ! $v3/bin/python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$lcp')" 2>/dev/null; then
    [ -x $v3/bin/python ] || python3 -m venv $v3
    $v3/bin/pip install -q numpy diskcache jinja2 typing-extensions
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
-DGGML_AVX512=OFF -DLLAVA_BUILD=OFF" $v3/bin/pip install -q --force-reinstall --no-deps "$sdist"
fi
# llama.cpp's quantiser (the same build): IN OUT FTYPE, every matrix (pure); ftype 2 is Q4_0.
quantise() {
    [ -f "$2" ] && [ "$2" -nt "$1" ] && return
    $v3/bin/python - "$@" <<'PY'
import sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype, p.pure, p.nthread = int(sys.argv[3]), True, 2
assert llama_cpp.llama_model_quantize(sys.argv[1].encode(), (sys.argv[2] + ".part").encode(), p) == 0
PY
    mv "$2.part" "$2"
}
model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
echo "host: $model, $(nproc) cores; both engines built for x86-64-v3"
echo "run: $(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo "| shape | format | tfc prefill (ms), decode (tok/s) | llama.cpp prefill (ms), decode (tok/s) | tfc / llama.cpp |"
echo "| --- | --- | --- | --- | --- |"
for shape in w1 w2; do
    case $shape in
    w1) spec=specs/gpt2-small.tfs ;;
    w2) spec=specs/llama-0.85b.tfs ;;
    esac
    ck=$work/$shape-seed$seed
    (cd benches/peers && ../../$py checkpoint.py --shape $shape --seed "$seed" \
        --vocab-dir ../../$llama/models --out ../../$ck)
    for d in f32 q8_0; do convert "$ck" $d; done
    rows="f32 q8_0"
    if [ $shape = w2 ]; then
        quantise $ck-f32.gguf $ck-q4_0-pure.gguf 2
        rows="$rows q4_0"
    fi
    for d in $rows; do
        case $d in
        f32) file=$ck-f32.gguf dtype=() ;;
        q8_0) file=$ck-q8_0.gguf dtype=(--dtype q8_0) ;;
        q4_0) file=$ck-q4_0-pure.gguf dtype=(--dtype q4_0) ;;
        esac
        t=$(target/release/tfc bench $spec --weights "$ck" "${dtype[@]}" --target-cpu x86-64-v3 \
            --runs "$runs" --threads "$threads" --json | tr -d '\n')
        l=$(cd benches/peers && ../../$v3/bin/python llamacpp.py --shape $shape --gguf "../../$file" --dtype $d \
            --runs "$runs" --threads "$threads" 2>/dev/null | tail -n 1)
        python3 - "$shape" "$d" "$t" "$l" <<'PY'
import json, sys
s, d = sys.argv[1:3]
t, l = json.loads(sys.argv[3]), json.loads(sys.argv[4])
cell = lambda m, k: f"{m[k]['median']:.1f} ({m[k]['min']:.1f}–{m[k]['max']:.1f})"
pre = l["prefill_ms"]["median"] / t["prefill_ms"]["median"]
dec = t["decode_tok_s"]["median"] / l["decode_tok_s"]["median"]
print(f"| {s.upper()} | {d} | {cell(t, 'prefill_ms')}, {cell(t, 'decode_tok_s')} "
      f"| {cell(l, 'prefill_ms')}, {cell(l, 'decode_tok_s')} | prefill ×{pre:.2f}, decode ×{dec:.2f} |")
PY
    done
done
