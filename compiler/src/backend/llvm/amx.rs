//! The AMX-BF16 GEMM of bf16 linear maps over many rows (prefill).
//!
//! `tdpbf16ps` multiplies a 16 × 32 bf16 tile by a 32 × 16 one into a 16 × 16 f32 tile,
//! the second operand in VNNI layout (row `p` holds the pairs `k = 2p, 2p + 1` of every
//! column). The products stay those of bf16 weights and f32 activations, as in every
//! other engine: each activation is split once per linear map (`pack_x`) into three bf16
//! parts whose sum is exactly the f32 value (8 significant bits each; only parts below
//! 2⁻¹²⁶, which the tiles read as zero, are lost), and each weight tile is multiplied by
//! all three. A bf16 × bf16 product is exact in f32, so this is the f32 product summed
//! in another order, at three times the tile work of rounding the activations. An input
//! that is a `round_bf16` (`activations = bf16`) is bf16 already: one part.
//!
//! Every tile operand is contiguous (1 KB; tile rows far apart stalled the loads):
//! - `W [out, in]`: `Cᵀ = W · Xᵀ`. Weights in the tile layout (`weights::Tiles`, re-packed
//!   when bound; `[in, out]` ones arrive transposed) are read in place; others are copied
//!   by each task, a chunk of `in` at a time, into tiles. The activations are packed as
//!   VNNI pairs of 16 rows. Each `Cᵀ` tile is transposed through registers on its way out.
//! - `W [in, out]` as stored: `C = X · W`. Each task packs its columns of each chunk into
//!   VNNI pairs; the activations are packed as tiles of 16 rows × 32 inputs.
//!
//! Rows are padded to a multiple of 32 with zeros, so every tile has its full shape and
//! the tile configuration is constant. Per 16 rows and 64 columns: four accumulator
//! tiles, the part tiles of the activations (three, or one under `activations = bf16`,
//! whose inputs are bf16 already) and one weight tile at a time, at most the eight tiles
//! AMX has.
//!
//! The tile intrinsics take LLVM's `x86_amx` type, which inkwell cannot name; they are
//! wrapped in small always-inlined functions on `<256 x i32>` (the pattern clang emits),
//! parsed from text. Everything that touches a tile is marked `"tfc-amx"`: the baseline
//! fallback copy of a library replaces those functions (`strip`), and at run time they
//! do nothing unless the C half found AMX usable (`tfc__amx_ok`, set once the kernel has
//! granted the process the tile state); the linear kernel then takes the AVX-512 GEMM.
//!
//! ## Layout and schedule, as measured
//!
//! Every tile operand is contiguous (1 KB): with tile rows 4–11 KB apart the loads
//! stalled (W1's prefill: 137 ms, 85 once the activations were tile-contiguous). The GEMM
//! runs in chunks of 256 inputs; a task takes up to four 64-column blocks while sixteen
//! tasks or more remain (eight, where a row's packed activations exceed 8 KB, since each
//! task reads them all: `amx::groups`; W1's 2304-wide map in nine tasks left one thread
//! idle for much of one, and sixteen or more made its prefill ×1.06–1.10 faster) and
//! reads each chunk of its weights as tiles: in place from the
//! bind-time tiles, or, for a weight left as stored, packed per chunk (a copy for
//! `[out, in]`, VNNI pairs for `[in, out]`), so a chunk's weights and activations stay in
//! L2, the activations are read once per task, and accumulators wait between chunks in
//! an arena region after the planned values (the first chunk starts from zero tiles:
//! tile stores and loads wait for the products in flight, ~3 ns per product in a C loop
//! that stored and reloaded four accumulators every 32, so none are zeroed in memory). The packed activations share that region:
//! only packing writes it, so the linear maps of one input (q, k, v; gate, up) pack it
//! once. Packing transposes 16-row tiles in registers (one tile per task: rows of one
//! tile share cache lines, and splitting them between cores made packing a quarter of
//! W2's prefill). A map on tiles whose epilogue ends in a rounding to bf16, and whose
//! value only `[out, in]` maps on tiles read (GPT-2's up projection, LLaMA's up times
//! SiLU of gate), writes that value straight as their packed one-part input
//! (`amx::Amx::to_tiles`, `select::tile_outputs`): a `Cᵀ` tile's rows `2p, 2p + 1`
//! interleaved are pair row `p`, so there is no f32 output and no packing pass. It
//! goes to a second region, written only after the last reader of the one before; with
//! tiles off, both maps take the AVX-512 GEMM and the f32 rows as before.

use inkwell::attributes::AttributeLoc;
use inkwell::context::Context;
use inkwell::module::{Linkage, Module};
use inkwell::values::{
    BasicMetadataValueEnum, BasicValue, FunctionValue, IntValue, PointerValue, VectorValue,
};
use inkwell::GlobalVisibility;

use super::elementwise::{epilogue_v, epilogue_vectorises, epilogue_with};
use super::kb::{Kb, VW};
use crate::backend::plan::Epi;
use crate::backend::weights;

/// The marker attribute of functions that execute tile instructions.
pub const ATTR: &str = "tfc-amx";
/// Rows of the padded activation block, and of an output block.
pub const MB: usize = 32;

