//! The code generators this build links are the ones the backends need.

#[test]
fn llvm_and_mlir_22_are_linked() {
    let t = tfc::backend::toolchain();
    assert!(t.starts_with("LLVM 22."), "{t}");
    assert!(t.contains("MLIR with"), "{t}");
}
