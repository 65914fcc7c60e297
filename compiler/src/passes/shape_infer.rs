//! Shape and type inference: gives every non-leaf node the type its op's rule derives
//! from its operands, in topological order. Earlier types are discarded first, so the
//! pass also re-types a graph after a rewrite (e.g. the decode graph after `T := 1`).
//!
//! Before: `%5 = layernorm{eps=1e-5} %2, %3, %4 : ?`
//! After:  `%5 = layernorm{eps=1e-5} %2, %3, %4 : [T, 64] f32`

use super::{Pass, PassError};
use crate::ir::{Graph, Op};

pub struct ShapeInfer;

impl Pass for ShapeInfer {
    fn name(&self) -> &'static str {
        "shape_infer"
    }

    fn run(&self, g: &mut Graph) -> Result<(), PassError> {
        let order = g.topo_order().map_err(|n| PassError::bug(g, n, "the graph has a cycle"))?;
        for &id in &order {
            if is_leaf(g.op(id)) {
                continue;
            }
            g.node_mut(id).ty = None;
        }
        for id in order {
            if is_leaf(g.op(id)) {
                if g.node(id).ty.is_none() {
                    return Err(PassError::bug(g, id, "a leaf has no type"));
                }
                continue;
            }
            let operands = g.operands(id);
            let ins: Vec<_> = operands.iter().map(|&o| g.ty(o)).collect();
            let ty = g.op(id).infer(&ins).map_err(|m| PassError::shape(g, id, m))?;
            g.node_mut(id).ty = Some(ty);
        }
        Ok(())
    }
}

fn is_leaf(op: &Op) -> bool {
    matches!(op, Op::Input(_) | Op::Weight { .. } | Op::Positions)
}
