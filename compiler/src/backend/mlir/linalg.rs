//! Prefill and decode graphs → `func` + `linalg` on tensors (the `mlir` stage).
//!
//! Each graph becomes `func.func @tfc__<graph>` with the LLVM backend's signature
//! `(arena, cache, tokens, types, T, P, weights, out, pool)`, so the library's C half
//! calls it the same way. Raw pointers become memrefs through a descriptor built in the
//! `llvm` dialect, memrefs become tensors with `bufferization.to_tensor`, and every op is
//! a `linalg.generic` (or a reshape) on tensors, but the products: linear maps and
//! attention's scores and weighted values are kernels on the thread pool
//! (`kernels.rs`); results leave through `linalg.copy` into the output buffer and the KV
//! cache. The fused attention node is its own sequence: scores, scale/ALiBi/mask, a
//! softmax in three reductions, and the weighted sum of values, grouped heads reading
//! their key/value head (`h / per`).

mod kernels;
mod mixture;

use std::collections::{BTreeSet, HashMap};

use super::text::{elem, id_map, map, round_bf16, Text};
use super::MlirError;
use crate::backend::layout::Layout;
use crate::backend::weights::WeightTable;
use crate::ir::{
    alibi_slopes, Act, Arith, CacheKind, DType, Dim, Graph, HeadStart, InputKind, NodeId, Op, TensorType,
};
use crate::Compiled;

/// The linalg backend's entry: the module of a compiled spec's library as MLIR text, one
/// function per graph.
/// `registers`: the target's vector registers, which size the kernels' register tiles.
pub fn emit(
    c: &Compiled,
    weights: &WeightTable,
    layout: &Layout,
    registers: usize,
) -> Result<String, MlirError> {
    for (name, _, dtype) in &weights.names {
        if !matches!(dtype, DType::F32 | DType::BF16) {
            return Err(unsupported(format!("{dtype} weights (`{name}`); use f32 or bf16")));
        }
    }
    let mut t = Text::default();
    t.open("module {");
    let tile = kernels::Tile::for_registers(registers);
    let mut used = BTreeSet::new();
    for (name, graph) in
        [("prefill", Some(&c.prefill)), ("prefill_all", Some(&c.prefill_all)), ("decode", c.decode.as_ref())]
    {
        Func::emit(&mut t, name, graph, weights, layout, tile, &mut used)?;
    }
    kernels::declare_pool(&mut t);
    for k in used {
        kernels::emit(&mut t, k, tile);
    }
    t.close("}");
    Ok(t.out)
}

/// A node's type, operands, output tensor type, identity map and parallel iterators.
struct Local {
    ty: TensorType,
    ops: Vec<NodeId>,
    out_t: String,
    ident: String,
    par: Vec<&'static str>,
}

struct Func<'a> {
    t: &'a mut Text,
    g: &'a Graph,
    weights: &'a WeightTable,
    layout: &'a Layout,
    /// Index values of the symbols `T` and `P`, and of every dimension computed so far.
    dims: HashMap<Dim, String>,
    vals: HashMap<NodeId, String>,
    /// `memref<G x max_seq x hd>` views of each cache region.
    cache_views: HashMap<(u32, CacheKind), String>,
    tile: kernels::Tile,
    /// The kernels the module's functions call.
    kernels: &'a mut BTreeSet<kernels::Kernel>,
}

const SIG: &str = "%arena: !llvm.ptr, %cache: !llvm.ptr, %tokens: !llvm.ptr, %types: !llvm.ptr, \
                   %T: i64, %P: i64, %weights: !llvm.ptr, %out: !llvm.ptr, %pool: !llvm.ptr";

fn tensor(shape: &[Dim], el: &str) -> String {
    let mut s = String::from("tensor<");
    for d in shape {
        match d.as_fixed() {
            Some(n) => s += &format!("{n}x"),
            None => s += "?x",
        }
    }
    s + el + ">"
}

fn ttype(ty: &TensorType) -> String {
    tensor(&ty.shape, elem(ty.dtype))
}

fn memref_of(ty: &str) -> String {
    ty.replacen("tensor<", "memref<", 1)
}

fn unsupported(what: String) -> MlirError {
    MlirError::Unsupported(what)
}

impl<'a> Func<'a> {
    fn emit(
        t: &mut Text,
        name: &str,
        g: Option<&Graph>,
        weights: &WeightTable,
        layout: &Layout,
        tile: kernels::Tile,
        kernels: &mut BTreeSet<kernels::Kernel>,
    ) -> Result<(), MlirError> {
        t.open(format!("func.func @tfc__{name}({SIG}) {{"));
        if let Some(g) = g {
            let mut f = Func {
                t,
                g,
                weights,
                layout,
                dims: HashMap::new(),
                vals: HashMap::new(),
                cache_views: HashMap::new(),
                tile,
                kernels,
            };
            f.body()?;
        }
        t.line("return");
        t.close("}");
        Ok(())
    }

    fn body(&mut self) -> Result<(), MlirError> {
        let ti = self.t.op("arith.index_cast %T : i64 to index");
        let pi = self.t.op("arith.index_cast %P : i64 to index");
        self.dims.insert(Dim::T, ti);
        self.dims.insert(Dim::P, pi);
        self.kernel_args();
        let g = self.g;
        let order = g.topo_order().map_err(|_| MlirError::Mlir("bug: cyclic graph".into()))?;
        let cache_out = g.cache_outputs();
        for &n in &order {
            let v = self.node(n)?;
            if let Some(v) = v {
                self.vals.insert(n, v);
            }
            for &(layer, kind) in cache_out.get(&n).into_iter().flatten() {
                self.store_cache(n, layer, kind);
            }
        }
        // The main output goes to the caller's buffer.
        let (_, main) = g.main_output();
        let ty = ttype(g.ty(main));
        let shape = g.ty(main).shape.clone();
        let view = self.view("%out", &shape, "f32");
        let v = self.vals[&main].clone();
        self.copy_out(&v, &ty, &view, &memref_of(&ty));
        Ok(())
    }

    /// Writes a tensor into a buffer the caller owns. A `linalg.copy` between buffers
    /// rather than `materialize_in_destination`, whose `memref.copy` of a strided
    /// destination would need MLIR's C runner library.
    fn copy_out(&mut self, v: &str, ty: &str, dst: &str, dst_ty: &str) {
        let m = self.t.op(format!("bufferization.to_buffer {v} read_only : {ty} to {}", memref_of(ty)));
        self.t.line(format!("linalg.copy ins({m} : {}) outs({dst} : {dst_ty})", memref_of(ty)));
    }

