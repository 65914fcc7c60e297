"""PyTorch eager (transformers' GPT-2 and LLaMA) on the benchmark shapes tfc bench
measures: W1 (GPT-2 small) and W2 (LLaMA-style 0.85B).

Random weights (the speed does not depend on them), batch 1, fp32 or bf16, the given
number of threads: prefill latency for a prompt, then decode tokens/s with the KV cache.
Prints one JSON object. Used by benches/peers.sh; needs torch and transformers.
"""
import argparse
import json
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


def build(shape):
    if shape == "w1":
        return GPT2LMHeadModel(GPT2Config())
    cfg = LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, intermediate_size=5632, vocab_size=32000,
                      max_position_embeddings=1024, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=["w1", "w2"], default="w1")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = build(a.shape).eval()
    if a.dtype == "bf16":
        model = model.to(torch.bfloat16)
    vocab = model.config.vocab_size
    tokens = torch.tensor([[(i * 31) % vocab for i in range(a.prompt)]])
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
        "peer": f"PyTorch {torch.__version__} eager {a.dtype}",
        "prefill_ms": {"median": statistics.median(pre), "min": min(pre), "max": max(pre)},
        "decode_tok_s": {"median": statistics.median(dec), "min": min(dec), "max": max(dec)},
    }))


if __name__ == "__main__":
    main()
