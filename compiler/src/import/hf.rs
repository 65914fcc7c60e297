//! Hugging Face `config.json` → spec text.
//!
//! Each supported `model_type` maps its config fields onto the spec language and names
//! its checkpoint tensors as transformers saves them. Every field of the config is either
//! used, known not to affect inference (dropouts, token ids, …), or an error: a field this
//! importer does not understand could change the computation, so it is never ignored
//! silently.

use std::collections::HashSet;
use std::fmt::Write;

use serde_json::{Map, Value};

use crate::ir::RopeScaling;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("config.json is not valid JSON: {0}")]
    Json(String),
    #[error("config.json has no `model_type`")]
    NoModelType,
    #[error("model_type `{0}` is not supported (supported: {SUPPORTED})")]
    ModelType(String),
    #[error("config field `{key}` = {value} is not supported for model_type `{model}`: {why}")]
    Unsupported { model: String, key: String, value: String, why: String },
    #[error("config field `{key}` is missing or not {expected}")]
    Field { key: String, expected: &'static str },
    #[error("config.json describes a model that cannot be built; the spec written from it fails its checks:\n{report}")]
    Impossible { report: String },
}

const SUPPORTED: &str =
    "bert, bloom, cohere, distilbert, falcon, gemma, gemma2, gemma3_text, deepseek_v2, deepseek_v3, gpt2, gpt_neox, gptj, granite, granitemoe, gpt_oss, llama, mistral, mixtral, olmo, olmo2, olmoe, opt, phi, phi3, qwen2, qwen2_moe, qwen3, qwen3_moe, roberta, stablelm, starcoder2, xglm, xlm-roberta";

/// Keys that never change what inference computes.
fn ignorable(key: &str) -> bool {
    const KEYS: &[&str] = &[
        "architectures",
        "model_type",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "use_cache",
        "initializer_range",
        "init_std",
        "layerdrop",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "id2label",
        "label2id",
        "problem_type",
        "tokenizer_class",
        "prefix",
        "task_specific_params",
        "_name_or_path",
        "chunk_size_feed_forward",
        "pretraining_tp",
        "slow_but_exact",
        "summary_type",
        "summary_use_proj",
        "summary_activation",
        "summary_proj_to_labels",
        "summary_first_dropout",
        "gradient_checkpointing",
        "use_return_dict",
        "attn_implementation",
        "finetuning_task",
        "num_labels",
        "is_encoder_decoder",
        "tie_encoder_decoder",
        "bad_words_ids",
        "max_length",
        "is_llama_config",
        "_model_name_or_path",
        "auto_map",
        "keys_to_ignore_at_inference",
        // A mixture's training: the router's auxiliary losses and jitter.
        "output_router_logits",
        "router_aux_loss_coef",
        "router_jitter_noise",
        "aux_loss_alpha",
        "seq_aux",
        // Experts spread over devices, and DeepSeek-V3's multi-token prediction layers
        // (a training aid; inference reads the main layers only).
        "ep_size",
        "num_nextn_predict_layers",
    ];
    KEYS.contains(&key)
        || key.contains("dropout")
        || key.contains("pdrop")
        || key.ends_with("_token_id")
        || key.ends_with("_token_ids")
}

/// A config whose reads are tracked, so unread fields can be reported.
struct Config<'a> {
    model: String,
    map: &'a Map<String, Value>,
    read: HashSet<String>,
}

impl<'a> Config<'a> {
    fn get(&mut self, key: &str) -> Option<&'a Value> {
        self.read.insert(key.to_string());
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn usize(&mut self, key: &str) -> Result<usize, ImportError> {
        self.opt_usize(key)?.ok_or(ImportError::Field { key: key.into(), expected: "a whole number" })
    }

