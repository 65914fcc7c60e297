//! The operations of the graph IR and their typing rules.
//!
//! Every operation is a variant of one enum; attributes are plain fields, operands are
//! the node's ordered inputs. Layout conventions:
//! - activations are row-major `[T, features]`, one row per token;
//! - per-head tensors are `[heads, T, head_dim]`;
//! - linear weights are `[out, in]` (PyTorch) unless `transposed`, then `[in, out]`
//!   (GPT-2's Conv1D), so a checkpoint is bound without copying;
//! - weights have the spec's storage dtype, activations are always `f32` (under
//!   `activations = bf16` a linear map's input is `round_bf16`'d first, under
//!   `activations = q8` the input of one with block weights `round_q8`'d, still `f32`).

use std::fmt;

use super::shape::{DType, Dim, TensorType};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Act {
    Relu,
    /// The exact GELU, `x·Φ(x)` with the error function.
    Gelu,
    /// GELU with the tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    Silu,
    /// `tanh`, of soft-capping (`cap · tanh(x / cap)`).
    Tanh,
    /// `x · sigmoid(1.702 x)` (CLIP's GELU approximation).
    QuickGelu,
    /// `relu(x)²` (Nemotron, Primer).
    Relu2,
    /// `1 / (1 + e^(-x))`: the gate of a shared expert (Qwen2-MoE).
    Sigmoid,
}

impl Act {
    pub const ALL: [(&'static str, Act); 8] = [
        ("relu", Act::Relu),
        ("gelu", Act::Gelu),
        ("gelu_tanh", Act::GeluTanh),
        ("silu", Act::Silu),
        ("tanh", Act::Tanh),
        ("quick_gelu", Act::QuickGelu),
        ("relu2", Act::Relu2),
        ("sigmoid", Act::Sigmoid),
    ];

    pub fn name(self) -> &'static str {
        Act::ALL.iter().find(|(_, a)| *a == self).map(|(n, _)| *n).unwrap_or("?")
    }

    /// The activation of `x`, written once for every engine: each supplies the
    /// arithmetic (`Arith`) in its own precision, the interpreter as f64 numbers, the
    /// code generators as instructions, and so computes this formula in this order.
    pub fn apply<A: Arith>(self, a: &mut A, x: A::V) -> A::V {
        match self {
            Act::Relu => {
                let zero = a.c(0.0);
                a.max(x, zero)
            }
            Act::Tanh => a.tanh(x),
            // x / (1 + e^(-1.702 x))
            Act::QuickGelu => {
                let k = a.c(-1.702);
                let n = a.mul(k, x.clone());
                let e = a.exp(n);
                let one = a.c(1.0);
                let d = a.add(one, e);
                a.div(x, d)
            }
            Act::Relu2 => {
                let zero = a.c(0.0);
                let r = a.max(x, zero);
                a.mul(r.clone(), r)
            }
            // 1 / (1 + e^(-x))
            Act::Sigmoid => {
                let n = a.neg(x);
                let e = a.exp(n);
                let one = a.c(1.0);
                let d = a.add(one.clone(), e);
                a.div(one, d)
            }
            // x / (1 + e^(-x))
            Act::Silu => {
                let n = a.neg(x.clone());
                let e = a.exp(n);
                let one = a.c(1.0);
                let d = a.add(one, e);
                a.div(x, d)
            }
            // 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
            Act::GeluTanh => {
                let x2 = a.mul(x.clone(), x.clone());
                let x3 = a.mul(x2, x.clone());
                let k = a.c(0.044715);
                let kx3 = a.mul(k, x3);
                let s = a.add(x.clone(), kx3);
                let c = a.c((2.0 / std::f64::consts::PI).sqrt());
                let inner = a.mul(c, s);
                let t = a.tanh(inner);
                let half = a.c(0.5);
                let hx = a.mul(half, x);
                let one = a.c(1.0);
                let u = a.add(one, t);
                a.mul(hx, u)
            }
            // 0.5·x·(1 + erf(x/√2)), the exact GELU
            Act::Gelu => {
                let r = a.c(std::f64::consts::FRAC_1_SQRT_2);
                let arg = a.mul(x.clone(), r);
                let e = a.erf(arg);
                let half = a.c(0.5);
                let hx = a.mul(half, x);
                let one = a.c(1.0);
                let u = a.add(one, e);
                a.mul(hx, u)
            }
        }
    }
}

/// The arithmetic the ops' shared formulas (`Act::apply`) are written in. An engine
/// implements it over its values (numbers, instructions, MLIR text) and chooses the
/// precision and the algorithm of each transcendental.
pub trait Arith {
    type V: Clone;
    fn c(&mut self, v: f64) -> Self::V;
    fn add(&mut self, a: Self::V, b: Self::V) -> Self::V;
    fn mul(&mut self, a: Self::V, b: Self::V) -> Self::V;
    fn div(&mut self, a: Self::V, b: Self::V) -> Self::V;
    fn neg(&mut self, a: Self::V) -> Self::V;
    fn max(&mut self, a: Self::V, b: Self::V) -> Self::V;
    fn exp(&mut self, a: Self::V) -> Self::V;
    fn tanh(&mut self, a: Self::V) -> Self::V;
    fn erf(&mut self, a: Self::V) -> Self::V;
}

/// `Arith` on `f64` numbers: what the interpreter computes.
pub struct F64;

impl Arith for F64 {
    type V = f64;
    fn c(&mut self, v: f64) -> f64 {
        v
    }
    fn add(&mut self, a: f64, b: f64) -> f64 {
        a + b
    }
    fn mul(&mut self, a: f64, b: f64) -> f64 {
        a * b
    }
    fn div(&mut self, a: f64, b: f64) -> f64 {
        a / b
    }
    fn neg(&mut self, a: f64) -> f64 {
        -a
    }
    fn max(&mut self, a: f64, b: f64) -> f64 {
        a.max(b)
    }
    fn exp(&mut self, a: f64) -> f64 {
        a.exp()
    }
    fn tanh(&mut self, a: f64) -> f64 {
        a.tanh()
    }
    fn erf(&mut self, a: f64) -> f64 {
        libm::erf(a)
    }
}

/// How a fused QKV projection orders its output features.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QkvLayout {
    /// All query heads, then all key heads, then all value heads (GPT-2).
    Concat,
    /// Per key/value group: its query heads, its key head, its value head
    /// (GPT-NeoX, BLOOM, Falcon).
    Grouped,
}