    /// The index value of a dimension.
    fn dim(&mut self, d: Dim) -> String {
        if let Some(v) = self.dims.get(&d) {
            return v.clone();
        }
        let mut v = self.t.index(d.c as i64);
        for (k, sym) in [(d.t, Dim::T), (d.p, Dim::P)] {
            if k > 0 {
                let s = self.dims[&sym].clone();
                let term = if k == 1 {
                    s
                } else {
                    let kc = self.t.index(k as i64);
                    self.t.bin("muli", &s, &kc, "index")
                };
                v = self.t.bin("addi", &v, &term, "index");
            }
        }
        self.dims.insert(d, v.clone());
        v
    }

    /// `tensor.empty` of a shape, naming its dynamic sizes.
    fn empty(&mut self, shape: &[Dim], el: &str) -> String {
        let dynamic: Vec<String> =
            shape.iter().filter(|d| d.as_fixed().is_none()).map(|&d| self.dim(d)).collect();
        self.t.op(format!("tensor.empty({}) : {}", dynamic.join(", "), tensor(shape, el)))
    }

    fn filled(&mut self, shape: &[Dim], value: f32) -> String {
        let e = self.empty(shape, "f32");
        let c = self.t.f32(value);
        let ty = tensor(shape, "f32");
        self.t.op(format!("linalg.fill ins({c} : f32) outs({e} : {ty}) -> {ty}"))
    }

    /// A row-major memref over a raw pointer, as a descriptor cast to the memref type.
    fn memref_view(&mut self, ptr: &str, shape: &[Dim], strides: &[usize], el: &str) -> String {
        let n = shape.len();
        let st = format!("!llvm.struct<(ptr, ptr, i64, array<{n} x i64>, array<{n} x i64>)>");
        let mut d = self.t.op(format!("llvm.mlir.poison : {st}"));
        d = self.t.op(format!("llvm.insertvalue {ptr}, {d}[0] : {st}"));
        d = self.t.op(format!("llvm.insertvalue {ptr}, {d}[1] : {st}"));
        let zero = self.t.int(0, "i64");
        d = self.t.op(format!("llvm.insertvalue {zero}, {d}[2] : {st}"));
        for (i, (&sz, &stride)) in shape.iter().zip(strides).enumerate() {
            let s = match sz.as_fixed() {
                Some(c) => self.t.int(c as i64, "i64"),
                None => {
                    let ix = self.dim(sz);
                    self.t.op(format!("arith.index_cast {ix} : index to i64"))
                }
            };
            d = self.t.op(format!("llvm.insertvalue {s}, {d}[3, {i}] : {st}"));
            let k = self.t.int(stride as i64, "i64");
            d = self.t.op(format!("llvm.insertvalue {k}, {d}[4, {i}] : {st}"));
        }
        let mt = memref_of(&tensor(shape, el));
        self.t.op(format!("builtin.unrealized_conversion_cast {d} : {st} to {mt}"))
    }

    fn view(&mut self, ptr: &str, shape: &[Dim], el: &str) -> String {
        let mut strides = vec![1usize; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * shape[i + 1].as_fixed().unwrap_or(1);
        }
        self.memref_view(ptr, shape, &strides, el)
    }

    /// A buffer as a tensor the graph only reads.
    fn read(&mut self, ptr: &str, shape: &[Dim], el: &str) -> String {
        let m = self.view(ptr, shape, el);
        let ty = tensor(shape, el);
        self.t.op(format!("bufferization.to_tensor {m} restrict : {} to {ty}", memref_of(&ty)))
    }

    fn cache_view(&mut self, layer: u32, kind: CacheKind) -> (String, usize, usize) {
        let (off, groups, hd) = self.layout.cache[&(layer, kind)];
        let ms = self.layout.max_seq;
        if let Some(v) = self.cache_views.get(&(layer, kind)) {
            return (v.clone(), groups, hd);
        }
        let p = self.t.op(format!("llvm.getelementptr %cache[{off}] : (!llvm.ptr) -> !llvm.ptr, f32"));
        let v = self.view(&p, &[Dim::fixed(groups), Dim::fixed(ms), Dim::fixed(hd)], "f32");
        self.cache_views.insert((layer, kind), v.clone());
        (v, groups, hd)
    }

    /// A subview of a cache region: rows `start..start+rows` of every head.
    fn cache_rows(&mut self, layer: u32, kind: CacheKind, start: &str, rows: Dim) -> (String, String) {
        let (full, groups, hd) = self.cache_view(layer, kind);
        let ms = self.layout.max_seq;
        let r = self.dim(rows);
        let sub_ty = format!("memref<{groups}x?x{hd}xf32, strided<[{}, {hd}, 1], offset: ?>>", ms * hd);
        let v = self.t.op(format!(
            "memref.subview {full}[0, {start}, 0] [{groups}, {r}, {hd}] [1, 1, 1] : memref<{groups}x{ms}x{hd}xf32> to {sub_ty}"
        ));
        (v, sub_ty)
    }

    fn store_cache(&mut self, n: NodeId, layer: u32, kind: CacheKind) {
        let ty = self.g.ty(n).clone();
        let p = self.dims[&Dim::P].clone();
        let (sub, sub_ty) = self.cache_rows(layer, kind, &p, ty.shape[1]);
        let v = self.vals[&n].clone();
        self.copy_out(&v, &ttype(&ty), &sub, &sub_ty);
    }