/// Whether a bf16 linear map of `inn` inputs and `out` outputs gets the AMX GEMM: those
/// whose weights fit the tile layout.
pub fn fits(inn: usize, out: usize) -> bool {
    weights::Tiles::fits(inn, out)
}

/// The bf16 parts an f32 activation is split into; an activation already rounded to
/// bf16 (`activations = bf16`) is one part.
pub const PARTS: usize = 3;

/// Bytes of the packed activations for `rows` rows of `inn` inputs in `parts` parts.
pub fn packed_bytes(rows: usize, inn: usize, parts: usize) -> usize {
    parts * rows.div_ceil(MB) * MB * inn * 2
}

const WRAPPERS: &str = r#"
declare x86_amx @llvm.x86.tileloadd64.internal(i16, i16, ptr, i64)
declare x86_amx @llvm.x86.tdpbf16ps.internal(i16, i16, i16, x86_amx, x86_amx, x86_amx)
declare void @llvm.x86.tilestored64.internal(i16, i16, ptr, i64, x86_amx)
declare x86_amx @llvm.x86.tilezero.internal(i16, i16)
declare <256 x i32> @llvm.x86.cast.tile.to.vector.v256i32(x86_amx)
declare x86_amx @llvm.x86.cast.vector.to.tile.v256i32(<256 x i32>)

define <256 x i32> @tfc_amx.load(ptr %p, i64 %stride) #0 {
  %t = call x86_amx @llvm.x86.tileloadd64.internal(i16 16, i16 64, ptr %p, i64 %stride)
  %v = call <256 x i32> @llvm.x86.cast.tile.to.vector.v256i32(x86_amx %t)
  ret <256 x i32> %v
}
define <256 x i32> @tfc_amx.zero() #0 {
  %t = call x86_amx @llvm.x86.tilezero.internal(i16 16, i16 64)
  %v = call <256 x i32> @llvm.x86.cast.tile.to.vector.v256i32(x86_amx %t)
  ret <256 x i32> %v
}
define <256 x i32> @tfc_amx.dp(<256 x i32> %c, <256 x i32> %a, <256 x i32> %b) #0 {
  %tc = call x86_amx @llvm.x86.cast.vector.to.tile.v256i32(<256 x i32> %c)
  %ta = call x86_amx @llvm.x86.cast.vector.to.tile.v256i32(<256 x i32> %a)
  %tb = call x86_amx @llvm.x86.cast.vector.to.tile.v256i32(<256 x i32> %b)
  %r = call x86_amx @llvm.x86.tdpbf16ps.internal(i16 16, i16 64, i16 64, x86_amx %tc, x86_amx %ta, x86_amx %tb)
  %v = call <256 x i32> @llvm.x86.cast.tile.to.vector.v256i32(x86_amx %r)
  ret <256 x i32> %v
}
define void @tfc_amx.store(ptr %p, i64 %stride, <256 x i32> %c) #0 {
  %t = call x86_amx @llvm.x86.cast.vector.to.tile.v256i32(<256 x i32> %c)
  call void @llvm.x86.tilestored64.internal(i16 16, i16 64, ptr %p, i64 %stride, x86_amx %t)
  ret void
}
attributes #0 = { alwaysinline nounwind "tfc-amx" }
"#;

/// The tile wrappers, linked into `m` on first use.
fn wrapper<'ctx>(cx: &'ctx Context, m: &Module<'ctx>, name: &str) -> FunctionValue<'ctx> {
    if let Some(f) = m.get_function(name) {
        return f;
    }
    let buf = inkwell::memory_buffer::MemoryBuffer::create_from_memory_range_copy(WRAPPERS.as_bytes(), "amx");
    let w = cx.create_module_from_ir(buf).expect("the AMX wrappers parse");
    m.link_in_module(w).expect("the AMX wrappers link");
    // External in the text, since the linker drops internal definitions nothing uses yet.
    for n in ["tfc_amx.load", "tfc_amx.zero", "tfc_amx.dp", "tfc_amx.store"] {
        m.get_function(n).expect("the AMX wrappers define it").set_linkage(Linkage::Internal);
    }
    m.get_function(name).expect("the AMX wrappers define it")
}

/// Marks `f` as executing tile instructions.
pub fn mark(cx: &Context, f: FunctionValue) {
    f.add_attribute(AttributeLoc::Function, cx.create_string_attribute(ATTR, ""));
}

/// Whether the C half found AMX usable: `tfc__amx_ok != 0`.
fn enabled<'ctx>(kb: &Kb<'_, 'ctx>) -> IntValue<'ctx> {
    let i32t = kb.cx.i32_type();
    let g = kb.m.get_global("tfc__amx_ok").unwrap_or_else(|| {
        let g = kb.m.add_global(i32t, None, "tfc__amx_ok");
        g.set_linkage(Linkage::External);
        g.set_visibility(GlobalVisibility::Hidden);
        g
    });
    let v = kb.b.build_load(i32t, g.as_pointer_value(), "").unwrap().into_int_value();
    kb.b.build_int_compare(inkwell::IntPredicate::NE, v, i32t.const_zero(), "").unwrap()
}

