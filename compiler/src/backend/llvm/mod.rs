//! The LLVM backend: prefill and decode graphs → one LLVM module → an object file.
//!
//! Each graph becomes an exported function `tfc__<graph>(arena, cache, tokens, types, T,
//! P, weights, out, pool)` that runs the graph's nodes in order, each as a call of
//! `tfc__parallel_for(pool, kernel, args, tasks)`; the kernels are in `kernels.rs`. Every
//! intermediate value lives at a fixed offset of one scratch arena, planned here with
//! buffer reuse after a value's last use. Keys and values go to the KV cache
//! (`[layer][k, v][kv_heads][max_seq][head_dim]` f32) right after they are computed, and
//! decode's attention reads the cache in place. Model constants (`tfc__vocab`, …) are
//! globals that the C half of the library (`tfc_runtime::abi::SUPPORT_C`) reads.

mod amx;
mod elementwise;
mod graph_fn;
mod kb;
mod kernels;
mod select;

use std::collections::HashMap;

use inkwell::context::Context;
use inkwell::module::{Linkage, Module};
use inkwell::passes::PassBuilderOptions;
use inkwell::targets::{CodeModel, FileType, InitializationConfig, RelocMode, Target, TargetMachine};
use inkwell::values::FunctionValue;
use inkwell::GlobalVisibility;
use inkwell::OptimizationLevel;

pub use kernels::Kernel;
use select::GraphPlan;

use crate::backend::layout::{layout, Layout};
use crate::backend::plan::PlanError;
use crate::backend::weights::{weight_bytes, WeightLayout, WeightTable};
use crate::ir::DType;
use crate::Compiled;

#[derive(Debug, thiserror::Error)]
pub enum LlvmError {
    #[error("the LLVM backend does not support {0} yet")]
    Unsupported(String),
    #[error("LLVM: {0}")]
    Llvm(String),
    #[error("{0}")]
    Cpu(String),
    #[error(transparent)]
    Plan(#[from] PlanError),
}

/// What the kernels use of the target CPU.
#[derive(Clone, Copy, Debug)]
pub struct Cpu {
    /// AMX-BF16: bf16 GEMMs run on tiles (`strip_amx` makes a copy without them).
    pub amx: bool,
    /// Vector registers (`vector_registers`).
    pub registers: usize,
    /// How it multiplies bytes (`int8_dots`).
    pub int8: Option<kb::Int8Dots>,
    /// AVX512_BF16: bf16 GEMMs of bf16 activations multiply pairs (`kernels::bf16`).
    pub bf16_dots: bool,
}

impl Cpu {
    pub fn of(tm: &TargetMachine) -> Cpu {
        Cpu {
            amx: has_amx(tm),
            registers: vector_registers(tm),
            int8: int8_dots(tm),
            bf16_dots: bf16_dots(tm),
        }
    }

    /// Records the CPU in `m` for the kernels built into it.
    fn set<'ctx>(&self, cx: &'ctx Context, m: &Module<'ctx>) {
        kb::set_vector_registers(cx, m, self.registers);
        kb::set_int8_dots(cx, m, self.int8);
        kb::set_bf16_dots(cx, m, self.bf16_dots);
    }
}

/// The LLVM backend's entry: the module of a compiled spec's library for `cpu`, and its
/// layout.
pub fn emit<'ctx>(
    cx: &'ctx Context,
    c: &Compiled,
    weights: &WeightTable,
    cpu: &Cpu,
) -> Result<(Module<'ctx>, Layout), LlvmError> {
    let amx = cpu.amx;
    for (name, _, dtype) in &weights.names {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::Q8 | DType::Quant(_)) {
            let use_ = "use f32, bf16, q8, or a ggml block type (q8_0, q2_k–q6_k, q4_0, q4_1, q5_0, q5_1)";
            return Err(LlvmError::Unsupported(format!("{dtype} weights (`{name}`); {use_}")));
        }
    }
    let m = cx.create_module(&c.spec.name);
    cpu.set(cx, &m);
    let layout = layout(c);
    let mut kernels: HashMap<String, FunctionValue> = HashMap::new();
    let mut arena = 0;
    for (name, graph) in c.named_graphs() {
        let (used, _) = graph_fn::emit(cx, &m, name, graph, weights, &layout, amx, false, &mut kernels)?;
        arena = arena.max(used);
    }
    // The batched decode (`tfc_decode_batch`): the extend graph of every row's output,
    // its rows one token of each slot. Without it the C half runs the slots one by one.
    if let Some(g) = c.extend_all.as_ref().filter(|g| graph_fn::batchable(g)) {
        let (used, _) =
            graph_fn::emit(cx, &m, "decode_batch", Some(g), weights, &layout, amx, true, &mut kernels)?;
        arena = arena.max(used);
    }
    let layout = Layout { arena_bytes: arena, ..layout };
    globals(cx, &m, &layout, weights, c.decode.is_some(), c.extend.is_some());
    m.verify().map_err(|e| LlvmError::Llvm(format!("bug: invalid module: {e}")))?;
    Ok((m, layout))
}

