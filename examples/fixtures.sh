#!/usr/bin/env bash
# Imports each Hugging Face fixture's config.json to a spec, runs the checkpoint through
# the reference interpreter, and compares the greedy continuation with transformers'.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --bin tfc
tfc=target/debug/tfc
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
status=0
for dir in tests/fixtures/hf/*/; do
    arch=$(basename "$dir")
    $tfc import-hf "$dir" -o "$tmp/$arch.tfs"
    prompt=$(python3 -c "import json; print(','.join(map(str, json.load(open('$dir/fixture.json'))['prompt'])))")
    want=$(python3 -c "import json; print(','.join(map(str, json.load(open('$dir/fixture.json')).get('greedy', []))))")
    if [ -z "$want" ]; then
        $tfc run "$tmp/$arch.tfs" --weights "$dir" --tokens "$prompt" --logits "$tmp/$arch.json" >/dev/null
        echo "$arch: encoder, hidden states written"
        continue
    fi
    got=$($tfc run "$tmp/$arch.tfs" --weights "$dir" --tokens "$prompt" --generate 12)
    if [ "$got" = "$want" ]; then echo "$arch: same 12 tokens as transformers"; else echo "$arch: DIFFERS: $got vs $want"; status=1; fi
done
exit $status
