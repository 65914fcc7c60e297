//! The graph IR: a typed op enum over a petgraph graph, with symbolic dimensions.
//!
//! Architecture invariants:
//! - Ops are one enum ([`Op`]); passes match on it, nothing is a trait object.
//! - Operand order lives only on the graph's edges ([`Graph::operands`]).
//! - After shape inference every node has a type, and [`verify`] re-derives each type
//!   from its operands; every pass leaves a graph that verifies.
//! - [`print`] is the only text form; it is deterministic and independent of node ids.

mod display;
pub mod dot;
mod graph;
mod op;
mod shape;
mod verify;

pub use display::print;
pub use graph::{Graph, MainOutput, Node, NodeId, Output, Phase};
pub use op::{
    alibi_slopes, num, sinusoid_feature, sinusoid_freqs, Act, Arith, AttnMask, CacheKind, Experts,
    GroupScore, HeadStart, InputKind, Op, QkvLayout, QkvPart, Rope, RopeScaling, Route, Scoring, WeightRole,
    F64,
};
pub use shape::{DType, Dim, Quant, SymBinding, TensorType};
pub use verify::{verify, VerifyError};
