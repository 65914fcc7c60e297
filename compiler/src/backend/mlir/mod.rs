//! The MLIR backend: the same graphs through MLIR's own lowering.
//!
//! - CPU (`linalg.rs`): the graphs as `func` + `linalg` on tensors, the products as
//!   `vector`-dialect kernels on the thread pool; MLIR bufferizes, lowers to the LLVM
//!   dialect, and `mlirTranslateModuleToLLVMIR` hands the result to the LLVM backend's
//!   object emission and linking, so the library and its ABI are the same.
//! - GPU (`gpu.rs`): the graphs as a sequence of `gpu.func` kernels and a dispatch list,
//!   compiled to PTX (NVVM) or SPIR-V (Vulkan).
//!
//! MLIR is driven through melior: text is parsed into a module, pass pipelines are
//! parsed from their textual form, and diagnostics are collected into the error.

pub mod gpu;
pub mod linalg;
mod text;

use std::cell::RefCell;
use std::rc::Rc;

use melior::dialect::DialectRegistry;
use melior::ir::Module;
use melior::pass::PassManager;
use melior::Context;

#[derive(Debug, thiserror::Error)]
pub enum MlirError {
    #[error("the MLIR backend does not support {0} yet")]
    Unsupported(String),
    #[error("MLIR: {0}")]
    Mlir(String),
}

/// The CPU lowering, part one: fuse elementwise producers into their consumers and turn
/// the tensors into buffers.
pub const CPU_BUFFERIZE: &str = "builtin.module(\
    canonicalize, cse, \
    linalg-fuse-elementwise-ops, \
    one-shot-bufferize{bufferize-function-boundaries=false}, \
    func.func(buffer-hoisting))";

/// Part two: buffers are freed, the rest becomes loops, and everything the LLVM dialect.
pub const CPU_TO_LLVM: &str = "builtin.module(\
    buffer-deallocation-pipeline, \
    canonicalize, \
    convert-linalg-to-loops, \
    convert-vector-to-scf, \
    lower-affine, \
    convert-scf-to-cf, \
    expand-strided-metadata, \
    lower-affine, \
    convert-vector-to-llvm, \
    finalize-memref-to-llvm, \
    convert-math-to-llvm, \
    convert-math-to-libm, \
    convert-arith-to-llvm, \
    convert-index-to-llvm, \
    convert-cf-to-llvm, \
    convert-ub-to-llvm, \
    convert-func-to-llvm, \
    reconcile-unrealized-casts)";

/// A context with every dialect, pass and LLVM translation registered, collecting
/// diagnostics.
pub struct Mlir {
    pub context: Context,
    diags: Rc<RefCell<Vec<String>>>,
}

impl Mlir {
    pub fn new() -> Mlir {
        let context = Context::new();
        let registry = DialectRegistry::new();
        melior::utility::register_all_dialects(&registry);
        context.append_dialect_registry(&registry);
        context.load_all_available_dialects();
        melior::utility::register_all_llvm_translations(&context);
        melior::utility::register_all_passes();
        let diags = Rc::new(RefCell::new(Vec::new()));
        let sink = diags.clone();
        context.attach_diagnostic_handler(move |d| {
            sink.borrow_mut().push(format!("{}: {d}", d.location()));
            true
        });
        Mlir { context, diags }
    }

    /// A compiler bug at `what`, with the diagnostics MLIR reported (and then forgets).
    fn error(&self, what: &str) -> MlirError {
        let d: Vec<String> = self.diags.borrow_mut().drain(..).collect();
        MlirError::Mlir(format!("bug: {what}:\n{}", d.join("\n")))
    }

    /// Parses emitted text; a failure is a compiler bug, reported with the lines MLIR
    /// points at.
    pub fn parse(&self, source: &str) -> Result<Module<'_>, MlirError> {
        Module::parse(&self.context, source).ok_or_else(|| {
            let lines: Vec<&str> = source.lines().collect();
            let mut quoted = String::new();
            for d in self.diags.borrow().iter() {
                let at = d.split("\"-\":").nth(1).and_then(|r| r.split(':').next()?.parse::<usize>().ok());
                if let Some(line) = at.and_then(|n| lines.get(n.wrapping_sub(1))) {
                    quoted.push_str(&format!("\n  {}", line.trim()));
                }
            }
            self.error(&format!("the emitted MLIR does not parse{quoted}"))
        })
    }

    pub fn run(&self, module: &mut Module, pipeline: &str) -> Result<(), MlirError> {
        let pm = PassManager::new(&self.context);
        melior::utility::parse_pass_pipeline(pm.as_operation_pass_manager(), pipeline)
            .map_err(|e| MlirError::Mlir(format!("bug: pass pipeline: {e}")))?;
        pm.run(module).map_err(|_| self.error("a lowering pass failed"))
    }

    /// Lowers the `linalg` module of `linalg::emit` to the LLVM dialect.
    pub fn lower_cpu(&self, module: &mut Module) -> Result<(), MlirError> {
        self.run(module, CPU_BUFFERIZE)?;
        self.run(module, CPU_TO_LLVM)
    }

    /// Compiles the kernels of `gpu::emit` for a target: the lowered kernel module as
    /// text (the `spirv` dialect, or the `llvm`/`nvvm` dialects) and the binary (a SPIR-V
    /// module, or PTX text).
    pub fn compile_gpu(&self, source: &str, target: gpu::Target) -> Result<(String, Vec<u8>), MlirError> {
        let mut m = self.parse(source)?;
        let lowered = match target {
            gpu::Target::Vulkan => {
                self.run(&mut m, SPIRV_PIPELINE)?;
                nest_spirv_module(&mut m)?;
                let text = m.as_operation().to_string();
                self.run(&mut m, "builtin.module(gpu-module-to-binary{format=bin})")?;
                text
            }
            gpu::Target::Cuda => {
                self.run(&mut m, NVVM_PIPELINE)?;
                let text = m.as_operation().to_string();
                self.run(&mut m, "builtin.module(gpu-module-to-binary{format=isa})")?;
                text
            }
        };
        Ok((lowered, binary_object(&m)?))
    }

    /// Translates a module in the LLVM dialect into an LLVM module of `cx`.
    pub fn to_llvm<'ctx>(
        &self,
        module: &Module,
        cx: &'ctx inkwell::context::Context,
    ) -> Result<inkwell::module::Module<'ctx>, MlirError> {
        // SAFETY: both sides are the one LLVM linked into this binary; the module is
        // created in `cx`, which outlives the returned wrapper.
        unsafe {
            let raw = mlir_sys::mlirTranslateModuleToLLVMIR(
                module.as_operation().to_raw(),
                cx.raw() as mlir_sys::LLVMContextRef,
            );
            if raw.is_null() {
                return Err(self.error("translation to LLVM IR failed"));
            }
            Ok(inkwell::module::Module::new(raw as inkwell::llvm_sys::prelude::LLVMModuleRef))
        }
    }
}

