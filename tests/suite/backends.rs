//! The compiled library (from either backend, through the runtime crate and the C ABI)
//! against the reference interpreter and the Hugging Face fixtures, on every fixture
//! architecture.

use std::path::PathBuf;
use std::sync::Arc;

use tfc::backend::{compile_library, Backend, LibOptions};
use tfc::interp::{run, Inputs, WeightSource, Weights};
use tfc::Options;
use tfc_runtime::{Checkpoint, Model, Session, WeightData};

use crate::common::*;

/// Compiles a spec into a fresh folder under the target directory, one per test (`tag`)
/// so that tests running at once never replace a library another has loaded.
pub fn build(spec: &std::path::Path, tag: &str) -> PathBuf {
    build_with(spec, tag, Backend::Llvm)
}

pub fn build_with(spec: &std::path::Path, tag: &str, backend: Backend) -> PathBuf {
    build_opts(spec, tag, &Options::default(), &LibOptions { backend, ..Default::default() })
}

/// Compiles a spec with `precision` (the weight and activation types) into a library.
pub fn build_opts(spec: &std::path::Path, tag: &str, precision: &Options, opts: &LibOptions) -> PathBuf {
    let stem = spec.file_stem().unwrap().to_string_lossy().to_string();
    let dir = root().join("target/test-libs").join(format!("{tag}-{}", opts.backend.name())).join(&stem);
    let _ = std::fs::remove_dir_all(&dir);
    compile_library(&compile(spec, precision), &dir, opts)
        .unwrap_or_else(|e| panic!("{}: {e}", spec.display()));
    dir
}

fn check(arch: &str, backend: Backend) {
    let fx = Fixture::load(arch);
    for r in fx.regimes() {
        let lib = LibOptions { backend, ..Default::default() };
        let model = Model::load(build_opts(&fx.spec, r.tag, &r.options, &lib)).unwrap();
        let ck = Arc::new(Checkpoint::open(&fx.dir).unwrap());
        let what = format!("the {} library", backend.name());
        let mut s = Session::new(&model, WeightData::Checkpoint(ck.clone()), 2).unwrap();
        check_fixture(&fx, &r, &what, &mut s);
        drop(s);
        if r.tag == fx.regimes()[0].tag {
            let session = || Session::new(&model, WeightData::Checkpoint(ck.clone()), 2).unwrap();
            let c = compile(&fx.spec, &r.options);
            check_batched_decode(&format!("{arch}, {what}"), &c, &session);
        }
    }
}

macro_rules! backend_tests {
    ($backend:ident: $($arch:ident),*) => { $( #[test] fn $arch() { check(stringify!($arch), Backend::$backend); } )* };
}

mod llvm {
    use super::*;
    with_fixtures!(backend_tests, Llvm:);
    with_moe_fixtures!(backend_tests, Llvm:);
}

mod mlir {
    use super::*;
    with_fixtures!(backend_tests, Mlir:);
    with_moe_fixtures!(backend_tests, Mlir:);
}

/// Seeded random weights from the interpreter's binder: the interpreter's (rounded to each
/// storage type) and, in the library's order, the same values before rounding, which the
/// library rounds as it stores them.
fn random_weights(model: &Model, graphs: &[&tfc::ir::Graph]) -> (Weights, WeightData) {
    let w = Weights::bind(graphs, &WeightSource::Random { seed: 11 }).unwrap();
    let raw = Weights::bind(graphs, &WeightSource::RandomF32 { seed: 11 }).unwrap();
    let bufs = model.manifest().weights.iter().map(|m| raw.get(&m.name).unwrap().data.clone()).collect();
    (w, WeightData::Owned(bufs))
}

#[test]
fn library_prefill_and_decode_equal_the_interpreter_on_every_small_spec() {
    prefill_and_decode_equal_the_interpreter(Backend::Llvm);
}

#[test]
fn mlir_library_prefill_and_decode_equal_the_interpreter_on_every_small_spec() {
    prefill_and_decode_equal_the_interpreter(Backend::Mlir);
}

fn prefill_and_decode_equal_the_interpreter(backend: Backend) {
    let mut specs = specs_in(&root().join("tests/specs/valid"));
    specs.push(root().join("specs/tiny/gpt_neox.tfs"));
    for spec in specs {
        let c = compile(&spec, &Options::default());
        let model = Model::load(build_with(&spec, "random", backend)).unwrap();
        let (w, data) = random_weights(&model, &[&c.model]);
        let mut s = Session::new(&model, data, 2).unwrap();
        let name = format!("{} ({} library)", spec.file_name().unwrap().to_string_lossy(), backend.name());
        check_splits(&name, &c, &w, &mut s);
        drop(s);
        let session = || Session::new(&model, random_weights(&model, &[&c.model]).1, 2).unwrap();
        check_batched_decode(&name, &c, &session);
    }
}

/// The pool deals each participant a range of tasks and lets the idle take from the
/// others' (`support.c`): whichever thread runs a task, it computes the same values, so
/// any thread count gives the one-thread result to the bit, in prefill (AMX tiles and
/// their prefetches for bf16) and in decode; the MLIR library's kernels (a task is a
/// block of output columns) likewise.
#[test]
fn every_thread_count_computes_what_one_thread_does() {
    let runs = ["specs/tiny/llama.tfs", "tests/specs/valid/llama_bf16.tfs"]
        .into_iter()
        .flat_map(|s| [(s, Backend::Llvm), (s, Backend::Mlir)]);
    for (spec, backend) in runs {
        let spec = root().join(spec);
        let c = compile(&spec, &Options::default());
        let model = Model::load(build_with(&spec, "threads", backend)).unwrap();
        let n = 45.min(c.spec.sizes.max_seq - 5);
        let tokens: Vec<i32> = (0..n as i32).map(|i| (i * 7 + 2) % c.spec.sizes.vocab as i32).collect();
        let run = |threads: usize| {
            let (_, data) = random_weights(&model, &[&c.model]);
            let mut s = Session::new(&model, data, threads).unwrap();
            let mut out = s.prefill(&tokens, None, true).unwrap();
            for t in [3, 1, 4, 1, 5] {
                out.extend(s.decode(t).unwrap());
            }
            out
        };
        let one = run(1);
        for threads in [2, 3, 5] {
            let got = run(threads);
            let same = one.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits());
            let what = format!("{} ({})", spec.display(), backend.name());
            assert!(same && one.len() == got.len(), "{what}: {threads} threads differ from one");
        }
    }
}

/// Slots share one context's weights and keep their own caches: sequences interleaved
/// on several slots (decode, a batched step, a rewind and extend) compute what each
/// computes alone on a context of its own.
#[test]
fn slots_keep_their_own_caches() {
    for spec in ["specs/tiny/llama.tfs", "specs/tiny/deepseek_v3.tfs"] {
        let spec = root().join(spec);
        let c = compile(&spec, &Options::default());
        let model = Model::load(build_with(&spec, "slots", Backend::Llvm)).unwrap();
        let vocab = c.spec.sizes.vocab as i32;
        let a: Vec<i32> = (0..7).map(|i| (i * 5 + 1) % vocab).collect();
        let b: Vec<i32> = (0..4).map(|i| (i * 11 + 3) % vocab).collect();
        let session = || Session::new(&model, random_weights(&model, &[&c.model]).1, 2).unwrap();
        // Each alone: a prompt, then decode steps; b also rewound to 2 and extended.
        let alone = |prompt: &[i32], steps: &[i32]| {
            let mut s = session();
            let mut rows = vec![s.prefill(prompt, None, false).unwrap()];
            rows.extend(steps.iter().map(|&t| s.decode(t).unwrap()));
            rows
        };
        let want_a = alone(&a, &[2, 9, 4]);
        let want_b = alone(&b, &[6, 1, 8]);
        // The rewound cache keeps b's first two positions as b's prompt computed them.
        let mut s = session();
        s.prefill(&b, None, false).unwrap();
        s.rewind(2).unwrap();
        let want_rewound = s.extend(&[5, 7, 3], true).unwrap();
        // And that is the two tokens' own prompt continued, up to the rounding of a
        // prompt of another length.
        let mut s = session();
        s.prefill(&b[..2], None, false).unwrap();
        let fresh = s.extend(&[5, 7, 3], true).unwrap();
        let worst = fresh.iter().zip(&want_rewound).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-5, "{}: a rewound cache differs from a fresh one by {worst}", spec.display());

        let mut s = session();
        assert_eq!(s.add_slot().unwrap(), 1);
        let mut got_a = vec![s.prefill(&a, None, false).unwrap()];
        s.use_slot(1).unwrap();
        let mut got_b = vec![s.prefill(&b, None, false).unwrap()];
        got_b.push(s.decode(6).unwrap());
        s.use_slot(0).unwrap();
        got_a.push(s.decode(2).unwrap());
        let rows = s.decode_batch(&[(1, 1), (0, 9)]).unwrap();
        got_b.push(rows[0].clone());
        got_a.push(rows[1].clone());
        let rows = s.decode_batch(&[(0, 4), (1, 8)]).unwrap();
        got_a.push(rows[0].clone());
        got_b.push(rows[1].clone());
        assert_eq!(s.position(), a.len() + 3);
        // Prompts and single steps on slots are each alone's to the bit; a batched step
        // is the extend graph's computation over several rows, equal up to rounding.
        let name = spec.display();
        assert!(
            got_a[..2] == want_a[..2] && got_b[..2] == want_b[..2],
            "{name}: slots differ from each alone"
        );
        let tol = tolerance(&c, &want_a.concat());
        for i in 2..4 {
            assert_close(&format!("{name}: batched step {i} of a"), &got_a[i], &want_a[i], tol);
            assert_close(&format!("{name}: batched step {i} of b"), &got_b[i], &want_b[i], tol);
        }
        s.use_slot(1).unwrap();
        assert!(s.rewind(b.len() + 4).is_err(), "rewinding past the cache is refused");
        s.rewind(2).unwrap();
        let rewound = s.extend(&[5, 7, 3], true).unwrap();
        assert!(rewound == want_rewound, "{}: a rewound slot differs from a rewound context", spec.display());
        let e = s.decode_batch(&[(1, 2), (1, 3)]).unwrap_err().to_string();
        assert!(e.contains("out of range"), "{e}");
    }
}

