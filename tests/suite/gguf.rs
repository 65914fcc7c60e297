//! GGUF files: every block type decoded as gguf-py's reference decodes it, a Llama
//! checkpoint written as llama.cpp's converter writes it imported and run on the
//! interpreter and the library against transformers (F32 and Q8_0), and damaged files
//! refused with the tensor or key named.

use std::path::PathBuf;
use std::sync::Arc;

use tfc::interp::{run, Inputs, WeightSource, Weights};
use tfc_runtime::{Checkpoint, Model, Session, WeightData};

use crate::backends::build_opts;
use crate::common::*;

fn dir() -> PathBuf {
    root().join("tests/fixtures/gguf")
}

#[test]
fn every_block_type_decodes_as_the_reference_does() {
    let ck = Checkpoint::open(dir().join("quants.gguf")).unwrap();
    let want = dir().join("quants.expected.safetensors");
    for ty in ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"] {
        let got = ck.get(ty, &[2, 512]).unwrap();
        let w = read_tensor(&want, ty);
        let worst =
            got.iter().zip(&w.data).map(|(a, b)| (a - b).abs() / b.abs().max(1e-3)).fold(0.0, f32::max);
        assert!(worst <= 1e-6, "{ty}: relative difference {worst:e} from gguf-py");
        assert!(w.data.iter().any(|&x| x != 0.0), "{ty}: the reference is all zeros");
    }
    // A row range of a quantised tensor is whole blocks of it.
    let rows = ck.get("q4_k[1:2]", &[1, 512]).unwrap();
    assert_eq!(rows, ck.get("q4_k", &[2, 512]).unwrap()[512..]);
}

/// A weight stored in a block format the library reads (Q4_0, Q4_1, Q4_K, Q6_K) is bound
/// as the file holds it (whole, or a row range); any other is quantised from its values.
#[test]
fn block_tensors_are_bound_as_stored() {
    use std::borrow::Cow;
    use tfc_runtime::quant::Quant;
    let ck = Checkpoint::open(dir().join("quants.gguf")).unwrap();
    let g = ck.gguf().unwrap();
    for q in Quant::ALL {
        let (_, stored) = g.bytes(q.name()).unwrap();
        let Cow::Borrowed(b) = ck.quantized(q.name(), &[2, 512], q).unwrap() else { panic!("{q:?}: a copy") };
        assert_eq!(b, stored);
        let Cow::Borrowed(row) = ck.quantized(&format!("{}[1:2]", q.name()), &[1, 512], q).unwrap() else {
            panic!("{q:?}: a copy of a row")
        };
        assert_eq!(row, &stored[stored.len() / 2..]);
        // What the interpreter reads back is the file's values.
        let back = tfc_runtime::gguf::dequantize(q.ggml(), b, 1024);
        assert_eq!(back, ck.get(q.name(), &[2, 512]).unwrap());
        // Another type is quantised: its blocks, from the values.
        let source = if q == Quant::Q8_0 { "q4_0" } else { "q8_0" };
        let other = ck.quantized(source, &[2, 512], q).unwrap();
        assert!(matches!(other, Cow::Owned(_)));
        assert_eq!(*other, q.quantize(&ck.get(source, &[2, 512]).unwrap()));
        let err = ck.quantized(q.name(), &[512, 2], q).unwrap_err().to_string();
        assert!(err.contains("shape"), "{err}");
    }
}

/// The spec `tfc import-gguf` writes for `file`, and the interpreter's logits of the
/// fixture `arch`'s prompt from the file's weights as stored.
fn interpreted(file: &str, arch: &str) -> (String, tfc::interp::Tensor) {
    let ck = Checkpoint::open(dir().join(file)).unwrap();
    let spec = tfc::import::gguf::import(ck.gguf().unwrap(), file).unwrap();
    let c = tfc::compile(file, &spec, &tfc::Options::default(), &mut |_, _| {}).unwrap();
    let tokens: Vec<i64> = Fixture::load(arch).prompt.iter().map(|&t| t as i64).collect();
    let w = Weights::bind(&[&c.model], &WeightSource::Checkpoint(&ck)).unwrap();
    let interp =
        run(&c.model, &w, &Inputs { tokens, ..Inputs::default() }).unwrap().remove("logits").unwrap();
    (spec, interp)
}

