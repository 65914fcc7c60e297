//! Syntax tree to [`Spec`]: settings, sizes and component options, checked.
//!
//! Every problem is recorded and checking goes on, so one run reports all of them.

use std::collections::HashSet;

use super::ast::{self, Field, Ident, SectionKind, Span, Value, ValueKind};
use super::diag::{Code, Diagnostic};
use super::spec::*;
use crate::ir::{Act, DType, GroupScore, QkvLayout, RopeScaling, Route, Scoring};

const SETTINGS: &[&str] = &[
    "vocab",
    "d_model",
    "layers",
    "heads",
    "kv_heads",
    "head_dim",
    "d_ff",
    "max_seq",
    "dtype",
    "activations",
    "pattern",
];
const KINDS: &[&str] =
    &["embedding", "sinusoidal", "layernorm", "rmsnorm", "attention", "mla", "mlp", "moe", "unembed"];

pub fn resolve(file: &ast::File, diags: &mut Vec<Diagnostic>) -> Option<Spec> {
    let before = diags.len();
    let name = match &file.model {
        Some(m) => m.name.clone(),
        None => {
            diags.push(
                Diagnostic::error(Code::Missing, "the spec does not name its model")
                    .label(0..0, "expected `model NAME` first")
                    .note("start the file with a line such as `model gpt2`"),
            );
            String::new()
        }
    };
    let (sizes, dtype, activations) = sizes(file, diags);
    for c in &file.components {
        diags.push(
            Diagnostic::error(
                Code::Flow,
                format!("component `{}` is declared outside a section", c.name.name),
            )
            .label(c.span.clone(), "declared here")
            .note("declare components inside the `embed`, `block` or `head` section that uses them"),
        );
    }
    let mut sections: [Option<Section>; 3] = [None, None, None];
    let mut blocks: Vec<(Option<Ident>, Section)> = Vec::new();
    for s in &file.sections {
        if s.kind == SectionKind::Block {
            blocks.push((s.name.clone(), section(s, sizes.as_ref(), diags)));
            continue;
        }
        if let Some(n) = &s.name {
            diags.push(
                Diagnostic::error(
                    Code::BadValue,
                    format!("the `{}` section cannot have a name", s.kind.name()),
                )
                .label(n.span.clone(), "only block variants are named")
                .note("name blocks (`block local { … }`) and list them in `pattern`"),
            );
        }
        let slot = &mut sections[s.kind as usize];
        if slot.is_some() {
            diags.push(
                Diagnostic::error(Code::Duplicate, format!("a second `{}` section", s.kind.name()))
                    .label(s.keyword.clone(), "each section may appear once"),
            );
            continue;
        }
        *slot = Some(section(s, sizes.as_ref(), diags));
    }
    let [embed, _, head] = sections;
    let end = file_end(file);
    let layer_blocks = pattern(file, &blocks, sizes.as_ref(), diags);
    let tensor_dtypes = tensor_dtypes(file, diags);
    let block = blocks.first().map(|(_, s)| s.clone());
    for (sec, kind) in [(&embed, SectionKind::Embed), (&block, SectionKind::Block)] {
        if sec.is_none() {
            diags.push(
                Diagnostic::error(Code::Missing, format!("the spec has no `{}` section", kind.name()))
                    .label(end.clone(), format!("expected `{} {{ ... }}`", kind.name())),
            );
        }
    }
    if let Some(sz) = &sizes {
        if sz.d_ff.is_none() {
            for c in blocks.iter().flat_map(|(_, b)| &b.components) {
                let own = match &c.kind {
                    Kind::Mlp(m) => m.d_ff.is_some(),
                    Kind::Moe(m) => {
                        m.hidden.is_some() && m.shared.as_ref().is_none_or(|s| s.mlp.d_ff.is_some())
                    }
                    _ => true,
                };
                if !own {
                    diags.push(
                        Diagnostic::error(Code::Missing, "an `mlp` needs the setting `d_ff`")
                            .label(c.name.span.clone(), "this MLP has no hidden size")
                            .note("add `d_ff = N` to the settings"),
                    );
                }
            }
        }
    }
    // An unembedding may be declared in any section; wherever it is, `tied` must name an
    // embedding of the `embed` section.
    if let Some(embed) = &embed {
        for c in blocks
            .iter()
            .map(|(_, b)| b)
            .chain(head.as_ref())
            .chain(std::iter::once(embed))
            .flat_map(|s| &s.components)
        {
            if let Kind::Unembed { tied: Some(t), .. } = &c.kind {
                match embed.component(t).map(|e| &e.kind) {
                    Some(Kind::Embedding { .. }) => {}
                    _ => diags.push(
                        Diagnostic::error(
                            Code::Name,
                            format!("`tied = {t}` names no embedding of the `embed` section"),
                        )
                        .label(c.name.span.clone(), "in this unembedding"),
                    ),
                }
            }
        }
    }
    if diags.len() > before {
        return None;
    }
    block?;
    let blocks = blocks.into_iter().map(|(n, section)| Block { name: n.map(|n| n.name), section }).collect();
    Some(Spec {
        name,
        sizes: sizes?,
        dtype,
        activations,
        embed: embed?,
        blocks,
        layer_blocks: layer_blocks?,
        head,
        tensor_dtypes,
    })
}

/// The `dtypes` section: each field a storage type and the list of matrices (checkpoint
/// names) stored so, whatever their component's `dtype`. A name may be listed once.
fn tensor_dtypes(file: &ast::File, diags: &mut Vec<Diagnostic>) -> Vec<TensorDtype> {
    for (kw, _) in file.dtypes.iter().skip(1) {
        diags.push(
            Diagnostic::error(Code::Duplicate, "a second `dtypes` section")
                .label(kw.clone(), "each section may appear once"),
        );
    }
    let mut out: Vec<TensorDtype> = Vec::new();
    for f in file.dtypes.first().map(|(_, f)| f.as_slice()).unwrap_or_default() {
        let Some(dtype) = STORAGE.contains(&f.key.name.as_str()).then(|| DType::parse(&f.key.name).unwrap())
        else {
            diags.push(unknown_in(&f.key, "storage type", "`dtypes`", STORAGE));
            continue;
        };
        let ValueKind::List(names) = &f.value.kind else {
            diags.push(bad(&f.value, "a list of matrix names, such as [\"blk.0.ffn_down.weight\"]"));
            continue;
        };
        for v in names {
            let ValueKind::Str(name) = &v.kind else {
                diags.push(bad(v, "a matrix name in quotes"));
                continue;
            };
            if let Some(first) = out.iter().find(|t| &t.name == name) {
                diags.push(
                    Diagnostic::error(Code::Duplicate, format!("`{name}` is listed twice in `dtypes`"))
                        .label(v.span.clone(), "listed again here")
                        .label(first.span.clone(), "first listed here"),
                );
                continue;
            }
            out.push(TensorDtype { name: name.clone(), dtype, span: v.span.clone() });
        }
    }
    out
}

