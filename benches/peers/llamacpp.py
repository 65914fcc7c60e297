"""llama.cpp (through llama-cpp-python) on the benchmark shapes tfc bench measures, W1
(GPT-2 small) and W2 (LLaMA-style 0.85B): random weights written straight to a GGUF file
(F32, F16 or Q8_0 matrices, as convert_hf_to_gguf.py would lay them out), batch 1, the
given number of threads; prefill latency for a prompt, then decode tokens/s with the KV
cache.

No tokenizer is involved (token ids go in directly), so the GGUF carries a placeholder
vocabulary: the 256 byte-level symbols GPT-2's BPE starts from, then numbered tokens.
Prints one JSON object. Used by benches/peers.sh; needs llama-cpp-python, gguf, numpy.
"""
import os
import tempfile

import gguf
import numpy as np

from common import measure, parser, report


def byte_symbols():
    """GPT-2's byte → printable-character table (bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


SHAPES = {
    # name: (arch, d, layers, heads, kv_heads, ffn, vocab)
    "w1": ("gpt2", 768, 12, 12, 12, 3072, 50257),
    "w2": ("llama", 2048, 16, 32, 8, 5632, 32000),
}


def write_gguf(path, dtype, shape, ctx=1024, seed=0):
    arch, d, layers, heads, kv, ff, vocab = SHAPES[shape]
    hd = d // heads
    rng = np.random.default_rng(seed)
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(ctx)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_block_count(layers)
    w.add_head_count(heads)
    if arch == "gpt2":
        w.add_layer_norm_eps(1e-5)
    else:
        w.add_head_count_kv(kv)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_rope_dimension_count(hd)
        w.add_rope_freq_base(10000.0)
    w.add_file_type({"f32": 0, "f16": 1, "q8_0": 7}[dtype])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    tokens = byte_symbols() + [f"<t{i}>" for i in range(256, vocab)]
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * vocab)
    w.add_token_merges(["Ġ t"])  # one rule: the loader wants the list to exist
    w.add_bos_token_id(vocab - 1)
    w.add_eos_token_id(vocab - 1)

    def matrix(name, rows, cols):
        data = (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float32)
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, data)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    def vector(name, n, value):
        w.add_tensor(name, np.full(n, value, dtype=np.float32))

    def norm(name):
        vector(f"{name}.weight", d, 1.0)
        if arch == "gpt2":
            vector(f"{name}.bias", d, 0.0)

    matrix("token_embd.weight", vocab, d)
    if arch == "gpt2":
        matrix("position_embd.weight", ctx, d)
    for i in range(layers):
        b = f"blk.{i}"
        norm(f"{b}.attn_norm")
        norm(f"{b}.ffn_norm")
        if arch == "gpt2":
            matrix(f"{b}.attn_qkv.weight", 3 * d, d)
            vector(f"{b}.attn_qkv.bias", 3 * d, 0.0)
            matrix(f"{b}.attn_output.weight", d, d)
            vector(f"{b}.attn_output.bias", d, 0.0)
            matrix(f"{b}.ffn_up.weight", ff, d)
            vector(f"{b}.ffn_up.bias", ff, 0.0)
            matrix(f"{b}.ffn_down.weight", d, ff)
            vector(f"{b}.ffn_down.bias", d, 0.0)
        else:
            matrix(f"{b}.attn_q.weight", d, d)
            matrix(f"{b}.attn_k.weight", kv * hd, d)
            matrix(f"{b}.attn_v.weight", kv * hd, d)
            matrix(f"{b}.attn_output.weight", d, d)
            matrix(f"{b}.ffn_gate.weight", ff, d)
            matrix(f"{b}.ffn_up.weight", ff, d)
            matrix(f"{b}.ffn_down.weight", d, ff)
    norm("output_norm")
    if arch == "llama":
        matrix("output.weight", vocab, d)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    ap = parser(SHAPES)
    ap.add_argument("--dtype", choices=["f32", "f16", "q8_0"], default="f32")
    a = ap.parse_args()
    import llama_cpp
    from llama_cpp import Llama

    # No "extra" buffer types (llama-bench's --repack 0): with them, weights are repacked
    # for AMX where the CPU has it, and Q8_0 then dies with an illegal instruction.
    # `Llama` reads its defaults from the inner module.
    import llama_cpp.llama_cpp as c_api

    defaults = c_api.llama_model_default_params

    def without_repacking():
        p = defaults()
        p.use_extra_bufts = False
        return p

    c_api.llama_model_default_params = without_repacking

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{a.shape}-{a.dtype}.gguf")
        write_gguf(path, a.dtype, a.shape)
        vocab = SHAPES[a.shape][-1]
        kwargs = dict(model_path=path, n_ctx=a.prompt + a.decode + 8, n_batch=a.prompt, n_ubatch=a.prompt,
                      n_threads=a.threads, n_threads_batch=a.threads, verbose=bool(os.environ.get("VERBOSE")))
        llm = Llama(**kwargs)
        tokens = [(i * 31) % vocab for i in range(a.prompt)]

        def reset():
            llm.reset()
            llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None

        pre, dec = measure(a, lambda: llm.eval(tokens), lambda _, i: llm.eval([(i * 17 + 5) % vocab]), reset)
        report(f"llama.cpp {a.dtype.upper()} (llama-cpp-python {llama_cpp.__version__})", pre, dec)


if __name__ == "__main__":
    main()