impl QkvLayout {
    pub fn name(self) -> &'static str {
        match self {
            QkvLayout::Concat => "concat",
            QkvLayout::Grouped => "grouped",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QkvPart {
    Q,
    K,
    V,
}

/// Where head `j` of one part of a fused QKV projection starts among the projection's
/// output features: the meaning of `split_qkv`, which every engine evaluates (the
/// interpreter with numbers, the code generators as index arithmetic).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadStart {
    /// `(j + first) · head_dim`: the part's heads side by side.
    Run { first: usize },
    /// `(j / per_group) · group_width + (j % per_group) · head_dim + offset`: heads in
    /// groups of `group_width` features, `per_group` of this part in each.
    Groups { per_group: usize, group_width: usize, offset: usize },
}

impl QkvLayout {
    /// Where the heads of `part` start, for `heads` query heads and `kv_heads` key/value
    /// heads of `head_dim` features.
    pub fn head_start(self, part: QkvPart, heads: usize, kv_heads: usize, head_dim: usize) -> HeadStart {
        match self {
            QkvLayout::Concat => HeadStart::Run {
                first: match part {
                    QkvPart::Q => 0,
                    QkvPart::K => heads,
                    QkvPart::V => heads + kv_heads,
                },
            },
            QkvLayout::Grouped => {
                let g = heads / kv_heads;
                let group_width = (g + 2) * head_dim;
                match part {
                    QkvPart::Q => HeadStart::Groups { per_group: g, group_width, offset: 0 },
                    QkvPart::K => HeadStart::Groups { per_group: 1, group_width, offset: g * head_dim },
                    QkvPart::V => HeadStart::Groups { per_group: 1, group_width, offset: (g + 1) * head_dim },
                }
            }
        }
    }
}

impl HeadStart {
    /// The first feature of head `j`.
    pub fn at(self, j: usize, head_dim: usize) -> usize {
        match self {
            HeadStart::Run { first } => (j + first) * head_dim,
            HeadStart::Groups { per_group, group_width, offset } => {
                (j / per_group) * group_width + (j % per_group) * head_dim + offset
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CacheKind {
    K,
    V,
}

impl CacheKind {
    pub fn name(self) -> &'static str {
        match self {
            CacheKind::K => "k",
            CacheKind::V => "v",
        }
    }
}

/// What a graph input carries.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum InputKind {
    /// Token ids, `[T] i32`.
    Tokens,
    /// Token-type (segment) ids, `[T] i32`.
    TokenTypes,
    /// The keys or values of one layer for the positions already processed,
    /// `[kv_heads, P, head_dim]`.
    Cache { layer: u32, kind: CacheKind },
}

/// What a weight holds, which decides its deterministic random initialisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightRole {
    Matrix,
    Embedding,
    Gain,
    Bias,
    /// Logits that join a softmax (attention sinks).
    Logit,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    pub theta: f64,
    /// How many leading dimensions of each head rotate (even).
    pub rotary_dim: usize,
    /// Rotate adjacent pairs `(0,1), (2,3), …` instead of the halves `(i, i + d/2)`.
    pub interleaved: bool,
    pub scaling: RopeScaling,
}

/// How a model stretches its rotary frequencies past the length it was trained on. Only
/// the frequencies change, the same at every position, so prefill and decode rotate
/// alike whatever the length.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Every frequency divided by `factor` (positions interpolated).
    Linear {
        factor: f64,
    },
    /// Pair `k`'s frequency divided by `factors[k]`: llama.cpp's `rope_freqs` tensor, in
    /// which its converter stores Llama 3.1's scaling as computed factors.
    PerPair {
        factors: Vec<f64>,
    },
    /// Llama 3.1: frequencies whose wavelength is longer than `original_max_seq /
    /// low_freq_factor` divided by `factor`, those shorter than `original_max_seq /
    /// high_freq_factor` kept, and those between blended smoothly.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_seq: usize,
    },
    /// YaRN: frequencies blended between interpolated (`/ factor`) and kept, by a ramp over
    /// the pairs between the `beta_fast` and `beta_slow` rotations in `original_max_seq`
    /// positions, and the rotation scaled by `attention_factor` (`0.1 ln(factor) + 1`
    /// unless given).
    Yarn {
        factor: f64,
        original_max_seq: usize,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: f64,
        /// The ramp's ends rounded to whole pairs (transformers' `truncate`, the
        /// default); gpt-oss keeps them fractional.
        truncate: bool,
    },
    /// LongRoPE (Phi-3): pair `k`'s frequency divided by `long_factor[k]` when the model
    /// is compiled for more than `original_max_seq` positions (`long`), else by
    /// `short_factor[k]`, and the rotation scaled by `attention_factor`
    /// (`sqrt(1 + ln(factor) / ln(original_max_seq))` unless given).
    ///
    /// transformers picks the list by the current sequence length, so a sequence that
    /// grows past `original_max_seq` is rotated with other frequencies than its cached
    /// keys were. Here the list is chosen once, by the compiled `max_seq`
    /// ([`RopeScaling::compiled_for`], as llama.cpp does by its context size): prefill
    /// and decode rotate alike, and equal transformers' full pass over any sequence
    /// longer than `original_max_seq` (with `long`), or any sequence at all (without).
    Longrope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_seq: usize,
        attention_factor: f64,
        long: bool,
    },
    /// Dynamic NTK: for a model compiled for `max_seq` > `original_max_seq` positions, the
    /// base `theta` becomes `theta · (factor · max_seq / original_max_seq - (factor -
    /// 1))^(d / (d - 2))` (`d` the rotated dimensions); otherwise nothing changes.
    ///
    /// transformers recomputes the base from the current length whenever a sequence
    /// grows past `original_max_seq`, so its cached keys keep older rotations. Here the
    /// length is the compiled `max_seq` (set by [`RopeScaling::compiled_for`]): prefill
    /// and decode rotate alike, equal to transformers' full pass over exactly `max_seq`
    /// tokens, and to transformers on everything when `max_seq` ≤ `original_max_seq`.
    Dynamic {
        factor: f64,
        original_max_seq: usize,
        max_seq: usize,
    },
}

impl RopeScaling {
    /// LongRoPE's default attention factor for a model extended `factor` times.
    pub fn longrope_attention_factor(factor: f64, original_max_seq: usize) -> f64 {
        if factor <= 1.0 {
            1.0
        } else {
            (1.0 + factor.ln() / (original_max_seq as f64).ln()).sqrt()
        }
    }

    /// The scaling of a model compiled for `max_seq` positions: the one place a choice
    /// that depends on the length (longrope's list) is made.
    pub fn compiled_for(self, max_seq: usize) -> RopeScaling {
        match self {
            RopeScaling::Longrope {
                short_factor, long_factor, original_max_seq, attention_factor, ..
            } => RopeScaling::Longrope {
                short_factor,
                long_factor,
                original_max_seq,
                attention_factor,
                long: max_seq > original_max_seq,
            },
            RopeScaling::Dynamic { factor, original_max_seq, .. } => {
                RopeScaling::Dynamic { factor, original_max_seq, max_seq }
            }
            other => other,
        }
    }

    /// YaRN's default attention factor for `factor`.
    pub fn yarn_attention_factor(factor: f64) -> f64 {
        if factor <= 1.0 {
            1.0
        } else {
            0.1 * factor.ln() + 1.0
        }
    }
}

impl Rope {
    /// The rotation frequency of each pair `k < rotary_dim / 2`, `theta^(-2k/rotary_dim)`
    /// scaled by `scaling`, in f64: every engine rotates pair `k` at position `p` by
    /// `p · inv_freqs()[k]`.
    pub fn inv_freqs(&self) -> Vec<f64> {
        let dim = self.rotary_dim as f64;
        let theta = match self.scaling {
            RopeScaling::Dynamic { factor, original_max_seq, max_seq } if max_seq > original_max_seq => {
                let stretch = factor * max_seq as f64 / original_max_seq as f64 - (factor - 1.0);
                self.theta * stretch.powf(dim / (dim - 2.0))
            }
            _ => self.theta,
        };
        let base = (0..self.rotary_dim / 2).map(|k| 1.0 / theta.powf(2.0 * k as f64 / dim));
        match self.scaling {
            RopeScaling::Yarn { factor, original_max_seq, beta_fast, beta_slow, truncate, .. } => {
                // The pair index that turns `rotations` times in the original length, and
                // the ramp from it (kept) to the other (interpolated), as transformers
                // computes them (whole pairs, clamped to the rotated ones).
                let dim = self.rotary_dim as f64;
                let at = |rotations: f64| {
                    dim * (original_max_seq as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * self.theta.ln())
                };
                let (low, high) = (at(beta_fast), at(beta_slow));
                let (low, high) = if truncate { (low.floor(), high.ceil()) } else { (low, high) };
                let (low, high) = (low.max(0.0), high.min(dim - 1.0));
                let high = if low == high { high + 0.001 } else { high };
                base.enumerate()
                    .map(|(k, f)| {
                        let keep = 1.0 - ((k as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        f / factor * (1.0 - keep) + f * keep
                    })
                    .collect()
            }
            RopeScaling::None | RopeScaling::Dynamic { .. } => base.collect(),
            RopeScaling::Linear { factor } => base.map(|f| f / factor).collect(),
            RopeScaling::PerPair { ref factors } => base.zip(factors).map(|(f, s)| f / s).collect(),
            RopeScaling::Longrope { ref short_factor, ref long_factor, long, .. } => {
                let factors = if long { long_factor } else { short_factor };
                base.zip(factors).map(|(f, s)| f / s).collect()
            }
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_seq } => {
                let old = original_max_seq as f64;
                let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
                base.map(|f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
            }
        }
    }
}

impl Rope {
    /// What the rotation's cosines and sines are multiplied by: YaRN's attention factor,
    /// else 1.
    pub fn magnitude(&self) -> f64 {
        match self.scaling {
            RopeScaling::Yarn { attention_factor, .. } | RopeScaling::Longrope { attention_factor, .. } => {
                attention_factor
            }
            _ => 1.0,
        }
    }
}

/// Attention attributes shared by the primitive mask op and the fused node.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnMask {
    pub causal: bool,
    /// A key is visible only if `query_pos - key_pos < window`.
    pub window: Option<usize>,
}

/// How a router turns a row's logits into its experts' weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scoring {
    /// A softmax over every expert, of which the `k` largest are kept (Mixtral, Qwen-MoE,
    /// OLMoE).
    Softmax,
    /// The `k` largest logits, then a softmax over those `k` only (GraniteMoE, gpt-oss).
    SoftmaxChosen,
    /// Each logit's sigmoid on its own (DeepSeek-V3).
    Sigmoid,
}

