//! What every backend plans the same way before it emits code: where each value of a
//! graph lives while it runs (`Loc`: one scratch arena with blocks reused after a value's
//! last use, the weights, the inputs, the KV cache), and which elementwise ops are fused
//! into the kernel of the op producing their input (`Fusion`).

use std::collections::HashMap;

use super::weights::WeightTable;
use crate::ir::{Act, CacheKind, Graph, InputKind, NodeId, Op, Output, Phase, SymBinding};

/// The most `Add`/`Mul` operands one fused chain reads: each is an argument of the
/// fused kernel, whose argument block has room for this many beside its own.
pub const MAX_FUSED_OPERANDS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("the backends do not support {0} yet")]
    Unsupported(String),
}

/// An elementwise op fused into a kernel's output, applied while the tile is in cache.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Epi {
    Act(Act),
    Scale(f64),
    RoundBf16,
    /// Adds (or multiplies by) the same element of another tensor of the output's shape.
    Add,
    Mul,
}

impl Epi {
    /// A name for the op in kernel symbols and the plan's text.
    pub fn symbol(&self) -> String {
        match self {
            Epi::Act(a) => a.name().into(),
            Epi::Scale(s) => format!("scale{:016x}", s.to_bits()),
            Epi::RoundBf16 => "round_bf16".into(),
            Epi::Add => "add".into(),
            Epi::Mul => "mul".into(),
        }
    }
}

/// Where a node's value lives while a graph runs.
#[derive(Clone, Copy, Debug)]
pub enum Loc {
    Arena(u64),
    Weight(usize),
    Tokens,
    Types,
    /// A cache region; `P + T` (or `P`) valid rows per head, `max_seq` rows of stride.
    Cache(u32, CacheKind),
}

/// The fused epilogue of a linear map, norm or head merge (each op with the other operand
/// of an `Add`/`Mul`) and the last node of the chain, whose value the fused kernel writes.
pub type Chain = (Vec<(Epi, Option<NodeId>)>, NodeId);

/// Elementwise ops fused into the kernel of the linear map (or norm, or head merge) that
/// produces their input.
pub struct Fusion {
    pub chains: HashMap<NodeId, Chain>,
    /// Every node computed inside another's kernel, mapped to that node.
    pub absorbed: HashMap<NodeId, NodeId>,
    /// Prefill's keys and values that their head split or rotation writes straight into
    /// the cache region they fill (`in_cache`), so no copy follows.
    pub in_cache: HashMap<NodeId, (u32, CacheKind)>,
}

/// A chain continues while the current value has exactly one use, that use is an
/// activation, a scaling, or an add/multiply whose other operand is computed before the
/// linear map (so it is ready when the fused kernel runs), up to `MAX_FUSED_OPERANDS`
/// such operands.
pub fn fusion(g: &Graph, order: &[NodeId]) -> Fusion {
    let pos: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let mut f = Fusion { chains: HashMap::new(), absorbed: HashMap::new(), in_cache: in_cache(g) };
    for &l in order {
        if !matches!(g.op(l), Op::Linear { .. }) {
            continue;
        }
        let (mut cur, mut epi) = (l, Vec::new());
        loop {
            let users = g.users(cur);
            if users.len() != 1 || g.use_count(cur) != 1 {
                break;
            }
            let u = users[0];
            let step = match g.op(u) {
                Op::Activation(a) => (Epi::Act(*a), None),
                Op::Scale(c) => (Epi::Scale(*c), None),
                Op::RoundBf16 => (Epi::RoundBf16, None),
                Op::Add | Op::Mul => {
                    let ops = g.operands(u);
                    let other = if ops[0] == cur { ops[1] } else { ops[0] };
                    let operands = epi.iter().filter(|(_, o): &&(Epi, Option<NodeId>)| o.is_some()).count();
                    if other == cur || pos[&other] > pos[&l] || operands == MAX_FUSED_OPERANDS {
                        break;
                    }
                    (if *g.op(u) == Op::Add { Epi::Add } else { Epi::Mul }, Some(other))
                }
                _ => break,
            };
            epi.push(step);
            f.absorbed.insert(u, l);
            cur = u;
        }
        if !epi.is_empty() {
            f.chains.insert(l, (epi, cur));
        }
    }
    // A norm or head merge whose one use is a rounding to bf16 (the operand of a bf16
    // linear map) writes the rounded value itself.
    for &n in order {
        if !matches!(g.op(n), Op::LayerNorm { .. } | Op::RmsNorm { .. } | Op::MergeHeads) {
            continue;
        }
        let users = g.users(n);
        if users.len() == 1 && g.use_count(n) == 1 && *g.op(users[0]) == Op::RoundBf16 {
            f.chains.insert(n, (vec![(Epi::RoundBf16, None)], users[0]));
            f.absorbed.insert(users[0], n);
        }
    }
    f
}

/// Prefill's values that fill one cache region each, computed by a head split or a
/// rotation (kernels that write any head stride) and read only by attention (which reads
/// any): they live in that region, its `max_seq` rows per head, from row 0 (a prefill
/// starts an empty cache).
pub fn in_cache(g: &Graph) -> HashMap<NodeId, (u32, CacheKind)> {
    if g.phase != Phase::Prefill {
        return HashMap::new();
    }
    g.cache_outputs()
        .into_iter()
        .filter(|(n, targets)| {
            targets.len() == 1
                && matches!(g.op(*n), Op::SplitHeads { .. } | Op::Rope(_))
                && g.users(*n)
                    .iter()
                    .all(|&u| matches!(g.op(u), Op::Attention { .. }) && g.operands(u)[0] != *n)
        })
        .map(|(n, targets)| (n, targets[0]))
        .collect()
}

