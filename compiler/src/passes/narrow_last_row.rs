//! Narrowing to the last row: when only the last position's result is returned, every op
//! whose rows are needed only there runs on that row alone. That is the final norm and
//! the vocabulary projection, and also most of the last layer: its query, attention,
//! output projection and MLP (only its keys and values, which the cache keeps, are
//! needed at every position).
//!
//! Which rows a node's users need is found from the users back: a row-wise op (one that
//! computes each output row from the same row of its row operands, with attention's
//! query, positions and output rows in that role) needs only the last row of its row
//! operands if only its own last row is needed. A node is narrowed when every use of it
//! (the graph's outputs included) needs only its last row. The narrowed copy reads the
//! narrowed copies of its row operands, or `last_row` of those needed whole (their rank
//! is one or two: a narrowed op whose row operand is a `[H, T, hd]` tensor needed whole
//! stays as it is, with all it depends on).
//!
//! Before: `%80 = layernorm %79, …`, `%81 = linear %80, %1`, `%82 = last_row %81`
//! After:  `%80 = last_row %79`, `%81 = layernorm %80, …`, `%82 = linear %81, %1`

use std::collections::{HashMap, HashSet};

use super::{Pass, PassError, ShapeInfer};
use crate::ir::{Dim, Graph, Node, NodeId, Op};

pub struct NarrowLastRow;

impl Pass for NarrowLastRow {
    fn name(&self) -> &'static str {
        "narrow_last_row"
    }

    fn run(&self, g: &mut Graph) -> Result<(), PassError> {
        if !g.node_ids().into_iter().any(|n| *g.op(n) == Op::LastRow) {
            return Ok(());
        }
        let order = g.topo_order().map_err(|n| PassError::bug(g, n, "a cycle"))?;
        let narrow = plan(g, &order);
        if narrow.is_empty() {
            return Ok(());
        }
        // The narrowed copies, operands first; `last_row` of each whole row operand once.
        let mut copy: HashMap<NodeId, NodeId> = HashMap::new();
        let mut sliced: HashMap<NodeId, NodeId> = HashMap::new();
        for &n in order.iter().filter(|n| narrow.contains(n)) {
            let ops = g.operands(n);
            let rows = row_operands(g.op(n));
            let mut new_ops = Vec::with_capacity(ops.len());
            for (slot, &x) in ops.iter().enumerate() {
                new_ops.push(if !rows.contains(&slot) {
                    x
                } else if let Some(&c) = copy.get(&x) {
                    c
                } else {
                    *sliced.entry(x).or_insert_with(|| {
                        let node = g.node(x);
                        let last = Node {
                            op: Op::LastRow,
                            ty: None,
                            layer: node.layer,
                            origin: node.origin.clone(),
                        };
                        g.add(last, &[x])
                    })
                });
            }
            let node = g.node(n);
            let c = g.add(Node { ty: None, ..node.clone() }, &new_ops);
            copy.insert(n, c);
        }
        // Each `last_row` of a narrowed node is its copy.
        for &n in &order {
            if *g.op(n) != Op::LastRow {
                continue;
            }
            if let Some(&c) = copy.get(&g.operands(n)[0]) {
                g.replace_uses(n, c);
                g.remove(n);
            }
        }
        // The originals are now unused.
        for &n in order.iter().rev().filter(|n| narrow.contains(n)) {
            if g.use_count(n) == 0 {
                g.remove(n);
            }
        }
        ShapeInfer.run(g)
    }
}

/// The operand slots of `op` whose rows are the rows of its output (as far as it is
/// row-wise at all): the data, the query and the positions.
fn row_operands(op: &Op) -> &'static [usize] {
    match op {
        Op::LayerNorm { .. }
        | Op::RmsNorm { .. }
        | Op::Linear { .. }
        | Op::Activation(_)
        | Op::Scale(_)
        | Op::RoundBf16
        | Op::RoundQ8
        | Op::SplitQkv { .. }
        | Op::SplitHeads { .. }
        | Op::MergeHeads
        | Op::Slice { .. }
        | Op::HeadLinear { .. }
        | Op::Route(_) => &[0],
        // Along the features of `[H, T, d]` (multi-head latent attention's parts).
        Op::Concat { axis: 2 } => &[0, 1],
        Op::Add | Op::Mul | Op::Rope(_) | Op::Experts(_) | Op::RowScale => &[0, 1],
        Op::Attention { .. } => &[0, 3],
        _ => &[],
    }
}

/// The axis that indexes positions: 0 of `[T]` and `[T, d]`, 1 of `[H, T, hd]`.
fn row_axis(rank: usize) -> Option<usize> {
    match rank {
        1 | 2 => Some(0),
        3 => Some(1),
        _ => None,
    }
}

/// The length of `n`'s row axis, if it has one.
fn rows(g: &Graph, n: NodeId) -> Option<Dim> {
    let ty = g.ty(n);
    row_axis(ty.rank()).map(|a| ty.shape[a])
}

/// Whether `n` is row-wise: its row operands have its rows, and they are more than one.
fn row_wise(g: &Graph, n: NodeId) -> bool {
    let slots = row_operands(g.op(n));
    let Some(r) = rows(g, n) else { return false };
    if slots.is_empty() || r == Dim::fixed(1) {
        return false;
    }
    let ops = g.operands(n);
    slots.iter().all(|&s| ops.get(s).is_some_and(|&x| rows(g, x) == Some(r)))
}

/// The nodes to narrow: row-wise nodes every use of which needs only their last row,
/// such that each row operand either is narrowed too or can be sliced (rank one or two).
/// A node that fails the second condition is kept whole, and the first is found again.
fn plan(g: &Graph, order: &[NodeId]) -> HashSet<NodeId> {
    let outputs: HashSet<NodeId> = g.outputs.iter().map(|(_, n)| *n).collect();
    let mut whole: HashSet<NodeId> = HashSet::new();
    loop {
        let mut narrow: HashSet<NodeId> = HashSet::new();
        for &n in order.iter().rev() {
            if whole.contains(&n) || outputs.contains(&n) || !row_wise(g, n) {
                continue;
            }
            let users = g.users(n);
            let last_only = !users.is_empty()
                && users.iter().all(|&u| {
                    *g.op(u) == Op::LastRow
                        || (narrow.contains(&u)
                            && g.operands(u)
                                .iter()
                                .enumerate()
                                .all(|(slot, &x)| x != n || row_operands(g.op(u)).contains(&slot)))
                });
            if last_only {
                narrow.insert(n);
            }
        }
        let stuck: Vec<NodeId> = narrow
            .iter()
            .copied()
            .filter(|&n| {
                let ops = g.operands(n);
                row_operands(g.op(n)).iter().any(|&s| !narrow.contains(&ops[s]) && g.ty(ops[s]).rank() > 2)
            })
            .collect();
        if stuck.is_empty() {
            return narrow;
        }
        whole.extend(stuck);
    }
}