/// A fixture's prompt logits from a GGUF file, on the interpreter and the library, with
/// the weight matrices stored as `dtype` (the spec's, f32, unless given); the library.
fn check(file: &str, arch: &str, want: &[f32], tol: f32) -> Model {
    check_as(file, arch, want, tol, &tfc::Options::default())
}

fn check_as(file: &str, arch: &str, want: &[f32], tol: f32, opts: &tfc::Options) -> Model {
    let path = dir().join(file);
    let ck = Checkpoint::open(&path).unwrap();
    let spec = tfc::import::gguf::import(ck.gguf().unwrap(), file).unwrap();
    let c = tfc::compile(file, &spec, opts, &mut |_, _| {}).unwrap();
    let fx = Fixture::load(arch);
    let tokens: Vec<i64> = fx.prompt.iter().map(|&t| t as i64).collect();
    let w = Weights::bind(&[&c.model], &WeightSource::Checkpoint(&ck)).unwrap();
    let mut out = run(&c.model, &w, &Inputs { tokens, ..Inputs::default() }).unwrap();
    assert_close(&format!("{file}: interpreter"), &out.remove("logits").unwrap().data, want, tol);
    let stem = file.replace(".gguf", &opts.weight_dtype.map_or(String::new(), |d| format!("-{}", d.name())));
    let spec_path = root().join("target/test-gguf").join(format!("{stem}.tfs"));
    std::fs::create_dir_all(spec_path.parent().unwrap()).unwrap();
    std::fs::write(&spec_path, &spec).unwrap();
    // Each storage type in a folder of its own: tests run at once.
    let tag = opts.weight_dtype.map_or("gguf".to_string(), |d| format!("gguf-{}", d.name()));
    let lib = build_opts(&spec_path, &tag, opts, &Default::default());
    let model = Model::load(lib).unwrap();
    let mut s = Session::new(&model, WeightData::Checkpoint(Arc::new(ck)), 2).unwrap();
    let rows = s.prefill(&fx.prompt, None, true).unwrap();
    assert_close(&format!("{file}: library"), &rows, want, tol);
    drop(s);
    model
}

#[test]
fn a_llama_gguf_in_f32_computes_what_transformers_computes_from_the_checkpoint() {
    let want = read_tensor(&root().join("tests/fixtures/hf/llama/expected.safetensors"), "logits");
    check("llama_f32.gguf", "llama", &want.data, 1e-4);
}

/// Mixtral as the converter writes it (the llama architecture with `expert_count`, the
/// experts merged into 3-D tensors) computes what transformers computes from the fixture.
#[test]
fn a_mixtral_gguf_computes_what_transformers_computes_from_the_checkpoint() {
    let want = read_tensor(&root().join("tests/fixtures/hf/mixtral/expected.safetensors"), "logits");
    check("mixtral_f32.gguf", "mixtral", &want.data, 1e-4);
}

/// Qwen3-MoE (`qwen3moe`) in Q8_0, its experts' down projections (48 inputs, not whole
/// blocks) in F16: the library computes what the interpreter computes from the file, and
/// both stay near transformers' f32 logits of the checkpoint.
#[test]
fn a_qwen3_moe_gguf_in_q8_0_runs_as_stored() {
    let file = "qwen3_moe_q8_0.gguf";
    let (spec, interp) = interpreted(file, "qwen3_moe");
    assert!(spec.contains("dtype    = q8_0") && spec.contains("\"blk.0.ffn_down_exps.weight\""), "{spec}");
    let f32 = read_tensor(&root().join("tests/fixtures/hf/qwen3_moe/expected.safetensors"), "logits");
    // Q8_0's rounding of every matrix moves these logits (up to 3.3 in magnitude) by up to 0.065.
    assert_close(&format!("{file}: q8_0 vs f32"), &interp.data, &f32.data, 0.1);
    check(file, "qwen3_moe", &interp.data, 1e-5);
}

