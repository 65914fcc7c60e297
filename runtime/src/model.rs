//! Loading a compiled model library and running it: [`Model::load`] reads the manifest
//! and opens the library; a [`Session`] binds weights (from a memory-mapped checkpoint
//! into 2 MB pages it owns, converted to the library's dtype where they differ), owns the
//! KV cache through the library's context, and runs prefill and decode.

use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use safetensors::Dtype;

use crate::abi::{self, Manifest};
use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::pages::Pages;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot read {path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{path} is not a valid manifest: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error("{path} was built for ABI version {found}, this runtime speaks {expected}")]
    AbiVersion { path: PathBuf, found: i32, expected: i32 },
    #[error("cannot load {path}: {message}")]
    Library { path: PathBuf, message: String },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("the library has {library} weights, its manifest lists {manifest}")]
    Mismatch { library: usize, manifest: usize },
    #[error("weight `{name}` has {found} values, the model expects {expected}")]
    WeightSize { name: String, found: usize, expected: usize },
    #[error("{call}: {message}")]
    Call { call: &'static str, message: &'static str },
    #[error("{call}: {message}")]
    Arg { call: &'static str, message: String },
    #[error("binding weight {index} `{name}`: {message}")]
    Bind { index: usize, name: String, message: &'static str },
    #[error("{step} produced a non-finite output ({value} in row {row}, column {column}): the weights or the inputs hold NaN or infinity, or the values overflowed")]
    NonFinite { step: String, row: usize, column: usize, value: f32 },
    #[error("the library could not allocate its context (out of memory)")]
    Alloc,
    #[error("{0}")]
    TooLarge(String),
    #[error("cannot allocate memory for weight `{name}`: {message}")]
    Memory { name: String, message: String },
    #[error("{0}")]
    Gpu(String),
}

type Ctx = *mut c_void;

/// The library's entry points, resolved once.
struct Fns {
    create: unsafe extern "C" fn(i32) -> Ctx,
    destroy: unsafe extern "C" fn(Ctx),
    weight_count: unsafe extern "C" fn() -> i32,
    bind: unsafe extern "C" fn(Ctx, i32, *const c_void, u64) -> i32,
    prefill: unsafe extern "C" fn(Ctx, *const i32, *const i32, i32, i32, *mut f32) -> i32,
    decode: unsafe extern "C" fn(Ctx, i32, *mut f32) -> i32,
    /// `tfc_extend`; a library built before it existed has none, and its cache is
    /// continued by decode steps.
    extend: Option<unsafe extern "C" fn(Ctx, *const i32, i32, i32, *mut f32) -> i32>,
    reset: unsafe extern "C" fn(Ctx) -> i32,
    position: unsafe extern "C" fn(Ctx) -> i32,
    /// The slot calls; a library built before they existed has one cache per context.
    slots: Option<SlotFns>,
}

struct SlotFns {
    add: unsafe extern "C" fn(Ctx, *mut i32) -> i32,
    select: unsafe extern "C" fn(Ctx, i32) -> i32,
    rewind: unsafe extern "C" fn(Ctx, i32) -> i32,
    decode_batch: unsafe extern "C" fn(Ctx, i32, *const i32, *const i32, *mut f32) -> i32,
}

/// How a library's one-row products (decode) prefetch their weight streams, as it chose
/// for this CPU (`Model::streaming_prefetch`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prefetch {
    /// Not at all: the CPU's own prefetchers keep up.
    Off,
    /// Into L1 (`prefetcht0`).
    L1,
    /// Into L2 only (`prefetcht1`).
    L2,
}

impl Prefetch {
    /// How `tfc bench` names it.
    pub fn name(self) -> &'static str {
        match self {
            Prefetch::Off => "off",
            Prefetch::L1 => "l1",
            Prefetch::L2 => "l2",
        }
    }
}

