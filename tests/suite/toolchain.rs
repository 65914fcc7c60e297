//! The code generators this build links are the ones the backends need.

#[test]
fn llvm_and_mlir_22_are_linked() {
    let t = tfc::backend::toolchain();
    assert!(t.starts_with("LLVM 22."), "{t}");
    assert!(t.contains("MLIR with"), "{t}");
}

/// Emitted MLIR that does not parse is a compiler bug; the error quotes MLIR's diagnostic
/// and the offending line.
#[test]
fn unparsable_mlir_is_reported_with_its_line() {
    let ml = tfc::backend::mlir::Mlir::new();
    let text = "module {\n  func.func @f() {\n    %0 = arith.constant 1 : i32\n    %1 = arith.addi %0, %9 : i32\n    return\n  }\n}\n";
    let Err(e) = ml.parse(text) else { panic!("a use of an undefined value parsed") };
    let e = e.to_string();
    assert!(e.starts_with("MLIR: bug: the emitted MLIR does not parse"), "{e}");
    assert!(e.contains("%1 = arith.addi %0, %9 : i32"), "{e}");
    assert!(e.contains("use of undeclared SSA value"), "{e}");
}
