//! Which of the CPU kernels computes each linear map (`LinearAlgo`): the decisions that
//! depend on the weights' layout, the row count and AMX, made before any code is emitted.

use std::collections::{HashMap, HashSet};

use super::amx;
use super::elementwise::epilogue_vectorises;
use super::kb::WFmt;
use super::kernels::{self, LinearAlgo, WeightRead};
use super::LlvmError;
use crate::backend::plan::{self, Epi, Fusion, Loc};
use crate::backend::weights::{WeightLayout, WeightTable, BLOCK};
use crate::ir::{Graph, NodeId, Op, SymBinding};

/// The layout linear map `n` reads its weights in, if they are re-packed (`Repack`).
pub(super) fn reads_layout(g: &Graph, n: NodeId, weights: &WeightTable) -> Option<WeightLayout> {
    match g.op(g.operands(n)[1]) {
        Op::Weight { name, .. } => weights.repack_of(weights.slot(name)).map(|t| t.layout),
        _ => None,
    }
}

/// Whether linear map `n` reads its weights as `[in, out]`: stored so, and not re-packed
/// (tiles are `[out, in]`, panels neither).
pub(super) fn reads_transposed(g: &Graph, n: NodeId, weights: &WeightTable) -> bool {
    matches!(g.op(n), Op::Linear { transposed: true, .. }) && reads_layout(g, n, weights).is_none()
}

/// Chunks of the input dimension for a one-row `x · W [in, out]`, and `out`: such a product
/// is split over `in` so that each task streams a contiguous band of weight rows (the
/// column blocks of the tiled kernel would each walk the whole matrix at a large stride).
pub(super) fn split_k(g: &Graph, n: NodeId, weights: &WeightTable) -> Option<(usize, usize)> {
    if !reads_transposed(g, n, weights) {
        return None;
    }
    let ty = g.ty(n);
    let (rows, out) = (ty.shape[0].as_fixed()?, ty.shape[1].as_fixed()?);
    let inn = g.ty(g.operands(n)[0]).shape[1].as_fixed()?;
    (rows == 1 && out % BLOCK == 0 && inn >= 64).then_some((8, out))
}

/// Whether linear map `n` runs on AMX tiles (on a target with them): bf16 weights, many
/// rows (not decode's one), and sizes the tile kernel takes.
pub(super) fn amx_linear(g: &Graph, n: NodeId, amx: bool, weights: &WeightTable) -> bool {
    if !matches!(g.op(n), Op::Linear { .. }) {
        return false;
    }
    let transposed = reads_transposed(g, n, weights);
    let ops = g.operands(n);
    if !amx || split_k(g, n, weights).is_some() || WFmt::of(g.ty(ops[1])) != WFmt::Bf16 {
        return false;
    }
    let ty = g.ty(n);
    let (Some(out), Some(inn)) = (ty.shape[ty.rank() - 1].as_fixed(), g.ty(ops[0]).shape[1].as_fixed())
    else {
        return false;
    };
    let rows: Option<usize> = ty.shape[..ty.rank() - 1].iter().map(|d| d.as_fixed()).product();
    rows.is_none_or(|r| r >= amx::MB / 2) && kernels::packs(rows, out, transposed) && amx::fits(inn, out)
}

/// The rows of linear map `n` (`None`: known only at run time).
pub(super) fn linear_rows(g: &Graph, n: NodeId) -> Option<usize> {
    let ty = g.ty(n);
    ty.shape[..ty.rank() - 1].iter().map(|d| d.as_fixed()).product()
}

/// Whether linear map `n` (not split over `in`) gets the packed GEMM: panels need no
/// packing, so it takes every row count; other layouts as `kernels::packs` says.
pub(super) fn packed_linear(g: &Graph, n: NodeId, weights: &WeightTable) -> bool {
    let ty = g.ty(n);
    let out = ty.shape[ty.rank() - 1].as_fixed();
    reads_layout(g, n, weights) == Some(WeightLayout::Panels)
        || out.is_some_and(|out| kernels::packs(linear_rows(g, n), out, reads_transposed(g, n, weights)))
}

/// Whether linear map `n` reads its activations sliced (`Kernel::SliceRows`): the packed
/// GEMM, not on AMX, for more than one row.
pub(super) fn sliced_linear(g: &Graph, n: NodeId, amx: bool, weights: &WeightTable) -> bool {
    matches!(g.op(n), Op::Linear { .. })
        && split_k(g, n, weights).is_none()
        && !amx_linear(g, n, amx, weights)
        && packed_linear(g, n, weights)
        && linear_rows(g, n) != Some(1)
}

/// The bf16 parts the AMX GEMM splits activation `x` into: one if `x` is rounded to bf16.
pub(super) fn amx_parts(g: &Graph, x: NodeId) -> usize {
    if *g.op(x) == Op::RoundBf16 {
        1
    } else {
        amx::PARTS
    }
}