/// A batched decode step (`tfc_decode_batch`: the extend graph over one row per slot,
/// each at its own position in its own cache) computes each slot's own decode step:
/// three prompts of different lengths on three slots, then three steps of all three at
/// once (in another order than the slots'), against each sequence alone. Run on every
/// small spec and decoder fixture by the tests that build their libraries: learned and
/// rotary positions, ALiBi, windows, sinks, soft-capping, mixtures of experts and latent
/// attention.
fn check_batched_decode<'m>(name: &str, c: &tfc::Compiled, session: &dyn Fn() -> Session<'m>) {
    if c.decode.is_none() {
        return;
    }
    let (max_seq, vocab) = (c.spec.sizes.max_seq, c.spec.sizes.vocab as i32);
    let prompts: Vec<Vec<i32>> = [5usize, 1, 9]
        .iter()
        .map(|&n| (0..n.min(max_seq - 4) as i32).map(|i| (i * 13 + n as i32) % vocab).collect())
        .collect();
    let steps = [[3, 8, 1], [7, 2, 6], [4, 4, 9]];
    let mut s = session();
    s.add_slot().unwrap();
    s.add_slot().unwrap();
    for (i, p) in prompts.iter().enumerate() {
        s.use_slot(i).unwrap();
        s.prefill(p, None, false).unwrap();
    }
    let mut got = vec![vec![]; 3];
    for step in &steps {
        let rows = s.decode_batch(&[(2, step[2]), (0, step[0]), (1, step[1])]).unwrap();
        for (slot, row) in [2, 0, 1].into_iter().zip(rows) {
            got[slot].push(row);
        }
    }
    drop(s);
    for (i, p) in prompts.iter().enumerate() {
        let mut alone = session();
        alone.prefill(p, None, false).unwrap();
        let want: Vec<Vec<f32>> = steps.iter().map(|st| alone.decode(st[i]).unwrap()).collect();
        let tol = tolerance(c, &want.concat());
        for (k, (g, w)) in got[i].iter().zip(&want).enumerate() {
            assert_close(&format!("{name}: slot {i}, batched step {k}"), g, w, tol);
        }
    }
}

