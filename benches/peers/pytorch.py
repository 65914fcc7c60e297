"""PyTorch eager (transformers' GPT-2 and LLaMA) on the benchmark shapes tfc bench
measures: W1 (GPT-2 small) and W2 (LLaMA-style 0.85B), loaded from the shape's Hugging
Face checkpoint (checkpoint.py).

Batch 1, fp32 or bf16 (the f32 checkpoint converted at load), the given number of
threads: prefill latency for a prompt, then decode tokens/s with the KV cache, greedy.
Prints one JSON object. Used by benches/peers.sh; needs torch and transformers.
"""
import torch
from transformers import AutoModelForCausalLM

from common import measure, parser, prompt, report


def main():
    ap = parser(["w1", "w2"])
    ap.add_argument("--checkpoint", required=True, help="the shape's Hugging Face checkpoint (checkpoint.py)")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    model = AutoModelForCausalLM.from_pretrained(a.checkpoint, dtype=dtype).eval()
    tokens = torch.tensor([prompt(a, model.config.vocab_size)])

    def run(ids, past):
        out = model(ids, past_key_values=past, use_cache=True)
        return out.logits[:, -1:].argmax(-1), out.past_key_values

    with torch.inference_mode():
        pre, dec, out = measure(a, lambda: run(tokens, None), lambda tok, past: run(tok, past))
    report(f"PyTorch {torch.__version__.split('+')[0]} eager {a.dtype}", pre, dec, [t.item() for t in out])


if __name__ == "__main__":
    main()
