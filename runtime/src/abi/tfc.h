/* The C ABI of a tfc-compiled model library. One library holds one model. */
#ifndef TFC_MODEL_H
#define TFC_MODEL_H
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif

#define TFC_ABI_VERSION 1

/* Status codes: every entry point that can fail returns one. */
enum {
    TFC_OK = 0,
    TFC_ERR_NULL = 1,          /* a required pointer argument is NULL */
    TFC_ERR_ARG = 2,           /* a count, index or size is out of range */
    TFC_ERR_CONTEXT_FULL = 3,  /* the tokens do not fit in max_seq positions */
    TFC_ERR_TOKEN = 4,         /* a token (or token type) id is outside its table */
    TFC_ERR_UNBOUND = 5,       /* not every weight has been bound */
    TFC_ERR_NOT_EMPTY = 6,     /* prefill needs an empty cache: call tfc_reset first */
    TFC_ERR_NO_DECODE = 7,     /* the model has bidirectional attention: no decode step */
    TFC_ERR_ALLOC = 8,         /* out of memory */
    TFC_ERR_BUSY = 9,          /* another thread is in a call on the same context */
    TFC_ERR_CONTEXT = 10,      /* not a live context: destroyed already, or never created */
    TFC_ERR_MEMORY = 11        /* a context needs more memory than the process may take */
};

/* The most threads a context runs (tfc_create takes this many for a larger count). */
#define TFC_MAX_THREADS 256
/* The most slots (KV caches) one context holds. */
#define TFC_MAX_SLOTS 1024

typedef struct tfc_ctx tfc_ctx;

int32_t tfc_abi_version(void);
/* Model facts (also in the manifest). */
int32_t tfc_vocab(void);
int32_t tfc_max_seq(void);
/* Width of one output row: the vocabulary (logits) or d_model (an encoder's hidden state). */
int32_t tfc_output_width(void);
int32_t tfc_has_decode(void);
int32_t tfc_weight_count(void);
/* The checkpoint tensor name of weight `index`; NULL for a bad index. */
const char *tfc_weight_name(int32_t index);
/* The storage type and shape of weight `index`, as the manifest states them, e.g.
   "f32 [384, 64]" or "bf16 [64, 160]"; NULL for a bad index. */
const char *tfc_weight_type(int32_t index);
/* Bytes weight `index` must have (the manifest's shape and dtype). -1 for a bad index. */
int64_t tfc_weight_bytes(int32_t index);
/* 1 when this CPU runs the library's baseline x86-64 copy of its code because it lacks a
   feature of the CPU the library was built for (or TFC_CPU=baseline is set), else 0. */
int32_t tfc_uses_fallback(void);
/* How the one-row products prefetch their weight streams ahead: 1 into L1, 2 into L2
   only, 0 not at all (left to the CPU). Chosen once per process, by TFC_PREFETCH=0, 1
   or 2, else by timing the first decode step each way (1 for weights under 32 MB); -1
   before. */
int32_t tfc_streaming_prefetch(void);

/* A context owns the KV cache, scratch memory and a pool of n_threads threads
   (0: one per core; at most TFC_MAX_THREADS). NULL when out of memory.

   Threads: the functions without a context may be called from any thread at any time.
   Different contexts of one library may be used from different threads at once, each
   computing what it would alone. One context is used by one thread at a time: a call on
   a context while another thread's call on it runs returns TFC_ERR_BUSY and does
   nothing. tfc_destroy ends a context; calls with it afterwards return TFC_ERR_CONTEXT
   (tfc_position returns -1) and a second tfc_destroy does nothing, until a new context
   happens to get the same address, which no library can tell apart: do not keep a
   destroyed pointer. */
tfc_ctx *tfc_create(int32_t n_threads);
/* tfc_create with a status: TFC_OK and *ctx set; TFC_ERR_NULL for a NULL ctx;
   TFC_ERR_MEMORY when tfc_context_bytes() exceeds what the process may still take (the
   least of MemAvailable, its cgroup limits and TFC_MEMORY_LIMIT, in bytes, if set): the
   context is refused before its memory is mapped, where the kernel would otherwise
   grant it and kill the process when it is used; TFC_ERR_ALLOC when allocation fails.
   tfc_create returns NULL in both cases. */
