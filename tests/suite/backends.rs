//! The compiled library (LLVM backend, through the runtime crate and the C ABI) against
//! the reference interpreter and the Hugging Face fixtures, on all ten architectures.

use std::path::PathBuf;
use std::sync::Arc;

use tfc::backend::{compile_library, LibOptions};
use tfc::interp::{run, Inputs, WeightSource, Weights};
use tfc::Options;
use tfc_runtime::{argmax, Checkpoint, Model, Session, WeightData};

use crate::common::*;

/// Compiles a spec into a fresh folder under the target directory.
pub fn build(spec: &std::path::Path) -> PathBuf {
    let stem = spec.file_stem().unwrap().to_string_lossy().to_string();
    let dir = root().join("target/test-libs").join(&stem);
    let _ = std::fs::remove_dir_all(&dir);
    let source = std::fs::read_to_string(spec).unwrap();
    compile_library(&spec.display().to_string(), &source, &dir, &LibOptions::default())
        .unwrap_or_else(|e| panic!("{}: {e}", spec.display()));
    dir
}

fn check(arch: &str) {
    let spec = root().join("specs/tiny").join(format!("{arch}.tfs"));
    let fx = root().join("tests/fixtures/hf").join(arch);
    let model = Model::load(build(&spec)).unwrap();
    let ck = Arc::new(Checkpoint::open(&fx).unwrap());
    let mut s = Session::new(&model, WeightData::Checkpoint(ck.clone()), 2).unwrap();
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("fixture.json")).unwrap()).unwrap();
    let ids = |k: &str| -> Vec<i32> {
        fixture[k]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_i64().unwrap() as i32).collect())
            .unwrap_or_default()
    };
    let (prompt, greedy) = (ids("prompt"), ids("greedy"));
    let expected = fx.join("expected.safetensors");

    // All rows of the prompt against transformers and against the interpreter.
    let rows = s.prefill(&prompt, None, true).unwrap();
    let c = compile(&spec, &Options::default());
    let w = Weights::bind(&[&c.model], &WeightSource::Checkpoint(&ck)).unwrap();
    let tokens: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    let mut interp = run(&c.model, &w, &Inputs { tokens, ..Inputs::default() }).unwrap();
    let interp = interp.remove("logits").or_else(|| interp.remove("hidden")).unwrap();
    assert_close(&format!("{arch}: library vs interpreter"), &rows, &interp.data, 1e-4);
    if greedy.is_empty() {
        let want = read_tensor(&expected, "last_hidden_state");
        assert_close(&format!("{arch}: library vs transformers"), &rows, &want.data, 1e-4);
        assert!(s.decode(1).is_err(), "an encoder has no decode step");
        return;
    }
    let want = read_tensor(&expected, "full_logits");
    let vocab = want.shape[1];
    assert_close(
        &format!("{arch}: prompt logits vs transformers"),
        &rows,
        &want.data[..prompt.len() * vocab],
        1e-4,
    );

    // Prefill + decode through the library's cache: the same rows, the same tokens.
    s.reset();
    let mut logits = s.prefill(&prompt, None, false).unwrap();
    let mut generated = Vec::new();
    for step in 0..greedy.len() {
        let pos = prompt.len() - 1 + step;
        let what = format!("{arch}: cached logits at position {pos}");
        assert_close(&what, &logits, &want.data[pos * vocab..(pos + 1) * vocab], 1e-4);
        let next = argmax(&logits) as i32;
        generated.push(next);
        if step + 1 < greedy.len() {
            logits = s.decode(next).unwrap();
        }
    }
    assert_eq!(generated, greedy, "{arch}: greedy continuation through the library");
    assert_eq!(s.position(), prompt.len() + greedy.len() - 1);
}

macro_rules! backend_tests {
    ($($arch:ident),*) => { $( #[test] fn $arch() { check(stringify!($arch)); } )* };
}

backend_tests!(bert, bloom, gemma, gpt2, gpt_neox, llama, mistral, opt_postln, phi, qwen2);
