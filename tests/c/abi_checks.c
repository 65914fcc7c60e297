/* Misuse of the C ABI gets status codes, never a crash. Built against a library's header
   by tests/suite/backends.rs; prints "ok" and exits 0 when every check holds. */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0;
#define EXPECT(what, got, want)                                                              \
    do {                                                                                     \
        long long g_ = (long long)(got), w_ = (long long)(want);                             \
        if (g_ != w_) {                                                                      \
            fprintf(stderr, "%s: got %lld, want %lld\n", what, g_, w_);                      \
            failures++;                                                                      \
        }                                                                                    \
    } while (0)

/* ---- threads. `prefill_loop` runs prefills on one context until told to stop (or a
   bound), counting those that do not give `want`; another thread meanwhile calls into the
   same context, or runs a context of its own. ---- */
typedef struct {
    tfc_ctx *ctx;
    const int32_t *tokens;
    const float *want;
    size_t bytes;
    atomic_int *stop;
    atomic_int runs;
    int wrong, busy;
} loop_t;

static void *prefill_loop(void *p) {
    loop_t *l = p;
    float *got = malloc(l->bytes);
    for (l->runs = 0; l->runs < 200000 && !atomic_load(l->stop); l->runs++) {
        int32_t s = tfc_prefill(l->ctx, l->tokens, NULL, 4, 1, got);
        if (s == TFC_ERR_BUSY) {
            l->busy++;
            atomic_store(l->stop, 1); /* seen: the point is made */
            continue;
        }
        if (s != TFC_OK || memcmp(got, l->want, l->bytes) != 0) {
            if (!l->wrong) fprintf(stderr, "prefill in a thread: status %d (%s)\n", s, tfc_status_string(s));
            l->wrong++;
        }
        if (tfc_reset(l->ctx) == TFC_ERR_BUSY) {
            l->busy++;
            atomic_store(l->stop, 1);
        }
    }
    free(got);
    return NULL;
}

/* Binds every weight of `c` to `bufs`. */
static void bind_all(tfc_ctx *c, void **bufs) {
    for (int32_t i = 0; i < tfc_weight_count(); i++)
        EXPECT("bind", tfc_bind_weight(c, i, bufs[i], (uint64_t)tfc_weight_bytes(i)), TFC_OK);
}

/* Two contexts in two threads compute what one does alone; of two threads calling into
   one context at once, the second gets TFC_ERR_BUSY, and the call it met is unharmed. */
static void thread_checks(void **bufs, const int32_t *tokens, size_t bytes) {
    atomic_int stop = 0;
    tfc_ctx *a = tfc_create(1), *b = tfc_create(1);
    float *want = malloc(bytes);
    if (!a || !b || !want) {
        failures++;
        return;
    }
    bind_all(a, bufs);
    bind_all(b, bufs);
    EXPECT("prefill alone", tfc_prefill(a, tokens, NULL, 4, 1, want), TFC_OK);
    EXPECT("reset alone", tfc_reset(a), TFC_OK);
    loop_t la = {a, tokens, want, bytes, &stop, 0, 0, 0}, lb = {b, tokens, want, bytes, &stop, 0, 0, 0};
    pthread_t ta, tb;
    pthread_create(&ta, NULL, prefill_loop, &la);
    pthread_create(&tb, NULL, prefill_loop, &lb);
    while (atomic_load(&la.runs) < 50 || atomic_load(&lb.runs) < 50) sched_yield();
    atomic_store(&stop, 1);
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    EXPECT("two contexts at once: wrong results", la.wrong + lb.wrong, 0);
    EXPECT("two contexts at once: busy", la.busy + lb.busy, 0);

    /* Now this thread calls into `a` while the loop runs on it, until it finds it busy:
       resets, which leave the loop's next prefill as it would be anyway. */
    atomic_store(&stop, 0);
    la = (loop_t){a, tokens, want, bytes, &stop, 0, 0, 0};
    pthread_create(&ta, NULL, prefill_loop, &la);
    int refused = 0;
    /* Until one side is refused (the loop stops itself when it is) or a bound: under
       valgrind, which runs one thread at a time, that takes a thread switch inside a call. */
    for (long i = 0; i < 100000000 && !refused && !atomic_load(&stop) && atomic_load(&la.runs) < 200000; i++)
        refused = tfc_reset(a) == TFC_ERR_BUSY;
    atomic_store(&stop, 1);
    pthread_join(ta, NULL);
    /* Whichever thread came second was refused: the loop's own calls can be the ones. */
    EXPECT("a call while another thread's runs is refused", refused || la.busy > 0, 1);
    EXPECT("the first thread's results stay right", la.wrong, 0);
    tfc_destroy(a);
    tfc_destroy(b);
    free(want);
}

