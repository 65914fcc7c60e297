//! `tfc serve`: an OpenAI-compatible HTTP server over one compiled model.
//!
//! Two sides. The HTTP side (axum on tokio) parses and checks each request, turns it into
//! tokens and hands it to the engine through a bounded queue (full: 503). The engine, one
//! thread, owns the library session and is the only code that runs the model: its
//! context holds `--parallel` slots (KV caches sharing one copy of the weights); each step
//! it admits queued requests into free slots (prefill, or a continued cache, between the
//! decode steps of the others: continuous batching) and then runs one decode step for
//! every running request (`Session::decode_batch`). Each request gets its events back on
//! its own channel; a request whose client has gone (its channel closed) is dropped at the
//! next step and its slot is free at once.
//!
//! Prefix reuse: a slot keeps its cache after its request ends. A new request takes the
//! free slot whose cached tokens share the longest prefix with its prompt (else the least
//! recently used one, whose cache is the one evicted), rewinds it to that prefix and runs
//! only the rest. Memory for caches is bounded by the slots: `--parallel` caches of at
//! most `--ctx-size` positions each.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::text::Text;
use tfc_runtime::{Sampler, Session, WeightData};

// ---- errors, in OpenAI's shape ----

/// An HTTP error with OpenAI's body: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    code: Option<&'static str>,
}

