//! Generation with the reference interpreter: prefill a prompt, then decode one token at
//! a time through a KV cache that this session owns, exactly as a runtime would.

use std::collections::HashMap;

use super::{run, Inputs, InterpError, Tensor, Weights};
use crate::ir::{CacheKind, Graph, Output};
use crate::Compiled;

pub struct Session<'a> {
    compiled: &'a Compiled,
    weights: &'a Weights,
    cache: HashMap<(u32, CacheKind), Tensor>,
    /// Positions held in the cache.
    pub pos: usize,
}

impl<'a> Session<'a> {
    pub fn new(compiled: &'a Compiled, weights: &'a Weights) -> Self {
        Session { compiled, weights, cache: HashMap::new(), pos: 0 }
    }

    fn check_room(&self, n: usize) -> Result<(), InterpError> {
        let max = self.compiled.spec.sizes.max_seq;
        if self.pos + n > max {
            return Err(InterpError::Input(format!(
                "{} positions exceed the model's max_seq of {max}",
                self.pos + n
            )));
        }
        Ok(())
    }

    fn check_vocab(&self, tokens: &[i64]) -> Result<(), InterpError> {
        let v = self.compiled.spec.sizes.vocab as i64;
        match tokens.iter().find(|&&t| t < 0 || t >= v) {
            Some(t) => Err(InterpError::Input(format!("token id {t} is outside the vocabulary 0..{v}"))),
            None => Ok(()),
        }
    }

    /// Runs the prefill graph on a prompt (the cache must be empty); returns its main
    /// output (`logits` or, for an encoder, `hidden`) of the last position, or with
    /// `all_rows` of every position.
    pub fn prefill(
        &mut self,
        tokens: &[i64],
        token_types: &[i64],
        all_rows: bool,
    ) -> Result<Tensor, InterpError> {
        if self.pos != 0 {
            return Err(InterpError::Input("prefill needs an empty cache; reset the session first".into()));
        }
        self.check_vocab(tokens)?;
        self.check_room(tokens.len())?;
        let inputs =
            Inputs { tokens: tokens.to_vec(), token_types: token_types.to_vec(), cache: HashMap::new() };
        let c = self.compiled;
        let graph = if all_rows { &c.prefill_all } else { &c.prefill };
        let mut out = run(graph, self.weights, &inputs)?;
        self.take_cache(graph, &mut out, false);
        self.pos = tokens.len();
        main_output(out)
    }

    /// Runs the decode graph for one token at the next position; returns `[1, vocab]`.
    pub fn decode(&mut self, token: i64) -> Result<Tensor, InterpError> {
        let c = self.compiled;
        let graph = c.decode.as_ref().ok_or_else(|| {
            InterpError::Input("this model has bidirectional attention and no decode step".into())
        })?;
        self.check_vocab(&[token])?;
        self.check_room(1)?;
        let inputs =
            Inputs { tokens: vec![token], token_types: vec![], cache: std::mem::take(&mut self.cache) };
        let result = run(graph, self.weights, &inputs);
        self.cache = inputs.cache;
        let mut out = result?;
        self.take_cache(graph, &mut out, true);
        self.pos += 1;
        main_output(out)
    }

    /// Runs the extend graph for `tokens` at the positions after the cache's; returns the
    /// main output of the last new position, or with `all_rows` of every one.
    pub fn extend(&mut self, tokens: &[i64], all_rows: bool) -> Result<Tensor, InterpError> {
        let c = self.compiled;
        let graph = if all_rows { c.extend_all.as_ref() } else { c.extend.as_ref() };
        let graph = graph.ok_or_else(|| {
            InterpError::Input("this model has bidirectional attention and no cache to extend".into())
        })?;
        if tokens.is_empty() {
            return Err(InterpError::Input("no tokens to extend the cache with".into()));
        }
        self.check_vocab(tokens)?;
        self.check_room(tokens.len())?;
        let inputs =
            Inputs { tokens: tokens.to_vec(), token_types: vec![], cache: std::mem::take(&mut self.cache) };
        let result = run(graph, self.weights, &inputs);
        self.cache = inputs.cache;
        let mut out = result?;
        self.take_cache(graph, &mut out, true);
        self.pos += tokens.len();
        main_output(out)
    }

    pub fn reset(&mut self) {
        self.cache.clear();
        self.pos = 0;
    }

    /// Moves the cache outputs of `graph` into the cache, appending when decoding.
    fn take_cache(&mut self, graph: &Graph, out: &mut HashMap<String, Tensor>, append: bool) {
        for (o, _) in &graph.outputs {
            let Output::Cache { layer, kind } = *o else { continue };
            let Some(t) = out.remove(&o.name()) else { continue };
            let entry = self.cache.remove(&(layer, kind));
            let t = match (append, entry) {
                (true, Some(old)) => super::ops::concat(&old, &t, 1),
                _ => t,
            };
            self.cache.insert((layer, kind), t);
        }
    }
}

fn main_output(mut out: HashMap<String, Tensor>) -> Result<Tensor, InterpError> {
    out.remove("logits")
        .or_else(|| out.remove("hidden"))
        .ok_or_else(|| InterpError::Bug("the graph has neither `logits` nor `hidden`".into()))
}
