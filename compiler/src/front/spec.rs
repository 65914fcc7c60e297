//! A checked model description: what the declarative part of a spec means.
//!
//! Every size is known and consistent, every component's options are resolved to
//! checkpoint names and attributes. The data flow (the statements of each section) is
//! still syntax; `lower` checks it while building the graph.

use super::ast::{Ident, Span, Stmt};
use crate::ir::{Act, DType, QkvLayout};

#[derive(Clone, Debug)]
pub struct Spec {
    pub name: String,
    pub sizes: Sizes,
    pub dtype: DType,
    /// What linear maps multiply their weights by: the f32 activations as they are
    /// (`F32`), rounded to bf16 first (`BF16`), or, for those with block weights, to
    /// 8-bit integers per 32 (`Q8`).
    pub activations: DType,
    pub embed: Section,
    /// The block variants (one, unnamed, unless the spec names several), and which one
    /// each layer runs (`pattern`, repeated over the layers).
    pub blocks: Vec<Block>,
    pub layer_blocks: Vec<usize>,
    pub head: Option<Section>,
    /// Matrices stored otherwise than their component says (`dtypes { … }`), by
    /// checkpoint name; `lower` checks that each names a matrix of the model.
    pub tensor_dtypes: Vec<TensorDtype>,
}

/// One matrix's storage type, as a `dtypes` section gives it.
#[derive(Clone, Debug)]
pub struct TensorDtype {
    pub name: String,
    pub dtype: DType,
    /// The name's string in the spec.
    pub span: Span,
}

#[derive(Clone, Debug)]
pub struct Block {
    pub name: Option<String>,
    pub section: Section,
}

impl Spec {
    /// The block layer `layer` runs.
    pub fn block_of(&self, layer: u32) -> &Section {
        &self.blocks[self.layer_blocks[layer as usize]].section
    }

    /// Whether `layer` is the first layer that runs its block.
    pub fn first_of_its_block(&self, layer: u32) -> bool {
        let b = self.layer_blocks[layer as usize];
        self.layer_blocks.iter().position(|&x| x == b) == Some(layer as usize)
    }

    /// The architecture as Graphviz DOT (`ir::dot`), one cluster per block variant.
    pub fn dot(&self, model: &crate::ir::Graph) -> String {
        let names: Vec<String> = self.blocks.iter().map(|b| b.name.clone().unwrap_or_default()).collect();
        crate::ir::dot::to_dot(model, &self.layer_blocks, &names)
    }