impl ApiError {
    fn bad(message: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::BAD_REQUEST, message: message.into(), code: None }
    }

    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), code: None }
    }

    fn code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    fn body(&self) -> Value {
        let kind = match self.status.as_u16() {
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        json!({"error": {"message": self.message, "type": kind, "param": null, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

type ApiResult<T> = std::result::Result<T, ApiError>;

// ---- requests ----

/// A string or a list of them (`stop`).
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// A message's content: text, or parts of which the text ones are read.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Message {
    role: String,
    content: Content,
    #[allow(dead_code)]
    name: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// What both generating endpoints take besides the prompt.
#[derive(Deserialize, Default)]
struct Common {
    #[allow(dead_code)]
    model: Option<String>,
    max_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// Not OpenAI's; llama.cpp's server takes it too.
    top_k: Option<i64>,
    seed: Option<u64>,
    stop: Option<OneOrMany>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    n: Option<i64>,
    #[allow(dead_code)]
    user: Option<String>,
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
    max_completion_tokens: Option<i64>,
    logprobs: Option<bool>,
    top_logprobs: Option<i64>,
    #[serde(flatten)]
    common: Common,
}

/// A completion's prompt: text or token ids, alone or as a one-element list.
#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Ids(Vec<i64>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<i64>>),
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: Prompt,
    logprobs: Option<i64>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum EmbeddingInput {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<i64>),
    IdLists(Vec<Vec<i64>>),
}

#[derive(Deserialize)]
struct EmbeddingRequest {
    input: EmbeddingInput,
    #[allow(dead_code)]
    model: Option<String>,
    encoding_format: Option<String>,
    #[allow(dead_code)]
    user: Option<String>,
}

/// The fields every generating endpoint takes (`Common`).
const COMMON: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "frequency_penalty",
    "presence_penalty",
    "n",
    "user",
];

/// Parses a JSON body of the fields `known` (and `COMMON` with `common`); malformed JSON,
/// an unknown field or a value of the wrong type is a 400 that says which.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8], known: &[&str], common: bool) -> ApiResult<T> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(format!("the request body is not JSON: {e}")))?;
    let Some(fields) = v.as_object() else {
        return Err(ApiError::bad("the request body must be a JSON object"));
    };
    if let Some(k) =
        fields.keys().find(|k| !(known.contains(&k.as_str()) || common && COMMON.contains(&k.as_str())))
    {
        return Err(ApiError::bad(format!("unrecognized request argument supplied: `{k}`")));
    }
    serde_json::from_value(v).map_err(|e| ApiError::bad(format!("the request is not valid: {e}")))
}

// ---- the engine's side ----

/// How a request picks its tokens.
#[derive(Clone, Debug)]
struct Params {
    max_tokens: usize,
    temperature: f32,
    top_p: f32,
    top_k: usize,
    seed: u64,
    frequency_penalty: f32,
    presence_penalty: f32,
    /// Log-probabilities of the chosen token and this many alternatives.
    logprobs: Option<usize>,
    stop: Vec<String>,
}

/// One token's log-probability and the most likely alternatives.
#[derive(Clone, Debug)]
struct Logprob {
    token: String,
    logprob: f32,
    top: Vec<(String, f32)>,
}

enum Event {
    Started { cached: usize },
    Token { text: String, logprob: Option<Logprob> },
    Done { reason: &'static str, tokens: usize },
    Failed(String),
}

enum Job {
    Generate { prompt: Vec<u32>, params: Params, events: UnboundedSender<Event> },
    Embed { inputs: Vec<Vec<u32>>, reply: tokio::sync::oneshot::Sender<Result<Vec<Vec<f32>>, String>> },
}

/// Counters for `/metrics`.
#[derive(Default)]
struct Metrics {
    requests: AtomicU64,
    rejected: AtomicU64,
    prompt_tokens: AtomicU64,
    cached_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    /// Requests accepted and not yet ended: waiting or running.
    inflight: AtomicU64,
    /// Requests holding a slot.
    running: AtomicU64,
    steps: AtomicU64,
    batched: AtomicU64,
}

/// A request being generated in a slot.
struct Running {
    slot: usize,
    params: Params,
    sampler: Sampler,
    events: UnboundedSender<Event>,
    generated: Vec<u32>,
    counts: HashMap<u32, u32>,
    /// The text sent so far.
    shown: String,
    /// The token to feed at the next step.
    next: u32,
    done: bool,
}

/// What a slot's cache holds, and when it was last used.
#[derive(Default)]
struct Slot {
    cached: Vec<u32>,
    used: u64,
}

struct Engine<'m> {
    session: Session<'m>,
    text: Arc<Text>,
    slots: Vec<Slot>,
    clock: u64,
    metrics: Arc<Metrics>,
    width: usize,
    pooling: Pooling,
    /// The fewest running requests for which one batched step (`decode_batch`) is
    /// faster than their single steps, as measured at start (`calibrate`).
    batch_from: usize,
}

/// The fewest sequences for which one batched decode step beats as many single steps on
/// this host and model (`usize::MAX`: none up to `slots`), measured once: each slot
/// holds one token, both ways are run once to warm them and then timed (the faster of
/// two), at 2, 4, 8, … and `slots` sequences. The slots are emptied afterwards.
fn calibrate(s: &mut Session, slots: usize) -> Result<(usize, String)> {
    use std::time::Instant;
    if slots < 2 {
        return Ok((usize::MAX, String::new()));
    }
    for i in 0..slots {
        s.use_slot(i)?;
        s.reset();
        s.prefill(&[1], None, false)?;
    }
    let mut sizes: Vec<usize> =
        std::iter::successors(Some(2usize), |b| Some(b * 2)).take_while(|&b| b < slots).collect();
    sizes.push(slots);
    let mut found = (usize::MAX, String::new());
    'sizes: for b in sizes {
        let steps: Vec<(usize, i32)> = (0..b).map(|i| (i, 1)).collect();
        let mut best = [f64::MAX; 2];
        for round in 0..3 {
            let t = Instant::now();
            s.decode_batch(&steps)?;
            let batched = t.elapsed().as_secs_f64();
            let t = Instant::now();
            for i in 0..b {
                s.use_slot(i)?;
                s.decode(1)?;
            }
            let single = t.elapsed().as_secs_f64();
            if round > 0 {
                best = [best[0].min(batched), best[1].min(single)];
            }
        }
        if best[0] < best[1] {
            found = (
                b,
                format!(
                    "{b} sequences: one batched step {:.1} ms, single steps {:.1} ms",
                    best[0] * 1e3,
                    best[1] * 1e3
                ),
            );
            break 'sizes;
        }
        found.1 = format!(
            "{b} sequences: one batched step {:.1} ms, single steps {:.1} ms",
            best[0] * 1e3,
            best[1] * 1e3
        );
    }
    for i in 0..slots {
        s.use_slot(i)?;
        s.reset();
    }
    Ok(found)
}

impl Engine<'_> {
    fn run(&mut self, jobs: Receiver<Job>) {
        let mut running: Vec<Running> = Vec::new();
        loop {
            // Admit what waits while a slot is free; block only with nothing to run.
            while running.len() < self.slots.len() {
                let job = if running.is_empty() {
                    match jobs.recv() {
                        Ok(j) => j,
                        Err(_) => return,
                    }
                } else {
                    match jobs.try_recv() {
                        Ok(j) => j,
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => break,
                    }
                };
                match job {
                    Job::Embed { inputs, reply } => {
                        let _ = reply.send(self.embed(&inputs));
                        self.metrics.inflight.fetch_sub(1, Relaxed);
                    }
                    Job::Generate { prompt, params, events } => {
                        let busy: Vec<usize> = running.iter().map(|r| r.slot).collect();
                        // A client gone while its request waited is not started.
                        if events.is_closed() {
                            self.metrics.inflight.fetch_sub(1, Relaxed);
                        } else if let Some(r) = self.start(&busy, prompt, params, events) {
                            running.push(r);
                        }
                    }
                }
            }
            self.drop_ended(&mut running);
            if running.is_empty() {
                continue;
            }
            let batch: Vec<(usize, i32)> = running.iter().map(|r| (r.slot, r.next as i32)).collect();
            self.metrics.steps.fetch_add(1, Relaxed);
            self.metrics.batched.fetch_add(batch.len() as u64, Relaxed);
            let rows = match batch.len() >= self.batch_from {
                true => self.session.decode_batch(&batch),
                false => batch
                    .iter()
                    .map(|&(slot, t)| self.session.use_slot(slot).and_then(|_| self.session.decode(t)))
                    .collect(),
            };
            match rows {
                Ok(rows) => {
                    for (r, row) in running.iter_mut().zip(rows) {
                        self.slots[r.slot].cached.push(r.next);
                        self.emit(r, row);
                    }
                }
                Err(e) => {
                    for r in &mut running {
                        self.fail(r, &e.to_string());
                    }
                }
            }
            self.drop_ended(&mut running);
        }
    }

    /// Drops the requests that ended or whose client has gone: their slots are free.
    fn drop_ended(&self, running: &mut Vec<Running>) {
        for r in running.iter_mut().filter(|r| r.events.is_closed()) {
            self.end(r);
        }
        running.retain(|r| !r.done);
    }

    /// Ends a request: its slot is free and it no longer counts against the server's
    /// limit. Called before its last event is sent, so a client that sees its answer end
    /// may send the next request at once.
    fn end(&self, r: &mut Running) {
        if !r.done {
            r.done = true;
            self.metrics.inflight.fetch_sub(1, Relaxed);
            self.metrics.running.fetch_sub(1, Relaxed);
        }
    }

    /// Puts a request in a free slot and runs its prompt; the first token is sampled and
    /// sent. `None` when it ended there (one token, an error).
    fn start(
        &mut self,
        busy: &[usize],
        prompt: Vec<u32>,
        params: Params,
        events: UnboundedSender<Event>,
    ) -> Option<Running> {
        let shared = |s: &Slot| s.cached.iter().zip(&prompt).take_while(|(a, b)| a == b).count();
        let Some(slot) = (0..self.slots.len())
            .filter(|i| !busy.contains(i))
            .max_by_key(|&i| (shared(&self.slots[i]), std::cmp::Reverse(self.slots[i].used)))
        else {
            // The engine admits only while a slot is free; this is a bug, told, not hung.
            self.metrics.inflight.fetch_sub(1, Relaxed);
            let _ = events.send(Event::Failed("internal error: no free slot".into()));
            return None;
        };
        // It holds the slot from here, before its first token is sent: a client that has
        // seen a token sees the request counted as running.
        self.metrics.running.fetch_add(1, Relaxed);
        self.clock += 1;
        self.slots[slot].used = self.clock;
        // The last prompt token is always run: its row is the first token's logits.
        let keep = shared(&self.slots[slot]).min(prompt.len() - 1);
        let mut r = Running {
            slot,
            sampler: sampler(&params),
            params,
            events,
            generated: Vec::new(),
            counts: HashMap::new(),
            shown: String::new(),
            next: 0,
            done: false,
        };
        let ids: Vec<i32> = prompt.iter().map(|&t| t as i32).collect();
        let s = &mut self.session;
        let row = s.use_slot(slot).and_then(|_| {
            if keep == 0 {
                s.reset();
                s.prefill(&ids, None, false)
            } else {
                s.rewind(keep).and_then(|_| s.extend(&ids[keep..], false))
            }
        });
        // Whatever happened, the cache holds the prompt's first `keep` tokens at least.
        self.slots[slot].cached = prompt[..keep].to_vec();
        let row = match row {
            Ok(row) => row,
            Err(e) => {
                self.slots[slot].cached.clear();
                self.fail(&mut r, &e.to_string());
                return None;
            }
        };
        self.slots[slot].cached = prompt;
        self.metrics.cached_tokens.fetch_add(keep as u64, Relaxed);
        let _ = r.events.send(Event::Started { cached: keep });
        self.emit(&mut r, row);
        (!r.done).then_some(r)
    }

    fn fail(&mut self, r: &mut Running, message: &str) {
        self.slots[r.slot].cached.clear();
        self.end(r);
        let _ = r.events.send(Event::Failed(message.to_string()));
    }

    /// Samples the next token from `row`, sends its text, and decides whether the request
    /// ends (EOS, a stop string, `max_tokens`).
    fn emit(&mut self, r: &mut Running, mut row: Vec<f32>) {
        let p = &r.params;
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            for (&t, &n) in &r.counts {
                row[t as usize] -= p.frequency_penalty * n as f32 + p.presence_penalty;
            }
        }
        let token = r.sampler.next(&row) as u32;
        let logprob = p.logprobs.map(|top| self.logprob(&row, token, top));
        if self.text.stop_ids.contains(&token) {
            return self.finish(r, "stop");
        }
        r.generated.push(token);
        *r.counts.entry(token).or_default() += 1;
        self.metrics.completion_tokens.fetch_add(1, Relaxed);
        let text = match &self.text.tokenizer {
            Some(_) => match self.text.decode(&r.generated) {
                Ok(t) => t,
                Err(e) => return self.fail(r, &e.to_string()),
            },
            None => String::new(),
        };
        // Up to a stop string, holding back an end that may yet become one.
        let stops = &r.params.stop;
        let cut = stops.iter().filter_map(|s| text.find(s.as_str())).min();
        let upto = cut.unwrap_or_else(|| text.len() - crate::text::pending_stop(&text, stops));
        let upto = (0..=upto).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
        // A token that completes no character yet (half of a UTF-8 sequence) shows as
        // U+FFFD until the rest comes: it is held back.
        let upto = if cut.is_none() && text[..upto].ends_with('\u{FFFD}') { upto - 3 } else { upto };
        let delta = text[..upto].strip_prefix(r.shown.as_str()).unwrap_or("").to_string();
        if !delta.is_empty() || logprob.is_some() {
            r.shown.push_str(&delta);
            if r.events.send(Event::Token { text: delta, logprob }).is_err() {
                return self.end(r);
            }
        }
        if cut.is_some() {
            return self.finish(r, "stop");
        }
        if r.generated.len() >= r.params.max_tokens {
            return self.finish(r, "length");
        }
        r.next = token;
    }

    fn finish(&mut self, r: &mut Running, reason: &'static str) {
        // The rest of the text that was held back for a stop string that did not come.
        if reason == "length" && self.text.tokenizer.is_some() {
            if let Ok(text) = self.text.decode(&r.generated) {
                if let Some(rest) = text.strip_prefix(r.shown.as_str()).filter(|t| !t.is_empty()) {
                    let _ = r.events.send(Event::Token { text: rest.to_string(), logprob: None });
                }
            }
        }
        self.end(r);
        let _ = r.events.send(Event::Done { reason, tokens: r.generated.len() });
    }

    fn logprob(&self, row: &[f32], token: u32, top: usize) -> Logprob {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let lse = max + row.iter().map(|&x| ((x - max) as f64).exp()).sum::<f64>().ln() as f32;
        let name = |t: u32| self.text.piece(t);
        let mut idx: Vec<usize> = (0..row.len()).collect();
        let top = top.min(row.len());
        if top > 0 {
            idx.select_nth_unstable_by(top - 1, |&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            idx.truncate(top);
            idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        } else {
            idx.clear();
        }
        Logprob {
            token: name(token),
            logprob: row[token as usize] - lse,
            top: idx.into_iter().map(|i| (name(i as u32), row[i] - lse)).collect(),
        }
    }

    /// Each input's pooled (and, where the checkpoint says, normalised) hidden state.
    fn embed(&mut self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, String> {
        let s = &mut self.session;
        s.use_slot(0).map_err(|e| e.to_string())?;
        inputs
            .iter()
            .map(|ids| {
                let ids: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
                s.reset();
                let rows = s.prefill(&ids, None, true).map_err(|e| e.to_string())?;
                Ok(self.pooling.pool(&rows, self.width))
            })
            .collect()
    }
}

fn sampler(p: &Params) -> Sampler {
    if p.temperature > 0.0 {
        Sampler::sample(p.temperature, p.top_k, p.top_p, p.seed)
    } else {
        Sampler::Greedy
    }
}

/// How an encoder's rows become one embedding: sentence-transformers' `1_Pooling` and
/// `Normalize` modules where the folder has them, else the mean, not normalised.
#[derive(Clone, Copy, Debug)]
struct Pooling {
    mode: PoolMode,
    normalize: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum PoolMode {
    Mean,
    Cls,
    Max,
    Last,
}

impl Pooling {
    fn of(dir: Option<&std::path::Path>) -> Result<Pooling> {
        let mut p = Pooling { mode: PoolMode::Mean, normalize: false };
        let Some(dir) = dir else { return Ok(p) };
        let read = |path: PathBuf| -> Result<Option<Value>> {
            match std::fs::read_to_string(&path) {
                Ok(t) => Ok(Some(
                    serde_json::from_str(&t).with_context(|| format!("{} is not JSON", path.display()))?,
                )),
                Err(_) => Ok(None),
            }
        };
        let modules = read(dir.join("modules.json"))?;
        let listed = modules.as_ref().and_then(Value::as_array).cloned().unwrap_or_default();
        let pooling_dir = listed
            .iter()
            .find(|m| m["type"].as_str().is_some_and(|t| t.ends_with("Pooling")))
            .and_then(|m| m["path"].as_str())
            .unwrap_or("1_Pooling");
        p.normalize = listed.iter().any(|m| m["type"].as_str().is_some_and(|t| t.ends_with("Normalize")));
        if let Some(cfg) = read(dir.join(pooling_dir).join("config.json"))? {
            let on = |k: &str| cfg[k].as_bool().unwrap_or(false);
            let modes = [
                ("pooling_mode_mean_tokens", PoolMode::Mean),
                ("pooling_mode_cls_token", PoolMode::Cls),
                ("pooling_mode_max_tokens", PoolMode::Max),
                ("pooling_mode_lasttoken", PoolMode::Last),
            ];
            let chosen: Vec<PoolMode> = modes.iter().filter(|(k, _)| on(k)).map(|&(_, m)| m).collect();
            match chosen.as_slice() {
                [m] => p.mode = *m,
                [] => {}
                _ => bail!(
                    "{}: more than one pooling mode is on; tfc serve pools one way",
                    dir.join(pooling_dir).join("config.json").display()
                ),
            }
            for k in ["pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens"] {
                if on(k) {
                    bail!("{}: `{k}` is not supported", dir.join(pooling_dir).join("config.json").display());
                }
            }
        }
        Ok(p)
    }

    fn pool(&self, rows: &[f32], width: usize) -> Vec<f32> {
        let n = rows.len() / width;
        let row = |i: usize| &rows[i * width..(i + 1) * width];
        let mut v: Vec<f32> = match self.mode {
            PoolMode::Cls => row(0).to_vec(),
            PoolMode::Last => row(n - 1).to_vec(),
            PoolMode::Max => {
                (0..width).map(|j| (0..n).map(|i| row(i)[j]).fold(f32::NEG_INFINITY, f32::max)).collect()
            }
            PoolMode::Mean => (0..width)
                .map(|j| ((0..n).map(|i| row(i)[j] as f64).sum::<f64>() / n as f64) as f32)
                .collect(),
        };
        if self.normalize {
            let norm = v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt().max(1e-12) as f32;
            v.iter_mut().for_each(|x| *x /= norm);
        }
        v
    }
}

// ---- the HTTP side ----

struct App {
    name: String,
    text: Arc<Text>,
    jobs: Sender<Job>,
    /// The most requests accepted at once: the slots and the queue.
    limit: u64,
    metrics: Arc<Metrics>,
    ctx: usize,
    vocab: usize,
    generates: bool,
    stopping: AtomicBool,
    started: u64,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn request_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("{prefix}-{}-{}", now(), NEXT.fetch_add(1, Relaxed))
}

impl App {
    /// Hands a job to the engine; 503 when the queue is full or the server stops.
    fn submit(&self, job: Job) -> ApiResult<()> {
        if self.stopping.load(Relaxed) {
            return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down"));
        }
        let busy = |message: &str| {
            self.metrics.inflight.fetch_sub(1, Relaxed);
            self.metrics.rejected.fetch_add(1, Relaxed);
            Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message).code("server_busy"))
        };
        if self.metrics.inflight.fetch_add(1, Relaxed) >= self.limit {
            return busy("the server is busy: every slot is in use and the queue is full; try again later");
        }
        match self.jobs.send(job) {
            Ok(()) => Ok(()),
            Err(_) => busy("the model engine has stopped"),
        }
    }

    /// The sampling parameters of a request, checked; `prompt` is its length.
    fn params(
        &self,
        c: &Common,
        max_tokens: Option<i64>,
        logprobs: Option<usize>,
        prompt: usize,
    ) -> ApiResult<Params> {
        if prompt == 0 {
            return Err(ApiError::bad("the prompt has no tokens"));
        }
        if c.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad("`n` must be 1: one choice per request"));
        }
        if prompt >= self.ctx {
            return Err(ApiError::bad(format!(
                "the prompt has {prompt} tokens; this server's context is {} (--ctx-size), which leaves no room for a completion",
                self.ctx
            ))
            .code("context_length_exceeded"));
        }
        let room = self.ctx - prompt;
        let max_tokens = match max_tokens {
            None => room,
            Some(m) if m < 1 => return Err(ApiError::bad(format!("`max_tokens` is {m}: it must be at least 1"))),
            Some(m) if m as u64 > room as u64 => {
                return Err(ApiError::bad(format!(
                    "the prompt's {prompt} tokens and `max_tokens` {m} need {} positions; this server's context is {} (--ctx-size)",
                    prompt as u64 + m as u64,
                    self.ctx
                ))
                .code("context_length_exceeded"))
            }
            Some(m) => m as usize,
        };
        let temperature = c.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad(format!("`temperature` is {temperature}: it must be in [0, 2]")));
        }
        let top_p = c.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad(format!("`top_p` is {top_p}: it must be in (0, 1]")));
        }
        let top_k = c.top_k.unwrap_or(0);
        if top_k < 0 {
            return Err(ApiError::bad(format!("`top_k` is {top_k}: it must be at least 0 (0: all tokens)")));
        }
        let penalty = |name: &str, v: Option<f32>| -> ApiResult<f32> {
            let v = v.unwrap_or(0.0);
            if !(-2.0..=2.0).contains(&v) {
                return Err(ApiError::bad(format!("`{name}` is {v}: it must be in [-2, 2]")));
            }
            Ok(v)
        };
        let stop = match &c.stop {
            None => vec![],
            Some(OneOrMany::One(s)) => vec![s.clone()],
            Some(OneOrMany::Many(v)) => v.clone(),
        };
        if stop.len() > 4 || stop.iter().any(String::is_empty) {
            return Err(ApiError::bad("`stop` takes at most 4 strings, none of them empty"));
        }
        if !stop.is_empty() && self.text.tokenizer.is_none() {
            return Err(ApiError::bad("`stop` strings need the model's tokenizer, and this model has none"));
        }
        let seed = c.seed.unwrap_or_else(|| {
            SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
        });
        Ok(Params {
            max_tokens,
            temperature,
            top_p,
            top_k: top_k as usize,
            seed,
            frequency_penalty: penalty("frequency_penalty", c.frequency_penalty)?,
            presence_penalty: penalty("presence_penalty", c.presence_penalty)?,
            logprobs,
            stop,
        })
    }

    fn ids(&self, ids: &[i64]) -> ApiResult<Vec<u32>> {
        ids.iter()
            .map(|&t| match t {
                t if t >= 0 && (t as u64) < self.vocab as u64 => Ok(t as u32),
                t => {
                    Err(ApiError::bad(format!("token id {t} is outside the vocabulary (0..{})", self.vocab)))
                }
            })
            .collect()
    }

    fn generates(&self) -> ApiResult<()> {
        match self.generates {
            true => Ok(()),
            false => {
                Err(ApiError::bad("this model is an encoder: it makes embeddings (/v1/embeddings), not text"))
            }
        }
    }
}