/// The values that AMX linear maps write packed for the maps reading them
/// (`amx::Amx::to_tiles`): the last of a tile map's fused chain when that chain
/// vectorises and ends in a rounding to bf16 (so the value is one part), every use of the
/// value being the input of an `[out, in]` map on tiles. Such values share one region, so each is
/// written only after the last reader of the one before (and never by one of its readers).
pub(super) fn tile_outputs(
    g: &Graph,
    order: &[NodeId],
    fused: &Fusion,
    amx: bool,
    weights: &WeightTable,
) -> HashSet<NodeId> {
    let pos: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let cache_outputs = g.cache_outputs();
    let mut out = HashSet::new();
    let mut busy_until = None;
    for (i, &l) in order.iter().enumerate() {
        let Some((chain, e)) = fused.chains.get(&l) else { continue };
        let epi: Vec<Epi> = chain.iter().map(|(e, _)| *e).collect();
        let users = g.users(*e);
        let eligible = amx_linear(g, l, amx, weights)
            && epi.last() == Some(&Epi::RoundBf16)
            && epilogue_vectorises(&epi)
            && busy_until.is_none_or(|b| i > b)
            && !g.outputs.iter().any(|(_, o)| o == e)
            && !cache_outputs.contains_key(e)
            && !users.is_empty()
            && g.use_count(*e) == users.len()
            && users.iter().all(|&u| {
                g.operands(u)[0] == *e && amx_linear(g, u, amx, weights) && !reads_transposed(g, u, weights)
            });
        if eligible {
            busy_until = users.iter().map(|u| pos[u]).max();
            out.insert(*e);
        }
    }
    out
}

/// Bytes a node's arena block holds after its value: a split-K GEMV's partial sums, a
/// mixture's scratch (`ExpertsScratch`).
pub(super) fn extra_bytes(g: &Graph, n: NodeId, weights: &WeightTable, max_seq: usize) -> u64 {
    if let Some(s) = experts_scratch(g, n, max_seq) {
        return s.end - s.offsets + 64;
    }
    split_k(g, n, weights).map_or(0, |(chunks, out)| (chunks * out * 4) as u64)
}

/// Whether a mixture's experts run their up (or gate_up) projection whole, with its bias,
/// then the GLU of its parts (`Kernel::Glu`): for biases, `[in, out]` storage,
/// interleaved outputs or a clamped GLU; otherwise the gate and up projections are two
/// linear maps with the activation and the product fused into them.
pub(super) fn glu_path(x: &crate::ir::Experts) -> bool {
    x.interleaved || x.transposed || x.bias || x.clamp.is_some() || x.up_offset != 0.0
}

/// Where a mixture's scratch lies in its node's arena block, in bytes from the block's
/// start, each part 64-byte aligned after the value `[T, d]` (sized for the most rows
/// the graph runs): the slots' offsets per expert (`i64`), each row's slot per expert
/// (`i32`), the rows grouped by expert, the gate's and the up projection's outputs, and
/// the experts' outputs, one row per slot (`T · top_k` slots).
pub(super) struct ExpertsScratch {
    pub offsets: u64,
    pub slot_of: u64,
    pub xs: u64,
    pub gate: u64,
    pub up: u64,
    pub ys: u64,
    pub end: u64,
}

pub(super) fn experts_scratch(g: &Graph, n: NodeId, max_seq: usize) -> Option<ExpertsScratch> {
    let Op::Experts(x) = g.op(n) else { return None };
    let bind = SymBinding { t: max_seq, p: max_seq.saturating_sub(1) };
    let ty = g.ty(n).eval(bind);
    let (t, d, e, f) = (ty[0] as u64, ty[1] as u64, x.experts as u64, x.hidden as u64);
    let k = match g.op(g.operands(n)[1]) {
        Op::Route(r) => r.top_k as u64,
        _ => e,
    };
    let slots = t * k;
    // The up (or gate_up) projection's outputs, all of which a GLU path keeps.
    let up_ty = g.ty(g.operands(n)[2]);
    let r = up_ty.shape[if x.transposed { 2 } else { 1 }].as_fixed().unwrap_or(0) as u64;
    let a = |v: u64| v.div_ceil(64) * 64;
    let offsets = a(t * d * 4);
    let slot_of = offsets + a(8 * (e + 1));
    let xs = slot_of + a(4 * t * e);
    let gate = xs + a(slots * d * 4);
    let up = gate + a(slots * if glu_path(x) { r } else { f } * 4);
    let ys = up + a(slots * f * 4);
    Some(ExpertsScratch { offsets, slot_of, xs, gate, up, ys, end: ys + a(slots * d * 4) })
}

