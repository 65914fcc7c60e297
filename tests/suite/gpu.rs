//! The GPU targets without a GPU: every fixture architecture compiled to SPIR-V and run
//! through the runtime's Vulkan path on lavapipe (Mesa's CPU implementation), against the
//! interpreter and transformers; every SPIR-V module checked by `spirv-val` and every
//! PTX by `ptxas` for sm_80 and sm_90. `scripts/setup.sh` installs lavapipe, the
//! SPIR-V tools and ptxas; without them these tests fail and say what is missing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use tfc::backend::{compile_gpu, gpu_build, Target};
use tfc::interp::{run, Inputs, WeightSource, Weights};
use tfc::Options;
use tfc_runtime::gpu::{GpuModel, GpuSession};
use tfc_runtime::{Checkpoint, WeightData};

use crate::common::*;

fn build(spec: &Path, tag: &str, target: Target) -> PathBuf {
    build_opts(spec, tag, &tfc::Options::default(), target)
}

fn build_opts(spec: &Path, tag: &str, opts: &tfc::Options, target: Target) -> PathBuf {
    let stem = spec.file_stem().unwrap().to_string_lossy().to_string();
    let dir = root().join("target/test-libs").join(format!("{tag}-{}", target_name(target))).join(&stem);
    let _ = std::fs::remove_dir_all(&dir);
    compile_gpu(&compile(spec, opts), &dir, target).unwrap_or_else(|e| panic!("{}: {e}", spec.display()));
    dir
}

fn target_name(t: Target) -> &'static str {
    match t {
        Target::Cpu => "cpu",
        Target::Vulkan => "vulkan",
        Target::Cuda => "cuda",
    }
}

/// A fixture through Vulkan (see `check_fixture`), after `spirv-val` on its module.
fn check(arch: &str) {
    let fx = Fixture::load(arch);
    for r in fx.regimes() {
        let dir = build_opts(&fx.spec, r.tag, &r.options, Target::Vulkan);
        validate_spirv(&dir.join(format!("{}.spv", spec_name(&fx.spec))));
        let model = GpuModel::load(&dir).unwrap();
        let ck = Arc::new(Checkpoint::open(&fx.dir).unwrap());
        let mut s = GpuSession::new(&model, WeightData::Checkpoint(ck))
            .unwrap_or_else(|e| panic!("{arch}: {e} (is mesa-vulkan-drivers installed?)"));
        check_fixture(&fx, &r, "Vulkan", &mut s);
    }
}

fn spec_name(spec: &Path) -> String {
    let c = compile(spec, &Options::default());
    c.spec.name
}

fn validate_spirv(spv: &Path) {
    let out = Command::new("spirv-val")
        .args(["--target-env", "vulkan1.3"])
        .arg(spv)
        .output()
        .expect("spirv-val runs (apt install spirv-tools; scripts/setup.sh does)");
    assert!(out.status.success(), "{}: spirv-val: {}", spv.display(), String::from_utf8_lossy(&out.stderr));
}