/// Kernels → SPIR-V for Vulkan 1.3 (lavapipe and every desktop driver take it).
pub const SPIRV_PIPELINE: &str = "builtin.module(\
    spirv-attach-target{ver=v1.3 caps=Shader}, \
    gpu.module(convert-math-to-spirv), \
    convert-gpu-to-spirv, \
    spirv.module(spirv-lower-abi-attrs, spirv-update-vce, canonicalize))";

/// Kernels → NVVM for sm_80 (PTX that ptxas and the driver also take for sm_90).
pub const NVVM_PIPELINE: &str = "builtin.module(\
    nvvm-attach-target{chip=sm_80 features=+ptx70 O=3}, \
    gpu.module(convert-scf-to-cf, convert-math-to-llvm, convert-gpu-to-nvvm, canonicalize, reconcile-unrealized-casts))";

/// `convert-gpu-to-spirv` leaves the `spirv.module` beside its `gpu.module`;
/// `gpu-module-to-binary` serialises it only from inside.
fn nest_spirv_module(module: &mut Module) -> Result<(), MlirError> {
    // SAFETY: ops of the module's own block are moved between blocks of the same module.
    unsafe {
        let block = module.body().to_raw();
        let (mut spv, mut gpu) = (None, None);
        let mut op = mlir_sys::mlirBlockGetFirstOperation(block);
        while !op.ptr.is_null() {
            match op_name(op).as_str() {
                "spirv.module" => spv = Some(op),
                "gpu.module" => gpu = Some(op),
                _ => {}
            }
            op = mlir_sys::mlirOperationGetNextInBlock(op);
        }
        let (Some(spv), Some(gpu)) = (spv, gpu) else {
            return Err(MlirError::Mlir("bug: no spirv.module beside the gpu.module".into()));
        };
        mlir_sys::mlirOperationRemoveFromParent(spv);
        let region = mlir_sys::mlirOperationGetRegion(gpu, 0);
        let inner = mlir_sys::mlirRegionGetFirstBlock(region);
        mlir_sys::mlirBlockAppendOwnedOperation(inner, spv);
    }
    Ok(())
}

/// The bytes of the first object of the module's `gpu.binary`.
fn binary_object(module: &Module) -> Result<Vec<u8>, MlirError> {
    // SAFETY: reads attributes of ops owned by the module; the bytes are copied out.
    unsafe {
        let mut op = mlir_sys::mlirBlockGetFirstOperation(module.body().to_raw());
        while !op.ptr.is_null() {
            if op_name(op) == "gpu.binary" {
                let name = mlir_sys::mlirStringRefCreateFromCString(c"objects".as_ptr());
                let objects = mlir_sys::mlirOperationGetAttributeByName(op, name);
                if objects.ptr.is_null() || mlir_sys::mlirArrayAttrGetNumElements(objects) == 0 {
                    break;
                }
                let obj = mlir_sys::mlirArrayAttrGetElement(objects, 0);
                let s = mlir_sys::mlirGPUObjectAttrGetObject(obj);
                return Ok(std::slice::from_raw_parts(s.data as *const u8, s.length).to_vec());
            }
            op = mlir_sys::mlirOperationGetNextInBlock(op);
        }
    }
    Err(MlirError::Mlir("bug: no gpu.binary object after serialisation".into()))
}

/// # Safety
/// `op` must be a live operation.
unsafe fn op_name(op: mlir_sys::MlirOperation) -> String {
    // SAFETY: the caller passes a live op; its name is an interned identifier.
    unsafe {
        let s = mlir_sys::mlirIdentifierStr(mlir_sys::mlirOperationGetName(op));
        String::from_utf8_lossy(std::slice::from_raw_parts(s.data as *const u8, s.length)).into_owned()
    }
}

impl Default for Mlir {
    fn default() -> Self {
        Mlir::new()
    }
}