/// The parts of a finished (or streamed) generation a response is made of.
#[derive(Default)]
struct Outcome {
    text: String,
    logprobs: Vec<Logprob>,
    reason: &'static str,
    tokens: usize,
    cached: usize,
}

/// Which response a generation is written as.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

struct Generation {
    kind: Kind,
    id: String,
    model: String,
    created: u64,
    prompt: usize,
    logprobs: Option<usize>,
}

impl Generation {
    fn usage(&self, o: &Outcome) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": o.tokens,
            "total_tokens": self.prompt + o.tokens,
            "prompt_tokens_details": {"cached_tokens": o.cached},
        })
    }

    /// Log-probabilities in the shape of the endpoint.
    fn logprobs(&self, lps: &[Logprob]) -> Value {
        if self.logprobs.is_none() {
            return Value::Null;
        }
        let bytes = |s: &str| s.as_bytes().to_vec();
        match self.kind {
            Kind::Chat => json!({"content": lps.iter().map(|l| json!({
                "token": l.token, "logprob": l.logprob, "bytes": bytes(&l.token),
                "top_logprobs": l.top.iter().map(|(t, p)| json!({"token": t, "logprob": p, "bytes": bytes(t)})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>()}),
            Kind::Completion => json!({
                "tokens": lps.iter().map(|l| &l.token).collect::<Vec<_>>(),
                "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
                "top_logprobs": lps.iter().map(|l| l.top.iter().map(|(t, p)| (t.clone(), json!(p))).collect::<serde_json::Map<_, _>>()).collect::<Vec<_>>(),
                "text_offset": lps.iter().scan(0usize, |at, l| { let o = *at; *at += l.token.len(); Some(o) }).collect::<Vec<_>>(),
            }),
        }
    }

    fn object(&self, stream: bool) -> &'static str {
        match (self.kind, stream) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn choice(&self, text: &str, lps: &[Logprob], reason: Option<&str>, stream: bool, first: bool) -> Value {
        let logprobs = self.logprobs(lps);
        match self.kind {
            Kind::Chat if stream => {
                let delta = if first {
                    json!({"role": "assistant", "content": text})
                } else if text.is_empty() && reason.is_some() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason})
            }
            Kind::Chat => {
                json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs, "finish_reason": reason})
            }
            Kind::Completion => {
                json!({"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason})
            }
        }
    }

    fn response(&self, o: &Outcome) -> Value {
        json!({
            "id": self.id, "object": self.object(false), "created": self.created, "model": self.model,
            "choices": [self.choice(&o.text, &o.logprobs, Some(o.reason), false, false)],
            "usage": self.usage(o),
        })
    }

    fn chunk(&self, choices: Vec<Value>, usage: Value) -> String {
        json!({"id": self.id, "object": self.object(true), "created": self.created, "model": self.model, "choices": choices, "usage": usage}).to_string()
    }
}

/// Waits for the whole generation.
async fn collect(mut events: UnboundedReceiver<Event>) -> ApiResult<Outcome> {
    let mut o = Outcome::default();
    while let Some(e) = events.recv().await {
        match e {
            Event::Started { cached } => o.cached = cached,
            Event::Token { text, logprob } => {
                o.text.push_str(&text);
                o.logprobs.extend(logprob);
            }
            Event::Done { reason, tokens } => {
                o.reason = reason;
                o.tokens = tokens;
                return Ok(o);
            }
            Event::Failed(m) => return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, m)),
        }
    }
    Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the model engine stopped before the answer ended"))
}

