//! `tfc serve` through a real HTTP client (reqwest) on 127.0.0.1: OpenAI's endpoints,
//! streamed and whole, give the tokens the library gives alone; concurrent requests give
//! what each gives alone; bad requests are errors in OpenAI's shape. The real model's
//! server tests are in `smollm2.rs`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};
use tfc::serve::{Config, Served};
use tfc_runtime::{Checkpoint, Model, Session, WeightData};

use crate::common::*;

/// A server running `tfc::serve::serve` on a thread; stopped (as SIGTERM stops `tfc
/// serve`) when dropped.
pub struct Server {
    pub url: String,
    pub http: reqwest::blocking::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Server {
    pub fn start(model: Model, weights: &Path, cfg: Config) -> Server {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let ck = Arc::new(Checkpoint::open(weights).unwrap());
        let dir = weights.is_dir().then(|| weights.to_path_buf());
        let text = tfc::text::Text::of(&ck, dir.as_deref()).unwrap();
        let served = Served { model, ck, text, dir, name: "test".into() };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready, is_ready) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let shutdown = async {
                let _ = stopped.await;
            };
            tfc::serve::serve(served, &cfg, listener, shutdown, move || ready.send(()).unwrap())
        });
        if is_ready.recv().is_err() {
            panic!("the server did not start: {:?}", thread.join().unwrap().err());
        }
        let http = reqwest::blocking::Client::builder()
            .timeout(std::time::Duration::from_secs(120))
            .build()
            .unwrap();
        Server { url, http, stop: Some(stop), thread: Some(thread) }
    }

    /// Status and JSON body of a POST of `body` (raw text) to `path`.
    pub fn post_raw(&self, path: &str, body: &str) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().unwrap();
        (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}")))
    }

    pub fn post(&self, path: &str, body: &Value) -> Value {
        let (status, v) = self.post_raw(path, &body.to_string());
        assert_eq!(status, 200, "{path} {body}: {v}");
        v
    }

    /// The `data:` payloads of a streamed POST, in order (the last is `[DONE]`).
    pub fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let r = self.http.post(format!("{}{path}", self.url)).json(body).send().unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let ty = r.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ty.starts_with("text/event-stream"), "{ty}");
        let text = r.text().unwrap();
        text.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        let r = self.http.get(format!("{}{path}", self.url)).send().unwrap();
        (r.status().as_u16(), r.text().unwrap())
    }

    /// A counter or gauge from `/metrics`.
    pub fn metric(&self, name: &str) -> u64 {
        let (_, text) = self.get("/metrics");
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name}: {text}"));
        line.split(' ').nth(1).unwrap().parse().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let r = t.join().expect("the server thread panicked");
            if !std::thread::panicking() {
                r.expect("the server ended with an error");
            }
        }
    }
}

/// The text a streamed answer adds up to, its finish reason and its usage chunk.
pub fn streamed(chunks: &[String]) -> (String, String, Option<Value>) {
    assert_eq!(chunks.last().map(String::as_str), Some("[DONE]"), "{chunks:?}");
    let (mut text, mut reason, mut usage) = (String::new(), String::new(), None);
    for c in &chunks[..chunks.len() - 1] {
        let v: Value = serde_json::from_str(c).unwrap();
        if !v["usage"].is_null() {
            usage = Some(v["usage"].clone());
        }
        for ch in v["choices"].as_array().unwrap() {
            text.push_str(ch["delta"]["content"].as_str().or(ch["text"].as_str()).unwrap_or(""));
            if let Some(r) = ch["finish_reason"].as_str() {
                assert!(reason.is_empty(), "two finish reasons: {chunks:?}");
                reason = r.to_string();
            }
        }
    }
    (text, reason, usage)
}