/// The arena plan of a graph whose every node is computed on its own (no fused chains),
/// each value in a block of its own size.
pub fn plan_unfused(
    g: &Graph,
    order: &[NodeId],
    weights: &WeightTable,
    max_seq: usize,
    extra: &dyn Fn(NodeId) -> u64,
) -> Result<(HashMap<NodeId, Loc>, u64), PlanError> {
    let none = Fusion { chains: HashMap::new(), absorbed: HashMap::new(), in_cache: HashMap::new() };
    arena(g, order, &none, weights, max_seq, extra)
}

/// Assigns arena offsets in schedule order, reusing a block once its value is dead (best
/// fit among the free blocks); returns every node's place and the arena's size. `extra`
/// is what a backend's kernel for a node keeps after its value in the same block.
pub fn arena(
    g: &Graph,
    order: &[NodeId],
    fusion: &Fusion,
    weights: &WeightTable,
    max_seq: usize,
    extra: &dyn Fn(NodeId) -> u64,
) -> Result<(HashMap<NodeId, Loc>, u64), PlanError> {
    let bind = SymBinding { t: max_seq, p: max_seq.saturating_sub(1) };
    let mut last_use: HashMap<NodeId, usize> = HashMap::new();
    for (i, &n) in order.iter().enumerate() {
        for o in g.operands(n) {
            last_use.insert(o, i);
        }
    }
    // The main output is copied out at the end; the cache outputs are stored into the
    // cache as soon as they are computed, so they live only as long as their uses.
    for (o, n) in &g.outputs {
        if matches!(o, Output::Main(_)) {
            last_use.insert(*n, usize::MAX);
        }
    }
    // The cache region a concatenation extends (decode's keys and values).
    let cache_in = |n: NodeId| match g.op(g.operands(n)[0]) {
        Op::Input(InputKind::Cache { layer, kind }) => Some((*layer, *kind)),
        _ => None,
    };
    let mut loc = HashMap::new();
    let mut free: Vec<(u64, u64)> = Vec::new();
    let mut top = 0u64;
    for (i, &n) in order.iter().enumerate() {
        let l = match g.op(n) {
            // Computed by the fused linear kernel, into the linear map's block.
            _ if fusion.absorbed.contains_key(&n) => loc[&fusion.absorbed[&n]],
            _ if fusion.in_cache.contains_key(&n) => {
                let (layer, kind) = fusion.in_cache[&n];
                Loc::Cache(layer, kind)
            }
            Op::Weight { name, .. } => Loc::Weight(weights.slot(name)),
            Op::Input(InputKind::Tokens) => Loc::Tokens,
            Op::Input(InputKind::TokenTypes) => Loc::Types,
            Op::Input(InputKind::Cache { layer, kind }) => Loc::Cache(*layer, *kind),
            Op::Concat { .. } if cache_in(n).is_some() => {
                let (layer, kind) = cache_in(n).unwrap();
                Loc::Cache(layer, kind)
            }
            Op::Concat { axis } if *axis + 1 != g.ty(n).rank() => {
                return Err(PlanError::Unsupported(
                    "concatenation other than the KV cache or along the features".into(),
                ))
            }
            Op::Softmax | Op::Mask(_) | Op::Alibi { .. } | Op::HeadMatMul { .. } => {
                return Err(PlanError::Unsupported("unfused attention (run the fusion pass)".into()))
            }
            _ => {
                // A fused linear map writes its chain's last value: same shape, one block.
                let extra = extra(n);
                let bytes =
                    (g.ty(n).eval(bind).iter().product::<usize>() as u64 * 4 + extra).div_ceil(64) * 64;
                let slot =
                    free.iter().enumerate().filter(|(_, (_, s))| *s >= bytes).min_by_key(|(_, (_, s))| *s);
                match slot.map(|(j, _)| j) {
                    Some(j) => Loc::Arena(free.swap_remove(j).0),
                    None => {
                        top += bytes;
                        Loc::Arena(top - bytes)
                    }
                }
            }
        };
        loc.insert(n, l);
        // Free operands whose last use is this node (after allocating its result, so a
        // kernel never writes over its own input).
        let mut ops = g.operands(n);
        ops.dedup();
        for o in ops {
            // The block of a fused chain belongs to its last value; the inner ones never free it.
            let interior = fusion.chains.contains_key(&o)
                || fusion.absorbed.get(&o).is_some_and(|l| fusion.chains[l].1 != o);
            if last_use.get(&o) == Some(&i) && !interior {
                if let Some(Loc::Arena(off)) = loc.get(&o) {
                    let owner = fusion.absorbed.get(&o).copied().unwrap_or(o);
                    let extra = extra(owner);
                    let bytes =
                        (g.ty(o).eval(bind).iter().product::<usize>() as u64 * 4 + extra).div_ceil(64) * 64;
                    free.push((*off, bytes));
                }
            }
        }
    }
    Ok((loc, top))
}