#[test]
fn bad_calls_through_the_abi_are_errors() {
    let spec = root().join("specs/tiny/gpt2.tfs");
    let model = Model::load(build(&spec, "abi")).unwrap();
    let c = compile(&spec, &Options::default());
    let (_, data) = random_weights(&model, &[&c.model]);
    let mut s = Session::new(&model, data, 1).unwrap();
    let err = |r: Result<Vec<f32>, tfc_runtime::RuntimeError>| r.unwrap_err().to_string();
    // Each error says what was wrong and with which numbers.
    assert!(err(s.prefill(&[], None, false)).contains("no tokens"));
    let e = err(s.prefill(&[5, 384], None, false));
    assert!(e.contains("token id 384 at position 1 is outside the vocabulary (0..384)"), "{e}");
    let e = err(s.prefill(&vec![1; 65], None, false));
    assert!(e.contains("65 tokens do not fit in the model's max_seq of 64"), "{e}");
    assert!(err(s.prefill(&[1, 2], Some(&[0]), false)).contains("1 token types for 2 tokens"));
    assert!(err(s.decode(-1)).contains("token id -1 is outside the vocabulary (0..384)"));
    s.prefill(&vec![1; 60], None, false).unwrap();
    assert!(err(s.extend(&[], false)).contains("no tokens"));
    let e = err(s.extend(&[1, 384], false));
    assert!(e.contains("token id 384 at position 61 is outside the vocabulary"), "{e}");
    let e = err(s.extend(&[1; 5], false));
    assert!(e.contains("5 more tokens do not fit after the cache's 60 in the model's max_seq of 64"), "{e}");
    assert_eq!(s.position(), 60, "a refused extend leaves the cache as it was");
    s.extend(&[1; 3], true).unwrap();
    assert!(err(s.prefill(&[1], None, false)).contains("empty cache"));
    s.decode(1).unwrap();
    let e = err(s.decode(1));
    assert!(e.contains("the cache holds 64 positions, the model's max_seq"), "{e}");
    assert_eq!(s.position(), 64);
    let many = Session::new(&model, random_weights(&model, &[&c.model]).1, 10_000).err().unwrap().to_string();
    assert!(many.contains("10000 threads: a context takes at most 256"), "{many}");
    // Weights of the wrong size are refused by the session before the library sees them.
    let short = WeightData::Owned(model.manifest().weights.iter().map(|_| vec![0.0; 3]).collect());
    assert!(Session::new(&model, short, 1).err().unwrap().to_string().contains("has 3 values"));
    // A checkpoint of another architecture names the missing tensor.
    let ck = Arc::new(Checkpoint::open(root().join("tests/fixtures/hf/llama")).unwrap());
    let e = Session::new(&model, WeightData::Checkpoint(ck), 1).err().unwrap().to_string();
    assert!(e.contains("no tensor `transformer.wte.weight`"), "{e}");
}

/// A manifest that disagrees with its library, or a library that is not the one its
/// manifest describes, is refused at load, naming the field: a session sizes its buffers
/// and binds weights by the manifest, so a wrong width corrupted the heap and swapped
/// names bound the wrong weights.
#[test]
fn an_edited_manifest_or_a_damaged_library_is_refused_at_load() {
    let built = build(&root().join("specs/tiny/gpt2.tfs"), "manifest-edits");
    Model::load(&built).unwrap();
    let text = std::fs::read_to_string(built.join("manifest.json")).unwrap();
    let good: serde_json::Value = serde_json::from_str(&text).unwrap();
    let copy = |tag: &str, edit: &dyn Fn(&mut serde_json::Value)| -> PathBuf {
        let d = built.parent().unwrap().join(format!("gpt2-{tag}"));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(built.join("libgpt2.so"), d.join("libgpt2.so")).unwrap();
        let mut m = good.clone();
        edit(&mut m);
        std::fs::write(d.join("manifest.json"), m.to_string()).unwrap();
        d
    };
    let refused = |tag: &str, edit: &dyn Fn(&mut serde_json::Value), want: &str| {
        let e = Model::load(copy(tag, edit)).err().unwrap_or_else(|| panic!("{tag}: loaded")).to_string();
        assert!(e.contains(want), "{tag}: {e}");
    };
    refused("width", &|m| m["output_width"] = 10.into(), "`output_width` is 10, but the library has 384");
    refused("vocab", &|m| m["vocab"] = 383.into(), "`vocab` is 383, but the library has 384");
    refused("max_seq", &|m| m["max_seq"] = 4096.into(), "`max_seq` is 4096, but the library has 64");
    refused("decode", &|m| m["has_decode"] = false.into(), "`has_decode` is 0, but the library has 1");
    let (n0, n1) = (good["weights"][0]["name"].clone(), good["weights"][1]["name"].clone());
    refused(
        "names",
        &|m| {
            m["weights"][0]["name"] = n1.clone();
            m["weights"][1]["name"] = n0.clone();
        },
        &format!(
            "weight 0 is `{}`, but the library binds `{}` there",
            n1.as_str().unwrap(),
            n0.as_str().unwrap()
        ),
    );
    let wte = "weight 0 `transformer.wte.weight`";
    refused(
        "shape",
        &|m| m["weights"][0]["shape"][0] = 385.into(),
        &format!("{wte} is f32 [385, 64], but the library binds f32 [384, 64]"),
    );
    // The same number of values in another shape is still another tensor.
    refused(
        "transposed",
        &|m| m["weights"][0]["shape"] = serde_json::json!([64, 384]),
        &format!("{wte} is f32 [64, 384], but the library binds f32 [384, 64]"),
    );
    refused(
        "dtype",
        &|m| m["weights"][0]["dtype"] = "bf16".into(),
        &format!("{wte} is bf16 [384, 64], but the library binds f32 [384, 64]"),
    );
    refused(
        "overflow",
        &|m| m["weights"][0]["shape"] = serde_json::json!([1u64 << 40, 1u64 << 40]),
        "overflows",
    );
    // A session frees its copy of a weight the library re-packs: a flag the library
    // disagrees with would have it read freed memory.
    let flip = |i: usize| {
        let r = good["weights"][i]["repacked"].as_bool().unwrap();
        (i, r, move |m: &mut serde_json::Value| m["weights"][i]["repacked"] = (!r).into())
    };
    let (packed, _, to_plain) =
        (0..good["weights"].as_array().unwrap().len()).map(flip).find(|f| f.1).unwrap();
    refused(
        "repacked",
        &to_plain,
        &format!(
            "weight {packed} `{}` has repacked = false, but the library re-packs it",
            good["weights"][packed]["name"].as_str().unwrap()
        ),
    );
    let (plain, _, to_packed) =
        (0..good["weights"].as_array().unwrap().len()).map(flip).find(|f| !f.1).unwrap();
    refused(
        "not-repacked",
        &to_packed,
        &format!(
            "weight {plain} `{}` has repacked = true, but the library does not re-pack it",
            good["weights"][plain]["name"].as_str().unwrap()
        ),
    );
    refused(
        "path",
        &|m| m["library"] = "../gpt2/libgpt2.so".into(),
        "is not a file name beside the manifest",
    );

    // The library truncated, or replaced by another model's, fails its hash before it
    // is mapped (a truncated one died of SIGBUS).
    let d = copy("truncated", &|_| {});
    let lib = std::fs::read(d.join("libgpt2.so")).unwrap();
    std::fs::write(d.join("libgpt2.so"), &lib[..lib.len() / 2]).unwrap();
    let e = Model::load(&d).err().unwrap().to_string();
    assert!(e.contains("truncated or replaced"), "{e}");
    let other = build(&root().join("specs/tiny/llama.tfs"), "manifest-edits");
    let d = copy("foreign", &|_| {});
    std::fs::copy(other.join("libllama.so"), d.join("libgpt2.so")).unwrap();
    let e = Model::load(&d).err().unwrap().to_string();
    assert!(e.contains("truncated or replaced"), "{e}");
    // Without the hash (a manifest from before it existed) the library's own facts
    // still catch a foreign library.
    let d = copy("foreign-unhashed", &|m| m["library_hash"] = "".into());
    std::fs::copy(other.join("libllama.so"), d.join("libgpt2.so")).unwrap();
    assert!(Model::load(&d).is_err());
}

