/* The model-independent half of a tfc library: the C ABI's checks and bookkeeping and
   the thread pool. The generated half provides the tfc__* symbols declared below. */
#define _DEFAULT_SOURCE /* syscall(2) under -std=c11 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#endif

#include "tfc.h"

typedef void (*tfc_task)(const int64_t *args, int64_t begin, int64_t end);
typedef void (*tfc_graph)(void *arena, float *cache, const int32_t *tokens, const int32_t *types,
                          int64_t t, int64_t p, const void *const *weights, float *out, void *pool);

extern const int64_t tfc__n_weights, tfc__arena_bytes, tfc__cache_bytes, tfc__max_seq, tfc__vocab,
    tfc__out_width, tfc__has_decode, tfc__has_extend, tfc__type_rows;
extern const int64_t tfc__weight_bytes[];
/* Per weight: out, in, 1 if stored [in, out], and the layout (0: bf16 tiles, 1: f32
   panels); out = 0 for a weight bound as it is. */
extern const int64_t tfc__weight_tiles[];
extern const char *const tfc__weight_name[], *const tfc__weight_type[];
void tfc__prefill(void *, float *, const int32_t *, const int32_t *, int64_t, int64_t, const void *const *,
                  float *, void *);
void tfc__prefill_all(void *, float *, const int32_t *, const int32_t *, int64_t, int64_t,
                      const void *const *, float *, void *);
void tfc__decode(void *, float *, const int32_t *, const int32_t *, int64_t, int64_t, const void *const *,
                 float *, void *);
/* The extend graphs (more tokens after the cache), where the backend compiles them
   (tfc__has_extend); weak, so a library without them links and continues a cache by
   decode steps instead. */
__attribute__((weak)) void tfc__extend(void *, float *, const int32_t *, const int32_t *, int64_t, int64_t,
                                       const void *const *, float *, void *);
__attribute__((weak)) void tfc__extend_all(void *, float *, const int32_t *, const int32_t *, int64_t,
                                           int64_t, const void *const *, float *, void *);
/* The batched decode, where the backend compiles it: the extend graph whose T rows are
   one token of each of T slots. Its token-type argument is the row table instead, two
   int64 per row: the row's position, and where its slot's cache starts, in floats from
   the cache argument. */
__attribute__((weak)) void tfc__decode_batch(void *, float *, const int32_t *, const int32_t *, int64_t,
                                             int64_t, const void *const *, float *, void *);

/* ---- AMX. Kernels that use tiles do so only when this is nonzero: the CPU has AMX-BF16
   and Linux has granted the process the tile state (ARCH_REQ_XCOMP_PERM for
   XFEATURE_XTILEDATA); otherwise they take their AVX-512 path. TFC_AMX=0 turns them off
   (for testing that path). ---- */
__attribute__((visibility("hidden"))) int32_t tfc__amx_ok = 0;

static void enable_amx(void) {
#if defined(__linux__) && defined(__x86_64__)
    const char *want = getenv("TFC_AMX");
    if (want && strcmp(want, "0") == 0) return;
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16")) return;
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0) tfc__amx_ok = 1;
#endif
}

/* ---- bf16 pair products (`vdpbf16ps`). Where the library was built for a CPU with
   AVX512_BF16, its bf16 GEMMs of bf16 activations multiply pairs when this is nonzero;
   TFC_BF16_DOTS=0 turns them off (for testing the f32 path). The baseline copy never
   executes them, whatever this says. ---- */
__attribute__((visibility("hidden"))) int32_t tfc__bf16_ok = 1;

static void enable_bf16_dots(void) {
    const char *want = getenv("TFC_BF16_DOTS");
    if (want && strcmp(want, "0") == 0) tfc__bf16_ok = 0;
}

/* ---- which code runs. A library built for a CPU with features beyond baseline x86-64
   also carries a baseline copy of its graph functions (`tfc__<graph>__fallback`) and
   lists the features the main copy needs; the first context created checks them and
   picks a copy, so the library never executes an instruction the CPU lacks. The
   environment variable TFC_CPU=baseline forces the fallback (for testing it). ---- */
static tfc_graph run_prefill = tfc__prefill, run_prefill_all = tfc__prefill_all, run_decode = tfc__decode,
                 run_extend = tfc__extend, run_extend_all = tfc__extend_all, run_decode_batch = tfc__decode_batch;
#ifdef TFC_FALLBACK
extern const char tfc__cpu_features[];
void tfc__prefill__fallback(void *, float *, const int32_t *, const int32_t *, int64_t, int64_t,
                            const void *const *, float *, void *);
void tfc__prefill_all__fallback(void *, float *, const int32_t *, const int32_t *, int64_t, int64_t,
                                const void *const *, float *, void *);
void tfc__decode__fallback(void *, float *, const int32_t *, const int32_t *, int64_t, int64_t,
                           const void *const *, float *, void *);
__attribute__((weak)) void tfc__extend__fallback(void *, float *, const int32_t *, const int32_t *, int64_t,
                                                 int64_t, const void *const *, float *, void *);
__attribute__((weak)) void tfc__extend_all__fallback(void *, float *, const int32_t *, const int32_t *,
                                                     int64_t, int64_t, const void *const *, float *, void *);
__attribute__((weak)) void tfc__decode_batch__fallback(void *, float *, const int32_t *, const int32_t *,
                                                       int64_t, int64_t, const void *const *, float *, void *);

