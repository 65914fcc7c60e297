//! The kernels: one LLVM function per distinct op instance, with every size known at
//! compile time baked in and the runtime ones (`T`, `P`, row counts) read from the
//! argument block. A kernel has the task signature `void k(i64* args, i64 begin, i64 end)`
//! and processes tasks `begin..end`, so the thread pool can split its work.

use inkwell::attributes::AttributeLoc;
use inkwell::module::Linkage;
use inkwell::values::{BasicValueEnum, FloatValue, FunctionValue, IntValue, PointerValue, VectorValue};
use tfc_runtime::quant::Q8_BLOCK;

use super::elementwise::{act, epilogue_vectorises};
use super::kb::{Kb, WFmt, VW};
use crate::backend::plan::Epi;
use crate::backend::weights::{Tiles, BLOCK};
use crate::ir::{alibi_slopes, Act, AttnMask, QkvLayout, QkvPart};

/// What a kernel computes; its argument block layout is given per variant.
#[derive(Clone, Debug, PartialEq)]
pub enum Kernel {
    /// args: out(i32); tasks: 1. `out[t] = P + t`. Needs T, P.
    Positions,
    /// args: table, ids(i32), out; tasks: T rows.
    Gather { d: usize, offset: usize, wf: WFmt },
    /// args: pos(i32), out; tasks: T rows.
    Sinusoidal { dim: usize, base: f64 },
    /// args: a, b, out; tasks: rows.
    Binary { mul: bool, width: usize },
    /// args: x, out; tasks: rows.
    Unary { op: UnaryOp, width: usize },
    /// args: x, w, [b], out; tasks: rows. `round`: the output rounded to bf16 (a fused
    /// `round_bf16`).
    LayerNorm { d: usize, eps: f64, bias: bool, round: bool },
    /// args: x, w, out; tasks: rows. `round` as for `LayerNorm`.
    RmsNorm { d: usize, eps: f64, unit_offset: bool, round: bool },
    /// args: x, w, [b], out, rows, then one pointer per `Add`/`Mul` of the epilogue, then
    /// with `amx` the packed activations and, with `amx.to_tiles`, where the output goes
    /// packed (see `amx::Amx`); tasks: column blocks of `BLOCK`. `packed`: the
    /// GEMM of many rows (see `packs`); `amx`: on AMX tiles when the CPU allows (bf16
    /// weights, see `amx`), else the packed GEMM. `tiles`: bf16 weights in the tile
    /// layout (`weights::Tiles`, read as `[out, in]`, so never `transposed`). `panels`: f32
    /// weights in the panel layout (`weights::WeightLayout::Panels`; always `packed`, never
    /// `transposed`), which the packed GEMM reads in place. `sliced`: the packed GEMM
    /// (not on AMX) reads its activations as `SliceRows` wrote them, from the argument
    /// after the epilogue's.
    Linear {
        inn: usize,
        out: usize,
        transposed: bool,
        bias: bool,
        epi: Vec<Epi>,
        wf: WFmt,
        tiles: bool,
        panels: bool,
        packed: bool,
        sliced: bool,
        /// How the AMX GEMM reads its activations and writes its output.
        amx: Option<super::amx::Amx>,
    },
    /// args: x, out, rows; tasks: rows. Copies `x [rows, inn]` into the packed GEMM's
    /// slices (`slice_at`), once for all the column blocks of the linear maps reading it.
    SliceRows { inn: usize },
    /// args: x, packed, rows; tasks: tiles of 16 of the rows padded to `amx::MB`. The activations of an
    /// `amx` linear map, split into bf16 parts in the tiles' layout (`amx::pack_x`).
    AmxPack { inn: usize, transposed: bool, parts: usize },
    /// args: x, out; tasks: rows.
    SplitQkv { layout: QkvLayout, part: QkvPart, heads: usize, kv_heads: usize, head_dim: usize },
    /// args: x, out, rows per head of out (the rows, or `max_seq` in the cache); tasks: rows.
    SplitHeads { heads: usize, head_dim: usize },
    /// args: x, out, rows; tasks: rows. `round` as for `LayerNorm`.
    MergeHeads { heads: usize, head_dim: usize, round: bool },
    /// args: x, pos(i32), out, rows, rows per head of out (as for `SplitHeads`); tasks: rows.
    Rope { head_dim: usize, rotary_dim: usize, theta: f64, interleaved: bool, heads: usize },
    /// args: q, k, v, pos(i32), out, rows(T), S, k head stride, v head stride; tasks: H·T,
    /// or with `block` (`attention_rows`, query rows known only at run time) H · ⌈T / block⌉.
    Attention {
        heads: usize,
        groups: usize,
        head_dim: usize,
        scale: f64,
        mask: AttnMask,
        alibi: bool,
        block: Option<usize>,
    },
    /// args: x, out, rows; tasks: 1. Copies the last of `rows` rows of `[rows, width]`,
    /// f32 or, when `int`, i32.
    LastRow { width: usize, int: bool },
    /// One row times `W [in, out]`, split over `in`: args x, w, partials `[chunks, out]`;
    /// tasks: chunks. Each task streams a contiguous band of weight rows.
    GemvPartial { inn: usize, out: usize, chunks: usize, wf: WFmt },
    /// Sums the partials into the output row, adds the bias, applies the epilogue:
    /// args partials, [b], out, then the epilogue's other operands; tasks: column blocks.
    /// `pairs`: the partials come from bf16 weights, each group of 32 as even then odd.
    GemvReduce { out: usize, chunks: usize, bias: bool, epi: Vec<Epi>, pairs: bool },
    /// args: src, cache, rows(T), P; tasks: groups. Writes `src [G, T, hd]` at `P..P+T`.
    CacheStore { head_dim: usize, max_seq: usize },
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum UnaryOp {
    Scale(f64),
    Act(Act),
    RoundBf16,
}

/// Activation rows per register tile of the linear kernels.
const ROWS: usize = 4;
/// Weight rows (the `in` dimension) of a column block packed at a time by the packed
/// GEMM: `KC × BLOCK` f32 is 32 KB, which stays in L1 while every row tile passes over it.
const KC: usize = 128;
/// Activation rows per chunk of the packed GEMM, whose `KC`-wide slices of `x`
/// are copied out once for all of a task's column blocks (96 KB).
const MC: usize = 192;
/// Activation rows per register tile of the packed GEMM: `MR × 4` accumulators, four
/// weight vectors and a broadcast use 29 of the 32 vector registers.
const MR: usize = 6;
/// k-steps of the packed GEMM's row tiles per prefetched line of the next panel.
const SPREAD: usize = 4;

/// Whether a linear map of `rows` rows (`None`: known only at run time) gets the packed
/// GEMM: each column block of the weights is converted to f32 and packed `KC` rows at a
/// time into a contiguous L1-resident panel, whatever its layout or storage type, and
/// the activation rows pass over it in register tiles of `MR`. The packing is paid once
/// per block and shared by every row, so it is for prefill's many rows, not for
/// decode's one. `[in, out]` weights are packed for any row count: their one-row products
/// (decode) are split over `in` instead (`GemvPartial`), whenever `in` is 64 or more.
pub fn packs(rows: Option<usize>, out: usize, transposed: bool) -> bool {
    out % BLOCK == 0 && (transposed || rows.is_none_or(|r| r >= MR))
}

/// Whether an unpacked linear map gets the vectorised dot products of `lin_n_block`:
/// `[out, in]` weights whose rows the vectors tile exactly (`in` by 16).
pub(super) fn tiled(inn: usize, transposed: bool) -> bool {
    !transposed && inn % VW == 0
}

struct Lin<'ctx, 'e> {
    x: PointerValue<'ctx>,
    w: PointerValue<'ctx>,
    b: Option<PointerValue<'ctx>>,
    out: PointerValue<'ctx>,
    inn: usize,
    n_out: usize,
    epi: &'e [Epi],
    /// The other operand of each `Add`/`Mul` in `epi`, in order.
    others: Vec<PointerValue<'ctx>>,
    /// How the weights are stored.
    wf: WFmt,
    /// `[out, in]` in the tile layout (`weights::Tiles`), not row-major.
    tiles: bool,
    /// In the panel layout (`weights::WeightLayout::Panels`).
    panels: bool,
}

impl<'ctx, 'e> Lin<'ctx, 'e> {
    /// Reads the argument block of a `Kernel::Linear`: x, w, [b], out, rows, then the
    /// epilogue's other operands.
    fn from_args(a: ArgI<'ctx, '_>, p: ArgP<'ctx, '_>, k: &'e Kernel) -> (Self, IntValue<'ctx>) {
        let Kernel::Linear { inn, out: n_out, bias, ref epi, wf, tiles, panels, .. } = *k else {
            unreachable!("the arguments of a linear kernel")
        };
        let (x, w) = (p(0), p(1));
        let (b, out, rows) = if bias { (Some(p(2)), p(3), a(4)) } else { (None, p(2), a(3)) };
        let first = if bias { 5 } else { 4 };
        let n_others = epi.iter().filter(|e| matches!(e, Epi::Add | Epi::Mul)).count();
        let others = (0..n_others).map(|k| p(first + k as i64)).collect();
        (Lin { x, w, b, out, inn, n_out, epi, others, wf, tiles, panels }, rows)
    }

