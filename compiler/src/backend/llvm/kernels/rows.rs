//! Row-wise kernels: gathers, positions, elementwise ops, norms, head splits and merges,
//! rotary embeddings, the last row, and the copy into the cache.

use inkwell::values::{FloatValue, IntValue, PointerValue, VectorValue};

use super::{Args, Kernel, Slot, UnaryOp};
use crate::backend::llvm::elementwise::{act, F64Ir};
use crate::backend::llvm::kb::Kb;
use crate::interp::Q8_ACT_BLOCK;
use crate::ir::{Act, HeadStart, QkvPart};

/// One task: `out[t] = P + t`.
pub(crate) fn positions<'ctx>(
    kb: &Kb<'_, 'ctx>,
    _: &Kernel,
    args: &Args<'_, '_, 'ctx>,
    _: IntValue<'ctx>,
    _: IntValue<'ctx>,
) {
    use Slot::*;
    let c = |v: usize| kb.c(v as i64);
    let a = |s: Slot| args.i(s);
    let p = |s: Slot| args.p(s);

    // args: out, T, P
    let (out, t, pp) = (p(Out), a(T), a(P));
    kb.for_(c(0), t, |i| kb.sti(out, i, kb.add(pp, i)));
}

pub(crate) fn row_positions<'ctx>(
    kb: &Kb<'_, 'ctx>,
    _: &Kernel,
    args: &Args<'_, '_, 'ctx>,
    _: IntValue<'ctx>,
    _: IntValue<'ctx>,
) {
    use Slot::*;
    let (out, t, table) = (args.p(Out), args.i(T), args.p(RowInfo));
    kb.for_(kb.c(0), t, |i| kb.sti(out, i, kb.ld64(table, kb.mul(i, kb.c(2)))));
}

pub(crate) fn gather<'ctx>(
    kb: &Kb<'_, 'ctx>,
    k: &Kernel,
    args: &Args<'_, '_, 'ctx>,
    begin: IntValue<'ctx>,
    end: IntValue<'ctx>,
) {
    use Slot::*;
    let c = |v: usize| kb.c(v as i64);
    let p = |s: Slot| args.p(s);
    let Kernel::Gather { d, offset, wf } = *k else { unreachable!("a Gather kernel") };

    let (table, ids, out) = (p(Table), p(Ids), p(Out));
    kb.for_(begin, end, |t| {
        let row = kb.add(kb.ldi(ids, t), c(offset));
        let (src, dst) = (kb.mul(row, c(d)), kb.mul(t, c(d)));
        kb.for_(c(0), c(d), |j| kb.st(out, kb.add(dst, j), kb.ldw(table, kb.add(src, j), wf)));
    });
}

pub(crate) fn sinusoidal<'ctx>(
    kb: &Kb<'_, 'ctx>,
    k: &Kernel,
    args: &Args<'_, '_, 'ctx>,
    begin: IntValue<'ctx>,
    end: IntValue<'ctx>,
) {
    use Slot::*;
    let c = |v: usize| kb.c(v as i64);
    let p = |s: Slot| args.p(s);
    let Kernel::Sinusoidal { dim, base, fairseq, offset } = *k else { unreachable!("a Sinusoidal kernel") };

    let (pos, out) = (p(Pos), p(Out));
    if fairseq || offset > 0 {
        // Unrolled at compile time over the features, each with its pair's frequency.
        let freqs = crate::ir::sinusoid_freqs(dim, base, fairseq);
        return kb.for_(begin, end, |t| {
            let pf = kb.i_to_f64(kb.add(kb.ldi(pos, t), kb.c(offset as i64)));
            for j in 0..dim {
                let (i, cos) = crate::ir::sinusoid_feature(dim, fairseq, j);
                let ang = kb.fmul(pf, kb.dc(freqs[i]));
                let v = kb.intrinsic(if cos { "llvm.cos" } else { "llvm.sin" }, &[ang]);
                kb.st(out, kb.add(kb.mul(t, c(dim)), c(j)), kb.to_f32(v));
            }
        });
    }
    kb.for_(begin, end, |t| {
        let pf = kb.i_to_f64(kb.ldi(pos, t));
        for i in 0..dim / 2 {
            // Unrolled at compile time: the frequencies are constants.
            let inv = 1.0 / base.powf(2.0 * i as f64 / dim as f64);
            let ang = kb.fmul(pf, kb.dc(inv));
            let (s, co) = (kb.intrinsic("llvm.sin", &[ang]), kb.intrinsic("llvm.cos", &[ang]));
            let at = kb.add(kb.mul(t, c(dim)), c(2 * i));
            kb.st(out, at, kb.to_f32(s));
            kb.st(out, kb.add(at, c(1)), kb.to_f32(co));
        }
    });
}