/// The MLIR CPU backend refuses a model it would take tens of minutes to compile, with the
/// limit and the alternative, instead of running that long.
#[test]
fn the_mlir_backend_refuses_more_layers_than_its_limit() {
    let src = std::fs::read_to_string(root().join("specs/tiny/llama.tfs")).unwrap();
    let many = tfc::backend::MLIR_MAX_LAYERS + 1;
    let source = src.replace("layers   = 2", &format!("layers   = {many}"));
    let dir = root().join("target/test-libs/mlir-layers");
    let opts = LibOptions { backend: Backend::Mlir, ..Default::default() };
    let e = compile_library(&compile_text("llama.tfs", &source), &dir, &opts).unwrap_err().to_string();
    assert!(e.contains(&format!("more than {} layers (`llama` has {many})", many - 1)), "{e}");
    assert!(e.contains("--backend llvm"), "{e}");
}

#[test]
fn llvm_ir_before_and_after_optimisation() {
    let spec = root().join("tests/specs/valid/alibi_hidden.tfs");
    let source = std::fs::read_to_string(&spec).unwrap();
    let opts = LibOptions { target_cpu: Some("x86-64-v4".into()), ..Default::default() };
    for (stage, optimized) in [("llvm", false), ("llvm-opt", true)] {
        let ir = tfc::backend::llvm_ir(&compile_text("alibi_hidden.tfs", &source), optimized, &opts).unwrap();
        insta::assert_snapshot!(format!("alibi_hidden@{stage}"), ir);
    }
}

/// Graph functions are linear to compile: no block holds more than a bounded number of
/// kernel calls, and every use of a parameter reloads it from its stack slot, so no
/// register lives across the function (one block of every call, each reading the
/// parameters, made LLVM's register coalescer quadratic in the layers).
#[test]
fn graph_functions_have_short_blocks_and_short_live_ranges() {
    let src = std::fs::read_to_string(root().join("specs/tiny/llama.tfs")).unwrap();
    let source = src.replace("layers   = 2", "layers   = 8");
    let ir =
        tfc::backend::llvm_ir(&compile_text("llama.tfs", &source), false, &LibOptions::default()).unwrap();
    for graph in ["prefill", "prefill_all", "decode"] {
        let head = format!("define hidden void @tfc__{graph}(");
        let body = &ir[ir.find(&head).unwrap_or_else(|| panic!("no {head}"))..];
        let body = &body[..body.find("\n}\n").unwrap()];
        let blocks: Vec<&str> = body.split("\n\n").collect();
        let calls: Vec<usize> = blocks.iter().map(|b| b.matches("@tfc__parallel_for(").count()).collect();
        assert!(calls.iter().sum::<usize>() > 8 * 15, "{graph}: {calls:?}");
        assert!(calls.iter().all(|&c| c <= 32), "{graph}: calls per block {calls:?}");
        // The parameters %0..%8 appear only in the entry block, stored to their slots.
        for b in &blocks[1..] {
            for p in 0..9 {
                for sep in [",", ")", " "] {
                    assert!(
                        !b.contains(&format!(" %{p}{sep}")),
                        "{graph}: %{p} used past the entry block:\n{b}"
                    );
                }
            }
        }
    }
}

#[test]
fn optimised_kernels_use_512_bit_vectors() {
    let source = std::fs::read_to_string(root().join("specs/tiny/gpt2.tfs")).unwrap();
    let opts = LibOptions { target_cpu: Some("x86-64-v4".into()), ..Default::default() };
    let ir = tfc::backend::llvm_ir(&compile_text("gpt2.tfs", &source), true, &opts).unwrap();
    let wide = ir.matches("<16 x float>").count();
    assert!(wide > 50, "only {wide} uses of <16 x float> in the optimised IR");
    assert!(ir.contains("\"prefer-vector-width\"=\"512\""));
}

#[test]
fn a_library_for_a_baseline_cpu_computes_the_same() {
    let spec = root().join("specs/tiny/gpt2.tfs");
    let source = std::fs::read_to_string(&spec).unwrap();
    let dir = root().join("target/test-libs/baseline/gpt2");
    let _ = std::fs::remove_dir_all(&dir);
    compile_library(
        &compile_text("gpt2.tfs", &source),
        &dir,
        &LibOptions { target_cpu: Some("x86-64".into()), ..Default::default() },
    )
    .unwrap();
    let model = Model::load(&dir).unwrap();
    assert_eq!(model.manifest().target_cpu, "x86-64");
    let ck = Arc::new(Checkpoint::open(root().join("tests/fixtures/hf/gpt2")).unwrap());
    let mut s = Session::new(&model, WeightData::Checkpoint(ck), 2).unwrap();
    let want = read_tensor(&root().join("tests/fixtures/hf/gpt2/expected.safetensors"), "logits");
    let rows = s.prefill(&[188, 354, 68, 81, 173, 71, 249, 323, 49, 60, 366, 134], None, true).unwrap();
    assert_close("baseline x86-64 library", &rows, &want.data, 1e-4);
}

