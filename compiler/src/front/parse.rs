//! Source text to syntax tree, with pest.

use pest::iterators::Pair;
use pest::Parser;

use super::ast::*;
use super::diag::{Code, Diagnostic};

#[derive(pest_derive::Parser)]
#[grammar = "front/grammar.pest"]
struct SpecParser;

/// How deeply brackets (`(`, `[`, `{`) may nest. The parser and every walk of the tree
/// recurse once per level, so the bound keeps them within any thread's stack; real specs
/// nest a few levels.
pub const MAX_NESTING: usize = 64;

pub fn parse(src: &str) -> Result<File, Diagnostic> {
    check_nesting(src)?;
    let mut pairs = SpecParser::parse(Rule::file, src).map_err(syntax_error)?;
    let file = pairs.next().unwrap();
    let mut out = File::default();
    for item in file.into_inner() {
        match item.as_rule() {
            Rule::model_decl => {
                let ident = item.into_inner().nth(1).unwrap();
                out.model = Some(ident_of(ident));
            }
            Rule::setting => out.settings.push(field(item)),
            Rule::component => out.components.push(component(item)),
            Rule::section => out.sections.push(section(item)),
            Rule::dtypes => {
                let mut it = item.into_inner();
                let kw = span(&it.next().unwrap());
                out.dtypes.push((kw, it.next().map(fields).unwrap_or_default()));
            }
            Rule::EOI => {}
            r => unreachable!("grammar produced {r:?} at file level"),
        }
    }
    Ok(out)
}

fn span(p: &Pair<Rule>) -> Span {
    p.as_span().start()..p.as_span().end()
}

fn ident_of(p: Pair<Rule>) -> Ident {
    Ident { name: p.as_str().to_string(), span: span(&p) }
}

fn field(p: Pair<Rule>) -> Field {
    let mut it = p.into_inner();
    let key = ident_of(it.next().unwrap());
    let value = value(it.next().unwrap());
    Field { key, value }
}

fn fields(p: Pair<Rule>) -> Vec<Field> {
    p.into_inner().map(field).collect()
}

fn component(p: Pair<Rule>) -> Component {
    let sp = span(&p);
    let mut it = p.into_inner();
    let name = ident_of(it.next().unwrap());
    let kind = ident_of(it.next().unwrap());
    let fields = it.next().map(fields).unwrap_or_default();
    Component { name, kind, fields, span: sp }
}

fn section(p: Pair<Rule>) -> Section {
    let mut it = p.into_inner();
    let kw = it.next().unwrap();
    let kind = match kw.as_str() {
        "embed" => SectionKind::Embed,
        "block" => SectionKind::Block,
        _ => SectionKind::Head,
    };
    let mut s = Section { kind, keyword: span(&kw), name: None, components: vec![], stmts: vec![] };
    for item in it {
        match item.as_rule() {
            Rule::ident => s.name = Some(ident_of(item)),
            Rule::component => s.components.push(component(item)),
            Rule::stmt => {
                let mut parts = item.into_inner();
                let target = ident_of(parts.next().unwrap());
                let expr = expr(parts.next().unwrap());
                s.stmts.push(Stmt { target, expr });
            }
            r => unreachable!("grammar produced {r:?} in a section"),
        }
    }
    s
}

fn value(p: Pair<Rule>) -> Value {
    let inner = p.into_inner().next().unwrap();
    let sp = span(&inner);
    let kind = match inner.as_rule() {
        Rule::number => number(inner.as_str()),
        Rule::string => ValueKind::Str(inner.into_inner().next().unwrap().as_str().to_string()),
        Rule::boolean => ValueKind::Bool(inner.as_str() == "true"),
        Rule::ident => ValueKind::Ident(inner.as_str().to_string()),
        Rule::list => ValueKind::List(inner.into_inner().map(value).collect()),
        Rule::object => {
            let mut it = inner.into_inner();
            let name = ident_of(it.next().unwrap());
            ValueKind::Object(name, fields(it.next().unwrap()))
        }
        r => unreachable!("grammar produced {r:?} as a value"),
    };
    Value { kind, span: sp }
}

