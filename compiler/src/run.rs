//! `tfc run` and `tfc bench`: running a spec with the reference interpreter or as a
//! compiled library through the runtime crate.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};

use tfc::backend::{compile_library, LibOptions};
use tfc::interp::{self, WeightSource, Weights};
use tfc::Options;
use tfc_runtime::{Checkpoint, Model, Sampler, WeightData};

#[derive(Clone, Copy, PartialEq, ValueEnum)]
pub enum Backend {
    /// Native code from the LLVM backend, run through the runtime crate.
    Llvm,
    /// Native code from the MLIR backend (linalg), run through the runtime crate.
    Mlir,
    /// The reference interpreter.
    Interp,
}

/// Storage types for weight matrices that the compiled library reads.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, PartialEq, ValueEnum)]
pub enum WeightDType {
    F32,
    Bf16,
    /// int8 with one f32 scale per 32 weights (matrices whose rows are a multiple of 32).
    Q8,
    /// ggml's Q4_0: 4-bit, one f16 scale per 32 weights.
    #[value(name = "q4_0")]
    Q4_0,
    /// ggml's Q4_1: 4-bit, an f16 scale and offset per 32 weights.
    #[value(name = "q4_1")]
    Q4_1,
    /// ggml's Q4_K: 4-bit in super-blocks of 256, 6-bit scales and offsets per 32 (rows
    /// that are not whole super-blocks take q4_0).
    #[value(name = "q4_k")]
    Q4_K,
    /// ggml's Q2_K: 2-bit in super-blocks of 256, 4-bit scales and offsets per 16 (rows
    /// that are not whole super-blocks take q4_0).
    #[value(name = "q2_k")]
    Q2_K,
    /// ggml's Q3_K: 3-bit in super-blocks of 256, 6-bit scales per 16 (rows that are not
    /// whole super-blocks take q4_0).
    #[value(name = "q3_k")]
    Q3_K,
    /// ggml's Q5_0: 5-bit, one f16 scale per 32 weights.
    #[value(name = "q5_0")]
    Q5_0,
    /// ggml's Q5_1: 5-bit, an f16 scale and offset per 32 weights.
    #[value(name = "q5_1")]
    Q5_1,
    /// ggml's Q5_K: 5-bit in super-blocks of 256, 6-bit scales and offsets per 32 (rows
    /// that are not whole super-blocks take q5_0).
    #[value(name = "q5_k")]
    Q5_K,
    /// ggml's Q6_K: 6-bit in super-blocks of 256, an int8 scale per 16 (rows that are not
    /// whole super-blocks take q8).
    #[value(name = "q6_k")]
    Q6_K,
    /// ggml's Q8_0: int8 with one f16 scale per 32 weights (matrices whose rows are a
    /// multiple of 32).
    #[value(name = "q8_0")]
    Q8_0,
}

impl From<WeightDType> for tfc::ir::DType {
    fn from(d: WeightDType) -> Self {
        match d {
            WeightDType::F32 => tfc::ir::DType::F32,
            WeightDType::Bf16 => tfc::ir::DType::BF16,
            WeightDType::Q8 => tfc::ir::DType::Q8,
            WeightDType::Q4_0 => tfc::ir::DType::Quant(tfc::ir::Quant::Q4_0),
            WeightDType::Q4_1 => tfc::ir::DType::Quant(tfc::ir::Quant::Q4_1),
            WeightDType::Q4_K => tfc::ir::DType::Quant(tfc::ir::Quant::Q4_K),
            WeightDType::Q2_K => tfc::ir::DType::Quant(tfc::ir::Quant::Q2_K),
            WeightDType::Q3_K => tfc::ir::DType::Quant(tfc::ir::Quant::Q3_K),
            WeightDType::Q5_0 => tfc::ir::DType::Quant(tfc::ir::Quant::Q5_0),
            WeightDType::Q5_1 => tfc::ir::DType::Quant(tfc::ir::Quant::Q5_1),
            WeightDType::Q5_K => tfc::ir::DType::Quant(tfc::ir::Quant::Q5_K),
            WeightDType::Q6_K => tfc::ir::DType::Quant(tfc::ir::Quant::Q6_K),
            WeightDType::Q8_0 => tfc::ir::DType::Quant(tfc::ir::Quant::Q8_0),
        }
    }
}

/// What linear maps multiply their weights by.
#[derive(Clone, Copy, PartialEq, ValueEnum)]
pub enum ActDType {
    /// The f32 activations as they are.
    F32,
    /// The activations rounded to bf16 (ties to even).
    Bf16,
    /// The inputs of linear maps with block weights (q8, the ggml formats) rounded to
    /// 8-bit integers per 32 values times max|x|/127, which the kernels may multiply as
    /// integers, as llama.cpp does.
    Q8,
}

/// The precision overrides of `compile`, `ir`, `run` and `bench`.
#[derive(Args, Clone, Copy, Default)]
pub struct Precision {
    /// Store weight matrices as this type instead of the spec's `dtype` (an f32
    /// checkpoint is converted once when it is bound).
    #[arg(long, value_enum)]
    pub dtype: Option<WeightDType>,
    /// Round the inputs of linear maps to bf16, or those with block weights to q8, or
    /// neither, instead of following the spec's `activations`.
    #[arg(long, value_enum)]
    pub activations: Option<ActDType>,
    /// Compile for this context length instead of the spec's `max_seq` (the KV cache's
    /// capacity; longrope picks its factors by it).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_seq: Option<u32>,
}

impl Precision {
    pub fn options(&self) -> Options {
        let activations = self.activations.map(|a| match a {
            ActDType::F32 => tfc::ir::DType::F32,
            ActDType::Bf16 => tfc::ir::DType::BF16,
            ActDType::Q8 => tfc::ir::DType::Q8,
        });
        Options {
            weight_dtype: self.dtype.map(Into::into),
            activations,
            max_seq: self.max_seq.map(|n| n as usize),
            ..Options::default()
        }
    }

    /// A key for the library cache.
    fn key(&self) -> String {
        let o = self.options();
        let name = |d: Option<tfc::ir::DType>| d.map_or("spec", |d| d.name());
        let seq = o.max_seq.map_or("spec".into(), |n| n.to_string());
        format!("{}/{}/{seq}", name(o.weight_dtype), name(o.activations))
    }
}

#[derive(Args)]
pub struct RunArgs {
    /// The spec file (`.tfs`), or a GGUF file or a Hugging Face folder (`config.json`,
    /// safetensors, `tokenizer.json`): imported, and its weights and tokenizer used.
    spec: PathBuf,
    /// A safetensors checkpoint: a folder with `model.safetensors` (or shards) and
    /// optionally `tokenizer.json`, or a file. Without it, random weights from `--seed`.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// The prompt's token ids, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        num_args = 1..,
        required_unless_present_any = ["prompt", "chat"],
        conflicts_with_all = ["prompt", "chat"]
    )]
    tokens: Vec<i32>,
    /// The prompt as text, tokenised with the checkpoint's tokenizer (the folder's
    /// `tokenizer.json`, or the GGUF file's); the generated text is printed as it is
    /// produced, and generation stops at the end-of-sequence token.
    #[arg(long, conflicts_with = "chat")]
    prompt: Option<String>,
    /// A question, written into the model's chat template as the user's message (the
    /// GGUF file's template); the answer is printed as it is produced and ends at the
    /// end of the turn, or after `--generate` tokens.
    #[arg(long)]
    chat: Option<String>,
    /// Token type (segment) ids for encoders, comma-separated; zeros by default.
    #[arg(long, value_delimiter = ',')]
    token_types: Vec<i32>,
    /// How many tokens to generate after the prompt (with a text prompt: at most that
    /// many, stopping at the end of the sequence).
    #[arg(long, visible_alias = "max-tokens", default_value_t = 0)]
    generate: usize,
    /// With a text prompt, stop when the answer contains this text (which is not
    /// printed); may be given several times.
    #[arg(long, value_name = "TEXT")]
    stop: Vec<String>,
    /// Write the output rows of every computed position (logits, or an encoder's hidden
    /// states): safetensors, or JSON when the name ends in `.json`.
    #[arg(long, value_name = "FILE")]
    logits: Option<PathBuf>,
    /// Which implementation runs the model.
    #[arg(long, value_enum, default_value_t = Backend::Llvm)]
    backend: Backend,
    /// Where compiled code runs: `cpu` (a shared library from `--backend`), or the MLIR
    /// backend's GPU kernels through `vulkan` or `cuda` (where a driver exists).
    #[arg(long, value_enum, default_value_t = tfc::backend::Target::Cpu)]
    target: tfc::backend::Target,
    #[command(flatten)]
    sampling: Sampling,
    /// Seed for random weights and for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Before running, read every weight the model uses from `--weights` and fail,
    /// naming each tensor, if any is missing, of another shape, or holds NaN or infinity.
    #[arg(long, requires = "weights")]
    check_weights: bool,
    /// Threads for the compiled library: 1 to 256, or 0 for one per core.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// The CPU the library is compiled for (`native` or an LLVM CPU name).
    #[arg(long, default_value = "native")]
    target_cpu: String,
    #[command(flatten)]
    precision: Precision,
}

