//! Fused attention: an online softmax over the keys, per (head, query row) in decode and
//! per (head, block of query rows) in prefill, with masks, windows, ALiBi, soft caps and
//! sinks (a head's sink starts its softmax as a key of value zero: max = sink, sum = 1).
//!
//! ## Tuning notes
//!
//! The fused attention takes keys 16 at a time: a block's scores come from one
//! transpose-and-add tree (`Kb::lane_sums`), get one vector `exp` and one rescaling of the
//! output row, and the weighted values alternate between two accumulator sets; the keys
//! after the last whole block take the one-key step. With one query row (decode) it
//! prefetches the next block's keys and values, which it streams once from the cache.
//! Prefill's query rows, known only at run time, go four at a time (`attention_block`,
//! for a head dimension of 64): their online softmaxes advance together over the keys
//! any of them sees, masking per row what it does not, so the four rows' dependency
//! chains overlap and each key and value row is loaded once for all four (W1's
//! attention took ~40% less time; transposing each key block instead, to get the scores
//! without lane sums, was slower, its shuffles all on one port). Its blocks start at the
//! first key any row sees and end masked, so a query's keys are summed in another order
//! than decode's; the two agree to ~1e-7, not bit for bit.

use inkwell::values::{FloatValue, IntValue, PointerValue, VectorValue};

use super::{Args, Kernel, Slot};
use crate::backend::llvm::elementwise::F32Ir;
use crate::backend::llvm::kb::{F32s, Kb, VW};
use crate::ir::{alibi_slopes, Act, Arith, AttnMask};

pub(crate) fn attention_kernel<'ctx>(
    kb: &Kb<'_, 'ctx>,
    k: &Kernel,
    args: &Args<'_, '_, 'ctx>,
    begin: IntValue<'ctx>,
    end: IntValue<'ctx>,
) {
    use Slot::*;
    let a = |s: Slot| args.i(s);
    let p = |s: Slot| args.p(s);
    let Kernel::Attention { heads, groups, head_dim, scale, mask, alibi, block, softcap, sinks, table } = *k
    else {
        unreachable!("a Attention kernel")
    };

    let (q, k, v, pos, out) = (p(Q), p(K), p(V), p(Pos), p(Out));
    let (rows, s_len, kstride, vstride) = (a(Rows), a(Keys), a(KStride), a(VStride));
    let slopes = alibi.map(|f| slope_table(kb, heads, f));
    let at = Attn {
        heads,
        groups,
        hd: head_dim,
        scale,
        softcap,
        mask,
        q,
        k,
        v,
        pos,
        out,
        rows,
        s_len,
        kstride,
        vstride,
        slopes,
        sinks: sinks.then(|| p(Sinks)),
        table: table.then(|| p(RowInfo)),
    };
    match block {
        None => attention(kb, &at, begin, end),
        Some(rn) => attention_block(kb, &at, rn, begin, end),
    }
}

/// One key of an online softmax: from the running max `m` and sum `l` and the key's
/// `score`, the new max and sum, the factor `corr` that rescales what was accumulated so
/// far, and the key's weight `e`.
pub(crate) fn softmax_step<'ctx>(
    kb: &Kb<'_, 'ctx>,
    m: FloatValue<'ctx>,
    l: FloatValue<'ctx>,
    score: FloatValue<'ctx>,
) -> (FloatValue<'ctx>, FloatValue<'ctx>, FloatValue<'ctx>, FloatValue<'ctx>) {
    let m_new = kb.fmax(m, score);
    let corr = kb.exp(kb.fsub(m, m_new));
    let e = kb.exp(kb.fsub(score, m_new));
    (m_new, kb.fadd(kb.fmul(l, corr), e), corr, e)
}

/// Query rows per task of the blocked attention for heads of `head_dim` (a multiple of
/// `VW`): as many as keep their output rows in registers beside the values' row (four
/// for 64; eight spilled and were slower).
pub(crate) fn attention_rows(head_dim: usize) -> Option<usize> {
    (head_dim % VW == 0).then(|| (VW * VW / head_dim).clamp(1, 8))
}