impl Scoring {
    pub const ALL: [(&'static str, Scoring); 3] = [
        ("softmax", Scoring::Softmax),
        ("softmax_chosen", Scoring::SoftmaxChosen),
        ("sigmoid", Scoring::Sigmoid),
    ];

    pub fn name(self) -> &'static str {
        Scoring::ALL.iter().find(|(_, s)| *s == self).map(|(n, _)| *n).unwrap_or("?")
    }
}

/// A mixture-of-experts router (`Op::Route`): which `top_k` of `experts` each row goes
/// to, and with what weight.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Route {
    pub experts: usize,
    pub top_k: usize,
    pub scoring: Scoring,
    /// The chosen weights divided by their sum (`norm_topk_prob`).
    pub normalize: bool,
    /// The weights multiplied by this at the end (`routed_scaling_factor`).
    pub scale: f64,
    /// The experts fall into this many equal groups (1: ungrouped), of which each row
    /// keeps the `topk_groups` best by `group_score` and chooses its experts from those
    /// only (DeepSeek's `n_group`, `topk_group`).
    pub groups: usize,
    pub topk_groups: usize,
    pub group_score: GroupScore,
    /// A second operand, `bias [E]`, added to the scores for the choice only, not for
    /// the weights (DeepSeek-V3's `e_score_correction_bias`).
    pub choice_bias: bool,
}

/// What ranks a group of experts (`Route::groups`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GroupScore {
    /// Its best expert's score (DeepSeek-V2's `group_limited_greedy`).
    Max,
    /// The sum of its two best (DeepSeek-V3).
    Top2Sum,
}

impl GroupScore {
    pub const ALL: [(&'static str, GroupScore); 2] =
        [("max", GroupScore::Max), ("top2_sum", GroupScore::Top2Sum)];

    pub fn name(self) -> &'static str {
        GroupScore::ALL.iter().find(|(_, s)| *s == self).map(|(n, _)| *n).unwrap_or("?")
    }
}

/// The `k` largest of `v` among the `allowed`, a tie going to the lower index (NaN
/// last), in ascending index order.
fn top_k(v: &[f64], allowed: impl Fn(usize) -> bool, k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..v.len()).filter(|&i| allowed(i)).collect();
    // Stable: equal values keep their order.
    order.sort_by(|&a, &b| v[b].partial_cmp(&v[a]).unwrap_or(std::cmp::Ordering::Equal));
    let mut chosen: Vec<usize> = order.into_iter().take(k).collect();
    chosen.sort_unstable();
    chosen
}

impl Route {
    /// An ungrouped router without a choice bias.
    pub fn plain(experts: usize, top_k: usize, scoring: Scoring, normalize: bool, scale: f64) -> Route {
        let (groups, topk_groups, group_score) = (1, 1, GroupScore::Max);
        Route {
            experts,
            top_k,
            scoring,
            normalize,
            scale,
            groups,
            topk_groups,
            group_score,
            choice_bias: false,
        }
    }

    /// Whether the choice ranks the scores (plus the bias) rather than the logits: the
    /// scorings are monotonic, so the logits rank the same way unless a bias or a
    /// group's sum intervenes.
    pub fn chooses_by_score(&self) -> bool {
        self.choice_bias || (self.groups > 1 && self.group_score == GroupScore::Top2Sum)
    }

    /// The chosen experts of one row of logits, each with its weight, in ascending expert
    /// order, written once for every engine's reading of the rule: each expert's score
    /// (a softmax over all, or a sigmoid), plus the choice bias; where there are groups,
    /// the `topk_groups` best groups, a tie going to the lower group; the `top_k` largest
    /// within those (the logits where they rank the same, `chooses_by_score`), a tie going
    /// to the lower expert; then the weights (the scores, or a softmax over the chosen
    /// logits), the normalisation and the scale, in f64. Engines compute the same steps
    /// in their own precision.
    pub fn route(&self, logits: &[f64], bias: Option<&[f64]>) -> Vec<(usize, f64)> {
        let n = logits.len();
        let softmax = |over: &[usize]| -> Vec<f64> {
            let max = over.iter().map(|&e| logits[e]).fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = over.iter().map(|&e| (logits[e] - max).exp()).sum();
            over.iter().map(|&e| (logits[e] - max).exp() / total).collect()
        };
        let scores: Vec<f64> = match self.scoring {
            Scoring::Softmax => softmax(&(0..n).collect::<Vec<_>>()),
            Scoring::Sigmoid => logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect(),
            Scoring::SoftmaxChosen => logits.to_vec(),
        };
        let choice: Vec<f64> = match self.chooses_by_score() {
            true => (0..n).map(|e| scores[e] + bias.map_or(0.0, |b| b[e])).collect(),
            false => logits.to_vec(),
        };
        let size = n / self.groups.max(1);
        let kept: Vec<usize> = match self.groups > 1 {
            true => {
                let group: Vec<f64> = (0..self.groups)
                    .map(|g| {
                        let part = &choice[g * size..(g + 1) * size];
                        match self.group_score {
                            GroupScore::Max => part.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                            GroupScore::Top2Sum => top_k(part, |_| true, 2).iter().map(|&i| part[i]).sum(),
                        }
                    })
                    .collect();
                top_k(&group, |_| true, self.topk_groups)
            }
            false => vec![0],
        };
        let allowed = |e: usize| self.groups <= 1 || kept.contains(&(e / size));
        let chosen = top_k(&choice, allowed, self.top_k);
        let mut w: Vec<f64> = match self.scoring {
            Scoring::SoftmaxChosen => softmax(&chosen),
            _ => chosen.iter().map(|&e| scores[e]).collect(),
        };
        if self.normalize {
            let s: f64 = w.iter().sum();
            w.iter_mut().for_each(|v| *v /= s);
        }
        chosen.into_iter().zip(w).map(|(e, v)| (e, v * self.scale)).collect()
    }
}