/// The llama fixture as a Hugging Face folder with a text side: a word-level tokenizer
/// of its 384 ids (`w3` … `w383`; 0–2 are special), a chat template that writes a turn
/// as `w5 CONTENT w6` and opens the answer with `w7`, and `eos` as the end of a turn.
fn folder(name: &str, eos: Option<u32>) -> PathBuf {
    let fx = root().join("tests/fixtures/hf/llama");
    let dir = root().join("target/test-serve").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fx.join(f), dir.join(f)).unwrap();
    }
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert(t.to_string(), json!(i));
    }
    for i in 3..384 {
        vocab.insert(format!("w{i}"), json!(i));
    }
    let special = |id: u32, content: &str| json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    std::fs::write(
        dir.join("chat_template.jinja"),
        "{% for m in messages %}w5 {{ m['content'] }} w6 {% endfor %}{% if add_generation_prompt %}w7{% endif %}",
    )
    .unwrap();
    let generation = json!({"eos_token_id": eos.map_or(json!([]), |e| json!(e))});
    std::fs::write(dir.join("generation_config.json"), generation.to_string()).unwrap();
    dir
}

/// The llama fixture's library, built for test `tag`; loaded as often as asked.
fn library(tag: &str) -> impl Fn() -> Model {
    let dir = crate::backends::build(&Fixture::load("llama").spec, &format!("serve-{tag}"));
    move || Model::load(&dir).unwrap()
}

/// The library's greedy tokens after `prompt`, and each step's logits.
fn greedy(model: &Model, dir: &Path, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let ck = Arc::new(Checkpoint::open(dir).unwrap());
    let mut s = Session::new(model, WeightData::Checkpoint(ck), 2).unwrap();
    let ids: Vec<i32> = prompt.iter().map(|&t| t as i32).collect();
    let mut rows = vec![s.prefill(&ids, None, false).unwrap()];
    let mut out = vec![];
    while out.len() < n {
        let t = tfc_runtime::sampling::argmax(rows.last().unwrap()) as u32;
        out.push(t);
        if out.len() < n {
            rows.push(s.decode(t as i32).unwrap());
        }
    }
    (out, rows)
}

fn words(ids: &[u32]) -> String {
    ids.iter().map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ")
}

fn cfg(parallel: usize, queue: usize) -> Config {
    Config { parallel, ctx_size: None, queue, threads: 2 }
}