struct Tiles<'a, 'b, 'ctx> {
    kb: &'a Kb<'b, 'ctx>,
    load: FunctionValue<'ctx>,
    zero: FunctionValue<'ctx>,
    dp: FunctionValue<'ctx>,
    store: FunctionValue<'ctx>,
}

impl<'a, 'b, 'ctx> Tiles<'a, 'b, 'ctx> {
    fn new(kb: &'a Kb<'b, 'ctx>) -> Self {
        let w = |n: &str| wrapper(kb.cx, kb.m, n);
        Tiles {
            kb,
            load: w("tfc_amx.load"),
            zero: w("tfc_amx.zero"),
            dp: w("tfc_amx.dp"),
            store: w("tfc_amx.store"),
        }
    }
    fn call(
        &self,
        f: FunctionValue<'ctx>,
        args: &[BasicMetadataValueEnum<'ctx>],
    ) -> Option<VectorValue<'ctx>> {
        let r = self.kb.b.build_call(f, args, "").unwrap();
        r.try_as_basic_value().basic().map(|v| v.into_vector_value())
    }
    /// The contiguous tile at byte `off` of `base`.
    fn load(&self, base: PointerValue<'ctx>, off: IntValue<'ctx>) -> VectorValue<'ctx> {
        let p = self.kb.gep(self.kb.cx.i8_type(), base, off);
        self.call(self.load, &[p.into(), self.kb.c(64).into()]).unwrap()
    }
    fn zero(&self) -> VectorValue<'ctx> {
        self.call(self.zero, &[]).unwrap()
    }
    fn dp(&self, c: VectorValue<'ctx>, a: VectorValue<'ctx>, b: VectorValue<'ctx>) -> VectorValue<'ctx> {
        self.call(self.dp, &[c.into(), a.into(), b.into()]).unwrap()
    }
    /// Stores a tile contiguously at `p`.
    fn store(&self, p: PointerValue<'ctx>, c: VectorValue<'ctx>) {
        self.call(self.store, &[p.into(), self.kb.c(64).into(), c.into()]);
    }
}

/// `rows` rounded up to the padded block.
pub fn padded<'ctx>(kb: &Kb<'_, 'ctx>, rows: IntValue<'ctx>) -> IntValue<'ctx> {
    kb.mul(kb.udiv(kb.add(rows, kb.c(MB as i64 - 1)), kb.c(MB as i64)), kb.c(MB as i64))
}

/// 32 elements of `x` from `idx` as bf16 pairs, one vector per part: lane `j` holds the
/// part of elements `2j` (low half) and `2j + 1` (high half). Parts: `hi` the nearest
/// bf16, `mid` the nearest bf16 to the rest, `lo` what is left, exact in bf16; the first
/// `parts` of them.
fn pairs<'ctx>(
    kb: &Kb<'_, 'ctx>,
    x: PointerValue<'ctx>,
    idx: IntValue<'ctx>,
    parts: usize,
) -> Vec<VectorValue<'ctx>> {
    let i32v = kb.cx.i32_type().vec_type(VW as u32);
    let split = |v: VectorValue<'ctx>| {
        let hi = kb.round_bf16(v);
        if parts == 1 {
            return vec![hi];
        }
        let r = kb.vsub(v, hi);
        let mid = kb.round_bf16(r);
        vec![hi, mid, kb.vsub(r, mid)]
    };
    let a = split(kb.ldv(x, idx));
    let b = split(kb.ldv(x, kb.add(idx, kb.c(VW as i64))));
    let even: Vec<u32> = (0..VW as u32).map(|k| 2 * k).collect();
    let odd: Vec<u32> = (0..VW as u32).map(|k| 2 * k + 1).collect();
    let bits = |v| kb.b.build_bit_cast(v, i32v, "").unwrap().into_vector_value();
    let k = |v: u64| inkwell::types::VectorType::const_vector(&[kb.cx.i32_type().const_int(v, false); VW]);
    (0..parts)
        .map(|q| {
            let (e, o) = (bits(kb.shuffle(a[q], b[q], &even)), bits(kb.shuffle(a[q], b[q], &odd)));
            let lo = kb.b.build_right_shift(e, k(16), false, "").unwrap();
            let hi = kb.b.build_and(o, k(0xffff_0000), "").unwrap();
            kb.b.build_or(lo, hi, "").unwrap()
        })
        .collect()
}

