//! Hugging Face safetensors checkpoints, memory-mapped, and GGUF files (llama.cpp's
//! format, [`crate::gguf`]; its tensors under their GGUF names, quantised ones read
//! through [`Checkpoint::get`] as `f32`).
//!
//! A checkpoint is a `.safetensors` file, or a folder holding `model.safetensors` or the
//! shards listed in `model.safetensors.index.json`. Tensors are read in place from the
//! mapping; [`Checkpoint::get`] checks the shape a caller expects and converts to `f32`.
//! A sharded checkpoint follows its index's `weight_map`: each tensor must be in the shard
//! the index names and in no other.
//!
//! A name may end in a row range, `name[a:b]`: rows `a..b` of the tensor's first axis, a
//! contiguous part of it read in place (a fused projection such as `gate_up_proj` bound
//! as its two halves, [`row_range`]). A name `prefix{a..b}suffix` stacks the equally
//! shaped tensors `prefix{a}suffix`, …, `prefix{b-1}suffix` along a new first axis
//! (per-head norms stored one tensor per head, [`stacked`]); [`Checkpoint::get`] copies
//! them into one tensor, [`Checkpoint::raw`] refuses (they are not one stored region).

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
    #[error("{path} is not a valid safetensors index: {message}")]
    Index { path: PathBuf, message: String },
    #[error("{path} holds no `model.safetensors` and no `model.safetensors.index.json`")]
    NoModel { path: PathBuf },
    #[error("{path} is {what}, where a safetensors file was expected")]
    NotAFile { path: PathBuf, what: &'static str },
    #[error("tensor `{name}` is in both {first} and {second}")]
    Duplicate { name: String, first: PathBuf, second: PathBuf },
    #[error("the checkpoint has no tensor `{name}`{hint}")]
    Missing { name: String, hint: String },
    #[error("tensor `{name}` has shape {found:?}, the model expects {expected:?}")]
    Shape { name: String, found: Vec<usize>, expected: Vec<usize> },
    #[error("tensor `{name}` has dtype {dtype}, only F32, F16 and BF16 are supported")]
    DType { name: String, dtype: String },
    #[error("`{name}` asks for rows {start}..{end} of a tensor of shape {shape:?}")]
    Rows { name: String, start: usize, end: usize, shape: Vec<usize> },
    #[error("`{name}` stacks several tensors, which are not one stored region")]
    Stacked { name: String },
    #[error("tensor `{name}` is stored {ty}, which is read as f32 values only")]
    Quantized { name: String, ty: &'static str },
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
}

/// The names a `prefix{a..b}suffix` name stacks, in order; `None` for any other name.
pub fn stacked(name: &str) -> Option<Vec<String>> {
    let (prefix, rest) = name.split_once('{')?;
    let (range, suffix) = rest.split_once('}')?;
    let (a, b) = range.split_once("..")?;
    let (a, b): (usize, usize) = (a.parse().ok()?, b.parse().ok()?);
    (a < b).then(|| (a..b).map(|i| format!("{prefix}{i}{suffix}")).collect())
}

/// The tensor and row range a name with a `[a:b]` suffix means; `None` for a plain name
/// or a suffix that is not two numbers.
pub fn row_range(name: &str) -> Option<(&str, std::ops::Range<usize>)> {
    let (base, rest) = name.strip_suffix(']')?.rsplit_once('[')?;
    let (a, b) = rest.split_once(':')?;
    Some((base, a.parse().ok()?..b.parse().ok()?))
}

pub struct Checkpoint {
    files: Vec<(PathBuf, Mmap)>,
    /// Tensor name -> index into `files`.
    index: HashMap<String, usize>,
    /// A GGUF file instead of safetensors files.
    gguf: Option<crate::gguf::Gguf>,
}

/// Whether `path` is a file that starts as a GGUF file does.
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    path.is_file() && File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == b"GGUF"
}

