//! Linear maps: the packed GEMM of many rows (f32 panels, register tiles), the AMX
//! dispatch, vectorised dot products for one row, plain loops, the split-K GEMV, and
//! the fused epilogues they apply to each output tile.
//!
//! ## Tuning notes
//!
//! **Prefill's linear maps run on panels.** A linear map over many rows
//! (`kernels::packs`: prefill's `T` rows, any weight layout or storage type, `out` a
//! multiple of 64) reads each 64-column weight block as `f32` panels of 128 input rows
//! (32 KB) and runs 6-row × 64-column register tiles (24 accumulators) over them (6 × 16
//! columns at a time where the CPU has 16 vector registers, as AVX2 has). The
//! tiles read `x` sliced: each 128-input slice of every row, rows 512 B apart, since rows
//! of `x` a multiple of 4 KB apart (W2's 2048 inputs) put a tile's six rows into the same
//! L1 sets and the broadcasts missed. A `slice_rows` kernel writes the slices once per
//! input (into the region after the planned values, which the maps of one input share,
//! as for AMX's packed activations), for every task of every map reading them; before,
//! each task (one to three column blocks) copied the whole of `x` again, slice by slice,
//! and the copies were 5–13% of the GEMMs (×1.075 for W1's f32 prefill when they went).
//! The AMX maps' f32 fallback still copies per task. The rows go in chunks of 192; the
//! rows after the last tile of six go in tiles of three, two and one. While the row
//! tiles run, the next panel is prefetched into L2, one line every four k-steps, the
//! k-loop unrolled by four around it (a branch per step cost more than the prefetch).
//!
//! One-row products with `[in, out]` weights left as stored (decode) are split over the input dimension
//! into 8 bands plus a reduction, so every task streams contiguous memory; the column-block
//! tiling that suits many rows would walk the matrix with a large stride. With `[out, in]`
//! weights a one-row product takes one output's dot product at a time (four accumulators),
//! so a task's 64-row block is a single forward stream (interleaving four rows' short
//! streams left the prefetcher behind: q8 decode ran at half the bandwidth).
//! Every decode stream is prefetched ahead, into L1 or L2 or not at all as the first decode
//! step measured fastest (`Kb::prefetch_stream`): 3 KB in the dot products (`kernels::PREFETCH`),
//! the same columns four rows on in the split `[in, out]` product. Without it, how
//! much of a stream is in flight is bounded by the out-of-order window, so formats that
//! take more instructions per byte streamed slower: on the Intel machine bf16 at 11 GB/s
//! and q8 at 13 against f32's 25 (a microbenchmark), 20–27 with it. bf16 weights are read
//! 32 at a time and split into even and odd `f32` lanes (a shift and an and:
//! `Kb::ld_bf16_pairs`) against an `x` permuted to match, or, in the split `[in, out]`
//! product, into partial sums whose 32-groups hold even then odd outputs
//! (`GemvReduce { pairs }` restores the order). q8 blocks are summed, then scaled once.

use inkwell::values::{BasicValueEnum, FloatValue, IntValue, PointerValue, VectorValue};
use tfc_runtime::quant::{Quant, Q8_BLOCK};

use super::bf16;
use super::int8::{lin_q4k_i8_row, q8x_len, q8x_row, ready};
use super::rows::unary;
use super::{Args, Kernel, LinearAlgo, Slot, UnaryOp, WeightRead};
use crate::backend::llvm::amx;
use crate::backend::llvm::elementwise::epilogue_vectorises;
use crate::backend::llvm::kb::{nibbles_at, Int8Dots, Kb, WFmt, VW};
use crate::backend::plan::Epi;
use crate::backend::weights::{Tiles, BLOCK};

/// Activation rows per register tile of the linear kernels.
pub(crate) const ROWS: usize = 4;

/// Weight rows (the `in` dimension) of a column block packed at a time by the packed
/// GEMM: `KC × BLOCK` f32 is 32 KB, which stays in L1 while every row tile passes over it.
pub(crate) const KC: usize = 128;

/// Activation rows per chunk of the packed GEMM, whose `KC`-wide slices of `x`
/// are copied out once for all of a task's column blocks (96 KB).
pub(crate) const MC: usize = 192;

/// Activation rows per register tile of the packed GEMM: `MR × 4` accumulators, four
/// weight vectors and a broadcast use 29 of the 32 vector registers.
pub(crate) const MR: usize = 6;

/// k-steps of the packed GEMM's row tiles per prefetched line of the next panel.
pub(crate) const SPREAD: usize = 4;

/// Whether a linear map of `rows` rows (`None`: known only at run time) gets the packed
/// GEMM: each column block of the weights is converted to f32 and packed `KC` rows at a
/// time into a contiguous L1-resident panel, whatever its layout or storage type, and
/// the activation rows pass over it in register tiles of `MR`. The packing is paid once
/// per block and shared by every row, so it is for prefill's many rows, not for
/// decode's one. `[in, out]` weights are packed for any row count: their one-row products
/// (decode) are split over `in` instead (`GemvPartial`), whenever `in` is 64 or more.
pub(crate) fn packs(rows: Option<usize>, out: usize, transposed: bool) -> bool {
    out % BLOCK == 0 && (transposed || rows.is_none_or(|r| r >= MR))
}

/// Whether an unpacked linear map gets the vectorised dot products of `lin_n_block`:
/// `[out, in]` weights whose rows the vectors tile exactly (`in` by 16).
pub(crate) fn tiled(inn: usize, transposed: bool) -> bool {
    !transposed && inn % VW == 0
}

pub(crate) struct Lin<'ctx, 'e> {
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
    /// The input is `round_q8`'d (`int8_dots`).
    q8x: bool,
}

impl<'ctx, 'e> Lin<'ctx, 'e> {
    /// Reads the argument block of a `Kernel::Linear`: x, w, [b], out, rows, then the
    /// epilogue's other operands.
    fn from_args(args: &Args<'_, '_, 'ctx>, k: &'e Kernel) -> (Self, IntValue<'ctx>) {
        let Kernel::Linear { inn, out: n_out, ref epi, wf, read, q8x, .. } = *k else {
            unreachable!("the arguments of a linear kernel")
        };
        let (tiles, panels) = (read == WeightRead::Tiles, read == WeightRead::Panels);
        let (x, w) = (args.p(Slot::X), args.p(Slot::W));
        let (b, out, rows) = (args.opt_p(Slot::Bias), args.p(Slot::Out), args.i(Slot::Rows));
        let n_others = epi.iter().filter(|e| matches!(e, Epi::Add | Epi::Mul)).count();
        let others = (0..n_others).map(|k| args.p(Slot::Other(k))).collect();
        (Lin { x, w, b, out, inn, n_out, epi, others, wf, tiles, panels, q8x }, rows)
    }

