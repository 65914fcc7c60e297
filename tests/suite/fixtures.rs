//! The reference interpreter against Hugging Face transformers, on every fixture
//! architecture in `tests/fixtures/hf/` (see its README; `check_fixture` says what is
//! compared): logits within 1e-4 for one full forward pass over the prompt and over
//! prompt + continuation, identical greedy continuations, and prefill + decode through
//! the KV cache against the full pass.

use tfc::interp::{Session, WeightSource, Weights};
use tfc::Options;
use tfc_runtime::Checkpoint;

use crate::common::*;

fn check(arch: &str) {
    let fx = Fixture::load(arch);
    for r in fx.regimes() {
        let c = compile(&fx.spec, &r.options);
        let ck = Checkpoint::open(&fx.dir).unwrap();
        let mut graphs = vec![&c.model, &c.prefill, &c.prefill_all];
        graphs.extend(c.decode.as_ref());
        let w = Weights::bind(&graphs, &WeightSource::Checkpoint(&ck)).unwrap();
        check_fixture(&fx, &r, "the interpreter", &mut Session::new(&c, &w));
    }
}

macro_rules! fixture_tests {
    ($($arch:ident),*) => { $( #[test] fn $arch() { check(stringify!($arch)); } )* };
}

with_fixtures!(fixture_tests);
with_moe_fixtures!(fixture_tests);

#[test]
fn a_checkpoint_that_does_not_fit_is_a_clear_error() {
    let bind = |spec: &str, ck: &str| {
        let c = compile(&root().join("specs/tiny").join(spec), &Options::default());
        let ck = Checkpoint::open(root().join("tests/fixtures/hf").join(ck)).unwrap();
        Weights::bind(&[&c.model], &WeightSource::Checkpoint(&ck)).err().map(|e| e.to_string())
    };
    let missing = bind("qwen2.tfs", "llama").unwrap();
    assert_eq!(missing, "the checkpoint has no tensor `model.layers.0.self_attn.q_proj.bias`");
    let shape = bind("gemma.tfs", "llama").unwrap();
    assert!(
        shape.contains(
            "`model.layers.0.self_attn.q_proj.weight` has shape [64, 64], the model expects [128, 64]"
        ),
        "{shape}"
    );
    let e = Checkpoint::open(root().join("tests/fixtures")).err().unwrap().to_string();
    assert!(e.contains("holds no `model.safetensors`"), "{e}");
}

#[test]
fn a_sharded_checkpoint_reads_like_one_file() {
    // Split the llama fixture into two shards with an index, as large checkpoints come.
    let src = root().join("tests/fixtures/hf/llama/model.safetensors");
    let bytes = std::fs::read(&src).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let dir = root().join("target/test-shards/llama");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [("model-00001-of-00002.safetensors", a), ("model-00002-of-00002.safetensors", b)] {
        let views: Vec<(String, safetensors::tensor::TensorView)> =
            part.iter().map(|n| (n.clone(), st.tensor(n).unwrap())).collect();
        safetensors::serialize_to_file(views, None, &dir.join(file)).unwrap();
        for n in part {
            map.insert(n.clone(), file.into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let sharded = Checkpoint::open(&dir).unwrap();
    let whole = Checkpoint::open(src).unwrap();
    assert_eq!(sharded.names(), whole.names());
    for n in whole.names() {
        let shape: Vec<usize> = st.tensor(n).unwrap().shape().to_vec();
        assert_eq!(sharded.get(n, &shape).unwrap(), whole.get(n, &shape).unwrap(), "{n}");
    }
}

/// A mixture whose spec and checkpoint disagree is an error naming the tensor: more
/// experts than the checkpoint has, a fused expert tensor of another shape, an expert
/// width that does not match.
#[test]
fn a_mixture_that_does_not_fit_its_checkpoint_is_a_clear_error() {
    let bind = |spec: &str, ck: &str| {
        let c = compile_text("moe.tfs", spec);
        let ck = Checkpoint::open(root().join("tests/fixtures/hf").join(ck)).unwrap();
        Weights::bind(&[&c.model], &WeightSource::Checkpoint(&ck)).err().map(|e| e.to_string())
    };
    let read =
        |arch: &str| std::fs::read_to_string(root().join("specs/tiny").join(format!("{arch}.tfs"))).unwrap();
    let more = bind(&read("mixtral").replace("experts = 4", "experts = 6"), "mixtral").unwrap();
    assert!(
        more.contains(
            "`model.layers.0.block_sparse_moe.gate.weight` has shape [4, 64], the model expects [6, 64]"
        ),
        "{more}"
    );
    let wider =
        bind(&read("granitemoe").replace("top_k = 2", "top_k = 2, d_expert = 128"), "granitemoe").unwrap();
    assert!(
        wider.contains("`model.layers.0.block_sparse_moe.input_linear.weight` has shape [4, 320, 64], the model expects [4, 256, 64]"),
        "{wider}"
    );
    let fewer = bind(&read("granitemoe").replace("experts = 4", "experts = 3"), "granitemoe").unwrap();
    assert!(fewer.contains("has shape [4, 64], the model expects [3, 64]"), "{fewer}");
    let missing = bind(&read("mixtral").replace("up = \"w3\"", "up = \"w4\""), "mixtral").unwrap();
    assert!(missing.contains("model.layers.0.block_sparse_moe.experts.0.w4.weight"), "{missing}");
}
