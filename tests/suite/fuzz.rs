//! Fuzzing on stable Rust, under `cargo test`: each target takes inputs made by mutating
//! its committed corpus (`tests/fuzz/<target>/`) and must answer every one with a result,
//! never a panic, an abort or a hang. A failing input is saved under
//! `target/fuzz-failures/<target>/` and named in the failure.
//!
//! The mutations are byte-level (bit flips, interesting bytes, deletions, duplications,
//! dictionary tokens, splices of two corpus entries, truncation), stacked one to eight
//! deep, from a seeded SplitMix64, so a run is repeatable. There is no coverage feedback:
//! the corpus is the map, and the dictionary the grammar.
//!
//! `TFC_FUZZ_SECONDS` (default 3 per target) and `TFC_FUZZ_SEED` set a run's length and
//! seed; the suite runs each target for the default, and a longer run is
//! `TFC_FUZZ_SECONDS=600 cargo test --release -p tfc-tests --test suite fuzz::`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tfc_runtime::{Checkpoint, Model, SplitMix64};

use crate::common::*;

/// Tokens of the inputs' languages: spec syntax, JSON, safetensors headers.
const DICTIONARY: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"(",
    b")",
    b"=",
    b",",
    b":",
    b"\"",
    b"\n",
    b"#",
    b"+",
    b"-",
    b"*",
    b"/",
    b"model",
    b"embed",
    b"block",
    b"head",
    b"layers",
    b"heads",
    b"kv_heads",
    b"d_model",
    b"d_ff",
    b"vocab",
    b"max_seq",
    b"head_dim",
    b"attention",
    b"mlp",
    b"rmsnorm",
    b"layernorm",
    b"embedding",
    b"unembed",
    b"rope",
    b"alibi",
    b"tied",
    b"pattern",
    b"scaling",
    b"yarn",
    b"llama3",
    b"linear",
    b"qk_norm",
    b"over",
    b"width",
    b"softcap",
    b"fairseq",
    b"\"layer_types\"",
    b"\"rope_parameters\"",
    b"\"rope_type\"",
    b"\"sliding_attention\"",
    b"\"full_attention\"",
    b"\"factor\"",
    b"at",
    b"{layer}",
    b"x",
    b"tokens",
    b"positions",
    b"0",
    b"1",
    b"-1",
    b"1e308",
    b"4294967296",
    b"65536",
    b"1073741824",
    b"0.5",
    b"null",
    b"true",
    b"false",
    b"\"dtype\"",
    b"\"F32\"",
    b"\"BF16\"",
    b"\"F16\"",
    b"\"I64\"",
    b"\"shape\"",
    b"\"data_offsets\"",
    b"\"__metadata__\"",
    b"\"weight_map\"",
    b"\"model_type\"",
    b"\"llama\"",
    b"\"gpt2\"",
    b"\"hidden_size\"",
    b"\"num_attention_heads\"",
    b"\"num_key_value_heads\"",
    b"\"weights\"",
    b"\"name\"",
    b"\"repacked\"",
    b"\"library\"",
    b"\"vocab\"",
    b"\"output_width\"",
];

const INTERESTING: &[u8] = &[0, 1, 0x7f, 0x80, 0xff, b'0', b'9', b' ', b'"', b'{', b'}', b'[', b']', b'\n'];

