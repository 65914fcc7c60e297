//! Loading a compiled model library and running it: [`Model::load`] reads the manifest
//! and opens the library; a [`Session`] binds weights (in place from a memory-mapped
//! checkpoint where their layout allows), owns the KV cache through the library's
//! context, and runs prefill and decode.

use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use safetensors::Dtype;

use crate::abi::{self, Manifest};
use crate::checkpoint::{Checkpoint, CheckpointError};

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
    #[error("the library could not allocate its context (out of memory)")]
    Alloc,
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
    reset: unsafe extern "C" fn(Ctx) -> i32,
    position: unsafe extern "C" fn(Ctx) -> i32,
}

pub struct Model {
    manifest: Manifest,
    fns: Fns,
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
        let lpath = dir.join(&manifest.library);
        let lib_err =
            |e: libloading::Error| RuntimeError::Library { path: lpath.clone(), message: e.to_string() };
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
                reset: *lib.get(b"tfc_reset\0").map_err(lib_err)?,
                position: *lib.get(b"tfc_position\0").map_err(lib_err)?,
            }
        };
        // SAFETY: a plain query.
        let count = unsafe { (fns.weight_count)() } as usize;
        if count != manifest.weights.len() {
            return Err(RuntimeError::Mismatch { library: count, manifest: manifest.weights.len() });
        }
        Ok(Model { manifest, fns, _lib: lib })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
}

/// Where a session's weights come from.
pub enum WeightData {
    /// A checkpoint; `f32` tensors are bound in place, others converted once.
    Checkpoint(Arc<Checkpoint>),
    /// One `f32` buffer per manifest weight, in order.
    Owned(Vec<Vec<f32>>),
}

pub struct Session<'m> {
    model: &'m Model,
    ctx: Ctx,
    /// Keeps bound memory alive for as long as the context can read it.
    _data: WeightData,
    _converted: Vec<Converted>,
}

/// A weight converted to the library's dtype, owned by the session.
enum Converted {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
    /// q8: values, padding, scales (`crate::quant`).
    Bytes(Vec<u8>),
}

impl Converted {
    fn bytes(&self) -> (*const c_void, usize) {
        match self {
            Converted::F32(v) => (v.as_ptr() as *const c_void, v.len() * 4),
            Converted::Bf16(v) => (v.as_ptr() as *const c_void, v.len() * 2),
            Converted::Bytes(v) => (v.as_ptr() as *const c_void, v.len()),
        }
    }
}

fn check(call: &'static str, status: i32) -> Result<(), RuntimeError> {
    if status == abi::OK {
        Ok(())
    } else {
        Err(RuntimeError::Call { call, message: abi::status_message(status) })
    }
}

