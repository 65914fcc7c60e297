//! tfc: a compiler for transformer architectures.
//!
//! The pipeline, declared once in [`compile`]: spec text → [`front`] (parse, resolve,
//! lower) → model graph → [`passes::model_passes`] → [`passes::Split`] → prefill and
//! decode graphs → [`passes::phase_passes`]. [`interp`] runs any of the graphs.

pub mod backend;
pub mod front;
pub mod import;
pub mod interp;
pub mod ir;
pub mod passes;
pub mod serve;
pub mod text;

use front::{Diagnostics, Spec};
use ir::{verify, Graph, Phase};
use passes::{run_passes, PassError, Split};

/// The stages `tfc ir --stage` prints.
pub const STAGES: &[&str] = &["lowered", "model", "prefill", "decode", "extend"];

#[derive(Clone, Debug)]
pub struct Options {
    /// Which prefill graph the `dump` callback of [`compile`] follows: the one returning
    /// every position's main output instead of the last one's (both are always built).
    pub dump_all_rows: bool,
    /// Run the verifier after every pass (always on in tests; cheap).
    pub verify: bool,
    /// Store weight matrices in this type instead of the spec's `dtype`.
    pub weight_dtype: Option<ir::DType>,
    /// Round the inputs of linear maps to this type (`F32`: not at all) instead of
    /// following the spec's `activations`.
    pub activations: Option<ir::DType>,
    /// Compile for this context length instead of the spec's `max_seq`: the KV cache's
    /// capacity, and what length-dependent choices (longrope's factors) are made for.
    pub max_seq: Option<usize>,
}

impl Default for Options {
    fn default() -> Self {
        Options { dump_all_rows: false, verify: true, weight_dtype: None, activations: None, max_seq: None }
    }
}

/// Every stage of one compilation: all that a backend needs, so a build runs the
/// pipeline once and no backend sees the spec's text again.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// The spec file's name and text, as given (the manifest keeps the text and its hash).
    pub file: String,
    pub source: String,
    pub spec: Spec,
    /// The graph as lowered from the spec, before any pass (types only on leaves).
    pub lowered: Graph,
    /// The model graph after the model passes.
    pub model: Graph,
    /// Prefill returning the main output (logits or hidden state) of the last position.
    pub prefill: Graph,
    /// Prefill returning the main output of every position.
    pub prefill_all: Graph,
    /// `None` for a model with bidirectional attention.
    pub decode: Option<Graph>,
    /// More tokens after the cache (last position, and every position); `None` with
    /// `decode`.
    pub extend: Option<Graph>,
    pub extend_all: Option<Graph>,
}

impl Compiled {
    /// The graph of stage `name` (one of [`STAGES`]); `all_rows` picks the prefill that
    /// returns every position.
    pub fn stage(&self, name: &str, all_rows: bool) -> Option<&Graph> {
        match name {
            "lowered" => Some(&self.lowered),
            "model" => Some(&self.model),
            "prefill" if all_rows => Some(&self.prefill_all),
            "prefill" => Some(&self.prefill),
            "decode" => self.decode.as_ref(),
            "extend" if all_rows => self.extend_all.as_ref(),
            "extend" => self.extend.as_ref(),
            _ => None,
        }
    }

    /// The graphs a library holds, in its order: prefill, prefill of every row, decode,
    /// extend, extend of every row.
    pub fn library_graphs(&self) -> Vec<&Graph> {
        let mut gs = vec![&self.prefill, &self.prefill_all];
        gs.extend(self.decode.as_ref());
        gs.extend(self.extend.as_ref());
        gs.extend(self.extend_all.as_ref());
        gs
    }

    /// Each graph function of a library by name, `None` where the model has no such graph.
    pub fn named_graphs(&self) -> [(&'static str, Option<&Graph>); 5] {
        [
            ("prefill", Some(&self.prefill)),
            ("prefill_all", Some(&self.prefill_all)),
            ("decode", self.decode.as_ref()),
            ("extend", self.extend.as_ref()),
            ("extend_all", self.extend_all.as_ref()),
        ]
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("{0}")]
    Spec(Diagnostics),
    #[error(transparent)]
    Pass(#[from] PassError),
}

/// Compiles spec text; `dump` sees the graph after every pass, with the pass's name.
pub fn compile(
    file: &str,
    source: &str,
    opts: &Options,
    dump: &mut dyn FnMut(&str, &Graph),
) -> Result<Compiled, CompileError> {
    let (spec, lowered) = front::compile_spec(file, source, opts).map_err(CompileError::Spec)?;
    let mut model = lowered.clone();
    run_passes(&mut model, &passes::model_passes(), opts.verify, dump)?;
    let phases = Split { all_rows: false }.run(&model)?;
    let (mut prefill, mut decode, mut extend) = (phases.prefill, phases.decode, phases.extend);
    let all = Split { all_rows: true }.run(&model)?;
    let (mut prefill_all, mut extend_all) = (all.prefill, all.extend);
    let mut quiet = |_: &str, _: &Graph| {};
    let (shown, hidden) =
        if opts.dump_all_rows { (&mut prefill_all, &mut prefill) } else { (&mut prefill, &mut prefill_all) };
    let mut graphs: Vec<(&mut Graph, bool)> = vec![(shown, true), (hidden, false)];
    graphs.extend(decode.as_mut().map(|d| (d, true)));
    graphs.extend(extend.as_mut().map(|e| (e, false)));
    graphs.extend(extend_all.as_mut().map(|e| (e, false)));
    for (g, show) in graphs {
        let dump: &mut dyn FnMut(&str, &Graph) = if show { &mut *dump } else { &mut quiet };
        if opts.verify {
            verify(g).map_err(PassError::from)?;
        }
        dump(Split::NAME, g);
        run_passes(g, &passes::phase_passes(g.phase), opts.verify, dump)?;
    }
    debug_assert!(model.phase == Phase::Model);
    Ok(Compiled {
        file: file.to_string(),
        source: source.to_string(),
        spec,
        lowered,
        model,
        prefill,
        prefill_all,
        decode,
        extend,
        extend_all,
    })
}

/// Compiles a spec file from disk.
pub fn compile_file(path: &std::path::Path, opts: &Options) -> Result<Compiled, anyhow::Error> {
    let source =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    Ok(compile(&path.display().to_string(), &source, opts, &mut |_, _| {})?)
}
