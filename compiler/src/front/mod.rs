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

use crate::ir::Graph;

/// Parses and checks a spec, and lowers it to the model graph. Of `opts`, `weight_dtype`
/// overrides the spec's `dtype` (the storage type of weight matrices; the components' and
/// the `dtypes` section's give way), `activations` its
/// `activations` and `max_seq` its `max_seq`.
pub fn compile_spec(file: &str, source: &str, opts: &crate::Options) -> Result<(Spec, Graph), Diagnostics> {
    let fail = |list| Diagnostics { file: file.to_string(), source: source.to_string(), list };
    let ast = parse::parse(source).map_err(|d| fail(vec![d]))?;
    let mut diags = Vec::new();
    let spec = resolve::resolve(&ast, &mut diags);
    let Some(mut spec) = spec else {
        return Err(fail(diags));
    };
    if let Some(d) = opts.weight_dtype {
        // One storage for every matrix: the components' own give way.
        spec.dtype = d;
        spec.tensor_dtypes.clear();
        let sections = std::iter::once(&mut spec.embed)
            .chain(spec.blocks.iter_mut().map(|b| &mut b.section))
            .chain(spec.head.as_mut());
        for s in sections {
            for c in &mut s.components {
                c.dtype = None;
            }
        }
    }
    if let Some(d) = opts.activations {
        spec.activations = d;
    }
    if let Some(n) = opts.max_seq {
        spec.sizes.max_seq = n;
    }
    match lower::lower(&spec, &mut diags) {
        Some(g) if diags.is_empty() => {
            let at = ast.model.as_ref().map_or(0..0, |m| m.span.clone());
            match too_large(&spec, &g, at) {
                None => Ok((spec, g)),
                Some(d) => Err(fail(vec![d])),
            }
        }
        _ => Err(fail(diags)),
    }
}

/// The most bytes a model's weights, its KV cache, or one step's activations may take:
/// 1 PiB, past any machine (whether this one has the memory is checked where a model is
/// run), and far below where the 64-bit byte counts of the backends and the C half could
/// wrap around into a small allocation.
pub const MAX_BYTES: u128 = 1 << 50;

/// An error when the model's sizes exceed [`MAX_BYTES`], counted in `u128`.
fn too_large(spec: &Spec, g: &Graph, at: ast::Span) -> Option<Diagnostic> {
    let s = &spec.sizes;
    let n = |x: usize| x as u128;
    let weights: u128 = g
        .node_ids()
        .into_iter()
        .filter(|&id| matches!(g.op(id), crate::ir::Op::Weight { .. }))
        .map(|id| g.ty(id).shape.iter().map(|d| n(d.c)).product::<u128>() * 4)
        .sum();
    let cache = n(s.layers) * 2 * n(s.kv_heads) * n(s.head_dim) * n(s.max_seq) * 4;
    // A generous bound on one position's widest values, times every position.
    let row =
        n(s.vocab) + n(s.d_model) + n(s.d_ff.unwrap_or(0)) + (n(s.heads) + 2 * n(s.kv_heads)) * n(s.head_dim);
    let activations = n(s.max_seq) * row * 4;
    let parts = [("weights (as f32)", weights), ("the KV cache", cache), ("the activations", activations)];
    let (what, bytes) = parts.into_iter().find(|&(_, b)| b > MAX_BYTES)?;
    Some(
        Diagnostic::error(Code::Limit, format!("{what} of this model would take {bytes} bytes, more than tfc supports (2^50)"))
            .label(at, "this model")
            .note(format!(
                "weights {weights} bytes, KV cache {cache} bytes (layers × 2 × kv_heads × head_dim × max_seq × 4), activations up to {activations} bytes"
            )),
    )
}