    /// Output `o` of row `t`: the dot product `v`, plus the bias if there is one.
    fn store(&self, kb: &Kb<'_, 'ctx>, t: IntValue<'ctx>, o: IntValue<'ctx>, v: FloatValue<'ctx>) {
        let v = match self.b {
            Some(b) => kb.fadd(v, kb.ld(b, o)),
            None => v,
        };
        kb.st(self.out, kb.add(kb.mul(t, kb.c(self.n_out as i64)), o), v);
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
pub(crate) fn epilogue<'ctx>(
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
pub(crate) fn lin_n_block<'ctx>(
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
        return lin_dot_row(kb, l, t0, 1, o0, o1, xp);
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
                let v = kb.vsum(acc[r * on + j].into_vector_value());
                l.store(kb, kb.add(t0, c(r)), o, v);
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
/// q8 ×1.06) and 0–6% faster than 3.5 KB, and 2 KB is too near for bf16 (W2 ×0.90). On
/// the AMD (Zen 5) host, prefetched into L2 only, 3 KB ahead decoded W2 q8 at 37 tok/s,
/// 6 KB at 37 and 12 KB at 33 (bf16: 22–27, 18–20); into L1, 3 KB gave 24–28.
pub(crate) const PREFETCH: usize = 3072;

/// Elements of a one-row dot product per step: four vectors, so four accumulators hide
/// the FMA latency, and a whole number of cache lines and of q8 blocks.
pub(crate) const DOT: usize = 4 * VW;

/// `x` of one row, with each group of 32 elements reordered as its 16 even elements then
/// its 16 odd ones, so it lines up with `Kb::ld_bf16_pairs` (the part of `in` that
/// `lin_dot_row` steps over; the rest is read in order).
pub(crate) fn permute_pairs<'ctx>(
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

/// Rows `t..t + rn` times `W [out, in]`, outputs `o0..o1`: one output's dot products at
/// a time, so the block of weight rows is a single forward stream, prefetched `PREFETCH`
/// ahead, and each weight vector read (and decoded) once for all `rn` rows. (Four
/// outputs' interleaved short streams left the prefetcher behind.) In the f32, f16, bf16
/// and q8 products here each row keeps the accumulators one row alone has, so its sums
/// are the same as alone, bit for bit (the block formats' kernels say theirs). bf16
/// weights are read 32 at a time as even and odd lanes against `xp`, the rows already
/// permuted to match (`permute_pairs`, `permuted_len` apart).
pub(crate) fn lin_dot_row<'ctx>(
    kb: &Kb<'_, 'ctx>,
    l: &Lin<'ctx, '_>,
    t: IntValue<'ctx>,
    rn: usize,
    o0: IntValue<'ctx>,
    o1: IntValue<'ctx>,
    xp: Option<PointerValue<'ctx>>,
) {
    match l.wf {
        WFmt::Quant(Quant::Q6_K) => return lin_q6k_row(kb, l, t, rn, o0, o1),
        WFmt::Quant(q @ (Quant::Q2_K | Quant::Q3_K)) => return lin_groups_row(kb, l, t, rn, o0, o1, q),
        WFmt::Quant(q) => {
            match int8_dots(kb, l) {
                Some(dots) => {
                    let s = xp.expect("bug: integer products read their rows' integers");
                    kb.if_else(
                        ready(kb, dots),
                        || {
                            let store = |r, o, v| l.store(kb, r, o, v);
                            lin_q4k_i8_row(kb, l.w, l.inn, dots, t, rn, o0, o1, s, store)
                        },
                        || lin_q4_row(kb, l, t, rn, o0, o1, q, xp),
                    );
                }
                None => lin_q4_row(kb, l, t, rn, o0, o1, q, xp),
            }
            return;
        }
        _ => {}
    }
    let c = |v: usize| kb.c(v as i64);
    let (inn, steps) = (l.inn, l.inn / DOT);
    let xrows: Vec<_> = (0..rn).map(|r| kb.mul(row_at(kb, t, r), c(inn))).collect();
    let xrow = |r: usize| xrows[r];
    let esize = l.wf.bytes(1);
    kb.for_(o0, o1, |o| {
        let wrow = kb.mul(o, c(inn));
        let init: Vec<_> = (0..4 * rn).map(|_| kb.vzero().into()).collect();
        let acc = kb.fold(c(0), c(steps), &init, |s, acc| {
            let i = kb.mul(s, c(DOT));
            let wi = kb.add(wrow, i);
            let bytes = kb.mul(wi, c(esize));
            kb.prefetch_stream(l.w, kb.add(bytes, c(PREFETCH)), (DOT * esize).div_ceil(64));
            let a = |r: usize, j: usize| acc[4 * r + j].into_vector_value();
            let xv = |r: usize, j: usize| kb.ldv(l.x, kb.add(xrow(r), kb.add(i, c(j * VW))));
            let mut next: Vec<VectorValue<'ctx>> = Vec::with_capacity(4 * rn);
            match (l.wf, xp) {
                (WFmt::Bf16, Some(xp)) => {
                    let (e0, d0) = kb.ld_bf16_pairs(l.w, wi);
                    let (e1, d1) = kb.ld_bf16_pairs(l.w, kb.add(wi, c(2 * VW)));
                    for r in 0..rn {
                        let xv =
                            |j: usize| kb.ldv(xp, row_at(kb, kb.add(i, c(j * VW)), r * permuted_len(inn)));
                        next.extend([
                            kb.vfma(xv(0), e0, a(r, 0)),
                            kb.vfma(xv(1), d0, a(r, 1)),
                            kb.vfma(xv(2), e1, a(r, 2)),
                            kb.vfma(xv(3), d1, a(r, 3)),
                        ]);
                    }
                }
                (WFmt::Q8 { scales }, _) => {
                    // Two blocks of 32: each block's products are summed, then scaled once.
                    kb.prefetch_stream(
                        l.w,
                        kb.add(c(scales + PREFETCH / 8), kb.mul(kb.div(wi, c(Q8_BLOCK)), c(4))),
                        1,
                    );
                    let block: Vec<_> = (0..2)
                        .map(|b| {
                            let at = kb.add(wi, c(b * 2 * VW));
                            let w = (kb.ldv_q8_raw(l.w, at), kb.ldv_q8_raw(l.w, kb.add(at, c(VW))));
                            (w, kb.splat(kb.q8_scale(l.w, at, scales)))
                        })
                        .collect();
                    for r in 0..rn {
                        let sum = |b: usize| {
                            let ((w0, w1), scale) = block[b];
                            let blk = kb.vfma(xv(r, 2 * b + 1), w1, kb.vmul(xv(r, 2 * b), w0));
                            kb.vfma(blk, scale, a(r, b))
                        };
                        // Accumulators 2 and 3 stay zero: one per block is enough.
                        next.extend([sum(0), sum(1), a(r, 2), a(r, 3)]);
                    }
                }
                _ => {
                    let wv: Vec<_> = (0..4).map(|j| kb.ldvw(l.w, kb.add(wi, c(j * VW)), l.wf)).collect();
                    for r in 0..rn {
                        next.extend((0..4).map(|j| kb.vfma(xv(r, j), wv[j], a(r, j))));
                    }
                }
            };
            next.into_iter().map(Into::into).collect()
        });
        for r in 0..rn {
            let a = |j: usize| acc[4 * r + j].into_vector_value();
            let mut sum = kb.vadd(kb.vadd(a(0), a(1)), kb.vadd(a(2), a(3)));
            // The rest of `in` (a multiple of VW), one vector at a time.
            for j in 0..(inn % DOT) / VW {
                let i = c(steps * DOT + j * VW);
                let xv = kb.ldv(l.x, kb.add(xrow(r), i));
                sum = kb.vfma(xv, kb.ldvw(l.w, kb.add(wrow, i), l.wf), sum);
            }
            let v = kb.vsum(sum);
            l.store(kb, row_at(kb, t, r), o, v);
        }
    });
}

/// `t + r`, with no instruction for `r = 0`.
fn row_at<'ctx>(kb: &Kb<'_, 'ctx>, t: IntValue<'ctx>, r: usize) -> IntValue<'ctx> {
    if r == 0 {
        t
    } else {
        kb.add(t, kb.c(r as i64))
    }
}

/// Floats of one row's `x` as `permute_pairs` writes it for `lin_dot_row`: the whole
/// steps of `DOT` over `in`.
pub(crate) fn permuted_len(inn: usize) -> usize {
    inn / DOT * DOT
}