/// The body of the packing kernel: args x, packed, rows; tasks: tiles of 16 padded rows.
/// Each row of `x` split into its bf16 parts, each part in 1 KB tiles, one part after
/// the other: tile `(in / 32, row tile)` holds 16 VNNI pair rows × 16 rows of `x` (for
/// `W [out, in]`), tile `(row tile, in / 32)` 16 rows × 32 inputs (for `W [in, out]`).
/// Padding rows are zero.
pub fn pack_x<'ctx>(
    kb: &Kb<'_, 'ctx>,
    inn: usize,
    transposed: bool,
    parts: usize,
    args: (PointerValue<'ctx>, PointerValue<'ctx>, IntValue<'ctx>),
    begin: IntValue<'ctx>,
    end: IntValue<'ctx>,
) {
    mark(kb.cx, kb.f);
    let (x, xp, rows) = args;
    let c = |v: usize| kb.c(v as i64);
    kb.if_(enabled(kb), || {
        let mp = padded(kb, rows);
        let i32t = kb.cx.i32_type();
        let i32v = i32t.vec_type(VW as u32);
        let part_len = kb.mul(mp, c(inn / 2));
        // A task is a tile of 16 rows: rows of one tile share its cache lines.
        kb.for_(begin, end, |mt| {
            // Row r of the tile as pairs; a padding row reads row 0 (any valid row), gives zeros.
            let row = |r: IntValue<'ctx>, g: IntValue<'ctx>| {
                let m = kb.add(kb.mul(mt, c(16)), r);
                let live = kb.b.build_int_compare(inkwell::IntPredicate::SLT, m, rows, "").unwrap();
                let src = kb.b.build_select(live, m, c(0), "").unwrap().into_int_value();
                let ps = pairs(kb, x, kb.add(kb.mul(src, c(inn)), kb.mul(g, c(32))), parts);
                ps.into_iter()
                    .map(|v| kb.b.build_select(live, v, i32v.const_zero(), "").unwrap().into_vector_value())
                    .collect::<Vec<_>>()
            };
            kb.for_(c(0), c(inn / 32), |g| {
                if transposed {
                    // Tile (mt, g), row r: the row's pairs as they are.
                    let tile = kb.add(kb.mul(mt, c(inn / 32)), g);
                    kb.for_(c(0), c(16), |r| {
                        for (q, v) in row(r, g).into_iter().enumerate() {
                            let at = kb
                                .add(kb.mul(part_len, c(q)), kb.add(kb.mul(tile, c(256)), kb.mul(r, c(16))));
                            kb.b.build_store(kb.gep(i32t, xp, at), v).unwrap().set_alignment(4).unwrap();
                        }
                    });
                } else {
                    // Tile (g, mt): row j holds pair j of the tile's 16 rows, a transpose.
                    let tile = kb.add(kb.mul(g, kb.udiv(mp, c(16))), mt);
                    let vt = kb.vt();
                    for q in 0..parts {
                        let rows: Vec<_> = (0..16)
                            .map(|r| {
                                let v = row(c(r), g)[q];
                                kb.b.build_bit_cast(v, vt, "").unwrap().into_vector_value()
                            })
                            .collect();
                        for (j, v) in kb.transpose(rows).into_iter().enumerate() {
                            let at = kb.add(kb.mul(part_len, c(q)), kb.add(kb.mul(tile, c(256)), c(16 * j)));
                            kb.b.build_store(kb.gep(i32t, xp, at), v).unwrap().set_alignment(4).unwrap();
                        }
                    }
                }
            });
        });
    });
}

/// How one linear map runs on tiles.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Amx {
    /// The activation parts (`PARTS`, or 1 for activations rounded to bf16).
    pub parts: usize,
    /// The output, which its epilogue rounds to bf16, is written not as f32 rows but as
    /// the one-part packed activations (`pack_x`) of the `[out, in]` maps that read it,
    /// which then pack nothing. Only when the tiles run: the AVX-512 fallback writes the
    /// f32 rows, and the maps reading them take that fallback too.
    pub to_tiles: bool,
}

/// The shape of one linear map's AMX GEMM.
#[derive(Clone, Copy)]
pub struct Shape {
    pub inn: usize,
    pub n_out: usize,
    pub transposed: bool,
    pub bias: bool,
    /// The weights are in the tile layout (`weights::Tiles`, as `[out, in]`): each weight
    /// tile is read where it is, with nothing to copy.
    pub tiles: bool,
    /// The activation parts, and whether the output goes packed (then `out` is the
    /// packed region).
    pub amx: Amx,
}

/// What the AMX GEMM of one linear map needs: its arguments and its shape.
struct Gemm<'ctx, 'e> {
    x: PointerValue<'ctx>,
    w: PointerValue<'ctx>,
    b: Option<PointerValue<'ctx>>,
    out: PointerValue<'ctx>,
    rows: IntValue<'ctx>,
    s: Shape,
    /// The epilogue applied as each tile is written out (`epilogue_v`), and the other
    /// operand of each of its `Add`/`Mul`s.
    epi: &'e [Epi],
    others: Vec<PointerValue<'ctx>>,
}

