//! The phase change: derives the prefill and decode graphs from the model graph.
//!
//! - **prefill** runs `T` tokens at positions `0..T` and additionally returns, for every
//!   layer `L`, the keys and values its attention read: `cache.k.L` and `cache.v.L`, each
//!   `[kv_heads, T, head_dim]`. The main output (logits, or the hidden state) is that of
//!   the last position (`last_row`) unless all positions are asked for.
//! - **decode** runs one token at position `P`: every attention reads
//!   `concat(input cache.k.L [kv_heads, P, head_dim], k_new)` along the sequence axis,
//!   and the graph returns the new rows `cache.k.L`/`cache.v.L` `[kv_heads, 1, head_dim]`
//!   for the caller to store at position `P`.
//! - **extend** is decode for `T` tokens at positions `P..P + T` (a prompt continued from
//!   the cache): the same concatenation, the causal mask by absolute positions, the new
//!   rows `[kv_heads, T, head_dim]` stored from position `P`; like prefill, the main
//!   output is the last position's unless all are asked for.
//!
//! The cache layout the runtime keeps (and backends index) is, per layer and for K and V
//! separately, `[kv_heads, max_seq, head_dim]` row-major; the graphs name only the valid
//! prefix `0..P` of it. An attention whose values are its keys (multi-head latent
//! attention reads its latent as both) has the K cache only. A model with bidirectional
//! attention (an encoder) has no decode graph and its prefill returns no cache.

use super::{Pass, PassError, ShapeInfer};
use crate::ir::{CacheKind, Dim, Graph, InputKind, Node, NodeId, Op, Output, Phase, TensorType};

pub struct Split {
    /// Keep the main output of every position in prefill, not just the last.
    pub all_rows: bool,
}

pub struct Phases {
    pub prefill: Graph,
    pub decode: Option<Graph>,
    pub extend: Option<Graph>,
}

impl Split {
    pub const NAME: &'static str = "split";

    pub fn run(&self, model: &Graph) -> Result<Phases, PassError> {
        if model.phase != Phase::Model {
            return Err(PassError::Bug(format!(
                "split takes a model graph, `{}` is {}",
                model.name,
                model.phase.name()
            )));
        }
        let attns = attentions(model);
        if let Some(&(n, ..)) = attns.iter().find(|(n, ..)| g_op_is_unfused(model, *n)) {
            return Err(PassError::bug(model, n, "attention must be fused before the split"));
        }
        let causal =
            attns.iter().all(|&(n, ..)| matches!(model.op(n), Op::Attention { mask, .. } if mask.causal));

        let mut prefill = model.clone();
        prefill.phase = Phase::Prefill;
        if causal {
            for &(n, layer) in &attns {
                let ops = prefill.operands(n);
                prefill.outputs.push((Output::Cache { layer, kind: CacheKind::K }, ops[1]));
                if ops[2] != ops[1] {
                    prefill.outputs.push((Output::Cache { layer, kind: CacheKind::V }, ops[2]));
                }
            }
        }
        if !self.all_rows {
            last_row(&mut prefill);
        }
        ShapeInfer.run(&mut prefill)?;
        let (decode, extend) = match causal {
            true => {
                let mut d = with_cache(model, &attns, Phase::Decode);
                // One token: every `T` becomes 1 (leaf types here; inference does the rest).
                for id in d.node_ids() {
                    let node = d.node_mut(id);
                    node.ty = node.ty.as_ref().map(|t| t.with_t(1));
                }
                ShapeInfer.run(&mut d)?;
                let mut e = with_cache(model, &attns, Phase::Extend);
                if !self.all_rows {
                    last_row(&mut e);
                }
                ShapeInfer.run(&mut e)?;
                (Some(d), Some(e))
            }
            false => (None, None),
        };
        Ok(Phases { prefill, decode, extend })
    }
}

/// The main output (logits, or an encoder's hidden state) of the last position only.
fn last_row(g: &mut Graph) {
    if let Some((_, main)) = g.outputs.first().cloned() {
        let node = g.node(main).clone();
        let last = g.add(Node { op: Op::LastRow, ty: None, layer: node.layer, origin: node.origin }, &[main]);
        g.outputs[0].1 = last;
    }
}

fn g_op_is_unfused(g: &Graph, n: NodeId) -> bool {
    !matches!(g.op(n), Op::Attention { .. })
}

/// Every attention node (fused or the `·V` product of an unfused one) with its layer.
fn attentions(g: &Graph) -> Vec<(NodeId, u32)> {
    let order = g.topo_order().unwrap_or_default();
    order
        .into_iter()
        .filter(|&n| matches!(g.op(n), Op::Attention { .. } | Op::Softmax))
        .map(|n| (n, g.node(n).layer.unwrap_or(0)))
        .collect()
}

/// The model reading every attention's keys and values after the cache's `P` positions,
/// and returning the new rows for the caller to store from position `P`.
fn with_cache(model: &Graph, attns: &[(NodeId, u32)], phase: Phase) -> Graph {
    let mut g = model.clone();
    g.phase = phase;
    for &(n, layer) in attns {
        let ops = g.operands(n);
        for (slot, kind) in [(1, CacheKind::K), (2, CacheKind::V)] {
            if slot == 2 && ops[2] == ops[1] {
                // The values are the keys (a latent attention's): one cache for both.
                let k = g.operands(n)[1];
                g.set_operand(n, 2, k);
                continue;
            }
            let new = ops[slot];
            let node = g.node(new).clone();
            let ty = node.ty.clone().expect("typed before the split");
            let cache_ty = TensorType::new(vec![ty.shape[0], Dim::P, ty.shape[2]], ty.dtype);
            let cache = g.add(
                Node {
                    op: Op::Input(InputKind::Cache { layer, kind }),
                    ty: Some(cache_ty),
                    layer: Some(layer),
                    origin: "cache".into(),
                },
                &[],
            );
            let all = g.add(
                Node {
                    op: Op::Concat { axis: 1 },
                    ty: None,
                    layer: Some(layer),
                    origin: node.origin.clone(),
                },
                &[cache, new],
            );
            g.set_operand(n, slot, all);
            g.outputs.push((Output::Cache { layer, kind }, new));
        }
    }
    g
}
