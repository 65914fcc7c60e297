"""ONNX Runtime on the benchmark shapes: W1 (GPT-2 small) and W2 (LLaMA-style 0.85B).

The model is a plain PyTorch decoder with the KV cache as explicit inputs and outputs
(`past_k`, `past_v`: [layers, kv_heads, past, head_dim] → `present_k`, `present_v` with
the new rows appended), given the weights of the shape's Hugging Face checkpoint
(checkpoint.py), exported once to ONNX and run by ONNX Runtime's CPU provider. Batch 1,
fp32, the given number of threads: prefill latency for a prompt, then decode tokens/s
through the cache, greedy. Prints one JSON object. Used by benches/peers.sh; needs torch,
safetensors, onnx, onnxscript, onnxruntime.
"""
import json
import math
import os
import tempfile
import warnings

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from common import measure, parser, prompt, report

SHAPES = {
    # name: (d, layers, heads, kv_heads, ffn, vocab, arch)
    "w1": (768, 12, 12, 12, 3072, 50257, "gpt2"),
    "w2": (2048, 16, 32, 8, 5632, 32000, "llama"),
}


class RmsNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + self.eps) * self.weight


class Decoder(nn.Module):
    def __init__(self, d, layers, heads, kv_heads, ffn, vocab, arch, eps, theta):
        super().__init__()
        self.h, self.kv, self.hd, self.arch, self.theta = heads, kv_heads, d // heads, arch, theta
        gpt2 = arch == "gpt2"
        norm = (lambda: nn.LayerNorm(d, eps=eps)) if gpt2 else (lambda: RmsNorm(d, eps))
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(1024, d) if gpt2 else None
        self.layers = nn.ModuleList()
        for _ in range(layers):
            m = nn.Module()
            m.n1, m.n2 = norm(), norm()
            m.qkv = nn.Linear(d, (heads + 2 * kv_heads) * self.hd, bias=gpt2)
            m.o = nn.Linear(d, d, bias=gpt2)
            if gpt2:
                m.up, m.down = nn.Linear(d, ffn), nn.Linear(ffn, d)
            else:
                m.gate_up = nn.Linear(d, 2 * ffn, bias=False)
                m.down = nn.Linear(ffn, d, bias=False)
            self.layers.append(m)
        self.norm = norm()
        self.head = nn.Linear(d, vocab, bias=False)

    @torch.no_grad()
    def load(self, w):
        """Takes the weights of a Hugging Face checkpoint (`GPT2LMHeadModel`, whose Conv1D
        matrices are stored [in, out], or `LlamaForCausalLM`)."""
        def put(p, t):
            assert p.shape == t.shape, (p.shape, t.shape)
            p.copy_(t)

        if self.arch == "gpt2":
            put(self.emb.weight, w["transformer.wte.weight"])
            put(self.pos.weight, w["transformer.wpe.weight"])
            put(self.head.weight, w["transformer.wte.weight"])  # tied
            for i, m in enumerate(self.layers):
                h = f"transformer.h.{i}"
                for mine, theirs in [(m.n1, "ln_1"), (m.n2, "ln_2")]:
                    put(mine.weight, w[f"{h}.{theirs}.weight"])
                    put(mine.bias, w[f"{h}.{theirs}.bias"])
                for mine, theirs in [(m.qkv, "attn.c_attn"), (m.o, "attn.c_proj"), (m.up, "mlp.c_fc"),
                                     (m.down, "mlp.c_proj")]:
                    put(mine.weight, w[f"{h}.{theirs}.weight"].t())
                    put(mine.bias, w[f"{h}.{theirs}.bias"])
            put(self.norm.weight, w["transformer.ln_f.weight"])
            put(self.norm.bias, w["transformer.ln_f.bias"])
            return
        put(self.emb.weight, w["model.embed_tokens.weight"])
        put(self.head.weight, w["lm_head.weight"])
        for i, m in enumerate(self.layers):
            h = f"model.layers.{i}"
            put(m.n1.weight, w[f"{h}.input_layernorm.weight"])
            put(m.n2.weight, w[f"{h}.post_attention_layernorm.weight"])
            put(m.qkv.weight, torch.cat([w[f"{h}.self_attn.{x}_proj.weight"] for x in "qkv"]))
            put(m.o.weight, w[f"{h}.self_attn.o_proj.weight"])
            put(m.gate_up.weight, torch.cat([w[f"{h}.mlp.{x}_proj.weight"] for x in ["gate", "up"]]))
            put(m.down.weight, w[f"{h}.mlp.down_proj.weight"])
        put(self.norm.weight, w["model.norm.weight"])

    def rope(self, x, pos):
        half = self.hd // 2
        inv = self.theta ** (-torch.arange(half, dtype=torch.float32) / half)
        ang = pos[:, None].float() * inv[None, :]
        cos, sin = torch.cos(ang), torch.sin(ang)
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    def forward(self, ids, past_k, past_v):
        t, p = ids.shape[1], past_k.shape[2]
        pos = torch.arange(t) + p
        x = self.emb(ids[0])
        if self.pos is not None:
            x = x + self.pos(pos)
        keys = torch.arange(p + t)
        mask = torch.where(keys[None, :] <= pos[:, None], 0.0, float("-inf"))
        new_k, new_v = [], []
        for i, m in enumerate(self.layers):
            y = m.qkv(m.n1(x))
            q, k, v = y.split([self.h * self.hd, self.kv * self.hd, self.kv * self.hd], -1)
            q = q.view(t, self.h, self.hd).transpose(0, 1)
            k = k.view(t, self.kv, self.hd).transpose(0, 1)
            v = v.view(t, self.kv, self.hd).transpose(0, 1)
            if self.arch == "llama":
                q, k = self.rope(q, pos), self.rope(k, pos)
            k = torch.cat([past_k[i], k], 1)
            v = torch.cat([past_v[i], v], 1)
            new_k.append(k)
            new_v.append(v)
            g = self.h // self.kv
            kk = k.repeat_interleave(g, 0) if g > 1 else k
            vv = v.repeat_interleave(g, 0) if g > 1 else v
            s = q @ kk.transpose(1, 2) / math.sqrt(self.hd) + mask
            a = (s.softmax(-1) @ vv).transpose(0, 1).reshape(t, -1)
            x = x + m.o(a)
            hn = m.n2(x)
            if self.arch == "gpt2":
                x = x + m.down(nn.functional.gelu(m.up(hn), approximate="tanh"))
            else:
                gate, up = m.gate_up(hn).chunk(2, -1)
                x = x + m.down(nn.functional.silu(gate) * up)
        logits = self.head(self.norm(x[-1:]))
        return logits, torch.stack(new_k), torch.stack(new_v)