int main(void) {
    EXPECT("abi version", tfc_abi_version(), TFC_ABI_VERSION);
    EXPECT("position of NULL", tfc_position(NULL), -1);
    EXPECT("reset NULL", tfc_reset(NULL), TFC_ERR_NULL);
    tfc_destroy(NULL);
    EXPECT("weight name out of range", tfc_weight_name(tfc_weight_count()) == NULL, 1);
    EXPECT("weight bytes out of range", tfc_weight_bytes(-1), -1);
    EXPECT("weight repacked out of range", tfc_weight_repacked((int32_t)tfc_weight_count()), -1);

    /* A context larger than the process may take is refused before it is mapped. */
    tfc_ctx *none = (tfc_ctx *)(void *)&failures;
    EXPECT("context bytes", tfc_context_bytes() > 0, 1);
    EXPECT("new context, NULL out", tfc_new_context(1, NULL), TFC_ERR_NULL);
    setenv("TFC_MEMORY_LIMIT", "4096", 1);
    EXPECT("new context past the memory limit", tfc_new_context(1, &none), TFC_ERR_MEMORY);
    EXPECT("it sets no context", none == NULL, 1);
    EXPECT("create past the memory limit", tfc_create(1) == NULL, 1);
    unsetenv("TFC_MEMORY_LIMIT");

    tfc_ctx *ctx = NULL;
    EXPECT("new context", tfc_new_context(2, &ctx), TFC_OK);
    if (!ctx) return 1;
    float *out = calloc((size_t)tfc_output_width() * 4, sizeof(float));
    int32_t tokens[4] = {1, 2, 3, 4};
    EXPECT("prefill before binding", tfc_prefill(ctx, tokens, NULL, 4, 0, out), TFC_ERR_UNBOUND);
    EXPECT("prefetch not chosen before a decode step", tfc_streaming_prefetch(), -1);
    EXPECT("decode before binding", tfc_decode(ctx, 1, out), tfc_has_decode() ? TFC_ERR_UNBOUND : TFC_ERR_NO_DECODE);
    EXPECT("extend before binding", tfc_extend(ctx, tokens, 4, 0, out),
           tfc_has_decode() ? TFC_ERR_UNBOUND : TFC_ERR_NO_DECODE);

    int64_t n = tfc_weight_count();
    void **bufs = calloc((size_t)n, sizeof(void *));
    for (int32_t i = 0; i < n; i++) {
        int64_t bytes = tfc_weight_bytes(i);
        bufs[i] = calloc((size_t)bytes + 4, 1);
        /* Small finite values in every dtype: 2^-7 as bf16, about that as f32 (and q8). */
        for (int64_t b = 0; b + 1 < bytes; b += 2) memcpy((char *)bufs[i] + b, &(uint16_t){0x3c00}, 2);
        EXPECT("bind NULL", tfc_bind_weight(ctx, i, NULL, (uint64_t)bytes), TFC_ERR_NULL);
        EXPECT("bind wrong size", tfc_bind_weight(ctx, i, bufs[i], (uint64_t)bytes + 4), TFC_ERR_ARG);
        EXPECT("bind misaligned", tfc_bind_weight(ctx, i, (char *)bufs[i] + 1, (uint64_t)bytes), TFC_ERR_ARG);
        EXPECT("bind", tfc_bind_weight(ctx, i, bufs[i], (uint64_t)bytes), TFC_OK);
    }
    EXPECT("bind index out of range", tfc_bind_weight(ctx, (int32_t)n, bufs[0], 4), TFC_ERR_ARG);
    EXPECT("bind NULL context", tfc_bind_weight(NULL, 0, bufs[0], 4), TFC_ERR_NULL);

    EXPECT("prefill NULL tokens", tfc_prefill(ctx, NULL, NULL, 4, 0, out), TFC_ERR_NULL);
    EXPECT("prefill NULL out", tfc_prefill(ctx, tokens, NULL, 4, 0, NULL), TFC_ERR_NULL);
    EXPECT("prefill n = 0", tfc_prefill(ctx, tokens, NULL, 0, 0, out), TFC_ERR_ARG);
    EXPECT("prefill n < 0", tfc_prefill(ctx, tokens, NULL, -3, 0, out), TFC_ERR_ARG);
    EXPECT("prefill past max_seq", tfc_prefill(ctx, tokens, NULL, tfc_max_seq() + 1, 0, out), TFC_ERR_CONTEXT_FULL);
    int32_t bad[4] = {1, tfc_vocab(), 3, 4};
    EXPECT("prefill bad token", tfc_prefill(ctx, bad, NULL, 4, 0, out), TFC_ERR_TOKEN);
    int32_t types[4] = {0, 0, 99999, 0};
    EXPECT("prefill bad token type", tfc_prefill(ctx, tokens, types, 4, 0, out), TFC_ERR_TOKEN);
    EXPECT("prefill", tfc_prefill(ctx, tokens, NULL, 4, 1, out), TFC_OK);
    /* A re-packed weight is the library's copy: the caller's buffer may go. */
    size_t out_bytes = (size_t)tfc_output_width() * 4 * sizeof(float);
    float *again = malloc(out_bytes);
    int repacked = 0;
    for (int32_t i = 0; i < n; i++) {
        if (tfc_weight_repacked(i) != 1) continue;
        memset(bufs[i], 0xff, (size_t)tfc_weight_bytes(i));
        free(bufs[i]);
        bufs[i] = NULL;
        repacked++;
    }
    EXPECT("reset before the second prefill", tfc_reset(ctx), TFC_OK);
    EXPECT("prefill after releasing re-packed weights", tfc_prefill(ctx, tokens, NULL, 4, 1, again), TFC_OK);
    EXPECT("the same rows", memcmp(out, again, out_bytes), 0);
    const char *want_repacked = getenv("TFC_TEST_REPACKED");
    if (want_repacked) EXPECT("weights re-packed", repacked, atoi(want_repacked));
    free(again);
    if (tfc_has_decode()) {
        EXPECT("position after prefill", tfc_position(ctx), 4);
        EXPECT("prefill on a full cache", tfc_prefill(ctx, tokens, NULL, 4, 0, out), TFC_ERR_NOT_EMPTY);
        EXPECT("decode bad token", tfc_decode(ctx, -1, out), TFC_ERR_TOKEN);
        EXPECT("decode NULL out", tfc_decode(ctx, 1, NULL), TFC_ERR_NULL);
        EXPECT("decode", tfc_decode(ctx, 1, out), TFC_OK);
        EXPECT("position after decode", tfc_position(ctx), 5);
        EXPECT("extend NULL tokens", tfc_extend(ctx, NULL, 2, 0, out), TFC_ERR_NULL);
        EXPECT("extend NULL out", tfc_extend(ctx, tokens, 2, 0, NULL), TFC_ERR_NULL);
        EXPECT("extend n = 0", tfc_extend(ctx, tokens, 0, 0, out), TFC_ERR_ARG);
        EXPECT("extend n < 0", tfc_extend(ctx, tokens, -1, 0, out), TFC_ERR_ARG);
        EXPECT("extend bad token", tfc_extend(ctx, bad, 4, 0, out), TFC_ERR_TOKEN);
        EXPECT("extend past max_seq", tfc_extend(ctx, tokens, tfc_max_seq() - 4, 0, out), TFC_ERR_CONTEXT_FULL);
        EXPECT("position after refused extends", tfc_position(ctx), 5);
        EXPECT("extend", tfc_extend(ctx, tokens, 4, 1, out), TFC_OK);
        EXPECT("position after extend", tfc_position(ctx), 9);
        EXPECT("reset", tfc_reset(ctx), TFC_OK);
        EXPECT("position after reset", tfc_position(ctx), 0);
        /* Slots: misuse is refused and changes nothing. */
        int32_t slot = 7, pair[2] = {0, 0}, two[2] = {1, 1};
        EXPECT("add_slot NULL", tfc_add_slot(ctx, NULL), TFC_ERR_NULL);
        EXPECT("add_slot", tfc_add_slot(ctx, &slot), TFC_OK);
        EXPECT("the new slot's index", slot, 1);
        EXPECT("use_slot -1", tfc_use_slot(ctx, -1), TFC_ERR_ARG);
        EXPECT("use_slot past the slots", tfc_use_slot(ctx, 2), TFC_ERR_ARG);
        EXPECT("prefill slot 0", tfc_prefill(ctx, tokens, NULL, 4, 0, out), TFC_OK);
        EXPECT("use_slot 1", tfc_use_slot(ctx, 1), TFC_OK);
        EXPECT("slot 1 is empty", tfc_position(ctx), 0);
        EXPECT("rewind an empty slot past its end", tfc_rewind(ctx, 1), TFC_ERR_ARG);
        EXPECT("prefill slot 1", tfc_prefill(ctx, tokens, NULL, 2, 0, out), TFC_OK);
        EXPECT("rewind < 0", tfc_rewind(ctx, -1), TFC_ERR_ARG);
        EXPECT("rewind", tfc_rewind(ctx, 1), TFC_OK);
        EXPECT("position after rewind", tfc_position(ctx), 1);
        EXPECT("decode_batch NULL", tfc_decode_batch(ctx, 2, NULL, two, out), TFC_ERR_NULL);
        EXPECT("decode_batch one slot twice", tfc_decode_batch(ctx, 2, pair, two, out), TFC_ERR_ARG);
        pair[1] = 1;
        EXPECT("decode_batch n = 0", tfc_decode_batch(ctx, 0, pair, two, out), TFC_ERR_ARG);
        EXPECT("decode_batch bad token", tfc_decode_batch(ctx, 2, pair, bad, out), TFC_ERR_TOKEN);
        EXPECT("position after refused batches", tfc_position(ctx), 1);
        float *rows = malloc((size_t)tfc_output_width() * 2 * sizeof(float));
        EXPECT("decode_batch", tfc_decode_batch(ctx, 2, pair, two, rows), TFC_OK);
        free(rows);
        EXPECT("slot 1 after the batch", tfc_position(ctx), 2);
        EXPECT("use_slot 0", tfc_use_slot(ctx, 0), TFC_OK);
        EXPECT("slot 0 after the batch", tfc_position(ctx), 5);
        EXPECT("reset slot 0", tfc_reset(ctx), TFC_OK);
    } else {
        int32_t slot;
        EXPECT("rewind on an encoder", tfc_rewind(ctx, 0), TFC_ERR_NO_DECODE);
        EXPECT("add_slot on an encoder", tfc_add_slot(ctx, &slot), TFC_OK);
        EXPECT("decode on an encoder", tfc_decode(ctx, 1, out), TFC_ERR_NO_DECODE);
        EXPECT("extend on an encoder", tfc_extend(ctx, tokens, 2, 0, out), TFC_ERR_NO_DECODE);
    }
    EXPECT("status string", tfc_status_string(12345)[0] != 0, 1);
    const char *cpu = getenv("TFC_CPU");
    EXPECT("fallback code forced by TFC_CPU=baseline", tfc_uses_fallback(), cpu && strcmp(cpu, "baseline") == 0);
    /* Chosen at the first decode step; these models' weights are under 32 MB, so
       prefetched into L1, unless TFC_PREFETCH says otherwise. */
    const char *prefetch = getenv("TFC_PREFETCH");
    EXPECT("streaming prefetch", tfc_streaming_prefetch(),
           tfc_has_decode() ? (prefetch ? atoi(prefetch) : 1) : -1);
    /* Contexts in threads (the re-packed buffers are gone: bind them again). */
    for (int32_t i = 0; i < n; i++) {
        if (bufs[i]) continue;
        int64_t bytes = tfc_weight_bytes(i);
        bufs[i] = calloc((size_t)bytes + 4, 1);
        for (int64_t b = 0; b + 1 < bytes; b += 2) memcpy((char *)bufs[i] + b, &(uint16_t){0x3c00}, 2);
    }
    thread_checks(bufs, tokens, out_bytes);

    tfc_destroy(ctx);
    /* A destroyed context is recognised, not used. */
    tfc_destroy(ctx);
    EXPECT("reset after destroy", tfc_reset(ctx), TFC_ERR_CONTEXT);
    EXPECT("position after destroy", tfc_position(ctx), -1);
    EXPECT("prefill after destroy", tfc_prefill(ctx, tokens, NULL, 4, 0, out), TFC_ERR_CONTEXT);
    EXPECT("decode after destroy", tfc_decode(ctx, 1, out), TFC_ERR_CONTEXT);
    EXPECT("bind after destroy", tfc_bind_weight(ctx, 0, bufs[0], (uint64_t)tfc_weight_bytes(0)), TFC_ERR_CONTEXT);
    tfc_ctx *never = (tfc_ctx *)(void *)&failures;
    EXPECT("a pointer that is no context", tfc_reset(never), TFC_ERR_CONTEXT);
    for (int32_t i = 0; i < n; i++) free(bufs[i]);
    free(bufs);
    free(out);
    if (failures) return 1;
    printf("ok\n");
    return 0;
}
