//! Graphviz DOT for a whole architecture.
//!
//! Transformer blocks repeat, so only the first block is drawn, inside a cluster that says
//! how many times it repeats; a value that the last block hands to the head is drawn as
//! coming from the matching node of the first block. Weights are folded into the label of
//! the op that reads them, which keeps the picture to the data flow.

use std::collections::HashMap;
use std::fmt::Write;

use super::graph::{Graph, NodeId};
use super::op::Op;

pub fn to_dot(g: &Graph, layers: u32) -> String {
    let order = g.topo_order().unwrap_or_else(|_| g.node_ids());
    // Position of each node within its layer, to map layer L's nodes onto layer 0's.
    let mut by_layer: HashMap<u32, Vec<NodeId>> = HashMap::new();
    for &id in &order {
        if let Some(l) = g.node(id).layer {
            by_layer.entry(l).or_default().push(id);
        }
    }
    let mut shown: HashMap<NodeId, NodeId> = HashMap::new();
    for &id in &order {
        let n = g.node(id);
        if matches!(n.op, Op::Weight { .. }) {
            continue;
        }
        match n.layer {
            None | Some(0) => {
                shown.insert(id, id);
            }
            Some(l) => {
                let k = by_layer[&l].iter().position(|&x| x == id).unwrap();
                if let Some(&first) = by_layer.get(&0).and_then(|v| v.get(k)) {
                    shown.insert(id, first);
                }
            }
        }
    }
    let label = |id: NodeId| -> String {
        let n = g.node(id);
        let mut s = n.op.mnemonic().to_string();
        let attrs = n.op.attrs();
        if !attrs.is_empty() && !matches!(n.op, Op::Weight { .. }) {
            s.push_str(&attrs);
        }
        if !n.origin.is_empty() {
            s = format!("{}: {s}", n.origin);
        }
        if let Some(t) = &n.ty {
            s.push_str(&format!("\\n{t}"));
        }
        s.replace('"', "\\\"")
    };
    let mut out = String::new();
    writeln!(out, "digraph \"{}\" {{", g.name).unwrap();
    writeln!(out, "  rankdir=TB; node [shape=box, fontname=\"monospace\", fontsize=10];").unwrap();
    let body = |out: &mut String, pred: &dyn Fn(Option<u32>) -> bool, indent: &str| {
        for &id in &order {
            let n = g.node(id);
            if shown.get(&id) == Some(&id) && pred(n.layer) {
                writeln!(out, "{indent}n{} [label=\"{}\"];", id.index(), label(id)).unwrap();
            }
        }
    };
    body(&mut out, &|l| l.is_none(), "  ");
    if layers > 0 && by_layer.contains_key(&0) {
        writeln!(out, "  subgraph cluster_block {{").unwrap();
        writeln!(out, "    label=\"block × {layers} (layer 0 shown)\"; style=rounded;").unwrap();
        body(&mut out, &|l| l == Some(0), "    ");
        writeln!(out, "  }}").unwrap();
    }
    let mut edges = std::collections::BTreeSet::new();
    for &id in &order {
        let Some(&to) = shown.get(&id) else { continue };
        if to != id {
            continue;
        }
        for o in g.operands(id) {
            if let Some(&from) = shown.get(&o) {
                let repeated = g.node(o).layer.is_some_and(|l| l > 0);
                edges.insert((from.index(), to.index(), repeated));
            }
        }
    }
    for (from, to, repeated) in edges {
        let style = if repeated { " [style=dashed, label=\"from the last block\"]" } else { "" };
        writeln!(out, "  n{from} -> n{to}{style};").unwrap();
    }
    out.push_str("}\n");
    out
}