static int cpu_has(const char *f, size_t n) {
#define TFC_HAS(name) \
    if (n == sizeof(name) - 1 && memcmp(f, name, n) == 0) return __builtin_cpu_supports(name);
    TFC_HAS("sse3") TFC_HAS("ssse3") TFC_HAS("sse4.1") TFC_HAS("sse4.2") TFC_HAS("popcnt") TFC_HAS("avx")
    TFC_HAS("avx2") TFC_HAS("fma") TFC_HAS("f16c") TFC_HAS("bmi") TFC_HAS("bmi2") TFC_HAS("lzcnt")
    TFC_HAS("movbe") TFC_HAS("avx512f") TFC_HAS("avx512vl") TFC_HAS("avx512bw") TFC_HAS("avx512dq")
    TFC_HAS("avx512cd") TFC_HAS("avx512vnni") TFC_HAS("avx512bf16") TFC_HAS("avx512fp16")
    TFC_HAS("avx512vbmi") TFC_HAS("avx512vbmi2") TFC_HAS("avx512ifma") TFC_HAS("avx512bitalg")
    TFC_HAS("avx512vpopcntdq") TFC_HAS("avxvnni") TFC_HAS("gfni") TFC_HAS("vpclmulqdq") TFC_HAS("vaes")
    TFC_HAS("amx-tile") TFC_HAS("amx-int8") TFC_HAS("amx-bf16")
#undef TFC_HAS
    return 0; /* a feature this file cannot test: assume it is missing */
}

static void choose_code(void) {
    __builtin_cpu_init();
    enable_amx();
    enable_bf16_dots();
    const char *force = getenv("TFC_CPU");
    int ok = !(force && strcmp(force, "baseline") == 0);
    for (const char *f = tfc__cpu_features; ok && *f;) {
        size_t n = strcspn(f, ",");
        ok = cpu_has(f, n);
        f += n + (f[n] == ',');
    }
    if (!ok) {
        run_prefill = tfc__prefill__fallback;
        run_prefill_all = tfc__prefill_all__fallback;
        run_decode = tfc__decode__fallback;
        run_extend = tfc__extend__fallback;
        run_extend_all = tfc__extend_all__fallback;
        run_decode_batch = tfc__decode_batch__fallback;
    }
}
#else
static void choose_code(void) {
    __builtin_cpu_init();
    enable_amx();
    enable_bf16_dots();
}
#endif
static pthread_once_t chosen = PTHREAD_ONCE_INIT;

int32_t tfc_uses_fallback(void) {
    pthread_once(&chosen, choose_code);
    return run_decode != tfc__decode;
}

/* ---- thread pool. A kernel call publishes (fn, args, total), bumps `generation` and
   takes part itself; workers spin briefly on `generation` (a decode step is ~100 short
   calls, too short to sleep between) and only then sleep on a condition variable. The
   tasks are dealt out as one contiguous range per participant, which it claims `grain`
   tasks at a time from the front: a kernel that prefetches its next task's data (the
   GEMMs do) then fetches what this thread runs next, not what another one does. A
   participant whose range is done takes `grain` tasks at a time from the back of the
   others', so a thread that streams memory faster (or started sooner) takes more of
   them instead of waiting, without taking the task its owner is about to start. Neither
   takes more than half of what a range has left, so its last claims are single tasks.
   The caller spins until `pending` reaches zero. ---- */
#define TFC_SPIN 4000

/* One participant's tasks: front in the low 32 bits, end in the high ones, so that the
   owner and a thief claim from either end with one compare-and-swap. A cache line
   each. */
typedef struct {
    _Atomic uint64_t span;
    char pad[56];
} range_t;

typedef struct pool_s pool_t;
typedef struct {
    pool_t *pool;
    int32_t id;
} worker_t;

struct pool_s {
    pthread_t *threads;
    worker_t *workers;
    range_t *ranges;
    int32_t n;
    pthread_mutex_t mu;
    pthread_cond_t wake;
    _Atomic int64_t generation;
    _Atomic int32_t pending;
    _Atomic int32_t stop;
    tfc_task fn;
    const int64_t *args;
    int64_t base, grain;
};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static inline uint64_t span_of(int64_t front, int64_t end) {
    return (uint64_t)end << 32 | (uint64_t)front;
}

/* Claims up to `grain` tasks of range `r`, from its front (`own`) or its back: false
   when it has none left. */
static int claim(range_t *r, int64_t grain, int own, int64_t *b, int64_t *e) {
    uint64_t s = atomic_load_explicit(&r->span, memory_order_relaxed);
    for (;;) {
        int64_t front = (int64_t)(s & 0xffffffffu), end = (int64_t)(s >> 32);
        if (front >= end) return 0;
        /* At most half of what is left, so that the last claims of a range are single
           tasks and whoever finishes first waits for one task at most, not a grain. */
        int64_t half = (end - front + 1) / 2, n = grain < half ? grain : half;
        uint64_t next;
        if (own) {
            *b = front;
            *e = front + n;
            next = span_of(*e, end);
        } else {
            *e = end;
            *b = end - n;
            next = span_of(front, *b);
        }
        if (atomic_compare_exchange_weak_explicit(&r->span, &s, next, memory_order_relaxed,
                                                  memory_order_relaxed))
            return 1;
    }
}

static void run_claims(pool_t *pool, int32_t self) {
    int64_t b, e;
    for (int32_t k = 0; k < pool->n; k++) {
        range_t *r = &pool->ranges[(self + k) % pool->n];
        while (claim(r, pool->grain, k == 0, &b, &e)) pool->fn(pool->args, pool->base + b, pool->base + e);
    }
}

