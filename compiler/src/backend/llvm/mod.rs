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
mod elementwise;
mod kb;
mod kernels;
mod select;

use std::collections::HashMap;

use inkwell::context::Context;
use inkwell::module::{Linkage, Module};
use inkwell::passes::PassBuilderOptions;
use inkwell::targets::{CodeModel, FileType, InitializationConfig, RelocMode, Target, TargetMachine};
use inkwell::values::{FunctionValue, IntValue, PointerValue};
use inkwell::GlobalVisibility;
use inkwell::OptimizationLevel;

use kb::{Kb, WFmt};
pub use kernels::Kernel;
use kernels::UnaryOp;
use select::{reads_layout, reads_tiles, reads_transposed, GraphPlan, LinearAlgo, Packing};

use crate::backend::layout::{layout, Layout};
use crate::backend::plan::{Loc, PlanError};
use crate::backend::weights::{weight_bytes, WeightLayout, WeightTable, BLOCK};
use crate::ir::{CacheKind, DType, Dim, Graph, NodeId, Op};
use crate::Compiled;

#[derive(Debug, thiserror::Error)]
pub enum LlvmError {
    #[error("the LLVM backend does not support {0} yet")]
    Unsupported(String),
    #[error("LLVM: {0}")]
    Llvm(String),
    #[error("{0}")]
    Cpu(String),
    #[error(transparent)]
    Plan(#[from] PlanError),
}

/// Builds the module for a compiled spec; with `amx`, for a target with AMX-BF16 (whose
/// bf16 GEMMs then run on tiles; `strip_amx` makes a copy without them).
pub fn build<'ctx>(
    cx: &'ctx Context,
    c: &Compiled,
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
    let layout = layout(c);
    let mut kernels: HashMap<String, FunctionValue> = HashMap::new();
    let mut arena = 0;
    let mut graphs = vec![
        ("prefill", Some(&c.prefill)),
        ("prefill_all", Some(&c.prefill_all)),
        ("decode", c.decode.as_ref()),
    ];
    for (name, graph) in graphs.drain(..) {
        let used = emit_graph(cx, &m, name, graph, weights, &layout, max_seq, amx, &mut kernels)?;
        arena = arena.max(used);
    }
    let layout = Layout { arena_bytes: arena, ..layout };
    globals(cx, &m, &layout, weights, c.decode.is_some());
    m.verify().map_err(|e| LlvmError::Llvm(format!("bug: invalid module: {e}")))?;
    Ok((m, layout))
}

/// The plan of every graph of the library as text (`tfc ir --stage plan`): what `build`
/// decides before it emits code.
pub fn plan_text(c: &Compiled, weights: &WeightTable, amx: bool) -> Result<String, LlvmError> {
    let mut out = String::new();
    for (name, g) in
        [("prefill", Some(&c.prefill)), ("prefill_all", Some(&c.prefill_all)), ("decode", c.decode.as_ref())]
    {
        let Some(g) = g else { continue };
        let p = GraphPlan::of(g, weights, c.spec.sizes.max_seq, amx)?;
        out.push_str(&select::describe(name, g, &p, amx, weights));
    }
    Ok(out)
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
    let gp = GraphPlan::of(g, weights, max_seq, amx)?;
    let GraphPlan { order, fused, loc, to_tiles, .. } = &gp;
    let (amx_at, tiled_at) = (gp.packed_at, gp.tiled_at);
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

    for &n in order {
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
                let algo = gp.linear(g, n, amx, weights);
                if let LinearAlgo::SplitK { chunks } = algo {
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
                    let packed = matches!(algo, LinearAlgo::Amx(_) | LinearAlgo::Packed { .. });
                    let sliced = algo == LinearAlgo::Packed { sliced: true };
                    let region = |off: u64| kb.int_of(kb.gep(cx.i8_type(), arena(), kb.c(off as i64)));
                    let amx = match algo {
                        LinearAlgo::Amx(a) => Some(a),
                        _ => None,
                    };
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
    let (_, main) = g.main_output();
    let bytes = kb.mul(rows_of(main), kb.c((fixed(*g.ty(main).shape.last().unwrap()) * 4) as i64));
    kb.b.build_memcpy(out(), 4, at(main), 4, bytes).map_err(|e| LlvmError::Llvm(e.to_string()))?;
    kb.ret();
    Ok(gp.arena_bytes())
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
