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
pub use parse::MAX_NESTING;
pub use spec::Spec;

use crate::ir::{DType, Graph};

/// Parses and checks a spec, and lowers it to the model graph.
/// `weight_dtype` overrides the spec's `dtype` (the storage type of weight matrices),
/// `activations` its `activations`.
pub fn compile_spec(
    file: &str,
    source: &str,
    weight_dtype: Option<DType>,
    activations: Option<DType>,
) -> Result<(Spec, Graph), Diagnostics> {
    let fail = |list| Diagnostics { file: file.to_string(), source: source.to_string(), list };
    let ast = parse::parse(source).map_err(|d| fail(vec![d]))?;
    let mut diags = Vec::new();
    let spec = resolve::resolve(&ast, &mut diags);
    let Some(mut spec) = spec else {
        return Err(fail(diags));
    };
    if let Some(d) = weight_dtype {
        spec.dtype = d;
    }
    if let Some(d) = activations {
        spec.activations = d;
    }
    match lower::lower(&spec, &mut diags) {
        Some(g) if diags.is_empty() => Ok((spec, g)),
        _ => Err(fail(diags)),
    }
}