/// Which block each layer runs: one block serves every layer; several, named, follow the
/// setting `pattern = [a, b, …]`, repeated over the layers.
fn pattern(
    file: &ast::File,
    blocks: &[(Option<Ident>, Section)],
    sizes: Option<&Sizes>,
    diags: &mut Vec<Diagnostic>,
) -> Option<Vec<usize>> {
    let layers = sizes.map(|s| s.layers)?;
    let setting = file.settings.iter().find(|f| f.key.name == "pattern");
    if blocks.len() > 1 && blocks.iter().all(|(n, _)| n.is_none()) {
        // Unnamed blocks: a second one is a repeated section, as it always was.
        for (_, s) in &blocks[1..] {
            diags.push(
                Diagnostic::error(Code::Duplicate, "a second `block` section")
                    .label(s.keyword.clone(), "each section may appear once"),
            );
        }
        return None;
    }
    let mut seen: Vec<&Ident> = Vec::new();
    let mut ok = true;
    for (n, s) in blocks {
        match n {
            Some(n) if seen.iter().any(|m| m.name == n.name) => {
                diags.push(
                    Diagnostic::error(Code::Duplicate, format!("a second block named `{}`", n.name))
                        .label(n.span.clone(), "each block variant needs its own name"),
                );
                ok = false;
            }
            Some(n) => seen.push(n),
            None if blocks.len() > 1 => {
                diags.push(
                    Diagnostic::error(Code::Missing, "a block without a name beside others")
                        .label(s.keyword.clone(), "name it: `block NAME { … }`")
                        .note("with several blocks, `pattern` says which layer runs which, by name"),
                );
                ok = false;
            }
            None => {}
        }
    }
    let Some(setting) = setting else {
        if blocks.len() > 1 {
            diags.push(
                Diagnostic::error(Code::Missing, "several blocks but no `pattern`")
                    .label(blocks[1].1.keyword.clone(), "a second block")
                    .note("add `pattern = [a, b, …]`: the blocks the layers run, repeated over the layers"),
            );
            return None;
        }
        return ok.then(|| vec![0; layers]);
    };
    let ValueKind::List(items) = &setting.value.kind else {
        diags.push(bad(&setting.value, "a list of block names, such as `[local, global]`"));
        return None;
    };
    let mut order = Vec::new();
    for it in items {
        let found = match &it.kind {
            ValueKind::Ident(s) => blocks.iter().position(|(n, _)| n.as_ref().is_some_and(|n| &n.name == s)),
            _ => None,
        };
        match found {
            Some(i) => order.push(i),
            None => {
                let names: Vec<&str> = seen.iter().map(|n| n.name.as_str()).collect();
                diags.push(
                    Diagnostic::error(Code::Name, "`pattern` names no block here")
                        .label(it.span.clone(), "not the name of a block")
                        .note(if names.is_empty() {
                            "name the blocks: `block NAME { … }`".to_string()
                        } else {
                            format!("the blocks are: {}", names.join(", "))
                        }),
                );
                ok = false;
            }
        }
    }
    if items.is_empty() || items.len() > layers {
        diags.push(
            Diagnostic::error(
                Code::Sizes,
                format!("a pattern of {} blocks for {layers} layers", items.len()),
            )
            .label(setting.value.span.clone(), "one to `layers` blocks, repeated over the layers"),
        );
        ok = false;
    }
    if let Some(i) = (0..blocks.len()).find(|i| !order.contains(i)) {
        let b = &blocks[i];
        diags.push(
            Diagnostic::error(Code::Flow, "a block that no layer runs")
                .label(b.0.as_ref().map_or(b.1.keyword.clone(), |n| n.span.clone()), "not in `pattern`"),
        );
        ok = false;
    }
    (ok && !order.is_empty()).then(|| (0..layers).map(|l| order[l % order.len()]).collect())
}

fn file_end(file: &ast::File) -> Span {
    let mut end = 0;
    for s in &file.sections {
        end = end.max(s.keyword.end);
    }
    for f in &file.settings {
        end = end.max(f.value.span.end);
    }
    end..end
}

fn sizes(file: &ast::File, diags: &mut Vec<Diagnostic>) -> (Option<Sizes>, DType, DType) {
    let mut f = Fields::new("the settings", &file.settings, SETTINGS);
    let anchor = file.model.as_ref().map(|m| m.span.clone()).unwrap_or(0..0);
    let required = |f: &mut Fields, key: &str, diags: &mut Vec<Diagnostic>| {
        let v = f.positive(key, diags);
        if v.is_none() && !f.has(key) {
            diags.push(
                Diagnostic::error(Code::Missing, format!("missing required setting `{key}`"))
                    .label(anchor.clone(), "this model")
                    .note(format!("add `{key} = N`")),
            );
        }
        v
    };
    let vocab = required(&mut f, "vocab", diags);
    let d_model = required(&mut f, "d_model", diags);
    let layers = required(&mut f, "layers", diags);
    if let Some(l) = layers.filter(|&l| l > 4096) {
        diags.push(
            Diagnostic::error(Code::BadValue, format!("{l} layers are more than tfc supports (4096)"))
                .label(f.span_of("layers"), "too many layers"),
        );
    }
    let heads = required(&mut f, "heads", diags);
    let max_seq = required(&mut f, "max_seq", diags);
    let kv_heads = f.positive("kv_heads", diags);
    let head_dim = f.positive("head_dim", diags);
    let d_ff = f.positive("d_ff", diags);
    let dtype = match f.choice("dtype", STORAGE, diags) {
        Some(s) => DType::parse(&s).unwrap(),
        None => DType::F32,
    };
    let activations = match f.choice("activations", &["f32", "bf16", "q8"], diags) {
        Some(s) => DType::parse(&s).unwrap(),
        None => DType::F32,
    };
    f.finish(diags);
    let mut ok = true;
    let head_dim = match (head_dim, d_model, heads) {
        (Some(h), ..) => Some(h),
        (None, Some(d), Some(h)) if d % h != 0 => {
            diags.push(
                Diagnostic::error(Code::Sizes, format!("{h} heads do not divide d_model = {d}"))
                    .label(f.span_of("heads"), format!("d_model / heads = {d} / {h} is not a whole number"))
                    .note("set `head_dim` explicitly, or choose a head count that divides d_model"),
            );
            ok = false;
            None
        }
        (None, Some(d), Some(h)) => Some(d / h),
        _ => None,
    };
    let kv_heads = kv_heads.or(heads);
    if let (Some(kv), Some(h)) = (kv_heads, heads) {
        if h % kv != 0 {
            diags.push(
                Diagnostic::error(Code::Sizes, format!("kv_heads = {kv} does not divide heads = {h}"))
                    .label(
                        f.span_of("kv_heads"),
                        "each key/value head must serve the same number of query heads",
                    )
                    .note("grouped-query attention needs heads to be a multiple of kv_heads"),
            );
            ok = false;
        }
    }
    let layers = layers.filter(|&l| l <= 4096);
    let (
        Some(vocab),
        Some(d_model),
        Some(layers),
        Some(heads),
        Some(max_seq),
        Some(kv_heads),
        Some(head_dim),
        true,
    ) = (vocab, d_model, layers, heads, max_seq, kv_heads, head_dim, ok)
    else {
        return (None, dtype, activations);
    };
    (Some(Sizes { vocab, d_model, layers, heads, kv_heads, head_dim, d_ff, max_seq }), dtype, activations)
}

/// The storage types of weight matrices, for the spec's `dtype` and a component's.
const STORAGE: &[&str] = &[
    "f32", "f16", "bf16", "q8", "q8_0", "q2_k", "q3_k", "q4_0", "q4_1", "q4_k", "q5_0", "q5_1", "q5_k",
    "q6_k",
];

fn section(s: &ast::Section, sizes: Option<&Sizes>, diags: &mut Vec<Diagnostic>) -> Section {
    let mut seen = HashSet::new();
    let mut components = Vec::new();
    for c in &s.components {
        if !seen.insert(c.name.name.clone()) {
            diags.push(
                Diagnostic::error(Code::Duplicate, format!("component `{}` is declared twice", c.name.name))
                    .label(c.name.span.clone(), "declared again here"),
            );
            continue;
        }
        if let Some((kind, dtype)) = component(c, s.kind, sizes, diags) {
            components.push(Component { name: c.name.clone(), kind, dtype });
        }
    }
    Section { keyword: s.keyword.clone(), components, stmts: s.stmts.clone() }
}