/// What a path that should be a regular file is instead, if it is not one. A FIFO or a
/// device would block or stream forever when opened and read.
fn not_a_file(path: &Path) -> Option<&'static str> {
    match (std::fs::symlink_metadata(path), std::fs::metadata(path)) {
        (Err(_), _) => None, // does not exist: opening it says so
        (Ok(_), Err(_)) => Some("a broken symbolic link"),
        (Ok(_), Ok(m)) if m.is_dir() => Some("a folder"),
        (Ok(_), Ok(m)) if !m.is_file() => Some("a FIFO, socket or device"),
        _ => None,
    }
}

fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

impl Checkpoint {
    pub fn open(path: impl AsRef<Path>) -> Result<Checkpoint, CheckpointError> {
        let path = path.as_ref();
        if is_gguf(path) {
            let g = crate::gguf::Gguf::open(path)?;
            return Ok(Checkpoint { files: Vec::new(), index: HashMap::new(), gguf: Some(g) });
        }
        // Each file, and the tensors the index places in it (`None`: a single file).
        let files: Vec<(PathBuf, Option<Vec<String>>)> = if path.is_dir() {
            let single = path.join("model.safetensors");
            let index = path.join("model.safetensors.index.json");
            if exists(&single) {
                vec![(single, None)]
            } else if exists(&index) {
                if let Some(what) = not_a_file(&index) {
                    return Err(CheckpointError::NotAFile { path: index, what });
                }
                shards(&index)?.into_iter().map(|(f, names)| (path.join(f), Some(names))).collect()
            } else {
                return Err(CheckpointError::NoModel { path: path.to_path_buf() });
            }
        } else {
            vec![(path.to_path_buf(), None)]
        };
        let mut ck = Checkpoint { files: Vec::new(), index: HashMap::new(), gguf: None };
        for (f, listed) in files {
            if let Some(what) = not_a_file(&f) {
                return Err(CheckpointError::NotAFile { path: f, what });
            }
            let io = |source| CheckpointError::Io { path: f.clone(), source };
            let file = File::open(&f).map_err(io)?;
            // SAFETY: the mapping is read-only; the file is not expected to change while
            // the checkpoint is open (as with any mmap'd model file).
            let map = unsafe { Mmap::map(&file) }.map_err(io)?;
            let st = SafeTensors::deserialize(&map).map_err(|e| CheckpointError::Format {
                path: f.clone(),
                message: explain(&map).unwrap_or_else(|| e.to_string()),
            })?;
            for name in st.names() {
                if let Some(&other) = ck.index.get(name) {
                    return Err(CheckpointError::Duplicate {
                        name: name.to_string(),
                        first: ck.files[other].0.clone(),
                        second: f.clone(),
                    });
                }
                ck.index.insert(name.to_string(), ck.files.len());
            }
            let index_path = || f.parent().unwrap_or(Path::new("")).join("model.safetensors.index.json");
            for name in listed.iter().flatten() {
                if st.tensor(name).is_err() {
                    return Err(CheckpointError::Index {
                        path: index_path(),
                        message: format!(
                            "its weight_map places `{name}` in {}, which does not hold it",
                            f.display()
                        ),
                    });
                }
            }
            drop(st);
            ck.files.push((f, map));
        }
        Ok(ck)
    }

    /// The GGUF file this checkpoint reads, if it is one (its metadata describes the model).
    pub fn gguf(&self) -> Option<&crate::gguf::Gguf> {
        self.gguf.as_ref()
    }

    pub fn names(&self) -> Vec<&str> {
        if let Some(g) = &self.gguf {
            return g.tensors.keys().map(String::as_str).collect();
        }
        let mut v: Vec<&str> = self.index.keys().map(String::as_str).collect();
        v.sort();
        v
    }

