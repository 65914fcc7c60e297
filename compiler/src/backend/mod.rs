//! Code generation backends and the artifact they produce.
//!
//! [`llvm`] lowers the prefill and decode graphs to one LLVM module; [`compile_library`]
//! optimises it, emits an object for the host (or a chosen CPU), and links it with the
//! C half of the ABI (`tfc_runtime::abi`) into `lib<name>.so`, beside `<name>.h` and
//! `manifest.json`.

pub mod layout;
pub mod llvm;
pub mod mlir;
pub mod plan;
pub mod weights;

use std::path::{Path, PathBuf};
use std::process::Command;

use tfc_runtime::abi::{self, KvCache, Manifest, WeightInfo};

use crate::ir::Output;
use crate::Compiled;

/// A one-line description of the linked code generators and the host.
pub fn toolchain() -> String {
    inkwell::targets::Target::initialize_native(&inkwell::targets::InitializationConfig::default())
        .expect("the native target is always built into LLVM");
    let cpu = inkwell::targets::TargetMachine::get_host_cpu_name();
    let triple = inkwell::targets::TargetMachine::get_default_triple();
    let mlir = melior::Context::new();
    let dialects = melior::dialect::DialectRegistry::new();
    melior::utility::register_all_dialects(&dialects);
    mlir.append_dialect_registry(&dialects);
    mlir.load_all_available_dialects();
    let (major, minor, patch) = inkwell::support::get_llvm_version();
    format!(
        "LLVM {major}.{minor}.{patch} (host {}, cpu {}), MLIR with {} dialects",
        triple.as_str().to_string_lossy(),
        cpu.to_string_lossy(),
        mlir.loaded_dialect_count()
    )
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Llvm(#[from] llvm::LlvmError),
    #[error(transparent)]
    Mlir(#[from] mlir::MlirError),
    #[error("cannot write {path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("linking {lib} with `{cc}` failed:\n{stderr}")]
    Link { cc: String, lib: PathBuf, stderr: String },
}

/// What `tfc compile` wrote.
#[derive(Debug)]
pub struct Artifact {
    pub library: PathBuf,
    pub header: PathBuf,
    pub manifest: PathBuf,
}

/// Which code generator builds the CPU library.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// Kernels written with inkwell (`backend/llvm`).
    #[default]
    Llvm,
    /// `linalg` on tensors through MLIR's passes (`backend/mlir`).
    Mlir,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Llvm => "llvm",
            Backend::Mlir => "mlir",
        }
    }

    /// LLVM's pipeline for the module. MLIR's module is one large function per graph,
    /// already tiled and vectorised, on which `O3` is slow (GPT-2 small: 35 s in `opt`
    /// against 8 s for `O2`). The hand-written kernels are unrolled where it pays as they
    /// are built (register tiles, the k-steps of a tile); LLVM's unrollers only multiplied
    /// their loops again: W2's module grew from 33k to 47k lines after `O3` and took 2.5×
    /// as long to optimise and emit, for no speed we could measure.
    fn llvm_pipeline(self) -> llvm::Pipeline {
        match self {
            Backend::Llvm => llvm::Pipeline { passes: "default<O3>", unroll: false },
            Backend::Mlir => llvm::Pipeline { passes: "default<O2>", unroll: true },
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct LibOptions {
    pub backend: Backend,
    /// `None` or `native`: the host CPU with its features; otherwise an LLVM CPU name.
    pub target_cpu: Option<String>,
}

/// The weight table of a CPU library from `backend`: the LLVM kernels read bf16 matrices
/// in tiles and f32 ones in panels (`weights::WeightLayout`), re-packed when they are bound.
pub fn library_weights(c: &Compiled, backend: Backend) -> weights::WeightTable {
    let graphs = c.library_graphs();
    let table = weights::WeightTable::of(&graphs);
    match backend {
        Backend::Llvm => table.repacked(&graphs),
        Backend::Mlir => table,
    }
}

/// The library's LLVM module from the chosen backend, with its layout.
/// The most layers the MLIR CPU backend compiles: it writes each graph as one function
/// with every op's loops inline, and LLVM's optimisation of such a function grows with the
/// square of its length (tiny LLaMA layers: 16 in 37 s, 32 in 142 s, 64 in 400 s, 128 over
/// 50 min).
pub const MLIR_MAX_LAYERS: usize = 32;

fn build<'ctx>(
    cx: &'ctx inkwell::context::Context,
    c: &Compiled,
    weights: &weights::WeightTable,
    backend: Backend,
    tm: &inkwell::targets::TargetMachine,
) -> Result<(inkwell::module::Module<'ctx>, layout::Layout), BackendError> {
    match backend {
        Backend::Llvm => Ok(llvm::emit(cx, c, weights, &llvm::Cpu::of(tm))?),
        Backend::Mlir => {
            let layers = c.spec.sizes.layers;
            if layers > MLIR_MAX_LAYERS {
                return Err(mlir::MlirError::Unsupported(format!(
                    "more than {MLIR_MAX_LAYERS} layers (`{}` has {layers}): each graph becomes one function, \
                     whose optimisation takes time quadratic in its length (64 small layers took 400 s); \
                     the default backend, `--backend llvm`, compiles any number of layers in linear time",
                    c.spec.name
                ))
                .into());
            }
            let layout = layout::layout(c);
            let ml = mlir::Mlir::new();
            let m = mlir_cpu(&ml, c, weights, &layout, llvm::vector_registers(tm), true)?;
            let lm = ml.to_llvm(&m, cx)?;
            for name in ["prefill", "prefill_all", "decode"] {
                if let Some(f) = lm.get_function(&format!("tfc__{name}")) {
                    f.as_global_value().set_visibility(inkwell::GlobalVisibility::Hidden);
                }
            }
            // No extend graph: the library continues a cache by decode steps.
            llvm::globals(cx, &lm, &layout, weights, c.decode.is_some(), false);
            lm.verify().map_err(|e| llvm::LlvmError::Llvm(format!("bug: invalid module from MLIR: {e}")))?;
            Ok((lm, layout))
        }
    }
}

/// The CPU module in MLIR: as emitted (`lower = false`) or in the LLVM dialect.
fn mlir_cpu<'c>(
    ml: &'c mlir::Mlir,
    c: &Compiled,
    weights: &weights::WeightTable,
    layout: &layout::Layout,
    registers: usize,
    lower: bool,
) -> Result<melior::ir::Module<'c>, BackendError> {
    let text = mlir::linalg::emit(c, weights, layout, registers)?;
    let mut m = ml.parse(&text)?;
    if lower {
        ml.lower_cpu(&mut m)?;
    }
    Ok(m)
}