/// Emits `i1 name(x, w, [b], out, others…, rows, begin, end)` computing tasks
/// `begin..end` (see `tasks`) of `out = epi(x · W + b)` from the packed `x`, `epi` (which
/// must vectorise: `epilogue_vectorises`) applied to each tile as it is written out, its
/// `Add`/`Mul` operands `others`; it returns false, having done nothing, when AMX is not
/// enabled.
pub fn gemm_fn<'ctx>(
    cx: &'ctx Context,
    m: &Module<'ctx>,
    name: &str,
    s: &Shape,
    epi: &[Epi],
) -> FunctionValue<'ctx> {
    assert!(epilogue_vectorises(epi), "the tile write-out applies only vector epilogues");
    assert!(
        !s.amx.to_tiles || epi.last() == Some(&Epi::RoundBf16),
        "only a value rounded to bf16 is one packed part"
    );
    let bias = s.bias;
    if let Some(f) = m.get_function(name) {
        return f;
    }
    let ptr = cx.ptr_type(inkwell::AddressSpace::default());
    let i64t = cx.i64_type();
    let n_others = epi.iter().filter(|e| matches!(e, Epi::Add | Epi::Mul)).count();
    let mut params: Vec<inkwell::types::BasicMetadataTypeEnum> = vec![ptr.into(), ptr.into()];
    if bias {
        params.push(ptr.into());
    }
    params.extend((0..1 + n_others).map(|_| inkwell::types::BasicMetadataTypeEnum::from(ptr)));
    params.extend::<[inkwell::types::BasicMetadataTypeEnum; 3]>([i64t.into(), i64t.into(), i64t.into()]);
    let f = m.add_function(name, cx.bool_type().fn_type(&params, false), Some(Linkage::Internal));
    mark(cx, f);
    f.add_attribute(AttributeLoc::Function, cx.create_string_attribute("prefer-vector-width", "512"));
    let kb = Kb::new(cx, m, f);
    let pv = |i: u32| f.get_nth_param(i).unwrap();
    let mut i = 0;
    let mut next = || {
        i += 1;
        pv(i - 1)
    };
    let (x, w) = (next().into_pointer_value(), next().into_pointer_value());
    let b = bias.then(|| next().into_pointer_value());
    let out = next().into_pointer_value();
    let others = (0..n_others).map(|_| next().into_pointer_value()).collect();
    let (rows, begin, end) = (next().into_int_value(), next().into_int_value(), next().into_int_value());
    let g = Gemm { x, w, b, out, rows, s: *s, epi, others };
    let on = enabled(&kb);
    let (run, off) = (cx.append_basic_block(f, "amx"), cx.append_basic_block(f, "off"));
    kb.b.build_conditional_branch(on, run, off).unwrap();
    kb.b.position_at_end(off);
    kb.b.build_return(Some(&cx.bool_type().const_zero())).unwrap();
    kb.b.position_at_end(run);
    gemm(&kb, &g, begin, end);
    kb.b.build_return(Some(&cx.bool_type().const_all_ones())).unwrap();
    f
}

/// Rows `r0..r0 + 16` (those below `rows`), columns `col..col + 16` of the output from the
/// f32 tile at `tile` (its transpose with `transpose`), plus the bias, through the
/// epilogue.
fn write_tile<'ctx>(
    kb: &Kb<'_, 'ctx>,
    g: &Gemm<'ctx, '_>,
    tile: PointerValue<'ctx>,
    transpose: bool,
    r0: IntValue<'ctx>,
    col: IntValue<'ctx>,
) {
    let c = |v: usize| kb.c(v as i64);
    if transpose {
        let rows: Vec<_> = (0..VW).map(|r| kb.ldv(tile, c(r * VW))).collect();
        for (r, v) in kb.transpose(rows).into_iter().enumerate() {
            kb.stv(tile, c(r * VW), v);
        }
    }
    let live = kb.min(c(16), kb.max(c(0), kb.sub(g.rows, r0)));
    kb.for_(c(0), live, |r| {
        let mut v = kb.ldv(tile, kb.mul(r, c(VW)));
        if let Some(b) = g.b {
            v = kb.vadd(v, kb.ldv(b, col));
        }
        let at = kb.add(kb.mul(kb.add(r0, r), c(g.s.n_out)), col);
        kb.stv(g.out, at, epilogue_v(kb, g.epi, &g.others, at, v));
    });
}