    /// A whole number up to 2^30, the most any spec size may be (so that products of two
    /// never overflow); larger ones could not compile anyway.
    fn opt_usize(&mut self, key: &str) -> Result<Option<usize>, ImportError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|&x| x <= 1 << 30)
                .map(|x| Some(x as usize))
                .ok_or(ImportError::Field { key: key.into(), expected: "a whole number up to 2^30" }),
        }
    }

    fn f64_or(&mut self, key: &str, default: f64) -> Result<f64, ImportError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or(ImportError::Field { key: key.into(), expected: "a number" }),
        }
    }

    fn bool_or(&mut self, key: &str, default: bool) -> Result<bool, ImportError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or(ImportError::Field { key: key.into(), expected: "true or false" }),
        }
    }

    fn str_or(&mut self, key: &str, default: &str) -> Result<String, ImportError> {
        match self.get(key) {
            None => Ok(default.to_string()),
            Some(v) => v
                .as_str()
                .map(str::to_string)
                .ok_or(ImportError::Field { key: key.into(), expected: "a string" }),
        }
    }

    fn unsupported(&self, key: &str, why: &str) -> ImportError {
        let value = self.map.get(key).map(|v| v.to_string()).unwrap_or_else(|| "(absent)".into());
        ImportError::Unsupported { model: self.model.clone(), key: key.into(), value, why: why.into() }
    }

    /// Fails if the field is set to anything but one of the accepted values.
    fn expect(&mut self, key: &str, accepted: &[Value], why: &str) -> Result<(), ImportError> {
        match self.get(key) {
            Some(v) if !accepted.contains(v) => Err(self.unsupported(key, why)),
            _ => Ok(()),
        }
    }

    fn act(&mut self, key: &str, default: &str) -> Result<&'static str, ImportError> {
        let a = self.str_or(key, default)?;
        Ok(match a.as_str() {
            "relu" => "relu",
            "gelu" => "gelu",
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => "gelu_tanh",
            "silu" | "swish" => "silu",
            "quick_gelu" => "quick_gelu",
            "relu2" => "relu2",
            "tanh" => "tanh",
            _ => {
                return Err(self.unsupported(
                    key,
                    "supported activations: relu, relu2, gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, quick_gelu, silu, swish, tanh",
                ))
            }
        })
    }

    /// RoPE settings, from `rope_parameters` (transformers 5) or the older top-level
    /// `rope_theta`/`rope_scaling`/`partial_rotary_factor`/`rotary_pct`: the base, the
    /// rotated fraction of each head, and the scaling (`default`, `linear` or `llama3`;
    /// any other `rope_type`, or a key the type does not have, is an error naming it).
    fn rope(&mut self, default_fraction: f64) -> Result<(f64, f64, RopeScaling), ImportError> {
        let mut theta = self.f64_or("rope_theta", 10000.0)?;
        theta = self.f64_or("rotary_emb_base", theta)?;
        let mut fraction = self.f64_or("partial_rotary_factor", default_fraction)?;
        fraction = self.f64_or("rotary_pct", fraction)?;
        let mut scaling = RopeScaling::None;
        for key in ["rope_scaling", "rope_parameters"] {
            let Some(p) = self.get(key) else { continue };
            let obj = p.as_object().ok_or(ImportError::Field { key: key.into(), expected: "an object" })?;
            let num = |k: &str| -> Result<Option<f64>, ImportError> {
                match obj.get(k).filter(|v| !v.is_null()) {
                    None => Ok(None),
                    Some(v) => v
                        .as_f64()
                        .map(Some)
                        .ok_or(ImportError::Field { key: format!("{key}.{k}"), expected: "a number" }),
                }
            };
            let need = |k: &str| -> Result<f64, ImportError> {
                num(k)?.ok_or(ImportError::Field { key: format!("{key}.{k}"), expected: "a number" })
            };
            if let Some(t) = num("rope_theta")? {
                theta = t;
            }
            if let Some(f) = num("partial_rotary_factor")? {
                fraction = f;
            }
            let kind = obj
                .get("rope_type")
                .or_else(|| obj.get("type"))
                .and_then(|t| t.as_str())
                .unwrap_or("default");
            let own: &[&str] = match kind {
                "default" => &[],
                "linear" => &["factor"],
                "dynamic" => &["factor", "original_max_position_embeddings"],
                "llama3" => {
                    &["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]
                }
                "yarn" => &[
                    "factor",
                    "original_max_position_embeddings",
                    "beta_fast",
                    "beta_slow",
                    "attention_factor",
                    "mscale",
                    "mscale_all_dim",
                    "truncate",
                ],
                "longrope" => &[
                    "short_factor",
                    "long_factor",
                    "factor",
                    "original_max_position_embeddings",
                    "attention_factor",
                ],
                other => {
                    return Err(self.unsupported(
                        key,
                        &format!(
                            "rope_type `{other}`: the supported ones are default, linear, dynamic, llama3, yarn and longrope"
                        ),
                    ))
                }
            };
            let common = ["rope_type", "type", "rope_theta", "partial_rotary_factor"];
            if let Some((k, v)) = obj
                .iter()
                .find(|(k, v)| !v.is_null() && !own.contains(&k.as_str()) && !common.contains(&k.as_str()))
            {
                return Err(
                    self.unsupported(key, &format!("`{k}` = {v} is not a setting of rope_type `{kind}`"))
                );
            }
            scaling = match kind {
                "linear" => RopeScaling::Linear { factor: need("factor")? },
                // transformers scales past `max_position_embeddings`, the length trained on.
                "dynamic" => RopeScaling::Dynamic {
                    factor: need("factor")?,
                    original_max_seq: num("original_max_position_embeddings")?
                        .or_else(|| self.map.get("max_position_embeddings").and_then(Value::as_f64))
                        .unwrap_or(0.0) as usize,
                    max_seq: 0,
                },
                "llama3" => RopeScaling::Llama3 {
                    factor: need("factor")?,
                    low_freq_factor: need("low_freq_factor")?,
                    high_freq_factor: need("high_freq_factor")?,
                    original_max_seq: need("original_max_position_embeddings")? as usize,
                },
                "yarn" => {
                    let truncate = match obj.get("truncate") {
                        None => true,
                        Some(Value::Bool(t)) => *t,
                        Some(_) => return Err(self.unsupported(key, "`truncate` must be true or false")),
                    };
                    // As transformers: with an original length, the factor is the ratio of
                    // the model's length to it.
                    let original = num("original_max_position_embeddings")?;
                    let max_seq = self.map.get("max_position_embeddings").and_then(Value::as_f64);
                    let factor = match (original, max_seq) {
                        (Some(o), Some(m)) if o > 0.0 => m / o,
                        _ => need("factor")?,
                    };
                    let ms = |m: f64| if factor <= 1.0 { 1.0 } else { 0.1 * m * factor.ln() + 1.0 };
                    let attention_factor =
                        match (num("attention_factor")?, num("mscale")?, num("mscale_all_dim")?) {
                            (Some(a), ..) => a,
                            (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => ms(m) / ms(all),
                            _ => RopeScaling::yarn_attention_factor(factor),
                        };
                    RopeScaling::Yarn {
                        factor,
                        original_max_seq: original.or(max_seq).unwrap_or(0.0) as usize,
                        beta_fast: num("beta_fast")?.unwrap_or(32.0),
                        beta_slow: num("beta_slow")?.unwrap_or(1.0),
                        attention_factor,
                        truncate,
                    }
                }
                "longrope" => {
                    let list = |k: &str| -> Result<Vec<f64>, ImportError> {
                        let bad = || ImportError::Field {
                            key: format!("{key}.{k}"),
                            expected: "a list of numbers",
                        };
                        let items = obj.get(k).and_then(Value::as_array).ok_or_else(bad)?;
                        items.iter().map(|x| x.as_f64().ok_or_else(bad)).collect()
                    };
                    // As transformers: the factor, unless given, is the ratio of the model's
                    // length to the original one (Phi-3 states that at the top level).
                    let top = self.get("original_max_position_embeddings").and_then(Value::as_f64);
                    let max_seq = self.map.get("max_position_embeddings").and_then(Value::as_f64);
                    let original = top.or(num("original_max_position_embeddings")?).or(max_seq);
                    let original = original.ok_or(ImportError::Field {
                        key: "original_max_position_embeddings".into(),
                        expected: "a number",
                    })?;
                    let factor = match (num("factor")?, max_seq) {
                        (Some(f), _) => f,
                        (None, Some(m)) if original > 0.0 => m / original,
                        _ => 1.0,
                    };
                    RopeScaling::Longrope {
                        short_factor: list("short_factor")?,
                        long_factor: list("long_factor")?,
                        original_max_seq: original as usize,
                        attention_factor: num("attention_factor")?
                            .unwrap_or(RopeScaling::longrope_attention_factor(factor, original as usize)),
                        long: false,
                    }
                }
                _ => RopeScaling::None,
            };
        }
        Ok((theta, fraction, scaling))
    }

    /// Which of `layers` layers have sliding-window attention: `layer_types`
    /// (`sliding_attention` or `full_attention` per layer) when the config has it, else
    /// `default` of each layer.
    fn layer_types(
        &mut self,
        layers: usize,
        default: Box<dyn Fn(usize) -> bool + '_>,
    ) -> Result<Vec<bool>, ImportError> {
        let Some(t) = self.get("layer_types") else { return Ok((0..layers).map(default).collect()) };
        t.as_array()
            .filter(|a| a.len() == layers)
            .and_then(|a| {
                a.iter()
                    .map(|t| match t.as_str() {
                        Some("sliding_attention") => Some(true),
                        Some("full_attention") => Some(false),
                        _ => None,
                    })
                    .collect::<Option<Vec<bool>>>()
            })
            .ok_or_else(|| {
                self.unsupported(
                    "layer_types",
                    &format!("expected {layers} entries, each sliding_attention or full_attention"),
                )
            })
    }

    fn finish(&self) -> Result<(), ImportError> {
        let mut keys: Vec<&String> = self.map.keys().collect();
        keys.sort();
        for k in keys {
            if !self.read.contains(k) && !ignorable(k) {
                return Err(self.unsupported(
                    k,
                    "this importer does not know what the field means, so it cannot promise a faithful spec",
                ));
            }
        }
        Ok(())
    }
}

/// The spec being written.
#[derive(Default)]
struct Gen {
    comments: Vec<String>,
    name: String,
    sizes: Vec<(&'static str, String)>,
    embed: Vec<String>,
    block: Vec<String>,
    /// Named block variants (instead of `block`), and the `pattern` the layers run them in.
    variants: Vec<(String, Vec<String>)>,
    head: Vec<String>,
}

impl Gen {
    /// The block, or, when some layers slide and others do not, a `sliding` and a `full`
    /// variant and the shortest `pattern` of them that repeats over the layers.
    fn per_layer_type(&mut self, types: &[bool], sliding: Vec<String>, full: Vec<String>) {
        let kinds: Vec<usize> = types.iter().map(|&s| if s { 0 } else { 1 }).collect();
        self.per_layer(&kinds, vec![("sliding".into(), sliding), ("full".into(), full)]);
    }

    /// The block, or, when layers differ, the variants the layers run (`kinds[l]` indexes
    /// `variants`), in the order given, and the shortest `pattern` of them that repeats
    /// over the layers.
    fn per_layer(&mut self, kinds: &[usize], mut variants: Vec<(String, Vec<String>)>) {
        // No layers (an error the front end reports): the last variant.
        let first = kinds.first().copied().unwrap_or(variants.len() - 1);
        if kinds.iter().all(|&k| k == first) {
            self.block = variants.swap_remove(first).1;
            return;
        }
        let n = kinds.len();
        let period = (1..=n).find(|&p| (0..n).all(|i| kinds[i] == kinds[i % p])).unwrap_or(n);
        let names: Vec<&str> = kinds[..period].iter().map(|&k| variants[k].0.as_str()).collect();
        self.size("pattern", format!("[{}]", names.join(", ")));
        self.variants =
            variants.into_iter().enumerate().filter(|(k, _)| kinds.contains(k)).map(|(_, v)| v).collect();
    }

    fn size(&mut self, key: &'static str, v: impl ToString) {
        self.sizes.push((key, v.to_string()));
    }

    fn text(&self) -> String {
        let mut s = String::new();
        for c in &self.comments {
            writeln!(s, "# {c}").unwrap();
        }
        writeln!(s, "model {}\n", self.name).unwrap();
        let w = self.sizes.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, v) in &self.sizes {
            writeln!(s, "{k:w$} = {v}").unwrap();
        }
        let mut sections = vec![("embed".to_string(), &self.embed), ("block".to_string(), &self.block)];
        sections.extend(self.variants.iter().map(|(n, lines)| (format!("block {n}"), lines)));
        sections.push(("head".to_string(), &self.head));
        for (name, lines) in sections {
            if lines.is_empty() {
                continue;
            }
            writeln!(s, "\n{name} {{").unwrap();
            for l in lines.iter() {
                if l.is_empty() {
                    s.push('\n');
                } else {
                    writeln!(s, "  {l}").unwrap();
                }
            }
            s.push_str("}\n");
        }
        s
    }
}

fn num(x: f64) -> String {
    crate::ir::num(x)
}

/// `kind { fields }` with one more field (only the last ` }` closes it: a nested value's
/// braces stay).
fn with_field(value: &str, field: &str) -> String {
    format!("{}, {field} }}", value.strip_suffix(" }").unwrap_or(value))
}

fn rope_text(theta: f64, fraction: f64, scaling: RopeScaling) -> String {
    let mut fields = vec![format!("theta = {}", num(theta))];
    if fraction != 1.0 {
        fields.push(format!("fraction = {}", num(fraction)));
    }
    match scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => fields.push(format!("scaling = linear {{ factor = {} }}", num(factor))),
        RopeScaling::PerPair { factors } => fields.push(format!(
            "scaling = per_pair {{ factors = [{}] }}",
            factors.iter().map(|&f| num(f)).collect::<Vec<_>>().join(", ")
        )),
        RopeScaling::Dynamic { factor, original_max_seq, .. } => fields.push(format!(
            "scaling = dynamic {{ factor = {}, original_max_seq = {original_max_seq} }}",
            num(factor)
        )),
        RopeScaling::Yarn { factor, original_max_seq, beta_fast, beta_slow, attention_factor, truncate } => {
            let mut y = format!("factor = {}, original_max_seq = {original_max_seq}", num(factor));
            if (beta_fast, beta_slow) != (32.0, 1.0) {
                y.push_str(&format!(", beta_fast = {}, beta_slow = {}", num(beta_fast), num(beta_slow)));
            }
            if attention_factor != RopeScaling::yarn_attention_factor(factor) {
                y.push_str(&format!(", attention_factor = {}", num(attention_factor)));
            }
            if !truncate {
                y.push_str(", truncate = false");
            }
            fields.push(format!("scaling = yarn {{ {y} }}"))
        }
        RopeScaling::Longrope { short_factor, long_factor, original_max_seq, attention_factor, .. } => {
            let list = |xs: &[f64]| xs.iter().map(|&x| num(x)).collect::<Vec<_>>().join(", ");
            fields.push(format!(
                "scaling = longrope {{\n      short_factor = [{}],\n      long_factor = [{}],\n      original_max_seq = {original_max_seq}, attention_factor = {}\n    }}",
                list(&short_factor),
                list(&long_factor),
                num(attention_factor)
            ))
        }
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_seq } => fields.push(format!(
            "scaling = llama3 {{ factor = {}, low_freq_factor = {}, high_freq_factor = {}, original_max_seq = {original_max_seq} }}",
            num(factor),
            num(low_freq_factor),
            num(high_freq_factor)
        )),
    }
    format!("rope {{ {} }}", fields.join(", "))
}

/// Writes a spec for the model a `config.json` describes.
pub fn import(config_json: &str) -> Result<String, ImportError> {
    let v: Value = serde_json::from_str(config_json).map_err(|e| ImportError::Json(e.to_string()))?;
    let map = v.as_object().ok_or(ImportError::Json("the top level is not an object".into()))?;
    let model = map.get("model_type").and_then(|m| m.as_str()).ok_or(ImportError::NoModelType)?.to_string();
    let mut c = Config { model: model.clone(), map, read: HashSet::new() };
    // The spec's name is an identifier: `xlm-roberta` becomes `xlm_roberta`.
    let name = model.chars().map(|ch| if ch.is_ascii_alphanumeric() { ch } else { '_' }).collect();
    let mut g = Gen { name, ..Gen::default() };
    g.comments
        .push(format!("Imported from a Hugging Face config.json (model_type `{model}`) by `tfc import-hf`."));
    match model.as_str() {
        "gpt2" => gpt2(&mut c, &mut g)?,
        "llama" | "mistral" | "qwen2" | "qwen3" | "gemma" | "granite" | "olmo" | "olmo2" | "phi3"
        | "mixtral" | "qwen2_moe" | "qwen3_moe" | "olmoe" | "granitemoe" | "gpt_oss" | "deepseek_v2"
        | "deepseek_v3" => llama_like(&mut c, &mut g)?,
        "starcoder2" => starcoder2(&mut c, &mut g)?,
        "stablelm" => stablelm(&mut c, &mut g)?,
        "cohere" => cohere(&mut c, &mut g)?,
        "gptj" => gptj(&mut c, &mut g)?,
        "falcon" => falcon(&mut c, &mut g)?,
        "xglm" => xglm(&mut c, &mut g)?,
        "gemma2" | "gemma3_text" => gemma_local_global(&mut c, &mut g)?,
        "gpt_neox" => gpt_neox(&mut c, &mut g)?,
        "bloom" => bloom(&mut c, &mut g)?,
        "opt" => opt(&mut c, &mut g)?,
        "phi" => phi(&mut c, &mut g)?,
        "bert" | "roberta" | "xlm-roberta" => bert(&mut c, &mut g)?,
        "distilbert" => distilbert(&mut c, &mut g)?,
        _ => return Err(ImportError::ModelType(model)),
    }
    c.finish()?;
    // Sizes that do not fit together (heads that do not divide the width, kv heads that
    // do not divide the heads, …) are the front end's to find: the spec must compile.
    let text = g.text();
    match crate::front::compile_spec("config.json (imported)", &text, &Default::default()) {
        Ok(_) => Ok(text),
        Err(d) => Err(ImportError::Impossible { report: d.render(false) }),
    }
}