    pub fn contains(&self, name: &str) -> bool {
        if let Some(parts) = stacked(name) {
            return parts.iter().all(|p| self.contains(p));
        }
        let base = row_range(name).map_or(name, |(base, _)| base);
        match &self.gguf {
            Some(g) => g.tensors.contains_key(base),
            None => self.index.contains_key(base),
        }
    }

    /// Tensor `name` as stored: its dtype, shape and bytes (in the mapping, not copied);
    /// for `name[a:b]`, those rows of it.
    fn view(&self, name: &str) -> Result<(Dtype, Vec<usize>, &[u8]), CheckpointError> {
        if stacked(name).is_some() {
            return Err(CheckpointError::Stacked { name: name.into() });
        }
        let Some((base, rows)) = row_range(name) else { return self.whole(name) };
        let (dtype, mut shape, bytes) = self.whole(base)?;
        let bad = || CheckpointError::Rows {
            name: name.into(),
            start: rows.start,
            end: rows.end,
            shape: shape.clone(),
        };
        if shape.is_empty() || rows.start >= rows.end || rows.end > shape[0] {
            return Err(bad());
        }
        let row = bytes.len() / shape[0];
        shape[0] = rows.len();
        Ok((dtype, shape, &bytes[rows.start * row..rows.end * row]))
    }

    /// Tensor `name` as stored, whole.
    fn whole(&self, name: &str) -> Result<(Dtype, Vec<usize>, &[u8]), CheckpointError> {
        if let Some(g) = &self.gguf {
            use crate::gguf::GgmlType;
            let Some((t, bytes)) = g.bytes(name) else {
                return Err(CheckpointError::Missing { name: name.to_string(), hint: self.hint(name) });
            };
            let dtype = match t.ty {
                GgmlType::F32 => Dtype::F32,
                GgmlType::F16 => Dtype::F16,
                GgmlType::BF16 => Dtype::BF16,
                q => return Err(CheckpointError::Quantized { name: name.into(), ty: q.name() }),
            };
            return Ok((dtype, t.shape.clone(), bytes));
        }
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
        // The view borrows `map`, which lives as long as `self`.
        let start = t.data().as_ptr() as usize - map.as_ptr() as usize;
        Ok((t.dtype(), t.shape().to_vec(), &map[start..start + t.data().len()]))
    }

    /// The stored bytes of tensor `name` (in the mapping, not copied) and its dtype,
    /// checked against the expected shape.
    pub fn raw(&self, name: &str, expected: &[usize]) -> Result<(Dtype, &[u8]), CheckpointError> {
        let (dtype, found, bytes) = self.view(name)?;
        if found != expected {
            return Err(CheckpointError::Shape { name: name.into(), found, expected: expected.to_vec() });
        }
        Ok((dtype, bytes))
    }