pub struct Model {
    manifest: Manifest,
    fns: Fns,
    /// Floats per output row, as the library itself reports them.
    width: usize,
    /// Bytes a context allocates (`tfc_context_bytes`; a library built before it existed
    /// does not say).
    context_bytes: Option<u64>,
    /// `tfc_streaming_prefetch`, where the library has it.
    prefetch: Option<unsafe extern "C" fn() -> i32>,
    // Keeps the code behind `fns` mapped; dropped last.
    _lib: libloading::Library,
}

impl Model {
    /// Loads `dir/manifest.json` and the library it names.
    pub fn load(dir: impl AsRef<Path>) -> Result<Model, RuntimeError> {
        let dir = dir.as_ref();
        let mpath = dir.join("manifest.json");
        let text = std::fs::read_to_string(&mpath)
            .map_err(|e| RuntimeError::Io { path: mpath.clone(), message: e.to_string() })?;
        let manifest: Manifest = serde_json::from_str(&text)
            .map_err(|e| RuntimeError::Manifest { path: mpath.clone(), message: e.to_string() })?;
        if manifest.abi_version != abi::ABI_VERSION {
            return Err(RuntimeError::AbiVersion {
                path: mpath,
                found: manifest.abi_version,
                expected: abi::ABI_VERSION,
            });
        }
        let bad = |message: String| RuntimeError::Manifest { path: mpath.clone(), message };
        // The library is a file beside the manifest, never a path elsewhere.
        let plain = Path::new(&manifest.library).file_name().is_some_and(|f| f == manifest.library.as_str());
        if !plain {
            return Err(bad(format!(
                "library {:?} is not a file name beside the manifest",
                manifest.library
            )));
        }
        let lpath = dir.join(&manifest.library);
        let lib_err =
            |e: libloading::Error| RuntimeError::Library { path: lpath.clone(), message: e.to_string() };
        // A truncated or replaced library would be mapped and then fault (SIGBUS) on its
        // first missing page, so its bytes are checked before it is opened.
        let meta = std::fs::metadata(&lpath)
            .map_err(|e| RuntimeError::Library { path: lpath.clone(), message: e.to_string() })?;
        if !meta.is_file() {
            return Err(RuntimeError::Library { path: lpath, message: "not a regular file".into() });
        }
        if !manifest.library_hash.is_empty() {
            let bytes = std::fs::read(&lpath)
                .map_err(|e| RuntimeError::Library { path: lpath.clone(), message: e.to_string() })?;
            let found = abi::fnv1a_bytes(&bytes);
            if found != manifest.library_hash {
                return Err(RuntimeError::Library {
                    path: lpath,
                    message: format!(
                        "its contents (hash {found}, {} bytes) are not the library the manifest describes (hash {}): it was truncated or replaced",
                        bytes.len(),
                        manifest.library_hash
                    ),
                });
            }
        }
        // SAFETY: loading runs the library's initialisers; a tfc library has none beyond libc's.
        let lib = unsafe { libloading::Library::new(&lpath) }.map_err(lib_err)?;
        // SAFETY: the symbol types are those of the ABI header, checked by its version.
        let fns = unsafe {
            Fns {
                create: *lib.get(b"tfc_create\0").map_err(lib_err)?,
                destroy: *lib.get(b"tfc_destroy\0").map_err(lib_err)?,
                weight_count: *lib.get(b"tfc_weight_count\0").map_err(lib_err)?,
                bind: *lib.get(b"tfc_bind_weight\0").map_err(lib_err)?,
                prefill: *lib.get(b"tfc_prefill\0").map_err(lib_err)?,
                decode: *lib.get(b"tfc_decode\0").map_err(lib_err)?,
                extend: lib.get(b"tfc_extend\0").ok().map(|f| *f),
                reset: *lib.get(b"tfc_reset\0").map_err(lib_err)?,
                position: *lib.get(b"tfc_position\0").map_err(lib_err)?,
                slots: (|| {
                    Some(SlotFns {
                        add: *lib.get(b"tfc_add_slot\0").ok()?,
                        select: *lib.get(b"tfc_use_slot\0").ok()?,
                        rewind: *lib.get(b"tfc_rewind\0").ok()?,
                        decode_batch: *lib.get(b"tfc_decode_batch\0").ok()?,
                    })
                })(),
            }
        };
        // The library's own facts, which its code was compiled with: the manifest must
        // say the same, since a session sizes buffers and binds weights by the manifest.
        // SAFETY: the symbol types are those of the ABI header; each is a plain query.
        let facts = unsafe {
            let query = |name: &[u8]| -> Result<i64, RuntimeError> {
                let f: unsafe extern "C" fn() -> i32 = *lib.get(name).map_err(lib_err)?;
                Ok(f() as i64)
            };
            [
                ("vocab", query(b"tfc_vocab\0")?, manifest.vocab as i64),
                ("max_seq", query(b"tfc_max_seq\0")?, manifest.max_seq as i64),
                ("output_width", query(b"tfc_output_width\0")?, manifest.output_width as i64),
                ("has_decode", query(b"tfc_has_decode\0")?, manifest.has_decode as i64),
            ]
        };
        let width = facts[2].1 as usize;
        for (field, library, listed) in facts {
            if library != listed {
                return Err(bad(format!("`{field}` is {listed}, but the library has {library}")));
            }
        }
        // SAFETY: a plain query.
        let count = unsafe { (fns.weight_count)() } as usize;
        if count != manifest.weights.len() {
            return Err(RuntimeError::Mismatch { library: count, manifest: manifest.weights.len() });
        }
        // SAFETY: the symbol types are those of the ABI header.
        let (name_of, bytes_of) = unsafe {
            let n: unsafe extern "C" fn(i32) -> *const std::ffi::c_char =
                *lib.get(b"tfc_weight_name\0").map_err(lib_err)?;
            let b: unsafe extern "C" fn(i32) -> i64 = *lib.get(b"tfc_weight_bytes\0").map_err(lib_err)?;
            (n, b)
        };
        // A library built before `tfc_weight_type` existed is checked by sizes alone.
        // SAFETY: the symbol type is that of the ABI header.
        let type_of: Option<unsafe extern "C" fn(i32) -> *const std::ffi::c_char> =
            unsafe { lib.get(b"tfc_weight_type\0").ok().map(|f| *f) };
        // A session frees its copy of a weight the manifest calls re-packed, so the library
        // must agree (one built before re-packing has no such call and copies nothing).
        // SAFETY: the symbol type is that of the ABI header.
        let repacked: Option<unsafe extern "C" fn(i32) -> i32> =
            unsafe { lib.get(b"tfc_weight_repacked\0").ok().map(|f| *f) };
        for (i, w) in manifest.weights.iter().enumerate() {
            // SAFETY: an index below the library's count gives a NUL-terminated constant.
            let name = unsafe { std::ffi::CStr::from_ptr(name_of(i as i32)) }.to_string_lossy();
            if name != w.name {
                return Err(bad(format!("weight {i} is `{}`, but the library binds `{name}` there", w.name)));
            }
            let bytes = abi::weight_bytes(&w.shape, &w.dtype)
                .map_err(|m| bad(format!("weight {i} `{}`: {m}", w.name)))?;
            if let Some(type_of) = type_of {
                // SAFETY: as for the name.
                let library = unsafe { std::ffi::CStr::from_ptr(type_of(i as i32)) }.to_string_lossy();
                let listed = abi::weight_type(&w.dtype, &w.shape);
                if library != listed {
                    return Err(bad(format!(
                        "weight {i} `{}` is {listed}, but the library binds {library}",
                        w.name
                    )));
                }
            }
            // SAFETY: a plain query with an index below the library's count.
            let copies = repacked.is_some_and(|f| unsafe { f(i as i32) } == 1);
            if copies != w.repacked {
                return Err(bad(format!(
                    "weight {i} `{}` has repacked = {}, but the library {} it",
                    w.name,
                    w.repacked,
                    if copies { "re-packs" } else { "does not re-pack" }
                )));
            }
            // SAFETY: a plain query with an index below the library's count.
            let library = unsafe { bytes_of(i as i32) };
            if library < 0 || library as u64 != bytes as u64 {
                return Err(bad(format!(
                    "weight {i} `{}` ({} {:?}) is {bytes} bytes, but the library expects {library}",
                    w.name, w.dtype, w.shape
                )));
            }
        }
        // SAFETY: the symbol type is that of the ABI header; a plain query.
        let context_bytes = unsafe {
            lib.get::<unsafe extern "C" fn() -> i64>(b"tfc_context_bytes\0")
                .ok()
                .map(|f| f())
                .map(|b| b.max(0) as u64)
        };
        // SAFETY: the symbol type is that of the ABI header.
        let prefetch =
            unsafe { lib.get::<unsafe extern "C" fn() -> i32>(b"tfc_streaming_prefetch\0").ok().map(|f| *f) };
        Ok(Model { manifest, fns, width, context_bytes, prefetch, _lib: lib })
    }

