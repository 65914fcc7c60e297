//! Hugging Face safetensors checkpoints, memory-mapped.
//!
//! A checkpoint is a `.safetensors` file, or a folder holding `model.safetensors` or the
//! shards listed in `model.safetensors.index.json`. Tensors are read in place from the
//! mapping; [`Checkpoint::get`] checks the shape a caller expects and converts to `f32`.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read {path}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid safetensors file: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{path} holds no `model.safetensors` and no `model.safetensors.index.json`")]
    NoModel { path: PathBuf },
    #[error("the checkpoint has no tensor `{name}`{hint}")]
    Missing { name: String, hint: String },
    #[error("tensor `{name}` has shape {found:?}, the model expects {expected:?}")]
    Shape { name: String, found: Vec<usize>, expected: Vec<usize> },
    #[error("tensor `{name}` has dtype {dtype}, only F32, F16 and BF16 are supported")]
    DType { name: String, dtype: String },
}

pub struct Checkpoint {
    files: Vec<(PathBuf, Mmap)>,
    /// Tensor name -> index into `files`.
    index: HashMap<String, usize>,
}

impl Checkpoint {
    pub fn open(path: impl AsRef<Path>) -> Result<Checkpoint, CheckpointError> {
        let path = path.as_ref();
        let files: Vec<PathBuf> = if path.is_dir() {
            let single = path.join("model.safetensors");
            let index = path.join("model.safetensors.index.json");
            if single.is_file() {
                vec![single]
            } else if index.is_file() {
                shards(&index)?.into_iter().map(|s| path.join(s)).collect()
            } else {
                return Err(CheckpointError::NoModel { path: path.to_path_buf() });
            }
        } else {
            vec![path.to_path_buf()]
        };
        let mut ck = Checkpoint { files: Vec::new(), index: HashMap::new() };
        for f in files {
            let io = |source| CheckpointError::Io { path: f.clone(), source };
            let file = File::open(&f).map_err(io)?;
            // SAFETY: the mapping is read-only; the file is not expected to change while
            // the checkpoint is open (as with any mmap'd model file).
            let map = unsafe { Mmap::map(&file) }.map_err(io)?;
            let st = SafeTensors::deserialize(&map)
                .map_err(|e| CheckpointError::Format { path: f.clone(), message: e.to_string() })?;
            for name in st.names() {
                ck.index.insert(name.to_string(), ck.files.len());
            }
            drop(st);
            ck.files.push((f, map));
        }
        Ok(ck)
    }

    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.index.keys().map(String::as_str).collect();
        v.sort();
        v
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The stored bytes of tensor `name` (in the mapping, not copied) and its dtype,
    /// checked against the expected shape.
    pub fn raw(&self, name: &str, expected: &[usize]) -> Result<(Dtype, &[u8]), CheckpointError> {
        let Some(&i) = self.index.get(name) else {
            return Err(CheckpointError::Missing { name: name.to_string(), hint: self.hint(name) });
        };
        let (path, map) = &self.files[i];
        let bad = |e: safetensors::SafeTensorError| CheckpointError::Format {
            path: path.clone(),
            message: e.to_string(),
        };
        let st = SafeTensors::deserialize(map).map_err(bad)?;
        let t = st.tensor(name).map_err(bad)?;
        if t.shape() != expected {
            let (found, expected) = (t.shape().to_vec(), expected.to_vec());
            return Err(CheckpointError::Shape { name: name.into(), found, expected });
        }
        // The view borrows `map`, which lives as long as `self`.
        let start = t.data().as_ptr() as usize - map.as_ptr() as usize;
        Ok((t.dtype(), &map[start..start + t.data().len()]))
    }

    /// The tensor `name` as `f32`, checked against the expected shape.
    pub fn get(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, CheckpointError> {
        let (dtype, bytes) = self.raw(name, expected)?;
        Ok(match dtype {
            Dtype::F32 => {
                bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
            }
            Dtype::F16 => {
                bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
            }
            Dtype::BF16 => {
                bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
            }
            d => return Err(CheckpointError::DType { name: name.into(), dtype: format!("{d:?}") }),
        })
    }

    /// The most similar tensor names, to say what was probably meant.
    fn hint(&self, name: &str) -> String {
        // Only names of the same kind of tensor (`.weight`, `.bias`, …) are candidates.
        let kind = |n: &str| n.rsplit('.').next().map(str::to_string);
        let mut best: Vec<(&str, usize)> = self
            .index
            .keys()
            .filter(|k| kind(k) == kind(name))
            .map(|k| (k.as_str(), common_affix(k, name)))
            .collect();
        best.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        match best.first() {
            Some((k, score)) if *score > name.len() / 2 => format!(" (did you mean `{k}`?)"),
            _ => String::new(),
        }
    }
}

fn common_affix(a: &str, b: &str) -> usize {
    let pre = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    let suf = a.bytes().rev().zip(b.bytes().rev()).take_while(|(x, y)| x == y).count();
    pre + suf
}

fn shards(index: &Path) -> Result<Vec<String>, CheckpointError> {
    let text = std::fs::read_to_string(index)
        .map_err(|source| CheckpointError::Io { path: index.into(), source })?;
    let bad = |message: String| CheckpointError::Format { path: index.into(), message };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(str::to_string)).collect();
    files.sort();
    files.dedup();
    Ok(files)
}
