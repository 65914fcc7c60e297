//! Graphviz DOT for a whole architecture.
//!
//! Transformer blocks repeat, so only the first layer of each block variant is drawn,
//! inside a cluster that says which layers run it; a value that a later layer hands on is
//! drawn as coming from the matching node of its variant's first layer. Weights are folded
//! into the label of the op that reads them, which keeps the picture to the data flow.

use std::collections::HashMap;
use std::fmt::Write;

use super::graph::{Graph, NodeId};
use super::op::Op;

/// `layer_blocks[l]` is the block variant layer `l` runs, `names` each variant's name.
pub fn to_dot(g: &Graph, layer_blocks: &[usize], names: &[String]) -> String {
    let layers = layer_blocks.len() as u32;
    // The layer drawn for each layer: the first that runs the same block.
    let rep = |l: u32| -> u32 {
        let b = layer_blocks.get(l as usize).copied().unwrap_or(0);
        layer_blocks.iter().position(|&x| x == b).unwrap_or(0) as u32
    };
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
            None => {
                shown.insert(id, id);
            }
            Some(l) if rep(l) == l => {
                shown.insert(id, id);
            }
            Some(l) => {
                let k = by_layer[&l].iter().position(|&x| x == id).unwrap();
                if let Some(&first) = by_layer.get(&rep(l)).and_then(|v| v.get(k)) {
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
    let variants = names.len().max(1);
    let name = |b: usize| names.get(b).map_or("", String::as_str);
    for b in 0..variants {
        let runs: Vec<u32> = (0..layers).filter(|&l| layer_blocks[l as usize] == b).collect();
        let Some(&first) = runs.first() else { continue };
        if !by_layer.contains_key(&first) {
            continue;
        }
        if variants == 1 {
            writeln!(out, "  subgraph cluster_block {{").unwrap();
            writeln!(out, "    label=\"block × {layers} (layer 0 shown)\"; style=rounded;").unwrap();
        } else {
            let list: Vec<String> = runs.iter().map(u32::to_string).collect();
            writeln!(out, "  subgraph cluster_block_{b} {{").unwrap();
            writeln!(
                out,
                "    label=\"block {} × {}: layers {} (layer {first} shown)\"; style=rounded;",
                name(b),
                runs.len(),
                list.join(", ")
            )
            .unwrap();
        }
        body(&mut out, &|l| l == Some(first), "    ");
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
                let repeated = g.node(o).layer.is_some_and(|l| rep(l) != l);
                edges.insert((from.index(), to.index(), repeated));
            }
        }
    }
    for (from, to, repeated) in edges {
        let style = match (repeated, variants) {
            (false, _) => "",
            (true, 1) => " [style=dashed, label=\"from the last block\"]",
            (true, _) => " [style=dashed, label=\"from a later layer\"]",
        };
        writeln!(out, "  n{from} -> n{to}{style};").unwrap();
    }
    out.push_str("}\n");
    out
}
