//! The LLVM backend: prefill and decode graphs → one LLVM module → an object file.
//!
//! Each graph becomes an exported function `tfc__<graph>(arena, cache, tokens, types, T,
//! P, weights, out, pool)` that runs the graph's nodes in order, each as a call of
//! `tfc__parallel_for(pool, kernel, args, tasks)`; the kernels are in `kernels.rs`. Every
//! intermediate value lives at a fixed offset of one scratch arena, planned here with
//! buffer reuse after a value's last use. Keys and values go to the KV cache
//! (`[layer][k, v][kv_heads][max_seq][head_dim]` f32) right after they are computed, and
//! decode's attention reads the cache in place. Model constants (`tfc__vocab`, …) are
//! globals that the C half of the library (`tfc_runtime::abi::SUPPORT_C`) reads.

mod amx;
mod kb;
mod kernels;

use std::collections::{HashMap, HashSet};

use inkwell::context::Context;
use inkwell::module::{Linkage, Module};
use inkwell::passes::PassBuilderOptions;
use inkwell::targets::{CodeModel, FileType, InitializationConfig, RelocMode, Target, TargetMachine};
use inkwell::values::{FunctionValue, IntValue, PointerValue};
use inkwell::GlobalVisibility;
use inkwell::OptimizationLevel;

use kb::{Kb, WFmt};
pub use kernels::Kernel;
use kernels::{Epi, UnaryOp, BLOCK};

use crate::ir::{CacheKind, DType, Dim, Graph, InputKind, NodeId, Op, Phase, SymBinding};
use crate::Compiled;

#[derive(Debug, thiserror::Error)]
pub enum LlvmError {
    #[error("the LLVM backend does not support {0} yet")]
    Unsupported(String),
    #[error("LLVM: {0}")]
    Llvm(String),
    #[error("{0}")]
    Cpu(String),
}

/// The graphs a library holds, compiled from one spec.
pub struct Graphs<'a> {
    pub prefill: &'a Graph,
    pub prefill_all: &'a Graph,
    pub decode: Option<&'a Graph>,
}

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

    /// Whether a bf16 linear map of these sizes gets the layout: those the AMX GEMM takes.
    pub fn fits(inn: usize, out: usize) -> bool {
        amx::fits(inn, out)
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

/// Facts the module records as globals and the manifest repeats.
#[derive(Clone, Debug)]
pub struct Layout {
    pub max_seq: usize,
    pub vocab: usize,
    pub out_width: usize,
    pub arena_bytes: u64,
    pub cache_bytes: u64,
    /// Per (layer, kind): offset in floats into the cache and `(kv_heads, head_dim)`.
    pub cache: HashMap<(u32, CacheKind), (u64, usize, usize)>,
    pub type_rows: usize,
}

/// Builds the module for a compiled spec; with `amx`, for a target with AMX-BF16 (whose
/// bf16 GEMMs then run on tiles; `strip_amx` makes a copy without them).
pub fn build<'ctx>(
    cx: &'ctx Context,
    c: &Compiled,
    g: &Graphs,
    weights: &WeightTable,
    amx: bool,
) -> Result<(Module<'ctx>, Layout), LlvmError> {
    for (name, _, dtype) in &weights.names {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::Q8) {
            return Err(LlvmError::Unsupported(format!("{dtype} weights (`{name}`); use f32, bf16 or q8")));
        }
    }
    let m = cx.create_module(&c.spec.name);
    let max_seq = c.spec.sizes.max_seq;
    let layout = layout(c, g)?;
    let mut kernels: HashMap<String, FunctionValue> = HashMap::new();
    let mut arena = 0;
    let mut graphs =
        vec![("prefill", Some(g.prefill)), ("prefill_all", Some(g.prefill_all)), ("decode", g.decode)];
    for (name, graph) in graphs.drain(..) {
        let used = emit_graph(cx, &m, name, graph, weights, &layout, max_seq, amx, &mut kernels)?;
        arena = arena.max(used);
    }
    let layout = Layout { arena_bytes: arena, ..layout };
    globals(cx, &m, &layout, weights, g.decode.is_some());
    m.verify().map_err(|e| LlvmError::Llvm(format!("bug: invalid module: {e}")))?;
    Ok((m, layout))
}

/// Whether `tm` executes AMX-BF16 tiles.
pub fn has_amx(tm: &TargetMachine) -> bool {
    let f = tm.get_feature_string().to_string_lossy().to_string();
    let on: Vec<&str> = f.split(',').collect();
    on.contains(&"+amx-tile") && on.contains(&"+amx-bf16")
}

/// Replaces the functions of `m` that execute tile instructions (see `amx::strip`).
pub fn strip_amx(m: &Module) {
    amx::strip(m)
}

