//! A small layer over inkwell's builder for writing loop nests: constants, loads and
//! stores by element index, counted loops and reduction loops with phi nodes.

use inkwell::builder::Builder;
use inkwell::context::Context;
use inkwell::intrinsics::Intrinsic;
use inkwell::module::Module;
use inkwell::types::{BasicMetadataTypeEnum, BasicTypeEnum, FloatType, IntType, PointerType, VectorType};
use inkwell::values::{
    BasicMetadataValueEnum, BasicValue, BasicValueEnum, FloatMathValue, FloatValue, FunctionValue,
    InstructionValue, IntMathValue, IntValue, PointerValue, VectorValue,
};

/// Lanes of the explicit vectors (`<16 x float>`: one AVX-512 register; LLVM splits it
/// on narrower targets).
pub const VW: usize = 16;

use tfc_runtime::quant::{q8_scales_at, Quant, Q8_BLOCK};

/// The byte at which a block of `q` (a 4- or 5-bit format) has its nibbles: after its
/// scale (and offset, or packed scales), and any fifth bits.
pub fn nibbles_at(q: Quant) -> usize {
    match q {
        Quant::Q4_0 => 2,
        Quant::Q4_1 => 4,
        Quant::Q5_0 => 6,
        Quant::Q5_1 => 8,
        Quant::Q4_K => 16,
        Quant::Q5_K => 48,
        Quant::Q2_K | Quant::Q3_K | Quant::Q6_K | Quant::Q8_0 => unreachable!("bug: {q:?} has no nibbles"),
    }
}

/// The global that tells the kernels of a module how many vector registers its CPU has.
const VECTOR_REGISTERS: &str = "tfc__vector_registers";

/// Records in `m` that its CPU has `n` vector registers (`Kb::vector_registers`).
pub fn set_vector_registers<'ctx>(cx: &'ctx Context, m: &Module<'ctx>, n: usize) {
    set_cpu_fact(cx, m, VECTOR_REGISTERS, n as u64)
}

/// A fact about the module's CPU that the kernels read as they are built (`Kb::cpu_fact`).
fn set_cpu_fact<'ctx>(cx: &'ctx Context, m: &Module<'ctx>, name: &str, n: u64) {
    let g = m.add_global(cx.i32_type(), None, name);
    g.set_initializer(&cx.i32_type().const_int(n, false));
    g.set_constant(true);
    g.set_linkage(inkwell::module::Linkage::Internal);
}

/// The global that tells the kernels whether the module's CPU has `vdpbf16ps`.
const BF16_DOTS: &str = "tfc__bf16_dots";

/// Records in `m` whether its CPU multiplies bf16 pairs (AVX512_BF16: `Kb::bf16_dots`).
pub fn set_bf16_dots<'ctx>(cx: &'ctx Context, m: &Module<'ctx>, on: bool) {
    set_cpu_fact(cx, m, BF16_DOTS, on as u64)
}

/// How a CPU multiplies bytes: `vpdpbusd` (AVX512_VNNI), or `pmaddubsw` and `pmaddwd`
/// (AVX512BW) (`kernels::int8`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Int8Dots {
    Vnni,
    Bw,
}

/// The global that tells the kernels how the module's CPU multiplies bytes.
const INT8_DOTS: &str = "tfc__int8_dots";

/// Records in `m` how its CPU multiplies bytes (`Kb::int8_dots`).
pub fn set_int8_dots<'ctx>(cx: &'ctx Context, m: &Module<'ctx>, dots: Option<Int8Dots>) {
    let n = match dots {
        Some(Int8Dots::Vnni) => 2,
        Some(Int8Dots::Bw) => 1,
        None => 0,
    };
    set_cpu_fact(cx, m, INT8_DOTS, n)
}

/// How a weight tensor is stored, as the kernels read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WFmt {
    F32,
    Bf16,
    /// int8 values, then one `f32` scale per block of 32 from byte `scales` on.
    Q8 {
        scales: usize,
    },
    /// ggml's blocks, one after another (`tfc_runtime::quant::Quant`).
    Quant(Quant),
}

impl WFmt {
    pub fn of(ty: &crate::ir::TensorType) -> WFmt {
        match ty.dtype {
            crate::ir::DType::BF16 => WFmt::Bf16,
            crate::ir::DType::Q8 => {
                let n: usize = ty.shape.iter().map(|d| d.as_fixed().unwrap_or(0)).product();
                WFmt::Q8 { scales: q8_scales_at(n) }
            }
            crate::ir::DType::Quant(q) => WFmt::Quant(q),
            _ => WFmt::F32,
        }
    }

    /// Bytes of `n` elements (a whole number of ggml blocks; a q8 tensor's scales come on
    /// top).
    pub fn bytes(self, n: usize) -> usize {
        match self {
            WFmt::F32 => 4 * n,
            WFmt::Bf16 => 2 * n,
            WFmt::Q8 { .. } => n,
            WFmt::Quant(q) => n.div_ceil(q.block().0) * q.block().1,
        }
    }

    /// A kernel-name suffix; kernels are shared by name, so it says all a kernel bakes in.
    pub fn suffix(self) -> String {
        match self {
            WFmt::F32 => String::new(),
            WFmt::Bf16 => "_bf16".into(),
            WFmt::Q8 { scales } => format!("_q8s{scales}"),
            WFmt::Quant(q) => format!("_{}", q.name()),
        }
    }
}
use inkwell::{FloatPredicate, IntPredicate};

pub struct Kb<'a, 'ctx> {
    pub cx: &'ctx Context,
    pub m: &'a Module<'ctx>,
    pub b: Builder<'ctx>,
    pub f: FunctionValue<'ctx>,
}

fn ok<T>(r: Result<T, inkwell::builder::BuilderError>) -> T {
    r.expect("bug: LLVM builder misuse")
}

impl<'a, 'ctx> Kb<'a, 'ctx> {
    pub fn new(cx: &'ctx Context, m: &'a Module<'ctx>, f: FunctionValue<'ctx>) -> Self {
        let b = cx.create_builder();
        let entry = cx.append_basic_block(f, "entry");
        b.position_at_end(entry);
        Kb { cx, m, b, f }
    }