fn seconds() -> f64 {
    std::env::var("TFC_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3.0)
}

fn below(rng: &mut SplitMix64, n: usize) -> usize {
    (rng.next_u64() % n.max(1) as u64) as usize
}

/// One input: a corpus entry with one to eight stacked mutations.
fn mutate(rng: &mut SplitMix64, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut v = corpus[below(rng, corpus.len())].clone();
    for _ in 0..1 + below(rng, 8) {
        let at = below(rng, v.len() + 1);
        match below(rng, 8) {
            0 if !v.is_empty() => {
                let i = below(rng, v.len());
                v[i] ^= 1 << below(rng, 8);
            }
            1 if !v.is_empty() => {
                let i = below(rng, v.len());
                v[i] = INTERESTING[below(rng, INTERESTING.len())];
            }
            2 => {
                let n = below(rng, 16.min(v.len() - at) + 1);
                v.drain(at..at + n);
            }
            3 if at < v.len() => {
                let n = 1 + below(rng, 64.min(v.len() - at));
                let piece = v[at..at + n].to_vec();
                let to = below(rng, v.len() + 1);
                v.splice(to..to, piece.iter().copied().cycle().take(n * (1 + below(rng, 4))));
            }
            4 | 5 => {
                let t = DICTIONARY[below(rng, DICTIONARY.len())];
                v.splice(at..at, t.iter().copied());
            }
            6 => {
                let other = &corpus[below(rng, corpus.len())];
                let from = below(rng, other.len() + 1);
                v.truncate(at);
                v.extend_from_slice(&other[from..]);
            }
            _ => v.truncate(at),
        }
    }
    v
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = root().join("tests/fuzz").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let c: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(!c.is_empty(), "{} has no corpus", dir.display());
    c
}

/// Runs `check` on the corpus itself, then on mutated inputs for the run's length.
/// Returns how many inputs ran.
fn fuzz(target: &str, extra: Vec<Vec<u8>>, check: &dyn Fn(&[u8])) -> u64 {
    let mut seeds = corpus(target);
    seeds.extend(extra);
    let seed = std::env::var("TFC_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed);
    let mut rng = SplitMix64(seed ^ u64::from_str_radix(&tfc_runtime::abi::fnv1a(target), 16).unwrap());
    let end = Instant::now() + Duration::from_secs_f64(seconds());
    let mut count = 0u64;
    let one = |input: &[u8]| {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(input))).is_err() {
            let dir = root().join("target/fuzz-failures").join(target);
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(tfc_runtime::abi::fnv1a_bytes(input));
            std::fs::write(&path, input).unwrap();
            panic!("fuzz target `{target}` panicked on the input saved as {}", path.display());
        }
    };
    for s in &seeds {
        one(s);
        count += 1;
    }
    while Instant::now() < end {
        for _ in 0..64 {
            one(&mutate(&mut rng, &seeds));
            count += 1;
        }
    }
    eprintln!("fuzz {target}: {count} inputs in {:.0} s, no failure", seconds());
    count
}

#[test]
fn fuzz_spec_front_end() {
    let extra = specs_in(&root().join("specs/tiny")).iter().map(|p| std::fs::read(p).unwrap()).collect();
    fuzz("spec", extra, &|input| {
        let text = String::from_utf8_lossy(input);
        match tfc::front::compile_spec("fuzz.tfs", &text, &Default::default()) {
            Ok(_) => {
                // A spec the front end accepts goes through every pass too.
                if let Err(tfc::CompileError::Pass(e)) =
                    tfc::compile("fuzz.tfs", &text, &tfc::Options::default(), &mut |_, _| {})
                {
                    panic!("a pass failed on a spec the front end accepted: {e}");
                }
            }
            Err(d) => {
                assert!(!d.list.is_empty());
                let _ = d.render(false);
            }
        }
    });
}

#[test]
fn fuzz_import_hf() {
    let extra = std::fs::read_dir(root().join("tests/fixtures/hf"))
        .unwrap()
        .filter_map(|e| std::fs::read(e.unwrap().path().join("config.json")).ok())
        .collect();
    fuzz("import", extra, &|input| {
        if let Ok(spec) = tfc::import::hf::import(&String::from_utf8_lossy(input)) {
            // What the importer writes always compiles.
            tfc::front::compile_spec("imported.tfs", &spec, &Default::default()).unwrap();
        }
    });
}