pub fn layout(c: &Compiled, g: &Graphs) -> Result<Layout, LlvmError> {
    let max_seq = c.spec.sizes.max_seq;
    let mut cache = HashMap::new();
    let mut off = 0u64;
    for (name, id) in &g.prefill.outputs {
        if let Some(rest) = name.strip_prefix("cache.") {
            let (kind, layer) = rest.split_once('.').unwrap();
            let kind = if kind == "k" { CacheKind::K } else { CacheKind::V };
            let layer: u32 = layer.parse().unwrap();
            let ty = g.prefill.ty(*id);
            let (groups, hd) = (ty.shape[0].as_fixed().unwrap(), ty.shape[2].as_fixed().unwrap());
            cache.insert((layer, kind), (off, groups, hd));
            off += (groups * max_seq * hd) as u64;
        }
    }
    let main = g.prefill.outputs.first().map(|(_, id)| g.prefill.ty(*id)).unwrap();
    let out_width = main.shape[1].as_fixed().unwrap();
    let mut type_rows = 0;
    for id in g.prefill.node_ids() {
        if let Op::Gather { .. } = g.prefill.op(id) {
            let ops = g.prefill.operands(id);
            if let (Op::Gather { offset }, Op::Input(InputKind::TokenTypes)) =
                (g.prefill.op(id), g.prefill.op(ops[1]))
            {
                // Type ids are checked against this at run time: id + offset must be a row.
                let rows = g.prefill.ty(ops[0]).shape[0].as_fixed().unwrap();
                type_rows = rows.saturating_sub(*offset);
            }
        }
    }
    Ok(Layout {
        max_seq,
        vocab: c.spec.sizes.vocab,
        out_width,
        arena_bytes: 0,
        cache_bytes: off * 4,
        cache,
        type_rows,
    })
}

pub fn globals<'ctx>(cx: &'ctx Context, m: &Module<'ctx>, l: &Layout, w: &WeightTable, has_decode: bool) {
    let i64t = cx.i64_type();
    let scalar = |name: &str, v: u64| {
        let g = m.add_global(i64t, None, name);
        g.set_initializer(&i64t.const_int(v, false));
        g.set_constant(true);
        g.set_visibility(GlobalVisibility::Hidden);
    };
    scalar("tfc__n_weights", w.names.len() as u64);
    scalar("tfc__arena_bytes", l.arena_bytes);
    scalar("tfc__cache_bytes", l.cache_bytes);
    scalar("tfc__max_seq", l.max_seq as u64);
    scalar("tfc__vocab", l.vocab as u64);
    scalar("tfc__out_width", l.out_width as u64);
    scalar("tfc__has_decode", has_decode as u64);
    scalar("tfc__type_rows", l.type_rows as u64);
    let sizes: Vec<_> =
        w.names.iter().map(|(_, s, d)| i64t.const_int(weight_bytes(s, *d) as u64, false)).collect();
    let arr = i64t.const_array(&sizes);
    let g = m.add_global(arr.get_type(), None, "tfc__weight_bytes");
    g.set_initializer(&arr);
    g.set_constant(true);
    g.set_visibility(GlobalVisibility::Hidden);
    // Four per weight: `out`, `in`, whether it is stored `[in, out]` and the layout (0
    // tiles, 1 panels); all zero for a weight bound as it is.
    let tiles: Vec<_> = (0..w.names.len())
        .flat_map(|i| match w.repack_of(i) {
            Some(t) => {
                [t.out as u64, t.inn as u64, t.transposed as u64, (t.layout == WeightLayout::Panels) as u64]
            }
            None => [0; 4],
        })
        .map(|v| i64t.const_int(v, false))
        .collect();
    let arr = i64t.const_array(&tiles);
    let g = m.add_global(arr.get_type(), None, "tfc__weight_tiles");
    g.set_initializer(&arr);
    g.set_constant(true);
    g.set_visibility(GlobalVisibility::Hidden);
    // Per weight, its checkpoint name and its type as `tfc_runtime::abi::weight_type`
    // writes it, which the runtime compares with the manifest.
    let strings = |name: &str, values: Vec<String>| {
        let ptrs: Vec<_> = values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let s = cx.const_string(v.as_bytes(), true);
                let g = m.add_global(s.get_type(), None, &format!("{name}.{i}"));
                g.set_initializer(&s);
                g.set_constant(true);
                g.set_linkage(Linkage::Private);
                g.as_pointer_value()
            })
            .collect();
        let ptr = cx.ptr_type(inkwell::AddressSpace::default());
        let arr = ptr.const_array(&ptrs);
        let g = m.add_global(arr.get_type(), None, name);
        g.set_initializer(&arr);
        g.set_constant(true);
        g.set_visibility(GlobalVisibility::Hidden);
    };
    strings("tfc__weight_name", w.names.iter().map(|(n, _, _)| n.clone()).collect());
    strings(
        "tfc__weight_type",
        w.names.iter().map(|(_, s, d)| tfc_runtime::abi::weight_type(d.name(), s)).collect(),
    );
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
type Chain = (Vec<(Epi, Option<NodeId>)>, NodeId);