/// The experts of a mixture (`Op::Experts`): `experts` gated (or plain) MLPs of `hidden`
/// features, each expert's matrices one slice of a 3-D tensor `[experts, rows, in]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Experts {
    pub experts: usize,
    pub hidden: usize,
    pub act: Act,
    /// The first row of each expert's up projection in its tensor (`f` in a fused
    /// gate_up, whose gate rows come first).
    pub up_at: usize,
    /// The first row of each expert's gate projection, if the MLP is gated.
    pub gate_at: Option<usize>,
    /// The gate and up projections are one tensor whose outputs alternate, gate then up
    /// (gpt-oss's `gate_up_proj`): `up` has `2 · hidden` outputs and there is no gate
    /// operand.
    pub interleaved: bool,
    /// Each expert's matrices are stored `[in, out]`: `up [E, d, R]`, `down [E, f, d]`.
    pub transposed: bool,
    /// Biases follow the matrices: `[E, R]` of the up (or interleaved gate_up)
    /// projection, `[E, R']` of the gate, if any, and `[E, d]` of the down projection.
    pub bias: bool,
    /// gpt-oss's clamped GLU: the gate capped at `limit` from above, the up projection
    /// clamped to `[-limit, limit]`.
    pub clamp: Option<f64>,
    /// Added to the up projection before the product (gpt-oss: 1).
    pub up_offset: f64,
}

impl Experts {
    /// Whether the MLP is gated.
    pub fn gated(&self) -> bool {
        self.gate_at.is_some() || self.interleaved
    }

    /// The operand indices of the up (or gate_up), down and gate matrices, and of their
    /// biases.
    pub fn operands(&self) -> ExpertOperands {
        let gate = self.gate_at.map(|_| 4);
        let first_bias = 4 + gate.is_some() as usize;
        let bias = |i: usize| self.bias.then_some(first_bias + i);
        ExpertOperands {
            up: 2,
            down: 3,
            gate,
            up_bias: bias(0),
            gate_bias: gate.and(bias(1)),
            down_bias: bias(1 + gate.is_some() as usize),
        }
    }

    /// The activation's operand: the gate clamped, passed through `act`.
    pub fn glu(&self, gate: f64, up: f64) -> (f64, f64) {
        let (g, u) = match self.clamp {
            Some(l) => (gate.min(l), up.clamp(-l, l)),
            None => (gate, up),
        };
        (g, u + self.up_offset)
    }
}

/// Where an `Op::Experts`'s matrices and biases are among its operands.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExpertOperands {
    pub up: usize,
    pub down: usize,
    pub gate: Option<usize>,
    pub up_bias: Option<usize>,
    pub gate_bias: Option<usize>,
    pub down_bias: Option<usize>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    Input(InputKind),
    /// Absolute positions of the new tokens, `P + t` for `t` in `0..T`: `[T] i32`.
    Positions,
    /// A parameter from the checkpoint; its type is the stored shape.
    Weight {
        name: String,
        role: WeightRole,
    },
    /// `table[ids + offset]`: `([R, d], [T]) -> [T, d]`.
    Gather {
        offset: usize,
    },
    /// A sinusoidal encoding of positions `[T] -> [T, dim]`: that of Vaswani et al. (sin
    /// at even, cos at odd features), or with `fairseq` the sines then the cosines, of
    /// positions `p + offset` (`sinusoid_freqs`, `sinusoid_feature`).
    Sinusoidal {
        dim: usize,
        base: f64,
        fairseq: bool,
        offset: usize,
    },
    Add,
    Mul,
    Scale(f64),
    Activation(Act),
    /// Each value rounded to the nearest bfloat16 (ties to even), still `f32`: the input
    /// of a linear map under `activations = bf16`.
    RoundBf16,
    /// Each 32 values of a row (from its start; the last may be fewer) rounded to 8-bit
    /// integers times `max |x| / 127`, still `f32` (`interp::round_q8`): the input of a
    /// linear map with block weights under `activations = q8`, which the kernels may
    /// multiply as integers. Rounding the values again gives back the same integers, so
    /// a kernel recovers them from the values.
    RoundQ8,
    /// `(x, [gain], [bias])`, the gain there when `gain` (OLMo's LayerNorm has neither).
    /// Parameters are `[d]`, or for `x [H, T, d]` may be `[H, d]`, one set per head.
    LayerNorm {
        eps: f64,
        gain: bool,
    },
    /// `(x, gain)`; multiplies by `1 + gain` when `unit_offset`. The gain as for `LayerNorm`.
    RmsNorm {
        eps: f64,
        unit_offset: bool,
    },
    /// `x·Wᵀ (+ b)`: `(x [T, in], w, [b])`.
    Linear {
        transposed: bool,
        bias: bool,
    },
    /// One part of a fused QKV projection's output: `[T, (H + 2·KV)·hd] -> [T, n·hd]`.
    SplitQkv {
        layout: QkvLayout,
        part: QkvPart,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    },
    /// `[T, H·hd] -> [H, T, hd]`.
    SplitHeads {
        heads: usize,
    },
    /// `[H, T, hd] -> [T, H·hd]`.
    MergeHeads,
    /// Rotary embedding of `(x [H, T, hd], positions [T])`.
    Rope(Rope),
    /// Concatenation along an axis.
    Concat {
        axis: usize,
    },
    /// Features `start..start + len` of the last axis.
    Slice {
        start: usize,
        len: usize,
    },
    /// A linear map of each head by its own matrix, the heads' matrices blocks of rows of
    /// one tensor: `(x [H, T, in], w [H·p, c] or [H, p, c]) -> [H, T, out]`, head `h`'s
    /// matrix rows `h·p + at .. h·p + at + rows` of `w`. Those rows are the outputs
    /// (`x·Wᵀ`, `rows = out`, `c = in`), or `transposed` the inputs (`x·W`, `rows = in`,
    /// `c = out`): how multi-head latent attention reads `kv_b_proj` on the query and the
    /// output side.
    HeadLinear {
        at: usize,
        rows: usize,
        transposed: bool,
    },
    /// Per-head matrix product with grouped heads: `a [H, M, K]`, `b [G, K, N]` (or
    /// `[G, N, K]` when `transpose_b`), head `h` uses group `h / (H / G)`.
    HeadMatMul {
        transpose_b: bool,
    },
    /// ALiBi bias of `(scores [H, T, S], positions [T])`: `-slope_h · (pos_t - s)`, the
    /// slopes (`alibi_slopes`) times `slope_scale` (1, or Falcon's 1/√head_dim: it adds
    /// the bias before scaling the scores).
    Alibi {
        slope_scale: f64,
    },
    /// Sets invisible scores to -inf: `(scores [H, T, S], positions [T])`. Key `s` is at
    /// position `s`; with `causal` it is visible from query position `p` if `s <= p`, and
    /// a window further requires `|p - s| < window`.
    Mask(AttnMask),
    /// Softmax along the last axis of `(scores [H, T, S], [sinks [H]])`: with sinks, each
    /// head's row also holds that head's sink logit, whose share is dropped (gpt-oss):
    /// `exp(s_j) / (Σ_k exp(s_k) + exp(sink_h))`.
    Softmax,
    /// Fused attention: `(q [H, T, hd], k [G, S, hd], v [G, S, hd], positions [T])`
    /// `-> [H, T, hd]`, the keys at positions `0..S`.
    Attention {
        scale: f64,
        mask: AttnMask,
        /// ALiBi with the slopes times this (`Op::Alibi`).
        alibi: Option<f64>,
        /// Scores soft-capped to `cap · tanh(s / cap)` after the scale (Gemma 2).
        softcap: Option<f64>,
        /// A fifth operand, `sinks [H]`, as for `Softmax`.
        sinks: bool,
    },
    /// The last row: `[T, d] -> [1, d]`, or the last element: `[T] -> [1]` (of the
    /// positions, for a narrowed query).
    LastRow,
    /// A router: `logits [T, E] -> [T, E]`, each row the weights of its chosen experts
    /// (`Route::route`) and zero elsewhere.
    Route(Route),
    /// A mixture's experts: `(x [T, d], route [T, E], up [E, R, d], down [E, d, f],
    /// [gate [E, R', d]]) -> [T, d]`, row `t` the sum over its chosen experts `e` (in
    /// ascending order) of `route[t, e] · down_e(act(gate_e(x_t)) · up_e(x_t))` (or
    /// `down_e(act(up_e(x_t)))` without a gate). An expert whose weight is zero is not
    /// computed: a row reads only its chosen experts.
    Experts(Experts),
    /// `(x [T, d], s [T, 1]) -> [T, d]`: each row times its own number (a shared
    /// expert's gate).
    RowScale,
}

