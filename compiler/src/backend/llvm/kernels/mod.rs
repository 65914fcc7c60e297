//! The kernels: one LLVM function per distinct op instance, with every size known at
//! compile time baked in and the runtime ones (`T`, `P`, row counts) read from the
//! argument block. A kernel has the task signature `void k(i64* args, i64 begin, i64 end)`
//! and processes tasks `begin..end`, so the thread pool can split its work.

mod attention;
mod bf16;
mod int8;
mod latent;
mod linear;
mod moe;
mod rows;

use inkwell::attributes::AttributeLoc;
use inkwell::module::Linkage;
use inkwell::values::{FunctionValue, IntValue, PointerValue};

use super::kb::{Kb, WFmt};
use crate::backend::plan::Epi;
use crate::ir::{Act, AttnMask, QkvLayout, QkvPart, Rope};

pub(crate) use attention::attention_rows;
use attention::*;
pub(crate) use bf16::multiplies_pairs;
use linear::*;
pub(crate) use linear::{packs, sliced_bytes, tiled};
use rows::*;

/// What a kernel computes; its argument block layout is given per variant.
#[derive(Clone, Debug, PartialEq)]
pub enum Kernel {
    /// args: out(i32); tasks: 1. `out[t] = P + t`. Needs T, P.
    Positions,
    /// args: out(i32), rows(T), the row table; tasks: 1. `out[t]` = row `t`'s position
    /// in a batched decode (see `Slot::RowInfo`).
    RowPositions,
    /// args: table, ids(i32), out; tasks: T rows.
    Gather { d: usize, offset: usize, wf: WFmt },
    /// args: pos(i32), out; tasks: T rows.
    Sinusoidal { dim: usize, base: f64, fairseq: bool, offset: usize },
    /// args: a, b, out; tasks: rows.
    Binary { mul: bool, width: usize },
    /// args: x, out; tasks: rows.
    Unary { op: UnaryOp, width: usize },
    /// args: x, out; tasks: rows. `Op::RoundQ8` over rows of `width`.
    RoundQ8 { width: usize },
    /// args: x, [w], [b], out, [rows]; tasks: rows. `round`: the output rounded to bf16
    /// (a fused `round_bf16`). `sets`: how many sets of parameters, 1 or one per head of
    /// `[heads, T, d]` (then `rows` says how many rows there are in all).
    LayerNorm { d: usize, eps: f64, gain: bool, bias: bool, round: bool, sets: usize },
    /// args: x, w, out, [rows]; tasks: rows. `round` and `sets` as for `LayerNorm`.
    RmsNorm { d: usize, eps: f64, unit_offset: bool, round: bool, sets: usize },
    /// args: x, w, [b], out, rows, then one pointer per `Add`/`Mul` of the epilogue, then
    /// the packed activations (AMX, or sliced) and, with `Amx::to_tiles`, where the
    /// output goes packed (`Kernel::slots`); tasks: column blocks of `BLOCK` (AMX: groups
    /// of them, `amx::tasks`).
    Linear {
        inn: usize,
        out: usize,
        bias: bool,
        epi: Vec<Epi>,
        wf: WFmt,
        read: WeightRead,
        algo: LinearAlgo,
        /// The input is `round_q8`'d: block weights may meet it as integers.
        q8x: bool,
        /// The packed GEMM multiplies bf16 pairs where the C half allows
        /// (`bf16::multiplies_pairs`), reading its input's slices as `SliceRows { pairs }`
        /// wrote them.
        pairs: bool,
    },
    /// args: x, out, rows; tasks: rows. Copies `x [rows, inn]` into the packed GEMM's
    /// slices (`slice_at`), once for all the column blocks of the linear maps reading it;
    /// with `pairs`, as bf16 where the pair products run (`bf16::copy_bf16s`).
    SliceRows { inn: usize, pairs: bool },
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
    Rope { head_dim: usize, rope: Rope, heads: usize },
    /// args: q, k, v, pos(i32), out, rows(T), S, k head stride, v head stride, [sinks];
    /// tasks: H·T,
    /// or with `block` (`attention_rows`, query rows known only at run time) H · ⌈T / block⌉.
    Attention {
        heads: usize,
        groups: usize,
        head_dim: usize,
        scale: f64,
        mask: AttnMask,
        /// ALiBi with the slopes times this.
        alibi: Option<f64>,
        block: Option<usize>,
        /// Scores soft-capped to `cap · tanh(s / cap)`.
        softcap: Option<f64>,
        /// A last argument: one sink logit per head (`Op::Softmax`).
        sinks: bool,
        /// Each query row reads its own slot's cache (a batched decode; then the last
        /// argument is the row table, `Slot::RowInfo`, and `block` is `None`).
        table: bool,
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
    /// args: src, cache, rows(T), P, [row table]; tasks: groups. Writes `src [G, T, hd]`
    /// at `P..P+T`; with `table` (a batched decode), row `t` at its own position in its
    /// own slot's cache (`Slot::RowInfo`).
    CacheStore { head_dim: usize, max_seq: usize, table: bool },
    /// args: logits, out; tasks: rows. A router's dense weights (`ir::Route::route`).
    Route { route: crate::ir::Route },
    /// args: x, route, offsets (i64), slot_of (i32), out, rows; tasks: 1. Groups the rows
    /// by expert: expert `e`'s rows go to `out` at slots `offsets[e]..offsets[e + 1]`,
    /// copied from `x`, and `slot_of[t·E + e]` is row `t`'s slot at `e` (-1: not chosen).
    Dispatch { experts: usize, d: usize },
    /// args: route, slot_of, y (the experts' outputs by slot), out; tasks: rows. Each row
    /// the weighted sum of its experts' outputs, in ascending expert order.
    Combine { experts: usize, d: usize },
    /// args: x, y (`[rows, 1]`), out; tasks: rows. Each row times its number.
    RowScale { width: usize },
    /// args: x (`[rows, row]`: a projection's outputs), out (`[rows, hidden]`), rows;
    /// tasks: rows. An expert's GLU: output `j` is `act(g) · (u + offset)` with `g` the
    /// input at `gate + j · step` (clamped from above), `u` at `up + j · step` (clamped),
    /// or `act(u)` without a gate.
    Glu { glu: crate::ir::Experts, row: usize, gate: Option<usize>, up: usize, step: usize },
    /// args: x, out; tasks: rows. Features `start..start + len` of each row.
    Slice { width: usize, start: usize, len: usize },
    /// args: x, y, out; tasks: rows. The rows side by side.
    Concat { a: usize, b: usize },
    /// args: x, w, out, rows; tasks: heads · rows. Each head by its block of an f32
    /// matrix (`Op::HeadLinear`).
    HeadLinear { inn: usize, out: usize, period: usize, at: usize, transposed: bool },
}

/// How a linear kernel reads its weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightRead {
    /// As stored: `[out, in]`, or `[in, out]` when `transposed`.
    Stored { transposed: bool },
    /// bf16 in the tile layout (`weights::Tiles`), read as `[out, in]`.
    Tiles,
    /// f32 in the panel layout (`weights::WeightLayout::Panels`), which the packed GEMM
    /// reads in place.
    Panels,
}

