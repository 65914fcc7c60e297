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
    #[error("{file}: architecture `{arch}` is not supported (supported: {SUPPORTED})")]
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
    /// A count that may be zero (dense layers, shared experts).
    fn count(&self, key: &str) -> Result<usize, GgufImportError> {
        match self.get(key) {
            None => Ok(0),
            Some(v) => {
                v.as_u64().filter(|&n| n <= 1 << 30).map(|n| n as usize).ok_or_else(|| GgufImportError::Key {
                    file: self.file.clone(),
                    key: format!("{}.{key}", self.arch),
                    expected: "a whole number from 0 to 2^30",
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
    /// A mixture's weighting of its chosen experts, as `moe` fields: renormalised where
    /// `expert_weights_norm` says (else where `default`), and scaled by
    /// `expert_weights_scale`, which llama.cpp ignores at 0 (the key's default) and 1.
    fn expert_weighting(&self, default: bool) -> Result<Vec<String>, GgufImportError> {
        let normalize = match self.get("expert_weights_norm") {
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(GgufImportError::Key {
                    file: self.file.clone(),
                    key: format!("{}.expert_weights_norm", self.arch),
                    expected: "a boolean",
                })
            }
            None => default,
        };
        let mut f = Vec::new();
        if normalize {
            f.push("normalize = true".to_string());
        }
        let scale = self.float("expert_weights_scale", 1.0)?;
        if scale != 1.0 && scale != 0.0 {
            f.push(format!("scale = {}", crate::ir::num(scale)));
        }
        Ok(f)
    }
}

/// The storage that keeps a matrix exactly as the file stores it: ggml's block types
/// (Q8_0, Q2_K–Q6_K, Q4_0, Q4_1, Q5_0, Q5_1) are bound as stored; BF16 as it is; F16 is
/// `f32` (its values, exactly).
fn kept(ty: tfc_runtime::gguf::GgmlType) -> &'static str {
    use tfc_runtime::gguf::GgmlType;
    match ty {
        GgmlType::Q8_0 => "q8_0",
        GgmlType::Q4_0 => "q4_0",
        GgmlType::Q4_1 => "q4_1",
        GgmlType::Q4K => "q4_k",
        GgmlType::Q2K => "q2_k",
        GgmlType::Q3K => "q3_k",
        GgmlType::Q5_0 => "q5_0",
        GgmlType::Q5_1 => "q5_1",
        GgmlType::Q5K => "q5_k",
        GgmlType::Q6K => "q6_k",
        GgmlType::BF16 => "bf16",
        _ => "f32",
    }
}

/// The storage of the matrices whose names match, each kept as the file stores it
/// (`kept`): the component's `dtype` is the one most of their values take, and the
/// matrices stored otherwise (llama.cpp's Q4_K_M files keep the unembedding and some
/// layers' `ffn_down` and `attn_v` in Q6_K) are returned for the `dtypes` section.
fn stored(g: &Gguf, matches: &dyn Fn(&str) -> bool) -> (&'static str, Vec<(String, &'static str)>) {
    let matrices: Vec<(&String, &'static str, usize)> = g
        .tensors
        .iter()
        .filter(|(n, t)| (t.shape.len() == 2 || t.shape.len() == 3) && matches(n))
        .map(|(n, t)| (n, kept(t.ty), t.shape.iter().product()))
        .collect();
    let mut values: Vec<(&'static str, usize)> = Vec::new();
    for &(_, d, n) in &matrices {
        match values.iter_mut().find(|(e, _)| *e == d) {
            Some((_, total)) => *total += n,
            None => values.push((d, n)),
        }
    }
    // The most values; of equal counts, the first type seen.
    let Some(&(main, _)) = values.iter().rev().max_by_key(|(_, n)| *n) else { return ("f32", Vec::new()) };
    let others =
        matrices.iter().filter(|(_, d, _)| *d != main).map(|(n, d, _)| (n.to_string(), *d)).collect();
    (main, others)
}

/// The `dtypes` section for the matrices stored otherwise than their component (none:
/// no section), each type's names in layer order.
fn dtypes_section(mut listed: Vec<(String, &'static str)>) -> String {
    if listed.is_empty() {
        return String::new();
    }
    let layer = |n: &str| n.strip_prefix("blk.").and_then(|r| r.split('.').next()?.parse::<usize>().ok());
    listed.sort_by(|(a, _), (b, _)| (layer(a), a).cmp(&(layer(b), b)));
    let mut types: Vec<&str> = listed.iter().map(|(_, d)| *d).collect();
    types.sort();
    types.dedup();
    let mut s = String::from("\n# Matrices the file stores otherwise than their component.\ndtypes {\n");
    for d in types {
        let names: Vec<String> =
            listed.iter().filter(|(_, e)| *e == d).map(|(n, _)| format!("\"{n}\"")).collect();
        s += &format!("  {d} = [\n");
        for line in names.chunks(4) {
            s += &format!("    {},\n", line.join(", "));
        }
        s += "  ]\n";
    }
    s + "}\n"
}

/// The architectures (`general.architecture`) the importer writes specs for.
const SUPPORTED: &str = "deepseek2, gemma, gemma2, gemma3, llama, phi3, qwen2, qwen2moe, qwen3, qwen3moe";

/// Writes a spec for the model a GGUF file describes (`file` names it in errors).
pub fn import(g: &Gguf, file: &str) -> Result<String, GgufImportError> {
    let arch = g
        .meta
        .get("general.architecture")
        .and_then(Value::as_str)
        .ok_or(GgufImportError::NoArchitecture { file: file.into() })?
        .to_string();
    if !SUPPORTED.split(", ").any(|a| a == arch) {
        return Err(GgufImportError::Architecture { file: file.into(), arch });
    }
    let m = Meta { g, file: file.into(), arch: arch.clone() };
    if arch == "deepseek2" {
        return deepseek2(&m);
    }
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
    // Llama 3.1's scaling as the converter stores it: a factor per rotated pair.
    let per_pair = match g.get("rope_freqs.weight") {
        Some(f) => {
            if !longrope.is_empty() {
                return Err(m.unsupported("both `rope_freqs` and LongRoPE factors".into()));
            }
            format!(
                ", scaling = per_pair {{ factors = [{}] }}",
                f.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", ")
            )
        }
        None => String::new(),
    };
    // Linear scaling (Gemma 3's global layers) divides every frequency by the factor.
    let linear = match m.get("rope.scaling.type").and_then(Value::as_str) {
        None | Some("none") => String::new(),
        Some("longrope" | "su") if !longrope.is_empty() => String::new(),
        Some("linear") => match m.get("rope.scaling.factor").or(m.get("rope.scale_linear")) {
            Some(_) => {
                let f = m.float("rope.scaling.factor", m.float("rope.scale_linear", 1.0)?)?;
                if f == 1.0 {
                    String::new()
                } else {
                    format!(", scaling = linear {{ factor = {} }}", crate::ir::num(f))
                }
            }
            None => return Err(m.unsupported("linear rope scaling without `rope.scaling.factor`".into())),
        },
        Some(t) => return Err(m.unsupported(format!("rope scaling `{t}` is not supported yet"))),
    };
    let has = |n: &str| g.tensors.contains_key(n);
    let bias = if has("blk.0.attn_q.bias") { ", bias = [q, k, v]" } else { "" };
    let pairs = if arch == "llama" { ", pairs = interleaved" } else { "" };
    // Phi-3 fuses the query, key and value projections, and the gate and up ones
    // (`ffn_up`, the gate's rows first); a sliding window of 0 means none.
    let phi3 = arch == "phi3";
    let qkv = if phi3 { "qkv = \"attn_qkv\"" } else { "q = \"attn_q\", k = \"attn_k\", v = \"attn_v\"" };
    let ffn = if phi3 { "gate_up = \"ffn_up\"" } else { "gate = \"ffn_gate\", up = \"ffn_up\"" };
    // A mixture of experts, as the converter writes one: the router `ffn_gate_inp`, the
    // experts merged into 3-D `ffn_{gate,up,down}_exps`, on the layers that have a
    // router (the others dense: Qwen's `mlp_only_layers`); a shared expert as
    // `ffn_{gate,up,down}_shexp`, gated by `ffn_gate_inp_shexp` where the file has it
    // (Qwen2-MoE). The chosen weights are renormalised where `expert_weights_norm` says,
    // else as llama.cpp runs each architecture: Mixtral (llama) and Qwen3-MoE do,
    // Qwen2-MoE does not.
    let experts = m.size("expert_count")?.unwrap_or(0);
    let sparse: Vec<bool> =
        (0..layers).map(|l| experts > 0 && has(&format!("blk.{l}.ffn_gate_inp.weight"))).collect();
    let moe = if experts > 0 {
        let Some(first) = sparse.iter().position(|&s| s) else {
            return Err(m.unsupported(format!("{experts} experts, but no layer has a router `ffn_gate_inp`")));
        };
        if let Some(l) = (0..layers).find(|&l| !sparse[l] && !has(&format!("blk.{l}.ffn_down.weight"))) {
            return Err(m.unsupported(format!(
                "{experts} experts, but layer {l} has neither a router `blk.{l}.ffn_gate_inp.weight` nor a dense `blk.{l}.ffn_down.weight`"
            )));
        }
        let used = m.need("expert_used_count")?;
        let width = m.size("expert_feed_forward_length")?.unwrap_or(ff);
        let mut f = vec![format!("experts = {experts}, top_k = {used}")];
        f.extend(m.expert_weighting(arch != "qwen2moe")?);
        f.push(format!("d_expert = {width}"));
        f.push("router = \"ffn_gate_inp\", gate = \"ffn_gate_exps\", up = \"ffn_up_exps\", down = \"ffn_down_exps\", act = silu".into());
        if has(&format!("blk.{first}.ffn_down_shexp.weight")) {
            let shared = m.size("expert_shared_feed_forward_length")?.unwrap_or(ff);
            let gate = if has(&format!("blk.{first}.ffn_gate_inp_shexp.weight")) {
                ", shared_gate = \"ffn_gate_inp_shexp\""
            } else {
                ""
            };
            f.push(format!("shared = \"ffn_{{proj}}_shexp\", d_shared = {shared}{gate}"));
        }
        Some(format!("  mlp: moe {{\n    at = \"blk.{{layer}}\"\n    {}\n  }}\n", f.join("\n    ")))
    } else {
        None
    };
    let window = match m.get("attention.sliding_window").and_then(Value::as_u64) {
        Some(0) => None,
        _ => m.size("attention.sliding_window")?,
    };
    let window = window.filter(|&w| w < max_seq);
    // The Gemma family as llama.cpp runs it: the embedding scaled by √d_model, GELU (tanh)
    // gates, norms whose weights the converter stored with Gemma's `1 +` already added
    // (so plain RMSNorms here), and from Gemma 2 on a norm after each sublayer as well,
    // layers that alternate between a sliding window and full attention, and logit
    // soft-capping.
    let gemma = arch.starts_with("gemma");
    let post_norms = arch == "gemma2" || arch == "gemma3";
    // Which layers slide: `attention.sliding_window_pattern`, a list of booleans or `n`
    // (every `n`-th layer full), else llama.cpp's default per architecture (every layer
    // for the others).
    let sliding: Vec<bool> = match (window, m.get("attention.sliding_window_pattern")) {
        (None, _) => vec![false; layers],
        (Some(_), Some(Value::Array(a))) => {
            let flags: Option<Vec<bool>> =
                a.iter().map(|v| if let Value::Bool(b) = v { Some(*b) } else { None }).collect();
            match flags {
                Some(f) if f.len() == layers => f,
                _ => {
                    return Err(GgufImportError::Key {
                        file: file.into(),
                        key: format!("{arch}.attention.sliding_window_pattern"),
                        expected: "a whole number, or one boolean per layer",
                    })
                }
            }
        }
        (Some(_), p) => {
            let n = match p {
                Some(_) => m.size("attention.sliding_window_pattern")?.unwrap_or(0),
                None if arch == "gemma2" => 2,
                None if arch == "gemma3" => 6,
                None => 0,
            };
            (0..layers).map(|l| n == 0 || l % n < n - 1).collect()
        }
    };
    // Sliding layers' rope as llama.cpp sets it: Gemma 3's from `rope.freq_base_swa`
    // (default 10000) without scaling, Gemma 2's from that key (default the full layers'
    // base) with the full layers' scaling; others' as full layers'.
    let global_rope =
        format!("rope {{ theta = {}{fraction}{pairs}{longrope}{per_pair}{linear} }}", crate::ir::num(theta));
    let local_rope = match arch.as_str() {
        "gemma3" | "gemma2" => {
            let v3 = arch == "gemma3";
            let base = m.float("rope.freq_base_swa", if v3 { 10000.0 } else { theta })?;
            let scaling = if v3 { "" } else { linear.as_str() };
            format!("rope {{ theta = {}{fraction}{pairs}{scaling} }}", crate::ir::num(base))
        }
        _ => global_rope.clone(),
    };
    let softcap = |key: &str| -> Result<Option<f64>, GgufImportError> {
        Ok(match m.get(key) {
            Some(_) => Some(m.float(key, 1.0)?),
            None => None,
        })
    };
    let attn_cap = match softcap("attn_logit_softcapping")? {
        Some(c) if arch == "gemma2" => format!(", softcap = {}", crate::ir::num(c)),
        _ => String::new(),
    };
    let final_cap = softcap("final_logit_softcapping")?
        .filter(|_| post_norms)
        .map_or(String::new(), |c| format!(", softcap = {}", crate::ir::num(c)));
    // Gemma 2 and 3 scale queries by 1/√head_dim, but their 27B models by
    // 1/√(d_model / heads): the file has no key for it, so llama.cpp tells the 27B models
    // by their layer count (46 and 62), and so does this.
    let big = (arch == "gemma2" && layers == 46) || (arch == "gemma3" && layers == 62);
    let scale = if big {
        format!(", scale = {}", crate::ir::num(1.0 / ((d / heads) as f64).sqrt()))
    } else {
        String::new()
    };
    let act = if gemma { "gelu_tanh" } else { "silu" };
    let e = crate::ir::num(eps);
    let mut sizes = vec![("vocab", vocab), ("d_model", d), ("layers", layers), ("heads", heads)];
    if kv != heads {
        sizes.push(("kv_heads", kv));
    }
    if head_dim * heads != d {
        sizes.push(("head_dim", head_dim));
    }
    sizes.extend([("d_ff", ff), ("max_seq", max_seq)]);
    let mut sizes: Vec<(&str, String)> = sizes.into_iter().map(|(k, v)| (k, v.to_string())).collect();
    // Each component's matrices as the file stores them: the spec's `dtype` is the MLP's
    // (most of the bytes), and a component stored otherwise says so.
    let block_part = |n: &str, parts: &[&str]| {
        n.starts_with("blk.") && parts.iter().any(|p| n.split('.').nth(2) == Some(*p))
    };
    let mut listed = Vec::new();
    let mut stored = |matches: &dyn Fn(&str) -> bool| {
        let (main, others) = stored(g, matches);
        listed.extend(others);
        main
    };
    let mlp_dtype = stored(&|n| {
        block_part(
            n,
            &[
                "ffn_gate",
                "ffn_up",
                "ffn_down",
                "ffn_gate_inp",
                "ffn_gate_exps",
                "ffn_up_exps",
                "ffn_down_exps",
                "ffn_gate_inp_shexp",
                "ffn_gate_shexp",
                "ffn_up_shexp",
                "ffn_down_shexp",
            ],
        )
    });
    let attn = stored(&|n| block_part(n, &["attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output"]));
    let embd = stored(&|n| n == "token_embd.weight");
    let output = stored(&|n| n == "output.weight");
    let own = |d: &'static str| if d == mlp_dtype { String::new() } else { format!(", dtype = {d}") };
    let (attn_dtype, embd_dtype, output_dtype) = (own(attn), own(embd), own(output));
    if mlp_dtype != "f32" {
        sizes.push(("dtype", mlp_dtype.into()));
    }
    // One block for all layers, or one per kind of layer (`sliding` or `full`, `moe` or
    // `dense`, or both) and the shortest pattern of them that repeats over the layers.
    let kinds: Vec<(bool, bool)> = sliding.iter().copied().zip(sparse.iter().copied()).collect();
    let varies = |f: fn(&(bool, bool)) -> bool| kinds.iter().any(f) && !kinds.iter().all(f);
    let (by_window, by_mlp) = (varies(|k| k.0), varies(|k| k.1));
    let kind_name = |&(slides, moe): &(bool, bool)| {
        let window = if slides { "sliding" } else { "full" };
        let mlp = if moe { "moe" } else { "dense" };
        match (by_window, by_mlp) {
            (true, true) => format!("{window}_{mlp}"),
            (true, false) => window.to_string(),
            _ => mlp.to_string(),
        }
    };
    let mut block_kinds: Vec<(bool, bool)> = Vec::new();
    if by_window || by_mlp {
        let period = (1..=layers).find(|&p| (0..layers).all(|i| kinds[i] == kinds[i % p])).unwrap_or(layers);
        let names: Vec<String> = kinds[..period].iter().map(kind_name).collect();
        sizes.push(("pattern", format!("[{}]", names.join(", "))));
        for k in &kinds[..period] {
            if !block_kinds.contains(k) {
                block_kinds.push(*k);
            }
        }
    }
    let mut s = header(&m, &sizes);
    let qk_norm = if has("blk.0.attn_q_norm.weight") {
        format!("\n    qk_norm = rmsnorm {{ q = \"attn_q_norm\", k = \"attn_k_norm\", eps = {e} }}")
    } else {
        String::new()
    };
    let output = if has("output.weight") {
        format!("output: unembed {{ at = \"output\"{final_cap}{output_dtype} }}")
    } else {
        format!("output: unembed {{ tied = token_embd{final_cap} }}")
    };
    let embed = if gemma { "token_embd(tokens) * sqrt(d_model)" } else { "token_embd(tokens)" };
    write!(
        s,
        r#"
embed {{
  token_embd: embedding {{ at = "token_embd"{embd_dtype} }}
  x = {embed}
}}
"#
    )
    .unwrap();
    let norm =
        |name: &str, at: &str| format!("  {name}: rmsnorm {{ at = \"blk.{{layer}}.{at}\", eps = {e} }}\n");
    let block = |slides: bool, sparse: bool| {
        let (rope, window) = match (slides, window) {
            (true, Some(w)) => (&local_rope, format!(", window = {w}")),
            _ => (&global_rope, String::new()),
        };
        let mut b = norm("attn_norm", "attn_norm");
        b += &format!(
            "  attn: attention {{\n    at = \"blk.{{layer}}\", {qkv}, o = \"attn_output\"{bias}{scale}{attn_dtype}\n    position = {rope}{window}{attn_cap}{qk_norm}\n  }}\n"
        );
        if post_norms {
            b += &norm("post_attn_norm", "post_attention_norm");
        }
        b += &norm("ffn_norm", "ffn_norm");
        match &moe {
            Some(moe) if sparse => b += moe,
            _ => {
                b += &format!(
                    "  mlp: mlp {{ at = \"blk.{{layer}}\", {ffn}, down = \"ffn_down\", act = {act} }}\n"
                )
            }
        }
        if post_norms {
            b += &norm("post_ffn_norm", "post_ffw_norm");
            b +=
                "\n  x = x + post_attn_norm(attn(attn_norm(x)))\n  x = x + post_ffn_norm(mlp(ffn_norm(x)))\n";
        } else {
            b += "\n  x = x + attn(attn_norm(x))\n  x = x + mlp(ffn_norm(x))\n";
        }
        b
    };
    if block_kinds.is_empty() {
        let (slides, sparse) = kinds.first().copied().unwrap_or_default();
        write!(s, "\nblock {{\n{}}}\n", block(slides, sparse)).unwrap();
    }
    for k in &block_kinds {
        write!(s, "\nblock {} {{\n{}}}\n", kind_name(k), block(k.0, k.1)).unwrap();
    }
    write!(
        s,
        r#"
head {{
  output_norm: rmsnorm {{ at = "output_norm", eps = {e} }}
  {output}
  x = output(output_norm(x))
}}
"#
    )
    .unwrap();
    s += &dtypes_section(listed);
    checked(&m, s)
}

/// A spec's first lines: where it came from, its name, and its settings aligned.
fn header(m: &Meta, sizes: &[(&str, String)]) -> String {
    let mut s = String::new();
    writeln!(s, "# Imported from a GGUF file (architecture `{}`) by `tfc import-gguf`.", m.arch).unwrap();
    writeln!(s, "model {}\n", model_name(m)).unwrap();
    let w = sizes.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in sizes {
        writeln!(s, "{k:w$} = {v}").unwrap();
    }
    s
}

/// The spec's name: the file's `general.name` as an identifier, else the architecture.
fn model_name(m: &Meta) -> String {
    let name: String =
        m.g.meta
            .get("general.name")
            .and_then(Value::as_str)
            .unwrap_or(&m.arch)
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' })
            .collect();
    if name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        name
    } else {
        format!("m_{name}")
    }
}

/// The spec text if it compiles, else the front end's report.
fn checked(m: &Meta, s: String) -> Result<String, GgufImportError> {
    match crate::front::compile_spec(&format!("{} (imported)", m.file), &s, &Default::default()) {
        Ok(_) => Ok(s),
        Err(d) => Err(GgufImportError::Impossible { file: m.file.clone(), report: d.render(false) }),
    }
}

/// DeepSeek-V2/V3 as llama.cpp's converter writes them (`deepseek2`): multi-head latent
/// attention (`attn_kv_a_mqa`, the latent's norm, and `kv_b_proj` split per head into
/// `attn_k_b` `[heads, kv_rank, nope]` and `attn_v_b`, or one `attn_kv_b` in older
/// files; a low-rank query where `attention.q_lora_rank` is set), RoPE on adjacent pairs,
/// `leading_dense_block_count` dense layers, then mixtures with llama.cpp's routing keys
/// (`expert_gating_func` 1 softmax, 2 sigmoid; `exp_probs_b`, the V3 choice bias;
/// groups; `expert_weights_norm`, `expert_weights_scale`) and `*_shexp` shared experts.
/// The file keeps YaRN's `mscale_all_dim` only (as `0.1 · mscale_all_dim` in
/// `rope.scaling.yarn_log_multiplier`), folded into the score scale as transformers does;
/// the rotation's own factor is 1, which holds where `mscale` equals `mscale_all_dim`, as
/// in every DeepSeek release.
fn deepseek2(m: &Meta) -> Result<String, GgufImportError> {
    let g = m.g;
    let has = |n: &str| g.tensors.contains_key(n);
    let d = m.need("embedding_length")?;
    let heads = m.need("attention.head_count")?;
    let layers = m.need("block_count")?;
    let ff = m.need("feed_forward_length")?;
    let max_seq = m.need("context_length")?;
    let eps = crate::ir::num(m.float("attention.layer_norm_rms_epsilon", 1e-6)?);
    let theta = m.float("rope.freq_base", 10000.0)?;
    let kv_rank = m.need("attention.kv_lora_rank")?;
    let rope_dim = m.need("rope.dimension_count")?;
    let qk = m.need("attention.key_length_mla")?;
    let v_dim = m.need("attention.value_length_mla")?;
    if qk <= rope_dim {
        return Err(m.unsupported(format!("key length {qk} is not more than the rotated {rope_dim}")));
    }
    let nope = qk - rope_dim;
    let vocab = g
        .tensors
        .get("token_embd.weight")
        .ok_or_else(|| m.unsupported("no tensor `token_embd.weight`".into()))?
        .shape[0];
    let q = match m.size("attention.q_lora_rank")? {
        Some(r) => {
            format!("q_a = \"attn_q_a\", q_norm = \"attn_q_a_norm\", q_b = \"attn_q_b\", q_rank = {r}")
        }
        None => "q = \"attn_q\"".into(),
    };
    // `attention_bias`: the converter keeps the biases of `kv_a`, `q_a` and the output.
    let bias = if has("blk.0.attn_kv_a_mqa.bias") { ", bias = true" } else { "" };
    let kv_b = if has("blk.0.attn_kv_b.weight") {
        "kv_b = \"attn_kv_b\""
    } else {
        "k_b = \"attn_k_b\", v_b = \"attn_v_b\""
    };
    let (mut scaling, mut scale) = (String::new(), String::new());
    match m.get("rope.scaling.type").and_then(Value::as_str) {
        None | Some("none") => {}
        Some("yarn") => {
            let factor = m.float("rope.scaling.factor", 1.0)?;
            let original = m.need("rope.scaling.original_context_length")?;
            scaling = format!(
                ", scaling = yarn {{ factor = {}, original_max_seq = {original}, attention_factor = 1 }}",
                crate::ir::num(factor)
            );
            let log_mul = match m.get("rope.scaling.yarn_log_multiplier") {
                Some(_) => m.float("rope.scaling.yarn_log_multiplier", 0.1)?,
                None => 0.0,
            };
            if log_mul > 0.0 && factor > 1.0 {
                let ms = 1.0 + log_mul * factor.ln();
                scale = format!(", scale = {}", crate::ir::num(ms * ms / (qk as f64).sqrt()));
            }
        }
        Some(t) => return Err(m.unsupported(format!("rope scaling `{t}` is not supported for deepseek2"))),
    }
    let dense = m.count("leading_dense_block_count")?.min(layers);
    let experts = m.size("expert_count")?.unwrap_or(0);
    let moe = if experts > 0 && dense < layers {
        let mut f = vec![format!("experts = {experts}, top_k = {}", m.need("expert_used_count")?)];
        let sigmoid = match m.size("expert_gating_func")? {
            None | Some(1) => false,
            Some(2) => true,
            Some(k) => {
                return Err(m.unsupported(format!("expert gating function {k} (1 softmax and 2 sigmoid are)")))
            }
        };
        if sigmoid {
            f.push("scoring = sigmoid".into());
        }
        let bias = ["blk.{l}.exp_probs_b.bias", "blk.{l}.exp_probs_b"]
            .into_iter()
            .find(|n| has(&n.replace("{l}", &dense.to_string())));
        if let Some(b) = bias {
            f.push(format!("choice_bias = \"{}\"", b.trim_start_matches("blk.{l}.")));
        }
        let groups = m.size("expert_group_count")?.unwrap_or(1);
        if groups > 1 {
            let used = m.size("expert_group_used_count")?.unwrap_or(groups);
            let score = if sigmoid { "top2_sum" } else { "max" };
            f.push(format!("groups = {groups}, topk_groups = {used}, group_score = {score}"));
        }
        f.extend(m.expert_weighting(false)?);
        let width = m.need("expert_feed_forward_length")?;
        f.push(format!("d_expert = {width}"));
        f.push("router = \"ffn_gate_inp\", gate = \"ffn_gate_exps\", up = \"ffn_up_exps\", down = \"ffn_down_exps\", act = silu".into());
        let shared = m.count("expert_shared_count")?;
        if shared > 0 {
            f.push(format!("shared = \"ffn_{{proj}}_shexp\", d_shared = {}", shared * width));
        }
        Some(format!("  mlp: moe {{\n    at = \"blk.{{layer}}\"\n    {}\n  }}\n", f.join("\n    ")))
    } else {
        None
    };
    let mut sizes: Vec<(&str, String)> =
        [("vocab", vocab), ("d_model", d), ("layers", layers), ("heads", heads)]
            .into_iter()
            .chain([("d_ff", ff), ("max_seq", max_seq)])
            .map(|(k, v)| (k, v.to_string()))
            .collect();
    // The matrices the linear kernels read keep the file's storage; `k_b`/`v_b` are read in f32.
    let part = |n: &str, parts: &[&str]| {
        n.starts_with("blk.") && parts.iter().any(|p| n.split('.').nth(2) == Some(*p))
    };
    let (main, listed) = stored(g, &|n| {
        n == "token_embd.weight"
            || n == "output.weight"
            || !part(n, &["attn_k_b", "attn_v_b", "attn_kv_b"]) && n.starts_with("blk.")
    });
    if main != "f32" {
        sizes.push(("dtype", main.into()));
    }
    let kinds: Vec<bool> = (0..layers).map(|l| moe.is_some() && l >= dense).collect();
    let mixed = kinds.iter().any(|&k| k) && !kinds.iter().all(|&k| k);
    if mixed {
        let names: Vec<&str> = kinds.iter().map(|&k| if k { "moe" } else { "dense" }).collect();
        sizes.push(("pattern", format!("[{}]", names.join(", "))));
    }
    let mut s = header(m, &sizes);
    let output = if has("output.weight") {
        "output: unembed { at = \"output\" }"
    } else {
        "output: unembed { tied = token_embd }"
    };
    write!(
        s,
        "\nembed {{\n  token_embd: embedding {{ at = \"token_embd\" }}\n  x = token_embd(tokens)\n}}\n"
    )
    .unwrap();
    let norm = |name: &str| format!("  {name}: rmsnorm {{ at = \"blk.{{layer}}.{name}\", eps = {eps} }}\n");
    let block = |sparse: bool| {
        let mut b = norm("attn_norm");
        b += &format!(
            "  attn: mla {{\n    at = \"blk.{{layer}}\", {q}\n    kv_a = \"attn_kv_a_mqa\", kv_norm = \"attn_kv_a_norm\", {kv_b}, o = \"attn_output\"\n    kv_rank = {kv_rank}, nope_dim = {nope}, rope_dim = {rope_dim}, v_dim = {v_dim}, eps = {eps}{scale}{bias}\n    position = rope {{ theta = {}{scaling}, pairs = interleaved }}\n  }}\n",
            crate::ir::num(theta)
        );
        b += &norm("ffn_norm");
        match (&moe, sparse) {
            (Some(moe), true) => b += moe,
            _ => b += "  mlp: mlp { at = \"blk.{layer}\", gate = \"ffn_gate\", up = \"ffn_up\", down = \"ffn_down\", act = silu }\n",
        }
        b + "\n  x = x + attn(attn_norm(x))\n  x = x + mlp(ffn_norm(x))\n"
    };
    if mixed {
        write!(s, "\nblock moe {{\n{}}}\n\nblock dense {{\n{}}}\n", block(true), block(false)).unwrap();
    } else {
        write!(s, "\nblock {{\n{}}}\n", block(kinds.first() == Some(&true))).unwrap();
    }
    write!(
        s,
        "\nhead {{\n  output_norm: rmsnorm {{ at = \"output_norm\", eps = {eps} }}\n  {output}\n  x = output(output_norm(x))\n}}\n"
    )
    .unwrap();
    s += &dtypes_section(listed);
    checked(m, s)
}