static void *worker_main(void *p) {
    worker_t *w = p;
    pool_t *pool = w->pool;
    int64_t seen = 0;
    for (;;) {
        int64_t g = atomic_load_explicit(&pool->generation, memory_order_acquire);
        for (int i = 0; g == seen && i < TFC_SPIN; i++) {
            cpu_relax();
            g = atomic_load_explicit(&pool->generation, memory_order_acquire);
        }
        if (g == seen) {
            pthread_mutex_lock(&pool->mu);
            while ((g = atomic_load(&pool->generation)) == seen && !atomic_load(&pool->stop))
                pthread_cond_wait(&pool->wake, &pool->mu);
            pthread_mutex_unlock(&pool->mu);
        }
        if (atomic_load(&pool->stop)) return NULL;
        seen = g;
        run_claims(pool, w->id);
        atomic_fetch_sub_explicit(&pool->pending, 1, memory_order_acq_rel);
    }
}

/* Tasks base .. base + total (total < 2³¹, as the ranges hold 32 bits) on every participant. */
static void parallel_part(pool_t *pool, tfc_task fn, const int64_t *args, int64_t base, int64_t total) {
    pool->fn = fn;
    pool->args = args;
    pool->base = base;
    /* About eight claims per thread, few enough that claiming costs nothing, and fewer
       tasks a claim towards the end of a range (`claim`): with whole grains to the end,
       the caller of a decode step waited ~5 µs a call (a grain of W1's down projection
       streams for ~20), halving toward single tasks made f32 decode ×1.05 faster. */
    pool->grain = (total + 8 * pool->n - 1) / (8 * pool->n);
    for (int32_t i = 0; i < pool->n; i++)
        atomic_store_explicit(&pool->ranges[i].span, span_of(total * i / pool->n, total * (i + 1) / pool->n),
                              memory_order_relaxed);
    atomic_store_explicit(&pool->pending, pool->n - 1, memory_order_relaxed);
    pthread_mutex_lock(&pool->mu);
    atomic_fetch_add_explicit(&pool->generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mu);
    run_claims(pool, 0);
    while (atomic_load_explicit(&pool->pending, memory_order_acquire) > 0) cpu_relax();
}

__attribute__((visibility("hidden"))) void tfc__parallel_for(void *p, tfc_task fn, const int64_t *args,
                                                       int64_t total) {
    pool_t *pool = p;
    if (total <= 0) return;
    if (pool->n <= 1 || total == 1) {
        fn(args, 0, total);
        return;
    }
    const int64_t most = INT32_MAX;
    for (int64_t base = 0; base < total; base += most)
        parallel_part(pool, fn, args, base, total - base < most ? total - base : most);
}

static void pool_free(pool_t *pool) {
    free(pool->threads);
    free(pool->workers);
    free(pool->ranges);
    free(pool);
}

static pool_t *pool_create(int32_t n) {
    pool_t *pool = calloc(1, sizeof *pool);
    if (!pool) return NULL;
    pool->n = n;
    pthread_mutex_init(&pool->mu, NULL);
    pthread_cond_init(&pool->wake, NULL);
    pool->threads = calloc((size_t)n, sizeof(pthread_t));
    pool->workers = calloc((size_t)n, sizeof(worker_t));
    pool->ranges = aligned_alloc(64, (size_t)n * sizeof(range_t));
    if (!pool->threads || !pool->workers || !pool->ranges) {
        pool_free(pool);
        return NULL;
    }
    for (int32_t i = 1; i < n; i++) {
        pool->workers[i] = (worker_t){pool, i};
        if (pthread_create(&pool->threads[i], NULL, worker_main, &pool->workers[i]) != 0) {
            pool->n = i;
            break;
        }
    }
    return pool;
}

static void pool_destroy(pool_t *pool) {
    pthread_mutex_lock(&pool->mu);
    atomic_store(&pool->stop, 1);
    atomic_fetch_add(&pool->generation, 1);
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mu);
    for (int32_t i = 1; i < pool->n; i++) pthread_join(pool->threads[i], NULL);
    pthread_cond_destroy(&pool->wake);
    pthread_mutex_destroy(&pool->mu);
    pool_free(pool);
}

/* ---- the ABI ---- */
/* One sequence's KV cache and the positions it holds. */
typedef struct {
    float *cache;
    int64_t pos;
} slot_t;

struct tfc_ctx {
    void *arena;
    slot_t *slots; /* slot 0 from tfc_create, more from tfc_add_slot */
    int32_t n_slots, cur; /* the calls without a slot argument act on slots[cur] */
    const void **weights;
    void **owned; /* per weight: the library's re-packed copy, or NULL */
    int32_t *zeros; /* token types when none are given */
    int64_t unbound;
    pool_t *pool;
    tfc_ctx *next_live; /* the registry of live contexts */
    _Atomic int32_t busy; /* a call is running on this context */
};

/* ---- misuse that is cheap to detect. Every context is in a registry from tfc_create
   to tfc_destroy, so a call with a destroyed (or never created) pointer gets
   TFC_ERR_CONTEXT instead of touching freed memory, and a second tfc_destroy does
   nothing. A call marks its context busy, so a second thread calling into the same
   context at once gets TFC_ERR_BUSY instead of racing on its cache and arena. The
   registry costs one uncontended lock per call, against the microseconds to
   milliseconds a call runs. (A pointer to a destroyed context whose memory a new context
   reuses looks live again: the registry cannot tell them apart.) ---- */
static pthread_mutex_t live_mu = PTHREAD_MUTEX_INITIALIZER;
static tfc_ctx *live_head = NULL;

static int is_live_locked(const tfc_ctx *c) {
    for (const tfc_ctx *p = live_head; p; p = p->next_live)
        if (p == c) return 1;
    return 0;
}

/* Starts a call on `c`: TFC_OK (and `c` busy until leave), or why not. */
static int32_t enter(tfc_ctx *c) {
    if (!c) return TFC_ERR_NULL;
    pthread_mutex_lock(&live_mu);
    int32_t s = !is_live_locked(c) ? TFC_ERR_CONTEXT : atomic_exchange(&c->busy, 1) ? TFC_ERR_BUSY : TFC_OK;
    pthread_mutex_unlock(&live_mu);
    return s;
}