    /// A `linalg.generic`. `ins` are (value, type, map); the body gets the block
    /// arguments (inputs, then the output element) and returns the yielded value.
    fn generic(
        &mut self,
        ins: &[(String, String, String)],
        out: (String, String, String),
        iters: &[&str],
        body: impl FnOnce(&mut Text, &[String]) -> String,
    ) -> String {
        let maps: Vec<&str> = ins.iter().map(|i| i.2.as_str()).chain([out.2.as_str()]).collect();
        let iters: Vec<String> = iters.iter().map(|i| format!("\"{i}\"")).collect();
        let ins_v: Vec<&str> = ins.iter().map(|i| i.0.as_str()).collect();
        let ins_t: Vec<&str> = ins.iter().map(|i| i.1.as_str()).collect();
        let r = self.t.fresh();
        let ins_part = if ins.is_empty() {
            String::new()
        } else {
            format!(" ins({} : {})", ins_v.join(", "), ins_t.join(", "))
        };
        self.t.open(format!(
            "{r} = linalg.generic {{indexing_maps = [{}], iterator_types = [{}]}}{ins_part} outs({} : {}) {{",
            maps.join(", "),
            iters.join(", "),
            out.0,
            out.1
        ));
        let args: Vec<String> = (0..=ins.len()).map(|_| self.t.fresh()).collect();
        let elems: Vec<String> =
            ins.iter().map(|i| i.1.clone()).chain([out.1.clone()]).map(|t| elem_of(&t)).collect();
        let params: Vec<String> = args.iter().zip(&elems).map(|(a, e)| format!("{a}: {e}")).collect();
        self.t.line(format!("^bb0({}):", params.join(", ")));
        let y = body(self.t, &args);
        let yt = elems.last().unwrap().clone();
        self.t.line(format!("linalg.yield {y} : {yt}"));
        self.t.close(format!("}} -> {}", out.1));
        r
    }

    fn val(&self, n: NodeId) -> (String, String) {
        (self.vals[&n].clone(), ttype(self.g.ty(n)))
    }

    /// A node's value in f32 (widened if stored narrower).
    fn f32_of(&mut self, n: NodeId) -> (String, String) {
        let (v, vt) = self.val(n);
        let ty = self.g.ty(n).clone();
        if ty.dtype == DType::F32 {
            return (v, vt);
        }
        let e = self.empty(&ty.shape, "f32");
        let (ft, ident, el) = (tensor(&ty.shape, "f32"), id_map(ty.rank()), elem(ty.dtype));
        let r = self.generic(
            &[(v, vt, ident.clone())],
            (e, ft.clone(), ident),
            &vec!["parallel"; ty.rank()],
            |t, a| t.op(format!("arith.extf {} : {el} to f32", a[0])),
        );
        (r, ft)
    }

    /// What emitting node `n` as one `linalg.generic` over its output needs.
    fn local(&self, n: NodeId) -> Local {
        let ty = self.g.ty(n).clone();
        let rank = ty.rank();
        Local {
            ops: self.g.operands(n),
            out_t: ttype(&ty),
            ident: id_map(rank),
            par: vec!["parallel"; rank],
            ty,
        }
    }

    fn node(&mut self, n: NodeId) -> Result<Option<String>, MlirError> {
        let (g, Local { ty, ops, out_t, ident, par }) = (self.g, self.local(n));
        let v = match g.op(n) {
            Op::Weight { name, .. } => {
                let i = self.weights.slot(name);
                let slot = self
                    .t
                    .op(format!("llvm.getelementptr %weights[{i}] : (!llvm.ptr) -> !llvm.ptr, !llvm.ptr"));
                let p = self.t.op(format!("llvm.load {slot} : !llvm.ptr -> !llvm.ptr"));
                self.read(&p, &ty.shape, elem(ty.dtype))
            }
            Op::Input(InputKind::Tokens) => self.read("%tokens", &ty.shape, "i32"),
            Op::Input(InputKind::TokenTypes) => self.read("%types", &ty.shape, "i32"),
            // The cache is read only through the concatenation that extends it.
            Op::Input(InputKind::Cache { .. }) => return Ok(None),
            Op::Concat { axis } => match *g.op(ops[0]) {
                Op::Input(InputKind::Cache { layer, kind }) => {
                    let zero = self.t.index(0);
                    let (sub, sub_ty) = self.cache_rows(layer, kind, &zero, ty.shape[1]);
                    self.t.op(format!("bufferization.to_tensor {sub} restrict : {sub_ty} to {out_t}"))
                }
                _ => self.concat(n, *axis),
            },
            Op::Slice { start, .. } => self.slice(n, *start),
            Op::HeadLinear { at, transposed, .. } => self.head_linear(n, *at, *transposed),
            Op::Route(r) => self.route(n, r),
            Op::Experts(e) => self.experts(n, e),
            Op::RowScale => self.row_scale(n),
            Op::Positions => {
                let e = self.empty(&ty.shape, "i32");
                let p = self.dims[&Dim::P].clone();
                self.generic(&[], (e, out_t, ident), &par, |t, _| {
                    let i = t.op("linalg.index 0 : index");
                    let s = t.bin("addi", &p, &i, "index");
                    t.op(format!("arith.index_cast {s} : index to i32"))
                })
            }
            Op::Gather { .. } => self.gather(n),
            Op::Sinusoidal { .. } => self.sinusoidal(n),
            Op::Add | Op::Mul => self.binary(n),
            Op::Scale(_) => self.scale(n),
            Op::Activation(_) => self.activation(n),
            Op::RoundBf16 => self.round_bf16(n),
            Op::LayerNorm { eps, gain } => {
                self.norm(n, Norm::Layer { eps: *eps, gain: *gain, bias: ops.len() == 2 + *gain as usize })?
            }
            Op::RmsNorm { eps, unit_offset } => {
                self.norm(n, Norm::Rms { eps: *eps, unit_offset: *unit_offset })?
            }
            Op::Linear { transposed, bias } => self.linear(n, *transposed, *bias),
            Op::SplitQkv { .. } => self.split_qkv(n),
            Op::SplitHeads { .. } => self.split_heads(n),
            Op::MergeHeads => self.merge_heads(n),
            Op::Rope(r) => {
                let (x, xt) = self.val(ops[0]);
                let (pos, pos_t) = self.val(ops[1]);
                let e = self.empty(&ty.shape, "f32");
                let r = r.clone();
                // Each feature's rotation frequency (`Rope::inv_freqs` of its pair; 0 past the
                // rotated features), a constant the generic reads by feature.
                let (hd, inv) = (ty.shape[2].as_fixed().unwrap(), r.inv_freqs());
                let half = r.rotary_dim / 2;
                let freqs: Vec<String> = (0..hd)
                    .map(|i| match i {
                        _ if i >= r.rotary_dim => 0.0,
                        _ if r.interleaved => inv[i / 2],
                        _ => inv[i % half],
                    })
                    .map(|f| format!("{f:.17e}"))
                    .collect();
                let ft = format!("tensor<{hd}xf64>");
                let fc = self.t.op(format!("arith.constant dense<[{}]> : {ft}", freqs.join(", ")));
                let ins = [
                    (x.clone(), xt.clone(), ident.clone()),
                    (pos, pos_t, map(3, &["d1".into()])),
                    (fc, ft, map(3, &["d2".into()])),
                ];
                self.generic(&ins, (e, out_t, ident), &par, |t, a| rope(t, &r, &x, &xt, &a[0], &a[1], &a[2]))
            }
            Op::Attention { scale, mask, alibi, softcap, sinks } => {
                self.attention(n, *scale, mask, *alibi, *softcap, *sinks)
            }
            Op::LastRow => {
                let (x, xt) = self.val(ops[0]);
                let rows = g.ty(ops[0]).shape[0];
                let r = self.dim(rows);
                let one = self.t.index(1);
                let last = self.t.bin("subi", &r, &one, "index");
                if ty.rank() == 1 {
                    // The positions: `[T] -> [1]`.
                    self.t.op(format!("tensor.extract_slice {x}[{last}] [1] [1] : {xt} to {out_t}"))
                } else {
                    let w = ty.shape[1].as_fixed().unwrap();
                    self.t
                        .op(format!("tensor.extract_slice {x}[{last}, 0] [1, {w}] [1, 1] : {xt} to {out_t}"))
                }
            }
            op @ (Op::HeadMatMul { .. } | Op::Softmax | Op::Mask(_) | Op::Alibi { .. }) => {
                return Err(unsupported(format!(
                    "unfused attention (`{}`; run the fusion pass)",
                    op.mnemonic()
                )))
            }
            Op::RoundQ8 => {
                return Err(unsupported(
                    "`round_q8` (`activations = q8`; the LLVM backend and the interpreter run it)".into(),
                ))
            }
        };
        Ok(Some(v))
    }

