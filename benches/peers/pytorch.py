"""PyTorch eager (transformers' GPT-2 and LLaMA) on the benchmark shapes tfc bench
measures: W1 (GPT-2 small) and W2 (LLaMA-style 0.85B).

Random weights (the speed does not depend on them), batch 1, fp32 or bf16, the given
number of threads: prefill latency for a prompt, then decode tokens/s with the KV cache.
Prints one JSON object. Used by benches/peers.sh; needs torch and transformers.
"""
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from common import measure, parser, report


def build(shape):
    if shape == "w1":
        return GPT2LMHeadModel(GPT2Config())
    cfg = LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, intermediate_size=5632, vocab_size=32000,
                      max_position_embeddings=1024, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def main():
    ap = parser(["w1", "w2"])
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = build(a.shape).eval()
    if a.dtype == "bf16":
        model = model.to(torch.bfloat16)
    vocab = model.config.vocab_size
    tokens = torch.tensor([[(i * 31) % vocab for i in range(a.prompt)]])

    def run(ids, past):
        out = model(ids, past_key_values=past, use_cache=True)
        return out.logits[:, -1:].argmax(-1), out.past_key_values

    with torch.inference_mode():
        pre, dec = measure(a, lambda: run(tokens, None), lambda st, _: run(*st))
    report(f"PyTorch {torch.__version__} eager {a.dtype}", pre, dec)


if __name__ == "__main__":
    main()