pub(crate) fn binary<'ctx>(
    kb: &Kb<'_, 'ctx>,
    k: &Kernel,
    args: &Args<'_, '_, 'ctx>,
    begin: IntValue<'ctx>,
    end: IntValue<'ctx>,
) {
    use Slot::*;
    let c = |v: usize| kb.c(v as i64);
    let p = |s: Slot| args.p(s);
    let Kernel::Binary { mul, width } = *k else { unreachable!("a Binary kernel") };

    let (x, y, out) = (p(X), p(Y), p(Out));
    kb.for_(begin, end, |r| {
        let base = kb.mul(r, c(width));
        kb.for_(c(0), c(width), |j| {
            let i = kb.add(base, j);
            let (u, v) = (kb.ld(x, i), kb.ld(y, i));
            kb.st(out, i, if mul { kb.fmul(u, v) } else { kb.fadd(u, v) });
        });
    });
}

pub(crate) fn unary_rows<'ctx>(
    kb: &Kb<'_, 'ctx>,
    k: &Kernel,
    args: &Args<'_, '_, 'ctx>,
    begin: IntValue<'ctx>,
    end: IntValue<'ctx>,
) {
    use Slot::*;
    let c = |v: usize| kb.c(v as i64);
    let p = |s: Slot| args.p(s);
    let Kernel::Unary { op, width } = *k else { unreachable!("a Unary kernel") };

    let (x, out) = (p(X), p(Out));
    kb.for_(begin, end, |r| {
        let base = kb.mul(r, c(width));
        kb.for_(c(0), c(width), |j| {
            let i = kb.add(base, j);
            kb.st(out, i, unary(kb, op, kb.ld(x, i)));
        });
    });
}

/// `Op::RoundQ8` (`interp::round_q8`): each row's blocks of 32 (the last may be
/// fewer) as `q · d`, a block holding an infinity or NaN copied as it is.
pub(crate) fn round_q8_rows<'ctx>(
    kb: &Kb<'_, 'ctx>,
    k: &Kernel,
    args: &Args<'_, '_, 'ctx>,
    begin: IntValue<'ctx>,
    end: IntValue<'ctx>,
) {
    use Slot::*;
    let c = |v: usize| kb.c(v as i64);
    let Kernel::RoundQ8 { width } = *k else { unreachable!("a RoundQ8 kernel") };
    let (x, out) = (args.p(X), args.p(Out));
    let block = |at: IntValue<'ctx>, n: usize| {
        let (d, inv, finite) = kb.q8_act_scale(x, at, n);
        kb.for_(c(0), c(n), |j| {
            let i = kb.add(at, j);
            let v = kb.ld(x, i);
            let q = kb.q8_act_int(v, inv, kb.cx.i32_type());
            let r = kb.fmul(kb.b.build_signed_int_to_float(q, kb.f32t(), "").unwrap(), d);
            kb.st(out, i, kb.b.build_select(finite, r, v, "").unwrap().into_float_value());
        });
    };
    let (full, tail) = (width / Q8_ACT_BLOCK, width % Q8_ACT_BLOCK);
    kb.for_(begin, end, |r| {
        let base = kb.mul(r, c(width));
        kb.for_(c(0), c(full), |b| block(kb.add(base, kb.mul(b, c(Q8_ACT_BLOCK))), Q8_ACT_BLOCK));
        if tail > 0 {
            block(kb.add(base, c(full * Q8_ACT_BLOCK)), tail);
        }
    });
}