    fn gather(&mut self, n: NodeId) -> String {
        let (g, Local { ty, ops, out_t, ident, par }) = (self.g, self.local(n));
        let Op::Gather { offset } = g.op(n) else { unreachable!("gather") };
        let (table, table_t) = self.val(ops[0]);
        let (ids, ids_t) = self.val(ops[1]);
        let e = self.empty(&ty.shape, "f32");
        let bf16 = g.ty(ops[0]).dtype == DType::BF16;
        let off = *offset as i64;
        self.generic(&[(ids, ids_t, map(2, &["d0".into()]))], (e, out_t, ident), &par, |t, a| {
            let id = t.op(format!("arith.index_cast {} : i32 to index", a[0]));
            let o = t.index(off);
            let row = t.bin("addi", &id, &o, "index");
            let j = t.op("linalg.index 1 : index");
            let x = t.op(format!("tensor.extract {table}[{row}, {j}] : {table_t}"));
            if bf16 {
                t.op(format!("arith.extf {x} : bf16 to f32"))
            } else {
                x
            }
        })
    }

    fn sinusoidal(&mut self, n: NodeId) -> String {
        let (g, Local { ty, ops, out_t, ident, par }) = (self.g, self.local(n));
        let Op::Sinusoidal { dim, base, fairseq, offset } = *g.op(n) else { unreachable!("sinusoidal") };
        let (pos, pos_t) = self.val(ops[0]);
        let e = self.empty(&ty.shape, "f32");
        if fairseq || offset > 0 {
            // Each feature's frequency (negated for a cosine) from a constant table.
            let freqs = crate::ir::sinusoid_freqs(dim, base, fairseq);
            let table: Vec<String> = (0..dim)
                .map(|j| {
                    let (i, cos) = crate::ir::sinusoid_feature(dim, fairseq, j);
                    format!("{:.17e}", if cos { -freqs[i] } else { freqs[i] })
                })
                .collect();
            let ft = format!("tensor<{dim}xf64>");
            let fc = self.t.op(format!("arith.constant dense<[{}]> : {ft}", table.join(", ")));
            let ins = [(pos, pos_t, map(2, &["d0".into()])), (fc, ft, map(2, &["d1".into()]))];
            return self.generic(&ins, (e, out_t, ident), &par, |t, a| {
                let p64 = t.op(format!("arith.extsi {} : i32 to i64", a[0]));
                let off = t.int(offset as i64, "i64");
                let ps = t.bin("addi", &p64, &off, "i64");
                let pf = t.op(format!("arith.sitofp {ps} : i64 to f64"));
                let f = t.op(format!("math.absf {} : f64", a[1]));
                let angle = t.bin("mulf", &pf, &f, "f64");
                let s = t.op(format!("math.sin {angle} : f64"));
                let co = t.op(format!("math.cos {angle} : f64"));
                let zero = t.f64(0.0);
                let is_cos = t.op(format!("arith.cmpf olt, {}, {zero} : f64", a[1]));
                let r = t.op(format!("arith.select {is_cos}, {co}, {s} : f64"));
                t.op(format!("arith.truncf {r} : f64 to f32"))
            });
        }
        self.generic(&[(pos, pos_t, map(2, &["d0".into()]))], (e, out_t, ident), &par, |t, a| {
            // angle = p / base^(2i/dim) for the pair i = j/2; sin at even j, cos at odd.
            let j = t.op("linalg.index 1 : index");
            let two = t.index(2);
            let i = t.bin("divui", &j, &two, "index");
            let odd = t.bin("remui", &j, &two, "index");
            let i64v = t.op(format!("arith.index_cast {i} : index to i64"));
            let fi = t.op(format!("arith.sitofp {i64v} : i64 to f64"));
            let c = t.f64(2.0 / dim as f64);
            let ex = t.bin("mulf", &fi, &c, "f64");
            let b = t.f64(base);
            let den = t.op(format!("math.powf {b}, {ex} : f64"));
            let pf = t.op(format!("arith.sitofp {} : i32 to f64", a[0]));
            let angle = t.bin("divf", &pf, &den, "f64");
            let s = t.op(format!("math.sin {angle} : f64"));
            let co = t.op(format!("math.cos {angle} : f64"));
            let zero = t.index(0);
            let is_odd = t.op(format!("arith.cmpi ne, {odd}, {zero} : index"));
            let r = t.op(format!("arith.select {is_odd}, {co}, {s} : f64"));
            t.op(format!("arith.truncf {r} : f64 to f32"))
        })
    }

