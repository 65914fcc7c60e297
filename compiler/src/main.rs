//! The `tfc` command: subcommands only; the work is in the library.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use tfc::interp::{argmax, Session, Tensor, WeightSource, Weights};
use tfc::{CompileError, Compiled, Options};

const STAGES: [&str; 6] = ["lowered", "model", "prefill", "decode", "llvm", "llvm-opt"];

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
        /// prefill or decode (after the split and their own passes), llvm (the LLVM IR
        /// of the library) or llvm-opt (after `default<O3>`).
        #[arg(long, default_value = "model", value_parser = clap::builder::PossibleValuesParser::new(STAGES))]
        stage: String,
        /// Instead of a stage, print the graph after each run of this pass.
        #[arg(long, value_name = "PASS", value_parser = clap::builder::PossibleValuesParser::new(tfc::passes::PASS_NAMES))]
        dump_after: Option<String>,
        /// Prefill returns the logits of every position, not only the last.
        #[arg(long)]
        all_rows: bool,
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
    },
    /// Run a model: prefill the tokens, then generate greedily.
    Run {
        /// The spec file (`.tfs`).
        spec: PathBuf,
        /// A safetensors checkpoint: a folder with `model.safetensors` (or shards), or a
        /// file. Without it, random weights from `--seed`.
        #[arg(long)]
        weights: Option<PathBuf>,
        /// The prompt's token ids, comma-separated.
        #[arg(long, value_delimiter = ',', required = true, num_args = 1..)]
        tokens: Vec<i64>,
        /// Token type (segment) ids for encoders, comma-separated; zeros by default.
        #[arg(long, value_delimiter = ',')]
        token_types: Vec<i64>,
        /// How many tokens to generate after the prompt (greedy).
        #[arg(long, default_value_t = 0)]
        generate: usize,
        /// Write the logits of every computed position (or an encoder's hidden states):
        /// safetensors, or JSON when the name ends in `.json`.
        #[arg(long, value_name = "FILE")]
        logits: Option<PathBuf>,
        /// Which implementation runs the model.
        #[arg(long, value_enum, default_value_t = Backend::Interp)]
        backend: Backend,
        /// Seed for random weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Backend {
    /// The reference interpreter.
    Interp,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match e.downcast_ref::<CompileError>() {
                Some(CompileError::Spec(d)) => {
                    eprint!("{}", d.render(std::io::stderr().is_terminal()))
                }
                _ => eprintln!("error: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

fn compile(spec: &Path, opts: &Options) -> Result<Compiled> {
    tfc::compile_file(spec, opts)
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
        Command::Ir { spec, stage, dump_after, all_rows } => {
            let source =
                std::fs::read_to_string(&spec).with_context(|| format!("cannot read {}", spec.display()))?;
            let opts = Options { all_rows, ..Options::default() };
            let mut out = String::new();
            let c = tfc::compile(&spec.display().to_string(), &source, &opts, &mut |pass, g| {
                if dump_after.as_deref() == Some(pass) {
                    out.push_str(&format!("// after {pass}\n{}", tfc::ir::print(g)));
                }
            })?;
            if dump_after.is_none() {
                match c.stage(&stage) {
                    Some(g) => out = tfc::ir::print(g),
                    None => {
                        bail!("`{}` has bidirectional attention, so it has no {stage} graph", c.spec.name)
                    }
                }
            }
            print!("{out}");
        }
        Command::Compile { spec, output, target_cpu } => {
            let source =
                std::fs::read_to_string(&spec).with_context(|| format!("cannot read {}", spec.display()))?;
            let opts = tfc::backend::LibOptions { target_cpu: Some(target_cpu) };
            let a = tfc::backend::compile_library(&spec.display().to_string(), &source, &output, &opts)?;
            println!("{}\n{}\n{}", a.library.display(), a.header.display(), a.manifest.display());
        }
        Command::Graph { spec, output } => {
            let c = compile(&spec, &Options::default())?;
            let dot = tfc::ir::dot::to_dot(&c.model, c.spec.sizes.layers as u32);
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
        Command::ImportHf { dir, output } => {
            let config = if dir.is_dir() { dir.join("config.json") } else { dir.clone() };
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("cannot read {}", config.display()))?;
            let spec = tfc::import::hf::import(&text)
                .with_context(|| format!("cannot import {}", config.display()))?;
            match output {
                Some(p) => {
                    std::fs::write(&p, spec).with_context(|| format!("cannot write {}", p.display()))?
                }
                None => print!("{spec}"),
            }
        }
        Command::Run {
            spec,
            weights,
            tokens,
            token_types,
            generate,
            logits,
            backend: Backend::Interp,
            seed,
        } => {
            let opts = Options { all_rows: logits.is_some(), ..Options::default() };
            let c = compile(&spec, &opts)?;
            let checkpoint = match &weights {
                Some(dir) => Some(tfc_runtime::Checkpoint::open(dir)?),
                None => None,
            };
            let source = match &checkpoint {
                Some(ck) => WeightSource::Checkpoint(ck),
                None => WeightSource::Random { seed },
            };
            let mut graphs = vec![&c.prefill];
            graphs.extend(c.decode.as_ref());
            let w = Weights::bind(&graphs, &source)?;
            let mut session = Session::new(&c, &w);
            let first = session.prefill(&tokens, &token_types)?;
            let mut rows: Vec<Tensor> = vec![first];
            let mut generated = Vec::new();
            if generate > 0 {
                if c.decode.is_none() {
                    bail!("`{}` has bidirectional attention and cannot generate", c.spec.name);
                }
                for _ in 0..generate {
                    let last = rows.last().unwrap();
                    let next = argmax(last.row(last.shape[0] - 1)) as i64;
                    generated.push(next);
                    if generated.len() == generate {
                        break;
                    }
                    rows.push(session.decode(next)?);
                }
            }
            let ids: Vec<String> = generated.iter().map(|t| t.to_string()).collect();
            println!("{}", ids.join(","));
            if let Some(path) = logits {
                let name = if c.decode.is_some() { "logits" } else { "hidden" };
                write_rows(&path, name, &rows)?;
            }
        }
    }
    Ok(())
}

/// Writes stacked rows as one `[n, width]` tensor.
fn write_rows(path: &Path, name: &str, rows: &[Tensor]) -> Result<()> {
    let width = rows[0].shape[1];
    let data: Vec<f32> = rows.iter().flat_map(|r| r.data.iter().copied()).collect();
    let n = data.len() / width;
    if path.extension().is_some_and(|e| e == "json") {
        let nested: Vec<&[f32]> = data.chunks(width).collect();
        let json = serde_json::json!({ name: nested });
        std::fs::write(path, serde_json::to_string(&json)?)?;
    } else {
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![n, width], &bytes)?;
        safetensors::serialize_to_file([(name, view)], None, path)?;
    }
    Ok(())
}
