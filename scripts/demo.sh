#!/usr/bin/env bash
# The main job on a shipped default: check a spec, print its decode graph, compile it to a
# shared library and generate with it on a real (tiny) Hugging Face GPT-2 checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
tfc_setup
cargo build --quiet --bin tfc
tfc=target/debug/tfc
spec=specs/tiny/gpt2.tfs
weights=tests/fixtures/hf/gpt2
prompt=188,354,68,81,173,71,249,323,49,60,366,134

$tfc check $spec
echo "--- decode graph (tfc ir $spec --stage decode) ---"
$tfc ir $spec --stage decode
echo "--- tfc compile $spec -o target/demo ---"
$tfc compile $spec -o target/demo
echo "--- 12 tokens after the prompt, greedy, through the library's KV cache ---"
$tfc run $spec --weights $weights --tokens $prompt --generate 12
echo "--- the same with the reference interpreter ---"
$tfc run $spec --weights $weights --tokens $prompt --generate 12 --backend interp
echo "--- transformers generated (tests/fixtures/hf/gpt2/fixture.json) ---"
python3 -c "import json; print(','.join(map(str, json.load(open('$weights/fixture.json'))['greedy'])))"
