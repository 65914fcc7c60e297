//! A graph function: `tfc__<graph>(arena, cache, tokens, types, T, P, weights, out, pool)`
//! runs the graph's nodes in schedule order, each as one or more calls of
//! `tfc__parallel_for(pool, kernel, args, tasks)` with the kernel's argument block
//! (`Kernel::slots`) filled from where the plan put each value (`GraphPlan`).
//!
//! **Graph functions are not optimised** (`optnone`): each is a long run of argument
//! stores and `tfc__parallel_for` calls, run once per step, and the SLP vectoriser's
//! scheduling of such a block took over half of the compile time. They are written to be
//! linear for codegen too: every use of a parameter reloads it from a stack slot, and the
//! calls go 32 to a basic block, since the register coalescer scans all of a register's
//! instructions for each copy of it and one block in which every call read the parameters
//! made compile time quadratic in the layers (512 tiny layers: 62 s; now 7 s, 1024: 16 s).

use std::collections::HashMap;

use inkwell::context::Context;
use inkwell::module::{Linkage, Module};
use inkwell::types::BasicTypeEnum;
use inkwell::values::{FunctionValue, IntValue, PointerValue};
use inkwell::GlobalVisibility;

use super::kb::{Kb, WFmt};
use super::kernels::{self, Kernel, LinearAlgo, Slot, UnaryOp, WeightRead, ARG_SLOTS};
use super::select::{
    expert_algo, experts_scratch, glu_path, linear_rows, weight_read, GraphPlan, LinearPlan, Packing,
};
use super::{amx, LlvmError};
use crate::backend::layout::Layout;
use crate::backend::plan::Epi;
use crate::backend::plan::Loc;
use crate::backend::weights::{WeightTable, BLOCK};
use crate::ir::{CacheKind, DType, Dim, Experts, Graph, NodeId, Op};

/// Kernel calls per basic block of a graph function: the register allocator and
/// coalescer scan a whole block per live range or copy, so one block of every call made
/// the compile time quadratic in the layers (512 layers took a minute).
const CALLS_PER_BLOCK: usize = 32;

/// The kernels a graph function calls, in order, each with the node it computes.
pub(super) type CallLog = Vec<(NodeId, String)>;

/// Emits graph `name` (`None`: an encoder's missing decode, an empty function the C half
/// never calls) into `m`; returns the arena bytes it needs and the kernels it calls.
///
/// With `batch`, the graph is the extend graph run as a batched decode (`batchable`): its
/// T rows are T sequences, one token each, and the graph function's token-type argument
/// is the row table instead (`Slot::RowInfo`: each row's position and slot cache).
#[allow(clippy::too_many_arguments)]
pub(super) fn emit<'ctx>(
    cx: &'ctx Context,
    m: &Module<'ctx>,
    name: &str,
    g: Option<&Graph>,
    weights: &WeightTable,
    layout: &Layout,
    amx: bool,
    batch: bool,
    kernels: &mut HashMap<String, FunctionValue<'ctx>>,
) -> Result<(u64, CallLog), LlvmError> {
    let ptr = cx.ptr_type(inkwell::AddressSpace::default());
    let i64t = cx.i64_type();
    let params = [ptr, ptr, ptr, ptr].map(Into::into).into_iter().chain([i64t.into(), i64t.into()]);
    let params: Vec<_> = params.chain([ptr, ptr, ptr].map(Into::into)).collect();
    let f = m.add_function(
        &format!("tfc__{name}"),
        cx.void_type().fn_type(&params, false),
        Some(Linkage::External),
    );
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
        kb.ret();
        return Ok((0, Vec::new()));
    };
    // Every use of a parameter reloads it from a stack slot, so that no value lives
    // across the whole function: the register coalescer scans every instruction of a
    // register for each copy of it, and a parameter used by every call made the compile
    // time quadratic in the layers (512 layers took a minute). Nothing is optimised here
    // (`optnone`), so the loads stay.
    let params = f
        .get_param_iter()
        .map(|v| {
            let slot = kb.b.build_alloca(v.get_type(), "").unwrap();
            kb.b.build_store(slot, v).unwrap();
            (slot, v.get_type())
        })
        .collect();
    let gp = GraphPlan::of(g, weights, layout.max_seq, amx)?;
    let args = kb.b.build_array_alloca(i64t, kb.c(ARG_SLOTS as i64), "args").unwrap();
    let pf_ty = cx.void_type().fn_type(&[ptr.into(), ptr.into(), ptr.into(), i64t.into()], false);
    let pfor = m
        .get_function("tfc__parallel_for")
        .unwrap_or_else(|| m.add_function("tfc__parallel_for", pf_ty, None));
    let mut e = GraphFn {
        kb,
        g,
        gp: &gp,
        weights,
        layout,
        amx,
        kernels,
        params,
        args,
        pfor,
        calls: 0,
        packed_input: None,
        cache_outputs: g.cache_outputs(),
        batch,
        node: None,
        log: Vec::new(),
    };
    for &n in &gp.order {
        e.node(n)?;
    }
    // The main output (the first one) goes to the caller's buffer.
    let (_, main) = g.main_output();
    let width = e.fixed(*g.ty(main).shape.last().unwrap());
    let bytes = e.kb.mul(e.rows_of(main), e.kb.c((width * 4) as i64));
    let (out, src) = (e.param(7).into_pointer_value(), e.at(main));
    e.kb.b.build_memcpy(out, 4, src, 4, bytes).map_err(|err| LlvmError::Llvm(err.to_string()))?;
    e.kb.ret();
    Ok((gp.arena_bytes(), e.log))
}