macro_rules! vulkan_tests {
    ($($arch:ident),*) => { $( #[test] fn $arch() { check(stringify!($arch)); } )* };
}

mod vulkan {
    use super::*;
    with_fixtures!(vulkan_tests);
    with_moe_fixtures!(vulkan_tests);
}

/// `ptxas` from the `nvidia-cuda-nvcc-cu12` wheel that `scripts/setup.sh` installs.
fn ptxas() -> PathBuf {
    if let Some(p) = std::env::var_os("TFC_PTXAS") {
        return PathBuf::from(p);
    }
    let venv = root().join("target/ptxas-venv");
    let found = walk(&venv).into_iter().find(|p| p.ends_with("cuda_nvcc/bin/ptxas"));
    found.unwrap_or_else(|| panic!("no ptxas under {} (run scripts/setup.sh)", venv.display()))
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn every_fixture_compiles_to_ptx_that_ptxas_accepts_for_sm80_and_sm90() {
    let ptxas = ptxas();
    let tmp = root().join("target/test-libs/ptx");
    std::fs::create_dir_all(&tmp).unwrap();
    let mut specs = specs_in(&root().join("specs/tiny"));
    specs.extend(specs_in(&root().join("tests/specs/valid")));
    for spec in specs {
        let c = compile(&spec, &tfc::Options::default());
        let built = gpu_build(&c, Target::Cuda);
        let b = built.unwrap_or_else(|e| panic!("{}: {e}", spec.display()));
        let ptx = tmp.join(format!("{}.ptx", b.program.name));
        std::fs::write(&ptx, &b.binary).unwrap();
        for arch in ["sm_80", "sm_90"] {
            let out = Command::new(&ptxas)
                .args(["--gpu-name", arch, "-o"])
                .arg(tmp.join(format!("{}.{arch}.cubin", b.program.name)))
                .arg(&ptx)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: ptxas {arch}: {}",
                spec.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Seeded random weights in the program's order, and the interpreter's binding of them.
fn random_weights(model: &GpuModel, graphs: &[&tfc::ir::Graph]) -> (Weights, WeightData) {
    let w = Weights::bind(graphs, &WeightSource::Random { seed: 11 }).unwrap();
    let bufs = model.program().weights.iter().map(|m| w.get(&m.name).unwrap().data.clone()).collect();
    (w, WeightData::Owned(bufs))
}

/// Sinusoidal and ALiBi positions, sliding windows, grouped QKV, Conv1D weights, bf16
/// storage: prefill + decode through Vulkan equal one interpreter pass at every split.
#[test]
fn vulkan_prefill_and_decode_equal_the_interpreter_on_every_small_spec() {
    for spec in specs_in(&root().join("tests/specs/valid")) {
        let c = compile(&spec, &Options::default());
        let model = GpuModel::load(build(&spec, "random", Target::Vulkan)).unwrap();
        let (w, data) = random_weights(&model, &[&c.model]);
        let mut s = GpuSession::new(&model, data).unwrap();
        let name = format!("{} (Vulkan)", spec.file_name().unwrap().to_string_lossy());
        check_splits(&name, &c, &w, &mut s);
    }
}

/// The mixtures of `tests/specs/gemm/moe.tfs` (one tensor per expert and a shared expert
/// behind its gate; fused gate_up with a softmax over the chosen; gpt-oss's transposed,
/// interleaved experts with biases, the clamped GLU and a router bias) through Vulkan
/// against the interpreter at every split, with seeded weights and again with the
/// routers zeroed, so that every choice is a tie that must go to the lowest experts.
#[test]
fn vulkan_mixtures_of_experts_equal_the_interpreter_ties_included() {
    let spec = root().join("tests/specs/gemm/moe.tfs");
    let c = compile(&spec, &Options::default());
    let model = GpuModel::load(build(&spec, "moe", Target::Vulkan)).unwrap();
    let order: Vec<&str> = model.program().weights.iter().map(|m| m.name.as_str()).collect();
    for tied in [false, true] {
        let (mut w, data) = random_weights(&model, &[&c.model]);
        let data = if tied { zero_routers(&c, &mut w, data, &order) } else { data };
        let mut s = GpuSession::new(&model, data).unwrap();
        check_splits(&format!("moe (Vulkan, tied routers: {tied})"), &c, &w, &mut s);
    }
}

#[test]
fn bad_calls_on_the_gpu_are_errors() {
    let spec = root().join("specs/tiny/gpt2.tfs");
    let c = compile(&spec, &Options::default());
    let model = GpuModel::load(build(&spec, "abi", Target::Vulkan)).unwrap();
    let (_, data) = random_weights(&model, &[&c.model]);
    let mut s = GpuSession::new(&model, data).unwrap();
    let err = |r: Result<Vec<f32>, tfc_runtime::RuntimeError>| r.unwrap_err().to_string();
    assert!(err(s.decode(1)).contains("prefill first"));
    assert!(err(s.prefill(&[], None, false)).contains("out of range"));
    assert!(err(s.prefill(&[384], None, false)).contains("outside the vocabulary"));
    assert!(err(s.prefill(&vec![1; 65], None, false)).contains("max_seq"));
    assert!(err(s.prefill(&[1, 2], Some(&[0]), false)).contains("one token type per token"));
    s.prefill(&vec![1; 63], None, false).unwrap();
    assert!(err(s.prefill(&[1], None, false)).contains("reset first"));
    assert!(err(s.decode(-1)).contains("outside the vocabulary"));
    s.decode(1).unwrap();
    assert!(err(s.decode(1)).contains("max_seq"));
    assert_eq!(s.position(), 64);
    let short = WeightData::Owned(model.program().weights.iter().map(|_| vec![0.0; 3]).collect());
    let e = GpuSession::new(&model, short).err().unwrap().to_string();
    assert!(e.contains("has 3 values"), "{e}");
    let ck = Arc::new(Checkpoint::open(root().join("tests/fixtures/hf/llama")).unwrap());
    let e = GpuSession::new(&model, WeightData::Checkpoint(ck)).err().unwrap().to_string();
    assert!(e.contains("no tensor `transformer.wte.weight`"), "{e}");
    drop(s);
}

/// Where a CUDA driver exists the PTX runs and matches the interpreter; here (no GPU) the
/// session says plainly that there is no driver.
#[test]
fn the_cuda_path_runs_or_says_there_is_no_driver() {
    let spec = root().join("specs/tiny/llama.tfs");
    let c = compile(&spec, &Options::default());
    let model = GpuModel::load(build(&spec, "cuda", Target::Cuda)).unwrap();
    let (w, data) = random_weights(&model, &[&c.model]);
    let session = GpuSession::new(&model, data);
    match session {
        Err(e) => assert!(e.to_string().contains("no CUDA driver"), "{e}"),
        Ok(mut s) => {
            let tokens = [3, 1, 4, 1, 5];
            let inputs = Inputs { tokens: tokens.iter().map(|&t| t as i64).collect(), ..Inputs::default() };
            let mut full = run(&c.model, &w, &inputs).unwrap();
            let full = full.remove("logits").unwrap();
            let all = s.prefill(&tokens, None, true).unwrap();
            assert_close("llama: cuda, all rows", &all, &full.data, 1e-5);
        }
    };
}

/// The MLIR at each step for a small spec: linalg on tensors (CPU), the gpu kernels,
/// the same kernels in the spirv dialect (the SPIR-V disassembly) and in the nvvm
/// dialect, and the PTX.
#[test]
fn mlir_stages() {
    let spec = root().join("tests/specs/valid/alibi_hidden.tfs");
    let source = std::fs::read_to_string(&spec).unwrap();
    let c = compile_text("alibi_hidden.tfs", &source);
    let lib = tfc::backend::LibOptions { target_cpu: Some("x86-64-v4".into()), ..Default::default() };
    let cpu = tfc::backend::mlir_ir(&c, "mlir", &lib).unwrap();
    insta::assert_snapshot!("alibi_hidden@mlir", cpu);
    let v = gpu_build(&c, Target::Vulkan).unwrap();
    insta::assert_snapshot!("alibi_hidden@gpu", v.kernels);
    insta::assert_snapshot!("alibi_hidden@spirv", v.lowered);
    let cu = gpu_build(&c, Target::Cuda).unwrap();
    insta::assert_snapshot!("alibi_hidden@nvvm", cu.lowered);
    insta::assert_snapshot!("alibi_hidden@ptx", String::from_utf8(cu.binary).unwrap());
}

/// A bf16 spec on the GPU: the runtime rounds an f32 checkpoint to bf16 before the f32
/// kernels read it, so Vulkan computes what the bf16 interpreter computes.
#[test]
fn bf16_weights_on_vulkan_match_the_bf16_interpreter() {
    let spec = root().join("tests/specs/valid/llama_bf16.tfs");
    let fx = root().join("tests/fixtures/hf/llama");
    let model = GpuModel::load(build(&spec, "bf16", Target::Vulkan)).unwrap();
    assert!(model.program().weights.iter().any(|w| w.dtype == "bf16"));
    let ck = Arc::new(Checkpoint::open(&fx).unwrap());
    let mut s = GpuSession::new(&model, WeightData::Checkpoint(ck.clone())).unwrap();
    let prompt = [188, 354, 68, 81, 173, 71, 249, 323, 49, 60, 366, 134];
    let rows = s.prefill(&prompt, None, true).unwrap();
    let c = compile(&spec, &Options::default());
    let w = Weights::bind(&[&c.model], &WeightSource::Checkpoint(&ck)).unwrap();
    let tokens: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    let interp =
        run(&c.model, &w, &Inputs { tokens, ..Inputs::default() }).unwrap().remove("logits").unwrap();
    assert_close("bf16 on vulkan vs bf16 interpreter", &rows, &interp.data, 1e-4);
}
