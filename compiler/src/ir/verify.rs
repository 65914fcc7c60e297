//! The verifier: the invariants every graph holds between passes.
//!
//! 1. The graph is acyclic and every output names a live node.
//! 2. Every node has as many operands as its op takes, and a type.
//! 3. Every non-leaf type equals what the op's typing rule gives for its operands.
//! 4. Model graphs read no cache; prefill and decode graphs hold only fused attention
//!    (no `softmax`, `mask` or `alibi` primitives) and, when every attention is causal,
//!    emit `cache.k.L` and `cache.v.L` for every layer (an encoder emits none).
//!
//! A failure is a compiler bug, never a user error: it names the node and the rule.

use super::graph::{Graph, NodeId, Phase};
use super::op::{InputKind, Op};

#[derive(Debug, thiserror::Error)]
#[error("bug: graph `{graph}` ({phase}) fails verification at node {node}: {message}")]
pub struct VerifyError {
    pub graph: String,
    pub phase: &'static str,
    pub node: String,
    pub message: String,
}

pub fn verify(g: &Graph) -> Result<(), VerifyError> {
    let fail = |node: Option<NodeId>, message: String| VerifyError {
        graph: g.name.clone(),
        phase: g.phase.name(),
        node: node.map(|n| format!("#{} ({})", n.index(), g.op(n).mnemonic())).unwrap_or_else(|| "-".into()),
        message,
    };
    let order = g.topo_order().map_err(|n| fail(Some(n), "the graph has a cycle".into()))?;
    if g.outputs.is_empty() {
        return Err(fail(None, "the graph has no outputs".into()));
    }
    for (i, (name, id)) in g.outputs.iter().enumerate() {
        if !g.contains(*id) {
            return Err(fail(None, format!("output `{name}` names a removed node")));
        }
        if matches!(name, super::Output::Main(_)) != (i == 0) {
            return Err(fail(
                None,
                format!("output `{name}` at {i}: the main output comes first, and only it"),
            ));
        }
    }
    for &id in &order {
        let node = g.node(id);
        let operands = g.operands(id);
        if !node.op.arity().contains(&operands.len()) {
            return Err(fail(
                Some(id),
                format!("has {} operands, wants {:?}", operands.len(), node.op.arity()),
            ));
        }
        let Some(ty) = &node.ty else {
            return Err(fail(Some(id), "has no type".into()));
        };
        if !operands.is_empty() {
            let ins: Vec<_> = operands.iter().map(|&o| g.node(o).ty.as_ref()).collect();
            if ins.iter().any(|t| t.is_none()) {
                return Err(fail(Some(id), "an operand has no type".into()));
            }
            let ins: Vec<_> = ins.into_iter().map(|t| t.unwrap()).collect();
            match node.op.infer(&ins) {
                Ok(t) if &t == ty => {}
                Ok(t) => return Err(fail(Some(id), format!("type is {ty}, the rule gives {t}"))),
                Err(e) => return Err(fail(Some(id), e)),
            }
        }
        match (&node.op, g.phase) {
            (Op::Input(InputKind::Cache { .. }), Phase::Model | Phase::Prefill) => {
                return Err(fail(Some(id), "only decode and extend graphs read a cache".into()))
            }
            (
                Op::Softmax | Op::Mask(_) | Op::Alibi { .. },
                Phase::Prefill | Phase::Decode | Phase::Extend,
            ) => return Err(fail(Some(id), "attention primitives must be fused before the split".into())),
            _ => {}
        }
    }
    if g.phase != Phase::Model {
        // Per attention: causal, and its caches (one where the values are the keys).
        let attn: Vec<(bool, usize)> = order
            .iter()
            .filter_map(|&n| match g.op(n) {
                Op::Attention { mask, .. } => {
                    let ops = g.operands(n);
                    Some((mask.causal, if ops[1] == ops[2] { 1 } else { 2 }))
                }
                _ => None,
            })
            .collect();
        let want = if attn.iter().all(|&(c, _)| c) { attn.iter().map(|a| a.1).sum() } else { 0 };
        let caches = g.outputs.iter().filter(|(o, _)| matches!(o, super::Output::Cache { .. })).count();
        if caches != want {
            return Err(fail(
                None,
                format!("{} attention nodes but {caches} cache outputs, want {want}", attn.len()),
            ));
        }
    }
    Ok(())
}