static int32_t leave(tfc_ctx *c, int32_t status) {
    atomic_store_explicit(&c->busy, 0, memory_order_release);
    return status;
}

int32_t tfc_abi_version(void) { return TFC_ABI_VERSION; }
int32_t tfc_vocab(void) { return (int32_t)tfc__vocab; }
int32_t tfc_max_seq(void) { return (int32_t)tfc__max_seq; }
int32_t tfc_output_width(void) { return (int32_t)tfc__out_width; }
int32_t tfc_has_decode(void) { return (int32_t)tfc__has_decode; }
int32_t tfc_weight_count(void) { return (int32_t)tfc__n_weights; }
const char *tfc_weight_name(int32_t index) {
    return index < 0 || index >= tfc__n_weights ? NULL : tfc__weight_name[index];
}
const char *tfc_weight_type(int32_t index) {
    return index < 0 || index >= tfc__n_weights ? NULL : tfc__weight_type[index];
}
int64_t tfc_weight_bytes(int32_t index) {
    return index < 0 || index >= tfc__n_weights ? -1 : tfc__weight_bytes[index];
}
int32_t tfc_weight_repacked(int32_t index) {
    return index < 0 || index >= tfc__n_weights ? -1 : tfc__weight_tiles[4 * (int64_t)index] != 0;
}

/* ---- big buffers: the arena, the KV cache and re-packed weights. Each is its own anonymous
   mapping, aligned to 2 MB and offered to the kernel for 2 MB pages: a decode step streams
   through hundreds of MB, and with 4 KB pages the TLB misses cost ~7% of the bandwidth. ---- */
#define BIG_ALIGN ((size_t)2 << 20)
static size_t big_size(size_t bytes) { return (bytes + BIG_ALIGN - 1) / BIG_ALIGN * BIG_ALIGN; }

static void *big_alloc(size_t bytes) {
    const size_t n = big_size(bytes ? bytes : 1);
    char *p = mmap(NULL, n + BIG_ALIGN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
    /* Keep the aligned n bytes and give back the head and tail around them. */
    const size_t head = (BIG_ALIGN - (uintptr_t)p % BIG_ALIGN) % BIG_ALIGN;
    if (head) munmap(p, head);
    munmap(p + head + n, BIG_ALIGN - head);
#ifdef MADV_HUGEPAGE
    madvise(p + head, n, MADV_HUGEPAGE); /* advice only: without it, 4 KB pages */
#endif
    return p + head;
}

static void big_free(void *p, size_t bytes) {
    if (p) munmap(p, big_size(bytes ? bytes : 1));
}

/* ---- memory. What a context maps, and what the process may still take: the least of
   MemAvailable, the cgroup v2 limits of its cgroup and each parent (memory.max -
   memory.current), the v1 limit, and TFC_MEMORY_LIMIT. The runtime crate reads the same
   (runtime/src/memory.rs). Mapped memory is granted lazily, so without this check a
   context too large for the machine is created and the process is killed when it is
   used. ---- */
int64_t tfc_context_bytes(void) {
    int64_t total = 0;
    const int64_t parts[] = {big_size((size_t)tfc__arena_bytes + 64), big_size((size_t)tfc__cache_bytes + 64),
                             (tfc__n_weights + 1) * (int64_t)(2 * sizeof(void *)),
                             (tfc__max_seq + 1) * (int64_t)sizeof(int32_t)};
    for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++)
        if (__builtin_add_overflow(total, parts[i], &total)) return INT64_MAX;
    for (int64_t i = 0; i < tfc__n_weights; i++)
        if (tfc__weight_tiles[4 * i] != 0 && __builtin_add_overflow(total, (int64_t)big_size((size_t)tfc__weight_bytes[i]), &total))
            return INT64_MAX;
    return total;
}

static uint64_t read_number(const char *path) {
    FILE *f = fopen(path, "r");
    unsigned long long v = UINT64_MAX;
    if (f) {
        if (fscanf(f, "%llu", &v) != 1) v = UINT64_MAX; /* "max": no limit */
        fclose(f);
    }
    return v;
}

static uint64_t least(uint64_t a, uint64_t b) { return a < b ? a : b; }

static uint64_t available_memory(void) {
    uint64_t room = UINT64_MAX;
    FILE *f = fopen("/proc/meminfo", "r");
    if (f) {
        char line[256];
        unsigned long long kb;
        while (fgets(line, sizeof line, f))
            if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1 && kb < UINT64_MAX / 1024) room = least(room, kb * 1024);
        fclose(f);
    }
    f = fopen("/proc/self/cgroup", "r");
    if (f) {
        char line[4096];
        while (fgets(line, sizeof line, f)) {
            line[strcspn(line, "\n")] = 0;
            char *c1 = strchr(line, ':'), *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
            if (!c2) continue;
            char dir[4352], a[4400], b[4400];
            if (c2 == c1 + 1) { /* v2: this cgroup and its parents */
                snprintf(dir, sizeof dir, "/sys/fs/cgroup%s", strcmp(c2 + 1, "/") == 0 ? "" : c2 + 1);
                for (;;) {
                    snprintf(a, sizeof a, "%s/memory.max", dir);
                    snprintf(b, sizeof b, "%s/memory.current", dir);
                    uint64_t max = read_number(a), cur = read_number(b);
                    if (max != UINT64_MAX && cur != UINT64_MAX) room = least(room, max > cur ? max - cur : 0);
                    char *slash = strrchr(dir, '/');
                    if (!slash || strlen(dir) <= strlen("/sys/fs/cgroup")) break;
                    *slash = 0;
                }
            } else if (strstr(c1, "memory")) { /* v1 */
                snprintf(dir, sizeof dir, "/sys/fs/cgroup/memory%s", strcmp(c2 + 1, "/") == 0 ? "" : c2 + 1);
                snprintf(a, sizeof a, "%s/memory.limit_in_bytes", dir);
                snprintf(b, sizeof b, "%s/memory.usage_in_bytes", dir);
                uint64_t max = read_number(a), cur = read_number(b);
                if (max < (1ull << 62) && cur != UINT64_MAX) room = least(room, max > cur ? max - cur : 0);
            }
        }
        fclose(f);
    }
    const char *limit = getenv("TFC_MEMORY_LIMIT");
    if (limit && *limit) {
        char *end;
        unsigned long long v = strtoull(limit, &end, 10);
        if (*end == 0) room = least(room, v);
    }
    return room;
}

