//! The ops of a mixture of experts and of multi-head latent attention, in `linalg` on
//! tensors.
//!
//! - A router is a sequence of `linalg.generic`s over `[T, E]`: the scores, what the
//!   choice ranks, each expert's rank among the experts its row may choose (the count of
//!   those that beat it: larger, or equal and lower, a NaN after every number), the
//!   groups likewise, then the chosen experts' weights. Counting ranks instead of
//!   selecting one maximum at a time keeps every step a data-parallel op, at `E²`
//!   comparisons a row.
//! - The experts are a loop over the experts: the rows that chose one are gathered and go
//!   through its MLP together (its matrices are slices of the 3-D weights at the loop's
//!   index, multiplied by the same product kernels as every linear map); an expert no
//!   row chose is skipped, so a decode step reads its `k` experts only. Each row's sum
//!   gathers its experts in ascending order, as `Op::Experts` says.
//! - Latent attention needs slices of the last axis, concatenations, and per-head linear
//!   maps over blocks of rows of `kv_b_proj`, whose affine maps address the blocks.

use super::kernels::{Kernel, Shape, Stored};
use super::{map, tensor, Func, Local};
use crate::backend::mlir::text::{elem, id_map, Text};
use crate::ir::{DType, Dim, Experts, GroupScore, NodeId, Route, Scoring};

/// Widens a weight's element to `f32`.
fn widen(t: &mut Text, v: &str, dtype: DType) -> String {
    match dtype {
        DType::F32 => v.to_string(),
        _ => t.op(format!("arith.extf {v} : {} to f32", elem(dtype))),
    }
}

/// Whether `other` ranks before `own` in a choice: larger, or equal and `before` (its
/// index is lower); a number ranks before a NaN, and NaNs by index.
fn beats(t: &mut Text, other: &str, own: &str, before: &str) -> String {
    let gt = t.op(format!("arith.cmpf ogt, {other}, {own} : f32"));
    let eq = t.op(format!("arith.cmpf oeq, {other}, {own} : f32"));
    let tie = t.bin("andi", &eq, before, "i1");
    let own_nan = t.op(format!("arith.cmpf uno, {own}, {own} : f32"));
    let other_num = t.op(format!("arith.cmpf ord, {other}, {other} : f32"));
    let first = t.bin("ori", &other_num, before, "i1");
    let past_nan = t.bin("andi", &own_nan, &first, "i1");
    let v = t.bin("ori", &gt, &tie, "i1");
    t.bin("ori", &v, &past_nan, "i1")
}

/// `acc + 1` where `c`, else `acc` (`i32`).
fn count_if(t: &mut Text, c: &str, acc: &str) -> String {
    let one = t.op(format!("arith.extui {c} : i1 to i32"));
    t.bin("addi", acc, &one, "i32")
}

/// Whether an `i32` flag is set.
fn set(t: &mut Text, flag: &str) -> String {
    let z = t.int(0, "i32");
    t.op(format!("arith.cmpi ne, {flag}, {z} : i32"))
}

/// `exp(x - max) / sum`: one element of a softmax.
fn softmax_at(t: &mut Text, x: &str, max: &str, sum: &str) -> String {
    let d = t.bin("subf", x, max, "f32");
    let e = t.op(format!("math.exp {d} : f32"));
    t.bin("divf", &e, sum, "f32")
}

/// Whether loop index `a` is below loop index `b` of a generic.
fn index_below(t: &mut Text, a: usize, b: usize) -> String {
    let ia = t.op(format!("linalg.index {a} : index"));
    let ib = t.op(format!("linalg.index {b} : index"));
    t.op(format!("arith.cmpi ult, {ia}, {ib} : index"))
}