/// Elementwise ops fused into the kernel of the linear map (or norm, or head merge) that
/// produces their input.
struct Fusion {
    chains: HashMap<NodeId, Chain>,
    /// Every node computed inside another's kernel, mapped to that node.
    absorbed: HashMap<NodeId, NodeId>,
    /// Prefill's keys and values that their head split or rotation writes straight into
    /// the cache region they fill (`in_cache`), so no copy follows.
    in_cache: HashMap<NodeId, (u32, CacheKind)>,
}

/// A chain continues while the current value has exactly one use, that use is an
/// activation, a scaling, or an add/multiply whose other operand is computed before the
/// linear map (so it is ready when the fused kernel runs).
fn fusion(g: &Graph, order: &[NodeId]) -> Fusion {
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
                    if other == cur || pos[&other] > pos[&l] {
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
fn in_cache(g: &Graph) -> HashMap<NodeId, (u32, CacheKind)> {
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

/// The layout linear map `n` reads its weights in, if they are re-packed (`Repack`).
fn reads_layout(g: &Graph, n: NodeId, weights: &WeightTable) -> Option<WeightLayout> {
    match g.op(g.operands(n)[1]) {
        Op::Weight { name, .. } => weights.repack_of(weights.slot(name)).map(|t| t.layout),
        _ => None,
    }
}

fn reads_tiles(g: &Graph, n: NodeId, weights: &WeightTable) -> bool {
    reads_layout(g, n, weights) == Some(WeightLayout::Tiles)
}

/// Whether linear map `n` reads its weights as `[in, out]`: stored so, and not re-packed
/// (tiles are `[out, in]`, panels neither).
fn reads_transposed(g: &Graph, n: NodeId, weights: &WeightTable) -> bool {
    matches!(g.op(n), Op::Linear { transposed: true, .. }) && reads_layout(g, n, weights).is_none()
}

/// Chunks of the input dimension for a one-row `x · W [in, out]`, and `out`: such a product
/// is split over `in` so that each task streams a contiguous band of weight rows (the
/// column blocks of the tiled kernel would each walk the whole matrix at a large stride).
fn split_k(g: &Graph, n: NodeId, weights: &WeightTable) -> Option<(usize, usize)> {
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
fn amx_linear(g: &Graph, n: NodeId, amx: bool, weights: &WeightTable) -> bool {
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
fn linear_rows(g: &Graph, n: NodeId) -> Option<usize> {
    let ty = g.ty(n);
    ty.shape[..ty.rank() - 1].iter().map(|d| d.as_fixed()).product()
}

/// Whether linear map `n` (not split over `in`) gets the packed GEMM: panels need no
/// packing, so it takes every row count; other layouts as `kernels::packs` says.
fn packed_linear(g: &Graph, n: NodeId, weights: &WeightTable) -> bool {
    let ty = g.ty(n);
    let out = ty.shape[ty.rank() - 1].as_fixed();
    reads_layout(g, n, weights) == Some(WeightLayout::Panels)
        || out.is_some_and(|out| kernels::packs(linear_rows(g, n), out, reads_transposed(g, n, weights)))
}

/// Whether linear map `n` reads its activations sliced (`Kernel::SliceRows`): the packed
/// GEMM, not on AMX, for more than one row.
fn sliced_linear(g: &Graph, n: NodeId, amx: bool, weights: &WeightTable) -> bool {
    matches!(g.op(n), Op::Linear { .. })
        && split_k(g, n, weights).is_none()
        && !amx_linear(g, n, amx, weights)
        && packed_linear(g, n, weights)
        && linear_rows(g, n) != Some(1)
}

/// The bf16 parts the AMX GEMM splits activation `x` into: one if `x` is rounded to bf16.
fn amx_parts(g: &Graph, x: NodeId) -> usize {
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
fn tile_outputs(
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
            && kernels::epilogue_vectorises(&epi)
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

/// Bytes a node's arena block holds after its value: a split-K GEMV's partial sums.
fn extra_bytes(g: &Graph, n: NodeId, weights: &WeightTable) -> u64 {
    split_k(g, n, weights).map_or(0, |(chunks, out)| (chunks * out * 4) as u64)
}

/// The arena plan of a graph whose every node is computed on its own (no fused chains).
pub fn plan_unfused(
    g: &Graph,
    order: &[NodeId],
    weights: &WeightTable,
    max_seq: usize,
) -> Result<(HashMap<NodeId, Loc>, u64), LlvmError> {
    let none = Fusion { chains: HashMap::new(), absorbed: HashMap::new(), in_cache: HashMap::new() };
    plan(g, order, &none, weights, max_seq)
}

/// Assigns arena offsets in schedule order, reusing a block once its value is dead.
fn plan(
    g: &Graph,
    order: &[NodeId],
    fusion: &Fusion,
    weights: &WeightTable,
    max_seq: usize,
) -> Result<(HashMap<NodeId, Loc>, u64), LlvmError> {
    let bind = SymBinding { t: max_seq, p: max_seq.saturating_sub(1) };
    let mut last_use: HashMap<NodeId, usize> = HashMap::new();
    for (i, &n) in order.iter().enumerate() {
        for o in g.operands(n) {
            last_use.insert(o, i);
        }
    }
    for (_, n) in &g.outputs {
        last_use.insert(*n, usize::MAX);
    }
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
            Op::Weight { name, .. } => Loc::Weight(weights.index[name]),
            Op::Input(InputKind::Tokens) => Loc::Tokens,
            Op::Input(InputKind::TokenTypes) => Loc::Types,
            Op::Input(InputKind::Cache { layer, kind }) => Loc::Cache(*layer, *kind),
            Op::Concat { .. } => match g.op(g.operands(n)[0]) {
                Op::Input(InputKind::Cache { layer, kind }) => Loc::Cache(*layer, *kind),
                _ => return Err(LlvmError::Unsupported("concatenation other than the KV cache".into())),
            },
            Op::Softmax | Op::Mask(_) | Op::Alibi | Op::HeadMatMul { .. } => {
                return Err(LlvmError::Unsupported("unfused attention (run the fusion pass)".into()))
            }
            _ => {
                // A fused linear map writes its chain's last value: same shape, one block.
                // A split-K GEMV keeps its partial sums after its output row.
                let extra = extra_bytes(g, n, weights);
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
                    let extra = extra_bytes(g, owner, weights);
                    let bytes =
                        (g.ty(o).eval(bind).iter().product::<usize>() as u64 * 4 + extra).div_ceil(64) * 64;
                    free.push((*off, bytes));
                }
            }
        }
    }
    Ok((loc, top))
}

/// What the packed GEMMs' region holds of a value.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Packing {
    Amx { transposed: bool },
    Slices,
}

/// Kernel calls per basic block of a graph function (see `emit_graph`).
const CALLS_PER_BLOCK: usize = 32;

#[allow(clippy::too_many_arguments)]
fn emit_graph<'ctx>(
    cx: &'ctx Context,
    m: &Module<'ctx>,
    name: &str,
    g: Option<&Graph>,
    weights: &WeightTable,
    layout: &Layout,
    max_seq: usize,
    amx: bool,
    kernels: &mut HashMap<String, FunctionValue<'ctx>>,
) -> Result<u64, LlvmError> {
    let ptr = cx.ptr_type(inkwell::AddressSpace::default());
    let i64t = cx.i64_type();
    let fty = cx.void_type().fn_type(
        &[
            ptr.into(),
            ptr.into(),
            ptr.into(),
            ptr.into(),
            i64t.into(),
            i64t.into(),
            ptr.into(),
            ptr.into(),
            ptr.into(),
        ],
        false,
    );
    let f = m.add_function(&format!("tfc__{name}"), fty, Some(Linkage::External));
    // Internal to the library: only the C half's `tfc_*` entry points are exported.
    f.as_global_value().set_visibility(GlobalVisibility::Hidden);
    // A graph function is one straight block of kernel calls and argument stores, run
    // once per step: nothing in it is worth optimising, and the SLP vectoriser's
    // scheduling is quadratic in a block's length (over half of GPT-2 small's compile
    // time went there), so it is not optimised at all.
    for attr in ["optnone", "noinline"] {
        let kind = inkwell::attributes::Attribute::get_named_enum_kind_id(attr);
        f.add_attribute(inkwell::attributes::AttributeLoc::Function, cx.create_enum_attribute(kind, 0));
    }
    let kb = Kb::new(cx, m, f);
    let Some(g) = g else {
        // An encoder has no decode graph; the C half never calls this.
        kb.ret();
        return Ok(0);
    };
    // Every use of a parameter reloads it from a stack slot, so that no value lives
    // across the whole function: the register coalescer scans every instruction of a
    // register for each copy of it, and a parameter used by every call made the compile
    // time quadratic in the layers (512 layers took a minute). Nothing is optimised here
    // (`optnone`), so the loads stay.
    let slots: Vec<_> = f
        .get_param_iter()
        .map(|v| {
            let slot = kb.b.build_alloca(v.get_type(), "").unwrap();
            kb.b.build_store(slot, v).unwrap();
            (slot, v.get_type())
        })
        .collect();
    let reload = |i: usize| kb.b.build_load(slots[i].1, slots[i].0, "").unwrap();
    let arena = || reload(0).into_pointer_value();
    let cache = || reload(1).into_pointer_value();
    let (tokens, types) = (|| reload(2).into_pointer_value(), || reload(3).into_pointer_value());
    let (t, p) = (|| reload(4).into_int_value(), || reload(5).into_int_value());
    let (wts, out, pool) = (
        || reload(6).into_pointer_value(),
        || reload(7).into_pointer_value(),
        || reload(8).into_pointer_value(),
    );
    let order = g.topo_order().map_err(|_| LlvmError::Llvm("bug: cyclic graph".into()))?;
    let fused = fusion(g, &order);
    let (loc, arena_bytes) = plan(g, &order, &fused, weights, max_seq)?;
    // The packed GEMMs' region after the planned values: the packed (AMX) or sliced
    // activations, which linear maps of the same input share (only packing writes
    // there), and then an AMX map's accumulators.
    let bind = SymBinding { t: max_seq, p: max_seq.saturating_sub(1) };
    let amx_at = arena_bytes.div_ceil(64) * 64;
    let amx_bytes = order
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
    // Values written packed by the map computing them go to a second region, after which
    // the maps reading them keep their accumulators.
    let to_tiles = tile_outputs(g, &order, &fused, amx, weights);
    let tiled_at = amx_at + amx_bytes.div_ceil(64) * 64;
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
    // The value whose packing (AMX parts of `[in, out]` or `[out, in]` maps, or slices)
    // the region holds.
    let mut packed_input: Option<(NodeId, Packing)> = None;
    let args = kb.b.build_array_alloca(i64t, kb.c(16), "args").unwrap();
    let pf_ty = cx.void_type().fn_type(&[ptr.into(), ptr.into(), ptr.into(), i64t.into()], false);
    let pfor = m
        .get_function("tfc__parallel_for")
        .unwrap_or_else(|| m.add_function("tfc__parallel_for", pf_ty, None));

    let dim = |d: Dim| -> IntValue<'ctx> {
        let mut v = kb.c(d.c as i64);
        if d.t > 0 {
            v = kb.add(v, kb.mul(t(), kb.c(d.t as i64)));
        }
        if d.p > 0 {
            v = kb.add(v, kb.mul(p(), kb.c(d.p as i64)));
        }
        v
    };
    let cache_ptr = |layer: u32, kind: CacheKind| -> PointerValue<'ctx> {
        let (off, _, _) = layout.cache[&(layer, kind)];
        kb.gep(kb.f32t(), cache(), kb.c(off as i64))
    };
    let at = |n: NodeId| -> PointerValue<'ctx> {
        match loc[&n] {
            Loc::Arena(off) => kb.gep(cx.i8_type(), arena(), kb.c(off as i64)),
            Loc::Weight(i) => {
                let slot = kb.gep(ptr, wts(), kb.c(i as i64));
                kb.b.build_load(ptr, slot, "").unwrap().into_pointer_value()
            }
            Loc::Tokens => tokens(),
            Loc::Types => types(),
            Loc::Cache(l, k) => cache_ptr(l, k),
        }
    };
    // Calls go in blocks of at most `CALLS_PER_BLOCK`: the register allocator and
    // coalescer scan a whole block per live range or copy, so one block of every call
    // made the compile time quadratic in the layers (512 layers took a minute).
    let mut calls = 0usize;
    let mut call = |kernel: Kernel, vals: Vec<IntValue<'ctx>>, tasks: IntValue<'ctx>| {
        if calls > 0 && calls % CALLS_PER_BLOCK == 0 {
            let next = cx.append_basic_block(f, "calls");
            kb.b.build_unconditional_branch(next).unwrap();
            kb.b.position_at_end(next);
        }
        calls += 1;
        let sym = kernel.symbol();
        let kf = *kernels.entry(sym).or_insert_with(|| kernels::emit(cx, m, &kernel));
        for (i, v) in vals.iter().enumerate() {
            kb.st64(args, i as i64, *v);
        }
        let kp = kf.as_global_value().as_pointer_value();
        kb.b.build_call(pfor, &[pool().into(), kp.into(), args.into(), tasks.into()], "").unwrap();
    };
    let rows_of = |n: NodeId| -> IntValue<'ctx> {
        let ty = g.ty(n);
        ty.shape[..ty.rank() - 1].iter().fold(kb.c(1), |acc, &d| kb.mul(acc, dim(d)))
    };
    let fixed = |d: Dim| d.as_fixed().unwrap_or(0);
    let cache_outputs = g.cache_outputs();
    // Rows per head of a value `[heads, rows, d]`: `max_seq` where it lives in the cache.
    let head_rows = |n: NodeId, rows: IntValue<'ctx>| match loc[&n] {
        Loc::Cache(..) => kb.c(max_seq as i64),
        _ => rows,
    };

    for &n in &order {
        let ops = g.operands(n);
        let ty = g.ty(n).clone();
        let o = |i: usize| kb.int_of(at(ops[i]));
        let me = || kb.int_of(at(n));
        let width = fixed(*ty.shape.last().unwrap());
        match g.op(n) {
            _ if fused.absorbed.contains_key(&n) => {}
            Op::Weight { .. } | Op::Input(_) | Op::Concat { .. } => {}
            Op::Positions => call(Kernel::Positions, vec![me(), t(), p()], kb.c(1)),
            Op::Gather { offset } => {
                let wf = WFmt::of(g.ty(ops[0]));
                call(Kernel::Gather { d: width, offset: *offset, wf }, vec![o(0), o(1), me()], rows_of(n))
            }
            Op::Sinusoidal { dim: d, base } => {
                call(Kernel::Sinusoidal { dim: *d, base: *base }, vec![o(0), me()], rows_of(n))
            }
            Op::Add | Op::Mul => {
                let k = Kernel::Binary { mul: *g.op(n) == Op::Mul, width };
                call(k, vec![o(0), o(1), me()], rows_of(n))
            }
            Op::Scale(s) => {
                call(Kernel::Unary { op: UnaryOp::Scale(*s), width }, vec![o(0), me()], rows_of(n))
            }
            Op::Activation(a) => {
                call(Kernel::Unary { op: UnaryOp::Act(*a), width }, vec![o(0), me()], rows_of(n))
            }
            Op::RoundBf16 => {
                call(Kernel::Unary { op: UnaryOp::RoundBf16, width }, vec![o(0), me()], rows_of(n))
            }
            Op::LayerNorm { eps } => {
                let bias = ops.len() == 3;
                let mut v = vec![o(0), o(1)];
                if bias {
                    v.push(o(2));
                }
                v.push(me());
                let round = fused.chains.contains_key(&n);
                call(Kernel::LayerNorm { d: width, eps: *eps, bias, round }, v, rows_of(n))
            }
            Op::RmsNorm { eps, unit_offset } => {
                let round = fused.chains.contains_key(&n);
                let k = Kernel::RmsNorm { d: width, eps: *eps, unit_offset: *unit_offset, round };
                call(k, vec![o(0), o(1), me()], rows_of(n))
            }
            Op::Linear { bias, .. } => {
                let inn = fixed(*g.ty(ops[0]).shape.last().unwrap());
                let wf = WFmt::of(g.ty(ops[1]));
                let mut v = vec![o(0), o(1)];
                if *bias {
                    v.push(o(2));
                }
                v.push(me());
                v.push(rows_of(n));
                let mut epi = Vec::new();
                if let Some((chain, _)) = fused.chains.get(&n) {
                    for (e, other) in chain {
                        epi.push(*e);
                        if let Some(other) = other {
                            v.push(kb.int_of(at(*other)));
                        }
                    }
                }
                if let Some((chunks, _)) = split_k(g, n, weights) {
                    // Partials live right after the output row in the node's block.
                    let part = kb.int_of(kb.gep(kb.f32t(), at(n), kb.c(width as i64)));
                    let k = Kernel::GemvPartial { inn, out: width, chunks, wf };
                    call(k, vec![o(0), o(1), part], kb.c(chunks as i64));
                    let mut r = vec![part];
                    if *bias {
                        r.push(o(2));
                    }
                    r.push(me());
                    r.extend(v.into_iter().skip(if *bias { 5 } else { 4 }));
                    let k =
                        Kernel::GemvReduce { out: width, chunks, bias: *bias, epi, pairs: wf == WFmt::Bf16 };
                    call(k, r, kb.c((width / BLOCK) as i64));
                } else {
                    let (transposed, tiles) = (reads_transposed(g, n, weights), reads_tiles(g, n, weights));
                    let panels = reads_layout(g, n, weights) == Some(WeightLayout::Panels);
                    let bias = *bias;
                    let packed = packed_linear(g, n, weights);
                    let sliced = sliced_linear(g, n, amx, weights);
                    let region = |off: u64| kb.int_of(kb.gep(cx.i8_type(), arena(), kb.c(off as i64)));
                    let amx = amx_linear(g, n, amx, weights).then(|| amx::Amx {
                        parts: amx_parts(g, ops[0]),
                        to_tiles: fused.chains.get(&n).is_some_and(|(_, e)| to_tiles.contains(e)),
                    });
                    if let Some(a) = amx {
                        if to_tiles.contains(&ops[0]) {
                            v.push(region(tiled_at));
                        } else {
                            let xp = region(amx_at);
                            if packed_input != Some((ops[0], Packing::Amx { transposed })) {
                                let tiles = kb.udiv(amx::padded(&kb, rows_of(n)), kb.c(16));
                                let k = Kernel::AmxPack { inn, transposed, parts: a.parts };
                                call(k, vec![o(0), xp, rows_of(n)], tiles);
                                packed_input = Some((ops[0], Packing::Amx { transposed }));
                            }
                            v.push(xp);
                        }
                        if a.to_tiles {
                            v.push(region(tiled_at));
                        }
                    }
                    if sliced {
                        let xs = region(amx_at);
                        if packed_input != Some((ops[0], Packing::Slices)) {
                            call(Kernel::SliceRows { inn }, vec![o(0), xs, rows_of(n)], rows_of(n));
                            packed_input = Some((ops[0], Packing::Slices));
                        }
                        v.push(xs);
                    }
                    let tasks = amx.map_or(width.div_ceil(BLOCK), |a| amx::tasks(inn, width, a.parts));
                    let k = Kernel::Linear {
                        inn,
                        out: width,
                        transposed,
                        bias,
                        epi,
                        wf,
                        tiles,
                        panels,
                        packed,
                        sliced,
                        amx,
                    };
                    call(k, v, kb.c(tasks as i64));
                }
            }
            Op::SplitQkv { layout: l, part, heads, kv_heads, head_dim } => {
                let k = Kernel::SplitQkv {
                    layout: *l,
                    part: *part,
                    heads: *heads,
                    kv_heads: *kv_heads,
                    head_dim: *head_dim,
                };
                call(k, vec![o(0), me()], rows_of(n))
            }
            Op::SplitHeads { heads } => {
                let rows = rows_of(ops[0]);
                let k = Kernel::SplitHeads { heads: *heads, head_dim: width };
                call(k, vec![o(0), me(), head_rows(n, rows)], rows)
            }
            Op::MergeHeads => {
                let src = g.ty(ops[0]);
                let (h, hd) = (fixed(src.shape[0]), fixed(src.shape[2]));
                let rows = rows_of(n);
                let round = fused.chains.contains_key(&n);
                call(Kernel::MergeHeads { heads: h, head_dim: hd, round }, vec![o(0), me(), rows], rows)
            }
            Op::Rope(r) => {
                let h = fixed(ty.shape[0]);
                let k = Kernel::Rope {
                    head_dim: width,
                    rotary_dim: r.rotary_dim,
                    theta: r.theta,
                    interleaved: r.interleaved,
                    heads: h,
                };
                let rows = dim(ty.shape[1]);
                call(k, vec![o(0), o(1), me(), rows, head_rows(n, rows)], rows)
            }
            Op::Attention { scale, mask, alibi } => {
                let (h, hd) = (fixed(ty.shape[0]), width);
                let kty = g.ty(ops[1]);
                let groups = fixed(kty.shape[0]);
                let s_len = dim(kty.shape[1]);
                // Keys in the cache have max_seq rows per head; others are dense.
                let stride = |i: usize| match loc[&ops[i]] {
                    Loc::Cache(..) => kb.c((max_seq * hd) as i64),
                    _ => kb.mul(s_len, kb.c(hd as i64)),
                };
                let rows = dim(ty.shape[1]);
                // Query rows known only at run time are prefill's many: blocks of them.
                let block = ty.shape[1].as_fixed().is_none().then(|| kernels::attention_rows(hd)).flatten();
                let k = Kernel::Attention {
                    heads: h,
                    groups,
                    head_dim: hd,
                    scale: *scale,
                    mask: *mask,
                    alibi: *alibi,
                    block,
                };
                let tasks = match block {
                    Some(b) => kb.udiv(kb.add(rows, kb.c(b as i64 - 1)), kb.c(b as i64)),
                    None => rows,
                };
                let v = vec![o(0), o(1), o(2), o(3), me(), rows, s_len, stride(1), stride(2)];
                call(k, v, kb.mul(kb.c(h as i64), tasks))
            }
            Op::LastRow => {
                // `[T]` (positions, i32) or `[T, d]`.
                let src = g.ty(ops[0]);
                let (rows, width) =
                    if src.rank() == 1 { (dim(src.shape[0]), 1) } else { (rows_of(ops[0]), width) };
                let int = src.dtype == DType::I32;
                call(Kernel::LastRow { width, int }, vec![o(0), me(), rows], kb.c(1))
            }
            op => {
                return Err(LlvmError::Unsupported(format!(
                    "`{}` in a {} graph",
                    op.mnemonic(),
                    g.phase.name()
                )))
            }
        }
        if let Some(targets) = cache_outputs.get(&n).filter(|_| !fused.in_cache.contains_key(&n)) {
            for &(layer, kind) in targets {
                let groups = fixed(ty.shape[0]);
                let k = Kernel::CacheStore { head_dim: width, max_seq };
                let dst = kb.int_of(cache_ptr(layer, kind));
                call(k, vec![me(), dst, dim(ty.shape[1]), p()], kb.c(groups as i64));
            }
        }
    }
    // The main output (the first one) goes to the caller's buffer.
    let (_, main) = g.outputs[0];
    let bytes = kb.mul(rows_of(main), kb.c((fixed(*g.ty(main).shape.last().unwrap()) * 4) as i64));
    kb.b.build_memcpy(out(), 4, at(main), 4, bytes).map_err(|e| LlvmError::Llvm(e.to_string()))?;
    kb.ret();
    Ok(if tiled_bytes > 0 { tiled_at + tiled_bytes } else { amx_at + amx_bytes })
}

