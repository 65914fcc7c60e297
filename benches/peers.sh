#!/usr/bin/env bash
# tfc against the runtimes a user would otherwise pick, in one run on this machine: W1
# (GPT-2 small) and W2 (LLaMA-style 0.85B: d 2048, 16 layers, 32 heads / 8 kv heads, ffn
# 5632, vocab 32000), each made from a seed as a Hugging Face checkpoint
# (peers/checkpoint.py) that every engine runs: tfc's compiled library in f32, bf16 (with
# f32 or, like PyTorch's bf16 models, bf16-rounded activations) and q8, bound to the
# checkpoint; PyTorch eager (f32 and bf16) loading it with transformers; ONNX Runtime (f32)
# with its weights; llama.cpp (F32, F16, Q8_0) on the GGUF files llama.cpp's own
# convert_hf_to_gguf.py makes of it. Batch 1, the same 128-token prompt, then 64 greedily
# decoded tokens. Prints one table per shape with the medians (min–max), how many of the
# 65 generated tokens agree with PyTorch f32's, the ratios against the peers measured in
# this same run, and what the host streamed and computed before and after (host.c), under
# a header naming the CPU model, its kernel-relevant features, the date and the commit.
#
# SHAPES="w1" (default "w1 w2"), RUNS (default 5), THREADS (default 2), SEED (default 0).
# Installs the versions pinned in peers/requirements.txt (torch, transformers, onnxruntime,
# ...) and llama-cpp-python (LLAMA_CPP_PYTHON, default 0.3.36, built from its source for
# this CPU: GGML_NATIVE) into a virtual environment (target/peers-venv); the llama.cpp
# build, on first use, takes several minutes. The checkpoints and GGUF files stay in
# target/peers (W2's take ~9.5 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-5}
threads=${THREADS:-2}
shapes=${SHAPES:-w1 w2}
seed=${SEED:-0}
source benches/peers/setup.sh
cargo build --release --quiet --bin tfc
cc -O2 -mavx512f -mfma -pthread benches/peers/host.c -o $work/host
common=(--runs "$runs" --threads "$threads")
# Which host the tables below come from: the README keeps one table per host kind.
model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
flags=$(sed -n 's/^flags[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
isa=$(for f in avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8; do
    if [[ " $flags " == *" $f "* ]]; then printf '%s ' $f; fi
done)
echo "host: $model, $(nproc) cores; $isa"
echo "run: $(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
for shape in $shapes; do
    case $shape in
    w1) spec=specs/gpt2-small.tfs ;;
    w2) spec=specs/llama-0.85b.tfs ;;
    *) echo "unknown shape $shape (w1 or w2)" >&2 && exit 2 ;;
    esac
    ck=$work/$shape-seed$seed
    (cd benches/peers && ../../$py checkpoint.py --shape $shape --seed "$seed" \
        --vocab-dir ../../$llama/models --out ../../$ck)
    for d in f32 f16 q8_0; do convert "$ck" $d; done
    tfc() { target/release/tfc bench $spec --weights "$ck" "${common[@]}" --json "$@" | tr -d "\n"; }
    log=$work/$shape.log
    : >"$log"
    peer() { (cd benches/peers && ../../$py "$@" --shape $shape "${common[@]}" 2>>"../../$log" | tail -n 1); }
    before=$($work/host "$threads")
    results=$(
        echo "tfc f32	$(tfc)"
        echo "tfc bf16	$(tfc --dtype bf16)"
        echo "tfc bf16, bf16 activations	$(tfc --dtype bf16 --activations bf16)"
        echo "tfc q8	$(tfc --dtype q8)"
        for d in f32 bf16; do
            echo "PyTorch $d	$(peer pytorch.py --checkpoint "../../$ck" --dtype $d)"
        done
        echo "ONNX Runtime f32	$(peer ort_decoder.py --checkpoint "../../$ck")"
        for d in f32 f16 q8_0; do
            echo "llama.cpp $d	$(peer llamacpp.py --gguf "../../$ck-$d.gguf" --dtype $d)"
        done
    )
    after=$($work/host "$threads")
    python3 - "$results" "$runs" "$shape" "$threads" "$log" "$before" "$after" <<'PY'
import json, sys
runs, shape, threads, log = sys.argv[2:6]
host = [json.loads(h) for h in sys.argv[6:8]]
rows = {}
for line in sys.argv[1].splitlines():
    key, out = line.split("\t", 1)
    try:
        rows[key] = json.loads(out)
    except json.JSONDecodeError:
        sys.exit(f"{key} printed no result (its errors are in {log}): {out!r}")
def cell(r, k, digits):
    m = r[k]
    return f"{m['median']:.{digits}f} ({m['min']:.{digits}f}–{m['max']:.{digits}f})"
name = {"w1": "W1 GPT-2 small", "w2": "W2 LLaMA-style 0.85B"}[shape]
# How many of the generated tokens agree with PyTorch f32's before the first that does not.
ref = rows["PyTorch f32"]["tokens"]
def agree(r):
    n = next((i for i, (x, y) in enumerate(zip(r["tokens"], ref)) if x != y), min(len(r["tokens"]), len(ref)))
    return f"{n}/{len(ref)}"
print(f"\n{name}: batch 1, prompt 128, 64 decoded tokens, {threads} threads, median (min–max) of {runs} runs")
print("| | prefill (ms) | decode (tok/s) | greedy tokens as PyTorch f32's |")
print("| --- | --- | --- | --- |")
for key, r in rows.items():
    label = key if key.startswith("tfc") else r["peer"]
    print(f"| {label} | {cell(r, 'prefill_ms', 1)} | {cell(r, 'decode_tok_s', 2)} | {agree(r)} |")
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
print("the host, before and after (benches/peers/host.c): streaming reads "
      f"{host[0]['stream_gb_s']} and {host[1]['stream_gb_s']} GB/s, "
      f"f32 FMAs {host[0]['fma_gflop_s']} and {host[1]['fma_gflop_s']} GFLOP/s")
PY
done