pub(crate) fn layer_norm<'ctx>(
    kb: &Kb<'_, 'ctx>,
    k: &Kernel,
    args: &Args<'_, '_, 'ctx>,
    begin: IntValue<'ctx>,
    end: IntValue<'ctx>,
) {
    use Slot::*;
    let c = |v: usize| kb.c(v as i64);
    let p = |s: Slot| args.p(s);
    let Kernel::LayerNorm { d, eps, round, sets, .. } = *k else { unreachable!("a LayerNorm kernel") };

    let (x, w0) = (p(X), args.opt_p(W));
    let (b0, out) = (args.opt_p(Bias), p(Out));
    let rows = (sets > 1).then(|| args.i(Rows));
    kb.for_(begin, end, |r| {
        let base = kb.mul(r, c(d));
        let w = w0.map(|w| param_start(kb, w, rows, sets, r, d));
        let b = b0.map(|b| param_start(kb, b, rows, sets, r, d));
        let n = kb.fc(d as f64);
        let mean = kb.fdiv(kb.sum(c(0), c(d), |j| kb.ld(x, kb.add(base, j))), n);
        let var = kb.fdiv(
            kb.sum(c(0), c(d), |j| {
                let v = kb.fsub(kb.ld(x, kb.add(base, j)), mean);
                kb.fmul(v, v)
            }),
            n,
        );
        let inv = kb.fdiv(kb.fc(1.0), kb.intrinsic("llvm.sqrt", &[kb.fadd(var, kb.fc(eps))]));
        kb.for_(c(0), c(d), |j| {
            let v = kb.fmul(kb.fsub(kb.ld(x, kb.add(base, j)), mean), inv);
            let v = match w {
                Some(w) => kb.fmul(v, kb.ld(w, j)),
                None => v,
            };
            let v = match b {
                Some(b) => kb.fadd(v, kb.ld(b, j)),
                None => v,
            };
            kb.st(out, kb.add(base, j), if round { kb.round_bf16(v) } else { v });
        });
    });
}

/// Row `r`'s norm parameters in `p`: `p` itself when shared, else its head's set (`sets`
/// heads of `rows / sets` rows each).
fn param_start<'ctx>(
    kb: &Kb<'_, 'ctx>,
    p: PointerValue<'ctx>,
    rows: Option<IntValue<'ctx>>,
    sets: usize,
    r: IntValue<'ctx>,
    d: usize,
) -> PointerValue<'ctx> {
    match rows {
        Some(rows) if sets > 1 => {
            let per_head = kb.udiv(rows, kb.c(sets as i64));
            kb.gep(kb.f32t(), p, kb.mul(kb.udiv(r, per_head), kb.c(d as i64)))
        }
        _ => p,
    }
}

pub(crate) fn rms_norm<'ctx>(
    kb: &Kb<'_, 'ctx>,
    k: &Kernel,
    args: &Args<'_, '_, 'ctx>,
    begin: IntValue<'ctx>,
    end: IntValue<'ctx>,
) {
    use Slot::*;
    let c = |v: usize| kb.c(v as i64);
    let p = |s: Slot| args.p(s);
    let Kernel::RmsNorm { d, eps, unit_offset, round, sets } = *k else { unreachable!("a RmsNorm kernel") };

    let (x, w0, out) = (p(X), p(W), p(Out));
    let rows = (sets > 1).then(|| args.i(Rows));
    kb.for_(begin, end, |r| {
        let base = kb.mul(r, c(d));
        let w = param_start(kb, w0, rows, sets, r, d);
        let ss = kb.sum(c(0), c(d), |j| {
            let v = kb.ld(x, kb.add(base, j));
            kb.fmul(v, v)
        });
        let ms = kb.fdiv(ss, kb.fc(d as f64));
        let inv = kb.fdiv(kb.fc(1.0), kb.intrinsic("llvm.sqrt", &[kb.fadd(ms, kb.fc(eps))]));
        kb.for_(c(0), c(d), |j| {
            let g = kb.ld(w, j);
            let g = if unit_offset { kb.fadd(g, kb.fc(1.0)) } else { g };
            let v = kb.fmul(kb.fmul(kb.ld(x, kb.add(base, j)), inv), g);
            kb.st(out, kb.add(base, j), if round { kb.round_bf16(v) } else { v });
        });
    });
}