/// One model being run, whatever runs it.
enum Engine<'a> {
    Interp(interp::Session<'a>),
    Lib(tfc_runtime::Session<'a>),
    Gpu(tfc_runtime::gpu::GpuSession<'a>),
}

impl Engine<'_> {
    /// Output rows of the prompt (the last, or all). Every engine's rows are checked to be
    /// finite (`tfc_runtime::check_finite`): the runtime's sessions check their own.
    fn prefill(&mut self, tokens: &[i32], types: &[i32], all: bool) -> Result<Vec<Vec<f32>>> {
        let asked = if all { tokens.len() } else { 1 };
        let (out, rows) = match self {
            Engine::Interp(s) => {
                let t: Vec<i64> = tokens.iter().map(|&x| x as i64).collect();
                let ty: Vec<i64> = types.iter().map(|&x| x as i64).collect();
                let out = s.prefill(&t, &ty, all)?;
                let rows = out.shape[0];
                tfc_runtime::check_finite(&out.data, out.shape[1], || {
                    format!("prefill of {} tokens", tokens.len())
                })?;
                (out.data, rows)
            }
            Engine::Lib(s) => (s.prefill(tokens, (!types.is_empty()).then_some(types), all)?, asked),
            Engine::Gpu(s) => (s.prefill(tokens, (!types.is_empty()).then_some(types), all)?, asked),
        };
        Ok(out.chunks(out.len() / rows).map(<[f32]>::to_vec).collect())
    }

    /// One output row at `position`.
    fn decode(&mut self, token: i32, position: usize) -> Result<Vec<f32>> {
        Ok(match self {
            Engine::Interp(s) => {
                let row = s.decode(token as i64)?.data;
                tfc_runtime::check_finite(&row, row.len(), || format!("decode at position {position}"))?;
                row
            }
            Engine::Lib(s) => s.decode(token)?,
            Engine::Gpu(s) => s.decode(token)?,
        })
    }
}

/// Compiles a spec into the user's cache (once per spec text and CPU) and loads it.
impl Backend {
    fn codegen(self) -> tfc::backend::Backend {
        match self {
            Backend::Mlir => tfc::backend::Backend::Mlir,
            _ => tfc::backend::Backend::Llvm,
        }
    }
}

/// Builds the GPU kernels of a spec into the user's cache (once per spec text and
/// target) and loads them.
fn load_gpu(
    c: &tfc::Compiled,
    target: tfc::backend::Target,
    precision: Precision,
) -> Result<tfc_runtime::gpu::GpuModel> {
    let key = format!("{target:?}\n{}\n{}\n{}", precision.key(), build_id(), c.source);
    let dir = cache_dir().join(tfc_runtime::abi::fnv1a(&key));
    if !dir.join(tfc_runtime::gpu::program::PROGRAM_FILE).is_file() {
        let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
        tfc::backend::compile_gpu(c, &tmp, target)?;
        if std::fs::rename(&tmp, &dir).is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
    Ok(tfc_runtime::gpu::GpuModel::load(&dir)?)
}

/// Which compiler built a cached library: the version and this executable's size and
/// modification time, so a rebuilt `tfc` never reuses what an older one compiled.
fn build_id() -> String {
    let meta = std::env::current_exe().and_then(std::fs::metadata);
    let stamp = meta
        .map(|m| {
            let t = m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
            format!("{}:{}", m.len(), t.map_or(0, |d| d.as_nanos()))
        })
        .unwrap_or_default();
    format!("{} {stamp}", env!("CARGO_PKG_VERSION"))
}

fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("tfc")
}

fn load_library(
    c: &tfc::Compiled,
    cpu: &str,
    precision: Precision,
    backend: tfc::backend::Backend,
) -> Result<Model> {
    let key = format!("{cpu}\n{}\n{}\n{}\n{}", precision.key(), backend.name(), build_id(), c.source);
    let dir = cache_dir().join(tfc_runtime::abi::fnv1a(&key));
    // An entry is used only if it loads: the loader checks the library's bytes against the
    // manifest's hash and the manifest against the library. A damaged entry (truncated,
    // replaced, half deleted) is moved aside and built again.
    if dir.exists() {
        match Model::load(&dir) {
            Ok(m) => return Ok(m),
            Err(e) => {
                eprintln!("tfc: the cached library {} is unusable ({e}); building it again", dir.display());
                let aside = dir.with_extension(format!("broken{}", std::process::id()));
                if std::fs::rename(&dir, &aside).is_ok() {
                    let _ = std::fs::remove_dir_all(&aside);
                }
            }
        }
    }
    // Build beside it and rename into place, so that a concurrent or interrupted run
    // never sees half a library.
    let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    compile_library(c, &tmp, &LibOptions { backend, target_cpu: Some(cpu.to_string()) })?;
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another run finished first; use its library.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    Model::load(&dir).with_context(|| format!("cannot load the library built in {}", dir.display()))
}

/// Every weight the graphs read, once, with its shape.
fn graph_weights<'g>(graphs: &[&'g tfc::ir::Graph]) -> Vec<(&'g str, Vec<usize>)> {
    let mut weights: Vec<(&str, Vec<usize>)> = graphs
        .iter()
        .flat_map(|g| {
            g.node_ids().into_iter().filter_map(move |n| match g.op(n) {
                tfc::ir::Op::Weight { name, .. } => {
                    Some((name.as_str(), g.ty(n).shape.iter().map(|d| d.c).collect()))
                }
                _ => None,
            })
        })
        .collect();
    weights.sort();
    weights.dedup();
    weights
}

/// Bytes of every weight the graphs read, as f32 (saturating).
fn f32_weight_bytes(graphs: &[&tfc::ir::Graph]) -> u64 {
    graph_weights(graphs)
        .iter()
        .map(|(_, shape)| shape.iter().fold(4u64, |a, &d| a.saturating_mul(d as u64)))
        .fold(0, u64::saturating_add)
}

/// Fails, naming every tensor the graphs read that is missing, of another shape, or
/// holds NaN or infinity.
pub fn check_weights(ck: &Checkpoint, graphs: &[&tfc::ir::Graph]) -> Result<()> {
    let mut bad = Vec::new();
    for (name, shape) in graph_weights(graphs) {
        if let Err(e) = ck.raw(name, &shape) {
            bad.push(e.to_string());
        } else if let Some((count, first, value)) = ck.non_finite(name)? {
            bad.push(format!("`{name}`: {count} non-finite values, the first {value} at flat index {first}"));
        }
    }
    if !bad.is_empty() {
        bail!("the checkpoint does not hold the model's weights as they should be:\n  {}", bad.join("\n  "));
    }
    Ok(())
}

/// Checks the arguments of `tfc run` that do not need the model, each error with the value.
fn check_run_args(a: &RunArgs) -> Result<()> {
    a.sampling.check()?;
    check_threads(a.threads)
}

/// How `run` and `chat` pick each next token.
#[derive(Args, Clone, Copy)]
pub struct Sampling {
    /// Sampling temperature; 0 (the default) is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sample only among the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample only among the most likely tokens whose probability reaches p.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
}