fn d(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

impl Func<'_> {
    /// The sizes of a shape as `extract_slice`/`insert_slice` operands.
    fn sizes(&mut self, shape: &[Dim]) -> Vec<String> {
        shape.iter().map(|&s| s.as_fixed().map_or_else(|| self.dim(s), |c| c.to_string())).collect()
    }

    fn filled_i32(&mut self, shape: &[Dim]) -> String {
        let e = self.empty(shape, "i32");
        let z = self.t.int(0, "i32");
        let ty = tensor(shape, "i32");
        self.t.op(format!("linalg.fill ins({z} : i32) outs({e} : {ty}) -> {ty}"))
    }

    /// Features `start..start + len` of the last axis.
    pub(super) fn slice(&mut self, n: NodeId, start: usize) -> String {
        let Local { ty, ops, out_t, .. } = self.local(n);
        let (x, xt) = self.val(ops[0]);
        let rank = ty.rank();
        let sizes = self.sizes(&ty.shape).join(", ");
        let mut offsets = vec!["0".to_string(); rank];
        offsets[rank - 1] = start.to_string();
        let strides = vec!["1"; rank].join(", ");
        self.t.op(format!(
            "tensor.extract_slice {x}[{}] [{sizes}] [{strides}] : {xt} to {out_t}",
            offsets.join(", ")
        ))
    }

    /// Two tensors one after the other along `axis`: a generic that reads each output
    /// element from one or the other (`insert_slice` would bufferize to a strided
    /// `memref.copy`, which needs MLIR's C runner library).
    pub(super) fn concat(&mut self, n: NodeId, axis: usize) -> String {
        let (g, Local { ty, ops, out_t, ident, par }) = (self.g, self.local(n));
        let (a, at) = self.val(ops[0]);
        let (b, bt) = self.val(ops[1]);
        let split = self.dim(g.ty(ops[0]).shape[axis]);
        let rank = ty.rank();
        let e = self.empty(&ty.shape, "f32");
        self.generic(&[], (e, out_t, ident), &par, |t, _| {
            let idx: Vec<String> = (0..rank).map(|i| t.op(format!("linalg.index {i} : index"))).collect();
            let first = t.op(format!("arith.cmpi ult, {}, {split} : index", idx[axis]));
            // Both reads stay in bounds; the select keeps the one that applies.
            let one = t.index(1);
            let last_a = t.bin("subi", &split, &one, "index");
            let mut ia = idx.clone();
            ia[axis] = t.op(format!("arith.minui {}, {last_a} : index", idx[axis]));
            let past = t.op(format!("arith.subi {}, {split} : index", idx[axis]));
            let mut ib = idx.clone();
            let zero = t.index(0);
            ib[axis] = t.op(format!("arith.select {first}, {zero}, {past} : index"));
            let va = t.op(format!("tensor.extract {a}[{}] : {at}", ia.join(", ")));
            let vb = t.op(format!("tensor.extract {b}[{}] : {bt}", ib.join(", ")));
            t.op(format!("arith.select {first}, {va}, {vb} : f32"))
        })
    }

    /// Each head by its own block of rows of one matrix (`Op::HeadLinear`), the blocks
    /// addressed by the weight's affine map.
    pub(super) fn head_linear(&mut self, n: NodeId, at: usize, transposed: bool) -> String {
        let (g, Local { ty, ops, out_t, .. }) = (self.g, self.local(n));
        let (x, xt) = self.val(ops[0]);
        let (w, wt) = self.val(ops[1]);
        let wty = g.ty(ops[1]).clone();
        let heads = ty.shape[0].as_fixed().unwrap();
        let cols = wty.shape[wty.rank() - 1].as_fixed().unwrap();
        let p = wty.shape.iter().map(|s| s.as_fixed().unwrap()).product::<usize>() / cols / heads;
        // Loops (head, row, out, in); the matrix element of (out, in) is row `r`, column
        // `c` of the head's block.
        let (r, c) = if transposed { ("d3", "d2") } else { ("d2", "d3") };
        let wmap = match wty.rank() {
            2 => map(4, &[format!("d0 * {p} + {r} + {at}"), c.into()]),
            _ => map(4, &["d0".into(), format!("{r} + {at}"), c.into()]),
        };
        let z = self.filled(&ty.shape, 0.0);
        let ins = [(x, xt, map(4, &d(&["d0", "d1", "d3"]))), (w, wt, wmap)];
        let iters = ["parallel", "parallel", "parallel", "reduction"];
        let dtype = wty.dtype;
        self.generic(&ins, (z, out_t, map(4, &d(&["d0", "d1", "d2"]))), &iters, |t, a| {
            let wv = widen(t, &a[1], dtype);
            let p = t.bin("mulf", &a[0], &wv, "f32");
            t.bin("addf", &a[2], &p, "f32")
        })
    }

    /// Each row of `x [T, d]` times its number in `s [T, 1]`.
    pub(super) fn row_scale(&mut self, n: NodeId) -> String {
        let (g, Local { ty, ops, out_t, ident, par }) = (self.g, self.local(n));
        let (x, xt) = self.val(ops[0]);
        let (s, st) = self.val(ops[1]);
        let col_t = tensor(&g.ty(ops[1]).shape[..1], "f32");
        let col = self.t.op(format!("tensor.collapse_shape {s} [[0, 1]] : {st} into {col_t}"));
        let e = self.empty(&ty.shape, "f32");
        let ins = [(x, xt, ident.clone()), (col, col_t, map(2, &d(&["d0"])))];
        self.generic(&ins, (e, out_t, ident), &par, |t, a| t.bin("mulf", &a[0], &a[1], "f32"))
    }

    /// The max of `l [T, E]` per row and the sum of `exp(l - max)`, over the experts
    /// where `over` (an `i32` flag tensor) is set, or all.
    fn softmax_parts(
        &mut self,
        l: &(String, String),
        rows: Dim,
        over: Option<&(String, String)>,
    ) -> (String, String) {
        let row_t = tensor(&[rows], "f32");
        let (m2, row) = (id_map(2), map(2, &d(&["d0"])));
        let red = ["parallel", "reduction"];
        let mut ins = vec![(l.0.clone(), l.1.clone(), m2.clone())];
        ins.extend(over.map(|o| (o.0.clone(), o.1.clone(), m2.clone())));
        let on = |t: &mut Text, a: &[String]| (a.len() == 3).then(|| set(t, &a[1]));
        let init = self.filled(&[rows], f32::NEG_INFINITY);
        let mx = self.generic(&ins, (init, row_t.clone(), row.clone()), &red, |t, a| {
            let acc = &a[a.len() - 1];
            let m = t.op(format!("arith.maximumf {acc}, {} : f32", a[0]));
            match on(t, a) {
                Some(c) => t.op(format!("arith.select {c}, {m}, {acc} : f32")),
                None => m,
            }
        });
        ins.insert(1, (mx.clone(), row_t.clone(), row.clone()));
        let init = self.filled(&[rows], 0.0);
        let sum = self.generic(&ins, (init, row_t, row), &red, |t, a| {
            let acc = &a[a.len() - 1];
            let x = t.bin("subf", &a[0], &a[1], "f32");
            let ex = t.op(format!("math.exp {x} : f32"));
            let s = t.bin("addf", acc, &ex, "f32");
            match a.len() == 4 {
                true => {
                    let c = set(t, &a[2]);
                    t.op(format!("arith.select {c}, {s}, {acc} : f32"))
                }
                false => s,
            }
        });
        (mx, sum)
    }

    /// A router (`Route::route`), in f32 as the LLVM backend computes it.
    pub(super) fn route(&mut self, n: NodeId, r: &Route) -> String {
        let Local { ty, ops, out_t, ident, par } = self.local(n);
        let l = self.val(ops[0]);
        let rows = ty.shape[0];
        let te = ty.shape.clone();
        let i32_t = tensor(&te, "i32");
        let m2 = id_map(2);
        // The scores.
        let scores = match r.scoring {
            Scoring::Softmax => {
                let (mx, sum) = self.softmax_parts(&l, rows, None);
                let row_t = tensor(&[rows], "f32");
                let row = map(2, &d(&["d0"]));
                let ins = [
                    (l.0.clone(), l.1.clone(), m2.clone()),
                    (mx, row_t.clone(), row.clone()),
                    (sum, row_t, row),
                ];
                let e = self.empty(&te, "f32");
                self.generic(&ins, (e, out_t.clone(), m2.clone()), &par, |t, a| {
                    softmax_at(t, &a[0], &a[1], &a[2])
                })
            }
            Scoring::Sigmoid => {
                let e = self.empty(&te, "f32");
                self.generic(
                    &[(l.0.clone(), l.1.clone(), m2.clone())],
                    (e, out_t.clone(), m2.clone()),
                    &par,
                    |t, a| {
                        let neg = t.op(format!("arith.negf {} : f32", a[0]));
                        let ex = t.op(format!("math.exp {neg} : f32"));
                        let one = t.f32(1.0);
                        let den = t.bin("addf", &one, &ex, "f32");
                        t.bin("divf", &one, &den, "f32")
                    },
                )
            }
            Scoring::SoftmaxChosen => l.0.clone(),
        };
        // What the choice ranks.
        let choice = match (r.chooses_by_score(), r.choice_bias) {
            (true, true) => {
                let (b, bt) = self.val(ops[1]);
                let e = self.empty(&te, "f32");
                let ins = [(scores.clone(), out_t.clone(), m2.clone()), (b, bt, map(2, &d(&["d1"])))];
                self.generic(&ins, (e, out_t.clone(), m2.clone()), &par, |t, a| {
                    t.bin("addf", &a[0], &a[1], "f32")
                })
            }
            (true, false) => scores.clone(),
            (false, _) => l.0.clone(),
        };
        let allowed = (r.groups > 1).then(|| self.kept_groups(r, &choice, &out_t, rows));
        // Each expert's rank among those its row may choose; the first `top_k` are chosen.
        let rank = self.ranks(&choice, &te, allowed.as_deref());
        let mut ins = vec![(rank, i32_t.clone(), m2.clone())];
        ins.extend(allowed.map(|a| (a, i32_t.clone(), m2.clone())));
        let e = self.empty(&te, "i32");
        let k = r.top_k as i64;
        let chosen = self.generic(&ins, (e, i32_t.clone(), m2.clone()), &par, |t, a| {
            let kc = t.int(k, "i32");
            let mut c = t.op(format!("arith.cmpi slt, {}, {kc} : i32", a[0]));
            if a.len() == 3 {
                let ok = set(t, &a[1]);
                c = t.bin("andi", &c, &ok, "i1");
            }
            t.op(format!("arith.extui {c} : i1 to i32"))
        });
        // The chosen experts' weights: their scores, or a softmax over their logits.
        let chosen_v = (chosen, i32_t);
        let soft =
            (r.scoring == Scoring::SoftmaxChosen).then(|| self.softmax_parts(&l, rows, Some(&chosen_v)));
        let row_t = tensor(&[rows], "f32");
        let row = map(2, &d(&["d0"]));
        let mut ins = vec![(scores, out_t.clone(), m2.clone()), (chosen_v.0, chosen_v.1, m2.clone())];
        if let Some((mx, sum)) = soft {
            ins.extend([(mx, row_t.clone(), row.clone()), (sum, row_t.clone(), row.clone())]);
        }
        let e = self.empty(&te, "f32");
        let w = self.generic(&ins, (e, out_t.clone(), m2.clone()), &par, |t, a| {
            let v = match a.len() {
                5 => softmax_at(t, &a[0], &a[2], &a[3]),
                _ => a[0].clone(),
            };
            let on = set(t, &a[1]);
            let zero = t.f32(0.0);
            t.op(format!("arith.select {on}, {v}, {zero} : f32"))
        });
        if !r.normalize && r.scale == 1.0 {
            return w;
        }
        let mut ins = vec![(w.clone(), out_t.clone(), ident.clone())];
        if r.normalize {
            let init = self.filled(&[rows], 0.0);
            let total =
                self.generic(&ins, (init, row_t.clone(), row.clone()), &["parallel", "reduction"], |t, a| {
                    t.bin("addf", &a[1], &a[0], "f32")
                });
            ins.push((total, row_t, row));
        }
        let e = self.empty(&te, "f32");
        let scale = r.scale as f32;
        self.generic(&ins, (e, out_t, ident), &par, |t, a| {
            let mut v = a[0].clone();
            if a.len() == 3 {
                v = t.bin("divf", &v, &a[1], "f32");
            }
            if scale != 1.0 {
                let s = t.f32(scale);
                v = t.bin("mulf", &v, &s, "f32");
            }
            v
        })
    }

    /// Each element's rank along the last axis of `v` (`shape`, f32): how many of its
    /// row's elements beat it (`beats`), counting only those whose `mask` flag (`i32`,
    /// same shape) is set, if there is one.
    fn ranks(&mut self, v: &str, shape: &[Dim], mask: Option<&str>) -> String {
        let r = shape.len();
        let (vt, it) = (tensor(shape, "f32"), tensor(shape, "i32"));
        let own: Vec<String> = (0..r).map(|i| format!("d{i}")).collect();
        let mut other = own.clone();
        other[r - 1] = format!("d{r}");
        let mut ins =
            vec![(v.to_string(), vt.clone(), map(r + 1, &own)), (v.to_string(), vt, map(r + 1, &other))];
        ins.extend(mask.map(|m| (m.to_string(), it.clone(), map(r + 1, &other))));
        let mut iters = vec!["parallel"; r];
        iters.push("reduction");
        let z = self.filled_i32(shape);
        self.generic(&ins, (z, it, map(r + 1, &own)), &iters, |t, a| {
            let before = index_below(t, r, r - 1);
            let mut c = beats(t, &a[1], &a[0], &before);
            if a.len() == 4 {
                let ok = set(t, &a[2]);
                c = t.bin("andi", &c, &ok, "i1");
            }
            count_if(t, &c, &a[a.len() - 1])
        })
    }

    /// Per row, `1` for the experts of the `topk_groups` best groups, `0` for the rest
    /// (`[T, E] i32`): each group's score (its best, or its two best summed), then each
    /// group's rank among the row's groups.
    fn kept_groups(&mut self, r: &Route, choice: &str, choice_t: &str, rows: Dim) -> String {
        let (groups, size) = (r.groups, r.experts / r.groups);
        let sh3 = [rows, Dim::fixed(groups), Dim::fixed(size)];
        let t3 = tensor(&sh3, "f32");
        let i3 = tensor(&sh3, "i32");
        let rs = self.sizes(&[rows]).remove(0);
        let c3 = self.t.op(format!(
            "tensor.expand_shape {choice} [[0], [1, 2]] output_shape [{rs}, {groups}, {size}] : {choice_t} into {t3}"
        ));
        let gsh = [rows, Dim::fixed(groups)];
        let gt = tensor(&gsh, "f32");
        let gi = tensor(&gsh, "i32");
        let (p3, red3) = (["parallel"; 3], ["parallel", "parallel", "reduction"]);
        let m3 = |ds: &[&str]| map(3, &d(ds));
        let score = match (r.group_score, size) {
            (GroupScore::Top2Sum, 2..) => {
                // Each expert's rank within its group; the first two are summed.
                let within = self.ranks(&c3, &sh3, None);
                let init = self.filled(&gsh, 0.0);
                let ins = [(c3, t3, m3(&["d0", "d1", "d2"])), (within, i3.clone(), m3(&["d0", "d1", "d2"]))];
                self.generic(&ins, (init, gt.clone(), m3(&["d0", "d1"])), &red3, |t, a| {
                    let two = t.int(2, "i32");
                    let top = t.op(format!("arith.cmpi slt, {}, {two} : i32", a[1]));
                    let s = t.bin("addf", &a[2], &a[0], "f32");
                    t.op(format!("arith.select {top}, {s}, {} : f32", a[2]))
                })
            }
            _ => {
                let init = self.filled(&gsh, f32::NEG_INFINITY);
                let ins = [(c3, t3, m3(&["d0", "d1", "d2"]))];
                self.generic(&ins, (init, gt.clone(), m3(&["d0", "d1"])), &red3, |t, a| {
                    t.op(format!("arith.maximumf {}, {} : f32", a[1], a[0]))
                })
            }
        };
        let grank = self.ranks(&score, &gsh, None);
        let e = self.empty(&sh3, "i32");
        let keep = r.topk_groups as i64;
        let kept = self.generic(
            &[(grank, gi, m3(&["d0", "d1"]))],
            (e, i3.clone(), m3(&["d0", "d1", "d2"])),
            &p3,
            |t, a| {
                let k = t.int(keep, "i32");
                let c = t.op(format!("arith.cmpi slt, {}, {k} : i32", a[0]));
                t.op(format!("arith.extui {c} : i1 to i32"))
            },
        );
        let flat = choice_t.replace("xf32>", "xi32>");
        self.t.op(format!("tensor.collapse_shape {kept} [[0], [1, 2]] : {i3} into {flat}"))
    }

    /// The experts (`Op::Experts`), expert by expert: the rows that gave the expert a
    /// weight (`une 0`, so a NaN weight still reaches the sum) are gathered, go through
    /// its MLP together (its matrices read once for all of them; none when no row chose
    /// it, so decode reads `k` experts), and each adds weight × its output row to its sum,
    /// in ascending expert order.
    pub(super) fn experts(&mut self, n: NodeId, ex: &Experts) -> String {
        let Local { ty, ops, out_t, .. } = self.local(n);
        let o = ex.operands();
        let (x, xt) = self.val(ops[0]);
        let (route, route_t) = self.val(ops[1]);
        let dm = ty.shape[1].as_fixed().unwrap();
        let f = ex.hidden;
        let rows = self.dim(ty.shape[0]);
        let init = self.filled(&ty.shape, 0.0);
        let (c0, c1, ce) = (self.t.index(0), self.t.index(1), self.t.index(ex.experts as i64));
        let zero = self.t.f32(0.0);
        let (e, acc, done) = (self.t.fresh(), self.t.fresh(), self.t.fresh());
        self.t.open(format!(
            "{done} = scf.for {e} = {c0} to {ce} step {c1} iter_args({acc} = {init}) -> ({out_t}) {{"
        ));
        // Whether row `t` gave expert `e` a weight, and the weight.
        let weight = |t: &mut Text, row: &str| {
            let w = t.op(format!("tensor.extract {route}[{row}, {e}] : {route_t}"));
            let on = t.op(format!("arith.cmpf une, {w}, {zero} : f32"));
            (w, on)
        };
        let (row, c, count) = (self.t.fresh(), self.t.fresh(), self.t.fresh());
        self.t.open(format!(
            "{count} = scf.for {row} = {c0} to {rows} step {c1} iter_args({c} = {c0}) -> (index) {{"
        ));
        let (_, on) = weight(self.t, &row);
        let step = self.t.op(format!("arith.select {on}, {c1}, {c0} : index"));
        let next = self.t.bin("addi", &c, &step, "index");
        self.t.line(format!("scf.yield {next} : index"));
        self.t.close("}");
        let any = self.t.op(format!("arith.cmpi ugt, {count}, {c0} : index"));
        let chosen = self.t.fresh();
        self.t.open(format!("{chosen} = scf.if {any} -> ({out_t}) {{"));
        let rows_t = |k: usize| format!("tensor<?x{k}xf32>");
        let row_t = |k: usize| format!("tensor<1x{k}xf32>");
        // The chosen rows gathered in order: the tensor and the next free row.
        let gathered = self.t.op(format!("tensor.empty({count}) : {}", rows_t(dm)));
        let (row, xs_a, j, xs) = (self.t.fresh(), self.t.fresh(), self.t.fresh(), self.t.fresh());
        self.t.open(format!(
            "{xs}:2 = scf.for {row} = {c0} to {rows} step {c1} iter_args({xs_a} = {gathered}, {j} = {c0}) -> ({}, index) {{",
            rows_t(dm)
        ));
        let (_, on) = weight(self.t, &row);
        self.row_taken(&on, &rows_t(dm), &xs_a, &j, &c1, |me| {
            let xr = me
                .t
                .op(format!("tensor.extract_slice {x}[{row}, 0] [1, {dm}] [1, 1] : {xt} to {}", row_t(dm)));
            me.t.op(format!(
                "tensor.insert_slice {xr} into {xs_a}[{j}, 0] [1, {dm}] [1, 1] : {} into {}",
                row_t(dm),
                rows_t(dm)
            ))
        });
        let xs = format!("{xs}#0");
        // The MLP of the gathered rows.
        let bias = |i: Option<usize>| i.map(|i| ops[i]);
        let (up, up_w) = self.expert_proj(&xs, &count, dm, ops[o.up], bias(o.up_bias), &e, ex.transposed);
        let gate =
            o.gate.map(|gi| match ops[gi] == ops[o.up] && o.gate_bias.is_none() && o.up_bias.is_none() {
                true => (up.clone(), up_w),
                false => self.expert_proj(&xs, &count, dm, ops[gi], bias(o.gate_bias), &e, ex.transposed),
            });
        // The gate's and the up projection's outputs of the MLP's hidden features.
        let part = |t: &mut Text, (v, width): &(String, usize), first: usize, step: usize| {
            t.op(format!(
                "tensor.extract_slice {v}[0, {first}] [{count}, {f}] [1, {step}] : {} to {}",
                rows_t(*width),
                rows_t(f)
            ))
        };
        let (g_part, u_part) = match (&gate, ex.interleaved) {
            (_, true) => (Some(part(self.t, &(up.clone(), up_w), 0, 2)), part(self.t, &(up, up_w), 1, 2)),
            (Some(gv), false) => {
                (Some(part(self.t, gv, ex.gate_at.unwrap_or(0), 1)), part(self.t, &(up, up_w), ex.up_at, 1))
            }
            (None, false) => (None, part(self.t, &(up, up_w), ex.up_at, 1)),
        };
        let mut ins = vec![(u_part, rows_t(f), id_map(2))];
        ins.extend(g_part.map(|gp| (gp, rows_t(f), id_map(2))));
        let h0 = self.t.op(format!("tensor.empty({count}) : {}", rows_t(f)));
        let ex = *ex;
        let h = self.generic(&ins, (h0, rows_t(f), id_map(2)), &["parallel"; 2], |t, a| match a.len() {
            3 => {
                let (mut gv, mut u) = (a[1].clone(), a[0].clone());
                if let Some(lim) = ex.clamp {
                    let (hi, lo) = (t.f32(lim as f32), t.f32(-lim as f32));
                    gv = t.op(format!("arith.minimumf {gv}, {hi} : f32"));
                    u = t.op(format!("arith.maximumf {u}, {lo} : f32"));
                    u = t.op(format!("arith.minimumf {u}, {hi} : f32"));
                }
                if ex.up_offset != 0.0 {
                    let off = t.f32(ex.up_offset as f32);
                    u = t.bin("addf", &u, &off, "f32");
                }
                let act = super::activation(t, ex.act, &gv);
                t.bin("mulf", &act, &u, "f32")
            }
            _ => super::activation(t, ex.act, &a[0]),
        });
        let (y, _) = self.expert_proj(&h, &count, f, ops[o.down], bias(o.down_bias), &e, ex.transposed);
        // Each chosen row adds weight × its output row, in place.
        let (row, a, j, sums) = (self.t.fresh(), self.t.fresh(), self.t.fresh(), self.t.fresh());
        self.t.open(format!(
            "{sums}:2 = scf.for {row} = {c0} to {rows} step {c1} iter_args({a} = {acc}, {j} = {c0}) -> ({out_t}, index) {{"
        ));
        let (w, on) = weight(self.t, &row);
        self.row_taken(&on, &out_t, &a, &j, &c1, |me| {
            let prev = me.t.op(format!(
                "tensor.extract_slice {a}[{row}, 0] [1, {dm}] [1, 1] : {out_t} to {}",
                row_t(dm)
            ));
            let yr = me.t.op(format!(
                "tensor.extract_slice {y}[{j}, 0] [1, {dm}] [1, 1] : {} to {}",
                rows_t(dm),
                row_t(dm)
            ));
            let ins = [(yr, row_t(dm), id_map(2))];
            let sum = me.generic(&ins, (prev, row_t(dm), id_map(2)), &["parallel"; 2], |t, v| {
                let p = t.bin("mulf", &w, &v[0], "f32");
                t.bin("addf", &v[1], &p, "f32")
            });
            me.t.op(format!(
                "tensor.insert_slice {sum} into {a}[{row}, 0] [1, {dm}] [1, 1] : {} into {out_t}",
                row_t(dm)
            ))
        });
        self.t.line(format!("scf.yield {sums}#0 : {out_t}"));
        self.t.reopen("} else {");
        self.t.line(format!("scf.yield {acc} : {out_t}"));
        self.t.close("}");
        self.t.line(format!("scf.yield {chosen} : {out_t}"));
        self.t.close("}");
        done
    }

    /// The end of a row loop's body that carries `(prev: ty, j: index)`: when `on`, `put`
    /// makes the new value and `j` advances; else both pass through.
    fn row_taken(
        &mut self,
        on: &str,
        ty: &str,
        prev: &str,
        j: &str,
        c1: &str,
        put: impl FnOnce(&mut Self) -> String,
    ) {
        let r = self.t.fresh();
        self.t.open(format!("{r}:2 = scf.if {on} -> ({ty}, index) {{"));
        let v = put(self);
        let j1 = self.t.bin("addi", j, c1, "index");
        self.t.line(format!("scf.yield {v}, {j1} : {ty}, index"));
        self.t.reopen("} else {");
        self.t.line(format!("scf.yield {prev}, {j} : {ty}, index"));
        self.t.close("}");
        self.t.line(format!("scf.yield {r}#0, {r}#1 : {ty}, index"));
        self.t.close("}");
    }

    /// The rows `x [n, inn]` (`n` an index value) through expert `e`'s matrix in the 3-D
    /// weight `w` (and its row of the bias `[E, out]`): `[n, out]`, and `out`.
    #[allow(clippy::too_many_arguments)]
    fn expert_proj(
        &mut self,
        x: &str,
        n: &str,
        inn: usize,
        w: NodeId,
        bias: Option<NodeId>,
        e: &str,
        transposed: bool,
    ) -> (String, usize) {
        let wty = self.g.ty(w).clone();
        let (a, b) = (wty.shape[1].as_fixed().unwrap(), wty.shape[2].as_fixed().unwrap());
        let out = if transposed { b } else { a };
        let (wv, wt) = self.val(w);
        let sub_t = format!("tensor<{a}x{b}x{}>", elem(wty.dtype));
        let sub = self
            .t
            .op(format!("tensor.extract_slice {wv}[{e}, 0, 0] [1, {a}, {b}] [1, 1, 1] : {wt} to {sub_t}"));
        // The expert's bias row, in f32.
        let bias = bias.map(|bn| {
            let (bv, bt) = self.val(bn);
            let bdt = self.g.ty(bn).dtype;
            let brow_t = format!("tensor<{out}x{}>", elem(bdt));
            let brow =
                self.t.op(format!("tensor.extract_slice {bv}[{e}, 0] [1, {out}] [1, 1] : {bt} to {brow_t}"));
            let (ft, one) = (format!("tensor<{out}xf32>"), id_map(1));
            let empty = self.t.op(format!("tensor.empty() : {ft}"));
            let b = self.generic(
                &[(brow, brow_t, one.clone())],
                (empty, ft.clone(), one),
                &["parallel"],
                |t, a| widen(t, &a[0], bdt),
            );
            (b, ft)
        });
        let stored = if transposed { Stored::InOut } else { Stored::OutIn };
        let k = Kernel { stored, bf16: wty.dtype == DType::BF16, bias: bias.is_some() };
        let xt = format!("tensor<?x{inn}xf32>");
        let b = bias.as_ref().map(|(v, t)| (v.as_str(), t.as_str()));
        let shape = Shape { out: &[Dim::T, Dim::fixed(out)], rows: Some(n), inner: Dim::fixed(inn), per: 1 };
        (self.product(k, (x, &xt), (&sub, &sub_t), b, shape), out)
    }
}
