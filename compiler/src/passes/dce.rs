//! Dead-code elimination: removes every node that no output depends on.
//!
//! Before: `%7 = positions : [T] i32` with no users
//! After:  (gone)

use std::collections::HashSet;

use super::{Pass, PassError};
use crate::ir::Graph;

pub struct Dce;

impl Pass for Dce {
    fn name(&self) -> &'static str {
        "dce"
    }

    fn run(&self, g: &mut Graph) -> Result<(), PassError> {
        let mut live = HashSet::new();
        let mut stack: Vec<_> = g.outputs.iter().map(|(_, n)| *n).collect();
        while let Some(n) = stack.pop() {
            if live.insert(n) {
                stack.extend(g.operands(n));
            }
        }
        for id in g.node_ids() {
            if !live.contains(&id) {
                g.remove(id);
            }
        }
        Ok(())
    }
}