/// Qwen2-MoE (`qwen2moe`): a dense first layer (`mlp_only_layers`) before a mixture with
/// a shared expert (`*_shexp`) behind a sigmoid gate (`ffn_gate_inp_shexp`), the chosen
/// weights not renormalised: the interpreter and the library compute what transformers
/// computes from the checkpoint.
#[test]
fn a_qwen2_moe_gguf_computes_what_transformers_computes_from_the_checkpoint() {
    let file = "qwen2_moe_f32.gguf";
    let (spec, _) = interpreted(file, "qwen2_moe");
    assert!(spec.contains("pattern  = [dense, moe]"), "{spec}");
    assert!(spec.contains("shared_gate = \"ffn_gate_inp_shexp\"") && !spec.contains("normalize"), "{spec}");
    let want = read_tensor(&root().join("tests/fixtures/hf/qwen2_moe/expected.safetensors"), "logits");
    check(file, "qwen2_moe", &want.data, 1e-4);
    // A layer with neither a router nor a dense MLP, and experts on no layer, are errors
    // that name what is missing.
    let mut g = tfc_runtime::gguf::Gguf::open(dir().join(file)).unwrap();
    g.tensors.remove("blk.0.ffn_down.weight");
    let e = tfc::import::gguf::import(&g, file).unwrap_err().to_string();
    assert!(e.contains("layer 0 has neither a router") && e.contains("blk.0.ffn_down.weight"), "{e}");
    g.tensors.remove("blk.1.ffn_gate_inp.weight");
    let e = tfc::import::gguf::import(&g, file).unwrap_err().to_string();
    assert!(e.contains("4 experts, but no layer has a router"), "{e}");
}

/// DeepSeek-V3 as the converter writes `deepseek2`: latent attention with `kv_b_proj`
/// split per head (`attn_k_b` transposed, `attn_v_b`), sigmoid routing with the
/// correction bias in groups, `*_shexp` shared experts, YaRN's `mscale_all_dim` from the
/// log multiplier: the interpreter and the library compute what transformers computes
/// from the checkpoint.
#[test]
fn a_deepseek_v3_gguf_computes_what_transformers_computes_from_the_checkpoint() {
    let want = read_tensor(&root().join("tests/fixtures/hf/deepseek_v3_yarn/expected.safetensors"), "logits");
    check("deepseek_v3_yarn_f32.gguf", "deepseek_v3_yarn", &want.data, 1e-4);
}

/// DeepSeek-V2 in Q8_0 (a dense first layer, a full-rank query, softmax routing in groups,
/// two shared experts): the library computes what the interpreter computes from the file
/// (`attn_k_b`/`attn_v_b` dequantised to f32), both near transformers' f32 logits.
#[test]
fn a_deepseek_v2_gguf_in_q8_0_runs_as_stored() {
    let file = "deepseek_v2_q8_0.gguf";
    let (spec, interp) = interpreted(file, "deepseek_v2");
    assert!(spec.contains("pattern = [dense, moe]") && spec.contains("k_b = \"attn_k_b\""), "{spec}");
    let f32 = read_tensor(&root().join("tests/fixtures/hf/deepseek_v2/expected.safetensors"), "logits");
    // Q8_0's rounding moves most rows' logits by up to 0.06 and one row by 0.21 (routing is
    // discontinuous: a rounding can move a choice); the same model written in F32 matches
    // transformers to 2e-6.
    let moved = median_diff(&interp.data, &f32.data);
    assert!(moved < 0.02, "{file}: Q8_0 moved the logits by {moved} in the median");
    check(file, "deepseek_v2", &interp.data, 1e-5);
}

/// Llama 3.1 as the converter writes it: its rope scaling as a `rope_freqs` factor per
/// pair (`scaling = per_pair`), which computes what transformers' `llama3` scaling does.
#[test]
fn a_llama_3_1_gguf_with_rope_freqs_computes_what_transformers_computes() {
    let want = read_tensor(&root().join("tests/fixtures/hf/llama31/expected.safetensors"), "logits");
    check("llama31_f32.gguf", "llama31", &want.data, 1e-4);
}

