//! The front end: spec text → syntax tree → checked [`Spec`] → model graph.
//!
//! Each step reports every problem it finds as a [`Diagnostic`] with a stable code and a
//! span; the first step that finds any stops the pipeline.

pub mod ast;
pub mod diag;
mod lower;
mod parse;
mod resolve;
pub mod spec;

pub use diag::{Code, Diagnostic, Diagnostics};
pub use spec::Spec;

use crate::ir::Graph;

/// Parses and checks a spec, and lowers it to the model graph.
pub fn compile_spec(file: &str, source: &str) -> Result<(Spec, Graph), Diagnostics> {
    let fail = |list| Diagnostics { file: file.to_string(), source: source.to_string(), list };
    let ast = parse::parse(source).map_err(|d| fail(vec![d]))?;
    let mut diags = Vec::new();
    let spec = resolve::resolve(&ast, &mut diags);
    let Some(spec) = spec else {
        return Err(fail(diags));
    };
    match lower::lower(&spec, &mut diags) {
        Some(g) if diags.is_empty() => Ok((spec, g)),
        _ => Err(fail(diags)),
    }
}