    /// The element of `W [out, in]` at output `o`, input `i`: row-major, or in the tile
    /// layout, where the inputs of one output stay contiguous within each 32.
    fn widx(&self, kb: &Kb<'_, 'ctx>, o: IntValue<'ctx>, i: IntValue<'ctx>) -> IntValue<'ctx> {
        if !self.tiles {
            return kb.add(kb.mul(o, kb.c(self.inn as i64)), i);
        }
        let (r, k) = (Tiles::ROWS, Tiles::COLS);
        let c = |v: usize| kb.c(v as i64);
        let tile = kb.add(kb.mul(kb.udiv(o, c(r)), c(self.inn / k)), kb.udiv(i, c(k)));
        kb.add(kb.mul(tile, c(r * k)), kb.add(kb.mul(kb.urem(o, c(r)), c(k)), kb.urem(i, c(k))))
    }
}

/// Applies the fused elementwise ops to row `t`, columns `o0..o1` of the output.
fn epilogue<'ctx>(
    kb: &Kb<'_, 'ctx>,
    l: &Lin<'ctx, '_>,
    t: IntValue<'ctx>,
    o0: IntValue<'ctx>,
    o1: IntValue<'ctx>,
) {
    if l.epi.is_empty() {
        return;
    }
    let row = kb.mul(t, kb.c(l.n_out as i64));
    kb.for_(o0, o1, |o| {
        let at = kb.add(row, o);
        let mut v = kb.ld(l.out, at);
        let mut k = 0;
        for e in l.epi {
            v = match e {
                Epi::Act(a) => unary(kb, UnaryOp::Act(*a), v),
                Epi::Scale(s) => unary(kb, UnaryOp::Scale(*s), v),
                Epi::RoundBf16 => unary(kb, UnaryOp::RoundBf16, v),
                Epi::Add | Epi::Mul => {
                    let y = kb.ld(l.others[k], at);
                    k += 1;
                    if *e == Epi::Add {
                        kb.fadd(v, y)
                    } else {
                        kb.fmul(v, y)
                    }
                }
            };
        }
        kb.st(l.out, at, v);
    });
}

/// `W [out, in]`: outputs `o0..o1` for rows `t0..t0 + rn`, four outputs at a time, each
/// a vectorised dot product over `in` whose weight vectors are shared by the tile's rows.
/// A single row (decode) takes `lin_dot_row`.
fn lin_n_block<'ctx>(
    kb: &Kb<'_, 'ctx>,
    l: &Lin<'ctx, '_>,
    t0: IntValue<'ctx>,
    rn: usize,
    o0: IntValue<'ctx>,
    o1: IntValue<'ctx>,
    xp: Option<PointerValue<'ctx>>,
) {
    if rn == 1 && l.tiles {
        return lin_tile_row(kb, l, t0, o0, o1, xp.expect("tiled weights have a permuted row"));
    }
    if rn == 1 {
        return lin_dot_row(kb, l, t0, o0, o1, xp);
    }
    let c = |v: usize| kb.c(v as i64);
    let outs = 4;
    let span = kb.sub(o1, o0);
    let full = kb.add(o0, kb.mul(kb.div(span, c(outs)), c(outs)));
    let tile = |oo: IntValue<'ctx>, on: usize| {
        let init: Vec<_> = (0..rn * on).map(|_| kb.vzero().into()).collect();
        let steps = c(l.inn / VW);
        let acc = kb.fold(c(0), steps, &init, |s, acc| {
            let i = kb.mul(s, c(VW));
            let wv: Vec<_> = (0..on).map(|j| kb.ldvw(l.w, l.widx(kb, kb.add(oo, c(j)), i), l.wf)).collect();
            let mut next = Vec::with_capacity(acc.len());
            for r in 0..rn {
                let xv = kb.ldv(l.x, kb.add(kb.mul(kb.add(t0, c(r)), c(l.inn)), i));
                for (j, wv) in wv.iter().enumerate() {
                    next.push(kb.vfma(xv, *wv, acc[r * on + j].into_vector_value()).into());
                }
            }
            next
        });
        for r in 0..rn {
            for j in 0..on {
                let o = kb.add(oo, c(j));
                let mut v = kb.vsum(acc[r * on + j].into_vector_value());
                if let Some(b) = l.b {
                    v = kb.fadd(v, kb.ld(b, o));
                }
                kb.st(l.out, kb.add(kb.mul(kb.add(t0, c(r)), c(l.n_out)), o), v);
            }
        }
    };
    let groups = kb.div(span, c(outs));
    kb.for_(c(0), groups, |g| tile(kb.add(o0, kb.mul(g, c(outs))), outs));
    kb.for_(full, o1, |o| tile(o, 1));
}

/// Bytes ahead of the weight being read that a streaming kernel prefetches. With only
/// the hardware prefetcher, how much of a stream is in flight is bounded by the
/// out-of-order window, so formats that take more instructions per byte (bf16, q8)
/// streamed at half the f32 rate. 3 KB, not 4: on one Xeon host here a stream
/// prefetched 4 KB ahead read 25–28 GB/s, and 3, 3.5, 5 or 8 KB ahead 30–34; in A/B
/// pairs 3 KB decoded W2 f32 ×1.39 and W1 f32 ×1.30 faster than 4 KB (bf16 ×1.04–1.17,
/// q8 ×1.06) and 0–6% faster than 3.5 KB, and 2 KB is too near for bf16 (W2 ×0.90).
const PREFETCH: usize = 3072;

/// Elements of a one-row dot product per step: four vectors, so four accumulators hide
/// the FMA latency, and a whole number of cache lines and of q8 blocks.
const DOT: usize = 4 * VW;

/// `x` of one row, with each group of 32 elements reordered as its 16 even elements then
/// its 16 odd ones, so it lines up with `Kb::ld_bf16_pairs` (the part of `in` that
/// `lin_dot_row` steps over; the rest is read in order).
fn permute_pairs<'ctx>(
    kb: &Kb<'_, 'ctx>,
    x: PointerValue<'ctx>,
    xrow: IntValue<'ctx>,
    n: usize,
    xp: PointerValue<'ctx>,
) {
    let c = |v: usize| kb.c(v as i64);
    let even: Vec<u32> = (0..VW as u32).map(|k| 2 * k).collect();
    let odd: Vec<u32> = (0..VW as u32).map(|k| 2 * k + 1).collect();
    kb.for_(c(0), c(n / (2 * VW)), |g| {
        let i = kb.mul(g, c(2 * VW));
        let (a, b) = (kb.ldv(x, kb.add(xrow, i)), kb.ldv(x, kb.add(xrow, kb.add(i, c(VW)))));
        kb.stv(xp, i, kb.shuffle(a, b, &even));
        kb.stv(xp, kb.add(i, c(VW)), kb.shuffle(a, b, &odd));
    });
}