    fn binary(&mut self, n: NodeId) -> String {
        let (g, Local { ty, ops, out_t, ident, par }) = (self.g, self.local(n));
        let (a, at) = self.val(ops[0]);
        let (b, bt) = self.val(ops[1]);
        let e = self.empty(&ty.shape, "f32");
        let op = if *g.op(n) == Op::Add { "addf" } else { "mulf" };
        self.generic(&[(a, at, ident.clone()), (b, bt, ident.clone())], (e, out_t, ident), &par, |t, x| {
            t.bin(op, &x[0], &x[1], "f32")
        })
    }

    fn scale(&mut self, n: NodeId) -> String {
        let (g, Local { ty, ops, out_t, ident, par }) = (self.g, self.local(n));
        let Op::Scale(s) = g.op(n) else { unreachable!("scale") };
        let (a, at) = self.val(ops[0]);
        let e = self.empty(&ty.shape, "f32");
        let s = *s;
        self.generic(&[(a, at, ident.clone())], (e, out_t, ident), &par, |t, x| {
            // In f64, as the reference scales.
            let w = t.op(format!("arith.extf {} : f32 to f64", x[0]));
            let c = t.f64(s);
            let m = t.bin("mulf", &w, &c, "f64");
            t.op(format!("arith.truncf {m} : f64 to f32"))
        })
    }

    fn activation(&mut self, n: NodeId) -> String {
        let (g, Local { ty, ops, out_t, ident, par }) = (self.g, self.local(n));
        let Op::Activation(act) = g.op(n) else { unreachable!("activation") };
        let (a, at) = self.val(ops[0]);
        let e = self.empty(&ty.shape, "f32");
        let act = *act;
        self.generic(&[(a, at, ident.clone())], (e, out_t, ident), &par, |t, x| activation(t, act, &x[0]))
    }

    fn round_bf16(&mut self, n: NodeId) -> String {
        let Local { ty, ops, out_t, ident, par } = self.local(n);
        let (a, at) = self.val(ops[0]);
        let e = self.empty(&ty.shape, "f32");
        self.generic(&[(a, at, ident.clone())], (e, out_t, ident), &par, |t, x| round_bf16(t, &x[0]))
    }

    fn split_qkv(&mut self, n: NodeId) -> String {
        let (g, Local { ty, ops, out_t, ident, par }) = (self.g, self.local(n));
        let Op::SplitQkv { layout, part, heads, kv_heads, head_dim } = g.op(n) else {
            unreachable!("split_qkv")
        };
        let (x, xt) = self.val(ops[0]);
        let e = self.empty(&ty.shape, "f32");
        let (layout, part, h, kv, hd) = (*layout, *part, *heads, *kv_heads, *head_dim);
        self.generic(&[], (e, out_t, ident), &par, |t, _| {
            let r = t.op("linalg.index 0 : index");
            let j = t.op("linalg.index 1 : index");
            let hdc = t.index(hd as i64);
            let head = t.bin("divui", &j, &hdc, "index");
            let within = t.bin("remui", &j, &hdc, "index");
            // The column where head `head` of this part starts (`HeadStart`).
            let start = match layout.head_start(part, h, kv, hd) {
                HeadStart::Run { first } => {
                    let b = t.index(first as i64);
                    let hh = t.bin("addi", &head, &b, "index");
                    t.bin("muli", &hh, &hdc, "index")
                }
                HeadStart::Groups { per_group, group_width, offset } => {
                    let gw = t.index(group_width as i64);
                    let v = if per_group == 1 && offset > 0 {
                        t.bin("muli", &head, &gw, "index")
                    } else {
                        let pg = t.index(per_group as i64);
                        let gi = t.bin("divui", &head, &pg, "index");
                        let gj = t.bin("remui", &head, &pg, "index");
                        let a = t.bin("muli", &gi, &gw, "index");
                        let b = t.bin("muli", &gj, &hdc, "index");
                        t.bin("addi", &a, &b, "index")
                    };
                    if offset > 0 {
                        let off = t.index(offset as i64);
                        t.bin("addi", &v, &off, "index")
                    } else {
                        v
                    }
                }
            };
            let col = t.bin("addi", &start, &within, "index");
            t.op(format!("tensor.extract {x}[{r}, {col}] : {xt}"))
        })
    }

    fn split_heads(&mut self, n: NodeId) -> String {
        let (g, Local { ty, ops, out_t, ident, par }) = (self.g, self.local(n));
        let Op::SplitHeads { heads } = g.op(n) else { unreachable!("split_heads") };
        let (x, xt) = self.val(ops[0]);
        let hd = ty.shape[2].as_fixed().unwrap();
        let rows = g.ty(ops[0]).shape[0];
        let r = self.dim(rows);
        let sh = [rows, Dim::fixed(*heads), Dim::fixed(hd)];
        let et = tensor(&sh, "f32");
        let rs = match rows.as_fixed() {
            Some(c) => c.to_string(),
            None => r,
        };
        let x3 = self.t.op(format!(
            "tensor.expand_shape {x} [[0], [1, 2]] output_shape [{rs}, {heads}, {hd}] : {xt} into {et}"
        ));
        let e = self.empty(&ty.shape, "f32");
        let m = map(3, &["d1".into(), "d0".into(), "d2".into()]);
        self.generic(&[(x3, et, m)], (e, out_t, ident), &par, |_, a| a[0].clone())
    }

    fn merge_heads(&mut self, n: NodeId) -> String {
        let (g, Local { ops, out_t, .. }) = (self.g, self.local(n));
        let (x, xt) = self.val(ops[0]);
        let src = g.ty(ops[0]).shape.clone();
        let sh = [src[1], src[0], src[2]];
        let e = self.empty(&sh, "f32");
        let et = tensor(&sh, "f32");
        let m = map(3, &["d1".into(), "d0".into(), "d2".into()]);
        let y =
            self.generic(&[(x, xt, m)], (e, et.clone(), id_map(3)), &["parallel"; 3], |_, a| a[0].clone());
        self.t.op(format!("tensor.collapse_shape {y} [[0], [1, 2]] : {et} into {out_t}"))
    }

