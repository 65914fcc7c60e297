#!/usr/bin/env bash
# tfc against the runtimes a user would otherwise pick, in one run on this machine: W1
# (GPT-2 small) and W2 (LLaMA-style 0.85B: d 2048, 16 layers, 32 heads / 8 kv heads, ffn
# 5632, vocab 32000), random weights from a fixed seed, batch 1, a 128-token prompt, then
# 64 decoded tokens. tfc's compiled library in f32, bf16 (with f32 or, like PyTorch's
# bf16 models, bf16-rounded activations) and q8; PyTorch eager (f32 and
# bf16); ONNX Runtime (f32); llama.cpp (F32, F16, Q8_0). Prints one table per shape with
# the medians (min–max) and the ratios against the peers measured in this same run.
#
# SHAPES="w1" (default "w1 w2"), RUNS (default 5), THREADS (default 2). Installs torch,
# transformers, onnx, onnxruntime and llama-cpp-python (built for this CPU: GGML_NATIVE)
# into a virtual environment (target/peers-venv) on first use; the llama.cpp build takes
# several minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-5}
threads=${THREADS:-2}
shapes=${SHAPES:-w1 w2}
venv=target/peers-venv
if [ ! -x $venv/bin/python ] ||
    ! $venv/bin/python -c "import torch, transformers, llama_cpp, gguf, onnx, onnxscript, onnxruntime" 2>/dev/null; then
    python3 -m venv $venv
    $venv/bin/pip install -q torch transformers gguf onnx onnxscript onnxruntime
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" $venv/bin/pip install -q llama-cpp-python
fi
cargo build --release --quiet --bin tfc
py=$venv/bin/python
common=(--runs "$runs" --threads "$threads")
for shape in $shapes; do
    case $shape in
    w1) spec=specs/gpt2-small.tfs ;;
    w2) spec=specs/llama-0.85b.tfs ;;
    *) echo "unknown shape $shape (w1 or w2)" >&2 && exit 2 ;;
    esac
    tfc() { target/release/tfc bench $spec "${common[@]}" --json "$@" | tr -d "\n"; }
    results=$(
        echo "tfc f32	$(tfc)"
        echo "tfc bf16	$(tfc --dtype bf16)"
        echo "tfc bf16, bf16 activations	$(tfc --dtype bf16 --activations bf16)"
        echo "tfc q8	$(tfc --dtype q8)"
        for d in f32 bf16; do
            echo "PyTorch $d	$($py benches/peers/pytorch.py --shape $shape --dtype $d "${common[@]}")"
        done
        echo "ONNX Runtime f32	$($py benches/peers/ort_decoder.py --shape $shape "${common[@]}")"
        for d in f32 f16 q8_0; do
            echo "llama.cpp $d	$($py benches/peers/llamacpp.py --shape $shape --dtype $d "${common[@]}")"
        done
    )
    python3 - "$results" "$runs" "$shape" "$threads" <<'PY'
import json, sys
rows = {k: json.loads(v) for k, v in (line.split("\t", 1) for line in sys.argv[1].splitlines())}
runs, shape, threads = sys.argv[2], sys.argv[3], sys.argv[4]
def cell(r, k, digits):
    m = r[k]
    return f"{m['median']:.{digits}f} ({m['min']:.{digits}f}–{m['max']:.{digits}f})"
name = {"w1": "W1 GPT-2 small", "w2": "W2 LLaMA-style 0.85B"}[shape]
print(f"\n{name}: batch 1, prompt 128, 64 decoded tokens, {threads} threads, median (min–max) of {runs} runs")
print("| | prefill (ms) | decode (tok/s) |")
print("| --- | --- | --- |")
for key, r in rows.items():
    label = key if key.startswith("tfc") else r["peer"]
    print(f"| {label} | {cell(r, 'prefill_ms', 1)} | {cell(r, 'decode_tok_s', 2)} |")
pairs = [("tfc f32", "PyTorch f32"), ("tfc f32", "ONNX Runtime f32"), ("tfc f32", "llama.cpp f32"),
         ("tfc bf16", "PyTorch bf16"), ("tfc bf16", "llama.cpp f16"),
         ("tfc bf16, bf16 activations", "PyTorch bf16"), ("tfc bf16, bf16 activations", "llama.cpp f16"),
         ("tfc q8", "llama.cpp q8_0")]
print("\n| tfc / peer | prefill speed | decode speed |")
print("| --- | --- | --- |")
for a, b in pairs:
    ra, rb = rows[a], rows[b]
    pre = rb["prefill_ms"]["median"] / ra["prefill_ms"]["median"]
    dec = ra["decode_tok_s"]["median"] / rb["decode_tok_s"]["median"]
    print(f"| {a} / {b} | ×{pre:.2f} | ×{dec:.2f} |")
print(f"\ntfc compiled {name} in {rows['tfc f32']['compile_s']:.2f} s")
PY
done
