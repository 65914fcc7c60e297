//! The one definition of the ABI between a compiled model library and its users: the C
//! header, the model-independent C half of every library (argument checks, cache
//! bookkeeping, the thread pool), and the manifest written beside it. The compiler
//! embeds these; it never defines the ABI itself.

use serde::{Deserialize, Serialize};

/// The C header (`<name>.h` in an artifact).
pub const HEADER: &str = include_str!("abi/tfc.h");
/// Compiled into every library beside the generated object.
pub const SUPPORT_C: &str = include_str!("abi/support.c");
pub const ABI_VERSION: i32 = 1;

/// CPU features a library may require of the CPU it runs on; `support.c` tests each
/// with `__builtin_cpu_supports` (the names are GCC's and LLVM's alike). A library built
/// with any of them also carries a baseline x86-64 copy of its graph functions.
pub const CPU_FEATURES: &[&str] = &[
    "sse3",
    "ssse3",
    "sse4.1",
    "sse4.2",
    "popcnt",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "bmi",
    "bmi2",
    "lzcnt",
    "movbe",
    "avx512f",
    "avx512vl",
    "avx512bw",
    "avx512dq",
    "avx512cd",
    "avx512vnni",
    "avx512bf16",
    "avx512fp16",
    "avx512vbmi",
    "avx512vbmi2",
    "avx512ifma",
    "avx512bitalg",
    "avx512vpopcntdq",
    "avxvnni",
    "gfni",
    "vpclmulqdq",
    "vaes",
    "amx-tile",
    "amx-int8",
    "amx-bf16",
];

pub const OK: i32 = 0;
/// `TFC_ERR_MEMORY`: a context or slot needs more memory than the process may take.
pub const ERR_MEMORY: i32 = 11;

/// The message for a status code, as `tfc_status_string` gives it.
pub fn status_message(s: i32) -> &'static str {
    match s {
        0 => "ok",
        1 => "a required pointer argument is NULL",
        2 => "a count, index or size is out of range",
        3 => "the tokens do not fit in the model's max_seq positions",
        4 => "a token id is outside the vocabulary (or a token type outside its table)",
        5 => "not every weight has been bound",
        6 => "prefill needs an empty cache: call reset first",
        7 => "the model has bidirectional attention and no decode step",
        8 => "out of memory",
        9 => "the context is in use by another thread",
        10 => "not a live context (destroyed, or never created)",
        11 => "a context needs more memory than this process may take (tfc_context_bytes)",
        _ => "unknown status",
    }
}

/// `manifest.json`: everything a loader needs to know about a library.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub name: String,
    pub abi_version: i32,
    pub backend: String,
    pub target_cpu: String,
    /// The library file, relative to the manifest.
    pub library: String,
    pub vocab: usize,
    pub max_seq: usize,
    /// `logits` (width = vocab) or `hidden` (width = d_model, an encoder).
    pub output: String,
    pub output_width: usize,
    pub has_decode: bool,
    pub kv_cache: KvCache,
    /// The block variant each layer runs (`pattern` in the spec), where the spec names
    /// several; empty for one block.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layer_blocks: Vec<String>,
    /// In binding order: weight `i` is bound with `tfc_bind_weight(ctx, i, …)`.
    pub weights: Vec<WeightInfo>,
    /// FNV-1a 64 of the library file's bytes, hex: a loader refuses a library that does
    /// not match (truncated, or replaced by another). Empty in manifests written before
    /// it existed, which are not checked.
    #[serde(default)]
    pub library_hash: String,
    /// FNV-1a 64 of the spec text, hex.
    pub spec_hash: String,
    pub spec: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct KvCache {
    pub layout: String,
    pub bytes_per_token: usize,
    pub bytes: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct WeightInfo {
    /// The checkpoint tensor name.
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: String,
    /// The library copies this weight into its own layout when it is bound, so the
    /// caller's buffer may be released once `tfc_bind_weight` returns.
    #[serde(default)]
    pub repacked: bool,
}

/// A weight's type as a library states it (`tfc_weight_type`) and a loader compares with
/// the manifest: `f32 [384, 64]`.
pub fn weight_type(dtype: &str, shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    format!("{dtype} [{}]", dims.join(", "))
}

/// Bytes of a weight of `shape` stored as `dtype` (the manifest's names), in checked
/// arithmetic: an overflow is an error, never a small size. The compiler sizes the
/// library's weights with it too.
pub fn weight_bytes(shape: &[usize], dtype: &str) -> Result<usize, String> {
    let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("its size overflows")?;
    let bytes = match dtype {
        "f32" | "i32" => n.checked_mul(4),
        "bf16" | "f16" => n.checked_mul(2),
        "q8" if n % crate::quant::Q8_BLOCK == 0 => crate::quant::q8_bytes_checked(n),
        "q8" => return Err(format!("q8 with {n} values, not a multiple of {}", crate::quant::Q8_BLOCK)),
        q => match crate::quant::Quant::parse(q) {
            Some(q) if n % q.block().0 == 0 => q.bytes_checked(n),
            Some(q) => {
                return Err(format!("{} with {n} values, not a multiple of {}", q.name(), q.block().0))
            }
            None => {
                return Err(format!(
                    "dtype {q}; this runtime binds f32, bf16, q8 and the ggml blocks q8_0, q2_k, q3_k, q4_0, q4_1, q4_k, q5_0, q5_1, q5_k and q6_k"
                ))
            }
        },
    };
    bytes.ok_or_else(|| "its size overflows".into())
}

/// The most threads a context takes (`tfc_create` uses this many for a larger count).
pub const MAX_THREADS: usize = 256;
/// The most slots (KV caches) one context holds (`TFC_MAX_SLOTS`).
pub const MAX_SLOTS: usize = 1024;

/// FNV-1a, 64 bits: a stable hash for naming a spec.
pub fn fnv1a(text: &str) -> String {
    fnv1a_bytes(text.as_bytes())
}

/// FNV-1a, 64 bits, of any bytes, as 16 hex digits.
pub fn fnv1a_bytes(bytes: &[u8]) -> String {
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    format!("{h:016x}")
}