impl Sampling {
    fn check(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            bail!("--temperature {}: it must be a finite number ≥ 0 (0 is greedy)", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("--top-p {}: it must be in (0, 1]", self.top_p);
        }
        Ok(())
    }

    fn sampler(&self, seed: u64) -> Sampler {
        if self.temperature > 0.0 {
            Sampler::sample(self.temperature, self.top_k, self.top_p, seed)
        } else {
            Sampler::Greedy
        }
    }
}

/// `--threads` of `run` and `bench`: at most the ABI's cap, 0 meaning one per core.
fn check_threads(threads: usize) -> Result<()> {
    if threads > tfc_runtime::abi::MAX_THREADS {
        bail!(
            "--threads {threads}: at most {} (0: one per core; this machine has {})",
            tfc_runtime::abi::MAX_THREADS,
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
    }
    Ok(())
}

/// Checks the prompt against the model before anything runs: ids inside the vocabulary,
/// and room in the cache for the prompt and every generated token fed back.
fn check_prompt(a: &RunArgs, spec: &tfc::front::Spec, tokens: &[i32]) -> Result<()> {
    let (vocab, max_seq) = (spec.sizes.vocab, spec.sizes.max_seq);
    if tokens.is_empty() {
        bail!("the prompt has no tokens");
    }
    if let Some((at, id)) = tokens.iter().enumerate().find(|(_, &t)| t < 0 || t as usize >= vocab) {
        bail!("token id {id} (prompt position {at}) is outside the vocabulary of {vocab} (ids 0..{vocab})");
    }
    if !a.token_types.is_empty() && a.token_types.len() != tokens.len() {
        bail!(
            "--token-types has {} ids for {} tokens: one per token is needed",
            a.token_types.len(),
            tokens.len()
        );
    }
    // The last generated token is not fed back, so it needs no position.
    let needed = tokens.len() + a.generate.saturating_sub(1);
    if needed > max_seq {
        bail!(
            "the prompt's {} tokens and --generate {} need {needed} positions, but `{}` has max_seq {max_seq}: \
             shorten the prompt, generate fewer tokens, or raise max_seq in the spec",
            tokens.len(),
            a.generate,
            spec.name
        );
    }
    Ok(())
}

/// Where `--logits` goes, made writable before the run (a bad path fails at once, not
/// after the model has run); removed again if the run fails.
struct OutFile {
    path: PathBuf,
    created: bool,
    done: bool,
}

impl OutFile {
    fn open(path: &Path) -> Result<OutFile> {
        let created = !path.exists();
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("cannot write --logits {}", path.display()))?;
        Ok(OutFile { path: path.to_path_buf(), created, done: false })
    }
}

impl Drop for OutFile {
    fn drop(&mut self) {
        if self.created && !self.done {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Runs one slow step of getting a model ready (importing, compiling, loading, binding)
/// under a spinner on stderr that says what it is doing and, when it is done, how long it
/// took; nothing is drawn when stderr is not a terminal.
fn step<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return f();
    }
    let bar = indicatif::ProgressBar::new_spinner().with_message(what.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(100));
    let t = Instant::now();
    let r = f();
    bar.finish_and_clear();
    if r.is_ok() {
        eprintln!("{what}: {:.1} s", t.elapsed().as_secs_f64());
    }
    r
}

/// Compiles a spec file with the precision of the command line.
fn compile(spec: &Path, opts: &Options) -> Result<tfc::Compiled> {
    let source = std::fs::read_to_string(spec).with_context(|| format!("cannot read {}", spec.display()))?;
    Ok(tfc::compile(&spec.display().to_string(), &source, opts, &mut |_, _| {})?)
}

/// A model as `chat` and `serve` open it: a GGUF file or a Hugging Face folder (its spec
/// imported), or a spec file with a checkpoint (`weights`); compiled into a library
/// (cached), its weights mapped, its text side read.
pub(crate) struct Opened {
    pub c: tfc::Compiled,
    pub model: Model,
    pub ck: Arc<Checkpoint>,
    pub text: tfc::text::Text,
    /// The folder the checkpoint is, if it is one.
    pub dir: Option<PathBuf>,
}

pub(crate) fn open(path: &Path, weights: Option<&Path>, precision: Precision, cpu: &str) -> Result<Opened> {
    let gguf = tfc_runtime::checkpoint::is_gguf(path);
    let hf = path.is_dir() && path.join("config.json").is_file();
    let c = if gguf || hf {
        let text = step("importing", || {
            if gguf {
                return import_gguf(path);
            }
            let config = path.join("config.json");
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("cannot read {}", config.display()))?;
            tfc::import::hf::import(&text).with_context(|| format!("cannot import {}", config.display()))
        })?;
        let name = format!("{} (imported)", path.display());
        step("compiling the graphs", || {
            Ok(tfc::compile(&name, &text, &precision.options(), &mut |_, _| {})?)
        })?
    } else if path.is_dir() {
        bail!(
            "{} is a folder without a config.json: give a GGUF file, a Hugging Face folder, or a spec",
            path.display()
        );
    } else {
        step("compiling the graphs", || compile(path, &precision.options()))?
    };
    let weights = match weights {
        Some(w) => w.to_path_buf(),
        None if gguf || hf => path.to_path_buf(),
        None => bail!("{} is a spec: give its checkpoint with --weights", path.display()),
    };
    let ck = Arc::new(Checkpoint::open(&weights)?);
    let dir = weights.is_dir().then_some(weights);
    let text = tfc::text::Text::of(&ck, dir.as_deref())?;
    let model = step("compiling and loading the library", || {
        load_library(&c, cpu, precision, tfc::backend::Backend::Llvm)
    })?;
    model
        .needs()
        .check(&c.spec.name, "as stored in the library", c.spec.sizes.max_seq)
        .map_err(anyhow::Error::msg)?;
    Ok(Opened { c, model, ck, text, dir })
}

/// The spec of the model in a GGUF file.
pub fn import_gguf(file: &Path) -> Result<String> {
    let ck = Checkpoint::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let g = ck.gguf().with_context(|| format!("{} is not a GGUF file", file.display()))?;
    Ok(tfc::import::gguf::import(g, &file.display().to_string())?)
}