/// `tfc__cpu_features`: the CPU features the main code needs, which the C half checks
/// before it chooses between the main and the fallback graph functions.
pub fn cpu_features_global<'ctx>(cx: &'ctx Context, m: &Module<'ctx>, features: &str) {
    let s = cx.const_string(features.as_bytes(), true);
    let g = m.add_global(s.get_type(), None, "tfc__cpu_features");
    g.set_initializer(&s);
    g.set_constant(true);
    g.set_visibility(GlobalVisibility::Hidden);
}

include!(concat!(env!("OUT_DIR"), "/x86_cpus.rs"));

/// Refuses a CPU name LLVM does not know: it would ignore it with a warning and then
/// abort the process when generating 64-bit code for the featureless CPU.
fn check_cpu(cpu: &str) -> Result<(), LlvmError> {
    if X86_CPUS.is_empty() || X86_CPUS.contains(&cpu) {
        return Ok(());
    }
    let near = X86_CPUS.iter().min_by_key(|c| strsim::levenshtein(c, cpu)).copied().unwrap_or("x86-64");
    Err(LlvmError::Cpu(format!(
        "target CPU `{cpu}` is not one LLVM knows (did you mean `{near}`?); `native`, `x86-64`, `x86-64-v3`, \
         `x86-64-v4` or a name from `llc -march=x86-64 -mcpu=help`"
    )))
}