fn component(
    c: &ast::Component,
    section: SectionKind,
    sizes: Option<&Sizes>,
    diags: &mut Vec<Diagnostic>,
) -> Option<(Kind, Option<DType>)> {
    let kind = c.kind.name.as_str();
    let allowed: &[&str] = match kind {
        "embedding" => &["at", "weight", "rows", "offset", "dtype"],
        "sinusoidal" => &["base", "style", "offset"],
        "layernorm" => &["at", "eps", "weight", "bias"],
        "rmsnorm" => &["at", "eps", "weight", "unit_offset"],
        "attention" => &[
            "at",
            "q",
            "k",
            "v",
            "o",
            "qkv",
            "qkv_layout",
            "bias",
            "transposed",
            "causal",
            "window",
            "scale",
            "position",
            "qk_norm",
            "softcap",
            "sinks",
            "dtype",
        ],
        "mla" => &[
            "at", "q", "q_a", "q_norm", "q_b", "q_rank", "kv_a", "kv_norm", "kv_b", "k_b", "v_b", "o",
            "kv_rank", "nope_dim", "rope_dim", "v_dim", "eps", "bias", "scale", "position", "dtype",
        ],
        "mlp" => &["at", "up", "gate", "gate_up", "down", "act", "bias", "transposed", "d_ff", "dtype"],
        "moe" => &[
            "at",
            "router",
            "experts",
            "top_k",
            "scoring",
            "normalize",
            "scale",
            "d_expert",
            "expert",
            "up",
            "gate",
            "gate_up",
            "down",
            "act",
            "shared",
            "d_shared",
            "shared_gate",
            "router_bias",
            "choice_bias",
            "groups",
            "topk_groups",
            "group_score",
            "transposed",
            "bias",
            "interleaved",
            "clamp",
            "up_offset",
            "names",
            "dtype",
        ],
        "unembed" => &["at", "weight", "tied", "bias", "transposed", "softcap", "dtype"],
        _ => {
            diags.push(unknown(&c.kind, "component kind", KINDS));
            return None;
        }
    };
    let before = diags.len();
    let mut f = Fields::new(&format!("`{}: {kind}`", c.name.name), &c.fields, allowed);
    // The storage of this component's matrices, instead of the spec's `dtype`.
    let dtype = f.choice("dtype", STORAGE, diags).map(|s| DType::parse(&s).unwrap());
    if dtype.is_some() && kind == "unembed" && f.has("tied") {
        diags.push(
            Diagnostic::error(
                Code::BadValue,
                "a tied unembedding reads its embedding's matrix as that stores it",
            )
            .label(f.span_of("dtype"), "give the embedding this `dtype` instead"),
        );
    }
    let at = f.string("at", diags);
    let in_block = section == SectionKind::Block;
    let mut name = |f: &mut Fields, key: &str, default: Option<&str>, diags: &mut Vec<Diagnostic>| {
        let given = f.string(key, diags);
        let span = if f.has(key) { f.span_of(key) } else { f.span_of("at") };
        let n = given.or(default.map(str::to_string))?;
        let full = match &at {
            Some(a) => format!("{a}.{n}"),
            None => n,
        };
        check_template(&full, in_block, f.placeholder, span, diags);
        Some(full)
    };
    let result = match kind {
        "embedding" => {
            let weight = name(&mut f, "weight", at.as_ref().map(|_| "weight"), diags);
            let rows = f.positive("rows", diags).or(sizes.map(|s| s.vocab));
            let offset = f.natural("offset", diags).unwrap_or(0);
            if weight.is_none() && diags.len() == before {
                diags.push(missing(c, "weight", "the table's checkpoint name, or `at`"));
            }
            Kind::Embedding { weight: weight.unwrap_or_default(), rows: rows.unwrap_or(0), offset }
        }
        "sinusoidal" => Kind::Sinusoidal {
            base: f.float_positive("base", diags).unwrap_or(10000.0),
            fairseq: f.choice("style", &["interleaved", "fairseq"], diags).as_deref() == Some("fairseq"),
            offset: f.natural("offset", diags).unwrap_or(0),
        },
        "layernorm" | "rmsnorm" => {
            let eps = f.float_positive("eps", diags).unwrap_or(if kind == "layernorm" { 1e-5 } else { 1e-6 });
            // A LayerNorm's `weight = false` or `bias = false`: it has none.
            let mut param = |f: &mut Fields, key: &str| {
                if kind == "layernorm" && f.get(key).is_some_and(|v| matches!(v.kind, ValueKind::Bool(false)))
                {
                    f.bool(key, diags);
                    None
                } else {
                    Some(name(f, key, Some(key), diags).unwrap_or_default())
                }
            };
            let weight = param(&mut f, "weight");
            if kind == "layernorm" {
                let bias = param(&mut f, "bias");
                Kind::LayerNorm { eps, weight, bias }
            } else {
                let unit_offset = f.bool("unit_offset", diags).unwrap_or(false);
                Kind::RmsNorm { eps, weight: weight.unwrap_or_default(), unit_offset }
            }
        }
        "attention" => attention(c, &mut f, &mut name, sizes, diags)?,
        "mla" => mla(c, &mut f, &mut name, diags)?,
        "mlp" => {
            let bias = f.bool("bias", diags).unwrap_or(false);
            let transposed = f.bool("transposed", diags).unwrap_or(false);
            let proj = |f: &mut Fields, key: &str, diags: &mut Vec<Diagnostic>| {
                name(f, key, None, diags).map(|w| Proj {
                    bias: bias.then(|| format!("{w}.bias")),
                    weight: format!("{w}.weight"),
                    transposed,
                })
            };
            let gate_up = proj(&mut f, "gate_up", diags);
            let up = proj(&mut f, "up", diags);
            let gate = proj(&mut f, "gate", diags);
            let down = proj(&mut f, "down", diags);
            let act = f.pick("act", &Act::ALL, diags);
            let fused = f.has("gate_up");
            if let Some(d) = gate_up_beside_another(&f) {
                diags.push(d);
                return None;
            }
            if fused && transposed {
                diags.push(
                    Diagnostic::error(Code::BadValue, "a fused `gate_up` cannot be `transposed`")
                        .label(f.span_of("gate_up"), "split on its rows: stored [2 · d_ff, d_model]")
                        .label(f.span_of("transposed"), "stored [in, out]"),
                );
                return None;
            }
            let up = if fused { gate_up } else { up };
            for (key, v, what) in [
                ("up", up.is_some() || fused, "the up projection (or a fused `gate_up`)"),
                ("down", down.is_some(), "the down projection"),
            ] {
                if !v && !f.has(key) {
                    diags.push(missing(c, key, what));
                }
            }
            if act.is_none() && !f.has("act") {
                diags.push(missing(c, "act", "the activation: relu, gelu, gelu_tanh or silu"));
            }
            let d_ff = f.positive("d_ff", diags);
            Kind::Mlp(Mlp { up: up?, gate, gate_up: fused, down: down?, act: act?, d_ff })
        }
        "moe" => moe(c, &mut f, at.as_deref(), in_block, diags)?,
        "unembed" => {
            let softcap = f.float_positive("softcap", diags);
            let tied = f.ident("tied", diags);
            let transposed = f.bool("transposed", diags).unwrap_or(false);
            let has_bias = f.bool("bias", diags).unwrap_or(false);
            let weight = if tied.is_some() {
                String::new()
            } else {
                match name(&mut f, "weight", at.as_ref().map(|_| "weight"), diags) {
                    Some(w) => w,
                    None => {
                        diags.push(missing(c, "weight", "the checkpoint name, `at`, or `tied = EMBEDDING`"));
                        String::new()
                    }
                }
            };
            let bias = has_bias.then(|| match &at {
                Some(a) => format!("{a}.bias"),
                None => format!("{}.bias", weight.trim_end_matches(".weight")),
            });
            if has_bias && at.is_none() && tied.is_some() {
                diags.push(
                    Diagnostic::error(Code::Missing, "a tied unembedding with a bias needs `at`")
                        .label(c.name.span.clone(), "the bias's checkpoint name is `{at}.bias`"),
                );
            }
            Kind::Unembed { weight, transposed, bias, tied, softcap }
        }
        _ => unreachable!(),
    };
    f.finish(diags);
    (diags.len() == before).then_some((result, dtype))
}

/// A fused `gate_up` given beside a separate `up` or `gate` (of an `mlp` or a `moe`).
fn gate_up_beside_another(f: &Fields) -> Option<Diagnostic> {
    let other = ["up", "gate"].into_iter().find(|k| f.has(k)).filter(|_| f.has("gate_up"))?;
    Some(
        Diagnostic::error(
            Code::BadValue,
            format!("`gate_up` and a separate `{other}` projection exclude each other"),
        )
        .label(f.span_of("gate_up"), "the fused projection")
        .label(f.span_of(other), "a separate one"),
    )
}