    /// How the library's one-row products prefetch their weight streams
    /// (`tfc_streaming_prefetch`): known once a decode step has run in this process, and
    /// from libraries that say.
    pub fn streaming_prefetch(&self) -> Option<Prefetch> {
        // SAFETY: a plain query of the ABI header.
        match unsafe { (self.prefetch?)() } {
            0 => Some(Prefetch::Off),
            1 => Some(Prefetch::L1),
            2 => Some(Prefetch::L2),
            _ => None,
        }
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// What a session of this model allocates: its copies of the weights the library
    /// reads in place, the KV cache, and the rest of the context.
    pub fn needs(&self) -> crate::memory::Needs {
        let m = &self.manifest;
        let weights = m
            .weights
            .iter()
            .filter(|w| !w.repacked)
            .map(|w| abi::weight_bytes(&w.shape, &w.dtype).map_or(u64::MAX, |b| b as u64))
            .fold(0u64, u64::saturating_add);
        // The library's own count of what a context maps is the truth; the manifest's
        // cache size only splits it for messages.
        let cache = (m.kv_cache.bytes as u64).min(self.context_bytes.unwrap_or(u64::MAX));
        let scratch = self.context_bytes.map_or(0, |c| c - cache);
        crate::memory::Needs { weights, cache, scratch }
    }

    /// The storage types of the weights, for messages: `f32`, `bf16 and f32`, ….
    fn dtypes(&self) -> String {
        let mut d: Vec<&str> = self.manifest.weights.iter().map(|w| w.dtype.as_str()).collect();
        d.sort();
        d.dedup();
        d.join(" and ")
    }
}

/// Where a session's weights come from.
pub enum WeightData {
    /// A checkpoint, read through its mapping.
    Checkpoint(Arc<Checkpoint>),
    /// One `f32` buffer per manifest weight, in order; each is released once copied.
    Owned(Vec<Vec<f32>>),
}

pub struct Session<'m> {
    model: &'m Model,
    ctx: Ctx,
    /// The weights the library reads from the session's memory, alive as long as `ctx`.
    _weights: Vec<Pages>,
}