/// Builds a C program against a library's header and links it to the library.
fn build_c(dir: &std::path::Path, name: &str, source: &std::path::Path) -> PathBuf {
    let exe = dir.join(source.file_stem().unwrap());
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = std::process::Command::new(&cc)
        .args(["-O2", "-pthread", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(dir)
        .arg("-include")
        .arg(dir.join(format!("{name}.h")))
        .arg(source)
        .arg("-L")
        .arg(dir)
        .args([format!("-l{name}"), format!("-Wl,-rpath,{}", dir.display()), "-o".into()])
        .arg(&exe)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    exe
}

#[test]
fn misuse_of_the_c_abi_gets_status_codes() {
    // Each model has weights the library re-packs at bind time: f32 panels from `[in, out]`
    // (GPT-2) and `[out, in]` (BERT) weights, bf16 tiles in both orientations; the
    // manifest and `tfc_weight_repacked` must agree on which.
    for (spec, repacked) in [
        ("specs/tiny/gpt2.tfs", 6),
        ("specs/tiny/bert.tfs", 10),
        ("tests/specs/valid/mixed_bf16_act.tfs", 11),
    ] {
        let spec = root().join(spec);
        let dir = build(&spec, "abi-c");
        let manifest: tfc_runtime::abi::Manifest =
            serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(manifest.weights.iter().filter(|w| w.repacked).count(), repacked, "{}", spec.display());
        let name = spec.file_stem().unwrap().to_string_lossy().to_string();
        let exe = build_c(&dir, &name, &root().join("tests/c/abi_checks.c"));
        let run =
            std::process::Command::new(&exe).env("TFC_TEST_REPACKED", repacked.to_string()).output().unwrap();
        assert!(run.status.success(), "{name}: {}", String::from_utf8_lossy(&run.stderr));
        assert_eq!(String::from_utf8_lossy(&run.stdout).trim(), "ok");
        // The same through the baseline x86-64 copy of the code, without prefetches.
        let run = std::process::Command::new(&exe)
            .env("TFC_CPU", "baseline")
            .env("TFC_PREFETCH", "0")
            .env("TFC_TEST_REPACKED", repacked.to_string())
            .output()
            .unwrap();
        assert!(run.status.success(), "{name}, baseline: {}", String::from_utf8_lossy(&run.stderr));
        assert_eq!(String::from_utf8_lossy(&run.stdout).trim(), "ok");
    }
}

#[test]
fn the_c_example_generates_with_the_header_and_library() {
    let dir = build(&root().join("specs/tiny/llama.tfs"), "c-example");
    let exe = build_c(&dir, "llama", &root().join("examples/c/generate.c"));
    // A CPU without the build machine's features gets the baseline copy: the same tokens.
    for cpu in ["native", "baseline"] {
        let run = std::process::Command::new(&exe)
            .env("TFC_CPU", cpu)
            .arg(root().join("tests/fixtures/hf/llama/model.safetensors"))
            .args(["12", "188", "354", "68", "81", "173", "71", "249", "323", "49", "60", "366", "134"])
            .output()
            .unwrap();
        assert!(run.status.success(), "{cpu}: {}", String::from_utf8_lossy(&run.stderr));
        assert_eq!(
            String::from_utf8_lossy(&run.stdout).trim(),
            "54,11,247,269,207,311,54,54,54,54,54,54",
            "{cpu}"
        );
    }
}

#[test]
fn bf16_weights_match_the_interpreter_and_stay_close_to_f32() {
    // The interpreter rounds weights to the spec's dtype exactly as the runtime does; with
    // `--activations bf16` both also round every linear map's input.
    let spec = root().join("tests/specs/valid/llama_bf16.tfs");
    let fx = root().join("tests/fixtures/hf/llama");
    let ck = Arc::new(Checkpoint::open(&fx).unwrap());
    let prompt = [188, 354, 68, 81, 173, 71, 249, 323, 49, 60, 366, 134];
    let f32_logits = read_tensor(&fx.join("expected.safetensors"), "logits");
    for act in [tfc::ir::DType::F32, tfc::ir::DType::BF16] {
        let model = Model::load(build_opts(
            &spec,
            &format!("bf16-{}", act.name()),
            &Options { activations: Some(act), ..Options::default() },
            &LibOptions::default(),
        ))
        .unwrap();
        assert!(model.manifest().weights.iter().all(|w| w.dtype == "bf16" || w.shape.len() == 1));
        let mut s = Session::new(&model, WeightData::Checkpoint(ck.clone()), 2).unwrap();
        let rows = s.prefill(&prompt, None, true).unwrap();
        let c = compile(&spec, &Options { activations: Some(act), ..Options::default() });
        let w = Weights::bind(&[&c.model], &WeightSource::Checkpoint(&ck)).unwrap();
        let tokens: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
        let interp =
            run(&c.model, &w, &Inputs { tokens, ..Inputs::default() }).unwrap().remove("logits").unwrap();
        let what = format!("bf16 library vs bf16 interpreter, {} activations", act.name());
        assert_close(&what, &rows, &interp.data, tolerance(&c, &interp.data).max(1e-4));
        // Against transformers in f32: the rounding, not an error of the code.
        let d = max_diff(&rows, &f32_logits.data);
        assert!(
            d > 1e-4 && d < 5e-2,
            "bf16 vs f32 logits, {} activations: max |difference| {d:e}",
            act.name()
        );
    }
}

/// The packed f32 GEMM at its edges (`tests/specs/gemm/f32_edges.tfs`): slices of `in`
/// that end in a partial vector, two chunks of rows, a ragged last row tile; every row of
/// a long prompt, then a shorter one and decoding after it, against the interpreter. On
/// this CPU, and built for x86-64-v3 (AVX2: 16 vector registers, so register tiles one
/// vector wide, `Kb::vector_registers`). The MLIR library's kernels likewise, at both
/// register tiles (`kernels::Tile`).
#[test]
fn f32_gemm_edges_equal_the_interpreter() {
    for backend in [Backend::Llvm, Backend::Mlir] {
        for cpu in [None, Some("x86-64-v3")] {
            f32_gemm_edges(backend, cpu);
        }
    }
}

fn f32_gemm_edges(backend: Backend, cpu: Option<&str>) {
    let spec = root().join("tests/specs/gemm/f32_edges.tfs");
    let c = compile(&spec, &Options::default());
    let lib = LibOptions { backend, target_cpu: cpu.map(Into::into) };
    let tag = format!("{}-{}", cpu.unwrap_or("edges"), backend.name());
    let model = Model::load(build_opts(&spec, &tag, &Options::default(), &lib)).unwrap();
    let (w, data) = random_weights(&model, &[&c.model]);
    let mut s = Session::new(&model, data, 2).unwrap();
    let tokens: Vec<i32> = (0..203).map(|i| (i * 37 + 5) % c.spec.sizes.vocab as i32).collect();
    let inputs = Inputs { tokens: tokens.iter().map(|&t| t as i64).collect(), ..Inputs::default() };
    let want = run(&c.model, &w, &inputs).unwrap().remove("logits").unwrap();
    let tol = tolerance(&c, &want.data);
    let rows = s.prefill(&tokens, None, true).unwrap();
    assert_close("203 rows", &rows, &want.data, tol);
    s.reset();
    let last = s.prefill(&tokens[..199], None, false).unwrap();
    assert_close("prefill 199", &last, want.row(198), tol);
    for (i, &t) in tokens.iter().enumerate().skip(199) {
        assert_close(&format!("decode at {i}"), &s.decode(t).unwrap(), want.row(i), tol);
    }
}

/// A bf16 library on each code path a CPU may give it: AMX tiles (where the CPU has them),
/// the AVX-512 GEMM on bf16 pairs (`TFC_AMX=0`, where the CPU has AVX512_BF16) or on
/// weights widened to f32 (`TFC_BF16_DOTS=0` too; with the one-row products' prefetches
/// off, `TFC_PREFETCH=0`), and the baseline x86-64 copy (`TFC_CPU=baseline`), each
/// against the interpreter; prefetching into L2 (`TFC_PREFETCH=2`) with the AVX-512
/// GEMM. In child processes, since a library reads these once.
#[test]
fn bf16_gemm_paths_equal_the_interpreter() {
    let paths: [&[(&str, &str)]; 5] = [
        &[("TFC_AMX", "1")],
        &[("TFC_AMX", "0"), ("TFC_PREFETCH", "2")],
        &[("TFC_BF16_DOTS", "0")],
        &[("TFC_AMX", "0"), ("TFC_BF16_DOTS", "0"), ("TFC_PREFETCH", "0")],
        &[("TFC_CPU", "baseline")],
    ];
    for env in paths {
        run_child("backends::bf16_gemm_paths_child", env);
    }
    // Where the CPU multiplies bf16 pairs, the library built for it does so on
    // `activations = bf16`, so the children above ran that path.
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if cpuinfo.split_whitespace().any(|f| f == "avx512_bf16") {
        let spec = root().join("tests/specs/valid/mixed_bf16_act.tfs");
        let plan = tfc::backend::plan_ir(&compile(&spec, &Options::default()), &Default::default()).unwrap();
        assert!(plan.contains("_pairs"), "no bf16 pairs for this CPU:\n{plan}");
    }
}

/// A library whose weights pass 32 MB times its first decode step without the
/// weight-stream prefetches and with them into L1 and into L2, running the step again
/// each time, and keeps the fastest;
/// prefill, the measured step and the steps after it compute what the interpreter does.
#[test]
fn the_first_decode_step_measures_prefetching_and_stays_exact() {
    let spec = root().join("tests/specs/gemm/prefetch_measured.tfs");
    let c = compile(&spec, &Options::default());
    let model = Model::load(build(&spec, "prefetch-measured")).unwrap();
    let (w, data) = random_weights(&model, &[&c.model]);
    let mut s = Session::new(&model, data, 2).unwrap();
    assert_eq!(model.streaming_prefetch(), None, "chosen before a decode step");
    check_splits("prefetch_measured", &c, &w, &mut s);
    assert!(model.streaming_prefetch().is_some(), "not chosen by a decode step");
}

/// Runs the ignored test `name` of this binary in a child process with the variables
/// `env` set (a library reads such variables once), and checks that it ran and passed.
fn run_child(name: &str, env: &[(&str, &str)]) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--ignored", "--test-threads=1"])
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{env:?}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("1 passed"), "{env:?}: the child ran no test: {stdout}");
}