/// The MLIR of a spec's CPU library for `opts.target_cpu`: `mlir` (linalg on tensors) or
/// `mlir-llvm` (lowered).
pub fn mlir_ir(c: &Compiled, stage: &str, opts: &LibOptions) -> Result<String, BackendError> {
    let tm = llvm::target_machine(opts.target_cpu.as_deref())?;
    let weights = library_weights(c, Backend::Mlir);
    let layout = layout::layout(c);
    let ml = mlir::Mlir::new();
    let m = mlir_cpu(&ml, c, &weights, &layout, llvm::vector_registers(&tm), stage == "mlir-llvm")?;
    Ok(m.as_operation().to_string())
}

/// An I/O error at `path`, for `map_err`.
fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackendError {
    let path = path.to_path_buf();
    move |e| BackendError::Io { path, message: e.to_string() }
}

/// Which device a build is for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// A shared library for this CPU (or `--target-cpu`).
    #[default]
    Cpu,
    /// SPIR-V compute shaders and a dispatch list, run by the runtime through Vulkan.
    Vulkan,
    /// PTX and a dispatch list, run by the runtime through the CUDA driver.
    Cuda,
}

impl Target {
    fn gpu(self) -> Option<mlir::gpu::Target> {
        match self {
            Target::Cpu => None,
            Target::Vulkan => Some(mlir::gpu::Target::Vulkan),
            Target::Cuda => Some(mlir::gpu::Target::Cuda),
        }
    }
}

