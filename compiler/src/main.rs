//! The `tfc` command: subcommands only; the work is in the library (and, for running
//! models, in `run.rs`).

mod run;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use tfc::backend::LibOptions;
use tfc::{CompileError, Compiled, Options};

const STAGES: [&str; 13] = [
    "lowered",
    "model",
    "prefill",
    "decode",
    "extend",
    "plan",
    "mlir",
    "mlir-llvm",
    "llvm",
    "llvm-opt",
    "gpu",
    "gpu-lowered",
    "ptx",
];

#[derive(Parser)]
#[command(name = "tfc", version, about = "A compiler for transformer architectures", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a spec and report every error in it.
    Check {
        /// The spec file (`.tfs`).
        spec: PathBuf,
    },
    /// Print the graph IR of a spec at one compiler stage.
    Ir {
        /// The spec file (`.tfs`).
        spec: PathBuf,
        /// Which stage: lowered (before any pass), model (after the model passes),
        /// prefill or decode (after the split and their own passes), plan (the LLVM
        /// backend's arena offsets, fused chains and linear-map algorithms), mlir (the library as
        /// `linalg` on tensors), mlir-llvm (lowered to the LLVM dialect), llvm (the LLVM
        /// IR of the library, from `--backend`), llvm-opt (after `default<O3>`), gpu (the
        /// kernels for `--target vulkan|cuda` in the gpu dialect), gpu-lowered (in the
        /// spirv or nvvm dialects) or ptx.
        #[arg(long, default_value = "model", value_parser = clap::builder::PossibleValuesParser::new(STAGES))]
        stage: String,
        /// Instead of a stage, print the graph after each run of this pass.
        #[arg(long, value_name = "PASS", value_parser = clap::builder::PossibleValuesParser::new(tfc::passes::pass_names()))]
        dump_after: Option<String>,
        /// Prefill returns the main output of every position, not only the last.
        #[arg(long)]
        all_rows: bool,
        /// For the llvm stages: the CPU to generate code for (`native` or an LLVM CPU).
        #[arg(long, default_value = "native")]
        target_cpu: String,
        /// For the llvm stages: which backend builds the module.
        #[arg(long, value_enum, default_value_t = tfc::backend::Backend::Llvm)]
        backend: tfc::backend::Backend,
        /// For the gpu stages: the device (`vulkan` or `cuda`).
        #[arg(long, value_enum, default_value_t = tfc::backend::Target::Vulkan)]
        target: tfc::backend::Target,
        #[command(flatten)]
        precision: run::Precision,
    },
    /// Compile a spec to a shared library with a C header and a manifest.
    Compile {
        /// The spec file (`.tfs`).
        spec: PathBuf,
        /// The output folder: `lib<name>.so`, `<name>.h`, `manifest.json`.
        #[arg(short, long)]
        output: PathBuf,
        /// The CPU to generate code for: `native` (the host, default) or an LLVM CPU name
        /// such as `x86-64-v3` or `sapphirerapids`.
        #[arg(long, default_value = "native")]
        target_cpu: String,
        #[command(flatten)]
        precision: run::Precision,
        /// The code generator: `llvm` (hand-written kernels) or `mlir` (linalg through
        /// MLIR's passes); the library and its ABI are the same.
        #[arg(long, value_enum, default_value_t = tfc::backend::Backend::Llvm)]
        backend: tfc::backend::Backend,
        /// `cpu` (a shared library), `vulkan` (SPIR-V) or `cuda` (PTX); the GPU targets
        /// write the kernels and `gpu.json`, which the runtime runs.
        #[arg(long, value_enum, default_value_t = tfc::backend::Target::Cpu)]
        target: tfc::backend::Target,
    },
    /// Draw the architecture as Graphviz DOT (or SVG when the output ends in `.svg`).
    Graph {
        /// The spec file (`.tfs`).
        spec: PathBuf,
        /// Write to this file instead of standard output; `.svg` renders with `dot`.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Write a spec for a Hugging Face model from its `config.json`.
    ImportHf {
        /// A folder holding `config.json` (or the file itself).
        dir: PathBuf,
        /// Write the spec here instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Also open the folder's checkpoint and check that every tensor the spec reads is
        /// there, with its shape, and holds no NaN or infinity.
        #[arg(long)]
        check_weights: bool,
    },
    /// Write a spec for the model in a GGUF file (llama.cpp's format), with its tensor
    /// names: `tfc run FILE.gguf` runs it in one step.
    ImportGguf {
        /// The `.gguf` file.
        file: PathBuf,
        /// Write the spec here instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Run a model: prefill the prompt, then generate.
    Run(run::RunArgs),
    /// Talk with a GGUF model: each line of standard input is your turn; `/clear`
    /// starts over. The KV cache is kept between turns.
    Chat(run::ChatArgs),
    /// Measure a compiled model: prefill latency and decode speed.
    Bench(run::BenchArgs),
    /// Serve a model over HTTP with OpenAI's API: chat and text completions (streamed or
    /// whole), embeddings for encoders, models, health and metrics.
    Serve(run::ServeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A spec's diagnostics render the same from every subcommand, wherever in the
            // chain (a backend's error, a run's) they are.
            let spec = e.chain().find_map(|c| match c.downcast_ref::<CompileError>() {
                Some(CompileError::Spec(d)) => Some(d),
                _ => None,
            });
            match spec {
                Some(d) => eprint!("{}", d.render(std::io::stderr().is_terminal())),
                None => eprintln!("error: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

fn compile(spec: &Path, opts: &Options) -> Result<Compiled> {
    compile_with(spec, opts, &mut |_, _| {})
}

/// Compiles a spec file; `dump` sees the graph after every pass.
fn compile_with(
    spec: &Path,
    opts: &Options,
    dump: &mut dyn FnMut(&str, &tfc::ir::Graph),
) -> Result<Compiled> {
    let source = std::fs::read_to_string(spec).with_context(|| format!("cannot read {}", spec.display()))?;
    Ok(tfc::compile(&spec.display().to_string(), &source, opts, dump)?)
}

fn dispatch(cmd: Command) -> Result<()> {
    match cmd {
        Command::Check { spec } => {
            let c = compile(&spec, &Options::default())?;
            let s = &c.spec.sizes;
            println!(
                "{}: ok: model `{}`, {} layers, d_model {}, {} heads ({} kv, head_dim {}), vocab {}",
                spec.display(),
                c.spec.name,
                s.layers,
                s.d_model,
                s.heads,
                s.kv_heads,
                s.head_dim,
                s.vocab
            );
            let decode = c.decode.as_ref().map(|d| format!("decode {} nodes", d.len()));
            println!(
                "graphs: model {} nodes, prefill {} nodes, {}",
                c.model.len(),
                c.prefill.len(),
                decode.unwrap_or_else(|| "no decode (bidirectional attention)".into())
            );
        }
        Command::Ir { spec, stage, dump_after, all_rows, target_cpu, backend, target, precision } => {
            let opts = Options { dump_all_rows: all_rows, ..precision.options() };
            let mut out = String::new();
            let c = compile_with(&spec, &opts, &mut |pass, g| {
                if dump_after.as_deref() == Some(pass) {
                    out.push_str(&format!("// after {pass}\n{}", tfc::ir::print(g)));
                }
            })?;
            if dump_after.is_none() {
                let lib = LibOptions { backend, target_cpu: Some(target_cpu) };
                out = match stage.as_str() {
                    "llvm" | "llvm-opt" => tfc::backend::llvm_ir(&c, stage == "llvm-opt", &lib)?,
                    "gpu" | "gpu-lowered" | "ptx" => {
                        let target = if stage == "ptx" { tfc::backend::Target::Cuda } else { target };
                        let b = tfc::backend::gpu_build(&c, target)?;
                        match stage.as_str() {
                            "gpu" => b.kernels,
                            "gpu-lowered" => b.lowered,
                            _ => String::from_utf8_lossy(&b.binary).into_owned(),
                        }
                    }
                    "mlir" | "mlir-llvm" => tfc::backend::mlir_ir(&c, &stage, &lib)?,
                    "plan" => tfc::backend::plan_ir(&c, &lib)?,
                    _ => match c.stage(&stage, all_rows) {
                        Some(g) => tfc::ir::print(g),
                        None => {
                            bail!("`{}` has bidirectional attention, so it has no {stage} graph", c.spec.name)
                        }
                    },
                };
            }
            print!("{out}");
        }
        Command::Compile { spec, output, target_cpu, precision, backend, target } => {
            let c = compile(&spec, &precision.options())?;
            if target != tfc::backend::Target::Cpu {
                for f in tfc::backend::compile_gpu(&c, &output, target)? {
                    println!("{}", f.display());
                }
                return Ok(());
            }
            let lib = LibOptions { backend, target_cpu: Some(target_cpu) };
            let a = tfc::backend::compile_library(&c, &output, &lib)?;
            println!("{}\n{}\n{}", a.library.display(), a.header.display(), a.manifest.display());
        }
        Command::Graph { spec, output } => {
            let c = compile(&spec, &Options::default())?;
            let dot = c.spec.dot(&c.model);
            match output {
                None => print!("{dot}"),
                Some(path) if path.extension().is_some_and(|e| e == "svg") => {
                    let mut child = std::process::Command::new("dot")
                        .args(["-Tsvg", "-o"])
                        .arg(&path)
                        .stdin(std::process::Stdio::piped())
                        .spawn()
                        .context(
                            "cannot run Graphviz `dot` to render SVG (install graphviz, or write .dot)",
                        )?;
                    child.stdin.take().unwrap().write_all(dot.as_bytes())?;
                    if !child.wait()?.success() {
                        bail!("`dot` failed to render {}", path.display());
                    }
                }
                Some(path) => {
                    std::fs::write(&path, dot).with_context(|| format!("cannot write {}", path.display()))?
                }
            }
        }
        Command::ImportHf { dir, output, check_weights } => {
            let config = if dir.is_dir() { dir.join("config.json") } else { dir.clone() };
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("cannot read {}", config.display()))?;
            let spec = tfc::import::hf::import(&text)
                .with_context(|| format!("cannot import {}", config.display()))?;
            if check_weights {
                let folder = config.parent().unwrap_or(Path::new("."));
                let ck = tfc_runtime::Checkpoint::open(folder)?;
                let c = tfc::compile("imported.tfs", &spec, &Options::default(), &mut |_, _| {})?;
                let graphs: Vec<_> = [Some(&c.prefill), c.decode.as_ref()].into_iter().flatten().collect();
                run::check_weights(&ck, &graphs)
                    .with_context(|| format!("the checkpoint in {}", folder.display()))?;
            }
            match output {
                Some(p) => {
                    std::fs::write(&p, spec).with_context(|| format!("cannot write {}", p.display()))?
                }
                None => print!("{spec}"),
            }
        }
        Command::ImportGguf { file, output } => {
            let spec = run::import_gguf(&file)?;
            match output {
                Some(p) => {
                    std::fs::write(&p, spec).with_context(|| format!("cannot write {}", p.display()))?
                }
                None => print!("{spec}"),
            }
        }
        Command::Run(args) => run::run(args)?,
        Command::Chat(args) => run::chat(args)?,
        Command::Bench(args) => run::bench(args)?,
        Command::Serve(args) => run::serve(args)?,
    }
    Ok(())
}