#[test]
#[ignore = "run by bf16_gemm_paths_equal_the_interpreter, in a child process per code path"]
fn bf16_gemm_paths_child() {
    // `[in, out]` and `[out, in]` weights; 9 rows (one padded block of 32), then 45 (two);
    // f32 activations (three bf16 parts on AMX) and bf16 ones (one part); tasks of one
    // column group and of several, the last one short (`gemm/amx_groups`); slices of
    // inputs short of `KC` on bf16 pairs (`gemm/pairs_edges`).
    let valid =
        ["conv1d_bf16", "llama_bf16", "mixed_bf16_act", "gpt2_bf16_act"].map(|n| format!("valid/{n}"));
    for path in valid.iter().map(String::as_str).chain(["gemm/amx_groups", "gemm/pairs_edges"]) {
        let name = path.rsplit('/').next().unwrap();
        let spec = root().join(format!("tests/specs/{path}.tfs"));
        let c = compile(&spec, &Options::default());
        let model = Model::load(build_with(&spec, "paths", Backend::Llvm)).unwrap();
        let (w, data) = random_weights(&model, &[&c.model]);
        let mut s = Session::new(&model, data, 2).unwrap();
        check_splits(name, &c, &w, &mut s);
        let n = 45.min(c.spec.sizes.max_seq);
        let tokens: Vec<i32> = (0..n as i32).map(|i| (i * 5 + 1) % c.spec.sizes.vocab as i32).collect();
        s.reset();
        let rows = s.prefill(&tokens, None, true).unwrap();
        let inputs = Inputs { tokens: tokens.iter().map(|&t| t as i64).collect(), ..Inputs::default() };
        let want = run(&c.model, &w, &inputs).unwrap().remove("logits").unwrap();
        assert_close(&format!("{name}: {n} rows"), &rows, &want.data, tolerance(&c, &want.data));
        if c.spec.activations == tfc::ir::DType::BF16 {
            let exact =
                compile(&spec, &Options { activations: Some(tfc::ir::DType::F32), ..Options::default() });
            let exact = run(&exact.model, &w, &inputs).unwrap().remove("logits").unwrap();
            assert_rounded(&format!("{name}: {n} rows"), &rows, &want.data, &exact.data);
        }
    }
}

/// bf16 matrices that only linear maps read are re-packed into tiles when bound; an
/// embedding table that the unembedding shares (gemma ties them) is also gathered from,
/// so it stays as stored. Either way the library computes what the interpreter does.
#[test]
fn tied_bf16_tables_stay_as_stored_and_the_rest_is_re_packed() {
    let spec = root().join("specs/tiny/gemma.tfs");
    let bf16 = Some(tfc::ir::DType::BF16);
    let c = compile(&spec, &Options { weight_dtype: bf16, ..Options::default() });
    let dir = build_opts(
        &spec,
        "tied-bf16",
        &Options { weight_dtype: bf16, ..Options::default() },
        &LibOptions::default(),
    );
    let model = Model::load(&dir).unwrap();
    for w in &model.manifest().weights {
        // [out, in] with `out` a multiple of 64 and `in` of 32: q and o [64, 64], down
        // [64, 160]; not k and v [32, 64] nor gate and up [160, 64], nor the tied table.
        let fits = ["q_proj", "o_proj", "down_proj"].iter().any(|p| w.name.ends_with(&format!("{p}.weight")));
        assert_eq!(w.repacked, fits, "{}: {:?} {}", w.name, w.shape, w.dtype);
    }
    let (w, data) = random_weights(&model, &[&c.model]);
    let mut s = Session::new(&model, data, 2).unwrap();
    check_splits("gemma, bf16 weights", &c, &w, &mut s);

    // A manifest that disagrees with its library about re-packing (a session would free
    // memory the library reads) does not load.
    let edited = dir.with_file_name("gemma-edited");
    let _ = std::fs::remove_dir_all(&edited);
    std::fs::create_dir_all(&edited).unwrap();
    std::fs::copy(dir.join("libgemma.so"), edited.join("libgemma.so")).unwrap();
    let mut manifest = model.manifest().clone();
    manifest.weights.iter_mut().find(|w| w.name == "model.embed_tokens.weight").unwrap().repacked = true;
    std::fs::write(edited.join("manifest.json"), serde_json::to_string(&manifest).unwrap()).unwrap();
    let err = Model::load(&edited).err().expect("a manifest at odds with its library").to_string();
    assert!(err.contains("`model.embed_tokens.weight` has repacked = true"), "{err}");
}

/// The two backends against each other, on the same seeded weights: every row of the
/// prompt and every decode step.
#[test]
fn llvm_and_mlir_libraries_agree() {
    for arch in ["gpt2", "qwen2"] {
        let spec = root().join("specs/tiny").join(format!("{arch}.tfs"));
        let c = compile(&spec, &Options::default());
        let llvm = Model::load(build_with(&spec, "cross", Backend::Llvm)).unwrap();
        let mlir = Model::load(build_with(&spec, "cross", Backend::Mlir)).unwrap();
        let (_, a) = random_weights(&llvm, &[&c.model]);
        let (_, b) = random_weights(&mlir, &[&c.model]);
        let (mut a, mut b) = (Session::new(&llvm, a, 2).unwrap(), Session::new(&mlir, b, 2).unwrap());
        let tokens: Vec<i32> = (0..7).map(|i| (i * 11 + 5) % c.spec.sizes.vocab as i32).collect();
        let (ra, rb) = (a.prefill(&tokens, None, true).unwrap(), b.prefill(&tokens, None, true).unwrap());
        assert_close(&format!("{arch}: llvm vs mlir, all rows"), &ra, &rb, 1e-5);
        a.reset();
        b.reset();
        a.prefill(&tokens[..3], None, false).unwrap();
        b.prefill(&tokens[..3], None, false).unwrap();
        for &t in &tokens[3..] {
            assert_close(
                &format!("{arch}: llvm vs mlir, decode"),
                &a.decode(t).unwrap(),
                &b.decode(t).unwrap(),
                1e-5,
            );
        }
    }
}