/// The plan of every graph of the library as text (`tfc ir --stage plan`): what `build`
/// decides before it emits code.
pub fn plan_text(c: &Compiled, weights: &WeightTable, cpu: &Cpu) -> Result<String, LlvmError> {
    // The kernels each node calls come from emitting the graphs, into a module of their own.
    let cx = Context::create();
    let m = cx.create_module(&c.spec.name);
    cpu.set(&cx, &m);
    let amx = cpu.amx;
    let (layout, mut kernels) = (layout(c), HashMap::new());
    let mut out = String::new();
    for (name, g) in c.named_graphs() {
        let Some(g) = g else { continue };
        let p = GraphPlan::of(g, weights, c.spec.sizes.max_seq, amx)?;
        let (_, calls) = graph_fn::emit(&cx, &m, name, Some(g), weights, &layout, amx, false, &mut kernels)?;
        out.push_str(&select::describe(name, g, &p, amx, weights, &calls));
    }
    Ok(out)
}

/// What a target machine enables: the features its feature string lists, and its CPU's
/// name (a named CPU's features are implied, not listed).
struct Features {
    on: Vec<String>,
    cpu: String,
}

impl Features {
    fn of(tm: &TargetMachine) -> Features {
        let on = tm.get_feature_string().to_string_lossy().split(',').map(str::to_string).collect();
        Features { on, cpu: tm.get_cpu().to_string_lossy().to_string() }
    }

    fn has(&self, feature: &str) -> bool {
        self.on.iter().any(|f| f == feature)
    }

    /// The CPU's entry in `AVX512_CPUS`, if it has one.
    fn named(&self) -> Option<&'static Avx512Cpu> {
        AVX512_CPUS.iter().find(|c| c.name == self.cpu)
    }
}

/// A CPU LLVM knows by name that has AVX-512, and what else of it the kernels use.
struct Avx512Cpu {
    name: &'static str,
    bw: bool,
    vnni: bool,
    bf16: bool,
}

const fn cpu(name: &'static str, bw: bool, vnni: bool, bf16: bool) -> Avx512Cpu {
    Avx512Cpu { name, bw, vnni, bf16 }
}

/// The CPUs LLVM knows by name that have AVX-512: AVX512BW, AVX512_VNNI, AVX512_BF16.
const AVX512_CPUS: &[Avx512Cpu] = &[
    cpu("x86-64-v4", true, false, false),
    cpu("skylake-avx512", true, false, false),
    cpu("cascadelake", true, true, false),
    cpu("cooperlake", true, true, true),
    cpu("cannonlake", true, false, false),
    cpu("icelake-client", true, true, false),
    cpu("icelake-server", true, true, false),
    cpu("rocketlake", true, true, false),
    cpu("tigerlake", true, true, false),
    cpu("sapphirerapids", true, true, true),
    cpu("emeraldrapids", true, true, true),
    cpu("graniterapids", true, true, true),
    cpu("graniterapids-d", true, true, true),
    cpu("diamondrapids", true, true, true),
    cpu("znver4", true, true, true),
    cpu("znver5", true, true, true),
    cpu("knl", false, false, false),
    cpu("knm", false, false, false),
];

/// Whether `tm` executes AMX-BF16 tiles.
pub fn has_amx(tm: &TargetMachine) -> bool {
    let f = Features::of(tm);
    f.has("+amx-tile") && f.has("+amx-bf16")
}