/// One row times `W [out, in]`, outputs `o0..o1`: one output's dot product at a time, so
/// the block of weight rows is a single forward stream, prefetched `PREFETCH` ahead.
/// (Four outputs' interleaved short streams left the prefetcher behind.) bf16 weights are
/// read 32 at a time as even and odd lanes against `xp`, row `t` already permuted to match
/// (`permute_pairs`).
fn lin_dot_row<'ctx>(
    kb: &Kb<'_, 'ctx>,
    l: &Lin<'ctx, '_>,
    t: IntValue<'ctx>,
    o0: IntValue<'ctx>,
    o1: IntValue<'ctx>,
    xp: Option<PointerValue<'ctx>>,
) {
    let c = |v: usize| kb.c(v as i64);
    let (inn, steps) = (l.inn, l.inn / DOT);
    let xrow = kb.mul(t, c(inn));
    let esize = l.wf.elem_bytes();
    kb.for_(o0, o1, |o| {
        let wrow = kb.mul(o, c(inn));
        let init: Vec<_> = (0..4).map(|_| kb.vzero().into()).collect();
        let acc = kb.fold(c(0), c(steps), &init, |s, acc| {
            let i = kb.mul(s, c(DOT));
            let wi = kb.add(wrow, i);
            let bytes = kb.mul(wi, c(esize));
            for line in 0..(DOT * esize).div_ceil(64) {
                kb.prefetch(l.w, kb.add(bytes, c(PREFETCH + 64 * line)));
            }
            let a = |j: usize| acc[j].into_vector_value();
            let xv = |j: usize| kb.ldv(l.x, kb.add(xrow, kb.add(i, c(j * VW))));
            let next: Vec<VectorValue<'ctx>> = match (l.wf, xp) {
                (WFmt::Bf16, Some(xp)) => {
                    let xv = |j: usize| kb.ldv(xp, kb.add(i, c(j * VW)));
                    let (e0, d0) = kb.ld_bf16_pairs(l.w, wi);
                    let (e1, d1) = kb.ld_bf16_pairs(l.w, kb.add(wi, c(2 * VW)));
                    vec![
                        kb.vfma(xv(0), e0, a(0)),
                        kb.vfma(xv(1), d0, a(1)),
                        kb.vfma(xv(2), e1, a(2)),
                        kb.vfma(xv(3), d1, a(3)),
                    ]
                }
                (WFmt::Q8 { scales }, _) => {
                    // Two blocks of 32: each block's products are summed, then scaled once.
                    kb.prefetch(l.w, kb.add(c(scales + PREFETCH / 8), kb.mul(kb.div(wi, c(Q8_BLOCK)), c(4))));
                    let block = |b: usize| {
                        let at = kb.add(wi, c(b * 2 * VW));
                        let p0 = kb.vmul(xv(2 * b), kb.ldv_q8_raw(l.w, at));
                        let blk = kb.vfma(xv(2 * b + 1), kb.ldv_q8_raw(l.w, kb.add(at, c(VW))), p0);
                        kb.vfma(blk, kb.splat(kb.q8_scale(l.w, at, scales)), a(b))
                    };
                    // Accumulators 2 and 3 stay zero: one per block is enough.
                    vec![block(0), block(1), a(2), a(3)]
                }
                _ => {
                    (0..4).map(|j| kb.vfma(xv(j), kb.ldvw(l.w, kb.add(wi, c(j * VW)), l.wf), a(j))).collect()
                }
            };
            next.into_iter().map(Into::into).collect()
        });
        let mut sum = kb.vadd(
            kb.vadd(acc[0].into_vector_value(), acc[1].into_vector_value()),
            kb.vadd(acc[2].into_vector_value(), acc[3].into_vector_value()),
        );
        // The rest of `in` (a multiple of VW), one vector at a time.
        for j in 0..(inn % DOT) / VW {
            let i = c(steps * DOT + j * VW);
            let xv = kb.ldv(l.x, kb.add(xrow, i));
            sum = kb.vfma(xv, kb.ldvw(l.w, kb.add(wrow, i), l.wf), sum);
        }
        let mut v = kb.vsum(sum);
        if let Some(b) = l.b {
            v = kb.fadd(v, kb.ld(b, o));
        }
        kb.st(l.out, kb.add(kb.mul(t, c(l.n_out)), o), v);
    });
}

/// One row times `W [out, in]` in the tile layout (`weights::Tiles`), outputs `o0..o1` (whole
/// blocks of 16): each block is one contiguous stream, prefetched `PREFETCH` ahead, read a
/// tile at a time into one accumulator per output, as even and odd lanes against `xp`
/// (row `t`, permuted by `permute_pairs` over all of `in`).
fn lin_tile_row<'ctx>(
    kb: &Kb<'_, 'ctx>,
    l: &Lin<'ctx, '_>,
    t: IntValue<'ctx>,
    o0: IntValue<'ctx>,
    o1: IntValue<'ctx>,
    xp: PointerValue<'ctx>,
) {
    let c = |v: usize| kb.c(v as i64);
    let (rows, cols) = (Tiles::ROWS, Tiles::COLS);
    let ktiles = l.inn / cols;
    kb.for_(kb.udiv(o0, c(rows)), kb.udiv(o1, c(rows)), |blk| {
        let init: Vec<_> = (0..rows).map(|_| kb.vzero().into()).collect();
        let acc = kb.fold(c(0), c(ktiles), &init, |k, acc| {
            let tile = kb.mul(kb.add(kb.mul(blk, c(ktiles)), k), c(rows * cols));
            let bytes = kb.mul(tile, c(2));
            for line in 0..rows * cols * 2 / 64 {
                kb.prefetch(l.w, kb.add(bytes, c(PREFETCH + 64 * line)));
            }
            let (xe, xo) = (kb.ldv(xp, kb.mul(k, c(cols))), kb.ldv(xp, kb.add(kb.mul(k, c(cols)), c(VW))));
            (0..rows)
                .map(|r| {
                    let (e, d) = kb.ld_bf16_pairs(l.w, kb.add(tile, c(r * cols)));
                    let a = kb.vfma(xe, e, acc[r].into_vector_value());
                    kb.vfma(xo, d, a).into()
                })
                .collect()
        });
        for (r, a) in acc.iter().enumerate() {
            let o = kb.add(kb.mul(blk, c(rows)), c(r));
            let mut v = kb.vsum(a.into_vector_value());
            if let Some(b) = l.b {
                v = kb.fadd(v, kb.ld(b, o));
            }
            kb.st(l.out, kb.add(kb.mul(t, c(l.n_out)), o), v);
        }
    });
}

/// Where the packed GEMM's row tiles read the activations: each `KC`-wide slice of `in`
/// with its rows `KC` apart, so that the tiles' broadcasts neither alias in L1 (as rows
/// of `x` a multiple of 4 KB apart do) nor leave L2 between the column blocks.
#[derive(Clone, Copy)]
enum Xs<'ctx> {
    /// Copied by each task into this `MC × KC` buffer, a chunk's slice at a time.
    Copy(PointerValue<'ctx>),
    /// Every slice of every row, as `SliceRows` wrote them (`slice_at`).
    Sliced(PointerValue<'ctx>),
}

/// Element `(t, k)` of `x [rows, inn]` in the layout `SliceRows` writes: slice `k / KC`
/// holds the rows one after the other, `KC` apart (the last slice too, when `inn` is not
/// a multiple of `KC`).
fn slice_at<'ctx>(
    kb: &Kb<'_, 'ctx>,
    rows: IntValue<'ctx>,
    slice: IntValue<'ctx>,
    t: IntValue<'ctx>,
) -> IntValue<'ctx> {
    let c = |v: usize| kb.c(v as i64);
    kb.mul(kb.add(kb.mul(slice, rows), t), c(KC))
}

/// Bytes of `x [rows, inn]` sliced for the packed GEMM.
pub fn sliced_bytes(rows: usize, inn: usize) -> usize {
    rows * inn.div_ceil(KC) * KC * 4
}

/// Copies the `kn` elements of `src` from `from` on to `dst` from `to` on.
fn copy_f32s<'ctx>(
    kb: &Kb<'_, 'ctx>,
    (src, from): (PointerValue<'ctx>, IntValue<'ctx>),
    (dst, to): (PointerValue<'ctx>, IntValue<'ctx>),
    kn: IntValue<'ctx>,
) {
    let c = |v: usize| kb.c(v as i64);
    let kv = kb.mul(kb.div(kn, c(VW)), c(VW));
    kb.for_(c(0), kb.div(kn, c(VW)), |s| {
        let at = kb.mul(s, c(VW));
        kb.stv(dst, kb.add(to, at), kb.ldv(src, kb.add(from, at)));
    });
    kb.for_(kv, kn, |kk| kb.st(dst, kb.add(to, kk), kb.ld(src, kb.add(from, kk))));
}