pub fn run(a: RunArgs) -> Result<()> {
    check_run_args(&a)?;
    // A GGUF file in place of the spec: its own spec, and its weights unless others are
    // given.
    let gguf = tfc_runtime::checkpoint::is_gguf(&a.spec);
    // A Hugging Face folder in place of the spec: imported from its config.json, its
    // checkpoint and tokenizer used.
    let hf = a.spec.is_dir() && a.spec.join("config.json").is_file();
    let imported = if gguf {
        Some(step("importing", || import_gguf(&a.spec))?)
    } else if hf {
        let config = a.spec.join("config.json");
        let text =
            std::fs::read_to_string(&config).with_context(|| format!("cannot read {}", config.display()))?;
        Some(tfc::import::hf::import(&text).with_context(|| format!("cannot import {}", config.display()))?)
    } else {
        None
    };
    let c = step("compiling the graphs", || match &imported {
        Some(text) => {
            let name = format!("{} (imported)", a.spec.display());
            Ok(tfc::compile(&name, text, &a.precision.options(), &mut |_, _| {})?)
        }
        None => compile(&a.spec, &a.precision.options()),
    })?;
    let weights = a.weights.clone().or_else(|| (gguf || hf).then(|| a.spec.clone()));
    let checkpoint = match &weights {
        Some(dir) => Some(Arc::new(Checkpoint::open(dir)?)),
        None => None,
    };

    let text_mode = a.prompt.is_some() || a.chat.is_some();
    let gguf_file = checkpoint.as_ref().and_then(|ck| ck.gguf());
    let tokenizer = match (text_mode, gguf_file) {
        (false, _) => None,
        (true, Some(g)) => Some(
            tfc::text::gguf_tokenizer(g)?
                .with_context(|| format!("{} holds no tokenizer", g.path().display()))?,
        ),
        (true, None) => {
            let dir = weights
                .as_ref()
                .filter(|w| w.is_dir())
                .context("--prompt needs --weights DIR with a tokenizer.json, or a GGUF file")?;
            let path = dir.join("tokenizer.json");
            let t = tokenizers::Tokenizer::from_file(&path)
                .map_err(|e| anyhow::anyhow!("cannot load {}: {e}", path.display()))?;
            Some(t)
        }
    };
    // The text the model reads: the prompt, or the question in the chat template.
    let text = match (&a.prompt, &a.chat) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(q)) => {
            let tpl = match gguf_file {
                Some(g) => tfc::text::ChatTemplate::from_gguf(g),
                None => weights.as_deref().and_then(tfc::text::ChatTemplate::from_hf_dir),
            }
            .context("--chat needs a chat template: a GGUF file's `tokenizer.chat_template`, or a folder's `chat_template.jinja` or `tokenizer_config.json`")?;
            Some(tpl.render(&[("user".to_string(), q.clone())], true)?)
        }
        _ => None,
    };
    let stop_ids: Vec<i32> = match gguf_file {
        Some(g) if text_mode => tfc::text::gguf_stop_ids(g).into_iter().map(|i| i as i32).collect(),
        _ if text_mode => weights
            .as_deref()
            .map(|d| tfc::text::hf_stop_ids(d).into_iter().map(|i| i as i32).collect())
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    let tokens: Vec<i32> = match (&text, &tokenizer) {
        (Some(text), Some(t)) => {
            // A template writes its own special tokens; a raw prompt gets what the
            // tokenizer adds (a GGUF file's BOS, if it asks for one).
            let enc = t
                .encode(text.as_str(), a.chat.is_none() && gguf_file.is_none())
                .map_err(|e| anyhow::anyhow!("cannot tokenise the prompt: {e}"))?;
            let bos = gguf_file.filter(|_| a.chat.is_none()).and_then(tfc::text::gguf_bos);
            bos.into_iter().map(|i| i as i32).chain(enc.get_ids().iter().map(|&i| i as i32)).collect()
        }
        _ => a.tokens.clone(),
    };
    if a.generate > 0 && c.decode.is_none() {
        bail!("`{}` has bidirectional attention and cannot generate", c.spec.name);
    }
    check_prompt(&a, &c.spec, &tokens)?;
    let mut logits_file = a.logits.as_deref().map(OutFile::open).transpose()?;
    let mut graphs = vec![&c.prefill];
    graphs.extend(c.decode.as_ref());
    if let (Some(ck), true) = (&checkpoint, a.check_weights) {
        check_weights(ck, &graphs)?;
    }
    let interp_weights;
    let model;
    let gpu_model;
    // Memory is checked before weights are made or read: random weights are made in f32
    // (and copied once), and the interpreter holds f32 copies of any weights.
    let f32_bytes = f32_weight_bytes(&graphs);
    let random_bytes = if checkpoint.is_none() { f32_bytes.saturating_mul(2) } else { 0 };
    let random = |names: Vec<String>| -> Result<WeightData> {
        let w = Weights::bind(&graphs, &WeightSource::RandomF32 { seed: a.seed })?;
        let bufs: Result<Vec<Vec<f32>>, _> = names.iter().map(|n| w.get(n).map(|t| t.data.clone())).collect();
        Ok(WeightData::Owned(bufs?))
    };
    if a.target != tfc::backend::Target::Cpu && a.backend == Backend::Interp {
        bail!("--target {:?} runs compiled kernels; it does not combine with --backend interp", a.target);
    }
    let mut engine = match a.backend {
        _ if a.target != tfc::backend::Target::Cpu => {
            if a.precision.dtype.is_some() {
                bail!("--dtype applies to CPU libraries; GPU kernels read f32 weights");
            }
            gpu_model =
                step("compiling and loading the GPU kernels", || load_gpu(&c, a.target, a.precision))?;
            let data = match &checkpoint {
                Some(ck) => WeightData::Checkpoint(ck.clone()),
                None => random(gpu_model.program().weights.iter().map(|w| w.name.clone()).collect())?,
            };
            Engine::Gpu(tfc_runtime::gpu::GpuSession::new(&gpu_model, data)?)
        }
        Backend::Interp => {
            let sz = &c.spec.sizes;
            let cache = [sz.layers, 2, sz.kv_heads, sz.head_dim, sz.max_seq, 4]
                .iter()
                .fold(1u64, |a, &x| a.saturating_mul(x as u64));
            let needs =
                tfc_runtime::memory::Needs { weights: f32_bytes.max(random_bytes), cache, scratch: 0 };
            needs.check(&c.spec.name, "f32 in the interpreter", sz.max_seq).map_err(anyhow::Error::msg)?;
            let source = match &checkpoint {
                Some(ck) => WeightSource::Checkpoint(ck),
                None => WeightSource::Random { seed: a.seed },
            };
            interp_weights = step("binding the weights", || Ok(Weights::bind(&graphs, &source)?))?;
            Engine::Interp(interp::Session::new(&c, &interp_weights))
        }
        Backend::Llvm | Backend::Mlir => {
            model = step("compiling and loading the library", || {
                load_library(&c, &a.target_cpu, a.precision, a.backend.codegen())
            })?;
            let mut needs = model.needs();
            needs.weights = needs.weights.saturating_add(random_bytes);
            let what =
                if checkpoint.is_some() { "as stored in the library" } else { "made in f32, then stored" };
            needs.check(&c.spec.name, what, c.spec.sizes.max_seq).map_err(anyhow::Error::msg)?;
            let data = match &checkpoint {
                Some(ck) => WeightData::Checkpoint(ck.clone()),
                None => random(model.manifest().weights.iter().map(|w| w.name.clone()).collect())?,
            };
            Engine::Lib(step("binding the weights", || {
                Ok(tfc_runtime::Session::new(&model, data, a.threads)?)
            })?)
        }
    };
    let mut rows = engine.prefill(&tokens, &a.token_types, a.logits.is_some())?;
    let mut sampler = a.sampling.sampler(a.seed);
    let mut generated: Vec<i32> = Vec::new();
    let mut shown = String::new();
    let mut stopped = false;
    for _ in 0..a.generate {
        let next = sampler.next(rows.last().unwrap()) as i32;
        if stop_ids.contains(&next) {
            stopped = true;
            break;
        }
        generated.push(next);
        if let Some(t) = &tokenizer {
            let ids: Vec<u32> = generated.iter().map(|&i| i as u32).collect();
            let text = t.decode(&ids, true).map_err(|e| anyhow::anyhow!("cannot decode: {e}"))?;
            // Up to a stop string, and not the end that may yet become one.
            let cut = a.stop.iter().filter_map(|s| text.find(s.as_str())).min();
            let upto = cut.unwrap_or_else(|| text.len() - tfc::text::pending_stop(&text, &a.stop));
            let upto = (0..=upto).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
            if let Some(new) = text[..upto].strip_prefix(shown.as_str()) {
                print!("{new}");
                std::io::stdout().flush()?;
                shown = text[..upto].to_string();
            }
            if cut.is_some() {
                stopped = true;
                break;
            }
        }
        if generated.len() < a.generate {
            rows.push(engine.decode(next, tokens.len() + generated.len() - 1)?);
        }
    }
    if tokenizer.is_some() {
        println!();
        // Why generation ended, as OpenAI's `finish_reason` says it.
        eprintln!("[{}: {} tokens]", if stopped { "stop" } else { "length" }, generated.len());
    }
    // The ids too, for scripts; a chat's reader wants the answer only.
    if a.chat.is_none() {
        let ids: Vec<String> = generated.iter().map(|t| t.to_string()).collect();
        println!("{}", ids.join(","));
    }
    if let Some(f) = &mut logits_file {
        let name = c.prefill.outputs[0].0.name();
        write_rows(&f.path, &name, &rows)
            .with_context(|| format!("cannot write --logits {}", f.path.display()))?;
        f.done = true;
    }
    Ok(())
}

/// Writes rows as one `[n, width]` tensor.
fn write_rows(path: &Path, name: &str, rows: &[Vec<f32>]) -> Result<()> {
    let width = rows[0].len();
    let data: Vec<f32> = rows.iter().flatten().copied().collect();
    if path.extension().is_some_and(|e| e == "json") {
        let json = serde_json::json!({ name: rows });
        std::fs::write(path, serde_json::to_string(&json)?)?;
    } else {
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![rows.len(), width], &bytes)?;
        safetensors::serialize_to_file([(name, view)], None, path)?;
    }
    Ok(())
}

