//! A GGUF file's metadata → spec text, with the file's own tensor names.
//!
//! llama.cpp's converter writes each architecture's settings under `{arch}.…` keys and
//! renames the tensors (`blk.{layer}.attn_q`, `token_embd`, …). For the `llama`
//! architecture (Llama, Mistral and their fine-tunes) it also permutes the rows of the
//! query and key projections so that each head rotates adjacent pairs, as llama.cpp does
//! for that architecture; the spec says so (`pairs = interleaved`) instead of undoing it,
//! so the file's tensors bind as they are. Qwen2 and Qwen3 keep the halves.

use std::fmt::Write;

use tfc_runtime::gguf::{Gguf, Value};

#[derive(Debug, thiserror::Error)]
pub enum GgufImportError {
    #[error("{file} has no `general.architecture`")]
    NoArchitecture { file: String },
    #[error("{file}: architecture `{arch}` is not supported (supported: llama, phi3, qwen2, qwen3)")]
    Architecture { file: String, arch: String },
    #[error("{file}: metadata `{key}` is missing or not {expected}")]
    Key { file: String, key: String, expected: &'static str },
    #[error("{file}: {what}")]
    Unsupported { file: String, what: String },
    #[error(
        "{file} describes a model that cannot be built; the spec written from it fails its checks:\n{report}"
    )]
    Impossible { file: String, report: String },
}

struct Meta<'a> {
    g: &'a Gguf,
    file: String,
    arch: String,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.g.meta.get(&format!("{}.{key}", self.arch))
    }
    fn size(&self, key: &str) -> Result<Option<usize>, GgufImportError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => {
                v.as_u64().filter(|&n| n > 0 && n <= 1 << 30).map(|n| Some(n as usize)).ok_or_else(|| {
                    GgufImportError::Key {
                        file: self.file.clone(),
                        key: format!("{}.{key}", self.arch),
                        expected: "a whole number from 1 to 2^30",
                    }
                })
            }
        }
    }
    fn need(&self, key: &str) -> Result<usize, GgufImportError> {
        self.size(key)?.ok_or_else(|| GgufImportError::Key {
            file: self.file.clone(),
            key: format!("{}.{key}", self.arch),
            expected: "present",
        })
    }
    fn float(&self, key: &str, default: f64) -> Result<f64, GgufImportError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_f64().filter(|x| x.is_finite() && *x > 0.0).ok_or_else(|| GgufImportError::Key {
                file: self.file.clone(),
                key: format!("{}.{key}", self.arch),
                expected: "a number > 0",
            }),
        }
    }
    fn unsupported(&self, what: String) -> GgufImportError {
        GgufImportError::Unsupported { file: self.file.clone(), what }
    }
}

/// Writes a spec for the model a GGUF file describes (`file` names it in errors).
/// The weight storage that keeps the file's matrices exactly as they are: the block
/// format all of them are stored in, where the library reads it (Q8_0 is `q8`'s values
/// exactly; Q4_0, Q4_1 and Q4_K are bound as stored). `None` (f32, the file's values) for
/// a file that mixes formats, since one spec-wide `dtype` would re-quantise the rest;
/// `--dtype` asks for that.
fn stored_dtype(g: &Gguf) -> Option<&'static str> {
    use tfc_runtime::gguf::GgmlType;
    let mut types = g.tensors.values().filter(|t| t.shape.len() == 2).map(|t| t.ty.name());
    let first = types.next()?;
    if types.any(|t| t != first) {
        return None;
    }
    Some(match first {
        n if n == GgmlType::Q8_0.name() => "q8",
        n if n == GgmlType::Q4_0.name() => "q4_0",
        n if n == GgmlType::Q4_1.name() => "q4_1",
        n if n == GgmlType::Q4K.name() => "q4_k",
        _ => return None,
    })
}

