//! Graph passes and the one place the pipeline is declared.
//!
//! A pass is a unit struct implementing [`Pass`]; it rewrites one graph in place. The
//! split is different in kind: it is the phase change from one model graph to the
//! prefill and decode graphs, and the only step that moves a graph's [`Phase`] forward.
//! With `verify` on (always in tests), the verifier runs after every step.

mod cse;
mod dce;
mod fuse_attention;
mod narrow_last_row;
mod shape_infer;
mod split;

pub use cse::Cse;
pub use dce::Dce;
pub use fuse_attention::FuseAttention;
pub use narrow_last_row::NarrowLastRow;
pub use shape_infer::ShapeInfer;
pub use split::{Phases, Split};

use crate::ir::{verify, Graph, NodeId, Phase, VerifyError};

pub trait Pass {
    fn name(&self) -> &'static str;
    fn run(&self, g: &mut Graph) -> Result<(), PassError>;
}

#[derive(Debug, thiserror::Error)]
pub enum PassError {
    /// A shape that does not fit, found by inference; names where it came from.
    #[error("shape error at {origin}: {message}")]
    Shape { origin: String, message: String },
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error("bug: {0}")]
    Bug(String),
}

impl PassError {
    pub fn bug(g: &Graph, n: NodeId, message: &str) -> Self {
        PassError::Bug(format!("{} in graph `{}` at node {}", message, g.name, describe(g, n)))
    }

    pub fn shape(g: &Graph, n: NodeId, message: String) -> Self {
        PassError::Shape { origin: describe(g, n), message }
    }
}

fn describe(g: &Graph, n: NodeId) -> String {
    let node = g.node(n);
    let at = match node.layer {
        Some(l) => format!("layer {l} `{}`", node.origin),
        None => format!("`{}`", node.origin),
    };
    format!("{at} ({})", node.op.mnemonic())
}

/// The passes run on the model graph, in order.
pub fn model_passes() -> Vec<Box<dyn Pass>> {
    vec![Box::new(ShapeInfer), Box::new(Cse), Box::new(Dce), Box::new(FuseAttention)]
}

/// The passes run on each of the prefill and decode graphs after the split.
pub fn phase_passes(phase: Phase) -> Vec<Box<dyn Pass>> {
    let mut v: Vec<Box<dyn Pass>> = vec![];
    if matches!(phase, Phase::Prefill | Phase::Extend) {
        v.push(Box::new(NarrowLastRow));
    }
    v.push(Box::new(Cse));
    v.push(Box::new(Dce));
    v
}

/// Every pass name `--dump-after` accepts, read off the pipeline itself.
pub fn pass_names() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = model_passes().iter().map(|p| p.name()).collect();
    names.push(Split::NAME);
    for phase in [Phase::Prefill, Phase::Decode, Phase::Extend] {
        names.extend(phase_passes(phase).iter().map(|p| p.name()));
    }
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(*n));
    names
}

/// Runs passes over a graph, verifying after each when asked and reporting each
/// intermediate graph to `dump`.
pub fn run_passes(
    g: &mut Graph,
    passes: &[Box<dyn Pass>],
    check: bool,
    dump: &mut dyn FnMut(&str, &Graph),
) -> Result<(), PassError> {
    for p in passes {
        p.run(g)?;
        if check {
            verify(g)?;
        }
        dump(p.name(), g);
    }
    Ok(())
}
