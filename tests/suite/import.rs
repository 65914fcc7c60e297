//! `tfc import-hf`: every fixture's config.json imports to the spec shipped for it, and
//! what the importer cannot represent faithfully is an error.

use tfc::import::hf::import;

use crate::common::*;

macro_rules! names {
    ($($arch:ident),*) => { [$(stringify!($arch)),*] };
}

const DENSE: &[&str] = &with_fixtures!(names);
const MOE: &[&str] = &with_moe_fixtures!(names);

/// Every fixture, in order.
fn archs() -> Vec<&'static str> {
    let mut all: Vec<&str> = DENSE.iter().chain(MOE).copied().collect();
    all.sort();
    all
}

#[test]
fn every_fixture_folder_is_listed() {
    let dir = root().join("tests/fixtures/hf");
    let mut folders: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_dir())
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    folders.sort();
    assert_eq!(
        folders,
        archs(),
        "the folders of {} and with_fixtures! (tests/suite/main.rs) differ",
        dir.display()
    );
}

fn config(arch: &str) -> serde_json::Value {
    let text =
        std::fs::read_to_string(root().join("tests/fixtures/hf").join(arch).join("config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn fixture_configs_import_to_the_shipped_specs() {
    for arch in archs() {
        let got = import(&config(arch).to_string()).unwrap();
        let want = std::fs::read_to_string(root().join("specs/tiny").join(format!("{arch}.tfs"))).unwrap();
        assert_eq!(got, want, "{arch}: import-hf output differs from specs/tiny/{arch}.tfs");
    }
}

type Edit<'a> = &'a dyn Fn(&mut serde_json::Map<String, serde_json::Value>);

/// Imports a fixture's config after an edit.
fn import_edited(arch: &str, edit: Edit) -> Result<String, tfc::import::hf::ImportError> {
    let mut c = config(arch);
    edit(c.as_object_mut().unwrap());
    import(&c.to_string())
}

fn import_err(arch: &str, edit: Edit) -> String {
    import_edited(arch, edit).unwrap_err().to_string()
}

fn import_err_free(arch: &str, edit: Edit) -> String {
    import_edited(arch, edit).unwrap()
}

/// Published configs carry keys that change nothing the model computes; they import.
#[test]
fn harmless_keys_of_published_configs_import() {
    let plain = import(&config("qwen2").to_string()).unwrap();
    let edited = import_edited("qwen2", &|c| {
        c.insert("_name_or_path".into(), "Qwen/Qwen2.5-0.5B".into());
        c.insert("is_llama_config".into(), true.into());
        c.insert("use_mrope".into(), false.into());
        c.insert("auto_map".into(), serde_json::json!({"AutoModel": "x"}));
    })
    .unwrap();
    assert_eq!(plain, edited);
    let e = import_err("qwen2", &|c| {
        c.insert("use_mrope".into(), true.into());
    });
    assert!(e.contains("`use_mrope` = true"), "{e}");
    let e = import_edited("llama", &|c| {
        c.insert("hidden_act".into(), "quick_gelu".into());
    })
    .unwrap();
    assert!(e.contains("act = quick_gelu"), "{e}");
}

#[test]
fn what_cannot_be_imported_faithfully_is_an_error() {
    let e = import_err("llama", &|c| {
        c.insert("model_type".into(), "mamba".into());
    });
    assert!(e.contains("model_type `mamba` is not supported"), "{e}");
    let e = import_err("gpt2", &|c| {
        c.insert("scale_attn_by_inverse_layer_idx".into(), true.into());
    });
    assert!(e.contains("`scale_attn_by_inverse_layer_idx` = true"), "{e}");
    let e = import_err("llama", &|c| {
        c.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_type": "longrope", "factor": 2.0, "rope_theta": 1e4}),
        );
    });
    assert!(e.contains("rope_parameters"), "{e}");
    let e = import_err("llama", &|c| {
        c.insert("hidden_act".into(), "mish".into());
    });
    assert!(e.contains("`hidden_act` = \"mish\""), "{e}");
    let e = import_err("mistral", &|c| {
        c.insert("frobnicate".into(), 3.into());
    });
    assert!(e.contains("`frobnicate` = 3") && e.contains("does not know"), "{e}");
    let e = import_err("phi", &|c| {
        c.remove("hidden_size");
    });
    assert!(e.contains("`hidden_size` is missing"), "{e}");
    let e = import_err("olmo", &|c| {
        c.insert("clip_qkv".into(), 8.0.into());
    });
    assert!(e.contains("`clip_qkv` = 8.0"), "{e}");
    let e = import_err("gemma3", &|c| {
        c.insert(
            "layer_types".into(),
            serde_json::json!(["sliding_attention", "chunked_attention", "x", "y"]),
        );
    });
    assert!(e.contains("`layer_types`"), "{e}");
    let e = import_err("qwen2_swa", &|c| {
        c.insert("layer_types".into(), serde_json::json!(["full_attention"]));
    });
    assert!(e.contains("expected 2 entries"), "{e}");
    let e = import_err("qwen2_swa", &|c| {
        c.remove("sliding_window");
    });
    assert!(e.contains("sliding layers need a `sliding_window`"), "{e}");
    assert!(import("[1, 2]").unwrap_err().to_string().contains("not an object"));
    // DeepSeek: routing methods and sizes it does not know.
    let e = import_err("deepseek_v3", &|c| {
        c.insert("topk_method".into(), "greedy".into());
    });
    assert!(e.contains("`topk_method` = \"greedy\""), "{e}");
    let e = import_err("deepseek_v2", &|c| {
        c.insert("scoring_func".into(), "sigmoid".into());
    });
    assert!(e.contains("`scoring_func`"), "{e}");
    let e = import_err("deepseek_v3", &|c| {
        c.insert("qk_head_dim".into(), 32.into());
    });
    assert!(e.contains("qk_nope_head_dim + qk_rope_head_dim"), "{e}");
    let e = import_err("deepseek_v3_yarn", &|c| {
        c.insert("n_group".into(), 3.into());
    });
    assert!(e.contains("`n_group` = 3"), "{e}");
}

/// DeepSeek-V2's transformers implementation never renormalises the chosen weights, so
/// `norm_topk_prob` changes nothing there; V3's does, and says so in the spec. The latent
/// attention's norms keep transformers' 1e-6 whatever `rms_norm_eps` says.
#[test]
fn deepseek_imports_follow_transformers() {
    let eps = import_edited("deepseek_v3", &|c| {
        c.insert("rms_norm_eps".into(), 1e-5.into());
    })
    .unwrap();
    assert!(eps.contains("v_dim = 16, eps = 1e-6") && eps.contains("eps = 1e-5 }"), "{eps}");
    let v2 = import_edited("deepseek_v2", &|c| {
        c.insert("norm_topk_prob".into(), true.into());
    })
    .unwrap();
    assert!(!v2.contains("normalize"), "{v2}");
    let greedy = import_edited("deepseek_v2", &|c| {
        c.insert("topk_method".into(), "greedy".into());
    })
    .unwrap();
    assert!(!greedy.contains("groups ="), "{greedy}");
    let v3 = import_edited("deepseek_v3", &|c| {
        c.insert("norm_topk_prob".into(), false.into());
    })
    .unwrap();
    assert!(!v3.contains("normalize"), "{v3}");
}

#[test]
fn a_post_layernorm_opt_and_a_pre_layernorm_opt_differ() {
    let pre = import_err_free("opt_postln", &|c| {
        c.insert("do_layer_norm_before".into(), true.into());
    });
    assert!(pre.contains("x = x + attn(attn_norm(x))") && pre.contains("final_norm: layernorm"));
    let post = import_err_free("opt_postln", &|_| {});
    assert!(post.contains("x = attn_norm(x + attn(x))") && !post.contains("final_norm"));
}

#[test]
fn older_bloom_configs_with_training_switches_import() {
    let spec = import_err_free("bloom", &|c| {
        let d = c.remove("hidden_size").unwrap();
        c.insert("n_embed".into(), d);
        for k in ["masked_softmax_fusion", "bias_dropout_fusion", "skip_bias_add", "skip_bias_add_qkv"] {
            c.insert(k.into(), true.into());
        }
        c.insert("offset_alibi".into(), 100.into());
        c.insert("n_inner".into(), serde_json::Value::Null);
    });
    let want = std::fs::read_to_string(root().join("specs/tiny/bloom.tfs")).unwrap();
    assert_eq!(spec, want);
}

#[test]
fn impossible_configs_are_errors_not_specs() {
    for (arch, key, value, want) in [
        ("llama", "num_attention_heads", 5, "kv_heads = 2 does not divide heads = 5"),
        ("gpt2", "n_head", 5, "E0005"),
        ("llama", "vocab_size", 0, "vocab"),
        ("llama", "num_hidden_layers", 0, "layers"),
    ] {
        let e = import_err(arch, &|c| {
            c.insert(key.into(), value.into());
        });
        assert!(e.contains("cannot be built") && e.contains(want), "{arch} {key} = {value}: {e}");
    }
}