/// Floats of `q4_block_sums` for a row of `inn` inputs in format `q`: none for the
/// formats without an offset (`Q4_0` and `Q5_0` fold their fixed `-8·scale` and
/// `-16·scale` into signed values; `Q6_K` and `Q8_0` have none).
pub(crate) fn q4_sums(q: Quant, inn: usize) -> usize {
    match q {
        Quant::Q4_0 | Quant::Q5_0 | Quant::Q6_K | Quant::Q8_0 | Quant::Q2_K | Quant::Q3_K => 0,
        Quant::Q4_1 | Quant::Q5_1 => inn / 32,
        Quant::Q4_K | Quant::Q5_K => inn / 256 * VW,
    }
}

/// The sums of `x[xrow..xrow + inn]` per 32 values, which every output's offset term
/// `offset · Σ x` of a 4-bit row shares, into `sums`: one per block for `Q4_1`; for
/// `Q4_K` a vector per super-block, eight zeros then its eight sums, to meet
/// `Kb::q4k_scales` lane for lane.
pub(crate) fn q4_block_sums<'ctx>(
    kb: &Kb<'_, 'ctx>,
    x: PointerValue<'ctx>,
    xrow: IntValue<'ctx>,
    inn: usize,
    q: Quant,
    sums: PointerValue<'ctx>,
) {
    let c = |v: usize| kb.c(v as i64);
    let sum32 = |i: IntValue<'ctx>| {
        let at = kb.add(xrow, i);
        kb.vsum(kb.vadd(kb.ldv(x, at), kb.ldv(x, kb.add(at, c(VW)))))
    };
    match q {
        Quant::Q4_0 | Quant::Q5_0 | Quant::Q6_K | Quant::Q8_0 | Quant::Q2_K | Quant::Q3_K => {}
        Quant::Q4_1 | Quant::Q5_1 => kb.for_(c(0), c(inn / 32), |b| kb.st(sums, b, sum32(kb.mul(b, c(32))))),
        Quant::Q4_K | Quant::Q5_K => kb.for_(c(0), c(inn / 256), |s| {
            let base = kb.mul(s, c(VW));
            for j in 0..8 {
                kb.st(sums, kb.add(base, c(j)), kb.fc(0.0));
                kb.st(sums, kb.add(base, c(8 + j)), sum32(kb.add(kb.mul(s, c(256)), c(32 * j))));
            }
        }),
    }
}

/// Whether `lin_q4_row` over several rows dequantises each block once for all of them
/// (`value · scale + offset`, then one FMA per row and vector), rather than keeping the
/// one-row factoring (a product, a scaling and the offset term per row and block).
fn dequantises(q: Quant) -> bool {
    matches!(q, Quant::Q8_0 | Quant::Q4_0 | Quant::Q4_1 | Quant::Q5_0 | Quant::Q5_1)
}

