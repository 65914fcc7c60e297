#!/usr/bin/env bash
# GPT-2 small (random weights, batch 1, 128-token prompt, 64 decoded tokens): tfc's compiled
# library in f32, bf16 and q8 against PyTorch eager (f32) and llama.cpp (F32, F16, Q8_0) on
# this machine, in one run, with the ratios. Installs torch, transformers and
# llama-cpp-python (built for this CPU: GGML_NATIVE) into a virtual environment
# (target/peers-venv) on first use; the llama.cpp build takes several minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-5}
threads=${THREADS:-2}
venv=target/peers-venv
if [ ! -x $venv/bin/python ] || ! $venv/bin/python -c "import torch, transformers, llama_cpp, gguf" 2>/dev/null; then
    python3 -m venv $venv
    $venv/bin/pip install -q torch transformers gguf
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" $venv/bin/pip install -q llama-cpp-python
fi
cargo build --release --quiet --bin tfc
tfc() { target/release/tfc bench specs/gpt2-small.tfs --runs "$runs" --threads "$threads" --json "$@" | tr -d "\n"; }
results=$(
    echo "tfc f32 (LLVM backend)	$(tfc)"
    echo "tfc bf16	$(tfc --dtype bf16)"
    echo "tfc q8	$(tfc --dtype q8)"
    echo "PyTorch	$($venv/bin/python benches/peers/pytorch_gpt2.py --runs "$runs" --threads "$threads")"
    for d in f32 f16 q8_0; do
        echo "llama.cpp $d	$($venv/bin/python benches/peers/llamacpp_gpt2.py --dtype $d --runs "$runs" --threads "$threads")"
    done
)
python3 - "$results" "$runs" <<'PY'
import json, sys
rows = dict(line.split("\t", 1) for line in sys.argv[1].splitlines())
rows = {k: json.loads(v) for k, v in rows.items()}
def cell(r, k, digits):
    m = r[k]
    return f"{m['median']:.{digits}f} ({m['min']:.{digits}f}–{m['max']:.{digits}f})"
print(f"GPT-2 small, batch 1, prompt 128, 64 decoded tokens, median (min–max) of {sys.argv[2]} runs")
print("| | prefill (ms) | decode (tok/s) |")
print("| --- | --- | --- |")
for name, r in rows.items():
    label = r.get("peer", name) if not name.startswith("tfc") else name
    print(f"| {label} | {cell(r, 'prefill_ms', 1)} | {cell(r, 'decode_tok_s', 2)} |")
pairs = [("tfc f32 (LLVM backend)", "PyTorch"), ("tfc f32 (LLVM backend)", "llama.cpp f32"),
         ("tfc bf16", "llama.cpp f16"), ("tfc q8", "llama.cpp q8_0")]
for a, b in pairs:
    ra, rb = rows[a], rows[b]
    print(f"{a} / {b}: prefill time ×{ra['prefill_ms']['median'] / rb['prefill_ms']['median']:.2f}, "
          f"decode speed ×{ra['decode_tok_s']['median'] / rb['decode_tok_s']['median']:.2f}")
print(f"tfc compiled GPT-2 small in {rows['tfc f32 (LLVM backend)']['compile_s']:.2f} s")
PY