impl Op {
    /// The accepted operand counts.
    pub fn arity(&self) -> std::ops::RangeInclusive<usize> {
        match self {
            Op::Input(_) | Op::Positions | Op::Weight { .. } => 0..=0,
            Op::Sinusoidal { .. }
            | Op::Scale(_)
            | Op::Activation(_)
            | Op::RoundBf16
            | Op::RoundQ8
            | Op::SplitQkv { .. }
            | Op::SplitHeads { .. }
            | Op::MergeHeads
            | Op::LastRow
            | Op::Slice { .. } => 1..=1,
            Op::Route(r) => 1 + r.choice_bias as usize..=1 + r.choice_bias as usize,
            Op::Softmax => 1..=2,
            Op::Gather { .. }
            | Op::Add
            | Op::Mul
            | Op::RmsNorm { .. }
            | Op::Rope(_)
            | Op::Concat { .. }
            | Op::HeadMatMul { .. }
            | Op::HeadLinear { .. }
            | Op::Alibi { .. }
            | Op::Mask(_)
            | Op::RowScale => 2..=2,
            Op::Experts(e) => {
                let n = 4 + e.gate_at.is_some() as usize * (1 + e.bias as usize) + 2 * e.bias as usize;
                n..=n
            }
            Op::LayerNorm { gain, .. } => 1 + *gain as usize..=2 + *gain as usize,
            Op::Linear { bias, .. } => {
                if *bias {
                    3..=3
                } else {
                    2..=2
                }
            }
            Op::Attention { sinks, .. } => 4..=4 + *sinks as usize,
        }
    }