#[derive(Args)]
pub struct BenchArgs {
    /// The spec file (`.tfs`).
    spec: PathBuf,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 128)]
    prompt: usize,
    /// Tokens decoded after the prompt.
    #[arg(long, default_value_t = 64)]
    decode: usize,
    /// Measured repetitions (after one warm-up).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Threads: 1 to 256, or 0 for one per core.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// The CPU the library is compiled for.
    #[arg(long, default_value = "native")]
    target_cpu: String,
    /// The code generator of the library.
    #[arg(long, value_enum, default_value_t = tfc::backend::Backend::Llvm)]
    backend: tfc::backend::Backend,
    #[command(flatten)]
    precision: Precision,
    /// Also measure how cost grows: prefill latency for prompts of 32 to 1024 tokens and
    /// decode speed at contexts of 128, 512 and 1024 (as far as max_seq allows).
    #[arg(long)]
    sweep: bool,
    /// With --sweep: draw the two curves as an SVG file.
    #[arg(long, value_name = "FILE.svg", requires = "sweep")]
    plot: Option<PathBuf>,
    /// Also measure batched decode (what `tfc serve` runs): for each B, one step of B
    /// sequences, each in its own cache slot after a `--prompt` long prompt, through
    /// `decode_batch`, against B single decode steps, alternately.
    #[arg(long, value_name = "B,…", value_delimiter = ',')]
    batch: Vec<usize>,
    /// The machine's streaming read rate in GB/s (all threads), to report decode's share
    /// of the bandwidth roofline.
    #[arg(long, value_name = "GB/S")]
    peak_gb_s: Option<f64>,
    /// The machine's matrix-multiply peak in GFLOP/s for the storage type measured (an FMA
    /// or AMX rate), to report prefill's share of the compute roofline.
    #[arg(long, value_name = "GFLOP/S")]
    peak_gflop_s: Option<f64>,
    /// A safetensors checkpoint (a folder or a file) whose weights the libraries bind;
    /// without it, random weights.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Also measure the library in DIR (`tfc compile` of the same model, by another build
    /// of tfc or with other options), with the same weights, each run next to one of the
    /// main library (alternately before and after it), and report the ratio of each
    /// pair: a comparison that a machine whose speed drifts between runs leaves intact.
    #[arg(long, value_name = "DIR")]
    against: Option<PathBuf>,
}

/// Prefill times (ms) of `prompt` tokens and decode speeds (tok/s) of `decode` tokens after
/// them, one of each per run after a warm-up, and the tokens the last run generated.
fn measure(
    s: &mut tfc_runtime::Session,
    vocab: usize,
    prompt: usize,
    decode: usize,
    runs: usize,
) -> Result<Samples> {
    let mut out = Samples::default();
    for run in 0..=runs {
        let sample = measure_once(s, vocab, prompt, decode)?;
        if run > 0 {
            out.add(sample);
        }
    }
    Ok(out)
}

/// One run: the prefill time (ms) of `prompt` tokens, the decode speed (tok/s) of
/// `decode` tokens after them, and the tokens generated greedily (the prefill's, then each
/// decode step's).
fn measure_once(
    s: &mut tfc_runtime::Session,
    vocab: usize,
    prompt: usize,
    decode: usize,
) -> Result<(f64, f64, Vec<i32>)> {
    let tokens: Vec<i32> = (0..prompt).map(|i| (i * 31 % vocab) as i32).collect();
    s.reset();
    let t = Instant::now();
    let logits = s.prefill(&tokens, None, false)?;
    let p = t.elapsed().as_secs_f64();
    let mut next = tfc_runtime::argmax(&logits) as i32;
    let mut generated = Vec::with_capacity(decode + 1);
    generated.push(next);
    let t = Instant::now();
    for _ in 0..decode {
        next = tfc_runtime::argmax(&s.decode(next)?) as i32;
        generated.push(next);
    }
    Ok((p * 1e3, decode as f64 / t.elapsed().as_secs_f64(), generated))
}

/// Prefill times (ms) and decode speeds (tok/s), one of each per run, and the tokens the
/// last run generated.
#[derive(Default)]
struct Samples {
    prefill: Vec<f64>,
    decode: Vec<f64>,
    tokens: Vec<i32>,
}

impl Samples {
    /// One run's prefill time, decode speed and tokens (`measure_once`).
    fn add(&mut self, (prefill, decode, tokens): (f64, f64, Vec<i32>)) {
        self.prefill.push(prefill);
        self.decode.push(decode);
        self.tokens = tokens;
    }
}

/// Runs `runs` pairs (after a warm-up pair) of the main session `a` and the session `b`
/// of the `--against` library, one right after the other: the samples of each.
fn measure_pairs<'m>(
    a: &mut tfc_runtime::Session<'m>,
    b: &mut tfc_runtime::Session<'m>,
    vocab: usize,
    prompt: usize,
    decode: usize,
    runs: usize,
) -> Result<(Samples, Samples)> {
    let (mut sa, mut sb) = (Samples::default(), Samples::default());
    for run in 0..=runs {
        // Every other pair the other way round, so that going first or second (a warm
        // cache, a clock that has ramped) favours neither.
        let mut pair = [(&mut *a, &mut sa), (&mut *b, &mut sb)];
        if run % 2 == 1 {
            pair.reverse();
        }
        for (s, to) in pair {
            let sample = measure_once(s, vocab, prompt, decode)?;
            if run > 0 {
                to.add(sample);
            }
        }
    }
    Ok((sa, sb))
}

/// A two-panel SVG line chart: prefill ms against prompt length, decode tok/s against context.
fn plot(path: &Path, title: &str, prefill: &[(usize, f64)], decode: &[(usize, f64)]) -> Result<()> {
    let panel = |x0: f64, pts: &[(usize, f64)], xl: &str, yl: &str| -> String {
        let (w, h) = (360.0, 240.0);
        let xmax = pts.iter().map(|p| p.0).max().unwrap_or(1) as f64;
        let ymax = pts.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-9) * 1.1;
        let xy = |p: &(usize, f64)| (x0 + 50.0 + p.0 as f64 / xmax * (w - 60.0), 45.0 + h - p.1 / ymax * h);
        let line: Vec<String> = pts.iter().map(&xy).map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let marks: String = pts
            .iter()
            .map(|p| {
                let (x, y) = xy(p);
                format!(
                    "<circle cx='{x:.1}' cy='{y:.1}' r='3'/><text x='{x:.1}' y='{:.1}' font-size='9' \
                     text-anchor='middle'>{:.1}</text><text x='{x:.1}' y='{:.1}' font-size='9' \
                     text-anchor='middle'>{}</text>",
                    y - 6.0,
                    p.1,
                    45.0 + h + 12.0,
                    p.0
                )
            })
            .collect();
        format!(
            "<polyline fill='none' stroke='black' points='{}'/>{marks}\
             <line x1='{a}' y1='{b}' x2='{c}' y2='{b}' stroke='gray'/><line x1='{a}' y1='45' x2='{a}' y2='{b}' stroke='gray'/>\
             <text x='{mx}' y='{ty}' font-size='11' text-anchor='middle'>{xl}</text>\
             <text x='{lx}' y='36' font-size='11'>{yl}</text>",
            line.join(" "),
            a = x0 + 50.0,
            b = 45.0 + h,
            c = x0 + w - 10.0,
            mx = x0 + w / 2.0,
            ty = 45.0 + h + 30.0,
            lx = x0 + 50.0,
        )
    };
    let svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='760' height='330' font-family='sans-serif'>\
         <rect width='100%' height='100%' fill='white'/><text x='10' y='14' font-size='12'>{title}</text>{}{}</svg>\n",
        panel(0.0, prefill, "prompt tokens", "prefill ms"),
        panel(380.0, decode, "context (tokens in the cache)", "decode tok/s"),
    );
    std::fs::write(path, svg).with_context(|| format!("cannot write {}", path.display()))
}