/// `cap · tanh(x / cap)` of scores, scalar or vector (`Act::Tanh` through `F32Ir`); `x`
/// without a cap.
fn capped<'ctx, V: F32s<'ctx>>(kb: &Kb<'_, 'ctx>, softcap: Option<f64>, x: V) -> V {
    let Some(cap) = softcap else { return x };
    let mut a = F32Ir { kb, _v: std::marker::PhantomData };
    let (inv, c) = (a.c(1.0 / cap), a.c(cap));
    let scaled = a.mul(x, inv);
    let t = Act::Tanh.apply(&mut a, scaled);
    a.mul(t, c)
}

/// What both attention kernels read: the op's constants and its argument block (see
/// `Kernel::Attention`).
#[derive(Clone, Copy)]
pub(crate) struct Attn<'ctx> {
    heads: usize,
    groups: usize,
    hd: usize,
    scale: f64,
    /// Scores soft-capped to `cap · tanh(s / cap)`.
    softcap: Option<f64>,
    mask: AttnMask,
    q: PointerValue<'ctx>,
    k: PointerValue<'ctx>,
    v: PointerValue<'ctx>,
    pos: PointerValue<'ctx>,
    out: PointerValue<'ctx>,
    rows: IntValue<'ctx>,
    s_len: IntValue<'ctx>,
    kstride: IntValue<'ctx>,
    vstride: IntValue<'ctx>,
    /// Each head's ALiBi slope (`slope_table`), with ALiBi.
    slopes: Option<PointerValue<'ctx>>,
    /// Each head's sink logit, with sinks.
    sinks: Option<PointerValue<'ctx>>,
    /// A batched decode's row table (`Slot::RowInfo`): each query row's keys and values
    /// are in its own slot's cache.
    table: Option<PointerValue<'ctx>>,
}

impl<'ctx> Attn<'ctx> {
    /// The online softmax's state before the first key, running max and sum: none, or
    /// head `h`'s sink as a key whose value is zero (`exp(sink - sink) = 1`).
    fn start(&self, kb: &Kb<'_, 'ctx>, h: IntValue<'ctx>) -> (FloatValue<'ctx>, FloatValue<'ctx>) {
        match self.sinks {
            Some(s) => (kb.ld(s, h), kb.fc(1.0)),
            None => (kb.fc(f64::NEG_INFINITY), kb.fc(0.0)),
        }
    }
}

/// The ALiBi slope of each head (times `scale`), as a constant table.
pub(crate) fn slope_table<'ctx>(kb: &Kb<'_, 'ctx>, heads: usize, scale: f64) -> PointerValue<'ctx> {
    let vals: Vec<_> = alibi_slopes(heads, scale).iter().map(|&s| kb.f32t().const_float(s)).collect();
    let arr = kb.f32t().const_array(&vals);
    let g = kb.m.add_global(arr.get_type(), None, "tfc_alibi_slopes");
    g.set_initializer(&arr);
    g.set_constant(true);
    g.set_linkage(inkwell::module::Linkage::Private);
    g.as_pointer_value()
}

/// The visible keys of the query at position `pq`: `lo..hi`.
pub(crate) fn visible<'ctx>(
    kb: &Kb<'_, 'ctx>,
    mask: AttnMask,
    pq: IntValue<'ctx>,
    s_len: IntValue<'ctx>,
) -> (IntValue<'ctx>, IntValue<'ctx>) {
    let c = |v: usize| kb.c(v as i64);
    let (mut lo, mut hi) = (c(0), s_len);
    if mask.causal {
        hi = kb.min(hi, kb.add(pq, c(1)));
    }
    if let Some(w) = mask.window {
        lo = kb.max(lo, kb.sub(pq, c(w - 1)));
        if !mask.causal {
            hi = kb.min(hi, kb.add(pq, c(w)));
        }
    }
    (lo, hi)
}

