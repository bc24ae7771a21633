/* Standalone check of the quantized GEMM code paths, without Python: every path this build has against the
 * portable scalar one (bit-exact: the integer dots are exact and every path does the same float operations in the
 * same order), and each path's batch invariance (bit-exact). Compiled natively by
 * tests/test_kernel_paths.py, and cross-compiled for aarch64 and run under qemu for the NEON path when those
 * tools are installed. Prints one line per path and exits non-zero on a failure. */
#define SPECMTP_NO_PYTHON 1
#include "../../src/specmtp/kernels/qkernels.c"

#include <stdio.h>

static uint32_t rng = 12345u;
static float frand(void) {
    rng = rng * 1664525u + 1013904223u;
    return (float)(rng >> 8) / (float)(1u << 24) * 2.0f - 1.0f;
}
static uint16_t half_bits(float f) {  /* small positive normal values only: enough for scales */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const int e = (int)((u >> 23) & 0xFF) - 127 + 15;
    return (uint16_t)(((u >> 16) & 0x8000) | (e << 10) | ((u >> 13) & 0x3FF));
}

static void run(int path, int fmt, int64_t t, int64_t n, int64_t k, const uint8_t *wq, const uint16_t *wd,
                const uint16_t *wm, const float *x, float *y) {
    const int64_t nb = k / QK;
    int8_t *xq = malloc(t * k);
    float *xd = malloc(t * nb * sizeof(float)), *xs = malloc(t * nb * sizeof(float));
    for (int64_t j = 0; j < t * nb; j++) quantize_block(x + j * QK, xq + j * QK, xd + j, xs + j);
    gemm_args a = {fmt, xq, xd, xs, wq, wd, fmt == 4 ? wm : NULL, NULL, NULL, y, t, n, k};
    isa = path;
    run_rows(&a, 0, (n + 7) / 8);
    free(xq);
    free(xd);
    free(xs);
}

int main(void) {
    const int64_t n = 21, k = 352, nb = k / QK, tmax = 11;  /* 3 row groups, the last one partial; 11 blocks */
    const int64_t groups = (n + 7) / 8;
    int failed = 0;
    for (int fmt = 4; fmt <= 8; fmt += 4) {
        const int64_t wbytes = groups * 8 * (fmt == 8 ? k : k / 2);
        uint8_t *wq = malloc(wbytes);
        uint16_t *wd = malloc(groups * 8 * nb * 2), *wm = malloc(groups * 8 * nb * 2);
        float *x = malloc(tmax * k * sizeof(float));
        for (int64_t i = 0; i < wbytes; i++) {
            rng = rng * 1664525u + 1013904223u;
            wq[i] = (uint8_t)(rng >> 24);
            if (fmt == 8 && wq[i] == 0x80) wq[i] = 0x81;  /* q8 values lie in -127..127 */
        }
        for (int64_t i = 0; i < groups * 8 * nb; i++) {
            wd[i] = half_bits(0.01f + 0.02f * (frand() + 1.0f));
            wm[i] = half_bits(0.05f + 0.01f * (frand() + 1.0f));
        }
        for (int64_t i = 0; i < tmax * k; i++) x[i] = frand();
        float *ref = malloc(tmax * n * sizeof(float)), *y = malloc(tmax * n * sizeof(float));
        float *one = malloc(n * sizeof(float));
        run(ISA_SCALAR, fmt, tmax, n, k, wq, wd, wm, x, ref);
        for (int p = 0; p < ISA_COUNT; p++) {
            if (!isa_supported(p)) continue;
            run(p, fmt, tmax, n, k, wq, wd, wm, x, y);
            double num = 0, den = 0;
            for (int64_t i = 0; i < tmax * n; i++) {
                num += (y[i] - ref[i]) * (double)(y[i] - ref[i]);
                den += ref[i] * (double)ref[i];
            }
            int invariant = 1;
            for (int64_t t = 0; t < tmax; t++) {
                run(p, fmt, 1, n, k, wq, wd, wm, x + t * k, one);
                if (memcmp(one, y + t * n, n * sizeof(float)) != 0) invariant = 0;
            }
            const double rel = sqrt(num / den);
            const int same = memcmp(y, ref, tmax * n * sizeof(float)) == 0;
            const int ok = same && invariant;
            printf("%s q%d: relative error vs scalar %.2e, identical %s, batch-invariant %s: %s\n", isa_names[p], fmt,
                   rel, same ? "yes" : "no", invariant ? "yes" : "no", ok ? "ok" : "FAIL");
            failed |= !ok;
        }
        free(wq), free(wd), free(wm), free(x), free(ref), free(y), free(one);
    }
    return failed;
}
