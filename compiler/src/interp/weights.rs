//! The weights a graph reads, bound once: from a checkpoint, or random from a seed.
//!
//! Values are rounded to the storage dtype the graph declares, so the interpreter sees
//! the same numbers a backend reading 16-bit weights would.

use std::collections::HashMap;

use tfc_runtime::{Checkpoint, CheckpointError, SplitMix64};

use super::Tensor;
use crate::ir::{DType, Graph, Op, WeightRole};

#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("weight `{name}` is declared with two shapes, {a:?} and {b:?}")]
    Conflict { name: String, a: Vec<usize>, b: Vec<usize> },
    #[error("bug: weight `{0}` was not bound")]
    Unbound(String),
}

pub enum WeightSource<'a> {
    Checkpoint(&'a Checkpoint),
    /// Deterministic random weights: matrices and tables ~ N(0, 0.02²), gains 1, biases 0,
    /// rounded to each weight's storage type as the library stores it.
    Random {
        seed: u64,
    },
    /// The same values before that rounding: what a library is given to store (and round)
    /// itself, so it computes what the interpreter computes from `Random`. (Rounding a
    /// rounded value again need not give it back: `q4_k`'s and `q5_k`'s scales are fitted
    /// to the values' range, which rounding moves.)
    RandomF32 {
        seed: u64,
    },
}

#[derive(Default)]
pub struct Weights {
    map: HashMap<String, Tensor>,
}

impl Weights {
    /// Binds every weight the graphs read, checking its shape.
    pub fn bind(graphs: &[&Graph], source: &WeightSource) -> Result<Weights, WeightError> {
        let mut w = Weights::default();
        for g in graphs {
            for id in g.node_ids() {
                let n = g.node(id);
                let Op::Weight { name, role } = &n.op else {
                    continue;
                };
                let ty = n.ty.as_ref().expect("weights are typed at construction");
                let shape: Vec<usize> =
                    ty.shape.iter().map(|d| d.as_fixed().expect("weights have fixed shapes")).collect();
                if let Some(t) = w.map.get(name) {
                    if t.shape != shape {
                        return Err(WeightError::Conflict {
                            name: name.clone(),
                            a: t.shape.clone(),
                            b: shape,
                        });
                    }
                    continue;
                }
                let n = shape.iter().product();
                let data = match (source, ty.dtype) {
                    // What the library binds: the file's blocks where it stores this
                    // format, else the values quantised.
                    (WeightSource::Checkpoint(ck), DType::Quant(q)) => {
                        tfc_runtime::gguf::dequantize(q.ggml(), &ck.quantized(name, &shape, q)?, n)
                    }
                    (WeightSource::Checkpoint(ck), d) => round_to(ck.get(name, &shape)?, d),
                    (WeightSource::Random { seed }, d) => round_to(random(name, *role, &shape, *seed), d),
                    (WeightSource::RandomF32 { seed }, _) => random(name, *role, &shape, *seed),
                };
                w.map.insert(name.clone(), Tensor::new(shape, data));
            }
        }
        Ok(w)
    }

    pub fn get(&self, name: &str) -> Result<&Tensor, WeightError> {
        self.map.get(name).ok_or_else(|| WeightError::Unbound(name.to_string()))
    }

    /// Binds `name` to `t` instead, as a test or a tool sets chosen values.
    pub fn insert(&mut self, name: &str, t: Tensor) {
        self.map.insert(name.to_string(), t);
    }
}

fn round_to(mut data: Vec<f32>, dtype: DType) -> Vec<f32> {
    match dtype {
        DType::BF16 => data.iter_mut().for_each(|x| *x = half::bf16::from_f32(*x).to_f32()),
        DType::F16 => data.iter_mut().for_each(|x| *x = half::f16::from_f32(*x).to_f32()),
        DType::Q8 => tfc_runtime::quant::q8_roundtrip(&mut data),
        DType::Quant(q) => q.roundtrip(&mut data),
        DType::F32 | DType::I32 => {}
    }
    data
}

fn random(name: &str, role: WeightRole, shape: &[usize], seed: u64) -> Vec<f32> {
    let n: usize = shape.iter().product();
    match role {
        WeightRole::Gain => vec![1.0; n],
        WeightRole::Bias => vec![0.0; n],
        WeightRole::Matrix | WeightRole::Embedding | WeightRole::Logit => {
            // Logits at the scale of attention scores, matrices and tables small.
            let scale = if role == WeightRole::Logit { 1.0 } else { 0.02 };
            // FNV-1a of the name, so each tensor has its own stream.
            let h = name
                .bytes()
                .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
            let mut rng = SplitMix64(seed ^ h);
            (0..n)
                .map(|_| {
                    // Box–Muller.
                    let (u1, u2) = (rng.unit(), rng.unit());
                    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * scale) as f32
                })
                .collect()
        }
    }
}