/// Server-sent events: a chunk per token, the finish reason, usage if asked, `[DONE]`.
fn stream(g: Generation, events: UnboundedReceiver<Event>, usage: bool) -> Response {
    struct St {
        g: Generation,
        events: UnboundedReceiver<Event>,
        first: bool,
        cached: usize,
        tail: Vec<String>,
        ended: bool,
    }
    let st = St { g, events, first: true, cached: 0, tail: vec![], ended: false };
    let s = futures_util::stream::unfold(st, move |mut st| async move {
        loop {
            if let Some(line) = st.tail.pop() {
                return Some((Ok::<_, std::convert::Infallible>(SseEvent::default().data(line)), st));
            }
            if st.ended {
                return None;
            }
            let Some(e) = st.events.recv().await else {
                st.ended = true;
                let err = ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the model engine stopped before the answer ended",
                );
                st.tail = vec!["[DONE]".into(), err.body().to_string()];
                continue;
            };
            match e {
                Event::Started { cached } => {
                    st.cached = cached;
                    if st.g.kind == Kind::Chat {
                        st.first = false;
                        let c = st.g.choice("", &[], None, true, true);
                        return Some((Ok(SseEvent::default().data(st.g.chunk(vec![c], Value::Null))), st));
                    }
                }
                Event::Token { text, logprob } => {
                    let lps: Vec<Logprob> = logprob.into_iter().collect();
                    let c = st.g.choice(&text, &lps, None, true, false);
                    return Some((Ok(SseEvent::default().data(st.g.chunk(vec![c], Value::Null))), st));
                }
                Event::Done { reason, tokens } => {
                    st.ended = true;
                    let c = st.g.choice("", &[], Some(reason), true, false);
                    let mut lines = vec![st.g.chunk(vec![c], Value::Null)];
                    if usage {
                        let o = Outcome { tokens, cached: st.cached, ..Default::default() };
                        lines.push(st.g.chunk(vec![], st.g.usage(&o)));
                    }
                    lines.push("[DONE]".into());
                    lines.reverse();
                    st.tail = lines;
                }
                Event::Failed(m) => {
                    st.ended = true;
                    st.tail = vec![
                        "[DONE]".into(),
                        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, m).body().to_string(),
                    ];
                }
            }
        }
    });
    Sse::new(s).into_response()
}

