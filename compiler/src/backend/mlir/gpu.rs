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

use std::collections::HashMap;

use tfc_runtime::gpu::program::{Arg, ArgKind, Dispatch, Graph as GpuGraph, KernelInfo, Lin, Program, Table};

use super::text::Text;
use super::MlirError;
use crate::backend::layout::Layout;
use crate::backend::plan::{plan_unfused, Loc};
use crate::backend::weights::WeightTable;
use crate::ir::{alibi_slopes, Act, CacheKind, Dim, Graph, NodeId, Op, QkvLayout, QkvPart};
use crate::Compiled;

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

pub fn module(
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
    Norm {
        d: usize,
        eps: f64,
        layer: bool,
        bias: bool,
        unit: bool,
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
}

/// A fused attention kernel's sizes and options.
#[derive(Debug, Clone, Copy)]
struct Attn {
    h: usize,
    g: usize,
    hd: usize,
    scale: f64,
    causal: bool,
    window: Option<usize>,
    alibi: bool,
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
        let (loc, bytes) = plan_unfused(g, &order, weights, layout.max_seq)
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
            let ops = g.operands(n);
            let fixed = |d: Dim| d.as_fixed().unwrap_or(0);
            let width = fixed(*ty.shape.last().unwrap());
            let rows_of = |id: NodeId| -> Dim {
                let t = g.ty(id);
                let mut r = Dim::fixed(1);
                for d in &t.shape[..t.rank() - 1] {
                    r = match (r.as_fixed(), d.as_fixed()) {
                        (Some(a), _) => mul(*d, a),
                        (None, Some(b)) => mul(r, b),
                        (None, None) => return Dim::fixed(0),
                    };
                }
                r
            };
            let ins = |ix: &[usize]| -> Vec<Arg> { ix.iter().map(|&i| arg(ops[i])).collect() };
            let mut per_group = [1, 1];
            let (kern, grid, mut args): (Kern, [Dim; 2], Vec<Arg>) = match g.op(n) {
                Op::Weight { .. } | Op::Input(_) | Op::Concat { .. } => continue,
                Op::Positions => (Kern::Positions, [ty.shape[0], one], vec![]),
                Op::Gather { offset } => {
                    (Kern::Gather { d: width, offset: *offset }, [ty.shape[0], one], ins(&[0, 1]))
                }
                Op::Sinusoidal { dim, base } => {
                    // A row of the host's table, by position: a gather.
                    let ti =
                        self.table(Table::Sinusoidal { rows: layout.max_seq + 1, dim: *dim, base: *base });
                    (
                        Kern::Gather { d: *dim, offset: 0 },
                        [ty.shape[0], one],
                        vec![Arg::Table(ti), arg(ops[0])],
                    )
                }
                Op::Add | Op::Mul => {
                    (Kern::Binary { mul: *g.op(n) == Op::Mul, w: width }, [rows_of(n), one], ins(&[0, 1]))
                }
                Op::Scale(s) => {
                    (Kern::Unary { op: Unary::Scale(*s), w: width }, [rows_of(n), one], ins(&[0]))
                }
                Op::Activation(a) => {
                    (Kern::Unary { op: Unary::Act(*a), w: width }, [rows_of(n), one], ins(&[0]))
                }
                Op::RoundBf16 => {
                    (Kern::Unary { op: Unary::RoundBf16, w: width }, [rows_of(n), one], ins(&[0]))
                }
                Op::LayerNorm { eps } => {
                    let bias = ops.len() == 3;
                    let k = Kern::Norm { d: width, eps: *eps, layer: true, bias, unit: false };
                    (k, [rows_of(n), one], ins(if bias { &[0, 1, 2] } else { &[0, 1] }))
                }
                Op::RmsNorm { eps, unit_offset } => {
                    let k = Kern::Norm { d: width, eps: *eps, layer: false, bias: false, unit: *unit_offset };
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
                    let k =
                        Kern::SplitQkv { layout: *l, part: *part, h: *heads, kv: *kv_heads, hd: *head_dim };
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
                        rotary_dim: r.rotary_dim,
                        theta: r.theta,
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
                Op::Attention { scale, mask, alibi } => {
                    let h = fixed(ty.shape[0]);
                    let kty = g.ty(ops[1]);
                    let in_cache = matches!(loc[&ops[1]], Loc::Cache(..));
                    let k = Kern::Attention(Attn {
                        h,
                        g: fixed(kty.shape[0]),
                        hd: width,
                        scale: *scale,
                        causal: mask.causal,
                        window: mask.window,
                        alibi: *alibi,
                        rows: ty.shape[1],
                        s: kty.shape[1],
                        stride: in_cache.then_some(layout.max_seq * width),
                    });
                    (k, [mul(ty.shape[1], h), one], ins(&[0, 1, 2, 3]))
                }
                Op::LastRow => {
                    let src = g.ty(ops[0]);
                    let (w, rows) =
                        if src.rank() == 1 { (1, src.shape[0]) } else { (width, rows_of(ops[0])) };
                    (
                        Kern::LastRow { w, rows, int: src.dtype == crate::ir::DType::I32 },
                        [one, one],
                        ins(&[0]),
                    )
                }
                op => {
                    return Err(MlirError::Unsupported(format!(
                        "`{}` in a {} graph on the GPU",
                        op.mnemonic(),
                        g.phase.name()
                    )))
                }
            };
            args.push(arg(n));
            let ki = self.kernel(&kern);
            ds.push(Dispatch {
                kernel: ki,
                grid: [lin(grid[0]), lin(grid[1])],
                per_group,
                args: push_dims(args),
            });
            for &(l, k) in cache_out.get(&n).into_iter().flatten() {
                let groups = fixed(ty.shape[0]);
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
    }
}

/// A kernel body under construction.
struct K {
    t: Text,
    target: Target,
    shared: Vec<(String, usize)>,
    args: Vec<(String, ArgKind)>,
    /// `T` and `P` as indices.
    tv: String,
    pv: String,
}

impl K {
    fn mty(&self, kind: ArgKind) -> String {
        let e = if kind == ArgKind::F32 { "f32" } else { "i32" };
        format!("memref<?x{e}{}>", self.target.global())
    }
    fn arg(&self, i: usize) -> String {
        self.args[i].0.clone()
    }
    fn ld(&mut self, i: usize, idx: &str) -> String {
        let ty = self.mty(self.args[i].1);
        let a = self.arg(i);
        self.t.op(format!("memref.load {a}[{idx}] : {ty}"))
    }
    fn st(&mut self, v: &str, i: usize, idx: &str) {
        let ty = self.mty(self.args[i].1);
        let a = self.arg(i);
        self.t.line(format!("memref.store {v}, {a}[{idx}] : {ty}"));
    }
    fn sh_ty(&self, n: usize) -> String {
        match self.target {
            Target::Vulkan => format!("memref<{n}xf32, #spirv.storage_class<Workgroup>>"),
            Target::Cuda => format!("memref<{n}xf32, #gpu.address_space<workgroup>>"),
        }
    }
    fn sh_ld(&mut self, s: &str, n: usize, idx: &str) -> String {
        let ty = self.sh_ty(n);
        self.t.op(format!("memref.load {s}[{idx}] : {ty}"))
    }
    fn sh_st(&mut self, v: &str, s: &str, n: usize, idx: &str) {
        let ty = self.sh_ty(n);
        self.t.line(format!("memref.store {v}, {s}[{idx}] : {ty}"));
    }
    fn c(&mut self, i: i64) -> String {
        self.t.index(i)
    }
    fn f(&mut self, x: f32) -> String {
        self.t.f32(x)
    }
    fn ix(&mut self, op: &str, a: &str, b: &str) -> String {
        self.t.bin(op, a, b, "index")
    }
    fn fl(&mut self, op: &str, a: &str, b: &str) -> String {
        self.t.bin(op, a, b, "f32")
    }
    fn dim(&mut self, d: Dim) -> String {
        let mut v = self.c(d.c as i64);
        for (k, s) in [(d.t, self.tv.clone()), (d.p, self.pv.clone())] {
            if k > 0 {
                let kc = self.c(k as i64);
                let m = self.ix("muli", &s, &kc);
                v = self.ix("addi", &v, &m);
            }
        }
        v
    }
    fn cmp(&mut self, pred: &str, a: &str, b: &str) -> String {
        self.t.op(format!("arith.cmpi {pred}, {a}, {b} : index"))
    }
    fn sel(&mut self, c: &str, a: &str, b: &str, ty: &str) -> String {
        self.t.op(format!("arith.select {c}, {a}, {b} : {ty}"))
    }
    /// `scf.for` with loop-carried `f32` values; returns the final values.
    fn for_(
        &mut self,
        lo: &str,
        hi: &str,
        step: &str,
        init: &[String],
        body: impl FnOnce(&mut K, &str, &[String]) -> Vec<String>,
    ) -> Vec<String> {
        let iv = self.t.fresh();
        let carried: Vec<String> = init.iter().map(|_| self.t.fresh()).collect();
        let results: Vec<String> = init.iter().map(|_| self.t.fresh()).collect();
        let head = if init.is_empty() {
            format!("scf.for {iv} = {lo} to {hi} step {step} {{")
        } else {
            let it: Vec<String> = carried.iter().zip(init).map(|(c, i)| format!("{c} = {i}")).collect();
            let tys = vec!["f32"; init.len()].join(", ");
            let lhs = if results.len() == 1 {
                results[0].clone()
            } else {
                format!("{}:{}", results[0], results.len())
            };
            format!(
                "{lhs} = scf.for {iv} = {lo} to {hi} step {step} iter_args({}) -> ({tys}) {{",
                it.join(", ")
            )
        };
        self.t.open(head);
        let out = body(self, &iv, &carried);
        if !out.is_empty() {
            let tys = vec!["f32"; out.len()].join(", ");
            self.t.line(format!("scf.yield {} : {tys}", out.join(", ")));
        }
        self.t.close("}");
        if results.len() > 1 {
            (0..results.len()).map(|i| format!("{}#{i}", results[0])).collect()
        } else {
            results
        }
    }
    fn if_(&mut self, cond: &str, body: impl FnOnce(&mut K)) {
        self.t.open(format!("scf.if {cond} {{"));
        body(self);
        self.t.close("}");
    }
    fn barrier(&mut self) {
        self.t.line("gpu.barrier");
    }
    fn shared(&mut self, n: usize) -> String {
        let name = format!("%sh{}", self.shared.len());
        if self.target == Target::Vulkan {
            let ty = self.sh_ty(n);
            self.t.line(format!("{name} = memref.alloc() : {ty}"));
        }
        self.shared.push((name.clone(), n));
        name
    }
    /// `for j in tid..n step 64`.
    fn threads(&mut self, n: usize, body: impl FnOnce(&mut K, &str)) {
        let tid = "%tid".to_string();
        let hi = self.c(n as i64);
        let st = self.c(BLOCK as i64);
        self.for_(&tid, &hi, &st, &[], |k, j, _| {
            body(k, j);
            vec![]
        });
    }

    // Transcendentals in plain arith, identical on every target.
    fn exp(&mut self, x: &str) -> String {
        // exp(x) = 2^n · e^r, n = round(x·log2 e), r = x - n·ln2 (two-part ln2).
        let lo = self.f(-87.0);
        let hi = self.f(88.0);
        let under = self.t.op(format!("arith.cmpf olt, {x}, {lo} : f32"));
        let xc = self.t.op(format!("arith.minimumf {x}, {hi} : f32"));
        let xc = self.t.op(format!("arith.maximumf {xc}, {lo} : f32"));
        let l2e = self.f(std::f32::consts::LOG2_E);
        let a = self.fl("mulf", &xc, &l2e);
        // Round to nearest by truncating a ± 0.5 (any nearby integer keeps |r| small).
        let half = self.f(0.5);
        let nhalf = self.f(-0.5);
        let zero = self.f(0.0);
        let neg = self.t.op(format!("arith.cmpf olt, {a}, {zero} : f32"));
        let h = self.sel(&neg, &nhalf, &half, "f32");
        let ah = self.fl("addf", &a, &h);
        let ni = self.t.op(format!("arith.fptosi {ah} : f32 to i32"));
        let n = self.t.op(format!("arith.sitofp {ni} : i32 to f32"));
        let c1 = self.f(0.693_145_75);
        let c2 = self.f(1.428_606_8e-6);
        let t1 = self.fl("mulf", &n, &c1);
        let r = self.fl("subf", &xc, &t1);
        let t2 = self.fl("mulf", &n, &c2);
        let r = self.fl("subf", &r, &t2);
        // e^r on |r| ≤ ln2/2: Taylor to degree 7 (relative error < 2e-8).
        let coef = [1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0];
        let mut p = self.f(coef[0]);
        for c in &coef[1..] {
            let m = self.fl("mulf", &p, &r);
            let cc = self.f(*c);
            p = self.fl("addf", &m, &cc);
        }
        let bias = self.t.int(127, "i32");
        let e = self.t.bin("addi", &ni, &bias, "i32");
        let sh = self.t.int(23, "i32");
        let bits = self.t.bin("shli", &e, &sh, "i32");
        let scale = self.t.op(format!("arith.bitcast {bits} : i32 to f32"));
        let v = self.fl("mulf", &p, &scale);
        let z = self.f(0.0);
        self.sel(&under, &z, &v, "f32")
    }
    fn rsqrt(&mut self, x: &str) -> String {
        let bits = self.t.op(format!("arith.bitcast {x} : f32 to i32"));
        let one = self.t.int(1, "i32");
        let half_bits = self.t.bin("shrui", &bits, &one, "i32");
        let magic = self.t.int(0x5f37_59df, "i32");
        let g = self.t.bin("subi", &magic, &half_bits, "i32");
        let mut y = self.t.op(format!("arith.bitcast {g} : i32 to f32"));
        let half = self.f(0.5);
        let three_halves = self.f(1.5);
        let hx = self.fl("mulf", x, &half);
        for _ in 0..4 {
            let yy = self.fl("mulf", &y, &y);
            let t = self.fl("mulf", &hx, &yy);
            let d = self.fl("subf", &three_halves, &t);
            y = self.fl("mulf", &y, &d);
        }
        y
    }
    fn tanh(&mut self, x: &str) -> String {
        // tanh(x) = 1 - 2/(e^{2x} + 1)
        let two = self.f(2.0);
        let x2 = self.fl("mulf", x, &two);
        let e = self.exp(&x2);
        let one = self.f(1.0);
        let d = self.fl("addf", &e, &one);
        let q = self.fl("divf", &two, &d);
        self.fl("subf", &one, &q)
    }
    fn erf(&mut self, x: &str) -> String {
        let zero = self.f(0.0);
        let neg = self.t.op(format!("arith.cmpf olt, {x}, {zero} : f32"));
        let nx = self.t.op(format!("arith.negf {x} : f32"));
        let ax = self.sel(&neg, &nx, x, "f32");
        let p = self.f(0.327_591_1);
        let one = self.f(1.0);
        let px = self.fl("mulf", &p, &ax);
        let d = self.fl("addf", &one, &px);
        let t = self.fl("divf", &one, &d);
        let a = [1.061_405_4_f32, -1.453_152_1, 1.421_413_8, -0.284_496_74, 0.254_829_6];
        let mut poly = self.f(a[0]);
        for c in &a[1..] {
            let m = self.fl("mulf", &poly, &t);
            let cc = self.f(*c);
            poly = self.fl("addf", &m, &cc);
        }
        poly = self.fl("mulf", &poly, &t);
        let x2 = self.fl("mulf", &ax, &ax);
        let nx2 = self.t.op(format!("arith.negf {x2} : f32"));
        let e = self.exp(&nx2);
        let pe = self.fl("mulf", &poly, &e);
        let y = self.fl("subf", &one, &pe);
        let ny = self.t.op(format!("arith.negf {y} : f32"));
        self.sel(&neg, &ny, &y, "f32")
    }
    fn act(&mut self, a: Act, x: &str) -> String {
        match a {
            Act::Relu => {
                let z = self.f(0.0);
                self.t.op(format!("arith.maximumf {x}, {z} : f32"))
            }
            Act::Gelu => {
                let c = self.f(std::f32::consts::FRAC_1_SQRT_2);
                let a = self.fl("mulf", x, &c);
                let e = self.erf(&a);
                let one = self.f(1.0);
                let s = self.fl("addf", &e, &one);
                let half = self.f(0.5);
                let hx = self.fl("mulf", x, &half);
                self.fl("mulf", &hx, &s)
            }
            Act::GeluTanh => {
                let x2 = self.fl("mulf", x, x);
                let x3 = self.fl("mulf", &x2, x);
                let k = self.f(0.044715);
                let kx3 = self.fl("mulf", &x3, &k);
                let inner = self.fl("addf", x, &kx3);
                let c = self.f((2.0 / std::f32::consts::PI).sqrt());
                let a = self.fl("mulf", &inner, &c);
                let th = self.tanh(&a);
                let one = self.f(1.0);
                let s = self.fl("addf", &th, &one);
                let half = self.f(0.5);
                let hx = self.fl("mulf", x, &half);
                self.fl("mulf", &hx, &s)
            }
            Act::Silu => {
                let n = self.t.op(format!("arith.negf {x} : f32"));
                let e = self.exp(&n);
                let one = self.f(1.0);
                let d = self.fl("addf", &e, &one);
                self.fl("divf", x, &d)
            }
        }
    }
    /// Sum of a value over the workgroup, the same in every thread.
    fn wg_sum(&mut self, v: &str, sh: &str) -> String {
        self.sh_st(v, sh, BLOCK, "%tid");
        self.barrier();
        let z = self.f(0.0);
        let lo = self.c(0);
        let hi = self.c(BLOCK as i64);
        let one = self.c(1);
        let r = self.for_(&lo, &hi, &one, &[z], |k, i, acc| {
            let x = k.sh_ld(sh, BLOCK, i);
            vec![k.fl("addf", &acc[0], &x)]
        });
        self.barrier();
        r[0].clone()
    }
}

fn kernel_text(target: Target, name: &str, k: &Kern) -> (Vec<ArgKind>, String) {
    use ArgKind::{F32, I32};
    let inputs: Vec<ArgKind> = match k {
        Kern::Positions => vec![],
        Kern::Gather { .. } => vec![F32, I32],
        Kern::Binary { .. } => vec![F32, F32],
        Kern::Unary { .. } | Kern::SplitQkv { .. } | Kern::SplitHeads { .. } | Kern::MergeHeads { .. } => {
            vec![F32]
        }
        Kern::Norm { bias, .. } => vec![F32; if *bias { 3 } else { 2 }],
        Kern::Linear { bias, .. } => vec![F32; if *bias { 3 } else { 2 }],
        Kern::Rope { .. } => vec![F32, I32, F32],
        Kern::Attention(_) => vec![F32, F32, F32, I32],
        Kern::LastRow { int, .. } => vec![if *int { I32 } else { F32 }],
        Kern::CacheStore { .. } => vec![F32],
    };
    let out_kind = if matches!(k, Kern::Positions | Kern::LastRow { int: true, .. }) { I32 } else { F32 };
    let mut kinds = inputs;
    if matches!(k, Kern::CacheStore { .. }) {
        kinds.push(F32); // the cache
    } else {
        kinds.push(out_kind);
    }
    kinds.push(I32); // dims
    let mut kb = K {
        t: Text::default(),
        target,
        shared: Vec::new(),
        args: kinds.iter().enumerate().map(|(i, &a)| (format!("%a{i}"), a)).collect(),
        tv: String::new(),
        pv: String::new(),
    };
    // The body first (it decides the workgroup memory), then the signature around it.
    kb.t.line("%tid = gpu.thread_id x");
    kb.t.line("%bx = gpu.block_id x");
    kb.t.line("%by = gpu.block_id y");
    let dims = kinds.len() - 1;
    let c0 = kb.c(0);
    let c1 = kb.c(1);
    let t32 = kb.ld(dims, &c0);
    let p32 = kb.ld(dims, &c1);
    kb.tv = kb.t.op(format!("arith.index_cast {t32} : i32 to index"));
    kb.pv = kb.t.op(format!("arith.index_cast {p32} : i32 to index"));
    body(&mut kb, k);
    let params: Vec<String> = kb.args.iter().map(|(n, a)| format!("{n}: {}", kb.mty(*a))).collect();
    let mut head = format!("gpu.func @{name}({})", params.join(", "));
    if target == Target::Cuda && !kb.shared.is_empty() {
        let w: Vec<String> = kb.shared.iter().map(|(n, s)| format!("{n}: {}", kb.sh_ty(*s))).collect();
        head += &format!(" workgroup({})", w.join(", "));
    }
    head += match target {
        Target::Vulkan => {
            " kernel attributes {spirv.entry_point_abi = #spirv.entry_point_abi<workgroup_size = [64, 1, 1]>} {"
        }
        Target::Cuda => " kernel attributes {known_block_size = array<i32: 64, 1, 1>} {",
    };
    let mut text = String::new();
    text += &head;
    text.push('\n');
    for l in kb.t.out.lines() {
        text += "  ";
        text += l;
        text.push('\n');
    }
    text += "  gpu.return\n}\n";
    (kinds, text)
}

/// The kernel bodies. Argument `i` is `%a{i}`; the output follows the inputs.
fn body(k: &mut K, kern: &Kern) {
    let row = "%bx".to_string();
    match *kern {
        Kern::Positions => {
            let t = k.tv.clone();
            let ok = k.cmp("ult", &row, &t);
            let z = k.c(0);
            let first = k.cmp("eq", "%tid", &z);
            let both = k.t.bin("andi", &ok, &first, "i1");
            k.if_(&both, |k| {
                let p = k.pv.clone();
                let v = k.ix("addi", &p, &row);
                let v = k.t.op(format!("arith.index_cast {v} : index to i32"));
                k.st(&v, 0, &row);
            });
        }
        Kern::Gather { d, offset } => {
            let id = k.ld(1, &row);
            let id = k.t.op(format!("arith.index_cast {id} : i32 to index"));
            let off = k.c(offset as i64);
            let r = k.ix("addi", &id, &off);
            let dc = k.c(d as i64);
            let src = k.ix("muli", &r, &dc);
            let dst = k.ix("muli", &row, &dc);
            k.threads(d, |k, j| {
                let s = k.ix("addi", &src, j);
                let v = k.ld(0, &s);
                let o = k.ix("addi", &dst, j);
                k.st(&v, 2, &o);
            });
        }
        Kern::Binary { mul, w } => {
            let wc = k.c(w as i64);
            let base = k.ix("muli", &row, &wc);
            k.threads(w, |k, j| {
                let i = k.ix("addi", &base, j);
                let a = k.ld(0, &i);
                let b = k.ld(1, &i);
                let v = k.fl(if mul { "mulf" } else { "addf" }, &a, &b);
                k.st(&v, 2, &i);
            });
        }
        Kern::Unary { op, w } => {
            let wc = k.c(w as i64);
            let base = k.ix("muli", &row, &wc);
            k.threads(w, |k, j| {
                let i = k.ix("addi", &base, j);
                let a = k.ld(0, &i);
                let v = match op {
                    Unary::Scale(s) => {
                        let c = k.f(s as f32);
                        k.fl("mulf", &a, &c)
                    }
                    Unary::Act(act) => k.act(act, &a),
                    Unary::RoundBf16 => super::text::round_bf16(&mut k.t, &a),
                };
                k.st(&v, 1, &i);
            });
        }
        Kern::Norm { d, eps, layer, bias, unit } => {
            let sh = k.shared(BLOCK);
            let dc = k.c(d as i64);
            let base = k.ix("muli", &row, &dc);
            let hi = k.c(d as i64);
            let st = k.c(BLOCK as i64);
            let inv_d = k.f(1.0 / d as f32);
            let mean = if layer {
                let z = k.f(0.0);
                let part = k.for_("%tid", &hi, &st, &[z], |k, j, acc| {
                    let i = k.ix("addi", &base, j);
                    let x = k.ld(0, &i);
                    vec![k.fl("addf", &acc[0], &x)]
                });
                let s = k.wg_sum(&part[0], &sh);
                Some(k.fl("mulf", &s, &inv_d))
            } else {
                None
            };
            let z = k.f(0.0);
            let part = k.for_("%tid", &hi, &st, &[z], |k, j, acc| {
                let i = k.ix("addi", &base, j);
                let mut x = k.ld(0, &i);
                if let Some(m) = &mean {
                    x = k.fl("subf", &x, m);
                }
                let sq = k.fl("mulf", &x, &x);
                vec![k.fl("addf", &acc[0], &sq)]
            });
            let s = k.wg_sum(&part[0], &sh);
            let var = k.fl("mulf", &s, &inv_d);
            let e = k.f(eps as f32);
            let ve = k.fl("addf", &var, &e);
            let r = k.rsqrt(&ve);
            let out = if bias { 3 } else { 2 };
            k.threads(d, |k, j| {
                let i = k.ix("addi", &base, j);
                let mut x = k.ld(0, &i);
                if let Some(m) = &mean {
                    x = k.fl("subf", &x, m);
                }
                x = k.fl("mulf", &x, &r);
                let mut gw = k.ld(1, j);
                if unit {
                    let one = k.f(1.0);
                    gw = k.fl("addf", &gw, &one);
                }
                x = k.fl("mulf", &x, &gw);
                if bias {
                    let b = k.ld(2, j);
                    x = k.fl("addf", &x, &b);
                }
                k.st(&x, out, &i);
            });
        }
        Kern::Linear { inn, out, transposed, bias, rows } => {
            // Workgroup (bx, by): columns bx·64 + tid of rows by·4 .. by·4+4.
            let sh = k.shared(LIN_ROWS * BLOCK);
            let n_rows = k.dim(rows);
            let bc = k.c(BLOCK as i64);
            let col0 = k.ix("muli", &row, &bc);
            let col = k.ix("addi", &col0, "%tid");
            let lr = k.c(LIN_ROWS as i64);
            let r0 = k.ix("muli", "%by", &lr);
            let outc = k.c(out as i64);
            let col_ok = k.cmp("ult", &col, &outc);
            let innc = k.c(inn as i64);
            let zeros: Vec<String> = (0..LIN_ROWS).map(|_| k.f(0.0)).collect();
            let lo = k.c(0);
            let acc = k.for_(&lo, &innc, &bc, &zeros, |k, k0, acc| {
                // Stage x[r0..r0+4][k0..k0+64] in workgroup memory.
                for r in 0..LIN_ROWS {
                    let rc = k.c(r as i64);
                    let rr = k.ix("addi", &r0, &rc);
                    let kk = k.ix("addi", k0, "%tid");
                    let rok = k.cmp("ult", &rr, &n_rows);
                    let kok = k.cmp("ult", &kk, &innc);
                    let ok = k.t.bin("andi", &rok, &kok, "i1");
                    // Clamp the address so the load is always in bounds; select zero.
                    let z = k.c(0);
                    let rs = k.sel(&rok, &rr, &z, "index");
                    let ks = k.sel(&kok, &kk, &z, "index");
                    let a = k.ix("muli", &rs, &innc);
                    let a = k.ix("addi", &a, &ks);
                    let x = k.ld(0, &a);
                    let zf = k.f(0.0);
                    let v = k.sel(&ok, &x, &zf, "f32");
                    let si = k.c((r * BLOCK) as i64);
                    let si = k.ix("addi", &si, "%tid");
                    k.sh_st(&v, &sh, LIN_ROWS * BLOCK, &si);
                }
                k.barrier();
                let kend = k.ix("addi", k0, &bc);
                let kend = k.t.op(format!("arith.minui {kend}, {innc} : index"));
                let n = k.ix("subi", &kend, k0);
                let one = k.c(1);
                let z = k.c(0);
                let colc = k.sel(&col_ok, &col, &z, "index");
                let acc = k.for_(&z, &n, &one, acc, |k, kk, acc| {
                    let kabs = k.ix("addi", k0, kk);
                    let wi = if transposed {
                        let a = k.ix("muli", &kabs, &outc);
                        k.ix("addi", &a, &colc)
                    } else {
                        let a = k.ix("muli", &colc, &innc);
                        k.ix("addi", &a, &kabs)
                    };
                    let w = k.ld(1, &wi);
                    (0..LIN_ROWS)
                        .map(|r| {
                            let si = k.c((r * BLOCK) as i64);
                            let si = k.ix("addi", &si, kk);
                            let x = k.sh_ld(&sh, LIN_ROWS * BLOCK, &si);
                            let p = k.fl("mulf", &x, &w);
                            k.fl("addf", &acc[r], &p)
                        })
                        .collect()
                });
                k.barrier();
                acc
            });
            let out_arg = if bias { 3 } else { 2 };
            for (r, a) in acc.iter().enumerate() {
                let rc = k.c(r as i64);
                let rr = k.ix("addi", &r0, &rc);
                let rok = k.cmp("ult", &rr, &n_rows);
                let ok = k.t.bin("andi", &rok, &col_ok, "i1");
                k.if_(&ok, |k| {
                    let mut v = a.clone();
                    if bias {
                        let b = k.ld(2, &col);
                        v = k.fl("addf", &v, &b);
                    }
                    let o = k.ix("muli", &rr, &outc);
                    let o = k.ix("addi", &o, &col);
                    k.st(&v, out_arg, &o);
                });
            }
        }
        Kern::SplitQkv { layout, part, h, kv, hd } => {
            let n = if part == QkvPart::Q { h } else { kv };
            let width = n * hd;
            let win = (h + 2 * kv) * hd;
            let wc = k.c(width as i64);
            let winc = k.c(win as i64);
            let dst = k.ix("muli", &row, &wc);
            let src = k.ix("muli", &row, &winc);
            k.threads(width, |k, j| {
                let hdc = k.c(hd as i64);
                let head = k.ix("divui", j, &hdc);
                let within = k.ix("remui", j, &hdc);
                let start = match layout {
                    QkvLayout::Concat => {
                        let b = k.c(match part {
                            QkvPart::Q => 0,
                            QkvPart::K => h as i64,
                            QkvPart::V => (h + kv) as i64,
                        });
                        let hh = k.ix("addi", &head, &b);
                        k.ix("muli", &hh, &hdc)
                    }
                    QkvLayout::Grouped => {
                        let gr = h / kv;
                        let group = k.c(((gr + 2) * hd) as i64);
                        match part {
                            QkvPart::Q => {
                                let grc = k.c(gr as i64);
                                let gi = k.ix("divui", &head, &grc);
                                let gj = k.ix("remui", &head, &grc);
                                let a = k.ix("muli", &gi, &group);
                                let b = k.ix("muli", &gj, &hdc);
                                k.ix("addi", &a, &b)
                            }
                            QkvPart::K | QkvPart::V => {
                                let kk = if part == QkvPart::K { gr } else { gr + 1 };
                                let a = k.ix("muli", &head, &group);
                                let b = k.c((kk * hd) as i64);
                                k.ix("addi", &a, &b)
                            }
                        }
                    }
                };
                let c = k.ix("addi", &start, &within);
                let s = k.ix("addi", &src, &c);
                let v = k.ld(0, &s);
                let o = k.ix("addi", &dst, j);
                k.st(&v, 1, &o);
            });
        }
        Kern::SplitHeads { h, hd, rows } | Kern::MergeHeads { h, hd, rows } => {
            // Row r of [rows, h·hd] ↔ [h, rows, hd].
            let split = matches!(kern, Kern::SplitHeads { .. });
            let n = k.dim(rows);
            let w = k.c((h * hd) as i64);
            let flat = k.ix("muli", &row, &w);
            k.threads(h * hd, |k, j| {
                let hdc = k.c(hd as i64);
                let head = k.ix("divui", j, &hdc);
                let i = k.ix("remui", j, &hdc);
                let a = k.ix("muli", &head, &n);
                let a = k.ix("addi", &a, &row);
                let a = k.ix("muli", &a, &hdc);
                let per_head = k.ix("addi", &a, &i);
                let f = k.ix("addi", &flat, j);
                let (src, dst) = if split { (f, per_head) } else { (per_head, f) };
                let v = k.ld(0, &src);
                k.st(&v, 1, &dst);
            });
        }
        Kern::Rope { hd, rd, interleaved, rows, max_seq } => {
            // Workgroup = (head, row); the position indexes the cos/sin table.
            let n = k.dim(rows);
            let r = k.ix("remui", &row, &n);
            let p = k.ld(1, &r);
            let p = k.t.op(format!("arith.index_cast {p} : i32 to index"));
            let hdc = k.c(hd as i64);
            let base = k.ix("muli", &row, &hdc);
            let half = rd / 2;
            let halfc = k.c(half as i64);
            let tab = k.ix("muli", &p, &halfc);
            let sin_off = k.c((max_seq * half) as i64);
            k.threads(hd, |k, i| {
                let rdc = k.c(rd as i64);
                let rot = k.cmp("ult", i, &rdc);
                let two = k.c(2);
                let one = k.c(1);
                let (kk, partner, first) = if interleaved {
                    let kk = k.ix("divui", i, &two);
                    let odd = k.ix("remui", i, &two);
                    let z = k.c(0);
                    let first = k.cmp("eq", &odd, &z);
                    let up = k.ix("addi", i, &one);
                    let down = k.ix("subi", i, &one);
                    (kk, k.sel(&first, &up, &down, "index"), first)
                } else {
                    let first = k.cmp("ult", i, &halfc);
                    let kk = k.ix("remui", i, &halfc);
                    let up = k.ix("addi", i, &halfc);
                    let down = k.ix("subi", i, &halfc);
                    (kk, k.sel(&first, &up, &down, "index"), first)
                };
                let z = k.c(0);
                let partner = k.sel(&rot, &partner, i, "index");
                let kk = k.sel(&rot, &kk, &z, "index");
                let own_i = k.ix("addi", &base, i);
                let oth_i = k.ix("addi", &base, &partner);
                let own = k.ld(0, &own_i);
                let oth = k.ld(0, &oth_i);
                let ti = k.ix("addi", &tab, &kk);
                let cos = k.ld(2, &ti);
                let si = k.ix("addi", &ti, &sin_off);
                let sin = k.ld(2, &si);
                let ac = k.fl("mulf", &own, &cos);
                let bs = k.fl("mulf", &oth, &sin);
                let lo = k.fl("subf", &ac, &bs);
                let hi = k.fl("addf", &ac, &bs);
                let v = k.sel(&first, &lo, &hi, "f32");
                let v = k.sel(&rot, &v, &own, "f32");
                k.st(&v, 3, &own_i);
            });
        }
        Kern::Attention(a) => attention(k, &a),
        Kern::LastRow { w, rows, .. } => {
            let n = k.dim(rows);
            let one = k.c(1);
            let last = k.ix("subi", &n, &one);
            let wc = k.c(w as i64);
            let base = k.ix("muli", &last, &wc);
            k.threads(w, |k, j| {
                let s = k.ix("addi", &base, j);
                let v = k.ld(0, &s);
                k.st(&v, 1, j);
            });
        }
        Kern::CacheStore { hd, max_seq, rows } => {
            // Workgroup = (group, row): src [G, rows, hd] → cache [G, max_seq, hd] at P + row.
            let n = k.dim(rows);
            let gi = k.ix("divui", &row, &n);
            let r = k.ix("remui", &row, &n);
            let p = k.pv.clone();
            let pos = k.ix("addi", &p, &r);
            let ms = k.c(max_seq as i64);
            let hdc = k.c(hd as i64);
            let d = k.ix("muli", &gi, &ms);
            let d = k.ix("addi", &d, &pos);
            let dst = k.ix("muli", &d, &hdc);
            let src = k.ix("muli", &row, &hdc);
            k.threads(hd, |k, i| {
                let si = k.ix("addi", &src, i);
                let v = k.ld(0, &si);
                let di = k.ix("addi", &dst, i);
                k.st(&v, 1, &di);
            });
        }
    }
}

/// Online softmax attention for one (head, query row) per workgroup, 64 keys at a time.
fn attention(k: &mut K, a: &Attn) {
    let Attn { h, g, hd, scale, causal, window, alibi, rows, s, stride } = *a;
    let row = "%bx".to_string();
    let sc = k.shared(BLOCK);
    let acc_sh = k.shared(hd.max(1));
    let q_sh = k.shared(hd.max(1));
    let n = k.dim(rows);
    let s_len = k.dim(s);
    let head = k.ix("divui", &row, &n);
    let t = k.ix("remui", &row, &n);
    let per = k.c((h / g) as i64);
    let grp = k.ix("divui", &head, &per);
    let hdc = k.c(hd as i64);
    let kv_stride = match stride {
        Some(st) => k.c(st as i64),
        None => k.ix("muli", &s_len, &hdc),
    };
    let kv_base = k.ix("muli", &grp, &kv_stride);
    let qbase = k.ix("muli", &row, &hdc);
    let pos = k.ld(3, &t);
    let pos = k.t.op(format!("arith.index_cast {pos} : i32 to index"));
    k.threads(hd, |k, j| {
        let qi = k.ix("addi", &qbase, j);
        let q = k.ld(0, &qi);
        k.sh_st(&q, &q_sh, hd, j);
        let z = k.f(0.0);
        k.sh_st(&z, &acc_sh, hd, j);
    });
    k.barrier();
    let slope = if alibi {
        // The head's slope, chosen among constants.
        let slopes = alibi_slopes(h);
        let mut v = k.f(slopes[0] as f32);
        for (i, sl) in slopes.iter().enumerate().skip(1) {
            let ic = k.c(i as i64);
            let is = k.cmp("eq", &head, &ic);
            let c = k.f(*sl as f32);
            v = k.sel(&is, &c, &v, "f32");
        }
        Some(v)
    } else {
        None
    };
    let ninf = k.f(f32::NEG_INFINITY);
    let zf = k.f(0.0);
    let lo = k.c(0);
    let bc = k.c(BLOCK as i64);
    let res = k.for_(&lo, &s_len, &bc, &[ninf.clone(), zf.clone()], |k, c0, ml| {
        let (m, l) = (ml[0].clone(), ml[1].clone());
        // Each thread scores one key of the chunk.
        let key = k.ix("addi", c0, "%tid");
        let in_range = k.cmp("ult", &key, &s_len);
        let z = k.c(0);
        let keyc = k.sel(&in_range, &key, &z, "index");
        let kb = k.ix("muli", &keyc, &hdc);
        let kb = k.ix("addi", &kv_base, &kb);
        let zero = k.f(0.0);
        let lo = k.c(0);
        let one = k.c(1);
        let dot = k.for_(&lo, &hdc, &one, &[zero], |k, d, acc| {
            let q = k.sh_ld(&q_sh, hd, d);
            let ki = k.ix("addi", &kb, d);
            let kv = k.ld(1, &ki);
            let p = k.fl("mulf", &q, &kv);
            vec![k.fl("addf", &acc[0], &p)]
        });
        let scc = k.f(scale as f32);
        let mut v = k.fl("mulf", &dot[0], &scc);
        let pk = k.t.op(format!("arith.index_cast {pos} : index to i32"));
        let kk = k.t.op(format!("arith.index_cast {keyc} : index to i32"));
        let dist = k.t.bin("subi", &pk, &kk, "i32");
        if let Some(sl) = &slope {
            let df = k.t.op(format!("arith.sitofp {dist} : i32 to f32"));
            let b = k.fl("mulf", sl, &df);
            v = k.fl("subf", &v, &b);
        }
        let mut vis = in_range.clone();
        if causal {
            let z = k.t.int(0, "i32");
            let c = k.t.op(format!("arith.cmpi sge, {dist}, {z} : i32"));
            vis = k.t.bin("andi", &vis, &c, "i1");
        }
        if let Some(w) = window {
            let z = k.t.int(0, "i32");
            let neg = k.t.bin("subi", &z, &dist, "i32");
            let ad = k.t.op(format!("arith.maxsi {dist}, {neg} : i32"));
            let wc = k.t.int(w as i64, "i32");
            let c = k.t.op(format!("arith.cmpi slt, {ad}, {wc} : i32"));
            vis = k.t.bin("andi", &vis, &c, "i1");
        }
        let ninf = k.f(f32::NEG_INFINITY);
        let v = k.sel(&vis, &v, &ninf, "f32");
        k.sh_st(&v, &sc, BLOCK, "%tid");
        k.barrier();
        // Every thread: the chunk's max, the new running max, and the rescaling.
        let lo = k.c(0);
        let bcc = k.c(BLOCK as i64);
        let cm = k.for_(&lo, &bcc, &one, std::slice::from_ref(&m), |k, i, acc| {
            let x = k.sh_ld(&sc, BLOCK, i);
            vec![k.t.op(format!("arith.maximumf {}, {x} : f32", acc[0]))]
        });
        let m_new = cm[0].clone();
        let dead = k.t.op(format!("arith.cmpf oeq, {m_new}, {ninf} : f32"));
        let zf = k.f(0.0);
        let m_safe = k.sel(&dead, &zf, &m_new, "f32");
        let dm = k.fl("subf", &m, &m_safe);
        let corr = k.exp(&dm);
        k.barrier();
        // Probabilities of the chunk in place of the scores.
        let x = k.sh_ld(&sc, BLOCK, "%tid");
        let dx = k.fl("subf", &x, &m_safe);
        let p = k.exp(&dx);
        k.barrier();
        k.sh_st(&p, &sc, BLOCK, "%tid");
        k.barrier();
        let zero = k.f(0.0);
        let sum = k.for_(&lo, &bcc, &one, &[zero], |k, i, acc| {
            let x = k.sh_ld(&sc, BLOCK, i);
            vec![k.fl("addf", &acc[0], &x)]
        });
        let lc = k.fl("mulf", &l, &corr);
        let l_new = k.fl("addf", &lc, &sum[0]);
        // acc[j] = acc[j]·corr + Σ_i p_i · v[key_i][j], over the keys in range.
        let cnt = k.ix("subi", &s_len, c0);
        let cnt = k.t.op(format!("arith.minui {cnt}, {bcc} : index"));
        k.threads(hd, |k, j| {
            let a = k.sh_ld(&acc_sh, hd, j);
            let a = k.fl("mulf", &a, &corr);
            let lo = k.c(0);
            let one = k.c(1);
            let r = k.for_(&lo, &cnt, &one, &[a], |k, i, acc| {
                let p = k.sh_ld(&sc, BLOCK, i);
                let key = k.ix("addi", c0, i);
                let vi = k.ix("muli", &key, &hdc);
                let vi = k.ix("addi", &kv_base, &vi);
                let vi = k.ix("addi", &vi, j);
                let v = k.ld(2, &vi);
                let pv = k.fl("mulf", &p, &v);
                vec![k.fl("addf", &acc[0], &pv)]
            });
            k.sh_st(&r[0], &acc_sh, hd, j);
        });
        k.barrier();
        vec![m_new, l_new]
    });
    let l = res[1].clone();
    k.threads(hd, |k, j| {
        let a = k.sh_ld(&acc_sh, hd, j);
        let v = k.fl("divf", &a, &l);
        let o = k.ix("addi", &qbase, j);
        k.st(&v, 4, &o);
    });
}