tfc_ctx *tfc_create(int32_t n_threads) {
    tfc_ctx *c = NULL;
    return tfc_new_context(n_threads, &c) == TFC_OK ? c : NULL;
}

int32_t tfc_new_context(int32_t n_threads, tfc_ctx **out) {
    if (!out) return TFC_ERR_NULL;
    *out = NULL;
    pthread_once(&chosen, choose_code);
    if ((uint64_t)tfc_context_bytes() > available_memory()) return TFC_ERR_MEMORY;
    if (n_threads <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = n > 0 ? (n < TFC_MAX_THREADS ? (int32_t)n : TFC_MAX_THREADS) : 1;
    }
    if (n_threads > TFC_MAX_THREADS) n_threads = TFC_MAX_THREADS;
    tfc_ctx *c = calloc(1, sizeof *c);
    if (!c) return TFC_ERR_ALLOC;
    c->arena = big_alloc((size_t)tfc__arena_bytes + 64);
    c->slots = calloc(1, sizeof *c->slots);
    if (c->slots) c->slots[0].cache = big_alloc((size_t)tfc__cache_bytes + 64);
    c->n_slots = 1;
    c->weights = calloc((size_t)tfc__n_weights + 1, sizeof(void *));
    c->owned = calloc((size_t)tfc__n_weights + 1, sizeof(void *));
    c->zeros = calloc((size_t)tfc__max_seq + 1, sizeof(int32_t));
    c->pool = pool_create(n_threads);
    c->unbound = tfc__n_weights;
    if (!c->arena || !c->slots || !c->slots[0].cache || !c->weights || !c->owned || !c->zeros || !c->pool) {
        if (c->pool) pool_destroy(c->pool);
        big_free(c->arena, (size_t)tfc__arena_bytes + 64);
        if (c->slots) big_free(c->slots[0].cache, (size_t)tfc__cache_bytes + 64);
        free(c->slots);
        free(c->weights);
        free(c->owned);
        free(c->zeros);
        free(c);
        return TFC_ERR_ALLOC;
    }
    pthread_mutex_lock(&live_mu);
    c->next_live = live_head;
    live_head = c;
    pthread_mutex_unlock(&live_mu);
    *out = c;
    return TFC_OK;
}

void tfc_destroy(tfc_ctx *c) {
    if (!c) return;
    pthread_mutex_lock(&live_mu);
    tfc_ctx **at = &live_head;
    while (*at && *at != c) at = &(*at)->next_live;
    const int found = *at != NULL;
    if (found) *at = c->next_live;
    pthread_mutex_unlock(&live_mu);
    if (!found) return; /* destroyed already, or never created */
    /* No call can start on it now; one another thread is running still ends first. */
    while (atomic_load_explicit(&c->busy, memory_order_acquire)) cpu_relax();
    pool_destroy(c->pool);
    big_free(c->arena, (size_t)tfc__arena_bytes + 64);
    for (int32_t i = 0; i < c->n_slots; i++) big_free(c->slots[i].cache, (size_t)tfc__cache_bytes + 64);
    free(c->slots);
    free(c->weights);
    for (int64_t i = 0; i < tfc__n_weights; i++) big_free(c->owned[i], (size_t)tfc__weight_bytes[i]);
    free(c->owned);
    free(c->zeros);
    free(c);
}

/* ---- re-packing (tfc__weight_tiles), at bind time, one task per block of outputs. A bf16
   matrix the kernels read in tiles is copied as W [out, in] (an [in, out] one transposed)
   in blocks of 16 outputs, each block in/32 tiles of 16 outputs x 32 inputs, row-major.
   An f32 matrix the kernels read in panels is copied in blocks of 64 outputs, each block
   [in, 64] row-major. ---- */
typedef struct {
    const uint16_t *src;
    uint16_t *dst;
    int64_t out, inn, transposed;
} repack_t;

static void repack_blocks(const int64_t *args, int64_t begin, int64_t end) {
    const repack_t *r = (const repack_t *)(const void *)args;
    const int64_t inn = r->inn, out = r->out;
    for (int64_t ob = begin; ob < end; ob++) {
        uint16_t *d = r->dst + ob * 16 * inn;
        for (int64_t k = 0; k < inn / 32; k++, d += 16 * 32) {
            if (!r->transposed) {
                for (int64_t o = 0; o < 16; o++) memcpy(d + o * 32, r->src + (ob * 16 + o) * inn + k * 32, 64);
            } else {
                for (int64_t i = 0; i < 32; i++) {
                    const uint16_t *s = r->src + (k * 32 + i) * out + ob * 16;
                    for (int64_t o = 0; o < 16; o++) d[o * 32 + i] = s[o];
                }
            }
        }
    }
}