/// Checks a generation's parameters, submits it and answers it, streamed or whole.
async fn generate(
    app: &App,
    kind: Kind,
    prompt: Vec<u32>,
    c: &Common,
    max_tokens: Option<i64>,
    logprobs: Option<usize>,
) -> ApiResult<Response> {
    let params = app.params(c, max_tokens, logprobs, prompt.len())?;
    let prefix = if kind == Kind::Chat { "chatcmpl" } else { "cmpl" };
    let g = Generation {
        kind,
        id: request_id(prefix),
        model: app.name.clone(),
        created: now(),
        prompt: prompt.len(),
        logprobs,
    };
    let (tx, rx) = unbounded_channel();
    app.metrics.requests.fetch_add(1, Relaxed);
    app.metrics.prompt_tokens.fetch_add(prompt.len() as u64, Relaxed);
    app.submit(Job::Generate { prompt, params, events: tx })?;
    if c.stream.unwrap_or(false) {
        return Ok(stream(g, rx, c.stream_options.as_ref().is_some_and(|o| o.include_usage)));
    }
    let o = collect(rx).await?;
    Ok(axum::Json(g.response(&o)).into_response())
}

async fn chat(State(app): State<Arc<App>>, body: Bytes) -> ApiResult<Response> {
    app.generates()?;
    let r: ChatRequest =
        parse(&body, &["messages", "max_completion_tokens", "logprobs", "top_logprobs"], true)?;
    if r.messages.is_empty() {
        return Err(ApiError::bad("`messages` is empty"));
    }
    let mut messages = Vec::new();
    for (i, m) in r.messages.iter().enumerate() {
        if !["system", "user", "assistant", "developer", "tool"].contains(&m.role.as_str()) {
            return Err(ApiError::bad(format!("messages[{i}]: unknown role `{}`", m.role)));
        }
        let content = match &m.content {
            Content::Text(t) => t.clone(),
            Content::Parts(parts) => {
                let mut t = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(x)) => t.push_str(x),
                        (kind, _) => {
                            return Err(ApiError::bad(format!(
                                "messages[{i}]: a `{kind}` part: only text parts are read"
                            )))
                        }
                    }
                }
                t
            }
        };
        messages.push((m.role.clone(), content));
    }
    let prompt = app.text.encode_chat(&messages).map_err(|e| ApiError::bad(format!("{e:#}")))?;
    let logprobs = match (r.logprobs.unwrap_or(false), r.top_logprobs) {
        (_, Some(n)) if !(0..=20).contains(&n) => {
            return Err(ApiError::bad("`top_logprobs` must be in 0..=20"))
        }
        (false, Some(_)) => return Err(ApiError::bad("`top_logprobs` needs `logprobs: true`")),
        (true, n) => Some(n.unwrap_or(0) as usize),
        (false, None) => None,
    };
    let max = r.max_completion_tokens.or(r.common.max_tokens);
    generate(&app, Kind::Chat, prompt, &r.common, max, logprobs).await
}