    fn norm(&mut self, n: NodeId, kind: Norm) -> Result<String, MlirError> {
        let g = self.g;
        let ty = g.ty(n).clone();
        let ops = g.operands(n);
        let rank = ty.rank();
        let d = ty.shape[rank - 1].as_fixed().unwrap();
        let (x, xt) = self.val(ops[0]);
        let lead = &ty.shape[..rank - 1];
        let ident = id_map(rank);
        let red_map = map(rank, &(0..rank - 1).map(|i| format!("d{i}")).collect::<Vec<_>>());
        let last_map = map(rank, &[format!("d{}", rank - 1)]);
        let mut red_iters = vec!["parallel"; rank];
        red_iters[rank - 1] = "reduction";
        let lead_t = tensor(lead, "f32");
        let inv_d = 1.0 / d as f32;
        // Layer norm subtracts the mean first; both then reduce squares to a scale.
        let centred_mean = match kind {
            Norm::Layer { .. } => {
                let z = self.filled(lead, 0.0);
                let sum = self.generic(
                    &[(x.clone(), xt.clone(), ident.clone())],
                    (z, lead_t.clone(), red_map.clone()),
                    &red_iters,
                    |t, a| t.bin("addf", &a[1], &a[0], "f32"),
                );
                Some(sum)
            }
            Norm::Rms { .. } => None,
        };
        let z = self.filled(lead, 0.0);
        let mut ins = vec![(x.clone(), xt.clone(), ident.clone())];
        if let Some(s) = &centred_mean {
            ins.push((s.clone(), lead_t.clone(), red_map.clone()));
        }
        let sq = self.generic(&ins, (z, lead_t.clone(), red_map.clone()), &red_iters, |t, a| {
            let v = if a.len() == 3 {
                let k = t.f32(inv_d);
                let mean = t.bin("mulf", &a[1], &k, "f32");
                t.bin("subf", &a[0], &mean, "f32")
            } else {
                a[0].clone()
            };
            let s = t.bin("mulf", &v, &v, "f32");
            t.bin("addf", &a[a.len() - 1], &s, "f32")
        });
        let e = self.empty(&ty.shape, "f32");
        // The body's operands: x, the sum of squares, then those present of the gain,
        // the sum (for the mean) and the bias; `at` numbers them.
        let (eps, unit, gain, bias) = match kind {
            Norm::Layer { eps, gain, bias } => (eps, false, gain, bias),
            Norm::Rms { eps, unit_offset } => (eps, unit_offset, true, false),
        };
        let mut ins = vec![(x, xt, ident.clone()), (sq, lead_t.clone(), red_map.clone())];
        let at = |ins: &mut Vec<_>, v: Option<(String, String, String)>| {
            v.map(|v| {
                ins.push(v);
                ins.len() - 1
            })
        };
        // A parameter is shared by every row, or one set per head (`[H, d]`).
        let param_map = |p: NodeId| {
            if g.ty(p).rank() == 2 {
                map(rank, &["d0".into(), format!("d{}", rank - 1)])
            } else {
                last_map.clone()
            }
        };
        let g_at = at(&mut ins, gain.then(|| self.val(ops[1])).map(|(g, gt)| (g, gt, param_map(ops[1]))));
        let m_at = at(&mut ins, centred_mean.map(|s| (s, lead_t, red_map)));
        let last = ops[ops.len() - 1];
        let b_at = at(&mut ins, bias.then(|| self.val(last)).map(|(b, bt)| (b, bt, param_map(last))));
        let out = self.generic(&ins, (e, ttype(&ty), ident), &vec!["parallel"; rank], |t, a| {
            let k = t.f32(inv_d);
            let mut v = a[0].clone();
            if let Some(m) = m_at {
                let mean = t.bin("mulf", &a[m], &k, "f32");
                v = t.bin("subf", &v, &mean, "f32");
            }
            let var = t.bin("mulf", &a[1], &k, "f32");
            let e = t.f32(eps as f32);
            let ve = t.bin("addf", &var, &e, "f32");
            let r = t.op(format!("math.rsqrt {ve} : f32"));
            v = t.bin("mulf", &v, &r, "f32");
            if let Some(gi) = g_at {
                let mut gw = a[gi].clone();
                if unit {
                    let one = t.f32(1.0);
                    gw = t.bin("addf", &gw, &one, "f32");
                }
                v = t.bin("mulf", &v, &gw, "f32");
            }
            if let Some(bi) = b_at {
                v = t.bin("addf", &v, &a[bi], "f32");
            }
            v
        });
        Ok(out)
    }

    fn linear(&mut self, n: NodeId, transposed: bool, bias: bool) -> String {
        let g = self.g;
        let ty = g.ty(n).clone();
        let ops = g.operands(n);
        let (x, xt) = self.val(ops[0]);
        let (w, wt) = self.val(ops[1]);
        let stored = if transposed { kernels::Stored::InOut } else { kernels::Stored::OutIn };
        let k = kernels::Kernel { stored, bf16: g.ty(ops[1]).dtype == DType::BF16, bias };
        let b = bias.then(|| self.f32_of(ops[2]));
        let b = b.as_ref().map(|(v, t)| (v.as_str(), t.as_str()));
        let inner = g.ty(ops[0]).shape[1];
        self.product(k, (&x, &xt), (&w, &wt), b, kernels::Shape { out: &ty.shape, rows: None, inner, per: 1 })
    }