pub(crate) fn split_qkv<'ctx>(
    kb: &Kb<'_, 'ctx>,
    k: &Kernel,
    args: &Args<'_, '_, 'ctx>,
    begin: IntValue<'ctx>,
    end: IntValue<'ctx>,
) {
    use Slot::*;
    let c = |v: usize| kb.c(v as i64);
    let p = |s: Slot| args.p(s);
    let Kernel::SplitQkv { layout, part, heads, kv_heads, head_dim } = *k else {
        unreachable!("a SplitQkv kernel")
    };

    let (x, out) = (p(X), p(Out));
    let n = if part == QkvPart::Q { heads } else { kv_heads };
    let width = (heads + 2 * kv_heads) * head_dim;
    // The column where head `j` of this part starts (`HeadStart`), as a runtime
    // expression (one loop over heads rather than one unrolled copy per head).
    let col = |j: IntValue<'ctx>| -> IntValue<'ctx> {
        match layout.head_start(part, heads, kv_heads, head_dim) {
            HeadStart::Run { first: 0 } => kb.mul(j, c(head_dim)),
            HeadStart::Run { first } => kb.mul(kb.add(j, c(first)), c(head_dim)),
            // One head of this part per group (keys, values): `j · group_width + offset`.
            HeadStart::Groups { per_group: 1, group_width, offset } if offset > 0 => {
                kb.add(kb.mul(j, c(group_width)), c(offset))
            }
            HeadStart::Groups { per_group, group_width, offset } => {
                let outer = kb.mul(kb.div(j, c(per_group)), c(group_width));
                let v = kb.add(outer, kb.mul(kb.rem(j, c(per_group)), c(head_dim)));
                if offset > 0 {
                    kb.add(v, c(offset))
                } else {
                    v
                }
            }
        }
    };
    kb.for_(begin, end, |t| {
        let src = kb.mul(t, c(width));
        let dst = kb.mul(t, c(n * head_dim));
        kb.for_(c(0), c(n), |j| {
            kb.copy(out, kb.add(dst, kb.mul(j, c(head_dim))), x, kb.add(src, col(j)), head_dim);
        });
    });
}

pub(crate) fn split_heads<'ctx>(
    kb: &Kb<'_, 'ctx>,
    k: &Kernel,
    args: &Args<'_, '_, 'ctx>,
    begin: IntValue<'ctx>,
    end: IntValue<'ctx>,
) {
    use Slot::*;
    let c = |v: usize| kb.c(v as i64);
    let a = |s: Slot| args.i(s);
    let p = |s: Slot| args.p(s);
    let Kernel::SplitHeads { heads, head_dim } = *k else { unreachable!("a SplitHeads kernel") };

    let (x, out, rows) = (p(X), p(Out), a(OutRows));
    kb.for_(begin, end, |t| {
        kb.for_(c(0), c(heads), |h| {
            let src = kb.add(kb.mul(t, c(heads * head_dim)), kb.mul(h, c(head_dim)));
            let dst = kb.mul(kb.add(kb.mul(h, rows), t), c(head_dim));
            kb.copy(out, dst, x, src, head_dim);
        });
    });
}

pub(crate) fn merge_heads<'ctx>(
    kb: &Kb<'_, 'ctx>,
    k: &Kernel,
    args: &Args<'_, '_, 'ctx>,
    begin: IntValue<'ctx>,
    end: IntValue<'ctx>,
) {
    use Slot::*;
    let c = |v: usize| kb.c(v as i64);
    let a = |s: Slot| args.i(s);
    let p = |s: Slot| args.p(s);
    let Kernel::MergeHeads { heads, head_dim, round } = *k else { unreachable!("a MergeHeads kernel") };

    let (x, out, rows) = (p(X), p(Out), a(Rows));
    kb.for_(begin, end, |t| {
        kb.for_(c(0), c(heads), |h| {
            let src = kb.mul(kb.add(kb.mul(h, rows), t), c(head_dim));
            let dst = kb.add(kb.mul(t, c(heads * head_dim)), kb.mul(h, c(head_dim)));
            kb.for_(c(0), c(head_dim), |i| {
                let v = kb.ld(x, kb.add(src, i));
                kb.st(out, kb.add(dst, i), if round { kb.round_bf16(v) } else { v })
            });
        });
    });
}

