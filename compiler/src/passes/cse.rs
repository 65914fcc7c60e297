//! Common-subexpression elimination: two nodes with the same op, attributes, operands
//! (and, for leaves, type) compute the same value, so uses of the later one move to the
//! earlier one. This merges a tied unembedding's weight with the embedding table and the
//! per-layer position nodes into one.
//!
//! Before: `%1 = weight{"wte"}`, …, `%40 = weight{"wte"}`, `%41 = linear %39, %40`
//! After:  `%41 = linear %39, %1`

use std::collections::HashMap;

use super::{Pass, PassError};
use crate::ir::{Graph, NodeId};

pub struct Cse;

impl Pass for Cse {
    fn name(&self) -> &'static str {
        "cse"
    }

    fn run(&self, g: &mut Graph) -> Result<(), PassError> {
        let order = g.topo_order().map_err(|n| PassError::bug(g, n, "the graph has a cycle"))?;
        // Candidates by (mnemonic, operands); the op and its attributes are compared exactly.
        let mut seen: HashMap<(&'static str, Vec<NodeId>), Vec<NodeId>> = HashMap::new();
        for id in order {
            let key = (g.op(id).mnemonic(), g.operands(id));
            let twin = seen.get(&key).and_then(|cands| {
                cands.iter().copied().find(|&c| g.op(c) == g.op(id) && g.node(c).ty == g.node(id).ty)
            });
            match twin {
                Some(t) => {
                    g.replace_uses(id, t);
                    g.remove(id);
                }
                None => seen.entry(key).or_default().push(id),
            }
        }
        Ok(())
    }
}
