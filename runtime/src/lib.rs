//! The tfc runtime: what a program needs to run a compiled model, without LLVM.
//!
//! For now it reads checkpoints; the loader of compiled libraries and the session API
//! build on it.

pub mod checkpoint;

pub use checkpoint::{Checkpoint, CheckpointError};