/// int8 weights (`--dtype q8`) on every causal fixture: the library computes exactly what
/// the interpreter computes with q8-rounded weights (prompt and cached decode), and stays
/// near transformers' f32 logits.
#[test]
fn q8_weights_match_the_interpreter_and_stay_close_to_f32() {
    let q8 = Some(tfc::ir::DType::Q8);
    for arch in ["gpt2", "llama", "gpt_neox", "phi"] {
        let spec = root().join("specs/tiny").join(format!("{arch}.tfs"));
        let fx = root().join("tests/fixtures/hf").join(arch);
        let dir = root().join("target/test-libs/q8").join(arch);
        let _ = std::fs::remove_dir_all(&dir);
        let q8_opts = Options { weight_dtype: q8, ..Options::default() };
        compile_library(&compile(&spec, &q8_opts), &dir, &LibOptions::default()).unwrap();
        let model = Model::load(&dir).unwrap();
        assert!(model.manifest().weights.iter().any(|w| w.dtype == "q8"), "{arch}: no q8 weight");
        let ck = Arc::new(Checkpoint::open(&fx).unwrap());
        let mut s = Session::new(&model, WeightData::Checkpoint(ck.clone()), 2).unwrap();
        let prompt = [188, 354, 68, 81, 173, 71, 249, 323, 49, 60, 366, 134];
        let rows = s.prefill(&prompt, None, true).unwrap();
        let c = compile(&spec, &Options { weight_dtype: q8, ..Options::default() });
        let w = Weights::bind(&[&c.model], &WeightSource::Checkpoint(&ck)).unwrap();
        let tokens: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
        let interp =
            run(&c.model, &w, &Inputs { tokens, ..Inputs::default() }).unwrap().remove("logits").unwrap();
        assert_close(&format!("{arch}: q8 library vs q8 interpreter"), &rows, &interp.data, 1e-4);
        let vocab = interp.shape[1];
        s.reset();
        s.prefill(&prompt[..5], None, false).unwrap();
        for (i, &t) in prompt.iter().enumerate().skip(5) {
            let row = s.decode(t).unwrap();
            assert_close(
                &format!("{arch}: q8 decode at {i}"),
                &row,
                &interp.data[i * vocab..(i + 1) * vocab],
                1e-4,
            );
        }
        let f32_logits = read_tensor(&fx.join("expected.safetensors"), "full_logits");
        let d = max_diff(&rows, &f32_logits.data[..rows.len()]);
        eprintln!("{arch}: q8 vs transformers f32 logits: max |difference| {d:e}");
        assert!(d > 1e-4 && d < 0.25, "{arch}: q8 vs f32 logits: max |difference| {d:e}");
    }
}

/// ggml block weights (`--dtype q4_0|q4_1|q4_k|q5_0|q5_1|q5_k|q6_k|q8_0`) on `[out, in]`
/// rows of whole super-blocks and of an odd number of 32s (`gemm/q4_rows`), and on
/// `[in, out]` ones partly not whole blocks (`gemm/f32_edges`, which then stay f32): the
/// library computes what the interpreter computes with the weights its blocks hold, for a
/// long prompt (the packed GEMM), and at every split of prefill and decode (the one-row
/// products). `q4_0` also built for x86-64-v3, whose nibbles take another path (no
/// 16-lane permute without AVX-512).
#[test]
fn block_weights_equal_the_interpreter() {
    use tfc::ir::{DType, Quant};
    let builds = Quant::ALL.map(|q| (q, None)).into_iter().chain([(Quant::Q4_0, Some("x86-64-v3"))]);
    for (q, cpu) in builds {
        for path in ["gemm/q4_rows", "gemm/f32_edges"] {
            let spec = root().join(format!("tests/specs/{path}.tfs"));
            let opts = Options { weight_dtype: Some(DType::Quant(q)), ..Options::default() };
            let c = compile(&spec, &opts);
            let lib = LibOptions { target_cpu: cpu.map(Into::into), ..Default::default() };
            let tag = format!("{}{}", q.name(), cpu.map_or(String::new(), |c| format!("-{c}")));
            let model = Model::load(build_opts(&spec, &tag, &opts, &lib)).unwrap();
            let dtypes: Vec<&str> = model.manifest().weights.iter().map(|w| w.dtype.as_str()).collect();
            let super_blocks =
                matches!(q, Quant::Q2_K | Quant::Q3_K | Quant::Q4_K | Quant::Q5_K | Quant::Q6_K);
            assert!(dtypes.contains(&q.name()) || (super_blocks && path.contains("edges")), "{dtypes:?}");
            assert!(dtypes.iter().any(|d| d.starts_with('q')), "{path}: no quantised weight: {dtypes:?}");
            let (w, data) = random_weights(&model, &[&c.model]);
            let mut s = Session::new(&model, data, 2).unwrap();
            splits_and_40_rows(&format!("{path}, {tag}"), &c, &w, &mut s);
        }
    }
}

/// `activations = q8` (linear maps with block weights take `round_q8`'d inputs) in the
/// library against the interpreter, for every block type, on the code paths a CPU may
/// give it: the native one (integer products of `Q4_K` with AVX-512) and the baseline
/// x86-64 copy (f32 products of the same values). In child processes, since a library
/// chooses once.
#[test]
fn q8_activations_equal_the_interpreter() {
    for cpu in ["native", "baseline"] {
        run_child("backends::q8_activations_child", &[("TFC_CPU", cpu)]);
    }
}

