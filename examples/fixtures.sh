#!/usr/bin/env bash
# Imports each Hugging Face fixture's config.json to a spec, runs the checkpoint through
# the reference interpreter, and compares the greedy continuation with transformers'.
# Where transformers' cached decode differs from its full pass (`cached_equals_full`
# false: rope parameters chosen by the current length), the model is compiled for the
# original length and compared on the tokens transformers generated within it.
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
    read -r n max_seq < <(python3 - "$dir" <<'PY'
import json, sys
d = sys.argv[1]
f, c = json.load(open(d + "/fixture.json")), json.load(open(d + "/config.json"))
if f.get("cached_equals_full", True):
    print(len(f["greedy"]), "")
else:
    o = (c.get("original_max_position_embeddings")
         or (c.get("rope_parameters") or {}).get("original_max_position_embeddings")
         or c["max_position_embeddings"])
    print(o - len(f["prompt"]) + 1, o)
PY
)
    want=$(echo "$want" | cut -d, -f1-"$n")
    got=$($tfc run "$tmp/$arch.tfs" --weights "$dir" --tokens "$prompt" --generate "$n" ${max_seq:+--max-seq "$max_seq"})
    if [ "$got" = "$want" ]; then echo "$arch: same $n tokens as transformers"; else echo "$arch: DIFFERS: $got vs $want"; status=1; fi
done
exit $status