/// A file the target writes each input to (one per target, so targets run in parallel).
fn scratch_file(name: &str) -> PathBuf {
    let dir = root().join("target/fuzz-scratch");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Reads every tensor of a checkpoint that opened, as a model would.
fn read_all(ck: &Checkpoint) {
    for name in ck.names() {
        let _ = ck.non_finite(name);
        let _ = ck.get(name, &[1]);
    }
}

#[test]
fn fuzz_safetensors_files() {
    let file = scratch_file("model.safetensors");
    fuzz("safetensors", vec![], &|input| {
        std::fs::write(&file, input).unwrap();
        if let Ok(ck) = Checkpoint::open(&file) {
            read_all(&ck);
        }
    });
}

#[test]
fn fuzz_safetensors_index() {
    let dir = scratch_file("sharded");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (i, seed) in corpus("safetensors").iter().take(2).enumerate() {
        std::fs::write(dir.join(format!("model-0000{}-of-00002.safetensors", i + 1)), seed).unwrap();
    }
    let index = dir.join("model.safetensors.index.json");
    fuzz("index", vec![], &|input| {
        std::fs::write(&index, input).unwrap();
        if let Ok(ck) = Checkpoint::open(&dir) {
            read_all(&ck);
        }
    });
}

#[test]
fn fuzz_manifest_loader() {
    // A real library and manifest; mutated manifests beside a copy of the library must
    // load only when they are true to it, and then run.
    let built = crate::backends::build(&root().join("specs/tiny/gpt2.tfs"), "fuzz");
    let dir = scratch_file("manifest");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(built.join("libgpt2.so"), dir.join("libgpt2.so")).unwrap();
    let good = std::fs::read(built.join("manifest.json")).unwrap();
    let c = compile(&root().join("specs/tiny/gpt2.tfs"), &tfc::Options::default());
    let weights = Arc::new(
        tfc::interp::Weights::bind(&[&c.model], &tfc::interp::WeightSource::Random { seed: 3 }).unwrap(),
    );
    let path = dir.join("manifest.json");
    fuzz("manifest", vec![good], &|input| {
        std::fs::write(&path, input).unwrap();
        let Ok(model) = Model::load(&dir) else { return };
        let data = model.manifest().weights.iter().map(|w| weights.get(&w.name).map(|t| t.data.clone()));
        let Ok(data) = data.collect::<Result<Vec<_>, _>>() else { return };
        let mut s = tfc_runtime::Session::new(&model, tfc_runtime::WeightData::Owned(data), 1)
            .expect("a manifest that loads binds its weights");
        let out = s.prefill(&[1, 2, 3], None, false).expect("a manifest that loads runs");
        assert_eq!(out.len(), model.manifest().output_width);
    });
}

#[test]
fn mutations_are_repeatable_and_varied() {
    let seeds = vec![b"model m\nvocab = 3\n".to_vec(), b"{\"a\": [1, 2]}".to_vec()];
    let run = |seed| {
        let mut rng = SplitMix64(seed);
        (0..200).map(|_| mutate(&mut rng, &seeds)).collect::<Vec<_>>()
    };
    assert_eq!(run(1), run(1));
    let distinct: std::collections::HashSet<Vec<u8>> = run(1).into_iter().collect();
    assert!(distinct.len() > 150, "{} distinct of 200", distinct.len());
}

/// Damaged GGUF files: the reader, every tensor decoded at its own shape, the importer and
/// the tokenizer give errors, never a panic.
#[test]
fn fuzz_gguf_files() {
    let file = scratch_file("model.gguf");
    let extra = vec![std::fs::read(root().join("tests/fixtures/gguf/llama_q8_0.gguf")).unwrap()];
    fuzz("gguf", extra, &|input| {
        std::fs::write(&file, input).unwrap();
        let Ok(ck) = Checkpoint::open(&file) else { return };
        read_all(&ck);
        let Some(g) = ck.gguf() else { return };
        for (name, t) in &g.tensors {
            let _ = ck.get(name, &t.shape);
        }
        let _ = tfc::import::gguf::import(g, "fuzz.gguf");
        let _ = tfc::text::gguf_tokenizer(g);
    });
}