    fn attention(
        &mut self,
        n: NodeId,
        scale: f64,
        mask: &crate::ir::AttnMask,
        alibi: Option<f64>,
        softcap: Option<f64>,
        sinks: bool,
    ) -> String {
        let g = self.g;
        let ty = g.ty(n).clone();
        let ops = g.operands(n);
        let (q, qt) = self.val(ops[0]);
        let (k, kt) = self.val(ops[1]);
        let (v, vt) = self.val(ops[2]);
        let (pos, pos_t) = self.val(ops[3]);
        let heads = ty.shape[0].as_fixed().unwrap();
        let groups = g.ty(ops[1]).shape[0].as_fixed().unwrap();
        let per = heads / groups;
        let (rows, s_len) = (ty.shape[1], g.ty(ops[1]).shape[1]);
        let sc_shape = [ty.shape[0], rows, s_len];
        let sc_t = tensor(&sc_shape, "f32");
        let row_shape = [ty.shape[0], rows];
        let row_t = tensor(&row_shape, "f32");
        // scores[h, t, s] = Σ_d q[h, t, d] · k[h / per, s, d]
        let nk = kernels::Kernel { stored: kernels::Stored::OutIn, bf16: false, bias: false };
        let hd = ty.shape[2];
        let scores = self.product(
            nk,
            (&q, &qt),
            (&k, &kt),
            None,
            kernels::Shape { out: &sc_shape, rows: None, inner: hd, per },
        );
        // Scale, ALiBi and the mask, as interp::attention orders them.
        let e = self.empty(&sc_shape, "f32");
        let mut ins = vec![(scores, sc_t.clone(), id_map(3)), (pos, pos_t, map(3, &["d1".into()]))];
        if let Some(f) = alibi {
            let slopes: Vec<String> = alibi_slopes(heads, f).iter().map(|s| format!("{s:.17e}")).collect();
            let st = format!("tensor<{heads}xf64>");
            let c = self.t.op(format!("arith.constant dense<[{}]> : {st}", slopes.join(", ")));
            ins.push((c, st, map(3, &["d0".into()])));
        }
        let m = *mask;
        let logits = self.generic(&ins, (e, sc_t.clone(), id_map(3)), &["parallel"; 3], |t, a| {
            let x = t.op(format!("arith.extf {} : f32 to f64", a[0]));
            let c = t.f64(scale);
            let xs = t.bin("mulf", &x, &c, "f64");
            let mut val = t.op(format!("arith.truncf {xs} : f64 to f32"));
            if let Some(cap) = softcap {
                // cap · tanh(x / cap), rounded as the unfused scale, tanh, scale ops are.
                let step = |t: &mut Text, v: &str, k: f64| {
                    let w = t.op(format!("arith.extf {v} : f32 to f64"));
                    let c = t.f64(k);
                    let m = t.bin("mulf", &w, &c, "f64");
                    t.op(format!("arith.truncf {m} : f64 to f32"))
                };
                let inner = step(t, &val, 1.0 / cap);
                let th = activation(t, Act::Tanh, &inner);
                val = step(t, &th, cap);
            }
            let s = t.op("linalg.index 2 : index");
            let s64 = t.op(format!("arith.index_cast {s} : index to i64"));
            let p64 = t.op(format!("arith.extsi {} : i32 to i64", a[1]));
            let dist = t.bin("subi", &p64, &s64, "i64");
            if alibi.is_some() {
                let df = t.op(format!("arith.sitofp {dist} : i64 to f64"));
                let b = t.bin("mulf", &a[2], &df, "f64");
                let bf = t.op(format!("arith.truncf {b} : f64 to f32"));
                val = t.bin("subf", &val, &bf, "f32");
            }
            let mut vis = t.int(1, "i1");
            if m.causal {
                let zero = t.int(0, "i64");
                vis = t.op(format!("arith.cmpi sge, {dist}, {zero} : i64"));
            }
            if let Some(w) = m.window {
                let zero = t.int(0, "i64");
                let neg = t.bin("subi", &zero, &dist, "i64");
                let ad = t.op(format!("arith.maxsi {dist}, {neg} : i64"));
                let wc = t.int(w as i64, "i64");
                let inw = t.op(format!("arith.cmpi slt, {ad}, {wc} : i64"));
                vis = t.bin("andi", &vis, &inw, "i1");
            }
            let ninf = t.f32(f32::NEG_INFINITY);
            t.op(format!("arith.select {vis}, {val}, {ninf} : f32"))
        });
        // Softmax over keys: max, exp(x - max), sum, divide; a head's sink joins the max
        // and the sum as one more key.
        let row_map = map(3, &["d0".into(), "d1".into()]);
        let red3 = ["parallel", "parallel", "reduction"];
        let sink = sinks.then(|| self.val(ops[4]));
        let head_map = map(2, &["d0".into()]);
        let mx0 = match &sink {
            Some((s, st)) => {
                let e = self.empty(&row_shape, "f32");
                let ins = [(s.clone(), st.clone(), head_map.clone())];
                self.generic(&ins, (e, row_t.clone(), id_map(2)), &["parallel"; 2], |_, a| a[0].clone())
            }
            None => self.filled(&row_shape, f32::NEG_INFINITY),
        };
        let mx = self.generic(
            &[(logits.clone(), sc_t.clone(), id_map(3))],
            (mx0, row_t.clone(), row_map.clone()),
            &red3,
            |t, a| t.op(format!("arith.maximumf {}, {} : f32", a[1], a[0])),
        );
        let e = self.empty(&sc_shape, "f32");
        let ex = self.generic(
            &[(logits, sc_t.clone(), id_map(3)), (mx.clone(), row_t.clone(), row_map.clone())],
            (e, sc_t.clone(), id_map(3)),
            &["parallel"; 3],
            |t, a| {
                let d = t.bin("subf", &a[0], &a[1], "f32");
                t.op(format!("math.exp {d} : f32"))
            },
        );
        let s0 = match &sink {
            Some((s, st)) => {
                let e = self.empty(&row_shape, "f32");
                let ins = [(s.clone(), st.clone(), head_map), (mx.clone(), row_t.clone(), id_map(2))];
                self.generic(&ins, (e, row_t.clone(), id_map(2)), &["parallel"; 2], |t, a| {
                    let d = t.bin("subf", &a[0], &a[1], "f32");
                    t.op(format!("math.exp {d} : f32"))
                })
            }
            None => self.filled(&row_shape, 0.0),
        };
        let sum = self.generic(
            &[(ex.clone(), sc_t.clone(), id_map(3))],
            (s0, row_t.clone(), row_map.clone()),
            &red3,
            |t, a| t.bin("addf", &a[1], &a[0], "f32"),
        );
        let e = self.empty(&sc_shape, "f32");
        let probs = self.generic(
            &[(ex, sc_t.clone(), id_map(3)), (sum, row_t, row_map)],
            (e, sc_t.clone(), id_map(3)),
            &["parallel"; 3],
            |t, a| t.bin("divf", &a[0], &a[1], "f32"),
        );
        // out[h, t, d] = Σ_s p[h, t, s] · v[h / per, s, d]
        let kn = kernels::Kernel { stored: kernels::Stored::InOut, bf16: false, bias: false };
        self.product(
            kn,
            (&probs, &sc_t),
            (&v, &vt),
            None,
            kernels::Shape { out: &ty.shape, rows: None, inner: s_len, per },
        )
    }
}

#[derive(Clone, Copy)]
enum Norm {
    Layer { eps: f64, gain: bool, bias: bool },
    Rms { eps: f64, unit_offset: bool },
}

fn elem_of(tensor_type: &str) -> String {
    let inner = tensor_type.trim_start_matches("tensor<").trim_end_matches('>');
    inner.rsplit('x').next().unwrap_or(inner).to_string()
}