#[test]
fn completions_and_chat_answer_as_the_library_does() {
    let dir = folder("answers", None);
    let library = library("answers");
    let model = library();
    let (want, rows) = greedy(&model, &dir, &[10, 20, 30, 40], 8);
    let chat_prompt = [5, 11, 12, 6, 7];
    let (want_chat, _) = greedy(&model, &dir, &chat_prompt, 6);
    let srv = Server::start(library(), &dir, cfg(2, 4));

    // Token ids and text in, whole and streamed.
    let body = json!({"prompt": [10, 20, 30, 40], "max_tokens": 8, "temperature": 0});
    let v = srv.post("/v1/completions", &body);
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], words(&want));
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(
        (v["usage"]["prompt_tokens"].as_u64(), v["usage"]["completion_tokens"].as_u64()),
        (Some(4), Some(8))
    );
    let v =
        srv.post("/v1/completions", &json!({"prompt": "w10 w20 w30 w40", "max_tokens": 8, "temperature": 0}));
    assert_eq!(v["choices"][0]["text"], words(&want));
    let mut body = json!({"prompt": [10, 20, 30, 40], "max_tokens": 8, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}});
    let (text, reason, usage) = streamed(&srv.stream("/v1/completions", &body));
    assert_eq!((text, reason.as_str()), (words(&want), "length"));
    assert_eq!(usage.unwrap()["completion_tokens"], 8);
    body["stream_options"] = json!(null);
    let (_, _, usage) = streamed(&srv.stream("/v1/completions", &body));
    assert!(usage.is_none(), "usage only when asked");

    // Chat: the template's tokens, the same answer whole and streamed.
    let chat =
        json!({"messages": [{"role": "user", "content": "w11 w12"}], "max_tokens": 6, "temperature": 0});
    let v = srv.post("/v1/chat/completions", &chat);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], words(&want_chat));
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    let mut s = chat.clone();
    s["stream"] = json!(true);
    let chunks = srv.stream("/v1/chat/completions", &s);
    let first: Value = serde_json::from_str(&chunks[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(streamed(&chunks).0, words(&want_chat));
    // Content as parts.
    let parts = json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "w11 w12"}]}], "max_tokens": 6, "temperature": 0});
    assert_eq!(
        srv.post("/v1/chat/completions", &parts)["choices"][0]["message"]["content"],
        words(&want_chat)
    );

    // A stop string ends the text before it, held back while it might come.
    let full = words(&want);
    let stop = format!(" w{}", want[3]);
    let v = srv.post(
        "/v1/completions",
        &json!({"prompt": [10, 20, 30, 40], "max_tokens": 8, "temperature": 0, "stop": [stop.clone()]}),
    );
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), &full[..full.find(&stop).unwrap()]);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let chunks = srv.stream(
        "/v1/completions",
        &json!({"prompt": [10, 20, 30, 40], "max_tokens": 8, "temperature": 0, "stop": stop, "stream": true}),
    );
    assert_eq!(streamed(&chunks).0, &full[..full.find(&stop).unwrap()]);

    // Log-probabilities: the chosen token's is the library row's log-softmax, and the
    // alternatives come most likely first.
    let v = srv.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "w11 w12"}], "max_tokens": 3, "temperature": 0, "logprobs": true, "top_logprobs": 3}));
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 3);
    for c in content {
        let top: Vec<f64> =
            c["top_logprobs"].as_array().unwrap().iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert_eq!(top.len(), 3);
        assert!(top.windows(2).all(|w| w[0] >= w[1]) && top[0] <= 0.0, "{c}");
        assert_eq!(c["top_logprobs"][0]["token"], c["token"], "greedy takes the most likely");
    }
    let v = srv.post(
        "/v1/completions",
        &json!({"prompt": [10, 20, 30, 40], "max_tokens": 1, "temperature": 0, "logprobs": 2}),
    );
    let row = &rows[0];
    let max = row.iter().fold(f32::MIN, |m, &x| m.max(x)) as f64;
    let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
    let got = v["choices"][0]["logprobs"]["token_logprobs"][0].as_f64().unwrap();
    assert!((got - (row[want[0] as usize] as f64 - lse)).abs() < 1e-5, "{got}");
    assert_eq!(v["choices"][0]["logprobs"]["tokens"][0], format!("w{}", want[0]));

    // Sampling is reproducible with a seed; penalties change what greedy picks.
    let sampled = json!({"prompt": [10, 20, 30, 40], "max_tokens": 12, "temperature": 0.9, "top_p": 0.9, "top_k": 40, "seed": 7});
    let a = srv.post("/v1/completions", &sampled)["choices"][0]["text"].clone();
    assert_eq!(a, srv.post("/v1/completions", &sampled)["choices"][0]["text"]);
    let penalised = json!({"prompt": [10, 20, 30, 40], "max_tokens": 30, "temperature": 0, "frequency_penalty": 2.0, "presence_penalty": 2.0});
    let text = srv.post("/v1/completions", &penalised)["choices"][0]["text"].as_str().unwrap().to_string();
    let plain =
        srv.post("/v1/completions", &json!({"prompt": [10, 20, 30, 40], "max_tokens": 30, "temperature": 0}));
    let distinct = |t: &str| t.split(' ').collect::<std::collections::HashSet<_>>().len();
    assert!(distinct(&text) >= distinct(plain["choices"][0]["text"].as_str().unwrap()), "{text}");

    // The other endpoints.
    let (status, models) = srv.get("/v1/models");
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&models).unwrap()["data"][0]["id"], "test");
    assert_eq!(srv.get("/health"), (200, r#"{"status":"ok"}"#.to_string()));
    assert!(srv.metric("tfc_requests_total") >= 14);
    assert!(srv.metric("tfc_completion_tokens_total") >= 60);
    assert_eq!(srv.metric("tfc_queue_depth"), 0);
}

/// The end-of-turn id ends the answer with `stop`; a conversation's next turn continues
/// the cache its first turn left (the prompt's shared tokens are not run again).
#[test]
fn an_end_of_turn_stops_and_the_next_turn_continues_the_cache() {
    let plain = folder("eos-plain", None);
    let library = library("eos");
    let model = library();
    let (want, _) = greedy(&model, &plain, &[5, 11, 12, 6, 7], 6);
    // The fourth token ends the turn (or an earlier one that is the same token).
    let eos = want[3];
    let end = want.iter().position(|&t| t == eos).unwrap();
    let dir = folder("eos", Some(eos));
    let srv = Server::start(library(), &dir, cfg(1, 4));
    let turn =
        json!({"messages": [{"role": "user", "content": "w11 w12"}], "max_tokens": 6, "temperature": 0});
    let v = srv.post("/v1/chat/completions", &turn);
    assert_eq!(v["choices"][0]["message"]["content"], words(&want[..end]));
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], end);
    let next = json!({"messages": [
        {"role": "user", "content": "w11 w12"},
        {"role": "assistant", "content": words(&want[..end])},
        {"role": "user", "content": "w13"},
    ], "max_tokens": 4, "temperature": 0});
    let v = srv.post("/v1/chat/completions", &next);
    // w5 w11 w12 w6 w7 and the three answer tokens were cached; the new turn's prompt
    // starts w5 w11 w12 w6: four shared.
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 4);
    let prompt: Vec<u32> =
        [5, 11, 12, 6, 5].into_iter().chain(want[..end].iter().copied()).chain([6, 5, 13, 6, 7]).collect();
    let (again, _) = greedy(&model, &plain, &prompt, 4);
    let cut = again.iter().position(|&t| t == eos).unwrap_or(again.len());
    assert_eq!(v["choices"][0]["message"]["content"], words(&again[..cut]));
    assert!(srv.metric("tfc_prompt_tokens_cached_total") >= 4);
}