/// Whether `tm`'s code multiplies bf16 pairs into f32 (`vdpbf16ps`, AVX512_BF16).
pub fn bf16_dots(tm: &TargetMachine) -> bool {
    let f = Features::of(tm);
    f.has("+avx512bf16") || f.named().is_some_and(|c| c.bf16)
}

/// How `tm`'s code multiplies bytes: with AVX512_VNNI, or AVX512BW, or not at all
/// (`kernels::int8`).
pub fn int8_dots(tm: &TargetMachine) -> Option<kb::Int8Dots> {
    let f = Features::of(tm);
    let named = f.named();
    if f.has("+avx512vnni") && f.has("+avx512bw") || named.is_some_and(|c| c.vnni) {
        Some(kb::Int8Dots::Vnni)
    } else if f.has("+avx512bw") || named.is_some_and(|c| c.bw) {
        Some(kb::Int8Dots::Bw)
    } else {
        None
    }
}

/// How many vector registers `tm`'s code has: 32 with AVX-512, else 16 (AVX2 and older),
/// which the register tiles of the kernels are sized by (`Kb::vector_registers`).
pub fn vector_registers(tm: &TargetMachine) -> usize {
    let f = Features::of(tm);
    if f.has("+avx512f") || f.named().is_some() {
        32
    } else {
        16
    }
}

/// Replaces the functions of `m` that execute tile instructions (see `amx::strip`).
pub fn strip_amx(m: &Module) {
    amx::strip(m)
}

pub fn globals<'ctx>(
    cx: &'ctx Context,
    m: &Module<'ctx>,
    l: &Layout,
    w: &WeightTable,
    has_decode: bool,
    has_extend: bool,
) {
    let i64t = cx.i64_type();
    let scalar = |name: &str, v: u64| {
        let g = m.add_global(i64t, None, name);
        g.set_initializer(&i64t.const_int(v, false));
        g.set_constant(true);
        g.set_visibility(GlobalVisibility::Hidden);
    };
    scalar("tfc__n_weights", w.names.len() as u64);
    scalar("tfc__arena_bytes", l.arena_bytes);
    scalar("tfc__cache_bytes", l.cache_bytes);
    scalar("tfc__max_seq", l.max_seq as u64);
    scalar("tfc__vocab", l.vocab as u64);
    scalar("tfc__out_width", l.out_width as u64);
    scalar("tfc__has_decode", has_decode as u64);
    scalar("tfc__has_extend", has_extend as u64);
    scalar("tfc__type_rows", l.type_rows as u64);
    let sizes: Vec<_> =
        w.names.iter().map(|(_, s, d)| i64t.const_int(weight_bytes(s, *d) as u64, false)).collect();
    let arr = i64t.const_array(&sizes);
    let g = m.add_global(arr.get_type(), None, "tfc__weight_bytes");
    g.set_initializer(&arr);
    g.set_constant(true);
    g.set_visibility(GlobalVisibility::Hidden);
    // Four per weight: `out`, `in`, whether it is stored `[in, out]` and the layout (0
    // tiles, 1 panels); all zero for a weight bound as it is.
    let tiles: Vec<_> = (0..w.names.len())
        .flat_map(|i| match w.repack_of(i) {
            Some(t) => {
                [t.out as u64, t.inn as u64, t.transposed as u64, (t.layout == WeightLayout::Panels) as u64]
            }
            None => [0; 4],
        })
        .map(|v| i64t.const_int(v, false))
        .collect();
    let arr = i64t.const_array(&tiles);
    let g = m.add_global(arr.get_type(), None, "tfc__weight_tiles");
    g.set_initializer(&arr);
    g.set_constant(true);
    g.set_visibility(GlobalVisibility::Hidden);
    // Per weight, its checkpoint name and its type as `tfc_runtime::abi::weight_type`
    // writes it, which the runtime compares with the manifest.
    let strings = |name: &str, values: Vec<String>| {
        let ptrs: Vec<_> = values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let s = cx.const_string(v.as_bytes(), true);
                let g = m.add_global(s.get_type(), None, &format!("{name}.{i}"));
                g.set_initializer(&s);
                g.set_constant(true);
                g.set_linkage(Linkage::Private);
                g.as_pointer_value()
            })
            .collect();
        let ptr = cx.ptr_type(inkwell::AddressSpace::default());
        let arr = ptr.const_array(&ptrs);
        let g = m.add_global(arr.get_type(), None, name);
        g.set_initializer(&arr);
        g.set_constant(true);
        g.set_visibility(GlobalVisibility::Hidden);
    };
    strings("tfc__weight_name", w.names.iter().map(|(n, _, _)| n.clone()).collect());
    strings(
        "tfc__weight_type",
        w.names.iter().map(|(_, s, d)| tfc_runtime::abi::weight_type(d.name(), s)).collect(),
    );
}