int32_t tfc_new_context(int32_t n_threads, tfc_ctx **ctx);
/* Bytes one context allocates: the KV cache, the scratch arena and the copies of the
   weights the library re-packs when they are bound (the caller's weights are not
   counted). */
int64_t tfc_context_bytes(void);
void tfc_destroy(tfc_ctx *ctx);

/* 1 when binding weight `index` copies it into the library's own layout (a bf16 matrix
   its kernels read in tiles, an f32 one they read in panels), 0 when the library reads
   the caller's memory in place, -1 for a bad index. */
int32_t tfc_weight_repacked(int32_t index);
/* Binds weight `index`: tfc_weight_bytes(index) bytes in the manifest's layout and dtype
   (f32, 4-byte aligned, or bf16, 2-byte aligned). A weight that tfc_weight_repacked says
   is copied may be released once this returns; any other is read in place, so the
   caller owns that memory and keeps it alive (e.g. an mmap'd safetensors file) while
   the context runs. Binding an index again replaces it. */
int32_t tfc_bind_weight(tfc_ctx *ctx, int32_t index, const void *data, uint64_t nbytes);

/* Runs `n` tokens at positions 0..n (the cache must be empty) and fills the cache.
   `token_types` may be NULL (all zero). `out` receives the last row (all_rows = 0) or
   all n rows (all_rows != 0) of tfc_output_width() floats each. */
int32_t tfc_prefill(tfc_ctx *ctx, const int32_t *tokens, const int32_t *token_types, int32_t n,
                    int32_t all_rows, float *out);
/* Runs one token at the next position against the cache; `out` receives one row. */
int32_t tfc_decode(tfc_ctx *ctx, int32_t token, float *out);
/* Runs `n` more tokens at the next positions against the cache (a prompt continued: the
   next turn of a conversation) and adds them to it; the same computation as n decode
   steps, in one pass. `out` receives the last row (all_rows = 0) or all n rows. */
int32_t tfc_extend(tfc_ctx *ctx, const int32_t *tokens, int32_t n, int32_t all_rows, float *out);
/* Empties the cache. */
int32_t tfc_reset(tfc_ctx *ctx);
/* Positions held in the cache; -1 for a NULL or destroyed context. */
int32_t tfc_position(const tfc_ctx *ctx);

/* Slots: several sequences on one context, sharing its weights and scratch memory.
   A context holds one KV cache per slot, each with its own position; it starts with
   slot 0, and tfc_prefill, tfc_decode, tfc_extend, tfc_reset, tfc_rewind and
   tfc_position act on the slot chosen with tfc_use_slot (slot 0 until then), so a caller
   that never uses slots sees one cache as before. */
/* Adds an empty slot (a KV cache of tfc_context_bytes' cache part); its index in *slot.
   TFC_ERR_MEMORY when the process may not take that much more, TFC_ERR_ARG past
   TFC_MAX_SLOTS. */
int32_t tfc_add_slot(tfc_ctx *ctx, int32_t *slot);
/* Makes `slot` the one the calls above act on. */
int32_t tfc_use_slot(tfc_ctx *ctx, int32_t slot);
/* Keeps the first n positions of the chosen slot's cache (0 <= n <= tfc_position): a
   sequence that shares its first n tokens with the cached one continues from there with
   tfc_extend. Causal models only (TFC_ERR_NO_DECODE otherwise): a cached position
   depends on the tokens up to it and never on later ones. */
int32_t tfc_rewind(tfc_ctx *ctx, int32_t n);
/* One decode step for each of n distinct slots: token i at the next position of
   slots[i], its output row at out + i * tfc_output_width(). Each row is what tfc_decode
   on that slot computes. Nothing is run unless every slot has room and every token is
   in the vocabulary. */
int32_t tfc_decode_batch(tfc_ctx *ctx, int32_t n, const int32_t *slots, const int32_t *tokens, float *out);
const char *tfc_status_string(int32_t status);

#ifdef __cplusplus
}
#endif
#endif