pub(crate) fn rope<'ctx>(
    kb: &Kb<'_, 'ctx>,
    k: &Kernel,
    args: &Args<'_, '_, 'ctx>,
    begin: IntValue<'ctx>,
    end: IntValue<'ctx>,
) {
    use Slot::*;
    let c = |v: usize| kb.c(v as i64);
    let a = |s: Slot| args.i(s);
    let p = |s: Slot| args.p(s);
    let Kernel::Rope { head_dim, ref rope, heads } = *k else { unreachable!("a Rope kernel") };
    let (rotary_dim, interleaved, inv_freqs) = (rope.rotary_dim, rope.interleaved, rope.inv_freqs());

    // A task is a position: its angles' sines and cosines are computed once for
    // every head, into a table the heads' rotations read eight pairs at a time,
    // in f64 as the interpreter computes them (no contraction: the same values).
    let (x, pos, out, rows, out_rows) = (p(X), p(Pos), p(Out), a(Rows), a(OutRows));
    let half = rotary_dim / 2;
    let f64t = kb.f64t();
    let (sins, coss) = (
        kb.b.build_array_alloca(f64t, c(half), "sin").unwrap(),
        kb.b.build_array_alloca(f64t, c(half), "cos").unwrap(),
    );
    let (f64v, f32v) = (f64t.vec_type(8), kb.f32t().vec_type(8));
    let ldd = |p: PointerValue<'ctx>, i: IntValue<'ctx>| {
        kb.b.build_load(f64v, kb.gep(f64t, p, i), "").unwrap().into_vector_value()
    };
    let ext = |v: VectorValue<'ctx>| kb.b.build_float_ext(v, f64v, "").unwrap();
    let trunc = |v: VectorValue<'ctx>| kb.b.build_float_trunc(v, f32v, "").unwrap();
    let lds = |at: IntValue<'ctx>, n: u32| {
        let v = kb.b.build_load(kb.f32t().vec_type(n), kb.gep(kb.f32t(), x, at), "").unwrap();
        inkwell::values::BasicValue::as_instruction_value(&v).unwrap().set_alignment(4).unwrap();
        v.into_vector_value()
    };
    let sts = |at: IntValue<'ctx>, v: VectorValue<'ctx>| {
        let st = kb.b.build_store(kb.gep(kb.f32t(), out, at), v).unwrap();
        st.set_alignment(4).unwrap();
    };
    // Pairs (x1, x2) → (x1·cos − x2·sin, x2·cos + x1·sin).
    let rot = |x1: VectorValue<'ctx>, x2: VectorValue<'ctx>, i: usize| {
        let (co, si) = (ldd(coss, c(i)), ldd(sins, c(i)));
        let (x1, x2) = (ext(x1), ext(x2));
        let ra = kb.vsub(kb.vmul(x1, co), kb.vmul(x2, si));
        let rb = kb.vadd(kb.vmul(x2, co), kb.vmul(x1, si));
        (trunc(ra), trunc(rb))
    };
    let evens: Vec<u32> = (0..8).map(|j| 2 * j).collect();
    let odds: Vec<u32> = (0..8).map(|j| 2 * j + 1).collect();
    let zip: Vec<u32> = (0..8).flat_map(|j| [j, 8 + j]).collect();
    kb.for_(begin, end, |t| {
        let pf = kb.i_to_f64(kb.ldi(pos, t));
        for (i, &inv) in inv_freqs.iter().enumerate() {
            let ang = kb.fmul(pf, kb.dc(inv));
            // YaRN scales the rotation (`Rope::magnitude`); 1 leaves it as it is.
            let scaled = |v| match rope.magnitude() {
                1.0 => v,
                m => kb.fmul(v, kb.dc(m)),
            };
            kb.b.build_store(kb.gep(f64t, sins, c(i)), scaled(kb.intrinsic("llvm.sin", &[ang]))).unwrap();
            kb.b.build_store(kb.gep(f64t, coss, c(i)), scaled(kb.intrinsic("llvm.cos", &[ang]))).unwrap();
        }
        kb.for_(c(0), c(heads), |h| {
            let base = kb.mul(kb.add(kb.mul(h, rows), t), c(head_dim));
            let obase = kb.mul(kb.add(kb.mul(h, out_rows), t), c(head_dim));
            kb.for_(c(rotary_dim), c(head_dim), |i| kb.st(out, kb.add(obase, i), kb.ld(x, kb.add(base, i))));
            let at = |i: usize| kb.add(base, c(i));
            let oat = |i: usize| kb.add(obase, c(i));
            for i in (0..half / 8 * 8).step_by(8) {
                if interleaved {
                    let v = lds(at(2 * i), 16);
                    let (x1, x2) = (kb.shuffle(v, v, &evens), kb.shuffle(v, v, &odds));
                    let (ra, rb) = rot(x1, x2, i);
                    sts(oat(2 * i), kb.shuffle(ra, rb, &zip));
                } else {
                    let (ra, rb) = rot(lds(at(i), 8), lds(at(i + half), 8), i);
                    sts(oat(i), ra);
                    sts(oat(i + half), rb);
                }
            }
            for i in half / 8 * 8..half {
                let (ia, ib) = if interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
                let (x1, x2) = (kb.to_f64(kb.ld(x, at(ia))), kb.to_f64(kb.ld(x, at(ib))));
                let (s, co) = (
                    kb.b.build_load(f64t, kb.gep(f64t, sins, c(i)), "").unwrap().into_float_value(),
                    kb.b.build_load(f64t, kb.gep(f64t, coss, c(i)), "").unwrap().into_float_value(),
                );
                let ra = kb.fsub(kb.fmul(x1, co), kb.fmul(x2, s));
                let rb = kb.fadd(kb.fmul(x2, co), kb.fmul(x1, s));
                kb.st(out, oat(ia), kb.to_f32(ra));
                kb.st(out, oat(ib), kb.to_f32(rb));
            }
        });
    });
}

