//! bf16 pair products for the packed GEMM (`vdpbf16ps`, AVX512_BF16): bf16 weights times
//! `round_bf16`'d activations (`activations = bf16`), on CPUs without AMX or with AMX
//! off. Each 32-bit lane multiplies two bf16 weights by two bf16 activations and adds
//! both products to an f32 sum; a bf16 × bf16 product is exact in f32, so this is the f32
//! product of the same values summed in another order, at twice the inputs per
//! instruction of widening the weights to f32 for `vfmadd`.
//!
//! The GEMM is the f32 one with pairs for elements (`linear::lin_packed`): the panel of
//! a column block holds, per pair of inputs, the 64 outputs' two weights
//! (`pack_panel_pairs`: 16 × 16 transposes of 32-bit pairs, which a row of the tile
//! layout or of `[out, in]` holds contiguously), and the activations are their bf16 bits
//! in the f32 slices' layout (`copy_bf16s`: a pair of inputs is one 32-bit broadcast).
//! Since the input is rounded to bf16 already, taking each value's high half is exact.
//!
//! With f32 activations the weights stay widened to f32 for `vfmadd`: splitting each
//! activation into three bf16 parts (as the AMX GEMM does, to keep the exact f32 product)
//! would take three pair products per two inputs, against two FMAs.
//!
//! The instructions are in wrapper functions marked as `amx::ATTR` marks the tile
//! instructions, with a marked `tfc_bf16.ready` that says whether the C half allows them
//! (`tfc__bf16_ok`: `TFC_BF16_DOTS=0` turns them off, for testing the f32 path): the
//! fallback copy of a library for baseline x86-64 replaces them with stubs returning
//! zero, so there the kernels take the f32 path.

use inkwell::types::VectorType;
use inkwell::values::{BasicValue, FunctionValue, IntValue, PointerValue, VectorValue};

use super::WeightRead;
use crate::backend::llvm::kb::{Kb, WFmt, VW};
use crate::backend::weights::BLOCK;

const WRAPPERS: &str = r#"
@tfc__bf16_ok = external hidden global i32
declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>, <32 x bfloat>)
define <16 x float> @tfc_bf16.dot(<16 x float> %c, <16 x float> %a, <16 x float> %b) #0 {
  %a2 = bitcast <16 x float> %a to <32 x bfloat>
  %b2 = bitcast <16 x float> %b to <32 x bfloat>
  %r = call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> %c, <32 x bfloat> %a2, <32 x bfloat> %b2)
  ret <16 x float> %r
}
define i1 @tfc_bf16.ready() #0 {
  %v = load i32, ptr @tfc__bf16_ok
  %r = icmp ne i32 %v, 0
  ret i1 %r
}
attributes #0 = { alwaysinline nounwind "tfc-amx" }
"#;

/// Inputs per panel transpose: a row of the tile layout, 16 pairs.
const PAIRS_IN: usize = 2 * VW;

/// Whether a linear map multiplies bf16 pairs in its packed GEMM: the CPU has them, the
/// weights are bf16 read as `[out, in]` (in tiles or as stored) in whole 32s of inputs,
/// and its input is rounded to bf16.
pub(crate) fn multiplies_pairs(
    kb: &Kb<'_, '_>,
    wf: WFmt,
    read: WeightRead,
    bf16_input: bool,
    inn: usize,
) -> bool {
    kb.bf16_dots()
        && wf == WFmt::Bf16
        && bf16_input
        && read != (WeightRead::Stored { transposed: true })
        && inn % PAIRS_IN == 0
}

/// The wrapper `name`, linked into the module on first use.
fn wrapper<'ctx>(kb: &Kb<'_, 'ctx>, name: &str) -> FunctionValue<'ctx> {
    kb.linked(WRAPPERS, &["tfc_bf16.dot", "tfc_bf16.ready"], name)
}

/// Whether the pair products run here: as the C half says, but false in the fallback copy.
pub(crate) fn ready<'ctx>(kb: &Kb<'_, 'ctx>) -> IntValue<'ctx> {
    let f = wrapper(kb, "tfc_bf16.ready");
    kb.b.build_call(f, &[], "").unwrap().try_as_basic_value().basic().unwrap().into_int_value()
}