    /// The tensor `name` in the block format `q`, checked against the expected shape: as
    /// the file stores it where it is a GGUF tensor of that format (for `name[a:b]`, those
    /// rows, which are whole blocks), else quantised from its values.
    pub fn quantized(
        &self,
        name: &str,
        expected: &[usize],
        q: crate::quant::Quant,
    ) -> Result<std::borrow::Cow<'_, [u8]>, CheckpointError> {
        if let (Some(g), None) = (&self.gguf, stacked(name)) {
            let (base, rows) = row_range(name).map_or((name, None), |(b, r)| (b, Some(r)));
            if let Some((t, bytes)) = g.bytes(base) {
                let mut shape = t.shape.clone();
                let bytes = match rows {
                    Some(r) if r.start < r.end && r.end <= shape[0] => {
                        let row = bytes.len() / shape[0];
                        shape[0] = r.len();
                        &bytes[r.start * row..r.end * row]
                    }
                    _ => bytes,
                };
                if t.ty == q.ggml() && shape == expected {
                    return Ok(std::borrow::Cow::Borrowed(bytes));
                }
            }
        }
        Ok(std::borrow::Cow::Owned(q.quantize(&self.get(name, expected)?)))
    }

    /// The tensor `name` as `f32`, checked against the expected shape; a stacked name's
    /// parts each against `expected` without its first axis, which counts them.
    pub fn get(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, CheckpointError> {
        if let Some(parts) = stacked(name) {
            if expected.first() != Some(&parts.len()) {
                let found = [vec![parts.len()], expected.get(1..).unwrap_or_default().to_vec()].concat();
                return Err(CheckpointError::Shape { name: name.into(), found, expected: expected.to_vec() });
            }
            let mut all = Vec::with_capacity(expected.iter().product());
            for p in parts {
                all.extend(self.get(&p, &expected[1..])?);
            }
            return Ok(all);
        }
        if let Some(g) = &self.gguf {
            // Any GGUF type, dequantised; a row range is whole rows of whole blocks.
            let (base, rows) = row_range(name).map_or((name, None), |(b, r)| (b, Some(r)));
            let Some((t, mut bytes)) = g.bytes(base) else {
                return Err(CheckpointError::Missing { name: name.to_string(), hint: self.hint(name) });
            };
            let mut shape = t.shape.clone();
            if let Some(r) = rows {
                if r.start >= r.end || r.end > shape[0] {
                    return Err(CheckpointError::Rows {
                        name: name.into(),
                        start: r.start,
                        end: r.end,
                        shape,
                    });
                }
                let row = bytes.len() / shape[0];
                bytes = &bytes[r.start * row..r.end * row];
                shape[0] = r.len();
            }
            if shape != expected {
                return Err(CheckpointError::Shape {
                    name: name.into(),
                    found: shape,
                    expected: expected.to_vec(),
                });
            }
            return Ok(crate::gguf::dequantize(t.ty, bytes, shape.iter().product()));
        }
        let (dtype, bytes) = self.raw(name, expected)?;
        floats(dtype, bytes)
            .map(Iterator::collect)
            .ok_or_else(|| CheckpointError::DType { name: name.into(), dtype: format!("{dtype:?}") })
    }

    /// How many values of tensor `name` are NaN or infinite, with the first one's index
    /// and value; `None` when all are finite (integer tensors always are).
    pub fn non_finite(&self, name: &str) -> Result<Option<(usize, usize, f32)>, CheckpointError> {
        if let Some(parts) = stacked(name) {
            // Indices count through the parts in order.
            let (mut found, mut offset): (Option<(usize, usize, f32)>, usize) = (None, 0);
            for p in parts {
                let (_, shape, _) = self.view(&p)?;
                if let Some((n, k, x)) = self.non_finite(&p)? {
                    found = Some(match found {
                        None => (n, offset + k, x),
                        Some((m, k0, x0)) => (m + n, k0, x0),
                    });
                }
                offset += shape.iter().product::<usize>();
            }
            return Ok(found);
        }
        let (dtype, _, bytes) = self.view(name)?;
        let Some(values) = floats(dtype, bytes) else { return Ok(None) };
        let mut found: Option<(usize, usize, f32)> = None;
        for (k, x) in values.enumerate().filter(|(_, x)| !x.is_finite()) {
            match &mut found {
                None => found = Some((1, k, x)),
                Some((n, _, _)) => *n += 1,
            }
        }
        Ok(found)
    }

    /// The most similar tensor names, to say what was probably meant.
    fn hint(&self, name: &str) -> String {
        // Only names of the same kind of tensor (`.weight`, `.bias`, …) are candidates.
        let kind = |n: &str| n.rsplit('.').next().map(str::to_string);
        let mut best: Vec<(&str, usize)> = self
            .names()
            .into_iter()
            .filter(|k| kind(k) == kind(name))
            .map(|k| (k, common_affix(k, name)))
            .collect();
        best.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        match best.first() {
            Some((k, score)) if *score > name.len() / 2 => format!(" (did you mean `{k}`?)"),
            _ => String::new(),
        }
    }
}