/// A weight in the library's stored form.
enum Stored<'a> {
    /// The source already holds it: bound from there if the library copies it, else
    /// copied into session memory.
    Source(&'a [u8]),
    Made(Pages),
}

fn check(call: &'static str, status: i32) -> Result<(), RuntimeError> {
    if status == abi::OK {
        Ok(())
    } else {
        Err(RuntimeError::Call { call, message: abi::status_message(status) })
    }
}

fn as_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: any `f32` is four initialised bytes, and `u8` has no alignment.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

impl<'m> Session<'m> {
    /// Creates a context with `threads` threads (0: one per core) and binds every weight,
    /// checking each against the manifest.
    ///
    /// Every weight ends in memory the library reads at full speed: one it re-packs is
    /// copied by the library when bound; any other is converted to the library's dtype, or
    /// copied as it is, into 2 MB pages the session owns (`crate::pages`). A checkpoint's
    /// mapping is only read, once.
    pub fn new(model: &'m Model, mut data: WeightData, threads: usize) -> Result<Session<'m>, RuntimeError> {
        if threads > abi::MAX_THREADS {
            return Err(RuntimeError::Arg {
                call: "create",
                message: format!(
                    "{threads} threads: a context takes at most {} (0: one per core)",
                    abi::MAX_THREADS
                ),
            });
        }
        let m = &model.manifest;
        model.needs().check(&m.name, &model.dtypes(), m.max_seq).map_err(RuntimeError::TooLarge)?;
        // SAFETY: `tfc_create` has no preconditions.
        let ctx = unsafe { (model.fns.create)(threads as i32) };
        if ctx.is_null() {
            return Err(RuntimeError::Alloc);
        }
        let mut s = Session { model, ctx, _weights: vec![] };
        if let WeightData::Owned(bufs) = &data {
            if bufs.len() != model.manifest.weights.len() {
                return Err(RuntimeError::Mismatch {
                    library: model.manifest.weights.len(),
                    manifest: bufs.len(),
                });
            }
        }
        for (i, w) in model.manifest.weights.iter().enumerate() {
            let n: usize = w.shape.iter().product();
            // The stored form the library reads; q8 is always made here from the values,
            // 4-bit formats taken as a GGUF file stores them or made here.
            let q4 = crate::quant::Quant::parse(&w.dtype);
            let (want, align) = match w.dtype.as_str() {
                "f32" => (Some(Dtype::F32), 4),
                "bf16" => (Some(Dtype::BF16), 2),
                "q8" => (None, 1),
                _ if q4.is_some() => (None, 1),
                other => {
                    return Err(RuntimeError::Manifest {
                        path: "manifest.json".into(),
                        message: format!(
                            "weight `{}` has dtype {other}; this runtime binds f32, bf16, q8 and the ggml blocks q8_0, q2_k, q3_k, q4_0, q4_1, q4_k, q5_0, q5_1, q5_k and q6_k",
                            w.name
                        ),
                    })
                }
            };
            if let Err(message) = crate::abi::weight_bytes(&w.shape, &w.dtype) {
                return Err(RuntimeError::Manifest {
                    path: "manifest.json".into(),
                    message: format!("weight `{}`: {message}", w.name),
                });
            }
            let memory =
                |e: std::io::Error| RuntimeError::Memory { name: w.name.clone(), message: e.to_string() };
            let convert = |values: &[f32]| -> Result<Pages, RuntimeError> {
                match w.dtype.as_str() {
                    "bf16" => {
                        let mut p = Pages::zeroed(2 * values.len()).map_err(memory)?;
                        for (d, &x) in p.as_mut_slice::<u16>().iter_mut().zip(values) {
                            *d = half::bf16::from_f32(x).to_bits();
                        }
                        Ok(p)
                    }
                    "q8" => Pages::copy_of(&crate::quant::quantize_q8(values)).map_err(memory),
                    _ => match q4 {
                        Some(q) => Pages::copy_of(&q.quantize(values)).map_err(memory),
                        None => Pages::copy_of(values).map_err(memory),
                    },
                }
            };
            let stored = match (&data, q4) {
                (WeightData::Checkpoint(ck), Some(q)) => match ck.quantized(&w.name, &w.shape, q)? {
                    std::borrow::Cow::Borrowed(b) => Stored::Source(b),
                    std::borrow::Cow::Owned(b) => Stored::Made(Pages::copy_of(&b).map_err(memory)?),
                },
                (WeightData::Checkpoint(ck), None) => match ck.raw(&w.name, &w.shape) {
                    Ok((dtype, bytes)) if Some(dtype) == want && (bytes.as_ptr() as usize) % align == 0 => {
                        Stored::Source(bytes)
                    }
                    // Converted, unaligned, stacked from several tensors or quantised
                    // in a GGUF file: a copy.
                    Ok(_)
                    | Err(
                        crate::CheckpointError::Stacked { .. } | crate::CheckpointError::Quantized { .. },
                    ) => Stored::Made(convert(&ck.get(&w.name, &w.shape)?)?),
                    Err(e) => return Err(e.into()),
                },
                (WeightData::Owned(bufs), _) => {
                    let b = &bufs[i];
                    if b.len() != n {
                        return Err(RuntimeError::WeightSize {
                            name: w.name.clone(),
                            found: b.len(),
                            expected: n,
                        });
                    }
                    if want == Some(Dtype::F32) {
                        Stored::Source(as_bytes(b))
                    } else {
                        Stored::Made(convert(b)?)
                    }
                }
            };
            let bind = |p: *const u8, n: usize| {
                bind(model, ctx, i, p, n).map_err(|message| RuntimeError::Bind {
                    index: i,
                    name: w.name.clone(),
                    message,
                })
            };
            let pages = match stored {
                Stored::Source(b) if w.repacked => {
                    bind(b.as_ptr(), b.len())?;
                    None
                }
                Stored::Source(b) => Some(Pages::copy_of(b).map_err(memory)?),
                Stored::Made(p) => Some(p),
            };
            if let Some(p) = pages {
                bind(p.as_ptr(), p.len())?;
                // A re-packed weight was copied by the library, so its buffer can go.
                if !w.repacked {
                    s._weights.push(p);
                }
            }
            if let WeightData::Owned(bufs) = &mut data {
                bufs[i] = Vec::new();
            }
        }
        Ok(s)
    }

    /// Runs the prompt (the cache must be empty); returns the last row of the output, or
    /// every row when `all_rows`. Token ids are checked against the vocabulary, and the
    /// output for being finite, before they are returned.
    pub fn prefill(
        &mut self,
        tokens: &[i32],
        token_types: Option<&[i32]>,
        all_rows: bool,
    ) -> Result<Vec<f32>, RuntimeError> {
        let width = self.model.width;
        let m = &self.model.manifest;
        let arg = |message: String| RuntimeError::Arg { call: "prefill", message };
        if let Some(t) = token_types {
            if t.len() != tokens.len() {
                return Err(arg(format!(
                    "{} token types for {} tokens: one per token is needed",
                    t.len(),
                    tokens.len()
                )));
            }
        }
        if tokens.is_empty() {
            return Err(arg("no tokens: a prompt needs at least one".into()));
        }
        if tokens.len() > m.max_seq {
            return Err(arg(format!(
                "{} tokens do not fit in the model's max_seq of {}",
                tokens.len(),
                m.max_seq
            )));
        }
        if let Some((at, &id)) = tokens.iter().enumerate().find(|(_, &t)| t < 0 || t as usize >= m.vocab) {
            return Err(arg(format!(
                "token id {id} at position {at} is outside the vocabulary (0..{})",
                m.vocab
            )));
        }
        let rows = if all_rows { tokens.len() } else { 1 };
        let mut out = vec![0f32; rows * width];
        let types = token_types.map_or(std::ptr::null(), |t| t.as_ptr());
        let n = i32::try_from(tokens.len()).unwrap_or(i32::MAX);
        // SAFETY: the pointers are valid for `n` elements and `out` for `rows · width`,
        // the width the library itself reports.
        let status = unsafe {
            (self.model.fns.prefill)(self.ctx, tokens.as_ptr(), types, n, all_rows as i32, out.as_mut_ptr())
        };
        check("prefill", status)?;
        check_finite(&out, width, || format!("prefill of {} tokens", tokens.len()))?;
        Ok(out)
    }

    /// Runs one token at the next position; returns one output row, checked for being
    /// finite.
    pub fn decode(&mut self, token: i32) -> Result<Vec<f32>, RuntimeError> {
        let m = &self.model.manifest;
        if token < 0 || token as usize >= m.vocab {
            return Err(RuntimeError::Arg {
                call: "decode",
                message: format!("token id {token} is outside the vocabulary (0..{})", m.vocab),
            });
        }
        let position = self.position();
        if position >= m.max_seq {
            return Err(RuntimeError::Arg {
                call: "decode",
                message: format!(
                    "the cache holds {position} positions, the model's max_seq: no room for another"
                ),
            });
        }
        let mut out = vec![0f32; self.model.width];
        // SAFETY: `out` holds one row of the width the library reports.
        check("decode", unsafe { (self.model.fns.decode)(self.ctx, token, out.as_mut_ptr()) })?;
        check_finite(&out, self.model.width, || format!("decode at position {position}"))?;
        Ok(out)
    }

    /// Runs `tokens` at the positions after the cache's and adds them to it: the same
    /// computation as a decode step per token (which it is, for a library without
    /// `tfc_extend`), in one pass. Returns the last row of the output, or every row when
    /// `all_rows`, checked for being finite.
    pub fn extend(&mut self, tokens: &[i32], all_rows: bool) -> Result<Vec<f32>, RuntimeError> {
        let m = &self.model.manifest;
        let width = self.model.width;
        let arg = |message: String| RuntimeError::Arg { call: "extend", message };
        let position = self.position();
        if tokens.is_empty() {
            return Err(arg("no tokens: extending needs at least one".into()));
        }
        if tokens.len() > m.max_seq.saturating_sub(position) {
            return Err(arg(format!(
                "{} more tokens do not fit after the cache's {position} in the model's max_seq of {}",
                tokens.len(),
                m.max_seq
            )));
        }
        if let Some((at, &id)) = tokens.iter().enumerate().find(|(_, &t)| t < 0 || t as usize >= m.vocab) {
            return Err(arg(format!(
                "token id {id} at position {} is outside the vocabulary (0..{})",
                position + at,
                m.vocab
            )));
        }
        let Some(extend) = self.model.fns.extend else {
            let mut out = Vec::with_capacity(if all_rows { tokens.len() * width } else { width });
            for &t in tokens {
                let row = self.decode(t)?;
                if all_rows || out.is_empty() {
                    out.extend(row);
                } else {
                    out.copy_from_slice(&row);
                }
            }
            return Ok(out);
        };
        let rows = if all_rows { tokens.len() } else { 1 };
        let mut out = vec![0f32; rows * width];
        let n = i32::try_from(tokens.len()).unwrap_or(i32::MAX);
        // SAFETY: `tokens` holds `n` ids and `out` `rows · width` floats, the width the
        // library itself reports.
        let status = unsafe { extend(self.ctx, tokens.as_ptr(), n, all_rows as i32, out.as_mut_ptr()) };
        check("extend", status)?;
        check_finite(&out, width, || format!("extend of {} tokens after position {position}", tokens.len()))?;
        Ok(out)
    }

    pub fn reset(&mut self) {
        // SAFETY: `ctx` is live.
        unsafe { (self.model.fns.reset)(self.ctx) };
    }

    fn slot_fns(&self, call: &'static str) -> Result<&SlotFns, RuntimeError> {
        self.model.fns.slots.as_ref().ok_or(RuntimeError::Arg {
            call,
            message: "the library has no slots (it was built before they existed): recompile it".into(),
        })
    }

    /// Adds a slot, an empty KV cache that shares the session's weights; its index.
    /// The calls without a slot (prefill, decode, extend, reset, rewind, position) act on
    /// the slot `use_slot` chose, slot 0 at first.
    pub fn add_slot(&mut self) -> Result<usize, RuntimeError> {
        let f = self.slot_fns("add_slot")?;
        let mut slot = -1;
        // SAFETY: `ctx` is live and `slot` a valid place for the index.
        match unsafe { (f.add)(self.ctx, &mut slot) } {
            abi::OK => Ok(slot as usize),
            abi::ERR_MEMORY => Err(RuntimeError::TooLarge(format!(
                "another slot needs {} of KV cache, more than this process may still take",
                crate::memory::human(self.model.manifest.kv_cache.bytes as u64)
            ))),
            s => check("add_slot", s).map(|_| 0),
        }
    }

    /// Makes `slot` the one the calls without a slot act on.
    pub fn use_slot(&mut self, slot: usize) -> Result<(), RuntimeError> {
        let f = self.slot_fns("use_slot")?;
        let index = i32::try_from(slot).unwrap_or(i32::MAX);
        // SAFETY: `ctx` is live; the library checks the index.
        check("use_slot", unsafe { (f.select)(self.ctx, index) })
    }

    /// Keeps the first `n` positions of the chosen slot's cache (a causal model's cached
    /// positions never depend on later tokens), so a sequence sharing those tokens
    /// continues from there with `extend`.
    pub fn rewind(&mut self, n: usize) -> Result<(), RuntimeError> {
        let f = self.slot_fns("rewind")?;
        let position = self.position();
        if n > position {
            return Err(RuntimeError::Arg {
                call: "rewind",
                message: format!("to {n} positions: the cache holds only {position}"),
            });
        }
        // SAFETY: `ctx` is live; `n` is within the cache.
        check("rewind", unsafe { (f.rewind)(self.ctx, n as i32) })
    }

    /// One decode step for each `(slot, token)`, slots distinct: a row each, what
    /// `decode` on that slot computes. Nothing runs unless every slot has room and every
    /// token is in the vocabulary.
    pub fn decode_batch(&mut self, steps: &[(usize, i32)]) -> Result<Vec<Vec<f32>>, RuntimeError> {
        let f = self.slot_fns("decode_batch")?;
        let m = &self.model.manifest;
        let width = self.model.width;
        if let Some(&(slot, token)) = steps.iter().find(|(_, t)| *t < 0 || *t as usize >= m.vocab) {
            return Err(RuntimeError::Arg {
                call: "decode_batch",
                message: format!(
                    "token id {token} for slot {slot} is outside the vocabulary (0..{})",
                    m.vocab
                ),
            });
        }
        let slots: Vec<i32> = steps.iter().map(|&(s, _)| i32::try_from(s).unwrap_or(i32::MAX)).collect();
        let tokens: Vec<i32> = steps.iter().map(|&(_, t)| t).collect();
        let mut out = vec![0f32; steps.len() * width];
        let n = i32::try_from(steps.len()).unwrap_or(i32::MAX);
        // SAFETY: `slots` and `tokens` hold `n` values and `out` `n · width` floats, the
        // width the library reports; the library checks the slots.
        let status =
            unsafe { (f.decode_batch)(self.ctx, n, slots.as_ptr(), tokens.as_ptr(), out.as_mut_ptr()) };
        check("decode_batch", status)?;
        check_finite(&out, width, || format!("batched decode of {} slots", steps.len()))?;
        Ok(out.chunks(width).map(<[f32]>::to_vec).collect())
    }

    /// Positions held in the cache.
    pub fn position(&self) -> usize {
        // SAFETY: `ctx` is live.
        unsafe { (self.model.fns.position)(self.ctx) as usize }
    }
}

/// Binds weight `i` of `ctx` to `n` bytes at `p`; the status message if it fails.
fn bind(model: &Model, ctx: Ctx, i: usize, p: *const u8, n: usize) -> Result<(), &'static str> {
    // SAFETY: `p` points to `n` bytes that the session keeps alive as long as `ctx` (its
    // `Pages`), or that the library has copied when the call returns (`repacked`).
    match unsafe { (model.fns.bind)(ctx, i as i32, p as *const c_void, n as u64) } {
        abi::OK => Ok(()),
        status => Err(abi::status_message(status)),
    }
}

/// The first value of `out` (rows of `width`) that is NaN or infinite, as an error naming
/// the `step` that produced it. Every engine's sessions check their output rows with it.
pub fn check_finite(out: &[f32], width: usize, step: impl Fn() -> String) -> Result<(), RuntimeError> {
    match out.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(i) => {
            Err(RuntimeError::NonFinite { step: step(), row: i / width, column: i % width, value: out[i] })
        }
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        // SAFETY: `ctx` came from `tfc_create` and is destroyed once.
        unsafe { (self.model.fns.destroy)(self.ctx) };
    }
}
