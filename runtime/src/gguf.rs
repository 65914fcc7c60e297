//! GGUF files (llama.cpp's format), memory-mapped: the metadata, the tensor table, and
//! each tensor's values as `f32`.
//!
//! The reader checks every length and offset against the file before it reads, so a
//! truncated or inconsistent file is an error naming the key or tensor where it stops
//! making sense, never a panic. Tensors are stored in ggml's order, the fastest-varying
//! dimension first; [`TensorInfo::shape`] gives them outermost first, as safetensors and
//! PyTorch do (a linear map's `[out, in]`). Block-quantised types are dequantised exactly
//! as ggml's reference `dequantize_row_*` functions do (values in `f32`, scales from
//! `f16`).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read {path}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid GGUF file: {message}")]
    Format { path: PathBuf, message: String },
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Int(i64),
    /// Unsigned 64-bit values that do not fit an `i64`.
    Uint(u64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::Int(i) => u64::try_from(i).ok(),
            Value::Uint(u) => Some(u),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::Int(i) => Some(i as f64),
            Value::Uint(u) => Some(u as f64),
            Value::Float(f) => Some(f),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// The tensor types this reader decodes (ggml's numbering).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

impl GgmlType {
    fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            10 => GgmlType::Q2K,
            11 => GgmlType::Q3K,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q2K => "Q2_K",
            GgmlType::Q3K => "Q3_K",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
        }
    }

    /// Values per block and bytes per block.
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q2K => (256, 84),
            GgmlType::Q3K => (256, 110),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q5K => (256, 176),
            GgmlType::Q6K => (256, 210),
        }
    }
}

#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// Outermost dimension first.
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    /// Where the data starts in the file, and how many bytes it takes.
    start: usize,
    bytes: usize,
}

pub struct Gguf {
    path: PathBuf,
    map: Mmap,
    pub version: u32,
    pub meta: BTreeMap<String, Value>,
    pub tensors: BTreeMap<String, TensorInfo>,
}

