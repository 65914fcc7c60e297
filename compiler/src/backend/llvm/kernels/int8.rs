//! Integer products of `Q4_K` weights with `round_q8`'d activations (`activations = q8`),
//! as llama.cpp makes its K-quant products, but with the activations' rounding the
//! interpreter defines (`interp::round_q8`: 32 values per scale `max |x| / 127`).
//!
//! A row's integers are recovered from its values (rounding them again gives the same
//! integers, and a scale within an ulp or two of the first), once per
//! row for every output of a task (`q8x_row`), the 32s of each super-block reordered to
//! meet the nibbles: a super-block's 128 bytes hold its 32s 0 and 1 in the low and high
//! nibbles of bytes 0..32, 2 and 3 of 32..64, and so on, so the 64 bytes from 0 and from
//! 64 read as low nibbles are the 32s (0, 2) and (4, 6), as high ones (1, 3) and (5, 7).
//! Each 64 nibbles meet 64 integers of `x` in one `vpdpbusd` (unsigned × signed bytes,
//! four products summed per 32-bit lane; `pmaddubsw` and `pmaddwd` without VNNI, exact
//! since a nibble times an integer of `round_q8` is at most 15 · 127), eight lanes per
//! 32; the lanes are scaled by `d · sc · dx` of their 32 (`dx` the activations' scale) and
//! summed in f32. The offset
//! term `-dmin · m · Σ x` takes each 32's sum, made with its integers.
//!
//! The instructions are in wrapper functions marked as `amx::ATTR` marks the tile
//! instructions, with a marked `tfc_i8.ready` that says true: the fallback copy of a
//! library for baseline x86-64 replaces them with stubs returning zero, so there the
//! kernels take the f32 products of the same values.

use inkwell::types::VectorType;
use inkwell::values::BasicValue;
use inkwell::values::{BasicMetadataValueEnum, FunctionValue, IntValue, PointerValue, VectorValue};

use super::PREFETCH;
use crate::backend::llvm::kb::{Int8Dots, Kb, VW};

const VNNI: &str = r#"
declare <16 x i32> @llvm.x86.avx512.vpdpbusd.512(<16 x i32>, <16 x i32>, <16 x i32>)
define <16 x i32> @tfc_i8.dot(<16 x i32> %a, <16 x i32> %b) #0 {
  %r = call <16 x i32> @llvm.x86.avx512.vpdpbusd.512(<16 x i32> zeroinitializer, <16 x i32> %a, <16 x i32> %b)
  ret <16 x i32> %r
}
define i1 @tfc_i8.ready() #0 {
  ret i1 true
}
attributes #0 = { alwaysinline nounwind "tfc-amx" }
"#;

const BW: &str = r#"
declare <32 x i16> @llvm.x86.avx512.pmaddubs.w.512(<64 x i8>, <64 x i8>)
declare <16 x i32> @llvm.x86.avx512.pmaddw.d.512(<32 x i16>, <32 x i16>)
define <16 x i32> @tfc_i8.dot(<16 x i32> %a, <16 x i32> %b) #0 {
  %a8 = bitcast <16 x i32> %a to <64 x i8>
  %b8 = bitcast <16 x i32> %b to <64 x i8>
  %p = call <32 x i16> @llvm.x86.avx512.pmaddubs.w.512(<64 x i8> %a8, <64 x i8> %b8)
  %r = call <16 x i32> @llvm.x86.avx512.pmaddw.d.512(<32 x i16> %p, <32 x i16> splat (i16 1))
  ret <16 x i32> %r
}
define i1 @tfc_i8.ready() #0 {
  ret i1 true
}
attributes #0 = { alwaysinline nounwind "tfc-amx" }
"#;

/// The wrapper `name` (`tfc_i8.dot` or `tfc_i8.ready`), linked into the module on first use.
fn wrapper<'ctx>(kb: &Kb<'_, 'ctx>, dots: Int8Dots, name: &str) -> FunctionValue<'ctx> {
    let text = match dots {
        Int8Dots::Vnni => VNNI,
        Int8Dots::Bw => BW,
    };
    kb.linked(text, &["tfc_i8.dot", "tfc_i8.ready"], name)
}

/// Whether the integer products run here: true, but false in the fallback copy.
pub(crate) fn ready<'ctx>(kb: &Kb<'_, 'ctx>, dots: Int8Dots) -> IntValue<'ctx> {
    let f = wrapper(kb, dots, "tfc_i8.ready");
    kb.b.build_call(f, &[], "").unwrap().try_as_basic_value().basic().unwrap().into_int_value()
}

/// Floats of one row's scratch: its `inn` integers (a quarter as many floats), then per
/// super-block a vector of the eight 32s' scales `dx` and their sums `Σ x` (`dx · Σ q`).
pub(crate) fn q8x_len(inn: usize) -> usize {
    inn / 4 + inn / 256 * VW
}

