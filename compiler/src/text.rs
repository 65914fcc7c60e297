//! Text in and out of a model: the tokenizer a GGUF file describes, chat templates, and
//! the tokens that end a turn.
//!
//! A GGUF file carries its vocabulary (`tokenizer.ggml.*`) instead of a `tokenizer.json`.
//! A byte-level BPE vocabulary (`tokenizer.ggml.model = gpt2`) becomes a `tokenizers` BPE
//! with the merges the file lists, split first by the pattern its `tokenizer.ggml.pre`
//! names (GPT-2's, Llama 3's, Qwen2's), as transformers' GGUF loader builds it; a
//! SentencePiece one (`llama`) a BPE with byte fallback whose merges are recovered from
//! the scores; tokens the file marks as control are special, user-defined ones are
//! matched whole. Chat templates
//! (Jinja) render with minijinja, given `messages`, `add_generation_prompt`, `bos_token`
//! and `eos_token` as transformers gives them.

use std::collections::HashMap;

use anyhow::Context;

use tfc_runtime::gguf::{Gguf, Value};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("the GGUF file's tokenizer: {0}")]
    Gguf(String),
    #[error("the chat template: {0}")]
    Template(String),
}

/// Llama 3's pre-tokenizer pattern (also `llama-bpe`, `smaug-bpe`, `falcon3`, …).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's (also `deepseek-r1-qwen`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GPT-2's map from bytes to the printable characters byte-level vocabularies spell them
/// with.
fn bytes_to_unicode() -> HashMap<u8, char> {
    let mut keep: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xa1..=0xac).chain(0xae..=0xff).collect();
    let mut chars = keep.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !keep.contains(&b) {
            keep.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    keep.into_iter().zip(chars).map(|(b, c)| (b as u8, char::from_u32(c).unwrap())).collect()
}

fn strings<'a>(g: &'a Gguf, key: &str) -> Result<Vec<&'a str>, TextError> {
    g.meta
        .get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| TextError::Gguf(format!("no `{key}`")))?
        .iter()
        .map(|v| {
            v.as_str().ok_or_else(|| TextError::Gguf(format!("`{key}` holds a value that is not a string")))
        })
        .collect()
}

/// The merges a SentencePiece vocabulary implies, as transformers recovers them from a
/// GGUF file that lists none: every split of a token into two tokens of the vocabulary,
/// ordered by the token's score (highest first), then by the lengths of the two parts
/// (longest first), then as found (token order, then the parts' ids).
fn spm_merges(tokens: &[&str], scores: &[f64]) -> Vec<(String, String)> {
    let vocab: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (t, &score) in tokens.iter().zip(scores) {
        if !seen.insert(*t) {
            continue;
        }
        let mut local: Vec<(&str, &str, f64)> = t
            .char_indices()
            .skip(1)
            .map(|(i, _)| (&t[..i], &t[i..]))
            .filter(|(l, r)| vocab.contains_key(l) && vocab.contains_key(r))
            .map(|(l, r)| (l, r, score))
            .collect();
        local.sort_by_key(|(l, r, _)| (vocab[l], vocab[r]));
        merges.extend(local);
    }
    let key = |m: &(&str, &str, f64)| (m.2, m.0.chars().count(), m.1.chars().count());
    merges.sort_by(|a, b| key(b).partial_cmp(&key(a)).unwrap_or(std::cmp::Ordering::Equal));
    merges.into_iter().map(|(l, r, _)| (l.to_string(), r.to_string())).collect()
}

