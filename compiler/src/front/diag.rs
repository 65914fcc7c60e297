//! User-facing diagnostics: stable codes, labelled spans, rendered with codespan-reporting.

use codespan_reporting::diagnostic::{Diagnostic as CsDiagnostic, Label, Severity};
use codespan_reporting::files::SimpleFile;
use codespan_reporting::term::{self, termcolor::Buffer};

use super::ast::Span;

/// Every error the front end reports, with its stable code. Codes are never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// The text does not follow the grammar.
    Syntax,
    /// A top-level setting, component kind, component field or section is not known.
    Unknown,
    /// A required setting or field is missing.
    Missing,
    /// A value has the wrong type or is out of range.
    BadValue,
    /// Sizes that do not fit together (heads, kv heads, head_dim, rotary dims).
    Sizes,
    /// A name is declared twice.
    Duplicate,
    /// An expression names something that does not exist or cannot be used there.
    Name,
    /// A section's data flow is incomplete or ill-formed.
    Flow,
    /// The spec exceeds a limit of the compiler (how deeply brackets nest, how many bytes
    /// a model may take).
    Limit,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Syntax => "E0001",
            Code::Unknown => "E0002",
            Code::Missing => "E0003",
            Code::BadValue => "E0004",
            Code::Sizes => "E0005",
            Code::Duplicate => "E0006",
            Code::Name => "E0007",
            Code::Flow => "E0008",
            Code::Limit => "E0009",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Diagnostic {
    pub code: Code,
    pub message: String,
    /// The first label is the primary one.
    pub labels: Vec<(Span, String)>,
    pub notes: Vec<String>,
}

impl Diagnostic {
    pub fn error(code: Code, message: impl Into<String>) -> Self {
        Diagnostic { code, message: message.into(), labels: vec![], notes: vec![] }
    }

    pub fn label(mut self, span: Span, text: impl Into<String>) -> Self {
        self.labels.push((span, text.into()));
        self
    }

    pub fn note(mut self, text: impl Into<String>) -> Self {
        self.notes.push(text.into());
        self
    }
}

/// All the errors found in one spec.
#[derive(Clone, Debug)]
pub struct Diagnostics {
    pub file: String,
    pub source: String,
    pub list: Vec<Diagnostic>,
}

impl Diagnostics {
    /// Renders every diagnostic as `error[E0005]: …` with `file:line:col` and the
    /// offending text underlined; `color` for a terminal.
    pub fn render(&self, color: bool) -> String {
        let file = SimpleFile::new(&self.file, &self.source);
        let mut buf = if color { Buffer::ansi() } else { Buffer::no_color() };
        let config = term::Config::default();
        for d in &self.list {
            let labels = d
                .labels
                .iter()
                .enumerate()
                .map(|(i, (s, t))| {
                    let s = clamp(s.clone(), self.source.len());
                    if i == 0 { Label::primary((), s) } else { Label::secondary((), s) }.with_message(t)
                })
                .collect();
            let cs = CsDiagnostic::new(Severity::Error)
                .with_code(d.code.as_str())
                .with_message(&d.message)
                .with_labels(labels)
                .with_notes(d.notes.clone());
            term::emit(&mut buf, &config, &file, &cs).expect("rendering to memory");
        }
        let n = self.list.len();
        let mut s = String::from_utf8_lossy(buf.as_slice()).into_owned();
        s.push_str(&format!("error: {} has {n} error{}\n", self.file, if n == 1 { "" } else { "s" }));
        s
    }
}

fn clamp(s: Span, len: usize) -> Span {
    s.start.min(len)..s.end.min(len)
}

impl std::fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render(false))
    }
}

impl std::error::Error for Diagnostics {}
