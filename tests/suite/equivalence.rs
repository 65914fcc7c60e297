//! The core invariant: running a causal model in parallel over a sequence and running it
//! one token at a time through the KV cache are the same computation. Checked with
//! seeded random weights on every small spec, for several prompt/decode splits, and with
//! the prompt continued from the cache (extend) in chunks.

use tfc::interp::{run, Inputs, Session, WeightSource, Weights};
use tfc::Options;

use crate::common::*;

fn check(spec: &std::path::Path) {
    let c = compile(spec, &Options::default());
    let Some(_) = &c.decode else { return };
    let mut graphs = vec![&c.model, &c.prefill_all];
    graphs.extend(c.decode.as_ref());
    graphs.extend(c.extend.as_ref());
    let w = Weights::bind(&graphs, &WeightSource::Random { seed: 7 }).unwrap();
    let vocab = c.spec.sizes.vocab;
    let tokens: Vec<i64> = (0..10).map(|i| (i * 37 + 11) % vocab as i64).collect();
    let inputs = Inputs { tokens: tokens.clone(), ..Inputs::default() };
    let mut full = run(&c.model, &w, &inputs).unwrap();
    let full = full.remove("logits").or_else(|| full.remove("hidden")).unwrap();
    let width = full.shape[1];
    let name = spec.file_name().unwrap().to_string_lossy();
    let tol = tolerance(&c, &full.data);
    for split in [1, 4, 9] {
        let mut s = Session::new(&c, &w);
        let pre = s.prefill(&tokens[..split], &[], true).unwrap();
        assert_close(&format!("{name}: prefill of {split}"), &pre.data, &full.data[..split * width], tol);
        for (i, &t) in tokens.iter().enumerate().skip(split) {
            let row = s.decode(t).unwrap();
            let what = format!("{name}: decode at position {i} after a prefill of {split}");
            assert_close(&what, &row.data, &full.data[i * width..(i + 1) * width], tol);
        }
        // The rest in chunks of three, each continuing the cache.
        let mut s = Session::new(&c, &w);
        s.prefill(&tokens[..split], &[], false).unwrap();
        let mut at = split;
        for chunk in tokens[split..].chunks(3) {
            let rows = s.extend(chunk, true).unwrap();
            let what =
                format!("{name}: extend of {} at position {at} after a prefill of {split}", chunk.len());
            assert_close(&what, &rows.data, &full.data[at * width..(at + chunk.len()) * width], tol);
            at += chunk.len();
        }
        // The last row only.
        let mut s = Session::new(&c, &w);
        s.prefill(&tokens[..split], &[], false).unwrap();
        let last = s.extend(&tokens[split..], false).unwrap();
        assert_close(&format!("{name}: extend's last row after {split}"), &last.data, full.row(9), tol);
    }
}

#[test]
fn prefill_then_decode_equals_one_full_pass() {
    let mut specs = specs_in(&root().join("specs/tiny"));
    specs.extend(specs_in(&root().join("tests/specs/valid")));
    assert!(specs.len() >= 12);
    for s in specs {
        check(&s);
    }
}

#[test]
fn the_cache_is_bounded_by_max_seq() {
    let c = compile(&root().join("specs/tiny/gpt2.tfs"), &Options::default());
    let w =
        Weights::bind(&[&c.prefill, c.decode.as_ref().unwrap()], &WeightSource::Random { seed: 1 }).unwrap();
    let mut s = Session::new(&c, &w);
    let err = s.prefill(&vec![1; 65], &[], false).unwrap_err().to_string();
    assert!(err.contains("max_seq of 64"), "{err}");
    s.prefill(&vec![1; 64], &[], false).unwrap();
    let err = s.decode(1).unwrap_err().to_string();
    assert!(err.contains("65 positions exceed"), "{err}");
    s.reset();
    let err = s.prefill(&[384], &[], false).unwrap_err().to_string();
    assert!(err.contains("outside the vocabulary"), "{err}");
}