/// How a linear kernel computes its rows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LinearAlgo {
    /// On AMX tiles when the CPU allows at run time (bf16 weights), else the packed GEMM.
    Amx(super::amx::Amx),
    /// The packed GEMM of many rows (`packs`): each column block's weights as f32 panels
    /// of `KC` inputs, the rows passing over them in register tiles of `MR`. `sliced`: it
    /// reads the activations as `SliceRows` wrote them.
    Packed { sliced: bool },
    /// Vectorised dot products with `[out, in]` rows whose length the vectors tile.
    Dots,
    /// Plain loops, for whatever else.
    Loops,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum UnaryOp {
    Scale(f64),
    Act(Act),
    RoundBf16,
}

impl Kernel {
    /// A name that is unique per distinct kernel, usable as a symbol.
    pub fn symbol(&self) -> String {
        let h = crate::ir::num;
        match self {
            Kernel::Positions => "positions".into(),
            Kernel::RowPositions => "row_positions".into(),
            Kernel::Gather { d, offset, wf } => format!("gather_d{d}_o{offset}{}", wf.suffix()),
            Kernel::Sinusoidal { dim, base, fairseq, offset } => format!(
                "sinusoidal_{dim}_{}{}{}",
                h(*base).replace('.', "p"),
                if *fairseq { "_fairseq" } else { "" },
                if *offset > 0 { format!("_o{offset}") } else { String::new() }
            ),
            Kernel::Binary { mul, width } => format!("{}_{width}", if *mul { "mul" } else { "add" }),
            Kernel::Unary { op: UnaryOp::Scale(s), width } => format!("scale_{width}_{:016x}", s.to_bits()),
            Kernel::Unary { op: UnaryOp::Act(a), width } => format!("{}_{width}", a.name()),
            Kernel::Unary { op: UnaryOp::RoundBf16, width } => format!("round_bf16_{width}"),
            Kernel::RoundQ8 { width } => format!("round_q8_{width}"),
            Kernel::LayerNorm { d, eps, gain, bias, round, sets } => {
                let r = if *round { "_round_bf16" } else { "" };
                let g = if *gain { "" } else { "_no_gain" };
                let s = if *sets > 1 { format!("_sets{sets}") } else { String::new() };
                format!("layernorm_{d}_{:016x}_{}{g}{s}{r}", eps.to_bits(), *bias as u8)
            }
            Kernel::RmsNorm { d, eps, unit_offset, round, sets } => {
                let r = if *round { "_round_bf16" } else { "" };
                let s = if *sets > 1 { format!("_sets{sets}") } else { String::new() };
                format!("rmsnorm_{d}_{:016x}_{}{s}{r}", eps.to_bits(), *unit_offset as u8)
            }
            Kernel::Linear { inn, out, bias, epi, wf, read, algo, q8x, pairs } => {
                let epi: String = epi.iter().map(|e| format!("_{}", e.symbol())).collect();
                let t = if *read == (WeightRead::Stored { transposed: true }) { "_t" } else { "" };
                let b = if *bias { "_b" } else { "" };
                let layout = match read {
                    WeightRead::Tiles => "_tl",
                    WeightRead::Panels => "_pn",
                    WeightRead::Stored { .. } => "",
                };
                let (p, s, a) = match algo {
                    LinearAlgo::Amx(a) => {
                        ("_p", "", format!("_amx{}{}", a.parts, if a.to_tiles { "_packs" } else { "" }))
                    }
                    LinearAlgo::Packed { sliced } => ("_p", if *sliced { "_s" } else { "" }, String::new()),
                    LinearAlgo::Dots | LinearAlgo::Loops => ("", "", String::new()),
                };
                let q = if *q8x { "_q8x" } else { "" };
                let d = if *pairs { "_pairs" } else { "" };
                format!("linear_{inn}x{out}{t}{b}{layout}{p}{s}{a}{epi}{}{q}{d}", wf.suffix())
            }
            Kernel::SliceRows { inn, pairs } => {
                format!("slice_rows_{inn}{}", if *pairs { "_pairs" } else { "" })
            }
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
            Kernel::Rope {
                head_dim,
                rope: rope @ Rope { rotary_dim, theta, interleaved, scaling },
                heads,
            } => {
                // A scaled rope's frequencies are its own: a digest of them tells kernels apart.
                let scaled = match scaling {
                    crate::ir::RopeScaling::None => String::new(),
                    _ => {
                        let bits: String = rope
                            .inv_freqs()
                            .iter()
                            .chain([&rope.magnitude()])
                            .map(|f| format!("{:016x}", f.to_bits()))
                            .collect();
                        format!("_f{}", tfc_runtime::abi::fnv1a(&bits))
                    }
                };
                format!(
                    "rope_{heads}_{head_dim}_{rotary_dim}_{:016x}_{}{scaled}",
                    theta.to_bits(),
                    *interleaved as u8
                )
            }
            Kernel::Attention {
                heads,
                groups,
                head_dim,
                scale,
                mask,
                alibi,
                block,
                softcap,
                sinks,
                table,
            } => {
                format!(
                    "attention_{heads}_{groups}_{head_dim}_{:016x}_{}_{}_{}{}{}{}{}",
                    scale.to_bits(),
                    mask.causal as u8,
                    mask.window.unwrap_or(0),
                    alibi.map_or("0".into(), |f| if f == 1.0 {
                        "1".into()
                    } else {
                        format!("{:016x}", f.to_bits())
                    }),
                    block.map_or(String::new(), |b| format!("_rows{b}")),
                    softcap.map_or(String::new(), |c| format!("_cap{:016x}", c.to_bits())),
                    if *sinks { "_sinks" } else { "" },
                    if *table { "_slots" } else { "" }
                )
            }
            Kernel::LastRow { width, int } => format!("last_row_{width}{}", if *int { "_i32" } else { "" }),
            Kernel::GemvPartial { inn, out, chunks, wf } => {
                format!("gemv_partial_{inn}x{out}_{chunks}{}", wf.suffix())
            }
            Kernel::GemvReduce { out, chunks, bias, epi, pairs } => {
                let epi: String = epi.iter().map(|e| format!("_{}", e.symbol())).collect();
                let p = if *pairs { "_pairs" } else { "" };
                format!("gemv_reduce_{out}_{chunks}{}{p}{epi}", if *bias { "_b" } else { "" })
            }
            Kernel::CacheStore { head_dim, max_seq, table } => {
                format!("cache_store_{head_dim}_{max_seq}{}", if *table { "_rows" } else { "" })
            }
            Kernel::Route { route: r } => format!(
                "route_{}_{}_{}{}_{:016x}{}{}",
                r.experts,
                r.top_k,
                r.scoring.name(),
                if r.normalize { "_norm" } else { "" },
                r.scale.to_bits(),
                match r.groups {
                    1 => String::new(),
                    g => format!("_g{}of{g}_{}", r.topk_groups, r.group_score.name()),
                },
                if r.choice_bias { "_bias" } else { "" },
            ),
            Kernel::Dispatch { experts, d } => format!("dispatch_{experts}_{d}"),
            Kernel::Combine { experts, d } => format!("combine_{experts}_{d}"),
            Kernel::RowScale { width } => format!("row_scale_{width}"),
            Kernel::Slice { width, start, len } => format!("slice_{width}_{start}_{len}"),
            Kernel::Concat { a, b } => format!("concat_{a}_{b}"),
            Kernel::HeadLinear { inn, out, period, at, transposed } => {
                format!("head_linear_{inn}_{out}_{period}_{at}{}", if *transposed { "_t" } else { "" })
            }
            Kernel::Glu { glu, row, gate, up, step } => format!(
                "glu_{}_{}_{row}_{}_{up}_{step}_{:016x}_{:016x}",
                glu.hidden,
                glu.act.name(),
                gate.map_or("none".into(), |g| g.to_string()),
                glu.clamp.unwrap_or(f64::INFINITY).to_bits(),
                glu.up_offset.to_bits()
            ),
        }
    }
}

