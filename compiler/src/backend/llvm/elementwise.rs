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

use std::marker::PhantomData;

use inkwell::values::{FloatValue, IntValue, PointerValue, VectorValue};

use super::kb::{F32s, Kb, VW};
use crate::backend::plan::Epi;
use crate::ir::{Act, Arith};

/// An activation of one value or of each lane of a vector (`Act::apply` on `F32Ir`);
/// `Act::Gelu` (erf in f64, through libm) is `unary`'s alone.
pub(super) fn act<'ctx, V: F32s<'ctx>>(kb: &Kb<'_, 'ctx>, a: Act, x: V) -> V {
    a.apply(&mut F32Ir { kb, _v: PhantomData }, x)
}

/// `Arith` on the kernels' f32 values, scalars or vectors alike. `exp` is `Kb::exp` with
/// its argument clamped at 80 (e^80 ≈ 5.5e34 keeps a reciprocal's operand finite, and
/// whatever it divides is below 2e-35 of itself by then); division is the reciprocal
/// estimate and one Newton step (`Kb::recip`); `tanh(y) = 1 - 2 / (e^(2y) + 1)`, exact
/// limits ±1, absolute error ~1e-7 (from 2y = 80 on, tanh is 1 in f32). No `erf`: the
/// exact GELU is computed in f64 (`F64Ir`).
pub(super) struct F32Ir<'a, 'b, 'ctx, V> {
    pub kb: &'a Kb<'b, 'ctx>,
    pub _v: PhantomData<V>,
}

impl<'ctx, V: F32s<'ctx>> Arith for F32Ir<'_, '_, 'ctx, V> {
    type V = V;
    fn c(&mut self, v: f64) -> V {
        V::k(self.kb, v)
    }
    fn add(&mut self, a: V, b: V) -> V {
        self.kb.fadd(a, b)
    }
    fn mul(&mut self, a: V, b: V) -> V {
        self.kb.fmul(a, b)
    }
    fn div(&mut self, a: V, b: V) -> V {
        self.kb.fmul(a, self.kb.recip(b))
    }
    fn neg(&mut self, a: V) -> V {
        self.kb.fsub(V::k(self.kb, 0.0), a)
    }
    fn max(&mut self, a: V, b: V) -> V {
        self.kb.fmax(a, b)
    }
    fn exp(&mut self, a: V) -> V {
        self.kb.exp(self.kb.fmin_c(a, 80.0))
    }
    fn tanh(&mut self, y: V) -> V {
        let kb = self.kb;
        let e = kb.exp(kb.fmin_c(kb.fadd(y, y), 80.0));
        kb.fsub(V::k(kb, 1.0), kb.fmul(V::k(kb, 2.0), kb.recip(kb.fadd(e, V::k(kb, 1.0)))))
    }
    fn erf(&mut self, _: V) -> V {
        unreachable!("bug: the exact GELU is computed in f64 (`unary`)")
    }
}

/// `Arith` on scalar f64 values, the transcendentals through libm: the exact GELU.
pub(super) struct F64Ir<'a, 'b, 'ctx> {
    pub kb: &'a Kb<'b, 'ctx>,
}

impl<'ctx> Arith for F64Ir<'_, '_, 'ctx> {
    type V = FloatValue<'ctx>;
    fn c(&mut self, v: f64) -> FloatValue<'ctx> {
        self.kb.dc(v)
    }
    fn add(&mut self, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> FloatValue<'ctx> {
        self.kb.fadd(a, b)
    }
    fn mul(&mut self, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> FloatValue<'ctx> {
        self.kb.fmul(a, b)
    }
    fn div(&mut self, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> FloatValue<'ctx> {
        self.kb.fdiv(a, b)
    }
    fn neg(&mut self, a: FloatValue<'ctx>) -> FloatValue<'ctx> {
        self.kb.fsub(self.kb.dc(0.0), a)
    }
    fn max(&mut self, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> FloatValue<'ctx> {
        self.kb.fmax(a, b)
    }
    fn exp(&mut self, a: FloatValue<'ctx>) -> FloatValue<'ctx> {
        self.kb.libm("exp", a)
    }
    fn tanh(&mut self, a: FloatValue<'ctx>) -> FloatValue<'ctx> {
        self.kb.libm("tanh", a)
    }
    fn erf(&mut self, a: FloatValue<'ctx>) -> FloatValue<'ctx> {
        self.kb.libm("erf", a)
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