/// Rows `16 mt..` and columns `col..col + 16` of the output (`col` a multiple of 16) from
/// the f32 tile at `tile` as packed activations (`pack_x`, one part, for `[out, in]`
/// weights) into `g.out`: each column (a tile row of `Cᵀ`, or of the transposed `C`)
/// through the bias and the epilogue, the other operands of its `Add`/`Mul`s transposed
/// to match, and columns `2p, 2p + 1` interleaved as pair row `p`, padding rows zero.
fn write_pairs<'ctx>(
    kb: &Kb<'_, 'ctx>,
    g: &Gemm<'ctx, '_>,
    tile: PointerValue<'ctx>,
    transpose: bool,
    mt: IntValue<'ctx>,
    col: IntValue<'ctx>,
) {
    let c = |v: usize| kb.c(v as i64);
    let i32t = kb.cx.i32_type();
    let i32v = i32t.vec_type(VW as u32);
    let r0 = kb.mul(mt, c(16));
    let mut cols: Vec<_> = (0..VW).map(|r| kb.ldv(tile, c(r * VW))).collect();
    if transpose {
        cols = kb.transpose(cols);
    }
    // Each other operand's 16 × 16 block, transposed; rows past the end read the last.
    let last = kb.sub(g.rows, c(1));
    let others: Vec<Vec<_>> = g
        .others
        .iter()
        .map(|&o| {
            let rows = (0..VW)
                .map(|r| {
                    let row = kb.min(kb.add(r0, c(r)), last);
                    kb.ldv(o, kb.add(kb.mul(row, c(g.s.n_out)), col))
                })
                .collect();
            kb.transpose(rows)
        })
        .collect();
    let lanes: Vec<_> = (0..VW as u64).map(|j| i32t.const_int(j, false)).collect();
    let live = kb.b.build_int_truncate(kb.sub(g.rows, r0), i32t, "").unwrap();
    let live = kb.b.build_insert_element(i32v.get_undef(), live, i32t.const_zero(), "").unwrap();
    let live = kb.b.build_shuffle_vector(live, i32v.get_undef(), i32v.const_zero(), "").unwrap();
    let mask =
        kb.b.build_int_compare(
            inkwell::IntPredicate::SLT,
            inkwell::types::VectorType::const_vector(&lanes),
            live,
            "",
        )
        .unwrap();
    let bits: Vec<_> = cols
        .into_iter()
        .enumerate()
        .map(|(i, mut v)| {
            let n = kb.add(col, c(i));
            if let Some(b) = g.b {
                v = kb.vadd(v, kb.splat(kb.ld(b, n)));
            }
            v = epilogue_with(kb, g.epi, v, |k| others[k][i]);
            let v = kb.b.build_bit_cast(v, i32v, "").unwrap().into_vector_value();
            kb.b.build_select(mask, v, i32v.const_zero(), "").unwrap().into_vector_value()
        })
        .collect();
    // Tile (col / 32, mt) of the packed activations; pair rows from (col % 32) / 2.
    let mtiles = kb.udiv(padded(kb, g.rows), c(16));
    let t = kb.add(kb.mul(kb.udiv(col, c(32)), mtiles), mt);
    let row0 = kb.udiv(kb.urem(col, c(32)), c(2));
    let k = |v: u64| inkwell::types::VectorType::const_vector(&[i32t.const_int(v, false); VW]);
    for p in 0..VW / 2 {
        let lo = kb.b.build_right_shift(bits[2 * p], k(16), false, "").unwrap();
        let hi = kb.b.build_and(bits[2 * p + 1], k(0xffff_0000), "").unwrap();
        let pair = kb.b.build_or(lo, hi, "").unwrap();
        let at = kb.add(kb.mul(t, c(256)), kb.mul(kb.add(row0, c(p)), c(16)));
        kb.b.build_store(kb.gep(i32t, g.out, at), pair).unwrap().set_alignment(4).unwrap();
    }
}

/// `in` per chunk of the GEMM: a chunk's weights for a task (`KC × 64 · groups` bf16,
/// at most 128 KB) and activations (`M' × KC` in up to three parts, 192 KB for 128 rows)
/// stay in L2, and a group's 64 columns of it (32 KB of weights) stay in L1 while every row
/// tile passes over them.
const KC: usize = 256;

/// Lines of the next chunk's weights prefetched per k-step of a chunk (`gemm`): 8 × 256
/// k-steps of 128 rows and four groups cover a chunk of 256 inputs × 256 columns.
const PREFETCH_LINES: usize = 8;

/// Groups of 64 output columns per task of a map of `inn` inputs packed in `parts`
/// parts: at most four, and as many as keep sixteen tasks or more for the pool, or eight
/// where a row's packed activations exceed 8 KB. Each task reads all the packed
/// activations once, so fewer, wider tasks read them less often; but whoever finishes
/// first waits for the other's last task, and W1's nine tasks of its 2304-wide map left a
/// thread idle for much of one: sixteen tasks or more made its bf16-activation prefill
/// ×1.08–1.10 faster and its three-part one ×1.05, where W2's three-part maps of 2048
/// columns (12 KB of activations a row) ran ×0.96 slower with sixteen tasks than eight.
pub fn groups(inn: usize, n_out: usize, parts: usize) -> usize {
    let tasks = if inn * 2 * parts <= 8192 { 16 } else { 8 };
    (n_out / 64 / tasks).clamp(1, 4)
}

/// Tasks of a linear map's AMX GEMM (see `groups`).
pub fn tasks(inn: usize, n_out: usize, parts: usize) -> usize {
    (n_out / 64).div_ceil(groups(inn, n_out, parts))
}

/// Bytes of the accumulators of a linear map's AMX GEMM for `rows` rows (after the
/// packed activations): each task keeps its tiles there between chunks of `in`.
pub fn acc_bytes(rows: usize, n_out: usize) -> usize {
    rows.div_ceil(MB) * MB * n_out * 4
}