/// The most slots a kernel's argument block has (a fused chain has at most
/// `plan::MAX_FUSED_OPERANDS` other operands).
pub const ARG_SLOTS: usize = 16;

/// A kernel's runtime argument: an `i64` slot of the block the graph function writes
/// and the kernel reads (pointers as integers). `Kernel::slots` gives each kernel's
/// slots in order, the one place that order is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// The main operand, the output, and the row count.
    X,
    Out,
    Rows,
    /// The second operand of an elementwise op.
    Y,
    /// Weights, bias, and the other operand of the `k`-th `Add`/`Mul` of an epilogue.
    W,
    Bias,
    Other(usize),
    /// Activations as `SliceRows` or `AmxPack` wrote them, and the packed output of an
    /// AMX map that writes it so (`amx::Amx::to_tiles`).
    PackedX,
    PackedOut,
    /// A gather's table and ids; positions (i32).
    Table,
    Ids,
    Pos,
    /// The symbols `T` and `P`.
    T,
    P,
    /// Rows per head of the output: the rows, or `max_seq` in the cache.
    OutRows,
    /// Attention's operands, the key count `S`, and the key and value head strides.
    Q,
    K,
    V,
    Keys,
    KStride,
    VStride,
    /// A split-K GEMV's partial sums.
    Partials,
    /// Attention's sink logits, one per head.
    Sinks,
    /// A cache region.
    Cache,
    /// A mixture's routing weights `[T, E]`, its rows grouped by expert (`offsets`, one
    /// `i64` per expert and one past the end), and each row's slot per expert (`i32`).
    Route,
    Offsets,
    Slots,
    /// A batched decode's rows: per row, its position and where its slot's cache is
    /// (floats from the cache argument's start), two `i64` each.
    RowInfo,
}