    /// Each layer's block name, where the blocks have names.
    pub fn layer_names(&self) -> Vec<String> {
        self.layer_blocks.iter().filter_map(|&b| self.blocks[b].name.clone()).collect()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sizes {
    pub vocab: usize,
    pub d_model: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub d_ff: Option<usize>,
    pub max_seq: usize,
}

#[derive(Clone, Debug)]
pub struct Section {
    pub keyword: Span,
    pub components: Vec<Component>,
    pub stmts: Vec<Stmt>,
}

impl Section {
    pub fn component(&self, name: &str) -> Option<&Component> {
        self.components.iter().find(|c| c.name.name == name)
    }
}

#[derive(Clone, Debug)]
pub struct Component {
    pub name: Ident,
    pub kind: Kind,
    /// The storage of its weight matrices, where it differs from the spec's `dtype`.
    pub dtype: Option<DType>,
}

/// A checkpoint tensor name; `{layer}` stands for the block index.
pub type Template = String;

pub fn instantiate(t: &Template, layer: Option<u32>) -> String {
    match layer {
        Some(l) => t.replace("{layer}", &l.to_string()),
        None => t.clone(),
    }
}

#[derive(Clone, Debug)]
pub struct Proj {
    pub weight: Template,
    pub bias: Option<Template>,
    pub transposed: bool,
}

#[derive(Clone, Debug)]
pub enum Qkv {
    Separate { q: Proj, k: Proj, v: Proj },
    Fused { proj: Proj, layout: QkvLayout },
}

#[derive(Clone, Debug)]
pub enum Position {
    None,
    /// ALiBi; `before_scale`: the bias is added before the scores are scaled, so it is
    /// scaled with them (Falcon).
    Alibi {
        before_scale: bool,
    },
    Rope {
        theta: f64,
        rotary_dim: usize,
        interleaved: bool,
        scaling: crate::ir::RopeScaling,
    },
}

#[derive(Clone, Debug)]
pub struct Attention {
    pub qkv: Qkv,
    pub o: Proj,
    pub causal: bool,
    pub window: Option<usize>,
    pub scale: f64,
    pub position: Position,
    /// A norm of each query and key head, before the rotation.
    pub qk_norm: Option<QkNorm>,
    /// Scores soft-capped to `cap · tanh(s / cap)` (Gemma 2).
    pub softcap: Option<f64>,
    /// The checkpoint name of one learned logit per head that joins every softmax
    /// (attention sinks, gpt-oss).
    pub sinks: Option<String>,
}

/// Multi-head latent attention (DeepSeek-V2/V3): the keys and values of all heads come
/// from one latent of `kv_rank` features per token (`kv_a`'s first part, RMS-normed) by
/// `kv_b` (`[heads · (nope_dim + v_dim), kv_rank]`), beside one rotated key part of
/// `rope_dim` shared by every head (`kv_a`'s last part). Lowering absorbs `kv_b` into the
/// query and the output side, so the cache holds the latent and the rotated part only.
#[derive(Clone, Debug)]
pub struct Mla {
    pub q: MlaQuery,
    /// `[kv_rank + rope_dim, d_model]`.
    pub kv_a: Proj,
    /// The latent's RMSNorm weight.
    pub kv_norm: Template,
    pub kv_b: KvB,
    pub o: Proj,
    pub kv_rank: usize,
    pub nope_dim: usize,
    pub rope_dim: usize,
    pub v_dim: usize,
    /// The RMSNorms' epsilon.
    pub eps: f64,
    pub scale: f64,
    /// Rotary, of the `rope_dim` part.
    pub position: Position,
}

/// How a latent attention's key and value up-projection is stored: one matrix
/// `[heads · (nope_dim + v_dim), kv_rank]` (Hugging Face's `kv_b_proj`), or the two
/// per-head parts llama.cpp's converter writes, `k [heads, kv_rank, nope_dim]` (each
/// head's key part transposed) and `v [heads, v_dim, kv_rank]`.
#[derive(Clone, Debug)]
pub enum KvB {
    Fused(Template),
    Split { k: Template, v: Template },
}

/// The query of a latent attention: one projection to `heads · (nope_dim + rope_dim)`,
/// or a low-rank one, `a` to `rank` features, an RMSNorm (`norm`), then `b`.
#[derive(Clone, Debug)]
pub enum MlaQuery {
    Full(Proj),
    LowRank { a: Proj, norm: Template, b: Proj, rank: usize },
}

/// The per-head norm of queries and keys (Qwen3, Gemma 3, Cohere): the same kind of norm
/// for both, with weights (and biases) of `[head_dim]` of their own.
#[derive(Clone, Debug)]
pub struct QkNorm {
    pub norm: HeadNorm,
    /// Over each head (weights `[head_dim]`), or over the whole projection (OLMo 2:
    /// weights `[heads · head_dim]`, before the heads are split).
    pub whole: bool,
    /// Each head has its own weights: `[heads, head_dim]` (Cohere), or, when the names
    /// hold `{head}`, one `[head_dim]` tensor per head (StableLM's `norms.{head}`).
    pub per_head: bool,
    /// The checkpoint names of the query's and the key's norm (`….weight`, `….bias`).
    pub q: String,
    pub k: String,
}

#[derive(Clone, Copy, Debug)]
pub enum HeadNorm {
    Rms { eps: f64, unit_offset: bool },
    Layer { eps: f64, bias: bool },
}

#[derive(Clone, Debug)]
pub struct Mlp {
    pub up: Proj,
    pub gate: Option<Proj>,
    /// `up` is one projection to `2 · d_ff` features, the gate's then the up's (Phi-3's
    /// `gate_up_proj`), bound as its two halves of rows (`name[a:b]`).
    pub gate_up: bool,
    pub down: Proj,
    pub act: Act,
    /// Its own hidden size, where it is not the spec's `d_ff`.
    pub d_ff: Option<usize>,
}

/// A mixture of experts: a router, the experts (gated or plain MLPs, each one slice of
/// 3-D tensors `[experts, rows, in]`, stacked from one tensor per expert where the
/// checkpoint has those), and optionally a shared expert that every row runs.
#[derive(Clone, Debug)]
pub struct Moe {
    /// The router's weight, `[experts, d_model]`.
    pub router: Template,
    pub route: crate::ir::Route,
    /// Each expert's hidden size (`d_expert`), where it is not `d_ff`.
    pub hidden: Option<usize>,
    /// The experts' projections (`…{0..E}…` where the checkpoint has a tensor per
    /// expert); with `gate_up`, `up` is one `[E, 2·f, d]` tensor, the gate's rows first.
    pub up: Template,
    pub gate: Option<Template>,
    pub gate_up: bool,
    pub down: Template,
    pub act: Act,
    pub shared: Option<Shared>,
    /// The router's bias (`[experts]`), if it has one.
    pub router_bias: Option<Template>,
    /// The bias added to the scores for the choice only (`[experts]`, DeepSeek-V3's
    /// `e_score_correction_bias`), if any.
    pub choice_bias: Option<Template>,
    /// The experts' matrices stored `[E, in, out]`.
    pub transposed: bool,
    /// The fused gate_up's outputs alternate gate, up (gpt-oss).
    pub interleaved: bool,
    /// The biases of the up (or gate_up), gate and down projections, `[E, out]` each.
    pub biases: Option<(Template, Option<Template>, Template)>,
    /// gpt-oss's clamped GLU limit, and what is added to the up projection.
    pub clamp: Option<f64>,
    pub up_offset: f64,
}

/// A shared expert: an MLP every row runs, its output optionally scaled by
/// `sigmoid(x · gate)` (`gate` a `[1, d_model]` weight, Qwen2-MoE).
#[derive(Clone, Debug)]
pub struct Shared {
    pub mlp: Mlp,
    pub gate: Option<Template>,
}

#[derive(Clone, Debug)]
pub enum Kind {
    /// A lookup table `[rows, d_model]`, indexed by `ids + offset`.
    Embedding {
        weight: Template,
        rows: usize,
        offset: usize,
    },
    Sinusoidal {
        base: f64,
        /// fairseq's layout and frequencies (XGLM), of positions `p + offset`.
        fairseq: bool,
        offset: usize,
    },
    /// `weight` `None`: no gain (OLMo's non-parametric LayerNorm).
    LayerNorm {
        eps: f64,
        weight: Option<Template>,
        bias: Option<Template>,
    },
    RmsNorm {
        eps: f64,
        weight: Template,
        unit_offset: bool,
    },
    Attention(Box<Attention>),
    Mla(Box<Mla>),
    Mlp(Mlp),
    Moe(Box<Moe>),
    /// The projection to vocabulary logits; `tied` names an embedding component whose
    /// table it reuses.
    Unembed {
        weight: Template,
        transposed: bool,
        bias: Option<Template>,
        tied: Option<String>,
        /// Logits soft-capped to `cap · tanh(l / cap)` (Gemma 2).
        softcap: Option<f64>,
    },
}

impl Kind {
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Embedding { .. } => "embedding",
            Kind::Sinusoidal { .. } => "sinusoidal",
            Kind::LayerNorm { .. } => "layernorm",
            Kind::RmsNorm { .. } => "rmsnorm",
            Kind::Attention(_) => "attention",
            Kind::Mla(_) => "mla",
            Kind::Mlp(_) => "mlp",
            Kind::Moe(_) => "moe",
            Kind::Unembed { .. } => "unembed",
        }
    }
}