impl<'m> Session<'m> {
    /// Creates a context with `threads` threads (0: one per core) and binds every weight,
    /// checking each against the manifest.
    pub fn new(model: &'m Model, data: WeightData, threads: usize) -> Result<Session<'m>, RuntimeError> {
        // SAFETY: `tfc_create` has no preconditions.
        let ctx = unsafe { (model.fns.create)(threads as i32) };
        if ctx.is_null() {
            return Err(RuntimeError::Alloc);
        }
        let mut s = Session { model, ctx, _data: WeightData::Owned(vec![]), _converted: vec![] };
        // Weights whose stored form differs from the library's are converted once and kept
        // while the library reads them; a weight it re-packs into its own copy is not kept.
        let mut converted: Vec<Converted> = Vec::new();
        let bind = |i: usize, p: *const c_void, n: usize| {
            // SAFETY: `p` points to `n` bytes that the session keeps alive (the mapping and
            // the heap buffers of `data` and `converted` do not move when they are moved),
            // or that the library has copied when the call returns (`repacked`).
            check("bind weight", unsafe { (model.fns.bind)(ctx, i as i32, p, n as u64) })
        };
        for (i, w) in model.manifest.weights.iter().enumerate() {
            let n: usize = w.shape.iter().product();
            // The stored form the library reads; q8 is always made here from the values.
            let (want, align) = match w.dtype.as_str() {
                "f32" => (Some(Dtype::F32), 4),
                "bf16" => (Some(Dtype::BF16), 2),
                "q8" => (None, 1),
                other => {
                    return Err(RuntimeError::Manifest {
                        path: "manifest.json".into(),
                        message: format!(
                            "weight `{}` has dtype {other}; this runtime binds f32, bf16 and q8",
                            w.name
                        ),
                    })
                }
            };
            if w.dtype == "q8" && n % crate::quant::Q8_BLOCK != 0 {
                return Err(RuntimeError::Manifest {
                    path: "manifest.json".into(),
                    message: format!("q8 weight `{}` has {n} values, not a multiple of 32", w.name),
                });
            }
            let values: Vec<f32> = match &data {
                WeightData::Checkpoint(ck) => {
                    let (dtype, bytes) = ck.raw(&w.name, &w.shape)?;
                    if Some(dtype) == want && (bytes.as_ptr() as usize) % align == 0 {
                        bind(i, bytes.as_ptr() as *const c_void, bytes.len())?;
                        continue;
                    }
                    ck.get(&w.name, &w.shape)?
                }
                WeightData::Owned(bufs) => {
                    let b = bufs.get(i).ok_or(RuntimeError::Mismatch {
                        library: model.manifest.weights.len(),
                        manifest: bufs.len(),
                    })?;
                    if b.len() != n {
                        return Err(RuntimeError::WeightSize {
                            name: w.name.clone(),
                            found: b.len(),
                            expected: n,
                        });
                    }
                    if want == Some(Dtype::F32) {
                        bind(i, b.as_ptr() as *const c_void, b.len() * 4)?;
                        continue;
                    }
                    b.clone()
                }
            };
            let c = match w.dtype.as_str() {
                "bf16" => {
                    Converted::Bf16(values.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect())
                }
                "q8" => Converted::Bytes(crate::quant::quantize_q8(&values)),
                _ => Converted::F32(values),
            };
            let (p, bytes) = c.bytes();
            bind(i, p, bytes)?;
            if !w.repacked {
                converted.push(c);
            }
        }
        s._data = data;
        s._converted = converted;
        Ok(s)
    }

    /// Runs the prompt (the cache must be empty); returns the last row of the output, or
    /// every row when `all_rows`.
    pub fn prefill(
        &mut self,
        tokens: &[i32],
        token_types: Option<&[i32]>,
        all_rows: bool,
    ) -> Result<Vec<f32>, RuntimeError> {
        let width = self.model.manifest.output_width;
        if let Some(t) = token_types {
            if t.len() != tokens.len() {
                return Err(RuntimeError::Call {
                    call: "prefill",
                    message: "one token type per token is needed",
                });
            }
        }
        let rows = if all_rows { tokens.len() } else { 1 };
        let mut out = vec![0f32; rows.max(1) * width];
        let types = token_types.map_or(std::ptr::null(), |t| t.as_ptr());
        let n = i32::try_from(tokens.len()).unwrap_or(i32::MAX);
        // SAFETY: the pointers are valid for `n` elements and `out` for `rows · width`.
        let status = unsafe {
            (self.model.fns.prefill)(self.ctx, tokens.as_ptr(), types, n, all_rows as i32, out.as_mut_ptr())
        };
        check("prefill", status)?;
        Ok(out)
    }

    /// Runs one token at the next position; returns one output row.
    pub fn decode(&mut self, token: i32) -> Result<Vec<f32>, RuntimeError> {
        let mut out = vec![0f32; self.model.manifest.output_width];
        // SAFETY: `out` holds one row.
        check("decode", unsafe { (self.model.fns.decode)(self.ctx, token, out.as_mut_ptr()) })?;
        Ok(out)
    }

    pub fn reset(&mut self) {
        // SAFETY: `ctx` is live.
        unsafe { (self.model.fns.reset)(self.ctx) };
    }

    /// Positions held in the cache.
    pub fn position(&self) -> usize {
        // SAFETY: `ctx` is live.
        unsafe { (self.model.fns.position)(self.ctx) as usize }
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        // SAFETY: `ctx` came from `tfc_create` and is destroyed once.
        unsafe { (self.model.fns.destroy)(self.ctx) };
    }
}
