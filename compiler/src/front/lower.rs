//! [`Spec`] to the model graph, checking each section's data flow on the way.
//!
//! The embed section sees `tokens`, `positions` and `token_types` and must assign `x`;
//! the block section is lowered once per layer and transforms `x`; the head section, if
//! any, transforms `x` last. Attention is built from primitives (projections, head split,
//! rotary, `QKᵀ`, scale, ALiBi, mask, softmax, `·V`, head merge) so that fusing it is a
//! pass of its own. Leaves (inputs and weights) get their types here; every other type is
//! left to shape inference.

use std::collections::HashMap;

use super::ast::{BinOp, Expr, Ident, SectionKind, Span};
use super::diag::{Code, Diagnostic};
use super::spec::*;
use crate::ir::*;

#[derive(Clone, Copy, Debug)]
enum Val {
    /// Integer ids (`tokens`, `positions`, `token_types`), with the largest id + 1 they can
    /// hold (`None` for token types, which are checked at run time against their table).
    Ids(NodeId, Option<usize>),
    /// A `[T, d_model]` activation.
    Hidden(NodeId),
    /// `[T, vocab]` logits.
    Logits(NodeId),
    Scalar(f64),
}

impl Val {
    fn describe(&self) -> &'static str {
        match self {
            Val::Ids(..) => "integer ids",
            Val::Hidden(_) => "an activation",
            Val::Logits(_) => "logits",
            Val::Scalar(_) => "a number",
        }
    }
}

pub fn lower(spec: &Spec, diags: &mut Vec<Diagnostic>) -> Option<Graph> {
    let mut l = Lowerer {
        spec,
        g: Graph::new(spec.name.clone(), Phase::Model),
        diags,
        layer: None,
        section: SectionKind::Embed,
        inputs: HashMap::new(),
        dtype: None,
        listed: HashMap::new(),
    };
    let before = l.diags.len();
    let mut x = match l.section(&spec.embed, SectionKind::Embed, HashMap::new()) {
        Some(Val::Hidden(n)) => n,
        other => {
            if let Some(other) = other {
                let msg =
                    format!("the embed section must make `x` an activation, it is {}", other.describe());
                l.error_at(&spec.embed.keyword, msg);
            }
            // Go on with a stand-in so that the other sections are checked too.
            l.leaf(Op::Positions, TensorType::new(vec![Dim::T], DType::I32), "", None)
        }
    };
    for layer in 0..spec.sizes.layers as u32 {
        l.layer = Some(layer);
        let env = HashMap::from([("x".to_string(), Val::Hidden(x))]);
        let block = spec.block_of(layer);
        match l.section(block, SectionKind::Block, env)? {
            Val::Hidden(n) => x = n,
            other => {
                l.error_at(
                    &block.keyword,
                    format!("a block must leave `x` an activation, it is {}", other.describe()),
                );
                return None;
            }
        }
    }
    l.layer = None;
    let out = match &spec.head {
        Some(h) => l.section(h, SectionKind::Head, HashMap::from([("x".to_string(), Val::Hidden(x))]))?,
        None => Val::Hidden(x),
    };
    match out {
        Val::Logits(n) => l.g.outputs.push((Output::Main(MainOutput::Logits), n)),
        Val::Hidden(n) => l.g.outputs.push((Output::Main(MainOutput::Hidden), n)),
        other => {
            let kw = spec.head.as_ref().map(|h| h.keyword.clone()).unwrap_or(0..0);
            l.error_at(
                &kw,
                format!("the model's result must be an activation or logits, it is {}", other.describe()),
            );
        }
    }
    l.check_listed();
    (l.diags.len() == before).then_some(l.g)
}

struct Lowerer<'a> {
    spec: &'a Spec,
    g: Graph,
    diags: &'a mut Vec<Diagnostic>,
    layer: Option<u32>,
    section: SectionKind,
    /// Graph inputs, created on first use.
    inputs: HashMap<&'static str, NodeId>,
    /// The storage of the weight matrices of the component being lowered, where it
    /// gives one.
    dtype: Option<DType>,
    /// The weights named in the `dtypes` section that the model reads, and their roles.
    listed: HashMap<String, WeightRole>,
}