    /// The op's mnemonic in the text form.
    pub fn mnemonic(&self) -> &'static str {
        match self {
            Op::Input(_) => "input",
            Op::Positions => "positions",
            Op::Weight { .. } => "weight",
            Op::Gather { .. } => "gather",
            Op::Sinusoidal { .. } => "sinusoidal",
            Op::Add => "add",
            Op::Mul => "mul",
            Op::Scale(_) => "scale",
            Op::Activation(_) => "act",
            Op::RoundBf16 => "round_bf16",
            Op::RoundQ8 => "round_q8",
            Op::LayerNorm { .. } => "layernorm",
            Op::RmsNorm { .. } => "rmsnorm",
            Op::Linear { .. } => "linear",
            Op::SplitQkv { .. } => "split_qkv",
            Op::SplitHeads { .. } => "split_heads",
            Op::MergeHeads => "merge_heads",
            Op::Rope(_) => "rope",
            Op::Concat { .. } => "concat",
            Op::HeadMatMul { .. } => "head_matmul",
            Op::Slice { .. } => "slice",
            Op::HeadLinear { .. } => "head_linear",
            Op::Alibi { .. } => "alibi",
            Op::Mask(_) => "mask",
            Op::Softmax => "softmax",
            Op::Attention { .. } => "attention",
            Op::LastRow => "last_row",
            Op::Route(_) => "route",
            Op::Experts(_) => "experts",
            Op::RowScale => "row_scale",
        }
    }

    /// The attributes in the text form, `{k=v, …}` or empty.
    pub fn attrs(&self) -> String {
        let list: Vec<String> = match self {
            Op::Input(InputKind::Tokens) => vec!["tokens".into()],
            Op::Input(InputKind::TokenTypes) => vec!["token_types".into()],
            Op::Input(InputKind::Cache { layer, kind }) => {
                vec![format!("cache.{}.{}", kind.name(), layer)]
            }
            Op::Weight { name, .. } => vec![format!("{name:?}")],
            Op::Gather { offset } if *offset > 0 => vec![format!("offset={offset}")],
            Op::Sinusoidal { dim, base, fairseq, offset } => {
                let mut v = vec![format!("dim={dim}"), format!("base={}", num(*base))];
                if *fairseq {
                    v.push("fairseq".into());
                }
                if *offset > 0 {
                    v.push(format!("offset={offset}"));
                }
                v
            }
            Op::Scale(s) => vec![num(*s)],
            Op::Activation(a) => vec![a.name().into()],
            Op::LayerNorm { eps, gain: true } => vec![format!("eps={}", num(*eps))],
            Op::LayerNorm { eps, gain: false } => vec![format!("eps={}", num(*eps)), "no_gain".into()],
            Op::RmsNorm { eps, unit_offset } => {
                let mut v = vec![format!("eps={}", num(*eps))];
                if *unit_offset {
                    v.push("unit_offset".into());
                }
                v
            }
            Op::Linear { transposed, .. } if *transposed => vec!["transposed".into()],
            Op::SplitQkv { layout, part, heads, kv_heads, head_dim } => vec![
                format!("{part:?}").to_lowercase(),
                layout.name().into(),
                format!("heads={heads}"),
                format!("kv_heads={kv_heads}"),
                format!("head_dim={head_dim}"),
            ],
            Op::SplitHeads { heads } => vec![format!("heads={heads}")],
            Op::Rope(r) => {
                let mut v = vec![format!("theta={}", num(r.theta)), format!("dims={}", r.rotary_dim)];
                if r.interleaved {
                    v.push("interleaved".into());
                }
                match &r.scaling {
                    RopeScaling::None => {}
                    RopeScaling::Dynamic { factor, original_max_seq, max_seq } => {
                        v.push(format!("dynamic=({}, {original_max_seq}, {max_seq})", num(*factor)))
                    }
                    RopeScaling::Longrope { original_max_seq, attention_factor, long, .. } => {
                        v.push(format!(
                            "longrope=({}, {original_max_seq}, {})",
                            if *long { "long" } else { "short" },
                            num(*attention_factor)
                        ))
                    }
                    RopeScaling::Linear { factor } => v.push(format!("linear={}", num(*factor))),
                    RopeScaling::PerPair { factors } => v.push(format!("per_pair=({})", {
                        factors.iter().map(|&f| num(f)).collect::<Vec<_>>().join(", ")
                    })),
                    RopeScaling::Yarn {
                        factor,
                        original_max_seq,
                        beta_fast,
                        beta_slow,
                        attention_factor,
                        truncate,
                    } => v.push(format!(
                        "yarn=({}, {original_max_seq}, {}, {}, {}{})",
                        num(*factor),
                        num(*beta_fast),
                        num(*beta_slow),
                        num(*attention_factor),
                        if *truncate { "" } else { ", untruncated" }
                    )),
                    RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_seq } => v
                        .push(format!(
                            "llama3=({}, {}, {}, {original_max_seq})",
                            num(*factor),
                            num(*low_freq_factor),
                            num(*high_freq_factor)
                        )),
                }
                v
            }
            Op::Concat { axis } => vec![format!("axis={axis}")],
            Op::Slice { start, len } => vec![format!("{start}..{}", start + len)],
            Op::HeadLinear { at, rows, transposed } => {
                let mut v = vec![format!("rows={at}..{}", at + rows)];
                if *transposed {
                    v.push("transposed".into());
                }
                v
            }
            Op::HeadMatMul { transpose_b } if *transpose_b => vec!["transpose_b".into()],
            Op::Mask(m) => mask_attrs(m),
            Op::Alibi { slope_scale } if *slope_scale != 1.0 => {
                vec![format!("slope_scale={}", num(*slope_scale))]
            }
            Op::Attention { scale, mask, alibi, softcap, sinks } => {
                let mut v = vec![format!("scale={}", num(*scale))];
                v.extend(mask_attrs(mask));
                match alibi {
                    Some(1.0) => v.push("alibi".into()),
                    Some(f) => v.push(format!("alibi={}", num(*f))),
                    None => {}
                }
                if let Some(c) = softcap {
                    v.push(format!("softcap={}", num(*c)));
                }
                if *sinks {
                    v.push("sinks".into());
                }
                v
            }
            Op::Route(r) => {
                let mut v = vec![format!("top_k={}", r.top_k), r.scoring.name().into()];
                if r.groups > 1 {
                    v.push(format!("groups={}/{}", r.topk_groups, r.groups));
                    v.push(r.group_score.name().into());
                }
                if r.choice_bias {
                    v.push("choice_bias".into());
                }
                if r.normalize {
                    v.push("normalize".into());
                }
                if r.scale != 1.0 {
                    v.push(format!("scale={}", num(r.scale)));
                }
                v
            }
            Op::Experts(e) => {
                let mut v = vec![
                    format!("experts={}", e.experts),
                    format!("hidden={}", e.hidden),
                    e.act.name().into(),
                ];
                if let Some(g) = e.gate_at {
                    v.push(format!("gate_at={g}"));
                }
                if e.up_at > 0 {
                    v.push(format!("up_at={}", e.up_at));
                }
                for (on, name) in
                    [(e.interleaved, "interleaved"), (e.transposed, "transposed"), (e.bias, "bias")]
                {
                    if on {
                        v.push(name.into());
                    }
                }
                if let Some(l) = e.clamp {
                    v.push(format!("clamp={}", num(l)));
                }
                if e.up_offset != 0.0 {
                    v.push(format!("up_offset={}", num(e.up_offset)));
                }
                v
            }
            _ => vec![],
        };
        if list.is_empty() {
            String::new()
        } else {
            format!("{{{}}}", list.join(", "))
        }
    }

    /// The result type from the operand types, or a message saying what does not fit.
    pub fn infer(&self, ins: &[&TensorType]) -> Result<TensorType, String> {
        let want_rank = |i: usize, r: usize| -> Result<(), String> {
            if ins[i].rank() == r {
                Ok(())
            } else {
                Err(format!("operand {i} must have rank {r}, has type {}", ins[i]))
            }
        };
        let float = |i: usize| -> Result<(), String> {
            if ins[i].dtype.is_float() {
                Ok(())
            } else {
                Err(format!("operand {i} must be a float tensor, is {}", ins[i]))
            }
        };
        let ids = |i: usize| -> Result<(), String> {
            if ins[i].dtype == DType::I32 && ins[i].rank() == 1 {
                Ok(())
            } else {
                Err(format!("operand {i} must be [N] i32 ids, is {}", ins[i]))
            }
        };
        let same = |a: usize, b: usize| -> Result<(), String> {
            if ins[a] == ins[b] {
                Ok(())
            } else {
                Err(format!("operands {a} and {b} differ: {} vs {}", ins[a], ins[b]))
            }
        };
        let fixed = |d: Dim, what: &str| -> Result<usize, String> {
            d.as_fixed().ok_or_else(|| format!("{what} must be a fixed size, is {d}"))
        };
        let last = |i: usize| *ins[i].shape.last().unwrap();
        match self {
            Op::Input(_) | Op::Weight { .. } | Op::Positions => Err("leaf nodes carry their own type".into()),
            Op::Gather { .. } => {
                want_rank(0, 2)?;
                float(0)?;
                ids(1)?;
                Ok(TensorType::new(vec![ins[1].shape[0], ins[0].shape[1]], DType::F32))
            }
            Op::Sinusoidal { dim, .. } => {
                ids(0)?;
                if dim % 2 != 0 {
                    return Err(format!("sinusoidal dim {dim} must be even"));
                }
                Ok(TensorType::new(vec![ins[0].shape[0], Dim::fixed(*dim)], DType::F32))
            }
            Op::Add | Op::Mul => {
                float(0)?;
                same(0, 1)?;
                Ok(ins[0].clone())
            }
            Op::Scale(_) | Op::Activation(_) | Op::RoundBf16 | Op::RoundQ8 => {
                float(0)?;
                Ok(ins[0].clone())
            }
            Op::Softmax => {
                float(0)?;
                if let Some(s) = ins.get(1) {
                    want_rank(0, 3)?;
                    if s.shape != [ins[0].shape[0]] {
                        return Err(format!("sinks must be one per head, [{}], are {s}", ins[0].shape[0]));
                    }
                }
                Ok(ins[0].clone())
            }
            Op::LayerNorm { .. } | Op::RmsNorm { .. } => {
                float(0)?;
                let d = last(0);
                // Shared by every row, or, over heads `[H, T, d]`, one set per head.
                let per_head = (ins[0].rank() == 3).then(|| [ins[0].shape[0], d]);
                for (i, p) in ins.iter().enumerate().skip(1) {
                    if p.shape != [d] && Some(&p.shape[..]) != per_head.as_ref().map(|s| &s[..]) {
                        return Err(format!("norm parameter {i} must be [{d}] or one per head, is {p}"));
                    }
                }
                Ok(ins[0].clone())
            }
            Op::Linear { transposed, bias } => {
                want_rank(0, 2)?;
                want_rank(1, 2)?;
                float(0)?;
                let (out, inn) = if *transposed {
                    (ins[1].shape[1], ins[1].shape[0])
                } else {
                    (ins[1].shape[0], ins[1].shape[1])
                };
                if inn != last(0) {
                    return Err(format!(
                        "weight {} takes {inn} input features, the activation has {}",
                        ins[1],
                        last(0)
                    ));
                }
                if *bias && ins[2].shape != [out] {
                    return Err(format!("bias must be [{out}], is {}", ins[2]));
                }
                Ok(TensorType::new(vec![ins[0].shape[0], out], ins[0].dtype))
            }
            Op::SplitQkv { part, heads, kv_heads, head_dim, .. } => {
                want_rank(0, 2)?;
                let width = fixed(last(0), "fused QKV width")?;
                if width != (heads + 2 * kv_heads) * head_dim {
                    return Err(format!(
                        "fused QKV width {width} is not (heads + 2·kv_heads)·head_dim = {}",
                        (heads + 2 * kv_heads) * head_dim
                    ));
                }
                if *kv_heads == 0 || heads % kv_heads != 0 {
                    return Err(format!("kv_heads {kv_heads} must divide heads {heads}"));
                }
                let n = if *part == QkvPart::Q { *heads } else { *kv_heads };
                Ok(TensorType::new(vec![ins[0].shape[0], Dim::fixed(n * head_dim)], ins[0].dtype))
            }
            Op::SplitHeads { heads } => {
                want_rank(0, 2)?;
                let width = fixed(last(0), "head width")?;
                if *heads == 0 || width % heads != 0 {
                    return Err(format!("{width} features do not split into {heads} heads"));
                }
                Ok(TensorType::new(
                    vec![Dim::fixed(*heads), ins[0].shape[0], Dim::fixed(width / heads)],
                    ins[0].dtype,
                ))
            }
            Op::MergeHeads => {
                want_rank(0, 3)?;
                let h = fixed(ins[0].shape[0], "heads")?;
                let hd = fixed(ins[0].shape[2], "head_dim")?;
                Ok(TensorType::new(vec![ins[0].shape[1], Dim::fixed(h * hd)], ins[0].dtype))
            }
            Op::Rope(r) => {
                want_rank(0, 3)?;
                ids(1)?;
                let hd = fixed(ins[0].shape[2], "head_dim")?;
                if r.rotary_dim % 2 != 0 || r.rotary_dim > hd || r.rotary_dim == 0 {
                    return Err(format!("rotary dims {} must be even and in 2..={hd}", r.rotary_dim));
                }
                if ins[1].shape[0] != ins[0].shape[1] {
                    return Err(format!("{} positions for {} rows", ins[1].shape[0], ins[0].shape[1]));
                }
                Ok(ins[0].clone())
            }
            Op::Concat { axis } => {
                let (a, b) = (ins[0], ins[1]);
                if a.rank() != b.rank() || *axis >= a.rank() || a.dtype != b.dtype {
                    return Err(format!("cannot concatenate {a} and {b} on axis {axis}"));
                }
                let mut shape = a.shape.clone();
                for i in 0..a.rank() {
                    if i != *axis && a.shape[i] != b.shape[i] {
                        return Err(format!("cannot concatenate {a} and {b} on axis {axis}"));
                    }
                }
                shape[*axis] = a.shape[*axis] + b.shape[*axis];
                Ok(TensorType::new(shape, a.dtype))
            }
            Op::Slice { start, len } => {
                float(0)?;
                let w = fixed(last(0), "features")?;
                if *len == 0 || start + len > w {
                    return Err(format!("features {start}..{} of {w}", start + len));
                }
                let mut shape = ins[0].shape.clone();
                *shape.last_mut().unwrap() = Dim::fixed(*len);
                Ok(TensorType::new(shape, ins[0].dtype))
            }
            Op::HeadLinear { at, rows, transposed } => {
                want_rank(0, 3)?;
                let h = fixed(ins[0].shape[0], "heads")?;
                let inn = fixed(ins[0].shape[2], "features")?;
                let w: Vec<usize> =
                    ins[1].shape.iter().map(|&d| fixed(d, "weights")).collect::<Result<_, _>>()?;
                let (all, cols) = match w[..] {
                    [all, cols] => (all, cols),
                    [heads, p, cols] if heads == h => (h * p, cols),
                    _ => {
                        return Err(format!(
                            "a head map's weights are [{h}·p, c] or [{h}, p, c], not {}",
                            ins[1]
                        ))
                    }
                };
                if h == 0 || all % h != 0 || at + rows > all / h {
                    return Err(format!(
                        "rows {at}..{} of each of {h} heads' blocks of a {}",
                        at + rows,
                        ins[1]
                    ));
                }
                let (want, out) = if *transposed { (*rows, cols) } else { (cols, *rows) };
                if inn != want {
                    return Err(format!("{inn} features into a head's matrix of {want} inputs"));
                }
                Ok(TensorType::new(vec![ins[0].shape[0], ins[0].shape[1], Dim::fixed(out)], ins[0].dtype))
            }
            Op::HeadMatMul { transpose_b } => {
                want_rank(0, 3)?;
                want_rank(1, 3)?;
                let h = fixed(ins[0].shape[0], "heads")?;
                let g = fixed(ins[1].shape[0], "groups")?;
                if g == 0 || h % g != 0 {
                    return Err(format!("{g} key/value heads do not group {h} heads"));
                }
                let (k, n) = if *transpose_b {
                    (ins[1].shape[2], ins[1].shape[1])
                } else {
                    (ins[1].shape[1], ins[1].shape[2])
                };
                if k != ins[0].shape[2] {
                    return Err(format!("contraction sizes differ: {} vs {k}", ins[0].shape[2]));
                }
                Ok(TensorType::new(vec![ins[0].shape[0], ins[0].shape[1], n], ins[0].dtype))
            }
            Op::Alibi { .. } | Op::Mask(_) => {
                want_rank(0, 3)?;
                ids(1)?;
                if ins[1].shape[0] != ins[0].shape[1] {
                    return Err(format!("{} positions for {} query rows", ins[1].shape[0], ins[0].shape[1]));
                }
                Ok(ins[0].clone())
            }
            Op::Attention { .. } => {
                want_rank(0, 3)?;
                want_rank(1, 3)?;
                want_rank(2, 3)?;
                ids(3)?;
                same(1, 2)?;
                let h = fixed(ins[0].shape[0], "heads")?;
                let g = fixed(ins[1].shape[0], "kv heads")?;
                if g == 0 || h % g != 0 {
                    return Err(format!("{g} key/value heads do not group {h} heads"));
                }
                if ins[0].shape[2] != ins[1].shape[2] {
                    return Err("query and key head sizes differ".into());
                }
                if ins[3].shape[0] != ins[0].shape[1] {
                    return Err("one position per query row is needed".into());
                }
                if let Some(s) = ins.get(4) {
                    if s.shape != [Dim::fixed(h)] {
                        return Err(format!("sinks must be [{h}], are {s}"));
                    }
                }
                Ok(ins[0].clone())
            }
            Op::Route(r) => {
                want_rank(0, 2)?;
                float(0)?;
                let e = fixed(last(0), "experts")?;
                if e != r.experts || r.top_k == 0 || r.top_k > e {
                    return Err(format!(
                        "a router of {} experts choosing {} has {e} logits",
                        r.experts, r.top_k
                    ));
                }
                if r.groups == 0 || e % r.groups != 0 || r.topk_groups == 0 || r.topk_groups > r.groups {
                    return Err(format!("{e} experts in {} groups keeping {}", r.groups, r.topk_groups));
                }
                if r.topk_groups * (e / r.groups) < r.top_k {
                    return Err(format!(
                        "{} groups of {} experts hold fewer than the {} chosen",
                        r.topk_groups,
                        e / r.groups,
                        r.top_k
                    ));
                }
                if let Some(b) = ins.get(1) {
                    float(1)?;
                    if b.shape != [Dim::fixed(e)] {
                        return Err(format!("the choice bias must be [{e}], is {b}"));
                    }
                }
                Ok(TensorType::new(ins[0].shape.clone(), DType::F32))
            }
            Op::Experts(x) => {
                want_rank(0, 2)?;
                want_rank(1, 2)?;
                float(0)?;
                let (d, e, f) = (last(0), Dim::fixed(x.experts), Dim::fixed(x.hidden));
                if ins[1].shape != [ins[0].shape[0], e] {
                    return Err(format!("the routing must be [{}, {e}], is {}", ins[0].shape[0], ins[1]));
                }
                if x.interleaved && (x.gate_at.is_some() || x.up_at > 0) {
                    return Err("interleaved experts have no separate gate".into());
                }
                // Outputs `at..at + n` of a `[E, out, in]` (or `[E, in, out]`) tensor.
                let outs = |i: usize, at: usize, n: usize, what: &str| -> Result<(), String> {
                    let t = ins[i];
                    let (o, k) = if x.transposed { (2, 1) } else { (1, 2) };
                    let ok = t.rank() == 3
                        && t.shape[0] == e
                        && t.shape[k] == d
                        && t.shape[o].as_fixed().is_some_and(|r| r >= at + n);
                    if ok {
                        Ok(())
                    } else if x.transposed {
                        Err(format!("the experts' {what} must be [{e}, {d}, ≥{}], is {t}", at + n))
                    } else {
                        Err(format!("the experts' {what} must be [{e}, ≥{}, {d}], is {t}", at + n))
                    }
                };
                let up_n = if x.interleaved { 2 * x.hidden } else { x.hidden };
                outs(2, x.up_at, up_n, "up projection")?;
                let want_down = if x.transposed { [e, f, d] } else { [e, d, f] };
                if ins[3].shape != want_down {
                    let [a, b, c] = want_down;
                    return Err(format!(
                        "the experts' down projection must be [{a}, {b}, {c}], is {}",
                        ins[3]
                    ));
                }
                let o = x.operands();
                if let (Some(i), Some(g)) = (o.gate, x.gate_at) {
                    outs(i, g, x.hidden, "gate projection")?;
                }
                // A bias per expert and output of each matrix.
                let biased = [(o.up_bias, Some(o.up)), (o.gate_bias, o.gate), (o.down_bias, Some(o.down))];
                for (b, w) in biased {
                    let (Some(b), Some(w)) = (b, w) else { continue };
                    let out = ins[w].shape[if x.transposed { 2 } else { 1 }];
                    if ins[b].shape != [e, out] {
                        return Err(format!("an expert bias must be [{e}, {out}], is {}", ins[b]));
                    }
                }
                Ok(ins[0].clone())
            }
            Op::RowScale => {
                want_rank(0, 2)?;
                float(0)?;
                if ins[1].shape != [ins[0].shape[0], Dim::fixed(1)] {
                    return Err(format!("the row scale must be [{}, 1], is {}", ins[0].shape[0], ins[1]));
                }
                Ok(ins[0].clone())
            }
            Op::LastRow => match ins[0].rank() {
                1 => Ok(TensorType::new(vec![Dim::fixed(1)], ins[0].dtype)),
                _ => {
                    want_rank(0, 2)?;
                    Ok(TensorType::new(vec![Dim::fixed(1), ins[0].shape[1]], ins[0].dtype))
                }
            },
        }
    }
}

