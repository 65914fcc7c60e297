//! Every spec in `tests/specs/invalid/` fails with the diagnostics in its snapshot: stable
//! codes, `file:line:col`, the offending text underlined, all errors of a file at once.

use crate::common::*;

#[test]
fn invalid_specs_are_reported() {
    let specs = specs_in(&root().join("tests/specs/invalid"));
    assert!(specs.len() >= 8);
    for path in specs {
        let source = std::fs::read_to_string(&path).unwrap();
        let name = format!("invalid/{}", path.file_name().unwrap().to_string_lossy());
        let err = match tfc::compile(&name, &source, &tfc::Options::default(), &mut |_, _| {}) {
            Ok(_) => panic!("{name} compiled but should not"),
            Err(tfc::CompileError::Spec(d)) => d.render(false),
            Err(e) => panic!("{name}: not a spec error but {e}"),
        };
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        insta::assert_snapshot!(format!("invalid@{stem}"), err);
    }
}
