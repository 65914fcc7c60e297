//! The tfc runtime: what a program needs to run a compiled model, without LLVM.
//!
//! It owns the ABI definition ([`abi`]), reads checkpoints ([`checkpoint`]), loads
//! compiled libraries and runs them ([`model`]).

pub mod abi;
pub mod checkpoint;
pub mod gguf;
pub mod gpu;
pub mod memory;
pub mod model;
mod pages;
pub mod quant;
pub mod sampling;

pub use checkpoint::{Checkpoint, CheckpointError};
pub use model::{check_finite, Model, Prefetch, RuntimeError, Session, WeightData};
pub use sampling::{argmax, Sampler, SplitMix64};
