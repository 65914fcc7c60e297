//! The kernels of a mixture of experts and of multi-head latent attention.
//!
//! - A router runs on one thread per row, as the LLVM backend's (`Route::route` in f32):
//!   the choice in workgroup memory, the best `topk_groups` groups and then the `top_k`
//!   experts taken one at a time (strictly larger wins, so a tie goes to the lower).
//! - The experts are three dispatches. A workgroup per expert and chunk of 64 hidden
//!   features computes them for every row that chose the expert, into that row's slot
//!   (its chosen experts in ascending order); then likewise the down projections; then a
//!   workgroup per row sums weight × down projection over its slots. Each expert's
//!   matrices are read once for all of its rows, and an expert no row chose not at all.
//! - Latent attention: a feature slice, a feature concatenation, and a per-head linear
//!   map whose matrix is the head's block of rows of one weight.

use super::builder::K;
use super::{ExpertStage, Kern, BLOCK};
use crate::ir::{GroupScore, Scoring};

/// `out[r, j] = x[r, start + j]`.
pub(super) fn slice(k: &mut K, kern: &Kern) {
    let Kern::Slice { w_in, w, start } = *kern else { unreachable!("a Slice kernel") };
    let (wi, wo, s) = (k.c(w_in as i64), k.c(w as i64), k.c(start as i64));
    let src = k.ix("muli", "%bx", &wi);
    let src = k.ix("addi", &src, &s);
    let dst = k.ix("muli", "%bx", &wo);
    k.threads(w, |k, j| {
        let i = k.ix("addi", &src, j);
        let v = k.ld(0, &i);
        let o = k.ix("addi", &dst, j);
        k.st(&v, 1, &o);
    });
}

/// `out[r] = a[r] ++ b[r]` along the features.
pub(super) fn concat(k: &mut K, kern: &Kern) {
    let Kern::Concat { wa, wb } = *kern else { unreachable!("a Concat kernel") };
    let (ac, bc, oc) = (k.c(wa as i64), k.c(wb as i64), k.c((wa + wb) as i64));
    let (a0, b0, o0) = (k.ix("muli", "%bx", &ac), k.ix("muli", "%bx", &bc), k.ix("muli", "%bx", &oc));
    k.threads(wa, |k, j| {
        let i = k.ix("addi", &a0, j);
        let v = k.ld(0, &i);
        let o = k.ix("addi", &o0, j);
        k.st(&v, 2, &o);
    });
    k.threads(wb, |k, j| {
        let i = k.ix("addi", &b0, j);
        let v = k.ld(1, &i);
        let o = k.ix("addi", &o0, j);
        let o = k.ix("addi", &o, &ac);
        k.st(&v, 2, &o);
    });
}

/// `out[r, j] = x[r, j] · s[r]`.
pub(super) fn row_scale(k: &mut K, kern: &Kern) {
    let Kern::RowScale { w } = *kern else { unreachable!("a RowScale kernel") };
    let wc = k.c(w as i64);
    let base = k.ix("muli", "%bx", &wc);
    let s = k.ld(1, "%bx");
    k.threads(w, |k, j| {
        let i = k.ix("addi", &base, j);
        let x = k.ld(0, &i);
        let v = k.fl("mulf", &x, &s);
        k.st(&v, 2, &i);
    });
}

