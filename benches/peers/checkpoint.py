"""Makes the benchmark shapes as Hugging Face checkpoints from a seed: W1 (GPT-2 small,
`GPT2LMHeadModel` with transformers' defaults) and W2 (LLaMA-style 0.85B,
`LlamaForCausalLM`), initialised by transformers under `torch.manual_seed(seed)` and
saved with `save_pretrained` (config.json, model.safetensors), as a user downloads one.

Each gets its architecture's real tokenizer, so that llama.cpp's `convert_hf_to_gguf.py`
converts the folder as it is: GPT-2's byte-level BPE (vocab.json, merges.txt) or LLaMA's
SentencePiece model (tokenizer.model), both rebuilt from the vocabulary files llama.cpp
ships for its tokenizer tests (`models/ggml-vocab-gpt-2.gguf`,
`models/ggml-vocab-llama-spm.gguf` in its source tree, given as --vocab-dir). No
engine tokenises anything in the benchmark; the tokenizer is there for the converter.

Does nothing if the folder already holds the checkpoint of this shape and seed.
Used by benches/peers.sh; needs torch, transformers, gguf, sentencepiece, protobuf.
"""
import argparse
import json
import os

import gguf
import torch
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2TokenizerFast, LlamaConfig,
                          MixtralConfig, Qwen3MoeConfig)


def config(shape):
    if shape == "w1":
        # GPT-2 small; `n_ctx` is what llama.cpp's GPT-2 converter reads as the context.
        return GPT2Config(n_ctx=1024)
    if shape == "mixtral":
        # Mixtral's shape scaled to fit: 8 experts of 3584 at d_model 1024, top-2.
        return MixtralConfig(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                             num_key_value_heads=4, intermediate_size=3584, vocab_size=32000,
                             num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=2048,
                             rms_norm_eps=1e-5, tie_word_embeddings=False)
    if shape == "qwen3moe":
        # Qwen3-30B-A3B's shape scaled to fit: 32 experts of 512 at d_model 1024, top-4,
        # normalised, q/k norms, head_dim 128; GPT-2's vocabulary (the converter reads
        # Qwen's as byte-level BPE).
        return Qwen3MoeConfig(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                              num_key_value_heads=4, head_dim=128, intermediate_size=3072,
                              moe_intermediate_size=512, num_experts=32, num_experts_per_tok=4,
                              norm_topk_prob=True, vocab_size=50304, max_position_embeddings=2048,
                              rms_norm_eps=1e-6, tie_word_embeddings=False)
    if shape == "deepseek":
        # DeepSeek-V2's shape scaled to fit: latent attention (kv_lora_rank 256, a query
        # of rank 384, 64 + 32 rotated key dims, 64 value dims per head), a dense first
        # layer, then 32 experts of 512, top-4 by softmax, 2 shared experts; GPT-2's
        # vocabulary (the converter reads DeepSeek's as byte-level BPE). (llama.cpp takes a
        # full-rank query only from a 27-layer model, V2-Lite.)
        from transformers import DeepseekV2Config
        return DeepseekV2Config(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                                num_key_value_heads=16, intermediate_size=2816, vocab_size=50304,
                                q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
                                qk_rope_head_dim=32, v_head_dim=64, moe_intermediate_size=512,
                                n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=2,
                                first_k_dense_replace=1, max_position_embeddings=2048,
                                rms_norm_eps=1e-6, tie_word_embeddings=False)
    return LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=5632, vocab_size=32000,
                       max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                       tie_word_embeddings=False)


def model(shape):
    return AutoModelForCausalLM.from_config(config(shape))


def field(reader, key):
    return reader.fields[key].contents()


def gpt2_tokenizer(vocab_dir, out):
    r = gguf.GGUFReader(os.path.join(vocab_dir, "ggml-vocab-gpt-2.gguf"))
    tokens, merges = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.merges")
    eos = tokens[field(r, "tokenizer.ggml.eos_token_id")]
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ")) for m in merges]
    tok = GPT2TokenizerFast(vocab=vocab, merges=pairs, unk_token=eos, bos_token=eos, eos_token=eos)
    tok.save_pretrained(out)


def llama_tokenizer(vocab_dir, out):
    from sentencepiece import sentencepiece_model_pb2 as spm

    r = gguf.GGUFReader(os.path.join(vocab_dir, "ggml-vocab-llama-spm.gguf"))
    tokens, scores = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.scores")
    types = field(r, "tokenizer.ggml.token_type")  # llama.cpp's token types are SentencePiece's
    m = spm.ModelProto()
    for t, s, ty in zip(tokens, scores, types):
        p = m.pieces.add()
        p.piece, p.score, p.type = t, s, ty
    ts = m.trainer_spec
    ts.model_type = spm.TrainerSpec.BPE
    ts.vocab_size = len(tokens)
    ts.byte_fallback = True
    ts.unk_id = field(r, "tokenizer.ggml.unknown_token_id")
    ts.bos_id = field(r, "tokenizer.ggml.bos_token_id")
    ts.eos_id = field(r, "tokenizer.ggml.eos_token_id")
    ts.pad_id = -1
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = True
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    with open(os.path.join(out, "tokenizer.model"), "wb") as f:
        f.write(m.SerializeToString())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=["w1", "w2", "mixtral", "qwen3moe", "deepseek"], required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-dir", required=True, help="llama.cpp's models/ folder")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    stamp = os.path.join(a.out, "peers-checkpoint.json")
    want = {"shape": a.shape, "seed": a.seed, "config": config(a.shape).to_diff_dict()}
    if os.path.exists(stamp) and json.load(open(stamp)) == json.loads(json.dumps(want)):
        return
    os.makedirs(a.out, exist_ok=True)
    torch.manual_seed(a.seed)
    m = model(a.shape)
    m.save_pretrained(a.out, safe_serialization=True)
    # The converter reads Qwen's vocabulary as GPT-2's byte-level BPE.
    (gpt2_tokenizer if a.shape in ("w1", "qwen3moe", "deepseek") else llama_tokenizer)(a.vocab_dir, a.out)
    json.dump(want, open(stamp, "w"))


if __name__ == "__main__":
    main()