/// A file whose matrices mix types, as llama.cpp's Q4_K_M files do: the spec keeps each
/// as stored (the component's `dtype` the most common, the rest in `dtypes`), a type
/// the library has no kernel for in f32, and the library computes what transformers
/// computes from the file.
#[test]
fn a_gguf_of_mixed_types_keeps_each_matrix_as_stored() {
    let want = read_tensor(&dir().join("llama_mixed.expected.safetensors"), "logits");
    let model = check("llama_mixed.gguf", "llama", &want.data, 1e-4);
    let dtype = |name: &str| {
        let w = model.manifest().weights.iter().find(|w| w.name == name);
        w.unwrap_or_else(|| panic!("no weight {name}")).dtype.clone()
    };
    for (name, want) in [
        ("blk.0.attn_q.weight", "q4_0"),
        ("blk.0.attn_k.weight", "q4_1"),
        ("blk.0.ffn_down.weight", "q8_0"),
        ("blk.1.attn_v.weight", "q5_0"),
        ("blk.1.ffn_gate.weight", "f32"),
        ("blk.1.ffn_down.weight", "q4_0"),
        ("output.weight", "q4_0"),
    ] {
        assert_eq!(dtype(name), want, "{name}");
    }
}

#[test]
fn a_llama_gguf_in_q8_0_computes_what_transformers_computes_from_the_gguf() {
    let want = read_tensor(&dir().join("llama_q8_0.expected.safetensors"), "logits");
    check("llama_q8_0.gguf", "llama", &want.data, 1e-4);
}

/// Q8_0 blocks (one f16 scale per 32 signed bytes, the largest ±127) are the library's
/// q8 blocks with the scale widened to f32: stored as q8, the weights are the file's,
/// exactly, and the library still computes what transformers does.
#[test]
fn a_q8_0_gguf_runs_on_q8_weights_exactly_as_stored() {
    let want = read_tensor(&dir().join("llama_q8_0.expected.safetensors"), "logits");
    let q8 = tfc::Options { weight_dtype: Some(tfc::ir::DType::Q8), ..Default::default() };
    check_as("llama_q8_0.gguf", "llama", &want.data, 1e-4, &q8);
    // The conversion loses nothing: each block's values come back as they were.
    let ck = Checkpoint::open(dir().join("llama_q8_0.gguf")).unwrap();
    let w = ck.get("blk.0.attn_q.weight", &[64, 64]).unwrap();
    let mut back = w.clone();
    tfc_runtime::quant::q8_roundtrip(&mut back);
    assert_eq!(back, w);
}

/// Phi-3 as llama.cpp's converter writes it (fused `attn_qkv` and `ffn_up`, LongRoPE
/// factors as tensors): compiled within the original length it computes what
/// transformers computes from the checkpoint over the prompt (the short factors), and
/// compiled for the whole 24 tokens what it computes in its full pass (the long ones).
#[test]
fn a_phi3_gguf_computes_what_transformers_computes_on_both_sides_of_its_original_length() {
    let hf = root().join("tests/fixtures/hf/phi3/expected.safetensors");
    let short = read_tensor(&hf, "logits");
    let within = tfc::Options { max_seq: Some(16), ..Default::default() };
    check_as("phi3_f32.gguf", "phi3", &short.data, 1e-4, &within);
    let full = read_tensor(&hf, "full_logits");
    let past = tfc::Options { max_seq: Some(24), ..Default::default() };
    check_as("phi3_f32.gguf", "phi3", &full.data[..short.data.len()], 1e-4, &past);
}

/// The Gemma family as llama.cpp's converter writes it (norm weights stored with Gemma's
/// `1 +` added; Gemma 2's post-sublayer norms and soft-capping; Gemma 3's query and key
/// norms, three sliding layers then a full one, their own rope base, linear scaling on
/// the full layers): each computes what transformers computes from the checkpoint.
/// Gemma 2's reference is for the config its file describes (`make_gguf.py`: queries
/// scaled by 1/√head_dim, as llama.cpp runs every Gemma 2 but the 27B).
#[test]
fn gemma_ggufs_compute_what_transformers_computes() {
    for arch in ["gemma", "gemma3"] {
        let want =
            read_tensor(&root().join(format!("tests/fixtures/hf/{arch}/expected.safetensors")), "logits");
        check(&format!("{arch}_f32.gguf"), arch, &want.data, 1e-4);
    }
    let want = read_tensor(&dir().join("gemma2_f32.expected.safetensors"), "logits");
    check("gemma2_f32.gguf", "gemma2", &want.data, 1e-4);
}

