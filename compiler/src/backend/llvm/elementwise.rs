//! Elementwise arithmetic the kernels share: activations, and the epilogues fused into a
//! linear map's (or norm's) output, lane by lane on vectors.
//!
//! ## Fusion, as measured
//!
//! Elementwise ops fuse into the kernel that produces their input when they are its only
//! use (`plan::fusion`): chains of activations, scalings, adds and multiplies into a
//! linear map's epilogue, and a `round_bf16` into the norm or head merge before it, which
//! then stores the rounded value. The AMX GEMM applies the epilogue to each tile's rows
//! as it writes them out (`kernels::epilogue_v`, the scalar code's arithmetic lane by
//! lane), instead of reading the output back afterwards (W1 bf16 prefill ×1.02–1.05);
//! only exact GELU, an `erf` call in f64, keeps the pass over the output. SiLU and tanh-GELU divide by `Kb::recip`, the
//! hardware's reciprocal estimate and one Newton step (within an ulp or two), with the
//! exponent clamped at 80 so that the divisor stays finite, as the estimate needs.

use inkwell::values::{IntValue, PointerValue, VectorValue};

use super::kb::{F32s, Kb, VW};
use crate::backend::plan::Epi;
use crate::ir::Act;

/// An activation of one value or of each lane of a vector, by the same arithmetic;
/// `Act::Gelu` (erf in f64, through libm) is `unary`'s alone.
pub(super) fn act<'ctx, V: F32s<'ctx>>(kb: &Kb<'_, 'ctx>, a: Act, x: V) -> V {
    let k = |v: f64| V::k(kb, v);
    match a {
        Act::Relu => kb.fmax(x, k(0.0)),
        Act::Silu => {
            // Beyond 80, e^80 ≈ 5.5e34 keeps the reciprocal's operand finite, and the
            // product is below 2e-35 · |x| either way.
            let e = kb.exp(kb.fmin_c(kb.fsub(k(0.0), x), 80.0));
            kb.fmul(x, kb.recip(kb.fadd(k(1.0), e)))
        }
        Act::GeluTanh => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let x3 = kb.fmul(kb.fmul(x, x), x);
            let inner = kb.fmul(k(c), kb.fadd(x, kb.fmul(k(0.044715), x3)));
            // tanh(y) = 1 - 2 / (e^(2y) + 1): exact limits ±1, absolute error ~1e-7. From
            // 2y = 80 on, tanh is 1 in f32, and e^80 keeps the reciprocal's operand finite.
            let e = kb.exp(kb.fmin_c(kb.fadd(inner, inner), 80.0));
            let t = kb.fsub(k(1.0), kb.fmul(k(2.0), kb.recip(kb.fadd(e, k(1.0)))));
            kb.fmul(kb.fmul(k(0.5), x), kb.fadd(k(1.0), t))
        }
        Act::Gelu => unreachable!("exact gelu is scalar (`unary`)"),
    }
}

/// Whether `epi` has a vector form (`epilogue_v`): all but exact gelu.
pub fn epilogue_vectorises(epi: &[Epi]) -> bool {
    !epi.contains(&Epi::Act(Act::Gelu))
}

/// `epilogue` on the `VW` outputs from element `at` of the output, `v`: the same
/// arithmetic lane by lane (see `epilogue_vectorises`).
pub fn epilogue_v<'ctx>(
    kb: &Kb<'_, 'ctx>,
    epi: &[Epi],
    others: &[PointerValue<'ctx>],
    at: IntValue<'ctx>,
    v: VectorValue<'ctx>,
) -> VectorValue<'ctx> {
    epilogue_with(kb, epi, v, |k| kb.ldv(others[k], at))
}

/// `epilogue_v` on `v`, the operands of the `k`-th `Add`/`Mul` from `other(k)`.
pub fn epilogue_with<'ctx>(
    kb: &Kb<'_, 'ctx>,
    epi: &[Epi],
    mut v: VectorValue<'ctx>,
    other: impl Fn(usize) -> VectorValue<'ctx>,
) -> VectorValue<'ctx> {
    let mut k = 0;
    for e in epi {
        v = match e {
            Epi::Act(a) => act(kb, *a, v),
            Epi::Scale(s) => {
                let f64v = kb.f64t().vec_type(VW as u32);
                let wide = kb.b.build_float_ext(v, f64v, "").unwrap();
                let s = inkwell::types::VectorType::const_vector(&[kb.dc(*s); VW]);
                kb.b.build_float_trunc(kb.b.build_float_mul(wide, s, "").unwrap(), kb.vt(), "").unwrap()
            }
            Epi::RoundBf16 => kb.round_bf16(v),
            Epi::Add | Epi::Mul => {
                let y = other(k);
                k += 1;
                if *e == Epi::Add {
                    kb.fadd(v, y)
                } else {
                    kb.fmul(v, y)
                }
            }
        };
    }
    v
}