pub fn import(g: &Gguf, file: &str) -> Result<String, GgufImportError> {
    let arch = g
        .meta
        .get("general.architecture")
        .and_then(Value::as_str)
        .ok_or(GgufImportError::NoArchitecture { file: file.into() })?
        .to_string();
    if !["llama", "qwen2", "qwen3", "phi3"].contains(&arch.as_str()) {
        return Err(GgufImportError::Architecture { file: file.into(), arch });
    }
    let m = Meta { g, file: file.into(), arch: arch.clone() };
    let d = m.need("embedding_length")?;
    let heads = m.need("attention.head_count")?;
    let kv = m.size("attention.head_count_kv")?.unwrap_or(heads);
    let head_dim = m.size("attention.key_length")?.unwrap_or(d / heads.max(1));
    let layers = m.need("block_count")?;
    let ff = m.need("feed_forward_length")?;
    let max_seq = m.need("context_length")?;
    let eps = m.float("attention.layer_norm_rms_epsilon", 1e-5)?;
    let theta = m.float("rope.freq_base", 10000.0)?;
    let embd = g
        .tensors
        .get("token_embd.weight")
        .ok_or_else(|| m.unsupported("no tensor `token_embd.weight`".into()))?;
    let vocab = embd.shape[0];
    // Rope over the first `rot` dimensions of each head (Phi-4-mini: three quarters).
    let rot = m.size("rope.dimension_count")?.unwrap_or(head_dim);
    if rot > head_dim || rot % 2 != 0 {
        return Err(m.unsupported(format!("rope over {rot} of {head_dim} dimensions")));
    }
    let fraction = if rot == head_dim {
        String::new()
    } else {
        format!(", fraction = {}", crate::ir::num(rot as f64 / head_dim as f64))
    };
    // Phi-3's LongRoPE: one factor per rotated pair for short and for long contexts,
    // stored as tensors.
    let longrope = match (g.get("rope_factors_short.weight"), g.get("rope_factors_long.weight")) {
        (Some(short), Some(long)) => {
            let original = m.need("rope.scaling.original_context_length")?;
            // Each factor as the decimal its f32 was written from.
            let list = |xs: &[f32]| xs.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", ");
            let attn = match m.get("rope.scaling.attn_factor") {
                Some(v) => {
                    v.as_f64().filter(|x| x.is_finite() && *x > 0.0).ok_or_else(|| GgufImportError::Key {
                        file: file.into(),
                        key: format!("{arch}.rope.scaling.attn_factor"),
                        expected: "a number > 0",
                    })?
                }
                None => crate::ir::RopeScaling::longrope_attention_factor(
                    max_seq as f64 / original as f64,
                    original,
                ),
            };
            format!(
                ", scaling = longrope {{\n      short_factor = [{}],\n      long_factor = [{}],\n      original_max_seq = {original}, attention_factor = {}\n    }}",
                list(&short),
                list(&long),
                crate::ir::num(attn)
            )
        }
        (None, None) => String::new(),
        _ => {
            return Err(m.unsupported("one of `rope_factors_short` and `rope_factors_long`, not both".into()))
        }
    };
    if g.tensors.contains_key("rope_freqs.weight") {
        return Err(m.unsupported(
            "`rope_freqs.weight` (per-pair rope factors, Llama 3.1) is not supported yet".into(),
        ));
    }
    if let Some(t) = m
        .get("rope.scaling.type")
        .and_then(Value::as_str)
        .filter(|t| *t != "none" && !(!longrope.is_empty() && (*t == "longrope" || *t == "su")))
    {
        return Err(m.unsupported(format!("rope scaling `{t}` is not supported yet")));
    }
    let has = |n: &str| g.tensors.contains_key(n);
    let bias = if has("blk.0.attn_q.bias") { ", bias = [q, k, v]" } else { "" };
    let pairs = if arch == "llama" { ", pairs = interleaved" } else { "" };
    // Phi-3 fuses the query, key and value projections, and the gate and up ones
    // (`ffn_up`, the gate's rows first); a sliding window of 0 means none.
    let phi3 = arch == "phi3";
    let qkv = if phi3 { "qkv = \"attn_qkv\"" } else { "q = \"attn_q\", k = \"attn_k\", v = \"attn_v\"" };
    let ffn = if phi3 { "gate_up = \"ffn_up\"" } else { "gate = \"ffn_gate\", up = \"ffn_up\"" };
    let window = match m.get("attention.sliding_window").and_then(Value::as_u64) {
        Some(0) => None,
        _ => m.size("attention.sliding_window")?,
    };
    let window = window.filter(|&w| w < max_seq).map_or(String::new(), |w| format!(", window = {w}"));
    let e = crate::ir::num(eps);
    let mut s = String::new();
    let name: String = g
        .meta
        .get("general.name")
        .and_then(Value::as_str)
        .unwrap_or(&arch)
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' })
        .collect();
    let name = if name.starts_with(|c: char| c.is_ascii_alphabetic()) { name } else { format!("m_{name}") };
    writeln!(s, "# Imported from a GGUF file (architecture `{arch}`) by `tfc import-gguf`.").unwrap();
    writeln!(s, "model {name}\n").unwrap();
    let mut sizes = vec![("vocab", vocab), ("d_model", d), ("layers", layers), ("heads", heads)];
    if kv != heads {
        sizes.push(("kv_heads", kv));
    }
    if head_dim * heads != d {
        sizes.push(("head_dim", head_dim));
    }
    sizes.extend([("d_ff", ff), ("max_seq", max_seq)]);
    let mut sizes: Vec<(&str, String)> = sizes.into_iter().map(|(k, v)| (k, v.to_string())).collect();
    if let Some(d) = stored_dtype(g) {
        sizes.push(("dtype", d.into()));
    }
    let w = sizes.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in sizes {
        writeln!(s, "{k:w$} = {v}").unwrap();
    }
    let qk_norm = if has("blk.0.attn_q_norm.weight") {
        format!("\n    qk_norm = rmsnorm {{ q = \"attn_q_norm\", k = \"attn_k_norm\", eps = {e} }}")
    } else {
        String::new()
    };
    let output = if has("output.weight") {
        "output: unembed { at = \"output\" }"
    } else {
        "output: unembed { tied = token_embd }"
    };
    write!(
        s,
        r#"
embed {{
  token_embd: embedding {{ at = "token_embd" }}
  x = token_embd(tokens)
}}

block {{
  attn_norm: rmsnorm {{ at = "blk.{{layer}}.attn_norm", eps = {e} }}
  attn: attention {{
    at = "blk.{{layer}}", {qkv}, o = "attn_output"{bias}
    position = rope {{ theta = {theta}{fraction}{pairs}{longrope} }}{window}{qk_norm}
  }}
  ffn_norm: rmsnorm {{ at = "blk.{{layer}}.ffn_norm", eps = {e} }}
  mlp: mlp {{ at = "blk.{{layer}}", {ffn}, down = "ffn_down", act = silu }}

  x = x + attn(attn_norm(x))
  x = x + mlp(ffn_norm(x))
}}

head {{
  output_norm: rmsnorm {{ at = "output_norm", eps = {e} }}
  {output}
  x = output(output_norm(x))
}}
"#,
        theta = crate::ir::num(theta)
    )
    .unwrap();
    match crate::front::compile_spec(&format!("{file} (imported)"), &s, &Default::default()) {
        Ok(_) => Ok(s),
        Err(d) => Err(GgufImportError::Impossible { file: file.into(), report: d.render(false) }),
    }
}