fn gpt2(c: &mut Config, g: &mut Gen) -> Result<(), ImportError> {
    let d = c.usize("n_embd")?;
    g.size("vocab", c.usize("vocab_size")?);
    g.size("d_model", d);
    g.size("layers", c.usize("n_layer")?);
    g.size("heads", c.usize("n_head")?);
    g.size("d_ff", c.opt_usize("n_inner")?.unwrap_or(4 * d));
    let max_seq = c.usize("n_positions")?;
    c.opt_usize("n_ctx")?;
    g.size("max_seq", max_seq);
    let eps = num(c.f64_or("layer_norm_epsilon", 1e-5)?);
    let act = c.act("activation_function", "gelu_new")?;
    let scaled = c.bool_or("scale_attn_weights", true)?;
    c.expect(
        "scale_attn_by_inverse_layer_idx",
        &[false.into()],
        "per-layer attention scaling is not supported",
    )?;
    c.expect("reorder_and_upcast_attn", &[false.into()], "upcast attention reordering is not supported")?;
    c.expect("add_cross_attention", &[false.into()], "cross-attention is not supported")?;
    let tied = c.bool_or("tie_word_embeddings", true)?;
    let scale = if scaled { String::new() } else { ", scale = 1".into() };
    g.embed = vec![
        "wte: embedding { at = \"transformer.wte\" }".into(),
        format!("wpe: embedding {{ at = \"transformer.wpe\", rows = {max_seq} }}"),
        "x = wte(tokens) + wpe(positions)".into(),
    ];
    let h = "transformer.h.{layer}";
    g.block = vec![
        format!("ln_1: layernorm {{ at = \"{h}.ln_1\", eps = {eps} }}"),
        format!("attn: attention {{ at = \"{h}.attn\", qkv = \"c_attn\", o = \"c_proj\", bias = true, transposed = true{scale} }}"),
        format!("ln_2: layernorm {{ at = \"{h}.ln_2\", eps = {eps} }}"),
        format!("mlp: mlp {{ at = \"{h}.mlp\", up = \"c_fc\", down = \"c_proj\", act = {act}, bias = true, transposed = true }}"),
        String::new(),
        "x = x + attn(ln_1(x))".into(),
        "x = x + mlp(ln_2(x))".into(),
    ];
    g.head = vec![
        format!("ln_f: layernorm {{ at = \"transformer.ln_f\", eps = {eps} }}"),
        unembed(tied, "wte", "lm_head", false),
        "x = lm_head(ln_f(x))".into(),
    ];
    Ok(())
}

fn unembed(tied: bool, embedding: &str, at: &str, bias: bool) -> String {
    let bias = if bias { ", bias = true" } else { "" };
    if tied {
        format!("lm_head: unembed {{ tied = {embedding}{bias} }}")
    } else {
        format!("lm_head: unembed {{ at = \"{at}\"{bias} }}")
    }
}

fn llama_like(c: &mut Config, g: &mut Gen) -> Result<(), ImportError> {
    let model = c.model.clone();
    let gemma = model == "gemma";
    let deepseek = model == "deepseek_v2" || model == "deepseek_v3";
    let d = c.usize("hidden_size")?;
    let heads = c.usize("num_attention_heads")?;
    g.size("vocab", c.usize("vocab_size")?);
    g.size("d_model", d);
    g.size("layers", c.usize("num_hidden_layers")?);
    g.size("heads", heads);
    if let Some(kv) = c.opt_usize("num_key_value_heads")? {
        if kv != heads {
            g.size("kv_heads", kv);
        }
    }
    if let Some(hd) = c.opt_usize("head_dim")? {
        // DeepSeek's `head_dim` is the rotated part's (the latent attention's own sizes
        // say the rest).
        if hd * heads != d && !deepseek {
            g.size("head_dim", hd);
        }
    }
    g.size("d_ff", c.usize("intermediate_size")?);
    g.size("max_seq", c.usize("max_position_embeddings")?);
    let eps = num(c.f64_or("rms_norm_eps", 1e-6)?);
    let act = if gemma {
        let a = c.act("hidden_act", "gelu_pytorch_tanh")?;
        c.act("hidden_activation", a_name(a))?
    } else {
        c.act("hidden_act", "silu")?
    };
    let (theta, fraction, scaling) = c.rope(1.0)?;
    let attn_bias = c.bool_or("attention_bias", false)?;
    let mlp_bias = c.bool_or("mlp_bias", false)?;
    let tied = c.bool_or("tie_word_embeddings", gemma)?;
    let layers = c.usize("num_hidden_layers")?;
    let window = c.opt_usize("sliding_window")?;
    // Which layers slide, unless `layer_types` says: Mistral's and Phi-3's window is on
    // every layer; Qwen's, with `use_sliding_window`, from `max_window_layers` on.
    let slides: Box<dyn Fn(usize) -> bool> = match model.as_str() {
        "mistral" | "phi3" | "mixtral" => Box::new(move |_| window.is_some()),
        "qwen2" | "qwen3" | "qwen2_moe" | "qwen3_moe" => {
            c.expect("use_mrope", &[false.into()], "multimodal RoPE (Qwen2-VL) is not supported")?;
            let on = c.bool_or("use_sliding_window", false)?;
            let from = c.opt_usize("max_window_layers")?.unwrap_or(0);
            Box::new(move |l| on && l >= from)
        }
        "gemma" => {
            c.expect("use_bidirectional_attention", &[false.into()], "only causal Gemma is supported")?;
            Box::new(|_| false)
        }
        "olmo" | "olmoe" => {
            c.expect(
                "clip_qkv",
                &[Value::Null],
                "clamping the q/k/v projections (`clip_qkv`) is not supported",
            )?;
            Box::new(|_| false)
        }
        _ => Box::new(|_| false),
    };
    let types = c.layer_types(layers, slides)?;
    if types.contains(&true) && window.is_none() {
        return Err(c.unsupported("sliding_window", "sliding layers need a `sliding_window` size"));
    }
    let qkv_bias = model == "qwen2" || model == "qwen2_moe" && c.bool_or("qkv_bias", true)?;
    let bias = match (qkv_bias, attn_bias) {
        (true, _) => ", bias = [q, k, v]",
        (_, true) => ", bias = true",
        _ => "",
    };
    // Qwen3 normalises each query and key head (RMSNorm, `q_norm`/`k_norm`) before RoPE;
    // OLMo 2 the whole query and key projections.
    let qk_norm = match model.as_str() {
        "qwen3" | "qwen3_moe" => Some(format!("  qk_norm = rmsnorm {{ eps = {eps} }}")),
        "olmo2" | "olmoe" => Some(format!("  qk_norm = rmsnorm {{ eps = {eps}, over = width }}")),
        _ => None,
    };
    // Granite's multipliers: of the embedding, of each residual branch, of the attention
    // scores (the scale itself) and, divided, of the logits.
    let granite = model == "granite" || model == "granitemoe";
    let mult = |c: &mut Config, key: &str| -> Result<Option<f64>, ImportError> {
        Ok(if granite { Some(c.f64_or(key, 1.0)?) } else { None }.filter(|&m| m != 1.0))
    };
    let (embed_mult, residual_mult) = (mult(c, "embedding_multiplier")?, mult(c, "residual_multiplier")?);
    let logits_div = mult(c, "logits_scaling")?;
    let scale = match granite.then(|| c.f64_or("attention_multiplier", 0.0)).transpose()? {
        Some(m) if m > 0.0 => format!(", scale = {}", num(m)),
        _ => String::new(),
    };
    let branch = |call: &str| match residual_mult {
        Some(m) => format!("{call} * {}", num(m)),
        None => call.to_string(),
    };
    g.embed = vec!["embed_tokens: embedding { at = \"model.embed_tokens\" }".into()];
    g.embed.push(match (gemma, embed_mult) {
        (true, _) => "x = embed_tokens(tokens) * sqrt(d_model)".into(),
        (_, Some(m)) => format!("x = embed_tokens(tokens) * {}", num(m)),
        _ => "x = embed_tokens(tokens)".into(),
    });
    // OLMo (1) normalises without parameters: a LayerNorm with no gain and no bias.
    let olmo = model == "olmo";
    let norm = |at: &str, name: &str| {
        let offset = if gemma { ", unit_offset = true" } else { "" };
        if olmo {
            format!("{name}: layernorm {{ at = \"{at}\", eps = 1e-5, weight = false, bias = false }}")
        } else {
            format!("{name}: rmsnorm {{ at = \"{at}\", eps = {eps}{offset} }}")
        }
    };
    let l = "model.layers.{layer}";
    let mlp_bias = if mlp_bias { ", bias = true" } else { "" };
    // OLMo 2 normalises each sublayer's output instead of its input.
    let after = model == "olmo2";
    // Phi-3 fuses the query, key and value projections, and the gate and up ones.
    let phi3 = model == "phi3";
    let qkv = if phi3 { "qkv = \"qkv_proj\"" } else { "q = \"q_proj\", k = \"k_proj\", v = \"v_proj\"" };
    let gate_up = if phi3 { "gate_up = \"gate_up_proj\"" } else { "gate = \"gate_proj\", up = \"up_proj\"" };
    let rope = rope_text(theta, fraction, scaling);
    let (sparse, moe) = match mixture(c, &model, act, layers)? {
        Some((sparse, moe)) => (sparse, Some(moe)),
        None => (vec![false; layers], None),
    };
    // gpt-oss: one learned sink logit per head in every softmax.
    let sinks = if model == "gpt_oss" { ", sinks = \"sinks\"" } else { "" };
    let mla = if deepseek { Some(latent_attention(c, &rope, attn_bias)?) } else { None };
    let block = |window: Option<usize>, sparse: bool| {
        let window = window.map(|w| format!(", window = {w}")).unwrap_or_default();
        let mut b = if after { vec![] } else { vec![norm(&format!("{l}.input_layernorm"), "input_norm")] };
        match &mla {
            Some(m) => b.extend(m.iter().cloned()),
            None => {
                b.extend([
                    "attn: attention {".to_string(),
                    format!("  at = \"{l}.self_attn\", {qkv}, o = \"o_proj\"{bias}{scale}{sinks}"),
                    format!("  position = {rope}{window}"),
                ]);
                b.extend(qk_norm.clone());
                b.push("}".into());
            }
        }
        b.extend([norm(
            &format!("{l}.post_attention_layernorm"),
            if after { "post_attn_norm" } else { "post_norm" },
        )]);
        if after {
            b.push(norm(&format!("{l}.post_feedforward_layernorm"), "post_mlp_norm"));
        }
        b.extend([
            match (&moe, sparse) {
                (Some(moe), true) => moe.clone(),
                _ => format!(
                    "mlp: mlp {{ at = \"{l}.mlp\", {gate_up}, down = \"down_proj\", act = {act}{mlp_bias} }}"
                ),
            },
            String::new(),
        ]);
        if after {
            b.extend(["x = x + post_attn_norm(attn(x))".into(), "x = x + post_mlp_norm(mlp(x))".into()]);
        } else {
            b.extend([
                format!("x = x + {}", branch("attn(input_norm(x))")),
                format!("x = x + {}", branch("mlp(post_norm(x))")),
            ]);
        }
        b
    };
    // A variant per kind of layer: sliding or not, a mixture or a dense MLP, each part
    // of the name only where the layers differ in it.
    let (slides, mixed) =
        (types.contains(&true) && types.contains(&false), sparse.iter().any(|&s| s != sparse[0]));
    let mut variants = Vec::new();
    for (s, m) in [(true, true), (false, true), (true, false), (false, false)] {
        let mut name: Vec<&str> = Vec::new();
        if slides {
            name.push(if s { "sliding" } else { "full" });
        }
        if mixed {
            name.push(if m { "moe" } else { "dense" });
        }
        let name = if name.is_empty() { "block".to_string() } else { name.join("_") };
        variants.push((name, block(if s { window } else { None }, m)));
    }
    let kinds: Vec<usize> =
        types.iter().zip(&sparse).map(|(&s, &m)| 2 * (!m as usize) + !s as usize).collect();
    g.per_layer(&kinds, variants);
    g.head = vec![
        norm("model.norm", "norm"),
        unembed(tied, "embed_tokens", "lm_head", false),
        match logits_div {
            Some(d) => format!("x = lm_head(norm(x)) / {}", num(d)),
            None => "x = lm_head(norm(x))".into(),
        },
    ];
    Ok(())
}

