//! Prefill and decode graphs → `gpu.func` kernels and a dispatch list (`gpu` stage).
//!
//! Every graph node becomes one dispatch of a kernel specialised for its sizes (identical
//! instances share a kernel). Kernels use 64 threads; rows of work map to workgroups,
//! features to threads. Norms reduce through workgroup memory, linear maps stage 4 input
//! rows × 64 features of `x` in workgroup memory per step, and attention runs an online
//! softmax over 64-key chunks whose scores and probabilities live in workgroup memory.
//! Buffers are flat `memref<?xf32>` (or `i32`); `T` and `P` come from the `dims` buffer.
//! The same text serves NVVM (PTX) and SPIR-V; only memory spaces and the
//! workgroup-size attribute differ. Transcendentals are written out in `arith` (exp,
//! rsqrt by Newton steps, erf by Abramowitz–Stegun 7.1.26), so neither target needs a
//! device math library; angles come from host-computed tables (`Table`).

mod builder;
mod kernels;
mod mixture;

use std::collections::HashMap;

use tfc_runtime::gpu::program::{Arg, ArgKind, Dispatch, Graph as GpuGraph, KernelInfo, Lin, Program, Table};

use super::text::Text;
use super::MlirError;
use crate::backend::layout::Layout;
use crate::backend::plan::{plan_unfused, Loc};
use crate::backend::weights::WeightTable;
use crate::ir::{Act, CacheKind, Dim, Graph, NodeId, Op, QkvLayout, QkvPart};
use crate::Compiled;
use kernels::kernel_text;

pub const BLOCK: usize = 64;

/// Rows of `x` a linear-map workgroup computes at once.
const LIN_ROWS: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Vulkan,
    Cuda,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Vulkan => "vulkan",
            Target::Cuda => "cuda",
        }
    }
    fn global(self) -> &'static str {
        match self {
            Target::Vulkan => ", #spirv.storage_class<StorageBuffer>",
            Target::Cuda => "",
        }
    }
}

/// The kernels' MLIR and the program that dispatches them.
pub struct GpuModule {
    pub mlir: String,
    pub program: Program,
}

/// The GPU backend's entry: the kernels of a compiled spec and the program that
/// dispatches them.
pub fn emit(
    c: &Compiled,
    weights: &WeightTable,
    layout: &Layout,
    target: Target,
) -> Result<GpuModule, MlirError> {
    let mut e = Emitter { target, kernels: Vec::new(), by_key: HashMap::new(), tables: Vec::new() };
    let mut arena = 0;
    let mut graph = |gr: &Graph| -> Result<GpuGraph, MlirError> {
        let (gg, bytes) = e.graph(gr, weights, layout)?;
        arena = arena.max(bytes);
        Ok(gg)
    };
    let prefill = graph(&c.prefill)?;
    let prefill_all = graph(&c.prefill_all)?;
    let decode = c.decode.as_ref().map(&mut graph).transpose()?;
    let name = &c.spec.name;
    let mut t = Text::default();
    t.open("module attributes {gpu.container_module} {");
    t.open("gpu.module @kernels {");
    for (_, _, body) in &e.kernels {
        for l in body.lines() {
            t.line(l);
        }
    }
    t.close("}");
    t.close("}");
    let program = Program {
        name: name.to_string(),
        target: target.name().into(),
        binary: format!("{name}.{}", if target == Target::Vulkan { "spv" } else { "ptx" }),
        kernels: e
            .kernels
            .iter()
            .map(|(n, args, _)| KernelInfo { name: n.clone(), block: BLOCK as u32, args: args.clone() })
            .collect(),
        vocab: layout.vocab,
        max_seq: layout.max_seq,
        output_width: layout.out_width,
        type_rows: layout.type_rows,
        arena_bytes: arena,
        cache_bytes: layout.cache_bytes,
        weights: Vec::new(),
        tables: e.tables,
        prefill,
        prefill_all,
        decode,
        spec_hash: String::new(),
    };
    Ok(GpuModule { mlir: t.out, program })
}

fn lin(d: Dim) -> Lin {
    Lin { c: d.c as u64, t: d.t as u64, p: d.p as u64 }
}

fn mul(d: Dim, k: usize) -> Dim {
    Dim { c: d.c * k, t: d.t * k, p: d.p * k }
}

