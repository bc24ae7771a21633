/* The AVX2-class row kernels, included by qkernels.c once per instruction set. The includer defines
 *   TILE_TARGET           the target attribute string
 *   TILE_FN(name)         the name of this instance's functions
 *   TILE_MAX              tokens per tile (their accumulators must fit in the registers: 4 with AVX2's 16)
 *   BLOCK_DOT_SETUP       declarations BLOCK_DOT needs
 *   BLOCK_DOT(aw, x)      [8] int32 lanes, each the sum of 4 products of unsigned aw and signed x bytes
 * Every instance computes the same integer block dots (no int16 saturation arises: |aw| <= 128, |x| <= 127)
 * and then the same float operations in the same order, so all instances give bit-identical results. */

/* Weights of row n, block b, as 32 unsigned-operand bytes (q8: |w|, its sign moved onto x by the caller). */
__attribute__((target(TILE_TARGET), always_inline)) static inline __m256i TILE_FN(load_block)(
    const gemm_args *a, int64_t n, int64_t b, const int FMT) {
    if (FMT == 8) return _mm256_loadu_si256((const __m256i *)((const int8_t *)a->wq + n * a->k + b * QK));
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const uint8_t *base = a->wq + n * (a->k / 2) + b / 2 * QK;
    if (b < a->k / QK / 2 * 2) {  /* one of a pair: low or high nibbles of 32 shared bytes */
        const __m256i p = _mm256_loadu_si256((const __m256i *)base);
        return _mm256_and_si256(b % 2 ? _mm256_srli_epi16(p, 4) : p, _mm256_set1_epi8(0x0F));
    }
    const __m128i p = _mm_loadu_si128((const __m128i *)(a->wq + n * (a->k / 2) + b * (QK / 2)));
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(p, 4), low4), _mm_and_si128(p, low4));
}

/* One block of 32 weights w (row n, block b) against TN tokens: acc[i] += scale[i] * dot(w, x_i). */
__attribute__((target(TILE_TARGET), always_inline)) static inline void TILE_FN(block)(
    const gemm_args *a, __m256i w, int64_t b, const int8_t *xq, const float *sc, __m256 *acc, const int TN,
    const int FMT) {
    BLOCK_DOT_SETUP
    const __m256i aw = FMT == 8 ? _mm256_sign_epi8(w, w) : w;  /* unsigned operand */
    for (int i = 0; i < TN; i++) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(xq + i * a->k + b * QK));
        if (FMT == 8) x = _mm256_sign_epi8(x, w);  /* move w's sign onto x */
        const __m256i p32 = BLOCK_DOT(aw, x);  /* [8] int32: sums of 4 products each */
        acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(sc + i * 8), _mm256_cvtepi32_ps(p32), acc[i]);
    }
}

/* One weight row against TN <= TILE_MAX tokens of format FMT (both compile-time constants after inlining, so the
 * accumulators stay in registers). Even and odd blocks of a full group of 8 go to two accumulators per token,
 * so that consecutive blocks' FMAs do not wait on each other (one chain would be bound by the FMA latency). */