#[test]
fn concurrent_requests_get_what_each_gets_alone() {
    let dir = folder("concurrent", None);
    let library = library("concurrent");
    let model = library();
    let prompts: Vec<Vec<u32>> =
        (0..6).map(|i| (0..3 + i).map(|j| 3 + (i * 37 + j * 11) % 380).collect()).collect();
    let want: Vec<String> = prompts.iter().map(|p| words(&greedy(&model, &dir, p, 12).0)).collect();
    let srv = Server::start(library(), &dir, cfg(3, 8));
    let got: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let srv = &srv;
                s.spawn(move || {
                    let body = json!({"prompt": p, "max_tokens": 12, "temperature": 0, "stream": i % 2 == 0});
                    if i % 2 == 0 {
                        streamed(&srv.stream("/v1/completions", &body)).0
                    } else {
                        srv.post("/v1/completions", &body)["choices"][0]["text"].as_str().unwrap().to_string()
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(got, want);
    assert_eq!(srv.metric("tfc_completion_tokens_total"), 72);
}

#[test]
fn bad_requests_are_openai_errors() {
    let library = library("bad");
    let dir = folder("bad", None);
    let srv = Server::start(library(), &dir, Config { ctx_size: Some(32), ..cfg(1, 2) });
    let long: Vec<u32> = vec![9; 40];
    let cases: &[(&str, String, u16, &str)] = &[
        ("/v1/completions", "{not json".into(), 400, "not JSON"),
        ("/v1/completions", "[1, 2]".into(), 400, "JSON object"),
        ("/v1/completions", r#"{"prompt": "w3", "bogus": 1}"#.into(), 400, "`bogus`"),
        ("/v1/completions", r#"{"prompt": "w3", "max_tokens": 0}"#.into(), 400, "at least 1"),
        ("/v1/completions", r#"{"prompt": "w3", "max_tokens": -5}"#.into(), 400, "at least 1"),
        ("/v1/completions", r#"{"prompt": "w3", "max_tokens": 1000000000000}"#.into(), 400, "context"),
        ("/v1/completions", json!({"prompt": long}).to_string(), 400, "40 tokens"),
        ("/v1/completions", r#"{"prompt": [1, 384]}"#.into(), 400, "outside the vocabulary"),
        ("/v1/completions", r#"{"prompt": [-1]}"#.into(), 400, "outside the vocabulary"),
        ("/v1/completions", r#"{"prompt": []}"#.into(), 400, "no tokens"),
        ("/v1/completions", r#"{"prompt": ["w3", "w4"]}"#.into(), 400, "several prompts"),
        ("/v1/completions", r#"{"prompt": "w3", "n": 2}"#.into(), 400, "`n`"),
        ("/v1/completions", r#"{"prompt": "w3", "temperature": -1}"#.into(), 400, "temperature"),
        ("/v1/completions", r#"{"prompt": "w3", "top_p": 0}"#.into(), 400, "top_p"),
        ("/v1/completions", r#"{"prompt": "w3", "temperature": "hot"}"#.into(), 400, "not valid"),
        ("/v1/completions", r#"{"prompt": "w3", "stop": ["a", "b", "c", "d", "e"]}"#.into(), 400, "stop"),
        ("/v1/completions", r#"{"prompt": "w3", "logprobs": 9}"#.into(), 400, "logprobs"),
        ("/v1/chat/completions", r#"{"messages": []}"#.into(), 400, "empty"),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "wizard", "content": "w3"}]}"#.into(),
            400,
            "role",
        ),
        ("/v1/chat/completions", r#"{"messages": [{"role": "user"}]}"#.into(), 400, "not valid"),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "w3"}], "top_logprobs": 2}"#.into(),
            400,
            "logprobs",
        ),
        ("/v1/embeddings", r#"{"input": "w3"}"#.into(), 400, "generates text"),
        ("/v1/nothing", "{}".into(), 404, "no such endpoint"),
    ];
    for (path, body, status, says) in cases {
        let (got, v) = srv.post_raw(path, body);
        let message = v["error"]["message"].as_str().unwrap_or_else(|| panic!("{path} {body}: {v}"));
        assert_eq!(got, *status, "{path} {body}: {v}");
        assert!(message.contains(says), "{path} {body}: {message}");
        assert!(v["error"]["type"].is_string(), "{v}");
    }
    let (status, body) = srv.get("/v1/completions");
    assert_eq!(status, 405, "{body}");
    assert!(body.contains("\"error\""), "{body}");
    // Still serving.
    let v = srv.post("/v1/completions", &json!({"prompt": "w3", "max_tokens": 2, "temperature": 0}));
    assert_eq!(v["usage"]["completion_tokens"], 2);
    assert_eq!(srv.metric("tfc_requests_total"), 1);
}

/// An encoder's `/v1/embeddings`: the mean of its rows (no sentence-transformers files).
#[test]
fn an_encoder_serves_mean_pooled_embeddings() {
    let fx = Fixture::load("bert");
    let lib = crate::backends::build(&fx.spec, "serve-encoder");
    let model = Model::load(&lib).unwrap();
    let ck = Arc::new(Checkpoint::open(&fx.dir).unwrap());
    let mut s = Session::new(&model, WeightData::Checkpoint(ck), 2).unwrap();
    let inputs = [vec![1, 7, 9, 2], vec![1, 30, 2]];
    let width = model.manifest().output_width;
    let want: Vec<Vec<f32>> = inputs
        .iter()
        .map(|ids| {
            let rows = s.prefill(ids, None, true).unwrap();
            let n = ids.len();
            (0..width)
                .map(|j| ((0..n).map(|i| rows[i * width + j] as f64).sum::<f64>() / n as f64) as f32)
                .collect()
        })
        .collect();
    drop(s);
    let srv = Server::start(Model::load(&lib).unwrap(), &fx.dir, cfg(1, 2));
    let v = srv.post("/v1/embeddings", &json!({"input": inputs}));
    for (i, w) in want.iter().enumerate() {
        let got: Vec<f32> = v["data"][i]["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_close("embedding", &got, w, 1e-6);
    }
    assert_eq!(v["usage"]["prompt_tokens"], 7);
    let (status, e) = srv.post_raw("/v1/completions", r#"{"prompt": [1, 2]}"#);
    assert_eq!(status, 400);
    assert!(e["error"]["message"].as_str().unwrap().contains("encoder"), "{e}");
    let (status, e) = srv.post_raw("/v1/embeddings", r#"{"input": "some text"}"#);
    assert_eq!(status, 400);
    assert!(e["error"]["message"].as_str().unwrap().contains("tokenizer"), "{e}");
}