fn mask_attrs(m: &AttnMask) -> Vec<String> {
    let mut v = vec![if m.causal { "causal".to_string() } else { "bidirectional".to_string() }];
    if let Some(w) = m.window {
        v.push(format!("window={w}"));
    }
    v
}

/// Formats a float attribute shortly and exactly enough to tell values apart.
pub fn num(x: f64) -> String {
    if x == x.trunc() && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else if x.abs() < 1e-3 {
        format!("{x:e}")
    } else {
        format!("{x}")
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.mnemonic(), self.attrs())
    }
}

/// The ALiBi slopes of Press et al. for `n` heads, as BLOOM and MPT compute them:
/// a geometric sequence for the largest power of two `≤ n`, then every other slope of
/// the sequence for twice that many; each times `scale` (`Op::Alibi`'s `slope_scale`).
pub fn alibi_slopes(n: usize, scale: f64) -> Vec<f64> {
    let p2 = 1usize << (usize::BITS - 1 - n.leading_zeros());
    let seq = |k: usize| -> Vec<f64> {
        let start = 2f64.powf(-(2f64.powf(-((k as f64).log2() - 3.0))));
        (1..=k).map(|i| start.powi(i as i32)).collect()
    };
    let mut s = seq(p2);
    if p2 < n {
        s.extend(seq(2 * p2).into_iter().step_by(2).take(n - p2));
    }
    s.into_iter().map(|x| x * scale).collect()
}