#define PANEL 64
static void repack_panels(const int64_t *args, int64_t begin, int64_t end) {
    const repack_t *r = (const repack_t *)(const void *)args;
    const float *src = (const float *)(const void *)r->src;
    float *dst = (float *)(void *)r->dst;
    const int64_t inn = r->inn, out = r->out;
    for (int64_t ob = begin; ob < end; ob++) {
        float *d = dst + ob * PANEL * inn;
        if (r->transposed) {
            for (int64_t k = 0; k < inn; k++) memcpy(d + k * PANEL, src + k * out + ob * PANEL, PANEL * 4);
            continue;
        }
        /* W [out, in]: a transpose, 16 inputs of the block's 64 rows at a time. */
        for (int64_t k0 = 0; k0 < inn; k0 += 16) {
            const int64_t kn = inn - k0 < 16 ? inn - k0 : 16;
            for (int64_t o = 0; o < PANEL; o++) {
                const float *s = src + (ob * PANEL + o) * inn + k0;
                for (int64_t k = 0; k < kn; k++) d[(k0 + k) * PANEL + o] = s[k];
            }
        }
    }
}

static int32_t bind_weight(tfc_ctx *c, int32_t index, const void *data, uint64_t nbytes);

int32_t tfc_bind_weight(tfc_ctx *c, int32_t index, const void *data, uint64_t nbytes) {
    int32_t s = enter(c);
    return s != TFC_OK ? s : leave(c, bind_weight(c, index, data, nbytes));
}

static int32_t bind_weight(tfc_ctx *c, int32_t index, const void *data, uint64_t nbytes) {
    if (!data) return TFC_ERR_NULL;
    if (index < 0 || index >= tfc__n_weights) return TFC_ERR_ARG;
    if (nbytes != (uint64_t)tfc__weight_bytes[index] || ((uintptr_t)data & 1) != 0) return TFC_ERR_ARG;
    const int64_t *tiles = &tfc__weight_tiles[4 * (int64_t)index];
    if (tiles[0] != 0) {
        if (tiles[3] && ((uintptr_t)data & 3) != 0) return TFC_ERR_ARG;
        uint16_t *copy = c->owned[index];
        if (!copy && !(copy = big_alloc((size_t)nbytes))) return TFC_ERR_ALLOC;
        c->owned[index] = copy;
        repack_t r = {data, copy, tiles[0], tiles[1], tiles[2]};
        if (tiles[3])
            tfc__parallel_for(c->pool, repack_panels, (const int64_t *)(const void *)&r, tiles[0] / PANEL);
        else
            tfc__parallel_for(c->pool, repack_blocks, (const int64_t *)(const void *)&r, tiles[0] / 16);
        data = copy;
    }
    if (!c->weights[index]) c->unbound--;
    c->weights[index] = data;
    return TFC_OK;
}

/* ---- streaming prefetch. The one-row products (decode) prefetch each weight stream 3 KB
   ahead, into L1 where tfc__prefetch is 1 and into L2 only where it is 2 (0: not at
   all). On an Intel Xeon prefetching into L1 took bf16 decode from 11 to 20-27 GB/s
   (without it, the out-of-order window bounds how much of a stream is in flight); on
   an AMD EPYC (Zen 5) the same instructions halved bf16 decode and slowed q8's, while
   prefetching into L2 made q8 decode x1.35 faster than into L1 (W2: 24 against 33
   GB/s). No one choice holds on both, so the first decode step of a process is
   measured: it runs twice each way, in turn (a step rewrites the same cache row and
   output each time, so running it again changes nothing); the library prefetches into
   whichever level was faster, best against best, unless not prefetching was 3% faster
   than that. A C loop shaped like the bf16 kernel, tried first, showed a tenth of the
   kernel's difference and chose either way from run to run. Models whose weights are
   under 32 MB (in cache, where it does not matter) prefetch into L1; TFC_PREFETCH=0, 1
   or 2 decides instead. ---- */
__attribute__((visibility("hidden"))) int32_t tfc__prefetch = 1;

/* Set, with tfc__prefetch final, once the choice is made: later steps read only this. */
static _Atomic int32_t prefetch_chosen = 0;
static pthread_mutex_t prefetch_mu = PTHREAD_MUTEX_INITIALIZER;

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Runs graph g of one decode step (or a batch of them), choosing the prefetches on the
   process's first. */
static void run_step(tfc_ctx *c, tfc_graph g, float *cache, const int32_t *tokens, const int32_t *types,
                     int64_t n, int64_t pos, float *out) {
    int measure = 0;
    if (!atomic_load_explicit(&prefetch_chosen, memory_order_acquire)) {
        pthread_mutex_lock(&prefetch_mu);
        if (!atomic_load_explicit(&prefetch_chosen, memory_order_relaxed)) {
            const char *want = getenv("TFC_PREFETCH");
            int64_t bytes = 0;
            for (int64_t i = 0; i < tfc__n_weights; i++) bytes += tfc__weight_bytes[i];
            if (want && want[0] >= '0' && want[0] <= '2' && want[1] == 0) {
                tfc__prefetch = want[0] - '0';
            } else if (bytes >= ((int64_t)32 << 20)) {
                measure = 1;
                double best[3] = {1e30, 1e30, 1e30};
                for (int rep = 0; rep < 6; rep++) {
                    const int way = (rep + 1) % 3;
                    tfc__prefetch = way;
                    const double t0 = seconds();
                    g(c->arena, cache, tokens, types, n, pos, c->weights, out, c->pool);
                    const double t = seconds() - t0;
                    best[way] = t < best[way] ? t : best[way];
                }
                const int level = best[2] < best[1] ? 2 : 1;
                tfc__prefetch = best[0] * 1.03 < best[level] ? 0 : level;
            }
            atomic_store_explicit(&prefetch_chosen, 1, memory_order_release);
        }
        pthread_mutex_unlock(&prefetch_mu);
    }
    /* The measured runs computed the step already. */
    if (!measure) g(c->arena, cache, tokens, types, n, pos, c->weights, out, c->pool);
}