impl Lowerer<'_> {
    /// Each name in the `dtypes` section must be a matrix the model reads.
    fn check_listed(&mut self) {
        let read: Vec<String> = self
            .g
            .node_ids()
            .into_iter()
            .filter_map(|id| match self.g.op(id) {
                Op::Weight { name, role: WeightRole::Matrix | WeightRole::Embedding } => Some(name.clone()),
                _ => None,
            })
            .collect();
        for t in &self.spec.tensor_dtypes {
            let d = match self.listed.get(&t.name) {
                Some(WeightRole::Matrix | WeightRole::Embedding) => continue,
                Some(_) => Diagnostic::error(Code::BadValue, format!("`{}` is not a matrix", t.name))
                    .label(t.span.clone(), "listed in `dtypes`")
                    .note("only matrices take a storage type; gains, biases and sink logits stay f32"),
                None => {
                    let mut d =
                        Diagnostic::error(Code::Name, format!("the model reads no weight `{}`", t.name))
                            .label(t.span.clone(), "listed in `dtypes`");
                    let near = read.iter().max_by(|a, b| {
                        strsim::jaro_winkler(a, &t.name).total_cmp(&strsim::jaro_winkler(b, &t.name))
                    });
                    if let Some(n) = near.filter(|n| strsim::jaro_winkler(n, &t.name) > 0.8) {
                        d = d.note(format!("did you mean `{n}`?"));
                    }
                    d.note("name a matrix as the checkpoint does, as `tfc ir` and the manifest list them")
                }
            };
            self.diags.push(d);
        }
    }

    /// Errors are reported for the first instance of each block only; the others repeat them.
    fn reporting(&self) -> bool {
        self.layer.is_none_or(|l| self.spec.first_of_its_block(l))
    }

    fn error(&mut self, d: Diagnostic) {
        if self.reporting() {
            self.diags.push(d);
        }
    }

    fn error_at(&mut self, span: &Span, msg: String) {
        let d = Diagnostic::error(Code::Flow, msg).label(span.clone(), "here");
        self.error(d);
    }

    fn section(&mut self, s: &Section, kind: SectionKind, mut env: HashMap<String, Val>) -> Option<Val> {
        self.section = kind;
        let before = self.diags.len();
        for st in &s.stmts {
            if let Some(v) = self.expr(&st.expr, s, &env) {
                env.insert(st.target.name.clone(), v);
            }
        }
        if self.diags.len() > before {
            return None;
        }
        match env.get("x") {
            Some(v) => Some(*v),
            None => {
                self.error(
                    Diagnostic::error(Code::Flow, format!("the `{}` section never assigns `x`", kind.name()))
                        .label(s.keyword.clone(), "this section")
                        .note("every section passes the residual stream on as `x`, e.g. `x = x + attn(ln_1(x))`"),
                );
                None
            }
        }
    }

    fn node(&mut self, op: Op, operands: &[NodeId], origin: &str) -> NodeId {
        let node = Node { op, ty: None, layer: self.layer, origin: origin.to_string() };
        self.g.add(node, operands)
    }

    fn leaf(&mut self, op: Op, ty: TensorType, origin: &str, layer: Option<u32>) -> NodeId {
        let node = Node { op, ty: Some(ty), layer, origin: origin.to_string() };
        self.g.add(node, &[])
    }

    fn input(&mut self, name: &'static str) -> NodeId {
        if let Some(&n) = self.inputs.get(name) {
            return n;
        }
        let kind = if name == "tokens" { InputKind::Tokens } else { InputKind::TokenTypes };
        let n = self.leaf(Op::Input(kind), TensorType::new(vec![Dim::T], DType::I32), "", None);
        self.inputs.insert(name, n);
        n
    }

    fn positions(&mut self, origin: &str) -> NodeId {
        let ty = TensorType::new(vec![Dim::T], DType::I32);
        let layer = self.layer;
        self.leaf(Op::Positions, ty, origin, layer)
    }

    fn weight(&mut self, name: &Template, shape: &[usize], role: WeightRole, origin: &str) -> NodeId {
        let name = instantiate(name, self.layer);
        let listed = self.spec.tensor_dtypes.iter().find(|t| t.name == name).map(|t| t.dtype);
        if listed.is_some() {
            self.listed.insert(name.clone(), role);
        }
        let dtype = match (role, listed.or(self.dtype).unwrap_or(self.spec.dtype)) {
            (WeightRole::Bias | WeightRole::Gain | WeightRole::Logit, _) => DType::F32,
            (_, d) => match d.for_rows(shape.last().copied().unwrap_or(0)) {
                // A q8 tensor keeps its scales after all of its values, so an expert's
                // slice of one would not be a q8 matrix: experts take q8_0's blocks.
                DType::Q8 if shape.len() == 3 => DType::Quant(Quant::Q8_0).for_rows(shape[2]),
                d => d,
            },
        };
        let layer = self.layer;
        self.leaf(Op::Weight { name, role }, TensorType::fixed(shape, dtype), origin, layer)
    }

    fn expr(&mut self, e: &Expr, s: &Section, env: &HashMap<String, Val>) -> Option<Val> {
        match e {
            Expr::Number(v, _) => Some(Val::Scalar(*v)),
            Expr::Var(id) => self.var(id, env),
            Expr::Chain(first, rest, _) => {
                // Every operand is checked, so that each reports its errors.
                let mut acc = self.expr(first, s, env);
                for (op, e) in rest {
                    let b = self.expr(e, s, env);
                    let span = first.span().start..e.span().end;
                    acc = match (acc, b) {
                        (Some(a), Some(b)) => self.binary(a, *op, b, &span),
                        _ => None,
                    };
                }
                acc
            }
            Expr::Call(f, args, span) => {
                let args: Vec<Option<Val>> = args.iter().map(|a| self.expr(a, s, env)).collect();
                let args: Vec<Val> = args.into_iter().collect::<Option<_>>()?;
                self.call(f, &args, s, span)
            }
        }
    }

    fn var(&mut self, id: &Ident, env: &HashMap<String, Val>) -> Option<Val> {
        if let Some(v) = env.get(&id.name) {
            return Some(*v);
        }
        let sz = &self.spec.sizes;
        let size = match id.name.as_str() {
            "vocab" => Some(sz.vocab),
            "d_model" => Some(sz.d_model),
            "layers" => Some(sz.layers),
            "heads" => Some(sz.heads),
            "kv_heads" => Some(sz.kv_heads),
            "head_dim" => Some(sz.head_dim),
            "max_seq" => Some(sz.max_seq),
            "d_ff" => sz.d_ff,
            _ => None,
        };
        if let Some(v) = size {
            return Some(Val::Scalar(v as f64));
        }
        let input = match id.name.as_str() {
            "tokens" => Some("tokens"),
            "token_types" => Some("token_types"),
            "positions" => Some("positions"),
            _ => None,
        };
        match input {
            Some(name) if self.section == SectionKind::Embed => {
                let sz = &self.spec.sizes;
                Some(match name {
                    "positions" => Val::Ids(self.positions(""), Some(sz.max_seq)),
                    "tokens" => Val::Ids(self.input(name), Some(sz.vocab)),
                    _ => Val::Ids(self.input(name), None),
                })
            }
            Some(name) => {
                self.error(
                    Diagnostic::error(
                        Code::Name,
                        format!("`{name}` is only available in the `embed` section"),
                    )
                    .label(id.span.clone(), "used here"),
                );
                None
            }
            None => {
                let known: Vec<&str> = env.keys().map(String::as_str).collect();
                let mut d = Diagnostic::error(Code::Name, format!("`{}` is not defined", id.name))
                    .label(id.span.clone(), "no value or size of this name");
                if !known.is_empty() {
                    let mut known = known;
                    known.sort();
                    d = d.note(format!("defined here: {}", known.join(", ")));
                }
                self.error(d);
                None
            }
        }
    }

    fn binary(&mut self, a: Val, op: BinOp, b: Val, span: &Span) -> Option<Val> {
        let origin = "";
        match (a, op, b) {
            (Val::Scalar(x), _, Val::Scalar(y)) => Some(Val::Scalar(match op {
                BinOp::Add => x + y,
                BinOp::Sub => x - y,
                BinOp::Mul => x * y,
                BinOp::Div => x / y,
            })),
            (Val::Hidden(x), BinOp::Add, Val::Hidden(y)) => {
                Some(Val::Hidden(self.node(Op::Add, &[x, y], origin)))
            }
            (Val::Hidden(x), BinOp::Mul, Val::Scalar(c)) | (Val::Scalar(c), BinOp::Mul, Val::Hidden(x)) => {
                Some(Val::Hidden(self.node(Op::Scale(c), &[x], origin)))
            }
            (Val::Hidden(x), BinOp::Div, Val::Scalar(c)) if c != 0.0 => {
                Some(Val::Hidden(self.node(Op::Scale(1.0 / c), &[x], origin)))
            }
            // Logits may be scaled (a logit scale or temperature baked into the model).
            (Val::Logits(x), BinOp::Mul, Val::Scalar(c)) | (Val::Scalar(c), BinOp::Mul, Val::Logits(x)) => {
                Some(Val::Logits(self.node(Op::Scale(c), &[x], origin)))
            }
            (Val::Logits(x), BinOp::Div, Val::Scalar(c)) if c != 0.0 => {
                Some(Val::Logits(self.node(Op::Scale(1.0 / c), &[x], origin)))
            }
            (a, _, b) => {
                let sym = match op {
                    BinOp::Add => "+",
                    BinOp::Sub => "-",
                    BinOp::Mul => "*",
                    BinOp::Div => "/",
                };
                self.error(
                    Diagnostic::error(
                        Code::Flow,
                        format!("cannot compute {} {sym} {}", a.describe(), b.describe()),
                    )
                    .label(span.clone(), "in this expression")
                    .note("activations can be added, and scaled by a number"),
                );
                None
            }
        }
    }

    fn call(&mut self, f: &Ident, args: &[Val], s: &Section, span: &Span) -> Option<Val> {
        if f.name == "sqrt" {
            return match args {
                [Val::Scalar(x)] if *x >= 0.0 => Some(Val::Scalar(x.sqrt())),
                _ => {
                    self.error(
                        Diagnostic::error(Code::Flow, "`sqrt` takes one non-negative number")
                            .label(span.clone(), "in this call"),
                    );
                    None
                }
            };
        }
        let Some(c) = s.component(&f.name) else {
            let mut d = Diagnostic::error(
                Code::Name,
                format!("`{}` is not a component of the `{}` section", f.name, self.section.name()),
            )
            .label(f.span.clone(), "called here");
            let names: Vec<&str> = s.components.iter().map(|c| c.name.name.as_str()).collect();
            if !names.is_empty() {
                d = d.note(format!("components here: {}", names.join(", ")));
            }
            self.error(d);
            return None;
        };
        let arg = match args {
            [a] => *a,
            _ => {
                self.error(
                    Diagnostic::error(
                        Code::Flow,
                        format!("`{}` takes one argument, got {}", f.name, args.len()),
                    )
                    .label(span.clone(), "in this call"),
                );
                return None;
            }
        };
        let origin = f.name.as_str();
        let sz = self.spec.sizes.clone();
        // A tied unembedding reads its embedding's matrix, stored as the embedding says.
        self.dtype = match &c.kind {
            Kind::Unembed { tied: Some(t), .. } => self.spec.embed.component(t).and_then(|e| e.dtype),
            _ => c.dtype,
        };
        let wants = |l: &mut Self, what: &str| {
            l.error(
                Diagnostic::error(
                    Code::Flow,
                    format!("`{}` ({}) takes {what}, got {}", f.name, c.kind.name(), arg.describe()),
                )
                .label(span.clone(), "in this call"),
            );
            None
        };
        match (&c.kind, arg) {
            (Kind::Embedding { weight, rows, offset }, Val::Ids(ids, bound)) => {
                // Every id the input can hold must have a row: nothing reads out of bounds.
                if let Some(n) = bound.filter(|n| n + offset > *rows) {
                    self.error(
                        Diagnostic::error(
                            Code::Sizes,
                            format!("`{}` has {rows} rows, too few for {n} ids at offset {offset}", f.name),
                        )
                        .label(span.clone(), format!("ids here run up to {}", n - 1 + offset))
                        .note("give the embedding `rows` ≥ the number of ids (vocab or max_seq) + offset"),
                    );
                    return None;
                }
                let table = self.weight(weight, &[*rows, sz.d_model], WeightRole::Embedding, origin);
                Some(Val::Hidden(self.node(Op::Gather { offset: *offset }, &[table, ids], origin)))
            }
            (Kind::Sinusoidal { base, fairseq, offset }, Val::Ids(ids, _)) => {
                if sz.d_model % 2 != 0 {
                    self.error(
                        Diagnostic::error(
                            Code::Sizes,
                            format!("sinusoidal positions need an even d_model, not {}", sz.d_model),
                        )
                        .label(c.name.span.clone(), "this encoding"),
                    );
                    return None;
                }
                let op = Op::Sinusoidal { dim: sz.d_model, base: *base, fairseq: *fairseq, offset: *offset };
                Some(Val::Hidden(self.node(op, &[ids], origin)))
            }
            (Kind::Embedding { .. } | Kind::Sinusoidal { .. }, _) => {
                wants(self, "ids: tokens, positions or token_types")
            }
            (_, Val::Hidden(x)) => self.apply(&c.kind, x, origin, &sz),
            _ => wants(self, "an activation"),
        }
    }

    fn apply(&mut self, kind: &Kind, x: NodeId, origin: &str, sz: &Sizes) -> Option<Val> {
        let d = sz.d_model;
        Some(match kind {
            Kind::LayerNorm { eps, weight, bias } => {
                let mut ops = vec![x];
                if let Some(w) = weight {
                    ops.push(self.weight(w, &[d], WeightRole::Gain, origin));
                }
                if let Some(b) = bias {
                    ops.push(self.weight(b, &[d], WeightRole::Bias, origin));
                }
                Val::Hidden(self.node(Op::LayerNorm { eps: *eps, gain: weight.is_some() }, &ops, origin))
            }
            Kind::RmsNorm { eps, weight, unit_offset } => {
                let w = self.weight(weight, &[d], WeightRole::Gain, origin);
                Val::Hidden(self.node(Op::RmsNorm { eps: *eps, unit_offset: *unit_offset }, &[x, w], origin))
            }
            Kind::Mlp(m) => Val::Hidden(self.mlp(x, m, sz, origin)),
            Kind::Moe(m) => Val::Hidden(self.moe(x, m, sz, origin)),
            Kind::Attention(a) => Val::Hidden(self.attention(a, x, origin, sz)),
            Kind::Mla(a) => Val::Hidden(self.mla(a, x, origin, sz)),
            Kind::Unembed { weight, transposed, bias, tied, softcap } => {
                let w = match tied {
                    Some(t) => match self.spec.embed.component(t).map(|c| &c.kind) {
                        Some(Kind::Embedding { weight, rows, .. }) => {
                            let (weight, rows) = (weight.clone(), *rows);
                            self.weight(&weight, &[rows, d], WeightRole::Embedding, origin)
                        }
                        _ => unreachable!("resolve checked `tied`"),
                    },
                    None => {
                        let shape = if *transposed { [d, sz.vocab] } else { [sz.vocab, d] };
                        self.weight(weight, &shape, WeightRole::Matrix, origin)
                    }
                };
                let x = self.linear_input(x, Some(w), origin);
                let mut ops = vec![x, w];
                if let Some(b) = bias {
                    ops.push(self.weight(b, &[sz.vocab], WeightRole::Bias, origin));
                }
                let op = Op::Linear { transposed: *transposed && tied.is_none(), bias: bias.is_some() };
                let logits = self.node(op, &ops, origin);
                Val::Logits(match softcap {
                    Some(cap) => self.softcap(logits, *cap, origin),
                    None => logits,
                })
            }
            Kind::Embedding { .. } | Kind::Sinusoidal { .. } => {
                unreachable!("handled by the caller")
            }
        })
    }

    /// An MLP: `down(act(gate(x)) · up(x))`, or `down(act(up(x)))` without a gate.
    fn mlp(&mut self, x: NodeId, m: &Mlp, sz: &Sizes, origin: &str) -> NodeId {
        let d = sz.d_model;
        let f = m.d_ff.or(sz.d_ff).unwrap_or(0);
        // A fused gate_up is bound as its two halves of rows.
        let half = |p: &Proj, rows: &str| Proj {
            weight: format!("{}[{rows}]", p.weight),
            bias: p.bias.as_ref().map(|b| format!("{b}[{rows}]")),
            transposed: p.transposed,
        };
        let (gate, up) = match (m.gate_up, &m.gate) {
            (true, _) => (Some(half(&m.up, &format!("0:{f}"))), half(&m.up, &format!("{f}:{}", 2 * f))),
            (false, g) => (g.clone(), m.up.clone()),
        };
        let up = self.linear(x, &up, d, f, origin);
        let pre = match &gate {
            Some(g) => self.linear(x, g, d, f, origin),
            None => up,
        };
        let mut h = self.node(Op::Activation(m.act), &[pre], origin);
        if gate.is_some() {
            h = self.node(Op::Mul, &[h, up], origin);
        }
        self.linear(h, &m.down, f, d, origin)
    }

    /// A mixture of experts: the router's logits, the routing, the experts, and the
    /// shared expert (scaled by its gate) added.
    fn moe(&mut self, x: NodeId, m: &Moe, sz: &Sizes, origin: &str) -> NodeId {
        let (d, e, f) = (sz.d_model, m.route.experts, m.hidden.or(sz.d_ff).unwrap_or(0));
        let plain = |w: &str| Proj { weight: w.to_string(), bias: None, transposed: false };
        let router = Proj { weight: m.router.clone(), bias: m.router_bias.clone(), transposed: false };
        let logits = self.linear(x, &router, d, e, origin);
        let route = match &m.choice_bias {
            Some(b) => {
                let bias = self.weight(b, &[e], WeightRole::Bias, origin);
                self.node(Op::Route(m.route), &[logits, bias], origin)
            }
            None => self.node(Op::Route(m.route), &[logits], origin),
        };
        let rows = if m.gate_up { 2 * f } else { f };
        let shape = |out: usize, inn: usize| if m.transposed { [e, inn, out] } else { [e, out, inn] };
        let up = self.weight(&m.up, &shape(rows, d), WeightRole::Matrix, origin);
        let down = self.weight(&m.down, &shape(d, f), WeightRole::Matrix, origin);
        let gate = match (&m.gate, m.gate_up) {
            (_, true) if m.interleaved => None,
            (_, true) => Some(up),
            (Some(g), false) => Some(self.weight(g, &shape(f, d), WeightRole::Matrix, origin)),
            (None, false) => None,
        };
        let op = Op::Experts(Experts {
            experts: e,
            hidden: f,
            act: m.act,
            up_at: if m.gate_up && !m.interleaved { f } else { 0 },
            gate_at: gate.map(|_| 0),
            interleaved: m.interleaved,
            transposed: m.transposed,
            bias: m.biases.is_some(),
            clamp: m.clamp,
            up_offset: m.up_offset,
        });
        // The experts' products keep f32 inputs under `activations = q8`.
        let xin = self.linear_input(x, None, origin);
        let mut ops = vec![xin, route, up, down];
        ops.extend(gate);
        if let Some((ub, gb, db)) = &m.biases {
            let ub = self.weight(ub, &[e, rows], WeightRole::Bias, origin);
            ops.push(ub);
            if gate.is_some() {
                ops.push(match gb {
                    Some(gb) => self.weight(gb, &[e, f], WeightRole::Bias, origin),
                    None => ub,
                });
            }
            ops.push(self.weight(db, &[e, d], WeightRole::Bias, origin));
        }
        let mut y = self.node(op, &ops, origin);
        if let Some(s) = &m.shared {
            let mut out = self.mlp(x, &s.mlp, sz, origin);
            if let Some(g) = &s.gate {
                let g = self.linear(x, &plain(g), d, 1, origin);
                let g = self.node(Op::Activation(Act::Sigmoid), &[g], origin);
                out = self.node(Op::RowScale, &[out, g], origin);
            }
            y = self.node(Op::Add, &[y, out], origin);
        }
        y
    }

    /// A linear map's input: `x`, rounded to bf16 first under `activations = bf16`, and
    /// under `activations = q8` to 8-bit integers per 32 when the weights `w` are stored
    /// in blocks (the products llama.cpp makes; other weights keep f32 inputs).
    fn linear_input(&mut self, x: NodeId, w: Option<NodeId>, origin: &str) -> NodeId {
        let blocks = w.is_some_and(|w| matches!(self.g.ty(w).dtype, DType::Q8 | DType::Quant(_)));
        match self.spec.activations {
            DType::BF16 => self.node(Op::RoundBf16, &[x], origin),
            DType::Q8 if blocks => self.node(Op::RoundQ8, &[x], origin),
            _ => x,
        }
    }

    fn linear(&mut self, x: NodeId, p: &Proj, inn: usize, out: usize, origin: &str) -> NodeId {
        let shape = if p.transposed { [inn, out] } else { [out, inn] };
        let w = self.weight(&p.weight, &shape, WeightRole::Matrix, origin);
        let x = self.linear_input(x, Some(w), origin);
        let mut ops = vec![x, w];
        if let Some(b) = &p.bias {
            ops.push(self.weight(b, &[out], WeightRole::Bias, origin));
        }
        self.node(Op::Linear { transposed: p.transposed, bias: p.bias.is_some() }, &ops, origin)
    }

    /// `cap · tanh(x / cap)`.
    fn softcap(&mut self, x: NodeId, cap: f64, origin: &str) -> NodeId {
        let x = self.node(Op::Scale(1.0 / cap), &[x], origin);
        let x = self.node(Op::Activation(Act::Tanh), &[x], origin);
        self.node(Op::Scale(cap), &[x], origin)
    }

    /// A norm over the last axis (`width` wide) of `x`, each head of `[heads, rows,
    /// head_dim]` or each row of a whole projection, with the weights at `at`; with
    /// `sets`, each of that many heads has its own (`[sets, width]`, stacked from one
    /// tensor per head when `at` holds `{head}`).
    fn head_norm(
        &mut self,
        norm: HeadNorm,
        at: &str,
        x: NodeId,
        hd: usize,
        sets: Option<usize>,
        origin: &str,
    ) -> NodeId {
        let shape: Vec<usize> = sets.map_or(vec![hd], |h| vec![h, hd]);
        let param = |kind: &str| match sets {
            Some(h) if at.contains("{head}") => {
                format!("{}.{kind}", at.replace("{head}", &format!("{{0..{h}}}")))
            }
            _ => format!("{at}.{kind}"),
        };
        let w = self.weight(&param("weight"), &shape, WeightRole::Gain, origin);
        match norm {
            HeadNorm::Rms { eps, unit_offset } => {
                self.node(Op::RmsNorm { eps, unit_offset }, &[x, w], origin)
            }
            HeadNorm::Layer { eps, bias } => {
                let mut ops = vec![x, w];
                if bias {
                    ops.push(self.weight(&param("bias"), &shape, WeightRole::Bias, origin));
                }
                self.node(Op::LayerNorm { eps, gain: true }, &ops, origin)
            }
        }
    }

    fn attention(&mut self, a: &Attention, x: NodeId, origin: &str, sz: &Sizes) -> NodeId {
        let (h, kv, hd, d) = (sz.heads, sz.kv_heads, sz.head_dim, sz.d_model);
        let (q, k, v) = match &a.qkv {
            Qkv::Separate { q, k, v } => (
                self.linear(x, q, d, h * hd, origin),
                self.linear(x, k, d, kv * hd, origin),
                self.linear(x, v, d, kv * hd, origin),
            ),
            Qkv::Fused { proj, layout } => {
                let qkv = self.linear(x, proj, d, (h + 2 * kv) * hd, origin);
                let mut part = |p| {
                    let op = Op::SplitQkv { layout: *layout, part: p, heads: h, kv_heads: kv, head_dim: hd };
                    self.node(op, &[qkv], origin)
                };
                (part(QkvPart::Q), part(QkvPart::K), part(QkvPart::V))
            }
        };
        let (mut q, mut k) = (q, k);
        if let Some(n) = a.qk_norm.as_ref().filter(|n| n.whole) {
            q = self.head_norm(n.norm, &n.q, q, h * hd, None, origin);
            k = self.head_norm(n.norm, &n.k, k, kv * hd, None, origin);
        }
        let mut q = self.node(Op::SplitHeads { heads: h }, &[q], origin);
        let mut k = self.node(Op::SplitHeads { heads: kv }, &[k], origin);
        if let Some(n) = a.qk_norm.as_ref().filter(|n| !n.whole) {
            q = self.head_norm(n.norm, &n.q, q, hd, n.per_head.then_some(h), origin);
            k = self.head_norm(n.norm, &n.k, k, hd, n.per_head.then_some(kv), origin);
        }
        let v = self.node(Op::SplitHeads { heads: kv }, &[v], origin);
        let pos = self.positions(origin);
        if let Some(r) = rope(&a.position, sz) {
            q = self.node(r.clone(), &[q, pos], origin);
            k = self.node(r, &[k, pos], origin);
        }
        let mut s = self.node(Op::HeadMatMul { transpose_b: true }, &[q, k], origin);
        s = self.node(Op::Scale(a.scale), &[s], origin);
        if let Some(cap) = a.softcap {
            s = self.softcap(s, cap, origin);
        }
        if let Position::Alibi { before_scale } = a.position {
            let slope_scale = if before_scale { a.scale } else { 1.0 };
            s = self.node(Op::Alibi { slope_scale }, &[s, pos], origin);
        }
        if a.causal || a.window.is_some() {
            s = self.node(Op::Mask(AttnMask { causal: a.causal, window: a.window }), &[s, pos], origin);
        }
        let p = match &a.sinks {
            Some(name) => {
                let sinks = self.weight(name, &[h], WeightRole::Logit, origin);
                self.node(Op::Softmax, &[s, sinks], origin)
            }
            None => self.node(Op::Softmax, &[s], origin),
        };
        let o = self.node(Op::HeadMatMul { transpose_b: false }, &[p, v], origin);
        let o = self.node(Op::MergeHeads, &[o], origin);
        self.linear(o, &a.o, h * hd, d, origin)
    }

    /// Multi-head latent attention with `kv_b` absorbed (`spec::Mla`): each head's query
    /// part without rotation is taken into the latent's space by its block of `kv_b`'s key
    /// rows, the attention runs over `[latent, rotated key]` rows that one cache holds as
    /// both keys and values (the values' rotated features are dropped after), and each
    /// head's latent output goes out through its block of `kv_b`'s value rows.
    fn mla(&mut self, a: &Mla, x: NodeId, origin: &str, sz: &Sizes) -> NodeId {
        let (h, d) = (sz.heads, sz.d_model);
        let (r, dn, dr, dv) = (a.kv_rank, a.nope_dim, a.rope_dim, a.v_dim);
        let rms = |me: &mut Self, x: NodeId, w: &Template, width: usize| {
            let w = me.weight(w, &[width], WeightRole::Gain, origin);
            me.node(Op::RmsNorm { eps: a.eps, unit_offset: false }, &[x, w], origin)
        };
        let q = match &a.q {
            MlaQuery::Full(p) => self.linear(x, p, d, h * (dn + dr), origin),
            MlaQuery::LowRank { a: qa, norm, b, rank } => {
                let c = self.linear(x, qa, d, *rank, origin);
                let c = rms(self, c, norm, *rank);
                self.linear(c, b, *rank, h * (dn + dr), origin)
            }
        };
        let q = self.node(Op::SplitHeads { heads: h }, &[q], origin);
        let q_nope = self.node(Op::Slice { start: 0, len: dn }, &[q], origin);
        let mut q_rope = self.node(Op::Slice { start: dn, len: dr }, &[q], origin);
        let kv = self.linear(x, &a.kv_a, d, r + dr, origin);
        let latent = self.node(Op::Slice { start: 0, len: r }, &[kv], origin);
        let latent = rms(self, latent, &a.kv_norm, r);
        let latent = self.node(Op::SplitHeads { heads: 1 }, &[latent], origin);
        let k_rope = self.node(Op::Slice { start: r, len: dr }, &[kv], origin);
        let mut k_rope = self.node(Op::SplitHeads { heads: 1 }, &[k_rope], origin);
        let pos = self.positions(origin);
        if let Some(r) = rope(&a.position, sz) {
            q_rope = self.node(r.clone(), &[q_rope, pos], origin);
            k_rope = self.node(r, &[k_rope, pos], origin);
        }
        // Read per head by `head_linear`, in f32 whatever the spec stores matrices as:
        // `kv_b`'s key rows (the inputs of the query's map) and value rows, or its parts.
        let f32_weight = |me: &mut Self, name: &Template, shape: &[usize]| {
            let ty = TensorType::fixed(shape, DType::F32);
            let op = Op::Weight { name: instantiate(name, me.layer), role: WeightRole::Matrix };
            me.leaf(op, ty, origin, me.layer)
        };
        let (k_b, k_map, v_b, v_map) = match &a.kv_b {
            KvB::Fused(kv) => {
                let kv = f32_weight(self, kv, &[h * (dn + dv), r]);
                let k = Op::HeadLinear { at: 0, rows: dn, transposed: true };
                (kv, k, kv, Op::HeadLinear { at: dn, rows: dv, transposed: false })
            }
            KvB::Split { k, v } => {
                let k = f32_weight(self, k, &[h, r, dn]);
                let v = f32_weight(self, v, &[h, dv, r]);
                let map = |rows| Op::HeadLinear { at: 0, rows, transposed: false };
                (k, map(r), v, map(dv))
            }
        };
        let q_lat = self.node(k_map, &[q_nope, k_b], origin);
        let q = self.node(Op::Concat { axis: 2 }, &[q_lat, q_rope], origin);
        let k = self.node(Op::Concat { axis: 2 }, &[latent, k_rope], origin);
        let s = self.node(Op::HeadMatMul { transpose_b: true }, &[q, k], origin);
        let s = self.node(Op::Scale(a.scale), &[s], origin);
        let s = self.node(Op::Mask(AttnMask { causal: true, window: None }), &[s, pos], origin);
        let p = self.node(Op::Softmax, &[s], origin);
        let o = self.node(Op::HeadMatMul { transpose_b: false }, &[p, k], origin);
        let o = self.node(Op::Slice { start: 0, len: r }, &[o], origin);
        let o = self.node(v_map, &[o, v_b], origin);
        let o = self.node(Op::MergeHeads, &[o], origin);
        self.linear(o, &a.o, h * dv, d, origin)
    }
}

/// The rotation a position scheme applies to queries and keys, its scaling compiled for
/// the model's length; `None` for the others.
fn rope(p: &Position, sz: &Sizes) -> Option<Op> {
    let Position::Rope { theta, rotary_dim, interleaved, scaling } = p else { return None };
    let scaling = scaling.clone().compiled_for(sz.max_seq);
    Some(Op::Rope(Rope { theta: *theta, rotary_dim: *rotary_dim, interleaved: *interleaved, scaling }))
}