/// The angle frequency of each of the `dim / 2` sin/cos pairs of a sinusoidal encoding:
/// `base^(-2i/dim)`, or fairseq's `exp(-i · ln(base) / (dim/2 - 1))`.
pub fn sinusoid_freqs(dim: usize, base: f64, fairseq: bool) -> Vec<f64> {
    let half = dim / 2;
    (0..half)
        .map(|i| match fairseq {
            false => 1.0 / base.powf(2.0 * i as f64 / dim as f64),
            true => (-(i as f64) * base.ln() / (half.max(2) - 1) as f64).exp(),
        })
        .collect()
}

/// Which pair feature `j` of a sinusoidal encoding holds, and whether it is the cosine.
pub fn sinusoid_feature(dim: usize, fairseq: bool, j: usize) -> (usize, bool) {
    match fairseq {
        false => (j / 2, j % 2 == 1),
        true => (j % (dim / 2), j >= dim / 2),
    }
}

#[cfg(test)]
mod tests {
    use super::{GroupScore, Route, Scoring};

    /// Equal logits go to the lower expert, in every scoring; the weights follow the
    /// scoring, the normalisation and the scale.
    #[test]
    fn routing_ties_go_to_the_lower_expert() {
        let r = |top_k, scoring, normalize, scale| Route::plain(4, top_k, scoring, normalize, scale);
        let logits = [1.0, 2.0, 2.0, 2.0];
        let chosen = |v: Vec<(usize, f64)>| v.into_iter().map(|(e, _)| e).collect::<Vec<_>>();
        assert_eq!(chosen(r(1, Scoring::Softmax, false, 1.0).route(&logits, None)), [1]);
        assert_eq!(chosen(r(2, Scoring::SoftmaxChosen, false, 1.0).route(&logits, None)), [1, 2]);
        assert_eq!(chosen(r(4, Scoring::Softmax, false, 1.0).route(&[0.0; 4], None)), [0, 1, 2, 3]);
        // Two equal logits of the chosen share a softmax over themselves evenly.
        let w = r(2, Scoring::SoftmaxChosen, false, 1.0).route(&logits, None);
        assert!(w.iter().all(|&(_, v)| (v - 0.5).abs() < 1e-15), "{w:?}");
        // Over all four: e^2 / (e + 3 e^2) each; normalised: 0.5 each; scaled by 3.
        let w = r(2, Scoring::Softmax, false, 1.0).route(&logits, None);
        let p = 2f64.exp() / (1f64.exp() + 3.0 * 2f64.exp());
        assert!(w.iter().all(|&(_, v)| (v - p).abs() < 1e-15), "{w:?}");
        let w = r(2, Scoring::Softmax, true, 3.0).route(&logits, None);
        assert!(w.iter().all(|&(_, v)| (v - 1.5).abs() < 1e-15), "{w:?}");
    }

    /// DeepSeek-V3's routing: sigmoid scores, a bias that moves the choice but not the
    /// weights, groups ranked by their two best, ties to the lower group.
    #[test]
    fn grouped_routing_keeps_the_best_groups() {
        let sig = |l: f64| 1.0 / (1.0 + (-l).exp());
        let mut r = Route::plain(8, 2, Scoring::Sigmoid, true, 2.5);
        (r.groups, r.topk_groups, r.group_score, r.choice_bias) = (4, 1, GroupScore::Top2Sum, true);
        // Group 0 has the best expert (3.0), group 2 the best pair (with expert 4's bias).
        let logits = [3.0, -4.0, 0.0, 0.0, 1.0, 2.0, -1.0, -1.0];
        let bias = [0.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0];
        let w = r.route(&logits, Some(&bias));
        let (a, b) = (sig(1.0), sig(2.0));
        assert_eq!(w.iter().map(|p| p.0).collect::<Vec<_>>(), [4, 5]);
        assert!((w[0].1 - 2.5 * a / (a + b)).abs() < 1e-15 && (w[1].1 - 2.5 * b / (a + b)).abs() < 1e-15);
        // Groups 1 and 2 tie (an equal pair each): the lower one is kept.
        let w = r.route(&[-5.0, -5.0, 1.0, 1.0, 1.0, 1.0, -5.0, -5.0], None);
        assert_eq!(w.iter().map(|p| p.0).collect::<Vec<_>>(), [2, 3]);
        // Ranked by its best expert alone, group 0 wins.
        r.group_score = GroupScore::Max;
        let w = r.route(&logits, None);
        assert_eq!(w.iter().map(|p| p.0).collect::<Vec<_>>(), [0, 1]);
        // A group's best is where it is, not its first expert.
        let w = r.route(&[1.0, 0.0, 0.0, 2.0, -1.0, -1.0, -1.0, -1.0], None);
        assert_eq!(w.iter().map(|p| p.0).collect::<Vec<_>>(), [2, 3]);
    }
}