/// Rows `t..t + rn` times `W [out, in]` in a 4- or 5-bit format or `Q8_0`, outputs
/// `o0..o1`: one output's row of blocks at a time, a single forward stream prefetched
/// `PREFETCH` ahead, each block decoded once for all `rn` rows. Each 32 values are
/// `q · scale + offset`, so for one row a block adds `scale · Σ q·x` and `offset · Σ x`:
/// the values are multiplied as they are and each block's sum scaled once, and the `Σ x`
/// are the row's `sums` (`q4_block_sums`, rows `q4_sums` apart), shared by every output.
/// Several rows share each block of the 32-value formats dequantised instead
/// (`dequantises`); the K formats keep the one-row factoring for each row.
/// `Q4_0`'s and `Q5_0`'s values are made signed (`q - 8`, `q - 16`) instead, so they have
/// no offset term, nor has `Q8_0`; the K formats unpack a super-block's eight scales and
/// offsets at once (`Kb::q4k_scales`) and add their offset terms as one product with the
/// sums. A `Q5_*` value is its nibble and its fifth bit (`Kb::q5_high`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn lin_q4_row<'ctx>(
    kb: &Kb<'_, 'ctx>,
    l: &Lin<'ctx, '_>,
    t: IntValue<'ctx>,
    rn: usize,
    o0: IntValue<'ctx>,
    o1: IntValue<'ctx>,
    q: Quant,
    sums: Option<PointerValue<'ctx>>,
) {
    let c = |v: usize| kb.c(v as i64);
    let inn = l.inn;
    let (per, size) = q.block();
    // Blocks per step: two of 32 where they tile the row (an accumulator each), or one
    // super-block of eight 32s (two accumulators, alternating).
    let unit = match q {
        Quant::Q4_K | Quant::Q5_K => 256,
        _ if inn % 64 == 0 => 64,
        _ => 32,
    };
    let xrows: Vec<_> = (0..rn).map(|r| kb.mul(row_at(kb, t, r), c(inn))).collect();
    let row_bytes = inn / per * size;
    let sums = || sums.expect("bug: a block row with offsets reads its block sums");
    // Floats from one row's sums to the next's (`lin_few_rows`' rows of scratch).
    let stride = few_rows_len(l.wf, inn, int8_dots(kb, l).is_some());
    // Each row's accumulators: vectors for the scaled sums (two) and the K formats'
    // offsets, then a scalar one per block of a step for `Q4_1`'s and `Q5_1`'s offsets.
    let offset = matches!(q, Quant::Q4_1 | Quant::Q5_1);
    // One row multiplies the values as they are and scales each block's sum once; more
    // rows share the block dequantised instead (`factored`: fewer operations per row).
    let factored = rn == 1 || !dequantises(q);
    let per_row = 3 + if offset && factored { unit / 32 } else { 0 };
    kb.for_(o0, o1, |o| {
        let wrow = kb.mul(o, c(row_bytes));
        let mut init: Vec<BasicValueEnum<'ctx>> = Vec::with_capacity(per_row * rn);
        for _ in 0..rn {
            init.extend((0..3).map(|_| BasicValueEnum::from(kb.vzero())));
            init.extend((3..per_row).map(|_| BasicValueEnum::from(kb.fc(0.0))));
        }
        let acc = kb.fold(c(0), c(inn / unit), &init, |s, acc| {
            let i = kb.mul(s, c(unit));
            let at = kb.add(wrow, kb.mul(s, c(unit / per * size)));
            kb.prefetch_stream(l.w, kb.add(at, c(PREFETCH)), (unit / per * size).div_ceil(64));
            let mut acc = acc.to_vec();
            let vacc =
                |acc: &[BasicValueEnum<'ctx>], r: usize, a: usize| acc[r * per_row + a].into_vector_value();
            let shift = |s: u64| kb.cx.i32_type().const_int(s, false);
            let bias = if q == Quant::Q4_0 { 8 } else { 0 };
            let x = |r: usize, k: usize| kb.ldv(l.x, kb.add(xrows[r], kb.add(i, c(k))));
            // The 32 values from input `k` on as two vectors, whose first and last 16
            // nibbles are the `(byte, shift)` halves `lo` and `hi`.
            // `Q5_*` add each half's fifth bits (`Kb::q5_high`, for the element at
            // `k` and `k + 16` of the row) and `Q5_0` subtracts 16.
            let values32 = |k: usize, lo: (IntValue<'ctx>, u64), hi: (IntValue<'ctx>, u64)| {
                let w = |(at, s): (IntValue<'ctx>, u64), k: usize| {
                    if !q.fifth_bit() {
                        return kb.ld_nibbles_f(l.w, at, shift(s), bias);
                    }
                    let elem = kb.add(kb.mul(o, c(inn)), kb.add(i, c(k)));
                    let n =
                        kb.b.build_or(kb.ld_nibbles(l.w, at, shift(s)), kb.q5_high(l.w, elem, q), "")
                            .unwrap();
                    let n = if q == Quant::Q5_0 {
                        kb.b.build_int_sub(n, kb.isplat(kb.cx.i32_type().const_int(16, false)), "").unwrap()
                    } else {
                        n
                    };
                    kb.b.build_signed_int_to_float(n, kb.vt(), "").unwrap()
                };
                (w(lo, k), w(hi, k + VW))
            };
            // `Σ value·x` of row `r` over the 32 inputs from `k` on.
            let dot32 = |(w0, w1): (VectorValue<'ctx>, VectorValue<'ctx>), r: usize, k: usize| {
                let p = kb.vmul(w0, x(r, k));
                kb.vfma(w1, x(r, k + VW), p)
            };
            match q {
                Quant::Q8_0 | Quant::Q4_0 | Quant::Q4_1 | Quant::Q5_0 | Quant::Q5_1 => {
                    for b in 0..unit / 32 {
                        let blk = kb.add(at, c(b * size));
                        let d = kb.splat(kb.ld_f16(l.w, blk));
                        // The block's 32 values as two vectors: `Q8_0`'s signed bytes after
                        // its scale; the others' 16 bytes of nibbles, the first 16 values
                        // low, the last 16 high.
                        let w = if q == Quant::Q8_0 {
                            let byte = |k: usize| {
                                let q = kb.ld_bytes_as(l.w, kb.add(blk, c(2 + k)), true);
                                kb.b.build_signed_int_to_float(q, kb.vt(), "").unwrap()
                            };
                            (byte(0), byte(VW))
                        } else {
                            let qs = kb.add(blk, c(nibbles_at(q)));
                            values32(b * 32, (qs, 0), (qs, 4))
                        };
                        let m = offset.then(|| kb.ld_f16(l.w, kb.add(blk, c(2))));
                        if !factored {
                            // Dequantised once for all the rows: `value · scale + offset`.
                            let deq = |v| match m {
                                Some(m) => kb.vfma(v, d, kb.splat(m)),
                                None => kb.vmul(v, d),
                            };
                            let (w0, w1) = (deq(w.0), deq(w.1));
                            for r in 0..rn {
                                let a = kb.vfma(w0, x(r, 32 * b), vacc(&acc, r, b));
                                acc[r * per_row + b] = kb.vfma(w1, x(r, 32 * b + VW), a).into();
                            }
                            continue;
                        }
                        let p = dot32(w, 0, b * 32);
                        acc[b] = kb.vfma(p, d, vacc(&acc, 0, b)).into();
                        if let Some(m) = m {
                            let sb = kb.ld(sums(), kb.add(kb.mul(s, c(unit / 32)), c(b)));
                            let a = acc[3 + b].into_float_value();
                            acc[3 + b] = kb.fadd(kb.fmul(m, sb), a).into();
                        }
                    }
                }
                Quant::Q2_K | Quant::Q3_K | Quant::Q6_K => {
                    unreachable!("bug: {q:?} rows take their own kernel")
                }
                Quant::Q4_K | Quant::Q5_K => {
                    let scales = kb.q4k_scales(l.w, at);
                    for j in 0..8 {
                        // 32 bytes per two sub-blocks: the first's values low, the next's high.
                        let qs = kb.add(at, c(nibbles_at(q) + j / 2 * 32));
                        let half = 4 * (j as u64 % 2);
                        let w = values32(j * 32, (qs, half), (kb.add(qs, c(16)), half));
                        let scale = kb.broadcast_lane(scales, j);
                        for r in 0..rn {
                            let p = dot32(w, r, j * 32);
                            acc[r * per_row + j % 2] = kb.vfma(p, scale, vacc(&acc, r, j % 2)).into();
                        }
                    }
                    for r in 0..rn {
                        let sv = kb.ldv(sums(), row_at(kb, kb.mul(s, c(VW)), r * stride));
                        acc[r * per_row + 2] = kb.vfma(scales, sv, vacc(&acc, r, 2)).into();
                    }
                }
            }
            acc
        });
        for r in 0..rn {
            let acc = &acc[r * per_row..(r + 1) * per_row];
            let sum = kb.vadd(
                kb.vadd(acc[0].into_vector_value(), acc[1].into_vector_value()),
                acc[2].into_vector_value(),
            );
            let mut v = kb.vsum(sum);
            for a in &acc[3..] {
                v = kb.fadd(v, a.into_float_value());
            }
            l.store(kb, row_at(kb, t, r), o, v);
        }
    });
}

/// Rows `t..t + rn` times `W [out, in]` in `Q6_K`, outputs `o0..o1`: one output's row
/// of super-blocks at a time, a single forward stream prefetched `PREFETCH` ahead, each
/// decoded once for all `rn` rows. Each 16
/// values share a scale: they are read as one vector (`Kb::q6k_element`'s byte runs),
/// times `x`, and the product scaled once; the sixteen scales of a super-block are read
/// as one vector of int8 and broadcast lane by lane.
pub(crate) fn lin_q6k_row<'ctx>(
    kb: &Kb<'_, 'ctx>,
    l: &Lin<'ctx, '_>,
    t: IntValue<'ctx>,
    rn: usize,
    o0: IntValue<'ctx>,
    o1: IntValue<'ctx>,
) {
    let c = |v: usize| kb.c(v as i64);
    let inn = l.inn;
    let (per, size) = Quant::Q6_K.block();
    let xrows: Vec<_> = (0..rn).map(|r| kb.mul(row_at(kb, t, r), c(inn))).collect();
    let i32t = kb.cx.i32_type();
    let k = |v: u64| inkwell::types::VectorType::const_vector(&[i32t.const_int(v, false); VW]);
    kb.for_(o0, o1, |o| {
        let wrow = kb.mul(o, c(inn / per * size));
        let init: Vec<BasicValueEnum<'ctx>> = (0..2 * rn).map(|_| kb.vzero().into()).collect();
        let acc = kb.fold(c(0), c(inn / per), &init, |s, acc| {
            let at = kb.add(wrow, kb.mul(s, c(size)));
            kb.prefetch_stream(l.w, kb.add(at, c(PREFETCH)), size.div_ceil(64));
            // The sixteen `d·sc`, sign-extended from their bytes.
            let sc = kb.ld_bytes_as(l.w, kb.add(at, c(192)), true);
            let sc = kb.b.build_signed_int_to_float(sc, kb.vt(), "").unwrap();
            let scales = kb.vmul(sc, kb.splat(kb.ld_f16(l.w, kb.add(at, c(208)))));
            let mut acc = acc.to_vec();
            for v in 0..per / VW {
                let (h, g, off) = (v / 8, v % 8 / 2, VW * (v % 2));
                let lo = kb.ld_bytes(l.w, kb.add(at, c(64 * h + 32 * (g % 2) + off)));
                let hi = kb.ld_bytes(l.w, kb.add(at, c(128 + 32 * h + off)));
                let q = kb.q6_value(lo, k(4 * (g as u64 / 2)), hi, k(2 * g as u64), k);
                let w = kb.b.build_signed_int_to_float(q, kb.vt(), "").unwrap();
                let scale = kb.broadcast_lane(scales, v);
                for (r, &xrow) in xrows.iter().enumerate() {
                    let x = kb.ldv(l.x, kb.add(xrow, kb.add(kb.mul(s, c(per)), c(VW * v))));
                    let p = kb.vmul(w, x);
                    let a = 2 * r + v % 2;
                    acc[a] = kb.vfma(p, scale, acc[a].into_vector_value()).into();
                }
            }
            acc
        });
        store_pairs(kb, l, t, o, &acc);
    });
}