fn number(s: &str) -> ValueKind {
    if let Ok(i) = s.parse::<i64>() {
        ValueKind::Integer(i)
    } else {
        // The grammar only admits valid float literals.
        ValueKind::Number(s.parse().unwrap_or(f64::NAN))
    }
}

fn expr(p: Pair<Rule>) -> Expr {
    match p.as_rule() {
        Rule::expr | Rule::term => {
            let sp = span(&p);
            let mut it = p.into_inner().filter(|q| q.as_rule() != Rule::close);
            let first = expr(it.next().unwrap());
            let mut rest = Vec::new();
            while let Some(op) = it.next() {
                let op = match op.as_str() {
                    "+" => BinOp::Add,
                    "-" => BinOp::Sub,
                    "*" => BinOp::Mul,
                    _ => BinOp::Div,
                };
                rest.push((op, expr(it.next().unwrap())));
            }
            if rest.is_empty() {
                first
            } else {
                Expr::Chain(Box::new(first), rest, sp)
            }
        }
        Rule::call => {
            let sp = span(&p);
            let mut it = p.into_inner();
            let f = ident_of(it.next().unwrap());
            let args = it.filter(|q| !matches!(q.as_rule(), Rule::close | Rule::comma)).map(expr).collect();
            Expr::Call(f, args, sp)
        }
        Rule::number => {
            let sp = span(&p);
            let v = p.as_str().parse::<f64>().unwrap_or(f64::NAN);
            Expr::Number(v, sp)
        }
        Rule::ident => Expr::Var(ident_of(p)),
        r => unreachable!("grammar produced {r:?} in an expression"),
    }
}

/// Refuses brackets nested deeper than [`MAX_NESTING`], before pest recurses into them.
/// Brackets inside comments and strings do not count.
fn check_nesting(src: &str) -> Result<(), Diagnostic> {
    let (mut depth, mut in_comment, mut in_string) = (0usize, false, false);
    for (i, c) in src.char_indices() {
        match c {
            '\n' => (in_comment, in_string) = (false, false),
            _ if in_comment => {}
            '"' => in_string = !in_string,
            _ if in_string => {}
            '#' => in_comment = true,
            '(' | '[' | '{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err(Diagnostic::error(
                        Code::Limit,
                        format!("brackets nest more than {MAX_NESTING} deep"),
                    )
                    .label(i..i + 1, format!("level {depth} opens here"))
                    .note("name intermediate values with `name = ...` statements instead"));
                }
            }
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

fn syntax_error(e: pest::error::Error<Rule>) -> Diagnostic {
    use pest::error::{ErrorVariant, InputLocation};
    let span = match e.location {
        InputLocation::Pos(p) => p..p,
        InputLocation::Span((a, b)) => a..b,
    };
    let expected = match &e.variant {
        ErrorVariant::ParsingError { positives, .. } => {
            let mut names: Vec<String> = positives.iter().map(|r| rule_name(*r).to_string()).collect();
            names.sort();
            names.dedup();
            match names.len() {
                0 => "something else".to_string(),
                1 => names[0].clone(),
                _ => {
                    let last = names.pop().unwrap();
                    format!("{} or {last}", names.join(", "))
                }
            }
        }
        ErrorVariant::CustomError { message } => message.clone(),
    };
    Diagnostic::error(Code::Syntax, format!("syntax error: expected {expected}"))
        .label(span, format!("expected {expected} here"))
}

fn rule_name(r: Rule) -> &'static str {
    match r {
        Rule::EOI => "end of file",
        Rule::model_decl | Rule::kw_model => "`model NAME`",
        Rule::setting | Rule::field | Rule::stmt => "`name = ...`",
        Rule::component => "`name: kind { ... }`",
        Rule::fields => "`{`",
        Rule::section | Rule::section_kw => "a section (`embed`, `block`, `head`)",
        Rule::dtypes | Rule::kw_dtypes => "`dtypes { ... }`",
        Rule::value | Rule::object | Rule::list => "a value",
        Rule::expr | Rule::term | Rule::call => "an expression",
        Rule::add_op | Rule::mul_op => "an operator",
        Rule::close => "`)`",
        Rule::comma => "`,`",
        Rule::boolean => "`true` or `false`",
        Rule::ident => "a name",
        Rule::number => "a number",
        Rule::string | Rule::string_inner => "a string",
        _ => "more input",
    }
}