    /// The value of a `set_cpu_fact`, if the module has it.
    fn cpu_fact(&self, name: &str) -> Option<u64> {
        let n = self.m.get_global(name).and_then(|g| g.get_initializer());
        n.and_then(|v| v.into_int_value().get_zero_extended_constant())
    }
    /// How this module's CPU multiplies bytes, if it has AVX512BW (`set_int8_dots`).
    pub fn int8_dots(&self) -> Option<Int8Dots> {
        match self.cpu_fact(INT8_DOTS) {
            Some(2) => Some(Int8Dots::Vnni),
            Some(1) => Some(Int8Dots::Bw),
            _ => None,
        }
    }
    /// Function `name` of the LLVM IR `ir`, which defines `defines` (`name` among them):
    /// parsed and linked into the module, internal, on first use. For instructions
    /// inkwell cannot name, wrapped as clang wraps them.
    pub fn linked(&self, ir: &str, defines: &[&str], name: &str) -> FunctionValue<'ctx> {
        if let Some(f) = self.m.get_function(name) {
            return f;
        }
        let buf = inkwell::memory_buffer::MemoryBuffer::create_from_memory_range_copy(ir.as_bytes(), name);
        let w = self.cx.create_module_from_ir(buf).expect("bug: wrapper IR that does not parse");
        self.m.link_in_module(w).expect("bug: wrapper IR that does not link");
        for n in defines {
            let f = self.m.get_function(n).expect("bug: wrapper IR without a function it defines");
            f.set_linkage(inkwell::module::Linkage::Internal);
        }
        self.m.get_function(name).expect("bug: wrapper IR without the function asked for")
    }
    /// Whether this module's CPU multiplies bf16 pairs into f32 (`set_bf16_dots`).
    pub fn bf16_dots(&self) -> bool {
        self.cpu_fact(BF16_DOTS) == Some(1)
    }
    /// How many vector registers this module's CPU has (`set_vector_registers`; 32, as
    /// with AVX-512, where a module does not say).
    pub fn vector_registers(&self) -> usize {
        self.cpu_fact(VECTOR_REGISTERS).map_or(32, |n| n as usize)
    }
    pub fn i64t(&self) -> IntType<'ctx> {
        self.cx.i64_type()
    }
    pub fn f32t(&self) -> FloatType<'ctx> {
        self.cx.f32_type()
    }
    pub fn f64t(&self) -> FloatType<'ctx> {
        self.cx.f64_type()
    }
    pub fn ptrt(&self) -> PointerType<'ctx> {
        self.cx.ptr_type(inkwell::AddressSpace::default())
    }

    pub fn c(&self, v: i64) -> IntValue<'ctx> {
        self.i64t().const_int(v as u64, true)
    }
    pub fn fc(&self, v: f64) -> FloatValue<'ctx> {
        self.f32t().const_float(v)
    }
    pub fn dc(&self, v: f64) -> FloatValue<'ctx> {
        self.f64t().const_float(v)
    }

    pub fn add(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> IntValue<'ctx> {
        ok(self.b.build_int_add(a, b, ""))
    }
    pub fn sub(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> IntValue<'ctx> {
        ok(self.b.build_int_sub(a, b, ""))
    }
    pub fn mul(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> IntValue<'ctx> {
        ok(self.b.build_int_mul(a, b, ""))
    }
    pub fn div(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> IntValue<'ctx> {
        ok(self.b.build_int_signed_div(a, b, ""))
    }
    pub fn rem(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> IntValue<'ctx> {
        ok(self.b.build_int_signed_rem(a, b, ""))
    }
    /// `a / b` for non-negative operands (a shift for a power of two, with no sign fix-up).
    pub fn udiv(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> IntValue<'ctx> {
        ok(self.b.build_int_unsigned_div(a, b, ""))
    }
    pub fn urem(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> IntValue<'ctx> {
        ok(self.b.build_int_unsigned_rem(a, b, ""))
    }
    pub fn min(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> IntValue<'ctx> {
        let lt = ok(self.b.build_int_compare(IntPredicate::SLT, a, b, ""));
        ok(self.b.build_select(lt, a, b, "")).into_int_value()
    }
    pub fn max(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> IntValue<'ctx> {
        let gt = ok(self.b.build_int_compare(IntPredicate::SGT, a, b, ""));
        ok(self.b.build_select(gt, a, b, "")).into_int_value()
    }

    pub fn icmp_ge(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> IntValue<'ctx> {
        ok(self.b.build_int_compare(IntPredicate::SGE, a, b, ""))
    }
    pub fn icmp_eq(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> IntValue<'ctx> {
        ok(self.b.build_int_compare(IntPredicate::EQ, a, b, ""))
    }
    pub fn icmp_lt(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> IntValue<'ctx> {
        ok(self.b.build_int_compare(IntPredicate::SLT, a, b, ""))
    }
    pub fn select(&self, cond: IntValue<'ctx>, a: IntValue<'ctx>, b: IntValue<'ctx>) -> IntValue<'ctx> {
        ok(self.b.build_select(cond, a, b, "")).into_int_value()
    }

    /// Marks a float instruction reassociable and contractible, so reductions vectorise.
    pub fn fast<V: F32s<'ctx>>(&self, v: V) -> V {
        if let Some(i) = v.as_instruction_value() {
            let flags =
                inkwell::values::FastMathFlags::AllowReassoc | inkwell::values::FastMathFlags::AllowContract;
            let _ = InstructionValue::set_fast_math_flags(i, flags);
        }
        v
    }
    pub fn fadd<V: F32s<'ctx>>(&self, a: V, b: V) -> V {
        self.fast(ok(self.b.build_float_add(a, b, "")))
    }
    pub fn fsub<V: F32s<'ctx>>(&self, a: V, b: V) -> V {
        self.fast(ok(self.b.build_float_sub(a, b, "")))
    }
    pub fn fmul<V: F32s<'ctx>>(&self, a: V, b: V) -> V {
        self.fast(ok(self.b.build_float_mul(a, b, "")))
    }
    pub fn fdiv(&self, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> FloatValue<'ctx> {
        ok(self.b.build_float_div(a, b, ""))
    }
    /// `1 / d` for a finite, nonzero `d` (NaN passes through): the hardware's reciprocal
    /// estimate refined by one Newton step (the kernels' `reciprocal-estimates`), within
    /// an ulp or two of the division at a fraction of its cost. For the activations,
    /// whose own error is larger. `d` must not be infinite: the estimate of `1 / ∞` is
    /// refined into NaN, which is why the division is marked `ninf`.
    pub fn recip<V: F32s<'ctx>>(&self, d: V) -> V {
        let q = ok(self.b.build_float_div(V::k(self, 1.0), d, ""));
        if let Some(i) = q.as_instruction_value() {
            use inkwell::values::FastMathFlags as F;
            let _ = InstructionValue::set_fast_math_flags(i, F::AllowReciprocal | F::NoInfs);
        }
        q
    }
    /// `min(x, hi)`; NaN gives `hi`.
    pub fn fmin_c<V: F32s<'ctx>>(&self, x: V, hi: f64) -> V {
        let lt = ok(self.b.build_float_compare(FloatPredicate::OLT, x, V::k(self, hi), ""));
        V::of(ok(self.b.build_select(lt, x, V::k(self, hi), "")))
    }
    pub fn fmax<V: F32s<'ctx>>(&self, a: V, b: V) -> V {
        let gt = ok(self.b.build_float_compare(FloatPredicate::OGT, a, b, ""));
        V::of(ok(self.b.build_select(gt, a, b, "")))
    }
    pub fn to_f64(&self, v: FloatValue<'ctx>) -> FloatValue<'ctx> {
        ok(self.b.build_float_ext(v, self.f64t(), ""))
    }
    pub fn to_f32(&self, v: FloatValue<'ctx>) -> FloatValue<'ctx> {
        ok(self.b.build_float_trunc(v, self.f32t(), ""))
    }
    pub fn i_to_f64(&self, v: IntValue<'ctx>) -> FloatValue<'ctx> {
        ok(self.b.build_signed_int_to_float(v, self.f64t(), ""))
    }

    /// `base + idx` elements of `ty`.
    pub fn gep(
        &self,
        ty: impl inkwell::types::BasicType<'ctx>,
        base: PointerValue<'ctx>,
        idx: IntValue<'ctx>,
    ) -> PointerValue<'ctx> {
        // SAFETY: indices are in bounds by construction of the buffer plan.
        unsafe { ok(self.b.build_in_bounds_gep(ty, base, &[idx], "")) }
    }
    pub fn ld(&self, base: PointerValue<'ctx>, idx: IntValue<'ctx>) -> FloatValue<'ctx> {
        let p = self.gep(self.f32t(), base, idx);
        ok(self.b.build_load(self.f32t(), p, "")).into_float_value()
    }
    pub fn st(&self, base: PointerValue<'ctx>, idx: IntValue<'ctx>, v: FloatValue<'ctx>) {
        let p = self.gep(self.f32t(), base, idx);
        ok(self.b.build_store(p, v));
    }
    /// Copies `n` floats from `src` at `from` to `dst` at `to`, one at a time.
    pub fn copy(
        &self,
        dst: PointerValue<'ctx>,
        to: IntValue<'ctx>,
        src: PointerValue<'ctx>,
        from: IntValue<'ctx>,
        n: usize,
    ) {
        self.for_(self.c(0), self.c(n as i64), |i| {
            self.st(dst, self.add(to, i), self.ld(src, self.add(from, i)))
        });
    }
    /// Loads an `i32` element, sign-extended to `i64`.
    pub fn ldi(&self, base: PointerValue<'ctx>, idx: IntValue<'ctx>) -> IntValue<'ctx> {
        let p = self.gep(self.cx.i32_type(), base, idx);
        let v = ok(self.b.build_load(self.cx.i32_type(), p, "")).into_int_value();
        ok(self.b.build_int_s_extend(v, self.i64t(), ""))
    }
    pub fn sti(&self, base: PointerValue<'ctx>, idx: IntValue<'ctx>, v: IntValue<'ctx>) {
        let p = self.gep(self.cx.i32_type(), base, idx);
        let v = ok(self.b.build_int_truncate(v, self.cx.i32_type(), ""));
        ok(self.b.build_store(p, v));
    }
    pub fn ld64(&self, base: PointerValue<'ctx>, idx: IntValue<'ctx>) -> IntValue<'ctx> {
        let p = self.gep(self.i64t(), base, idx);
        ok(self.b.build_load(self.i64t(), p, "")).into_int_value()
    }
    pub fn st64(&self, base: PointerValue<'ctx>, idx: i64, v: IntValue<'ctx>) {
        let p = self.gep(self.i64t(), base, self.c(idx));
        ok(self.b.build_store(p, v));
    }
    pub fn ptr_of(&self, v: IntValue<'ctx>) -> PointerValue<'ctx> {
        ok(self.b.build_int_to_ptr(v, self.ptrt(), ""))
    }
    pub fn int_of(&self, p: PointerValue<'ctx>) -> IntValue<'ctx> {
        ok(self.b.build_ptr_to_int(p, self.i64t(), ""))
    }
    /// `n` floats of stack, 64-byte aligned (call in the entry block, outside loops).
    pub fn alloca_f32s(&self, n: usize) -> PointerValue<'ctx> {
        let a = ok(self.b.build_alloca(self.f32t().array_type(n as u32), ""));
        let _ = a.as_instruction().unwrap().set_alignment(64);
        a
    }
    pub fn alloca_f32(&self) -> PointerValue<'ctx> {
        ok(self.b.build_alloca(self.f32t(), ""))
    }
    pub fn load_f32(&self, p: PointerValue<'ctx>) -> FloatValue<'ctx> {
        ok(self.b.build_load(self.f32t(), p, "")).into_float_value()
    }
    pub fn store(&self, p: PointerValue<'ctx>, v: impl inkwell::values::BasicValue<'ctx>) {
        ok(self.b.build_store(p, v));
    }

    /// Calls an LLVM intrinsic such as `llvm.exp` overloaded on the arguments' type.
    pub fn intrinsic(&self, name: &str, args: &[FloatValue<'ctx>]) -> FloatValue<'ctx> {
        let ty = args[0].get_type();
        let intr = inkwell::intrinsics::Intrinsic::find(name).expect("bug: unknown intrinsic");
        let f = intr.get_declaration(self.m, &[ty.into()]).expect("bug: intrinsic declaration");
        let args: Vec<BasicMetadataValueEnum> = args.iter().map(|a| (*a).into()).collect();
        ok(self.b.build_call(f, &args, "")).try_as_basic_value().basic().unwrap().into_float_value()
    }

    /// `<16 x float>` loaded from `base + idx` (elements; no alignment assumed beyond 4).
    pub fn ldv(&self, base: PointerValue<'ctx>, idx: IntValue<'ctx>) -> VectorValue<'ctx> {
        let p = self.gep(self.f32t(), base, idx);
        let v = ok(self.b.build_load(self.vt(), p, ""));
        let _ = v.as_instruction_value().unwrap().set_alignment(4);
        v.into_vector_value()
    }
    pub fn stv(&self, base: PointerValue<'ctx>, idx: IntValue<'ctx>, v: VectorValue<'ctx>) {
        let p = self.gep(self.f32t(), base, idx);
        let st = ok(self.b.build_store(p, v));
        let _ = st.set_alignment(4);
    }
    /// A weight element as `f32`, from its storage format.
    pub fn ldw(&self, base: PointerValue<'ctx>, idx: IntValue<'ctx>, wf: WFmt) -> FloatValue<'ctx> {
        match wf {
            WFmt::F32 => self.ld(base, idx),
            WFmt::Bf16 => {
                let i16t = self.cx.i16_type();
                let p = self.gep(i16t, base, idx);
                let h = ok(self.b.build_load(i16t, p, "")).into_int_value();
                let w = ok(self.b.build_int_z_extend(h, self.cx.i32_type(), ""));
                let w = ok(self.b.build_left_shift(w, self.cx.i32_type().const_int(16, false), ""));
                ok(self.b.build_bit_cast(w, self.f32t(), "")).into_float_value()
            }
            WFmt::Q8 { scales } => {
                let i8t = self.cx.i8_type();
                let q = ok(self.b.build_load(i8t, self.gep(i8t, base, idx), "")).into_int_value();
                let qf = ok(self.b.build_signed_int_to_float(q, self.f32t(), ""));
                self.fmul(qf, self.q8_scale(base, idx, scales))
            }
            WFmt::Quant(Quant::Q8_0) => {
                let (at, d) = self.q8_0_element(base, idx);
                let q = ok(self.b.build_signed_int_to_float(self.ld_u8(base, at), self.f32t(), ""));
                self.fmul(q, d)
            }
            WFmt::Quant(q @ (Quant::Q2_K | Quant::Q3_K)) => {
                let i32t = self.cx.i32_type();
                let byte = |at| ok(self.b.build_int_z_extend(self.ld_u8(base, at), i32t, ""));
                let (v, scale, offset) =
                    self.q23k_value(base, idx, q, byte, |v| i32t.const_int(v, false), |s| s);
                let v = ok(self.b.build_signed_int_to_float(v, self.f32t(), ""));
                self.fadd(self.fmul(v, scale), offset)
            }
            WFmt::Quant(Quant::Q6_K) => {
                let (lo, hi, scale) = self.q6k_element(base, idx);
                let i32t = self.cx.i32_type();
                let byte = |at| ok(self.b.build_int_z_extend(self.ld_u8(base, at), i32t, ""));
                let q = self.q6_value(byte(lo.0), lo.1, byte(hi.0), hi.1, |v| i32t.const_int(v, false));
                self.fmul(ok(self.b.build_signed_int_to_float(q, self.f32t(), "")), scale)
            }
            WFmt::Quant(q) => {
                let (at, shift, scale, offset) = self.q4_element(base, idx, q);
                let byte = ok(self.b.build_int_z_extend(self.ld_u8(base, at), self.cx.i32_type(), ""));
                let v = ok(self.b.build_right_shift(byte, shift, false, ""));
                let mut v = ok(self.b.build_and(v, self.cx.i32_type().const_int(15, false), ""));
                if q.fifth_bit() {
                    v = ok(self.b.build_or(v, self.q5_high_one(base, idx, q), ""));
                }
                let qf = ok(self.b.build_unsigned_int_to_float(v, self.f32t(), ""));
                self.fadd(self.fmul(qf, scale), offset)
            }
        }
    }
    /// The byte offset of weight element `idx` (for a block format, of its block).
    pub fn wbyte(&self, idx: IntValue<'ctx>, wf: WFmt) -> IntValue<'ctx> {
        match wf {
            WFmt::Quant(q) => self.block_at(idx, q).0,
            _ => self.mul(idx, self.c(wf.bytes(1) as i64)),
        }
    }
    /// The byte at `base + at`.
    pub fn ld_u8(&self, base: PointerValue<'ctx>, at: IntValue<'ctx>) -> IntValue<'ctx> {
        let i8t = self.cx.i8_type();
        ok(self.b.build_load(i8t, self.gep(i8t, base, at), "")).into_int_value()
    }
    /// The `f16` at byte `base + at`, as `f32`.
    pub fn ld_f16(&self, base: PointerValue<'ctx>, at: IntValue<'ctx>) -> FloatValue<'ctx> {
        let h = self.cx.f16_type();
        let p = self.gep(self.cx.i8_type(), base, at);
        let v = ok(self.b.build_load(h, p, ""));
        let _ = v.as_instruction_value().unwrap().set_alignment(1);
        ok(self.b.build_float_ext(v.into_float_value(), self.f32t(), ""))
    }
    /// Where element `idx` of a 4-bit (`Q4_*`) tensor is: the byte holding its nibble, the shift
    /// that brings the nibble down (an `i32`: 0 or 4), and the `scale` and `offset` of its
    /// 32 values, `value = nibble · scale + offset`: `Q4_0` `(d, -8d)`, `Q4_1` `(d, m)`,
    /// `Q4_K` `(d·sc, -dmin·m)`. Each product is exact in `f32` (an f16 times a small
    /// integer), so the value is rounded once, as `gguf::dequantize` rounds it.
    pub fn q4_element(
        &self,
        base: PointerValue<'ctx>,
        idx: IntValue<'ctx>,
        q: Quant,
    ) -> (IntValue<'ctx>, IntValue<'ctx>, FloatValue<'ctx>, FloatValue<'ctx>) {
        let c = |v: i64| self.c(v);
        let i32t = self.cx.i32_type();
        let (blk, w) = self.block_at(idx, q);
        // Which half of a 32-byte (Q4_K) or 16-byte run of nibbles: low or high.
        let shift = |bit: i64| {
            let hi = self.urem(self.udiv(w, c(bit)), c(2));
            ok(self.b.build_int_truncate(self.mul(hi, c(4)), i32t, ""))
        };
        let d = self.ld_f16(base, blk);
        let qs = c(nibbles_at(q) as i64);
        match q {
            Quant::Q4_0 | Quant::Q4_1 | Quant::Q5_0 | Quant::Q5_1 => {
                let at = self.add(blk, self.add(qs, self.urem(w, c(16))));
                let offset = match q {
                    Quant::Q4_0 => self.fmul(d, self.fc(-8.0)),
                    Quant::Q5_0 => self.fmul(d, self.fc(-16.0)),
                    _ => self.ld_f16(base, self.add(blk, c(2))),
                };
                (at, shift(16), d, offset)
            }
            Quant::Q2_K | Quant::Q3_K | Quant::Q6_K | Quant::Q8_0 => {
                unreachable!("bug: {q:?} elements are found by their own function")
            }
            Quant::Q4_K | Quant::Q5_K => {
                let dmin = self.ld_f16(base, self.add(blk, c(2)));
                let sub = self.udiv(w, c(32));
                let (sc, m) = self.q4k_scale_min(base, self.add(blk, c(4)), sub);
                let at = self.add(
                    blk,
                    self.add(qs, self.add(self.mul(self.udiv(w, c(64)), c(32)), self.urem(w, c(32)))),
                );
                let scale = self.fmul(d, sc);
                let offset = self.fmul(self.fmul(dmin, m), self.fc(-1.0));
                (at, shift(32), scale, offset)
            }
        }
    }
    /// The fifth bits (0 or 16, as `<VW x i32>`) of the 16 elements from `idx` (a multiple
    /// of 16) of a `Q5_*` tensor: `Q5_0` and `Q5_1` keep a block's 32 in one little-endian
    /// `u32` before its nibbles, bit `k` for value `k`; `Q5_K` keeps 32 bytes after its
    /// scales, bit `j` of byte `l` for value `l` of sub-block `j`.
    pub fn q5_high(&self, base: PointerValue<'ctx>, idx: IntValue<'ctx>, q: Quant) -> VectorValue<'ctx> {
        let c = |v: i64| self.c(v);
        let i32t = self.cx.i32_type();
        let (blk, w) = self.block_at(idx, q);
        let narrow = |v: IntValue<'ctx>| ok(self.b.build_int_truncate(v, i32t, ""));
        let (bits, shifts) = match q {
            Quant::Q5_K => {
                let bytes = self.ld_bytes(base, self.add(blk, self.add(c(16), self.urem(w, c(32)))));
                (bytes, self.isplat(narrow(self.udiv(w, c(32)))))
            }
            _ => {
                let at = self.add(blk, c(nibbles_at(q) as i64 - 4));
                let word = ok(self.b.build_load(i32t, self.gep(self.cx.i8_type(), base, at), ""));
                let _ = word.as_instruction_value().unwrap().set_alignment(1);
                let lanes = VectorType::const_vector(
                    &(0..VW as u64).map(|l| i32t.const_int(l, false)).collect::<Vec<_>>(),
                );
                (
                    self.isplat(word.into_int_value()),
                    ok(self.b.build_int_add(self.isplat(narrow(w)), lanes, "")),
                )
            }
        };
        let k = |v: u64| VectorType::const_vector(&[i32t.const_int(v, false); VW]);
        let bit = ok(self.b.build_and(ok(self.b.build_right_shift(bits, shifts, false, "")), k(1), ""));
        ok(self.b.build_left_shift(bit, k(4), ""))
    }
    /// The fifth bit (0 or 16, an `i32`) of element `idx` of a `Q5_*` tensor, as `q5_high`
    /// finds it.
    pub fn q5_high_one(&self, base: PointerValue<'ctx>, idx: IntValue<'ctx>, q: Quant) -> IntValue<'ctx> {
        let c = |v: i64| self.c(v);
        let (blk, w) = self.block_at(idx, q);
        let (at, bit) = match q {
            Quant::Q5_K => (self.add(blk, self.add(c(16), self.urem(w, c(32)))), self.udiv(w, c(32))),
            _ => {
                (self.add(blk, self.add(c(nibbles_at(q) as i64 - 4), self.udiv(w, c(8)))), self.urem(w, c(8)))
            }
        };
        let byte = ok(self.b.build_int_z_extend(self.ld_u8(base, at), self.i64t(), ""));
        let v = ok(self.b.build_and(ok(self.b.build_right_shift(byte, bit, false, "")), c(1), ""));
        ok(self.b.build_int_truncate(self.mul(v, c(16)), self.cx.i32_type(), ""))
    }
    /// The value of element `idx` of a `Q2_K` or `Q3_K` tensor as `q · scale + offset`: `q`
    /// from its bytes (`byte` reads the byte at an offset, or the 16 from it, widened to
    /// `i32`; `k` makes a constant of that type, `splat` one from an `i32`), with its 16
    /// values' scale and offset.
    /// Element `128n + 32j + k` has its two low bits at bits `2j` of byte `32n + k` of the
    /// 2-bit fields, and its scale is that of its 16 (`e / 16`). `Q2_K`: fields from byte
    /// 16, a 4-bit scale and min per 16 in bytes 0..16, `d`, `dmin` at 80; `q · d·sc -
    /// dmin·m`. `Q3_K`: a high bit per value (bit `4n + j` of byte `k`) that, clear,
    /// subtracts 4; fields from byte 32; sixteen 6-bit scales less 32 in bytes 96..108 (the
    /// low four bits of scale `i` in byte `i mod 8`, high nibble for `i ≥ 8`, the top two at
    /// bits `2⌊i/4⌋` of byte `8 + i mod 4`); `d` at 108; `(q - 4·(1 - h)) · d·sc`.
    pub fn q23k_value<V: IntMathValue<'ctx> + Copy>(
        &self,
        base: PointerValue<'ctx>,
        idx: IntValue<'ctx>,
        q: Quant,
        byte: impl Fn(IntValue<'ctx>) -> V,
        k: impl Fn(u64) -> V,
        splat: impl Fn(IntValue<'ctx>) -> V,
    ) -> (V, FloatValue<'ctx>, FloatValue<'ctx>) {
        let c = |v: i64| self.c(v);
        let b = &self.b;
        let (blk, e) = self.block_at(idx, q);
        let (n, j, l) = (self.udiv(e, c(128)), self.urem(self.udiv(e, c(32)), c(4)), self.urem(e, c(32)));
        let group = self.udiv(e, c(16));
        let fields = if q == Quant::Q2_K { 16 } else { 32 };
        let low_at = self.add(blk, self.add(c(fields), self.add(self.mul(n, c(32)), l)));
        let i32t = self.cx.i32_type();
        // A field of the bytes at `at`: shifted (the lanes share the shift) and masked.
        let field = |at: IntValue<'ctx>, shift: IntValue<'ctx>, mask: u64| {
            let shift = splat(ok(b.build_int_truncate(shift, i32t, "")));
            ok(b.build_and(ok(b.build_right_shift(byte(at), shift, false, "")), k(mask), ""))
        };
        let low = field(low_at, self.mul(j, c(2)), 3);
        let float = |v: IntValue<'ctx>| ok(b.build_unsigned_int_to_float(v, self.f32t(), ""));
        if q == Quant::Q2_K {
            let sc = self.zext64(self.ld_u8(base, self.add(blk, group)));
            let (s, m) =
                (float(ok(b.build_and(sc, c(15), ""))), float(ok(b.build_right_shift(sc, c(4), false, ""))));
            let scale = self.fmul(self.ld_f16(base, self.add(blk, c(80))), s);
            let offset = self.fmul(self.fmul(self.ld_f16(base, self.add(blk, c(82))), m), self.fc(-1.0));
            return (low, scale, offset);
        }
        let high = field(self.add(blk, l), self.add(self.mul(n, c(4)), j), 1);
        // `q - 4 + 4h`.
        let v = ok(b.build_int_add(
            ok(b.build_int_sub(low, k(4), "")),
            ok(b.build_left_shift(high, k(2), "")),
            "",
        ));
        let lo4 = self.add(blk, self.add(c(96), self.urem(group, c(8))));
        let lo4 = ok(b.build_and(
            ok(b.build_right_shift(
                self.zext64(self.ld_u8(base, lo4)),
                self.mul(self.udiv(group, c(8)), c(4)),
                false,
                "",
            )),
            c(15),
            "",
        ));
        let hi2 = self.add(blk, self.add(c(104), self.urem(group, c(4))));
        let hi2 = ok(b.build_and(
            ok(b.build_right_shift(
                self.zext64(self.ld_u8(base, hi2)),
                self.mul(self.udiv(group, c(4)), c(2)),
                false,
                "",
            )),
            c(3),
            "",
        ));
        let sc = self.sub(ok(b.build_or(lo4, ok(b.build_left_shift(hi2, c(4), "")), "")), c(32));
        let sc = ok(b.build_signed_int_to_float(sc, self.f32t(), ""));
        let scale = self.fmul(self.ld_f16(base, self.add(blk, c(108))), sc);
        (v, scale, self.fc(0.0))
    }
    /// A byte widened to `i64`.
    pub fn zext64(&self, v: IntValue<'ctx>) -> IntValue<'ctx> {
        ok(self.b.build_int_z_extend(v, self.i64t(), ""))
    }
    /// Where element `idx` of a `Q6_K` tensor is: the byte and shift (an `i32`) of its low
    /// nibble, the byte and shift of its top two bits, and its scale `d·sc` (exact in
    /// `f32`; the value is `(q - 32)·d·sc`, exact too). Element `128h + 32g + l` of a
    /// super-block has its low nibble in byte `64h + 32(g mod 2) + l` (the high nibble for
    /// `g ≥ 2`), its top bits in byte `128 + 32h + l` (bits `2g`, `2g + 1`), its int8 scale
    /// in byte `192 + e / 16` and `d` in bytes 208..210; so 16 elements from a multiple of
    /// 16 share their shifts and scale and read 16 consecutive bytes of each kind.
    #[allow(clippy::type_complexity)]
    pub fn q6k_element(
        &self,
        base: PointerValue<'ctx>,
        idx: IntValue<'ctx>,
    ) -> ((IntValue<'ctx>, IntValue<'ctx>), (IntValue<'ctx>, IntValue<'ctx>), FloatValue<'ctx>) {
        let c = |v: i64| self.c(v);
        let (blk, e) = self.block_at(idx, Quant::Q6_K);
        let (h, g, l) = (self.udiv(e, c(128)), self.urem(self.udiv(e, c(32)), c(4)), self.urem(e, c(32)));
        let lo_at =
            self.add(blk, self.add(self.mul(h, c(64)), self.add(self.mul(self.urem(g, c(2)), c(32)), l)));
        let hi_at = self.add(blk, self.add(c(128), self.add(self.mul(h, c(32)), l)));
        let i32t = self.cx.i32_type();
        let shift = |v: IntValue<'ctx>| ok(self.b.build_int_truncate(v, i32t, ""));
        let lo_shift = shift(self.mul(self.udiv(g, c(2)), c(4)));
        let hi_shift = shift(self.mul(g, c(2)));
        let sc = self.ld_u8(base, self.add(blk, self.add(c(192), self.udiv(e, c(16)))));
        let sc = ok(self.b.build_signed_int_to_float(sc, self.f32t(), ""));
        let scale = self.fmul(self.ld_f16(base, self.add(blk, c(208))), sc);
        ((lo_at, lo_shift), (hi_at, hi_shift), scale)
    }
    /// `q - 32` of `Q6_K` values from their low-nibble bytes `lo` and top-bit bytes `hi`
    /// (widened to `i32`, scalar or vector) and the shifts `q6k_element` gives; `k` makes
    /// a constant of their type.
    pub fn q6_value<V: IntMathValue<'ctx>>(
        &self,
        lo: V,
        lo_shift: V,
        hi: V,
        hi_shift: V,
        k: impl Fn(u64) -> V,
    ) -> V {
        let b = &self.b;
        let low = ok(b.build_and(ok(b.build_right_shift(lo, lo_shift, false, "")), k(15), ""));
        let top = ok(b.build_and(ok(b.build_right_shift(hi, hi_shift, false, "")), k(3), ""));
        let q = ok(b.build_or(low, ok(b.build_left_shift(top, k(4), "")), ""));
        ok(b.build_int_sub(q, k(32), ""))
    }
    /// Where element `idx` of a `Q8_0` tensor is (its signed byte) and its block's scale.
    pub fn q8_0_element(
        &self,
        base: PointerValue<'ctx>,
        idx: IntValue<'ctx>,
    ) -> (IntValue<'ctx>, FloatValue<'ctx>) {
        let (blk, w) = self.block_at(idx, Quant::Q8_0);
        (self.add(blk, self.add(self.c(2), w)), self.ld_f16(base, blk))
    }
    /// The byte offset of the block of `q` that holds element `idx`, and the element's
    /// place in it.
    pub fn block_at(&self, idx: IntValue<'ctx>, q: Quant) -> (IntValue<'ctx>, IntValue<'ctx>) {
        let (per, size) = q.block();
        let blk = self.mul(self.udiv(idx, self.c(per as i64)), self.c(size as i64));
        (blk, self.urem(idx, self.c(per as i64)))
    }
    /// An `i32` in every lane of a `<VW x i32>`.
    pub fn isplat(&self, s: IntValue<'ctx>) -> VectorValue<'ctx> {
        let i32v = self.cx.i32_type().vec_type(VW as u32);
        let one = ok(self.b.build_insert_element(i32v.get_undef(), s, self.c(0), ""));
        ok(self.b.build_shuffle_vector(one, i32v.get_undef(), i32v.const_zero(), ""))
    }
    /// The 6-bit scale and min of sub-block `sub` (0..8) of a `Q4_K` super-block, from its
    /// 12 packed bytes at `base + at`, as `f32`: the first four are the low six bits of
    /// bytes 0..4 and 4..8; the others take their low four bits from bytes 8..12 and their
    /// top two from the top bits of bytes 0..8.
    pub fn q4k_scale_min(
        &self,
        base: PointerValue<'ctx>,
        at: IntValue<'ctx>,
        sub: IntValue<'ctx>,
    ) -> (FloatValue<'ctx>, FloatValue<'ctx>) {
        let c = |v: i64| self.c(v);
        let byte = |i: IntValue<'ctx>| {
            ok(self.b.build_int_z_extend(self.ld_u8(base, self.add(at, i)), self.i64t(), ""))
        };
        let (y, x, z) = (byte(sub), byte(self.add(sub, c(4))), byte(self.urem(sub, c(4))));
        let and = |v: IntValue<'ctx>, m: i64| ok(self.b.build_and(v, c(m), ""));
        let shr = |v: IntValue<'ctx>, s: i64| ok(self.b.build_right_shift(v, c(s), false, ""));
        let or = |a: IntValue<'ctx>, b: IntValue<'ctx>| ok(self.b.build_or(a, b, ""));
        let shl4 = |v: IntValue<'ctx>| ok(self.b.build_left_shift(v, c(4), ""));
        let low = self.icmp_lt(sub, c(4));
        let sc = self.select(low, and(y, 63), or(and(x, 15), shl4(shr(z, 6))));
        let m = self.select(low, and(x, 63), or(shr(x, 4), shl4(shr(y, 6))));
        let f = |v: IntValue<'ctx>| ok(self.b.build_unsigned_int_to_float(v, self.f32t(), ""));
        (f(sc), f(m))
    }
    /// The `VW` bytes at `base + at`, widened to `<VW x i32>`.
    pub fn ld_bytes(&self, base: PointerValue<'ctx>, at: IntValue<'ctx>) -> VectorValue<'ctx> {
        self.ld_bytes_as(base, at, false)
    }
    /// The same, widened as unsigned bytes or as `signed` ones.
    pub fn ld_bytes_as(
        &self,
        base: PointerValue<'ctx>,
        at: IntValue<'ctx>,
        signed: bool,
    ) -> VectorValue<'ctx> {
        let (i8v, i32v) = (self.cx.i8_type().vec_type(VW as u32), self.cx.i32_type().vec_type(VW as u32));
        let b = ok(self.b.build_load(i8v, self.gep(self.cx.i8_type(), base, at), "")).into_vector_value();
        let _ = b.as_instruction_value().unwrap().set_alignment(1);
        if signed {
            ok(self.b.build_int_s_extend(b, i32v, ""))
        } else {
            ok(self.b.build_int_z_extend(b, i32v, ""))
        }
    }
    /// 16 nibbles as `<VW x i32>`: the low (`shift` 0) or high (4) halves of the 16 bytes
    /// at `base + at`.
    pub fn ld_nibbles(
        &self,
        base: PointerValue<'ctx>,
        at: IntValue<'ctx>,
        shift: IntValue<'ctx>,
    ) -> VectorValue<'ctx> {
        let w = self.ld_bytes(base, at);
        let w = ok(self.b.build_right_shift(w, self.isplat(shift), false, ""));
        let fifteen = VectorType::const_vector(&[self.cx.i32_type().const_int(15, false); VW]);
        ok(self.b.build_and(w, fifteen, ""))
    }
    /// 16 nibbles less `bias` as `<VW x float>` (`-bias..16 - bias`), as `ld_nibbles`
    /// reads them.
    pub fn ld_nibbles_f(
        &self,
        base: PointerValue<'ctx>,
        at: IntValue<'ctx>,
        shift: IntValue<'ctx>,
        bias: u64,
    ) -> VectorValue<'ctx> {
        let n = self.ld_nibbles(base, at, shift);
        if bias == 0 {
            return ok(self.b.build_signed_int_to_float(n, self.vt(), ""));
        }
        if self.vector_registers() < 32 {
            // No 16-lane permute without AVX-512 (LLVM takes the lanes one by one: W2's
            // Q4_0 decode built for x86-64-v3 ran at 3.5 tok/s): subtract, then convert.
            let bias = VectorType::const_vector(&[self.cx.i32_type().const_int(bias, false); VW]);
            let n = ok(self.b.build_int_sub(n, bias, ""));
            return ok(self.b.build_signed_int_to_float(n, self.vt(), ""));
        }
        let table: Vec<f32> = (0..16).map(|k| k as f32 - bias as f32).collect();
        self.lookup(&table, n)
    }
    /// `table[idx[l]]` in every lane `l` (`idx` in `0..16`): one variable permute of a
    /// constant vector (`vpermps`/`vpermd` on AVX-512), the element-wise form LLVM lowers to it, which
    /// also turns small integers into floats in one instruction where a conversion (and
    /// any offset) would take more.
    pub fn lookup(&self, table: &[f32], idx: VectorValue<'ctx>) -> VectorValue<'ctx> {
        let t = VectorType::const_vector(&table.iter().map(|&v| self.fc(v as f64)).collect::<Vec<_>>());
        let lane = |l: usize| self.cx.i32_type().const_int(l as u64, false);
        let mut out = self.vt().get_undef();
        for l in 0..VW {
            let i = ok(self.b.build_extract_element(idx, lane(l), "")).into_int_value();
            let e = ok(self.b.build_extract_element(t, i, ""));
            out = ok(self.b.build_insert_element(out, e, lane(l), ""));
        }
        out
    }
    /// The scales and offsets of a `Q4_K` super-block at `base + at`, all eight of each
    /// at once: lanes `0..8` are `d·sc_j`, lanes `8..16` `-dmin·m_j`. The 16 bytes from
    /// `at` (`d`, `dmin`, then the 12 packed bytes) are widened to 32-bit lanes, and each
    /// lane gathers its byte `A` and, for sub-blocks 4 to 7, the byte `B` that holds its top
    /// two bits (`q4k_scale_min` reads one sub-block the same way):
    /// `((A >> sa) & ma) | ((B >> 2) & mb)`.
    pub fn q4k_scales(&self, base: PointerValue<'ctx>, at: IntValue<'ctx>) -> VectorValue<'ctx> {
        let i32t = self.cx.i32_type();
        let i32v = i32t.vec_type(VW as u32);
        let bytes = self.ld_bytes(base, at);
        // Per lane: the bytes A and B (counted from `at`; the packed bytes start at 4) and
        // A's shift and mask and B's mask.
        let lane = |l: usize| -> [u64; 5] {
            let j = (l % 8) as u64;
            match (l >= 8, j < 4) {
                (false, true) => [4 + j, 0, 63, 4, 0],
                (true, true) => [8 + j, 0, 63, 4, 0],
                (false, false) => [8 + j, 0, 15, j, 0x30],
                (true, false) => [8 + j, 4, 15, 4 + j, 0x30],
            }
        };
        let field = |k: usize| {
            VectorType::const_vector(&(0..VW).map(|l| i32t.const_int(lane(l)[k], false)).collect::<Vec<_>>())
        };
        let pick = |k: usize| ok(self.b.build_shuffle_vector(bytes, i32v.get_undef(), field(k), ""));
        let a = ok(self.b.build_right_shift(pick(0), field(1), false, ""));
        let a = ok(self.b.build_and(a, field(2), ""));
        let two = VectorType::const_vector(&[i32t.const_int(2, false); VW]);
        let b = ok(self.b.build_right_shift(pick(3), two, false, ""));
        let b = ok(self.b.build_and(b, field(4), ""));
        let v = ok(self.b.build_or(a, b, ""));
        let v = ok(self.b.build_unsigned_int_to_float(v, self.vt(), ""));
        let d = self.splat(self.ld_f16(base, at));
        let dmin = self.splat(self.fmul(self.ld_f16(base, self.add(at, self.c(2))), self.fc(-1.0)));
        let halves: Vec<u32> = (0..8).chain(VW as u32..VW as u32 + 8).collect();
        ok(self.b.build_float_mul(v, self.shuffle(d, dmin, &halves), ""))
    }
    /// Every lane of `v` set to its lane `j`.
    pub fn broadcast_lane(&self, v: VectorValue<'ctx>, j: usize) -> VectorValue<'ctx> {
        let mask = VectorType::const_vector(&[self.cx.i32_type().const_int(j as u64, false); VW]);
        ok(self.b.build_shuffle_vector(v, self.vt().get_undef(), mask, ""))
    }
    /// The scale of a `round_q8` block of the `n` floats at `x + at` (`interp::q8_scale`):
    /// `d = amax / 127`, the factor `127 / amax` (both 0 below `Q8_ACT_TINY`), and whether
    /// the block is finite (else the caller keeps the values or makes the block's
    /// product NaN).
    pub fn q8_act_scale(
        &self,
        x: PointerValue<'ctx>,
        at: IntValue<'ctx>,
        n: usize,
    ) -> (FloatValue<'ctx>, FloatValue<'ctx>, IntValue<'ctx>) {
        let c = |v: i64| self.c(v);
        let bits = |v: FloatValue<'ctx>| {
            let i = ok(self.b.build_bit_cast(v, self.cx.i32_type(), "")).into_int_value();
            ok(self.b.build_int_z_extend(i, self.i64t(), ""))
        };
        let amax = self.fold(c(0), c(n as i64), &[c(0).into()], |j, acc| {
            let m = ok(self.b.build_and(bits(self.ld(x, self.add(at, j))), c(0x7fff_ffff), ""));
            let a = acc[0].into_int_value();
            vec![self.select(self.icmp_lt(a, m), m, a).into()]
        })[0]
            .into_int_value();
        self.q8_act_scale_of(amax)
    }
    /// `q8_act_scale` of a block whose largest magnitude has the bit pattern `amax`
    /// (an `i64`).
    pub fn q8_act_scale_of(
        &self,
        amax: IntValue<'ctx>,
    ) -> (FloatValue<'ctx>, FloatValue<'ctx>, IntValue<'ctx>) {
        let c = |v: i64| self.c(v);
        let finite = self.icmp_lt(amax, c(0x7f80_0000));
        let tiny = self.icmp_lt(amax, c(crate::interp::Q8_ACT_TINY.to_bits() as i64));
        let a = ok(self.b.build_int_truncate(amax, self.cx.i32_type(), ""));
        let a = ok(self.b.build_bit_cast(a, self.f32t(), "")).into_float_value();
        let zero_if_tiny =
            |v: FloatValue<'ctx>| ok(self.b.build_select(tiny, self.fc(0.0), v, "")).into_float_value();
        let d = zero_if_tiny(ok(self.b.build_float_div(a, self.fc(127.0), "")));
        let inv = zero_if_tiny(ok(self.b.build_float_div(self.fc(127.0), a, "")));
        (d, inv, finite)
    }
    /// `round(v · inv)` (to nearest, ties to even) as an integer of `ty`'s width: a
    /// `round_q8` value's integer (`q8_act_scale`).
    pub fn q8_act_int(
        &self,
        v: FloatValue<'ctx>,
        inv: FloatValue<'ctx>,
        ty: IntType<'ctx>,
    ) -> IntValue<'ctx> {
        let r = self.intrinsic("llvm.roundeven", &[self.fmul(v, inv)]);
        ok(self.b.build_float_to_signed_int(r, ty, ""))
    }
    /// The scale of the q8 block holding element `idx`.
    pub fn q8_scale(&self, base: PointerValue<'ctx>, idx: IntValue<'ctx>, scales: usize) -> FloatValue<'ctx> {
        let sp = self.gep(self.cx.i8_type(), base, self.c(scales as i64));
        let block = ok(self.b.build_right_shift(idx, self.c(Q8_BLOCK.trailing_zeros() as i64), false, ""));
        self.ld(sp, block)
    }
    /// `VW` weight elements as `<VW x float>`, from their storage format. For q8, `idx`
    /// is a multiple of `VW`, so the lanes share one block's scale.
    pub fn ldvw(&self, base: PointerValue<'ctx>, idx: IntValue<'ctx>, wf: WFmt) -> VectorValue<'ctx> {
        match wf {
            WFmt::F32 => self.ldv(base, idx),
            WFmt::Bf16 => {
                let (i16v, i32v) =
                    (self.cx.i16_type().vec_type(VW as u32), self.cx.i32_type().vec_type(VW as u32));
                let p = self.gep(self.cx.i16_type(), base, idx);
                let h = ok(self.b.build_load(i16v, p, ""));
                let _ = h.as_instruction_value().unwrap().set_alignment(2);
                let w = ok(self.b.build_int_z_extend(h.into_vector_value(), i32v, ""));
                let sixteen = VectorType::const_vector(&[self.cx.i32_type().const_int(16, false); VW]);
                let w = ok(self.b.build_left_shift(w, sixteen, ""));
                ok(self.b.build_bit_cast(w, self.vt(), "")).into_vector_value()
            }
            WFmt::Q8 { scales } => {
                let s = self.splat(self.q8_scale(base, idx, scales));
                ok(self.b.build_float_mul(self.ldv_q8_raw(base, idx), s, ""))
            }
            WFmt::Quant(q @ (Quant::Q2_K | Quant::Q3_K)) => {
                // `idx` a multiple of 16: the 16 share a scale, shifts and byte runs.
                let k = |v: u64| VectorType::const_vector(&[self.cx.i32_type().const_int(v, false); VW]);
                let (v, scale, offset) =
                    self.q23k_value(base, idx, q, |at| self.ld_bytes(base, at), k, |s| self.isplat(s));
                let v = ok(self.b.build_signed_int_to_float(v, self.vt(), ""));
                self.fadd(self.fmul(v, self.splat(scale)), self.splat(offset))
            }
            WFmt::Quant(Quant::Q8_0) => {
                // `idx` a multiple of 16: the 16 are consecutive bytes of one block.
                let (at, d) = self.q8_0_element(base, idx);
                let q = ok(self.b.build_signed_int_to_float(self.ld_bytes_as(base, at, true), self.vt(), ""));
                ok(self.b.build_float_mul(q, self.splat(d), ""))
            }
            WFmt::Quant(Quant::Q6_K) => {
                // `idx` a multiple of 16: the 16 share their byte runs, shifts and scale.
                let (lo, hi, scale) = self.q6k_element(base, idx);
                let k = |v: u64| VectorType::const_vector(&[self.cx.i32_type().const_int(v, false); VW]);
                let (ls, hs) = (self.isplat(lo.1), self.isplat(hi.1));
                let q = self.q6_value(self.ld_bytes(base, lo.0), ls, self.ld_bytes(base, hi.0), hs, k);
                let v = ok(self.b.build_signed_int_to_float(q, self.vt(), ""));
                ok(self.b.build_float_mul(v, self.splat(scale), ""))
            }
            WFmt::Quant(q) => {
                // `idx` a multiple of 16: the 16 share a byte run, a half and a scale.
                let (at, shift, scale, offset) = self.q4_element(base, idx, q);
                let v = if q.fifth_bit() {
                    let n =
                        ok(self.b.build_or(self.ld_nibbles(base, at, shift), self.q5_high(base, idx, q), ""));
                    ok(self.b.build_unsigned_int_to_float(n, self.vt(), ""))
                } else {
                    self.ld_nibbles_f(base, at, shift, 0)
                };
                self.fadd(self.fmul(v, self.splat(scale)), self.splat(offset))
            }
        }
    }
    /// 32 `bf16` weights from element `idx` on as two `<VW x float>`: the even elements
    /// (0, 2, …, 30) and the odd ones. One 64-byte load and two integer ops, against two
    /// widening loads and two shifts for the same 32 in order: a bf16 is the high half
    /// of an f32, so an even element is its 32-bit lane shifted up and an odd one is the
    /// lane with its low half cleared.
    pub fn ld_bf16_pairs(
        &self,
        base: PointerValue<'ctx>,
        idx: IntValue<'ctx>,
    ) -> (VectorValue<'ctx>, VectorValue<'ctx>) {
        let i32t = self.cx.i32_type();
        let i32v = i32t.vec_type(VW as u32);
        let p = self.gep(self.cx.i16_type(), base, idx);
        let w = ok(self.b.build_load(i32v, p, ""));
        let _ = w.as_instruction_value().unwrap().set_alignment(2);
        let w = w.into_vector_value();
        let sixteen = VectorType::const_vector(&[i32t.const_int(16, false); VW]);
        let high = VectorType::const_vector(&[i32t.const_int(0xffff_0000, false); VW]);
        let even = ok(self.b.build_left_shift(w, sixteen, ""));
        let odd = ok(self.b.build_and(w, high, ""));
        let f = |v| ok(self.b.build_bit_cast(v, self.vt(), "")).into_vector_value();
        (f(even), f(odd))
    }
    /// Lanes `lanes` of the concatenation `a ++ b` (indices below `VW` pick from `a`).
    pub fn shuffle(&self, a: VectorValue<'ctx>, b: VectorValue<'ctx>, lanes: &[u32]) -> VectorValue<'ctx> {
        let i32t = self.cx.i32_type();
        let mask: Vec<_> = lanes.iter().map(|&l| i32t.const_int(l as u64, false)).collect();
        ok(self.b.build_shuffle_vector(a, b, VectorType::const_vector(&mask), ""))
    }
    /// The transpose of a `VW × VW` block held as `VW` row vectors: `log2 VW` stages, each
    /// swapping one bit of the row index with the same bit of the lane index, one
    /// two-input shuffle per row.
    pub fn transpose(&self, rows: Vec<VectorValue<'ctx>>) -> Vec<VectorValue<'ctx>> {
        let n = VW as u32;
        let mut m = rows;
        let mut bit = 1u32;
        while bit < n {
            m = (0..n)
                .map(|r| {
                    // Row r takes, at each lane c, the element whose row and lane have bit
                    // `bit` exchanged with c's and r's.
                    let (lo, hi) = (m[(r & !bit) as usize], m[(r | bit) as usize]);
                    let lanes: Vec<u32> = (0..n)
                        .map(|c| match (r & bit != 0, c & bit != 0) {
                            (false, false) => c,
                            (false, true) => n + (c ^ bit),
                            (true, false) => c | bit,
                            (true, true) => n + c,
                        })
                        .collect();
                    self.shuffle(lo, hi, &lanes)
                })
                .collect();
            bit <<= 1;
        }
        m
    }
    /// Hints that the cache line at `base + bytes` will be read soon (never faults), into
    /// L1 (for a stream read right away).
    pub fn prefetch(&self, base: PointerValue<'ctx>, bytes: IntValue<'ctx>) {
        self.prefetch_to(base, bytes, 3)
    }
    /// Hints the `lines` cache lines from `base + bytes` on, where the C half found that
    /// prefetching a decode step's weight streams helps on this CPU, into L1 or into L2
    /// as it found faster (`tfc__prefetch`: 0 none, 1 L1, 2 L2, chosen by timing the
    /// first decode step of a process: `run_step` in `support.c`).
    pub fn prefetch_stream(&self, base: PointerValue<'ctx>, bytes: IntValue<'ctx>, lines: usize) {
        let i32t = self.cx.i32_type();
        let g = self.m.get_global("tfc__prefetch").unwrap_or_else(|| {
            let g = self.m.add_global(i32t, None, "tfc__prefetch");
            g.set_linkage(inkwell::module::Linkage::External);
            g.set_visibility(inkwell::GlobalVisibility::Hidden);
            g
        });
        let on = ok(self.b.build_load(i32t, g.as_pointer_value(), "")).into_int_value();
        let to =
            |level: u64| ok(self.b.build_int_compare(IntPredicate::EQ, on, i32t.const_int(level, false), ""));
        let lines = |locality: u64| {
            for line in 0..lines {
                self.prefetch_to(base, self.add(bytes, self.c(64 * line as i64)), locality);
            }
        };
        self.if_(to(1), || lines(3));
        self.if_(to(2), || lines(2));
    }
    /// Likewise into L2 only (for data read after what fills L1 now).
    pub fn prefetch_l2(&self, base: PointerValue<'ctx>, bytes: IntValue<'ctx>) {
        self.prefetch_to(base, bytes, 2)
    }
    /// `locality` as `llvm.prefetch` takes it: 3 is every level (x86's T0), 2 L2 and out (T1).
    fn prefetch_to(&self, base: PointerValue<'ctx>, bytes: IntValue<'ctx>, locality: u64) {
        // A plain (not in-bounds) GEP: the address may lie past the end of the tensor.
        // SAFETY: the pointer is only handed to a prefetch, which never dereferences it.
        let p = unsafe { ok(self.b.build_gep(self.cx.i8_type(), base, &[bytes], "")) };
        let f =
            Intrinsic::find("llvm.prefetch").unwrap().get_declaration(self.m, &[self.ptrt().into()]).unwrap();
        let i32t = self.cx.i32_type();
        let (read, keep, data) =
            (i32t.const_zero(), i32t.const_int(locality, false), i32t.const_int(1, false));
        ok(self.b.build_call(f, &[p.into(), read.into(), keep.into(), data.into()], ""));
    }
    /// `VW` int8 weights from element `idx` on as `<VW x float>`, unscaled.
    pub fn ldv_q8_raw(&self, base: PointerValue<'ctx>, idx: IntValue<'ctx>) -> VectorValue<'ctx> {
        let i8v = self.cx.i8_type().vec_type(VW as u32);
        let q = ok(self.b.build_load(i8v, self.gep(self.cx.i8_type(), base, idx), ""));
        let _ = q.as_instruction_value().unwrap().set_alignment(1);
        ok(self.b.build_signed_int_to_float(q.into_vector_value(), self.vt(), ""))
    }
    pub fn vmul(&self, a: VectorValue<'ctx>, b: VectorValue<'ctx>) -> VectorValue<'ctx> {
        ok(self.b.build_float_mul(a, b, ""))
    }
    pub fn vt(&self) -> VectorType<'ctx> {
        self.f32t().vec_type(VW as u32)
    }
    pub fn vzero(&self) -> VectorValue<'ctx> {
        self.vt().const_zero()
    }
    /// A vector with every lane `x`.
    pub fn splat(&self, x: FloatValue<'ctx>) -> VectorValue<'ctx> {
        let one = ok(self.b.build_insert_element(self.vt().get_undef(), x, self.c(0), ""));
        let mask = self.cx.i32_type().vec_type(VW as u32).const_zero();
        ok(self.b.build_shuffle_vector(one, self.vt().get_undef(), mask, ""))
    }
    /// `a·b + c`, lane-wise: fused where the CPU has FMA (`llvm.fmuladd`; `llvm.fma`
    /// would make a baseline x86-64 build call `fmaf` for every lane).
    pub fn vfma(
        &self,
        a: VectorValue<'ctx>,
        b: VectorValue<'ctx>,
        c: VectorValue<'ctx>,
    ) -> VectorValue<'ctx> {
        let f =
            Intrinsic::find("llvm.fmuladd").unwrap().get_declaration(self.m, &[self.vt().into()]).unwrap();
        ok(self.b.build_call(f, &[a.into(), b.into(), c.into()], ""))
            .try_as_basic_value()
            .basic()
            .unwrap()
            .into_vector_value()
    }
    pub fn vadd(&self, a: VectorValue<'ctx>, b: VectorValue<'ctx>) -> VectorValue<'ctx> {
        ok(self.b.build_float_add(a, b, ""))
    }

    /// The sum of a vector's lanes (in any order).
    pub fn vsum(&self, v: VectorValue<'ctx>) -> FloatValue<'ctx> {
        let f = Intrinsic::find("llvm.vector.reduce.fadd")
            .unwrap()
            .get_declaration(self.m, &[self.vt().into()])
            .unwrap();
        let r = ok(self.b.build_call(f, &[self.fc(0.0).into(), v.into()], ""));
        let flags =
            inkwell::values::FastMathFlags::AllowReassoc | inkwell::values::FastMathFlags::AllowContract;
        let _ = r
            .try_as_basic_value()
            .basic()
            .unwrap()
            .as_instruction_value()
            .unwrap()
            .set_fast_math_flags(flags);
        r.try_as_basic_value().basic().unwrap().into_float_value()
    }

    /// The lane sums of `VW` vectors, as one vector (lane `j` is the sum of `vs[j]`): a
    /// transpose-and-add tree, `log2 VW` levels that each pair vectors holding `g` partial
    /// sums per vector of the input into ones holding `g / 2` per input, three ops a pair
    /// (45 in all, against about 9 for each horizontal sum on its own).
    pub fn lane_sums(&self, vs: Vec<VectorValue<'ctx>>) -> VectorValue<'ctx> {
        assert_eq!(vs.len(), VW, "bug: lane_sums takes one vector per lane");
        let mut level = vs;
        let mut g = VW as u32;
        while level.len() > 1 {
            // Each vector holds VW / g inputs, g lanes each; a pair's result holds the
            // first vector's inputs then the second's, g / 2 lanes each.
            let half = |second: bool| -> Vec<u32> {
                (0..2)
                    .flat_map(|src| {
                        (0..VW as u32 / g).flat_map(move |k| {
                            let start = src * VW as u32 + k * g + if second { g / 2 } else { 0 };
                            start..start + g / 2
                        })
                    })
                    .collect()
            };
            let (lo, hi) = (half(false), half(true));
            level = level
                .chunks(2)
                .map(|p| self.vadd(self.shuffle(p[0], p[1], &lo), self.shuffle(p[0], p[1], &hi)))
                .collect();
            g /= 2;
        }
        level[0]
    }
    /// The largest lane.
    pub fn vmax(&self, v: VectorValue<'ctx>) -> FloatValue<'ctx> {
        let f = Intrinsic::find("llvm.vector.reduce.fmax")
            .unwrap()
            .get_declaration(self.m, &[self.vt().into()])
            .unwrap();
        ok(self.b.build_call(f, &[v.into()], "")).try_as_basic_value().basic().unwrap().into_float_value()
    }
    pub fn vsub(&self, a: VectorValue<'ctx>, b: VectorValue<'ctx>) -> VectorValue<'ctx> {
        ok(self.b.build_float_sub(a, b, ""))
    }
    /// Lane `j` of `v`.
    pub fn lane(&self, v: VectorValue<'ctx>, j: usize) -> FloatValue<'ctx> {
        ok(self.b.build_extract_element(v, self.cx.i32_type().const_int(j as u64, false), ""))
            .into_float_value()
    }
    /// `<0, 1, …, VW - 1>` as floats.
    pub fn iota(&self) -> VectorValue<'ctx> {
        let lanes: Vec<_> = (0..VW).map(|j| self.fc(j as f64)).collect();
        VectorType::const_vector(&lanes)
    }

    /// `e^x` in `f32` from arithmetic alone (no call), so loops over it vectorise:
    /// `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2` (Cody–Waite, two-part `ln 2`), `e^r` by its
    /// Taylor polynomial to degree 7 (truncation below 6e-9 relative), and `2^n` as two
    /// exponent-field halves so results down to the subnormals need no special case.
    /// Within 1 ulp of the exact value (0.91 at worst over 2·10⁶ points of [-103, 88.7]);
    /// `±∞` and NaN come out as IEEE `exp` gives them. Of one value, or lane by lane.
    pub fn exp<V: F32s<'ctx>>(&self, x: V) -> V {
        let lt = |a: V, b: V| ok(self.b.build_float_compare(FloatPredicate::OLT, a, b, ""));
        let sel = |c, a: V, b: V| V::of(ok(self.b.build_select(c, a, b, "")));
        let k = |v: f64| V::k(self, v);
        let call = |name: &str, args: &[V]| {
            let f = Intrinsic::find(name).unwrap().get_declaration(self.m, &[V::ty(self)]).unwrap();
            let args: Vec<BasicMetadataValueEnum> =
                args.iter().map(|a| a.as_basic_value_enum().into()).collect();
            V::of(ok(self.b.build_call(f, &args, "")).try_as_basic_value().basic().unwrap())
        };
        // Fused where the CPU has FMA; a library's baseline x86-64 code has none.
        let fma = |a: V, b: V, c: V| call("llvm.fmuladd", &[a, b, c]);
        // Beyond these, e^x is 0 or ∞ in f32; NaN fails both compares and stays NaN.
        let (lo, hi) = (k(-104.0), k(89.0));
        let xc = sel(lt(x, lo), lo, sel(lt(hi, x), hi, x));
        // n = rint(x·log2 e), as (v + 1.5·2^23) - 1.5·2^23: exact for |v| < 2^22, as fast
        // as a round instruction, and without the `rintf` calls that `llvm.rint` becomes
        // on baseline x86-64 (no SSE4.1). Plain adds: no flag may fold them away.
        let v = ok(self.b.build_float_mul(xc, k(std::f64::consts::LOG2_E), ""));
        let magic = k(12_582_912.0);
        let n = ok(self.b.build_float_sub(ok(self.b.build_float_add(v, magic, "")), magic, ""));
        // ln 2 = LN2_HI + LN2_LO with LN2_HI exact in 16 bits, so n·LN2_HI is exact.
        let neg_n = ok(self.b.build_float_neg(n, ""));
        let r = fma(neg_n, k(0.693_145_751_953_125), xc);
        let r = fma(neg_n, k(1.428_606_765_330_187e-6), r);
        let mut p = k(1.0 / 5040.0);
        for j in (0..7).rev() {
            let coef = 1.0 / (1..=j).map(|i| i as f64).product::<f64>();
            p = fma(p, r, k(coef));
        }
        // 2^n = 2^h · 2^(n-h), each factor's exponent inside [-75, 64].
        let ni = V::to_i32(self, n);
        let h = ok(self.b.build_right_shift(ni, V::ki(self, 1), true, ""));
        let pow2 = |e: V::I| {
            let biased = ok(self.b.build_int_add(e, V::ki(self, 127), ""));
            let bits = ok(self.b.build_left_shift(biased, V::ki(self, 23), ""));
            V::of(ok(self.b.build_bit_cast(bits, V::ty(self), "")))
        };
        let rest = ok(self.b.build_int_sub(ni, h, ""));
        // The clamp's upper end already overflows to ∞, so x = +∞ gives ∞.
        ok(self.b.build_float_mul(ok(self.b.build_float_mul(p, pow2(h), "")), pow2(rest), ""))
    }
    /// `x` rounded to the nearest `bf16` (ties to even), as `f32`: `half::bf16::from_f32`
    /// exactly, NaN kept quiet. The operand of a bf16 linear map (see `ir::op`).
    pub fn round_bf16<V: F32s<'ctx>>(&self, x: V) -> V {
        let b = &self.b;
        let ki = |v: u64| V::ki(self, v);
        let bits = V::of_i(ok(b.build_bit_cast(x, V::ity(self), "")));
        let lsb = ok(b.build_and(ok(b.build_right_shift(bits, ki(16), false, "")), ki(1), ""));
        let up = ok(b.build_int_add(ok(b.build_int_add(bits, ki(0x7fff), "")), lsb, ""));
        let high = ki(0xffff_0000);
        let rounded = ok(b.build_and(up, high, ""));
        let mag = ok(b.build_and(bits, ki(0x7fff_ffff), ""));
        let nan = ok(b.build_int_compare(IntPredicate::UGT, mag, ki(0x7f80_0000), ""));
        let quiet = ok(b.build_and(ok(b.build_or(bits, ki(0x0040_0000), "")), high, ""));
        let r = ok(b.build_select(nan, quiet, rounded, ""));
        V::of(ok(b.build_bit_cast(r, V::ty(self), "")))
    }
    /// Calls an external C function `double name(double)`.
    pub fn libm(&self, name: &str, x: FloatValue<'ctx>) -> FloatValue<'ctx> {
        let f = self.m.get_function(name).unwrap_or_else(|| {
            let ty = self.f64t().fn_type(&[BasicMetadataTypeEnum::FloatType(self.f64t())], false);
            self.m.add_function(name, ty, None)
        });
        ok(self.b.build_call(f, &[x.into()], "")).try_as_basic_value().basic().unwrap().into_float_value()
    }

    /// `for i in lo..hi { body(i) }`.
    pub fn for_(&self, lo: IntValue<'ctx>, hi: IntValue<'ctx>, body: impl FnOnce(IntValue<'ctx>)) {
        self.fold(lo, hi, &[], |i, _| {
            body(i);
            vec![]
        });
    }

    /// A counted loop carrying values: `acc = body(i, acc)` for `i in lo..hi`; returns the
    /// final values.
    pub fn fold(
        &self,
        lo: IntValue<'ctx>,
        hi: IntValue<'ctx>,
        init: &[BasicValueEnum<'ctx>],
        body: impl FnOnce(IntValue<'ctx>, &[BasicValueEnum<'ctx>]) -> Vec<BasicValueEnum<'ctx>>,
    ) -> Vec<BasicValueEnum<'ctx>> {
        let pre = self.b.get_insert_block().unwrap();
        let head = self.cx.append_basic_block(self.f, "loop");
        let bodyb = self.cx.append_basic_block(self.f, "body");
        let exit = self.cx.append_basic_block(self.f, "exit");
        ok(self.b.build_unconditional_branch(head));
        self.b.position_at_end(head);
        let i = ok(self.b.build_phi(self.i64t(), "i"));
        i.add_incoming(&[(&lo, pre)]);
        let phis: Vec<_> = init
            .iter()
            .map(|v| {
                let p = ok(self.b.build_phi(v.get_type(), ""));
                p.add_incoming(&[(v, pre)]);
                p
            })
            .collect();
        let iv = i.as_basic_value().into_int_value();
        let cond = ok(self.b.build_int_compare(IntPredicate::SLT, iv, hi, ""));
        ok(self.b.build_conditional_branch(cond, bodyb, exit));
        self.b.position_at_end(bodyb);
        let cur: Vec<BasicValueEnum> = phis.iter().map(|p| p.as_basic_value()).collect();
        let next = body(iv, &cur);
        let latch = self.b.get_insert_block().unwrap();
        let inc = self.add(iv, self.c(1));
        i.add_incoming(&[(&inc, latch)]);
        for (p, v) in phis.iter().zip(&next) {
            p.add_incoming(&[(v, latch)]);
        }
        ok(self.b.build_unconditional_branch(head));
        self.b.position_at_end(exit);
        cur
    }

    /// Runs `then` where `cond` holds and `otherwise` where it does not (`choose`
    /// without values).
    pub fn if_else(&self, cond: IntValue<'ctx>, then: impl FnOnce(), otherwise: impl FnOnce()) {
        self.choose(
            cond,
            || {
                then();
                vec![]
            },
            || {
                otherwise();
                vec![]
            },
        );
    }

    /// `if cond { then() } else { otherwise() }` as a branch, for values: each arm
    /// returns as many values, of the same types, and the join has their phis.
    pub fn choose(
        &self,
        cond: IntValue<'ctx>,
        then: impl FnOnce() -> Vec<BasicValueEnum<'ctx>>,
        otherwise: impl FnOnce() -> Vec<BasicValueEnum<'ctx>>,
    ) -> Vec<BasicValueEnum<'ctx>> {
        let (yes, no) =
            (self.cx.append_basic_block(self.f, "then"), self.cx.append_basic_block(self.f, "else"));
        let join = self.cx.append_basic_block(self.f, "join");
        ok(self.b.build_conditional_branch(cond, yes, no));
        self.b.position_at_end(yes);
        let a = then();
        let a_end = self.b.get_insert_block().unwrap();
        ok(self.b.build_unconditional_branch(join));
        self.b.position_at_end(no);
        let b = otherwise();
        let b_end = self.b.get_insert_block().unwrap();
        ok(self.b.build_unconditional_branch(join));
        self.b.position_at_end(join);
        assert_eq!(a.len(), b.len(), "both arms of a branch give as many values");
        a.iter()
            .zip(&b)
            .map(|(x, y)| {
                let p = ok(self.b.build_phi(x.get_type(), ""));
                p.add_incoming(&[(x, a_end), (y, b_end)]);
                p.as_basic_value()
            })
            .collect()
    }

    /// `if cond { body() }`, for side effects only.
    pub fn if_(&self, cond: IntValue<'ctx>, body: impl FnOnce()) {
        let then = self.cx.append_basic_block(self.f, "then");
        let join = self.cx.append_basic_block(self.f, "join");
        ok(self.b.build_conditional_branch(cond, then, join));
        self.b.position_at_end(then);
        body();
        ok(self.b.build_unconditional_branch(join));
        self.b.position_at_end(join);
    }

    /// `Σ body(i)` over `lo..hi` in `f32`, reassociable so that it vectorises.
    pub fn sum(
        &self,
        lo: IntValue<'ctx>,
        hi: IntValue<'ctx>,
        body: impl FnOnce(IntValue<'ctx>) -> FloatValue<'ctx>,
    ) -> FloatValue<'ctx> {
        let r = self.fold(lo, hi, &[self.fc(0.0).into()], |i, acc| {
            let v = body(i);
            vec![self.fadd(acc[0].into_float_value(), v).into()]
        });
        r[0].into_float_value()
    }

    pub fn ret(&self) {
        ok(self.b.build_return(None));
    }
}