/// How the linear kernels compute one expert's projection of `inn` to `out` features
/// over `rows` rows (`None`: known only at run time): the packed GEMM for many rows,
/// else dot products, else loops; the weights are read as stored.
pub(super) fn expert_algo(rows: Option<usize>, inn: usize, out: usize, transposed: bool) -> LinearAlgo {
    if kernels::packs(rows, out, transposed) {
        LinearAlgo::Packed { sliced: false }
    } else if kernels::tiled(inn, transposed) {
        LinearAlgo::Dots
    } else {
        LinearAlgo::Loops
    }
}

/// What the packed GEMMs' region holds of a value.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Packing {
    Amx { transposed: bool },
    Slices { pairs: bool },
}

/// How the CPU kernels compute a linear map.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum LinearPlan {
    /// One row times `[in, out]` weights, split over `in` into `chunks` bands
    /// (`GemvPartial`, then `GemvReduce`).
    SplitK { chunks: usize },
    /// One `Kernel::Linear` with this algorithm.
    Kernel(LinearAlgo),
}

impl LinearPlan {
    pub(super) fn name(self) -> String {
        match self {
            LinearPlan::SplitK { chunks } => format!("split_k(chunks={chunks})"),
            LinearPlan::Kernel(LinearAlgo::Amx(a)) => {
                format!("amx(parts={}{})", a.parts, if a.to_tiles { ", writes packed" } else { "" })
            }
            LinearPlan::Kernel(LinearAlgo::Packed { sliced: true }) => "packed(sliced)".into(),
            LinearPlan::Kernel(LinearAlgo::Packed { sliced: false }) => "packed".into(),
            LinearPlan::Kernel(LinearAlgo::Dots) => "dots".into(),
            LinearPlan::Kernel(LinearAlgo::Loops) => "loops".into(),
        }
    }
}

/// How linear map `n` reads its weights.
pub(super) fn weight_read(g: &Graph, n: NodeId, weights: &WeightTable) -> WeightRead {
    match reads_layout(g, n, weights) {
        Some(WeightLayout::Tiles) => WeightRead::Tiles,
        Some(WeightLayout::Panels) => WeightRead::Panels,
        None => WeightRead::Stored { transposed: reads_transposed(g, n, weights) },
    }
}

/// The plan of one graph for the CPU kernels: the schedule, the fused chains, where every
/// value lives, and the packed GEMMs' regions after the planned values.
pub(super) struct GraphPlan {
    pub order: Vec<NodeId>,
    pub fused: Fusion,
    pub loc: HashMap<NodeId, Loc>,
    /// The planned values' bytes.
    pub values: u64,
    /// The packed (AMX) or sliced activations, which linear maps of the same input share
    /// (only packing writes there), and then an AMX map's accumulators.
    pub packed_at: u64,
    pub packed_bytes: u64,
    /// Values an AMX map writes packed for the maps reading it (`tile_outputs`), and the
    /// region they go to, after which the maps reading them keep their accumulators.
    pub to_tiles: HashSet<NodeId>,
    pub tiled_at: u64,
    pub tiled_bytes: u64,
}

impl GraphPlan {
    pub(super) fn of(
        g: &Graph,
        weights: &WeightTable,
        max_seq: usize,
        amx: bool,
    ) -> Result<GraphPlan, LlvmError> {
        let order = g.topo_order().map_err(|_| LlvmError::Llvm("bug: cyclic graph".into()))?;
        let fused = plan::fusion(g, &order);
        let (loc, values) =
            plan::arena(g, &order, &fused, weights, max_seq, &|n| extra_bytes(g, n, weights, max_seq))?;
        let bind = SymBinding { t: max_seq, p: max_seq.saturating_sub(1) };
        let packed_at = values.div_ceil(64) * 64;
        let packed_bytes = order
            .iter()
            .filter_map(|&n| {
                let x = || g.ty(g.operands(n)[0]).eval(bind);
                if amx_linear(g, n, amx, weights) {
                    let x = x();
                    let out = *g.ty(n).eval(bind).last().unwrap();
                    let parts = amx_parts(g, g.operands(n)[0]);
                    Some((amx::packed_bytes(x[0], x[1], parts) + amx::acc_bytes(x[0], out)) as u64)
                } else if sliced_linear(g, n, amx, weights) {
                    let x = x();
                    Some(kernels::sliced_bytes(x[0], x[1]) as u64)
                } else {
                    None
                }
            })
            .max()
            .unwrap_or(0);
        let to_tiles = tile_outputs(g, &order, &fused, amx, weights);
        let tiled_at = packed_at + packed_bytes.div_ceil(64) * 64;
        let tiled_bytes = order
            .iter()
            .filter(|&&n| matches!(g.op(n), Op::Linear { .. }) && to_tiles.contains(&g.operands(n)[0]))
            .map(|&n| {
                let x = g.ty(g.operands(n)[0]).eval(bind);
                let out = *g.ty(n).eval(bind).last().unwrap();
                (amx::packed_bytes(x[0], x[1], 1) + amx::acc_bytes(x[0], out)) as u64
            })
            .max()
            .unwrap_or(0);
        Ok(GraphPlan { order, fused, loc, values, packed_at, packed_bytes, to_tiles, tiled_at, tiled_bytes })
    }