/// A mixture of experts (`moe`): the router, the experts' projections (3-D tensors, or
/// one per expert where the `expert` prefix holds `{expert}`), the shared expert.
fn moe(
    c: &ast::Component,
    f: &mut Fields,
    at: Option<&str>,
    in_block: bool,
    diags: &mut Vec<Diagnostic>,
) -> Option<Kind> {
    let before = diags.len();
    let join = |n: &str| match at {
        Some(a) => format!("{a}.{n}"),
        None => n.to_string(),
    };
    let experts = f.positive("experts", diags);
    let top_k = f.positive("top_k", diags);
    let scoring = f.pick("scoring", &Scoring::ALL, diags).unwrap_or(Scoring::Softmax);
    let normalize = f.bool("normalize", diags).unwrap_or(false);
    let scale = f.float_positive("scale", diags).unwrap_or(1.0);
    let hidden = f.positive("d_expert", diags);
    let d_shared = f.positive("d_shared", diags);
    let act = f.pick("act", &Act::ALL, diags);
    let expert = f.string("expert", diags);
    if let Some(e) = &expert {
        if e.matches("{expert}").count() != 1 {
            diags.push(
                Diagnostic::error(
                    Code::BadValue,
                    format!("the `expert` prefix `{e}` must hold `{{expert}}` once"),
                )
                .label(f.span_of("expert"), "each expert's tensors are named with its index here"),
            );
        }
    }
    let router_bias = f.bool("router_bias", diags).unwrap_or(false);
    let choice_bias = f.string("choice_bias", diags).map(|b| join(&b));
    if let Some(b) = &choice_bias {
        check_template(b, in_block, None, f.span_of("choice_bias"), diags);
    }
    let groups = f.positive("groups", diags).unwrap_or(1);
    let topk_groups = f.positive("topk_groups", diags);
    let group_score = f.pick("group_score", &GroupScore::ALL, diags).unwrap_or(GroupScore::Max);
    let transposed = f.bool("transposed", diags).unwrap_or(false);
    let bias = f.bool("bias", diags).unwrap_or(false);
    let interleaved = f.bool("interleaved", diags).unwrap_or(false);
    let clamp = f.float_positive("clamp", diags);
    let up_offset = f.float_positive("up_offset", diags).unwrap_or(0.0);
    // `names = as_given`: the experts' tensors are named without `.weight`, their biases
    // `{name}_bias` (gpt-oss).
    let as_given = f.choice("names", &["suffixed", "as_given"], diags).as_deref() == Some("as_given");
    let router = f.string("router", diags).unwrap_or_else(|| "gate".into());
    let router = join(&router);
    check_template(&router, in_block, None, f.span_of("router"), diags);
    // An expert projection: under the `expert` prefix, stacked over the experts, or one
    // 3-D tensor.
    let proj = |f: &mut Fields, key: &str, diags: &mut Vec<Diagnostic>| {
        let leaf = f.string(key, diags)?;
        let span = f.span_of(key);
        let full = match &expert {
            Some(e) => join(&format!("{e}.{leaf}")),
            None => join(&leaf),
        };
        if expert.is_none() && leaf.contains("{expert}") {
            diags.push(
                Diagnostic::error(
                    Code::BadValue,
                    format!("`{{expert}}` in `{leaf}` without an `expert` prefix"),
                )
                .label(span, "the experts here are one 3-D tensor")
                .note("for one tensor per expert, name them under `expert = \"experts.{expert}\"`"),
            );
        } else {
            check_template(&full, in_block, expert.as_ref().map(|_| "expert"), span, diags);
        }
        let stacked = full.replace("{expert}", &format!("{{0..{}}}", experts.unwrap_or(0)));
        let (w, b) = if as_given {
            (stacked.clone(), format!("{stacked}_bias"))
        } else {
            (format!("{stacked}.weight"), format!("{stacked}.bias"))
        };
        Some((leaf, w, b))
    };
    let gate_up = proj(f, "gate_up", diags);
    let up = proj(f, "up", diags);
    let gate = proj(f, "gate", diags);
    let down = proj(f, "down", diags);
    let fused = gate_up.is_some();
    diags.extend(gate_up_beside_another(f));
    for (key, given, what) in [
        ("experts", f.has("experts"), "the number of experts"),
        ("top_k", f.has("top_k"), "how many experts each token goes to"),
        ("up", f.has("up") || fused, "the experts' up projection (or a fused `gate_up`)"),
        ("down", f.has("down"), "the experts' down projection"),
        ("act", f.has("act"), "the experts' activation"),
    ] {
        if !given {
            diags.push(missing(c, key, what));
        }
    }
    if let (Some(e), Some(k)) = (experts, top_k) {
        if k > e {
            diags.push(
                Diagnostic::error(Code::Sizes, format!("`top_k` {k} is more than the {e} experts"))
                    .label(f.span_of("top_k"), "each token goes to this many experts"),
            );
        } else if e % groups != 0 {
            diags.push(
                Diagnostic::error(Code::Sizes, format!("{e} experts do not fall into {groups} equal groups"))
                    .label(f.span_of("groups"), "the experts' groups"),
            );
        } else if topk_groups.is_some_and(|g| g > groups || g * (e / groups) < k) {
            let g = topk_groups.unwrap_or(0);
            diags.push(
                Diagnostic::error(
                    Code::Sizes,
                    format!(
                        "`topk_groups` {g} of {groups} groups of {} experts cannot hold `top_k` {k}",
                        e / groups
                    ),
                )
                .label(f.span_of("topk_groups"), "each token chooses from this many groups"),
            );
        }
    }
    for key in ["topk_groups", "group_score"] {
        if groups == 1 && f.has(key) {
            diags.push(
                Diagnostic::error(Code::BadValue, format!("`{key}` without `groups`"))
                    .label(f.span_of(key), "say how many groups the experts fall into with `groups = …`"),
            );
        }
    }
    if groups > 1 && topk_groups.is_none() && !f.has("topk_groups") {
        diags.push(missing(c, "topk_groups", "how many groups each token chooses from"));
    }
    let shared = f.string("shared", diags);
    let shared_gate = f.string("shared_gate", diags).map(|g| join(&g));
    if shared.is_none() {
        for key in ["d_shared", "shared_gate"] {
            if f.has(key) {
                diags.push(
                    Diagnostic::error(Code::BadValue, format!("`{key}` without a shared expert"))
                        .label(f.span_of(key), "name the shared expert's prefix with `shared = \"…\"`"),
                );
            }
        }
    } else if d_shared.is_none() && !f.has("d_shared") {
        diags.push(missing(c, "d_shared", "the shared expert's hidden size"));
    }
    if let Some(g) = &shared_gate {
        check_template(g, in_block, None, f.span_of("shared_gate"), diags);
    }
    if interleaved && !fused {
        diags.push(Diagnostic::error(Code::BadValue, "`interleaved` needs a fused `gate_up`").label(
            f.span_of("interleaved"),
            "the gate's and the up projection's outputs alternate in one tensor",
        ));
    }
    if (clamp.is_some() || up_offset != 0.0) && !(fused || f.has("gate")) {
        let key = if clamp.is_some() { "clamp" } else { "up_offset" };
        diags.push(
            Diagnostic::error(Code::BadValue, format!("`{key}` needs gated experts"))
                .label(f.span_of(key), "it shapes the gate and the up projection's product"),
        );
    }
    if diags.len() > before {
        return None;
    }
    let biases = bias.then(|| {
        let up_b = gate_up.as_ref().or(up.as_ref()).map(|p| p.2.clone()).unwrap_or_default();
        let gate_b = if fused { None } else { gate.as_ref().map(|p| p.2.clone()) };
        (up_b, gate_b, down.as_ref().map(|p| p.2.clone()).unwrap_or_default())
    });
    let plain = |n: &str| Proj { weight: n.to_string(), bias: None, transposed: false };
    let shared = shared.map(|s| {
        // Under the prefix with the experts' leaf names, or, where the name holds
        // `{proj}`, that name with the projection's role (llama.cpp's `ffn_{proj}_shexp`).
        let name = |role: &str, leaf: &str| match s.contains("{proj}") {
            true => format!("{}.weight", join(&s.replace("{proj}", role))),
            false => format!("{}.weight", join(&format!("{s}.{leaf}"))),
        };
        let (up, gate) = match (&gate_up, &up, &gate) {
            (Some((l, ..)), _, _) => (name("gate_up", l), None),
            (None, Some((l, ..)), g) => (name("up", l), g.as_ref().map(|(l, ..)| plain(&name("gate", l)))),
            _ => unreachable!("checked above"),
        };
        let mlp = Mlp {
            up: plain(&up),
            gate,
            gate_up: fused,
            down: plain(&name("down", &down.as_ref().unwrap().0)),
            act: act.unwrap(),
            d_ff: d_shared,
        };
        Shared { mlp, gate: shared_gate.map(|g| format!("{g}.weight")) }
    });
    let route = Route {
        experts: experts?,
        top_k: top_k?,
        scoring,
        normalize,
        scale,
        groups,
        topk_groups: topk_groups.unwrap_or(1),
        group_score,
        choice_bias: choice_bias.is_some(),
    };
    let (up, gate) = match (gate_up, up) {
        (Some((_, w, _)), _) => (w, None),
        (None, Some((_, w, _))) => (w, gate.map(|g| g.1)),
        _ => return None,
    };
    let router_bias = router_bias.then(|| format!("{router}.bias"));
    let router = format!("{router}.weight");
    Some(Kind::Moe(Box::new(Moe {
        router,
        route,
        hidden,
        up,
        gate,
        gate_up: fused,
        down: down?.1,
        act: act?,
        shared,
        router_bias,
        choice_bias,
        transposed,
        interleaved,
        biases,
        clamp,
        up_offset,
    })))
}