impl Kernel {
    /// The kernel's argument slots, in the order of its argument block.
    pub fn slots(&self) -> Vec<Slot> {
        use Slot::*;
        let bias = |b: bool| if b { vec![Bias] } else { vec![] };
        let others =
            |epi: &[Epi]| (0..epi.iter().filter(|e| matches!(e, Epi::Add | Epi::Mul)).count()).map(Other);
        match self {
            Kernel::Positions => vec![Out, T, P],
            Kernel::RowPositions => vec![Out, T, RowInfo],
            Kernel::Gather { .. } => vec![Table, Ids, Out],
            Kernel::Sinusoidal { .. } => vec![Pos, Out],
            Kernel::Binary { .. } => vec![X, Y, Out],
            Kernel::Unary { .. } | Kernel::RoundQ8 { .. } | Kernel::SplitQkv { .. } => vec![X, Out],
            Kernel::LayerNorm { gain, bias: b, sets, .. } => {
                let rows = if *sets > 1 { vec![Rows] } else { vec![] };
                [vec![X], if *gain { vec![W] } else { vec![] }, bias(*b), vec![Out], rows].concat()
            }
            Kernel::RmsNorm { sets, .. } => {
                [vec![X, W, Out], if *sets > 1 { vec![Rows] } else { vec![] }].concat()
            }
            Kernel::Linear { bias: b, epi, algo, .. } => {
                let mut v = [vec![X, W], bias(*b), vec![Out, Rows]].concat();
                v.extend(others(epi));
                match algo {
                    LinearAlgo::Amx(a) => {
                        v.extend([PackedX].into_iter().chain(a.to_tiles.then_some(PackedOut)))
                    }
                    LinearAlgo::Packed { sliced: true } => v.push(PackedX),
                    _ => {}
                }
                v
            }
            Kernel::SliceRows { .. }
            | Kernel::AmxPack { .. }
            | Kernel::MergeHeads { .. }
            | Kernel::LastRow { .. } => {
                vec![X, Out, Rows]
            }
            Kernel::SplitHeads { .. } => vec![X, Out, OutRows],
            Kernel::Rope { .. } => vec![X, Pos, Out, Rows, OutRows],
            Kernel::Attention { sinks, table, .. } => {
                let mut v = vec![Q, K, V, Pos, Out, Rows, Keys, KStride, VStride];
                v.extend(sinks.then_some(Sinks));
                v.extend(table.then_some(RowInfo));
                v
            }
            Kernel::GemvPartial { .. } => vec![X, W, Partials],
            Kernel::GemvReduce { bias: b, epi, .. } => {
                let mut v = [vec![Partials], bias(*b), vec![Out]].concat();
                v.extend(others(epi));
                v
            }
            Kernel::CacheStore { table: false, .. } => vec![X, Cache, Rows, P],
            Kernel::CacheStore { table: true, .. } => vec![X, Cache, Rows, P, RowInfo],
            Kernel::Route { route } if route.choice_bias => vec![X, Bias, Out],
            Kernel::Route { .. } => vec![X, Out],
            Kernel::Dispatch { .. } => vec![X, Route, Offsets, Slots, Out, Rows],
            Kernel::Combine { .. } => vec![Route, Slots, Y, Out],
            Kernel::RowScale { .. } => vec![X, Y, Out],
            Kernel::Glu { .. } => vec![X, Out, Rows],
            Kernel::Slice { .. } => vec![X, Out],
            Kernel::Concat { .. } => vec![X, Y, Out],
            Kernel::HeadLinear { .. } => vec![X, W, Out, Rows],
        }
    }

