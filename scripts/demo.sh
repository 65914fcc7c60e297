#!/usr/bin/env bash
# The main job on a shipped default: check a spec, print its IR at each stage, and run it
# through the reference interpreter on a real (tiny) Hugging Face GPT-2 checkpoint.
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
echo "--- 12 tokens after the prompt, greedy, through the KV cache ---"
$tfc run $spec --weights $weights --tokens $prompt --generate 12
echo "--- transformers generated (tests/fixtures/hf/gpt2/fixture.json) ---"
python3 -c "import json; print(','.join(map(str, json.load(open('$weights/fixture.json'))['greedy'])))"