/// The multiply-adds of a graph's linear maps, as FLOPs, for `t` tokens in one call.
fn linear_flops(g: &tfc::ir::Graph, t: usize) -> f64 {
    let b = tfc::ir::SymBinding { t, p: 0 };
    g.node_ids()
        .into_iter()
        .map(|n| match g.op(n) {
            tfc::ir::Op::Linear { .. } => {
                let (x, w) = (g.ty(g.operands(n)[0]), g.ty(g.operands(n)[1]));
                let weights: usize = w.shape.iter().map(|d| d.eval(b)).product();
                2.0 * x.shape[0].eval(b) as f64 * weights as f64
            }
            // Each row runs its top_k experts' projections: gate, up, down.
            tfc::ir::Op::Experts(x) => {
                let d = g.ty(n).shape[1].eval(b) as f64;
                let parts = 2.0 + x.gated() as u8 as f64;
                let (k, _) = expert_share(g, n);
                2.0 * g.ty(n).shape[0].eval(b) as f64 * k as f64 * parts * d * x.hidden as f64
            }
            _ => 0.0,
        })
        .sum()
}

/// How many of a mixture's experts each row runs, of how many.
fn expert_share(g: &tfc::ir::Graph, n: tfc::ir::NodeId) -> (usize, usize) {
    let tfc::ir::Op::Experts(x) = g.op(n) else { return (1, 1) };
    match g.op(g.operands(n)[1]) {
        tfc::ir::Op::Route(r) => (r.top_k, x.experts),
        _ => (x.experts, x.experts),
    }
}

/// Median, min and max of a sample.
fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

pub fn bench(a: BenchArgs) -> Result<()> {
    check_threads(a.threads)?;
    if a.runs == 0 {
        bail!("--runs 0: at least one measured run is needed");
    }
    if a.prompt == 0 {
        bail!("--prompt 0: prefill needs at least one token");
    }
    // The sizes now, the positions once the library says its max_seq.
    check_batch(&a, usize::MAX)?;
    let t0 = Instant::now();
    let c = compile(&a.spec, &a.precision.options())?;
    let dir = tempdir()?;
    compile_library(&c, &dir, &LibOptions { backend: a.backend, target_cpu: Some(a.target_cpu.clone()) })?;
    let compile_s = t0.elapsed().as_secs_f64();
    let model = Model::load(&dir)?;
    let m = model.manifest().clone();
    if !m.has_decode {
        bail!("`{}` has no decode step to measure", m.name);
    }
    if a.prompt + a.decode > m.max_seq {
        bail!("{} + {} positions exceed max_seq {}", a.prompt, a.decode, m.max_seq);
    }
    check_batch(&a, m.max_seq)?;
    let weights = BenchWeights::new(&a, &c, &model)?;
    // The `--against` library: the same model, so the same weights, bound in its order.
    let other_model = match &a.against {
        None => None,
        Some(d) => Some((
            d,
            Model::load(d).with_context(|| format!("cannot load the --against library {}", d.display()))?,
        )),
    };
    let other = match &other_model {
        None => None,
        Some((d, o)) => Some(against_session(&a, &m, d, o, &weights)?),
    };
    let mine = weights.data(&mut m.weights.iter().map(|x| x.name.as_str()))?;
    drop(weights);
    let mut s = tfc_runtime::Session::new(&model, mine, a.threads)?;
    let (run, vs) = match other {
        None => (measure(&mut s, m.vocab, a.prompt, a.decode, a.runs)?, None),
        Some(mut o) => {
            let (run, other) = measure_pairs(&mut s, &mut o, m.vocab, a.prompt, a.decode, a.runs)?;
            // Each pair's ratio, the other library's over this one's.
            let ratio = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(x, y)| y / x).collect::<Vec<_>>();
            let r = (ratio(&run.prefill, &other.prefill), ratio(&run.decode, &other.decode));
            (run, Some(((other.prefill, other.decode), r)))
        }
    };
    report(&a, &c, &m, compile_s, run, vs, model.streaming_prefetch())?;
    if a.sweep {
        sweep(&a, &m, &mut s)?;
    }
    if !a.batch.is_empty() {
        batched(&a, &m, &mut s)?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The weights a benchmark binds: a checkpoint's, or random ones (the speed does not
/// depend on the values), bound to each library in its manifest's order.
enum BenchWeights {
    Checkpoint(Arc<Checkpoint>),
    Random(Weights),
}

impl BenchWeights {
    fn new(a: &BenchArgs, c: &tfc::Compiled, model: &Model) -> Result<BenchWeights> {
        Ok(match &a.weights {
            Some(dir) => BenchWeights::Checkpoint(Arc::new(Checkpoint::open(dir)?)),
            None => {
                let m = model.manifest();
                let mut needs = model.needs();
                needs.weights =
                    needs.weights.saturating_add(f32_weight_bytes(&[&c.prefill]).saturating_mul(2));
                needs.check(&m.name, "made in f32, then stored", m.max_seq).map_err(anyhow::Error::msg)?;
                BenchWeights::Random(Weights::bind(&[&c.prefill], &WeightSource::RandomF32 { seed: 1 })?)
            }
        })
    }

    fn data(&self, names: &mut dyn Iterator<Item = &str>) -> Result<WeightData> {
        Ok(match self {
            BenchWeights::Checkpoint(ck) => WeightData::Checkpoint(ck.clone()),
            BenchWeights::Random(w) => {
                WeightData::Owned(names.map(|n| w.get(n).map(|t| t.data.clone())).collect::<Result<_, _>>()?)
            }
        })
    }
}

/// A session of the `--against` library, which must be of the same model.
fn against_session<'m>(
    a: &BenchArgs,
    m: &tfc_runtime::abi::Manifest,
    dir: &Path,
    other: &'m Model,
    weights: &BenchWeights,
) -> Result<tfc_runtime::Session<'m>> {
    let om = other.manifest();
    let same = om.weights.len() == m.weights.len()
        && om.weights.iter().all(|x| m.weights.iter().any(|y| y.name == x.name && y.shape == x.shape));
    if !same || om.vocab != m.vocab || om.max_seq < a.prompt + a.decode {
        bail!(
            "the --against library {} is not of this model: its weights, vocabulary or max_seq differ from `{}`",
            dir.display(),
            a.spec.display()
        );
    }
    let ob = weights.data(&mut om.weights.iter().map(|x| x.name.as_str()))?;
    Ok(tfc_runtime::Session::new(other, ob, a.threads)?)
}

/// The bytes of the weights `names` (all of them with `None`) as the library stores them.
fn stored_bytes(m: &tfc_runtime::abi::Manifest, names: Option<&std::collections::HashSet<String>>) -> usize {
    m.weights
        .iter()
        .filter(|x| names.is_none_or(|n| n.contains(&x.name)))
        .map(|x| {
            let dtype = tfc::ir::DType::parse(&x.dtype).unwrap_or(tfc::ir::DType::F32);
            tfc::backend::weights::weight_bytes(&x.shape, dtype)
        })
        .sum()
}

/// Prefill and decode against another library's: its times, then each pair's ratios.
type Against = ((Vec<f64>, Vec<f64>), (Vec<f64>, Vec<f64>));