/// DeepSeek's multi-head latent attention (`mla`): a low-rank query where `q_lora_rank`
/// is set, RoPE on adjacent pairs (`rope_interleave`, DeepSeek-V2's complex rotation),
/// and YaRN's `mscale_all_dim` folded into the scale as transformers does.
fn latent_attention(c: &mut Config, rope: &str, bias: bool) -> Result<Vec<String>, ImportError> {
    let l = "model.layers.{layer}";
    let (nope, rope_dim, v) =
        (c.usize("qk_nope_head_dim")?, c.usize("qk_rope_head_dim")?, c.usize("v_head_dim")?);
    if let Some(qk) = c.opt_usize("qk_head_dim")? {
        if qk != nope + rope_dim {
            return Err(c.unsupported("qk_head_dim", "must be qk_nope_head_dim + qk_rope_head_dim"));
        }
    }
    let q = match c.opt_usize("q_lora_rank")? {
        Some(r) => {
            format!("q_a = \"q_a_proj\", q_norm = \"q_a_layernorm\", q_b = \"q_b_proj\", q_rank = {r}")
        }
        None => "q = \"q_proj\"".into(),
    };
    let pairs = c.bool_or("rope_interleave", true)?;
    let rope = match pairs {
        true => with_field(rope, "pairs = interleaved"),
        false => rope.to_string(),
    };
    let mut scale = 1.0f64;
    let params =
        ["rope_parameters", "rope_scaling"].iter().find_map(|k| c.map.get(*k)).and_then(Value::as_object);
    if let Some(p) =
        params.filter(|p| p.get("rope_type").or(p.get("type")).and_then(Value::as_str) != Some("default"))
    {
        let all = p.get("mscale_all_dim").and_then(Value::as_f64).unwrap_or(0.0);
        let factor = p.get("factor").and_then(Value::as_f64).unwrap_or(1.0);
        if all != 0.0 && factor > 1.0 {
            let m = 0.1 * all * factor.ln() + 1.0;
            scale *= m * m;
        }
    }
    Ok(vec![
        "attn: mla {".into(),
        format!("  at = \"{l}.self_attn\", {q}"),
        "  kv_a = \"kv_a_proj_with_mqa\", kv_norm = \"kv_a_layernorm\", kv_b = \"kv_b_proj\", o = \"o_proj\""
            .into(),
        format!(
            // The latent's and the query's RMSNorms keep their own epsilon, 1e-6, whatever
            // `rms_norm_eps` says (transformers builds them without it).
            "  kv_rank = {}, nope_dim = {nope}, rope_dim = {rope_dim}, v_dim = {v}, eps = 1e-6{}{}",
            c.usize("kv_lora_rank")?,
            match scale {
                1.0 => String::new(),
                m => format!(", scale = {}", num(m / ((nope + rope_dim) as f64).sqrt())),
            },
            if bias { ", bias = true" } else { "" }
        ),
        format!("  position = {rope}"),
        "}".into(),
    ])
}

/// The mixture of experts of a llama-like family, if it is one: which of the `layers`
/// layers run it (the others a dense MLP), and its `moe` component.
fn mixture(
    c: &mut Config,
    model: &str,
    act: &str,
    layers: usize,
) -> Result<Option<(Vec<bool>, String)>, ImportError> {
    let l = "model.layers.{layer}";
    let (experts_key, at, router, names) = match model {
        "mixtral" => (
            "num_local_experts",
            "block_sparse_moe",
            "gate",
            "expert = \"experts.{expert}\", gate = \"w1\", up = \"w3\", down = \"w2\"",
        ),
        "qwen2_moe" | "qwen3_moe" | "olmoe" => (
            "num_experts",
            "mlp",
            "gate",
            "expert = \"experts.{expert}\", gate = \"gate_proj\", up = \"up_proj\", down = \"down_proj\"",
        ),
        "granitemoe" => (
            "num_local_experts",
            "block_sparse_moe",
            "router.layer",
            "gate_up = \"input_linear\", down = \"output_linear\"",
        ),
        // gpt-oss: a router with a bias, the experts as 3-D `[E, in, out]` tensors named
        // without `.weight`, gate and up outputs alternating, biases, and a GLU
        // `(clamp(up) + 1) · g · sigmoid(α · g)` of the gate `g` capped at the limit.
        "deepseek_v2" | "deepseek_v3" => (
            "n_routed_experts",
            "mlp",
            "gate",
            "expert = \"experts.{expert}\", gate = \"gate_proj\", up = \"up_proj\", down = \"down_proj\"",
        ),
        "gpt_oss" => (
            "num_local_experts",
            "mlp",
            "router",
            "router_bias = true, gate_up = \"experts.gate_up_proj\", down = \"experts.down_proj\"\n    names = as_given, interleaved = true, transposed = true, bias = true",
        ),
        _ => return Ok(None),
    };
    // Published Qwen and OLMoE configs say `num_experts`, transformers' own may say
    // `num_local_experts`.
    let experts = match (experts_key, c.get(experts_key).is_none() && c.get("num_local_experts").is_some()) {
        ("num_experts", true) => c.usize("num_local_experts")?,
        _ => c.usize(experts_key)?,
    };
    let top_k = c.usize("num_experts_per_tok")?;
    let mut fields = vec![format!("experts = {experts}, top_k = {top_k}")];
    match model {
        // Mixtral always renormalises the chosen weights; GraniteMoE takes a softmax
        // over the chosen logits.
        "mixtral" => fields.push("normalize = true".into()),
        "granitemoe" | "gpt_oss" => fields.push("scoring = softmax_chosen".into()),
        "deepseek_v2" | "deepseek_v3" => deepseek_routing(c, model, experts, &mut fields)?,
        _ => {
            if c.bool_or("norm_topk_prob", false)? {
                fields.push("normalize = true".into());
            }
        }
    }
    // Qwen's experts have their own width; the dense layers' is `intermediate_size`.
    let qwen = model == "qwen2_moe" || model == "qwen3_moe";
    let deepseek = model == "deepseek_v2" || model == "deepseek_v3";
    if qwen || deepseek {
        fields.push(format!("d_expert = {}", c.usize("moe_intermediate_size")?));
    }
    let act = if model == "gpt_oss" {
        // σ(α·g)·g is quick_gelu's form; its α is 1.702.
        let alpha = c.f64_or("swiglu_alpha", 1.702)?;
        if alpha != 1.702 {
            return Err(c.unsupported("swiglu_alpha", "only 1.702 (quick_gelu's constant) is supported"));
        }
        let limit = c.f64_or("swiglu_limit", 7.0)?;
        format!("quick_gelu, clamp = {}, up_offset = 1", num(limit))
    } else {
        act.to_string()
    };
    fields.push(format!("router = \"{router}\", {names}, act = {act}"));
    if deepseek {
        let n = c.opt_usize("n_shared_experts")?.unwrap_or(0);
        if n > 0 {
            let f = c.usize("moe_intermediate_size")? * n;
            fields.push(format!("shared = \"shared_experts\", d_shared = {f}"));
        }
    }
    if model == "qwen2_moe" {
        fields.push(format!(
            "shared = \"shared_expert\", d_shared = {}, shared_gate = \"shared_expert_gate\"",
            c.usize("shared_expert_intermediate_size")?
        ));
    }
    let sparse = if qwen {
        let step = c.opt_usize("decoder_sparse_step")?.unwrap_or(1);
        let dense: Vec<usize> = match c.get("mlp_only_layers") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect())
                .ok_or_else(|| c.unsupported("mlp_only_layers", "expected a list of layer indices"))?,
        };
        if step == 0 {
            return Err(c.unsupported("decoder_sparse_step", "must be at least 1"));
        }
        (0..layers).map(|i| experts > 0 && !dense.contains(&i) && (i + 1) % step == 0).collect()
    } else if deepseek {
        // Dense first layers, then a mixture every `moe_layer_freq` layers.
        let first = c.opt_usize("first_k_dense_replace")?.unwrap_or(0);
        let freq = c.opt_usize("moe_layer_freq")?.unwrap_or(1).max(1);
        (0..layers).map(|i| experts > 0 && i >= first && i % freq == 0).collect()
    } else {
        vec![true; layers]
    };
    let moe = format!("mlp: moe {{\n    at = \"{l}.{at}\"\n    {}\n  }}", fields.join("\n    "));
    Ok(Some((sparse, moe)))
}

