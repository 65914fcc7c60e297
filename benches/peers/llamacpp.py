"""llama.cpp (through llama-cpp-python) on the benchmark shapes tfc bench measures, W1
(GPT-2 small) and W2 (LLaMA-style 0.85B): the GGUF file that llama.cpp's own
`convert_hf_to_gguf.py` made of the shape's Hugging Face checkpoint (F32, F16 or Q8_0
matrices; benches/peers.sh converts it), batch 1, the given number of threads; prefill
latency for a prompt, then decode tokens/s with the KV cache, greedy.

Token ids go in directly, as for every engine. Prints one JSON object. Used by
benches/peers.sh; needs llama-cpp-python and numpy.
"""
import os

import numpy as np

from common import measure, parser, prompt, report


def load(path, **kw):
    """llama.cpp's model through llama-cpp-python, without "extra" buffer types
    (llama-bench's --repack 0): with them, weights are repacked for AMX where the CPU has
    it, and Q8_0 then dies with an illegal instruction."""
    # `Llama` reads its defaults from the inner module.
    import llama_cpp.llama_cpp as c_api
    from llama_cpp import Llama

    defaults = c_api.llama_model_default_params

    def without_repacking():
        p = defaults()
        p.use_extra_bufts = False
        return p

    c_api.llama_model_default_params = without_repacking
    return Llama(model_path=path, verbose=bool(os.environ.get("VERBOSE")), **kw)


def main():
    ap = parser(["w1", "w2", "smollm2", "mixtral", "qwen3moe", "deepseek"])
    ap.add_argument("--gguf", required=True, help="the shape's checkpoint as converted by convert_hf_to_gguf.py")
    ap.add_argument("--dtype", choices=["f32", "f16", "q8_0", "q4_0", "q4_1", "q4_k", "q4_k_m"], required=True, help="the GGUF's matrix type")
    a = ap.parse_args()
    import llama_cpp

    llm = load(a.gguf, n_ctx=a.prompt + a.decode + 8, n_batch=a.prompt, n_ubatch=a.prompt, n_threads=a.threads,
               n_threads_batch=a.threads)
    vocab = llm.n_vocab()

    def run(tokens):
        # The logits of the batch's last token (the only row a batch computes without
        # logits_all), the greedy choice.
        llm.eval(tokens)
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))
        return int(logits.argmax()), None

    def reset():
        llm.reset()
        llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None

    pre, dec, out = measure(a, lambda: run(prompt(a, vocab)), lambda tok, _: run([tok]), reset)
    report(f"llama.cpp {a.dtype.upper()} (llama-cpp-python {llama_cpp.__version__})", pre, dec, out)


if __name__ == "__main__":
    main()