type NameFn<'a> = dyn FnMut(&mut Fields, &str, Option<&str>, &mut Vec<Diagnostic>) -> Option<String> + 'a;

fn attention(
    c: &ast::Component,
    f: &mut Fields,
    name: &mut NameFn<'_>,
    sizes: Option<&Sizes>,
    diags: &mut Vec<Diagnostic>,
) -> Option<Kind> {
    let transposed = f.bool("transposed", diags).unwrap_or(false);
    // `bias = true|false`, or a list naming the projections that have one.
    let mut biased: HashSet<&'static str> = HashSet::new();
    if let Some(v) = f.get("bias").cloned() {
        f.used.insert("bias".into());
        match &v.kind {
            ValueKind::Bool(true) => biased.extend(["q", "k", "v", "o", "qkv"]),
            ValueKind::Bool(false) => {}
            ValueKind::List(items) => {
                for it in items {
                    match &it.kind {
                        ValueKind::Ident(s) if ["q", "k", "v", "o", "qkv"].contains(&s.as_str()) => {
                            biased.insert(["q", "k", "v", "o", "qkv"].into_iter().find(|x| x == s).unwrap());
                        }
                        _ => diags.push(bad(it, "a projection name: q, k, v, o or qkv")),
                    }
                }
            }
            _ => diags.push(bad(&v, "`true`, `false` or a list such as `[q, k, v]`")),
        }
    }
    let mut proj = |f: &mut Fields, key: &'static str, diags: &mut Vec<Diagnostic>| {
        name(f, key, None, diags).map(|w| Proj {
            bias: biased.contains(key).then(|| format!("{w}.bias")),
            weight: format!("{w}.weight"),
            transposed,
        })
    };
    let fused = proj(f, "qkv", diags);
    let (q, k, v) = (proj(f, "q", diags), proj(f, "k", diags), proj(f, "v", diags));
    let o = proj(f, "o", diags);
    let layout = match f.choice("qkv_layout", &["concat", "grouped"], diags).as_deref() {
        Some("grouped") => QkvLayout::Grouped,
        _ => QkvLayout::Concat,
    };
    let qkv = match (fused, q, k, v) {
        (Some(proj), None, None, None) => Some(Qkv::Fused { proj, layout }),
        (None, Some(q), Some(k), Some(v)) => Some(Qkv::Separate { q, k, v }),
        (Some(_), ..) => {
            diags.push(
                Diagnostic::error(
                    Code::BadValue,
                    "`qkv` and separate `q`/`k`/`v` projections exclude each other",
                )
                .label(f.span_of("qkv"), "the fused projection")
                .label(c.name.span.clone(), "in this attention"),
            );
            None
        }
        _ => {
            let absent: Vec<&str> = ["q", "k", "v"].into_iter().filter(|k| !f.has(k)).collect();
            if !f.has("qkv") && !absent.is_empty() {
                let what = "the projections: `q`, `k` and `v`, or a fused `qkv`";
                diags.push(missing(c, &absent.join("`, `"), what));
            }
            None
        }
    };
    if o.is_none() && !f.has("o") {
        diags.push(missing(c, "o", "the output projection"));
    }
    let causal = f.bool("causal", diags).unwrap_or(true);
    let window = f.positive("window", diags);
    let head_dim = sizes.map(|s| s.head_dim).unwrap_or(0);
    let scale = f.float_positive("scale", diags).unwrap_or(1.0 / (head_dim.max(1) as f64).sqrt());
    let position = position(f, head_dim, diags);
    let qk_norm = qk_norm(f, name, diags);
    let softcap = f.float_positive("softcap", diags);
    let sinks = name(f, "sinks", None, diags);
    Some(Kind::Attention(Box::new(Attention {
        softcap,
        sinks,
        qkv: qkv?,
        o: o?,
        causal,
        window,
        scale,
        position: position?,
        qk_norm: qk_norm?,
    })))
}

/// `mla { q_a = "q_a_proj", q_norm = "q_a_layernorm", q_b = "q_b_proj", q_rank = 1536,
/// kv_a = "kv_a_proj_with_mqa", kv_norm = "kv_a_layernorm", kv_b = "kv_b_proj", o =
/// "o_proj", kv_rank = 512, nope_dim = 128, rope_dim = 64, v_dim = 128, position = rope
/// { … } }` (or `q = "q_proj"` for a full-rank query); `bias = true`: `q_a`, `kv_a` and
/// `o` have biases.
fn mla(
    c: &ast::Component,
    f: &mut Fields,
    name: &mut NameFn<'_>,
    diags: &mut Vec<Diagnostic>,
) -> Option<Kind> {
    let before = diags.len();
    let bias = f.bool("bias", diags).unwrap_or(false);
    let q_norm = name(f, "q_norm", None, diags);
    let kv_norm = name(f, "kv_norm", None, diags);
    let kv_b = name(f, "kv_b", None, diags);
    let k_b = name(f, "k_b", None, diags);
    let v_b = name(f, "v_b", None, diags);
    let mut proj = |f: &mut Fields, key: &str, biased: bool, diags: &mut Vec<Diagnostic>| {
        name(f, key, None, diags).map(|w| Proj {
            bias: biased.then(|| format!("{w}.bias")),
            weight: format!("{w}.weight"),
            transposed: false,
        })
    };
    // transformers' full-rank `q_proj` has no bias; `q_a_proj` has one with the others.
    let full = proj(f, "q", false, diags);
    let q_a = proj(f, "q_a", bias, diags);
    let q_b = proj(f, "q_b", false, diags);
    let q_rank = f.positive("q_rank", diags);
    let kv_a = proj(f, "kv_a", bias, diags);
    let o = proj(f, "o", bias, diags);
    let [kv_rank, nope_dim, rope_dim, v_dim] =
        ["kv_rank", "nope_dim", "rope_dim", "v_dim"].map(|k| f.positive(k, diags));
    let eps = f.float_positive("eps", diags).unwrap_or(1e-6);
    let low = ["q_a", "q_norm", "q_b", "q_rank"];
    let q = match (full, q_a, q_norm, q_b, q_rank) {
        (Some(q), None, None, None, None) if !low.iter().any(|k| f.has(k)) => Some(MlaQuery::Full(q)),
        (None, Some(a), Some(norm), Some(b), Some(rank)) => {
            Some(MlaQuery::LowRank { a, norm: format!("{norm}.weight"), b, rank })
        }
        _ => {
            let given: Vec<&str> = low.iter().copied().filter(|k| f.has(k)).collect();
            if f.has("q") && !given.is_empty() {
                diags.push(
                    Diagnostic::error(
                        Code::BadValue,
                        "a full-rank `q` and a low-rank query exclude each other",
                    )
                    .label(f.span_of("q"), "the full-rank query")
                    .label(f.span_of(given[0]), "a part of the low-rank one"),
                );
            } else if !f.has("q") {
                let absent: Vec<&str> = low.iter().copied().filter(|k| !f.has(k)).collect();
                if !absent.is_empty() {
                    let what = "the query: `q`, or `q_a`, `q_norm`, `q_b` and `q_rank`";
                    diags.push(missing(c, &absent.join("`, `"), what));
                }
            }
            None
        }
    };
    for (key, given, what) in [
        ("kv_a", f.has("kv_a"), "the latent's projection (`kv_a_proj_with_mqa`)"),
        ("kv_norm", f.has("kv_norm"), "the latent's RMSNorm"),
        (
            "kv_b",
            f.has("kv_b") || f.has("k_b") && f.has("v_b"),
            "the latent's key and value projection (`kv_b_proj`, or its parts `k_b` and `v_b`)",
        ),
        ("o", f.has("o"), "the output projection"),
        ("kv_rank", f.has("kv_rank"), "the latent's width"),
        ("nope_dim", f.has("nope_dim"), "each head's key width without rotation"),
        ("rope_dim", f.has("rope_dim"), "the rotated key width"),
        ("v_dim", f.has("v_dim"), "each head's value width"),
    ] {
        if !given {
            diags.push(missing(c, key, what));
        }
    }
    let rope_dim = rope_dim.unwrap_or(0);
    if !f.has("position") {
        diags.push(missing(c, "position", "the rotation of the `rope_dim` part: `rope { … }`"));
    }
    if rope_dim % 2 != 0 {
        diags.push(
            Diagnostic::error(Code::Sizes, format!("`rope_dim` {rope_dim} is odd"))
                .label(f.span_of("rope_dim"), "rotated in pairs"),
        );
    }
    let position = position(f, rope_dim, diags);
    if let Some(p) = position.as_ref().filter(|_| f.has("position")) {
        if !matches!(p, Position::Rope { .. }) {
            diags.push(
                Diagnostic::error(Code::BadValue, "a latent attention's position is `rope`")
                    .label(f.span_of("position"), "rotates the `rope_dim` part of queries and keys"),
            );
        }
    }
    let kv_b = match (kv_b, k_b, v_b) {
        (Some(kv), None, None) => Some(KvB::Fused(format!("{kv}.weight"))),
        (None, Some(k), Some(v)) => Some(KvB::Split { k: format!("{k}.weight"), v: format!("{v}.weight") }),
        (Some(_), ..) if f.has("k_b") || f.has("v_b") => {
            let part = if f.has("k_b") { "k_b" } else { "v_b" };
            diags.push(
                Diagnostic::error(Code::BadValue, "`kv_b` and its parts `k_b`/`v_b` exclude each other")
                    .label(f.span_of("kv_b"), "the whole projection")
                    .label(f.span_of(part), "a part of it"),
            );
            None
        }
        _ => None,
    };
    let scale =
        f.float_positive("scale", diags).unwrap_or(1.0 / ((nope_dim.unwrap_or(0) + rope_dim) as f64).sqrt());
    if diags.len() > before {
        return None;
    }
    Some(Kind::Mla(Box::new(Mla {
        q: q?,
        kv_a: kv_a?,
        kv_norm: format!("{}.weight", kv_norm?),
        kv_b: kv_b?,
        o: o?,
        kv_rank: kv_rank?,
        nope_dim: nope_dim?,
        rope_dim,
        v_dim: v_dim?,
        eps,
        scale,
        position: position?,
    })))
}