/// Stores output `o` of rows `t..`: each row's two vector accumulators, summed.
fn store_pairs<'ctx>(
    kb: &Kb<'_, 'ctx>,
    l: &Lin<'ctx, '_>,
    t: IntValue<'ctx>,
    o: IntValue<'ctx>,
    acc: &[BasicValueEnum<'ctx>],
) {
    for (r, a) in acc.chunks(2).enumerate() {
        let v = kb.vsum(kb.vadd(a[0].into_vector_value(), a[1].into_vector_value()));
        l.store(kb, row_at(kb, t, r), o, v);
    }
}

/// Rows `t..t + rn` times `W [out, in]` in a format whose 16 values share a scale
/// (`Q2_K`, `Q3_K`), outputs `o0..o1`: one output's row of super-blocks at a time, a
/// single forward stream prefetched `PREFETCH` ahead, each 16 values read as one vector
/// (`Kb::ldvw`) once for all `rn` rows.
#[allow(clippy::too_many_arguments)]
pub(crate) fn lin_groups_row<'ctx>(
    kb: &Kb<'_, 'ctx>,
    l: &Lin<'ctx, '_>,
    t: IntValue<'ctx>,
    rn: usize,
    o0: IntValue<'ctx>,
    o1: IntValue<'ctx>,
    q: Quant,
) {
    let c = |v: usize| kb.c(v as i64);
    let inn = l.inn;
    let (per, size) = q.block();
    let xrows: Vec<_> = (0..rn).map(|r| kb.mul(row_at(kb, t, r), c(inn))).collect();
    kb.for_(o0, o1, |o| {
        let wrow = kb.mul(o, c(inn / per * size));
        let init: Vec<BasicValueEnum<'ctx>> = (0..2 * rn).map(|_| kb.vzero().into()).collect();
        let acc = kb.fold(c(0), c(inn / per), &init, |s, acc| {
            let at = kb.add(wrow, kb.mul(s, c(size)));
            kb.prefetch_stream(l.w, kb.add(at, c(PREFETCH)), size.div_ceil(64));
            let mut acc = acc.to_vec();
            for v in 0..per / VW {
                let i = kb.add(kb.mul(s, c(per)), c(VW * v));
                let w = kb.ldvw(l.w, kb.add(kb.mul(o, c(inn)), i), l.wf);
                for (r, &xrow) in xrows.iter().enumerate() {
                    let x = kb.ldv(l.x, kb.add(xrow, i));
                    let a = 2 * r + v % 2;
                    acc[a] = kb.vfma(w, x, acc[a].into_vector_value()).into();
                }
            }
            acc
        });
        store_pairs(kb, l, t, o, &acc);
    });
}

/// One row times `W [out, in]` in the tile layout (`weights::Tiles`), outputs `o0..o1` (whole
/// blocks of 16): each block is one contiguous stream, prefetched `PREFETCH` ahead, read a
/// tile at a time into one accumulator per output, as even and odd lanes against `xp`
/// (row `t`, permuted by `permute_pairs` over all of `in`).
pub(crate) fn lin_tile_row<'ctx>(
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
            kb.prefetch_stream(l.w, kb.add(bytes, c(PREFETCH)), rows * cols * 2 / 64);
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
            let v = kb.vsum(a.into_vector_value());
            l.store(kb, t, o, v);
        }
    });
}

/// Where the packed GEMM's row tiles read the activations: each `KC`-wide slice of `in`
/// with its rows `KC` apart, so that the tiles' broadcasts neither alias in L1 (as rows
/// of `x` a multiple of 4 KB apart do) nor leave L2 between the column blocks.
#[derive(Clone, Copy)]
pub(crate) enum Xs<'ctx> {
    /// Copied by each task into this `MC × KC` buffer, a chunk's slice at a time.
    Copy(PointerValue<'ctx>),
    /// Every slice of every row, as `SliceRows` wrote them (`slice_at`).
    Sliced(PointerValue<'ctx>),
}

/// Element `(t, k)` of `x [rows, inn]` in the layout `SliceRows` writes: slice `k / KC`
/// holds the rows one after the other, `KC` apart (the last slice too, when `inn` is not
/// a multiple of `KC`).
pub(crate) fn slice_at<'ctx>(
    kb: &Kb<'_, 'ctx>,
    rows: IntValue<'ctx>,
    slice: IntValue<'ctx>,
    t: IntValue<'ctx>,
) -> IntValue<'ctx> {
    let c = |v: usize| kb.c(v as i64);
    kb.mul(kb.add(kb.mul(slice, rows), t), c(KC))
}

/// Bytes of `x [rows, inn]` sliced for the packed GEMM.
pub(crate) fn sliced_bytes(rows: usize, inn: usize) -> usize {
    rows * inn.div_ceil(KC) * KC * 4
}