/// Where the 32 `j` of a super-block lies in a row's integers (`q8x_row`): 0, 2, 1, 3,
/// 4, 6, 5, 7 in order.
fn position(j: usize) -> usize {
    [0, 2, 1, 3, 4, 6, 5, 7][j]
}

/// `x[xrow..xrow + inn]`, `round_q8`'d, as the integers and scales `lin_q4k_i8_row`
/// reads, into `s` (`q8x_len` floats). A block holding an infinity or NaN gets a NaN
/// scale, so the products it meets are NaN as the f32 products would be.
pub(crate) fn q8x_row<'ctx>(
    kb: &Kb<'_, 'ctx>,
    x: PointerValue<'ctx>,
    xrow: IntValue<'ctx>,
    inn: usize,
    s: PointerValue<'ctx>,
) {
    let c = |v: usize| kb.c(v as i64);
    let (i8t, i32t) = (kb.cx.i8_type(), kb.cx.i32_type());
    let (i8v, i32v) = (i8t.vec_type(VW as u32), i32t.vec_type(VW as u32));
    let xs = kb.gep(kb.f32t(), s, c(inn / 4));
    let roundeven = inkwell::intrinsics::Intrinsic::find("llvm.roundeven")
        .unwrap()
        .get_declaration(kb.m, &[kb.vt().into()])
        .unwrap();
    let umax = inkwell::intrinsics::Intrinsic::find("llvm.vector.reduce.umax")
        .unwrap()
        .get_declaration(kb.m, &[i32v.into()])
        .unwrap();
    let add = inkwell::intrinsics::Intrinsic::find("llvm.vector.reduce.add")
        .unwrap()
        .get_declaration(kb.m, &[i32v.into()])
        .unwrap();
    let call = |f: FunctionValue<'ctx>, v: VectorValue<'ctx>| {
        kb.b.build_call(f, &[v.into()], "").unwrap().try_as_basic_value().basic().unwrap()
    };
    let magnitude = VectorType::const_vector(&[i32t.const_int(0x7fff_ffff, false); VW]);
    kb.for_(c(0), c(inn / 256), |sb| {
        for j in 0..8 {
            let at = kb.add(xrow, kb.add(kb.mul(sb, c(256)), c(32 * j)));
            let v = [kb.ldv(x, at), kb.ldv(x, kb.add(at, c(VW)))];
            let bits = v.map(|v| {
                let b = kb.b.build_bit_cast(v, i32v, "").unwrap().into_vector_value();
                kb.b.build_and(b, magnitude, "").unwrap()
            });
            let m = kb.b.build_int_compare(inkwell::IntPredicate::UGT, bits[0], bits[1], "").unwrap();
            let m = kb.b.build_select(m, bits[0], bits[1], "").unwrap().into_vector_value();
            let amax = call(umax, m).into_int_value();
            let amax = kb.b.build_int_z_extend(amax, kb.i64t(), "").unwrap();
            let (d, inv, finite) = kb.q8_act_scale_of(amax);
            let d = kb.b.build_select(finite, d, kb.fc(f64::NAN), "").unwrap().into_float_value();
            let q = v.map(|v| {
                let r = call(roundeven, kb.vmul(v, kb.splat(inv))).into_vector_value();
                kb.b.build_float_to_signed_int(r, i32v, "").unwrap()
            });
            let to = kb.add(kb.mul(sb, c(256)), c(32 * position(j)));
            for (h, q) in q.iter().enumerate() {
                let b = kb.b.build_int_truncate(*q, i8v, "").unwrap();
                let p = kb.gep(i8t, s, kb.add(to, c(h * VW)));
                let st = kb.b.build_store(p, b).unwrap();
                let _ = st.set_alignment(1);
            }
            let sum = call(add, kb.b.build_int_add(q[0], q[1], "").unwrap()).into_int_value();
            let sum = kb.b.build_signed_int_to_float(sum, kb.f32t(), "").unwrap();
            let base = kb.mul(sb, c(VW));
            kb.st(xs, kb.add(base, c(j)), d);
            kb.st(xs, kb.add(base, c(8 + j)), kb.fmul(sum, d));
        }
    });
}

