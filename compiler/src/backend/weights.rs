//! The weight table of a library: which slot each checkpoint tensor is bound to, its
//! shape and storage type, and the layout the library re-packs it into when it is bound.
//! Shared by every backend (the MLIR ones read every weight as stored).
//!
//! ## Why re-pack
//!
//! **f32 matrices are re-packed once, at bind time, into panels** (`WeightLayout::Panels`,
//! `WeightTable::repacked`): every f32 weight that only linear maps read, in one
//! orientation, with `out` a multiple of 64, is copied by `tfc_bind_weight` into blocks
//! of 64 outputs, each block `[in, 64]` row-major. A panel is then 32 contiguous KB, read
//! in place by the GEMM, and a block one stream for decode (`lin_panel_row`, four
//! accumulators, prefetched 3 KB ahead). Before, the GEMM packed each panel on every call
//! from 128 (or, `[out, in]`, 64) rows a page apart, transposing `[out, in]` ones 16 × 16
//! through registers; in A/B pairs the panels made W1's f32 prefill ×1.10 and W2's ×1.19
//! faster, and decode ×1.09 and ×1.05. Other f32 weights (not whole blocks, or also
//! gathered from) and q8 ones stay in the checkpoint's layout and are packed in the GEMM.
//! **bf16 matrices are re-packed once, at bind time, into tiles** (`weights::Tiles`,
//! `WeightTable::repacked`): every bf16 weight that only linear maps read, in one
//! orientation, at sizes the AMX GEMM takes (`out` by 64, `in` by 32). `tfc_bind_weight`
//! copies it (in the pool) from the checkpoint's layout into library-owned memory as
//! `W [out, in]` (an `[in, out]` weight transposed) in blocks of 16 outputs, each block
//! `in / 32` row-major tiles of 16 × 32: one AMX operand per 1 KB, read where it is, and
//! one contiguous stream per block for decode. The globals `tfc__weight_tiles` say which;
//! the manifest (`repacked`) and `tfc_weight_repacked` tell the caller its buffer may
//! go, and the runtime drops its converted copy. Packing each chunk of weights into tiles
//! inside the GEMM had been ~40% of W2's bf16 prefill (reading at ~9 GB/s from 256 row
//! streams per task, not overlapped with the tiles). An embedding table tied to the
//! unembedding is also gathered from, so it stays as stored. Every kernel that reads a
//! bf16 matrix takes both layouts (`Lin::widx`): the AVX-512 GEMM and the few-row dot
//! products address tiles, decode's one row takes `lin_tile_row` (16 accumulators per
//! block, one per output).

use std::collections::HashMap;

use crate::ir::{DType, Graph, Op};

/// Output columns per linear task of the CPU kernels, and per block of the panel layout:
/// a block of weight rows that stays in cache while every activation row passes over it.
pub const BLOCK: usize = 64;

/// Where the weights go: index `i` is bound as `weights[i]`.
#[derive(Clone, Debug, Default)]
pub struct WeightTable {
    pub names: Vec<(String, Vec<usize>, DType)>,
    index: HashMap<String, usize>,
    /// Per weight, the layout the library re-packs it into when it is bound (see
    /// `Repack`); `None`: read as stored.
    pub repack: Vec<Option<Repack>>,
}

/// A matrix that the library re-packs once, when it is bound, into the layout its
/// kernels read (`tfc_bind_weight` in `support.c` does it from `tfc__weight_tiles`),
/// from `W [out, in]` or, `transposed`, `[in, out]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Repack {
    pub out: usize,
    pub inn: usize,
    /// Stored as `[in, out]`.
    pub transposed: bool,
    pub layout: WeightLayout,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// bf16 (`Tiles`): as `W [out, in]` in blocks of 16 outputs, each block `in / 32`
    /// tiles of 16 outputs × 32 inputs, row-major. A tile is one AMX operand, 1 KB and
    /// contiguous, and a block is one contiguous stream for a one-row product.
    Tiles,
    /// f32 (`Panels`): in blocks of `BLOCK` outputs, each block `[in, BLOCK]` row-major:
    /// the packed GEMM's panel of every `KC` inputs, contiguous, so it is read in place
    /// instead of gathered from `in` rows (or `BLOCK` rows) a page apart on every call.
    Panels,
}

/// The bf16 tile layout's sizes.
pub struct Tiles;

impl Tiles {
    /// Outputs per block and inputs per tile.
    pub const ROWS: usize = 16;
    pub const COLS: usize = 32;

    /// Whether a bf16 linear map of these sizes gets the layout: whole tiles and whole
    /// column blocks (the AMX GEMM takes exactly these).
    pub fn fits(inn: usize, out: usize) -> bool {
        inn % Tiles::COLS == 0 && out % BLOCK == 0
    }
}

/// The f32 panel layout.
pub struct Panels;