/// Whether the extend graph `g` (every row's output) also runs as a batched decode:
/// its rows are independent but for their positions and caches. Not with token types
/// (their argument carries the row table instead), and only where every attention reads
/// its keys and values from the cache (a concatenation onto it), which a row can find in
/// its own slot.
pub(super) fn batchable(g: &Graph) -> bool {
    use crate::ir::InputKind;
    let from_cache = |n: NodeId| {
        matches!(g.op(n), Op::Concat { .. })
            && matches!(g.op(g.operands(n)[0]), Op::Input(InputKind::Cache { .. }))
    };
    g.node_ids().into_iter().all(|n| match g.op(n) {
        Op::Input(InputKind::TokenTypes) => false,
        Op::Attention { .. } => from_cache(g.operands(n)[1]) && from_cache(g.operands(n)[2]),
        _ => true,
    })
}

struct GraphFn<'a, 'k, 'ctx> {
    kb: Kb<'a, 'ctx>,
    g: &'a Graph,
    gp: &'a GraphPlan,
    weights: &'a WeightTable,
    layout: &'a Layout,
    amx: bool,
    kernels: &'k mut HashMap<String, FunctionValue<'ctx>>,
    /// The stack slots of the parameters.
    params: Vec<(PointerValue<'ctx>, BasicTypeEnum<'ctx>)>,
    /// The argument block every call fills.
    args: PointerValue<'ctx>,
    pfor: FunctionValue<'ctx>,
    calls: usize,
    /// The value whose packing (AMX parts of `[in, out]` or `[out, in]` maps, or slices)
    /// the packed region holds.
    packed_input: Option<(NodeId, Packing)>,
    /// The nodes whose values go to the cache, and where.
    cache_outputs: HashMap<NodeId, Vec<(u32, CacheKind)>>,
    /// A batched decode (see `emit`).
    batch: bool,
    /// The node being emitted, and every call so far.
    node: Option<NodeId>,
    log: CallLog,
}