/// Row `bx = h·T + t` of `x [H, T, inn]` by head `h`'s block of `w` (`Op::HeadLinear`).
pub(super) fn head_linear(k: &mut K, kern: &Kern) {
    let Kern::HeadLinear { inn, out, cols, p, at, transposed, rows } = *kern else {
        unreachable!("a HeadLinear kernel")
    };
    let n = k.dim(rows);
    let h = k.ix("divui", "%bx", &n);
    let (innc, outc, colc) = (k.c(inn as i64), k.c(out as i64), k.c(cols as i64));
    let pc = k.c(p as i64);
    let atc = k.c(at as i64);
    let first = k.ix("muli", &h, &pc);
    let first = k.ix("addi", &first, &atc);
    let x0 = k.ix("muli", "%bx", &innc);
    let y0 = k.ix("muli", "%bx", &outc);
    k.threads(out, |k, o| {
        let (z, one) = (k.c(0), k.c(1));
        let zf = k.f(0.0);
        let acc = k.for_(&z, &innc, &one, &[zf], |k, i, acc| {
            let xi = k.ix("addi", &x0, i);
            let x = k.ld(0, &xi);
            // Row `first + o`, column `i`; or transposed row `first + i`, column `o`.
            let (r, c) = if transposed { (i, o) } else { (o, i) };
            let wr = k.ix("addi", &first, r);
            let wi = k.ix("muli", &wr, &colc);
            let wi = k.ix("addi", &wi, c);
            let w = k.ld(1, &wi);
            let m = k.fl("mulf", &x, &w);
            vec![k.fl("addf", &acc[0], &m)]
        });
        let yi = k.ix("addi", &y0, o);
        k.st(&acc[0], 2, &yi);
    });
}

/// An index as `f32` (exact below 2²⁴) and back.
fn to_f(k: &mut K, i: &str) -> String {
    let v = k.t.op(format!("arith.index_cast {i} : index to i32"));
    k.t.op(format!("arith.sitofp {v} : i32 to f32"))
}

fn to_index(k: &mut K, f: &str) -> String {
    let v = k.t.op(format!("arith.fptosi {f} : f32 to i32"));
    k.t.op(format!("arith.index_cast {v} : i32 to index"))
}

fn fcmp(k: &mut K, pred: &str, a: &str, b: &str) -> String {
    k.t.op(format!("arith.cmpf {pred}, {a}, {b} : f32"))
}

/// The index of the largest `v[j]`, `j in 0..n` where `ok(j)`, the first of equals.
fn argmax(k: &mut K, v: &str, n: usize, ok: &dyn Fn(&mut K, &str) -> String) -> String {
    let (z, one, nc) = (k.c(0), k.c(1), k.c(n as i64));
    let init = [k.f(f32::NEG_INFINITY), k.f(-1.0)];
    let r = k.for_(&z, &nc, &one, &init, |k, j, acc| {
        let x = k.sh_ld(v, n, j);
        let zf = k.f(0.0);
        let first = fcmp(k, "olt", &acc[1], &zf);
        let gt = fcmp(k, "ogt", &x, &acc[0]);
        let better = k.t.bin("ori", &first, &gt, "i1");
        let okj = ok(k, j);
        let take = k.t.bin("andi", &okj, &better, "i1");
        let jf = to_f(k, j);
        vec![k.sel(&take, &x, &acc[0], "f32"), k.sel(&take, &jf, &acc[1], "f32")]
    });
    to_index(k, &r[1])
}

/// `times` times, the largest of `v[0..n]` whose `state` is 0 (free) gets state 1.
fn take_best(k: &mut K, v: &str, state: &str, n: usize, times: usize) {
    let (z, one, tc) = (k.c(0), k.c(1), k.c(times as i64));
    k.for_(&z, &tc, &one, &[], |k, _, _| {
        let j = argmax(k, v, n, &|k, j| is(k, state, n, j, 0.0));
        let onef = k.f(1.0);
        k.sh_st(&onef, state, n, &j);
        vec![]
    });
}

/// `exp(x - max) / sum`: one element of a softmax.
fn softmax_at(k: &mut K, x: &str, max: &str, sum: &str) -> String {
    let d = k.fl("subf", x, max);
    let e = k.exp(&d);
    k.fl("divf", &e, sum)
}

/// Whether `s[j] == v`.
fn is(k: &mut K, s: &str, n: usize, j: &str, v: f32) -> String {
    let x = k.sh_ld(s, n, j);
    let c = k.f(v);
    fcmp(k, "oeq", &x, &c)
}