/// The values of a float tensor's bytes as `f32`; `None` for other dtypes.
fn floats(dtype: Dtype, bytes: &[u8]) -> Option<Box<dyn Iterator<Item = f32> + '_>> {
    Some(match dtype {
        Dtype::F32 => Box::new(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        Dtype::F16 => {
            Box::new(bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()))
        }
        Dtype::BF16 => {
            Box::new(bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()))
        }
        _ => return None,
    })
}

fn common_affix(a: &str, b: &str) -> usize {
    let pre = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    let suf = a.bytes().rev().zip(b.bytes().rev()).take_while(|(x, y)| x == y).count();
    pre + suf
}

/// The shards an index names, each with the tensors its `weight_map` places there.
fn shards(index: &Path) -> Result<Vec<(String, Vec<String>)>, CheckpointError> {
    let text = std::fs::read_to_string(index)
        .map_err(|source| CheckpointError::Io { path: index.into(), source })?;
    let bad = |message: String| CheckpointError::Index { path: index.into(), message };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut files: Vec<(String, Vec<String>)> = Vec::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| bad(format!("`weight_map.{name}` is not a file name")))?;
        // A shard is a file beside the index, never a path elsewhere.
        if file.is_empty() || file.contains('/') || file.contains('\\') || file == ".." {
            return Err(bad(format!("`weight_map.{name}` = {file:?} is not a file name beside the index")));
        }
        match files.iter_mut().find(|(f, _)| f == file) {
            Some((_, names)) => names.push(name.clone()),
            None => files.push((file.to_string(), vec![name.clone()])),
        }
    }
    files.sort();
    Ok(files)
}

/// Why safetensors rejected a file, naming the tensor where it can: its own errors say
/// "invalid info" or "incomplete buffer" without one.
fn explain(bytes: &[u8]) -> Option<String> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let header = bytes.get(8..usize::try_from(n).ok()?.checked_add(8)?)?;
    let v: serde_json::Value = serde_json::from_slice(header).ok()?;
    let data = bytes.len() - 8 - header.len();
    let mut tensors: Vec<(&String, &serde_json::Value)> =
        v.as_object()?.iter().filter(|(k, _)| k.as_str() != "__metadata__").collect();
    let begin = |t: &serde_json::Value| t.pointer("/data_offsets/0").and_then(|x| x.as_u64());
    tensors.sort_by_key(|(_, t)| begin(t));
    for (name, t) in tensors {
        let (Some(dtype), Some(shape), Some(b), Some(e)) = (
            t.get("dtype").and_then(|d| d.as_str()),
            t.get("shape").and_then(|s| s.as_array()),
            begin(t),
            t.pointer("/data_offsets/1").and_then(|x| x.as_u64()),
        ) else {
            return Some(format!("tensor `{name}` lacks a dtype, a shape or two data offsets"));
        };
        // safetensors' own names and sizes; a dtype it does not know it reports itself.
        let Ok(known) = serde_json::from_value::<Dtype>(dtype.into()) else { continue };
        let bits = known.bitsize() as u64;
        let count = shape.iter().try_fold(1u64, |acc, d| acc.checked_mul(d.as_u64()?));
        let want = count.and_then(|c| c.checked_mul(bits)).map(|b| b / 8);
        if want != e.checked_sub(b) {
            let shape: Vec<u64> = shape.iter().filter_map(|d| d.as_u64()).collect();
            return Some(format!(
                "tensor `{name}` ({dtype} {shape:?}) needs {} bytes, but its data offsets {b}..{e} hold {}",
                want.map_or("more than 2^64".into(), |w| w.to_string()),
                e.saturating_sub(b)
            ));
        }
        if e > data as u64 {
            return Some(format!(
                "tensor `{name}` ends at byte {e} of the data, but the file holds {data} bytes of data (truncated?)"
            ));
        }
    }
    None
}
