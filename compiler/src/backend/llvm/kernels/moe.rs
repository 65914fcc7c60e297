//! A mixture of experts: the router's weights, the rows grouped by expert (so that each
//! expert's matrices are read once for all of its rows, by the linear kernels the graph
//! function calls per expert), the weighted sum of the experts' outputs, and the row
//! scale of a shared expert's gate.

use inkwell::values::{FloatValue, IntValue};
use inkwell::FloatPredicate;

use super::{Args, Kernel, Slot};
use crate::backend::llvm::elementwise::act;
use crate::backend::llvm::kb::Kb;
use crate::ir::{GroupScore, Scoring};

fn fsel<'ctx>(
    kb: &Kb<'_, 'ctx>,
    c: IntValue<'ctx>,
    a: FloatValue<'ctx>,
    b: FloatValue<'ctx>,
) -> FloatValue<'ctx> {
    kb.b.build_select(c, a, b, "").unwrap().into_float_value()
}

fn fcmp<'ctx>(
    kb: &Kb<'_, 'ctx>,
    p: FloatPredicate,
    a: FloatValue<'ctx>,
    b: FloatValue<'ctx>,
) -> IntValue<'ctx> {
    kb.b.build_float_compare(p, a, b, "").unwrap()
}

/// Per row, as `Route::route` says, in f32: each expert's score and what its choice
/// ranks; where there are groups, the best `topk_groups` kept one at a time (strictly
/// larger wins, so a tie goes to the lower group) and the others' experts excluded; the
/// `top_k` largest chosen the same way; then the chosen experts' weights.
pub(crate) fn route<'ctx>(
    kb: &Kb<'_, 'ctx>,
    k: &Kernel,
    args: &Args<'_, '_, 'ctx>,
    begin: IntValue<'ctx>,
    end: IntValue<'ctx>,
) {
    let c = |v: usize| kb.c(v as i64);
    let Kernel::Route { route: r } = *k else { unreachable!("a Route kernel") };
    let e = r.experts;
    let (x, out) = (args.p(Slot::X), args.p(Slot::Out));
    let bias = r.choice_bias.then(|| args.p(Slot::Bias));
    // Per expert: 0 free, 1 chosen, 2 excluded (its group is not kept).
    let state = kb.alloca_f32s(e);
    let choice = kb.alloca_f32s(e);
    let size = e / r.groups;
    let group = kb.alloca_f32s(r.groups);
    let kept = kb.alloca_f32s(r.groups);
    let is = |p: inkwell::values::PointerValue<'ctx>, j: IntValue<'ctx>, v: f64| {
        fcmp(kb, FloatPredicate::OEQ, kb.ld(p, j), kb.fc(v))
    };
    let ninf = kb.fc(f64::NEG_INFINITY);
    // The index of the largest of `v[j]` over `j in 0..n` where `ok(j)`, the first of equals.
    let argmax =
        |v: inkwell::values::PointerValue<'ctx>, n: usize, ok: &dyn Fn(IntValue<'ctx>) -> IntValue<'ctx>| {
            let init = [ninf.into(), kb.c(-1).into()];
            kb.fold(c(0), c(n), &init, |j, acc| {
                let (b, bi) = (acc[0].into_float_value(), acc[1].into_int_value());
                let l = kb.ld(v, j);
                let first = kb.icmp_lt(bi, c(0));
                let better = kb.b.build_or(first, fcmp(kb, FloatPredicate::OGT, l, b), "").unwrap();
                let take = kb.b.build_and(ok(j), better, "").unwrap();
                vec![fsel(kb, take, l, b).into(), kb.select(take, j, bi).into()]
            })[1]
                .into_int_value()
        };
    // The max and the sum of `exp(l - max)` of the logits where `over(j)`.
    let softmax_of = |row: IntValue<'ctx>, over: &dyn Fn(IntValue<'ctx>) -> IntValue<'ctx>| {
        let max = kb.fold(c(0), c(e), &[ninf.into()], |j, acc| {
            let m = acc[0].into_float_value();
            vec![fsel(kb, over(j), kb.fmax(m, kb.ld(x, kb.add(row, j))), m).into()]
        })[0]
            .into_float_value();
        let total = kb.fold(c(0), c(e), &[kb.fc(0.0).into()], |j, acc| {
            let s = acc[0].into_float_value();
            let p = kb.exp(kb.b.build_float_sub(kb.ld(x, kb.add(row, j)), max, "").unwrap());
            vec![fsel(kb, over(j), kb.b.build_float_add(s, p, "").unwrap(), s).into()]
        })[0]
            .into_float_value();
        (max, total)
    };
    let all = |_: IntValue<'ctx>| kb.c(1).const_truncate(kb.cx.bool_type());
    kb.for_(begin, end, |t| {
        let row = kb.mul(t, c(e));
        let logit = |j: IntValue<'ctx>| kb.ld(x, kb.add(row, j));
        let soft = (r.scoring == Scoring::Softmax).then(|| softmax_of(row, &all));
        let score = |j: IntValue<'ctx>| match (r.scoring, soft) {
            (Scoring::Sigmoid, _) => {
                let en = kb.exp(kb.b.build_float_neg(logit(j), "").unwrap());
                kb.fdiv(kb.fc(1.0), kb.b.build_float_add(kb.fc(1.0), en, "").unwrap())
            }
            (Scoring::Softmax, Some((max, total))) => {
                kb.fdiv(kb.exp(kb.b.build_float_sub(logit(j), max, "").unwrap()), total)
            }
            _ => logit(j),
        };
        kb.for_(c(0), c(e), |j| {
            kb.st(out, kb.add(row, j), kb.fc(0.0));
            kb.st(state, j, kb.fc(0.0));
            let v = match (r.chooses_by_score(), bias) {
                (true, Some(b)) => kb.b.build_float_add(score(j), kb.ld(b, j), "").unwrap(),
                (true, None) => score(j),
                (false, _) => logit(j),
            };
            kb.st(choice, j, v);
        });
        if r.groups > 1 {
            kb.for_(c(0), c(r.groups), |g| {
                let first = kb.mul(g, c(size));
                let init = [ninf.into(), ninf.into()];
                let best = kb.fold(first, kb.add(first, c(size)), &init, |j, acc| {
                    let (m1, m2) = (acc[0].into_float_value(), acc[1].into_float_value());
                    let v = kb.ld(choice, j);
                    let over = fcmp(kb, FloatPredicate::OGT, v, m1);
                    vec![kb.fmax(m1, v).into(), fsel(kb, over, m1, kb.fmax(m2, v)).into()]
                });
                let (m1, m2) = (best[0].into_float_value(), best[1].into_float_value());
                let s = match (r.group_score, size) {
                    (GroupScore::Top2Sum, 2..) => kb.b.build_float_add(m1, m2, "").unwrap(),
                    _ => m1,
                };
                kb.st(group, g, s);
                kb.st(kept, g, kb.fc(0.0));
            });
            kb.for_(c(0), c(r.topk_groups), |_| {
                let g = argmax(group, r.groups, &|g| is(kept, g, 0.0));
                kb.st(kept, g, kb.fc(1.0));
            });
            kb.for_(c(0), c(e), |j| {
                kb.if_(is(kept, kb.udiv(j, c(size)), 0.0), || kb.st(state, j, kb.fc(2.0)));
            });
        }
        kb.for_(c(0), c(r.top_k), |_| {
            let j = argmax(choice, e, &|j| is(state, j, 0.0));
            kb.st(state, j, kb.fc(1.0));
        });
        let chosen_soft =
            (r.scoring == Scoring::SoftmaxChosen).then(|| softmax_of(row, &|j| is(state, j, 1.0)));
        let weight = |j: IntValue<'ctx>| match chosen_soft {
            Some((max, total)) => kb.fdiv(kb.exp(kb.b.build_float_sub(logit(j), max, "").unwrap()), total),
            None => score(j),
        };
        let sum = kb.fold(c(0), c(e), &[kb.fc(0.0).into()], |j, acc| {
            let s = acc[0].into_float_value();
            let on = is(state, j, 1.0);
            let w = fsel(kb, on, weight(j), kb.fc(0.0));
            kb.st(out, kb.add(row, j), w);
            vec![kb.b.build_float_add(s, w, "").unwrap().into()]
        })[0]
            .into_float_value();
        if r.normalize || r.scale != 1.0 {
            kb.for_(c(0), c(e), |j| {
                let at = kb.add(row, j);
                let mut w = kb.ld(out, at);
                if r.normalize {
                    w = kb.fdiv(w, sum);
                }
                if r.scale != 1.0 {
                    w = kb.b.build_float_mul(w, kb.fc(r.scale), "").unwrap();
                }
                kb.st(out, at, w);
            });
        }
    });
}