/// What the lane-generic routines (`Kb::exp`) compute on: one `f32`, or `<VW x float>`.
pub trait F32s<'ctx>: FloatMathValue<'ctx> + BasicValue<'ctx> + Copy {
    /// `i32` lanes of the same shape.
    type I: IntMathValue<'ctx> + BasicValue<'ctx> + Copy;
    /// `v` in every lane.
    fn k(kb: &Kb<'_, 'ctx>, v: f64) -> Self;
    fn ki(kb: &Kb<'_, 'ctx>, v: u64) -> Self::I;
    fn ty(kb: &Kb<'_, 'ctx>) -> BasicTypeEnum<'ctx>;
    fn to_i32(kb: &Kb<'_, 'ctx>, x: Self) -> Self::I;
    fn of(v: BasicValueEnum<'ctx>) -> Self;
    /// The type of `Self::I`, and a value of it.
    fn ity(kb: &Kb<'_, 'ctx>) -> BasicTypeEnum<'ctx>;
    fn of_i(v: BasicValueEnum<'ctx>) -> Self::I;
}

impl<'ctx> F32s<'ctx> for FloatValue<'ctx> {
    type I = IntValue<'ctx>;
    fn k(kb: &Kb<'_, 'ctx>, v: f64) -> Self {
        kb.fc(v)
    }
    fn ki(kb: &Kb<'_, 'ctx>, v: u64) -> IntValue<'ctx> {
        kb.cx.i32_type().const_int(v, false)
    }
    fn ty(kb: &Kb<'_, 'ctx>) -> BasicTypeEnum<'ctx> {
        kb.f32t().into()
    }
    fn to_i32(kb: &Kb<'_, 'ctx>, x: Self) -> IntValue<'ctx> {
        ok(kb.b.build_float_to_signed_int(x, kb.cx.i32_type(), ""))
    }
    fn of(v: BasicValueEnum<'ctx>) -> Self {
        v.into_float_value()
    }
    fn ity(kb: &Kb<'_, 'ctx>) -> BasicTypeEnum<'ctx> {
        kb.cx.i32_type().into()
    }
    fn of_i(v: BasicValueEnum<'ctx>) -> IntValue<'ctx> {
        v.into_int_value()
    }
}

