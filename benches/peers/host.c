/* What this host gives right now, to read a peer table by (a VM's host changes speed
   within minutes): the rate at which `threads` threads stream a 512 MB buffer on 2 MB
   pages, prefetching 3 KB ahead as the decode kernels do (GB/s), and their f32 FMA rate
   from AVX-512 registers (GFLOP/s). Medians of five; prints one JSON object.
   Used by benches/peers.sh: cc -O2 -mavx512f -mfma -pthread host.c -o host; ./host 2 */
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define BYTES (512ul << 20)
#define FMAS 100000000L

static float *buf;
static int threads;
static volatile float sink;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void *stream(void *arg) {
    size_t n = BYTES / 4 / threads;
    const float *p = buf + (size_t)arg * n;
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (size_t i = 0; i < n; i += 64) {
        for (int l = 0; l < 4; l++) _mm_prefetch((const char *)(p + i + 16 * l) + 3072, _MM_HINT_T0);
        s0 = _mm512_add_ps(s0, _mm512_load_ps(p + i));
        s1 = _mm512_add_ps(s1, _mm512_load_ps(p + i + 16));
        s2 = _mm512_add_ps(s2, _mm512_load_ps(p + i + 32));
        s3 = _mm512_add_ps(s3, _mm512_load_ps(p + i + 48));
    }
    sink = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
    return NULL;
}

static void *fmas(void *arg) {
    (void)arg;
    __m512 acc[24], w = _mm512_set1_ps(1.0000001f), x = _mm512_set1_ps(1e-7f);
    for (int i = 0; i < 24; i++) acc[i] = _mm512_set1_ps((float)i);
    for (long i = 0; i < FMAS / 24; i++) {
        /* 24 independent chains in registers: enough to cover the FMA latency on two ports. */
#pragma GCC unroll 24
        for (int j = 0; j < 24; j++) acc[j] = _mm512_fmadd_ps(acc[j], w, x);
    }
    float s = 0;
    for (int i = 0; i < 24; i++) s += _mm512_reduce_add_ps(acc[i]);
    sink = s;
    return NULL;
}

/* Seconds for one run of `f` on every thread. */
static double run(void *(*f)(void *)) {
    pthread_t t[64];
    double t0 = now();
    for (long i = 0; i < threads; i++) pthread_create(&t[i], NULL, f, (void *)i);
    for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
    return now() - t0;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    threads = argc > 1 ? atoi(argv[1]) : 2;
    if (threads < 1 || threads > 64) return fprintf(stderr, "threads: 1 to 64\n"), 2;
    buf = aligned_alloc(2ul << 20, BYTES);
    if (!buf) return fprintf(stderr, "no memory\n"), 1;
    madvise(buf, BYTES, MADV_HUGEPAGE);
    memset(buf, 0, BYTES);
    double gbs[5], gflops[5];
    run(stream);
    for (int r = 0; r < 5; r++) gbs[r] = BYTES / run(stream) / 1e9;
    for (int r = 0; r < 5; r++) gflops[r] = 2.0 * 16 * (FMAS / 24 * 24) * threads / run(fmas) / 1e9;
    qsort(gbs, 5, sizeof gbs[0], cmp);
    qsort(gflops, 5, sizeof gflops[0], cmp);
    printf("{\"stream_gb_s\": %.1f, \"fma_gflop_s\": %.0f}\n", gbs[2], gflops[2]);
    return 0;
}