/// One task per (head, block of `rn` query rows), for prefill's many rows: the rows'
/// online softmaxes (as in `attention`) advance together over blocks of `VW` keys, so
/// their dependency chains (the running max, its exponential, the rescaling) overlap
/// instead of each row waiting on its own, each key and value row is loaded once for
/// all of them, and the queries stay in registers. The keys are those visible to any row
/// of the block; a key a row does not see (the causal mask, a window, the ragged end)
/// gets no weight in it, and a row that sees no key yet keeps its state. (Transposing
/// each key block once to get the scores without horizontal sums was slower: the
/// transposes' shuffles all run on one port.)
pub(crate) fn attention_block<'ctx>(
    kb: &Kb<'_, 'ctx>,
    at: &Attn<'ctx>,
    rn: usize,
    begin: IntValue<'ctx>,
    end: IntValue<'ctx>,
) {
    type Bv<'c> = inkwell::values::BasicValueEnum<'c>;
    let c = |v: usize| kb.c(v as i64);
    let Attn {
        heads,
        groups,
        hd,
        scale,
        softcap,
        mask,
        q,
        k,
        v,
        pos,
        out,
        rows,
        s_len,
        kstride,
        vstride,
        slopes,
        ..
    } = *at;
    let nv = hd / VW;
    let eb = kb.alloca_f32s(rn * VW);
    let i64v = kb.i64t().vec_type(VW as u32);
    let lanes = inkwell::types::VectorType::const_vector(
        &(0..VW as u64).map(|j| kb.i64t().const_int(j, false)).collect::<Vec<_>>(),
    );
    let isplat = |x: IntValue<'ctx>| {
        let u = kb.b.build_insert_element(i64v.get_undef(), x, kb.cx.i32_type().const_zero(), "").unwrap();
        kb.b.build_shuffle_vector(u, i64v.get_undef(), kb.cx.i32_type().vec_type(VW as u32).const_zero(), "")
            .unwrap()
    };
    let nrb = kb.udiv(kb.add(rows, c(rn - 1)), c(rn));
    kb.for_(begin, end, |task| {
        let (h, rb) = (kb.udiv(task, nrb), kb.urem(task, nrb));
        let g = kb.udiv(h, c(heads / groups));
        let (kb0, vb0) = (kb.mul(g, kstride), kb.mul(g, vstride));
        // Row r of the block, clamped to the last row (computed, not stored).
        let t_of = |r: usize| kb.min(kb.add(kb.mul(rb, c(rn)), c(r)), kb.sub(rows, c(1)));
        let pqs: Vec<_> = (0..rn).map(|r| kb.ldi(pos, t_of(r))).collect();
        let spans: Vec<_> = pqs.iter().map(|&pq| visible(kb, mask, pq, s_len)).collect();
        let lo = spans.iter().skip(1).fold(spans[0].0, |m, s| kb.min(m, s.0));
        let hi = spans.iter().skip(1).fold(spans[0].1, |m, s| kb.max(m, s.1));
        let last = kb.sub(hi, c(1));
        let slope = slopes.map(|s| kb.ld(s, h));
        let qrow = |r: usize| kb.mul(kb.add(kb.mul(h, rows), t_of(r)), c(hd));
        let qv: Vec<Vec<_>> =
            (0..rn).map(|r| (0..nv).map(|i| kb.ldv(q, kb.add(qrow(r), c(i * VW)))).collect()).collect();
        // Per row: running max, running sum, `nv` output vectors.
        let mut init: Vec<Bv<'ctx>> = Vec::new();
        let (m0, l0) = at.start(kb, h);
        for _ in 0..rn {
            init.extend([Bv::from(m0), l0.into()]);
            init.extend((0..nv).map(|_| Bv::from(kb.vzero())));
        }
        let blocks = kb.udiv(kb.add(kb.max(kb.sub(hi, lo), c(0)), c(VW - 1)), c(VW));
        let st = kb.fold(c(0), blocks, &init, |b, st| {
            let s0 = kb.add(lo, kb.mul(b, c(VW)));
            // Keys s0..; those past the last visible one repeat it.
            let key = |j: usize| kb.min(kb.add(s0, c(j)), last);
            let keys = kb.b.build_int_add(isplat(s0), lanes, "").unwrap();
            let mut next: Vec<Bv<'ctx>> = Vec::with_capacity(st.len());
            for r in 0..rn {
                let at = r * (2 + nv);
                let (m, l) = (st[at].into_float_value(), st[at + 1].into_float_value());
                // Scores: each key's products with the query row, summed across lanes.
                let dots = (0..VW)
                    .map(|j| {
                        let krow = kb.add(kb0, kb.mul(key(j), c(hd)));
                        (1..nv).fold(kb.vmul(qv[r][0], kb.ldv(k, krow)), |d, i| {
                            kb.vfma(qv[r][i], kb.ldv(k, kb.add(krow, c(i * VW))), d)
                        })
                    })
                    .collect();
                let mut sv = capped(kb, softcap, kb.vmul(kb.lane_sums(dots), kb.splat(kb.fc(scale))));
                if let Some(sl) = slope {
                    let rel = kb.vsub(kb.splat(kb.to_f32(kb.i_to_f64(kb.sub(pqs[r], s0)))), kb.iota());
                    sv = kb.vsub(sv, kb.vmul(kb.splat(sl), rel));
                }
                let (rlo, rhi) = spans[r];
                let ge = kb.b.build_int_compare(inkwell::IntPredicate::SGE, keys, isplat(rlo), "").unwrap();
                let lt = kb.b.build_int_compare(inkwell::IntPredicate::SLT, keys, isplat(rhi), "").unwrap();
                let seen = kb.b.build_and(ge, lt, "").unwrap();
                let ninf = kb.splat(kb.fc(f64::NEG_INFINITY));
                let masked = kb.b.build_select(seen, sv, ninf, "").unwrap().into_vector_value();
                let m_new = kb.fmax(m, kb.vmax(masked));
                // No visible key yet: m stays -inf and nothing changes (no -inf - -inf).
                let none = kb.b.build_float_compare(inkwell::FloatPredicate::OEQ, m_new, m, "").unwrap();
                let corr = kb.b.build_select(none, kb.fc(1.0), kb.exp(kb.fsub(m, m_new)), "").unwrap();
                let corr = corr.into_float_value();
                let e = kb.exp(kb.vsub(sv, kb.splat(m_new)));
                let e = kb.b.build_select(seen, e, kb.vzero(), "").unwrap().into_vector_value();
                kb.stv(eb, c(r * VW), e);
                next.extend([Bv::from(m_new), kb.fadd(kb.fmul(l, corr), kb.vsum(e)).into()]);
                let cv = kb.splat(corr);
                next.extend((0..nv).map(|i| Bv::from(kb.vmul(st[at + 2 + i].into_vector_value(), cv))));
            }
            for j in 0..VW {
                let vrow = kb.add(vb0, kb.mul(key(j), c(hd)));
                let vv: Vec<_> = (0..nv).map(|i| kb.ldv(v, kb.add(vrow, c(i * VW)))).collect();
                for r in 0..rn {
                    let ej = kb.splat(kb.ld(eb, c(r * VW + j)));
                    for (i, vi) in vv.iter().enumerate() {
                        let at = r * (2 + nv) + 2 + i;
                        next[at] = kb.vfma(ej, *vi, next[at].into_vector_value()).into();
                    }
                }
            }
            next
        });
        for r in 0..rn {
            let at = r * (2 + nv);
            let t = kb.add(kb.mul(rb, c(rn)), c(r));
            kb.if_(kb.icmp_lt(t, rows), || {
                let inv = kb.splat(kb.fdiv(kb.fc(1.0), st[at + 1].into_float_value()));
                for i in 0..nv {
                    kb.stv(out, kb.add(qrow(r), c(i * VW)), kb.vmul(st[at + 2 + i].into_vector_value(), inv));
                }
            });
        }
    });
}