/// DeepSeek's router: V3 scores by sigmoid and chooses by the scores plus a correction
/// bias within the best groups (ranked by their two best experts); V2 scores by softmax
/// and, `group_limited_greedy`, chooses within the groups of the best experts.
fn deepseek_routing(
    c: &mut Config,
    model: &str,
    experts: usize,
    fields: &mut Vec<String>,
) -> Result<(), ImportError> {
    let v3 = model == "deepseek_v3";
    let method = c.str_or("topk_method", if v3 { "noaux_tc" } else { "greedy" })?;
    let scoring = c.str_or("scoring_func", if v3 { "sigmoid" } else { "softmax" })?;
    match (v3, scoring.as_str()) {
        (true, "sigmoid") => fields.push("scoring = sigmoid".into()),
        (false, "softmax") => {}
        _ => return Err(c.unsupported("scoring_func", "DeepSeek-V3 scores by sigmoid, V2 by softmax")),
    }
    let groups = c.opt_usize("n_group")?.unwrap_or(1);
    let keep = c.opt_usize("topk_group")?.unwrap_or(groups);
    let grouped = match (v3, method.as_str()) {
        (true, "noaux_tc") => {
            fields.push("choice_bias = \"gate.e_score_correction_bias\"".into());
            "top2_sum"
        }
        (false, "greedy") => "",
        (false, "group_limited_greedy") => "max",
        _ => {
            return Err(c.unsupported("topk_method", "V3's noaux_tc, or V2's greedy or group_limited_greedy"))
        }
    };
    if !grouped.is_empty() && groups > 1 {
        if experts % groups != 0 {
            return Err(c.unsupported("n_group", "the experts must fall into equal groups"));
        }
        fields.push(format!("groups = {groups}, topk_groups = {keep}, group_score = {grouped}"));
    }
    // transformers' DeepSeek-V2 router never renormalises, whatever `norm_topk_prob` says.
    let normalize = c.bool_or("norm_topk_prob", v3)?;
    if v3 && normalize {
        fields.push("normalize = true".into());
    }
    let scale = c.f64_or("routed_scaling_factor", 1.0)?;
    if scale != 1.0 {
        fields.push(format!("scale = {}", num(scale)));
    }
    Ok(())
}

/// StarCoder2: LayerNorms with biases, biases on every projection, a plain (ungated)
/// MLP, and an optional sliding window.
fn starcoder2(c: &mut Config, g: &mut Gen) -> Result<(), ImportError> {
    decoder_sizes(c, g)?;
    let eps = num(c.f64_or("norm_epsilon", 1e-5)?);
    let act = c.act("hidden_act", "gelu_pytorch_tanh")?;
    let (theta, fraction, scaling) = c.rope(1.0)?;
    let bias = if c.bool_or("use_bias", true)? { ", bias = true" } else { "" };
    let window = c.opt_usize("sliding_window")?.map(|w| format!(", window = {w}")).unwrap_or_default();
    for key in ["embedding_dropout", "residual_dropout"] {
        c.f64_or(key, 0.0)?;
    }
    let tied = c.bool_or("tie_word_embeddings", true)?;
    let l = "model.layers.{layer}";
    let norm = |name: &str, at: &str| format!("{name}: layernorm {{ at = \"{at}\", eps = {eps} }}");
    g.embed = vec![
        "embed_tokens: embedding { at = \"model.embed_tokens\" }".into(),
        "x = embed_tokens(tokens)".into(),
    ];
    g.block = vec![
        norm("input_norm", &format!("{l}.input_layernorm")),
        "attn: attention {".into(),
        format!(
            "  at = \"{l}.self_attn\", q = \"q_proj\", k = \"k_proj\", v = \"v_proj\", o = \"o_proj\"{bias}"
        ),
        format!("  position = {}{window}", rope_text(theta, fraction, scaling)),
        "}".into(),
        norm("post_norm", &format!("{l}.post_attention_layernorm")),
        format!("mlp: mlp {{ at = \"{l}.mlp\", up = \"c_fc\", down = \"c_proj\", act = {act}{bias} }}"),
        String::new(),
        "x = x + attn(input_norm(x))".into(),
        "x = x + mlp(post_norm(x))".into(),
    ];
    g.head = vec![
        norm("norm", "model.norm"),
        unembed(tied, "embed_tokens", "lm_head", false),
        "x = lm_head(norm(x))".into(),
    ];
    Ok(())
}

/// StableLM: LayerNorms with biases, partial RoPE, optional q/k/v biases, a gated MLP,
/// sequential or parallel residuals.
fn stablelm(c: &mut Config, g: &mut Gen) -> Result<(), ImportError> {
    decoder_sizes(c, g)?;
    let eps = num(c.f64_or("layer_norm_eps", 1e-5)?);
    let act = c.act("hidden_act", "silu")?;
    let (theta, fraction, scaling) = c.rope(0.25)?;
    let bias = if c.bool_or("use_qkv_bias", false)? { ", bias = [q, k, v]" } else { "" };
    // A LayerNorm of each query and key head, each head with its own weights, stored
    // one tensor per head (`q_layernorm.norms.{head}`).
    let qk_norm = c.bool_or("qk_layernorm", false)?.then(|| {
        format!("  qk_norm = layernorm {{ q = \"q_layernorm.norms.{{head}}\", k = \"k_layernorm.norms.{{head}}\", eps = {eps}, bias = false }}")
    });
    let parallel = c.bool_or("use_parallel_residual", false)?;
    c.f64_or("hidden_dropout", 0.0)?;
    let tied = c.bool_or("tie_word_embeddings", false)?;
    let l = "model.layers.{layer}";
    let norm = |name: &str, at: &str| format!("{name}: layernorm {{ at = \"{at}\", eps = {eps} }}");
    g.embed = vec![
        "embed_tokens: embedding { at = \"model.embed_tokens\" }".into(),
        "x = embed_tokens(tokens)".into(),
    ];
    g.block = vec![
        norm("input_norm", &format!("{l}.input_layernorm")),
        "attn: attention {".into(),
        format!(
            "  at = \"{l}.self_attn\", q = \"q_proj\", k = \"k_proj\", v = \"v_proj\", o = \"o_proj\"{bias}"
        ),
        format!("  position = {}", rope_text(theta, fraction, scaling)),
    ];
    g.block.extend(qk_norm);
    g.block.push("}".into());
    if !parallel {
        g.block.push(norm("post_norm", &format!("{l}.post_attention_layernorm")));
    }
    g.block.extend([
        format!("mlp: mlp {{ at = \"{l}.mlp\", gate = \"gate_proj\", up = \"up_proj\", down = \"down_proj\", act = {act} }}"),
        String::new(),
    ]);
    if parallel {
        g.block.push("x = x + attn(input_norm(x)) + mlp(input_norm(x))".into());
    } else {
        g.block.extend(["x = x + attn(input_norm(x))".into(), "x = x + mlp(post_norm(x))".into()]);
    }
    g.head = vec![
        norm("norm", "model.norm"),
        unembed(tied, "embed_tokens", "lm_head", false),
        "x = lm_head(norm(x))".into(),
    ];
    Ok(())
}

/// Cohere (Command R): one LayerNorm without bias feeding the attention and the MLP in
/// parallel, interleaved RoPE pairs, scaled logits.
fn cohere(c: &mut Config, g: &mut Gen) -> Result<(), ImportError> {
    decoder_sizes(c, g)?;
    let eps = num(c.f64_or("layer_norm_eps", 1e-5)?);
    let act = c.act("hidden_act", "silu")?;
    let (theta, fraction, scaling) = c.rope(1.0)?;
    let rope = rope_text(theta, fraction, scaling);
    let rope = with_field(&rope, "pairs = interleaved");
    let bias = if c.bool_or("attention_bias", false)? { ", bias = true" } else { "" };
    // A LayerNorm of each query and key head with a `[heads, head_dim]` weight.
    let qk_norm = c.bool_or("use_qk_norm", false)?;
    let scale = c.f64_or("logit_scale", 1.0)?;
    let tied = c.bool_or("tie_word_embeddings", true)?;
    let l = "model.layers.{layer}";
    let norm =
        |name: &str, at: &str| format!("{name}: layernorm {{ at = \"{at}\", eps = {eps}, bias = false }}");
    g.embed = vec![
        "embed_tokens: embedding { at = \"model.embed_tokens\" }".into(),
        "x = embed_tokens(tokens)".into(),
    ];
    g.block = vec![
        norm("input_norm", &format!("{l}.input_layernorm")),
        "attn: attention {".into(),
        format!(
            "  at = \"{l}.self_attn\", q = \"q_proj\", k = \"k_proj\", v = \"v_proj\", o = \"o_proj\"{bias}"
        ),
        format!("  position = {rope}"),
    ];
    if qk_norm {
        g.block.push(format!("  qk_norm = layernorm {{ eps = {eps}, bias = false, per_head = true }}"));
    }
    g.block.extend([
        "}".into(),
        format!("mlp: mlp {{ at = \"{l}.mlp\", gate = \"gate_proj\", up = \"up_proj\", down = \"down_proj\", act = {act} }}"),
        String::new(),
        "h = input_norm(x)".into(),
        "x = x + attn(h) + mlp(h)".into(),
    ]);
    g.head = vec![
        norm("norm", "model.norm"),
        unembed(tied, "embed_tokens", "lm_head", false),
        if scale == 1.0 {
            "x = lm_head(norm(x))".into()
        } else {
            format!("x = lm_head(norm(x)) * {}", num(scale))
        },
    ];
    Ok(())
}

/// GPT-J: interleaved RoPE on the first `rotary_dim` features of each head, attention
/// and MLP in parallel from one LayerNorm, a biased unembedding.
fn gptj(c: &mut Config, g: &mut Gen) -> Result<(), ImportError> {
    let d = c.usize("n_embd")?;
    let heads = c.usize("n_head")?;
    g.size("vocab", c.usize("vocab_size")?);
    g.size("d_model", d);
    g.size("layers", c.usize("n_layer")?);
    g.size("heads", heads);
    g.size("d_ff", c.opt_usize("n_inner")?.unwrap_or(4 * d));
    g.size("max_seq", c.usize("n_positions")?);
    let eps = num(c.f64_or("layer_norm_epsilon", 1e-5)?);
    let act = c.act("activation_function", "gelu_new")?;
    let hd = d / heads.max(1);
    let fraction = c.opt_usize("rotary_dim")?.map_or(1.0, |r| r as f64 / hd as f64);
    let (theta, _, scaling) = c.rope(fraction)?;
    let rope = rope_text(theta, fraction, scaling);
    let rope = with_field(&rope, "pairs = interleaved");
    for key in ["attn_pdrop", "embd_pdrop", "resid_pdrop"] {
        c.f64_or(key, 0.0)?;
    }
    let tied = c.bool_or("tie_word_embeddings", false)?;
    let h = "transformer.h.{layer}";
    g.embed = vec!["wte: embedding { at = \"transformer.wte\" }".into(), "x = wte(tokens)".into()];
    g.block = vec![
        format!("ln_1: layernorm {{ at = \"{h}.ln_1\", eps = {eps} }}"),
        format!("attn: attention {{ at = \"{h}.attn\", q = \"q_proj\", k = \"k_proj\", v = \"v_proj\", o = \"out_proj\", position = {rope} }}"),
        format!("mlp: mlp {{ at = \"{h}.mlp\", up = \"fc_in\", down = \"fc_out\", act = {act}, bias = true }}"),
        String::new(),
        "h = ln_1(x)".into(),
        "x = x + attn(h) + mlp(h)".into(),
    ];
    g.head = vec![
        format!("ln_f: layernorm {{ at = \"transformer.ln_f\", eps = {eps} }}"),
        unembed(tied, "wte", "lm_head", true),
        "x = lm_head(ln_f(x))".into(),
    ];
    Ok(())
}