/// A SentencePiece BPE vocabulary (`tokenizer.ggml.model = llama`): merges recovered from
/// the scores, bytes outside the vocabulary as `<0x..>` tokens, spaces as `▁` with one
/// put before the text when the file says so (`add_space_prefix`, on by default), as
/// transformers' Llama tokenizer does.
fn spm_tokenizer(g: &Gguf, tokens: &[&str]) -> Result<Tokenizer, TextError> {
    use tokenizers::decoders::{
        byte_fallback::ByteFallback, fuse::Fuse, sequence::Sequence as Decoders, strip::Strip,
    };
    use tokenizers::normalizers::{Prepend, Replace};
    let scores: Vec<f64> = g
        .meta
        .get("tokenizer.ggml.scores")
        .and_then(Value::as_array)
        .ok_or_else(|| TextError::Gguf("no `tokenizer.ggml.scores`".into()))?
        .iter()
        .map(|v| v.as_f64().unwrap_or(0.0))
        .collect();
    if scores.len() != tokens.len() {
        return Err(TextError::Gguf(format!("{} scores for {} tokens", scores.len(), tokens.len())));
    }
    let vocab: tokenizers::models::bpe::Vocab =
        tokens.iter().enumerate().map(|(i, t)| (t.to_string(), i as u32)).collect();
    let unk = g.meta.get("tokenizer.ggml.unknown_token_id").and_then(Value::as_u64).unwrap_or(0) as usize;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, spm_merges(tokens, &scores))
        .byte_fallback(true)
        .fuse_unk(true)
        .unk_token(tokens.get(unk).copied().unwrap_or("<unk>").to_string())
        .build()
        .map_err(|e| TextError::Gguf(format!("the BPE model: {e}")))?;
    let mut tok = Tokenizer::new(bpe);
    let bad = |e: Box<dyn std::error::Error + Send + Sync>| TextError::Gguf(e.to_string());
    let space = Replace::new(" ", "\u{2581}").map_err(bad)?;
    let prefix = !matches!(g.meta.get("tokenizer.ggml.add_space_prefix"), Some(Value::Bool(false)));
    let normalizer: tokenizers::NormalizerWrapper = if prefix {
        tokenizers::normalizers::Sequence::new(vec![Prepend::new("\u{2581}".into()).into(), space.into()])
            .into()
    } else {
        space.into()
    };
    tok.with_normalizer(Some(normalizer));
    let unspace = tokenizers::decoders::DecoderWrapper::Replace(Replace::new("\u{2581}", " ").map_err(bad)?);
    let mut steps = vec![unspace, ByteFallback::default().into(), Fuse::default().into()];
    if prefix {
        steps.push(Strip::new(' ', 1, 0).into());
    }
    tok.with_decoder(Some(Decoders::new(steps)));
    Ok(tok)
}

/// The tokenizer a GGUF file describes; `None` when it describes none.
pub fn gguf_tokenizer(g: &Gguf) -> Result<Option<Tokenizer>, TextError> {
    let Some(model) = g.meta.get("tokenizer.ggml.model").and_then(Value::as_str) else { return Ok(None) };
    if model == "llama" {
        let tokens = strings(g, "tokenizer.ggml.tokens")?;
        let mut tok = spm_tokenizer(g, &tokens)?;
        add_marked(&mut tok, g, &tokens, |_| true);
        return Ok(Some(tok));
    }
    if model != "gpt2" {
        return Err(TextError::Gguf(format!(
            "tokenizer model `{model}` is not supported yet (byte-level BPE `gpt2` and SentencePiece `llama` are); pass --tokenizer with a tokenizer.json"
        )));
    }
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let merges: Vec<(String, String)> = strings(g, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| TextError::Gguf(format!("merge `{m}` is not two tokens")))
        })
        .collect::<Result<_, _>>()?;
    // Tokens are spelled in the byte alphabet; one that is not is re-spelled from its bytes.
    let spell = bytes_to_unicode();
    let alphabet: std::collections::HashSet<char> = spell.values().copied().collect();
    let spelled = |t: &str| -> String {
        if t.chars().all(|c| alphabet.contains(&c)) {
            t.to_string()
        } else {
            t.bytes().map(|b| spell[&b]).collect()
        }
    };
    let vocab: tokenizers::models::bpe::Vocab =
        tokens.iter().enumerate().map(|(i, t)| (spelled(t), i as u32)).collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| TextError::Gguf(format!("the BPE model: {e}")))?;
    let mut tok = Tokenizer::new(bpe);
    // How text is split before the merges: GPT-2's pattern (byte-level's own), or the
    // one the vocabulary was trained with. A kind not listed is refused rather than
    // split another way.
    let pre = g.meta.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
    let split = match pre {
        "default" | "gpt-2" | "gpt2" | "smollm" => None,
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "smaug-bpe" | "dbrx" => Some(LLAMA3_SPLIT),
        "qwen2" | "deepseek-r1-qwen" => Some(QWEN2_SPLIT),
        other => {
            return Err(TextError::Gguf(format!(
                "pre-tokenizer `{other}` is not supported yet (gpt-2, smollm, llama-bpe and qwen2 are); pass --tokenizer with a tokenizer.json"
            )))
        }
    };
    let pre_tok: PreTokenizerWrapper = match split {
        Some(re) => {
            let s = Split::new(SplitPattern::Regex(re.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| TextError::Gguf(format!("the split pattern: {e}")))?;
            Sequence::new(vec![s.into(), ByteLevel::new(false, true, false).into()]).into()
        }
        None => ByteLevel::new(false, true, true).into(),
    };
    tok.with_pre_tokenizer(Some(pre_tok));
    tok.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
    // In a byte-level vocabulary a control token spelled outside the byte alphabet is a
    // mislabel (transformers skips it too).
    add_marked(&mut tok, g, &tokens, |t| t.chars().all(|c| alphabet.contains(&c)));
    Ok(Some(tok))
}