/// A router's row `bx` (`Route::route`, in f32), on thread 0.
pub(super) fn route(k: &mut K, kern: &Kern) {
    let Kern::Route(r) = *kern else { unreachable!("a Route kernel") };
    let e = r.experts;
    let out = 1 + r.choice_bias as usize;
    let (groups, size) = (r.groups, e / r.groups.max(1));
    // Per expert: what the choice ranks; 0 free, 1 chosen, 2 excluded.
    let choice = k.shared(e);
    let state = k.shared(e);
    let (group, kept) =
        if groups > 1 { (k.shared(groups), k.shared(groups)) } else { (String::new(), String::new()) };
    let ec = k.c(e as i64);
    let base = k.ix("muli", "%bx", &ec);
    let z = k.c(0);
    let first = k.cmp("eq", "%tid", &z);
    k.if_(&first, |k| {
        let (z, one) = (k.c(0), k.c(1));
        let logit = |k: &mut K, j: &str| {
            let i = k.ix("addi", &base, j);
            k.ld(0, &i)
        };
        // The max and the sum of exp(l - max) over the experts where `over`.
        let softmax_of = |k: &mut K, over: &dyn Fn(&mut K, &str) -> String| {
            let ninf = k.f(f32::NEG_INFINITY);
            let mx = k.for_(&z, &ec, &one, &[ninf], |k, j, acc| {
                let l = logit(k, j);
                let m = k.t.op(format!("arith.maximumf {}, {l} : f32", acc[0]));
                let on = over(k, j);
                vec![k.sel(&on, &m, &acc[0], "f32")]
            });
            let zf = k.f(0.0);
            let total = k.for_(&z, &ec, &one, &[zf], |k, j, acc| {
                let l = logit(k, j);
                let d = k.fl("subf", &l, &mx[0]);
                let x = k.exp(&d);
                let s = k.fl("addf", &acc[0], &x);
                let on = over(k, j);
                vec![k.sel(&on, &s, &acc[0], "f32")]
            });
            (mx[0].clone(), total[0].clone())
        };
        let all = |k: &mut K, _: &str| k.t.op("arith.constant true");
        let soft = (r.scoring == Scoring::Softmax).then(|| softmax_of(k, &all));
        let score = |k: &mut K, j: &str| {
            let l = logit(k, j);
            match (r.scoring, &soft) {
                (Scoring::Sigmoid, _) => {
                    let n = k.t.op(format!("arith.negf {l} : f32"));
                    let x = k.exp(&n);
                    let one = k.f(1.0);
                    let d = k.fl("addf", &one, &x);
                    k.fl("divf", &one, &d)
                }
                (Scoring::Softmax, Some((mx, total))) => softmax_at(k, &l, mx, total),
                _ => l,
            }
        };
        k.for_(&z, &ec, &one, &[], |k, j, _| {
            let zf = k.f(0.0);
            let oi = k.ix("addi", &base, j);
            k.st(&zf, out, &oi);
            k.sh_st(&zf, &state, e, j);
            let v = match (r.chooses_by_score(), r.choice_bias) {
                (true, true) => {
                    let s = score(k, j);
                    let b = k.ld(1, j);
                    k.fl("addf", &s, &b)
                }
                (true, false) => score(k, j),
                (false, _) => logit(k, j),
            };
            k.sh_st(&v, &choice, e, j);
            vec![]
        });
        if groups > 1 {
            let gc = k.c(groups as i64);
            let sc = k.c(size as i64);
            k.for_(&z, &gc, &one, &[], |k, g, _| {
                let lo = k.ix("muli", g, &sc);
                let hi = k.ix("addi", &lo, &sc);
                let ninf = k.f(f32::NEG_INFINITY);
                let best = k.for_(&lo, &hi, &one, &[ninf.clone(), ninf], |k, j, acc| {
                    let v = k.sh_ld(&choice, e, j);
                    let over = fcmp(k, "ogt", &v, &acc[0]);
                    let m1 = k.t.op(format!("arith.maximumf {}, {v} : f32", acc[0]));
                    let m2 = k.t.op(format!("arith.maximumf {}, {v} : f32", acc[1]));
                    vec![m1, k.sel(&over, &acc[0], &m2, "f32")]
                });
                let s = match (r.group_score, size) {
                    (GroupScore::Top2Sum, 2..) => k.fl("addf", &best[0], &best[1]),
                    _ => best[0].clone(),
                };
                k.sh_st(&s, &group, groups, g);
                let zf = k.f(0.0);
                k.sh_st(&zf, &kept, groups, g);
                vec![]
            });
            take_best(k, &group, &kept, groups, r.topk_groups);
            k.for_(&z, &ec, &one, &[], |k, j, _| {
                let g = k.ix("divui", j, &sc);
                let out_of = is(k, &kept, groups, &g, 0.0);
                k.if_(&out_of, |k| {
                    let two = k.f(2.0);
                    k.sh_st(&two, &state, e, j);
                });
                vec![]
            });
        }
        take_best(k, &choice, &state, e, r.top_k);
        let chosen = |k: &mut K, j: &str| is(k, &state, e, j, 1.0);
        let chosen_soft = (r.scoring == Scoring::SoftmaxChosen).then(|| softmax_of(k, &chosen));
        let zf = k.f(0.0);
        let sum = k.for_(&z, &ec, &one, &[zf], |k, j, acc| {
            let w = match &chosen_soft {
                Some((mx, total)) => {
                    let l = logit(k, j);
                    softmax_at(k, &l, mx, total)
                }
                None => score(k, j),
            };
            let on = chosen(k, j);
            let zf = k.f(0.0);
            let w = k.sel(&on, &w, &zf, "f32");
            let oi = k.ix("addi", &base, j);
            k.st(&w, out, &oi);
            vec![k.fl("addf", &acc[0], &w)]
        });
        if r.normalize || r.scale != 1.0 {
            k.for_(&z, &ec, &one, &[], |k, j, _| {
                let oi = k.ix("addi", &base, j);
                let mut w = k.ld(out, &oi);
                if r.normalize {
                    w = k.fl("divf", &w, &sum[0]);
                }
                if r.scale != 1.0 {
                    let s = k.f(r.scale as f32);
                    w = k.fl("mulf", &w, &s);
                }
                k.st(&w, out, &oi);
                vec![]
            });
        }
    });
}

