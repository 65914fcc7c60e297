//! The reference interpreter against Hugging Face transformers, on the twenty-five fixture
//! architectures in `tests/fixtures/hf/` (see its README): logits within 1e-4 for one
//! full forward pass over the prompt and over prompt + continuation, identical greedy
//! continuations, and prefill + decode through the KV cache against the full pass.

use tfc::interp::{argmax, run, Inputs, Session, WeightSource, Weights};
use tfc::Options;
use tfc_runtime::Checkpoint;

use crate::common::*;

const TOL: f32 = 1e-4;

fn check(arch: &str) {
    let dir = root().join("tests/fixtures/hf").join(arch);
    let spec = root().join("specs/tiny").join(format!("{arch}.tfs"));
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("fixture.json")).unwrap()).unwrap();
    let ids = |k: &str| -> Vec<i64> {
        fixture[k].as_array().map(|a| a.iter().map(|v| v.as_i64().unwrap()).collect()).unwrap_or_default()
    };
    let (prompt, greedy) = (ids("prompt"), ids("greedy"));
    let expected = dir.join("expected.safetensors");
    let c = compile(&spec, &Options::default());
    let ck = Checkpoint::open(&dir).unwrap();
    let mut graphs = vec![&c.model, &c.prefill];
    graphs.extend(c.decode.as_ref());
    let w = Weights::bind(&graphs, &WeightSource::Checkpoint(&ck)).unwrap();

    let full = |tokens: &[i64]| {
        let inputs = Inputs { tokens: tokens.to_vec(), ..Inputs::default() };
        let mut out = run(&c.model, &w, &inputs).unwrap();
        out.remove("logits").or_else(|| out.remove("hidden")).unwrap()
    };

    if c.decode.is_none() {
        // An encoder: the last hidden state, from the model graph and from prefill.
        let want = read_tensor(&expected, "last_hidden_state");
        let got = full(&prompt);
        assert_eq!(got.shape, want.shape);
        assert_close(&format!("{arch} hidden"), &got.data, &want.data, TOL);
        let mut s = Session::new(&c, &w);
        let last = s.prefill(&prompt, &[], false).unwrap();
        assert_close(
            &format!("{arch} prefill hidden, last row"),
            &last.data,
            &want.data[(prompt.len() - 1) * want.shape[1]..],
            TOL,
        );
        return;
    }

    // One full forward pass.
    let want = read_tensor(&expected, "logits");
    let got = full(&prompt);
    assert_eq!(got.shape, want.shape);
    assert_close(&format!("{arch} prompt logits"), &got.data, &want.data, TOL);
    let mut all = prompt.clone();
    all.extend(&greedy);
    let want_full = read_tensor(&expected, "full_logits");
    let got_full = full(&all);
    assert_close(&format!("{arch} full logits"), &got_full.data, &want_full.data, TOL);

    // Prefill + decode through the cache: the same logits row by row, the same tokens.
    let vocab = want_full.shape[1];
    let mut s = Session::new(&c, &w);
    let mut logits = s.prefill(&prompt, &[], false).unwrap();
    let row = |i: usize| &want_full.data[i * vocab..(i + 1) * vocab];
    let mut generated = Vec::new();
    for step in 0..greedy.len() {
        let pos = prompt.len() - 1 + step;
        assert_close(&format!("{arch} cached logits at position {pos}"), &logits.data, row(pos), TOL);
        let next = argmax(&logits.data) as i64;
        generated.push(next);
        if step + 1 < greedy.len() {
            logits = s.decode(next).unwrap();
        }
    }
    assert_eq!(generated, greedy, "{arch}: greedy continuation through the cache");
}

macro_rules! fixture_tests {
    ($($arch:ident),*) => { $( #[test] fn $arch() { check(stringify!($arch)); } )* };
}

with_fixtures!(fixture_tests);

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