impl Panels {
    /// Whether an f32 linear map with `out` outputs gets the layout: whole column blocks.
    pub fn fits(out: usize) -> bool {
        out % BLOCK == 0
    }
}

impl WeightTable {
    /// The slot of a weight the table holds.
    pub fn slot(&self, name: &str) -> usize {
        self.index[name]
    }

    /// The table with a re-packed layout for every weight that only linear maps read, all
    /// in one orientation (so not, say, an embedding table tied to the unembedding, which
    /// a gather also reads): tiles for bf16 weights of the sizes `Tiles::fits`, panels for
    /// f32 ones of the sizes `Panels::fits`.
    pub fn repacked(mut self, graphs: &[&Graph]) -> WeightTable {
        let mut uses: Vec<Option<Option<bool>>> = vec![None; self.names.len()];
        for g in graphs {
            for id in g.node_ids() {
                let Op::Weight { name, .. } = g.op(id) else { continue };
                let i = self.index[name];
                for u in g.users(id) {
                    let ops = g.operands(u);
                    let this = match g.op(u) {
                        Op::Linear { transposed, .. } if ops[1] == id && ops[0] != id => Some(*transposed),
                        Op::Experts(x) if expert_panels(x, g.ty(id), &ops, id) => Some(false),
                        _ => None,
                    };
                    uses[i] = match uses[i] {
                        None => Some(this),
                        Some(t) if t == this => Some(t),
                        Some(_) => Some(None),
                    };
                }
            }
        }
        self.repack = self
            .names
            .iter()
            .zip(uses)
            .map(|((_, shape, dtype), u)| {
                let transposed = u.flatten()?;
                let (inn, out) = match shape[..] {
                    [a, b] if transposed => (a, b),
                    [a, b] => (b, a),
                    // A mixture's `[E, R, in]` matrices as one `[E · R, in]`: each
                    // expert's slice is whole panels (`expert_panels`).
                    [e, r, inn] if !transposed && *dtype == DType::F32 => (inn, e * r),
                    _ => return None,
                };
                let layout = match dtype {
                    DType::BF16 if Tiles::fits(inn, out) => WeightLayout::Tiles,
                    DType::F32 if Panels::fits(out) => WeightLayout::Panels,
                    _ => return None,
                };
                Some(Repack { out, inn, transposed, layout })
            })
            .collect();
        self
    }

    /// The re-packed layout of weight `i`, if it has one.
    pub fn repack_of(&self, i: usize) -> Option<Repack> {
        self.repack.get(i).copied().flatten()
    }

    pub fn of(graphs: &[&Graph]) -> WeightTable {
        let mut t = WeightTable::default();
        for g in graphs {
            for id in g.topo_order().unwrap_or_default() {
                if let Op::Weight { name, .. } = g.op(id) {
                    if !t.index.contains_key(name) {
                        let ty = g.ty(id);
                        let shape = ty.shape.iter().map(|d| d.as_fixed().unwrap_or(0)).collect();
                        t.index.insert(name.clone(), t.names.len());
                        t.names.push((name.clone(), shape, ty.dtype));
                        t.repack.push(None);
                    }
                }
            }
        }
        t
    }
}

/// Bytes of a weight as the library reads it.
pub fn weight_bytes(shape: &[usize], dtype: DType) -> usize {
    // The front end bounds every model's bytes (`front::MAX_BYTES`) and stores as q8 only
    // rows of whole blocks, so this cannot fail.
    tfc_runtime::abi::weight_bytes(shape, dtype.name()).expect("bug: a weight of the front end's sizes")
}

/// Whether weight `w` of experts node operands `ops` is read in panels: it is one of the
/// f32 matrices (not a bias), stored `[E, R, in]`, and every slice the linear kernels read
/// of it (an expert's `hidden` rows from `up_at` or `gate_at`, all `R` rows of a GLU path,
/// the down projection's `d`) is whole 64-row blocks. Panels are laid out a block at a
/// time, so expert `e`'s slice then starts where it does as stored.
fn expert_panels(
    x: &crate::ir::Experts,
    ty: &crate::ir::TensorType,
    ops: &[crate::ir::NodeId],
    w: crate::ir::NodeId,
) -> bool {
    let o = x.operands();
    let matrices = [Some(o.up), Some(o.down), o.gate];
    let mut at = ops.iter().enumerate().filter(|&(_, &n)| n == w).map(|(i, _)| i);
    let whole = |v: usize| v % BLOCK == 0;
    !x.transposed
        && ty.dtype == crate::ir::DType::F32
        && ty.shape.len() == 3
        && ty.shape[1].as_fixed().is_some_and(whole)
        && whole(x.hidden)
        && whole(x.up_at)
        && x.gate_at.is_none_or(whole)
        && at.all(|i| matrices.contains(&Some(i)))
}