int32_t tfc_streaming_prefetch(void) {
    return atomic_load_explicit(&prefetch_chosen, memory_order_acquire) ? tfc__prefetch : -1;
}

static int32_t check_tokens(const int32_t *tokens, const int32_t *types, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        if (tokens[i] < 0 || tokens[i] >= tfc__vocab) return TFC_ERR_TOKEN;
        if (types && (types[i] < 0 || types[i] >= (tfc__type_rows > 0 ? tfc__type_rows : 1))) return TFC_ERR_TOKEN;
    }
    return TFC_OK;
}

static int32_t prefill(tfc_ctx *c, const int32_t *tokens, const int32_t *types, int32_t n, int32_t all_rows,
                       float *out);

int32_t tfc_prefill(tfc_ctx *c, const int32_t *tokens, const int32_t *types, int32_t n, int32_t all_rows,
                    float *out) {
    int32_t s = enter(c);
    return s != TFC_OK ? s : leave(c, prefill(c, tokens, types, n, all_rows, out));
}

static int32_t prefill(tfc_ctx *c, const int32_t *tokens, const int32_t *types, int32_t n, int32_t all_rows,
                       float *out) {
    if (!tokens || !out) return TFC_ERR_NULL;
    if (n <= 0) return TFC_ERR_ARG;
    if (c->unbound > 0) return TFC_ERR_UNBOUND;
    slot_t *sl = &c->slots[c->cur];
    if (sl->pos != 0) return TFC_ERR_NOT_EMPTY;
    if (n > tfc__max_seq) return TFC_ERR_CONTEXT_FULL;
    int32_t s = check_tokens(tokens, types, n);
    if (s != TFC_OK) return s;
    (all_rows ? run_prefill_all : run_prefill)(c->arena, sl->cache, tokens, types ? types : c->zeros, n, 0,
                                                  c->weights, out, c->pool);
    sl->pos = tfc__has_decode ? n : 0;
    return TFC_OK;
}

static int32_t decode(tfc_ctx *c, int32_t token, float *out);

int32_t tfc_decode(tfc_ctx *c, int32_t token, float *out) {
    int32_t s = enter(c);
    return s != TFC_OK ? s : leave(c, decode(c, token, out));
}

static int32_t decode(tfc_ctx *c, int32_t token, float *out) {
    if (!out) return TFC_ERR_NULL;
    if (!tfc__has_decode) return TFC_ERR_NO_DECODE;
    if (c->unbound > 0) return TFC_ERR_UNBOUND;
    slot_t *sl = &c->slots[c->cur];
    if (sl->pos + 1 > tfc__max_seq) return TFC_ERR_CONTEXT_FULL;
    int32_t s = check_tokens(&token, NULL, 1);
    if (s != TFC_OK) return s;
    run_step(c, run_decode, sl->cache, &token, c->zeros, 1, sl->pos, out);
    sl->pos += 1;
    return TFC_OK;
}

static int32_t decode_batch(tfc_ctx *c, int32_t n, const int32_t *slots, const int32_t *tokens, float *out);

int32_t tfc_decode_batch(tfc_ctx *c, int32_t n, const int32_t *slots, const int32_t *tokens, float *out) {
    int32_t s = enter(c);
    return s != TFC_OK ? s : leave(c, decode_batch(c, n, slots, tokens, out));
}

static int32_t decode_batch(tfc_ctx *c, int32_t n, const int32_t *slots, const int32_t *tokens, float *out) {
    if (!slots || !tokens || !out) return TFC_ERR_NULL;
    if (n <= 0 || n > c->n_slots) return TFC_ERR_ARG;
    if (!tfc__has_decode) return TFC_ERR_NO_DECODE;
    if (c->unbound > 0) return TFC_ERR_UNBOUND;
    /* Everything is checked before any slot moves: a refused batch changes nothing. */
    for (int32_t i = 0; i < n; i++) {
        if (slots[i] < 0 || slots[i] >= c->n_slots) return TFC_ERR_ARG;
        for (int32_t j = 0; j < i; j++)
            if (slots[j] == slots[i]) return TFC_ERR_ARG;
        if (c->slots[slots[i]].pos + 1 > tfc__max_seq) return TFC_ERR_CONTEXT_FULL;
    }
    int32_t s = check_tokens(tokens, NULL, n);
    if (s != TFC_OK) return s;
    if (!run_decode_batch || n == 1) {
        /* One slot is a decode step; with no batched graph (the MLIR backend, token
           types, attention outside the cache), the slots one by one, the same
           computation. */
        for (int32_t i = 0; i < n; i++) {
            slot_t *sl = &c->slots[slots[i]];
            run_step(c, run_decode, sl->cache, &tokens[i], c->zeros, 1, sl->pos, out + (int64_t)i * tfc__out_width);
            sl->pos += 1;
        }
        return TFC_OK;
    }
    int64_t *rows = malloc(2 * sizeof(int64_t) * (size_t)n);
    if (!rows) return TFC_ERR_ALLOC;
    float *base = c->slots[0].cache;
    for (int32_t i = 0; i < n; i++) {
        const slot_t *sl = &c->slots[slots[i]];
        rows[2 * i] = sl->pos;
        rows[2 * i + 1] = ((intptr_t)sl->cache - (intptr_t)base) / (intptr_t)sizeof(float);
    }
    /* The arena holds up to max_seq rows of the extend graph. */
    for (int32_t at = 0; at < n; at += (int32_t)tfc__max_seq) {
        const int32_t m = n - at < tfc__max_seq ? n - at : (int32_t)tfc__max_seq;
        run_step(c, run_decode_batch, base, tokens + at, (const int32_t *)(const void *)(rows + 2 * at), m, 0,
                 out + (int64_t)at * tfc__out_width);
    }
    free(rows);
    for (int32_t i = 0; i < n; i++) c->slots[slots[i]].pos += 1;
    return TFC_OK;
}

