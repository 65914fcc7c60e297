#!/usr/bin/env bash
# GPT-2 small (random weights, fp32, batch 1): tfc's compiled library against PyTorch
# eager on this machine, in one run, with the ratios. Installs torch and transformers into
# a virtual environment (target/peers-venv) on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-5}
threads=${THREADS:-2}
venv=target/peers-venv
if [ ! -x $venv/bin/python ] || ! $venv/bin/python -c "import torch, transformers" 2>/dev/null; then
    python3 -m venv $venv
    $venv/bin/pip install -q torch transformers
fi
cargo build --release --quiet --bin tfc
tfc_json=$(target/release/tfc bench specs/gpt2-small.tfs --runs "$runs" --threads "$threads" --json)
torch_json=$($venv/bin/python benches/peers/pytorch_gpt2.py --runs "$runs" --threads "$threads")
python3 - "$tfc_json" "$torch_json" <<'PY'
import json, sys
t, p = json.loads(sys.argv[1]), json.loads(sys.argv[2])
def row(name, r):
    pm, dm = r["prefill_ms"], r["decode_tok_s"]
    return f"| {name} | {pm['median']:.1f} ({pm['min']:.1f}–{pm['max']:.1f}) | {dm['median']:.2f} ({dm['min']:.2f}–{dm['max']:.2f}) |"
print(f"GPT-2 small, fp32, batch 1, prompt {t['prompt']}, {t['decode']} decoded tokens, median (min–max) of {t['runs']} runs")
print("| | prefill (ms) | decode (tok/s) |")
print("| --- | --- | --- |")
print(row("tfc (LLVM backend)", t))
print(row(p["peer"], p))
print(f"tfc / PyTorch: prefill time ×{t['prefill_ms']['median'] / p['prefill_ms']['median']:.2f}, "
      f"decode speed ×{t['decode_tok_s']['median'] / p['decode_tok_s']['median']:.2f}; tfc compiled in {t['compile_s']:.2f} s")
PY
