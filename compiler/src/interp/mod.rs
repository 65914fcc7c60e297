//! The reference interpreter: runs any stage's graph, node by node, on real weights.
//!
//! It is the oracle every backend is compared with, so it is written to be obviously
//! right rather than fast: plain loops over row-major `f32` tensors, sums accumulated in
//! `f64`, one function per op. The fused attention node is computed with the same
//! helpers as the primitive chain it replaces.

mod ops;
pub use ops::{q8_scale, round_q8, Q8_ACT_BLOCK, Q8_ACT_TINY};
mod session;
pub mod weights;

use std::collections::HashMap;

pub use session::Session;
pub use tfc_runtime::argmax;
pub use weights::{WeightSource, Weights};

use crate::ir::{CacheKind, Graph, InputKind, NodeId, Op, SymBinding};

/// A dense row-major tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Tensor { shape, data }
    }

    /// Row `i` of a 2-D tensor.
    pub fn row(&self, i: usize) -> &[f32] {
        let w = self.shape[1];
        &self.data[i * w..(i + 1) * w]
    }
}

#[derive(Clone, Debug)]
enum Value {
    F(Tensor),
    I(Vec<i64>),
}

#[derive(Debug, thiserror::Error)]
pub enum InterpError {
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Weights(#[from] weights::WeightError),
    #[error("bug: {0}")]
    Bug(String),
}

/// What one call of a graph consumes.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    pub tokens: Vec<i64>,
    /// Token types (segments); all zero when empty.
    pub token_types: Vec<i64>,
    /// Per layer, the cached keys and values `[kv_heads, P, head_dim]` (decode only).
    pub cache: HashMap<(u32, CacheKind), Tensor>,
}