/// Copies the `kn` elements of `src` from `from` on to `dst` from `to` on.
pub(crate) fn copy_f32s<'ctx>(
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
/// epilogue runs. With `pairs` the elements are pairs of bf16 inputs (`bf16`): the
/// panel `[KC / 2, BLOCK]` pairs of weights, `x` its bf16 bits, a k-step two inputs.
#[allow(clippy::too_many_arguments)]
pub(crate) fn lin_packed<'ctx>(
    kb: &Kb<'_, 'ctx>,
    l: &Lin<'ctx, '_>,
    rows: IntValue<'ctx>,
    b0: IntValue<'ctx>,
    b1: IntValue<'ctx>,
    panel: PointerValue<'ctx>,
    xs: Xs<'ctx>,
    transposed: bool,
    pairs: bool,
) {
    let c = |v: usize| kb.c(v as i64);
    // Inputs per k-step, and the type of the elements of `x`'s slices.
    let (ks, xt): (usize, inkwell::types::BasicTypeEnum) =
        if pairs { (2, kb.cx.i16_type().into()) } else { (1, kb.f32t().into()) };
    let nv = BLOCK / VW;
    // Vectors of a register tile's row: the whole block's `nv` where the CPU has 32
    // vector registers (`MR × 4` accumulators); one (two AVX2 registers) where it has 16,
    // so that `MR × 2` accumulators, a column's two halves and a broadcast fit, and the
    // block's columns are then taken a vector at a time.
    let tv = if kb.vector_registers() >= 32 { nv } else { 1 };
    let (inn, n_out) = (l.inn, l.n_out);
    // Bytes per element of the panels (f32) and tiles (bf16).
    let esize = l.wf.bytes(1);
    // Cache lines of a weight row's part of a panel as stored: `KC` inputs of each of
    // `BLOCK` rows, or (`[in, out]`) `BLOCK` outputs of each of `KC` rows.
    let row_lines = if transposed { l.wf.bytes(BLOCK) } else { l.wf.bytes(KC) }.div_ceil(64);
    let lines = match (l.panels || l.tiles, transposed) {
        (true, _) => KC * BLOCK * esize / 64,
        (false, true) => KC * row_lines,
        (false, false) => BLOCK * row_lines,
    };
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
                        let src = (l.x, kb.add(kb.mul(kb.add(r0, t), c(inn)), k0));
                        let dst = (buf, kb.mul(t, c(KC)));
                        if pairs {
                            bf16::copy_bf16s(kb, src, dst, kn)
                        } else {
                            copy_f32s(kb, src, dst, kn)
                        }
                    });
                    buf
                }
                Xs::Sliced(all) => kb.gep(xt, all, slice_at(kb, rows, kblk, r0)),
            };
            kb.for_(b0, b1, |blk| {
                let o0 = kb.mul(blk, c(BLOCK));
                // The block's slice: its panel in place, or packed from the weights.
                let panel = if l.panels {
                    kb.gep(kb.f32t(), l.w, kb.mul(kb.add(kb.mul(blk, c(inn)), k0), c(BLOCK)))
                } else if pairs {
                    bf16::pack_panel_pairs(kb, l.w, &|o, i| l.widx(kb, o, i), (o0, k0, kn), panel);
                    panel
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
                    let (r, line) = (kb.udiv(n, c(row_lines)), kb.urem(n, c(row_lines)));
                    let elem = if transposed {
                        kb.add(kb.mul(kb.add(nk0, r), c(n_out)), no0)
                    } else {
                        kb.add(kb.mul(kb.add(no0, r), c(inn)), nk0)
                    };
                    kb.prefetch_l2(l.w, kb.add(kb.wbyte(elem, l.wf), kb.mul(line, c(64))));
                };
                // Rows `t0..t0 + rn` of the chunk times the block's vectors `v0..v0 + tv`.
                let tile = |t0: IntValue<'ctx>, rn: usize, v0: usize| {
                    let yrow = |r: usize| kb.add(kb.mul(kb.add(kb.add(r0, t0), c(r)), c(n_out)), o0);
                    let col = |k: usize| c((v0 + k % tv) * VW);
                    // The first slice starts from the bias, the others from the sums so far.
                    let init = kb.choose(
                        kb.icmp_eq(kblk, c(0)),
                        || {
                            let bias: Vec<_> = (0..tv)
                                .map(|j| match l.b {
                                    Some(b) => kb.ldv(b, kb.add(o0, col(j))),
                                    None => kb.vzero(),
                                })
                                .collect();
                            (0..rn * tv).map(|k| bias[k % tv].into()).collect()
                        },
                        || (0..rn * tv).map(|k| kb.ldv(l.out, kb.add(yrow(k / tv), col(k))).into()).collect(),
                    );
                    // Inputs `kk..kk + ks`.
                    let k_step = |kk: IntValue<'ctx>, acc: &[BasicValueEnum<'ctx>]| {
                        let prow = kb.udiv(kk, c(ks));
                        let wv: Vec<_> =
                            (0..tv).map(|j| kb.ldv(panel, kb.add(kb.mul(prow, c(BLOCK)), col(j)))).collect();
                        let mut next = Vec::with_capacity(acc.len());
                        for r in 0..rn {
                            let at = kb.add(kb.mul(kb.add(t0, c(r)), c(KC)), kk);
                            // A pair's two bf16 are one 32-bit lane, broadcast like an f32.
                            let xs = kb.splat(kb.load_f32(kb.gep(xt, xs, at)));
                            for (j, wv) in wv.iter().enumerate() {
                                let acc = acc[r * tv + j].into_vector_value();
                                next.push(
                                    if pairs { bf16::dot(kb, acc, xs, *wv) } else { kb.vfma(xs, *wv, acc) }
                                        .into(),
                                );
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
                            if v0 == 0 {
                                let step = kb.add(kb.mul(kb.udiv(t0, c(MR)), c(KC)), kk);
                                prefetch_next(step);
                            }
                            (0..SPREAD)
                                .step_by(ks)
                                .fold(acc.to_vec(), |acc, u| k_step(kb.add(kk, c(u)), &acc))
                        });
                        k_from = kb.mul(groups, c(SPREAD));
                    }
                    let acc = kb.fold(kb.udiv(k_from, c(ks)), kb.udiv(kn, c(ks)), &acc, |s, acc| {
                        k_step(kb.mul(s, c(ks)), acc)
                    });
                    for (k, v) in acc.iter().enumerate() {
                        kb.stv(l.out, kb.add(yrow(k / tv), col(k)), v.into_vector_value());
                    }
                };
                let tiles = |t0: IntValue<'ctx>, rn: usize| {
                    for v0 in (0..nv).step_by(tv) {
                        tile(t0, rn, v0);
                    }
                };
                kb.for_(c(0), kb.div(full, c(MR)), |tt| tiles(kb.mul(tt, c(MR)), MR));
                // The last `rn % MR` rows in tiles of three, two and one: a tile of one
                // row has four accumulators, too few to hide the FMAs' latency.
                let mut t0 = full;
                for size in [3, 2, 1] {
                    let n = kb.div(kb.sub(rn, t0), c(size));
                    let from = t0;
                    kb.for_(c(0), n, |i| tiles(kb.add(from, kb.mul(i, c(size))), size));
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
pub(crate) fn lin_panel_row<'ctx>(
    kb: &Kb<'_, 'ctx>,
    l: &Lin<'ctx, '_>,
    b0: IntValue<'ctx>,
    b1: IntValue<'ctx>,
) {
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
            kb.prefetch_stream(l.w, kb.add(kb.mul(at, c(4)), c(PREFETCH)), BLOCK * 4 / 64);
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
pub(crate) fn pack_panel<'ctx>(
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

pub(crate) fn linear_packed<'ctx>(
    kb: &Kb<'_, 'ctx>,
    k: &Kernel,
    args: &Args<'_, '_, 'ctx>,
    begin: IntValue<'ctx>,
    end: IntValue<'ctx>,
) {
    use Slot::*;
    let c = |v: usize| kb.c(v as i64);
    let p = |s: Slot| args.p(s);
    let Kernel::Linear { inn, out: n_out, bias, read, algo, pairs, .. } = *k else {
        unreachable!("a Linear kernel")
    };

    let (transposed, tiles, panels) = (
        read == WeightRead::Stored { transposed: true },
        read == WeightRead::Tiles,
        read == WeightRead::Panels,
    );
    let (sliced, amx) = match algo {
        LinearAlgo::Amx(a) => (false, Some(a)),
        _ => (algo == LinearAlgo::Packed { sliced: true }, None),
    };
    let (l, rows) = Lin::from_args(args, k);
    let panel = kb.alloca_f32s(KC * BLOCK);
    let xs = if sliced { Xs::Sliced(p(PackedX)) } else { Xs::Copy(kb.alloca_f32s(MC * KC)) };
    // The packed GEMM of column blocks `b0..b1`: on bf16 pairs where they run.
    let packed = |b0: IntValue<'ctx>, b1: IntValue<'ctx>| {
        let gemm = |pairs| lin_packed(kb, &l, rows, b0, b1, panel, xs, transposed, pairs);
        if pairs {
            kb.if_else(bf16::ready(kb), || gemm(true), || gemm(false))
        } else {
            gemm(false)
        }
    };
    if panels {
        // One row (decode) streams each block's panel from end to end.
        return kb.if_else(
            kb.icmp_eq(rows, c(1)),
            || lin_panel_row(kb, &l, begin, end),
            || packed(begin, end),
        );
    }
    let Some(am) = amx else {
        if !transposed
            && !tiles
            && !panels
            && inn % VW == 0
            && FEW_MAX * few_rows_len(l.wf, inn, int8_dots(kb, &l).is_some()) * 4 <= FEW_SCRATCH
        {
            // A few rows (a batched decode step) read the weights as stored, decoding
            // each block once per `FEW` rows instead of converting it to a panel.
            let xp = few_rows_scratch(kb, &l);
            return kb.if_else(
                kb.icmp_lt(rows, c(FEW_MAX + 1)),
                || lin_few_rows(kb, &l, rows, begin, end, xp),
                || packed(begin, end),
            );
        }
        return packed(begin, end);
    };
    // A task is `amx::groups` blocks (the last one maybe fewer).
    let gr = amx::groups(inn, n_out, am.parts);
    let blocks = |task: IntValue<'ctx>, f: &dyn Fn(IntValue<'ctx>)| {
        let b0 = kb.mul(task, c(gr));
        kb.for_(b0, kb.min(kb.add(b0, c(gr)), c(n_out / BLOCK)), |blk| f(kb.mul(blk, c(BLOCK))));
    };
    // The epilogue goes with each tile as it is written out when it vectorises (all
    // but exact gelu), else over the output afterwards.
    let fused = epilogue_vectorises(l.epi);
    let tiles = amx::gemm_fn(
        kb.cx,
        kb.m,
        &format!("tfc_k_{}_tiles", k.symbol()),
        &amx::Shape { inn, n_out, transposed, bias, tiles, amx: am },
        if fused { l.epi } else { &[] },
    );
    let mut call: Vec<inkwell::values::BasicMetadataValueEnum> = vec![p(PackedX).into(), l.w.into()];
    if let Some(b) = l.b {
        call.push(b.into());
    }
    call.push(if am.to_tiles { p(PackedOut) } else { l.out }.into());
    if fused {
        call.extend(l.others.iter().map(|&o| inkwell::values::BasicMetadataValueEnum::from(o)));
    }
    call.extend::<[inkwell::values::BasicMetadataValueEnum; 3]>([rows.into(), begin.into(), end.into()]);
    let done = kb.b.build_call(tiles, &call, "").unwrap().try_as_basic_value().basic().unwrap();
    kb.if_else(
        done.into_int_value(),
        || {
            if fused {
                return;
            }
            kb.for_(begin, end, |task| {
                blocks(task, &|o0| kb.for_(c(0), rows, |t| epilogue(kb, &l, t, o0, kb.add(o0, c(BLOCK)))))
            })
        },
        || {
            kb.for_(begin, end, |task| {
                let b0 = kb.mul(task, c(gr));
                let b1 = kb.min(kb.add(b0, c(gr)), c(n_out / BLOCK));
                packed(b0, b1)
            })
        },
    );
}