/// Rows `t..t + rn` of `in` inputs times `Q4_K` weights `w [out, in]` as stored, outputs
/// `o0..o1`, each sum handed to `store(row, output, sum)`; the rows' integers and scales
/// from `s` on (`q8x_row`, `q8x_len` floats apart): one output's row of super-blocks at a
/// time, prefetched `PREFETCH` ahead, each super-block's nibbles unpacked once for all
/// the rows.
#[allow(clippy::too_many_arguments)]
pub(crate) fn lin_q4k_i8_row<'ctx>(
    kb: &Kb<'_, 'ctx>,
    w: PointerValue<'ctx>,
    inn: usize,
    dots: Int8Dots,
    t: IntValue<'ctx>,
    rn: usize,
    o0: IntValue<'ctx>,
    o1: IntValue<'ctx>,
    s: PointerValue<'ctx>,
    store: impl Fn(IntValue<'ctx>, IntValue<'ctx>, inkwell::values::FloatValue<'ctx>),
) {
    let c = |v: usize| kb.c(v as i64);
    let (size, len) = (144, q8x_len(inn));
    let row_bytes = inn / 256 * size;
    let (i8t, i32t) = (kb.cx.i8_type(), kb.cx.i32_type());
    let (i8v64, i32v) = (i8t.vec_type(64), i32t.vec_type(VW as u32));
    let dot = wrapper(kb, dots, "tfc_i8.dot");
    let ld64 = |base: PointerValue<'ctx>, at: IntValue<'ctx>| {
        let v = kb.b.build_load(i8v64, kb.gep(i8t, base, at), "").unwrap().into_vector_value();
        let _ = v.as_instruction_value().unwrap().set_alignment(1);
        v
    };
    let as_i32 = |v: VectorValue<'ctx>| kb.b.build_bit_cast(v, i32v, "").unwrap();
    let fifteen = VectorType::const_vector(&[i8t.const_int(15, false); 64]);
    let four = VectorType::const_vector(&[i8t.const_int(4, false); 64]);
    // Row `t + r`'s integers (bytes from `s`) and its scales and sums (floats), `s`
    // being row `t`'s.
    let rows: Vec<_> = (0..rn).map(|r| (c(4 * r * len), c(r * len + inn / 4))).collect();
    kb.for_(o0, o1, |o| {
        let wrow = kb.mul(o, c(row_bytes));
        let init: Vec<_> = (0..5 * rn).map(|_| kb.vzero().into()).collect();
        let acc = kb.fold(c(0), c(inn / 256), &init, |sb, acc| {
            let at = kb.add(wrow, kb.mul(sb, c(size)));
            kb.prefetch_stream(w, kb.add(at, c(PREFETCH)), size.div_ceil(64));
            let scales = kb.q4k_scales(w, at);
            let nibbles: Vec<_> = (0..2)
                .flat_map(|k| {
                    let v = ld64(w, kb.add(at, c(16 + 64 * k)));
                    let lo = kb.b.build_and(v, fifteen, "").unwrap();
                    let hi = kb.b.build_right_shift(v, four, false, "").unwrap();
                    [as_i32(lo), as_i32(hi)]
                })
                .collect();
            let mut next = Vec::with_capacity(acc.len());
            for (r, &(qr, xr)) in rows.iter().enumerate() {
                let acc = &acc[5 * r..5 * r + 5];
                // Lanes 0..8: `d·sc·dx` of each 32; 8..16: `-dmin·m·Σx`.
                let sx = kb.vmul(scales, kb.ldv(s, kb.add(xr, kb.mul(sb, c(VW)))));
                for (h, nib) in nibbles.iter().enumerate() {
                    // The 64 integers at 64·h of the super-block: the 32s (a, b) of
                    // `position` 2h and 2h + 1.
                    let xq = ld64(s, kb.add(qr, kb.add(kb.mul(sb, c(256)), c(64 * h))));
                    let args: [BasicMetadataValueEnum; 2] = [(*nib).into(), as_i32(xq).into()];
                    let d = kb.b.build_call(dot, &args, "").unwrap();
                    let d = d.try_as_basic_value().basic().unwrap().into_vector_value();
                    let d = kb.b.build_signed_int_to_float(d, kb.vt(), "").unwrap();
                    let (a, b) = ([0, 1, 4, 5][h], [2, 3, 6, 7][h]);
                    let lanes: Vec<u32> = (0..VW as u32).map(|l| if l < 8 { a } else { b }).collect();
                    let scale = kb.shuffle(sx, sx, &lanes);
                    next.push(kb.vfma(d, scale, acc[h].into_vector_value()).into());
                }
                next.push(kb.vadd(sx, acc[4].into_vector_value()).into());
            }
            next
        });
        for r in 0..rn {
            let a = |i: usize| acc[5 * r + i].into_vector_value();
            let sums = kb.vadd(kb.vadd(a(0), a(1)), kb.vadd(a(2), a(3)));
            // The offset terms are the upper lanes of the last accumulator.
            let upper: Vec<u32> = (0..VW as u32).map(|l| if l < 8 { VW as u32 } else { l }).collect();
            let offsets = kb.shuffle(a(4), kb.vzero(), &upper);
            let v = kb.vsum(kb.vadd(sums, offsets));
            store(kb.add(t, c(r)), o, v);
        }
    });
}