#[test]
#[ignore = "run by q8_activations_equal_the_interpreter, in a child process per code path"]
fn q8_activations_child() {
    use tfc::ir::{DType, Quant};
    // Where the library and the interpreter round the same values (`gemm/q8x_head`), they
    // differ by the order of f32 sums only: 9 rows (the few-row products), 40 (the packed
    // GEMM), decode (one row) and batched decode steps.
    let spec = root().join("tests/specs/gemm/q8x_head.tfs");
    let c = compile(&spec, &Options::default());
    let model = Model::load(build_opts(&spec, "q8x", &Options::default(), &LibOptions::default())).unwrap();
    let (w, data) = random_weights(&model, &[&c.model]);
    let mut s = Session::new(&model, data, 2).unwrap();
    check_splits_within("q8x_head", &c, &w, &mut s, Some(1e-5));
    let tokens: Vec<i32> = (0..40).map(|i| (i * 37 + 5) % c.spec.sizes.vocab as i32).collect();
    let inputs = Inputs { tokens: tokens.iter().map(|&t| t as i64).collect(), ..Inputs::default() };
    let want = run(&c.model, &w, &inputs).unwrap().remove("logits").unwrap();
    s.reset();
    assert_close("q8x_head: 40 rows", &s.prefill(&tokens, None, true).unwrap(), &want.data, 1e-5);
    drop(s);
    let dtypes = Quant::ALL.map(DType::Quant).into_iter().chain([DType::Q8]);
    for dtype in dtypes {
        for path in ["gemm/q4_rows", "gemm/f32_edges"] {
            let spec = root().join(format!("tests/specs/{path}.tfs"));
            let opts =
                Options { weight_dtype: Some(dtype), activations: Some(DType::Q8), ..Options::default() };
            let c = compile(&spec, &opts);
            let tag = format!("{}-q8x", dtype.name());
            let model = Model::load(build_opts(&spec, &tag, &opts, &LibOptions::default())).unwrap();
            let (w, data) = random_weights(&model, &[&c.model]);
            let mut s = Session::new(&model, data, 2).unwrap();
            splits_and_40_rows(&format!("{path}, {tag}"), &c, &w, &mut s);
            drop(s);
            let session = || Session::new(&model, random_weights(&model, &[&c.model]).1, 2).unwrap();
            check_batched_decode(&format!("{path}, {tag}"), &c, &session);
        }
    }
}

/// The MLIR library's products at their edges (`tests/specs/gemm/rows_edges.tfs` and
/// `f32_edges.tfs`: partial row tiles, output blocks and input vectors, in both storage
/// orders, grouped heads) at both register tiles, every split and 40 rows at once.
#[test]
fn mlir_product_edges_equal_the_interpreter() {
    for spec in ["rows_edges", "f32_edges"] {
        let spec = root().join(format!("tests/specs/gemm/{spec}.tfs"));
        let c = compile(&spec, &Options::default());
        for cpu in [None, Some("x86-64-v3")] {
            let lib = LibOptions { backend: Backend::Mlir, target_cpu: cpu.map(Into::into) };
            let model =
                Model::load(build_opts(&spec, cpu.unwrap_or("edges"), &Options::default(), &lib)).unwrap();
            let (w, data) = random_weights(&model, &[&c.model]);
            let mut s = Session::new(&model, data, 2).unwrap();
            let name = format!("{} (MLIR, {})", spec.display(), cpu.unwrap_or("native"));
            splits_and_40_rows(&name, &c, &w, &mut s);
        }
    }
}

/// A library session against the interpreter: prefill, decode and extend at every split
/// (`check_splits`), then a prompt of 40 rows at once (the packed GEMM's row tiles).
fn splits_and_40_rows(name: &str, c: &tfc::Compiled, w: &Weights, s: &mut Session) {
    check_splits(name, c, w, s);
    let tokens: Vec<i32> = (0..40).map(|i| (i * 37 + 5) % c.spec.sizes.vocab as i32).collect();
    let inputs = Inputs { tokens: tokens.iter().map(|&t| t as i64).collect(), ..Inputs::default() };
    let want = run(&c.model, w, &inputs).unwrap().remove("logits").unwrap();
    s.reset();
    let rows = s.prefill(&tokens, None, true).unwrap();
    assert_close(&format!("{name}: 40 rows"), &rows, &want.data, tolerance(c, &want.data));
}

/// A mixture of experts in the LLVM library (the expert projections on every linear
/// kernel: packed over an expert's rows in prefill, dot products in decode, each storage
/// type read where the expert's slice of the 3-D tensor lies) against the interpreter:
/// prompt, prefill + decode and extend at every split, 40 rows at once.
#[test]
fn mixtures_of_experts_equal_the_interpreter() {
    use tfc::ir::{DType, Quant};
    let spec = root().join("tests/specs/gemm/moe.tfs");
    let dtypes = [
        None,
        Some(DType::BF16),
        Some(DType::Q8),
        Some(DType::Quant(Quant::Q4_K)),
        Some(DType::Quant(Quant::Q6_K)),
    ];
    // The MLIR library (f32 and bf16 weights: what it takes) as well.
    let runs = dtypes
        .iter()
        .map(|&d| (Backend::Llvm, d))
        .chain([None, Some(DType::BF16)].map(|d| (Backend::Mlir, d)));
    for (backend, dtype) in runs {
        let opts = Options { weight_dtype: dtype, ..Options::default() };
        let c = compile(&spec, &opts);
        let tag = dtype.map_or("f32".into(), |d| d.name().to_string());
        let lib = LibOptions { backend, ..LibOptions::default() };
        let model = Model::load(build_opts(&spec, &tag, &opts, &lib)).unwrap();
        let (w, data) = random_weights(&model, &[&c.model]);
        let mut s = Session::new(&model, data, 2).unwrap();
        splits_and_40_rows(&format!("moe, {tag}, {} library", backend.name()), &c, &w, &mut s);
    }
}

/// A router whose logits all tie chooses the lowest experts in every engine, as the
/// interpreter does (`Route::route`): with the routers' matrices zeroed (gpt-oss's router
/// bias is zero too), every row's choice is a tie of all its experts, and any other
/// choice would give other outputs.
#[test]
fn tied_routers_choose_the_lowest_experts_in_every_engine() {
    let spec = root().join("tests/specs/gemm/moe.tfs");
    let c = compile(&spec, &Options::default());
    for backend in [Backend::Llvm, Backend::Mlir] {
        let model = Model::load(build_with(&spec, "tied-routers", backend)).unwrap();
        let (mut w, data) = random_weights(&model, &[&c.model]);
        let order: Vec<&str> = model.manifest().weights.iter().map(|m| m.name.as_str()).collect();
        let bufs = zero_routers(&c, &mut w, data, &order);
        let mut s = Session::new(&model, bufs, 2).unwrap();
        splits_and_40_rows(&format!("tied routers, {} library", backend.name()), &c, &w, &mut s);
    }
}

/// A latent attention's cache holds the latent and the rotated key part per token and
/// layer, not expanded keys and values: the manifest says so, and the library's decode
/// equals its prefill at every split (`backend_tests` on the DeepSeek fixtures).
#[test]
fn a_latent_attention_caches_its_latent_only() {
    let built = build(&root().join("specs/tiny/deepseek_v3.tfs"), "mla-cache");
    let m = Model::load(&built).unwrap();
    // 2 layers × (kv_rank 24 + rope_dim 8) f32s; expanded keys and values would be
    // 2 × 4 heads × (24 + 16) f32s.
    assert_eq!(m.manifest().kv_cache.bytes_per_token, 2 * (24 + 8) * 4);
    assert_eq!(m.manifest().kv_cache.bytes, 2 * (24 + 8) * 4 * 64);
}