/// One task per (head, query row): an online softmax over the visible keys, reading the
/// keys and values in place (the KV cache in decode) and never forming the score row.
pub(crate) fn attention<'ctx>(
    kb: &Kb<'_, 'ctx>,
    at: &Attn<'ctx>,
    begin: IntValue<'ctx>,
    end: IntValue<'ctx>,
) {
    let c = |v: usize| kb.c(v as i64);
    let Attn {
        heads,
        groups,
        hd,
        scale,
        softcap,
        mask,
        q,
        k,
        v,
        pos,
        out,
        rows,
        s_len,
        kstride,
        vstride,
        slopes,
        ..
    } = *at;
    let m_slot = kb.alloca_f32();
    let l_slot = kb.alloca_f32();
    kb.for_(begin, end, |r| {
        let h = kb.div(r, rows);
        let t = kb.rem(r, rows);
        let g = kb.div(h, c(heads / groups));
        let pq = kb.ldi(pos, t);
        let (lo, hi) = visible(kb, mask, pq, s_len);
        let row = kb.mul(r, c(hd));
        // Where the row's slot's cache starts, from the cache argument's.
        let slot = at.table.map_or(c(0), |ri| kb.ld64(ri, kb.add(kb.mul(t, c(2)), c(1))));
        let kb0 = kb.add(slot, kb.mul(g, kstride));
        let vb0 = kb.add(slot, kb.mul(g, vstride));
        let slope = slopes.map(|s| kb.ld(s, h));
        let score_of = |dot: FloatValue<'ctx>, s: IntValue<'ctx>| {
            let score = capped(kb, softcap, kb.fmul(dot, kb.fc(scale)));
            match slope {
                Some(sl) => kb.fsub(score, kb.fmul(sl, kb.to_f32(kb.i_to_f64(kb.sub(pq, s))))),
                None => score,
            }
        };
        if hd % VW == 0 {
            // The query row, the running max and sum and the output row stay in registers
            // for the whole pass over the keys: blocks of VW keys first (one vector exp and
            // one rescaling a block, the weighted values split over two accumulator sets
            // when registers allow, so consecutive keys do not wait on each other), then
            // the last keys one at a time.
            type Bv<'c> = inkwell::values::BasicValueEnum<'c>;
            let nv = hd / VW;
            let sets = if nv <= 4 { 2 } else { 1 };
            let qv: Vec<_> = (0..nv).map(|j| kb.ldv(q, kb.add(row, c(j * VW)))).collect();
            let dot = |s: IntValue<'ctx>| {
                let krow = kb.add(kb0, kb.mul(s, c(hd)));
                let mut d = kb.vmul(qv[0], kb.ldv(k, krow));
                for (j, qj) in qv.iter().enumerate().skip(1) {
                    d = kb.vfma(*qj, kb.ldv(k, kb.add(krow, c(j * VW))), d);
                }
                d
            };
            let acc_of = |st: &[Bv<'ctx>]| -> Vec<VectorValue<'ctx>> {
                st[2..].iter().map(|v| v.into_vector_value()).collect()
            };
            let (m0, l0) = at.start(kb, h);
            let mut init: Vec<Bv<'ctx>> = vec![m0.into(), l0.into()];
            init.extend((0..nv * sets).map(|_| Bv::from(kb.vzero())));
            let blocks = kb.div(kb.max(kb.sub(hi, lo), c(0)), c(VW));
            // One query row (decode) streams its keys and values once, from the cache: the
            // next block's rows are prefetched, or the stream waits on memory (at 1008
            // tokens of context GPT-2 small's decode read them at a third of the rate of
            // the weights). Many rows of one sequence reuse them from cache, so they skip
            // it; a batched decode's rows each stream their own.
            let one = kb.select(kb.icmp_ge(c(1), rows), c(1), c(0));
            let stream = if at.table.is_some() { c(1) } else { one };
            let block_bytes = VW * hd * 4;
            let st = kb.fold(c(0), blocks, &init, |b, st| {
                let s0 = kb.add(lo, kb.mul(b, c(VW)));
                kb.for_(c(0), stream, |_| {
                    let next = kb.mul(kb.add(s0, c(VW)), c(hd * 4));
                    for (base, b0) in [(k, kb0), (v, vb0)] {
                        let at = kb.add(kb.mul(b0, c(4)), next);
                        for line in 0..block_bytes / 64 {
                            kb.prefetch(base, kb.add(at, c(64 * line)));
                        }
                    }
                });
                let (m, l) = (st[0].into_float_value(), st[1].into_float_value());
                let dots = (0..VW).map(|j| dot(kb.add(s0, c(j)))).collect();
                let mut sv = capped(kb, softcap, kb.vmul(kb.lane_sums(dots), kb.splat(kb.fc(scale))));
                if let Some(sl) = slope {
                    let rel = kb.vsub(kb.splat(kb.to_f32(kb.i_to_f64(kb.sub(pq, s0)))), kb.iota());
                    sv = kb.vsub(sv, kb.vmul(kb.splat(sl), rel));
                }
                let m_new = kb.fmax(m, kb.vmax(sv));
                let corr = kb.exp(kb.fsub(m, m_new));
                let e = kb.exp(kb.vsub(sv, kb.splat(m_new)));
                let l_new = kb.fadd(kb.fmul(l, corr), kb.vsum(e));
                let cv = kb.splat(corr);
                let mut acc: Vec<_> = acc_of(st).into_iter().map(|a| kb.vmul(a, cv)).collect();
                for j in 0..VW {
                    let (ej, set) = (kb.splat(kb.lane(e, j)), j % sets);
                    let vrow = kb.add(vb0, kb.mul(kb.add(s0, c(j)), c(hd)));
                    for i in 0..nv {
                        let a = &mut acc[set * nv + i];
                        *a = kb.vfma(ej, kb.ldv(v, kb.add(vrow, c(i * VW))), *a);
                    }
                }
                let mut next: Vec<Bv<'ctx>> = vec![m_new.into(), l_new.into()];
                next.extend(acc.into_iter().map(Bv::from));
                next
            });
            let mid = kb.add(lo, kb.mul(blocks, c(VW)));
            let fin = kb.fold(mid, hi, &st, |s, st| {
                let (m, l) = (st[0].into_float_value(), st[1].into_float_value());
                let (m_new, l_new, corr, e) = softmax_step(kb, m, l, score_of(kb.vsum(dot(s)), s));
                let (cv, ev) = (kb.splat(corr), kb.splat(e));
                let vrow = kb.add(vb0, kb.mul(s, c(hd)));
                let mut next: Vec<Bv<'ctx>> = vec![m_new.into(), l_new.into()];
                let acc = acc_of(st);
                for (i, a) in acc.iter().enumerate().take(nv) {
                    next.push(kb.vfma(ev, kb.ldv(v, kb.add(vrow, c(i * VW))), kb.vmul(*a, cv)).into());
                }
                // The other set only needs the rescaling.
                next.extend(acc[nv..].iter().map(|a| Bv::from(kb.vmul(*a, cv))));
                next
            });
            let inv = kb.splat(kb.fdiv(kb.fc(1.0), fin[1].into_float_value()));
            let acc = acc_of(&fin);
            for i in 0..nv {
                let sum = (1..sets).fold(acc[i], |s, k| kb.vadd(s, acc[k * nv + i]));
                kb.stv(out, kb.add(row, c(i * VW)), kb.vmul(sum, inv));
            }
            return;
        }
        kb.for_(c(0), c(hd), |i| kb.st(out, kb.add(row, i), kb.fc(0.0)));
        let (m0, l0) = at.start(kb, h);
        kb.store(m_slot, m0);
        kb.store(l_slot, l0);
        kb.for_(lo, hi, |s| {
            let krow = kb.add(kb0, kb.mul(s, c(hd)));
            let dot = kb.sum(c(0), c(hd), |i| kb.fmul(kb.ld(q, kb.add(row, i)), kb.ld(k, kb.add(krow, i))));
            let (m, l) = (kb.load_f32(m_slot), kb.load_f32(l_slot));
            let (m_new, l_new, corr, e) = softmax_step(kb, m, l, score_of(dot, s));
            kb.store(l_slot, l_new);
            kb.store(m_slot, m_new);
            let vrow = kb.add(vb0, kb.mul(s, c(hd)));
            kb.for_(c(0), c(hd), |i| {
                let at = kb.add(row, i);
                let acc = kb.fadd(kb.fmul(kb.ld(out, at), corr), kb.fmul(e, kb.ld(v, kb.add(vrow, i))));
                kb.st(out, at, acc);
            });
        });
        let inv = kb.fdiv(kb.fc(1.0), kb.load_f32(l_slot));
        kb.for_(c(0), c(hd), |i| {
            let at = kb.add(row, i);
            kb.st(out, at, kb.fmul(kb.ld(out, at), inv));
        });
    });
}