/// Falcon (the original decoder): one fused QKV projection (multi-query: one key/value
/// head), attention and MLP in parallel from one LayerNorm, RoPE.
fn falcon(c: &mut Config, g: &mut Gen) -> Result<(), ImportError> {
    let d = c.usize("hidden_size")?;
    let heads = c.usize("num_attention_heads")?;
    g.size("vocab", c.usize("vocab_size")?);
    g.size("d_model", d);
    g.size("layers", c.usize("num_hidden_layers")?);
    g.size("heads", heads);
    // The new decoder (Falcon 40B/180B): `num_kv_heads` key/value heads, the fused QKV
    // grouped per kv head, and (with `num_ln_in_parallel_attn` 2) a norm for each branch.
    let new = c.bool_or("new_decoder_architecture", false)?;
    // Falcon adds its ALiBi bias before scaling the scores (Falcon-RW).
    let alibi = c.bool_or("alibi", false)?;
    // `num_kv_heads` counts only in the new decoder or without `multi_query` (one
    // key/value head).
    let multi_query = c.bool_or("multi_query", true)?;
    let stated = c.opt_usize("num_kv_heads")?;
    let kv = if new {
        stated.unwrap_or(heads)
    } else if multi_query {
        1
    } else {
        stated.unwrap_or(heads)
    };
    if kv != heads {
        g.size("kv_heads", kv);
    }
    g.size("d_ff", c.opt_usize("ffn_hidden_size")?.unwrap_or(4 * d));
    g.size("max_seq", c.usize("max_position_embeddings")?);
    let eps = num(c.f64_or("layer_norm_epsilon", 1e-5)?);
    let act = c.act("activation", "gelu")?;
    let (theta, fraction, scaling) = c.rope(1.0)?;
    let bias = if c.bool_or("bias", false)? { ", bias = true" } else { "" };
    let parallel = c.bool_or("parallel_attn", true)?;
    c.f64_or("hidden_dropout", 0.0)?;
    let two_norms = c.opt_usize("num_ln_in_parallel_attn")?.unwrap_or(2) == 2 && new;
    let tied = c.bool_or("tie_word_embeddings", true)?;
    let h = "transformer.h.{layer}";
    g.embed = vec![
        "word_embeddings: embedding { at = \"transformer.word_embeddings\" }".into(),
        "x = word_embeddings(tokens)".into(),
    ];
    // The fused QKV is grouped per key/value head (its query heads, key, value), except
    // with one key/value head, where that is the same as all queries, then key, value.
    let layout = if kv > 1 { ", qkv_layout = grouped" } else { "" };
    let norm = |name: &str, at: &str| format!("{name}: layernorm {{ at = \"{h}.{at}\", eps = {eps} }}");
    let (norms, flow): (Vec<String>, &[&str]) = if two_norms {
        (
            vec![norm("ln_attn", "ln_attn"), norm("ln_mlp", "ln_mlp")],
            &["x = x + attn(ln_attn(x)) + mlp(ln_mlp(x))"],
        )
    } else if parallel {
        (vec![norm("input_norm", "input_layernorm")], &["h = input_norm(x)", "x = x + attn(h) + mlp(h)"])
    } else {
        (
            vec![norm("input_norm", "input_layernorm"), norm("post_norm", "post_attention_layernorm")],
            &["x = x + attn(input_norm(x))", "x = x + mlp(post_norm(x))"],
        )
    };
    g.block = norms;
    g.block.extend([
        "attn: attention {".into(),
        format!("  at = \"{h}.self_attention\", qkv = \"query_key_value\"{layout}, o = \"dense\"{bias}"),
        if alibi {
            "  position = alibi { before_scale = true }".into()
        } else {
            format!("  position = {}", rope_text(theta, fraction, scaling))
        },
        "}".into(),
        format!("mlp: mlp {{ at = \"{h}.mlp\", up = \"dense_h_to_4h\", down = \"dense_4h_to_h\", act = {act}{bias} }}"),
        String::new(),
    ]);
    g.block.extend(flow.iter().map(|s| s.to_string()));
    g.head = vec![
        format!("ln_f: layernorm {{ at = \"transformer.ln_f\", eps = {eps} }}"),
        unembed(tied, "word_embeddings", "lm_head", false),
        "x = lm_head(ln_f(x))".into(),
    ];
    Ok(())
}

/// XGLM: fairseq's sinusoidal positions (sines then cosines, from position 2), embeddings
/// scaled by √d_model, pre-LN blocks with biased projections and a GELU MLP.
fn xglm(c: &mut Config, g: &mut Gen) -> Result<(), ImportError> {
    let d = c.usize("d_model")?;
    g.size("vocab", c.usize("vocab_size")?);
    g.size("d_model", d);
    g.size("layers", c.usize("num_layers")?);
    g.size("heads", c.usize("attention_heads")?);
    g.size("d_ff", c.usize("ffn_dim")?);
    g.size("max_seq", c.usize("max_position_embeddings")?);
    let act = c.act("activation_function", "gelu")?;
    c.expect("add_cross_attention", &[false.into()], "only the decoder-only XGLM is supported")?;
    for key in ["dropout", "attention_dropout", "activation_dropout"] {
        c.f64_or(key, 0.0)?;
    }
    c.opt_usize("decoder_start_token_id")?;
    let scale = if c.bool_or("scale_embedding", true)? { " * sqrt(d_model)" } else { "" };
    let tied = c.bool_or("tie_word_embeddings", true)?;
    let l = "model.layers.{layer}";
    g.embed = vec![
        "embed_tokens: embedding { at = \"model.embed_tokens\" }".into(),
        // fairseq counts positions from `padding_idx + 1` = 2.
        "embed_positions: sinusoidal { base = 10000, style = fairseq, offset = 2 }".into(),
        format!("x = embed_tokens(tokens){scale} + embed_positions(positions)"),
    ];
    g.block = vec![
        format!("attn_norm: layernorm {{ at = \"{l}.self_attn_layer_norm\" }}"),
        format!("attn: attention {{ at = \"{l}.self_attn\", q = \"q_proj\", k = \"k_proj\", v = \"v_proj\", o = \"out_proj\", bias = true }}"),
        format!("mlp_norm: layernorm {{ at = \"{l}.final_layer_norm\" }}"),
        format!("mlp: mlp {{ at = \"{l}\", up = \"fc1\", down = \"fc2\", act = {act}, bias = true }}"),
        String::new(),
        "x = x + attn(attn_norm(x))".into(),
        "x = x + mlp(mlp_norm(x))".into(),
    ];
    g.head = vec![
        "norm: layernorm { at = \"model.layer_norm\" }".into(),
        unembed(tied, "embed_tokens", "lm_head", false),
        "x = lm_head(norm(x))".into(),
    ];
    Ok(())
}

/// The sizes every decoder config states the same way.
fn decoder_sizes(c: &mut Config, g: &mut Gen) -> Result<(), ImportError> {
    let d = c.usize("hidden_size")?;
    let heads = c.usize("num_attention_heads")?;
    g.size("vocab", c.usize("vocab_size")?);
    g.size("d_model", d);
    g.size("layers", c.usize("num_hidden_layers")?);
    g.size("heads", heads);
    if let Some(kv) = c.opt_usize("num_key_value_heads")?.filter(|&kv| kv != heads) {
        g.size("kv_heads", kv);
    }
    if let Some(hd) = c.opt_usize("head_dim")?.filter(|&hd| hd * heads != d) {
        g.size("head_dim", hd);
    }
    g.size("d_ff", c.usize("intermediate_size")?);
    g.size("max_seq", c.usize("max_position_embeddings")?);
    Ok(())
}