/// Prints what a benchmark measured, as text or JSON.
fn report(
    a: &BenchArgs,
    c: &tfc::Compiled,
    m: &tfc_runtime::abi::Manifest,
    compile_s: f64,
    run: Samples,
    vs: Option<Against>,
    prefetch: Option<tfc_runtime::Prefetch>,
) -> Result<()> {
    let (pre, dec, tokens) = (run.prefill, run.decode, run.tokens);
    let weight_bytes = stored_bytes(m, None);
    let (pm, pmin, pmax) = stats(pre);
    let (dm, dmin, dmax) = stats(dec);
    // A decode step reads every matrix of a linear map once (an embedding table only
    // for its gathered row, unless it is also the unembedding); the KV cache grows from
    // the prompt on and is not counted.
    let decode = c.decode.as_ref().expect("checked above: the model has a decode step");
    let mut read = std::collections::HashSet::new();
    for n in decode.node_ids() {
        if let tfc::ir::Op::Linear { .. } = decode.op(n) {
            if let tfc::ir::Op::Weight { name, .. } = decode.op(decode.operands(n)[1]) {
                read.insert(name.clone());
            }
        }
    }
    // A mixture's expert tensors are read for the experts the token is routed to only.
    let mut experts = std::collections::HashMap::new();
    for n in decode.node_ids() {
        if let tfc::ir::Op::Experts(_) = decode.op(n) {
            let (k, e) = expert_share(decode, n);
            for &w in &decode.operands(n)[2..] {
                if let tfc::ir::Op::Weight { name, .. } = decode.op(w) {
                    experts.insert(name.clone(), k as f64 / e as f64);
                }
            }
        }
    }
    let mut read_bytes = stored_bytes(m, Some(&read));
    for (name, share) in &experts {
        let one = std::collections::HashSet::from([name.clone()]);
        read_bytes += (stored_bytes(m, Some(&one)) as f64 * share) as usize;
    }
    let gbs = dm * read_bytes as f64 / 1e9;
    let params: usize = m.weights.iter().map(|x| x.shape.iter().product::<usize>()).sum();
    let flops = linear_flops(&c.prefill, a.prompt);
    let gflops = flops / (pm / 1e3) / 1e9;
    let precision = format!("{} weights, {} activations", c.spec.dtype.name(), c.spec.activations.name());
    if a.json {
        let j = serde_json::json!({
            "model": m.name, "prompt": a.prompt, "decode": a.decode, "runs": a.runs,
            "precision": precision, "compile_s": compile_s,
            "prefill_ms": {"median": pm, "min": pmin, "max": pmax},
            "decode_tok_s": {"median": dm, "min": dmin, "max": dmax},
            "decode_weight_gb_s": gbs, "decode_bytes_per_token": read_bytes,
            "decode_prefetch": prefetch.map(|p| p.name()), "prefill_gflop_s": gflops, "weight_bytes": weight_bytes,
            "decode_roofline_share": a.peak_gb_s.map(|p| gbs / p),
            "prefill_roofline_share": a.peak_gflop_s.map(|p| gflops / p),
            "prefill_gflop": flops / 1e9,
            "tokens": tokens,
            "against": vs.as_ref().map(|((p, d), (rp, rd))| {
                let (p, d, rp, rd) = (stats(p.clone()), stats(d.clone()), stats(rp.clone()), stats(rd.clone()));
                serde_json::json!({
                    "library": a.against.as_ref().map(|d| d.display().to_string()),
                    "prefill_ms": {"median": p.0, "min": p.1, "max": p.2},
                    "decode_tok_s": {"median": d.0, "min": d.1, "max": d.2},
                    "prefill_ms_ratio": {"median": rp.0, "min": rp.1, "max": rp.2},
                    "decode_tok_s_ratio": {"median": rd.0, "min": rd.1, "max": rd.2},
                })
            }),
        });
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    println!(
        "{}: {:.1} M parameters, {:.1} MB of weights, {precision}, compiled in {compile_s:.2} s, {} runs",
        m.name,
        params as f64 / 1e6,
        weight_bytes as f64 / 1e6,
        a.runs
    );
    let share = |x: f64, peak: Option<f64>| {
        peak.map_or(String::new(), |p| format!(" ({:.0}% of {p})", 100.0 * x / p))
    };
    println!(
        "prefill {} tokens: {pm:.2} ms (min {pmin:.2}, max {pmax:.2}), ~{gflops:.1} GFLOP/s in linear maps{}",
        a.prompt,
        share(gflops, a.peak_gflop_s)
    );
    let prefetch = match prefetch {
        Some(tfc_runtime::Prefetch::L1) => ", prefetched into L1",
        Some(tfc_runtime::Prefetch::L2) => ", prefetched into L2",
        Some(tfc_runtime::Prefetch::Off) => ", not prefetched",
        None => "",
    };
    println!(
        "decode {} tokens:  {dm:.2} tok/s (min {dmin:.2}, max {dmax:.2}), {gbs:.2} GB/s of weights{}{prefetch}",
        a.decode,
        share(gbs, a.peak_gb_s)
    );
    if let (Some(((p, d), (rp, rd))), Some(dir)) = (vs, &a.against) {
        let ((p, p0, p1), (d, d0, d1)) = (stats(p), stats(d));
        let ((rp, rp0, rp1), (rd, rd0, rd1)) = (stats(rp), stats(rd));
        println!("against {}, each run next to one of the above:", dir.display());
        println!(
            "prefill: {p:.2} ms (min {p0:.2}, max {p1:.2}), ×{rp:.3} per pair (min {rp0:.3}, max {rp1:.3})"
        );
        println!("decode:  {d:.2} tok/s (min {d0:.2}, max {d1:.2}), ×{rd:.3} per pair (min {rd0:.3}, max {rd1:.3})");
    }
    Ok(())
}

/// `--sweep`: prefill over growing prompts and decode at growing contexts, as a table
/// and, with `--plot`, an SVG.
fn sweep(a: &BenchArgs, m: &tfc_runtime::abi::Manifest, s: &mut tfc_runtime::Session) -> Result<()> {
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    for len in [32, 64, 128, 256, 512, 1024].into_iter().filter(|&l| l <= m.max_seq) {
        prefill.push((len, stats(measure(s, m.vocab, len, 0, a.runs)?.prefill)));
    }
    // 16 decoded tokens after a prompt that fills the cache to the context.
    for ctx in
        [128, 512, 1024].into_iter().map(|c: usize| c.min(m.max_seq.saturating_sub(16))).filter(|&c| c > 0)
    {
        if decode.iter().any(|(c, _)| *c == ctx) {
            continue;
        }
        decode.push((ctx, stats(measure(s, m.vocab, ctx, 16, a.runs)?.decode)));
    }
    println!("\nhow cost grows (median (min–max) of {} runs):", a.runs);
    println!("| prompt tokens | prefill ms |");
    println!("| --- | --- |");
    for (l, (med, lo, hi)) in &prefill {
        println!("| {l} | {med:.2} ({lo:.2}–{hi:.2}) |");
    }
    println!("| context | decode tok/s |");
    println!("| --- | --- |");
    for (c, (med, lo, hi)) in &decode {
        println!("| {c} | {med:.2} ({lo:.2}–{hi:.2}) |");
    }
    if let Some(path) = &a.plot {
        let pts = |v: &[(usize, (f64, f64, f64))]| v.iter().map(|(x, s)| (*x, s.0)).collect::<Vec<_>>();
        plot(path, &format!("{}: prefill latency and decode speed", m.name), &pts(&prefill), &pts(&decode))?;
    }
    Ok(())
}

/// Whether `--batch` can be measured, checked before anything is.
fn check_batch(a: &BenchArgs, max_seq: usize) -> Result<()> {
    if a.batch.iter().any(|&b| b == 0 || b > tfc_runtime::abi::MAX_SLOTS) {
        bail!("--batch: each size must be 1 to {}", tfc_runtime::abi::MAX_SLOTS);
    }
    // Each pair advances every sequence by two positions.
    if !a.batch.is_empty() && a.prompt + 2 * (a.runs + 1) > max_seq {
        bail!(
            "--batch: a {}-token prompt and {} pairs of steps exceed max_seq {}",
            a.prompt,
            a.runs + 1,
            max_seq
        );
    }
    Ok(())
}

/// Tokens/s of batched decode steps of B sequences against B single steps, per B of
/// `--batch`: after a warm-up pair, `--runs` pairs, the order alternating within the pair.
fn batched(a: &BenchArgs, m: &tfc_runtime::abi::Manifest, s: &mut tfc_runtime::Session) -> Result<()> {
    let most = a.batch.iter().copied().max().unwrap_or(0);
    // The session has slot 0; the others are added.
    let mut slots = 1;
    while slots < most {
        slots = s.add_slot()? + 1;
    }
    let prompt: Vec<i32> = (0..a.prompt).map(|i| ((i * 7919 + 13) % m.vocab) as i32).collect();
    let mut rows = Vec::new();
    for &b in &a.batch {
        for i in 0..b {
            s.use_slot(i)?;
            s.reset();
            s.prefill(&prompt, None, false)?;
        }
        let steps: Vec<(usize, i32)> = (0..b).map(|i| (i, prompt[i % prompt.len()])).collect();
        let (mut one, mut each) = (Vec::new(), Vec::new());
        for run in 0..=a.runs {
            let mut time = |batch: bool| -> Result<f64> {
                let t = Instant::now();
                if batch {
                    s.decode_batch(&steps)?;
                } else {
                    for &(i, tok) in &steps {
                        s.use_slot(i)?;
                        s.decode(tok)?;
                    }
                }
                Ok(b as f64 / t.elapsed().as_secs_f64())
            };
            let (x, y) = if run % 2 == 0 {
                let x = time(true)?;
                (x, time(false)?)
            } else {
                let y = time(false)?;
                (time(true)?, y)
            };
            if run > 0 {
                one.push(x);
                each.push(y);
            }
        }
        let ratio: Vec<f64> = one.iter().zip(&each).map(|(x, y)| x / y).collect();
        rows.push((b, stats(one), stats(each), stats(ratio)));
    }
    for i in 0..most {
        s.use_slot(i)?;
        s.reset();
    }
    s.use_slot(0)?;
    println!(
        "\nbatched decode after a {}-token prompt per sequence (median (min–max) of {} runs):",
        a.prompt, a.runs
    );
    println!("| sequences | batched step tok/s | single steps tok/s | ratio |");
    println!("| --- | --- | --- | --- |");
    for (b, (x, xl, xh), (y, yl, yh), (r, rl, rh)) in rows {
        println!(
            "| {b} | {x:.1} ({xl:.1}–{xh:.1}) | {y:.1} ({yl:.1}–{yh:.1}) | ×{r:.2} (×{rl:.2}–×{rh:.2}) |"
        );
    }
    Ok(())
}

fn tempdir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("tfc-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

#[derive(Args)]
pub struct ChatArgs {
    /// A GGUF file, or a Hugging Face folder (config.json, safetensors, tokenizer.json and
    /// a chat template): its spec, weights, tokenizer and chat template.
    model: PathBuf,
    /// The system prompt, the conversation's first message.
    #[arg(long)]
    system: Option<String>,
    /// The most tokens one answer may take.
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    #[command(flatten)]
    sampling: Sampling,
    /// Seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Threads for the compiled library: 1 to 256, or 0 for one per core.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// The CPU the library is compiled for (`native` or an LLVM CPU name).
    #[arg(long, default_value = "native")]
    target_cpu: String,
    #[command(flatten)]
    precision: Precision,
}

/// A conversation with a GGUF model or a Hugging Face folder on standard input: each line is the user's turn,
/// `/clear` starts over. The KV cache is kept between turns: a turn runs only the tokens
/// its rendering adds after what the cache holds, in one pass that continues the cache
/// (`Session::extend`; the template's text for the earlier turns is the same each time),
/// and starts over only when they differ.
pub fn chat(a: ChatArgs) -> Result<()> {
    use std::io::{BufRead, IsTerminal};
    check_threads(a.threads)?;
    a.sampling.check()?;
    let Opened { c, model, ck, text, .. } = open(&a.model, None, a.precision, &a.target_cpu)?;
    let tok = text.tokenizer()?;
    if text.template.is_none() {
        bail!("{} holds no chat template", a.model.display());
    }
    let stop: Vec<usize> = text.stop_ids.iter().map(|&i| i as usize).collect();
    let mut s = step("binding the weights", || {
        Ok(tfc_runtime::Session::new(&model, WeightData::Checkpoint(ck.clone()), a.threads)?)
    })?;
    let max_seq = c.spec.sizes.max_seq;
    let mut sampler = a.sampling.sampler(a.seed);
    let start: Vec<(String, String)> = a.system.iter().map(|t| ("system".to_string(), t.clone())).collect();
    let mut messages = start.clone();
    // The tokens the cache holds, in order.
    let mut cached: Vec<u32> = Vec::new();
    let tty = std::io::stdin().is_terminal();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if tty {
            eprint!("> ");
        }
        let Some(line) = lines.next().transpose()? else { break };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == "/clear" {
            messages = start.clone();
            cached.clear();
            s.reset();
            eprintln!("[cleared]");
            continue;
        }
        messages.push(("user".into(), line.to_string()));
        let ids = text.encode_chat(&messages)?;
        if ids.len() >= max_seq {
            messages.pop();
            eprintln!("[the conversation passes {max_seq} tokens (--max-seq); /clear starts over, or compile for more]");
            continue;
        }
        // The answer ends at the end of the turn, `--max-tokens`, or the cache's end.
        let budget = a.max_tokens.min(max_seq - ids.len());
        // Feed what the cache does not hold yet: all of it if the cache holds anything else.
        let same = cached.iter().zip(&ids).take_while(|(x, y)| x == y).count();
        let mut logits = if same == cached.len() && same > 0 && same < ids.len() {
            let new: Vec<i32> = ids[same..].iter().map(|&i| i as i32).collect();
            s.extend(&new, false)?
        } else {
            s.reset();
            let prompt: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
            s.prefill(&prompt, None, false)?
        };
        cached = ids;
        let (mut answer, mut shown, mut stopped) = (Vec::new(), String::new(), false);
        while answer.len() < budget {
            let next = sampler.next(&logits);
            if stop.contains(&next) {
                stopped = true;
                break;
            }
            answer.push(next as u32);
            let text = tok.decode(&answer, true).map_err(|e| anyhow::anyhow!("cannot decode: {e}"))?;
            if let Some(new) = text.strip_prefix(shown.as_str()) {
                print!("{new}");
                std::io::stdout().flush()?;
            }
            shown = text;
            if answer.len() == budget {
                break;
            }
            cached.push(next as u32);
            logits = s.decode(next as i32)?;
        }
        println!();
        if !stopped {
            eprintln!("[length: {} tokens]", answer.len());
        }
        messages.push(("assistant".into(), shown));
    }
    Ok(())
}

#[derive(Args)]
pub struct ServeArgs {
    /// A GGUF file, a Hugging Face folder (config.json, safetensors, tokenizer.json, a chat
    /// template), or a spec file with `--weights`.
    model: PathBuf,
    /// The checkpoint of a spec file.
    #[arg(long)]
    weights: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// The port (0: any free one; the address is printed when the server listens).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Requests generated at once, each in its own slot (KV cache).
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// The most positions one request may use, prompt and completion (default: the
    /// model's max_seq).
    #[arg(long)]
    ctx_size: Option<usize>,
    /// Requests that may wait for a slot; more are refused with 503.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Threads for the compiled library: 1 to 256, or 0 for one per core.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// The CPU the library is compiled for (`native` or an LLVM CPU name).
    #[arg(long, default_value = "native")]
    target_cpu: String,
    #[command(flatten)]
    precision: Precision,
}

pub fn serve(a: ServeArgs) -> Result<()> {
    check_threads(a.threads)?;
    // The library is compiled for --ctx-size positions: each slot's cache holds that many.
    let mut precision = a.precision;
    if let (None, Some(n)) = (precision.max_seq, a.ctx_size) {
        precision.max_seq = Some(u32::try_from(n).context("--ctx-size is too large")?);
    }
    let Opened { model, ck, text, dir, .. } = open(&a.model, a.weights.as_deref(), precision, &a.target_cpu)?;
    let name = a.model.file_stem().map_or("model".into(), |s| s.to_string_lossy().to_string());
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&(a.host.as_str(), a.port))
        .ok()
        .and_then(|mut it| it.next())
        .with_context(|| format!("--host {} --port {}: not an address to listen on", a.host, a.port))?;
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    let cfg =
        tfc::serve::Config { parallel: a.parallel, ctx_size: a.ctx_size, queue: a.queue, threads: a.threads };
    let shutdown = async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).ok();
        let term = async {
            match term.as_mut() {
                Some(t) => drop(t.recv().await),
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        eprintln!("stopping: refusing new requests, finishing the ones running");
    };
    let served = tfc::serve::Served { model, ck, text, dir, name };
    let t = Instant::now();
    step("binding the weights", || {
        tfc::serve::serve(served, &cfg, listener, shutdown, || {
            eprintln!("bound the weights in {:.1} s", t.elapsed().as_secs_f64());
            // Scripts read this line for the address (with --port 0, the port chosen).
            println!("listening on http://{local}");
            let _ = std::io::stdout().flush();
        })
    })
}