/// A GPU build: the kernels at each step and the program that runs them.
pub struct GpuBuild {
    /// The kernels in the `gpu` dialect.
    pub kernels: String,
    /// The kernels lowered for the target (`spirv` or `llvm`/`nvvm` dialects).
    pub lowered: String,
    /// SPIR-V words or PTX text.
    pub binary: Vec<u8>,
    pub program: tfc_runtime::gpu::program::Program,
}

/// Compiles a spec's graphs to GPU kernels for `target` (`vulkan` or `cuda`).
pub fn gpu_build(c: &Compiled, target: Target) -> Result<GpuBuild, BackendError> {
    let Some(t) = target.gpu() else {
        return Err(mlir::MlirError::Unsupported("a GPU build for the CPU target".into()).into());
    };
    // The kernels read f32 weights; bf16 and f16 weights keep their declared type in the
    // program, and the runtime rounds them to it, then widens them exactly, when it
    // uploads them.
    let weights = library_weights(c, Backend::Mlir);
    if let Some((name, _, d)) = weights.names.iter().find(|w| w.2.is_quantized()) {
        let what = format!("{d} weights on a GPU target (`{name}`; use f32 or bf16)");
        return Err(mlir::MlirError::Unsupported(what).into());
    }
    let layout = layout::layout(c);
    let m = mlir::gpu::emit(c, &weights, &layout, t)?;
    let ml = mlir::Mlir::new();
    let (lowered, binary) = ml.compile_gpu(&m.mlir, t)?;
    let mut program = m.program;
    program.weights = weights
        .names
        .iter()
        .map(|(n, s, d)| WeightInfo {
            name: n.clone(),
            shape: s.clone(),
            dtype: d.name().into(),
            repacked: false,
        })
        .collect();
    program.spec_hash = abi::fnv1a(&c.source);
    Ok(GpuBuild { kernels: m.mlir, lowered, binary, program })
}

/// Writes a GPU build: `<name>.spv` or `<name>.ptx`, and `gpu.json`.
pub fn compile_gpu(c: &Compiled, out_dir: &Path, target: Target) -> Result<Vec<PathBuf>, BackendError> {
    let b = gpu_build(c, target)?;
    std::fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    let bin = out_dir.join(&b.program.binary);
    std::fs::write(&bin, &b.binary).map_err(io(&bin))?;
    let prog = out_dir.join(tfc_runtime::gpu::program::PROGRAM_FILE);
    let text = serde_json::to_string_pretty(&b.program).expect("a program serialises");
    std::fs::write(&prog, text).map_err(io(&prog))?;
    Ok(vec![bin, prog])
}

/// The plan of a spec's library from the LLVM backend (`tfc ir --stage plan`): per graph,
/// the arena's regions, and per node where its value lives, what is fused into it, and
/// which algorithm computes each linear map, for the CPU `opts` names.
pub fn plan_ir(c: &Compiled, opts: &LibOptions) -> Result<String, BackendError> {
    let tm = llvm::target_machine(opts.target_cpu.as_deref())?;
    Ok(llvm::plan_text(c, &library_weights(c, Backend::Llvm), &llvm::Cpu::of(&tm))?)
}

/// The LLVM IR of a spec's library, before (`optimized = false`) or after its pipeline.
pub fn llvm_ir(c: &Compiled, optimized: bool, opts: &LibOptions) -> Result<String, BackendError> {
    let cx = inkwell::context::Context::create();
    let tm = llvm::target_machine(opts.target_cpu.as_deref())?;
    let (m, _) = build(&cx, c, &library_weights(c, opts.backend), opts.backend, &tm)?;
    m.set_triple(&tm.get_triple());
    m.set_data_layout(&tm.get_target_data().get_data_layout());
    if optimized {
        llvm::optimize(&m, &tm, opts.backend.llvm_pipeline())?;
    }
    Ok(m.print_to_string().to_string())
}

