//! Code generation backends. The LLVM (inkwell) and MLIR (melior) toolchains are linked
//! here; [`toolchain`] reports what this build can target.

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
    let (major, minor, patch) = inkwell::support::get_llvm_version();
    format!(
        "LLVM {major}.{minor}.{patch} (host {}, cpu {}), MLIR with {} dialects",
        triple.as_str().to_string_lossy(),
        cpu.to_string_lossy(),
        dialects_count(&mlir)
    )
}

fn dialects_count(ctx: &melior::Context) -> usize {
    ctx.load_all_available_dialects();
    ctx.loaded_dialect_count()
}