/// The rows of node `n`'s value (every dimension but the last, multiplied) as a `Dim`,
/// or 0 where two of them are symbolic (no graph has such a value).
fn rows_dim(g: &Graph, n: NodeId) -> Dim {
    let t = g.ty(n);
    let mut r = Dim::fixed(1);
    for d in &t.shape[..t.rank() - 1] {
        r = match (r.as_fixed(), d.as_fixed()) {
            (Some(a), _) => mul(*d, a),
            (None, Some(b)) => mul(r, b),
            (None, None) => return Dim::fixed(0),
        };
    }
    r
}

struct Emitter {
    target: Target,
    /// (name, argument kinds, text).
    kernels: Vec<(String, Vec<ArgKind>, String)>,
    by_key: HashMap<String, usize>,
    tables: Vec<Table>,
}

/// What one kernel computes; the key of its cache is its `Debug` form.
#[derive(Debug)]
enum Kern {
    Positions,
    /// `out[r] = table[ids[r] + offset]` (embeddings, and host tables by position).
    Gather {
        d: usize,
        offset: usize,
    },
    Binary {
        mul: bool,
        w: usize,
    },
    Unary {
        op: Unary,
        w: usize,
    },
    /// Arguments: x, the gain when `gain`, the bias when `bias`, out. `sets` sets of
    /// parameters: 1, or one per head of the `rows` rows.
    Norm {
        d: usize,
        eps: f64,
        layer: bool,
        gain: bool,
        bias: bool,
        unit: bool,
        sets: usize,
        rows: Dim,
    },
    Linear {
        inn: usize,
        out: usize,
        transposed: bool,
        bias: bool,
        rows: Dim,
    },
    SplitQkv {
        layout: QkvLayout,
        part: QkvPart,
        h: usize,
        kv: usize,
        hd: usize,
    },
    SplitHeads {
        h: usize,
        hd: usize,
        rows: Dim,
    },
    MergeHeads {
        h: usize,
        hd: usize,
        rows: Dim,
    },
    Rope {
        hd: usize,
        rd: usize,
        interleaved: bool,
        rows: Dim,
        max_seq: usize,
    },
    Attention(Attn),
    /// The last row of `[rows, w]` f32, or of i32 when `int` (the positions).
    LastRow {
        w: usize,
        rows: Dim,
        int: bool,
    },
    CacheStore {
        hd: usize,
        max_seq: usize,
        rows: Dim,
    },
    /// Features `start..start + w` of rows of `w_in`.
    Slice {
        w_in: usize,
        w: usize,
        start: usize,
    },
    /// Rows of `wa` then `wb` features.
    Concat {
        wa: usize,
        wb: usize,
    },
    RowScale {
        w: usize,
    },
    /// `Op::HeadLinear` of rows `h·T + t`: the head's matrix rows `h·p + at ..` of a
    /// weight of `cols` columns; `rows` is `T`.
    HeadLinear {
        inn: usize,
        out: usize,
        cols: usize,
        p: usize,
        at: usize,
        transposed: bool,
        rows: Dim,
    },
    Route(crate::ir::Route),
    /// One stage of a mixture's experts (`ExpertStage`); arguments: the node's `n`
    /// operands, the hidden features and the down projections of `slots` per row (the
    /// router's `top_k`), the output. Each expert's up (or gate_up) projection has
    /// `up_rows` outputs, its gate `gate_rows`.
    Experts {
        ex: crate::ir::Experts,
        d: usize,
        n: usize,
        up_rows: usize,
        gate_rows: usize,
        slots: usize,
        stage: ExpertStage,
        /// The rows of `x` (`T`, or 1 where the last row was narrowed).
        rows: Dim,
    },
}

/// The three dispatches of a mixture's experts. A row's chosen experts fill its slots in
/// ascending order; the first two stages run a workgroup per expert (and chunk of
/// features) over every row that chose it, so each expert's matrices are read once for
/// all of them, and an expert no row chose reads nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ExpertStage {
    /// The MLP's hidden features of each (row, slot).
    Hidden,
    /// The down projection of each (row, slot).
    Down,
    /// Per row, the weighted sum of its slots.
    Sum,
}

/// Where a GPU experts node keeps its slots, after its output `[T, d]` in its arena
/// block: the hidden features `[T·slots, f]`, then the down projections
/// `[T·slots, d]` (byte offsets from the block, and the bytes in all).
struct ExpertsScratch {
    hidden: u64,
    down: u64,
    bytes: u64,
}