/// `qk_norm = rmsnorm { q = "q_norm", k = "k_norm", eps = 1e-6, unit_offset = false }` or
/// `layernorm { q = …, k = …, eps = 1e-5, bias = true }` in an attention: a norm of each
/// query and key head, or with `over = width` of the whole query and key projections. `Some(None)` without one; `None` (after a diagnostic) when wrong.
fn qk_norm(f: &mut Fields, name: &mut NameFn<'_>, diags: &mut Vec<Diagnostic>) -> Option<Option<QkNorm>> {
    let Some(v) = f.take("qk_norm") else {
        return Some(None);
    };
    let kinds = ["rmsnorm", "layernorm"];
    let (kind, fields) = match &v.kind {
        ValueKind::Object(kind, fields) if kinds.contains(&kind.name.as_str()) => (kind, fields),
        ValueKind::Object(kind, _) => {
            diags.push(unknown(kind, "q/k norm", &kinds));
            return None;
        }
        _ => {
            diags.push(bad(v, "a q/k norm: rmsnorm { … } or layernorm { … }"));
            return None;
        }
    };
    let layer = kind.name == "layernorm";
    let allowed: &[&str] = if layer {
        &["q", "k", "eps", "bias", "over", "per_head"]
    } else {
        &["q", "k", "eps", "unit_offset", "over", "per_head"]
    };
    let mut n = Fields::new(&format!("`{}`", kind.name), fields, allowed);
    n.placeholder = Some("head");
    let eps = n.float_positive("eps", diags).unwrap_or(if layer { 1e-5 } else { 1e-6 });
    let norm = if layer {
        HeadNorm::Layer { eps, bias: n.bool("bias", diags).unwrap_or(true) }
    } else {
        HeadNorm::Rms { eps, unit_offset: n.bool("unit_offset", diags).unwrap_or(false) }
    };
    let whole = n.choice("over", &["heads", "width"], diags).as_deref() == Some("width");
    let per_head_flag = n.bool("per_head", diags).unwrap_or(false);
    let q = name(&mut n, "q", Some("q_norm"), diags);
    let k = name(&mut n, "k", Some("k_norm"), diags);
    n.finish(diags);
    let (q, k) = (q?, k?);
    // Weights of each head its own: one `[heads, head_dim]` tensor, or one tensor per head
    // (`{head}` in the names), for both or neither.
    let (sq, sk) = (q.contains("{head}"), k.contains("{head}"));
    if sq != sk {
        diags.push(
            Diagnostic::error(Code::BadValue, "`{head}` in one of the q/k norm names but not the other")
                .label(
                    n.span_of(if sq { "k" } else { "q" }),
                    "add `{head}` here too, or remove it from the other",
                ),
        );
        return None;
    }
    let per_head = per_head_flag || sq;
    if per_head && whole {
        diags.push(
            Diagnostic::error(Code::BadValue, "q/k norm weights per head with `over = width`")
                .label(n.span_of("over"), "one norm over the whole projection has no heads")
                .note("`per_head = true` or `{head}` in the names gives each head its own weights"),
        );
        return None;
    }
    Some(Some(QkNorm { norm, whole, per_head, q, k }))
}