async fn completions(State(app): State<Arc<App>>, body: Bytes) -> ApiResult<Response> {
    app.generates()?;
    let r: CompletionRequest = parse(&body, &["prompt", "logprobs"], true)?;
    let text = |t: &str| app.text.encode_raw(t).map_err(|e| ApiError::bad(format!("{e:#}")));
    let prompt = match &r.prompt {
        Prompt::Text(t) => text(t)?,
        Prompt::Ids(ids) => app.ids(ids)?,
        Prompt::Texts(v) if v.len() == 1 => text(&v[0])?,
        Prompt::IdLists(v) if v.len() == 1 => app.ids(&v[0])?,
        _ => return Err(ApiError::bad("`prompt` holds several prompts; send one per request")),
    };
    let logprobs = match r.logprobs {
        Some(n) if !(0..=5).contains(&n) => return Err(ApiError::bad("`logprobs` must be in 0..=5")),
        n => n.map(|n| n as usize),
    };
    // OpenAI's default for this endpoint.
    let max = Some(r.common.max_tokens.unwrap_or(16));
    generate(&app, Kind::Completion, prompt, &r.common, max, logprobs).await
}

async fn embeddings(State(app): State<Arc<App>>, body: Bytes) -> ApiResult<Response> {
    if app.generates {
        return Err(ApiError::bad("this model generates text; embeddings come from encoder models"));
    }
    let r: EmbeddingRequest = parse(&body, &["input", "model", "encoding_format", "user"], false)?;
    if r.encoding_format.as_deref().is_some_and(|f| f != "float") {
        return Err(ApiError::bad("`encoding_format`: only \"float\" is served"));
    }
    let text = |t: &str| app.text.encode_raw(t).map_err(|e| ApiError::bad(format!("{e:#}")));
    let inputs: Vec<Vec<u32>> = match &r.input {
        EmbeddingInput::Text(t) => vec![text(t)?],
        EmbeddingInput::Texts(v) => v.iter().map(|t| text(t)).collect::<ApiResult<_>>()?,
        EmbeddingInput::Ids(ids) => vec![app.ids(ids)?],
        EmbeddingInput::IdLists(v) => v.iter().map(|ids| app.ids(ids)).collect::<ApiResult<_>>()?,
    };
    if inputs.is_empty() {
        return Err(ApiError::bad("`input` is empty"));
    }
    for (i, ids) in inputs.iter().enumerate() {
        if ids.is_empty() || ids.len() > app.ctx {
            return Err(ApiError::bad(format!("input {i} has {} tokens: 1 to {} fit", ids.len(), app.ctx))
                .code("context_length_exceeded"));
        }
    }
    let tokens: usize = inputs.iter().map(Vec::len).sum();
    let (tx, rx) = tokio::sync::oneshot::channel();
    app.metrics.requests.fetch_add(1, Relaxed);
    app.metrics.prompt_tokens.fetch_add(tokens as u64, Relaxed);
    app.submit(Job::Embed { inputs, reply: tx })?;
    let vectors = rx
        .await
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the model engine stopped"))?
        .map_err(|m| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, m))?;
    let data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(i, v)| json!({"object": "embedding", "index": i, "embedding": v}))
        .collect();
    Ok(axum::Json(json!({
        "object": "list", "data": data, "model": app.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response())
}

async fn models(State(app): State<Arc<App>>) -> Response {
    axum::Json(json!({"object": "list", "data": [{"id": app.name, "object": "model", "created": app.started, "owned_by": "tfc"}]}))
        .into_response()
}

async fn health(State(app): State<Arc<App>>) -> Response {
    match app.stopping.load(Relaxed) {
        false => axum::Json(json!({"status": "ok"})).into_response(),
        true => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down").into_response(),
    }
}

/// Prometheus' text format.
async fn prometheus(State(app): State<Arc<App>>) -> Response {
    let m = &app.metrics;
    let mut out = String::new();
    let mut put = |name: &str, kind: &str, help: &str, v: u64| {
        out.push_str(&format!("# HELP tfc_{name} {help}\n# TYPE tfc_{name} {kind}\ntfc_{name} {v}\n"));
    };
    put("requests_total", "counter", "Requests accepted.", m.requests.load(Relaxed));
    put(
        "requests_rejected_total",
        "counter",
        "Requests refused with 503 (queue full or shutting down).",
        m.rejected.load(Relaxed),
    );
    put("prompt_tokens_total", "counter", "Prompt tokens received.", m.prompt_tokens.load(Relaxed));
    put(
        "prompt_tokens_cached_total",
        "counter",
        "Prompt tokens continued from a slot's cache.",
        m.cached_tokens.load(Relaxed),
    );
    put("completion_tokens_total", "counter", "Tokens generated.", m.completion_tokens.load(Relaxed));
    let waiting = m.inflight.load(Relaxed).saturating_sub(m.running.load(Relaxed));
    put("queue_depth", "gauge", "Requests waiting for a slot.", waiting);
    put(
        "batch_size",
        "gauge",
        "Requests holding a slot: the next decode step's batch.",
        m.running.load(Relaxed),
    );
    put("decode_steps_total", "counter", "Decode steps run.", m.steps.load(Relaxed));
    put(
        "decode_rows_total",
        "counter",
        "Sequences advanced by decode steps (their sum of batch sizes).",
        m.batched.load(Relaxed),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint: the server has /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models, /health and /metrics")
}

async fn wrong_method() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "this endpoint does not take that method")
}

/// A model ready to serve: its library, checkpoint and text side.
pub struct Served {
    pub model: tfc_runtime::Model,
    pub ck: Arc<tfc_runtime::Checkpoint>,
    pub text: Text,
    /// The checkpoint's folder (sentence-transformers' pooling files), if it is one.
    pub dir: Option<PathBuf>,
    /// The model's name in responses and `/v1/models`.
    pub name: String,
}

/// How the server runs the model.
#[derive(Clone, Debug)]
pub struct Config {
    /// Requests generated at once, each in its own slot.
    pub parallel: usize,
    /// The most positions one request may use (`None`: the model's max_seq).
    pub ctx_size: Option<usize>,
    /// Requests that may wait for a slot; more get 503.
    pub queue: usize,
    /// Library threads (0: one per core).
    pub threads: usize,
}

/// Serves `m` on `listener` until `shutdown` completes; then refuses new requests,
/// finishes the running ones, and returns. `ready` is called once the weights are bound
/// and the server accepts requests.
pub fn serve(
    m: Served,
    cfg: &Config,
    listener: std::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(),
) -> Result<()> {
    if cfg.parallel == 0 || cfg.parallel > tfc_runtime::abi::MAX_SLOTS {
        bail!("--parallel {}: 1 to {} requests at once", cfg.parallel, tfc_runtime::abi::MAX_SLOTS);
    }
    if cfg.threads > tfc_runtime::abi::MAX_THREADS {
        bail!("--threads {}: at most {} (0: one per core)", cfg.threads, tfc_runtime::abi::MAX_THREADS);
    }
    let manifest = m.model.manifest();
    let (max_seq, vocab, generates, width) =
        (manifest.max_seq, manifest.vocab, manifest.has_decode, manifest.output_width);
    let ctx = cfg.ctx_size.unwrap_or(max_seq);
    if ctx == 0 || ctx > max_seq {
        bail!("--ctx-size {ctx}: 1 to the model's max_seq of {max_seq}");
    }
    let pooling = if generates {
        Pooling { mode: PoolMode::Mean, normalize: false }
    } else {
        Pooling::of(m.dir.as_deref())?
    };
    let text = Arc::new(m.text);
    let metrics = Arc::new(Metrics::default());
    let (jobs, queue) = channel();
    let slots = if generates { cfg.parallel } else { 1 };
    let app = Arc::new(App {
        name: m.name,
        text: text.clone(),
        jobs,
        limit: (slots + cfg.queue) as u64,
        metrics: metrics.clone(),
        ctx,
        vocab,
        generates,
        stopping: AtomicBool::new(false),
        started: now(),
    });
    // The engine thread: binds the weights, adds the slots, then serves the queue until
    // every sender is gone.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
    let (threads, model, ck) = (cfg.threads, m.model, m.ck);
    let engine = std::thread::spawn(move || {
        let start = || -> Result<(Session<'_>, usize)> {
            let mut s = Session::new(&model, WeightData::Checkpoint(ck), threads)?;
            for _ in 1..slots {
                s.add_slot()?;
            }
            let (batch_from, measured) =
                if generates { calibrate(&mut s, slots)? } else { (usize::MAX, String::new()) };
            if !measured.is_empty() {
                let from = if batch_from == usize::MAX {
                    "never".to_string()
                } else {
                    format!("from {batch_from} requests")
                };
                eprintln!("batched decode steps {from} (at {measured})");
            }
            Ok((s, batch_from))
        };
        let (session, batch_from) = match start() {
            Ok(s) => s,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        let _ = ready_tx.send(Ok(()));
        let slots = (0..slots).map(|_| Slot::default()).collect();
        Engine { session, text, slots, clock: 0, metrics, width, pooling, batch_from }.run(queue);
    });
    ready_rx.recv().context("the model engine stopped while starting")??;

    let router = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(prometheus))
        .fallback(not_found)
        .method_not_allowed_fallback(wrong_method)
        .with_state(app.clone());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    listener.set_nonblocking(true)?;
    ready();
    rt.block_on(async {
        // Each token's event goes out when it is written, not when the previous one's
        // acknowledgement comes back (Nagle's algorithm).
        let listener = tokio::net::TcpListener::from_std(listener)?.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let stopping = app.clone();
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                shutdown.await;
                stopping.stopping.store(true, Relaxed);
            })
            .await?;
        anyhow::Ok(())
    })?;
    drop(app);
    let _ = engine.join();
    Ok(())
}
