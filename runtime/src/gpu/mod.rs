//! GPU builds of a model: the program format ([`program`]) and the device paths that run
//! it. A [`GpuModel`] is a folder written by `tfc compile --target vulkan|cuda`; a
//! [`GpuSession`] uploads the weights once, keeps the KV cache on the device and runs
//! prefill and decode by replaying the program's dispatch lists. Arguments are checked
//! here, as the C half checks them for a CPU library, so kernels only see valid input.

pub mod cuda;
pub mod program;
pub mod vulkan;

use std::path::{Path, PathBuf};

use crate::model::{RuntimeError, WeightData};
use program::{Graph, Program, PROGRAM_FILE};

pub struct GpuModel {
    program: Program,
    binary: Vec<u8>,
    dir: PathBuf,
}

impl GpuModel {
    pub fn load(dir: impl AsRef<Path>) -> Result<GpuModel, RuntimeError> {
        let dir = dir.as_ref().to_path_buf();
        let path = dir.join(PROGRAM_FILE);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| RuntimeError::Io { path: path.clone(), message: e.to_string() })?;
        let program: Program = serde_json::from_str(&text)
            .map_err(|e| RuntimeError::Manifest { path: path.clone(), message: e.to_string() })?;
        let bin = dir.join(&program.binary);
        let binary = std::fs::read(&bin)
            .map_err(|e| RuntimeError::Io { path: bin.clone(), message: e.to_string() })?;
        Ok(GpuModel { program, binary, dir })
    }

    pub fn program(&self) -> &Program {
        &self.program
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// What a device path provides: run one graph for `t` new tokens after `p` cached ones.
trait Device {
    fn run(
        &mut self,
        g: &Graph,
        t: usize,
        p: usize,
        tokens: &[i32],
        types: &[i32],
    ) -> Result<Vec<f32>, RuntimeError>;
    fn clear_cache(&mut self) -> Result<(), RuntimeError>;
}

pub struct GpuSession<'m> {
    model: &'m GpuModel,
    device: Box<dyn Device + 'm>,
    pos: usize,
}

fn call_err(call: &'static str, message: &'static str) -> RuntimeError {
    RuntimeError::Call { call, message }
}

impl<'m> GpuSession<'m> {
    /// Opens the program's device and uploads every weight, checking each against the
    /// program's list.
    pub fn new(model: &'m GpuModel, data: WeightData) -> Result<GpuSession<'m>, RuntimeError> {
        let p = &model.program;
        let mut weights = Vec::with_capacity(p.weights.len());
        for (i, w) in p.weights.iter().enumerate() {
            let values = match &data {
                WeightData::Checkpoint(ck) => ck.get(&w.name, &w.shape)?,
                WeightData::Owned(bufs) => bufs
                    .get(i)
                    .cloned()
                    .ok_or(RuntimeError::Mismatch { library: p.weights.len(), manifest: bufs.len() })?,
            };
            let expected: usize = w.shape.iter().product();
            if values.len() != expected {
                return Err(RuntimeError::WeightSize { name: w.name.clone(), found: values.len(), expected });
            }
            let mut values = values;
            // The declared storage type, as the kernels' f32 weights must hold it.
            match w.dtype.as_str() {
                "f32" => {}
                "bf16" => values.iter_mut().for_each(|x| *x = half::bf16::from_f32(*x).to_f32()),
                "f16" => values.iter_mut().for_each(|x| *x = half::f16::from_f32(*x).to_f32()),
                other => {
                    return Err(RuntimeError::Gpu(format!(
                        "weight `{}` has dtype {other}; GPU programs take f32, bf16 and f16",
                        w.name
                    )))
                }
            }
            weights.push(values);
        }
        let tables: Vec<Vec<f32>> = p.tables.iter().map(|t| t.values()).collect();
        let device: Box<dyn Device> = match p.target.as_str() {
            "vulkan" => Box::new(vulkan::Vulkan::new(p, &model.binary, &weights, &tables)?),
            "cuda" => Box::new(cuda::Cuda::new(p, &model.binary, &weights, &tables)?),

            other => {
                return Err(RuntimeError::Gpu(format!("unknown GPU target `{other}` in {}", PROGRAM_FILE)))
            }
        };
        Ok(GpuSession { model, device, pos: 0 })
    }

    fn check_tokens(
        &self,
        call: &'static str,
        tokens: &[i32],
        types: Option<&[i32]>,
    ) -> Result<(), RuntimeError> {
        let p = &self.model.program;
        if tokens.is_empty() {
            return Err(call_err(call, "token count out of range"));
        }
        if self.pos + tokens.len() > p.max_seq {
            return Err(call_err(call, "the sequence would exceed max_seq"));
        }
        if tokens.iter().any(|&t| t < 0 || t as usize >= p.vocab) {
            return Err(call_err(call, "a token id is outside the vocabulary"));
        }
        if let Some(ty) = types {
            if ty.len() != tokens.len() {
                return Err(call_err(call, "one token type per token is needed"));
            }
            if ty.iter().any(|&t| t < 0 || t as usize >= p.type_rows.max(1)) {
                return Err(call_err(call, "a token type is outside the type table"));
            }
        }
        Ok(())
    }

    /// Runs the prompt (the cache must be empty); the last output row, or all rows.
    pub fn prefill(
        &mut self,
        tokens: &[i32],
        types: Option<&[i32]>,
        all_rows: bool,
    ) -> Result<Vec<f32>, RuntimeError> {
        if self.pos != 0 {
            return Err(call_err("prefill", "the cache is not empty; reset first"));
        }
        self.check_tokens("prefill", tokens, types)?;
        let zeros = vec![0; tokens.len()];
        let p = &self.model.program;
        let g = if all_rows { &p.prefill_all } else { &p.prefill };
        let out = self.device.run(g, tokens.len(), 0, tokens, types.unwrap_or(&zeros))?;
        self.pos = tokens.len();
        let rows = if all_rows { tokens.len() } else { 1 };
        crate::check_finite(&out, out.len() / rows, || format!("prefill of {} tokens", tokens.len()))?;
        Ok(out)
    }

    /// Runs one token at the next position; one output row.
    pub fn decode(&mut self, token: i32) -> Result<Vec<f32>, RuntimeError> {
        let Some(g) = &self.model.program.decode else {
            return Err(call_err("decode", "the model has no decode step (bidirectional attention)"));
        };
        if self.pos == 0 {
            return Err(call_err("decode", "the cache is empty; prefill first"));
        }
        self.check_tokens("decode", &[token], None)?;
        let out = self.device.run(g, 1, self.pos, &[token], &[0])?;
        let position = self.pos;
        self.pos += 1;
        crate::check_finite(&out, out.len(), || format!("decode at position {position}"))?;
        Ok(out)
    }

    pub fn reset(&mut self) -> Result<(), RuntimeError> {
        self.pos = 0;
        self.device.clear_cache()
    }

    pub fn position(&self) -> usize {
        self.pos
    }
}