/// The features of `tm` that the library must find on the CPU it runs on (those the C
/// half can test; see `abi::CPU_FEATURES`), comma-separated.
fn required_features(tm: &inkwell::targets::TargetMachine) -> String {
    let all = tm.get_feature_string().to_string_lossy().to_string();
    let on: Vec<&str> = all.split(',').filter_map(|f| f.strip_prefix('+')).collect();
    abi::CPU_FEATURES.iter().filter(|f| on.contains(f)).copied().collect::<Vec<_>>().join(",")
}

/// A copy of the module for the fallback CPU: its graph functions renamed
/// `tfc__<graph>__fallback`, its data left to the main module, no tile code.
fn fallback_module<'ctx>(
    m: &inkwell::module::Module<'ctx>,
) -> Result<inkwell::module::Module<'ctx>, BackendError> {
    let fm = m.clone();
    llvm::strip_amx(&fm);
    for g in ["prefill", "prefill_all", "decode", "extend", "extend_all", "decode_batch"] {
        if let Some(f) = fm.get_function(&format!("tfc__{g}")) {
            f.as_global_value().set_name(&format!("tfc__{g}__fallback"));
        }
    }
    let mut data = Vec::new();
    let mut g = fm.get_first_global();
    while let Some(v) = g {
        g = v.get_next_global();
        if v.get_initializer().is_some() && v.get_linkage() != inkwell::module::Linkage::Private {
            data.push(v);
        }
    }
    for v in data {
        // The graph functions never read the model constants; the main object defines them.
        v.set_initializer(&v.get_initializer().unwrap().get_type().const_zero());
        v.set_linkage(inkwell::module::Linkage::Internal);
    }
    fm.verify().map_err(|e| llvm::LlvmError::Llvm(format!("bug: invalid fallback module: {e}")))?;
    Ok(fm)
}

/// The fallback object: bitcode of `fallback_module` for plain x86-64, at `O1` without
/// unrolling (it is for correctness on older CPUs and should not double the build; on
/// GPT-2 small it runs as fast as at `O2`, which took 25% longer to build).
fn emit_fallback(bitcode: &[u8]) -> Result<Vec<u8>, BackendError> {
    let cx = inkwell::context::Context::create();
    let buf = inkwell::memory_buffer::MemoryBuffer::create_from_memory_range_copy(bitcode, "fallback");
    let m = inkwell::module::Module::parse_bitcode_from_buffer(&buf, &cx)
        .map_err(|e| llvm::LlvmError::Llvm(format!("bug: fallback bitcode: {e}")))?;
    let pipeline = llvm::Pipeline { passes: "default<O1>", unroll: false };
    Ok(llvm::optimize_and_emit(&m, &llvm::target_machine(Some("x86-64"))?, pipeline)?)
}