/// `scaling = linear { factor = 4 }`, `scaling = llama3 { factor = 8, low_freq_factor =
/// 1, high_freq_factor = 4, original_max_seq = 8192 }`, `yarn { … }` or `longrope {
/// short_factor = [...], long_factor = [...], original_max_seq = 4096, factor = 32 }` in a
/// `rope { ... }`; `None` (after a diagnostic) when it is wrong.
fn rope_scaling(r: &mut Fields, diags: &mut Vec<Diagnostic>) -> Option<RopeScaling> {
    let Some(v) = r.take("scaling") else {
        return Some(RopeScaling::None);
    };
    let kinds = ["linear", "dynamic", "llama3", "yarn", "longrope", "per_pair"];
    match &v.kind {
        ValueKind::Ident(s) if s == "none" => Some(RopeScaling::None),
        ValueKind::Object(kind, fields) if kind.name == "linear" => {
            let mut s = Fields::new("`linear`", fields, &["factor"]);
            let factor = s.float_positive("factor", diags);
            if !s.has("factor") {
                diags.push(missing_field(kind, "linear", "factor"));
            }
            s.finish(diags);
            Some(RopeScaling::Linear { factor: factor? })
        }
        ValueKind::Object(kind, fields) if kind.name == "dynamic" => {
            let keys = ["factor", "original_max_seq"];
            let mut s = Fields::new("`dynamic`", fields, &keys);
            let factor = s.float_positive("factor", diags);
            let original = s.positive("original_max_seq", diags);
            for k in keys.iter().filter(|k| !s.has(k)) {
                diags.push(missing_field(kind, "dynamic", k));
            }
            s.finish(diags);
            Some(RopeScaling::Dynamic { factor: factor?, original_max_seq: original?, max_seq: 0 })
        }
        ValueKind::Object(kind, fields) if kind.name == "llama3" => {
            let keys = ["factor", "low_freq_factor", "high_freq_factor", "original_max_seq"];
            let mut s = Fields::new("`llama3`", fields, &keys);
            let factor = s.float_positive("factor", diags);
            let low = s.float_positive("low_freq_factor", diags);
            let high = s.float_positive("high_freq_factor", diags);
            let original = s.positive("original_max_seq", diags);
            for k in keys.iter().filter(|k| !s.has(k)) {
                diags.push(missing_field(kind, "llama3", k));
            }
            s.finish(diags);
            let (low_freq_factor, high_freq_factor) = (low?, high?);
            if low_freq_factor >= high_freq_factor {
                diags.push(
                    Diagnostic::error(
                        Code::BadValue,
                        format!("low_freq_factor {low_freq_factor} is not below high_freq_factor {high_freq_factor}"),
                    )
                    .label(s.span_of("low_freq_factor"), "must be below high_freq_factor")
                    .note("frequencies between the two wavelengths they set are blended; the range may not be empty"),
                );
                return None;
            }
            Some(RopeScaling::Llama3 {
                factor: factor?,
                low_freq_factor,
                high_freq_factor,
                original_max_seq: original?,
            })
        }
        ValueKind::Object(kind, fields) if kind.name == "yarn" => {
            let keys =
                ["factor", "original_max_seq", "beta_fast", "beta_slow", "attention_factor", "truncate"];
            let mut s = Fields::new("`yarn`", fields, &keys);
            let factor = s.float_positive("factor", diags);
            let original = s.positive("original_max_seq", diags);
            let beta_fast = s.float_positive("beta_fast", diags).unwrap_or(32.0);
            let beta_slow = s.float_positive("beta_slow", diags).unwrap_or(1.0);
            let attention = s.float_positive("attention_factor", diags);
            let truncate = s.bool("truncate", diags).unwrap_or(true);
            for k in keys[..2].iter().filter(|k| !s.has(k)) {
                diags.push(missing_field(kind, "yarn", k));
            }
            s.finish(diags);
            let factor = factor?;
            Some(RopeScaling::Yarn {
                factor,
                original_max_seq: original?,
                beta_fast,
                beta_slow,
                attention_factor: attention.unwrap_or(RopeScaling::yarn_attention_factor(factor)),
                truncate,
            })
        }
        ValueKind::Object(kind, fields) if kind.name == "per_pair" => {
            let mut s = Fields::new("`per_pair`", fields, &["factors"]);
            let factors = s.float_list("factors", diags);
            if !s.has("factors") {
                diags.push(missing_field(kind, "per_pair", "factors"));
            }
            s.finish(diags);
            Some(RopeScaling::PerPair { factors: factors? })
        }
        ValueKind::Object(kind, fields) if kind.name == "longrope" => {
            let keys = ["short_factor", "long_factor", "original_max_seq", "factor", "attention_factor"];
            let mut s = Fields::new("`longrope`", fields, &keys);
            let short = s.float_list("short_factor", diags);
            let long = s.float_list("long_factor", diags);
            let original = s.positive("original_max_seq", diags);
            let factor = s.float_positive("factor", diags).unwrap_or(1.0);
            let attention = s.float_positive("attention_factor", diags);
            for k in keys[..3].iter().filter(|k| !s.has(k)) {
                diags.push(missing_field(kind, "longrope", k));
            }
            s.finish(diags);
            let original = original?;
            if original < 2 {
                diags.push(
                    Diagnostic::error(Code::BadValue, format!("longrope's original_max_seq is {original}"))
                        .label(s.span_of("original_max_seq"), "must be at least 2")
                        .note("the default attention factor divides by ln(original_max_seq)"),
                );
                return None;
            }
            Some(RopeScaling::Longrope {
                short_factor: short?,
                long_factor: long?,
                original_max_seq: original,
                attention_factor: attention
                    .unwrap_or(RopeScaling::longrope_attention_factor(factor, original)),
                long: false,
            })
        }
        ValueKind::Object(kind, _) => {
            diags.push(unknown(kind, "rope scaling", &kinds));
            None
        }
        ValueKind::Ident(s) => {
            let id = Ident { name: s.clone(), span: v.span.clone() };
            diags.push(unknown(&id, "rope scaling", &kinds));
            None
        }
        _ => {
            diags.push(bad(
                v,
                "a rope scaling: none, linear { factor = … }, dynamic { … }, llama3 { … }, yarn { … }, longrope { … } or per_pair { factors = [...] }",
            ));
            None
        }
    }
}

/// A required field of a component-like value that is absent.
fn missing_field(kind: &Ident, what: &str, key: &str) -> Diagnostic {
    Diagnostic::error(Code::Missing, format!("`{what}` needs `{key}`"))
        .label(kind.span.clone(), format!("`{key}` is missing"))
}

fn position(f: &mut Fields, head_dim: usize, diags: &mut Vec<Diagnostic>) -> Option<Position> {
    let Some(v) = f.get("position").cloned() else {
        return Some(Position::None);
    };
    f.used.insert("position".into());
    match &v.kind {
        ValueKind::Ident(s) if s == "none" => Some(Position::None),
        ValueKind::Ident(s) if s == "alibi" => Some(Position::Alibi { before_scale: false }),
        ValueKind::Object(kind, fields) if kind.name == "alibi" => {
            let mut a = Fields::new("`alibi`", fields, &["before_scale"]);
            let before_scale = a.bool("before_scale", diags).unwrap_or(false);
            a.finish(diags);
            Some(Position::Alibi { before_scale })
        }
        ValueKind::Ident(s) if s == "rope" => Some(Position::Rope {
            theta: 10000.0,
            rotary_dim: head_dim,
            interleaved: false,
            scaling: RopeScaling::None,
        }),
        ValueKind::Object(kind, fields) if kind.name == "rope" => {
            let mut r = Fields::new("`rope`", fields, &["theta", "fraction", "pairs", "scaling"]);
            let theta = r.float_positive("theta", diags).unwrap_or(10000.0);
            let fraction = r.float_positive("fraction", diags).unwrap_or(1.0);
            let interleaved =
                r.choice("pairs", &["halves", "interleaved"], diags).as_deref() == Some("interleaved");
            let scaling = rope_scaling(&mut r, diags);
            r.finish(diags);
            let scaling = scaling?;
            let dims = fraction * head_dim as f64;
            let rotary_dim = dims.round() as usize;
            if head_dim == 0 {
                // The sizes are wrong already and reported; nothing to check against.
                return None;
            }
            if fraction > 1.0
                || (dims - rotary_dim as f64).abs() > 1e-9
                || rotary_dim % 2 != 0
                || rotary_dim == 0
            {
                diags.push(
                    Diagnostic::error(
                        Code::Sizes,
                        format!("rotary fraction {fraction} of head_dim {head_dim} gives {dims} dimensions"),
                    )
                    .label(
                        r.span_of("fraction"),
                        "the rotated dimensions must be a positive, even whole number",
                    )
                    .note("rotary embeddings rotate pairs of dimensions"),
                );
                return None;
            }
            if matches!(scaling, RopeScaling::Dynamic { .. }) && rotary_dim <= 2 {
                diags.push(
                    Diagnostic::error(
                        Code::Sizes,
                        format!("dynamic rope scaling over {rotary_dim} rotated dimensions"),
                    )
                    .label(r.span_of("scaling"), "needs more than 2 rotated dimensions")
                    .note("the base is raised to the power d / (d - 2)"),
                );
                return None;
            }
            if let RopeScaling::Longrope { short_factor, long_factor, .. } = &scaling {
                let pairs = rotary_dim / 2;
                if short_factor.len() != pairs || long_factor.len() != pairs {
                    diags.push(
                        Diagnostic::error(
                            Code::Sizes,
                            format!(
                                "longrope has {} short and {} long factors for {pairs} rotated pairs",
                                short_factor.len(),
                                long_factor.len()
                            ),
                        )
                        .label(r.span_of("scaling"), format!("needs {pairs} of each"))
                        .note("one factor per rotated pair of dimensions: rotary dimensions / 2"),
                    );
                    return None;
                }
            }
            if let RopeScaling::PerPair { factors } = &scaling {
                let pairs = rotary_dim / 2;
                if factors.len() != pairs {
                    diags.push(
                        Diagnostic::error(
                            Code::Sizes,
                            format!("per_pair has {} factors for {pairs} rotated pairs", factors.len()),
                        )
                        .label(r.span_of("scaling"), format!("needs {pairs}"))
                        .note("one factor per rotated pair of dimensions: rotary dimensions / 2"),
                    );
                    return None;
                }
            }
            Some(Position::Rope { theta, rotary_dim, interleaved, scaling })
        }
        ValueKind::Object(kind, _) => {
            diags.push(unknown(kind, "position scheme", &["none", "alibi", "rope"]));
            None
        }
        ValueKind::Ident(s) => {
            let id = Ident { name: s.clone(), span: v.span.clone() };
            diags.push(unknown(&id, "position scheme", &["none", "alibi", "rope"]));
            None
        }
        _ => {
            diags.push(bad(&v, "a position scheme: none, alibi, rope or rope { ... }"));
            None
        }
    }
}