__attribute__((target(TILE_TARGET), always_inline)) static inline void TILE_FN(row_tile)(
    const gemm_args *a, int64_t n, int64_t t0, const int TN, const int FMT) {
    const int64_t nb = a->k / QK;
    const uint16_t *wd = a->wd + n * nb;
    const uint16_t *wm = FMT == 4 ? a->wm + n * nb : NULL;
    const int8_t *xq = a->xq + t0 * a->k;
    __m256 even[TILE_MAX], odd[TILE_MAX], offv[TILE_MAX];
    float off_tail[TILE_MAX];
    for (int i = 0; i < TN; i++) {
        even[i] = _mm256_setzero_ps();
        odd[i] = _mm256_setzero_ps();
        offv[i] = _mm256_setzero_ps();
        off_tail[i] = 0.0f;
    }
    /* groups of 8 blocks: their 8 weight scales (and offsets) convert in one instruction, and each token's
     * combined scales are one vector multiply */
    for (int64_t g = 0; g < nb; g += 8) {
        const int cnt = (int)(nb - g < 8 ? nb - g : 8);
        float sc[TILE_MAX][8];
        if (cnt == 8) {
            const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wd + g)));
            for (int i = 0; i < TN; i++)
                _mm256_storeu_ps(sc[i], _mm256_mul_ps(dw, _mm256_loadu_ps(a->xd + (t0 + i) * nb + g)));
            if (FMT == 4) {
                const __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wm + g)));
                for (int i = 0; i < TN; i++)
                    offv[i] = _mm256_fmadd_ps(mw, _mm256_loadu_ps(a->xs + (t0 + i) * nb + g), offv[i]);
            }
            for (int j = 0; j < 8; j += 2) {
                __m256i w0, w1;
                if (FMT == 4) {  /* a pair of blocks: one load, two masks */
                    const __m256i p = _mm256_loadu_si256((const __m256i *)(a->wq + n * (a->k / 2) + (g + j) / 2 * QK));
                    const __m256i low4 = _mm256_set1_epi8(0x0F);
                    w0 = _mm256_and_si256(p, low4);
                    w1 = _mm256_and_si256(_mm256_srli_epi16(p, 4), low4);
                } else {
                    w0 = TILE_FN(load_block)(a, n, g + j, FMT);
                    w1 = TILE_FN(load_block)(a, n, g + j + 1, FMT);
                }
                TILE_FN(block)(a, w0, g + j, xq, &sc[0][j], even, TN, FMT);
                TILE_FN(block)(a, w1, g + j + 1, xq, &sc[0][j + 1], odd, TN, FMT);
            }
        } else {  /* the last, partial group: one accumulator */
            for (int i = 0; i < TN; i++) {
                for (int j = 0; j < cnt; j++) {
                    sc[i][j] = _cvtsh_ss(wd[g + j]) * a->xd[(t0 + i) * nb + g + j];
                    if (FMT == 4) off_tail[i] += _cvtsh_ss(wm[g + j]) * a->xs[(t0 + i) * nb + g + j];
                }
            }
            for (int j = 0; j < cnt; j++)
                TILE_FN(block)(a, TILE_FN(load_block)(a, n, g + j, FMT), g + j, xq, &sc[0][j], even, TN, FMT);
        }
    }
    for (int i = 0; i < TN; i++) {
        const float off = FMT == 4 ? hsum(offv[i]) + off_tail[i] : 0.0f;
        a->y[(t0 + i) * a->n + n] = hsum(_mm256_add_ps(even[i], odd[i])) + off + (a->bias ? a->bias[n] : 0.0f) +
                                    (a->res ? a->res[(t0 + i) * a->n + n] : 0.0f);
    }
}

#define TILE_CASE(TN)                                               \
    case TN * 16 + 4: TILE_FN(row_tile)(a, n, t0, TN, 4); break; \
    case TN * 16 + 8: TILE_FN(row_tile)(a, n, t0, TN, 8); break;

__attribute__((target(TILE_TARGET))) static void TILE_FN(rows)(const gemm_args *a, int64_t n0, int64_t n1) {
    /* 8 rows x TILE_MAX tokens at a time: both operands of the inner loops stay in L1 even for a long prefill */
    for (int64_t r0 = n0; r0 < n1; r0 += 8)
        for (int64_t t0 = 0; t0 < a->t; t0 += TILE_MAX) {
            const int tn = (int)(a->t - t0 < TILE_MAX ? a->t - t0 : TILE_MAX);
            const int64_t r1 = r0 + 8 < n1 ? r0 + 8 : n1;
            for (int64_t n = r0; n < r1; n++) {
                switch (tn * 16 + a->fmt) {
                    TILE_CASE(1) TILE_CASE(2) TILE_CASE(3) TILE_CASE(4)
#if TILE_MAX > 4
                    TILE_CASE(5) TILE_CASE(6) TILE_CASE(7) TILE_CASE(8)
#endif
                    default: break;
                }
            }
        }
}
#undef TILE_CASE