/// Rows per pass of the few-row products (`lin_few_rows`) where the CPU has 32 vector
/// registers, half that with 16 (AVX2): their accumulators (up to four vectors a row)
/// and a step's decoded weights fit in the registers. (Eight rows a pass ran SmolLM2's
/// Q4_1 batched steps no faster than four, on the AMD host.)
pub(crate) const FEW: usize = 4;

/// The most rows of a linear map over run-time rows on `[out, in]` weights as stored that
/// take the few-row products rather than the packed GEMM. The packed GEMM converts each
/// block of the weights into an f32 panel, paid once per call whatever the rows, so it
/// loses for a few rows; the few-row products do a row's FMAs at the one-row rate, so
/// they lose for many. `tfc bench --batch` on the AMD host, batched decode tok/s, few-row
/// against packed: at 8 rows llama-0.85b q8 70 vs 46, q4_k 71 vs 32, q6_k 61 vs 41;
/// at 16 rows 71 vs 74, 60 vs 55, 62 vs 62; SmolLM2-135M Q4_1 at 32 rows 404 vs 371.
pub(crate) const FEW_MAX: usize = 4 * FEW;

/// The most stack `lin_few_rows` takes for its scratch: bf16 maps of more than 4096
/// inputs (whose rows it would hold permuted) take the packed GEMM instead.
const FEW_SCRATCH: usize = 256 << 10;

/// Whether linear map `l` multiplies as integers on this CPU (`int8`): `Q4_K` weights as
/// stored, a `round_q8`'d input.
fn int8_dots(kb: &Kb<'_, '_>, l: &Lin<'_, '_>) -> Option<Int8Dots> {
    let q4k = l.wf == WFmt::Quant(Quant::Q4_K);
    (l.q8x && q4k && !l.tiles && !l.panels && l.inn % 256 == 0).then(|| kb.int8_dots()).flatten()
}

/// Floats per row of what `lin_dot_row` reads besides `x`: bf16 weights' permuted rows,
/// block formats' sums per block, or the integers and scales of integer products (room
/// for either where the fallback copy takes the sums).
fn few_rows_len(wf: WFmt, inn: usize, int8: bool) -> usize {
    match wf {
        WFmt::Bf16 => permuted_len(inn),
        WFmt::Quant(q) => q4_sums(q, inn).max(if int8 { q8x_len(inn) } else { 0 }),
        _ => 0,
    }
}

/// Scratch for `lin_few_rows`: `FEW_MAX` rows of `few_rows_len`.
fn few_rows_scratch<'ctx>(kb: &Kb<'_, 'ctx>, l: &Lin<'ctx, '_>) -> Option<PointerValue<'ctx>> {
    let len = few_rows_len(l.wf, l.inn, int8_dots(kb, l).is_some());
    (len > 0).then(|| kb.alloca_f32s(FEW_MAX * len))
}

/// What a row of block weights' products reads besides `x`, at `xp`: the integers and
/// scales of integer products (`int8`) where they run, else the sums per block.
fn row_scratch<'ctx>(
    kb: &Kb<'_, 'ctx>,
    l: &Lin<'ctx, '_>,
    int8: Option<Int8Dots>,
    xrow: IntValue<'ctx>,
    q: Quant,
    xp: PointerValue<'ctx>,
) {
    match int8 {
        Some(dots) => kb.if_else(
            ready(kb, dots),
            || q8x_row(kb, l.x, xrow, l.inn, xp),
            || q4_block_sums(kb, l.x, xrow, l.inn, q, xp),
        ),
        None => q4_block_sums(kb, l.x, xrow, l.inn, q, xp),
    }
}

/// All `rows` (at most `FEW_MAX`) times `W [out, in]` as stored, column blocks
/// `begin..end`: every row's scratch (`xp`) first, then block by block, passes of `FEW`
/// rows (fewer with 16 vector registers) and of the rest's binary digits, each running
/// `lin_dot_row` over the block, then the epilogue. A block's weights (64 outputs) stay
/// in cache from its first pass to its last, so a step reads them from memory once for
/// all the rows.
fn lin_few_rows<'ctx>(
    kb: &Kb<'_, 'ctx>,
    l: &Lin<'ctx, '_>,
    rows: IntValue<'ctx>,
    begin: IntValue<'ctx>,
    end: IntValue<'ctx>,
    xp: Option<PointerValue<'ctx>>,
) {
    let c = |v: usize| kb.c(v as i64);
    let inn = l.inn;
    let few = if kb.vector_registers() >= 32 { FEW } else { FEW / 2 };
    // Each row's scratch, `len` floats apart.
    let int8 = int8_dots(kb, l);
    let len = few_rows_len(l.wf, inn, int8.is_some());
    kb.for_(c(0), rows, |t| {
        let xrow = kb.mul(t, c(inn));
        let at = |xp: PointerValue<'ctx>| kb.gep(kb.f32t(), xp, kb.mul(t, c(len)));
        match (l.wf, xp) {
            (WFmt::Bf16, Some(xp)) => permute_pairs(kb, l.x, xrow, len, at(xp)),
            (WFmt::Quant(q), Some(xp)) => row_scratch(kb, l, int8, xrow, q, at(xp)),
            _ => {}
        }
    });
    kb.for_(begin, end, |blk| {
        let o0 = kb.mul(blk, c(BLOCK));
        let o1 = kb.min(kb.add(o0, c(BLOCK)), c(l.n_out));
        let pass = |t: IntValue<'ctx>, rn: usize| {
            let xp = xp.map(|xp| kb.gep(kb.f32t(), xp, kb.mul(t, c(len))));
            lin_dot_row(kb, l, t, rn, o0, o1, xp);
        };
        let full = kb.div(rows, c(few));
        kb.for_(c(0), full, |p| pass(kb.mul(p, c(few)), few));
        // The rest by its binary digits: a pass of `n` rows where it has `n`, after the
        // rows of the larger digits.
        let rest = kb.sub(rows, kb.mul(full, c(few)));
        let mut n = few / 2;
        while n > 0 {
            let below = kb.urem(rest, c(2 * n));
            let t = kb.sub(rows, below);
            kb.if_(kb.icmp_ge(below, c(n)), || pass(t, n));
            n /= 2;
        }
        kb.for_(c(0), rows, |t| epilogue(kb, l, t, o0, o1));
    });
}