fn experts_scratch(g: &Graph, n: NodeId, max_seq: usize) -> Option<ExpertsScratch> {
    let Op::Experts(ex) = g.op(n) else { return None };
    let ops = g.operands(n);
    let slots = expert_slots(g, ops[1], ex);
    let bind = crate::ir::SymBinding { t: max_seq, p: max_seq.saturating_sub(1) };
    let shape = g.ty(n).eval(bind);
    let (rows, d) = (shape[0] as u64, shape[1] as u64);
    let hidden = rows * d * 4;
    let down = hidden + rows * slots as u64 * ex.hidden as u64 * 4;
    Some(ExpertsScratch { hidden, down, bytes: down + rows * slots as u64 * d * 4 - hidden })
}

/// A row's slots: its router's `top_k` (every expert if the weights come from elsewhere).
fn expert_slots(g: &Graph, route: NodeId, ex: &crate::ir::Experts) -> usize {
    match g.op(route) {
        Op::Route(r) => r.top_k.min(ex.experts),
        _ => ex.experts,
    }
}

/// A fused attention kernel's sizes and options.
#[derive(Debug, Clone, Copy)]
struct Attn {
    h: usize,
    g: usize,
    hd: usize,
    scale: f64,
    /// Scores soft-capped to `cap · tanh(s / cap)`.
    softcap: Option<f64>,
    causal: bool,
    window: Option<usize>,
    /// ALiBi with the slopes times this.
    alibi: Option<f64>,
    /// A fifth argument: one sink logit per head.
    sinks: bool,
    /// Query rows, keys, and the key/value head stride when they are in the cache.
    rows: Dim,
    s: Dim,
    stride: Option<usize>,
}

#[derive(Debug, Clone, Copy)]
enum Unary {
    Scale(f64),
    Act(Act),
    RoundBf16,
}

impl Emitter {
    fn graph(
        &mut self,
        g: &Graph,
        weights: &WeightTable,
        layout: &Layout,
    ) -> Result<(GpuGraph, u64), MlirError> {
        let order = g.topo_order().map_err(|_| MlirError::Mlir("bug: cyclic graph".into()))?;
        let scratch = |n: NodeId| experts_scratch(g, n, layout.max_seq).map_or(0, |s| s.bytes);
        let (loc, bytes) = plan_unfused(g, &order, weights, layout.max_seq, &scratch)
            .map_err(|e| MlirError::Unsupported(e.to_string()))?;
        let cache_off = |l: u32, k: CacheKind| layout.cache[&(l, k)].0 * 4;
        let arg = |n: NodeId| -> Arg {
            match loc[&n] {
                Loc::Arena(o) => Arg::Arena(o),
                Loc::Weight(i) => Arg::Weight(i),
                Loc::Tokens => Arg::Tokens,
                Loc::Types => Arg::Types,
                Loc::Cache(l, k) => Arg::Cache(cache_off(l, k)),
            }
        };
        let cache_out = g.cache_outputs();
        let mut ds = Vec::new();
        let one = Dim::fixed(1);
        for &n in &order {
            let ty = g.ty(n).clone();
            let width = ty.shape.last().and_then(|d| d.as_fixed()).unwrap_or(0);
            let Some((kern, grid, mut args, per_group)) = self.node(g, n, layout, &loc, &arg)? else {
                continue;
            };
            args.push(arg(n));
            // A mixture's experts: the hidden features and the down projections of each
            // expert's rows (a workgroup per expert and chunk of features) before the sum.
            if let Kern::Experts { ex, d, n: inputs, up_rows, gate_rows, slots, rows, .. } = kern {
                for (stage, width) in [(ExpertStage::Hidden, ex.hidden), (ExpertStage::Down, d)] {
                    let k = Kern::Experts { ex, d, n: inputs, up_rows, gate_rows, slots, stage, rows };
                    let ki = self.kernel(&k);
                    let grid = [lin(Dim::fixed(width.div_ceil(BLOCK))), lin(Dim::fixed(ex.experts))];
                    ds.push(Dispatch { kernel: ki, grid, per_group: [1, 1], args: push_dims(args.clone()) });
                }
            }
            let ki = self.kernel(&kern);
            ds.push(Dispatch {
                kernel: ki,
                grid: [lin(grid[0]), lin(grid[1])],
                per_group,
                args: push_dims(args),
            });
            for &(l, k) in cache_out.get(&n).into_iter().flatten() {
                let groups = ty.shape[0].as_fixed().unwrap_or(0);
                let kern = Kern::CacheStore { hd: width, max_seq: layout.max_seq, rows: ty.shape[1] };
                let ki = self.kernel(&kern);
                let args = push_dims(vec![arg(n), Arg::Cache(cache_off(l, k))]);
                ds.push(Dispatch {
                    kernel: ki,
                    grid: [lin(mul(ty.shape[1], groups)), lin(one)],
                    per_group: [1, 1],
                    args,
                });
            }
        }
        let (_, main) = g.main_output();
        let Loc::Arena(off) = loc[&main] else {
            return Err(MlirError::Mlir("bug: the main output is not in the arena".into()));
        };
        let t = g.ty(main);
        let rows = t.shape[..t.rank() - 1].iter().fold(Dim::fixed(1), |acc, d| match acc.as_fixed() {
            Some(a) => mul(*d, a),
            None => mul(acc, d.as_fixed().unwrap_or(1)),
        });
        Ok((GpuGraph { dispatches: ds, output_offset: off, output_rows: lin(rows) }, bytes))
    }