/// Runs a graph. The number of cached positions `P` comes from the cache inputs.
pub fn run(g: &Graph, weights: &Weights, inputs: &Inputs) -> Result<HashMap<String, Tensor>, InterpError> {
    let t = inputs.tokens.len();
    if t == 0 {
        return Err(InterpError::Input("no tokens to run".into()));
    }
    let p = inputs.cache.values().next().map(|c| c.shape[1]).unwrap_or(0);
    if inputs.cache.values().any(|c| c.shape.len() != 3 || c.shape[1] != p) {
        return Err(InterpError::Input("cache tensors disagree on the number of cached positions".into()));
    }
    let b = SymBinding { t, p };
    let order = g.topo_order().map_err(|_| InterpError::Bug("cyclic graph".into()))?;
    let mut vals: HashMap<NodeId, Value> = HashMap::new();
    // Free each value after its last use, so long graphs stay small.
    let mut remaining: HashMap<NodeId, usize> = order.iter().map(|&n| (n, g.use_count(n))).collect();
    for id in order {
        let node = g.node(id);
        let ops = g.operands(id);
        let f = |i: usize| -> &Tensor {
            match &vals[&ops[i]] {
                Value::F(t) => t,
                Value::I(_) => panic!("bug: operand {i} of {} is not a float tensor", node.op.mnemonic()),
            }
        };
        let ids = |i: usize| -> &[i64] {
            match &vals[&ops[i]] {
                Value::I(v) => v,
                Value::F(_) => panic!("bug: operand {i} of {} is not ids", node.op.mnemonic()),
            }
        };
        let v = match &node.op {
            Op::Input(InputKind::Tokens) => Value::I(inputs.tokens.clone()),
            Op::Input(InputKind::TokenTypes) => Value::I(if inputs.token_types.is_empty() {
                vec![0; t]
            } else if inputs.token_types.len() == t {
                inputs.token_types.clone()
            } else {
                return Err(InterpError::Input(format!(
                    "{} token types for {t} tokens",
                    inputs.token_types.len()
                )));
            }),
            Op::Input(InputKind::Cache { layer, kind }) => {
                let c = inputs.cache.get(&(*layer, *kind)).ok_or_else(|| {
                    InterpError::Input(format!("missing cache input cache.{}.{layer}", kind.name()))
                })?;
                let want = node.ty.as_ref().unwrap().eval(b);
                if c.shape != want {
                    return Err(InterpError::Input(format!(
                        "cache.{}.{layer} has shape {:?}, the graph wants {want:?}",
                        kind.name(),
                        c.shape
                    )));
                }
                Value::F(c.clone())
            }
            Op::Positions => Value::I((p..p + t).map(|x| x as i64).collect()),
            Op::Weight { name, .. } => Value::F(weights.get(name)?.clone()),
            Op::Gather { offset } => {
                Value::F(ops::gather(f(0), ids(1), *offset).map_err(InterpError::Input)?)
            }
            Op::Sinusoidal { dim, base, fairseq: false, offset: 0 } => {
                Value::F(ops::sinusoidal(ids(0), *dim, *base))
            }
            Op::Sinusoidal { dim, base, fairseq, offset } => {
                Value::F(ops::sinusoid(ids(0), *dim, *base, *fairseq, *offset))
            }
            Op::Add => Value::F(ops::zip(f(0), f(1), |a, b| a + b)),
            Op::Mul => Value::F(ops::zip(f(0), f(1), |a, b| a * b)),
            Op::Scale(c) => Value::F(ops::map(f(0), |x| (x as f64 * c) as f32)),
            Op::Activation(a) => Value::F(ops::map(f(0), |x| ops::activation(*a, x))),
            Op::RoundBf16 => Value::F(ops::map(f(0), |x| half::bf16::from_f32(x).to_f32())),
            Op::RoundQ8 => Value::F(ops::round_q8(f(0))),
            Op::LayerNorm { eps, gain } => {
                let (w, b) = (gain.then(|| f(1)), ops.get(1 + *gain as usize).map(|_| f(1 + *gain as usize)));
                Value::F(ops::layer_norm(f(0), w, b, *eps))
            }
            Op::RmsNorm { eps, unit_offset } => Value::F(ops::rms_norm(f(0), f(1), *eps, *unit_offset)),
            Op::Linear { transposed, bias } => {
                Value::F(ops::linear(f(0), f(1), if *bias { Some(f(2)) } else { None }, *transposed))
            }
            Op::SplitQkv { layout, part, heads, kv_heads, head_dim } => {
                Value::F(ops::split_qkv(f(0), *layout, *part, *heads, *kv_heads, *head_dim))
            }
            Op::SplitHeads { heads } => Value::F(ops::split_heads(f(0), *heads)),
            Op::MergeHeads => Value::F(ops::merge_heads(f(0))),
            Op::Rope(r) => Value::F(ops::rope(f(0), ids(1), r)),
            Op::Concat { axis } => Value::F(ops::concat(f(0), f(1), *axis)),
            Op::Slice { start, len } => Value::F(ops::slice(f(0), *start, *len)),
            Op::HeadLinear { at, rows, transposed } => {
                Value::F(ops::head_linear(f(0), f(1), *at, *rows, *transposed))
            }
            Op::HeadMatMul { transpose_b } => Value::F(ops::head_matmul(f(0), f(1), *transpose_b)),
            Op::Alibi { slope_scale } => Value::F(ops::alibi(f(0), ids(1), *slope_scale)),
            Op::Mask(m) => Value::F(ops::mask(f(0), ids(1), m)),
            Op::Softmax => Value::F(ops::softmax(f(0), ops.get(1).map(|_| f(1)))),
            Op::Attention { scale, mask, alibi, softcap, sinks } => {
                let sinks = sinks.then(|| f(4));
                Value::F(ops::attention(f(0), f(1), f(2), ids(3), *scale, mask, *alibi, *softcap, sinks))
            }
            Op::Route(r) => Value::F(ops::route(f(0), ops.get(1).map(|_| f(1)), r)),
            Op::Experts(e) => {
                let ws: Vec<&Tensor> = (2..ops.len()).map(f).collect();
                Value::F(ops::experts(f(0), f(1), &ws, e))
            }
            Op::RowScale => Value::F(ops::row_scale(f(0), f(1))),
            Op::LastRow => match &vals[&ops[0]] {
                Value::I(v) => Value::I(v[v.len() - 1..].to_vec()),
                Value::F(x) => Value::F(Tensor::new(vec![1, x.shape[1]], x.row(x.shape[0] - 1).to_vec())),
            },
        };
        if let (Value::F(t), Some(ty)) = (&v, &node.ty) {
            let want = ty.eval(b);
            if t.shape != want {
                return Err(InterpError::Bug(format!(
                    "{} produced {:?}, its type says {want:?}",
                    node.op.mnemonic(),
                    t.shape
                )));
            }
        }
        for o in &ops {
            let r = remaining.get_mut(o).unwrap();
            *r -= 1;
            if *r == 0 {
                vals.remove(o);
            }
        }
        vals.insert(id, v);
    }
    let mut out = HashMap::new();
    for (name, id) in &g.outputs {
        match vals.get(id) {
            Some(Value::F(t)) => {
                out.insert(name.name(), t.clone());
            }
            _ => return Err(InterpError::Bug(format!("output {name} is not a float tensor"))),
        }
    }
    Ok(out)
}