/// One stage of the experts (`ExpertStage`); arguments x, route, the matrices and biases
/// in `Experts::operands` order, the slots' hidden features `[T·slots, f]` and down
/// projections `[T·slots, d]`, out.
pub(super) fn experts(k: &mut K, kern: &Kern) {
    let Kern::Experts { ex, d, n, up_rows: ur, gate_rows: gw, slots, stage, rows } = *kern else {
        unreachable!("an Experts kernel")
    };
    let o = ex.operands();
    let (hidden, down, out) = (n, n + 1, n + 2);
    let (f, e) = (ex.hidden, ex.experts);
    let (dc, ec, fc, sc) = (k.c(d as i64), k.c(e as i64), k.c(f as i64), k.c(slots as i64));
    let rows = k.dim(rows);
    let (z, one) = (k.c(0), k.c(1));
    // Row `t`'s weight of expert `ei`, whether it chose it, and its slot: how many of
    // the experts before `ei` it chose (below `slots`).
    let chose = |k: &mut K, t: &str, ei: &str| {
        let base = k.ix("muli", t, &ec);
        let wi = k.ix("addi", &base, ei);
        let w = k.ld(1, &wi);
        let zf = k.f(0.0);
        let on = fcmp(k, "une", &w, &zf);
        (w, on, base)
    };
    let slot_of = |k: &mut K, base: &str, ei: &str| {
        let (z, one) = (k.c(0), k.c(1));
        let zf = k.f(0.0);
        let n = k.for_(&z, ei, &one, &[zf], |k, j, acc| {
            let i = k.ix("addi", base, j);
            let w = k.ld(1, &i);
            let zf = k.f(0.0);
            let on = fcmp(k, "une", &w, &zf);
            let onef = k.f(1.0);
            let inc = k.sel(&on, &onef, &zf, "f32");
            vec![k.fl("addf", &acc[0], &inc)]
        });
        let s = to_index(k, &n[0]);
        let last = k.c(slots as i64 - 1);
        k.t.op(format!("arith.minui {s}, {last} : index"))
    };
    // Element `i` of row `slot` of row `t`'s slots of `width`.
    let at = |k: &mut K, t: &str, slot: &str, width: &str, i: &str| {
        let r = k.ix("muli", t, &sc);
        let r = k.ix("addi", &r, slot);
        let r = k.ix("muli", &r, width);
        k.ix("addi", &r, i)
    };
    let ei = "%by".to_string();
    // Feature `bx·64 + tid` (below `width`) of expert `by`, for every row `t` that chose
    // it (`base`: the row's weights).
    let each_row = |k: &mut K, width: &str, body: &dyn Fn(&mut K, &str, &str, &str)| {
        let bc = k.c(BLOCK as i64);
        let j = k.ix("muli", "%bx", &bc);
        let j = k.ix("addi", &j, "%tid");
        let inside = k.cmp("ult", &j, width);
        k.if_(&inside, |k| {
            k.for_(&z, &rows, &one, &[], |k, t, _| {
                let (_, on, base) = chose(k, t, &ei);
                k.if_(&on, |k| body(k, &j, t, &base));
                vec![]
            });
        });
    };
    match stage {
        ExpertStage::Hidden => each_row(k, &fc, &|k, j, t, base| {
            let x0 = k.ix("muli", t, &dc);
            // Output `row` of expert `ei`'s projection in operand `w` of row t.
            let proj = |k: &mut K, w: usize, bias: Option<usize>, rows: usize, row: &str| {
                let rc = k.c(rows as i64);
                let (z, one) = (k.c(0), k.c(1));
                let zf = k.f(0.0);
                let acc = k.for_(&z, &dc, &one, &[zf], |k, i, acc| {
                    let xi = k.ix("addi", &x0, i);
                    let x = k.ld(0, &xi);
                    let wi = expert_at(k, &ei, (row, &rc), (i, &dc), ex.transposed);
                    let wv = k.ld(w, &wi);
                    let m = k.fl("mulf", &x, &wv);
                    vec![k.fl("addf", &acc[0], &m)]
                });
                plus_bias(k, &acc[0], bias, &ei, &rc, row)
            };
            let row_at = |k: &mut K, first: usize, step: usize| {
                let s = k.c(step as i64);
                let a = k.ix("muli", j, &s);
                let fc = k.c(first as i64);
                k.ix("addi", &a, &fc)
            };
            let h = match (o.gate, ex.interleaved) {
                (_, true) => {
                    let (gr, urow) = (row_at(k, 0, 2), row_at(k, 1, 2));
                    let g = proj(k, o.up, o.up_bias, ur, &gr);
                    let u = proj(k, o.up, o.up_bias, ur, &urow);
                    glu(k, &ex, &g, &u)
                }
                (Some(gi), false) => {
                    let (gr, urow) = (row_at(k, ex.gate_at.unwrap_or(0), 1), row_at(k, ex.up_at, 1));
                    let g = proj(k, gi, o.gate_bias, gw, &gr);
                    let u = proj(k, o.up, o.up_bias, ur, &urow);
                    glu(k, &ex, &g, &u)
                }
                (None, false) => {
                    let urow = row_at(k, ex.up_at, 1);
                    let u = proj(k, o.up, o.up_bias, ur, &urow);
                    k.act(ex.act, &u)
                }
            };
            let slot = slot_of(k, base, &ei);
            let hi = at(k, t, &slot, &fc, j);
            k.st(&h, hidden, &hi);
        }),
        ExpertStage::Down => each_row(k, &dc, &|k, oi, t, base| {
            let slot = slot_of(k, base, &ei);
            let (z, one) = (k.c(0), k.c(1));
            let zf = k.f(0.0);
            let acc = k.for_(&z, &fc, &one, &[zf], |k, j, acc| {
                let hi = at(k, t, &slot, &fc, j);
                let hv = k.ld(hidden, &hi);
                let wi = expert_at(k, &ei, (oi, &dc), (j, &fc), ex.transposed);
                let dv = k.ld(o.down, &wi);
                let p = k.fl("mulf", &hv, &dv);
                vec![k.fl("addf", &acc[0], &p)]
            });
            let y = plus_bias(k, &acc[0], o.down_bias, &ei, &dc, oi);
            let yi = at(k, t, &slot, &dc, oi);
            k.st(&y, down, &yi);
        }),
        ExpertStage::Sum => {
            // Row `bx`: weight × down projection of each chosen expert, in ascending order.
            let t = "%bx".to_string();
            let x0 = k.ix("muli", &t, &dc);
            k.threads(d, |k, oi| {
                let zf = k.f(0.0);
                let r = k.for_(&z, &ec, &one, &[zf.clone(), zf], |k, ei, acc| {
                    let (w, on, _) = chose(k, &t, ei);
                    let last = k.c(slots as i64 - 1);
                    let s = to_index(k, &acc[1]);
                    let s = k.t.op(format!("arith.minui {s}, {last} : index"));
                    let yi = at(k, &t, &s, &dc, oi);
                    let y = k.ld(down, &yi);
                    let p = k.fl("mulf", &w, &y);
                    let sum = k.fl("addf", &acc[0], &p);
                    let onef = k.f(1.0);
                    let next = k.fl("addf", &acc[1], &onef);
                    vec![k.sel(&on, &sum, &acc[0], "f32"), k.sel(&on, &next, &acc[1], "f32")]
                });
                let i = k.ix("addi", &x0, oi);
                k.st(&r[0], out, &i);
            });
        }
    }
}