fn check_template(t: &str, in_block: bool, extra: Option<&str>, span: Span, diags: &mut Vec<Diagnostic>) {
    let mut rest = t;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        let key = &rest[open + 1..open + close];
        if Some(key) == extra {
        } else if key != "layer" {
            let only = match extra {
                Some(e) => format!("`{{layer}}` and `{{{e}}}`"),
                None => "`{layer}` (`{head}` in q/k norm names, `{expert}` in a mixture's)".to_string(),
            };
            diags.push(
                Diagnostic::error(Code::BadValue, format!("unknown placeholder `{{{key}}}` in `{t}`"))
                    .label(span.clone(), format!("the placeholders are {only}")),
            );
        } else if !in_block {
            diags.push(
                Diagnostic::error(
                    Code::BadValue,
                    format!("`{{layer}}` in `{t}` outside the `block` section"),
                )
                .label(span.clone(), "only block components are repeated per layer"),
            );
        }
        rest = &rest[open + close + 1..];
    }
}

fn missing(c: &ast::Component, key: &str, what: &str) -> Diagnostic {
    Diagnostic::error(Code::Missing, format!("`{}: {}` is missing `{key}`", c.name.name, c.kind.name))
        .label(c.name.span.clone(), format!("needs `{key}`: {what}"))
}

fn bad(v: &Value, expected: &str) -> Diagnostic {
    Diagnostic::error(Code::BadValue, format!("expected {expected}")).label(v.span.clone(), "this value")
}

fn unknown(id: &Ident, what: &str, known: &[&str]) -> Diagnostic {
    unknown_in(id, what, "", known)
}

/// `unknown key `epsilon` in `ln: layernorm``, with a suggestion when one is close.
fn unknown_in(id: &Ident, what: &str, place: &str, known: &[&str]) -> Diagnostic {
    let place = if place.is_empty() { String::new() } else { format!(" in {place}") };
    let mut d = Diagnostic::error(Code::Unknown, format!("unknown {what} `{}`{place}", id.name))
        .label(id.span.clone(), format!("not a known {what}{place}"));
    match known
        .iter()
        .max_by(|a, b| strsim::jaro_winkler(a, &id.name).total_cmp(&strsim::jaro_winkler(b, &id.name)))
    {
        Some(best) if strsim::jaro_winkler(best, &id.name) > 0.8 => {
            d = d.note(format!("did you mean `{best}`?"));
        }
        _ => {}
    }
    d.note(format!("expected one of: {}", known.join(", ")))
}

/// Typed access to `key = value` fields that remembers which keys were read, so that
/// the rest can be reported as unknown.
struct Fields<'a> {
    what: String,
    fields: &'a [Field],
    allowed: &'a [&'a str],
    used: HashSet<String>,
    /// The placeholder names here may hold besides `{layer}`: `head` (a q/k norm's
    /// weights stored one tensor per head) or `expert` (a mixture's).
    placeholder: Option<&'static str>,
}

impl<'a> Fields<'a> {
    fn new(what: &str, fields: &'a [Field], allowed: &'a [&'a str]) -> Self {
        Fields { what: what.to_string(), fields, allowed, used: HashSet::new(), placeholder: None }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.fields.iter().find(|f| f.key.name == key).map(|f| &f.value)
    }

    fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    fn span_of(&self, key: &str) -> Span {
        self.fields
            .iter()
            .find(|f| f.key.name == key)
            .map(|f| f.key.span.start..f.value.span.end)
            .unwrap_or(0..0)
    }

    fn take(&mut self, key: &str) -> Option<&'a Value> {
        self.used.insert(key.to_string());
        self.get(key)
    }

    fn string(&mut self, key: &str, diags: &mut Vec<Diagnostic>) -> Option<String> {
        match self.take(key).map(|v| (v, &v.kind)) {
            Some((_, ValueKind::Str(s))) => Some(s.clone()),
            Some((v, _)) => {
                diags.push(bad(v, "a string in double quotes"));
                None
            }
            None => None,
        }
    }

    fn bool(&mut self, key: &str, diags: &mut Vec<Diagnostic>) -> Option<bool> {
        match self.take(key).map(|v| (v, &v.kind)) {
            Some((_, ValueKind::Bool(b))) => Some(*b),
            Some((v, _)) => {
                diags.push(bad(v, "`true` or `false`"));
                None
            }
            None => None,
        }
    }

    fn ident(&mut self, key: &str, diags: &mut Vec<Diagnostic>) -> Option<String> {
        match self.take(key).map(|v| (v, &v.kind)) {
            Some((_, ValueKind::Ident(s))) => Some(s.clone()),
            Some((v, _)) => {
                diags.push(bad(v, "a name"));
                None
            }
            None => None,
        }
    }

    fn choice(&mut self, key: &str, choices: &[&str], diags: &mut Vec<Diagnostic>) -> Option<String> {
        let v = self.take(key)?;
        match &v.kind {
            ValueKind::Ident(s) if choices.contains(&s.as_str()) => Some(s.clone()),
            ValueKind::Ident(s) => {
                let id = Ident { name: s.clone(), span: v.span.clone() };
                diags.push(unknown_in(&id, "value", &format!("`{key}`"), choices));
                None
            }
            _ => {
                diags.push(bad(v, &format!("one of: {}", choices.join(", "))));
                None
            }
        }
    }

    /// `choice` among a table's names, as the table's value.
    fn pick<T: Copy>(&mut self, key: &str, table: &[(&str, T)], diags: &mut Vec<Diagnostic>) -> Option<T> {
        let names: Vec<&str> = table.iter().map(|(n, _)| *n).collect();
        let name = self.choice(key, &names, diags)?;
        table.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }

    fn natural(&mut self, key: &str, diags: &mut Vec<Diagnostic>) -> Option<usize> {
        match self.take(key).map(|v| (v, &v.kind)) {
            Some((_, ValueKind::Integer(i))) if *i >= 0 => Some(*i as usize),
            Some((v, _)) => {
                diags.push(bad(v, "a whole number ≥ 0"));
                None
            }
            None => None,
        }
    }

    /// A whole number in `1..=LIMIT`: sizes beyond it would only exhaust memory.
    fn positive(&mut self, key: &str, diags: &mut Vec<Diagnostic>) -> Option<usize> {
        const LIMIT: i64 = 1 << 30;
        match self.take(key).map(|v| (v, &v.kind)) {
            Some((_, ValueKind::Integer(i))) if *i > 0 && *i <= LIMIT => Some(*i as usize),
            Some((v, _)) => {
                diags.push(bad(v, &format!("a whole number from 1 to 2^30 for `{key}`")));
                None
            }
            None => None,
        }
    }

    fn float_positive(&mut self, key: &str, diags: &mut Vec<Diagnostic>) -> Option<f64> {
        let v = self.take(key)?;
        let x = match v.kind {
            ValueKind::Integer(i) => i as f64,
            ValueKind::Number(x) => x,
            _ => f64::NAN,
        };
        if x.is_finite() && x > 0.0 {
            Some(x)
        } else {
            diags.push(bad(v, &format!("a number > 0 for `{key}`")));
            None
        }
    }

    /// A list of numbers > 0 for `key`, one diagnostic per wrong item.
    fn float_list(&mut self, key: &str, diags: &mut Vec<Diagnostic>) -> Option<Vec<f64>> {
        let v = self.take(key)?;
        let ValueKind::List(items) = &v.kind else {
            diags.push(bad(v, &format!("a list of numbers > 0 for `{key}`")));
            return None;
        };
        let mut ok = true;
        let xs = items
            .iter()
            .map(|it| match it.kind {
                ValueKind::Integer(i) if i > 0 => i as f64,
                ValueKind::Number(x) if x.is_finite() && x > 0.0 => x,
                _ => {
                    diags.push(bad(it, &format!("a number > 0 in `{key}`")));
                    ok = false;
                    f64::NAN
                }
            })
            .collect();
        ok.then_some(xs)
    }

    /// Reports every field that is not allowed here.
    fn finish(&self, diags: &mut Vec<Diagnostic>) {
        let mut seen = HashSet::new();
        for f in self.fields {
            if !seen.insert(f.key.name.as_str()) {
                diags.push(
                    Diagnostic::error(
                        Code::Duplicate,
                        format!("`{}` is set twice in {}", f.key.name, self.what),
                    )
                    .label(f.key.span.clone(), "set again here"),
                );
            } else if !self.allowed.contains(&f.key.name.as_str()) {
                diags.push(unknown_in(&f.key, "key", &self.what, self.allowed));
            }
        }
    }
}