/// `acc + a · b` per 32-bit lane, `a` and `b` each holding two bf16 (as `<VW x float>`
/// bits): the lane's two products added to its f32 sum.
pub(crate) fn dot<'ctx>(
    kb: &Kb<'_, 'ctx>,
    acc: VectorValue<'ctx>,
    a: VectorValue<'ctx>,
    b: VectorValue<'ctx>,
) -> VectorValue<'ctx> {
    let f = wrapper(kb, "tfc_bf16.dot");
    let r = kb.b.build_call(f, &[acc.into(), a.into(), b.into()], "").unwrap();
    r.try_as_basic_value().basic().unwrap().into_vector_value()
}

/// The bf16 bits of the `kn` f32 values of `src` from `from` on, written to `dst` (bf16
/// elements) from `to` on: each value's high half, exact for values rounded to bf16.
pub(crate) fn copy_bf16s<'ctx>(
    kb: &Kb<'_, 'ctx>,
    (src, from): (PointerValue<'ctx>, IntValue<'ctx>),
    (dst, to): (PointerValue<'ctx>, IntValue<'ctx>),
    kn: IntValue<'ctx>,
) {
    let c = |v: usize| kb.c(v as i64);
    let (i16t, i32t) = (kb.cx.i16_type(), kb.cx.i32_type());
    let store = |at: IntValue<'ctx>, v: inkwell::values::BasicValueEnum<'ctx>| {
        let st = kb.b.build_store(kb.gep(i16t, dst, kb.add(to, at)), v).unwrap();
        st.set_alignment(2).unwrap();
    };
    let (i32v, i16v) = (i32t.vec_type(VW as u32), i16t.vec_type(VW as u32));
    let sixteen = VectorType::const_vector(&[i32t.const_int(16, false); VW]);
    kb.for_(c(0), kb.div(kn, c(VW)), |s| {
        let at = kb.mul(s, c(VW));
        let bits = kb.b.build_bit_cast(kb.ldv(src, kb.add(from, at)), i32v, "").unwrap().into_vector_value();
        let high = kb.b.build_right_shift(bits, sixteen, false, "").unwrap();
        store(at, kb.b.build_int_truncate(high, i16v, "").unwrap().into());
    });
    kb.for_(kb.mul(kb.div(kn, c(VW)), c(VW)), kn, |k| {
        let bits = kb.b.build_bit_cast(kb.ld(src, kb.add(from, k)), i32t, "").unwrap().into_int_value();
        let high = kb.b.build_right_shift(bits, i32t.const_int(16, false), false, "").unwrap();
        store(k, kb.b.build_int_truncate(high, i16t, "").unwrap().into());
    });
}

/// Packs the weights of outputs `o0..o0 + BLOCK`, inputs `k0..k0 + kn` (a multiple of 32)
/// into `panel` as pairs: `[kn / 2, BLOCK]` 32-bit lanes, lane `(p, j)` holding output
/// `o0 + j`'s weights `k0 + 2p` and `k0 + 2p + 1`. `widx` is where `W [out, in]`'s element
/// `(o, i)` lies, the 32 inputs of a row from a multiple of 32 on being contiguous (as in
/// the tile layout and as stored).
pub(crate) fn pack_panel_pairs<'ctx>(
    kb: &Kb<'_, 'ctx>,
    w: PointerValue<'ctx>,
    widx: &dyn Fn(IntValue<'ctx>, IntValue<'ctx>) -> IntValue<'ctx>,
    (o0, k0, kn): (IntValue<'ctx>, IntValue<'ctx>, IntValue<'ctx>),
    panel: PointerValue<'ctx>,
) {
    let c = |v: usize| kb.c(v as i64);
    for jb in 0..BLOCK / VW {
        kb.for_(c(0), kb.udiv(kn, c(PAIRS_IN)), |g| {
            let k = kb.add(k0, kb.mul(g, c(PAIRS_IN)));
            // VW outputs' 32 inputs as VW rows of VW pairs, transposed: VW panel rows.
            let rows = (0..VW)
                .map(|r| {
                    let p = kb.gep(kb.cx.i16_type(), w, widx(kb.add(o0, c(jb * VW + r)), k));
                    let v = kb.b.build_load(kb.vt(), p, "").unwrap();
                    v.as_instruction_value().unwrap().set_alignment(2).unwrap();
                    v.into_vector_value()
                })
                .collect();
            for (p, v) in kb.transpose(rows).into_iter().enumerate() {
                let row = kb.add(kb.mul(g, c(VW)), c(p));
                kb.stv(panel, kb.add(kb.mul(row, c(BLOCK)), c(jb * VW)), v);
            }
        });
    }
}
