//! Shared helpers: paths, compiling specs, reading fixtures, comparing tensors.

use std::path::{Path, PathBuf};

use tfc::interp::Tensor;
use tfc::{Compiled, Options};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

pub fn compile(path: &Path, opts: &Options) -> Compiled {
    tfc::compile_file(path, opts).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `.tfs` file under `dir`, sorted.
pub fn specs_in(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "tfs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

pub fn read_tensor(file: &Path, name: &str) -> Tensor {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap_or_else(|_| panic!("{} has no {name}", file.display()));
    let data = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    Tensor::new(t.shape().to_vec(), data)
}

/// The largest absolute difference; panics if the shapes differ.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "compared tensors differ in size");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let d = max_diff(got, want);
    assert!(d <= tol, "{what}: max |difference| {d:e} exceeds {tol:e}");
}