impl<'ctx> F32s<'ctx> for VectorValue<'ctx> {
    type I = VectorValue<'ctx>;
    fn k(kb: &Kb<'_, 'ctx>, v: f64) -> Self {
        VectorType::const_vector(&[kb.fc(v); VW])
    }
    fn ki(kb: &Kb<'_, 'ctx>, v: u64) -> VectorValue<'ctx> {
        VectorType::const_vector(&[kb.cx.i32_type().const_int(v, false); VW])
    }
    fn ty(kb: &Kb<'_, 'ctx>) -> BasicTypeEnum<'ctx> {
        kb.vt().into()
    }
    fn to_i32(kb: &Kb<'_, 'ctx>, x: Self) -> VectorValue<'ctx> {
        ok(kb.b.build_float_to_signed_int(x, kb.cx.i32_type().vec_type(VW as u32), ""))
    }
    fn of(v: BasicValueEnum<'ctx>) -> Self {
        v.into_vector_value()
    }
    fn ity(kb: &Kb<'_, 'ctx>) -> BasicTypeEnum<'ctx> {
        kb.cx.i32_type().vec_type(VW as u32).into()
    }
    fn of_i(v: BasicValueEnum<'ctx>) -> VectorValue<'ctx> {
        v.into_vector_value()
    }
}
