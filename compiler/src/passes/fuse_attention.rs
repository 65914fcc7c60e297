//! Attention fusion: the primitive chain that lowering builds for every attention
//!
//!   s = head_matmul{transpose_b}(q, k) → scale{c} → [scale{1/cap} → act{tanh} → scale{cap}]
//!     → [alibi(·, pos)] → [mask{m}(·, pos)] → softmax → head_matmul(·, v)
//!
//! becomes one `attention{scale=c, m, alibi, softcap=cap}(q, k, v, pos)` node, provided every
//! intermediate value has no other use. Backends then emit one kernel (online softmax,
//! no `T×S` score matrix) and the split pass finds each layer's keys and values as the
//! node's operands.
//!
//! Before: `%30 = head_matmul{transpose_b} %27, %29`, `%31 = scale{0.25} %30`,
//!         `%32 = mask{causal} %31, %26`, `%33 = softmax %32`, `%34 = head_matmul %33, %25`
//! After:  `%30 = attention{scale=0.25, causal} %27, %29, %25, %26`

use super::{Pass, PassError};
use crate::ir::{Act, AttnMask, DType, Dim, Graph, Node, NodeId, Op, TensorType};

pub struct FuseAttention;

impl Pass for FuseAttention {
    fn name(&self) -> &'static str {
        "fuse_attention"
    }

    fn run(&self, g: &mut Graph) -> Result<(), PassError> {
        for id in g.node_ids() {
            if g.contains(id) {
                if let Some(m) = match_chain(g, id) {
                    rewrite(g, id, m);
                }
            }
        }
        Ok(())
    }
}

struct Match {
    q: NodeId,
    k: NodeId,
    v: NodeId,
    pos: Option<NodeId>,
    scale: f64,
    mask: AttnMask,
    alibi: Option<f64>,
    softcap: Option<f64>,
    sinks: Option<NodeId>,
    /// The intermediate nodes, removed after the rewrite.
    chain: Vec<NodeId>,
}

/// Walks up from the `·V` product; `None` if the chain is not the attention pattern.
fn match_chain(g: &Graph, pv: NodeId) -> Option<Match> {
    let single = |n: NodeId| g.use_count(n) == 1;
    if *g.op(pv) != (Op::HeadMatMul { transpose_b: false }) {
        return None;
    }
    let [p, v] = g.operands(pv)[..] else {
        return None;
    };
    if *g.op(p) != Op::Softmax || !single(p) {
        return None;
    }
    let sinks = g.operands(p).get(1).copied();
    let mut chain = vec![p];
    let mut cur = g.operands(p)[0];
    let mut mask = AttnMask { causal: false, window: None };
    let mut alibi = None;
    let mut pos = None;
    if let Op::Mask(m) = g.op(cur) {
        if !single(cur) {
            return None;
        }
        mask = *m;
        pos = Some(g.operands(cur)[1]);
        chain.push(cur);
        cur = g.operands(cur)[0];
    }
    if let Op::Alibi { slope_scale } = *g.op(cur) {
        if !single(cur) {
            return None;
        }
        let alibi_pos = g.operands(cur)[1];
        if pos.is_some_and(|p| p != alibi_pos) {
            return None;
        }
        pos = Some(alibi_pos);
        alibi = Some(slope_scale);
        chain.push(cur);
        cur = g.operands(cur)[0];
    }
    // A soft cap, `scale{c} → act{tanh} → scale{1/c}` read upwards.
    let mut softcap = None;
    if let Op::Scale(c) = *g.op(cur) {
        let t = g.operands(cur)[0];
        if *g.op(t) == Op::Activation(Act::Tanh) && single(cur) && single(t) {
            let d = g.operands(t)[0];
            if matches!(*g.op(d), Op::Scale(r) if (r * c - 1.0).abs() < 1e-12) && single(d) {
                softcap = Some(c);
                chain.extend([cur, t, d]);
                cur = g.operands(d)[0];
            }
        }
    }
    let Op::Scale(scale) = *g.op(cur) else {
        return None;
    };
    if !single(cur) {
        return None;
    }
    chain.push(cur);
    let qk = g.operands(cur)[0];
    if *g.op(qk) != (Op::HeadMatMul { transpose_b: true }) || !single(qk) {
        return None;
    }
    chain.push(qk);
    let [q, k] = g.operands(qk)[..] else {
        return None;
    };
    Some(Match { q, k, v, pos, scale, mask, alibi, softcap, sinks, chain })
}

fn rewrite(g: &mut Graph, pv: NodeId, m: Match) {
    let (layer, origin) = (g.node(pv).layer, g.node(pv).origin.clone());
    let pos = match m.pos {
        Some(p) => p,
        // A bidirectional attention without ALiBi reads no positions; the fused node
        // still takes them so that every attention has the same operands.
        None => g.add(
            Node {
                op: Op::Positions,
                ty: Some(TensorType::new(vec![Dim::T], DType::I32)),
                layer,
                origin: origin.clone(),
            },
            &[],
        ),
    };
    let op = Op::Attention {
        scale: m.scale,
        mask: m.mask,
        alibi: m.alibi,
        softcap: m.softcap,
        sinks: m.sinks.is_some(),
    };
    let ty = g.node(pv).ty.clone();
    let mut operands = vec![m.q, m.k, m.v, pos];
    operands.extend(m.sinks);
    let fused = g.add(Node { op, ty, layer, origin }, &operands);
    g.replace_uses(pv, fused);
    g.remove(pv);
    for n in m.chain {
        g.remove(n);
    }
}