    /// The argument values of a call in the order of `slots`, from `(slot, value)` pairs
    /// in any order; a slot missing or given twice is a bug in the caller.
    pub fn encode<V: Copy>(&self, values: &[(Slot, V)]) -> Vec<V> {
        let slots = self.slots();
        assert_eq!(slots.len(), values.len(), "bug: {} takes {slots:?}", self.symbol());
        assert!(slots.len() <= ARG_SLOTS, "bug: {} takes more than {ARG_SLOTS} arguments", self.symbol());
        slots
            .iter()
            .map(|s| {
                let mut found = values.iter().filter(|(t, _)| t == s);
                let v = found.next().unwrap_or_else(|| panic!("bug: {} needs {s:?}", self.symbol())).1;
                assert!(found.next().is_none(), "bug: {s:?} given twice to {}", self.symbol());
                v
            })
            .collect()
    }
}

/// A kernel's argument block as the kernel reads it: each slot loaded where it is used.
pub struct Args<'a, 'b, 'ctx> {
    kb: &'a Kb<'b, 'ctx>,
    block: PointerValue<'ctx>,
    slots: Vec<Slot>,
    name: String,
}

impl<'ctx> Args<'_, '_, 'ctx> {
    fn at(&self, s: Slot) -> Option<i64> {
        self.slots.iter().position(|&t| t == s).map(|i| i as i64)
    }