/// The packed GEMM for the column blocks `b0..b1` (of `BLOCK`) outputs of every row
/// (`packs`): for each chunk of `MC` rows and each `KC`-wide slice of `in`, the chunk's
/// slice of `x` (from `xs`), and each block's slice of the weights, packed into `panel`
/// as f32 `[KC, BLOCK]` (or read in place), are multiplied in `MR × BLOCK` register
/// tiles, which start from the bias in the first slice and from the output in the
/// others, so the output is first written when a tile has a slice's sums; last the
/// epilogue runs.
#[allow(clippy::too_many_arguments)]
fn lin_packed<'ctx>(
    kb: &Kb<'_, 'ctx>,
    l: &Lin<'ctx, '_>,
    rows: IntValue<'ctx>,
    b0: IntValue<'ctx>,
    b1: IntValue<'ctx>,
    panel: PointerValue<'ctx>,
    xs: Xs<'ctx>,
    transposed: bool,
) {
    let c = |v: usize| kb.c(v as i64);
    let nv = BLOCK / VW;
    let (inn, n_out) = (l.inn, l.n_out);
    let esize = l.wf.elem_bytes();
    let lines = KC * BLOCK * esize / 64;
    kb.for_(c(0), kb.div(kb.add(rows, c(MC - 1)), c(MC)), |chunk| {
        let r0 = kb.mul(chunk, c(MC));
        let rn = kb.min(c(MC), kb.sub(rows, r0));
        let full = kb.mul(kb.div(rn, c(MR)), c(MR));
        kb.for_(c(0), c(inn.div_ceil(KC)), |kblk| {
            let k0 = kb.mul(kblk, c(KC));
            let kn = kb.min(c(KC), kb.sub(c(inn), k0));
            let xs = match xs {
                Xs::Copy(buf) => {
                    kb.for_(c(0), rn, |t| {
                        let src = kb.add(kb.mul(kb.add(r0, t), c(inn)), k0);
                        copy_f32s(kb, (l.x, src), (buf, kb.mul(t, c(KC))), kn);
                    });
                    buf
                }
                Xs::Sliced(all) => kb.gep(kb.f32t(), all, slice_at(kb, rows, kblk, r0)),
            };
            kb.for_(b0, b1, |blk| {
                let o0 = kb.mul(blk, c(BLOCK));
                // The block's slice: its panel in place, or packed from the weights.
                let panel = if l.panels {
                    kb.gep(kb.f32t(), l.w, kb.mul(kb.add(kb.mul(blk, c(inn)), k0), c(BLOCK)))
                } else {
                    pack_panel(kb, l, o0, k0, kn, panel, transposed);
                    panel
                };
                // The weights the next panel is packed from (the next block's slice, or
                // after the last block the first block's next slice, or the block after
                // these), prefetched into L2 while the row tiles run: packing otherwise
                // waits on memory, since each of its rows is in another page and the
                // hardware prefetcher does not follow it. Line `n` of its `lines` is
                // fetched at step `n · SPREAD` of the tiles' k-loops, so a few at a time
                // are in flight.
                let more = kb.icmp_lt(kb.add(blk, c(1)), b1);
                let deeper = kb.icmp_lt(kb.add(k0, c(KC)), c(inn));
                let no0 = kb.mul(kb.select(more, kb.add(blk, c(1)), kb.select(deeper, b0, b1)), c(BLOCK));
                let nk0 = kb.select(more, k0, kb.select(deeper, kb.add(k0, c(KC)), c(0)));
                let prefetch_next = |step: IntValue<'ctx>| {
                    // Every operand is non-negative and every divisor a power of two, so
                    // unsigned division keeps this to shifts and masks in the k-loops.
                    let n = kb.min(kb.udiv(step, c(SPREAD)), c(lines - 1));
                    if l.panels {
                        // The next slice is contiguous.
                        let at = kb.mul(kb.add(kb.mul(kb.udiv(no0, c(BLOCK)), c(inn)), nk0), c(BLOCK * 4));
                        return kb.prefetch_l2(l.w, kb.add(at, kb.mul(n, c(64))));
                    }
                    if l.tiles {
                        // BLOCK / 16 blocks, each of whose KC / 32 tiles in the slice are
                        // contiguous.
                        let (rows, cols) = (Tiles::ROWS, Tiles::COLS);
                        let per = KC / cols * rows * cols * esize / 64;
                        let (rb, line) = (kb.udiv(n, c(per)), kb.urem(n, c(per)));
                        let blk = kb.add(kb.udiv(no0, c(rows)), rb);
                        let tile = kb.add(kb.mul(blk, c(inn / cols)), kb.udiv(nk0, c(cols)));
                        let at = kb.add(kb.mul(tile, c(rows * cols * esize)), kb.mul(line, c(64)));
                        return kb.prefetch_l2(l.w, at);
                    }
                    let row_lines = if transposed { esize } else { 2 * esize };
                    let (r, line) = (kb.udiv(n, c(row_lines)), kb.urem(n, c(row_lines)));
                    let elem = if transposed {
                        // KC rows of `esize` lines.
                        kb.add(kb.mul(kb.add(nk0, r), c(n_out)), no0)
                    } else {
                        // BLOCK rows of `2 esize` lines.
                        kb.add(kb.mul(kb.add(no0, r), c(inn)), nk0)
                    };
                    kb.prefetch_l2(l.w, kb.add(kb.mul(elem, c(esize)), kb.mul(line, c(64))));
                };
                let tile = |t0: IntValue<'ctx>, rn: usize| {
                    let yrow = |r: usize| kb.add(kb.mul(kb.add(kb.add(r0, t0), c(r)), c(n_out)), o0);
                    // The first slice starts from the bias, the others from the sums so far.
                    let init = kb.choose(
                        kb.icmp_eq(kblk, c(0)),
                        || {
                            let bias: Vec<_> = (0..nv)
                                .map(|j| match l.b {
                                    Some(b) => kb.ldv(b, kb.add(o0, c(j * VW))),
                                    None => kb.vzero(),
                                })
                                .collect();
                            (0..rn * nv).map(|k| bias[k % nv].into()).collect()
                        },
                        || {
                            (0..rn * nv)
                                .map(|k| kb.ldv(l.out, kb.add(yrow(k / nv), c((k % nv) * VW))).into())
                                .collect()
                        },
                    );
                    let k_step = |kk: IntValue<'ctx>, acc: &[BasicValueEnum<'ctx>]| {
                        let wv: Vec<_> =
                            (0..nv).map(|j| kb.ldv(panel, kb.add(kb.mul(kk, c(BLOCK)), c(j * VW)))).collect();
                        let mut next = Vec::with_capacity(acc.len());
                        for r in 0..rn {
                            let xs = kb.splat(kb.ld(xs, kb.add(kb.mul(kb.add(t0, c(r)), c(KC)), kk)));
                            for (j, wv) in wv.iter().enumerate() {
                                next.push(kb.vfma(xs, *wv, acc[r * nv + j].into_vector_value()).into());
                            }
                        }
                        next
                    };
                    // Full tiles take their k-steps `SPREAD` at a time, unrolled, after one
                    // line of the next panel's prefetch: a test and branch per step would
                    // cost more than the prefetch itself.
                    let (mut k_from, mut acc) = (c(0), init);
                    if rn == MR {
                        let groups = kb.udiv(kn, c(SPREAD));
                        acc = kb.fold(c(0), groups, &acc, |g, acc| {
                            let kk = kb.mul(g, c(SPREAD));
                            let step = kb.add(kb.mul(kb.udiv(t0, c(MR)), c(KC)), kk);
                            prefetch_next(step);
                            (0..SPREAD).fold(acc.to_vec(), |acc, u| k_step(kb.add(kk, c(u)), &acc))
                        });
                        k_from = kb.mul(groups, c(SPREAD));
                    }
                    let acc = kb.fold(k_from, kn, &acc, |kk, acc| k_step(kk, acc));
                    for (k, v) in acc.iter().enumerate() {
                        kb.stv(l.out, kb.add(yrow(k / nv), c((k % nv) * VW)), v.into_vector_value());
                    }
                };
                kb.for_(c(0), kb.div(full, c(MR)), |tt| tile(kb.mul(tt, c(MR)), MR));
                // The last `rn % MR` rows in tiles of three, two and one: a tile of one
                // row has four accumulators, too few to hide the FMAs' latency.
                let mut t0 = full;
                for size in [3, 2, 1] {
                    let n = kb.div(kb.sub(rn, t0), c(size));
                    let from = t0;
                    kb.for_(c(0), n, |i| tile(kb.add(from, kb.mul(i, c(size))), size));
                    t0 = kb.add(t0, kb.mul(n, c(size)));
                }
            });
        });
    });
    kb.for_(b0, b1, |blk| {
        let o0 = kb.mul(blk, c(BLOCK));
        kb.for_(c(0), rows, |t| epilogue(kb, l, t, o0, kb.add(o0, c(BLOCK))))
    });
}

/// One row times weights in the panel layout, column blocks `b0..b1`: each block's panel
/// (`[in, BLOCK]`, contiguous) is one stream, prefetched `PREFETCH` ahead, into one
/// accumulator per vector of the block.
fn lin_panel_row<'ctx>(kb: &Kb<'_, 'ctx>, l: &Lin<'ctx, '_>, b0: IntValue<'ctx>, b1: IntValue<'ctx>) {
    let c = |v: usize| kb.c(v as i64);
    let nv = BLOCK / VW;
    kb.for_(b0, b1, |blk| {
        let o0 = kb.mul(blk, c(BLOCK));
        let base = kb.mul(blk, c(l.inn * BLOCK));
        let init: Vec<_> = (0..nv)
            .map(|j| match l.b {
                Some(b) => kb.ldv(b, kb.add(o0, c(j * VW))).into(),
                None => kb.vzero().into(),
            })
            .collect();
        let acc = kb.fold(c(0), c(l.inn), &init, |k, acc| {
            let at = kb.add(base, kb.mul(k, c(BLOCK)));
            for line in 0..BLOCK * 4 / 64 {
                kb.prefetch(l.w, kb.add(kb.mul(at, c(4)), c(PREFETCH + 64 * line)));
            }
            let xk = kb.splat(kb.ld(l.x, k));
            (0..nv)
                .map(|j| kb.vfma(xk, kb.ldv(l.w, kb.add(at, c(j * VW))), acc[j].into_vector_value()).into())
                .collect()
        });
        for (j, v) in acc.iter().enumerate() {
            kb.stv(l.out, kb.add(o0, c(j * VW)), v.into_vector_value());
        }
        epilogue(kb, l, c(0), o0, kb.add(o0, c(BLOCK)));
    });
}