/// Gemma 2 and Gemma 3 (text): sliding-window and full-attention layers as two block
/// variants, norms before and after both sublayers, all RMSNorms scaling by `1 +
/// weight`. Gemma 2 soft-caps its attention scores and logits; Gemma 3 gives each layer
/// type its own RoPE and normalises q and k.
fn gemma_local_global(c: &mut Config, g: &mut Gen) -> Result<(), ImportError> {
    let v3 = c.model == "gemma3_text";
    let d = c.usize("hidden_size")?;
    let heads = c.usize("num_attention_heads")?;
    let layers = c.usize("num_hidden_layers")?;
    g.size("vocab", c.usize("vocab_size")?);
    g.size("d_model", d);
    g.size("layers", layers);
    g.size("heads", heads);
    let kv = c.opt_usize("num_key_value_heads")?.unwrap_or(heads);
    if kv != heads {
        g.size("kv_heads", kv);
    }
    let hd = c.opt_usize("head_dim")?.unwrap_or(d / heads.max(1));
    if hd * heads != d {
        g.size("head_dim", hd);
    }
    g.size("d_ff", c.usize("intermediate_size")?);
    g.size("max_seq", c.usize("max_position_embeddings")?);
    let eps = num(c.f64_or("rms_norm_eps", 1e-6)?);
    let a = c.act("hidden_act", "gelu_pytorch_tanh")?;
    let act = c.act("hidden_activation", a_name(a))?;
    let attn_cap =
        c.get("attn_logit_softcapping").map(|_| c.f64_or("attn_logit_softcapping", 0.0)).transpose()?;
    let final_cap =
        c.get("final_logit_softcapping").map(|_| c.f64_or("final_logit_softcapping", 0.0)).transpose()?;
    c.expect("use_bidirectional_attention", &[false.into()], "only causal Gemma is supported")?;
    let attn_cap = attn_cap.map(|x| format!(", softcap = {}", num(x))).unwrap_or_default();
    let attn_bias = if c.bool_or("attention_bias", false)? { ", bias = true" } else { "" };
    let scale = c.f64_or("query_pre_attn_scalar", hd as f64)?.powf(-0.5);
    let scale =
        if scale == 1.0 / (hd as f64).sqrt() { String::new() } else { format!(", scale = {}", num(scale)) };
    let window = c.usize("sliding_window")?;
    // Which layers slide: `layer_types`, or every layer but each `sliding_window_pattern`-th.
    let every = c
        .opt_usize("sliding_window_pattern")?
        .or(c.opt_usize("_sliding_window_pattern")?)
        .unwrap_or(if v3 { 6 } else { 2 });
    let types = c.layer_types(layers, Box::new(move |l| (l + 1) % every.max(1) != 0))?;
    // RoPE per layer type: `rope_parameters` by type (transformers 5), or the older
    // `rope_theta` (+ `rope_scaling`) of full layers and `rope_local_base_freq` of sliding ones.
    let (local, global) = match c.get("rope_parameters").and_then(|p| p.as_object()).cloned() {
        _ if !v3 => {
            let (theta, _, scaling) = c.rope(1.0)?;
            let r = rope_text(theta, 1.0, scaling);
            (r.clone(), r)
        }
        Some(p) if p.contains_key("full_attention") || p.contains_key("sliding_attention") => {
            let model = c.model.clone();
            let one = |key: &str| -> Result<String, ImportError> {
                let params = p.get(key).cloned().unwrap_or_else(|| Value::Object(Map::new()));
                let m: Map<String, Value> = [("rope_parameters".to_string(), params)].into_iter().collect();
                let mut sub = Config { model: model.clone(), map: &m, read: HashSet::new() };
                let (theta, _, scaling) = sub.rope(1.0)?;
                sub.finish()?;
                Ok(rope_text(theta, 1.0, scaling))
            };
            if let Some(k) = p.keys().find(|k| !["full_attention", "sliding_attention"].contains(&k.as_str()))
            {
                return Err(
                    c.unsupported("rope_parameters", &format!("`{k}`: expected settings per layer type"))
                );
            }
            (one("sliding_attention")?, one("full_attention")?)
        }
        _ => {
            let local = c.f64_or("rope_local_base_freq", 10000.0)?;
            let (theta, _, scaling) = c.rope(1.0)?;
            (rope_text(local, 1.0, RopeScaling::None), rope_text(theta, 1.0, scaling))
        }
    };
    let tied = c.bool_or("tie_word_embeddings", true)?;
    g.embed = vec![
        "embed_tokens: embedding { at = \"model.embed_tokens\" }".into(),
        "x = embed_tokens(tokens) * sqrt(d_model)".into(),
    ];
    let l = "model.layers.{layer}";
    let norm = |name: &str, at: &str| {
        format!("{name}: rmsnorm {{ at = \"{l}.{at}\", eps = {eps}, unit_offset = true }}")
    };
    let block = |rope: &str, window: &str| {
        let mut lines = vec![
            norm("input_norm", "input_layernorm"),
            "attn: attention {".into(),
            format!("  at = \"{l}.self_attn\", q = \"q_proj\", k = \"k_proj\", v = \"v_proj\", o = \"o_proj\"{attn_bias}{scale}"),
            format!("  position = {rope}{window}{attn_cap}"),
        ];
        if v3 {
            lines.push(format!("  qk_norm = rmsnorm {{ eps = {eps}, unit_offset = true }}"));
        }
        lines.extend([
            "}".into(),
            norm("post_attn_norm", "post_attention_layernorm"),
            norm("pre_mlp_norm", "pre_feedforward_layernorm"),
            format!("mlp: mlp {{ at = \"{l}.mlp\", gate = \"gate_proj\", up = \"up_proj\", down = \"down_proj\", act = {act} }}"),
            norm("post_mlp_norm", "post_feedforward_layernorm"),
            String::new(),
            "x = x + post_attn_norm(attn(input_norm(x)))".into(),
            "x = x + post_mlp_norm(mlp(pre_mlp_norm(x)))".into(),
        ]);
        lines
    };
    g.per_layer_type(&types, block(&local, &format!(", window = {window}")), block(&global, ""));
    let unembed = unembed(tied, "embed_tokens", "lm_head", false);
    let unembed = match final_cap {
        Some(cap) => with_field(&unembed, &format!("softcap = {}", num(cap))),
        None => unembed,
    };
    g.head = vec![
        format!("norm: rmsnorm {{ at = \"model.norm\", eps = {eps}, unit_offset = true }}"),
        unembed,
        "x = lm_head(norm(x))".into(),
    ];
    Ok(())
}

fn a_name(a: &str) -> &str {
    match a {
        "gelu_tanh" => "gelu_pytorch_tanh",
        other => other,
    }
}

fn gpt_neox(c: &mut Config, g: &mut Gen) -> Result<(), ImportError> {
    g.size("vocab", c.usize("vocab_size")?);
    g.size("d_model", c.usize("hidden_size")?);
    g.size("layers", c.usize("num_hidden_layers")?);
    g.size("heads", c.usize("num_attention_heads")?);
    g.size("d_ff", c.usize("intermediate_size")?);
    g.size("max_seq", c.usize("max_position_embeddings")?);
    let eps = num(c.f64_or("layer_norm_eps", 1e-5)?);
    let act = c.act("hidden_act", "gelu")?;
    let (theta, fraction, scaling) = c.rope(0.25)?;
    let parallel = c.bool_or("use_parallel_residual", true)?;
    let bias = c.bool_or("attention_bias", true)?;
    let tied = c.bool_or("tie_word_embeddings", false)?;
    c.bool_or("is_decoder", false)?;
    let bias = if bias { ", bias = true" } else { "" };
    g.embed =
        vec!["embed_in: embedding { at = \"gpt_neox.embed_in\" }".into(), "x = embed_in(tokens)".into()];
    let l = "gpt_neox.layers.{layer}";
    g.block = vec![
        format!("input_norm: layernorm {{ at = \"{l}.input_layernorm\", eps = {eps} }}"),
        format!("post_norm: layernorm {{ at = \"{l}.post_attention_layernorm\", eps = {eps} }}"),
        "attn: attention {".into(),
        format!("  at = \"{l}.attention\", qkv = \"query_key_value\", qkv_layout = grouped, o = \"dense\"{bias}"),
        format!("  position = {}", rope_text(theta, fraction, scaling)),
        "}".into(),
        format!("mlp: mlp {{ at = \"{l}.mlp\", up = \"dense_h_to_4h\", down = \"dense_4h_to_h\", act = {act}, bias = true }}"),
        String::new(),
    ];
    if parallel {
        g.block.push("x = x + attn(input_norm(x)) + mlp(post_norm(x))".into());
    } else {
        g.block.push("x = x + attn(input_norm(x))".into());
        g.block.push("x = x + mlp(post_norm(x))".into());
    }
    g.head = vec![
        format!("final_norm: layernorm {{ at = \"gpt_neox.final_layer_norm\", eps = {eps} }}"),
        unembed(tied, "embed_in", "embed_out", false),
        "x = lm_head(final_norm(x))".into(),
    ];
    Ok(())
}

fn bloom(c: &mut Config, g: &mut Gen) -> Result<(), ImportError> {
    // Older BLOOM configs call the width `n_embed`.
    let d = match c.opt_usize("n_embed")? {
        Some(d) => d,
        None => c.usize("hidden_size")?,
    };
    c.opt_usize("hidden_size")?;
    // Megatron training switches that inference does not see.
    for key in [
        "masked_softmax_fusion",
        "bias_dropout_fusion",
        "skip_bias_add",
        "skip_bias_add_qkv",
        "attention_softmax_in_fp32",
    ] {
        c.get(key);
    }
    // Unused by transformers' BLOOM (ALiBi is computed from the positions alone).
    c.get("offset_alibi");
    if c.opt_usize("n_inner")?.is_some_and(|f| f != 4 * d) {
        return Err(c.unsupported("n_inner", "BLOOM's MLP is always 4 × hidden_size wide"));
    }
    g.size("vocab", c.usize("vocab_size")?);
    g.size("d_model", d);
    g.size("layers", c.usize("n_layer")?);
    g.size("heads", c.usize("n_head")?);
    g.size("d_ff", 4 * d);
    let max_seq = c.opt_usize("seq_length")?;
    if max_seq.is_none() {
        g.comments.push(
            "config.json gives no context length (ALiBi has none); max_seq is BLOOM's training length."
                .into(),
        );
    }
    g.size("max_seq", max_seq.unwrap_or(2048));
    let eps = num(c.f64_or("layer_norm_epsilon", 1e-5)?);
    let post = c.bool_or("apply_residual_connection_post_layernorm", false)?;
    let tied = c.bool_or("tie_word_embeddings", true)?;
    g.embed = vec![
        "word_embeddings: embedding { at = \"transformer.word_embeddings\" }".into(),
        format!("embed_norm: layernorm {{ at = \"transformer.word_embeddings_layernorm\", eps = {eps} }}"),
        "x = embed_norm(word_embeddings(tokens))".into(),
    ];
    let l = "transformer.h.{layer}";
    g.block = vec![
        format!("input_norm: layernorm {{ at = \"{l}.input_layernorm\", eps = {eps} }}"),
        format!("attn: attention {{ at = \"{l}.self_attention\", qkv = \"query_key_value\", qkv_layout = grouped, o = \"dense\", bias = true, position = alibi }}"),
        format!("post_norm: layernorm {{ at = \"{l}.post_attention_layernorm\", eps = {eps} }}"),
        format!("mlp: mlp {{ at = \"{l}.mlp\", up = \"dense_h_to_4h\", down = \"dense_4h_to_h\", act = gelu_tanh, bias = true }}"),
        String::new(),
    ];
    if post {
        // The residual is taken after the norm.
        g.block.extend([
            "h = input_norm(x)".into(),
            "x = h + attn(h)".into(),
            "h = post_norm(x)".into(),
            "x = h + mlp(h)".into(),
        ]);
    } else {
        g.block.extend(["x = x + attn(input_norm(x))".into(), "x = x + mlp(post_norm(x))".into()]);
    }
    g.head = vec![
        format!("ln_f: layernorm {{ at = \"transformer.ln_f\", eps = {eps} }}"),
        unembed(tied, "word_embeddings", "lm_head", false),
        "x = lm_head(ln_f(x))".into(),
    ];
    Ok(())
}