/// One task: the last of `rows` rows.
pub(crate) fn last_row<'ctx>(
    kb: &Kb<'_, 'ctx>,
    k: &Kernel,
    args: &Args<'_, '_, 'ctx>,
    _: IntValue<'ctx>,
    _: IntValue<'ctx>,
) {
    use Slot::*;
    let c = |v: usize| kb.c(v as i64);
    let a = |s: Slot| args.i(s);
    let p = |s: Slot| args.p(s);
    let Kernel::LastRow { width, int } = *k else { unreachable!("a LastRow kernel") };

    let (x, out, rows) = (p(X), p(Out), a(Rows));
    let src = kb.mul(kb.sub(rows, c(1)), c(width));
    kb.for_(c(0), c(width), |i| {
        let at = kb.add(src, i);
        if int {
            kb.sti(out, i, kb.ldi(x, at))
        } else {
            kb.st(out, i, kb.ld(x, at))
        }
    });
}

pub(crate) fn cache_store<'ctx>(
    kb: &Kb<'_, 'ctx>,
    k: &Kernel,
    args: &Args<'_, '_, 'ctx>,
    begin: IntValue<'ctx>,
    end: IntValue<'ctx>,
) {
    use Slot::*;
    let c = |v: usize| kb.c(v as i64);
    let a = |s: Slot| args.i(s);
    let p = |s: Slot| args.p(s);
    let Kernel::CacheStore { head_dim, max_seq, table } = *k else { unreachable!("a CacheStore kernel") };

    let (src, cache, rows, pp) = (p(X), p(Cache), a(Rows), a(P));
    let table = table.then(|| p(RowInfo));
    kb.for_(begin, end, |g| {
        kb.for_(c(0), rows, |t| {
            let s = kb.mul(kb.add(kb.mul(g, rows), t), c(head_dim));
            // Row `t` at position P + t, or at its own position in its own slot's cache.
            let (at, base) = match table {
                None => (kb.add(pp, t), c(0)),
                Some(r) => (kb.ld64(r, kb.mul(t, c(2))), kb.ld64(r, kb.add(kb.mul(t, c(2)), c(1)))),
            };
            let d = kb.add(base, kb.mul(kb.add(kb.mul(g, c(max_seq)), at), c(head_dim)));
            kb.for_(c(0), c(head_dim), |i| kb.st(cache, kb.add(d, i), kb.ld(src, kb.add(s, i))));
        });
    });
}

pub(crate) fn unary<'ctx>(kb: &Kb<'_, 'ctx>, op: UnaryOp, x: FloatValue<'ctx>) -> FloatValue<'ctx> {
    match op {
        UnaryOp::Scale(s) => kb.to_f32(kb.fmul(kb.to_f64(x), kb.dc(s))),
        UnaryOp::RoundBf16 => kb.round_bf16(x),
        UnaryOp::Act(Act::Gelu) => kb.to_f32(Act::Gelu.apply(&mut F64Ir { kb }, kb.to_f64(x))),
        UnaryOp::Act(a) => act(kb, a, x),
    }
}
