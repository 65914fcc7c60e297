//! Broken specs never crash the compiler: every prefix of every small spec, and copies with
//! bytes deleted or replaced, either compile or produce diagnostics.

use tfc::Options;

use crate::common::*;

fn compiles_or_reports(name: &str, text: &str) {
    match tfc::compile(name, text, &Options::default(), &mut |_, _| {}) {
        Ok(_) => {}
        Err(tfc::CompileError::Spec(d)) => {
            assert!(!d.list.is_empty(), "{name}: an error without diagnostics");
            let _ = d.render(false);
        }
        Err(e) => panic!("{name}: an internal error for a user mistake: {e}\n{text}"),
    }
}

#[test]
fn mutilated_specs_get_diagnostics_not_crashes() {
    let mut specs = specs_in(&root().join("specs/tiny"));
    specs.extend(specs_in(&root().join("tests/specs/valid")));
    for path in specs {
        let src = std::fs::read_to_string(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let cuts: Vec<usize> = (0..src.len()).step_by(5).filter(|&i| src.is_char_boundary(i)).collect();
        for &i in &cuts {
            compiles_or_reports(&name, &src[..i]);
        }
        // Deterministic damage: drop or replace one byte in many places.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..150 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let at = (seed as usize) % src.len();
            if !src.is_char_boundary(at) || !src.is_char_boundary(at + 1) {
                continue;
            }
            let replacement = ["", "0", "}", "{", "=", "x", "\"", "-1", "(", ","][(seed >> 32) as usize % 10];
            let damaged = format!("{}{}{}", &src[..at], replacement, &src[at + 1..]);
            compiles_or_reports(&name, &damaged);
        }
    }
}

/// The tiny LLaMA spec with its first residual statement replaced by `stmt`.
fn llama_with(stmt: &str) -> String {
    let src = std::fs::read_to_string(root().join("specs/tiny/llama.tfs")).unwrap();
    let old = "x = x + attn(input_norm(x))";
    assert!(src.contains(old));
    src.replace(old, stmt)
}

#[test]
fn deep_nesting_is_a_diagnostic_and_long_sums_compile() {
    // Run on a thread with a small stack: the bound must hold wherever the compiler runs.
    let worker = std::thread::Builder::new().stack_size(1 << 20);
    worker
        .spawn(|| {
            let open = tfc::front::MAX_NESTING - 3; // `block {`, `attn(` and `input_norm(` count too
            let at_limit = format!("x = x + attn(input_norm({}x{}))", "(".repeat(open), ")".repeat(open));
            tfc::compile("limit", &llama_with(&at_limit), &Options::default(), &mut |_, _| {})
                .unwrap_or_else(|e| panic!("{e}"));
            for (what, deep) in [
                (
                    "parentheses",
                    format!("x = x + attn(input_norm({}x{}))", "(".repeat(8000), ")".repeat(8000)),
                ),
                (
                    "lists",
                    format!("x = x + attn(input_norm(x))\n  w = {}{}", "[".repeat(8000), "]".repeat(8000)),
                ),
            ] {
                let Err(tfc::CompileError::Spec(d)) =
                    tfc::compile(what, &llama_with(&deep), &Options::default(), &mut |_, _| {})
                else {
                    panic!("{what}: nested 8000 deep, but no diagnostic");
                };
                let text = d.render(false);
                assert!(text.contains("E0009") && text.contains("nest more than 64 deep"), "{what}: {text}");
            }
            // A sum of 20,000 terms is as deep as one term.
            let sum = format!("x = x + attn(input_norm(x{}))", " + x".repeat(20_000));
            let c = tfc::compile("sum", &llama_with(&sum), &Options::default(), &mut |_, _| {})
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(c.model.len() > 20_000);
        })
        .unwrap()
        .join()
        .unwrap();
}