/// The host's target machine (or `cpu`'s), position-independent for a shared library.
pub fn target_machine(cpu: Option<&str>) -> Result<TargetMachine, LlvmError> {
    if let Some(c) = cpu.filter(|&c| c != "native") {
        check_cpu(c)?;
    }
    Target::initialize_native(&InitializationConfig::default()).map_err(LlvmError::Llvm)?;
    let triple = TargetMachine::get_default_triple();
    let target = Target::from_triple(&triple).map_err(|e| LlvmError::Llvm(e.to_string()))?;
    let (cpu, features) = match cpu {
        None | Some("native") => (
            TargetMachine::get_host_cpu_name().to_string(),
            TargetMachine::get_host_cpu_features().to_string(),
        ),
        Some(c) => (c.to_string(), String::new()),
    };
    target
        .create_target_machine(
            &triple,
            &cpu,
            &features,
            OptimizationLevel::Aggressive,
            RelocMode::PIC,
            CodeModel::Default,
        )
        .ok_or_else(|| LlvmError::Llvm(format!("cannot create a target machine for cpu `{cpu}`")))
}

/// An LLVM pass pipeline: `default<On>` text, and whether LLVM's loop unrollers run.
#[derive(Clone, Copy, Debug)]
pub struct Pipeline {
    pub passes: &'static str,
    pub unroll: bool,
}

/// Runs `pipeline` over `m` and returns the object code.
pub fn optimize_and_emit(m: &Module, tm: &TargetMachine, pipeline: Pipeline) -> Result<Vec<u8>, LlvmError> {
    optimize(m, tm, pipeline)?;
    let buf = tm.write_to_memory_buffer(m, FileType::Object).map_err(|e| LlvmError::Llvm(e.to_string()))?;
    Ok(buf.as_slice().to_vec())
}

pub fn optimize(m: &Module, tm: &TargetMachine, pipeline: Pipeline) -> Result<(), LlvmError> {
    m.set_triple(&tm.get_triple());
    m.set_data_layout(&tm.get_target_data().get_data_layout());
    let options = PassBuilderOptions::create();
    options.set_loop_unrolling(pipeline.unroll);
    m.run_passes(pipeline.passes, tm, options).map_err(|e| LlvmError::Llvm(e.to_string()))
}