    /// The kernel, grid, arguments (without the output) and rows per workgroup of node
    /// `n`'s dispatch; `None` for a node that needs none (weights, inputs, the cache).
    #[allow(clippy::type_complexity)]
    fn node(
        &mut self,
        g: &Graph,
        n: NodeId,
        layout: &Layout,
        loc: &HashMap<NodeId, Loc>,
        arg: &dyn Fn(NodeId) -> Arg,
    ) -> Result<Option<(Kern, [Dim; 2], Vec<Arg>, [u64; 2])>, MlirError> {
        let ty = g.ty(n).clone();
        let ops = g.operands(n);
        let one = Dim::fixed(1);
        let fixed = |d: Dim| d.as_fixed().unwrap_or(0);
        let width = fixed(*ty.shape.last().unwrap());
        let rows_of = |id: NodeId| rows_dim(g, id);
        // How many sets of parameters a norm has: 1, or one per head (`[H, d]`).
        // The rows matter only then (and would tell identical kernels apart otherwise).
        let norm_sets = |id: NodeId| match g.operands(id).get(1).map(|&p| &g.ty(p).shape[..]) {
            Some([h, _]) => (fixed(*h), rows_dim(g, id)),
            _ => (1, Dim::fixed(1)),
        };
        let ins = |ix: &[usize]| -> Vec<Arg> { ix.iter().map(|&i| arg(ops[i])).collect() };
        let mut per_group = [1, 1];
        let (kern, grid, args): (Kern, [Dim; 2], Vec<Arg>) = match g.op(n) {
            Op::Weight { .. } | Op::Input(_) => return Ok(None),
            // The cache's own concatenation is the cache (`CacheStore` writes the new rows).
            Op::Concat { .. } if matches!(g.op(ops[0]), Op::Input(crate::ir::InputKind::Cache { .. })) => {
                return Ok(None)
            }
            Op::Concat { .. } => {
                let w = |i: usize| fixed(*g.ty(ops[i]).shape.last().unwrap());
                (Kern::Concat { wa: w(0), wb: w(1) }, [rows_of(n), one], ins(&[0, 1]))
            }
            Op::Slice { start, .. } => {
                let w_in = fixed(*g.ty(ops[0]).shape.last().unwrap());
                (Kern::Slice { w_in, w: width, start: *start }, [rows_of(n), one], ins(&[0]))
            }
            Op::RowScale => (Kern::RowScale { w: width }, [rows_of(n), one], ins(&[0, 1])),
            Op::HeadLinear { at, transposed, .. } => {
                let (x, w) = (g.ty(ops[0]), g.ty(ops[1]));
                let cols = fixed(*w.shape.last().unwrap());
                let heads = fixed(ty.shape[0]);
                let p = w.shape.iter().map(|&s| fixed(s)).product::<usize>() / cols / heads;
                let inn = fixed(x.shape[2]);
                let k = Kern::HeadLinear {
                    inn,
                    out: width,
                    cols,
                    p,
                    at: *at,
                    transposed: *transposed,
                    rows: ty.shape[1],
                };
                (k, [rows_of(n), one], ins(&[0, 1]))
            }
            Op::Route(r) => (Kern::Route(*r), [rows_of(n), one], ins(&(0..ops.len()).collect::<Vec<_>>())),
            Op::Experts(ex) => {
                let o = ex.operands();
                let rows = |i: usize| {
                    let s = &g.ty(ops[i]).shape;
                    fixed(if ex.transposed { s[2] } else { s[1] })
                };
                let k = Kern::Experts {
                    ex: *ex,
                    d: width,
                    n: ops.len(),
                    up_rows: rows(o.up),
                    gate_rows: o.gate.map_or(0, rows),
                    slots: expert_slots(g, ops[1], ex),
                    stage: ExpertStage::Sum,
                    rows: ty.shape[0],
                };
                let (Some(s), Loc::Arena(at)) = (experts_scratch(g, n, layout.max_seq), loc[&n]) else {
                    return Err(MlirError::Mlir("bug: an experts node outside the arena".into()));
                };
                let mut args = ins(&(0..ops.len()).collect::<Vec<_>>());
                args.extend([Arg::Arena(at + s.hidden), Arg::Arena(at + s.down)]);
                (k, [rows_of(n), one], args)
            }
            Op::Positions => (Kern::Positions, [ty.shape[0], one], vec![]),
            Op::Gather { offset } => {
                (Kern::Gather { d: width, offset: *offset }, [ty.shape[0], one], ins(&[0, 1]))
            }
            Op::Sinusoidal { dim, base, fairseq, offset } => {
                // A row of the host's table, by position: a gather.
                let ti = self.table(Table::Sinusoidal {
                    rows: layout.max_seq + 1,
                    dim: *dim,
                    base: *base,
                    fairseq: *fairseq,
                    offset: *offset,
                });
                (Kern::Gather { d: *dim, offset: 0 }, [ty.shape[0], one], vec![Arg::Table(ti), arg(ops[0])])
            }
            Op::Add | Op::Mul => {
                (Kern::Binary { mul: *g.op(n) == Op::Mul, w: width }, [rows_of(n), one], ins(&[0, 1]))
            }
            Op::Scale(s) => (Kern::Unary { op: Unary::Scale(*s), w: width }, [rows_of(n), one], ins(&[0])),
            Op::Activation(a) => (Kern::Unary { op: Unary::Act(*a), w: width }, [rows_of(n), one], ins(&[0])),
            Op::RoundBf16 => (Kern::Unary { op: Unary::RoundBf16, w: width }, [rows_of(n), one], ins(&[0])),
            Op::LayerNorm { eps, gain } => {
                let bias = ops.len() == 2 + *gain as usize;
                let (sets, rows) = norm_sets(n);
                let k = Kern::Norm {
                    d: width,
                    eps: *eps,
                    layer: true,
                    gain: *gain,
                    bias,
                    unit: false,
                    sets,
                    rows,
                };
                (k, [rows_of(n), one], ins(&(0..ops.len()).collect::<Vec<_>>()))
            }
            Op::RmsNorm { eps, unit_offset } => {
                let (sets, rows) = norm_sets(n);
                let k = Kern::Norm {
                    d: width,
                    eps: *eps,
                    layer: false,
                    gain: true,
                    bias: false,
                    unit: *unit_offset,
                    sets,
                    rows,
                };
                (k, [rows_of(n), one], ins(&[0, 1]))
            }
            Op::Linear { transposed, bias } => {
                let inn = fixed(*g.ty(ops[0]).shape.last().unwrap());
                let rows = rows_of(n);
                let k = Kern::Linear { inn, out: width, transposed: *transposed, bias: *bias, rows };
                per_group[1] = LIN_ROWS as u64;
                let grid = [Dim::fixed(width.div_ceil(BLOCK)), rows];
                (k, grid, ins(if *bias { &[0, 1, 2] } else { &[0, 1] }))
            }
            Op::SplitQkv { layout: l, part, heads, kv_heads, head_dim } => {
                let k = Kern::SplitQkv { layout: *l, part: *part, h: *heads, kv: *kv_heads, hd: *head_dim };
                (k, [rows_of(n), one], ins(&[0]))
            }
            Op::SplitHeads { heads } => {
                let rows = rows_of(ops[0]);
                (Kern::SplitHeads { h: *heads, hd: width, rows }, [rows, one], ins(&[0]))
            }
            Op::MergeHeads => {
                let src = g.ty(ops[0]);
                let rows = rows_of(n);
                (
                    Kern::MergeHeads { h: fixed(src.shape[0]), hd: fixed(src.shape[2]), rows },
                    [rows, one],
                    ins(&[0]),
                )
            }
            Op::Rope(r) => {
                let ti = self.table(Table::Rope {
                    rows: layout.max_seq,
                    inv_freqs: r.inv_freqs(),
                    magnitude: r.magnitude(),
                });
                let h = fixed(ty.shape[0]);
                let k = Kern::Rope {
                    hd: width,
                    rd: r.rotary_dim,
                    interleaved: r.interleaved,
                    rows: ty.shape[1],
                    max_seq: layout.max_seq,
                };
                (k, [mul(ty.shape[1], h), one], vec![arg(ops[0]), arg(ops[1]), Arg::Table(ti)])
            }
            Op::Attention { scale, mask, alibi, softcap, sinks } => {
                let h = fixed(ty.shape[0]);
                let kty = g.ty(ops[1]);
                let in_cache = matches!(loc[&ops[1]], Loc::Cache(..));
                let k = Kern::Attention(Attn {
                    h,
                    g: fixed(kty.shape[0]),
                    hd: width,
                    scale: *scale,
                    softcap: *softcap,
                    causal: mask.causal,
                    window: mask.window,
                    alibi: *alibi,
                    sinks: *sinks,
                    rows: ty.shape[1],
                    s: kty.shape[1],
                    stride: in_cache.then_some(layout.max_seq * width),
                });
                (k, [mul(ty.shape[1], h), one], ins(if *sinks { &[0, 1, 2, 3, 4] } else { &[0, 1, 2, 3] }))
            }
            Op::LastRow => {
                let src = g.ty(ops[0]);
                let (w, rows) = if src.rank() == 1 { (1, src.shape[0]) } else { (width, rows_of(ops[0])) };
                (Kern::LastRow { w, rows, int: src.dtype == crate::ir::DType::I32 }, [one, one], ins(&[0]))
            }
            op => {
                return Err(MlirError::Unsupported(format!(
                    "`{}` in a {} graph on the GPU",
                    op.mnemonic(),
                    g.phase.name()
                )))
            }
        };
        Ok(Some((kern, grid, args, per_group)))
    }