pub(crate) fn slice_rows<'ctx>(
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
    let Kernel::SliceRows { inn, pairs } = *k else { unreachable!("a SliceRows kernel") };

    let (x, out, rows) = (p(X), p(Out), a(Rows));
    let slices = |pairs: bool| {
        kb.for_(begin, end, |t| {
            kb.for_(c(0), c(inn.div_ceil(KC)), |s| {
                let k0 = kb.mul(s, c(KC));
                let kn = kb.min(c(KC), kb.sub(c(inn), k0));
                let (src, dst) = ((x, kb.add(kb.mul(t, c(inn)), k0)), (out, slice_at(kb, rows, s, t)));
                if pairs {
                    bf16::copy_bf16s(kb, src, dst, kn)
                } else {
                    copy_f32s(kb, src, dst, kn)
                }
            });
        })
    };
    // As the linear maps reading them take pairs or not (`linear_packed`).
    if pairs {
        kb.if_else(bf16::ready(kb), || slices(true), || slices(false))
    } else {
        slices(false)
    }
}

pub(crate) fn amx_pack<'ctx>(
    kb: &Kb<'_, 'ctx>,
    k: &Kernel,
    args: &Args<'_, '_, 'ctx>,
    begin: IntValue<'ctx>,
    end: IntValue<'ctx>,
) {
    use Slot::*;
    let a = |s: Slot| args.i(s);
    let p = |s: Slot| args.p(s);
    let Kernel::AmxPack { inn, transposed, parts } = *k else { unreachable!("a AmxPack kernel") };

    amx::pack_x(kb, inn, transposed, parts, (p(X), p(Out), a(Rows)), begin, end)
}

pub(crate) fn linear_dots<'ctx>(
    kb: &Kb<'_, 'ctx>,
    k: &Kernel,
    args: &Args<'_, '_, 'ctx>,
    begin: IntValue<'ctx>,
    end: IntValue<'ctx>,
) {
    let c = |v: usize| kb.c(v as i64);
    let Kernel::Linear { inn, out: n_out, wf, read, .. } = *k else { unreachable!("a Linear kernel") };

    debug_assert!(tiled(inn, read == WeightRead::Stored { transposed: true }));
    let tiles = read == WeightRead::Tiles;
    let (l, rows) = Lin::from_args(args, k);
    // A one-row product of bf16 weights reads them as even and odd lanes: those
    // in tiles all of them, others those of whole steps of `DOT`.
    let permuted = if tiles { inn } else { inn / DOT * DOT };
    // A one-row product of block weights with offsets reads the sums of `x` per block.
    let int8 = int8_dots(kb, &l);
    let sums = match wf {
        WFmt::Quant(q) => q4_sums(q, inn).max(if int8.is_some() { q8x_len(inn) } else { 0 }),
        _ => 0,
    };
    let xp = match wf {
        WFmt::Bf16 if permuted > 0 => Some(kb.alloca_f32s(permuted)),
        WFmt::Quant(_) if sums > 0 => Some(kb.alloca_f32s(sums)),
        _ => None,
    };
    // Rows in tiles of ROWS, then the rest one by one (decode's one row), each
    // prepared once for all of the task's blocks.
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
        match (wf, xp) {
            (WFmt::Bf16, Some(xp)) => permute_pairs(kb, l.x, kb.mul(t, c(inn)), permuted, xp),
            (WFmt::Quant(q), Some(xp)) => row_scratch(kb, &l, int8, kb.mul(t, c(inn)), q, xp),
            _ => {}
        }
        blocks(t, 1)
    });
}

pub(crate) fn linear_loops<'ctx>(
    kb: &Kb<'_, 'ctx>,
    k: &Kernel,
    args: &Args<'_, '_, 'ctx>,
    begin: IntValue<'ctx>,
    end: IntValue<'ctx>,
) {
    let c = |v: usize| kb.c(v as i64);
    let Kernel::Linear { inn, out: n_out, read, .. } = *k else { unreachable!("a Linear kernel") };

    assert!(read != WeightRead::Tiles, "bug: tiled weights take the vectorised kernels");
    let transposed = read == WeightRead::Stored { transposed: true };
    let (l, rows) = Lin::from_args(args, k);
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
                        let v = kb.fadd(kb.ld(out, at), kb.fmul(xv, kb.ldw(w, kb.add(wrow, o), l.wf)));
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

pub(crate) fn gemv_partial_kernel<'ctx>(
    kb: &Kb<'_, 'ctx>,
    k: &Kernel,
    args: &Args<'_, '_, 'ctx>,
    begin: IntValue<'ctx>,
    end: IntValue<'ctx>,
) {
    let Kernel::GemvPartial { inn, out: n_out, chunks, wf } = *k else {
        unreachable!("a GemvPartial kernel")
    };

    gemv_partial(kb, inn, n_out, chunks, wf, args, begin, end)
}

pub(crate) fn gemv_reduce<'ctx>(
    kb: &Kb<'_, 'ctx>,
    k: &Kernel,
    args: &Args<'_, '_, 'ctx>,
    begin: IntValue<'ctx>,
    end: IntValue<'ctx>,
) {
    use Slot::*;
    let c = |v: usize| kb.c(v as i64);
    let p = |s: Slot| args.p(s);
    let Kernel::GemvReduce { out: n_out, chunks, ref epi, pairs, .. } = *k else {
        unreachable!("a GemvReduce kernel")
    };

    let part = p(Partials);
    let (b, out) = (args.opt_p(Bias), p(Out));
    let n_others = epi.iter().filter(|e| matches!(e, Epi::Add | Epi::Mul)).count();
    let others = (0..n_others).map(|k| p(Other(k))).collect();
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
        q8x: false,
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

/// Input rows per pass of `gemv_partial` over its partial sums: each partial vector is
/// loaded and stored once per `GEMV_ROWS` weight rows.
pub(crate) const GEMV_ROWS: usize = 4;

/// One row times `W [in, out]`, split over `in` into `chunks` bands (`GemvPartial`): task
/// `ch` adds rows `i0..i1` of `W`, scaled by `x[i]`, into its partial row. The band is
/// one contiguous stream, read `GEMV_ROWS` rows at a time and prefetched that many rows
/// ahead. bf16 rows are read as even and odd lanes, so each group of 32 partials holds
/// its even outputs and then its odd ones (`GemvReduce { pairs }` puts them back).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemv_partial<'ctx>(
    kb: &Kb<'_, 'ctx>,
    inn: usize,
    n_out: usize,
    chunks: usize,
    wf: WFmt,
    args: &Args<'_, '_, 'ctx>,
    begin: IntValue<'ctx>,
    end: IntValue<'ctx>,
) {
    let c = |v: usize| kb.c(v as i64);
    let (x, w, part) = (args.p(Slot::X), args.p(Slot::W), args.p(Slot::Partials));
    let block_bytes = wf.bytes(BLOCK);
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
                    let ahead = kb.wbyte(kb.add(wi, c(GEMV_ROWS * n_out)), wf);
                    kb.prefetch_stream(w, ahead, block_bytes.div_ceil(64));
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
                        WFmt::F32 | WFmt::Quant(_) => {
                            let xv = kb.splat(xr);
                            for (j, a) in acc.iter_mut().enumerate() {
                                *a = kb.vfma(xv, kb.ldvw(w, kb.add(wi, c(j * VW)), wf), *a);
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