/// Packs the weights of outputs `o0..o0 + BLOCK`, inputs `k0..k0 + kn` into `panel` as
/// f32 `[KC, BLOCK]`.
fn pack_panel<'ctx>(
    kb: &Kb<'_, 'ctx>,
    l: &Lin<'ctx, '_>,
    o0: IntValue<'ctx>,
    k0: IntValue<'ctx>,
    kn: IntValue<'ctx>,
    panel: PointerValue<'ctx>,
    transposed: bool,
) {
    let c = |v: usize| kb.c(v as i64);
    let nv = BLOCK / VW;
    if transposed {
        // W [in, out]: each weight row's block is contiguous.
        kb.for_(c(0), kn, |kk| {
            let src = kb.add(kb.mul(kb.add(k0, kk), c(l.n_out)), o0);
            for j in 0..nv {
                let v = kb.ldvw(l.w, kb.add(src, c(j * VW)), l.wf);
                kb.stv(panel, kb.add(kb.mul(kk, c(BLOCK)), c(j * VW)), v);
            }
        });
        return;
    }
    // W [out, in]: a transpose, in VW × VW blocks through registers (VW outputs' slices
    // of VW inputs in, VW panel rows out), then the rest of `kn` one by one.
    let kv = kb.mul(kb.div(kn, c(VW)), c(VW));
    for jb in 0..nv {
        kb.for_(c(0), kb.div(kn, c(VW)), |s| {
            let kk = kb.mul(s, c(VW));
            let rows = (0..VW)
                .map(|r| kb.ldvw(l.w, l.widx(kb, kb.add(o0, c(jb * VW + r)), kb.add(k0, kk)), l.wf))
                .collect();
            for (r, v) in kb.transpose(rows).into_iter().enumerate() {
                kb.stv(panel, kb.add(kb.mul(kb.add(kk, c(r)), c(BLOCK)), c(jb * VW)), v);
            }
        });
    }
    kb.for_(c(0), c(BLOCK), |j| {
        kb.for_(kv, kn, |kk| {
            let w = kb.ldw(l.w, l.widx(kb, kb.add(o0, j), kb.add(k0, kk)), l.wf);
            kb.st(panel, kb.add(kb.mul(kk, c(BLOCK)), j), w)
        });
    });
}

impl Kernel {
    /// A name that is unique per distinct kernel, usable as a symbol.
    pub fn symbol(&self) -> String {
        let h = crate::ir::num;
        match self {
            Kernel::Positions => "positions".into(),
            Kernel::Gather { d, offset, wf } => format!("gather_d{d}_o{offset}{}", wf.suffix()),
            Kernel::Sinusoidal { dim, base } => format!("sinusoidal_{dim}_{}", h(*base).replace('.', "p")),
            Kernel::Binary { mul, width } => format!("{}_{width}", if *mul { "mul" } else { "add" }),
            Kernel::Unary { op: UnaryOp::Scale(s), width } => format!("scale_{width}_{:016x}", s.to_bits()),
            Kernel::Unary { op: UnaryOp::Act(a), width } => format!("{}_{width}", a.name()),
            Kernel::Unary { op: UnaryOp::RoundBf16, width } => format!("round_bf16_{width}"),
            Kernel::LayerNorm { d, eps, bias, round } => {
                let r = if *round { "_round_bf16" } else { "" };
                format!("layernorm_{d}_{:016x}_{}{r}", eps.to_bits(), *bias as u8)
            }
            Kernel::RmsNorm { d, eps, unit_offset, round } => {
                let r = if *round { "_round_bf16" } else { "" };
                format!("rmsnorm_{d}_{:016x}_{}{r}", eps.to_bits(), *unit_offset as u8)
            }
            Kernel::Linear { inn, out, transposed, bias, epi, wf, tiles, panels, packed, sliced, amx } => {
                let epi: String = epi.iter().map(|e| format!("_{}", e.symbol())).collect();
                let (t, b) = (if *transposed { "_t" } else { "" }, if *bias { "_b" } else { "" });
                let layout = if *tiles {
                    "_tl"
                } else if *panels {
                    "_pn"
                } else {
                    ""
                };
                let p =
                    format!("{layout}{}{}", if *packed { "_p" } else { "" }, if *sliced { "_s" } else { "" });
                let a = amx.map_or(String::new(), |a| {
                    format!("_amx{}{}", a.parts, if a.to_tiles { "_packs" } else { "" })
                });
                format!("linear_{inn}x{out}{t}{b}{p}{a}{epi}{}", wf.suffix())
            }
            Kernel::SliceRows { inn } => format!("slice_rows_{inn}"),
            Kernel::AmxPack { inn, transposed, parts } => {
                format!("amx_pack_{inn}_{parts}{}", if *transposed { "_t" } else { "" })
            }
            Kernel::SplitQkv { layout, part, heads, kv_heads, head_dim } => {
                format!("split_qkv_{}_{part:?}_{heads}_{kv_heads}_{head_dim}", layout.name())
            }
            Kernel::SplitHeads { heads, head_dim } => format!("split_heads_{heads}_{head_dim}"),
            Kernel::MergeHeads { heads, head_dim, round } => {
                format!("merge_heads_{heads}_{head_dim}{}", if *round { "_round_bf16" } else { "" })
            }
            Kernel::Rope { head_dim, rotary_dim, theta, interleaved, heads } => {
                format!(
                    "rope_{heads}_{head_dim}_{rotary_dim}_{:016x}_{}",
                    theta.to_bits(),
                    *interleaved as u8
                )
            }
            Kernel::Attention { heads, groups, head_dim, scale, mask, alibi, block } => format!(
                "attention_{heads}_{groups}_{head_dim}_{:016x}_{}_{}_{}{}",
                scale.to_bits(),
                mask.causal as u8,
                mask.window.unwrap_or(0),
                *alibi as u8,
                block.map_or(String::new(), |b| format!("_rows{b}"))
            ),
            Kernel::LastRow { width, int } => format!("last_row_{width}{}", if *int { "_i32" } else { "" }),
            Kernel::GemvPartial { inn, out, chunks, wf } => {
                format!("gemv_partial_{inn}x{out}_{chunks}{}", wf.suffix())
            }
            Kernel::GemvReduce { out, chunks, bias, epi, pairs } => {
                let epi: String = epi.iter().map(|e| format!("_{}", e.symbol())).collect();
                let p = if *pairs { "_pairs" } else { "" };
                format!("gemv_reduce_{out}_{chunks}{}{p}{epi}", if *bias { "_b" } else { "" })
            }
            Kernel::CacheStore { head_dim, max_seq } => format!("cache_store_{head_dim}_{max_seq}"),
        }
    }
}

/// Emits the kernel as an internal function of `m`.
pub fn emit<'ctx>(
    kb_cx: &'ctx inkwell::context::Context,
    m: &inkwell::module::Module<'ctx>,
    k: &Kernel,
) -> FunctionValue<'ctx> {
    let ptr = kb_cx.ptr_type(inkwell::AddressSpace::default());
    let i64t = kb_cx.i64_type();
    let ty = kb_cx.void_type().fn_type(&[ptr.into(), i64t.into(), i64t.into()], false);
    let f = m.add_function(&format!("tfc_k_{}", k.symbol()), ty, Some(Linkage::Internal));
    f.add_attribute(AttributeLoc::Function, kb_cx.create_string_attribute("prefer-vector-width", "512"));
    // Divisions marked `arcp` and `ninf` (`Kb::recip`) become a reciprocal estimate and
    // one Newton step; no other division is affected.
    f.add_attribute(
        AttributeLoc::Function,
        kb_cx.create_string_attribute("reciprocal-estimates", "divf:1,vec-divf:1"),
    );
    f.add_attribute(
        AttributeLoc::Function,
        kb_cx.create_enum_attribute(inkwell::attributes::Attribute::get_named_enum_kind_id("nounwind"), 0),
    );
    let kb = Kb::new(kb_cx, m, f);
    let args = f.get_nth_param(0).unwrap().into_pointer_value();
    let begin = f.get_nth_param(1).unwrap().into_int_value();
    let end = f.get_nth_param(2).unwrap().into_int_value();
    let a = |i: i64| kb.ld64(args, kb.c(i));
    let p = |i: i64| kb.ptr_of(a(i));
    body(&kb, k, &a, &p, begin, end);
    kb.ret();
    f
}

type ArgI<'c, 'f> = &'f dyn Fn(i64) -> IntValue<'c>;
type ArgP<'c, 'f> = &'f dyn Fn(i64) -> PointerValue<'c>;

