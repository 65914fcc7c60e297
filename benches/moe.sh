#!/usr/bin/env bash
# Mixtures of experts, tfc against llama.cpp on the same GGUF files, in one run: a
# Mixtral-shaped model (8 experts of 3584 at d_model 1024, top-2, 8 layers), a
# Qwen3-MoE-shaped one (32 experts of 512, top-4, normalised, q/k norms, head_dim 128, 8
# layers) and a DeepSeek-V2-shaped one (latent attention of rank 256, a dense first
# layer, then 32 experts of 512, top-4, 2 shared; 8 layers), each made from a seed as a
# Hugging Face checkpoint (benches/peers/checkpoint.py) and converted by llama.cpp's
# convert_hf_to_gguf.py to F32 and Q8_0; tfc imports the GGUF
# (`tfc import-gguf`) and binds its matrices as stored, so both engines read the same
# weights. Batch 1, a 128-token prompt, 64 greedy tokens, THREADS (default 2), median
# (min–max) of RUNS (default 5), the SHAPES given (default all three); the bytes tfc
# reads per decode step (attention, routers and the top-k experts' share of the expert
# tensors) and the GB/s that makes. Set-up as benches/peers.sh (target/peers-venv).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-5}
threads=${THREADS:-2}
seed=${SEED:-0}
source benches/peers/setup.sh
cargo build --release --quiet --bin tfc
host_line
echo "| model | format | tfc | llama.cpp | tfc / llama.cpp | tfc reads a step |"
echo "| --- | --- | --- | --- | --- | --- |"
for shape in ${SHAPES:-mixtral qwen3moe deepseek}; do
    ck=$work/$shape-seed$seed
    (cd benches/peers && ../../$py checkpoint.py --shape $shape --seed "$seed" --vocab-dir ../../$llama/models --out ../../$ck)
    for dtype in f32 q8_0; do
        convert "$ck" $dtype
        file=$(realpath "$ck-$dtype.gguf")
        spec=$work/$shape-$dtype.tfs
        target/release/tfc import-gguf "$file" >$spec
        t=$(target/release/tfc bench $spec --weights "$file" --max-seq 256 --runs "$runs" --threads "$threads" \
            --json | tr -d '\n')
        l=$(cd benches/peers && ../../$py llamacpp.py --shape $shape --gguf "$file" --dtype $dtype \
            --runs "$runs" --threads "$threads" 2>/dev/null | tail -n 1)
        python3 - "$shape" "$dtype" "$t" "$l" <<'PY'
import json, sys
m, d = sys.argv[1:3]
t, l = (json.loads(x) for x in sys.argv[3:5])
cell = lambda m, k: f"{m[k]['median']:.1f} ({m[k]['min']:.1f}–{m[k]['max']:.1f})"
pre = l["prefill_ms"]["median"] / t["prefill_ms"]["median"]
dec = t["decode_tok_s"]["median"] / l["decode_tok_s"]["median"]
print(f"| {m} | {d} | {cell(t, 'prefill_ms')} ms, {cell(t, 'decode_tok_s')} tok/s "
      f"| {cell(l, 'prefill_ms')} ms, {cell(l, 'decode_tok_s')} tok/s "
      f"| prefill ×{pre:.2f}, decode ×{dec:.2f} | {t['decode_bytes_per_token'] / 1e6:.1f} MB, "
      f"{t['decode_weight_gb_s']:.1f} GB/s |")
PY
    done
done
