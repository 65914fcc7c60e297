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