impl<'ctx> GraphFn<'_, '_, 'ctx> {
    fn param(&self, i: usize) -> inkwell::values::BasicValueEnum<'ctx> {
        self.kb.b.build_load(self.params[i].1, self.params[i].0, "").unwrap()
    }

    fn arena(&self) -> PointerValue<'ctx> {
        self.param(0).into_pointer_value()
    }

    fn t(&self) -> IntValue<'ctx> {
        self.param(4).into_int_value()
    }

    /// `P`; in a batched decode, whose rows have positions of their own, `max_seq - T`,
    /// so that the key count `P + T` is the cache's capacity (each row's attention sees
    /// only the keys up to its position).
    fn p(&self) -> IntValue<'ctx> {
        match self.batch {
            false => self.param(5).into_int_value(),
            true => self.kb.sub(self.kb.c(self.layout.max_seq as i64), self.t()),
        }
    }

    /// A batched decode's row table (the token-type argument).
    fn row_info(&self) -> IntValue<'ctx> {
        self.kb.int_of(self.param(3).into_pointer_value())
    }

    fn fixed(&self, d: Dim) -> usize {
        d.as_fixed().unwrap_or(0)
    }

    /// A dimension's value: `c + t·T + p·P`.
    fn dim(&self, d: Dim) -> IntValue<'ctx> {
        let kb = &self.kb;
        let mut v = kb.c(d.c as i64);
        if d.t > 0 {
            v = kb.add(v, kb.mul(self.t(), kb.c(d.t as i64)));
        }
        if d.p > 0 {
            v = kb.add(v, kb.mul(self.p(), kb.c(d.p as i64)));
        }
        v
    }

    fn cache_ptr(&self, layer: u32, kind: CacheKind) -> PointerValue<'ctx> {
        let (off, _, _) = self.layout.cache[&(layer, kind)];
        let cache = self.param(1).into_pointer_value();
        self.kb.gep(self.kb.f32t(), cache, self.kb.c(off as i64))
    }

    /// Where node `n`'s value is.
    fn at(&self, n: NodeId) -> PointerValue<'ctx> {
        let kb = &self.kb;
        match self.gp.loc[&n] {
            Loc::Arena(off) => kb.gep(kb.cx.i8_type(), self.arena(), kb.c(off as i64)),
            Loc::Weight(i) => {
                let ptr = kb.cx.ptr_type(inkwell::AddressSpace::default());
                let slot = kb.gep(ptr, self.param(6).into_pointer_value(), kb.c(i as i64));
                kb.b.build_load(ptr, slot, "").unwrap().into_pointer_value()
            }
            Loc::Tokens => self.param(2).into_pointer_value(),
            Loc::Types => self.param(3).into_pointer_value(),
            Loc::Cache(l, k) => self.cache_ptr(l, k),
        }
    }

    /// Node `n`'s value, as an argument.
    fn val(&self, n: NodeId) -> IntValue<'ctx> {
        self.kb.int_of(self.at(n))
    }

    /// A place in the arena's packed regions.
    fn region(&self, off: u64) -> IntValue<'ctx> {
        self.kb.int_of(self.kb.gep(self.kb.cx.i8_type(), self.arena(), self.kb.c(off as i64)))
    }

    /// The rows of `[…, rows…, d]`: every dimension but the last, multiplied.
    fn rows_of(&self, n: NodeId) -> IntValue<'ctx> {
        let ty = self.g.ty(n);
        ty.shape[..ty.rank() - 1].iter().fold(self.kb.c(1), |acc, &d| self.kb.mul(acc, self.dim(d)))
    }

    /// Rows per head of a value `[heads, rows, d]`: `max_seq` where it lives in the cache.
    fn head_rows(&self, n: NodeId, rows: IntValue<'ctx>) -> IntValue<'ctx> {
        match self.gp.loc[&n] {
            Loc::Cache(..) => self.kb.c(self.layout.max_seq as i64),
            _ => rows,
        }
    }

    /// Calls `kernel` on `tasks` tasks with its arguments.
    fn call(&mut self, kernel: Kernel, values: &[(Slot, IntValue<'ctx>)], tasks: IntValue<'ctx>) {
        if self.calls > 0 && self.calls % CALLS_PER_BLOCK == 0 {
            let next = self.kb.cx.append_basic_block(self.kb.f, "calls");
            self.kb.b.build_unconditional_branch(next).unwrap();
            self.kb.b.position_at_end(next);
        }
        self.calls += 1;
        if let Some(n) = self.node {
            self.log.push((n, kernel.symbol()));
        }
        let (cx, m) = (self.kb.cx, self.kb.m);
        let kf = *self.kernels.entry(kernel.symbol()).or_insert_with(|| kernels::emit(cx, m, &kernel));
        for (i, v) in kernel.encode(values).into_iter().enumerate() {
            self.kb.st64(self.args, i as i64, v);
        }
        let kp = kf.as_global_value().as_pointer_value();
        let pool = self.param(8).into_pointer_value();
        self.kb
            .b
            .build_call(self.pfor, &[pool.into(), kp.into(), self.args.into(), tasks.into()], "")
            .unwrap();
    }

    /// Emits node `n`'s kernels, and the copy of its value into the cache if it is one.
    fn node(&mut self, n: NodeId) -> Result<(), LlvmError> {
        use Slot::*;
        let (g, gp) = (self.g, self.gp);
        if gp.fused.absorbed.contains_key(&n) {
            return Ok(());
        }
        self.node = Some(n);
        let ops = g.operands(n);
        let ty = g.ty(n).clone();
        let o = |e: &Self, i: usize| e.val(ops[i]);
        let width = self.fixed(*ty.shape.last().unwrap());
        let round = gp.fused.chains.contains_key(&n);
        match g.op(n) {
            // The KV cache's concatenation is the cache itself.
            Op::Concat { .. } if matches!(gp.loc[&n], Loc::Cache(..)) => {}
            Op::Weight { .. } | Op::Input(_) => {}
            Op::Concat { .. } => {
                let a = self.fixed(*g.ty(ops[0]).shape.last().unwrap());
                let v = [(X, o(self, 0)), (Y, o(self, 1)), (Out, self.val(n))];
                self.call(Kernel::Concat { a, b: width - a }, &v, self.rows_of(n))
            }
            Op::Slice { start, len } => {
                let k = Kernel::Slice {
                    width: self.fixed(*g.ty(ops[0]).shape.last().unwrap()),
                    start: *start,
                    len: *len,
                };
                let v = [(X, o(self, 0)), (Out, self.val(n))];
                self.call(k, &v, self.rows_of(n))
            }
            Op::HeadLinear { at, transposed, .. } => {
                if g.ty(ops[1]).dtype != DType::F32 {
                    return Err(LlvmError::Unsupported(format!(
                        "`head_linear` of {} weights",
                        g.ty(ops[1]).dtype
                    )));
                }
                let src = g.ty(ops[0]);
                let (heads, t, inn) =
                    (self.fixed(src.shape[0]), self.dim(src.shape[1]), self.fixed(src.shape[2]));
                let wt = g.ty(ops[1]);
                let period = wt.shape.iter().map(|&d| self.fixed(d)).product::<usize>()
                    / self.fixed(*wt.shape.last().unwrap())
                    / heads;
                let k = Kernel::HeadLinear { inn, out: width, period, at: *at, transposed: *transposed };
                let v = [(X, o(self, 0)), (W, o(self, 1)), (Out, self.val(n)), (Rows, t)];
                self.call(k, &v, self.kb.mul(self.kb.c(heads as i64), t))
            }
            Op::Positions if self.batch => {
                let v = [(Out, self.val(n)), (T, self.t()), (RowInfo, self.row_info())];
                self.call(Kernel::RowPositions, &v, self.kb.c(1))
            }
            Op::Positions => {
                let v = [(Out, self.val(n)), (T, self.t()), (P, self.p())];
                self.call(Kernel::Positions, &v, self.kb.c(1))
            }
            Op::Gather { offset } => {
                let k = Kernel::Gather { d: width, offset: *offset, wf: WFmt::of(g.ty(ops[0])) };
                let v = [(Table, o(self, 0)), (Ids, o(self, 1)), (Out, self.val(n))];
                self.call(k, &v, self.rows_of(n))
            }
            Op::Sinusoidal { dim: d, base, fairseq, offset } => {
                let v = [(Pos, o(self, 0)), (Out, self.val(n))];
                let k = Kernel::Sinusoidal { dim: *d, base: *base, fairseq: *fairseq, offset: *offset };
                self.call(k, &v, self.rows_of(n))
            }
            Op::Add | Op::Mul => {
                let k = Kernel::Binary { mul: *g.op(n) == Op::Mul, width };
                let v = [(X, o(self, 0)), (Y, o(self, 1)), (Out, self.val(n))];
                self.call(k, &v, self.rows_of(n))
            }
            Op::RoundQ8 => {
                let v = [(X, o(self, 0)), (Out, self.val(n))];
                self.call(Kernel::RoundQ8 { width }, &v, self.rows_of(n))
            }
            Op::Scale(_) | Op::Activation(_) | Op::RoundBf16 => {
                let op = match g.op(n) {
                    Op::Scale(s) => UnaryOp::Scale(*s),
                    Op::Activation(a) => UnaryOp::Act(*a),
                    _ => UnaryOp::RoundBf16,
                };
                let v = [(X, o(self, 0)), (Out, self.val(n))];
                self.call(Kernel::Unary { op, width }, &v, self.rows_of(n))
            }
            Op::LayerNorm { eps, gain } => {
                let (gain, bias) = (*gain, ops.len() == 2 + *gain as usize);
                let sets = self.norm_sets(n);
                let mut v = vec![(X, o(self, 0))];
                if gain {
                    v.push((W, o(self, 1)));
                }
                if bias {
                    v.push((Bias, o(self, ops.len() - 1)));
                }
                v.push((Out, self.val(n)));
                if sets > 1 {
                    v.push((Rows, self.rows_of(n)));
                }
                let k = Kernel::LayerNorm { d: width, eps: *eps, gain, bias, round, sets };
                self.call(k, &v, self.rows_of(n))
            }
            Op::RmsNorm { eps, unit_offset } => {
                let sets = self.norm_sets(n);
                let k = Kernel::RmsNorm { d: width, eps: *eps, unit_offset: *unit_offset, round, sets };
                let mut v = vec![(X, o(self, 0)), (W, o(self, 1)), (Out, self.val(n))];
                if sets > 1 {
                    v.push((Rows, self.rows_of(n)));
                }
                self.call(k, &v, self.rows_of(n))
            }
            Op::Linear { bias, .. } => self.linear(n, *bias, width),
            Op::SplitQkv { layout, part, heads, kv_heads, head_dim } => {
                let k = Kernel::SplitQkv {
                    layout: *layout,
                    part: *part,
                    heads: *heads,
                    kv_heads: *kv_heads,
                    head_dim: *head_dim,
                };
                let v = [(X, o(self, 0)), (Out, self.val(n))];
                self.call(k, &v, self.rows_of(n))
            }
            Op::SplitHeads { heads } => {
                let rows = self.rows_of(ops[0]);
                let k = Kernel::SplitHeads { heads: *heads, head_dim: width };
                let v = [(X, o(self, 0)), (Out, self.val(n)), (OutRows, self.head_rows(n, rows))];
                self.call(k, &v, rows)
            }
            Op::MergeHeads => {
                let src = g.ty(ops[0]);
                let (heads, head_dim) = (self.fixed(src.shape[0]), self.fixed(src.shape[2]));
                let rows = self.rows_of(n);
                let v = [(X, o(self, 0)), (Out, self.val(n)), (Rows, rows)];
                self.call(Kernel::MergeHeads { heads, head_dim, round }, &v, rows)
            }
            Op::Rope(r) => {
                let k = Kernel::Rope { head_dim: width, rope: r.clone(), heads: self.fixed(ty.shape[0]) };
                let rows = self.dim(ty.shape[1]);
                let v = [
                    (X, o(self, 0)),
                    (Pos, o(self, 1)),
                    (Out, self.val(n)),
                    (Rows, rows),
                    (OutRows, self.head_rows(n, rows)),
                ];
                self.call(k, &v, rows)
            }
            Op::Attention { .. } => self.attention(n),
            Op::Route(r) => {
                let mut v = vec![(X, o(self, 0)), (Out, self.val(n))];
                if r.choice_bias {
                    v.push((Bias, o(self, 1)));
                }
                self.call(Kernel::Route { route: *r }, &v, self.rows_of(n))
            }
            Op::RowScale => {
                let v = [(X, o(self, 0)), (Y, o(self, 1)), (Out, self.val(n))];
                self.call(Kernel::RowScale { width }, &v, self.rows_of(n))
            }
            Op::Experts(x) => self.experts(n, *x, width)?,
            Op::LastRow => {
                // `[T]` (positions, i32) or `[T, d]`.
                let src = g.ty(ops[0]);
                let (rows, width) =
                    if src.rank() == 1 { (self.dim(src.shape[0]), 1) } else { (self.rows_of(ops[0]), width) };
                let k = Kernel::LastRow { width, int: src.dtype == DType::I32 };
                let v = [(X, o(self, 0)), (Out, self.val(n)), (Rows, rows)];
                self.call(k, &v, self.kb.c(1))
            }
            op => {
                return Err(LlvmError::Unsupported(format!(
                    "`{}` in a {} graph",
                    op.mnemonic(),
                    g.phase.name()
                )))
            }
        }
        if gp.fused.in_cache.contains_key(&n) {
            return Ok(());
        }
        for (layer, kind) in self.cache_outputs.get(&n).cloned().unwrap_or_default() {
            let groups = self.fixed(ty.shape[0]);
            let k = Kernel::CacheStore { head_dim: width, max_seq: self.layout.max_seq, table: self.batch };
            let dst = self.kb.int_of(self.cache_ptr(layer, kind));
            let mut v = vec![(X, self.val(n)), (Cache, dst), (Rows, self.dim(ty.shape[1])), (P, self.p())];
            if self.batch {
                v.push((RowInfo, self.row_info()));
            }
            self.call(k, &v, self.kb.c(groups as i64));
        }
        Ok(())
    }

    /// A linear map, with the elementwise ops fused into it, by its algorithm.
    fn linear(&mut self, n: NodeId, bias: bool, width: usize) {
        use Slot::*;
        let (g, gp, weights) = (self.g, self.gp, self.weights);
        let ops = g.operands(n);
        let inn = self.fixed(*g.ty(ops[0]).shape.last().unwrap());
        let wf = WFmt::of(g.ty(ops[1]));
        let mut v = vec![(X, self.val(ops[0])), (W, self.val(ops[1]))];
        if bias {
            v.push((Bias, self.val(ops[2])));
        }
        v.push((Out, self.val(n)));
        v.push((Rows, self.rows_of(n)));
        let mut epi = Vec::new();
        let mut others = Vec::new();
        if let Some((chain, _)) = gp.fused.chains.get(&n) {
            for (e, other) in chain {
                epi.push(*e);
                if let Some(other) = other {
                    others.push((Other(others.len()), self.val(*other)));
                }
            }
        }
        v.extend(&others);
        let algo = match gp.linear(g, n, self.amx, weights) {
            LinearPlan::Kernel(algo) => algo,
            LinearPlan::SplitK { chunks } => {
                // Partials live right after the output row in the node's block.
                let part = self.kb.int_of(self.kb.gep(self.kb.f32t(), self.at(n), self.kb.c(width as i64)));
                let k = Kernel::GemvPartial { inn, out: width, chunks, wf };
                let pv = [(X, self.val(ops[0])), (W, self.val(ops[1])), (Partials, part)];
                self.call(k, &pv, self.kb.c(chunks as i64));
                let mut r = vec![(Partials, part)];
                if bias {
                    r.push((Bias, self.val(ops[2])));
                }
                r.push((Out, self.val(n)));
                r.extend(others);
                let k = Kernel::GemvReduce { out: width, chunks, bias, epi, pairs: wf == WFmt::Bf16 };
                self.call(k, &r, self.kb.c((width / BLOCK) as i64));
                return;
            }
        };
        let read = weight_read(g, n, weights);
        let transposed = read == WeightRead::Stored { transposed: true };
        let pairs = matches!(algo, LinearAlgo::Amx(_) | LinearAlgo::Packed { .. })
            && kernels::multiplies_pairs(&self.kb, wf, read, *g.op(ops[0]) == Op::RoundBf16, inn);
        match algo {
            LinearAlgo::Amx(a) => {
                if gp.to_tiles.contains(&ops[0]) {
                    v.push((PackedX, self.region(gp.tiled_at)));
                } else {
                    let xp = self.region(gp.packed_at);
                    if self.packed_input != Some((ops[0], Packing::Amx { transposed })) {
                        let tiles = self.kb.udiv(amx::padded(&self.kb, self.rows_of(n)), self.kb.c(16));
                        let k = Kernel::AmxPack { inn, transposed, parts: a.parts };
                        let pv = [(X, self.val(ops[0])), (Out, xp), (Rows, self.rows_of(n))];
                        self.call(k, &pv, tiles);
                        self.packed_input = Some((ops[0], Packing::Amx { transposed }));
                    }
                    v.push((PackedX, xp));
                }
                if a.to_tiles {
                    v.push((PackedOut, self.region(gp.tiled_at)));
                }
            }
            LinearAlgo::Packed { sliced: true } => {
                let xs = self.region(gp.packed_at);
                if self.packed_input != Some((ops[0], Packing::Slices { pairs })) {
                    let pv = [(X, self.val(ops[0])), (Out, xs), (Rows, self.rows_of(n))];
                    self.call(Kernel::SliceRows { inn, pairs }, &pv, self.rows_of(n));
                    self.packed_input = Some((ops[0], Packing::Slices { pairs }));
                }
                v.push((PackedX, xs));
            }
            _ => {}
        }
        let tasks = match algo {
            LinearAlgo::Amx(a) => amx::tasks(inn, width, a.parts),
            _ => width.div_ceil(BLOCK),
        };
        let q8x = *g.op(ops[0]) == Op::RoundQ8;
        let k = Kernel::Linear { inn, out: width, bias, epi, wf, read, algo, q8x, pairs };
        self.call(k, &v, self.kb.c(tasks as i64));
    }

    /// A mixture's experts: the rows grouped by expert (`Dispatch`), then a loop over the
    /// experts that runs each chosen one's projections with the linear kernels, over its
    /// rows only and reading its matrices where they lie in the 3-D tensors, then the
    /// weighted sum per row (`Combine`).
    fn experts(&mut self, n: NodeId, x: Experts, d: usize) -> Result<(), LlvmError> {
        use Slot::*;
        let g = self.g;
        let ops = g.operands(n);
        if glu_path(&x) && x.gate_at.is_some() && ops[4] != ops[2] {
            return Err(LlvmError::Unsupported(
                "experts with a gate tensor of their own and biases, `[in, out]` storage or a clamped GLU"
                    .into(),
            ));
        }
        let s = experts_scratch(g, n, self.layout.max_seq).expect("bug: an experts node");
        let (e, f) = (x.experts, x.hidden);
        let part =
            |me: &Self, off: u64| me.kb.int_of(me.kb.gep(me.kb.cx.i8_type(), me.at(n), me.kb.c(off as i64)));
        let v = [
            (X, self.val(ops[0])),
            (Route, self.val(ops[1])),
            (Offsets, part(self, s.offsets)),
            (Slots, part(self, s.slot_of)),
            (Out, part(self, s.xs)),
            (Rows, self.rows_of(n)),
        ];
        self.call(Kernel::Dispatch { experts: e, d }, &v, self.kb.c(1));
        // The loop over the experts, its counter in a stack slot.
        let (cx, f_) = (self.kb.cx, self.kb.f);
        let i64t = cx.i64_type();
        let counter = self.kb.b.build_alloca(i64t, "expert").unwrap();
        self.kb.b.build_store(counter, self.kb.c(0)).unwrap();
        let (head, body, work, next, exit) = (
            cx.append_basic_block(f_, "expert"),
            cx.append_basic_block(f_, "expert_rows"),
            cx.append_basic_block(f_, "expert_run"),
            cx.append_basic_block(f_, "expert_next"),
            cx.append_basic_block(f_, "experts_done"),
        );
        self.kb.b.build_unconditional_branch(head).unwrap();
        self.kb.b.position_at_end(head);
        let ex = self.kb.b.build_load(i64t, counter, "").unwrap().into_int_value();
        let more = self.kb.icmp_lt(ex, self.kb.c(e as i64));
        self.kb.b.build_conditional_branch(more, body, exit).unwrap();
        self.kb.b.position_at_end(body);
        let offsets = self.kb.ptr_of(part(self, s.offsets));
        let lo = self.kb.ld64(offsets, ex);
        let rows = self.kb.sub(self.kb.ld64(offsets, self.kb.add(ex, self.kb.c(1))), lo);
        let any = self.kb.icmp_lt(self.kb.c(0), rows);
        self.kb.b.build_conditional_branch(any, work, next).unwrap();
        self.kb.b.position_at_end(work);
        // Slot `lo`'s row of a part of `width` floats, and expert `ex`'s rows `at..` of a
        // 3-D weight.
        let slot = |me: &Self, off: u64, width: usize| {
            let p = me.kb.gep(me.kb.cx.i8_type(), me.at(n), me.kb.c(off as i64));
            me.kb.int_of(me.kb.gep(me.kb.f32t(), p, me.kb.mul(lo, me.kb.c(width as i64))))
        };
        let matrix = |me: &Self, w: NodeId, at: usize| {
            let ty = g.ty(w);
            let (r, inn) = (me.fixed(ty.shape[1]), me.fixed(ty.shape[2]));
            let row = WFmt::of(ty).bytes(inn) as i64;
            let start = me.kb.add(me.kb.mul(ex, me.kb.c(r as i64 * row)), me.kb.c(at as i64 * row));
            (me.kb.int_of(me.kb.gep(me.kb.cx.i8_type(), me.at(w), start)), WFmt::of(ty))
        };
        let fixed_rows = linear_rows(g, n);
        let transposed = x.transposed;
        // f32 expert matrices of whole blocks are re-packed into panels
        // (`WeightTable::repacked`), which the packed GEMM reads in place at any row count.
        let weights = self.weights;
        let panels = |w: NodeId| match g.op(w) {
            Op::Weight { name, .. } => weights.repack_of(weights.slot(name)).is_some(),
            _ => false,
        };
        let linear =
            |w: NodeId, inn: usize, out: usize, bias: bool, epi: Vec<Epi>, wf: WFmt| Kernel::Linear {
                inn,
                out,
                bias,
                epi,
                wf,
                read: if panels(w) { WeightRead::Panels } else { WeightRead::Stored { transposed } },
                algo: if panels(w) {
                    LinearAlgo::Packed { sliced: false }
                } else {
                    expert_algo(fixed_rows, inn, out, transposed)
                },
                q8x: false,
                pairs: false,
            };
        // Expert `ex`'s row of a bias `[E, out]`.
        let bias_of = |me: &Self, b: Option<NodeId>, out: usize| {
            b.map(|b| me.kb.int_of(me.kb.gep(me.kb.f32t(), me.at(b), me.kb.mul(ex, me.kb.c(out as i64)))))
        };
        let o = x.operands();
        let node = |i: Option<usize>| i.map(|i| ops[i]);
        let (xs, hu) = (slot(self, s.xs, d), slot(self, s.up, f));
        // A GLU path reads the whole projection, from its first row.
        let (up, up_wf) = matrix(self, ops[2], if glu_path(&x) { 0 } else { x.up_at });
        let f_tasks = self.kb.c(f.div_ceil(BLOCK) as i64);
        if glu_path(&x) {
            // The up (or gate_up) projection's every output, with its bias, then the GLU
            // of its gate and up parts.
            let r = self.fixed(g.ty(ops[2]).shape[if transposed { 2 } else { 1 }]);
            let gu = slot(self, s.gate, r);
            let mut v = vec![(X, xs), (W, up), (Out, gu), (Rows, rows)];
            let b = bias_of(self, node(o.up_bias), r);
            v.extend(b.map(|b| (Bias, b)));
            self.call(
                linear(ops[2], d, r, b.is_some(), vec![], up_wf),
                &v,
                self.kb.c(r.div_ceil(BLOCK) as i64),
            );
            let (gate, up_at, step) = match (x.interleaved, x.gate_at) {
                (true, _) => (Some(0), 1, 2),
                (false, g) => (g, x.up_at, 1),
            };
            let k = Kernel::Glu { glu: x, row: r, gate, up: up_at, step };
            self.call(k, &[(X, gu), (Out, hu), (Rows, rows)], rows);
        } else {
            match x.gate_at {
                Some(at) => {
                    let hg = slot(self, s.gate, f);
                    let (gate, wf) = matrix(self, ops[4], at);
                    let k = linear(ops[4], d, f, false, vec![Epi::Act(x.act)], wf);
                    self.call(k, &[(X, xs), (W, gate), (Out, hg), (Rows, rows)], f_tasks);
                    let k = linear(ops[2], d, f, false, vec![Epi::Mul], up_wf);
                    self.call(k, &[(X, xs), (W, up), (Out, hu), (Rows, rows), (Other(0), hg)], f_tasks);
                }
                None => {
                    let k = linear(ops[2], d, f, false, vec![Epi::Act(x.act)], up_wf);
                    self.call(k, &[(X, xs), (W, up), (Out, hu), (Rows, rows)], f_tasks);
                }
            }
        }
        let (down, wf) = matrix(self, ops[3], 0);
        let ys = slot(self, s.ys, d);
        let mut v = vec![(X, hu), (W, down), (Out, ys), (Rows, rows)];
        let b = bias_of(self, node(o.down_bias), d);
        v.extend(b.map(|b| (Bias, b)));
        self.call(linear(ops[3], f, d, b.is_some(), vec![], wf), &v, self.kb.c(d.div_ceil(BLOCK) as i64));
        self.kb.b.build_unconditional_branch(next).unwrap();
        self.kb.b.position_at_end(next);
        let ex = self.kb.b.build_load(i64t, counter, "").unwrap().into_int_value();
        self.kb.b.build_store(counter, self.kb.add(ex, self.kb.c(1))).unwrap();
        self.kb.b.build_unconditional_branch(head).unwrap();
        self.kb.b.position_at_end(exit);
        let v = [
            (Route, self.val(ops[1])),
            (Slots, part(self, s.slot_of)),
            (Y, part(self, s.ys)),
            (Out, self.val(n)),
        ];
        self.call(Kernel::Combine { experts: e, d }, &v, self.rows_of(n));
        Ok(())
    }

    /// Fused attention: by (head, query row), or by (head, block of query rows) where the
    /// rows are known only at run time (prefill).
    /// How many sets of parameters norm `n` has: 1, or one per head (`[H, d]`).
    fn norm_sets(&self, n: NodeId) -> usize {
        let ops = self.g.operands(n);
        ops.get(1).map_or(1, |&p| match &self.g.ty(p).shape[..] {
            [h, _] => self.fixed(*h),
            _ => 1,
        })
    }

    fn attention(&mut self, n: NodeId) {
        use Slot::*;
        let g = self.g;
        let Op::Attention { scale, mask, alibi, softcap, sinks } = *g.op(n) else {
            unreachable!("an attention node")
        };
        let ops = g.operands(n);
        let ty = g.ty(n);
        let (heads, head_dim) = (self.fixed(ty.shape[0]), self.fixed(*ty.shape.last().unwrap()));
        let kty = g.ty(ops[1]);
        let groups = self.fixed(kty.shape[0]);
        let s_len = self.dim(kty.shape[1]);
        // Keys in the cache have max_seq rows per head; others are dense.
        let stride = |e: &Self, i: usize| match e.gp.loc[&ops[i]] {
            Loc::Cache(..) => e.kb.c((e.layout.max_seq * head_dim) as i64),
            _ => e.kb.mul(s_len, e.kb.c(head_dim as i64)),
        };
        let rows = self.dim(ty.shape[1]);
        // A batched decode's rows read different caches: no block shares its keys.
        let block = (ty.shape[1].as_fixed().is_none() && !self.batch)
            .then(|| kernels::attention_rows(head_dim))
            .flatten();
        let table = self.batch;
        let k =
            Kernel::Attention { heads, groups, head_dim, scale, mask, alibi, block, softcap, sinks, table };
        let kb = &self.kb;
        let tasks = match block {
            Some(b) => kb.udiv(kb.add(rows, kb.c(b as i64 - 1)), kb.c(b as i64)),
            None => rows,
        };
        let mut v = vec![
            (Q, self.val(ops[0])),
            (K, self.val(ops[1])),
            (V, self.val(ops[2])),
            (Pos, self.val(ops[3])),
            (Out, self.val(n)),
            (Rows, rows),
            (Keys, s_len),
            (KStride, stride(self, 1)),
            (VStride, stride(self, 2)),
        ];
        if sinks {
            v.push((Sinks, self.val(ops[4])));
        }
        if table {
            v.push((RowInfo, self.row_info()));
        }
        let tasks = self.kb.mul(self.kb.c(heads as i64), tasks);
        self.call(k, &v, tasks)
    }
}
