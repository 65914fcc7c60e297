//! What multi-head latent attention adds to the row kernels: a part of each row's
//! features (`Op::Slice`), two rows side by side (`Op::Concat` along the features), and
//! each head's own linear map by its block of rows of one f32 matrix (`Op::HeadLinear`,
//! `kv_b_proj` absorbed into the query and the output side).

use inkwell::values::IntValue;

use super::{Args, Kernel, Slot};
use crate::backend::llvm::kb::{Kb, VW};

/// Output vectors a transposed head map keeps in registers over one pass of its inputs.
const CHUNK: usize = 4;

/// args: x, out; tasks: rows. Features `start..start + len` of each `width`-wide row.
pub(crate) fn slice<'ctx>(
    kb: &Kb<'_, 'ctx>,
    k: &Kernel,
    args: &Args<'_, '_, 'ctx>,
    begin: IntValue<'ctx>,
    end: IntValue<'ctx>,
) {
    let c = |v: usize| kb.c(v as i64);
    let Kernel::Slice { width, start, len } = *k else { unreachable!("a Slice kernel") };
    let (x, out) = (args.p(Slot::X), args.p(Slot::Out));
    kb.for_(begin, end, |t| {
        kb.copy(out, kb.mul(t, c(len)), x, kb.add(kb.mul(t, c(width)), c(start)), len);
    });
}

/// args: x, y, out; tasks: rows. Each row of `x` (`a` wide) then the row of `y` (`b`).
pub(crate) fn concat<'ctx>(
    kb: &Kb<'_, 'ctx>,
    k: &Kernel,
    args: &Args<'_, '_, 'ctx>,
    begin: IntValue<'ctx>,
    end: IntValue<'ctx>,
) {
    let c = |v: usize| kb.c(v as i64);
    let Kernel::Concat { a, b } = *k else { unreachable!("a Concat kernel") };
    let (x, y, out) = (args.p(Slot::X), args.p(Slot::Y), args.p(Slot::Out));
    kb.for_(begin, end, |t| {
        let dst = kb.mul(t, c(a + b));
        kb.copy(out, dst, x, kb.mul(t, c(a)), a);
        kb.copy(out, kb.add(dst, c(a)), y, kb.mul(t, c(b)), b);
    });
}

/// args: x `[H, T, inn]`, w, out `[H, T, out]`, rows (T); tasks: H·T. Head `h`'s matrix
/// is `w`'s rows `h·period + at ..` (`cols` wide). Transposed, those rows are the inputs
/// and each output vector accumulates `x[k] · row k` (`CHUNK` vectors a pass); else they
/// are the outputs, each one row's dot product with `x`.
pub(crate) fn head_linear<'ctx>(
    kb: &Kb<'_, 'ctx>,
    k: &Kernel,
    args: &Args<'_, '_, 'ctx>,
    begin: IntValue<'ctx>,
    end: IntValue<'ctx>,
) {
    type Bv<'c> = inkwell::values::BasicValueEnum<'c>;
    let c = |v: usize| kb.c(v as i64);
    let Kernel::HeadLinear { inn, out, period, at, transposed } = *k else {
        unreachable!("a HeadLinear kernel")
    };
    let (x, w, o, rows) = (args.p(Slot::X), args.p(Slot::W), args.p(Slot::Out), args.i(Slot::Rows));
    let cols = if transposed { out } else { inn };
    kb.for_(begin, end, |task| {
        let h = kb.udiv(task, rows);
        let (xrow, orow) = (kb.mul(task, c(inn)), kb.mul(task, c(out)));
        let w0 = kb.mul(kb.add(kb.mul(h, c(period)), c(at)), c(cols));
        if transposed {
            let nv = out / VW;
            for first in (0..nv).step_by(CHUNK) {
                let n = CHUNK.min(nv - first);
                let init: Vec<Bv<'ctx>> = (0..n).map(|_| kb.vzero().into()).collect();
                let acc = kb.fold(c(0), c(inn), &init, |i, acc| {
                    let xi = kb.splat(kb.ld(x, kb.add(xrow, i)));
                    let wr = kb.add(w0, kb.mul(i, c(out)));
                    (0..n)
                        .map(|j| {
                            let wv = kb.ldv(w, kb.add(wr, c((first + j) * VW)));
                            kb.vfma(xi, wv, acc[j].into_vector_value()).into()
                        })
                        .collect()
                });
                for (j, a) in acc.iter().enumerate() {
                    kb.stv(o, kb.add(orow, c((first + j) * VW)), a.into_vector_value());
                }
            }
            kb.for_(c(nv * VW), c(out), |j| {
                let s = kb.sum(c(0), c(inn), |i| {
                    kb.fmul(kb.ld(x, kb.add(xrow, i)), kb.ld(w, kb.add(w0, kb.add(kb.mul(i, c(out)), j))))
                });
                kb.st(o, kb.add(orow, j), s);
            });
        } else {
            let nv = inn / VW;
            kb.for_(c(0), c(out), |j| {
                let wr = kb.add(w0, kb.mul(j, c(inn)));
                let acc = kb.fold(c(0), c(nv), &[kb.vzero().into()], |v, acc| {
                    let at = kb.mul(v, c(VW));
                    let p = kb.vfma(
                        kb.ldv(x, kb.add(xrow, at)),
                        kb.ldv(w, kb.add(wr, at)),
                        acc[0].into_vector_value(),
                    );
                    vec![p.into()]
                });
                let tail = kb
                    .sum(c(nv * VW), c(inn), |i| kb.fmul(kb.ld(x, kb.add(xrow, i)), kb.ld(w, kb.add(wr, i))));
                kb.st(o, kb.add(orow, j), kb.fadd(kb.vsum(acc[0].into_vector_value()), tail));
            });
        }
    });
}
