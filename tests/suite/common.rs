//! Shared helpers: paths, compiling specs, reading fixtures, comparing tensors.

use std::path::{Path, PathBuf};

use tfc::interp::Tensor;
use tfc::{Compiled, Options};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

pub fn compile(path: &Path, opts: &Options) -> Compiled {
    tfc::compile_file(path, opts).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Compiles spec text (named `name` in diagnostics) with the default options.
pub fn compile_text(name: &str, source: &str) -> Compiled {
    tfc::compile(name, source, &Options::default(), &mut |_, _| {}).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Every `.tfs` file under `dir`, sorted.
pub fn specs_in(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "tfs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

pub fn read_tensor(file: &Path, name: &str) -> Tensor {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap_or_else(|_| panic!("{} has no {name}", file.display()));
    let data = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    Tensor::new(t.shape().to_vec(), data)
}

/// The largest absolute difference; panics if the shapes differ.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "compared tensors differ in size");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let d = max_diff(got, want);
    assert!(d <= tol, "{what}: max |difference| {d:e} exceeds {tol:e}");
}

/// How closely two engines must agree on model `c`'s results `want`: 1e-5, or with
/// `activations = bf16` two bf16 steps (2⁻⁶) of the largest value. There a last-bit
/// difference upstream can round one linear input to the other neighbouring bf16 (a step
/// of up to 2⁻⁷ of it), which moves results by far more than 1e-5; `assert_rounded`
/// checks that the engines do round. With `activations = q8` likewise two steps of
/// `round_q8` (up to 2⁻⁶ of a block's largest value each): 2⁻⁵ of the largest value
/// (`gemm/q8x_head` checks the integer products within 1e-5, where both engines round the
/// same values).
pub fn tolerance(c: &Compiled, want: &[f32]) -> f32 {
    let top = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    match c.spec.activations {
        tfc::ir::DType::BF16 => 1e-5 + top / 64.0,
        tfc::ir::DType::Q8 => 1e-5 + top / 32.0,
        _ => 1e-5,
    }
}

/// The median absolute difference.
pub fn median_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "compared tensors differ in size");
    let mut d: Vec<f32> = a.iter().zip(b).map(|(x, y)| (x - y).abs()).collect();
    d.sort_by(f32::total_cmp);
    d[d.len() / 2]
}

/// `got`, an engine's results under `activations = bf16`, is the interpreter's `want`
/// (median difference below 1e-6: a rounding that lands on the other bf16 changes a few
/// rows) and not `exact`, the interpreter's results with f32 activations (median
/// difference above 1e-5).
pub fn assert_rounded(what: &str, got: &[f32], want: &[f32], exact: &[f32]) {
    let (same, apart) = (median_diff(got, want), median_diff(got, exact));
    assert!(same <= 1e-6, "{what}: median |difference| {same:e} from the rounding interpreter");
    assert!(apart >= 1e-5, "{what}: median |difference| {apart:e} from f32 activations: no rounding?");
}

/// What the fixture check needs of a compiled model, on the CPU or a GPU.
pub trait Engine {
    fn prefill(&mut self, tokens: &[i32], all_rows: bool) -> Vec<f32>;
    fn decode(&mut self, token: i32) -> Result<Vec<f32>, String>;
    /// More tokens after the cache: the last row, or every row.
    fn extend(&mut self, tokens: &[i32], all_rows: bool) -> Vec<f32>;
    fn reset(&mut self);
    fn position(&self) -> usize;
}

impl Engine for tfc_runtime::Session<'_> {
    fn prefill(&mut self, tokens: &[i32], all_rows: bool) -> Vec<f32> {
        tfc_runtime::Session::prefill(self, tokens, None, all_rows).unwrap()
    }
    fn decode(&mut self, token: i32) -> Result<Vec<f32>, String> {
        tfc_runtime::Session::decode(self, token).map_err(|e| e.to_string())
    }
    fn extend(&mut self, tokens: &[i32], all_rows: bool) -> Vec<f32> {
        tfc_runtime::Session::extend(self, tokens, all_rows).unwrap()
    }
    fn reset(&mut self) {
        tfc_runtime::Session::reset(self)
    }
    fn position(&self) -> usize {
        tfc_runtime::Session::position(self)
    }
}

