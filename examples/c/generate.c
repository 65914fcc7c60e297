/* Generates tokens with a tfc-compiled model from plain C.

   Build (DIR holds lib<name>.so and <name>.h from `tfc compile SPEC -o DIR`):
     cc -O2 -I DIR -include DIR/<name>.h generate.c -L DIR -l<name> -Wl,-rpath,DIR -o generate
   Run:
     ./generate CHECKPOINT.safetensors N_NEW TOKEN [TOKEN...]
   It maps the safetensors file, binds each weight the library asks for by name (no
   copy), prefills the prompt and prints N_NEW greedily generated token ids. */
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>

static int fail(const char *what, int32_t status) {
    fprintf(stderr, "%s: %s\n", what, tfc_status_string(status));
    return 1;
}

/* Finds `"name":{..."data_offsets":[a,b]...}` in the JSON header of a safetensors file. */
static const void *find_tensor(const char *header, uint64_t header_len, const uint8_t *data, const char *name,
                               uint64_t *nbytes) {
    size_t n = strlen(name);
    char *key = malloc(n + 4);
    snprintf(key, n + 4, "\"%s\"", name);
    const char *at = header, *end = header + header_len;
    const void *found = NULL;
    while ((at = strstr(at, key)) && at < end) {
        const char *colon = at + n + 2;
        while (*colon == ' ') colon++;
        if (*colon == ':') {
            const char *offs = strstr(colon, "\"data_offsets\"");
            const char *close = strchr(colon, '}');
            uint64_t a, b;
            if (offs && close && offs < close && sscanf(strchr(offs, '[') + 1, "%" SCNu64 ",%" SCNu64, &a, &b) == 2) {
                *nbytes = b - a;
                found = data + a;
            }
            break;
        }
        at += 1;
    }
    free(key);
    return found;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s CHECKPOINT.safetensors N_NEW TOKEN [TOKEN...]\n", argv[0]);
        return 2;
    }
    int fd = open(argv[1], O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        perror(argv[1]);
        return 1;
    }
    const uint8_t *file = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (file == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    uint64_t header_len;
    memcpy(&header_len, file, 8);
    const char *header = (const char *)file + 8;
    const uint8_t *data = file + 8 + header_len;

    tfc_ctx *ctx = tfc_create(0);
    if (!ctx) return fail("create", TFC_ERR_ALLOC);
    for (int32_t i = 0; i < tfc_weight_count(); i++) {
        uint64_t nbytes = 0;
        const void *p = find_tensor(header, header_len, data, tfc_weight_name(i), &nbytes);
        if (!p) {
            fprintf(stderr, "the checkpoint has no tensor %s\n", tfc_weight_name(i));
            return 1;
        }
        int32_t s = tfc_bind_weight(ctx, i, p, nbytes);
        if (s != TFC_OK) return fail(tfc_weight_name(i), s);
    }

    int n_new = atoi(argv[2]);
    int32_t n = argc - 3;
    int32_t *prompt = malloc(sizeof(int32_t) * (size_t)n);
    for (int32_t i = 0; i < n; i++) prompt[i] = atoi(argv[3 + i]);
    float *logits = malloc(sizeof(float) * (size_t)tfc_output_width());
    int32_t s = tfc_prefill(ctx, prompt, NULL, n, 0, logits);
    if (s != TFC_OK) return fail("prefill", s);
    for (int k = 0; k < n_new; k++) {
        int32_t best = 0;
        for (int32_t v = 1; v < tfc_output_width(); v++)
            if (logits[v] > logits[best]) best = v;
        printf(k ? ",%d" : "%d", best);
        if (k + 1 < n_new && (s = tfc_decode(ctx, best, logits)) != TFC_OK) return fail("decode", s);
    }
    printf("\n");
    tfc_destroy(ctx);
    free(logits);
    free(prompt);
    return 0;
}