/// Control tokens (type 3) as special tokens, user-defined ones (type 4) as tokens matched
/// whole, those that `keep`.
fn add_marked(tok: &mut Tokenizer, g: &Gguf, tokens: &[&str], keep: impl Fn(&str) -> bool) {
    let types: Vec<i64> = match g.meta.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
        Some(a) => a.iter().map(|v| v.as_f64().map_or(1, |x| x as i64)).collect(),
        None => vec![1; tokens.len()],
    };
    let added = |ty: i64, special: bool| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(&types)
            .filter(|(t, &k)| k == ty && keep(t))
            .map(|(t, _)| AddedToken::from(t.to_string(), special).normalized(false))
            .collect()
    };
    tok.add_special_tokens(&added(3, true));
    tok.add_tokens(&added(4, false));
}

/// A token id the file names under `key`, if any.
fn token_id(g: &Gguf, key: &str) -> Option<u32> {
    g.meta.get(key).and_then(Value::as_u64).map(|i| i as u32)
}

/// The ids that end a turn: the file's end-of-sequence token and, where it differs, its
/// end-of-turn token.
pub fn gguf_stop_ids(g: &Gguf) -> Vec<u32> {
    let mut ids: Vec<u32> = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
        .iter()
        .filter_map(|k| token_id(g, k))
        .collect();
    ids.dedup();
    ids
}

/// Whether encoding raw text starts with the file's beginning-of-sequence token.
pub fn gguf_bos(g: &Gguf) -> Option<u32> {
    let add = match g.meta.get("tokenizer.ggml.add_bos_token") {
        Some(Value::Bool(b)) => *b,
        _ => g.meta.get("tokenizer.ggml.model").and_then(Value::as_str) == Some("llama"),
    };
    add.then(|| token_id(g, "tokenizer.ggml.bos_token_id")).flatten()
}

/// A chat template and the special tokens it may name.
pub struct ChatTemplate {
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
}

impl ChatTemplate {
    /// The template a GGUF file carries, if any.
    pub fn from_gguf(g: &Gguf) -> Option<ChatTemplate> {
        let source = g.meta.get("tokenizer.chat_template")?.as_str()?.to_string();
        let tokens = strings(g, "tokenizer.ggml.tokens").ok()?;
        let name =
            |key: &str| token_id(g, key).and_then(|i| tokens.get(i as usize)).map_or("", |t| t).to_string();
        Some(ChatTemplate {
            source,
            bos_token: name("tokenizer.ggml.bos_token_id"),
            eos_token: name("tokenizer.ggml.eos_token_id"),
        })
    }

    /// The template of a Hugging Face folder: `chat_template.jinja`, else
    /// `tokenizer_config.json`'s `chat_template` (a string, or the one named `default`
    /// of a list), with that file's `bos_token` and `eos_token`.
    pub fn from_hf_dir(dir: &std::path::Path) -> Option<ChatTemplate> {
        let config: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let source =
            std::fs::read_to_string(dir.join("chat_template.jinja")).ok().or_else(|| {
                match &config["chat_template"] {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Array(a) => a
                        .iter()
                        .find(|t| t["name"] == "default")
                        .and_then(|t| t["template"].as_str())
                        .map(str::to_string),
                    _ => None,
                }
            })?;
        // A special token is a string or `{"content": …}`.
        let token = |k: &str| match &config[k] {
            serde_json::Value::String(s) => s.clone(),
            v => v["content"].as_str().unwrap_or("").to_string(),
        };
        Some(ChatTemplate { source, bos_token: token("bos_token"), eos_token: token("eos_token") })
    }

    /// The conversation `(role, content)` as the model reads it, ending with the
    /// assistant's turn opened when `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &[(String, String)],
        add_generation_prompt: bool,
    ) -> Result<String, TextError> {
        let mut env = minijinja::Environment::new();
        // As transformers compiles templates: a block tag's line break and leading
        // blanks are not output.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", &self.source).map_err(|e| TextError::Template(e.to_string()))?;
        let msgs: Vec<minijinja::Value> = messages
            .iter()
            .map(|(role, content)| minijinja::context! { role => role, content => content })
            .collect();
        env.get_template("chat")
            .and_then(|t| {
                t.render(minijinja::context! {
                    messages => msgs,
                    add_generation_prompt => add_generation_prompt,
                    bos_token => self.bos_token,
                    eos_token => self.eos_token,
                })
            })
            .map_err(|e| TextError::Template(e.to_string()))
    }
}

