//! The syntax tree of a spec, as written, with byte spans into the source.

pub type Span = std::ops::Range<usize>;

#[derive(Clone, Debug)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub enum ValueKind {
    Number(f64),
    /// Whether the literal had no fraction or exponent (`12` but not `12.0`).
    Integer(i64),
    Str(String),
    Bool(bool),
    Ident(String),
    List(Vec<Value>),
    Object(Ident, Vec<Field>),
}

#[derive(Clone, Debug)]
pub struct Value {
    pub kind: ValueKind,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub struct Field {
    pub key: Ident,
    pub value: Value,
}

#[derive(Clone, Debug)]
pub struct Component {
    pub name: Ident,
    pub kind: Ident,
    pub fields: Vec<Field>,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub enum Expr {
    Number(f64, Span),
    Var(Ident),
    Call(Ident, Vec<Expr>, Span),
    /// Operands of one precedence level applied left to right: `a + b - c` is
    /// `Chain(a, [(+, b), (-, c)])`. A chain is flat, so a tree's depth is its nesting of
    /// parentheses and calls (bounded by the parser), never the length of a sum.
    Chain(Box<Expr>, Vec<(BinOp, Expr)>, Span),
}

impl Expr {
    pub fn span(&self) -> Span {
        match self {
            Expr::Number(_, s) | Expr::Call(_, _, s) | Expr::Chain(_, _, s) => s.clone(),
            Expr::Var(i) => i.span.clone(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
}

#[derive(Clone, Debug)]
pub struct Stmt {
    pub target: Ident,
    pub expr: Expr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SectionKind {
    Embed,
    Block,
    Head,
}

impl SectionKind {
    pub fn name(self) -> &'static str {
        match self {
            SectionKind::Embed => "embed",
            SectionKind::Block => "block",
            SectionKind::Head => "head",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Section {
    pub kind: SectionKind,
    pub keyword: Span,
    /// A block variant's name (`block local { … }`), which `pattern` refers to.
    pub name: Option<Ident>,
    pub components: Vec<Component>,
    pub stmts: Vec<Stmt>,
}

#[derive(Clone, Debug, Default)]
pub struct File {
    pub model: Option<Ident>,
    pub settings: Vec<Field>,
    /// Components declared outside any section.
    pub components: Vec<Component>,
    pub sections: Vec<Section>,
    /// Each `dtypes { … }` section: its keyword, and its fields (a storage type = a list
    /// of matrix names).
    pub dtypes: Vec<(Span, Vec<Field>)>,
}