/// Reads little-endian values from the file, each checked against its end.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
    /// What is being read, for the error message.
    what: String,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        match end {
            Some(e) => {
                let s = &self.b[self.at..e];
                self.at = e;
                Ok(s)
            }
            None => Err(format!(
                "the file ends at byte {} while reading {} ({n} more bytes needed at byte {})",
                self.b.len(),
                self.what,
                self.at
            )),
        }
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    /// A count that must be possible in the bytes left, at `min` bytes per item.
    fn count(&mut self, min: usize) -> Result<usize, String> {
        let n = self.u64()?;
        let left = (self.b.len() - self.at) as u64;
        if n.saturating_mul(min.max(1) as u64) > left {
            return Err(format!(
                "{} claims {n} items, more than the {left} bytes left could hold",
                self.what
            ));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String, String> {
        let n = self.count(1)?;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| format!("{} is not UTF-8", self.what))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value, String> {
        let b = |r: &mut Self, n: usize| r.take(n).map(|s| s.to_vec());
        Ok(match ty {
            0 => Value::Int(b(self, 1)?[0] as i64),
            1 => Value::Int(b(self, 1)?[0] as i8 as i64),
            2 => Value::Int(u16::from_le_bytes(b(self, 2)?.try_into().unwrap()) as i64),
            3 => Value::Int(i16::from_le_bytes(b(self, 2)?.try_into().unwrap()) as i64),
            4 => Value::Int(self.u32()? as i64),
            5 => Value::Int(self.u32()? as i32 as i64),
            // The decimal an f32 was written from (1e-5, not 9.99999974e-6).
            6 => {
                let x = f32::from_le_bytes(b(self, 4)?.try_into().unwrap());
                Value::Float(x.to_string().parse().unwrap_or(x as f64))
            }
            7 => match b(self, 1)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                v => return Err(format!("{} is a bool of value {v}", self.what)),
            },
            8 => Value::Str(self.string()?),
            9 => {
                if depth > 0 {
                    return Err(format!("{} nests arrays", self.what));
                }
                let ety = self.u32()?;
                let n = self.count(1)?;
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(ety, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => {
                let u = self.u64()?;
                i64::try_from(u).map_or(Value::Uint(u), Value::Int)
            }
            11 => Value::Int(self.u64()? as i64),
            12 => Value::Float(f64::from_le_bytes(b(self, 8)?.try_into().unwrap())),
            t => return Err(format!("{} has value type {t}, which GGUF does not define", self.what)),
        })
    }
}

impl Gguf {
    pub fn open(path: impl AsRef<Path>) -> Result<Gguf, GgufError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| GgufError::Io { path: path.clone(), source };
        let file = File::open(&path).map_err(io)?;
        // SAFETY: read-only; the file is not expected to change while it is open.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let fail = |message: String| GgufError::Format { path: path.clone(), message };
        let (version, meta, tensors) = parse(&map).map_err(fail)?;
        Ok(Gguf { path, map, version, meta, tensors })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored bytes of tensor `name`.
    pub fn bytes(&self, name: &str) -> Option<(&TensorInfo, &[u8])> {
        let t = self.tensors.get(name)?;
        Some((t, &self.map[t.start..t.start + t.bytes]))
    }

    /// Tensor `name` as `f32` values, outermost dimension first.
    pub fn get(&self, name: &str) -> Option<Vec<f32>> {
        let (t, bytes) = self.bytes(name)?;
        Some(dequantize(t.ty, bytes, t.shape.iter().product()))
    }
}

type Parsed = (u32, BTreeMap<String, Value>, BTreeMap<String, TensorInfo>);

fn parse(b: &[u8]) -> Result<Parsed, String> {
    let mut r = Reader { b, at: 0, what: "the header".into() };
    if r.take(4)? != b"GGUF" {
        return Err("it does not start with `GGUF`".into());
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(format!("version {version}; this reader reads versions 2 and 3"));
    }
    r.what = "the tensor count".into();
    let n_tensors = r.count(24)?;
    r.what = "the metadata count".into();
    let n_meta = r.count(12)?;
    let mut meta = BTreeMap::new();
    for i in 0..n_meta {
        r.what = format!("metadata key {i}");
        let key = r.string()?;
        r.what = format!("metadata `{key}`");
        let ty = r.u32()?;
        let v = r.value(ty, 0)?;
        if meta.insert(key.clone(), v).is_some() {
            return Err(format!("metadata `{key}` appears twice"));
        }
    }
    let mut infos = Vec::with_capacity(n_tensors);
    for i in 0..n_tensors {
        r.what = format!("tensor {i}'s name");
        let name = r.string()?;
        r.what = format!("tensor `{name}`");
        let dims = r.u32()? as usize;
        if dims == 0 || dims > 4 {
            return Err(format!("tensor `{name}` has {dims} dimensions (1 to 4 expected)"));
        }
        let mut ne = Vec::with_capacity(dims);
        for _ in 0..dims {
            ne.push(r.u64()?);
        }
        let id = r.u32()?;
        let ty = GgmlType::from_id(id).ok_or_else(|| {
            format!("tensor `{name}` has ggml type {id}, which this reader does not decode")
        })?;
        let offset = r.u64()?;
        infos.push((name, ne, ty, offset));
    }
    let align = match meta.get("general.alignment") {
        None => 32,
        Some(v) => v
            .as_u64()
            .filter(|a| a.is_power_of_two())
            .ok_or_else(|| format!("`general.alignment` is {v:?}, not a power of two"))?,
    } as usize;
    let data = r.at.div_ceil(align) * align;
    let mut tensors = BTreeMap::new();
    for (name, ne, ty, offset) in infos {
        let n = ne
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n > 0 && n < 1 << 48)
            .ok_or_else(|| format!("tensor `{name}` has dimensions {ne:?}"))?;
        let (per, size) = ty.block();
        if ne[0] % per as u64 != 0 {
            return Err(format!(
                "tensor `{name}` is {} with rows of {}, not whole blocks of {per}",
                ty.name(),
                ne[0]
            ));
        }
        let bytes = (n / per as u64) * size as u64;
        let start = (data as u64).checked_add(offset);
        let end = start.and_then(|s| s.checked_add(bytes));
        match (start, end) {
            (Some(s), Some(e)) if e <= b.len() as u64 && offset % align as u64 == 0 => {
                let shape = ne.iter().rev().map(|&d| d as usize).collect();
                let t = TensorInfo { shape, ty, start: s as usize, bytes: bytes as usize };
                if tensors.insert(name.clone(), t).is_some() {
                    return Err(format!("tensor `{name}` appears twice"));
                }
            }
            _ => {
                return Err(format!(
                    "tensor `{name}` ({} bytes at offset {offset}) lies outside the file of {} bytes or is not aligned to {align}",
                    bytes,
                    b.len()
                ))
            }
        }
    }
    Ok((version, meta, tensors))
}

fn f16(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// `n` values of type `ty` from `bytes` (whole blocks, as the tensor table checked).
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let (per, size) = ty.block();
    let mut out = vec![0.0f32; n];
    for (blk, y) in bytes.chunks_exact(size).zip(out.chunks_exact_mut(per)) {
        match ty {
            GgmlType::F32 => y[0] = f32::from_le_bytes(blk.try_into().unwrap()),
            GgmlType::F16 => y[0] = f16(blk, 0),
            GgmlType::BF16 => y[0] = half::bf16::from_le_bytes([blk[0], blk[1]]).to_f32(),
            GgmlType::Q4_0 => {
                let d = f16(blk, 0);
                for j in 0..16 {
                    y[j] = ((blk[2 + j] & 0xf) as i32 - 8) as f32 * d;
                    y[j + 16] = ((blk[2 + j] >> 4) as i32 - 8) as f32 * d;
                }
            }
            GgmlType::Q4_1 => {
                let (d, m) = (f16(blk, 0), f16(blk, 2));
                for j in 0..16 {
                    y[j] = (blk[4 + j] & 0xf) as f32 * d + m;
                    y[j + 16] = (blk[4 + j] >> 4) as f32 * d + m;
                }
            }
            GgmlType::Q5_0 | GgmlType::Q5_1 => {
                let one = ty == GgmlType::Q5_1;
                let d = f16(blk, 0);
                let (m, at) = if one { (f16(blk, 2), 4) } else { (0.0, 2) };
                let qh = u32::from_le_bytes(blk[at..at + 4].try_into().unwrap());
                let qs = &blk[at + 4..at + 20];
                for j in 0..16 {
                    let h0 = ((qh >> j) << 4) & 0x10;
                    let h1 = (qh >> (j + 12)) & 0x10;
                    let (x0, x1) = ((qs[j] as u32 & 0xf) | h0, (qs[j] as u32 >> 4) | h1);
                    if one {
                        y[j] = x0 as f32 * d + m;
                        y[j + 16] = x1 as f32 * d + m;
                    } else {
                        y[j] = (x0 as i32 - 16) as f32 * d;
                        y[j + 16] = (x1 as i32 - 16) as f32 * d;
                    }
                }
            }
            GgmlType::Q8_0 => {
                let d = f16(blk, 0);
                for j in 0..32 {
                    y[j] = blk[2 + j] as i8 as f32 * d;
                }
            }
            GgmlType::Q2K => q2k(blk, y),
            GgmlType::Q3K => q3k(blk, y),
            GgmlType::Q4K | GgmlType::Q5K => q45k(blk, y, ty == GgmlType::Q5K),
            GgmlType::Q6K => q6k(blk, y),
        }
    }
    out
}

/// Q2_K: `scales[16]` (4-bit scale and 4-bit min of each 16 values), `qs[64]` (2 bits
/// each), `d`, `dmin`.
fn q2k(blk: &[u8], y: &mut [f32]) {
    let (scales, qs) = (&blk[..16], &blk[16..80]);
    let (d, dmin) = (f16(blk, 80), f16(blk, 82));
    let (mut is, mut out) = (0, 0);
    for n in 0..2 {
        let q = &qs[n * 32..n * 32 + 32];
        for shift in [0, 2, 4, 6] {
            for half in 0..2 {
                let sc = scales[is];
                is += 1;
                let (dl, ml) = (d * (sc & 0xf) as f32, dmin * (sc >> 4) as f32);
                for l in 0..16 {
                    y[out] = dl * ((q[half * 16 + l] >> shift) & 3) as f32 - ml;
                    out += 1;
                }
            }
        }
    }
}

/// Q3_K: `hmask[32]` (the high bit, set meaning no offset), `qs[64]` (the low 2 bits),
/// `scales[12]` (sixteen 6-bit scales, offset by 32), `d`.
fn q3k(blk: &[u8], y: &mut [f32]) {
    let (hmask, qs, sc) = (&blk[..32], &blk[32..96], &blk[96..108]);
    let d = f16(blk, 108);
    let mut scales = [0i32; 16];
    for (i, s) in scales.iter_mut().enumerate() {
        let low = if i < 8 { sc[i] & 0xf } else { sc[i - 8] >> 4 };
        let high = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
        *s = (low | (high << 4)) as i32 - 32;
    }
    let (mut is, mut out, mut m) = (0, 0, 1u8);
    for n in 0..2 {
        let q = &qs[n * 32..n * 32 + 32];
        for shift in [0, 2, 4, 6] {
            for half in 0..2 {
                let dl = d * scales[is] as f32;
                is += 1;
                for l in 0..16 {
                    let k = half * 16 + l;
                    let low = ((q[k] >> shift) & 3) as i32;
                    let v = low - if hmask[k] & m != 0 { 0 } else { 4 };
                    y[out] = dl * v as f32;
                    out += 1;
                }
            }
            m <<= 1;
        }
    }
}

/// The 6-bit scale and min of group `j` of Q4_K/Q5_K's packed `scales[12]`.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Q4_K: `d`, `dmin`, `scales[12]`, `qs[128]` (4 bits each); Q5_K adds `qh[32]` (the
/// fifth bit) before `qs`.
fn q45k(blk: &[u8], y: &mut [f32], five: bool) {
    let (d, dmin) = (f16(blk, 0), f16(blk, 2));
    let sc = &blk[4..16];
    let (qh, qs) = if five { (&blk[16..48], &blk[48..176]) } else { (&blk[0..0], &blk[16..144]) };
    let (mut is, mut out) = (0, 0);
    let (mut u1, mut u2) = (1u8, 2u8);
    for j in 0..4 {
        let q = &qs[j * 32..j * 32 + 32];
        for (nib, u) in [(0, u1), (4, u2)] {
            let (s, m) = scale_min_k4(is, sc);
            is += 1;
            let (dl, ml) = (d * s as f32, dmin * m as f32);
            for l in 0..32 {
                let mut v = ((q[l] >> nib) & 0xf) as u32;
                if five && qh[l] & u != 0 {
                    v += 16;
                }
                y[out] = dl * v as f32 - ml;
                out += 1;
            }
        }
        u1 <<= 2;
        u2 <<= 2;
    }
}

/// Q6_K: `ql[128]` (low 4 bits), `qh[64]` (high 2 bits), `scales[16]` (i8), `d`.
fn q6k(blk: &[u8], y: &mut [f32]) {
    let (ql, qh, sc) = (&blk[..128], &blk[128..192], &blk[192..208]);
    let d = f16(blk, 208);
    for n in 0..2 {
        let (ql, qh, sc, y) = (&ql[n * 64..], &qh[n * 32..], &sc[n * 8..], &mut y[n * 128..]);
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xf) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * sc[is] as i8 as f32 * q1 as f32;
            y[l + 32] = d * sc[is + 2] as i8 as f32 * q2 as f32;
            y[l + 64] = d * sc[is + 4] as i8 as f32 * q3 as f32;
            y[l + 96] = d * sc[is + 6] as i8 as f32 * q4 as f32;
        }
    }
}