/// `tfc__cpu_features`: the CPU features the main code needs, which the C half checks
/// before it chooses between the main and the fallback graph functions.
pub fn cpu_features_global<'ctx>(cx: &'ctx Context, m: &Module<'ctx>, features: &str) {
    let s = cx.const_string(features.as_bytes(), true);
    let g = m.add_global(s.get_type(), None, "tfc__cpu_features");
    g.set_initializer(&s);
    g.set_constant(true);
    g.set_visibility(GlobalVisibility::Hidden);
}

include!(concat!(env!("OUT_DIR"), "/x86_cpus.rs"));

/// Refuses a CPU name LLVM does not know: it would ignore it with a warning and then
/// abort the process when generating 64-bit code for the featureless CPU.
fn check_cpu(cpu: &str) -> Result<(), LlvmError> {
    if X86_CPUS.is_empty() || X86_CPUS.contains(&cpu) {
        return Ok(());
    }
    let near = X86_CPUS.iter().min_by_key(|c| strsim::levenshtein(c, cpu)).copied().unwrap_or("x86-64");
    Err(LlvmError::Cpu(format!(
        "target CPU `{cpu}` is not one LLVM knows (did you mean `{near}`?); `native`, `x86-64`, `x86-64-v3`, \
         `x86-64-v4` or a name from `llc -march=x86-64 -mcpu=help`"
    )))
}

/// The host's target machine (or `cpu`'s), position-independent for a shared library.
pub fn target_machine(cpu: Option<&str>) -> Result<TargetMachine, LlvmError> {
    if let Some(c) = cpu.filter(|&c| c != "native") {
        check_cpu(c)?;
    }
    Target::initialize_native(&InitializationConfig::default()).map_err(LlvmError::Llvm)?;
    let triple = TargetMachine::get_default_triple();
    let target = Target::from_triple(&triple).map_err(|e| LlvmError::Llvm(e.to_string()))?;
    let (cpu, features) = match cpu {
        None | Some("native") => (
            TargetMachine::get_host_cpu_name().to_string(),
            TargetMachine::get_host_cpu_features().to_string(),
        ),
        Some(c) => (c.to_string(), String::new()),
    };
    target
        .create_target_machine(
            &triple,
            &cpu,
            &features,
            OptimizationLevel::Aggressive,
            RelocMode::PIC,
            CodeModel::Default,
        )
        .ok_or_else(|| LlvmError::Llvm(format!("cannot create a target machine for cpu `{cpu}`")))
}

/// An LLVM pass pipeline: `default<On>` text, and whether LLVM's loop unrollers run.
#[derive(Clone, Copy, Debug)]
pub struct Pipeline {
    pub passes: &'static str,
    pub unroll: bool,
}

/// Runs `pipeline` over `m` and returns the object code.
pub fn optimize_and_emit(m: &Module, tm: &TargetMachine, pipeline: Pipeline) -> Result<Vec<u8>, LlvmError> {
    optimize(m, tm, pipeline)?;
    let buf = tm.write_to_memory_buffer(m, FileType::Object).map_err(|e| LlvmError::Llvm(e.to_string()))?;
    Ok(buf.as_slice().to_vec())
}

pub fn optimize(m: &Module, tm: &TargetMachine, pipeline: Pipeline) -> Result<(), LlvmError> {
    m.set_triple(&tm.get_triple());
    m.set_data_layout(&tm.get_target_data().get_data_layout());
    let options = PassBuilderOptions::create();
    options.set_loop_unrolling(pipeline.unroll);
    m.run_passes(pipeline.passes, tm, options).map_err(|e| LlvmError::Llvm(e.to_string()))
}