    fn table(&mut self, t: Table) -> usize {
        if let Some(i) = self.tables.iter().position(|x| *x == t) {
            return i;
        }
        self.tables.push(t);
        self.tables.len() - 1
    }

    fn kernel(&mut self, k: &Kern) -> usize {
        let key = format!("{k:?}");
        if let Some(&i) = self.by_key.get(&key) {
            return i;
        }
        let name = format!("k{}_{}", self.kernels.len(), kern_name(k));
        let (args, text) = kernel_text(self.target, &name, k);
        self.kernels.push((name, args, text));
        self.by_key.insert(key, self.kernels.len() - 1);
        self.kernels.len() - 1
    }
}

fn push_dims(mut a: Vec<Arg>) -> Vec<Arg> {
    a.push(Arg::Dims);
    a
}

fn kern_name(k: &Kern) -> &'static str {
    match k {
        Kern::Positions => "positions",
        Kern::Gather { .. } => "gather",
        Kern::Binary { mul: true, .. } => "mul",
        Kern::Binary { .. } => "add",
        Kern::Unary { op: Unary::Scale(_), .. } => "scale",
        Kern::Unary { op: Unary::RoundBf16, .. } => "round_bf16",
        Kern::Unary { .. } => "act",
        Kern::Norm { layer: true, .. } => "layernorm",
        Kern::Norm { .. } => "rmsnorm",
        Kern::Linear { .. } => "linear",
        Kern::SplitQkv { .. } => "split_qkv",
        Kern::SplitHeads { .. } => "split_heads",
        Kern::MergeHeads { .. } => "merge_heads",
        Kern::Rope { .. } => "rope",
        Kern::Attention(_) => "attention",
        Kern::LastRow { .. } => "last_row",
        Kern::CacheStore { .. } => "cache_store",
        Kern::Slice { .. } => "slice",
        Kern::Concat { .. } => "concat",
        Kern::RowScale { .. } => "row_scale",
        Kern::HeadLinear { .. } => "head_linear",
        Kern::Route(_) => "route",
        Kern::Experts { .. } => "experts",
    }
}