impl Engine for tfc_runtime::gpu::GpuSession<'_> {
    fn prefill(&mut self, tokens: &[i32], all_rows: bool) -> Vec<f32> {
        tfc_runtime::gpu::GpuSession::prefill(self, tokens, None, all_rows).unwrap()
    }
    fn decode(&mut self, token: i32) -> Result<Vec<f32>, String> {
        tfc_runtime::gpu::GpuSession::decode(self, token).map_err(|e| e.to_string())
    }
    /// The GPU runtime has no extend graph: decode steps, the same computation.
    fn extend(&mut self, tokens: &[i32], all_rows: bool) -> Vec<f32> {
        let rows: Vec<Vec<f32>> = tokens.iter().map(|&t| self.decode(t).unwrap()).collect();
        if all_rows {
            rows.concat()
        } else {
            rows.last().unwrap().clone()
        }
    }
    fn reset(&mut self) {
        tfc_runtime::gpu::GpuSession::reset(self).unwrap()
    }
    fn position(&self) -> usize {
        tfc_runtime::gpu::GpuSession::position(self)
    }
}

impl Engine for tfc::interp::Session<'_> {
    fn prefill(&mut self, tokens: &[i32], all_rows: bool) -> Vec<f32> {
        let tokens: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        tfc::interp::Session::prefill(self, &tokens, &[], all_rows).unwrap().data
    }
    fn decode(&mut self, token: i32) -> Result<Vec<f32>, String> {
        tfc::interp::Session::decode(self, token as i64).map(|t| t.data).map_err(|e| e.to_string())
    }
    fn extend(&mut self, tokens: &[i32], all_rows: bool) -> Vec<f32> {
        let tokens: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        tfc::interp::Session::extend(self, &tokens, all_rows).unwrap().data
    }
    fn reset(&mut self) {
        tfc::interp::Session::reset(self)
    }
    fn position(&self) -> usize {
        self.pos
    }
}

/// A fixture: its prompt, transformers' greedy continuation and where its outputs are.
pub struct Fixture {
    pub arch: String,
    pub spec: PathBuf,
    pub dir: PathBuf,
    pub prompt: Vec<i32>,
    pub greedy: Vec<i32>,
    config: serde_json::Value,
    cached_equals_full: bool,
}

/// Which of a fixture's rows a model compiled with `options` must reproduce.
pub struct Regime {
    pub options: Options,
    /// Names the build, so that regimes do not share a library folder.
    pub tag: &'static str,
    rows: Rows,
}

enum Rows {
    /// All of them: the prompt, prompt + continuation in one pass, and the greedy
    /// continuation through the cache, logits and tokens.
    All,
    /// transformers' full pass over prompt + continuation, in one pass and through the
    /// cache fed the same tokens (not its own cached greedy run, computed another way).
    Full,
    /// The prompt, and the greedy tokens transformers generated up to position `n`.
    Within(usize),
}

impl Fixture {
    pub fn load(arch: &str) -> Fixture {
        let dir = root().join("tests/fixtures/hf").join(arch);
        let json = |f: &str| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(dir.join(f)).unwrap()).unwrap()
        };
        let (fixture, config) = (json("fixture.json"), json("config.json"));
        let ids = |k: &str| -> Vec<i32> {
            fixture[k]
                .as_array()
                .map(|a| a.iter().map(|v| v.as_i64().unwrap() as i32).collect())
                .unwrap_or_default()
        };
        Fixture {
            arch: arch.into(),
            spec: root().join("specs/tiny").join(format!("{arch}.tfs")),
            prompt: ids("prompt"),
            greedy: ids("greedy"),
            cached_equals_full: fixture["cached_equals_full"].as_bool().unwrap_or(true),
            config,
            dir,
        }
    }

    /// How the fixture is checked. When transformers' cached decode disagrees with its
    /// full pass (`cached_equals_full: false`: longrope picks its factors, dynamic NTK its
    /// base, by the current length), by two models compiled on either side of the
    /// original length, each against the rows transformers computed the same way: for
    /// exactly prompt + continuation, its full pass over them; within the original
    /// length, the prompt and the greedy steps up to it.
    pub fn regimes(&self) -> Vec<Regime> {
        if self.cached_equals_full {
            return vec![Regime { options: Options::default(), tag: "fixtures", rows: Rows::All }];
        }
        let c = &self.config;
        let original = c["original_max_position_embeddings"]
            .as_u64()
            .or_else(|| c["rope_parameters"]["original_max_position_embeddings"].as_u64())
            .or_else(|| c["max_position_embeddings"].as_u64())
            .expect("a fixture whose cached decode differs names its original length")
            as usize;
        let all = self.prompt.len() + self.greedy.len();
        assert!(original < all, "{}: the continuation passes the original length", self.arch);
        vec![
            Regime {
                options: Options { max_seq: Some(all), ..Options::default() },
                tag: "fixtures",
                rows: Rows::Full,
            },
            Regime {
                options: Options { max_seq: Some(original), ..Options::default() },
                tag: "fixtures-within",
                rows: Rows::Within(original),
            },
        ]
    }

    fn expected(&self, name: &str) -> tfc::interp::Tensor {
        read_tensor(&self.dir.join("expected.safetensors"), name)
    }

    fn all_tokens(&self) -> Vec<i32> {
        self.prompt.iter().chain(&self.greedy).copied().collect()
    }
}

