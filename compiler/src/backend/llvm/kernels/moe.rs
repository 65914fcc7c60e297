//! A mixture of experts: the router's weights, the rows grouped by expert (so that each
//! expert's matrices are read once for all of its rows, by the linear kernels the graph
//! function calls per expert), the weighted sum of the experts' outputs, and the row
//! scale of a shared expert's gate.

use inkwell::values::{FloatValue, IntValue};
use inkwell::FloatPredicate;

use super::{Args, Kernel, Slot};
use crate::backend::llvm::elementwise::act;
use crate::backend::llvm::kb::Kb;
use crate::ir::Scoring;

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

/// Per row: the `top_k` largest logits chosen one at a time (strictly larger wins, so a
/// tie goes to the lower expert), then their weights as `Route::route` says, in f32.
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
    // 1 where an expert is chosen.
    let chosen = kb.alloca_f32s(e);
    kb.for_(begin, end, |t| {
        let row = kb.mul(t, c(e));
        kb.for_(c(0), c(e), |j| {
            kb.st(out, kb.add(row, j), kb.fc(0.0));
            kb.st(chosen, j, kb.fc(0.0));
        });
        kb.for_(c(0), c(r.top_k), |_| {
            let init = [kb.fc(f64::NEG_INFINITY).into(), kb.c(-1).into()];
            let best = kb.fold(c(0), c(e), &init, |j, acc| {
                let (b, bi) = (acc[0].into_float_value(), acc[1].into_int_value());
                let l = kb.ld(x, kb.add(row, j));
                let free = fcmp(kb, FloatPredicate::OEQ, kb.ld(chosen, j), kb.fc(0.0));
                let first = kb.icmp_lt(bi, c(0));
                let better = kb.b.build_or(first, fcmp(kb, FloatPredicate::OGT, l, b), "").unwrap();
                let take = kb.b.build_and(free, better, "").unwrap();
                vec![fsel(kb, take, l, b).into(), kb.select(take, j, bi).into()]
            });
            kb.st(chosen, best[1].into_int_value(), kb.fc(1.0));
        });
        let scored = |j: IntValue<'ctx>| match r.scoring {
            Scoring::Softmax => kb.c(1).const_truncate(kb.cx.bool_type()),
            Scoring::SoftmaxChosen => fcmp(kb, FloatPredicate::ONE, kb.ld(chosen, j), kb.fc(0.0)),
        };
        let ninf = kb.fc(f64::NEG_INFINITY);
        let max = kb.fold(c(0), c(e), &[ninf.into()], |j, acc| {
            let m = acc[0].into_float_value();
            vec![fsel(kb, scored(j), kb.fmax(m, kb.ld(x, kb.add(row, j))), m).into()]
        })[0]
            .into_float_value();
        let total = kb.fold(c(0), c(e), &[kb.fc(0.0).into()], |j, acc| {
            let s = acc[0].into_float_value();
            let p = kb.exp(kb.b.build_float_sub(kb.ld(x, kb.add(row, j)), max, "").unwrap());
            vec![fsel(kb, scored(j), kb.b.build_float_add(s, p, "").unwrap(), s).into()]
        })[0]
            .into_float_value();
        let sum = kb.fold(c(0), c(e), &[kb.fc(0.0).into()], |j, acc| {
            let s = acc[0].into_float_value();
            let is = fcmp(kb, FloatPredicate::ONE, kb.ld(chosen, j), kb.fc(0.0));
            let p = kb.exp(kb.b.build_float_sub(kb.ld(x, kb.add(row, j)), max, "").unwrap());
            let w = kb.fdiv(p, total);
            kb.st(out, kb.add(row, j), fsel(kb, is, w, kb.fc(0.0)));
            vec![fsel(kb, is, kb.b.build_float_add(s, w, "").unwrap(), s).into()]
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
                    let (src, dst) = (kb.mul(t, c(d)), kb.mul(n, c(d)));
                    kb.for_(c(0), c(d), |i| kb.st(out, kb.add(dst, i), kb.ld(x, kb.add(src, i))));
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