    /// The arena bytes the graph needs.
    pub(super) fn arena_bytes(&self) -> u64 {
        if self.tiled_bytes > 0 {
            self.tiled_at + self.tiled_bytes
        } else {
            self.packed_at + self.packed_bytes
        }
    }

    /// How linear map `n` is computed.
    pub(super) fn linear(&self, g: &Graph, n: NodeId, amx: bool, weights: &WeightTable) -> LinearPlan {
        if let Some((chunks, _)) = split_k(g, n, weights) {
            return LinearPlan::SplitK { chunks };
        }
        LinearPlan::Kernel(if !packed_linear(g, n, weights) {
            let inn = g.ty(g.operands(n)[0]).shape.last().and_then(|d| d.as_fixed()).unwrap_or(0);
            if kernels::tiled(inn, reads_transposed(g, n, weights)) {
                LinearAlgo::Dots
            } else {
                LinearAlgo::Loops
            }
        } else if amx_linear(g, n, amx, weights) {
            let to_tiles = self.fused.chains.get(&n).is_some_and(|(_, e)| self.to_tiles.contains(e));
            LinearAlgo::Amx(amx::Amx { parts: amx_parts(g, g.operands(n)[0]), to_tiles })
        } else {
            LinearAlgo::Packed { sliced: sliced_linear(g, n, amx, weights) }
        })
    }
}

/// The plan as text (`tfc ir --stage plan`): per graph, the arena's regions, and per node
/// (numbered as `tfc ir` numbers them) where its value lives, the elementwise ops fused
/// into it, for a linear map the weights' layout and the algorithm, and the kernels its
/// `calls` (as the graph function calls them) are.
pub(super) fn describe(
    name: &str,
    g: &Graph,
    p: &GraphPlan,
    amx: bool,
    weights: &WeightTable,
    calls: &[(NodeId, String)],
) -> String {
    use std::fmt::Write;
    let num: HashMap<NodeId, usize> = p.order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let mut out = String::new();
    writeln!(
        out,
        "plan {name}: arena {} bytes: values {}, packed activations {} at {}, packed outputs {} at {}",
        p.arena_bytes(),
        p.values,
        p.packed_bytes,
        p.packed_at,
        p.tiled_bytes,
        p.tiled_at
    )
    .unwrap();
    for &n in &p.order {
        let op = g.op(n);
        if matches!(op, Op::Weight { .. } | Op::Input(_)) {
            continue;
        }
        let mut line = format!("  %{} {}", num[&n], op.mnemonic());
        if let Some(owner) = p.fused.absorbed.get(&n) {
            write!(line, ": fused into %{}", num[owner]).unwrap();
            writeln!(out, "{line}").unwrap();
            continue;
        }
        match p.loc.get(&n) {
            Some(Loc::Arena(off)) => write!(line, " @arena+{off}").unwrap(),
            Some(Loc::Cache(layer, kind)) => write!(line, " @cache.{}.{layer}", kind.name()).unwrap(),
            Some(l) => write!(line, " @{l:?}").unwrap(),
            None => {}
        }
        if let Op::Linear { .. } = op {
            let layout = match weight_read(g, n, weights) {
                WeightRead::Tiles => "tiles",
                WeightRead::Panels => "panels",
                WeightRead::Stored { transposed: true } => "[in, out]",
                WeightRead::Stored { transposed: false } => "[out, in]",
            };
            let w = match g.op(g.operands(n)[1]) {
                Op::Weight { name, .. } => format!("{name} "),
                _ => String::new(),
            };
            write!(line, ", weights {w}{layout}, {}", p.linear(g, n, amx, weights).name()).unwrap();
        }
        if let Some((chain, last)) = p.fused.chains.get(&n) {
            let steps: Vec<String> = chain
                .iter()
                .map(|(e, other)| match other {
                    Some(o) => format!("{} %{}", e.symbol(), num[o]),
                    None => e.symbol(),
                })
                .collect();
            write!(line, ", then {} (writes %{})", steps.join(", "), num[last]).unwrap();
            if p.to_tiles.contains(last) {
                line.push_str(" packed");
            }
        }
        let called: Vec<&str> = calls.iter().filter(|(c, _)| *c == n).map(|(_, k)| k.as_str()).collect();
        if !called.is_empty() {
            write!(line, "; calls {}", called.join(", ")).unwrap();
        }
        writeln!(out, "{line}").unwrap();
    }
    out
}