/// What llama.cpp assumes where a Gemma file has no key for it: Gemma 2 alternates
/// sliding and full layers, Gemma 3 has five sliding layers to each full one (sliding
/// ones at rope base 10000 unscaled), and the 27B models (46 and 62 layers) scale queries
/// by 1/√(d_model / heads); a pattern of the wrong length is an error naming the key.
#[test]
fn gemma_ggufs_without_a_layer_pattern_take_llama_cpps_defaults() {
    let spec = |file: &str, edit: &dyn Fn(&mut tfc_runtime::gguf::Gguf)| {
        let mut g = tfc_runtime::gguf::Gguf::open(dir().join(file)).unwrap();
        edit(&mut g);
        tfc::import::gguf::import(&g, file)
    };
    use tfc_runtime::gguf::Value;
    let no_pattern = |layers: u64| {
        move |g: &mut tfc_runtime::gguf::Gguf| {
            g.meta.remove("gemma3.attention.sliding_window_pattern");
            g.meta.insert("gemma3.block_count".into(), Value::Int(layers as i64));
            g.meta.insert("gemma2.block_count".into(), Value::Int(layers as i64));
        }
    };
    let s = spec("gemma3_f32.gguf", &no_pattern(12)).unwrap();
    assert!(s.contains("pattern  = [sliding, sliding, sliding, sliding, sliding, full]"), "{s}");
    assert!(s.contains("position = rope { theta = 10000 }, window = 4"), "{s}");
    assert!(!s.contains("scale ="), "{s}");
    let s = spec("gemma3_f32.gguf", &no_pattern(62)).unwrap();
    assert!(s.contains(&format!("scale = {}", tfc::ir::num(1.0 / 16f64.sqrt()))), "{s}");
    let s = spec("gemma2_f32.gguf", &no_pattern(4)).unwrap();
    assert!(s.contains("pattern  = [sliding, full]") && s.contains("softcap = 5"), "{s}");
    let e = spec("gemma3_f32.gguf", &|g| {
        g.meta
            .insert("gemma3.attention.sliding_window_pattern".into(), Value::Array(vec![Value::Bool(true)]));
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("gemma3.attention.sliding_window_pattern"), "{e}");
}

#[test]
fn a_qwen2_gguf_in_q8_0_computes_what_transformers_computes_from_the_gguf() {
    let want = read_tensor(&dir().join("qwen2_q8_0.expected.safetensors"), "logits");
    check("qwen2_q8_0.gguf", "qwen2", &want.data, 1e-4);
}

#[test]
fn damaged_gguf_files_are_errors_that_say_where() {
    let bytes = std::fs::read(dir().join("llama_q8_0.gguf")).unwrap();
    let scratch = root().join("target/test-gguf");
    std::fs::create_dir_all(&scratch).unwrap();
    let open = |name: &str, b: &[u8]| {
        let p = scratch.join(name);
        std::fs::write(&p, b).unwrap();
        Checkpoint::open(&p).err().map(|e| e.to_string())
    };
    let e = open("cut.gguf", &bytes[..bytes.len() - 100]).unwrap();
    assert!(e.contains("tensor `output.weight`") && e.contains("outside the file"), "{e}");
    // Cut anywhere in the header: the message says what was being read.
    for cut in [200, 700, 1200, 1800, 2400] {
        let e = open("header.gguf", &bytes[..cut]).unwrap();
        assert!(e.contains("not a valid GGUF file"), "{cut}: {e}");
        assert!(
            e.contains("metadata `") || e.contains("tensor ") || e.contains("count claims"),
            "{cut}: {e}"
        );
    }
    let mut v = bytes.clone();
    v[4] = 9;
    assert!(open("version.gguf", &v).unwrap().contains("version 9"));
    let mut v = bytes.clone();
    v[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let e = open("count.gguf", &v).unwrap();
    assert!(e.contains("tensor count") && e.contains("more than"), "{e}");
    // A file that is not GGUF is read as safetensors, and says so.
    let e = open("other.gguf", b"GGML not really").unwrap();
    assert!(e.contains("not a valid safetensors file"), "{e}");
}

/// Chat templates of several families render as transformers renders them
/// (`tests/fixtures/chat_templates/`, made by `make_chat_templates.py`), a template's
/// own refusal included.
#[test]
fn chat_templates_render_as_transformers_renders_them() {
    let dir = root().join("tests/fixtures/chat_templates");
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let conversations: Vec<Vec<(String, String)>> = want["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            c.as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    (m["role"].as_str().unwrap().to_string(), m["content"].as_str().unwrap().to_string())
                })
                .collect()
        })
        .collect();
    let templates = want["templates"].as_object().unwrap();
    assert!(templates.len() >= 8);
    for (name, t) in templates {
        let tpl = tfc::text::ChatTemplate {
            source: std::fs::read_to_string(dir.join(format!("{name}.jinja"))).unwrap(),
            bos_token: t["bos_token"].as_str().unwrap().to_string(),
            eos_token: t["eos_token"].as_str().unwrap().to_string(),
        };
        for (c, r) in conversations.iter().zip(t["renders"].as_array().unwrap()) {
            let got = tpl.render(c, true);
            match r.as_str() {
                Some(text) => assert_eq!(got.unwrap(), text, "{name}"),
                None => {
                    let e = got.unwrap_err().to_string();
                    assert!(e.contains(r["error"].as_str().unwrap()), "{name}: {e}");
                }
            }
        }
    }
}