/// Stores `v` as element `i` of an `i64` array.
fn st64_at<'ctx>(
    kb: &Kb<'_, 'ctx>,
    base: inkwell::values::PointerValue<'ctx>,
    i: IntValue<'ctx>,
    v: IntValue<'ctx>,
) {
    kb.store(kb.gep(kb.i64t(), base, i), v);
}

/// One task: expert by expert, the rows that chose it, in order, copied into the slots.
pub(crate) fn dispatch<'ctx>(
    kb: &Kb<'_, 'ctx>,
    k: &Kernel,
    args: &Args<'_, '_, 'ctx>,
    _: IntValue<'ctx>,
    _: IntValue<'ctx>,
) {
    use Slot::*;
    let c = |v: usize| kb.c(v as i64);
    let Kernel::Dispatch { experts: e, d } = *k else { unreachable!("a Dispatch kernel") };
    let (x, route, offsets, slot_of, out, rows) =
        (args.p(X), args.p(Route), args.p(Offsets), args.p(Slots), args.p(Out), args.i(Rows));
    let n = kb.fold(c(0), c(e), &[c(0).into()], |j, acc| {
        let n = acc[0].into_int_value();
        st64_at(kb, offsets, j, n);
        kb.fold(c(0), rows, &[n.into()], |t, acc| {
            let n = acc[0].into_int_value();
            let at = kb.add(kb.mul(t, c(e)), j);
            let w = kb.ld(route, at);
            // NaN counts as chosen: it reaches the output as it would in a dense sum.
            let taken = fcmp(kb, FloatPredicate::UNE, w, kb.fc(0.0));
            kb.choose(
                taken,
                || {
                    kb.sti(slot_of, at, n);
                    kb.copy(out, kb.mul(n, c(d)), x, kb.mul(t, c(d)), d);
                    vec![kb.add(n, c(1)).into()]
                },
                || {
                    kb.sti(slot_of, at, kb.c(-1));
                    vec![n.into()]
                },
            )
        })
    });
    st64_at(kb, offsets, c(e), n[0].into_int_value());
}

