//! The library's modules form no cycle: reading the sources, every path a module names
//! (`crate::a::b`, `super::c`, `self::d`, a child's name, in `use` items and in code) is an
//! edge to the deepest module it reaches, and the graph of those edges must be acyclic.
//! A module naming an item of one of its ancestors (a pass naming `super::Pass`, the trait
//! its parent declares beside the pass list) is ownership, not an edge: the cycles this
//! rules out are between siblings and across subtrees (`llvm::amx` ↔ `llvm::kernels`).
//!
//! It reads text and does not link the compiler, so it stays small and fast.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module's path from the crate root, `[]` for the root.
type ModPath = Vec<String>;

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module a source file defines: `lib.rs` the root, `a/mod.rs` and `a.rs` `a`.
fn module_of(src: &Path, file: &Path) -> ModPath {
    let rel = file.strip_prefix(src).unwrap();
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_string());
    }
    parts
}

/// The text without comments, string literals, and the inline test modules (`super`
/// means another module there).
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap();
    let mut out = String::new();
    for line in text.lines() {
        let line = line.split("//").next().unwrap();
        let mut in_str = false;
        let mut prev = ' ';
        for ch in line.chars() {
            if ch == '"' && prev != '\\' {
                in_str = !in_str;
            } else if !in_str {
                out.push(ch);
            }
            prev = ch;
        }
        out.push('\n');
    }
    out
}

/// Every path that starts with `crate::`, `super::`, `self::` or the name of one of
/// `children` (a child module named relative to its parent), as its segments, with one
/// level of `{a, b::c}` groups expanded.
fn paths(code: &str, children: &[String]) -> Vec<Vec<String>> {
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    let mut out = Vec::new();
    let bytes: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let starts = |w: &str| bytes[i..].iter().take(w.len()).copied().eq(w.chars());
        let boundary = i == 0 || !is_ident(bytes[i - 1]) && bytes[i - 1] != ':';
        let child = children.iter().any(|c| starts(&format!("{c}::")));
        if boundary && (starts("crate::") || starts("super::") || starts("self::") || child) {
            let mut segs = Vec::new();
            let mut j = i;
            loop {
                let s = j;
                while j < bytes.len() && is_ident(bytes[j]) {
                    j += 1;
                }
                if s == j {
                    break;
                }
                segs.push(bytes[s..j].iter().collect::<String>());
                if bytes[j..].starts_with(&[':', ':']) {
                    j += 2;
                } else {
                    break;
                }
            }
            if bytes.get(j) == Some(&'{') {
                let end = bytes[j..].iter().position(|&c| c == '}').map_or(bytes.len(), |e| j + e);
                let inner: String = bytes[j + 1..end].iter().collect();
                for item in inner.split(',') {
                    let first: Vec<String> = item
                        .trim()
                        .split("::")
                        .map(|s| s.chars().take_while(|&c| is_ident(c)).collect::<String>())
                        .filter(|s| !s.is_empty())
                        .collect();
                    let mut p = segs.clone();
                    p.extend(first);
                    out.push(p);
                }
            } else {
                out.push(segs);
            }
            i = j.max(i + 1);
        } else {
            i += 1;
        }
    }
    out
}

/// The deepest known module a path from `from` reaches.
fn target(from: &ModPath, path: &[String], modules: &BTreeSet<ModPath>) -> Option<ModPath> {
    let mut at: ModPath = Vec::new();
    let mut rest = path;
    if rest.first().map(String::as_str) == Some("crate") {
        rest = &rest[1..];
    } else if rest.first().map(String::as_str) == Some("self") {
        at = from.clone();
        rest = &rest[1..];
    } else if rest.first().map(String::as_str) != Some("super") {
        at = from.clone();
    } else {
        at = from.clone();
        while rest.first().map(String::as_str) == Some("super") {
            at.pop()?;
            rest = &rest[1..];
        }
    }
    for seg in rest {
        let mut next = at.clone();
        next.push(seg.clone());
        if !modules.contains(&next) {
            break;
        }
        at = next;
    }
    Some(at)
}

#[test]
fn the_library_has_no_module_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    // `main.rs` and the modules it declares make up the `tfc` command, another crate.
    files.retain(|f| !matches!(f.file_name().unwrap().to_str(), Some("main.rs" | "run.rs")));
    let modules: BTreeSet<ModPath> = files.iter().map(|f| module_of(&src, f)).collect();
    let mut edges: BTreeMap<ModPath, BTreeSet<ModPath>> = BTreeMap::new();
    for f in &files {
        let from = module_of(&src, f);
        let children: Vec<String> = modules
            .iter()
            .filter(|m| m.len() == from.len() + 1 && m.starts_with(&from))
            .map(|m| m.last().unwrap().clone())
            .collect();
        let text = code(&std::fs::read_to_string(f).unwrap());
        for p in paths(&text, &children) {
            if let Some(to) = target(&from, &p, &modules) {
                // A module naming its own items, or its ancestors', is no edge.
                if !from.starts_with(&to) {
                    edges.entry(from.clone()).or_default().insert(to);
                }
            }
        }
    }
    // Depth-first search for a back edge; report the cycle it closes.
    fn visit(
        m: &ModPath,
        edges: &BTreeMap<ModPath, BTreeSet<ModPath>>,
        state: &mut BTreeMap<ModPath, u8>,
        stack: &mut Vec<ModPath>,
        cycles: &mut Vec<String>,
    ) {
        state.insert(m.clone(), 1);
        stack.push(m.clone());
        for n in edges.get(m).into_iter().flatten() {
            match state.get(n).copied().unwrap_or(0) {
                0 => visit(n, edges, state, stack, cycles),
                1 => {
                    let at = stack.iter().position(|s| s == n).unwrap();
                    let names: Vec<String> = stack[at..]
                        .iter()
                        .chain([n])
                        .map(|p| if p.is_empty() { "crate".into() } else { p.join("::") })
                        .collect();
                    cycles.push(names.join(" -> "));
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(m.clone(), 2);
    }
    let mut state = BTreeMap::new();
    let mut cycles = Vec::new();
    for m in &modules {
        if !state.contains_key(m) {
            visit(m, &edges, &mut state, &mut Vec::new(), &mut cycles);
        }
    }
    assert!(cycles.is_empty(), "module cycles:\n{}", cycles.join("\n"));
    // The checker sees the edges it should: the backends use the IR, a parent its child.
    let m = |p: &str| -> ModPath { p.split("::").map(String::from).collect() };
    assert!(edges[&m("backend::llvm")].contains(&m("ir")));
    assert!(edges[&m("backend::llvm")].contains(&m("backend::llvm::kernels")));
}