/// `v` plus element `i` of expert `e`'s row of the bias in argument `bias` (`[E, n]`), if
/// there is one.
fn plus_bias(k: &mut K, v: &str, bias: Option<usize>, e: &str, n: &str, i: &str) -> String {
    match bias {
        Some(b) => {
            let bi = k.ix("muli", e, n);
            let bi = k.ix("addi", &bi, i);
            let bv = k.ld(b, &bi);
            k.fl("addf", v, &bv)
        }
        None => v.to_string(),
    }
}

/// Where expert `e`'s matrix element (output `o` of `outs`, input `i` of `ins`) lies in
/// its 3-D weight: `[E, outs, ins]`, or transposed `[E, ins, outs]`.
fn expert_at(
    k: &mut K,
    e: &str,
    (o, outs): (&str, &str),
    (i, ins): (&str, &str),
    transposed: bool,
) -> String {
    let ((major, majors), (minor, minors)) =
        if transposed { ((i, ins), (o, outs)) } else { ((o, outs), (i, ins)) };
    let a = k.ix("muli", e, majors);
    let a = k.ix("addi", &a, major);
    let a = k.ix("muli", &a, minors);
    k.ix("addi", &a, minor)
}

/// The activation's operand: the gate clamped, the up projection clamped and offset
/// (`Experts::glu`), then `act(gate) · up`.
fn glu(k: &mut K, ex: &crate::ir::Experts, g: &str, u: &str) -> String {
    let (mut g, mut u) = (g.to_string(), u.to_string());
    if let Some(l) = ex.clamp {
        let (hi, lo) = (k.f(l as f32), k.f(-l as f32));
        g = k.t.op(format!("arith.minimumf {g}, {hi} : f32"));
        u = k.t.op(format!("arith.maximumf {u}, {lo} : f32"));
        u = k.t.op(format!("arith.minimumf {u}, {hi} : f32"));
    }
    if ex.up_offset != 0.0 {
        let off = k.f(ex.up_offset as f32);
        u = k.fl("addf", &u, &off);
    }
    let a = k.act(ex.act, &g);
    k.fl("mulf", &a, &u)
}