/// Tasks `begin..end`, each `groups` blocks of 64 output columns, in chunks of `KC`
/// inputs: per row tile of 16 and group, four accumulator tiles (zero tiles in the first
/// chunk, then loaded) get every part of every k-step of the chunk and are stored back, so
/// the part tiles of a k-step serve the four column tiles. Tile stores and loads wait for
/// the products in flight (a C loop lost ~1.2 ns per product to loading four accumulators
/// every 32 products), so the first chunk does not load zeros from memory. `C = X · W`
/// (`[in, out]`, the task's slice of the chunk packed into VNNI pairs first) or
/// `Cᵀ = W · Xᵀ` (`[out, in]`, weight tiles as stored). Then every tile goes to the
/// output, transposed for `Cᵀ`.
fn gemm<'ctx>(kb: &Kb<'_, 'ctx>, g: &Gemm<'ctx, '_>, begin: IntValue<'ctx>, end: IntValue<'ctx>) {
    let c = |v: usize| kb.c(v as i64);
    let t = &Tiles::new(kb);
    let Shape { inn, n_out, transposed, tiles, amx: Amx { parts, to_tiles }, .. } = g.s;
    assert!(!(tiles && transposed), "tiled weights are read as [out, in]");
    let gr = groups(inn, n_out, parts);
    let mp = padded(kb, g.rows);
    let mtiles = kb.udiv(mp, c(16));
    let (i16t, i32t) = (kb.cx.i16_type(), kb.cx.i32_type());
    // Bytes from one part of the packed activations to the next; the accumulators follow.
    let part = kb.mul(kb.mul(mp, c(inn)), c(2));
    let accs = kb.gep(kb.cx.i8_type(), g.x, kb.mul(part, c(parts)));
    let kc = KC.min(inn);
    let panel = kb.b.build_array_alloca(i32t, c(if tiles { 1 } else { kc / 2 * 64 * gr }), "panel").unwrap();
    kb.for_(begin, end, |task| {
        let n0 = kb.mul(task, c(64 * gr));
        let ngr = kb.min(c(gr), kb.udiv(kb.sub(c(n_out), n0), c(64)));
        // Tile (group, row tile, j) of this task's accumulators, in bytes.
        let acc_at = |gi: IntValue<'ctx>, mt: IntValue<'ctx>, j: usize| {
            let tile = kb.add(kb.mul(kb.add(kb.mul(gi, mtiles), mt), c(4)), c(j));
            kb.add(kb.mul(kb.mul(n0, mp), c(4)), kb.mul(tile, c(1024)))
        };
        kb.for_(c(0), c(inn.div_ceil(kc)), |chunk| {
            let k0 = kb.mul(chunk, c(kc));
            let first = kb.icmp_eq(chunk, c(0));
            let steps = kb.udiv(kb.min(c(kc), kb.sub(c(inn), k0)), c(32));
            if tiles {
                // Read in place below.
            } else if !transposed {
                // W [out, in]: the task's rows, columns k0.., copied tile by tile: tile
                // (k, column tile) holds rows 16·jt.. of inputs 32k.., contiguous.
                let i32v = i32t.vec_type(16);
                kb.for_(c(0), kb.mul(ngr, c(64)), |r| {
                    let (jt, rr) = (kb.udiv(r, c(16)), kb.urem(r, c(16)));
                    let src = kb.add(kb.mul(kb.add(n0, r), c(inn)), k0);
                    kb.for_(c(0), steps, |k| {
                        let at = kb.gep(i16t, g.w, kb.add(src, kb.mul(k, c(32))));
                        let v = kb.b.build_load(i32v, at, "").unwrap();
                        v.as_instruction_value().unwrap().set_alignment(2).unwrap();
                        let tile = kb.add(kb.mul(k, c(4 * gr)), jt);
                        let to = kb.gep(i32t, panel, kb.add(kb.mul(tile, c(256)), kb.mul(rr, c(16))));
                        kb.b.build_store(to, v).unwrap().set_alignment(4).unwrap();
                    });
                });
            } else {
                // W [in, out] rows k0 + 2p and k0 + 2p + 1, 16 columns at a time, as
                // tile (p / 16, column tile) row p % 16: each tile contiguous.
                let i16v = i16t.vec_type(16);
                let lanes: Vec<_> =
                    (0..16).flat_map(|j| [j, 16 + j]).map(|l| i32t.const_int(l, false)).collect();
                let mask = inkwell::types::VectorType::const_vector(&lanes);
                kb.for_(c(0), kb.mul(steps, c(16)), |p| {
                    let r = kb.add(k0, kb.mul(p, c(2)));
                    kb.for_(c(0), kb.mul(ngr, c(4)), |jt| {
                        let col = kb.add(n0, kb.mul(jt, c(16)));
                        let row = |r: IntValue<'ctx>| {
                            let at = kb.gep(i16t, g.w, kb.add(kb.mul(r, c(n_out)), col));
                            let v = kb.b.build_load(i16v, at, "").unwrap();
                            v.as_instruction_value().unwrap().set_alignment(2).unwrap();
                            v.into_vector_value()
                        };
                        let v = kb.b.build_shuffle_vector(row(r), row(kb.add(r, c(1))), mask, "").unwrap();
                        let tile = kb.add(kb.mul(kb.udiv(p, c(16)), c(4 * gr)), jt);
                        let at = kb.gep(
                            i32t,
                            panel,
                            kb.add(kb.mul(tile, c(256)), kb.mul(kb.urem(p, c(16)), c(16))),
                        );
                        kb.b.build_store(at, v).unwrap().set_alignment(4).unwrap();
                    });
                });
            }
            // The weights of the task's next chunk (or of the next task's first, which this
            // thread usually takes next), `PREFETCH_LINES` lines into L2 per k-step of
            // this one's: the tiles read them in place, and the first row tile would
            // otherwise wait on memory for each.
            let last = kb.icmp_ge(kb.add(k0, c(kc)), c(inn));
            let nk0 = kb.select(last, c(0), kb.add(k0, c(kc)));
            let nn0 = kb.select(last, kb.add(n0, c(64 * gr)), n0);
            let per_block = kc / 32 * 16;
            let prefetch_next = |it: IntValue<'ctx>| {
                for l in 0..PREFETCH_LINES {
                    let n = kb.min(kb.add(kb.mul(it, c(PREFETCH_LINES)), c(l)), c(4 * gr * per_block - 1));
                    let (b, line) = (kb.udiv(n, c(per_block)), kb.urem(n, c(per_block)));
                    let tile =
                        kb.add(kb.mul(kb.add(kb.udiv(nn0, c(16)), b), c(inn / 32)), kb.udiv(nk0, c(32)));
                    kb.prefetch_l2(g.w, kb.add(kb.mul(tile, c(1024)), kb.mul(line, c(64))));
                }
            };
            // One row tile and group of 64 columns over the chunk's k-steps.
            let step = |mt: IntValue<'ctx>, gi: IntValue<'ctx>| {
                let init = kb.choose(
                    first,
                    || (0..4).map(|_| t.zero().into()).collect(),
                    || (0..4).map(|j| t.load(accs, acc_at(gi, mt, j)).into()).collect(),
                );
                let acc = kb.fold(c(0), steps, &init, |k, acc| {
                    let ka = kb.add(kb.udiv(k0, c(32)), k);
                    if tiles {
                        prefetch_next(kb.add(kb.mul(kb.add(kb.mul(mt, ngr), gi), c(kc / 32)), k));
                    }
                    let xs: Vec<_> = (0..parts)
                        .map(|q| {
                            let tile = if transposed {
                                kb.add(kb.mul(mt, c(inn / 32)), ka)
                            } else {
                                kb.add(kb.mul(ka, mtiles), mt)
                            };
                            t.load(g.x, kb.add(kb.mul(tile, c(1024)), kb.mul(part, c(q))))
                        })
                        .collect();
                    (0..4)
                        .map(|j| {
                            let jt = kb.add(kb.mul(gi, c(4)), c(j));
                            let a = acc[j].into_vector_value();
                            let w = if tiles {
                                // Block n0 / 16 + jt of the weights, tile ka.
                                let blk = kb.add(kb.udiv(n0, c(16)), jt);
                                t.load(g.w, kb.mul(kb.add(kb.mul(blk, c(inn / 32)), ka), c(1024)))
                            } else {
                                let tile = kb.add(kb.mul(k, c(4 * gr)), jt);
                                t.load(panel, kb.mul(tile, c(1024)))
                            };
                            let r = if transposed {
                                xs.iter().fold(a, |a, x| t.dp(a, *x, w))
                            } else {
                                xs.iter().fold(a, |a, x| t.dp(a, w, *x))
                            };
                            r.into()
                        })
                        .collect()
                });
                for (j, a) in acc.iter().enumerate() {
                    let at = kb.gep(kb.cx.i8_type(), accs, acc_at(gi, mt, j));
                    t.store(at, a.into_vector_value());
                }
            };
            // A group's weight tiles of the chunk (32 KB) stay in L1 while every row tile
            // passes over them: each activation tile from L2 serves four products. (With
            // three parts, keeping a row tile's parts in L1 while every group passed over
            // them, each weight tile from L2 serving three products, was ×0.955–0.976 as
            // fast on W2 and even on W1.)
            kb.for_(c(0), ngr, |gi| kb.for_(c(0), mtiles, |mt| step(mt, gi)));
        });
        kb.for_(c(0), mtiles, |mt| {
            kb.for_(c(0), ngr, |gi| {
                for j in 0..4 {
                    let tile = kb.gep(kb.cx.i8_type(), accs, acc_at(gi, mt, j));
                    let col = kb.add(n0, kb.add(kb.mul(gi, c(64)), c(16 * j)));
                    if to_tiles {
                        write_pairs(kb, g, tile, transposed, mt, col);
                    } else {
                        write_tile(kb, g, tile, !transposed, kb.mul(mt, c(16)), col);
                    }
                }
            });
        });
    });
}

/// The fallback copy of a module for a CPU that may lack AMX: every function marked
/// `ATTR` is replaced by one that returns zero (false, or nothing), so the linear kernels
/// take their AVX-512 path and no tile instruction remains.
pub fn strip(m: &Module) {
    let mut marked = Vec::new();
    let mut f = m.get_first_function();
    while let Some(fun) = f {
        f = fun.get_next_function();
        if fun.get_string_attribute(AttributeLoc::Function, ATTR).is_some() && fun.count_basic_blocks() > 0 {
            marked.push(fun);
        }
    }
    let cx = m.get_context();
    for fun in marked {
        let name = fun.get_name().to_str().unwrap().to_string();
        let stub = m.add_function(&format!("{name}.stub"), fun.get_type(), Some(Linkage::Internal));
        let b = cx.create_builder();
        b.position_at_end(cx.append_basic_block(stub, "entry"));
        match fun.get_type().get_return_type() {
            None => b.build_return(None).unwrap(),
            Some(t) => b.build_return(Some(&t.const_zero())).unwrap(),
        };
        fun.replace_all_uses_with(stub);
        // SAFETY: `fun` has no uses left and is not used afterwards.
        unsafe { fun.delete() };
        stub.as_global_value().set_name(&name);
    }
}
