//! The graph container: a petgraph `StableDiGraph` kept behind a small API.
//!
//! Operands are edges into a node, weighted with the operand index; that is the only
//! place operand order is stored. Node ids stay valid while other nodes are removed.

use std::collections::HashMap;

use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;

use super::op::{CacheKind, Op};
use super::shape::TensorType;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(NodeIndex<u32>);

impl NodeId {
    pub fn index(self) -> usize {
        self.0.index()
    }
}

/// Which compiler phase a graph is in. Only the split pass moves a graph forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// One full forward pass over `T` tokens at positions `0..T`, no cache.
    Model,
    /// The prompt: `T` tokens at positions `0..T`; emits every layer's keys and values.
    Prefill,
    /// One token at position `P` against a cache of `P` positions.
    Decode,
    /// `T` more tokens at positions `P..P + T` against a cache of `P` positions: a prompt
    /// continued (a conversation's next turn) without running it again.
    Extend,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Model => "model",
            Phase::Prefill => "prefill",
            Phase::Decode => "decode",
            Phase::Extend => "extend",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Node {
    pub op: Op,
    /// Filled in by shape inference (leaves carry theirs from the start).
    pub ty: Option<TensorType>,
    /// The transformer layer this node belongs to, if any.
    pub layer: Option<u32>,
    /// Where it came from in the spec, e.g. `attn` or `ln_f`.
    pub origin: String,
}

/// A result of a graph.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Output {
    /// The model's result: `logits`, or an encoder's `hidden` state. Always the first.
    Main(MainOutput),
    /// The keys or values of one layer, for the KV cache: prefill's `[kv_heads, T,
    /// head_dim]`, decode's new row `[kv_heads, 1, head_dim]`. Written `cache.k.L`.
    Cache { layer: u32, kind: CacheKind },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MainOutput {
    Logits,
    Hidden,
}