/// Per row: the sum over its chosen experts, in ascending order, of weight × output.
pub(crate) fn combine<'ctx>(
    kb: &Kb<'_, 'ctx>,
    k: &Kernel,
    args: &Args<'_, '_, 'ctx>,
    begin: IntValue<'ctx>,
    end: IntValue<'ctx>,
) {
    use Slot::*;
    let c = |v: usize| kb.c(v as i64);
    let Kernel::Combine { experts: e, d } = *k else { unreachable!("a Combine kernel") };
    let (route, slot_of, y, out) = (args.p(Route), args.p(Slots), args.p(Y), args.p(Out));
    kb.for_(begin, end, |t| {
        let row = kb.mul(t, c(d));
        kb.for_(c(0), c(d), |i| kb.st(out, kb.add(row, i), kb.fc(0.0)));
        kb.for_(c(0), c(e), |j| {
            let at = kb.add(kb.mul(t, c(e)), j);
            let s = kb.ldi(slot_of, at);
            kb.if_(kb.icmp_ge(s, c(0)), || {
                let w = kb.ld(route, at);
                let src = kb.mul(s, c(d));
                kb.for_(c(0), c(d), |i| {
                    let o = kb.add(row, i);
                    let v = kb.fmul(w, kb.ld(y, kb.add(src, i)));
                    kb.st(out, o, kb.fadd(kb.ld(out, o), v));
                });
            });
        });
    });
}

pub(crate) fn row_scale<'ctx>(
    kb: &Kb<'_, 'ctx>,
    k: &Kernel,
    args: &Args<'_, '_, 'ctx>,
    begin: IntValue<'ctx>,
    end: IntValue<'ctx>,
) {
    use Slot::*;
    let c = |v: usize| kb.c(v as i64);
    let Kernel::RowScale { width } = *k else { unreachable!("a RowScale kernel") };
    let (x, y, out) = (args.p(X), args.p(Y), args.p(Out));
    kb.for_(begin, end, |t| {
        let s = kb.ld(y, t);
        kb.for_(c(0), c(width), |i| {
            let at = kb.add(kb.mul(t, c(width)), i);
            kb.st(out, at, kb.fmul(kb.ld(x, at), s));
        });
    });
}

/// An expert's GLU over the rows of its projection's outputs (`Kernel::Glu`), in f32: the
/// activation as every engine computes it (`Act::apply`), the clamps and the offset as
/// `Experts::glu` says.
pub(crate) fn glu<'ctx>(
    kb: &Kb<'_, 'ctx>,
    k: &Kernel,
    args: &Args<'_, '_, 'ctx>,
    begin: IntValue<'ctx>,
    end: IntValue<'ctx>,
) {
    use Slot::*;
    let c = |v: usize| kb.c(v as i64);
    let Kernel::Glu { glu: e, row, gate, up, step } = *k else { unreachable!("a Glu kernel") };
    let (x, out) = (args.p(X), args.p(Out));
    kb.for_(begin, end, |t| {
        let src = kb.mul(t, c(row));
        kb.for_(c(0), c(e.hidden), |j| {
            let at = |first: usize| kb.add(src, kb.add(c(first), kb.mul(j, c(step))));
            let mut u = kb.ld(x, at(up));
            let v = match gate {
                Some(g) => {
                    let mut gv = kb.ld(x, at(g));
                    if let Some(l) = e.clamp {
                        gv = kb.fmin_c(gv, l);
                        let lo = kb.fc(-l);
                        u = kb.fmin_c(fsel(kb, fcmp(kb, FloatPredicate::OLT, u, lo), lo, u), l);
                    }
                    if e.up_offset != 0.0 {
                        u = kb.b.build_float_add(u, kb.fc(e.up_offset), "").unwrap();
                    }
                    kb.b.build_float_mul(act(kb, e.act, gv), u, "").unwrap()
                }
                None => act(kb, e.act, u),
            };
            kb.st(out, kb.add(kb.mul(t, c(e.hidden)), j), v);
        });
    });
}