static int32_t extend(tfc_ctx *c, const int32_t *tokens, int32_t n, int32_t all_rows, float *out);

int32_t tfc_extend(tfc_ctx *c, const int32_t *tokens, int32_t n, int32_t all_rows, float *out) {
    int32_t s = enter(c);
    return s != TFC_OK ? s : leave(c, extend(c, tokens, n, all_rows, out));
}

static int32_t extend(tfc_ctx *c, const int32_t *tokens, int32_t n, int32_t all_rows, float *out) {
    if (!tokens || !out) return TFC_ERR_NULL;
    if (n <= 0) return TFC_ERR_ARG;
    if (!tfc__has_decode) return TFC_ERR_NO_DECODE;
    if (c->unbound > 0) return TFC_ERR_UNBOUND;
    slot_t *sl = &c->slots[c->cur];
    if (n > tfc__max_seq - sl->pos) return TFC_ERR_CONTEXT_FULL;
    int32_t s = check_tokens(tokens, NULL, n);
    if (s != TFC_OK) return s;
    tfc_graph run = all_rows ? run_extend_all : run_extend;
    if (tfc__has_extend && run) {
        run(c->arena, sl->cache, tokens, c->zeros, n, sl->pos, c->weights, out, c->pool);
        sl->pos += n;
        return TFC_OK;
    }
    /* No extend graph (the MLIR backend): one decode step per token, the same
       computation; each row to its place, or every one to the last row's. */
    for (int32_t i = 0; i < n; i++) {
        float *row = all_rows ? out + (int64_t)i * tfc__out_width : out;
        run_decode(c->arena, sl->cache, &tokens[i], c->zeros, 1, sl->pos, c->weights, row, c->pool);
        sl->pos += 1;
    }
    return TFC_OK;
}

int32_t tfc_reset(tfc_ctx *c) {
    int32_t s = enter(c);
    if (s != TFC_OK) return s;
    c->slots[c->cur].pos = 0;
    return leave(c, TFC_OK);
}

int32_t tfc_rewind(tfc_ctx *c, int32_t n) {
    int32_t s = enter(c);
    if (s != TFC_OK) return s;
    if (!tfc__has_decode) return leave(c, TFC_ERR_NO_DECODE);
    if (n < 0 || n > c->slots[c->cur].pos) return leave(c, TFC_ERR_ARG);
    c->slots[c->cur].pos = n;
    return leave(c, TFC_OK);
}

int32_t tfc_add_slot(tfc_ctx *c, int32_t *slot) {
    if (!slot) return TFC_ERR_NULL;
    *slot = -1;
    int32_t s = enter(c);
    if (s != TFC_OK) return s;
    if (c->n_slots >= TFC_MAX_SLOTS) return leave(c, TFC_ERR_ARG);
    if ((uint64_t)big_size((size_t)tfc__cache_bytes + 64) > available_memory()) return leave(c, TFC_ERR_MEMORY);
    slot_t *grown = realloc(c->slots, ((size_t)c->n_slots + 1) * sizeof *grown);
    if (!grown) return leave(c, TFC_ERR_ALLOC);
    c->slots = grown;
    float *cache = big_alloc((size_t)tfc__cache_bytes + 64);
    if (!cache) return leave(c, TFC_ERR_ALLOC);
    c->slots[c->n_slots] = (slot_t){cache, 0};
    *slot = c->n_slots++;
    return leave(c, TFC_OK);
}

int32_t tfc_use_slot(tfc_ctx *c, int32_t slot) {
    int32_t s = enter(c);
    if (s != TFC_OK) return s;
    if (slot < 0 || slot >= c->n_slots) return leave(c, TFC_ERR_ARG);
    c->cur = slot;
    return leave(c, TFC_OK);
}

int32_t tfc_position(const tfc_ctx *c) {
    if (!c) return -1;
    pthread_mutex_lock(&live_mu);
    const int32_t pos = is_live_locked(c) ? (int32_t)c->slots[c->cur].pos : -1;
    pthread_mutex_unlock(&live_mu);
    return pos;
}

const char *tfc_status_string(int32_t s) {
    switch (s) {
    case TFC_OK: return "ok";
    case TFC_ERR_NULL: return "a required pointer argument is NULL";
    case TFC_ERR_ARG: return "a count, index or size is out of range";
    case TFC_ERR_CONTEXT_FULL: return "the tokens do not fit in the model's max_seq positions";
    case TFC_ERR_TOKEN: return "a token id is outside the vocabulary (or a token type outside its table)";
    case TFC_ERR_UNBOUND: return "not every weight has been bound";
    case TFC_ERR_NOT_EMPTY: return "prefill needs an empty cache: call tfc_reset first";
    case TFC_ERR_NO_DECODE: return "the model has bidirectional attention and no decode step";
    case TFC_ERR_ALLOC: return "out of memory";
    case TFC_ERR_BUSY: return "the context is in use by another thread";
    case TFC_ERR_CONTEXT: return "not a live context (destroyed, or never created)";
    case TFC_ERR_MEMORY: return "a context needs more memory than this process may take (tfc_context_bytes)";
    default: return "unknown status";
    }
}