impl Output {
    /// The output's name in the text form, the interpreter's results and the manifest.
    pub fn name(&self) -> String {
        self.to_string()
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Output::Main(MainOutput::Logits) => f.write_str("logits"),
            Output::Main(MainOutput::Hidden) => f.write_str("hidden"),
            Output::Cache { layer, kind } => write!(f, "cache.{}.{layer}", kind.name()),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Graph {
    pub name: String,
    pub phase: Phase,
    /// The results, in order: the main one first, then any cache outputs.
    pub outputs: Vec<(Output, NodeId)>,
    g: StableDiGraph<Node, u8>,
}

impl Graph {
    /// The nodes whose values go to the KV cache, each with the cache regions it fills.
    pub fn cache_outputs(&self) -> HashMap<NodeId, Vec<(u32, CacheKind)>> {
        let mut map: HashMap<NodeId, Vec<(u32, CacheKind)>> = HashMap::new();
        for (o, id) in &self.outputs {
            if let Output::Cache { layer, kind } = *o {
                map.entry(*id).or_default().push((layer, kind));
            }
        }
        map
    }

    /// The main output (`logits` or `hidden`) and its node.
    pub fn main_output(&self) -> (MainOutput, NodeId) {
        match self.outputs.first() {
            Some((Output::Main(m), id)) => (*m, *id),
            _ => panic!("bug: graph `{}` does not start with its main output", self.name),
        }
    }

    pub fn new(name: impl Into<String>, phase: Phase) -> Self {
        Graph { name: name.into(), phase, outputs: Vec::new(), g: StableDiGraph::new() }
    }

    pub fn add(&mut self, node: Node, operands: &[NodeId]) -> NodeId {
        let id = NodeId(self.g.add_node(node));
        for (i, &o) in operands.iter().enumerate() {
            self.g.add_edge(o.0, id.0, i as u8);
        }
        id
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.g[id.0]
    }

    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.g[id.0]
    }

    pub fn op(&self, id: NodeId) -> &Op {
        &self.g[id.0].op
    }

    /// The inferred type; only call after shape inference (the verifier guarantees it).
    pub fn ty(&self, id: NodeId) -> &TensorType {
        self.g[id.0].ty.as_ref().expect("bug: type queried before shape inference")
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.g.contains_node(id.0)
    }

    pub fn len(&self) -> usize {
        self.g.node_count()
    }

    pub fn is_empty(&self) -> bool {
        self.g.node_count() == 0
    }

    pub fn operands(&self, id: NodeId) -> Vec<NodeId> {
        let mut ins: Vec<(u8, NodeId)> = self
            .g
            .edges_directed(id.0, Direction::Incoming)
            .map(|e| (*e.weight(), NodeId(e.source())))
            .collect();
        ins.sort();
        ins.into_iter().map(|(_, n)| n).collect()
    }

    /// Distinct nodes that use `id` as an operand, in id order.
    pub fn users(&self, id: NodeId) -> Vec<NodeId> {
        let mut us: Vec<NodeId> = self.g.neighbors_directed(id.0, Direction::Outgoing).map(NodeId).collect();
        us.sort();
        us.dedup();
        us
    }

    /// How many operand slots and outputs refer to `id`.
    pub fn use_count(&self, id: NodeId) -> usize {
        self.g.edges_directed(id.0, Direction::Outgoing).count()
            + self.outputs.iter().filter(|(_, o)| *o == id).count()
    }

    pub fn node_ids(&self) -> Vec<NodeId> {
        self.g.node_indices().map(NodeId).collect()
    }

    /// Redirects every use of `old` (operands and outputs) to `new`.
    pub fn replace_uses(&mut self, old: NodeId, new: NodeId) {
        let uses: Vec<_> = self
            .g
            .edges_directed(old.0, Direction::Outgoing)
            .map(|e| (e.id(), e.target(), *e.weight()))
            .collect();
        for (edge, target, slot) in uses {
            self.g.remove_edge(edge);
            self.g.add_edge(new.0, target, slot);
        }
        for (_, o) in &mut self.outputs {
            if *o == old {
                *o = new;
            }
        }
    }

    /// Replaces operand `slot` of `id` with `new`.
    pub fn set_operand(&mut self, id: NodeId, slot: usize, new: NodeId) {
        let edge = self
            .g
            .edges_directed(id.0, Direction::Incoming)
            .find(|e| *e.weight() as usize == slot)
            .map(|e| e.id())
            .expect("bug: no such operand slot");
        self.g.remove_edge(edge);
        self.g.add_edge(new.0, id.0, slot as u8);
    }

    pub fn remove(&mut self, id: NodeId) {
        self.g.remove_node(id.0);
    }

    /// A deterministic topological order that puts every node just before its first use:
    /// a depth-first post-order from the outputs (in order), visiting operands in order,
    /// then any nodes no output reaches, by id. It depends only on the graph's structure,
    /// not on how ids were allocated. Returns `Err(node)` naming a node on a cycle.
    pub fn topo_order(&self) -> Result<Vec<NodeId>, NodeId> {
        #[derive(Clone, Copy, PartialEq)]
        enum State {
            Open,
            Done,
        }
        let mut state: HashMap<NodeId, State> = HashMap::with_capacity(self.len());
        let mut order = Vec::with_capacity(self.len());
        let mut ids = self.node_ids();
        ids.sort();
        let roots = self.outputs.iter().map(|(_, n)| *n).chain(ids);
        for root in roots {
            if state.contains_key(&root) {
                continue;
            }
            let mut stack = vec![(root, self.operands(root), 0usize)];
            state.insert(root, State::Open);
            while let Some((node, ops, i)) = stack.last_mut() {
                if let Some(&next) = ops.get(*i) {
                    *i += 1;
                    match state.get(&next) {
                        Some(State::Open) => return Err(next),
                        Some(State::Done) => {}
                        None => {
                            state.insert(next, State::Open);
                            let next_ops = self.operands(next);
                            stack.push((next, next_ops, 0));
                        }
                    }
                } else {
                    let node = *node;
                    state.insert(node, State::Done);
                    order.push(node);
                    stack.pop();
                }
            }
        }
        Ok(order)
    }

    /// The node of the output named `name` (as the text form writes it).
    pub fn output(&self, name: &str) -> Option<NodeId> {
        self.outputs.iter().find(|(o, _)| o.name() == name).map(|(_, id)| *id)
    }
}
