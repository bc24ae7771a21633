/* The AVX2-class kernels, included by qkernels.c once per instruction set. The includer defines
 *   TILE_TARGET           the target attribute string
 *   TILE_FN(name)         the name of this instance's functions
 *   TILE_MAX              tokens per tile (their accumulators must fit in the registers: 4 with AVX2's 16)
 *   TILE_FN(dot8)         (w[8], aw[8], x, FMT) -> [8] int32: the block dots of the 8 rows of a group with one
 *                         token's 32 int8 activations x (w: the 8 unpacked 32-byte words, aw = |w| for q8)
 * The integer dots are exact in every instance and the float operations that follow are the same in the same
 * order, so all instances give bit-identical results (and so does the scalar path). */

/* One group of 8 rows (g) against TN <= TILE_MAX tokens from t0, format FMT (both compile-time constants after
 * inlining, so the accumulators stay in registers). Lane r of every vector is row 8 g + r. Per block b, token t:
 *     acc[t] += float(dot) * (d_w * d_x)  +  m_w * s_x          (q4: one fma into a fresh sum, then one add)
 *     acc[t] += float(dot) * (d_w * d_x)                        (q8: one multiply, then one add)
 * where s_x is the sum of the token's dequantized block (the q4 offset's term). */
__attribute__((target(TILE_TARGET), always_inline)) static inline void TILE_FN(group_tile)(
    const gemm_args *a, int64_t g, int64_t t0, const int TN, const int FMT) {
    const int64_t nb = a->k / QK;
    const uint8_t *wq = a->wq + g * nb * 8 * (FMT == 4 ? 16 : 32);
    const uint16_t *wd = a->wd + g * nb * 8;
    const uint16_t *wm = FMT == 4 ? a->wm + g * nb * 8 : NULL;
    __m256 acc[TILE_MAX];
    for (int i = 0; i < TN; i++) acc[i] = _mm256_setzero_ps();
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    for (int64_t b = 0; b < nb; b++) {
        __m256i w[8], aw[8];
        /* the block 4 ahead (a hint: it never faults, even past the end); alternating builds on this machine gave
         * 2-7 % faster q4 steps with it in 7 of 7 paired comparisons (1- and 2-token steps, a streaming test) */
        const char *ahead = (const char *)((uintptr_t)wq + (uintptr_t)(b + 4) * 8 * (FMT == 4 ? 16 : 32));
        _mm_prefetch(ahead, _MM_HINT_T0);
        _mm_prefetch(ahead + 64, _MM_HINT_T0);
        if (FMT == 8) {
            _mm_prefetch(ahead + 128, _MM_HINT_T0);
            _mm_prefetch(ahead + 192, _MM_HINT_T0);
        }
        if (FMT == 4) {  /* 4 chunks: low nibbles hold word 2c, high nibbles word 2c + 1 */
            for (int c = 0; c < 4; c++) {
                const __m256i p = _mm256_loadu_si256((const __m256i *)(wq + b * 128 + c * 32));
                w[2 * c] = _mm256_and_si256(p, low4);
                w[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(p, 4), low4);
            }
        } else {
            for (int c = 0; c < 8; c++) {
                w[c] = _mm256_loadu_si256((const __m256i *)(wq + b * 256 + c * 32));
                aw[c] = _mm256_sign_epi8(w[c], w[c]);
            }
        }
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wd + b * 8)));
        const __m256 mw = FMT == 4 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wm + b * 8)))
                                   : _mm256_setzero_ps();  /* q8: unused */
        for (int i = 0; i < TN; i++) {
            const int64_t t = t0 + i;
            const __m256i s = TILE_FN(dot8)(w, aw, a->xq + t * a->k + b * QK, FMT);
            const __m256 scale = _mm256_mul_ps(dw, _mm256_set1_ps(a->xd[t * nb + b]));
            const __m256 dot = _mm256_cvtepi32_ps(s);
            acc[i] = _mm256_add_ps(acc[i], FMT == 4 ? _mm256_fmadd_ps(dot, scale, _mm256_mul_ps(mw, _mm256_set1_ps(
                                                          a->xs[t * nb + b])))
                                                    : _mm256_mul_ps(dot, scale));
        }
    }
    for (int i = 0; i < TN; i++) {
        float out[8];
        _mm256_storeu_ps(out, acc[i]);
        store_group(a, g, t0 + i, out);
    }
}

#define TILE_CASE(TN)                                                \
    case TN * 16 + 4: TILE_FN(group_tile)(a, g, t0, TN, 4); break; \
    case TN * 16 + 8: TILE_FN(group_tile)(a, g, t0, TN, 8); break;

__attribute__((target(TILE_TARGET))) static void TILE_FN(groups)(const gemm_args *a, int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; g++)
        for (int64_t t0 = 0; t0 < a->t; t0 += TILE_MAX) {
            const int tn = (int)(a->t - t0 < TILE_MAX ? a->t - t0 : TILE_MAX);
            switch (tn * 16 + a->fmt) {
                TILE_CASE(1) TILE_CASE(2) TILE_CASE(3) TILE_CASE(4)
#if TILE_MAX > 4
                TILE_CASE(5) TILE_CASE(6) TILE_CASE(7) TILE_CASE(8)
#endif
                default: break;
            }
        }
}
#undef TILE_CASE