/// The end-of-sequence ids of a Hugging Face folder: `generation_config.json`'s
/// `eos_token_id` (a number or a list), else `config.json`'s.
pub fn hf_stop_ids(dir: &std::path::Path) -> Vec<u32> {
    let read = |f: &str| -> Option<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(dir.join(f)).ok()?).ok()
    };
    ["generation_config.json", "config.json"]
        .iter()
        .filter_map(|f| read(f))
        .map(|v| match &v["eos_token_id"] {
            serde_json::Value::Number(n) => n.as_i64().into_iter().map(|i| i as u32).collect(),
            serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_i64()).map(|i| i as u32).collect(),
            _ => Vec::new(),
        })
        .find(|ids: &Vec<u32>| !ids.is_empty())
        .unwrap_or_default()
}

/// The text side of a model: its tokenizer, chat template and end-of-sequence ids, as a
/// GGUF file or a Hugging Face folder gives them.
pub struct Text {
    pub tokenizer: Option<Tokenizer>,
    pub template: Option<ChatTemplate>,
    pub stop_ids: Vec<u32>,
    /// A GGUF file's BOS, put before a raw prompt where the file asks for it.
    bos: Option<u32>,
    /// A raw prompt gets the special tokens a `tokenizer.json` adds (a GGUF file's
    /// tokenizer adds none: `bos` stands for them).
    add_special: bool,
}

impl Text {
    /// From the GGUF file `ck` is, else from the folder `dir` (`tokenizer.json`, a chat
    /// template, `generation_config.json`); each part absent where its files are.
    pub fn of(ck: &tfc_runtime::Checkpoint, dir: Option<&std::path::Path>) -> anyhow::Result<Text> {
        if let Some(g) = ck.gguf() {
            return Ok(Text {
                tokenizer: gguf_tokenizer(g)?,
                template: ChatTemplate::from_gguf(g),
                stop_ids: gguf_stop_ids(g),
                bos: gguf_bos(g),
                add_special: false,
            });
        }
        let Some(dir) = dir else {
            return Ok(Text {
                tokenizer: None,
                template: None,
                stop_ids: vec![],
                bos: None,
                add_special: true,
            });
        };
        let path = dir.join("tokenizer.json");
        let tokenizer = match path.is_file() {
            true => Some(
                Tokenizer::from_file(&path)
                    .map_err(|e| anyhow::anyhow!("cannot load {}: {e}", path.display()))?,
            ),
            false => None,
        };
        Ok(Text {
            tokenizer,
            template: ChatTemplate::from_hf_dir(dir),
            stop_ids: hf_stop_ids(dir),
            bos: None,
            add_special: true,
        })
    }

    pub fn tokenizer(&self) -> anyhow::Result<&Tokenizer> {
        self.tokenizer
            .as_ref()
            .context("the model has no tokenizer (a GGUF file's, or a folder's tokenizer.json)")
    }

    /// A raw prompt's tokens, with what the model puts before text (its BOS).
    pub fn encode_raw(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let enc = self
            .tokenizer()?
            .encode(text, self.add_special)
            .map_err(|e| anyhow::anyhow!("cannot tokenise: {e}"))?;
        Ok(self.bos.into_iter().chain(enc.get_ids().iter().copied()).collect())
    }

    /// A conversation's tokens as the chat template writes it, the assistant's turn opened.
    pub fn encode_chat(&self, messages: &[(String, String)]) -> anyhow::Result<Vec<u32>> {
        let tpl = self.template.as_ref().context(
            "the model has no chat template (a GGUF file's `tokenizer.chat_template`, or a folder's `chat_template.jinja` or `tokenizer_config.json`)",
        )?;
        let text = tpl.render(messages, true)?;
        // The template writes its own special tokens.
        let enc = self
            .tokenizer()?
            .encode(text.as_str(), false)
            .map_err(|e| anyhow::anyhow!("cannot tokenise: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// One token's text, special or not (as log-probabilities name it).
    pub fn piece(&self, id: u32) -> String {
        self.tokenizer.as_ref().and_then(|t| t.decode(&[id], false).ok()).unwrap_or_default()
    }

    /// The text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> anyhow::Result<String> {
        self.tokenizer()?.decode(ids, true).map_err(|e| anyhow::anyhow!("cannot decode: {e}"))
    }
}

/// How many bytes at the end of `text` are the start of a stop string (held back until it
/// is clear whether the stop string follows).
pub fn pending_stop(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .flat_map(|s| (1..s.len()).filter(move |&k| s.is_char_boundary(k)).map(move |k| &s[..k]))
        .filter(|p| text.ends_with(p))
        .map(str::len)
        .max()
        .unwrap_or(0)
}