def main():
    ap = parser(SHAPES)
    ap.add_argument("--checkpoint", required=True, help="the shape's Hugging Face checkpoint (checkpoint.py)")
    a = ap.parse_args()
    import onnxruntime as ort

    warnings.filterwarnings("ignore", category=DeprecationWarning)

    d, layers, heads, kv, ffn, vocab, arch = SHAPES[a.shape]
    with open(os.path.join(a.checkpoint, "config.json")) as f:
        cfg = json.load(f)
    eps = cfg["layer_norm_epsilon"] if arch == "gpt2" else cfg["rms_norm_eps"]
    theta = cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)
    model = Decoder(d, layers, heads, kv, ffn, vocab, arch, eps, theta).eval()
    model.load(load_file(os.path.join(a.checkpoint, "model.safetensors")))
    hd = d // heads
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        ex = (torch.zeros(1, 4, dtype=torch.int64), torch.zeros(layers, kv, 3, hd), torch.zeros(layers, kv, 3, hd))
        with torch.no_grad():
            torch.onnx.export(
                model, ex, path, dynamo=False, input_names=["ids", "past_k", "past_v"],
                output_names=["logits", "present_k", "present_v"],
                dynamic_axes={"ids": {1: "t"}, "past_k": {2: "p"}, "past_v": {2: "p"},
                              "present_k": {2: "s"}, "present_v": {2: "s"}},
                external_data=True,
            )
        so = ort.SessionOptions()
        so.intra_op_num_threads = a.threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    tokens = np.array([prompt(a, vocab)], dtype=np.int64)
    empty = np.zeros((layers, kv, 0, hd), dtype=np.float32)

    def run(ids, pk, pv):
        logits, pk, pv = sess.run(None, {"ids": ids, "past_k": pk, "past_v": pv})
        return int(logits[-1].argmax()), (pk, pv)

    def step(tok, cache):
        return run(np.array([[tok]], dtype=np.int64), *cache)

    pre, dec, out = measure(a, lambda: run(tokens, empty, empty), step)
    report(f"ONNX Runtime {ort.__version__} f32", pre, dec, out)


if __name__ == "__main__":
    main()