/// One fixture through a compiled model (`what` names it in failures), on the rows of
/// `regime`: every prompt row against transformers and the interpreter, then prefill +
/// decode through the model's own KV cache, logits and greedy tokens as transformers
/// computed them.
pub fn check_fixture(fx: &Fixture, regime: &Regime, what: &str, e: &mut dyn Engine) {
    use tfc::interp::{run, Inputs, WeightSource, Weights};
    let arch = &fx.arch;
    let (prompt, greedy) = (&fx.prompt, &fx.greedy);
    let ck = tfc_runtime::Checkpoint::open(&fx.dir).unwrap();
    let rows = e.prefill(prompt, true);
    let c = compile(&fx.spec, &regime.options);
    let w = Weights::bind(&[&c.model], &WeightSource::Checkpoint(&ck)).unwrap();
    let tokens: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    let mut interp = run(&c.model, &w, &Inputs { tokens, ..Inputs::default() }).unwrap();
    let interp = interp.remove("logits").or_else(|| interp.remove("hidden")).unwrap();
    assert_close(&format!("{arch}: {what} vs interpreter"), &rows, &interp.data, 1e-4);
    if greedy.is_empty() {
        let want = fx.expected("last_hidden_state");
        assert_close(&format!("{arch}: {what} vs transformers"), &rows, &want.data, 1e-4);
        assert!(e.decode(1).is_err(), "an encoder has no decode step");
        return;
    }
    if !matches!(regime.rows, Rows::Full) {
        let want = fx.expected("logits");
        assert_close(&format!("{arch}: {what}, prompt logits vs transformers"), &rows, &want.data, 1e-4);
    }
    let full = fx.expected("full_logits");
    let vocab = full.shape[1];
    let row = |pos: usize| &full.data[pos * vocab..(pos + 1) * vocab];
    if !matches!(regime.rows, Rows::Within(_)) {
        e.reset();
        let all = e.prefill(&fx.all_tokens(), true);
        assert_close(
            &format!("{arch}: {what}, prompt + continuation vs transformers"),
            &all,
            &full.data,
            1e-4,
        );
    }
    e.reset();
    let mut logits = e.prefill(prompt, false);
    let mut generated = Vec::new();
    let steps = match regime.rows {
        Rows::Within(n) => n - prompt.len() + 1,
        _ => greedy.len(),
    };
    for (step, &fed) in greedy.iter().enumerate().take(steps) {
        let pos = prompt.len() - 1 + step;
        if !matches!(regime.rows, Rows::Within(_)) {
            assert_close(
                &format!("{arch}: {what}, cached logits at position {pos}"),
                &logits,
                row(pos),
                1e-4,
            );
        }
        generated.push(tfc_runtime::argmax(&logits) as i32);
        if step + 1 < steps {
            // Fed transformers' tokens: where they are its own greedy ones, the same.
            logits = e.decode(fed).unwrap();
        }
    }
    let want: Vec<i32> = match regime.rows {
        Rows::Full => (0..steps).map(|s| tfc_runtime::argmax(row(prompt.len() - 1 + s)) as i32).collect(),
        _ => greedy[..steps].to_vec(),
    };
    assert_eq!(generated, want, "{arch}: greedy continuation through {what}");
    assert_eq!(e.position(), prompt.len() + steps - 1, "{arch}: {what} cache position");
}

