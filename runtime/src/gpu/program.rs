//! What a GPU build of a model is: kernels in one binary (SPIR-V or PTX) and, per graph,
//! the list of dispatches that runs it. The compiler writes it as `gpu.json`; the
//! runtime's device paths execute it. Every kernel reads `T` and `P` from a small `dims`
//! buffer, so one list serves every prompt length.

use serde::{Deserialize, Serialize};

use crate::abi::WeightInfo;

pub const PROGRAM_FILE: &str = "gpu.json";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Program {
    pub name: String,
    /// `vulkan` (SPIR-V) or `cuda` (PTX).
    pub target: String,
    /// The kernels' binary beside this file.
    pub binary: String,
    pub kernels: Vec<KernelInfo>,
    pub vocab: usize,
    pub max_seq: usize,
    pub output_width: usize,
    /// Token-type ids must be below this (0: the model takes none).
    pub type_rows: usize,
    pub arena_bytes: u64,
    pub cache_bytes: u64,
    pub weights: Vec<WeightInfo>,
    pub tables: Vec<Table>,
    pub prefill: Graph,
    pub prefill_all: Graph,
    pub decode: Option<Graph>,
    pub spec_hash: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KernelInfo {
    pub name: String,
    /// Threads per workgroup (x).
    pub block: u32,
    /// Buffer arguments, in binding order.
    pub args: Vec<ArgKind>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArgKind {
    F32,
    I32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Graph {
    pub dispatches: Vec<Dispatch>,
    /// Where the main output is left in the arena, and its rows.
    pub output_offset: u64,
    pub output_rows: Lin,
}

/// `c + t·T + p·P`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lin {
    pub c: u64,
    pub t: u64,
    pub p: u64,
}

impl Lin {
    pub fn eval(self, t: u64, p: u64) -> u64 {
        self.c + self.t * t + self.p * p
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Dispatch {
    pub kernel: usize,
    /// Workgroups in x and y: `ceil(grid[i] / per_group[i])`.
    pub grid: [Lin; 2],
    pub per_group: [u64; 2],
    pub args: Vec<Arg>,
}

impl Dispatch {
    /// Workgroups in x and y for `t` new tokens after `p` cached ones (`None`: no work),
    /// or an error when a grid exceeds what one launch can take.
    pub fn groups(&self, t: u64, p: u64) -> Result<Option<[u32; 2]>, String> {
        let mut g = [0u32; 2];
        for (i, n) in g.iter_mut().enumerate() {
            let want = self.grid[i].eval(t, p).div_ceil(self.per_group[i].max(1));
            *n = u32::try_from(want).map_err(|_| format!("a dispatch of {want} workgroups is too large"))?;
        }
        Ok((g[0] > 0 && g[1] > 0).then_some(g))
    }
}

/// A buffer argument: which buffer, from which byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arg {
    Arena(u64),
    Cache(u64),
    Weight(usize),
    Table(usize),
    Tokens,
    Types,
    Dims,
}

/// Constant tables the runtime computes once (in `f64`, like the reference interpreter)
/// and uploads: angles are where GPU `sin`/`cos` would lose precision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Table {
    /// `[rows, dim]`: sin at even, cos at odd features of `p / base^(2i/dim)`.
    /// With `fairseq`, the sines then the cosines of `(p + offset) · exp(-i · ln(base) /
    /// (dim/2 - 1))` (the compiler's `ir::sinusoid_freqs`).
    Sinusoidal {
        rows: usize,
        dim: usize,
        base: f64,
        #[serde(default)]
        fairseq: bool,
        #[serde(default)]
        offset: usize,
    },
    /// `[rows, inv_freqs.len()]` cosines, then as many sines, of `p · inv_freqs[k]` (the
    /// rotation frequencies as the compiler defines them, `ir::Rope::inv_freqs`).
    Rope {
        rows: usize,
        inv_freqs: Vec<f64>,
        /// What the cosines and sines are multiplied by (YaRN's attention factor).
        #[serde(default = "one")]
        magnitude: f64,
    },
}

fn one() -> f64 {
    1.0
}

impl Table {
    pub fn values(&self) -> Vec<f32> {
        match self {
            &Table::Sinusoidal { rows, dim, base, fairseq: true, offset } => {
                let half = dim / 2;
                let freq = |i: usize| (-(i as f64) * base.ln() / (half.max(2) - 1) as f64).exp();
                let mut out = Vec::with_capacity(rows * dim);
                for p in 0..rows {
                    let angle = |i: usize| (p + offset) as f64 * freq(i);
                    out.extend((0..half).map(|i| angle(i).sin() as f32));
                    out.extend((0..half).map(|i| angle(i).cos() as f32));
                }
                out
            }
            &Table::Sinusoidal { rows, dim, base, offset, .. } if offset > 0 => {
                let mut out = Vec::with_capacity(rows * dim);
                for p in 0..rows {
                    for i in 0..dim / 2 {
                        let angle = (p + offset) as f64 / base.powf(2.0 * i as f64 / dim as f64);
                        out.push(angle.sin() as f32);
                        out.push(angle.cos() as f32);
                    }
                }
                out
            }
            &Table::Sinusoidal { rows, dim, base, .. } => {
                let mut out = Vec::with_capacity(rows * dim);
                for p in 0..rows {
                    for i in 0..dim / 2 {
                        let angle = p as f64 / base.powf(2.0 * i as f64 / dim as f64);
                        out.push(angle.sin() as f32);
                        out.push(angle.cos() as f32);
                    }
                }
                out
            }
            Table::Rope { rows, inv_freqs, magnitude } => {
                let mut cos = Vec::with_capacity(rows * inv_freqs.len());
                let mut sin = Vec::with_capacity(rows * inv_freqs.len());
                for p in 0..*rows {
                    for freq in inv_freqs {
                        let (s, c) = (p as f64 * freq).sin_cos();
                        let (s, c) = (s * magnitude, c * magnitude);
                        cos.push(c as f32);
                        sin.push(s as f32);
                    }
                }
                cos.extend(sin);
                cos
            }
        }
    }
}