/// An activation of an `f32` value (`Act::apply`) in f32, as the LLVM backend's kernels
/// compute it (`elementwise::F32Ir`, but dividing exactly): `exp` of at most 80, `tanh(y) =
/// 1 - 2 / (e^(2y) + 1)` (`expf`: the f64 `tanh` and `exp` of libm took a fifth of W1's
/// prefill on one thread, and more of it on two, as the elementwise ops are not on the
/// pool). The exact GELU, `erf`, in f64 (libm), as the reference does.
pub fn activation(t: &mut Text, act: Act, x: &str) -> String {
    if act == Act::Gelu {
        let w = t.op(format!("arith.extf {x} : f32 to f64"));
        let r = act.apply(&mut FloatText { t, f64: true }, w);
        return t.op(format!("arith.truncf {r} : f64 to f32"));
    }
    act.apply(&mut FloatText { t, f64: false }, x.to_string())
}

/// `Arith` as MLIR text in f32 or f64 (see `activation`).
struct FloatText<'a> {
    t: &'a mut Text,
    f64: bool,
}

impl FloatText<'_> {
    fn ty(&self) -> &'static str {
        if self.f64 {
            "f64"
        } else {
            "f32"
        }
    }

    fn bin(&mut self, op: &str, a: &str, b: &str) -> String {
        let ty = self.ty();
        self.t.bin(op, a, b, ty)
    }

    /// `e^a`, in f32 of at most `e^80`.
    fn exp_of(&mut self, a: &str) -> String {
        if self.f64 {
            return self.t.op(format!("math.exp {a} : f64"));
        }
        let c = self.t.f32(80.0);
        let m = self.t.op(format!("arith.minimumf {a}, {c} : f32"));
        self.t.op(format!("math.exp {m} : f32"))
    }
}

impl Arith for FloatText<'_> {
    type V = String;
    fn c(&mut self, v: f64) -> String {
        if self.f64 {
            self.t.f64(v)
        } else {
            self.t.f32(v as f32)
        }
    }
    fn add(&mut self, a: String, b: String) -> String {
        self.bin("addf", &a, &b)
    }
    fn mul(&mut self, a: String, b: String) -> String {
        self.bin("mulf", &a, &b)
    }
    fn div(&mut self, a: String, b: String) -> String {
        self.bin("divf", &a, &b)
    }
    fn neg(&mut self, a: String) -> String {
        self.t.op(format!("arith.negf {a} : {}", self.ty()))
    }
    fn max(&mut self, a: String, b: String) -> String {
        self.t.op(format!("arith.maximumf {a}, {b} : {}", self.ty()))
    }
    fn exp(&mut self, a: String) -> String {
        self.exp_of(&a)
    }
    fn tanh(&mut self, y: String) -> String {
        if self.f64 {
            return self.t.op(format!("math.tanh {y} : f64"));
        }
        let y2 = self.bin("addf", &y, &y);
        let e = self.exp_of(&y2);
        let (one, two) = (self.t.f32(1.0), self.t.f32(2.0));
        let d = self.bin("addf", &e, &one);
        let q = self.bin("divf", &two, &d);
        self.bin("subf", &one, &q)
    }
    fn erf(&mut self, a: String) -> String {
        assert!(self.f64, "bug: the exact GELU is computed in f64 (`activation`)");
        self.t.op(format!("math.erf {a} : f64"))
    }
}

/// One element of a rotary embedding; `x` is the whole input for reading the partner.
/// `freq`: the feature's rotation frequency.
fn rope(t: &mut Text, r: &crate::ir::Rope, x: &str, xt: &str, own: &str, pos: &str, freq: &str) -> String {
    let h = t.op("linalg.index 0 : index");
    let row = t.op("linalg.index 1 : index");
    let i = t.op("linalg.index 2 : index");
    let rd = t.index(r.rotary_dim as i64);
    let rotates = t.op(format!("arith.cmpi ult, {i}, {rd} : index"));
    // Partner and sign: interleaved pairs (2k, 2k+1), else halves (k, k + rd/2).
    let (partner, first) = if r.interleaved {
        let two = t.index(2);
        let odd = t.bin("remui", &i, &two, "index");
        let zero = t.index(0);
        let first = t.op(format!("arith.cmpi eq, {odd}, {zero} : index"));
        let one = t.index(1);
        let up = t.bin("addi", &i, &one, "index");
        let down = t.bin("subi", &i, &one, "index");
        let partner = t.op(format!("arith.select {first}, {up}, {down} : index"));
        (partner, first)
    } else {
        let half = t.index((r.rotary_dim / 2) as i64);
        let first = t.op(format!("arith.cmpi ult, {i}, {half} : index"));
        let up = t.bin("addi", &i, &half, "index");
        let down = t.bin("subi", &i, &half, "index");
        let partner = t.op(format!("arith.select {first}, {up}, {down} : index"));
        (partner, first)
    };
    // Outside the rotated dims the partner index is not used; keep it in bounds.
    let safe = t.op(format!("arith.select {rotates}, {partner}, {i} : index"));
    let other = t.op(format!("tensor.extract {x}[{h}, {row}, {safe}] : {xt}"));
    let pf = t.op(format!("arith.sitofp {pos} : i32 to f64"));
    let angle = t.bin("mulf", &pf, freq, "f64");
    let mut cos = t.op(format!("math.cos {angle} : f64"));
    let mut sin = t.op(format!("math.sin {angle} : f64"));
    if r.magnitude() != 1.0 {
        let m = t.f64(r.magnitude());
        cos = t.bin("mulf", &cos, &m, "f64");
        sin = t.bin("mulf", &sin, &m, "f64");
    }
    let a = t.op(format!("arith.extf {own} : f32 to f64"));
    let b = t.op(format!("arith.extf {other} : f32 to f64"));
    let ac = t.bin("mulf", &a, &cos, "f64");
    let bs = t.bin("mulf", &b, &sin, "f64");
    let lo = t.bin("subf", &ac, &bs, "f64");
    let hi = t.bin("addf", &ac, &bs, "f64");
    let v = t.op(format!("arith.select {first}, {lo}, {hi} : f64"));
    let vf = t.op(format!("arith.truncf {v} : f64 to f32"));
    t.op(format!("arith.select {rotates}, {vf}, {own} : f32"))
}
