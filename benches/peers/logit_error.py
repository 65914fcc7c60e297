"""The logit error of an engine on a GGUF file, against transformers' f32 of the same
weights: transformers' GGUF loader dequantises every tensor to f32, so the reference
computes exactly what the file stores, with no rounding of its own beyond f32's.

    logit_error.py reference --gguf F --out ref.safetensors
        tokenises TEXT with the file's tokenizer (as transformers builds it from the GGUF)
        and writes the ids ("ids") and the logits of every position ("logits")
    logit_error.py llamacpp --gguf F --ids ref.safetensors --out lc.safetensors
        the logits llama.cpp computes for those ids, every position (one batch)
    logit_error.py compare ref.safetensors OTHER.safetensors
        prints one JSON object: the largest |difference| over every position and vocabulary
        entry, the largest |logit| of the reference (the scale), and at how many positions
        the top token agrees

Used by benches/q4.sh; needs torch, transformers, accelerate, gguf, safetensors (reference),
llama-cpp-python (llamacpp), numpy.
"""
import argparse
import json
import os

import numpy as np
from safetensors.numpy import load_file, save_file

TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes "
        "Gutenberg combined movable metal type, oil-based ink and a screw press. Within fifty "
        "years, presses in more than two hundred cities had printed millions of books, and "
        "the price of a copy fell so far that")


def only(path):
    """The one tensor of a file (tfc's --logits names it after the graph's output)."""
    t = load_file(path)
    return t["logits"] if "logits" in t else next(iter(t.values()))


def reference(a):
    import torch
    import transformers

    d, f = os.path.split(os.path.abspath(a.gguf))
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    ids = tok(TEXT)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy()
    save_file({"ids": np.array(ids, dtype=np.int32), "logits": np.ascontiguousarray(logits)}, a.out)


def llamacpp(a):
    from llamacpp import load

    ids = load_file(a.ids)["ids"].tolist()
    llm = load(a.gguf, n_ctx=len(ids) + 8, n_batch=len(ids), n_ubatch=len(ids), logits_all=True, n_threads=a.threads)
    llm.eval(ids)
    save_file({"logits": np.ascontiguousarray(np.array(llm.scores[: len(ids)], dtype=np.float32))}, a.out)


def compare(a):
    ref, other = only(a.reference), only(a.other)
    if ref.shape != other.shape:
        raise SystemExit(f"{a.other}: logits of shape {other.shape}, the reference's are {ref.shape}")
    top = int((ref.argmax(-1) == other.argmax(-1)).sum())
    print(json.dumps({"max_abs": float(np.abs(ref - other).max()), "scale": float(np.abs(ref).max()),
                      "top1": f"{top}/{ref.shape[0]}"}))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reference")
    r.add_argument("--gguf", required=True)
    r.add_argument("--out", required=True)
    l = sub.add_parser("llamacpp")
    l.add_argument("--gguf", required=True)
    l.add_argument("--ids", required=True)
    l.add_argument("--out", required=True)
    l.add_argument("--threads", type=int, default=2)
    c = sub.add_parser("compare")
    c.add_argument("reference")
    c.add_argument("other")
    a = ap.parse_args()
    {"reference": reference, "llamacpp": llamacpp, "compare": compare}[a.cmd](a)


if __name__ == "__main__":
    main()
