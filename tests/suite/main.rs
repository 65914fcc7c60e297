//! The integration tests of the whole workspace, in one binary (each binary that links
//! LLVM and MLIR is large and slow to link).

mod backends;
mod checkpoint;
mod common;
mod diagnostics;
mod equivalence;
mod fixtures;
mod fuzz;
mod gpu;
mod import;
mod passes;
mod robustness;
mod stages;
mod toolchain;