fn opt(c: &mut Config, g: &mut Gen) -> Result<(), ImportError> {
    let d = c.usize("hidden_size")?;
    let max_seq = c.usize("max_position_embeddings")?;
    g.size("vocab", c.usize("vocab_size")?);
    g.size("d_model", d);
    g.size("layers", c.usize("num_hidden_layers")?);
    g.size("heads", c.usize("num_attention_heads")?);
    g.size("d_ff", c.usize("ffn_dim")?);
    g.size("max_seq", max_seq);
    let pre = c.bool_or("do_layer_norm_before", true)?;
    let remove_final = c.bool_or("_remove_final_layer_norm", false)?;
    let act = c.act("activation_function", "relu")?;
    let bias = c.bool_or("enable_bias", true)?;
    c.expect("layer_norm_elementwise_affine", &[true.into()], "LayerNorm without gain is not supported")?;
    if c.opt_usize("word_embed_proj_dim")?.is_some_and(|p| p != d) {
        return Err(
            c.unsupported("word_embed_proj_dim", "embedding projections (project_in/out) are not supported")
        );
    }
    let tied = c.bool_or("tie_word_embeddings", true)?;
    g.embed = vec![
        "embed_tokens: embedding { at = \"model.decoder.embed_tokens\" }".into(),
        format!(
            "embed_positions: embedding {{ at = \"model.decoder.embed_positions\", rows = {}, offset = 2 }}",
            max_seq + 2
        ),
        "x = embed_tokens(tokens) + embed_positions(positions)".into(),
    ];
    let l = "model.decoder.layers.{layer}";
    let b = if bias { ", bias = true" } else { "" };
    g.block = vec![
        format!("attn: attention {{ at = \"{l}.self_attn\", q = \"q_proj\", k = \"k_proj\", v = \"v_proj\", o = \"out_proj\"{b} }}"),
        format!("attn_norm: layernorm {{ at = \"{l}.self_attn_layer_norm\" }}"),
        format!("mlp: mlp {{ at = \"{l}\", up = \"fc1\", down = \"fc2\", act = {act}{b} }}"),
        format!("mlp_norm: layernorm {{ at = \"{l}.final_layer_norm\" }}"),
        String::new(),
    ];
    if pre {
        g.block.extend(["x = x + attn(attn_norm(x))".into(), "x = x + mlp(mlp_norm(x))".into()]);
    } else {
        g.block.extend(["x = attn_norm(x + attn(x))".into(), "x = mlp_norm(x + mlp(x))".into()]);
    }
    if pre && !remove_final {
        g.head = vec![
            "final_norm: layernorm { at = \"model.decoder.final_layer_norm\" }".into(),
            unembed(tied, "embed_tokens", "lm_head", false),
            "x = lm_head(final_norm(x))".into(),
        ];
    } else {
        g.head = vec![unembed(tied, "embed_tokens", "lm_head", false), "x = lm_head(x)".into()];
    }
    Ok(())
}

fn phi(c: &mut Config, g: &mut Gen) -> Result<(), ImportError> {
    let heads = c.usize("num_attention_heads")?;
    g.size("vocab", c.usize("vocab_size")?);
    g.size("d_model", c.usize("hidden_size")?);
    g.size("layers", c.usize("num_hidden_layers")?);
    g.size("heads", heads);
    if let Some(kv) = c.opt_usize("num_key_value_heads")? {
        if kv != heads {
            g.size("kv_heads", kv);
        }
    }
    g.size("d_ff", c.usize("intermediate_size")?);
    g.size("max_seq", c.usize("max_position_embeddings")?);
    let eps = num(c.f64_or("layer_norm_eps", 1e-5)?);
    let act = c.act("hidden_act", "gelu_new")?;
    let (theta, fraction, scaling) = c.rope(0.5)?;
    c.expect("qk_layernorm", &[false.into()], "query/key LayerNorm is not supported")?;
    let tied = c.bool_or("tie_word_embeddings", false)?;
    g.embed = vec![
        "embed_tokens: embedding { at = \"model.embed_tokens\" }".into(),
        "x = embed_tokens(tokens)".into(),
    ];
    let l = "model.layers.{layer}";
    g.block = vec![
        format!("norm: layernorm {{ at = \"{l}.input_layernorm\", eps = {eps} }}"),
        "attn: attention {".into(),
        format!("  at = \"{l}.self_attn\", q = \"q_proj\", k = \"k_proj\", v = \"v_proj\", o = \"dense\", bias = true"),
        format!("  position = {}", rope_text(theta, fraction, scaling)),
        "}".into(),
        format!("mlp: mlp {{ at = \"{l}.mlp\", up = \"fc1\", down = \"fc2\", act = {act}, bias = true }}"),
        String::new(),
        "h = norm(x)".into(),
        "x = x + attn(h) + mlp(h)".into(),
    ];
    g.head = vec![
        format!("final_norm: layernorm {{ at = \"model.final_layernorm\", eps = {eps} }}"),
        unembed(tied, "embed_tokens", "lm_head", true),
        "x = lm_head(final_norm(x))".into(),
    ];
    Ok(())
}

/// DistilBERT: BERT's post-LN encoder without token types, under other names.
fn distilbert(c: &mut Config, g: &mut Gen) -> Result<(), ImportError> {
    let p = encoder_prefix(c, "distilbert");
    let rows = c.usize("max_position_embeddings")?;
    g.size("vocab", c.usize("vocab_size")?);
    g.size("d_model", c.usize("dim")?);
    g.size("layers", c.usize("n_layers")?);
    g.size("heads", c.usize("n_heads")?);
    g.size("d_ff", c.usize("hidden_dim")?);
    g.size("max_seq", rows);
    let act = c.act("activation", "gelu")?;
    // Sinusoidal tables are written into the checkpoint's position embeddings, so a
    // learned table reads either kind.
    c.bool_or("sinusoidal_pos_embds", false)?;
    c.bool_or("tie_word_embeddings", true)?;
    let eps = "1e-12";
    g.comments.push("An encoder: bidirectional attention, and its result is the last hidden state.".into());
    g.embed = vec![
        format!("word: embedding {{ at = \"{p}embeddings.word_embeddings\" }}"),
        format!("position: embedding {{ at = \"{p}embeddings.position_embeddings\", rows = {rows} }}"),
        format!("norm: layernorm {{ at = \"{p}embeddings.LayerNorm\", eps = {eps} }}"),
        "x = norm(word(tokens) + position(positions))".into(),
    ];
    let l = format!("{p}transformer.layer.{{layer}}");
    g.block = vec![
        "attn: attention {".into(),
        format!("  at = \"{l}.attention\", q = \"q_lin\", k = \"k_lin\", v = \"v_lin\", o = \"out_lin\""),
        "  bias = true, causal = false".into(),
        "}".into(),
        format!("attn_norm: layernorm {{ at = \"{l}.sa_layer_norm\", eps = {eps} }}"),
        format!("mlp: mlp {{ at = \"{l}.ffn\", up = \"lin1\", down = \"lin2\", act = {act}, bias = true }}"),
        format!("mlp_norm: layernorm {{ at = \"{l}.output_layer_norm\", eps = {eps} }}"),
        String::new(),
        "x = attn_norm(x + attn(x))".into(),
        "x = mlp_norm(x + mlp(x))".into(),
    ];
    Ok(())
}

/// The prefix of an encoder's tensors: none for a bare model (`BertModel`,
/// `RobertaModel`, …), whose tensors are saved unprefixed, else `base.` (task models put
/// them under `bert.`, `roberta.`, `distilbert.`).
fn encoder_prefix(c: &mut Config, base: &str) -> String {
    let bare = c
        .get("architectures")
        .and_then(|a| a.as_array())
        .and_then(|a| a.first())
        .and_then(|a| a.as_str())
        .is_none_or(|a| a.ends_with("Model"));
    if bare {
        String::new()
    } else {
        format!("{base}.")
    }
}

/// BERT, RoBERTa and XLM-RoBERTa: post-LN encoders. RoBERTa counts positions from
/// `pad_token_id + 1` (its table has that many rows more than a sequence can use).
fn bert(c: &mut Config, g: &mut Gen) -> Result<(), ImportError> {
    let roberta = c.model != "bert";
    let p = encoder_prefix(c, if roberta { "roberta" } else { "bert" });
    let rows = c.usize("max_position_embeddings")?;
    let offset = if roberta { c.opt_usize("pad_token_id")?.unwrap_or(1) + 1 } else { 0 };
    let max_seq = rows.checked_sub(offset).filter(|&n| n > 0).ok_or(ImportError::Field {
        key: "max_position_embeddings".into(),
        expected: "more positions than pad_token_id + 1",
    })?;
    g.size("vocab", c.usize("vocab_size")?);
    g.size("d_model", c.usize("hidden_size")?);
    g.size("layers", c.usize("num_hidden_layers")?);
    g.size("heads", c.usize("num_attention_heads")?);
    g.size("d_ff", c.usize("intermediate_size")?);
    g.size("max_seq", max_seq);
    let types = c.usize("type_vocab_size")?;
    let eps = num(c.f64_or("layer_norm_eps", 1e-12)?);
    let act = c.act("hidden_act", "gelu")?;
    c.expect(
        "position_embedding_type",
        &["absolute".into()],
        "only absolute position embeddings are supported",
    )?;
    c.expect("is_decoder", &[false.into()], "BERT as a decoder is not supported")?;
    c.expect("add_cross_attention", &[false.into()], "cross-attention is not supported")?;
    c.bool_or("tie_word_embeddings", true)?;
    g.comments.push("An encoder: bidirectional attention, and its result is the last hidden state.".into());
    g.embed = vec![
        format!("word: embedding {{ at = \"{p}embeddings.word_embeddings\" }}"),
        if offset > 0 {
            format!("position: embedding {{ at = \"{p}embeddings.position_embeddings\", rows = {rows}, offset = {offset} }}")
        } else {
            format!("position: embedding {{ at = \"{p}embeddings.position_embeddings\", rows = {rows} }}")
        },
        format!("token_type: embedding {{ at = \"{p}embeddings.token_type_embeddings\", rows = {types} }}"),
        format!("norm: layernorm {{ at = \"{p}embeddings.LayerNorm\", eps = {eps} }}"),
        "x = norm(word(tokens) + token_type(token_types) + position(positions))".into(),
    ];
    let l = format!("{p}encoder.layer.{{layer}}");
    g.block = vec![
        "attn: attention {".into(),
        format!("  at = \"{l}.attention\", q = \"self.query\", k = \"self.key\", v = \"self.value\", o = \"output.dense\""),
        "  bias = true, causal = false".into(),
        "}".into(),
        format!("attn_norm: layernorm {{ at = \"{l}.attention.output.LayerNorm\", eps = {eps} }}"),
        format!("mlp: mlp {{ at = \"{l}\", up = \"intermediate.dense\", down = \"output.dense\", act = {act}, bias = true }}"),
        format!("mlp_norm: layernorm {{ at = \"{l}.output.LayerNorm\", eps = {eps} }}"),
        String::new(),
        "x = attn_norm(x + attn(x))".into(),
        "x = mlp_norm(x + mlp(x))".into(),
    ];
    Ok(())
}