/// Prefill + decode through a compiled model against one interpreter pass over nine
/// tokens: all rows at once, then prefills of 1 and 5 tokens each followed by decode
/// steps, then by one extend of the rest (every row), then a prefill of 2 extended by 4
/// (the last row) and by 3 (every row); every row within 1e-5.
pub fn check_splits(name: &str, c: &Compiled, w: &tfc::interp::Weights, e: &mut dyn Engine) {
    check_splits_within(name, c, w, e, None)
}

/// `check_splits` within `tol` instead of `tolerance`'s.
pub fn check_splits_within(
    name: &str,
    c: &Compiled,
    w: &tfc::interp::Weights,
    e: &mut dyn Engine,
    tol: Option<f32>,
) {
    use tfc::interp::{run, Inputs};
    let tokens: Vec<i32> = (0..9).map(|i| (i * 7 + 3) % c.spec.sizes.vocab as i32).collect();
    let inputs = Inputs { tokens: tokens.iter().map(|&t| t as i64).collect(), ..Inputs::default() };
    let mut full = run(&c.model, w, &inputs).unwrap();
    let full = full.remove("logits").or_else(|| full.remove("hidden")).unwrap();
    let all = e.prefill(&tokens, true);
    let tol = tol.unwrap_or_else(|| tolerance(c, &full.data));
    assert_close(&format!("{name}: all rows"), &all, &full.data, tol);
    if c.decode.is_none() {
        return;
    }
    for split in [1, 5] {
        e.reset();
        let last = e.prefill(&tokens[..split], false);
        assert_close(&format!("{name}: prefill {split}"), &last, full.row(split - 1), tol);
        for (i, &t) in tokens.iter().enumerate().skip(split) {
            let row = e.decode(t).unwrap();
            assert_close(&format!("{name}: decode at {i} after {split}"), &row, full.row(i), tol);
        }
        e.reset();
        e.prefill(&tokens[..split], false);
        let rows = e.extend(&tokens[split..], true);
        let width = full.data.len() / tokens.len();
        assert_close(&format!("{name}: extend after {split}"), &rows, &full.data[split * width..], tol);
    }
    e.reset();
    e.prefill(&tokens[..2], false);
    let last = e.extend(&tokens[2..6], false);
    assert_close(&format!("{name}: extend 2..6, last row"), &last, full.row(5), tol);
    let width = full.data.len() / tokens.len();
    let rows = e.extend(&tokens[6..], true);
    assert_close(&format!("{name}: extend 6..9"), &rows, &full.data[6 * width..], tol);
    assert_eq!(e.position(), tokens.len(), "{name}: cache position after extending");
}

/// Zeroes every router's matrix of `c` (the linear map a `route` reads) in the
/// interpreter's weights and in the library's buffers (`order`: their names), so that
/// every row's choice is a tie of all its experts (the routers' biases of random weights
/// are zero too).
pub fn zero_routers(
    c: &Compiled,
    w: &mut tfc::interp::Weights,
    data: tfc_runtime::WeightData,
    order: &[&str],
) -> tfc_runtime::WeightData {
    use tfc::ir::Op;
    let g = &c.model;
    let tfc_runtime::WeightData::Owned(mut bufs) = data else { panic!("random weights are owned") };
    let routes: Vec<_> = g.node_ids().into_iter().filter(|&n| matches!(g.op(n), Op::Route(_))).collect();
    assert!(!routes.is_empty(), "no router in {}", c.spec.name);
    for n in routes {
        let Op::Weight { name, .. } = g.op(g.operands(g.operands(n)[0])[1]) else {
            panic!("a router's matrix is a weight")
        };
        let t = w.get(name).unwrap();
        w.insert(name, Tensor::new(t.shape.clone(), vec![0.0; t.data.len()]));
        let i = order.iter().position(|m| m == name).unwrap();
        bufs[i].iter_mut().for_each(|v| *v = 0.0);
    }
    tfc_runtime::WeightData::Owned(bufs)
}