fn body<'ctx>(
    kb: &Kb<'_, 'ctx>,
    k: &Kernel,
    a: ArgI<'ctx, '_>,
    p: ArgP<'ctx, '_>,
    begin: IntValue<'ctx>,
    end: IntValue<'ctx>,
) {
    let c = |v: usize| kb.c(v as i64);
    match *k {
        Kernel::Positions => {
            // args: out, T, P
            let (out, t, pp) = (p(0), a(1), a(2));
            kb.for_(c(0), t, |i| kb.sti(out, i, kb.add(pp, i)));
        }
        Kernel::Gather { d, offset, wf } => {
            let (table, ids, out) = (p(0), p(1), p(2));
            kb.for_(begin, end, |t| {
                let row = kb.add(kb.ldi(ids, t), c(offset));
                let (src, dst) = (kb.mul(row, c(d)), kb.mul(t, c(d)));
                kb.for_(c(0), c(d), |j| kb.st(out, kb.add(dst, j), kb.ldw(table, kb.add(src, j), wf)));
            });
        }
        Kernel::Sinusoidal { dim, base } => {
            let (pos, out) = (p(0), p(1));
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
        Kernel::Binary { mul, width } => {
            let (x, y, out) = (p(0), p(1), p(2));
            kb.for_(begin, end, |r| {
                let base = kb.mul(r, c(width));
                kb.for_(c(0), c(width), |j| {
                    let i = kb.add(base, j);
                    let (u, v) = (kb.ld(x, i), kb.ld(y, i));
                    kb.st(out, i, if mul { kb.fmul(u, v) } else { kb.fadd(u, v) });
                });
            });
        }
        Kernel::Unary { op, width } => {
            let (x, out) = (p(0), p(1));
            kb.for_(begin, end, |r| {
                let base = kb.mul(r, c(width));
                kb.for_(c(0), c(width), |j| {
                    let i = kb.add(base, j);
                    kb.st(out, i, unary(kb, op, kb.ld(x, i)));
                });
            });
        }
        Kernel::LayerNorm { d, eps, bias, round } => {
            let (x, w) = (p(0), p(1));
            let (b, out) = if bias { (Some(p(2)), p(3)) } else { (None, p(2)) };
            kb.for_(begin, end, |r| {
                let base = kb.mul(r, c(d));
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
                    let v = kb.fmul(kb.fmul(kb.fsub(kb.ld(x, kb.add(base, j)), mean), inv), kb.ld(w, j));
                    let v = match b {
                        Some(b) => kb.fadd(v, kb.ld(b, j)),
                        None => v,
                    };
                    kb.st(out, kb.add(base, j), if round { kb.round_bf16(v) } else { v });
                });
            });
        }
        Kernel::RmsNorm { d, eps, unit_offset, round } => {
            let (x, w, out) = (p(0), p(1), p(2));
            kb.for_(begin, end, |r| {
                let base = kb.mul(r, c(d));
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
        Kernel::Linear {
            inn,
            out: n_out,
            transposed,
            bias,
            tiles,
            panels,
            packed: true,
            sliced,
            amx,
            ..
        } => {
            let (l, rows) = Lin::from_args(a, p, k);
            let panel = kb.alloca_f32s(KC * BLOCK);
            let xs_at = (if bias { 5 } else { 4 }) + l.others.len() as i64;
            let xs = if sliced { Xs::Sliced(p(xs_at)) } else { Xs::Copy(kb.alloca_f32s(MC * KC)) };
            if panels {
                // One row (decode) streams each block's panel from end to end.
                return kb.if_else(
                    kb.icmp_eq(rows, c(1)),
                    || lin_panel_row(kb, &l, begin, end),
                    || lin_packed(kb, &l, rows, begin, end, panel, xs, transposed),
                );
            }
            let Some(a) = amx else {
                return lin_packed(kb, &l, rows, begin, end, panel, xs, transposed);
            };
            // A task is `amx::groups` blocks (the last one maybe fewer).
            let gr = super::amx::groups(inn, n_out, a.parts);
            let blocks = |task: IntValue<'ctx>, f: &dyn Fn(IntValue<'ctx>)| {
                let b0 = kb.mul(task, c(gr));
                kb.for_(b0, kb.min(kb.add(b0, c(gr)), c(n_out / BLOCK)), |blk| f(kb.mul(blk, c(BLOCK))));
            };
            // The epilogue goes with each tile as it is written out when it vectorises (all
            // but exact gelu), else over the output afterwards.
            let fused = epilogue_vectorises(l.epi);
            let tiles = super::amx::gemm_fn(
                kb.cx,
                kb.m,
                &format!("tfc_k_{}_tiles", k.symbol()),
                &super::amx::Shape { inn, n_out, transposed, bias, tiles, amx: a },
                if fused { l.epi } else { &[] },
            );
            let mut args: Vec<inkwell::values::BasicMetadataValueEnum> = vec![p(xs_at).into(), l.w.into()];
            if let Some(b) = l.b {
                args.push(b.into());
            }
            args.push(if a.to_tiles { p(xs_at + 1) } else { l.out }.into());
            if fused {
                args.extend(l.others.iter().map(|&o| inkwell::values::BasicMetadataValueEnum::from(o)));
            }
            args.extend::<[inkwell::values::BasicMetadataValueEnum; 3]>([
                rows.into(),
                begin.into(),
                end.into(),
            ]);
            let done = kb.b.build_call(tiles, &args, "").unwrap().try_as_basic_value().basic().unwrap();
            kb.if_else(
                done.into_int_value(),
                || {
                    if fused {
                        return;
                    }
                    kb.for_(begin, end, |task| {
                        blocks(task, &|o0| {
                            kb.for_(c(0), rows, |t| epilogue(kb, &l, t, o0, kb.add(o0, c(BLOCK))))
                        })
                    })
                },
                || {
                    kb.for_(begin, end, |task| {
                        let b0 = kb.mul(task, c(gr));
                        let b1 = kb.min(kb.add(b0, c(gr)), c(n_out / BLOCK));
                        lin_packed(kb, &l, rows, b0, b1, panel, xs, transposed)
                    })
                },
            );
        }
        Kernel::SliceRows { inn } => {
            let (x, out, rows) = (p(0), p(1), a(2));
            kb.for_(begin, end, |t| {
                kb.for_(c(0), c(inn.div_ceil(KC)), |s| {
                    let k0 = kb.mul(s, c(KC));
                    let kn = kb.min(c(KC), kb.sub(c(inn), k0));
                    copy_f32s(kb, (x, kb.add(kb.mul(t, c(inn)), k0)), (out, slice_at(kb, rows, s, t)), kn);
                });
            });
        }
        Kernel::AmxPack { inn, transposed, parts } => {
            super::amx::pack_x(kb, inn, transposed, parts, (p(0), p(1), a(2)), begin, end)
        }
        Kernel::Linear { inn, out: n_out, transposed, wf, tiles, .. } if tiled(inn, transposed) => {
            let (l, rows) = Lin::from_args(a, p, k);
            // A one-row product of bf16 weights reads them as even and odd lanes: those
            // in tiles all of them, others those of whole steps of `DOT`.
            let permuted = if tiles { inn } else { inn / DOT * DOT };
            let xp = (wf == WFmt::Bf16 && permuted > 0).then(|| kb.alloca_f32s(permuted));
            // Rows in tiles of ROWS, then the rest one by one (decode's one row), each
            // permuted once for all of the task's blocks.
            let full = kb.mul(kb.div(rows, c(ROWS)), c(ROWS));
            let blocks = |t0: IntValue<'ctx>, rn: usize| {
                kb.for_(begin, end, |blk| {
                    let o0 = kb.mul(blk, c(BLOCK));
                    let o1 = kb.min(kb.add(o0, c(BLOCK)), c(n_out));
                    lin_n_block(kb, &l, t0, rn, o0, o1, xp);
                    // The fused elementwise ops, on the tile while it is in cache.
                    kb.for_(c(0), c(rn), |r| epilogue(kb, &l, kb.add(t0, r), o0, o1));
                });
            };
            kb.for_(c(0), kb.div(full, c(ROWS)), |tt| blocks(kb.mul(tt, c(ROWS)), ROWS));
            kb.for_(full, rows, |t| {
                if let Some(xp) = xp {
                    permute_pairs(kb, l.x, kb.mul(t, c(inn)), permuted, xp);
                }
                blocks(t, 1)
            });
        }
        Kernel::Linear { inn, out: n_out, transposed, tiles, .. } => {
            assert!(!tiles, "tiled weights take the vectorised kernels");
            let (l, rows) = Lin::from_args(a, p, k);
            let (x, w, b, out) = (l.x, l.w, l.b, l.out);
            kb.for_(begin, end, |blk| {
                let o0 = kb.mul(blk, c(BLOCK));
                let o1 = kb.min(kb.add(o0, c(BLOCK)), c(n_out));
                kb.for_(c(0), rows, |t| {
                    let xrow = kb.mul(t, c(inn));
                    let yrow = kb.mul(t, c(n_out));
                    let init = |o: IntValue<'ctx>| match b {
                        Some(b) => kb.ld(b, o),
                        None => kb.fc(0.0),
                    };
                    if transposed {
                        // W [in, out]: accumulate whole rows of the block, vectorised over o.
                        kb.for_(o0, o1, |o| kb.st(out, kb.add(yrow, o), init(o)));
                        kb.for_(c(0), c(inn), |i| {
                            let xv = kb.ld(x, kb.add(xrow, i));
                            let wrow = kb.mul(i, c(n_out));
                            kb.for_(o0, o1, |o| {
                                let at = kb.add(yrow, o);
                                let v =
                                    kb.fadd(kb.ld(out, at), kb.fmul(xv, kb.ldw(w, kb.add(wrow, o), l.wf)));
                                kb.st(out, at, v);
                            });
                        });
                    } else {
                        // W [out, in]: one dot product per output.
                        kb.for_(o0, o1, |o| {
                            let wrow = kb.mul(o, c(inn));
                            let dot = kb.sum(c(0), c(inn), |i| {
                                kb.fmul(kb.ld(x, kb.add(xrow, i)), kb.ldw(w, kb.add(wrow, i), l.wf))
                            });
                            kb.st(out, kb.add(yrow, o), kb.fadd(dot, init(o)));
                        });
                    }
                    epilogue(kb, &l, t, o0, o1);
                });
            });
        }
        Kernel::SplitQkv { layout, part, heads, kv_heads, head_dim } => {
            let (x, out) = (p(0), p(1));
            let n = if part == QkvPart::Q { heads } else { kv_heads };
            let width = (heads + 2 * kv_heads) * head_dim;
            let g = heads / kv_heads;
            let group = (g + 2) * head_dim;
            // The column where head `j` of this part starts, as a runtime expression (one
            // loop over heads rather than one unrolled copy per head).
            let col = |j: IntValue<'ctx>| -> IntValue<'ctx> {
                match (layout, part) {
                    (QkvLayout::Concat, QkvPart::Q) => kb.mul(j, c(head_dim)),
                    (QkvLayout::Concat, QkvPart::K) => kb.mul(kb.add(j, c(heads)), c(head_dim)),
                    (QkvLayout::Concat, QkvPart::V) => kb.mul(kb.add(j, c(heads + kv_heads)), c(head_dim)),
                    (QkvLayout::Grouped, QkvPart::Q) => {
                        kb.add(kb.mul(kb.div(j, c(g)), c(group)), kb.mul(kb.rem(j, c(g)), c(head_dim)))
                    }
                    (QkvLayout::Grouped, QkvPart::K) => kb.add(kb.mul(j, c(group)), c(g * head_dim)),
                    (QkvLayout::Grouped, QkvPart::V) => kb.add(kb.mul(j, c(group)), c((g + 1) * head_dim)),
                }
            };
            kb.for_(begin, end, |t| {
                let src = kb.mul(t, c(width));
                let dst = kb.mul(t, c(n * head_dim));
                kb.for_(c(0), c(n), |j| {
                    let (s, d) = (kb.add(src, col(j)), kb.add(dst, kb.mul(j, c(head_dim))));
                    kb.for_(c(0), c(head_dim), |i| kb.st(out, kb.add(d, i), kb.ld(x, kb.add(s, i))));
                });
            });
        }
        Kernel::SplitHeads { heads, head_dim } => {
            let (x, out, rows) = (p(0), p(1), a(2));
            kb.for_(begin, end, |t| {
                kb.for_(c(0), c(heads), |h| {
                    let src = kb.add(kb.mul(t, c(heads * head_dim)), kb.mul(h, c(head_dim)));
                    let dst = kb.mul(kb.add(kb.mul(h, rows), t), c(head_dim));
                    kb.for_(c(0), c(head_dim), |i| kb.st(out, kb.add(dst, i), kb.ld(x, kb.add(src, i))));
                });
            });
        }
        Kernel::MergeHeads { heads, head_dim, round } => {
            let (x, out, rows) = (p(0), p(1), a(2));
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
        Kernel::Rope { head_dim, rotary_dim, theta, interleaved, heads } => {
            // A task is a position: its angles' sines and cosines are computed once for
            // every head, into a table the heads' rotations read eight pairs at a time,
            // in f64 as the interpreter computes them (no contraction: the same values).
            let (x, pos, out, rows, out_rows) = (p(0), p(1), p(2), a(3), a(4));
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
                for i in 0..half {
                    let inv = 1.0 / theta.powf(2.0 * i as f64 / rotary_dim as f64);
                    let ang = kb.fmul(pf, kb.dc(inv));
                    kb.b.build_store(kb.gep(f64t, sins, c(i)), kb.intrinsic("llvm.sin", &[ang])).unwrap();
                    kb.b.build_store(kb.gep(f64t, coss, c(i)), kb.intrinsic("llvm.cos", &[ang])).unwrap();
                }
                kb.for_(c(0), c(heads), |h| {
                    let base = kb.mul(kb.add(kb.mul(h, rows), t), c(head_dim));
                    let obase = kb.mul(kb.add(kb.mul(h, out_rows), t), c(head_dim));
                    kb.for_(c(rotary_dim), c(head_dim), |i| {
                        kb.st(out, kb.add(obase, i), kb.ld(x, kb.add(base, i)))
                    });
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
        Kernel::Attention { heads, groups, head_dim, scale, mask, alibi, block } => {
            let (q, k, v, pos, out) = (p(0), p(1), p(2), p(3), p(4));
            let (rows, s_len, kstride, vstride) = (a(5), a(6), a(7), a(8));
            let slopes = alibi.then(|| slope_table(kb, heads));
            let at = Attn {
                heads,
                groups,
                hd: head_dim,
                scale,
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
            };
            match block {
                None => attention(kb, &at, begin, end),
                Some(rn) => attention_block(kb, &at, rn, begin, end),
            }
        }
        Kernel::GemvPartial { inn, out: n_out, chunks, wf } => {
            gemv_partial(kb, inn, n_out, chunks, wf, p, begin, end)
        }
        Kernel::GemvReduce { out: n_out, chunks, bias, ref epi, pairs } => {
            let part = p(0);
            let (b, out) = if bias { (Some(p(1)), p(2)) } else { (None, p(1)) };
            let first = if bias { 3 } else { 2 };
            let n_others = epi.iter().filter(|e| matches!(e, Epi::Add | Epi::Mul)).count();
            let others = (0..n_others).map(|k| p(first + k as i64)).collect();
            let l = Lin {
                x: part,
                w: part,
                b,
                out,
                inn: 0,
                n_out,
                epi,
                others,
                wf: WFmt::F32,
                tiles: false,
                panels: false,
            };
            let sum_at = |o: IntValue<'ctx>| {
                let sum = kb.fold(c(0), c(chunks), &[kb.vzero().into()], |ch, acc| {
                    let pv = kb.ldv(part, kb.add(kb.mul(ch, c(n_out)), o));
                    vec![kb.vadd(acc[0].into_vector_value(), pv).into()]
                });
                sum[0].into_vector_value()
            };
            let bias_at = |o: IntValue<'ctx>, v: VectorValue<'ctx>| match b {
                Some(b) => kb.vadd(v, kb.ldv(b, o)),
                None => v,
            };
            kb.for_(begin, end, |blk| {
                let o0 = kb.mul(blk, c(BLOCK));
                if pairs {
                    // Each group of 32 partials holds its even outputs, then its odd ones.
                    let lo: Vec<u32> = (0..VW as u32 / 2).flat_map(|k| [k, k + VW as u32]).collect();
                    let hi: Vec<u32> = lo.iter().map(|k| k + VW as u32 / 2).collect();
                    kb.for_(c(0), c(BLOCK / (2 * VW)), |g| {
                        let o = kb.add(o0, kb.mul(g, c(2 * VW)));
                        let (even, odd) = (sum_at(o), sum_at(kb.add(o, c(VW))));
                        kb.stv(out, o, bias_at(o, kb.shuffle(even, odd, &lo)));
                        let o2 = kb.add(o, c(VW));
                        kb.stv(out, o2, bias_at(o2, kb.shuffle(even, odd, &hi)));
                    });
                } else {
                    kb.for_(c(0), c(BLOCK / VW), |v| {
                        let o = kb.add(o0, kb.mul(v, c(VW)));
                        kb.stv(out, o, bias_at(o, sum_at(o)));
                    });
                }
                epilogue(kb, &l, c(0), o0, kb.add(o0, c(BLOCK)));
            });
        }
        Kernel::LastRow { width, int } => {
            let (x, out, rows) = (p(0), p(1), a(2));
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
        Kernel::CacheStore { head_dim, max_seq } => {
            let (src, cache, rows, pp) = (p(0), p(1), a(2), a(3));
            kb.for_(begin, end, |g| {
                kb.for_(c(0), rows, |t| {
                    let s = kb.mul(kb.add(kb.mul(g, rows), t), c(head_dim));
                    let d = kb.mul(kb.add(kb.mul(g, c(max_seq)), kb.add(pp, t)), c(head_dim));
                    kb.for_(c(0), c(head_dim), |i| kb.st(cache, kb.add(d, i), kb.ld(src, kb.add(s, i))));
                });
            });
        }
    }
}

/// Input rows per pass of `gemv_partial` over its partial sums: each partial vector is
/// loaded and stored once per `GEMV_ROWS` weight rows.
const GEMV_ROWS: usize = 4;

/// One row times `W [in, out]`, split over `in` into `chunks` bands (`GemvPartial`): task
/// `ch` adds rows `i0..i1` of `W`, scaled by `x[i]`, into its partial row. The band is
/// one contiguous stream, read `GEMV_ROWS` rows at a time and prefetched that many rows
/// ahead. bf16 rows are read as even and odd lanes, so each group of 32 partials holds
/// its even outputs and then its odd ones (`GemvReduce { pairs }` puts them back).
#[allow(clippy::too_many_arguments)]
fn gemv_partial<'ctx>(
    kb: &Kb<'_, 'ctx>,
    inn: usize,
    n_out: usize,
    chunks: usize,
    wf: WFmt,
    p: ArgP<'ctx, '_>,
    begin: IntValue<'ctx>,
    end: IntValue<'ctx>,
) {
    let c = |v: usize| kb.c(v as i64);
    let (x, w, part) = (p(0), p(1), p(2));
    let esize = wf.elem_bytes();
    kb.for_(begin, end, |ch| {
        let i0 = kb.div(kb.mul(ch, c(inn)), c(chunks));
        let i1 = kb.div(kb.mul(kb.add(ch, c(1)), c(inn)), c(chunks));
        let prow = kb.mul(ch, c(n_out));
        kb.for_(c(0), c(n_out / VW), |v| kb.stv(part, kb.add(prow, kb.mul(v, c(VW))), kb.vzero()));
        let rows = |i: IntValue<'ctx>, u: usize| {
            let xs: Vec<_> = (0..u).map(|r| kb.ld(x, kb.add(i, c(r)))).collect();
            // 64 outputs a step (`out` is a multiple of BLOCK): whole cache lines, whole q8 blocks.
            kb.for_(c(0), c(n_out / BLOCK), |v| {
                let o = kb.mul(v, c(BLOCK));
                let at = |j: usize| kb.add(prow, kb.add(o, c(j * VW)));
                let mut acc: Vec<_> = (0..BLOCK / VW).map(|j| kb.ldv(part, at(j))).collect();
                for (r, &xr) in xs.iter().enumerate() {
                    let wi = kb.add(kb.mul(kb.add(i, c(r)), c(n_out)), o);
                    let ahead = kb.mul(kb.add(wi, c(GEMV_ROWS * n_out)), c(esize));
                    for line in 0..(BLOCK * esize).div_ceil(64) {
                        kb.prefetch(w, kb.add(ahead, c(64 * line)));
                    }
                    match wf {
                        WFmt::Bf16 => {
                            let xv = kb.splat(xr);
                            for g in 0..BLOCK / (2 * VW) {
                                let (even, odd) = kb.ld_bf16_pairs(w, kb.add(wi, c(g * 2 * VW)));
                                acc[2 * g] = kb.vfma(xv, even, acc[2 * g]);
                                acc[2 * g + 1] = kb.vfma(xv, odd, acc[2 * g + 1]);
                            }
                        }
                        WFmt::Q8 { scales } => {
                            // x times each block's scale once, against the raw values.
                            for blk in 0..BLOCK / Q8_BLOCK {
                                let at = kb.add(wi, c(blk * Q8_BLOCK));
                                let xv = kb.splat(kb.fmul(xr, kb.q8_scale(w, at, scales)));
                                for j in 0..Q8_BLOCK / VW {
                                    let k = blk * Q8_BLOCK / VW + j;
                                    acc[k] = kb.vfma(xv, kb.ldv_q8_raw(w, kb.add(at, c(j * VW))), acc[k]);
                                }
                            }
                        }
                        WFmt::F32 => {
                            let xv = kb.splat(xr);
                            for (j, a) in acc.iter_mut().enumerate() {
                                *a = kb.vfma(xv, kb.ldv(w, kb.add(wi, c(j * VW))), *a);
                            }
                        }
                    }
                }
                for (j, a) in acc.into_iter().enumerate() {
                    kb.stv(part, at(j), a);
                }
            });
        };
        let n = kb.div(kb.sub(i1, i0), c(GEMV_ROWS));
        kb.for_(c(0), n, |s| rows(kb.add(i0, kb.mul(s, c(GEMV_ROWS))), GEMV_ROWS));
        kb.for_(kb.add(i0, kb.mul(n, c(GEMV_ROWS))), i1, |i| rows(i, 1));
    });
}

fn unary<'ctx>(kb: &Kb<'_, 'ctx>, op: UnaryOp, x: FloatValue<'ctx>) -> FloatValue<'ctx> {
    match op {
        UnaryOp::Scale(s) => kb.to_f32(kb.fmul(kb.to_f64(x), kb.dc(s))),
        UnaryOp::RoundBf16 => kb.round_bf16(x),
        UnaryOp::Act(Act::Gelu) => {
            let xd = kb.to_f64(x);
            let e = kb.libm("erf", kb.fmul(xd, kb.dc(std::f64::consts::FRAC_1_SQRT_2)));
            kb.to_f32(kb.fmul(kb.fmul(kb.dc(0.5), xd), kb.fadd(kb.dc(1.0), e)))
        }
        UnaryOp::Act(a) => act(kb, a, x),
    }
}