/// Compiles a spec to `out_dir/lib<name>.so`, `<name>.h` and `manifest.json`.
pub fn compile_library(c: &Compiled, out_dir: &Path, opts: &LibOptions) -> Result<Artifact, BackendError> {
    let weights = library_weights(c, opts.backend);
    let cx = inkwell::context::Context::create();
    let tm = llvm::target_machine(opts.target_cpu.as_deref())?;
    let (m, layout) = build(&cx, c, &weights, opts.backend, &tm)?;
    // The same graphs for baseline x86-64, chosen at load time when the CPU lacks a
    // feature the main code uses: a library never dies with an illegal instruction.
    // It is optimised and emitted on a second thread (in its own LLVM context, from
    // bitcode), beside the main code, so it costs little wall time.
    let features = required_features(&tm);
    let fallback_bitcode = if features.is_empty() {
        None
    } else {
        Some(fallback_module(&m)?.write_bitcode_to_memory().as_slice().to_vec())
    };
    llvm::cpu_features_global(&cx, &m, &features);
    let (object, fallback_object) = std::thread::scope(|scope| {
        let fallback = fallback_bitcode.map(|bc| scope.spawn(move || emit_fallback(&bc)));
        let object = llvm::optimize_and_emit(&m, &tm, opts.backend.llvm_pipeline());
        let fallback = fallback.map(|h| h.join().expect("the fallback build does not panic")).transpose();
        (object, fallback)
    });
    let (object, fallback_object) = (object?, fallback_object?);

    std::fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    let name = &c.spec.name;
    let work = out_dir.join(format!(".{name}.build"));
    std::fs::create_dir_all(&work).map_err(io(&work))?;
    let (obj, support, header) =
        (work.join("model.o"), work.join("support.c"), out_dir.join(format!("{name}.h")));
    std::fs::write(&obj, &object).map_err(io(&obj))?;
    let fallback_obj = work.join("fallback.o");
    if let Some(o) = &fallback_object {
        std::fs::write(&fallback_obj, o).map_err(io(&fallback_obj))?;
    }
    std::fs::write(&support, abi::SUPPORT_C).map_err(io(&support))?;
    std::fs::write(&header, abi::HEADER).map_err(io(&header))?;
    std::fs::write(work.join("tfc.h"), abi::HEADER).map_err(io(&work))?;
    let library = out_dir.join(format!("lib{name}.so"));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let result = Command::new(&cc)
        .args(["-O2", "-fPIC", "-shared", "-std=c11", "-pthread", "-Wl,-z,defs", "-o"])
        .arg(&library)
        .arg(&support)
        .arg(&obj)
        .args(fallback_object.as_ref().map(|_| &fallback_obj))
        .arg(if fallback_object.is_some() { "-DTFC_FALLBACK" } else { "-UTFC_FALLBACK" })
        // Extra flags for the C half, e.g. `-fsanitize=address,undefined` to test it.
        .args(std::env::var("TFC_CFLAGS").unwrap_or_default().split_whitespace())
        .arg("-lm")
        .output()
        .map_err(|e| BackendError::Link { cc: cc.clone(), lib: library.clone(), stderr: e.to_string() })?;
    if !result.status.success() {
        let stderr = String::from_utf8_lossy(&result.stderr).into_owned();
        return Err(BackendError::Link { cc, lib: library, stderr });
    }
    let _ = std::fs::remove_dir_all(&work);

    let cpu = match opts.target_cpu.as_deref() {
        None | Some("native") => inkwell::targets::TargetMachine::get_host_cpu_name().to_string(),
        Some(c) => c.to_string(),
    };
    let per_token: usize = layout.cache.values().map(|(_, g, hd)| g * hd * 4).sum();
    let manifest = Manifest {
        name: name.clone(),
        abi_version: abi::ABI_VERSION,
        backend: opts.backend.name().into(),
        target_cpu: cpu,
        library: format!("lib{name}.so"),
        vocab: layout.vocab,
        max_seq: layout.max_seq,
        output: Output::Main(c.prefill.main_output().0).name(),
        output_width: layout.out_width,
        has_decode: c.decode.is_some(),
        layer_blocks: if c.spec.blocks.len() > 1 { c.spec.layer_names() } else { Vec::new() },
        kv_cache: KvCache {
            layout: "per layer, K then V (K only where the values are the keys: a latent attention): [kv_heads][max_seq][head_dim] f32".into(),
            bytes_per_token: per_token,
            bytes: layout.cache_bytes as usize,
        },
        weights: weights
            .names
            .iter()
            .enumerate()
            .map(|(i, (n, s, d))| WeightInfo {
                name: n.clone(),
                shape: s.clone(),
                dtype: d.name().into(),
                repacked: weights.repack_of(i).is_some(),
            })
            .collect(),
        library_hash: abi::fnv1a_bytes(&std::fs::read(&library).map_err(io(&library))?),
        spec_hash: abi::fnv1a(&c.source),
        spec: c.source.clone(),
    };
    let mpath = out_dir.join("manifest.json");
    let text = serde_json::to_string_pretty(&manifest).expect("a manifest serialises");
    std::fs::write(&mpath, text).map_err(io(&mpath))?;
    Ok(Artifact { library, header, manifest: mpath })
}
