"""PyTorch eager on the same GPT-2-small-shaped model tfc bench measures.

Random weights (the speed does not depend on them), batch 1, fp32, the given number of
threads: prefill latency for a prompt, then decode tokens/s with the KV cache.
Prints one JSON object. Used by benches/gpt2_small.sh; needs torch and transformers.
"""
import argparse
import json
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval()
    tokens = torch.tensor([[(i * 31) % 50257 for i in range(a.prompt)]])
    pre, dec = [], []
    with torch.inference_mode():
        for run in range(a.runs + 1):
            t = time.perf_counter()
            out = model(tokens, use_cache=True)
            p = time.perf_counter() - t
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for _ in range(a.decode):
                out = model(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            d = time.perf_counter() - t
            if run > 0:
                pre.append(p * 1e3)
                dec.append(a.decode / d)
    print(json.dumps({
        "peer": f"PyTorch {torch.__version__} eager",
        "prefill_ms": {"median": statistics.median(pre), "min": min(pre), "max": max(pre)},
        "decode_tok_s": {"median": statistics.median(dec), "min": min(dec), "max": max(dec)},
    }))


if __name__ == "__main__":
    main()