/// One key of an online softmax: from the running max `m` and sum `l` and the key's
/// `score`, the new max and sum, the factor `corr` that rescales what was accumulated so
/// far, and the key's weight `e`.
fn softmax_step<'ctx>(
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
pub fn attention_rows(head_dim: usize) -> Option<usize> {
    (head_dim % VW == 0).then(|| (VW * VW / head_dim).clamp(1, 8))
}

/// What both attention kernels read: the op's constants and its argument block (see
/// `Kernel::Attention`).
#[derive(Clone, Copy)]
struct Attn<'ctx> {
    heads: usize,
    groups: usize,
    hd: usize,
    scale: f64,
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
}

/// The ALiBi slope of each head, as a constant table.
fn slope_table<'ctx>(kb: &Kb<'_, 'ctx>, heads: usize) -> PointerValue<'ctx> {
    let vals: Vec<_> = alibi_slopes(heads).iter().map(|&s| kb.f32t().const_float(s)).collect();
    let arr = kb.f32t().const_array(&vals);
    let g = kb.m.add_global(arr.get_type(), None, "tfc_alibi_slopes");
    g.set_initializer(&arr);
    g.set_constant(true);
    g.set_linkage(inkwell::module::Linkage::Private);
    g.as_pointer_value()
}

/// The visible keys of the query at position `pq`: `lo..hi`.
fn visible<'ctx>(
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
fn attention_block<'ctx>(
    kb: &Kb<'_, 'ctx>,
    at: &Attn<'ctx>,
    rn: usize,
    begin: IntValue<'ctx>,
    end: IntValue<'ctx>,
) {
    type Bv<'c> = inkwell::values::BasicValueEnum<'c>;
    let c = |v: usize| kb.c(v as i64);
    let Attn { heads, groups, hd, scale, mask, q, k, v, pos, out, rows, s_len, kstride, vstride, slopes } =
        *at;
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
        for _ in 0..rn {
            init.extend([Bv::from(kb.fc(f64::NEG_INFINITY)), kb.fc(0.0).into()]);
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
                let mut sv = kb.vmul(kb.lane_sums(dots), kb.splat(kb.fc(scale)));
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
fn attention<'ctx>(kb: &Kb<'_, 'ctx>, at: &Attn<'ctx>, begin: IntValue<'ctx>, end: IntValue<'ctx>) {
    let c = |v: usize| kb.c(v as i64);
    let Attn { heads, groups, hd, scale, mask, q, k, v, pos, out, rows, s_len, kstride, vstride, slopes } =
        *at;
    let m_slot = kb.alloca_f32();
    let l_slot = kb.alloca_f32();
    kb.for_(begin, end, |r| {
        let h = kb.div(r, rows);
        let t = kb.rem(r, rows);
        let g = kb.div(h, c(heads / groups));
        let pq = kb.ldi(pos, t);
        let (lo, hi) = visible(kb, mask, pq, s_len);
        let row = kb.mul(r, c(hd));
        let kb0 = kb.mul(g, kstride);
        let vb0 = kb.mul(g, vstride);
        let slope = slopes.map(|s| kb.ld(s, h));
        let score_of = |dot: FloatValue<'ctx>, s: IntValue<'ctx>| {
            let score = kb.fmul(dot, kb.fc(scale));
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
            let mut init: Vec<Bv<'ctx>> = vec![kb.fc(f64::NEG_INFINITY).into(), kb.fc(0.0).into()];
            init.extend((0..nv * sets).map(|_| Bv::from(kb.vzero())));
            let blocks = kb.div(kb.max(kb.sub(hi, lo), c(0)), c(VW));
            // One query row (decode) streams its keys and values once, from the cache: the
            // next block's rows are prefetched, or the stream waits on memory (at 1008
            // tokens of context GPT-2 small's decode read them at a third of the rate of
            // the weights). Many rows reuse them from cache, so they skip it.
            let stream = kb.select(kb.icmp_ge(c(1), rows), c(1), c(0));
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
                let mut sv = kb.vmul(kb.lane_sums(dots), kb.splat(kb.fc(scale)));
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
        kb.store(m_slot, kb.fc(f64::NEG_INFINITY));
        kb.store(l_slot, kb.fc(0.0));
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
