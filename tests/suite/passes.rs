//! Small before/after checks of each pass, on the tiny GPT-2 spec (and LLaMA where it
//! differs).

use tfc::interp::{run, Inputs, WeightSource, Weights};
use tfc::ir::{verify, Dim, Graph, InputKind, Op};
use tfc::Options;

use crate::common::*;

fn count(g: &Graph, f: impl Fn(&Op) -> bool) -> usize {
    g.node_ids().into_iter().filter(|&n| f(g.op(n))).count()
}

fn gpt2() -> tfc::Compiled {
    compile(&root().join("specs/tiny/gpt2.tfs"), &Options::default())
}

#[test]
fn cse_merges_the_tied_unembedding_with_the_embedding() {
    let c = gpt2();
    let wte =
        |g: &Graph| count(g, |op| matches!(op, Op::Weight { name, .. } if name == "transformer.wte.weight"));
    assert_eq!(wte(&c.lowered), 2);
    assert_eq!(wte(&c.model), 1);
    // One positions node per attention and one for the embedding become one.
    assert_eq!(count(&c.lowered, |op| *op == Op::Positions), 3);
    assert_eq!(count(&c.model, |op| *op == Op::Positions), 1);
}

#[test]
fn fusion_replaces_every_attention_chain() {
    let c = gpt2();
    let softmax = |g: &Graph| count(g, |op| *op == Op::Softmax);
    let fused = |g: &Graph| count(g, |op| matches!(op, Op::Attention { .. }));
    assert_eq!((softmax(&c.lowered), fused(&c.lowered)), (2, 0));
    assert_eq!((softmax(&c.model), fused(&c.model)), (0, 2));
    assert_eq!(count(&c.model, |op| matches!(op, Op::Mask(_) | Op::Scale(_) | Op::HeadMatMul { .. })), 0);
}

#[test]
fn split_makes_the_cache_explicit() {
    let c = gpt2();
    let d = c.decode.as_ref().unwrap();
    let caches: Vec<_> = d
        .node_ids()
        .into_iter()
        .filter(|&n| matches!(d.op(n), Op::Input(InputKind::Cache { .. })))
        .map(|n| d.ty(n).shape.clone())
        .collect();
    assert_eq!(caches.len(), 4);
    assert!(caches.iter().all(|s| *s == [Dim::fixed(4), Dim::P, Dim::fixed(16)]));
    assert_eq!(d.ty(d.output("logits").unwrap()).shape, [Dim::fixed(1), Dim::fixed(384)]);
    assert_eq!(d.ty(d.output("cache.k.1").unwrap()).shape, [Dim::fixed(4), Dim::fixed(1), Dim::fixed(16)]);
    let p = &c.prefill;
    assert_eq!(p.ty(p.output("cache.v.0").unwrap()).shape, [Dim::fixed(4), Dim::T, Dim::fixed(16)]);
    assert_eq!(p.ty(p.output("logits").unwrap()).shape, [Dim::fixed(1), Dim::fixed(384)]);
    let all = &c.prefill_all;
    assert_eq!(all.ty(all.output("logits").unwrap()).shape, [Dim::T, Dim::fixed(384)]);
}

/// Per layer, how many linear maps and attentions of `g` run on all `T` rows.
fn full_rows(g: &Graph, layer: u32) -> (usize, usize) {
    let full = |f: &dyn Fn(&Op) -> bool| {
        let rows = |n| g.ty(n).shape[g.ty(n).rank() - 2];
        g.node_ids()
            .into_iter()
            .filter(|&n| g.node(n).layer == Some(layer) && f(g.op(n)) && rows(n) == Dim::T)
            .count()
    };
    (full(&|op| matches!(op, Op::Linear { .. })), full(&|op| matches!(op, Op::Attention { .. })))
}

/// Prefill's logits against the last row of the model graph's, which computes every row.
fn narrowed_logits_match(c: &tfc::Compiled) {
    let w = Weights::bind(&[&c.prefill, &c.model], &WeightSource::Random { seed: 3 }).unwrap();
    let inputs = Inputs { tokens: vec![5, 6, 7, 8, 9], ..Inputs::default() };
    let last = run(&c.prefill, &w, &inputs).unwrap().remove("logits").unwrap();
    let full = run(&c.model, &w, &inputs).unwrap().remove("logits").unwrap();
    assert_close("narrowed logits", &last.data, full.row(4), 0.0);
}

#[test]
fn narrowing_runs_the_head_and_most_of_the_last_layer_on_one_row() {
    let c = gpt2();
    let p = &c.prefill;
    // The first layer needs every row; the last one only its fused QKV projection,
    // whose keys and values go to the cache.
    assert_eq!(full_rows(p, 0), (4, 1));
    assert_eq!(full_rows(p, 1), (1, 0));
    let lm = p.output("logits").unwrap();
    assert_eq!(p.ty(lm).shape[0], Dim::fixed(1));
    // The query of the last attention is its last row, at the last position.
    let at = p
        .node_ids()
        .into_iter()
        .find(|&n| matches!(p.op(n), Op::Attention { .. }) && p.node(n).layer == Some(1));
    let pos = p.operands(at.unwrap())[3];
    assert_eq!(*p.op(pos), Op::LastRow);
    assert_eq!(*p.op(p.operands(pos)[0]), Op::Positions);
    narrowed_logits_match(&c);
    // Without narrowing every linear map runs on every row.
    assert_eq!(full_rows(&c.prefill_all, 1), (4, 1));
}

#[test]
fn narrowing_keeps_separate_keys_and_values_and_rotates_the_one_query() {
    // LLaMA: separate q, k, v projections, rotary positions, grouped heads, a gated MLP.
    let c = compile(&root().join("specs/tiny/llama.tfs"), &Options::default());
    assert_eq!(full_rows(&c.prefill, 1), (2, 0));
    let ropes: Vec<_> =
        c.prefill.node_ids().into_iter().filter(|&n| matches!(c.prefill.op(n), Op::Rope(_))).collect();
    let one_row = ropes.iter().filter(|&&n| c.prefill.ty(n).shape[1] == Dim::fixed(1)).count();
    assert_eq!((ropes.len(), one_row), (4, 1));
    narrowed_logits_match(&c);
}

#[test]
fn the_verifier_rejects_a_wrong_type() {
    let mut g = gpt2().model;
    let add = g.node_ids().into_iter().find(|&n| *g.op(n) == Op::Add).unwrap();
    verify(&g).unwrap();
    g.node_mut(add).ty.as_mut().unwrap().shape[1] = Dim::fixed(65);
    let e = verify(&g).unwrap_err().to_string();
    assert!(e.starts_with("bug:") && e.contains("(add)") && e.contains("the rule gives [T, 64] f32"), "{e}");
}

#[test]
fn a_weight_dtype_override_changes_only_the_weight_matrices() {
    let opts = Options { weight_dtype: Some(tfc::ir::DType::BF16), ..Options::default() };
    let c = compile(&root().join("specs/tiny/gpt2.tfs"), &opts);
    for n in c.model.node_ids() {
        if let Op::Weight { role, .. } = c.model.op(n) {
            let want = match role {
                tfc::ir::WeightRole::Matrix | tfc::ir::WeightRole::Embedding => tfc::ir::DType::BF16,
                _ => tfc::ir::DType::F32,
            };
            assert_eq!(c.model.ty(n).dtype, want);
        }
    }
}
