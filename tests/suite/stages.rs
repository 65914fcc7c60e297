//! Snapshots of every compiler stage for every spec in `specs/` and `tests/specs/valid/`,
//! plus the architecture drawing of each. The verifier runs after every pass.

use tfc::Options;

use crate::common::*;

#[test]
fn every_stage_of_every_spec() {
    let mut specs = specs_in(&root().join("specs"));
    specs.extend(specs_in(&root().join("tests/specs/valid")));
    for path in specs {
        let c = compile(&path, &Options::default());
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        for &stage in tfc::STAGES {
            let text = match c.stage(stage, false) {
                Some(g) => tfc::ir::print(g),
                None => format!("`{}` has bidirectional attention: no {stage} graph\n", c.spec.name),
            };
            insta::assert_snapshot!(format!("{stem}@{stage}"), text);
        }
    }
}

#[test]
fn architecture_drawings() {
    for name in ["gpt2", "phi", "opt_postln", "gemma3"] {
        let c = compile(&root().join(format!("specs/tiny/{name}.tfs")), &Options::default());
        insta::assert_snapshot!(format!("{name}@dot"), c.spec.dot(&c.model));
    }
}

#[test]
fn dump_after_reports_each_pass() {
    let path = root().join("specs/tiny/llama.tfs");
    let source = std::fs::read_to_string(&path).unwrap();
    let mut seen = Vec::new();
    tfc::compile("llama.tfs", &source, &Options::default(), &mut |pass, g| {
        seen.push(format!("{pass}:{}", g.phase.name()))
    })
    .unwrap();
    assert_eq!(
        seen,
        [
            "shape_infer:model",
            "cse:model",
            "dce:model",
            "fuse_attention:model",
            "split:prefill",
            "narrow_last_row:prefill",
            "cse:prefill",
            "dce:prefill",
            "split:decode",
            "cse:decode",
            "dce:decode"
        ]
    );
}

/// The LLVM backend's plan of every spec (`tfc ir --stage plan`): arena offsets, fused
/// chains, the weights' layouts and each linear map's algorithm, for a fixed CPU without
/// AMX (so the text is the same on every host). One snapshot per spec, so one drift does
/// not hide the rest.
#[test]
fn the_plan_of_every_spec() {
    let opts = tfc::backend::LibOptions { target_cpu: Some("x86-64-v4".into()), ..Default::default() };
    let plan = |path: &std::path::Path| {
        let c = compile(path, &Options::default());
        let text = tfc::backend::plan_ir(&c, &opts).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        insta::assert_snapshot!("plan", text);
    };
    insta::glob!("../../specs", "**/*.tfs", |path| plan(path));
    insta::glob!("../../tests/specs/valid", "**/*.tfs", |path| plan(path));
}

/// The plan of the bf16 specs for a CPU with AMX (the choice is data, so it is the same
/// on every host): which maps run on tiles, with how many activation parts, which write
/// their output packed for the next, and the packed regions of the arena.
#[test]
fn the_amx_plan_of_the_bf16_specs() {
    let plan = |path: &std::path::Path| {
        let c = compile(path, &Options::default());
        let weights = tfc::backend::library_weights(&c, tfc::backend::Backend::Llvm);
        let cpu = tfc::backend::llvm::Cpu { amx: true, registers: 32, int8: None, bf16_dots: true };
        let text = tfc::backend::llvm::plan_text(&c, &weights, &cpu).unwrap();
        assert!(text.contains("amx(parts="), "{}: no map on tiles", path.display());
        insta::assert_snapshot!("amx_plan", text);
    };
    insta::glob!("../../tests/specs/valid", "*bf16*.tfs", |path| plan(path));
}

/// The plan of the bf16 specs for a CPU with AVX512_BF16 and no AMX (Zen 4): the maps of
/// bf16 weights and activations multiply bf16 pairs in the packed GEMM, their input
/// sliced as bf16; maps of f32 activations widen the weights to f32.
#[test]
fn the_bf16_pairs_plan_of_the_bf16_specs() {
    let opts = tfc::backend::LibOptions { target_cpu: Some("znver4".into()), ..Default::default() };
    let plan = |path: &std::path::Path| {
        let c = compile(path, &Options::default());
        let text = tfc::backend::plan_ir(&c, &opts).unwrap();
        if c.spec.activations == tfc::ir::DType::BF16 {
            assert!(text.contains("_pairs"), "{}: no map on bf16 pairs", path.display());
        }
        insta::assert_snapshot!("pairs_plan", text);
    };
    insta::glob!("../../tests/specs/valid", "*bf16*.tfs", |path| plan(path));
}