    /// The integer in slot `s`.
    pub fn i(&self, s: Slot) -> IntValue<'ctx> {
        let at = self.at(s).unwrap_or_else(|| panic!("bug: kernel {} has no slot {s:?}", self.name));
        self.kb.ld64(self.block, self.kb.c(at))
    }

    /// The pointer in slot `s`.
    pub fn p(&self, s: Slot) -> PointerValue<'ctx> {
        self.kb.ptr_of(self.i(s))
    }

    /// The pointer in slot `s`, if the kernel has that slot.
    pub fn opt_p(&self, s: Slot) -> Option<PointerValue<'ctx>> {
        self.at(s).map(|_| self.p(s))
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
    let args = Args { kb: &kb, block: args, slots: k.slots(), name: k.symbol() };
    body(&kb, k, &args, begin, end);
    kb.ret();
    f
}

/// The kernel's code: one function per kind of kernel, each reading its slots.
fn body<'ctx>(
    kb: &Kb<'_, 'ctx>,
    k: &Kernel,
    args: &Args<'_, '_, 'ctx>,
    begin: IntValue<'ctx>,
    end: IntValue<'ctx>,
) {
    match k {
        Kernel::Positions => positions(kb, k, args, begin, end),
        Kernel::RowPositions => row_positions(kb, k, args, begin, end),
        Kernel::Gather { .. } => gather(kb, k, args, begin, end),
        Kernel::Sinusoidal { .. } => sinusoidal(kb, k, args, begin, end),
        Kernel::Binary { .. } => binary(kb, k, args, begin, end),
        Kernel::Unary { .. } => unary_rows(kb, k, args, begin, end),
        Kernel::RoundQ8 { .. } => round_q8_rows(kb, k, args, begin, end),
        Kernel::LayerNorm { .. } => layer_norm(kb, k, args, begin, end),
        Kernel::RmsNorm { .. } => rms_norm(kb, k, args, begin, end),
        Kernel::Linear { algo: LinearAlgo::Amx(_) | LinearAlgo::Packed { .. }, .. } => {
            linear_packed(kb, k, args, begin, end)
        }
        Kernel::SliceRows { .. } => slice_rows(kb, k, args, begin, end),
        Kernel::AmxPack { .. } => amx_pack(kb, k, args, begin, end),
        Kernel::Linear { algo: LinearAlgo::Dots, .. } => linear_dots(kb, k, args, begin, end),
        Kernel::Linear { .. } => linear_loops(kb, k, args, begin, end),
        Kernel::SplitQkv { .. } => split_qkv(kb, k, args, begin, end),
        Kernel::SplitHeads { .. } => split_heads(kb, k, args, begin, end),
        Kernel::MergeHeads { .. } => merge_heads(kb, k, args, begin, end),
        Kernel::Rope { .. } => rope(kb, k, args, begin, end),
        Kernel::Attention { .. } => attention_kernel(kb, k, args, begin, end),
        Kernel::GemvPartial { .. } => gemv_partial_kernel(kb, k, args, begin, end),
        Kernel::GemvReduce { .. } => gemv_reduce(kb, k, args, begin, end),
        Kernel::LastRow { .. } => last_row(kb, k, args, begin, end),
        Kernel::CacheStore { .. } => cache_store(kb, k, args, begin, end),
        Kernel::Route { .. } => moe::route(kb, k, args, begin, end),
        Kernel::Dispatch { .. } => moe::dispatch(kb, k, args, begin, end),
        Kernel::Combine { .. } => moe::combine(kb, k, args, begin, end),
        Kernel::RowScale { .. } => moe::row_scale(kb, k, args, begin, end),
        Kernel::Glu { .. } => moe::glu(kb, k, args, begin, end),
        Kernel::Slice { .. } => latent::slice(kb, k, args, begin, end),
        Kernel::Concat { .. } => latent::concat(kb, k, args, begin, end),
        Kernel::HeadLinear { .. } => latent::head_linear(kb, k, args, begin, end),
    }
}
