//! What a library's graphs share and its globals and manifest state: the sizes, the KV
//! cache's regions, the output width. Every backend (LLVM, MLIR on the CPU and the GPU)
//! reads the same layout, so a library's ABI never depends on its backend.

use std::collections::HashMap;

use crate::ir::{CacheKind, InputKind, Op, Output};
use crate::Compiled;

/// Facts the module records as globals and the manifest repeats.
#[derive(Clone, Debug)]
pub struct Layout {
    pub max_seq: usize,
    pub vocab: usize,
    pub out_width: usize,
    pub arena_bytes: u64,
    pub cache_bytes: u64,
    /// Per (layer, kind): offset in floats into the cache and `(kv_heads, head_dim)`.
    pub cache: HashMap<(u32, CacheKind), (u64, usize, usize)>,
    pub type_rows: usize,
}

/// The layout of a compiled spec's library; `arena_bytes` is left for the backend to set.
pub fn layout(c: &Compiled) -> Layout {
    let max_seq = c.spec.sizes.max_seq;
    let prefill = &c.prefill;
    let mut cache = HashMap::new();
    let mut off = 0u64;
    for (o, id) in &prefill.outputs {
        if let Output::Cache { layer, kind } = *o {
            let ty = prefill.ty(*id);
            let (groups, hd) = (ty.shape[0].as_fixed().unwrap(), ty.shape[2].as_fixed().unwrap());
            cache.insert((layer, kind), (off, groups, hd));
            off += (groups * max_seq * hd) as u64;
        }
    }
    let main = prefill.ty(prefill.main_output().1);
    let out_width = main.shape[1].as_fixed().unwrap();
    let mut type_rows = 0;
    for id in prefill.node_ids() {
        if let Op::Gather { .. } = prefill.op(id) {
            let ops = prefill.operands(id);
            if let (Op::Gather { offset }, Op::Input(InputKind::TokenTypes)) =
                (prefill.op(id), prefill.op(ops[1]))
            {
                // Type ids are checked against this at run time: id + offset must be a row.
                let rows = prefill.ty(ops[0]).shape[0].as_fixed().unwrap();
                type_rows = rows.saturating_sub(*offset);
            }
        }
    }
    Layout {
        max_seq,
        vocab: c.spec.sizes.vocab,
        out_width,
        arena_bytes: 0,
        cache_bytes: off * 4,
        cache,
        type_rows,
    }
}
