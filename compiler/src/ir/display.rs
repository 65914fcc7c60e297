//! The one canonical text form of a graph, used by `tfc ir` and by the snapshots.
//!
//! Nodes are printed in the deterministic topological order and renumbered `%0, %1, …`
//! in that order, so the text does not depend on how passes allocated node ids.
//! Each line ends with where the node came from: `L3 attn` is layer 3's `attn`.

use std::collections::HashMap;
use std::fmt::Write;

use super::graph::{Graph, NodeId};

pub fn print(g: &Graph) -> String {
    let order = match g.topo_order() {
        Ok(o) => o,
        Err(n) => return format!("graph {} is cyclic (through node {})\n", g.name, n.index()),
    };
    let num: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let mut out = String::new();
    writeln!(out, "graph {} ({}) {{", g.name, g.phase.name()).unwrap();
    for &id in &order {
        let n = g.node(id);
        let operands: Vec<String> = g.operands(id).iter().map(|o| format!("%{}", num[o])).collect();
        let mut line = format!("  %{} = {}", num[&id], n.op);
        if !operands.is_empty() {
            write!(line, " {}", operands.join(", ")).unwrap();
        }
        match &n.ty {
            Some(t) => write!(line, " : {t}").unwrap(),
            None => line.push_str(" : ?"),
        }
        let origin = match (n.layer, n.origin.is_empty()) {
            (Some(l), false) => format!("L{l} {}", n.origin),
            (Some(l), true) => format!("L{l}"),
            (None, false) => n.origin.clone(),
            (None, true) => String::new(),
        };
        if !origin.is_empty() {
            write!(line, "  # {origin}").unwrap();
        }
        out.push_str(&line);
        out.push('\n');
    }
    for (name, id) in &g.outputs {
        writeln!(out, "  output {name} = %{}", num[id]).unwrap();
    }
    out.push_str("}\n");
    out
}