/// The byte-level vocabularies llama.cpp tests its tokenizer with
/// (`tests/fixtures/vocab/`: GPT-2's, Llama 3's, Qwen2's, with the ids Hugging Face's
/// tokenizers gives for 46 texts each) tokenise the same here, each with its own split.
#[test]
fn gguf_vocabularies_tokenise_as_hugging_face_does() {
    let dir = root().join("tests/fixtures/vocab");
    for (name, differ) in [("gpt-2", 0), ("llama-bpe", 1), ("qwen2", 0), ("llama-spm", 0), ("phi-3", 0)] {
        let ck = Checkpoint::open(dir.join(format!("ggml-vocab-{name}.gguf"))).unwrap();
        let tok = tfc::text::gguf_tokenizer(ck.gguf().unwrap()).unwrap().unwrap();
        let inp = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.inp"))).unwrap();
        let out = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.out"))).unwrap();
        // Each text ends with the separator, so the last piece is empty.
        let mut cases: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
        assert_eq!(cases.pop(), Some(""), "{name}");
        let want: Vec<Vec<u32>> =
            out.lines().map(|l| l.split_whitespace().map(|x| x.parse().unwrap()).collect()).collect();
        assert_eq!(cases.len(), want.len(), "{name}");
        let wrong: Vec<&str> = cases
            .iter()
            .zip(&want)
            .filter(|(c, w)| tok.encode(**c, false).unwrap().get_ids() != w.as_slice())
            .map(|(c, _)| *c)
            .collect();
        // Llama 3's: one text of Vietnamese with combining marks splits otherwise here.
        assert_eq!(wrong.len(), differ, "{name}: {wrong:?}");
    }
}

#[test]
fn a_sentencepiece_gguf_vocabulary_decodes_what_it_encodes() {
    let ck = Checkpoint::open(root().join("tests/fixtures/vocab/ggml-vocab-llama-spm.gguf")).unwrap();
    let tok = tfc::text::gguf_tokenizer(ck.gguf().unwrap()).unwrap().unwrap();
    for text in ["Hello world", "Hello, y'all! How are you 😁 ?我想在apple工作1314151天～", "line\n\ttab"]
    {
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(tok.decode(&ids, true).unwrap(), text);
    }
    // `<s>` is a control token: special, whole, and dropped when decoding.
    let ids = tok.encode("<s>Hi", false).unwrap().get_ids().to_vec();
    assert_eq!(ids[0], 1, "{ids:?}");
    assert_eq!(tok.decode(&ids, true).unwrap(), "Hi");
}
