/* Quantized linear kernels for the CPU: y[t, n] = sum_k x[t, k] * W[n, k] (+ bias) for weights in specmtp's
 * two block formats, x in fp32.
 *
 *   q8: per row, blocks of 32 weights: int8 q[32] and an fp16 scale d          w = d * q
 *   q4: per row, blocks of 32 weights: 4-bit q, fp16 scale d and fp16 offset m   w = d * q + m, q in 0..15
 *
 * Rows are stored in groups of 8, interleaved (quant.py, _interleave): for group g and block b, "word" c
 * (c = 0..7) is 32 bytes holding elements 4c .. 4c + 3 of each of the 8 rows (bytes 4r .. 4r + 3: row r).
 * q8 stores the 8 words; q4 stores 4 chunks of 32 bytes, chunk c holding word 2c in its low nibbles and word
 * 2c + 1 in its high ones. Scales and offsets are [groups, blocks, 8]. So one integer dot-product instruction
 * (AVX-512 VNNI vpdpbusd, AVX2 maddubs, NEON widening multiplies) multiplies a word by the token's 4 activations
 * of that word broadcast to every lane, lane r accumulating row r: 8 rows advance at once, with no horizontal
 * sums, and the 8 rows' block results convert and scale as one vector.
 *
 * Activations are quantized per token to int8 in blocks of 32 (scale = max|x| / 127). Batch invariance: every
 * (token, row) result is computed by the same operations whatever the number of tokens in the call (tokens are
 * processed in tiles that share only the weight unpacking, never an accumulator), and threads split row groups,
 * not the sum. So a token's logits do not depend on how many tokens are verified with it. The integer dots are
 * exact and every path then does the same float operations in the same order: all paths agree bit for bit.
 *
 * Threads: a small pool of our own (pthreads), spinning briefly then sleeping, so it does not fight another
 * runtime's OpenMP pool. The code path is chosen at run time: VNNI where the CPU has AVX-512 VNNI, else AVX2 + FMA,
 * else a portable scalar fallback; NEON on aarch64.
 */
#define PY_SSIZE_T_CLEAN
#ifndef SPECMTP_NO_PYTHON  /* defined by the standalone kernel tests (cross-compiled for other CPUs) */
#include <Python.h>
#endif

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#if defined(__aarch64__)
#include <arm_neon.h>
#define SPECMTP_NEON 1
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SPECMTP_X86 1
#endif

#define QK 32
#define FMT_F32 32  /* gemm_run's format for dense fp32 weights */
#define MAX_THREADS 64

/* Scratch memory that grows: *buf holds at least `need` elements of `size` bytes, 64-byte aligned, reallocated (its
   contents lost) when it held fewer. 0, or -1 when the memory cannot be had (then *buf is NULL and *cap 0). */
static int grow(void **buf, int64_t *cap, int64_t need, size_t size) {
    if (need <= *cap) return 0;
    free(*buf);
    *buf = aligned_alloc(64, ((size_t)need * size + 63) / 64 * 64);
    *cap = *buf ? need : 0;
    return *buf ? 0 : -1;
}
#define GROW(buf, cap, need) grow((void **)&(buf), &(cap), (need), sizeof *(buf))

/* ---------------------------------------------------------------------------------------------------------- */
/* activation quantization                                                                                    */

/* One block of 32 activations -> int8 q[32], scale *xd, sum of the dequantized block *xs (q4's offset term) */
static void quantize_block(const float *v, int8_t *xq, float *xd, float *xs) {
    float amax = 0.0f;
    for (int j = 0; j < QK; j++) {
        float a = fabsf(v[j]);
        amax = a > amax ? a : amax;
    }
    float d = amax / 127.0f;
    float id = d > 0.0f ? 1.0f / d : 0.0f;
    int sum = 0;
    for (int j = 0; j < QK; j++) {
        int q = (int)lrintf(v[j] * id);
        q = q > 127 ? 127 : (q < -127 ? -127 : q);
        xq[j] = (int8_t)q;
        sum += q;
    }
    *xd = d;
    *xs = d * (float)sum;
}

static float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  /* subnormal: normalize */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) {
                man <<= 1;
                exp--;
            }
            bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000 | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* ---------------------------------------------------------------------------------------------------------- */
/* row kernels: one weight row against a tile of tokens                                                       */

typedef struct {
    int fmt;               /* 8 or 4 */
    const int8_t *xq;      /* [T, K] */
    const float *xd, *xs;  /* [T, K/32] */
    const uint8_t *wq;     /* [ceil(N/8), K/32, 256] (q8) or [.., 128] (q4) bytes: the interleaved row groups */
    const uint16_t *wd, *wm;  /* [ceil(N/8), K/32, 8] fp16 bits */
    const float *bias;     /* [N] or NULL */
    const float *res;      /* [T, N] or NULL: added to the result (a residual connection) */
    float *y;              /* [T, N] */
    int64_t t, n, k;
} gemm_args;

static inline int32_t load_word(const int8_t *x) {  /* 4 activation bytes, to be broadcast to every lane */
    int32_t v;
    memcpy(&v, x, sizeof v);
    return v;
}

/* The 8 (or, in a partial last group, fewer) results of row group g for token t, plus bias and residual. */
static void store_group(const gemm_args *a, int64_t g, int64_t t, const float *out) {
    const int rows = a->n - g * 8 < 8 ? (int)(a->n - g * 8) : 8;
    for (int r = 0; r < rows; r++) {
        const int64_t n = g * 8 + r;
        a->y[t * a->n + n] = out[r] + (a->bias ? a->bias[n] : 0.0f) + (a->res ? a->res[t * a->n + n] : 0.0f);
    }
}

/* Byte offset of group g, block b in wq, and the integer dot of row r of that block with a token's 32 int8 x. */
static int64_t block_offset(int fmt, int64_t g, int64_t nb, int64_t b) { return (g * nb + b) * (fmt == 4 ? 128 : 256); }

static int32_t dot_scalar_block(int fmt, const uint8_t *blk, int r, const int8_t *x) {
    int32_t s = 0;
    for (int c = 0; c < 8; c++)
        for (int p = 0; p < 4; p++) {
            int32_t w;
            if (fmt == 8) {
                w = ((const int8_t *)blk)[c * 32 + 4 * r + p];
            } else {
                const uint8_t byte = blk[(c / 2) * 32 + 4 * r + p];
                w = c % 2 ? byte >> 4 : byte & 0x0F;
            }
            s += w * x[4 * c + p];
        }
    return s;
}

static void rows_scalar(const gemm_args *a, int64_t g0, int64_t g1) {
    const int64_t nb = a->k / QK;
    for (int64_t n = g0 * 8; n < g1 * 8 && n < a->n; n++) {
        const int64_t g = n / 8;
        const int r = (int)(n % 8);
        for (int64_t t = 0; t < a->t; t++) {
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const int32_t s = dot_scalar_block(a->fmt, a->wq + block_offset(a->fmt, g, nb, b), r,
                                                   a->xq + t * a->k + b * QK);
                const int64_t j = (g * nb + b) * 8 + r;
                const float scale = half_to_float(a->wd[j]) * a->xd[t * nb + b];
                acc += a->fmt == 4 ? fmaf((float)s, scale, half_to_float(a->wm[j]) * a->xs[t * nb + b])
                                   : (float)s * scale;
            }
            a->y[t * a->n + n] = acc + (a->bias ? a->bias[n] : 0.0f) + (a->res ? a->res[t * a->n + n] : 0.0f);
        }
    }
}

#ifdef SPECMTP_X86
__attribute__((target("avx2,fma,f16c"))) static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma,f16c"))) static inline float hmax(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* AVX2: maddubs multiplies unsigned by signed bytes into int16 pairs. q4's weights are 0..15: the 8 words' pairs
 * (each <= 2 * 15 * 127) sum in int16 without overflow, then one madd widens; q8 puts w's sign on x and widens
 * every word. */
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline __m256i dot8_avx2(
    const __m256i *w, const __m256i *aw, const int8_t *x, const int FMT) {
    const __m256i ones = _mm256_set1_epi16(1);
    if (FMT == 4) {
        __m256i s16 = _mm256_setzero_si256();
        for (int c = 0; c < 8; c++)
            s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(w[c], _mm256_set1_epi32(load_word(x + 4 * c))));
        return _mm256_madd_epi16(s16, ones);
    }
    __m256i s = _mm256_setzero_si256();
    for (int c = 0; c < 8; c++) {
        const __m256i xs = _mm256_sign_epi8(_mm256_set1_epi32(load_word(x + 4 * c)), w[c]);
        s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(aw[c], xs), ones));
    }
    return s;
}

#define TILE_TARGET "avx2,fma,f16c"
#define TILE_FN(name) name##_avx2
#define TILE_MAX 4
#include "qtile.h"
#undef TILE_TARGET
#undef TILE_FN
#undef TILE_MAX

/* AVX-512 VNNI on 256-bit vectors: vpdpbusd does maddubs + madd + add in one instruction (no saturation), in four
 * independent chains so consecutive words do not wait on each other's latency; twice the tokens share one
 * unpacking of the weights (AVX-512 has 32 vector registers). */
__attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni"), always_inline)) static inline __m256i dot8_vnni(
    const __m256i *w, const __m256i *aw, const int8_t *x, const int FMT) {
    __m256i s[4];
    for (int c = 0; c < 4; c++) s[c] = _mm256_setzero_si256();
    for (int c = 0; c < 8; c++) {
        const __m256i xb = _mm256_set1_epi32(load_word(x + 4 * c));
        s[c % 4] = FMT == 4 ? _mm256_dpbusd_epi32(s[c % 4], w[c], xb)
                            : _mm256_dpbusd_epi32(s[c % 4], aw[c], _mm256_sign_epi8(xb, w[c]));
    }
    return _mm256_add_epi32(_mm256_add_epi32(s[0], s[1]), _mm256_add_epi32(s[2], s[3]));
}

#define TILE_TARGET "avx2,fma,f16c,avx512f,avx512vl,avx512vnni"
#define TILE_FN(name) name##_vnni
#define TILE_MAX 8
#include "qtile.h"
#undef TILE_TARGET
#undef TILE_FN
#undef TILE_MAX
#endif

#ifdef SPECMTP_NEON
/* NEON (every aarch64 CPU): a 16-byte half-word holds 4 rows x 4 weights; widening multiplies by the broadcast
 * activations and two pairwise adds give the 4 rows' int32 sums. Up to 8 tokens share one unpacking of a block's
 * weights; each (token, row) result is the same sequence of operations whatever the tile (batch-invariant), and
 * the float operations are the scalar path's. */
static inline int32x4_t dot4_neon(int8x16_t w, int8x16_t xb) {
    const int16x8_t lo = vmull_s8(vget_low_s8(w), vget_low_s8(xb));  /* rows 0, 1: |w x| <= 127 * 127 */
    const int16x8_t hi = vmull_high_s8(w, xb);                       /* rows 2, 3 */
    return vpaddq_s32(vpaddlq_s16(lo), vpaddlq_s16(hi));
}

static void rows_neon(const gemm_args *a, int64_t g0, int64_t g1) {
    const int64_t nb = a->k / QK;
    const uint8x16_t low4 = vdupq_n_u8(0x0F);
    for (int64_t g = g0; g < g1; g++) {
        for (int64_t t0 = 0; t0 < a->t; t0 += 8) {
            const int tn = (int)(a->t - t0 < 8 ? a->t - t0 : 8);
            float32x4_t acc[8][2];
            for (int i = 0; i < tn; i++) acc[i][0] = acc[i][1] = vdupq_n_f32(0.0f);
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *blk = a->wq + block_offset(a->fmt, g, nb, b);
                int8x16_t w[8][2];  /* word c, rows 0-3 / 4-7 */
                for (int c = 0; c < 8; c++)
                    for (int h = 0; h < 2; h++) {
                        if (a->fmt == 8) {
                            w[c][h] = vld1q_s8((const int8_t *)blk + c * 32 + h * 16);
                        } else {
                            const uint8x16_t p = vld1q_u8(blk + (c / 2) * 32 + h * 16);
                            w[c][h] = vreinterpretq_s8_u8(c % 2 ? vshrq_n_u8(p, 4) : vandq_u8(p, low4));
                        }
                    }
                float dw[8], mw[8];
                for (int r = 0; r < 8; r++) {
                    dw[r] = half_to_float(a->wd[(g * nb + b) * 8 + r]);
                    mw[r] = a->fmt == 4 ? half_to_float(a->wm[(g * nb + b) * 8 + r]) : 0.0f;
                }
                for (int i = 0; i < tn; i++) {
                    const int64_t t = t0 + i;
                    const int8_t *x = a->xq + t * a->k + b * QK;
                    int32x4_t s[2] = {vdupq_n_s32(0), vdupq_n_s32(0)};
                    for (int c = 0; c < 8; c++) {
                        const int8x16_t xb = vreinterpretq_s8_s32(vdupq_n_s32(load_word(x + 4 * c)));
                        s[0] = vaddq_s32(s[0], dot4_neon(w[c][0], xb));
                        s[1] = vaddq_s32(s[1], dot4_neon(w[c][1], xb));
                    }
                    for (int h = 0; h < 2; h++) {
                        const float32x4_t scale = vmulq_f32(vld1q_f32(dw + 4 * h), vdupq_n_f32(a->xd[t * nb + b]));
                        const float32x4_t dot = vcvtq_f32_s32(s[h]);
                        acc[i][h] = vaddq_f32(acc[i][h], a->fmt == 4 ? vfmaq_f32(vmulq_f32(vld1q_f32(mw + 4 * h),
                                                                     vdupq_n_f32(a->xs[t * nb + b])), dot, scale)
                                                                     : vmulq_f32(dot, scale));
                    }
                }
            }
            for (int i = 0; i < tn; i++) {
                float out[8];
                vst1q_f32(out, acc[i][0]);
                vst1q_f32(out + 4, acc[i][1]);
                store_group(a, g, t0 + i, out);
            }
        }
    }
}
#endif

/* Instruction sets, best last; `isa` is the one in use (the best the CPU has, unless set_isa chose another). */
enum { ISA_SCALAR, ISA_AVX2, ISA_VNNI, ISA_NEON, ISA_COUNT };
static const char *isa_names[] = {"scalar", "avx2", "vnni", "neon"};
static int isa = ISA_SCALAR;
static int use_avx2 = 0;  /* isa is AVX2 or VNNI: the attention kernel's vector path */

static void choose_isa(int i) {
    isa = i;
    use_avx2 = isa == ISA_AVX2 || isa == ISA_VNNI;
}

static int best_isa(void);

static int isa_supported(int i) {  /* scalar everywhere; AVX2 also where VNNI is */
    const int best = best_isa();
    return i == ISA_SCALAR || i == best || (i == ISA_AVX2 && best == ISA_VNNI);
}

static int best_isa(void) {
#if defined(SPECMTP_NEON)
    return ISA_NEON;
#elif defined(SPECMTP_X86)
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")))
        return ISA_SCALAR;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512vnni"))
        return ISA_VNNI;
    return ISA_AVX2;
#else
    return ISA_SCALAR;
#endif
}

/* Row groups [g0, g1) of the output (group g: rows 8 g .. 8 g + 7, the last one possibly partial). */
static void run_rows(const gemm_args *a, int64_t g0, int64_t g1) {
#ifdef SPECMTP_X86
    if (isa == ISA_VNNI) {
        groups_vnni(a, g0, g1);
        return;
    }
    if (isa == ISA_AVX2) {
        groups_avx2(a, g0, g1);
        return;
    }
#endif
#ifdef SPECMTP_NEON
    if (isa == ISA_NEON) {
        rows_neon(a, g0, g1);
        return;
    }
#endif
    rows_scalar(a, g0, g1);
}

/* ---------------------------------------------------------------------------------------------------------- */
/* thread pool                                                                                                 */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int pool_size = 0;  /* threads including the caller; 0: one per online CPU */
static pthread_t workers[MAX_THREADS];
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_cv = PTHREAD_COND_INITIALIZER;
static atomic_long pool_gen = 0;
static atomic_int pool_done = 0;
static atomic_int pool_sleepers = 0;
typedef void (*part_fn)(const void *arg, int part, int parts);
static part_fn pool_fn = NULL;  /* the job: every thread runs pool_fn(pool_arg, its part, pool_size) */
static const void *pool_arg = NULL;
static int pool_started = 0;
/* How long an idle worker spins before it sleeps (SPECMTP_SPIN_US overrides, in microseconds). Between a decode
   step's kernel calls the interpreter runs for up to a millisecond or two (a draft tree's bookkeeping, verification):
   a worker asleep by then costs the next call its wake-up (a drafter's first product in a round 149 us when workers
   slept after 20000 pauses, 0.2 ms here; 88 us when they spin 3 ms). */
static double spin_s = 3e-3;
/* Set by park(): torch's own thread pool is about to run (a prefill's products through oneDNN), and a worker
   spinning on a core it needs slows it about twofold (a 50-token prefill 80 -> 188 ms), so idle workers sleep at
   once until the next job. */
static atomic_int pool_park = 0;

static void gemm_part(const void *arg, int part, int parts) {  /* each thread: a contiguous range of row groups */
    const gemm_args *a = (const gemm_args *)arg;
    const int64_t groups = (a->n + 7) / 8, per = (groups + parts - 1) / parts;
    const int64_t g0 = per * part < groups ? per * part : groups;
    const int64_t g1 = per * (part + 1) < groups ? per * (part + 1) : groups;
    if (g0 < g1) run_rows(a, g0, g1);
}

static void *worker_main(void *arg) {
    const int id = (int)(intptr_t)arg;
    long seen = 0;
    for (;;) {
        long gen;
        long spins = 0;
        double since = 0.0;  /* when the spinning started (read at the first clock check) */
        while ((gen = atomic_load(&pool_gen)) == seen) {
            if (!atomic_load(&pool_park) &&
                (++spins % 256 != 0 || (since == 0.0 ? (since = now_s()) : since) + spin_s > now_s())) {
#ifdef SPECMTP_X86
                _mm_pause();
#endif
                continue;
            }
            pthread_mutex_lock(&pool_mu);
            atomic_fetch_add(&pool_sleepers, 1);
            while (atomic_load(&pool_gen) == seen) pthread_cond_wait(&pool_cv, &pool_mu);
            atomic_fetch_sub(&pool_sleepers, 1);
            pthread_mutex_unlock(&pool_mu);
        }
        seen = gen;
        pool_fn(pool_arg, id, pool_size);
        atomic_fetch_add(&pool_done, 1);
    }
    return NULL;
}

static void pool_start(int threads) {
    if (threads < 1) threads = (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (pool_started) return;  /* the size is fixed once workers exist */
    const char *spin = getenv("SPECMTP_SPIN_US");
    if (spin) spin_s = 1e-6 * atof(spin);
    pool_size = threads;
    for (int i = 1; i < pool_size; i++) pthread_create(&workers[i], NULL, worker_main, (void *)(intptr_t)i);
    pool_started = 1;
}

/* Run fn(arg, part, parts) on every thread of the pool (the caller is part 0); `work` small: on the caller only */
static void run_parts(part_fn fn, const void *arg, int64_t work) {
    if (!pool_started) pool_start(pool_size);
    if (pool_size <= 1 || work < (1 << 16)) {  /* small problems: not worth waking anyone */
        fn(arg, 0, 1);
        return;
    }
    atomic_store(&pool_park, 0);
    pool_fn = fn;
    pool_arg = arg;
    atomic_store(&pool_done, 0);
    pthread_mutex_lock(&pool_mu);
    atomic_fetch_add(&pool_gen, 1);
    if (atomic_load(&pool_sleepers)) pthread_cond_broadcast(&pool_cv);
    pthread_mutex_unlock(&pool_mu);
    fn(arg, 0, pool_size);
    while (atomic_load(&pool_done) < pool_size - 1) {
#ifdef SPECMTP_X86
        _mm_pause();
#endif
    }
}

static void run_parallel(const gemm_args *a) { run_parts(gemm_part, a, a->n * a->k * a->t); }

/* ---------------------------------------------------------------------------------------------------------- */
/* dense fp32 GEMV / small GEMM: y[t, n] = sum_k x[t, k] W[n, k] (+ bias) on the weights as torch holds them.  */
/* Decoding reads every weight once per token, so a step and a verify pass of a few tokens both stream W once: */
/* rows in tiles of 4, each tile's rows read from cache for every token (with AVX-512, 5 to 8 tokens take the  */
/* tile's rows in pairs, each pair streamed once for all of them; 1 to 4 tokens take the narrow tiles or that  */
/* one, whichever streams faster at the time: py_sgemm; with AVX2 alone, 3 or more tokens take rows 3 at a    */
/* time, 4 tokens a pass). Each (token, row) dot runs the same operations in the same order whatever T, the   */
/* tile, the tile's other rows or the thread split: batch-invariant.                                          */
/* Every tile prefetches the next tile's rows into L2 (_MM_HINT_T1), one line per row every 16 floats, while it */
/* computes. Into L1 (_MM_HINT_T0, as before session 34) the prefetches held L1's few miss buffers, and the    */
/* tiles streamed at 60-70% of the memory's rate: on a 2-core Zen 4 SmolLM2's 30 layers' products took 17.7 ms */
/* for 1 token and 20.8 for 8, against 13.9 and 14.1 ms into L2 (30 GB/s, the rate of a plain streaming read); */
/* Qwen2.5-Coder-1.5B's (6 layers) 39.4 / 51.7 against 35.8 / 38.4 ms. Two tiles ahead was no better.         */

typedef struct {
    const float *x, *w, *bias, *res;  /* res: [T, N] added last (may be y itself), or NULL */
    float *y;
    int64_t t, k, n;
    int wide;  /* 1 to 4 tokens in the 8-token tile (spare tokens repeat the first); 5 to 8 in the pair tile */
    const float *xp;  /* tokens in pairs (pair_tokens): 5 to 8 tokens (wide) at xp, width 8; groups of 9 to 16
                         tokens: tokens g .. g + 15 at xp + g K, width their pairs' (10 for 9 tokens) */
    int64_t chunk;  /* row tiles a claim takes (0: each thread one contiguous share, as one call: sgemm_part) */
    atomic_long claimed;  /* chunks claimed so far */
} sgemm_args;

/* the vector paths' order, without fused multiply-adds (so not their bits; linear.py uses it only in tests) */
static float sdot_scalar(const float *w, const float *x, int64_t k) {
    float lane[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= k; i += 8)
        for (int j = 0; j < 8; j++) lane[j] += w[i + j] * x[i + j];
    float acc = 0.0f;
    for (int j = 0; j < 8; j++) acc += lane[j];
    for (; i < k; i++) acc += w[i] * x[i];
    return acc;
}

#ifdef SPECMTP_X86
/* One (row, token) sum: its 8 lanes added in order, then the products past the last whole chunk (from i on). Every
   tile ends each of its sums this way, so they all give the same bits. */
__attribute__((target("avx2,fma"))) static inline float lane_sum(__m256 acc, const float *w, const float *x,
                                                                  int64_t i, int64_t k) {
    float l[8];
    _mm256_storeu_ps(l, acc);
    float s = 0.0f;
    for (int j = 0; j < 8; j++) s += l[j];
    for (int64_t m = i; m < k; m++) s += w[m] * x[m];
    return s;
}

/* 4 rows x 2 tokens: one 8-lane accumulator per (row, token), each weight chunk loaded once for both tokens */
__attribute__((target("avx2,fma"))) static void sdot_tile_avx2(const float *const *w, const float *x0,
                                                               const float *x1, int64_t k, float *out,
                                                               const float *const *next) {
    __m256 a0[4], a1[4];
    for (int r = 0; r < 4; r++) a0[r] = a1[r] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
        if (next && (i & 15) == 0)  /* the next tile's rows, one cache line each, while this one computes */
            for (int r = 0; r < 4; r++) _mm_prefetch((const char *)(next[r] + i), _MM_HINT_T1);
        const __m256 v0 = _mm256_loadu_ps(x0 + i), v1 = _mm256_loadu_ps(x1 + i);
        for (int r = 0; r < 4; r++) {
            const __m256 wv = _mm256_loadu_ps(w[r] + i);
            a0[r] = _mm256_fmadd_ps(wv, v0, a0[r]);
            a1[r] = _mm256_fmadd_ps(wv, v1, a1[r]);
        }
    }
    for (int r = 0; r < 4; r++) {
        out[r] = lane_sum(a0[r], w[r], x0, i, k);
        out[4 + r] = lane_sum(a1[r], w[r], x1, i, k);
    }
}

/* 3 rows x 4 tokens in AVX2's 16 vector registers: 12 accumulators, the rows' 3 chunks and one token chunk at a
   time (7 loads for 12 multiply-adds, against 6 for 8 in the 4 x 2 tile), so a verify pass of 3 or 4 tokens
   streams each weight chunk from memory once and uses it for all its tokens, where the 4 x 2 tile streamed it
   for the first pair, then recomputed from cache with the memory idle. On a 2-core AMD EPYC without AVX-512,
   SmolLM2-135M's whole-stack pass (fp32, 2 threads, medians of 40 interleaved) of 4 / 6 / 8 tokens took 34.4 /
   44.0 / 54.7 ms with the 4 x 2 tile and 27.5 / 36.8 / 44.3 ms with this one (one token: 27.7 ms). 1 or 2 tokens
   left over take it with U = 2. Past 4 tokens the rows are read again from cache, so each pass prefetches its
   share of the next tile (pass p of P: every P-th line from the p-th), keeping the memory busy through every pass
   (6 / 8 tokens: 3-5% faster than prefetching in the first pass only). The same FMAs and reduction per (row,
   token) as sdot_tile_avx2: the same bits. out[3 u + r]. */
__attribute__((target("avx2,fma"), always_inline)) static inline void sdot_tile3_avx2(
    const float *const *w, const float *const *x, int64_t k, float *out, const float *const *next, const int U,
    int64_t pass, int64_t passes) {
    __m256 acc[3][4];
    for (int r = 0; r < 3; r++)
        for (int u = 0; u < U; u++) acc[r][u] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
        if (next && (i & 15) == 0 && (i >> 4) % passes == pass)
            for (int r = 0; r < 3; r++) _mm_prefetch((const char *)(next[r] + i), _MM_HINT_T1);
        const __m256 w0 = _mm256_loadu_ps(w[0] + i), w1 = _mm256_loadu_ps(w[1] + i), w2 = _mm256_loadu_ps(w[2] + i);
        for (int u = 0; u < U; u++) {
            const __m256 v = _mm256_loadu_ps(x[u] + i);
            acc[0][u] = _mm256_fmadd_ps(w0, v, acc[0][u]);
            acc[1][u] = _mm256_fmadd_ps(w1, v, acc[1][u]);
            acc[2][u] = _mm256_fmadd_ps(w2, v, acc[2][u]);
        }
    }
    for (int u = 0; u < U; u++)
        for (int r = 0; r < 3; r++) out[3 * u + r] = lane_sum(acc[r][u], w[r], x[u], i, k);
}

__attribute__((target("avx2,fma"))) static void sdot_tile4x3_avx2(const float *const *w, const float *const *x,
                                                                  int64_t k, float *out, const float *const *next,
                                                                  int64_t pass, int64_t passes) {
    sdot_tile3_avx2(w, x, k, out, next, 4, pass, passes);
}

/* the 3-row tile for the last 1 or 2 tokens of a group of 4 */
__attribute__((target("avx2,fma"))) static void sdot_tile2x3_avx2(const float *const *w, const float *const *x,
                                                                  int64_t k, float *out, const float *const *next,
                                                                  int64_t pass, int64_t passes) {
    sdot_tile3_avx2(w, x, k, out, next, 2, pass, passes);
}

/* 4 rows x 4 tokens where AVX-512VL gives 32 vector registers: 16 accumulators, each weight chunk loaded once
   for four tokens. Each (row, token) sum runs the same FMAs and the same reduction as sdot_tile_avx2: the same
   bits whichever tile computed it. */
__attribute__((target("avx2,fma,avx512f,avx512vl"))) static void sdot_tile4_avx512(
    const float *const *w, const float *const *x, int64_t k, float *out, const float *const *next) {
    __m256 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int u = 0; u < 4; u++) acc[r][u] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
        if (next && (i & 15) == 0)
            for (int r = 0; r < 4; r++) _mm_prefetch((const char *)(next[r] + i), _MM_HINT_T1);
        __m256 v[4];
        for (int u = 0; u < 4; u++) v[u] = _mm256_loadu_ps(x[u] + i);
        for (int r = 0; r < 4; r++) {
            const __m256 wv = _mm256_loadu_ps(w[r] + i);
            for (int u = 0; u < 4; u++) acc[r][u] = _mm256_fmadd_ps(wv, v[u], acc[r][u]);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int u = 0; u < 4; u++) out[4 * u + r] = lane_sum(acc[r][u], w[r], x[u], i, k);
}

/* One row's 8 token sums at once, each in lane_sum's order: the accumulators transposed so that vector j holds every
   token's lane j, added from lane 0 to lane 7 (after 0.0f, where lane_sum starts), then each token's products past
   the last whole chunk. The same additions in the same order as lane_sum: the same bits. */
__attribute__((target("avx2,fma,avx512f,avx512vl"))) static inline void lane_sums8(const __m256 *a, const float *w,
                                                                                  const float *const *x, int64_t i,
                                                                                  int64_t k, float *s) {
    const __m256 t0 = _mm256_unpacklo_ps(a[0], a[1]), t1 = _mm256_unpackhi_ps(a[0], a[1]);
    const __m256 t2 = _mm256_unpacklo_ps(a[2], a[3]), t3 = _mm256_unpackhi_ps(a[2], a[3]);
    const __m256 t4 = _mm256_unpacklo_ps(a[4], a[5]), t5 = _mm256_unpackhi_ps(a[4], a[5]);
    const __m256 t6 = _mm256_unpacklo_ps(a[6], a[7]), t7 = _mm256_unpackhi_ps(a[6], a[7]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);  /* lanes 0|4, 1|5 */
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);  /* lanes 2|6, 3|7 */
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    __m256 sum = _mm256_add_ps(_mm256_setzero_ps(), _mm256_permute2f128_ps(u0, u4, 0x20));
    sum = _mm256_add_ps(sum, _mm256_permute2f128_ps(u1, u5, 0x20));
    sum = _mm256_add_ps(sum, _mm256_permute2f128_ps(u2, u6, 0x20));
    sum = _mm256_add_ps(sum, _mm256_permute2f128_ps(u3, u7, 0x20));
    sum = _mm256_add_ps(sum, _mm256_permute2f128_ps(u0, u4, 0x31));
    sum = _mm256_add_ps(sum, _mm256_permute2f128_ps(u1, u5, 0x31));
    sum = _mm256_add_ps(sum, _mm256_permute2f128_ps(u2, u6, 0x31));
    sum = _mm256_add_ps(sum, _mm256_permute2f128_ps(u3, u7, 0x31));
    _mm256_storeu_ps(s, sum);
    for (int u = 0; u < 8; u++)
        for (int64_t m = i; m < k; m++) s[u] += w[m] * x[u][m];
}

/* 3 rows x 8 tokens where AVX-512VL gives 32 vector registers: 24 accumulators, the rows' 3 chunks and one token
   chunk at a time, so a verify pass of 5 to 8 tokens streams each weight chunk from memory once and uses it for all
   its tokens (two 4-token passes would stream it, then recompute from cache with the memory idle), and each token
   chunk read from cache serves 3 rows: with K = 1536 the 8 tokens (48 KB) no longer fit in L1, and with 2 rows a
   tile (the previous tile) Qwen2.5-Coder-1.5B's 8-token products ran 22% slower than one token's, with 3 rows 6%.
   The same FMAs and reduction per (row, token) as sdot_tile_avx2: the same bits. */
__attribute__((target("avx2,fma,avx512f,avx512vl"), always_inline)) static inline void sdot_tile_u3(
    const float *const *w, const float *const *x, int64_t k, float *out, const float *const *next, const int U) {
    __m256 acc[3][8];
    for (int r = 0; r < 3; r++)
        for (int u = 0; u < 8; u++) acc[r][u] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
        if (next && (i & 15) == 0)
            for (int r = 0; r < 3; r++) _mm_prefetch((const char *)(next[r] + i), _MM_HINT_T1);
        const __m256 w0 = _mm256_loadu_ps(w[0] + i), w1 = _mm256_loadu_ps(w[1] + i), w2 = _mm256_loadu_ps(w[2] + i);
        for (int u = 0; u < U; u++) {
            __m256 v = _mm256_loadu_ps(x[u] + i);
            __asm__("" : "+v"(v));  /* in a register: folded into the FMAs, it would be loaded three times (the loop is
                                       then bound by loads, not by its multiply-adds) */
            acc[0][u] = _mm256_fmadd_ps(w0, v, acc[0][u]);
            acc[1][u] = _mm256_fmadd_ps(w1, v, acc[1][u]);
            acc[2][u] = _mm256_fmadd_ps(w2, v, acc[2][u]);
        }
    }
    for (int r = 0; r < 3; r++) {  /* tokens past U: zero sums, not stored */
        float sums[8];
        lane_sums8(acc[r], w[r], x, i, k, sums);
        for (int u = 0; u < U; u++) out[3 * u + r] = sums[u];
    }
}

/* The 3-row tile for exactly U of 1 to 8 tokens: 3U multiply-adds a chunk, none for spare tokens (with 5 tokens the
   8-token tile did 24, 9 of them for spares, and the pair tile 9 512-bit ones, the work of 18 on a Zen 4's 256-bit
   units). lane_sums8 reads x[u] past U only for the products past the last whole chunk: the caller's x has 8
   entries. */
__attribute__((target("avx2,fma,avx512f,avx512vl"))) static void sdot_tile3_u(const float *const *w,
                                                                             const float *const *x, int64_t k,
                                                                             float *out, const float *const *next,
                                                                             int64_t u) {
    switch (u) {
        case 1: sdot_tile_u3(w, x, k, out, next, 1); break;
        case 2: sdot_tile_u3(w, x, k, out, next, 2); break;
        case 3: sdot_tile_u3(w, x, k, out, next, 3); break;
        case 4: sdot_tile_u3(w, x, k, out, next, 4); break;
        case 5: sdot_tile_u3(w, x, k, out, next, 5); break;
        case 6: sdot_tile_u3(w, x, k, out, next, 6); break;
        case 7: sdot_tile_u3(w, x, k, out, next, 7); break;
        default: sdot_tile_u3(w, x, k, out, next, 8); break;
    }
}

/* The 16-token tile's pairs for a group of `tokens` (9 to 16 of them; more: 16): the width its tokens are laid out
   at (pair_tokens) and the pairs the tile reads, one number for both. */
static inline int tile16_pairs(int64_t tokens) { return (int)((tokens < 16 ? tokens : 16) + 1) / 2; }

/* The pair tiles' tokens in pairs: chunk c of K (8 floats) of tokens g .. g + width - 1 side by side,
   [K / 8][width][8], so one 512-bit load holds the same 8 floats of two tokens (spares: token g again). */
static void pair_tokens(const float *x, int64_t t, int64_t k, int64_t g, int width, float *out) {
    for (int u = 0; u < width; u++) {
        const float *row = x + (g + u < t ? g + u : g) * k;
        for (int64_t c = 0; c < k / 8; c++) memcpy(out + (c * width + u) * 8, row + c * 8, 8 * sizeof(float));
    }
}

/* 3 rows x 5 to 8 tokens in 512-bit pairs (P = 3 or 4 pairs; the other tile for these tokens, whichever streams
   faster at the time: sgemm_run): 3P accumulators, each row's chunk broadcast to both halves, half the
   multiply-add instructions of the 8-token 3-row tile and for 5 or 6 tokens no spare pair. On an Intel Xeon whose 2
   cores stream about 28 GB/s, SmolLM2's layer products for 5 to 8 tokens ran 3-8% faster through it; on the AMD
   machine of session 23 a 4-pair version ran 5% slower. xp: pair_tokens' layout of width 8. Each lane sees the FMAs
   of sdot_tile_avx2's lane in the same order, and lane_sums8 reduces it the same way: the same bits. */
__attribute__((target("avx2,fma,avx512f,avx512vl"), always_inline)) static inline void sdot_tile8p(
    const float *const *w, const float *xp, const float *const *x, int64_t k, float *out, const float *const *next,
    const int pairs) {
    __m512 acc[3][4];
    for (int r = 0; r < 3; r++)
        for (int u = 0; u < pairs; u++) acc[r][u] = _mm512_setzero_ps();
    const int64_t chunks = k / 8;
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t i = c * 8;
        if (next && (i & 15) == 0)
            for (int r = 0; r < 3; r++) _mm_prefetch((const char *)(next[r] + i), _MM_HINT_T1);
        __m512 wv[3];
        for (int r = 0; r < 3; r++)  /* the chunk in both halves */
            wv[r] = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(w[r] + i))));
        for (int u = 0; u < pairs; u++) {
            __m512 v = _mm512_load_ps(xp + (c * 8 + 2 * u) * 8);
            __asm__("" : "+v"(v));  /* loaded once for the three rows (as in sdot_tile_u3) */
            for (int r = 0; r < 3; r++) acc[r][u] = _mm512_fmadd_ps(wv[r], v, acc[r][u]);
        }
    }
    for (int r = 0; r < 3; r++) {
        __m256 lanes[8];  /* token 2u in the low half, 2u + 1 in the high one; missing pairs: zeros, not stored */
        for (int u = 0; u < 4; u++) {
            if (u < pairs) {
                lanes[2 * u] = _mm512_castps512_ps256(acc[r][u]);
                lanes[2 * u + 1] = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[r][u]), 1));
            } else {
                lanes[2 * u] = lanes[2 * u + 1] = _mm256_setzero_ps();
            }
        }
        float sums[8];
        lane_sums8(lanes, w[r], x, chunks * 8, k, sums);
        for (int u = 0; u < 2 * pairs; u++) out[3 * u + r] = sums[u];
    }
}
__attribute__((target("avx2,fma,avx512f,avx512vl"))) static void sdot_tile6p_avx512(
    const float *const *w, const float *xp, const float *const *x, int64_t k, float *out, const float *const *next) {
    sdot_tile8p(w, xp, x, k, out, next, 3);
}
__attribute__((target("avx2,fma,avx512f,avx512vl"))) static void sdot_tile8p_avx512(
    const float *const *w, const float *xp, const float *const *x, int64_t k, float *out, const float *const *next) {
    sdot_tile8p(w, xp, x, k, out, next, 4);
}

/* 3 rows x 16 tokens (9 to 16 tokens of a verify pass or a batch): one 512-bit accumulator per (row, token pair)
   holds the two tokens' 8-lane sums side by side, each row's 8-float chunk broadcast to both halves: 24
   accumulators, twice the multiply-adds per instruction of the 8-token tile's 8-lane ones. Two 8-token passes
   cost 1.7-1.9x one token's on SmolLM2's layers and Qwen2.5-Coder-1.5B's, this tile 1.3-1.35x. (With 4 pairs for 5
   to 8 tokens it ran 5% slower than the 8-token 3-row tile, 1.12x one token's.) xp: pair_tokens' layout with the
   width of the tile's pairs, packed. (Read at a stride of 16 tokens, 5 to 7 pairs left 3 to 1 of every 8 cache lines
   unread, and Qwen2.5-Coder-1.5B's products for 9 to 12 tokens took 1.7x one token's, more than 16 tokens' 1.45x;
   packed, 1.2-1.3x.)
   x: the tokens' rows, for the products past the last whole chunk. Each lane sees the FMAs of sdot_tile_avx2's
   lane in the same order, and lane_sums8 reduces it the same way: the same bits. */
__attribute__((target("avx2,fma,avx512f,avx512vl"), always_inline)) static inline void sdot_tile16p(
    const float *const *w, const float *xp, const float *const *x, int64_t k, float *out, const float *const *next,
    const int pairs) {
    __m512 acc[3][8];
    for (int r = 0; r < 3; r++)
        for (int u = 0; u < 8; u++) acc[r][u] = _mm512_setzero_ps();
    const int64_t chunks = k / 8;
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t i = c * 8;
        if (next && (i & 15) == 0)
            for (int r = 0; r < 3; r++) _mm_prefetch((const char *)(next[r] + i), _MM_HINT_T1);
        __m512 wv[3];
        for (int r = 0; r < 3; r++)  /* the chunk in both halves */
            wv[r] = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(w[r] + i))));
        for (int u = 0; u < pairs; u++) {
            __m512 v = _mm512_load_ps(xp + (c * 2 * pairs + 2 * u) * 8);
            __asm__("" : "+v"(v));  /* loaded once for the three rows (as in sdot_tile_u3) */
            for (int r = 0; r < 3; r++) acc[r][u] = _mm512_fmadd_ps(wv[r], v, acc[r][u]);
        }
    }
    for (int r = 0; r < 3; r++) {
        __m256 lanes[16];  /* token 2u in the low half, 2u + 1 in the high one; pairs past `pairs`: zeros */
        for (int u = 0; u < 8; u++) {
            lanes[2 * u] = _mm512_castps512_ps256(acc[r][u]);
            lanes[2 * u + 1] = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[r][u]), 1));
        }
        for (int h = 0; h < 2 && 8 * h < 2 * pairs; h++) {
            float sums[8];
            lane_sums8(lanes + 8 * h, w[r], x + 8 * h, chunks * 8, k, sums);
            for (int u = 0; u < 8 && 8 * h + u < 2 * pairs; u++) out[3 * (8 * h + u) + r] = sums[u];
        }
    }
}

/* The 16-token tile for 9 to 16 tokens in exactly their pairs (5 to 8): a 9-token verify pass (a tree of 8 drafts)
   does 15 multiply-adds a chunk, not 24. x: 16 entries (lane_sums8 reads a spare's row past the last whole chunk);
   xp: pair_tokens' layout of width 2 * tile16_pairs(tokens). */
__attribute__((target("avx2,fma,avx512f,avx512vl"))) static void sdot_tile16x3_avx512(
    const float *const *w, const float *xp, const float *const *x, int64_t k, float *out, const float *const *next,
    int64_t tokens) {
    switch (tile16_pairs(tokens)) {
        case 5: sdot_tile16p(w, xp, x, k, out, next, 5); break;
        case 6: sdot_tile16p(w, xp, x, k, out, next, 6); break;
        case 7: sdot_tile16p(w, xp, x, k, out, next, 7); break;
        default: sdot_tile16p(w, xp, x, k, out, next, 8); break;
    }
}
#endif

static int tile_mode = -1;  /* -1: measured; 0: always narrow (8-token tile for 5-8; with AVX2 alone, the 4 x 2 tile
                                for every count); 1: always wide (8-token tile for 1-4, pair tile for 5-8) (tests,
                                benchmarks) */

/* y = sum + bias (+ res): the per-layer path's `x + linear(...)`, the same two additions */
static inline void sgemm_store(const sgemm_args *a, int64_t t, int64_t n, float sum) {
    const int64_t at = t * a->n + n;
    const float y = sum + (a->bias ? a->bias[n] : 0.0f);
    a->y[at] = a->res ? a->res[at] + y : y;
}

#ifdef SPECMTP_X86
/* sgemm_store for a tile's sums of tokens g .. g + nt - 1 (out[w u + r], rows n0 .. n0 + nr - 1, nr <= w <= 4): each
   token's results in one masked vector, the same two additions per element as sgemm_store (the same bits). Written
   one element at a time, the 3-row tiles' stores took a tenth of an 8-token pass's product time. */
__attribute__((target("avx2,fma,avx512f,avx512vl"))) static void sgemm_store_tile(const sgemm_args *a, int64_t g,
                                                                                  int64_t nt, int64_t n0, int nr,
                                                                                  const float *out, int w) {
    const __mmask8 m = (__mmask8)((1u << nr) - 1);
    const __m128 b = a->bias ? _mm_maskz_loadu_ps(m, a->bias + n0) : _mm_setzero_ps();
    for (int64_t u = 0; u < nt; u++) {
        const int64_t at = (g + u) * a->n + n0;
        __m128 y = _mm_add_ps(_mm_maskz_loadu_ps(m, out + w * u), b);
        if (a->res) y = _mm_add_ps(_mm_maskz_loadu_ps(m, a->res + at), y);
        _mm_mask_storeu_ps(a->y + at, m, y);
    }
}
#endif

/* Row tiles t0 .. t1 - 1 of 4 rows each (the last one may be short) for every token. */
static void sgemm_range(const sgemm_args *a, int64_t t0, int64_t t1) {
#ifdef SPECMTP_X86
    if (isa == ISA_VNNI && (a->wide || a->t >= 5)) {  /* the thread's rows 3 at a time (spares: n0 again), each tile
                                                         over every group of 8 tokens while its rows are in cache */
        const int64_t r0 = t0 * 4, r1 = t1 * 4 < a->n ? t1 * 4 : a->n;
        for (int64_t n0 = r0; n0 < r1; n0 += 3) {
            const float *w[3], *next[3];
            for (int r = 0; r < 3; r++) {
                w[r] = a->w + (n0 + r < r1 ? n0 + r : n0) * a->k;
                next[r] = a->w + (n0 + 3 + r < r1 ? n0 + 3 + r : n0) * a->k;
            }
            for (int64_t g = 0; g < a->t; g += 16) {  /* up to 16 tokens at a time */
                const float *x[16];
                for (int u = 0; u < 16; u++) x[u] = a->x + (g + u < a->t ? g + u : g) * a->k;  /* spares: g again */
                float out[48];
                const float *const *pf = g == 0 && n0 + 3 < r1 ? next : NULL;
                if (a->t - g > 8)
                    sdot_tile16x3_avx512(w, a->xp + g * a->k, x, a->k, out, pf, a->t - g < 16 ? a->t - g : 16);
                else if (a->wide && a->t >= 5 && a->t <= 6)
                    sdot_tile6p_avx512(w, a->xp, x, a->k, out, pf);
                else if (a->wide && a->t >= 7 && a->t <= 8)
                    sdot_tile8p_avx512(w, a->xp, x, a->k, out, pf);
                else
                    sdot_tile3_u(w, x, a->k, out, pf, a->t - g);
                sgemm_store_tile(a, g, a->t - g < 16 ? a->t - g : 16, n0, r1 - n0 < 3 ? (int)(r1 - n0) : 3, out, 3);
            }
        }
        return;  /* every token done */
    }
    if (isa == ISA_AVX2 && a->t >= 3 && tile_mode != 0) {  /* the thread's rows 3 at a time, each tile over
                                                               every group of 4 tokens */
        const int64_t r0 = t0 * 4, r1 = t1 * 4 < a->n ? t1 * 4 : a->n;
        for (int64_t n0 = r0; n0 < r1; n0 += 3) {
            const float *w[3], *next[3];
            for (int r = 0; r < 3; r++) {
                w[r] = a->w + (n0 + r < r1 ? n0 + r : n0) * a->k;  /* spare rows: n0 again */
                next[r] = a->w + (n0 + 3 + r < r1 ? n0 + 3 + r : n0) * a->k;
            }
            for (int64_t g = 0; g < a->t; g += 4) {
                const float *x[4];
                for (int u = 0; u < 4; u++) x[u] = a->x + (g + u < a->t ? g + u : g) * a->k;  /* spares: g again */
                float out[12];
                const float *const *pf = n0 + 3 < r1 ? next : NULL;
                const int64_t pass = g / 4, passes = (a->t + 3) / 4;
                if (a->t - g <= 2)
                    sdot_tile2x3_avx2(w, x, a->k, out, pf, pass, passes);
                else
                    sdot_tile4x3_avx2(w, x, a->k, out, pf, pass, passes);
                for (int u = 0; u < 4 && g + u < a->t; u++)
                    for (int r = 0; r < 3 && n0 + r < r1; r++) sgemm_store(a, g + u, n0 + r, out[3 * u + r]);
            }
        }
        return;
    }
#endif
    for (int64_t tile = t0; tile < t1; tile++) {
        const int64_t n0 = tile * 4;
        const float *w[4];
        for (int r = 0; r < 4; r++) w[r] = a->w + (n0 + r < a->n ? n0 + r : n0) * a->k;  /* spare rows: n0 again */
        const float *next[4];
        for (int r = 0; r < 4; r++) next[r] = a->w + (n0 + 4 + r < a->n ? n0 + 4 + r : n0) * a->k;
        int64_t t = 0;
#ifdef SPECMTP_X86
        for (; isa == ISA_VNNI && t + 3 <= a->t; t += 4) {  /* 3 or 4 tokens at a time (a spare one: t again) */
            const float *x[4], *const *pf = t == 0 && tile + 1 < t1 ? next : NULL;
            for (int u = 0; u < 4; u++) x[u] = a->x + (t + u < a->t ? t + u : t) * a->k;
            float out[16];
            sdot_tile4_avx512(w, x, a->k, out, pf);
            sgemm_store_tile(a, t, a->t - t < 4 ? a->t - t : 4, n0, a->n - n0 < 4 ? (int)(a->n - n0) : 4, out, 4);
        }
#endif
        for (; t < a->t; t += 2) {
            const float *x0 = a->x + t * a->k, *x1 = t + 1 < a->t ? x0 + a->k : x0;  /* a spare token: t again */
            float out[8];
#ifdef SPECMTP_X86
            if (use_avx2) {
                sdot_tile_avx2(w, x0, x1, a->k, out, t == 0 && tile + 1 < t1 ? next : NULL);
            } else
#endif
            {
                for (int r = 0; r < 4; r++) {
                    out[r] = sdot_scalar(w[r], x0, a->k);
                    out[4 + r] = sdot_scalar(w[r], x1, a->k);
                }
            }
            for (int u = 0; u < 2 && t + u < a->t; u++)
                for (int r = 0; r < 4 && n0 + r < a->n; r++)
                    sgemm_store(a, t + u, n0 + r, out[4 * u + r]);
        }
    }
}

/* Each thread claims chunks of row tiles until none is left, so a call ends when the work is done, not when its
   slower thread's half is: on a virtual machine one core often runs slower than the other (another tenant on its
   host thread), and with a fixed half each the faster one waited at every call's end. a->chunk 0: one contiguous
   share each. Which thread computes a row never changes its bits. */
static void sgemm_part(const void *arg, int part, int parts) {
    sgemm_args *a = (sgemm_args *)arg;
    const int64_t tiles = (a->n + 3) / 4;
    if (a->chunk <= 0 || parts == 1) {
        const int64_t per = (tiles + parts - 1) / parts;
        const int64_t t0 = per * part < tiles ? per * part : tiles;
        const int64_t t1 = per * (part + 1) < tiles ? per * (part + 1) : tiles;
        sgemm_range(a, t0, t1);
        return;
    }
    for (;;) {
        const int64_t t0 = (int64_t)atomic_fetch_add(&a->claimed, 1) * a->chunk;
        if (t0 >= tiles) return;
        sgemm_range(a, t0, t0 + a->chunk < tiles ? t0 + a->chunk : tiles);
    }
}

/* Which tile takes 1-2 and 3-4 tokens where the 8-token tile exists: the narrow ones (4 rows x 2 or 4 tokens) or
   the 8-token tile with spare tokens; and 5-8 tokens: the 8-token tile or the pair tile. They give the same bits,
   not the same speed: on a 2-core Zen 4 the narrow tiles stream weights faster while memory is fast (the 8-token
   tile is then bound by its multiply-adds) and slower while it is slow (another tenant's traffic), by 10-25% either
   way, and that changes from minute to minute. So the choice is measured as it runs: per weight shape and token
   class, a moving average of each tile's time per weight, the one not in use timed every 16th call. */
#define TUNE_SLOTS 64
typedef struct {
    int64_t n, k;
    double cost[3][2];  /* [class: 1-2, 3-4, 5-8 tokens][narrow, wide] seconds per weight; 0: not yet measured */
    uint32_t calls[3];
} tune_slot;
static tune_slot tune[TUNE_SLOTS];
static int tune_used = 0;

static tune_slot *tune_find(int64_t n, int64_t k) {
    for (int i = 0; i < tune_used; i++)
        if (tune[i].n == n && tune[i].k == k) return &tune[i];
    if (tune_used == TUNE_SLOTS) return NULL;  /* more shapes than slots: the rest stay narrow */
    tune[tune_used] = (tune_slot){.n = n, .k = k};
    return &tune[tune_used++];
}

static int sgemm_chunks = -1;  /* claims per thread a call aims at (SPECMTP_CHUNKS; 0: fixed halves) */

/* Row tiles a claim takes: about sgemm_chunks claims per thread, in multiples of 3 tiles (12 rows: the 3-row tiles
   of 5 or more tokens then need no spare rows inside a call). */
static int64_t sgemm_chunk(int64_t n) {
    if (sgemm_chunks < 0) {
        const char *env = getenv("SPECMTP_CHUNKS");
        sgemm_chunks = env ? atoi(env) : 6;
    }
    if (!pool_started) pool_start(pool_size);
    if (sgemm_chunks == 0 || pool_size <= 1) return 0;
    const int64_t tiles = (n + 3) / 4, per = (tiles + (int64_t)pool_size * sgemm_chunks - 1) / ((int64_t)pool_size * sgemm_chunks);
    return per < 3 ? 3 : (per + 2) / 3 * 3;
}

static float *scratch_xp = NULL;  /* the 16-token tile's tokens in pairs (64-byte aligned) */
static int64_t scratch_xp_cap = 0;

/* y[T, N] = x[T, K] @ W[N, K]^T (+ bias) (+ res) on the pool, with the measured tile choice above. 0, or -1 when
   the scratch memory cannot be had. */
static int sgemm_run(const float *x, int64_t t, int64_t k, const float *w, const float *bias, float *y, int64_t n,
                      const float *res) {
    sgemm_args a = {x, w, bias, res, y, t, k, n, 0};
    a.chunk = sgemm_chunk(n);
    tune_slot *slot = NULL;
    const int cls = t <= 2 ? 0 : t <= 4 ? 1 : 2;
    if (isa == ISA_VNNI && t <= 8) {
        if (tile_mode >= 0)
            a.wide = tile_mode;
        else if ((slot = tune_find(n, k)) != NULL) {
            const double *c = slot->cost[cls];
            const int best = c[1] > 0 && c[0] > 0 && c[1] < c[0];
            a.wide = c[0] == 0 ? 0 : c[1] == 0 ? 1 : ++slot->calls[cls] % 16 == 0 ? !best : best;
        }
    }
#ifdef SPECMTP_X86
    if (isa == ISA_VNNI && t >= 9) {  /* the 16-token tile reads its tokens in pairs */
        if (GROW(scratch_xp, scratch_xp_cap, (t + 15) / 16 * 16 * k)) return -1;
        for (int64_t g = 0; g + 8 < t; g += 16)
            pair_tokens(x, t, k, g, 2 * tile16_pairs(t - g), scratch_xp + g * k);
        a.xp = scratch_xp;
    } else if (isa == ISA_VNNI && t >= 5 && a.wide) {  /* so does the pair tile */
        if (GROW(scratch_xp, scratch_xp_cap, 8 * k)) return -1;
        pair_tokens(x, t, k, 0, 8, scratch_xp);
        a.xp = scratch_xp;
    }
#endif
    const double start = slot ? now_s() : 0.0;
    run_parts(sgemm_part, &a, n * k * t);
    if (slot) {  /* an interrupted call counts at most 4x the average */
        double *c = &slot->cost[cls][a.wide], dt = (now_s() - start) / (double)(n * k);
        *c = *c == 0 ? dt : *c + ((dt < 4 * *c ? dt : 4 * *c) - *c) / 8;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------- */
/* attention of one sequence's new tokens (quantized mode, Llama/Qwen2 layers): RoPE on q and k, K/V written  */
/* into the cache, then each query over exactly the slots a one-token step at its position reads. Every      */
/* (token, head) is computed by the same code whatever the number of tokens or threads: batch-invariant.      */
/* A draft tree: token i sits in slot pos0 + i at position pos0 + depth(i) and sees the slots before pos0 and  */
/* its ancestors' slots (and its own), in ascending position: a chain's slots, in a chain's order, so a token */
/* of the accepted path is computed bit for bit as a one-token step at its position would compute it.       */

#define MAX_TREE 64
typedef struct {
    float *qkv;            /* [T, (Hq + 2 Hkv) D]: q and k are rotated in place */
    const float *cos, *sin;  /* [T, D] */
    float *kc, *vc;        /* the layer's cache for this row: [Hkv, S, D] */
    float *out;            /* [T, Hq D] */
    float *scores;         /* [threads, ATT_QC, S] scratch */
    int64_t t, hq, hkv, d, s, pos0, window;  /* window 0: none */
    float scale;
    const int32_t *depth;  /* [T] each token's position - pos0 */
    const int32_t *path;   /* [T, MAX_TREE] row i: the tokens (indices) token i sees, root first, itself last */
} attn_args;

/* One query of attend_queries: its visible slots, j = 0 .. n - 1 in ascending position: [lo, lo + pre) of the
 * cache (the slots before pos0 it sees), then the path's tokens from index skip on (slots pos0 + path[...]). */
typedef struct {
    const float *q;
    float *o, *sc;
    int64_t lo, pre, skip, n;
    const int32_t *path;
    float inv;
} att_query;

static void rope_row(float *x, const float *cos, const float *sin, int64_t d) {
    const int64_t h = d / 2;
    for (int64_t j = 0; j < h; j++) {  /* x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1) */
        const float a = x[j], b = x[j + h];
        x[j] = a * cos[j] - b * sin[j];
        x[j + h] = b * cos[j + h] + a * sin[j + h];
    }
}

static float dot_scalar(const float *a, const float *b, int64_t d) {
    float s = 0.0f;
    for (int64_t j = 0; j < d; j++) s += a[j] * b[j];
    return s;
}

static void axpy_scalar(float *y, float w, const float *x, int64_t d) {
    for (int64_t j = 0; j < d; j++) y[j] += w * x[j];
}

#ifdef SPECMTP_X86
/* Per lane u of 32 (4 vectors, so 4 independent compare-and-blend chains): the largest of x[u], x[u + 32], ... over
 * the whole 32-float chunks of x[n], and its first index */
__attribute__((target("avx2,fma,f16c"))) static void argmax_avx2(const float *x, int64_t n, float *best, int32_t *at) {
    __m256 bv[4];
    __m256i bi[4], idx[4];
    for (int c = 0; c < 4; c++) {
        bv[c] = _mm256_set1_ps(-INFINITY);
        bi[c] = _mm256_setzero_si256();
        idx[c] = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(8 * c));
    }
    const __m256i step = _mm256_set1_epi32(32);
    for (int64_t j = 0; j + 32 <= n; j += 32)
        for (int c = 0; c < 4; c++) {
            const __m256 v = _mm256_loadu_ps(x + j + 8 * c);
            const __m256 gt = _mm256_cmp_ps(v, bv[c], _CMP_GT_OQ);  /* strictly greater: ties keep the earlier index */
            bv[c] = _mm256_blendv_ps(bv[c], v, gt);
            bi[c] = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(bi[c]), _mm256_castsi256_ps(idx[c]), gt));
            idx[c] = _mm256_add_epi32(idx[c], step);
        }
    for (int c = 0; c < 4; c++) {
        _mm256_storeu_ps(best + 8 * c, bv[c]);
        _mm256_storeu_si256((__m256i *)(at + 8 * c), bi[c]);
    }
}

__attribute__((target("avx2,fma,f16c"))) static float dot_avx2(const float *a, const float *b, int64_t d) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = 0; j < d; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc);
    return hsum(acc);
}

#endif

#ifdef SPECMTP_X86
/* exp(x) for x <= 0, 8 lanes: x = n ln2 + r (|r| <= ln2 / 2, Cody-Waite split of ln2), e^r by its degree-6 Taylor
 * polynomial (Horner, fused multiply-adds; the first term left out, r^7 / 7!, is under 2e-7 of the result), times
 * 2^n through the exponent bits; 0 below -87 (where 2^n would be subnormal). The same bits for the same input
 * whatever the lane or the call. */
__attribute__((target("avx2,fma,f16c"))) static inline __m256 exp_neg_avx2(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.0f), xc = _mm256_max_ps(x, lo);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return _mm256_and_ps(y, _mm256_cmp_ps(x, lo, _CMP_GE_OQ));
}

/* Weights exp(sc[j] - max) in place over sc[n] (8 at a time, exp_neg_avx2) and 1 / their sum, summed in 8 lanes in
 * j's order then across them: the same bits for the same scores, whoever calls. */
__attribute__((target("avx2,fma,f16c"))) static float softmax_avx2(float *sc, int64_t n) {
    __m256 mx = _mm256_set1_ps(-INFINITY);  /* the largest score, 8 lanes at a time (a scalar chain waited on */
    int64_t j;                               /* each comparison: 18% of the whole attention) */
    for (j = 0; j + 8 <= n; j += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(sc + j));
    float m = hmax(mx);
    for (; j < n; j++) m = sc[j] > m ? sc[j] : m;
    const __m256 mv = _mm256_set1_ps(m);
    __m256 sum = _mm256_setzero_ps();
    for (j = 0; j + 8 <= n; j += 8) {
        const __m256 w = exp_neg_avx2(_mm256_sub_ps(_mm256_loadu_ps(sc + j), mv));
        _mm256_storeu_ps(sc + j, w);
        sum = _mm256_add_ps(sum, w);
    }
    if (j < n) {  /* the last partial vector: spare lanes 0 */
        float tail[8];
        for (int u = 0; u < 8; u++) tail[u] = j + u < n ? sc[j + u] - m : -INFINITY;
        const __m256 w = exp_neg_avx2(_mm256_loadu_ps(tail));
        _mm256_storeu_ps(tail, w);
        for (int u = 0; j + u < n; u++) sc[j + u] = tail[u];
        sum = _mm256_add_ps(sum, w);
    }
    return 1.0f / hsum(sum);
}

/* sum of exp(l[j] - m) over l[n] (m its max), 8 lanes in j's order then across them (top_softmax) */
__attribute__((target("avx2,fma,f16c"))) static float exp_sum_avx2(const float *l, int64_t n, float m) {
    const __m256 mv = _mm256_set1_ps(m);
    __m256 sum = _mm256_setzero_ps();
    int64_t j;
    for (j = 0; j + 8 <= n; j += 8) sum = _mm256_add_ps(sum, exp_neg_avx2(_mm256_sub_ps(_mm256_loadu_ps(l + j), mv)));
    if (j < n) {
        float tail[8];
        for (int u = 0; u < 8; u++) tail[u] = j + u < n ? l[j + u] - m : -INFINITY;
        sum = _mm256_add_ps(sum, exp_neg_avx2(_mm256_loadu_ps(tail)));
    }
    return hsum(sum);
}

/* exp_neg_avx2 of 8 values (top_softmax's chosen terms) */
__attribute__((target("avx2,fma,f16c"))) static void exp_neg8(const float *in, float *out) {
    _mm256_storeu_ps(out, exp_neg_avx2(_mm256_loadu_ps(in)));
}

/* hsum of each of 4 vectors at once, with hsum's additions (lanes i and i + 4, then 0 + 2 and 1 + 3, then those
 * two): the same bits as 4 hsum calls in about half the shuffles. */
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline __m128 hsum4(__m256 c0, __m256 c1, __m256 c2,
                                                                                   __m256 c3) {
    const __m256 a = _mm256_add_ps(_mm256_permute2f128_ps(c0, c1, 0x20), _mm256_permute2f128_ps(c0, c1, 0x31));
    const __m256 b = _mm256_add_ps(_mm256_permute2f128_ps(c2, c3, 0x20), _mm256_permute2f128_ps(c2, c3, 0x31));
    const __m256 w = _mm256_add_ps(_mm256_shuffle_ps(a, b, 0x44), _mm256_shuffle_ps(a, b, 0xEE));
    const __m256 r = _mm256_add_ps(_mm256_shuffle_ps(w, w, 0x88), _mm256_shuffle_ps(w, w, 0xDD));
    return _mm_unpacklo_ps(_mm256_castps256_ps128(r), _mm256_extractf128_ps(r, 1));  /* c0, c1, c2, c3 */
}

/* sc[j] = q . k[slot j] * scale for the n slots k + j * d (contiguous), of one query (q1 NULL) or two (q1, sc1):
 * 4 keys in flight, each key loaded once for both queries (8 independent chains of fused multiply-adds keep both
 * FMA ports busy; 4 left them waiting on the chains' latency). Each key's dot product is dot_avx2's (the same
 * fused multiply-adds in the same order, then hsum's additions), whichever path computes it. */
__attribute__((target("avx2,fma,f16c"))) static void scores_avx2(const float *q0, const float *q1, const float *k,
                                                                 int64_t n, int64_t d, float scale, float *sc0,
                                                                 float *sc1) {
    const __m128 sv = _mm_set1_ps(scale);
    int64_t j = 0;
    if (q1)
        for (; j + 4 <= n; j += 4) {
            const float *k0 = k + j * d, *k1 = k0 + d, *k2 = k1 + d, *k3 = k2 + d;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
            for (int64_t e = 0; e < d; e += 8) {
                const __m256 x = _mm256_loadu_ps(q0 + e), y = _mm256_loadu_ps(q1 + e);
                __m256 kv = _mm256_loadu_ps(k0 + e);
                a0 = _mm256_fmadd_ps(x, kv, a0);
                b0 = _mm256_fmadd_ps(y, kv, b0);
                kv = _mm256_loadu_ps(k1 + e);
                a1 = _mm256_fmadd_ps(x, kv, a1);
                b1 = _mm256_fmadd_ps(y, kv, b1);
                kv = _mm256_loadu_ps(k2 + e);
                a2 = _mm256_fmadd_ps(x, kv, a2);
                b2 = _mm256_fmadd_ps(y, kv, b2);
                kv = _mm256_loadu_ps(k3 + e);
                a3 = _mm256_fmadd_ps(x, kv, a3);
                b3 = _mm256_fmadd_ps(y, kv, b3);
            }
            _mm_storeu_ps(sc0 + j, _mm_mul_ps(hsum4(a0, a1, a2, a3), sv));
            _mm_storeu_ps(sc1 + j, _mm_mul_ps(hsum4(b0, b1, b2, b3), sv));
        }
    else
        for (; j + 4 <= n; j += 4) {
            const float *k0 = k + j * d, *k1 = k0 + d, *k2 = k1 + d, *k3 = k2 + d;
            __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
            for (int64_t e = 0; e < d; e += 8) {
                const __m256 qv = _mm256_loadu_ps(q0 + e);
                c0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + e), c0);
                c1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + e), c1);
                c2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + e), c2);
                c3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + e), c3);
            }
            _mm_storeu_ps(sc0 + j, _mm_mul_ps(hsum4(c0, c1, c2, c3), sv));
        }
    for (; j < n; j++) {
        sc0[j] = dot_avx2(q0, k + j * d, d) * scale;
        if (q1) sc1[j] = dot_avx2(q1, k + j * d, d) * scale;
    }
}

/* o[0 .. 8 width) += sum over the n slots v + j * vstride of w[j] * v[slot j], in registers, slot by slot in j's
 * order: one fused multiply-add per element and slot, the same bits however the slots are split between calls.
 * Inlined with a constant width (8: all 64 dims of a chunk) so that the accumulators stay in registers. */
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void weigh_avx2(float *o, const int width,
                                                                                      const float *w,
                                                                                      const float *v, int64_t n,
                                                                                      int64_t vstride) {
    __m256 acc[8];
    for (int r = 0; r < width; r++) acc[r] = _mm256_loadu_ps(o + 8 * r);
    for (int64_t j = 0; j < n; j++) {
        const __m256 wj = _mm256_set1_ps(w[j]);
        const float *vs = v + j * vstride;
        for (int r = 0; r < width; r++) acc[r] = _mm256_fmadd_ps(wj, _mm256_loadu_ps(vs + 8 * r), acc[r]);
    }
    for (int r = 0; r < width; r++) _mm256_storeu_ps(o + 8 * r, acc[r]);
}

__attribute__((target("avx2,fma,f16c"))) static void weigh_any_avx2(float *o, int width, const float *w,
                                                                    const float *v, int64_t n, int64_t vstride) {
    if (width == 8)
        weigh_avx2(o, 8, w, v, n, vstride);
    else
        for (int r = 0; r < width; r++) weigh_avx2(o + 8 * r, 1, w, v + 8 * r, n, vstride);
}

/* scores_avx2 for nq (3 or 4) queries over the same n slots (n a multiple of 4) where AVX-512VL gives 32 vector
 * registers: 12 or 16 chains of 8-lane fused multiply-adds, each key chunk loaded once for all the queries; each key's dot product
 * the same operations in the same order as scores_avx2's: the same bits. */
__attribute__((target("avx2,fma,f16c,avx512f,avx512vl"), always_inline)) static inline void scores_n_avx512(
    const int nq, const float *const *q, const float *k, int64_t n, int64_t d, float scale, float *const *sc) {
    const __m128 sv = _mm_set1_ps(scale);
    for (int64_t j = 0; j + 4 <= n; j += 4) {
        const float *k0 = k + j * d;
        __m256 c[4][4], x[4];
        for (int u = 0; u < nq; u++)
            for (int r = 0; r < 4; r++) c[u][r] = _mm256_setzero_ps();
        for (int64_t e = 0; e < d; e += 8) {
            for (int u = 0; u < nq; u++) x[u] = _mm256_loadu_ps(q[u] + e);
            for (int r = 0; r < 4; r++) {
                const __m256 kv = _mm256_loadu_ps(k0 + r * d + e);
                for (int u = 0; u < nq; u++) c[u][r] = _mm256_fmadd_ps(x[u], kv, c[u][r]);
            }
        }
        for (int u = 0; u < nq; u++) _mm_storeu_ps(sc[u] + j, _mm_mul_ps(hsum4(c[u][0], c[u][1], c[u][2], c[u][3]), sv));
    }
}

/* weigh_avx2's 64-dim chunk for nq (3 or 4) queries over the same n slots at once (AVX-512: 12 or 16
 * accumulators, each slot's V chunk loaded once for all of them): per element the same fused multiply-adds in the
 * same order, the same bits. */
__attribute__((target("avx2,fma,f16c,avx512f,avx512vl"), always_inline)) static inline void weigh_n_avx512(
    const int nq, float *const *o, const float *const *w, const float *v, int64_t n, int64_t vstride) {
    __m512 acc[4][4];
    for (int u = 0; u < nq; u++)
        for (int r = 0; r < 4; r++) acc[u][r] = _mm512_loadu_ps(o[u] + 16 * r);
    for (int64_t j = 0; j < n; j++) {
        const float *vs = v + j * vstride;
        const __m512 v0 = _mm512_loadu_ps(vs), v1 = _mm512_loadu_ps(vs + 16), v2 = _mm512_loadu_ps(vs + 32),
                     v3 = _mm512_loadu_ps(vs + 48);
        for (int u = 0; u < nq; u++) {
            const __m512 wj = _mm512_set1_ps(w[u][j]);
            acc[u][0] = _mm512_fmadd_ps(wj, v0, acc[u][0]);
            acc[u][1] = _mm512_fmadd_ps(wj, v1, acc[u][1]);
            acc[u][2] = _mm512_fmadd_ps(wj, v2, acc[u][2]);
            acc[u][3] = _mm512_fmadd_ps(wj, v3, acc[u][3]);
        }
    }
    for (int u = 0; u < nq; u++)
        for (int r = 0; r < 4; r++) _mm512_storeu_ps(o[u] + 16 * r, acc[u][r]);
}

/* scores_n_avx512 and weigh_n_avx512 with nq constant (the accumulators in registers) */
__attribute__((target("avx2,fma,f16c,avx512f,avx512vl"))) static void scores_many_avx512(
    int nq, const float *const *q, const float *k, int64_t n, int64_t d, float scale, float *const *sc) {
    if (nq == 4)
        scores_n_avx512(4, q, k, n, d, scale, sc);
    else
        scores_n_avx512(3, q, k, n, d, scale, sc);
}

__attribute__((target("avx2,fma,f16c,avx512f,avx512vl"))) static void weigh_many_avx512(
    int nq, float *const *o, const float *const *w, const float *v, int64_t n, int64_t vstride) {
    if (nq == 4)
        weigh_n_avx512(4, o, w, v, n, vstride);
    else
        weigh_n_avx512(3, o, w, v, n, vstride);
}

/* The slots [first, last) of block [b0, b1) that query x sees before pos0 (first >= last: none) */
static inline int64_t first_seen(const att_query *x, int64_t b0) { return b0 > x->lo ? b0 : x->lo; }
static inline int64_t last_seen(const att_query *x, int64_t b1) { return b1 < x->lo + x->pre ? b1 : x->lo + x->pre; }

/* How many of the queries x[0 .. left) from the first on (at most 4) see exactly the slots of block [b0, b1) that
 * x[0] sees */
static int same_slots(const att_query *x, int left, int64_t b0, int64_t b1) {
    const int64_t s0 = first_seen(x, b0), s1 = last_seen(x, b1);
    int run = 1;
    while (run < left && run < 4 && first_seen(x + run, b0) == s0 && last_seen(x + run, b1) == s1) run++;
    return run;
}

/* Queries of one KV head (k, v: its cache [S, D]), d a multiple of 8 (AVX2 + FMA). The slots before pos0, which the
 * queries share, go in blocks of about 16 KB of K (then of V), each block used by every query while it sits in L1,
 * by 2 queries at once (AVX2) or 3-4 (AVX-512: twice the registers) where they see the same slots of the block.
 * Each query's scores, weights and output are computed by exactly the same operations in the same order as alone
 * (scores_avx2, softmax_avx2, weigh_avx2 slot by slot), so nothing depends on the other queries, tokens or heads:
 * batch-invariant. SmolLM2's shapes (9 heads, 3 KV heads, D 64), 5 tokens over 350 slots, one thread: 152 -> 58 us
 * a layer against one query at a time (whose scalar running max and spilled accumulators cost most of it). */
__attribute__((target("avx2,fma,f16c"))) static void attend_group_avx2(const attn_args *a, att_query *qs, int nq,
                                                                        const float *k, const float *v) {
    const int64_t d = a->d, block = d >= 1024 ? 4 : 4096 / d;
    int64_t b_lo = INT64_MAX, b_hi = 0;  /* the prefix slots any query sees */
    for (int u = 0; u < nq; u++)
        if (qs[u].pre > 0) {
            b_lo = qs[u].lo < b_lo ? qs[u].lo : b_lo;
            b_hi = qs[u].lo + qs[u].pre > b_hi ? qs[u].lo + qs[u].pre : b_hi;
        }
    for (int64_t b0 = b_lo; b0 < b_hi; b0 += block) {
        const int64_t b1 = b0 + block < b_hi ? b0 + block : b_hi;
        for (int u = 0; u < nq; u++) {  /* the queries that see the same slots of the block together */
            const att_query *x = qs + u;
            const int64_t s0 = first_seen(x, b0), s1 = last_seen(x, b1);
            if (s0 >= s1) continue;
            const int run = same_slots(x, nq - u, b0, b1);
            if (isa == ISA_VNNI && run >= 3 && (s1 - s0) % 4 == 0) {
                const float *qv[4];
                float *sv[4];
                for (int e = 0; e < run; e++) {
                    qv[e] = x[e].q;
                    sv[e] = x[e].sc + (s0 - x[e].lo);
                }
                scores_many_avx512(run, qv, k + s0 * d, s1 - s0, d, a->scale, sv);
                u += run - 1;
            } else if (run >= 2) {
                scores_avx2(x->q, x[1].q, k + s0 * d, s1 - s0, d, a->scale, x->sc + (s0 - x->lo),
                            x[1].sc + (s0 - x[1].lo));
                u++;
            } else
                scores_avx2(x->q, NULL, k + s0 * d, s1 - s0, d, a->scale, x->sc + (s0 - x->lo), NULL);
        }
    }
    for (int u = 0; u < nq; u++) {  /* the path's slots, then the weights */
        att_query *x = qs + u;
        for (int64_t j = x->pre; j < x->n; j++)
            x->sc[j] = dot_avx2(x->q, k + (a->pos0 + x->path[j - x->pre + x->skip]) * d, d) * a->scale;
        x->inv = softmax_avx2(x->sc, x->n);
    }
    for (int64_t c = 0; c < d; c += 64) {  /* 64 output dims (8 registers) at a time, kept in o between blocks */
        const int width = d - c < 64 ? (int)((d - c) / 8) : 8;
        for (int u = 0; u < nq; u++) memset(qs[u].o + c, 0, sizeof(float) * 8 * (size_t)width);
        for (int64_t b0 = b_lo; b0 < b_hi; b0 += block) {
            const int64_t b1 = b0 + block < b_hi ? b0 + block : b_hi;
            for (int u = 0; u < nq; u++) {
                const att_query *x = qs + u;
                const int64_t s0 = first_seen(x, b0), s1 = last_seen(x, b1);
                if (s0 >= s1) continue;
                const int run = same_slots(x, nq - u, b0, b1);
                if (isa == ISA_VNNI && width == 8 && run >= 3) {  /* 3 or 4 at a time */
                    float *os[4];
                    const float *ws[4];
                    for (int e = 0; e < run; e++) {
                        os[e] = x[e].o + c;
                        ws[e] = x[e].sc + (s0 - x[e].lo);
                    }
                    weigh_many_avx512(run, os, ws, v + s0 * d + c, s1 - s0, d);
                    u += run - 1;
                    continue;
                }
                weigh_any_avx2(x->o + c, width, x->sc + (s0 - x->lo), v + s0 * d + c, s1 - s0, d);
            }
        }
        for (int u = 0; u < nq; u++) {
            const att_query *x = qs + u;
            for (int64_t j = x->pre; j < x->n; j++)
                weigh_any_avx2(x->o + c, width, x->sc + j, v + (a->pos0 + x->path[j - x->pre + x->skip]) * d + c, 1, d);
            const __m256 inv = _mm256_set1_ps(x->inv);
            for (int r = 0; r < width; r++)
                _mm256_storeu_ps(x->o + c + 8 * r, _mm256_mul_ps(_mm256_loadu_ps(x->o + c + 8 * r), inv));
        }
    }
}
#endif

/* The same operations as attend_group_avx2's, one query at a time, in plain C (no AVX2, or d not a multiple of 8) */
static void attend_one_scalar(const attn_args *a, const att_query *x, const float *k, const float *v) {
    const int64_t d = a->d;
#define SLOT(j) ((j) < x->pre ? x->lo + (j) : a->pos0 + x->path[(j) - x->pre + x->skip])
    float m = -INFINITY, *sc = x->sc;
    for (int64_t j = 0; j < x->n; j++) {
        sc[j] = dot_scalar(x->q, k + SLOT(j) * d, d) * a->scale;
        m = sc[j] > m ? sc[j] : m;
    }
    float sum = 0.0f;
    memset(x->o, 0, sizeof(float) * (size_t)d);
    for (int64_t j = 0; j < x->n; j++) {
        const float w = expf(sc[j] - m);
        sum += w;
        axpy_scalar(x->o, w, v + SLOT(j) * d, d);
    }
#undef SLOT
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < d; j++) x->o[j] *= inv;
}

#define ATT_QC 8  /* queries of one KV head attended together (attend_group_avx2); a thread's score rows */

/* Each part: a contiguous range of the (KV head, token, head of its group) triples, KV head first, attended
 * ATT_QC queries of one KV head at a time. query_only: attend_query_run's queries (q alone in qkv [T, Hq D], each
 * over the slots [0, pos0)); otherwise attend_run's (a token at depth i over [lo, pos0) and its path). */
static void attend_queries(const attn_args *a, int part, int parts, int query_only) {
    const int64_t d = a->d, group = a->hq / a->hkv, stride = (a->hq + 2 * a->hkv) * d, per_kv = a->t * group;
    const int64_t total = a->hkv * per_kv, per = (total + parts - 1) / parts;
    const int64_t i1 = per * part + per < total ? per * part + per : total;
#ifdef SPECMTP_X86
    const int vec = use_avx2 && d % 8 == 0;
#endif
    for (int64_t idx = per * part; idx < i1;) {
        const int64_t g = idx / per_kv;
        const float *k = a->kc + g * a->s * d, *v = a->vc + g * a->s * d;
        att_query qs[ATT_QC];
        int nq = 0;
        for (; idx < i1 && idx / per_kv == g && nq < ATT_QC; idx++, nq++) {
            const int64_t i = idx % per_kv / group, h = g * group + idx % group;
            att_query *x = qs + nq;
            x->o = a->out + (i * a->hq + h) * d;
            x->sc = a->scores + ((int64_t)part * ATT_QC + nq) * a->s;
            x->path = a->path + i * MAX_TREE;
            if (query_only) {
                x->q = a->qkv + (i * a->hq + h) * d;
                x->lo = x->skip = 0;
                x->pre = x->n = a->pos0;
            } else {  /* visible: [lo, pos0), then the path's tokens from depth lo - pos0 on */
                const int64_t p = a->pos0 + a->depth[i];
                x->q = a->qkv + i * stride + h * d;
                x->lo = a->window && p - a->window + 1 > 0 ? p - a->window + 1 : 0;
                x->pre = x->lo < a->pos0 ? a->pos0 - x->lo : 0;
                x->skip = x->lo > a->pos0 ? x->lo - a->pos0 : 0;
                x->n = x->pre + a->depth[i] + 1 - x->skip;
            }
        }
        if (query_only && a->pos0 == 0) {  /* nothing to attend to */
            for (int u = 0; u < nq; u++) memset(qs[u].o, 0, sizeof(float) * (size_t)d);
            continue;
        }
#ifdef SPECMTP_X86
        if (vec) {
            attend_group_avx2(a, qs, nq, k, v);
            continue;
        }
#endif
        for (int u = 0; u < nq; u++) attend_one_scalar(a, qs + u, k, v);
    }
}

static void attend_part(const void *arg, int part, int parts) { attend_queries(arg, part, parts, 0); }

/* ---------------------------------------------------------------------------------------------------------- */
/* Python entry points: raw pointers from torch tensors (contiguous, checked by the caller)                    */

static int8_t *scratch_q = NULL;
static float *scratch_f = NULL;
static int64_t scratch_q_cap = 0, scratch_f_cap = 0;

/* What the kernel does to each token's activations before quantizing them (per token, so batch-invariant) */
enum { PRE_NONE = 0, PRE_RMSNORM = 1, PRE_SWIGLU = 2, PRE_TAPNORM = 3 };
/* PRE_TAPNORM: the row is K / seg segments of seg values; each but the last is RMS-normed on its own and scaled by
   its part of norm [K - seg], the last is left as it is (an MTP drafter's first state: its taps of the target's
   layers, each normed, then the target's final hidden state, fused by one product) */

typedef struct {
    int pre;
    const float *x;        /* [T, K] ([T, 2K] with swiglu: gate then up) */
    const float *norm;     /* [K] rms norm weight ([K - seg] with tapnorm) */
    const float *rscale;   /* [T] rms norm: 1 / sqrt(mean(x^2) + eps) of each token ([T, K / seg - 1] tapnorm's) */
    int64_t t, k;
    int8_t *xq;            /* [T, K] */
    float *xd, *xs;        /* [T, K/32] */
    float *xf;             /* dense weights: [T, K] the prepared activations in fp32 (xq, xd, xs unused) */
    int64_t seg;           /* tapnorm's segment width (a multiple of 32) */
} prep_args;

/* SwiGLU, silu(g) * u = g / (1 + e^-g) * u, for one block of 32 values, with e^x of our own: x clamped to [-87, 88],
   n = nearest integer to x log2(e), r = x - n ln2 (in two fused steps, ln2 split in a short high part and the rest),
   e^r = 1 + r + r^2 p(r) (the classic degree-5 minimax p), times 2^n built in the exponent bits. Every path (plain
   C with fmaf, AVX2) does these same operations in the same order: the same bits on every CPU, so the
   blocks quantized after it agree across ISAs as before. Within 2 ulp of e^x. glibc's expf, one value at a time,
   was most of a verify pass's per-token work outside the products (an 8-token SmolLM2 pass: 0.5 ms). */
#define EXP_LO (-87.0f)
#define EXP_HI 88.0f
#define EXP_LOG2E 1.44269504088896341f
#define EXP_LN2_HI 0.693359375f
#define EXP_LN2_LO (-2.12194440e-4f)
static const float exp_poly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f,
                                  1.6666665459e-1f, 5.0000001201e-1f};

static inline float exp_scalar(float x) {
    x = x > EXP_LO ? x : EXP_LO;  /* as the vector max / min: a NaN becomes EXP_LO */
    x = x < EXP_HI ? x : EXP_HI;
    const float n = rintf(x * EXP_LOG2E);
    float r = fmaf(n, -EXP_LN2_HI, x);
    r = fmaf(n, -EXP_LN2_LO, r);
    float p = exp_poly[0];
    for (int i = 1; i < 6; i++) p = fmaf(p, r, exp_poly[i]);
    const float z = r * r;
    const float y = fmaf(p, z, r) + 1.0f;
    union { uint32_t u; float f; } two_n = {.u = (uint32_t)((int32_t)n + 127) << 23};
    return y * two_n.f;
}

static void swiglu_scalar(const float *g, const float *u, float *out) {
    for (int j = 0; j < QK; j++) out[j] = g[j] / (1.0f + exp_scalar(-g[j])) * u[j];
}

#ifdef SPECMTP_X86
__attribute__((target("avx2,fma"))) static void swiglu_avx2(const float *g, const float *u, float *out) {
    const __m256 lo = _mm256_set1_ps(EXP_LO), hi = _mm256_set1_ps(EXP_HI), one = _mm256_set1_ps(1.0f);
    for (int j = 0; j < QK; j += 8) {
        const __m256 gv = _mm256_loadu_ps(g + j);
        __m256 x = _mm256_sub_ps(_mm256_setzero_ps(), gv);  /* -g, exactly */
        x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
        const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(EXP_LOG2E)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-EXP_LN2_HI), x);
        r = _mm256_fmadd_ps(n, _mm256_set1_ps(-EXP_LN2_LO), r);
        __m256 p = _mm256_set1_ps(exp_poly[0]);
        for (int i = 1; i < 6; i++) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(exp_poly[i]));
        const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), one);
        const __m256 two_n = _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
        const __m256 e = _mm256_mul_ps(y, two_n);
        _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + j)));
    }
}
#endif

static void swiglu_block(const float *g, const float *u, float *out) {
#ifdef SPECMTP_X86
    if (use_avx2) {  /* AVX-512 CPUs too: the blocks are a small share of a pass (and Zen 4 splits 512-bit vectors) */
        swiglu_avx2(g, u, out);
        return;
    }
#endif
    swiglu_scalar(g, u, out);
}

/* RMSNorm's scale of x[n], 1 / sqrt(mean(x^2) + eps), its sum of squares in sdot_scalar's 8 lanes: 8 independent
   chains, not one (a token's scale was a serial chain of K additions: 0.3 ms of an 8-token pass) */
static inline float rms_scale(const float *x, int64_t n, float eps) {
    return 1.0f / sqrtf(sdot_scalar(x, x, n) / (float)n + eps);
}

/* Threads split the (token, block) pairs: each block is prepared (norm or SwiGLU) and quantized on its own, so the
 * result does not depend on the split. */
static void prep_part(const void *arg, int part, int parts) {
    const prep_args *a = (const prep_args *)arg;
    const int64_t nb = a->k / QK, total = a->t * nb, per = (total + parts - 1) / parts;
    const int64_t i0 = per * part, i1 = i0 + per < total ? i0 + per : total;
    const int64_t width = a->pre == PRE_SWIGLU ? 2 * a->k : a->k;
    float v[QK];
    for (int64_t idx = i0; idx < i1; idx++) {
        const int64_t i = idx / nb, b = idx % nb;
        const float *row = a->x + i * width + b * QK, *src = row;
        float *dst = a->xf ? a->xf + i * a->k + b * QK : v;  /* dense weights: prepared straight into place */
        if (a->pre == PRE_RMSNORM) {  /* norm * x / sqrt(mean(x^2) + eps) */
            for (int j = 0; j < QK; j++) dst[j] = a->norm[b * QK + j] * (row[j] * a->rscale[i]);
            src = dst;
        } else if (a->pre == PRE_TAPNORM && b * QK < a->k - a->seg) {  /* a tap: normed by its own segment's scale */
            const int64_t segs = a->k / a->seg - 1;
            const float r = a->rscale[i * segs + b * QK / a->seg];
            for (int j = 0; j < QK; j++) dst[j] = a->norm[b * QK + j] * (row[j] * r);
            src = dst;
        } else if (a->pre == PRE_SWIGLU) {  /* silu(gate) * up */
            swiglu_block(row, row + a->k, dst);
            src = dst;
        } else if (a->xf) {
            memcpy(dst, row, sizeof(float) * QK);
        }
        if (!a->xf) quantize_block(src, a->xq + i * a->k + b * QK, a->xd + i * nb + b, a->xs + i * nb + b);
    }
}

static float *scratch_x = NULL;  /* dense weights: the prepared fp32 activations */
static int64_t scratch_x_cap = 0;

/* y[T, N] = pre(x)[T, K] @ W[N, K]^T + bias + res (res may be y itself: each element is read, then written, by
 * one thread). fmt 4 / 8: quantized weights (wq, wd, wm); FMT_F32: dense fp32 weights W = (const float *)wq, the
 * prepared activations kept in fp32 and the product through sgemm_run. Returns 0, or -1 when the scratch memory
 * cannot be had. */
static int gemm_run(int fmt, const float *x, int64_t t, int64_t k, const uint8_t *wq, const uint16_t *wd,
                    const uint16_t *wm, const float *bias, float *y, int64_t n, int pre, const float *norm, float eps,
                    const float *res, int64_t seg) {
    const int64_t nb = k / QK;
    if (GROW(scratch_q, scratch_q_cap, t * k) || GROW(scratch_f, scratch_f_cap, 2 * t * nb + t * k + 2) ||
        (fmt == FMT_F32 && pre != PRE_NONE && GROW(scratch_x, scratch_x_cap, t * k)))
        return -1;
    float *xd = scratch_f, *xs = scratch_f + t * nb, *rscale = scratch_f + 2 * t * nb;
    if (pre == PRE_RMSNORM)
        for (int64_t i = 0; i < t; i++) rscale[i] = rms_scale(x + i * k, k, eps);
    if (pre == PRE_TAPNORM)
        for (int64_t i = 0; i < t; i++)
            for (int64_t sg = 0; sg < k / seg - 1; sg++)
                rscale[i * (k / seg - 1) + sg] = rms_scale(x + i * k + sg * seg, seg, eps);
    if (fmt == FMT_F32) {
        if (pre != PRE_NONE) {
            prep_args p = {pre, x, norm, rscale, t, k, NULL, NULL, NULL, scratch_x, seg};
            run_parts(prep_part, &p, pre == PRE_SWIGLU ? 16 * t * k : t * k);
            x = scratch_x;
        }
        return sgemm_run(x, t, k, (const float *)wq, bias, y, n, res);
    }
    prep_args p = {pre, x, norm, rscale, t, k, scratch_q, xd, xs, NULL, seg};
    run_parts(prep_part, &p, pre == PRE_SWIGLU ? 16 * t * k : t * k);  /* SwiGLU's expf: worth two threads */
    gemm_args a = {fmt, scratch_q, xd, xs, wq, wd, wm, bias, res, y, t, n, k};
    run_parallel(&a);
    return 0;
}

/* A drafter's query-only layer (no K/V of its own): T queries, all at position pos0, each over slots [0, pos0) of
   another model's cache (full attention), q rotated in place. */
static void attend_query_part(const void *arg, int part, int parts) { attend_queries(arg, part, parts, 1); }

static float *attn_scratch = NULL;
static int64_t attn_cap = 0;

/* Each token's depth and path (attn_args) from its parent: parents[i] < i the parent's index, -1 for token 0;
 * parents NULL: a chain. 0, or -1 when the tokens do not form a tree rooted at token 0. */
static int32_t tree_depth[MAX_TREE], tree_path[MAX_TREE * MAX_TREE];

static int tree_paths(const int64_t *parents, int64_t t) {
    if (t > MAX_TREE) return -1;
    for (int64_t i = 0; i < t; i++) {
        const int64_t up = parents ? parents[i] : i - 1;
        if (i == 0 ? up != -1 : up < 0 || up >= i) return -1;
        tree_depth[i] = i == 0 ? 0 : tree_depth[up] + 1;
        if (i) memcpy(tree_path + i * MAX_TREE, tree_path + up * MAX_TREE, sizeof(int32_t) * (size_t)tree_depth[i]);
        tree_path[i * MAX_TREE + tree_depth[i]] = (int32_t)i;
    }
    return 0;
}

/* The pool started and ATT_QC score rows of s slots per thread: 0, or -1 when out of memory. */
static int attn_reserve(int64_t s) {
    if (!pool_started) pool_start(pool_size);
    if (GROW(attn_scratch, attn_cap, (int64_t)pool_size * ATT_QC * s)) return -1;
    return 0;
}

/* One token's q and k rotated in place (row: its q, k, v heads), its k and v written at `slot` of a cache [Hkv, S, D] */
static void rope_and_store(float *row, const float *cos, const float *sin, float *kc, float *vc, int64_t hq,
                           int64_t hkv, int64_t d, int64_t s, int64_t slot) {
    for (int64_t h = 0; h < hq + hkv; h++) rope_row(row + h * d, cos, sin, d);
    for (int64_t g = 0; g < hkv; g++) {
        memcpy(kc + (g * s + slot) * d, row + (hq + g) * d, sizeof(float) * (size_t)d);
        memcpy(vc + (g * s + slot) * d, row + (hq + hkv + g) * d, sizeof(float) * (size_t)d);
    }
}

/* One row's T new tokens in slots pos0 .. pos0 + T - 1, a chain (parents NULL: at positions pos0 .. pos0 + T - 1)
 * or a tree (token i at position pos0 + depth(i)): rotate q and k in qkv (cos/sin at their positions), write k and
 * v into the layer's cache [Hkv, S, D], attend (out [T, Hq D]). 0, or -1 when out of memory. */
static int attend_run(float *qkv, int64_t t, int64_t hq, int64_t hkv, int64_t d, const float *cos, const float *sin,
                      float *kc, float *vc, int64_t s, int64_t pos0, int64_t window, float scale, float *out) {
    if (attn_reserve(s)) return -1;
    attn_args a = {qkv, cos, sin, kc, vc, out, attn_scratch, t, hq, hkv, d, s, pos0, window, scale, tree_depth,
                   tree_path};
    const int64_t stride = (hq + 2 * hkv) * d;
    for (int64_t i = 0; i < t; i++)
        rope_and_store(qkv + i * stride, cos + i * d, sin + i * d, kc, vc, hq, hkv, d, s, pos0 + i);
    run_parts(attend_part, &a, t * hq * (pos0 + t) * d);
    return 0;
}

/* attend_run for a query-only layer: qkv holds q alone [T, Hq D], every token at position pos0, over slots [0, pos0)
 * of the cache (nothing written). 0, or -1 when out of memory. */
static int attend_query_run(float *q, int64_t t, int64_t hq, int64_t hkv, int64_t d, const float *cos,
                            const float *sin, const float *kc, const float *vc, int64_t s, int64_t pos0, float scale,
                            float *out) {
    if (attn_reserve(s)) return -1;
    attn_args a = {q, cos, sin, (float *)kc, (float *)vc, out, attn_scratch, t, hq, hkv, d, s, pos0, 0, scale,
                   tree_depth, tree_path};
    for (int64_t i = 0; i < t; i++)
        for (int64_t h = 0; h < hq; h++) rope_row(q + (i * hq + h) * d, cos + i * d, sin + i * d, d);
    run_parts(attend_query_part, &a, t * hq * pos0 * d);
    return 0;
}

/* B rows' one new token each (a batched decode step), row r at position pos[r] in its own cache (kc + r Hkv S D):
 * rotate, write, and attend each as attend_run does for one row's one token (the same bits as a one-row step).
 * The pool's threads take every parts-th row. 0, or -1 when out of memory. */
typedef struct {
    float *qkv, *kc, *vc, *out;
    const float *cos, *sin;
    const int64_t *pos;
    int64_t b, hq, hkv, d, s, window;
    float scale;
} attn_rows_args;

static void attend_rows_part(const void *arg, int part, int parts) {
    const attn_rows_args *r = (const attn_rows_args *)arg;
    const int64_t stride = (r->hq + 2 * r->hkv) * r->d, cache = r->hkv * r->s * r->d;
    for (int64_t i = part; i < r->b; i += parts) {
        attn_args a = {r->qkv + i * stride, r->cos + i * r->d, r->sin + i * r->d, r->kc + i * cache,
                       r->vc + i * cache, r->out + i * r->hq * r->d, attn_scratch + (int64_t)part * ATT_QC * r->s, 1,
                       r->hq, r->hkv, r->d, r->s, r->pos[i], r->window, r->scale, tree_depth, tree_path};
        attend_queries(&a, 0, 1, 0);
    }
}

static int attend_rows(float *qkv, int64_t b, int64_t hq, int64_t hkv, int64_t d, const float *cos, const float *sin,
                       float *kc, float *vc, int64_t s, const int64_t *pos, int64_t window, float scale, float *out) {
    if (attn_reserve(s)) return -1;
    const int64_t stride = (hq + 2 * hkv) * d;
    for (int64_t i = 0; i < b; i++)  /* row i's cache: hkv s d floats after row i - 1's */
        rope_and_store(qkv + i * stride, cos + i * d, sin + i * d, kc + i * hkv * s * d, vc + i * hkv * s * d, hq, hkv,
                       d, s, pos[i]);
    attn_rows_args r = {qkv, kc, vc, out, cos, sin, pos, b, hq, hkv, d, s, window, scale};
    int64_t work = 0;
    for (int64_t i = 0; i < b; i++) work += hq * (pos[i] + 1) * d;
    run_parts(attend_rows_part, &r, work);
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------- */
/* a stack of plain (Llama / Qwen2) layers for one row's new tokens: per layer                                 */
/*     x += o(attend(rope(qkv(rms_norm(x)))));   x += down(swiglu(gate_up(rms_norm(x))))                         */
/* with exactly the calls the per-layer path makes (same results, bit for bit), minus the interpreter between.  */

/* A layer's fields in the descriptor (int64 each; pointers as integers): 4 matrices (qkv, o, gate_up, down) of
 * 5 fields (format, weights, scales, offsets, rows), then the rest. quant.py's `stack_descriptor` writes it. */
enum { LF_QKV_BIAS = 20, LF_O_BIAS, LF_ATTN_NORM, LF_MLP_NORM, LF_HQ, LF_HKV, LF_D, LF_WINDOW, LF_ROPE, LF_QUERY_ONLY,
       LF_FIELDS = 32 };  /* LF_QUERY_ONLY: a drafter's layer, queries over another model's cache (attend_query_run) */

static int mat_gemm(const int64_t *f, int m, const float *x, int64_t t, int64_t k, const float *bias, float *y, int pre,
                    const float *norm, float eps, const float *res) {
    const int64_t *w = f + 5 * m;
    return gemm_run((int)w[0], x, t, k, (const uint8_t *)w[1], (const uint16_t *)w[2], (const uint16_t *)w[3], bias, y,
                    w[4], pre, norm, eps, res, 0);
}

static float *stack_buf = NULL;
static int64_t stack_cap = 0;

/* (attend_run's tree, tree_paths, set by the caller). taps: ntaps ascending layer indices after which x is copied
   out, token i's copy after taps[j] at tap_out + (i * ntaps + j) * h (a [T, ntaps, H] tensor) */
static int stack_run(const int64_t *desc, int64_t layers, float *x, int64_t t, int64_t h, int64_t pos0,
                     const float *const rope[2][2], const int64_t *kv, int64_t s, float eps, float scale,
                     const int64_t *taps, int64_t ntaps, float *tap_out, const int64_t *rows) {
    int64_t w_qkv = 0, w_att = 0, w_gu = 0;
    for (int64_t l = 0; l < layers; l++) {
        const int64_t *f = desc + l * LF_FIELDS;
        w_qkv = f[4] > w_qkv ? f[4] : w_qkv;
        w_att = f[LF_HQ] * f[LF_D] > w_att ? f[LF_HQ] * f[LF_D] : w_att;
        w_gu = f[14] > w_gu ? f[14] : w_gu;
    }
    if (GROW(stack_buf, stack_cap, t * (w_qkv + w_att + w_gu))) return -1;
    float *qkv = stack_buf, *att = qkv + t * w_qkv, *gu = att + t * w_att;
    for (int64_t l = 0; l < layers; l++) {
        const int64_t *f = desc + l * LF_FIELDS;
        const int64_t hq = f[LF_HQ], d = f[LF_D], inter = f[14] / 2;
        const float *const *cs = rope[f[LF_ROPE]];
        if (mat_gemm(f, 0, x, t, h, (const float *)f[LF_QKV_BIAS], qkv, PRE_RMSNORM, (const float *)f[LF_ATTN_NORM],
                     eps, NULL) ||
            (rows ? attend_rows(qkv, t, hq, f[LF_HKV], d, cs[0], cs[1], (float *)kv[2 * l], (float *)kv[2 * l + 1], s,
                                rows, f[LF_WINDOW], scale, att)
             : f[LF_QUERY_ONLY] ? attend_query_run(qkv, t, hq, f[LF_HKV], d, cs[0], cs[1], (const float *)kv[2 * l],
                                                 (const float *)kv[2 * l + 1], s, pos0, scale, att)
                              : attend_run(qkv, t, hq, f[LF_HKV], d, cs[0], cs[1], (float *)kv[2 * l],
                                           (float *)kv[2 * l + 1], s, pos0, f[LF_WINDOW], scale, att)) ||
            mat_gemm(f, 1, att, t, hq * d, (const float *)f[LF_O_BIAS], x, PRE_NONE, NULL, 0.0f, x) ||
            mat_gemm(f, 2, x, t, h, NULL, gu, PRE_RMSNORM, (const float *)f[LF_MLP_NORM], eps, NULL) ||
            mat_gemm(f, 3, gu, t, inter, NULL, x, PRE_SWIGLU, NULL, 0.0f, x))
            return -1;
        for (int64_t j = 0; j < ntaps; j++)
            if (taps[j] == l)
                for (int64_t i = 0; i < t; i++) memcpy(tap_out + (i * ntaps + j) * h, x + i * h, h * sizeof(float));
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------- */
/* Python entry points: raw pointers from torch tensors (contiguous, checked by the caller)                    */

#ifndef SPECMTP_NO_PYTHON
static PyObject *py_gemm(PyObject *self, PyObject *args) {
    int fmt, pre = PRE_NONE;
    unsigned long long x, wq, wd, wm, bias, y, res = 0, norm = 0;
    long long t, n, k, seg = 0;
    float eps = 0.0f;
    if (!PyArg_ParseTuple(args, "iKLLKKKKKL|iKfKL", &fmt, &x, &t, &k, &wq, &wd, &wm, &bias, &y, &n, &pre, &norm, &eps,
                          &res, &seg))
        return NULL;
    if (k % QK) {
        PyErr_SetString(PyExc_ValueError, "K must be a multiple of 32");
        return NULL;
    }
    if (fmt != 4 && fmt != 8 && fmt != FMT_F32) {
        PyErr_SetString(PyExc_ValueError, "format must be 4, 8 or 32 (dense fp32)");
        return NULL;
    }
    if (pre < PRE_NONE || pre > PRE_TAPNORM || ((pre == PRE_RMSNORM || pre == PRE_TAPNORM) && !norm)) {
        PyErr_SetString(PyExc_ValueError,
                        "pre must be 0 (none), 1 (rms norm, with its weight), 2 (swiglu) or 3 (tap norms, with theirs)");
        return NULL;
    }
    if (pre == PRE_TAPNORM && (seg <= 0 || seg % QK || k % seg || k / seg < 2)) {
        PyErr_SetString(PyExc_ValueError, "tap norms: the segment must be a multiple of 32 dividing K at least twice");
        return NULL;
    }
    /* the GIL stays held: the scratch buffers and the pool serve one call at a time */
    if (gemm_run(fmt, (const float *)x, t, k, (const uint8_t *)wq, (const uint16_t *)wd, (const uint16_t *)wm,
                 bias ? (const float *)bias : NULL, (float *)y, n, pre, (const float *)norm, eps,
                 res ? (const float *)res : NULL, seg))
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_attend(PyObject *self, PyObject *args) {
    unsigned long long qkv, cos, sin, kc, vc, out, parents = 0;
    long long t, hq, hkv, d, s, pos0, window;
    float scale;
    if (!PyArg_ParseTuple(args, "KLLLLKKKKLLLfK|K", &qkv, &t, &hq, &hkv, &d, &cos, &sin, &kc, &vc, &s, &pos0, &window,
                          &scale, &out, &parents))
        return NULL;
    if (hkv < 1 || hq % hkv || d % 2 || pos0 < 0 || pos0 + t > s) {
        PyErr_SetString(PyExc_ValueError, "attend: bad shapes (heads, head dim or positions past the cache)");
        return NULL;
    }
    if (tree_paths((const int64_t *)parents, t)) {
        PyErr_SetString(PyExc_ValueError, "attend: over 64 tokens, or parents that are not a tree rooted at token 0");
        return NULL;
    }
    if (attend_run((float *)qkv, t, hq, hkv, d, (const float *)cos, (const float *)sin, (float *)kc, (float *)vc, s,
                   pos0, window, scale, (float *)out))
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_layers(PyObject *self, PyObject *args) {
    unsigned long long desc, x, cos0, sin0, cos1, sin1, kv, parents = 0, taps = 0, tap_out = 0;
    long long layers, t, h, pos0, s, ntaps = 0;
    float eps, scale;
    if (!PyArg_ParseTuple(args, "KLKLLLKKKKKLff|KKKL", &desc, &layers, &x, &t, &h, &pos0, &cos0, &sin0, &cos1, &sin1,
                          &kv, &s, &eps, &scale, &parents, &taps, &tap_out, &ntaps))
        return NULL;
    if (ntaps < 0 || (ntaps > 0 && (!taps || !tap_out))) {
        PyErr_SetString(PyExc_ValueError, "layers: taps without their layer indices or output");
        return NULL;
    }
    if (pos0 < 0 || pos0 + t > s || h % QK) {  /* (query-only layers write nothing; their slots lie below pos0) */
        PyErr_SetString(PyExc_ValueError, "layers: positions past the cache, or a width not a multiple of 32");
        return NULL;
    }
    if (tree_paths((const int64_t *)parents, t)) {
        PyErr_SetString(PyExc_ValueError, "layers: over 64 tokens, or parents that are not a tree rooted at token 0");
        return NULL;
    }
    const float *const rope[2][2] = {{(const float *)cos0, (const float *)sin0}, {(const float *)cos1, (const float *)sin1}};
    if (stack_run((const int64_t *)desc, layers, (float *)x, t, h, pos0, rope, (const int64_t *)kv, s, eps, scale,
                  (const int64_t *)taps, ntaps, (float *)tap_out, NULL))
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* layers_rows: a batched decode step through the stack, B rows of one new token each (x [B, H]), row r at
   position pos[r] of its own cache rows (kv: each layer's K and V of [B, Hkv, S, D]); cos/sin [B, D] per kind */
static PyObject *py_layers_rows(PyObject *self, PyObject *args) {
    unsigned long long desc, x, pos, cos0, sin0, cos1, sin1, kv, taps = 0, tap_out = 0;
    long long layers, b, h, s, ntaps = 0;
    float eps, scale;
    if (!PyArg_ParseTuple(args, "KLKLLKKKKKKLff|KKL", &desc, &layers, &x, &b, &h, &pos, &cos0, &sin0, &cos1, &sin1,
                          &kv, &s, &eps, &scale, &taps, &tap_out, &ntaps))
        return NULL;
    if (ntaps < 0 || (ntaps > 0 && (!taps || !tap_out))) {
        PyErr_SetString(PyExc_ValueError, "layers_rows: taps without their layer indices or output");
        return NULL;
    }
    const int64_t *p = (const int64_t *)pos;
    for (int64_t i = 0; i < b; i++)
        if (p[i] < 0 || p[i] >= s) {
            PyErr_Format(PyExc_ValueError, "layers_rows: row %lld's position %lld is outside the cache's %lld slots",
                         (long long)i, (long long)p[i], s);
            return NULL;
        }
    for (int64_t l = 0; l < layers; l++)
        if (((const int64_t *)desc)[l * LF_FIELDS + LF_QUERY_ONLY]) {
            PyErr_SetString(PyExc_ValueError, "layers_rows: a query-only layer (a drafter's) has no rows of its own");
            return NULL;
        }
    if (h % QK) {
        PyErr_SetString(PyExc_ValueError, "layers_rows: a width not a multiple of 32");
        return NULL;
    }
    tree_paths(NULL, 1);  /* each row's token: a chain of one */
    const float *const rope[2][2] = {{(const float *)cos0, (const float *)sin0}, {(const float *)cos1, (const float *)sin1}};
    if (stack_run((const int64_t *)desc, layers, (float *)x, b, h, 0, rope, (const int64_t *)kv, s, eps, scale,
                  (const int64_t *)taps, ntaps, (float *)tap_out, p))
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* l[i] into best[0 .. have), the k largest so far, best first (ties: the lower index first) */
static inline void top_insert(const float *l, int64_t i, int k, int64_t *best, int *have) {
    if (*have == k && !(l[i] > l[best[k - 1]])) return;
    int at = *have < k ? (*have)++ : k - 1;
    while (at > 0 && l[i] > l[best[at - 1]]) {
        best[at] = best[at - 1];
        at--;
    }
    best[at] = i;
}

#ifdef SPECMTP_X86
/* the k largest of l[n] (ties: the lower index), best first: 8 at a time, only the lanes above the k-th best so far
   inserted one by one */
__attribute__((target("avx2,fma,f16c"))) static void top_scan_avx2(const float *l, int64_t n, int k, int64_t *best,
                                                                   int *have) {
    int64_t i = 0;
    for (; i < n && *have < k; i++) top_insert(l, i, k, best, have);
    for (; i + 8 <= n; i += 8) {
        const __m256 bar = _mm256_set1_ps(l[best[k - 1]]);
        int above = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(l + i), bar, _CMP_GT_OQ));
        while (above) {
            const int u = __builtin_ctz(above);
            top_insert(l, i + u, k, best, have);
            above &= above - 1;
        }
    }
    for (; i < n; i++) top_insert(l, i, k, best, have);
}
#endif

/* A draft step's k likeliest tokens and their probabilities, softmax(l)[i] = e^(l[i] - max) / sum over the row (with
   AVX2 the sum through exp_neg_avx2 in 8 lanes, else expf; each probability through the same exponential as its
   term of the sum). Ties keep the lower index. ids map through vocab (NULL: the identity). */
static void top_softmax(const float *l, int64_t n, int k, const int64_t *vocab, int64_t *ids, float *probs) {
    int64_t best[8];
    int have = 0;
    float sum = 0.0f;
#ifdef SPECMTP_X86
    if (use_avx2) {
        top_scan_avx2(l, n, k, best, &have);  /* best[0] is the largest */
        sum = exp_sum_avx2(l, n, l[best[0]]);
    } else
#endif
    {
        for (int64_t i = 0; i < n; i++) top_insert(l, i, k, best, &have);  /* the k best so far, best first */
        for (int64_t j = 0; j < n; j++) sum += expf(l[j] - l[best[0]]);
    }
    const float m = l[best[0]];
    float e[8] = {0};  /* each chosen term's e^(l - m), by the sum's exponential */
    for (int u = 0; u < have; u++) e[u] = l[best[u]] - m;
#ifdef SPECMTP_X86
    if (use_avx2)
        exp_neg8(e, e);
    else
#endif
        for (int u = 0; u < have; u++) e[u] = expf(e[u]);
    for (int u = 0; u < have; u++) {
        probs[u] = e[u] / sum;
        ids[u] = vocab ? vocab[best[u]] : best[u];
    }
    for (int u = have; u < k; u++) probs[u] = 0.0f, ids[u] = 0;
}

/* A drafter's step for one row's W branches in one call (drafters/mtp.py): each branch's input is the target's
   embedding of its token (times emb_scale) beside its hidden state, all at `position` (cos, sin: its RoPE row [D]);
   then pre_projection, the query-only layer stack, the final RMSNorm with post_projection (the next hidden state) and the head rows (the logits). The
   same kernel calls in the same order as one call each from Python: the same bits, without a dozen torch ops and
   wrappers between them, each slow on caches the weights' stream has just emptied. mats: int64 [3][5] (format,
   pointers and rows, as a stack descriptor's) of pre_projection, post_projection and the head. */
static float *draft_buf = NULL;
static int64_t draft_cap = 0;

static PyObject *py_draft_step(PyObject *self, PyObject *args) {
    unsigned long long tokens, emb, hidden, mats, norm, desc, cos, sin, kv, logits, hidden_out, ids = 0, probs = 0,
                       ids_map = 0, fuse = 0, tap_norm = 0, taps = 0;
    long long w, vocab, ht, layers, s, position, top = 0, ntaps = 0;
    float emb_scale, eps, scale;
    if (!PyArg_ParseTuple(args, "KLKLfKLKKKLKKKLLffKK|LKKKKKKL", &tokens, &w, &emb, &vocab, &emb_scale, &hidden, &ht,
                          &mats, &norm, &desc, &layers, &cos, &sin, &kv, &s, &position, &eps, &scale, &logits,
                          &hidden_out, &top, &ids_map, &ids, &probs, &fuse, &tap_norm, &taps, &ntaps))
        return NULL;
    const int64_t *fz = (const int64_t *)fuse;  /* the first state's fusion: [taps ++ hidden] -> Ht, tap-normed */
    if (fz && (w != 1 || ntaps < 1 || !tap_norm || !taps || fz[0] == FMT_F32 || fz[4] != ht)) {
        PyErr_SetString(PyExc_ValueError, "draft_step: a fused first state is one branch's, through a quantized "
                                          "weight of Ht rows, with its taps and their norms");
        return NULL;
    }
    if (top < 0 || top > 8 || (top && (!ids || !probs)) || (!top && !logits)) {
        PyErr_SetString(PyExc_ValueError, "draft_step: top must be 0 to 8, with its outputs (else the logits')");
        return NULL;
    }
    const int64_t *m = (const int64_t *)mats, *tok = (const int64_t *)tokens;
    const int64_t ha = m[4];  /* pre_projection's rows: the drafter's width */
    if (w < 1 || position < 0 || position >= s || ht % QK || ha % QK || m[9] != ht) {
        PyErr_SetString(PyExc_ValueError, "draft_step: bad shapes (branches, position past the cache, or widths)");
        return NULL;
    }
    for (int64_t i = 0; i < w; i++)
        if (tok[i] < 0 || tok[i] >= vocab) {
            PyErr_SetString(PyExc_ValueError, "draft_step: a token id outside the embedding table");
            return NULL;
        }
    const int64_t nk = m[14], d = ((const int64_t *)desc)[LF_D];  /* the head's rows; the layers' head dim */
    for (int64_t l = 1; l < layers; l++)
        if (((const int64_t *)desc)[l * LF_FIELDS + LF_D] != d) {
            PyErr_SetString(PyExc_ValueError, "draft_step: layers of different head dims");
            return NULL;
        }
    if (GROW(draft_buf, draft_cap, w * (2 * ht + ha + 2 * d + (logits ? 0 : nk)) + (fz ? (ntaps + 2) * ht : 0)))
        return PyErr_NoMemory();
    /* draft_buf: inputs [W, 2 Ht], the drafter's states [W, Ha], RoPE rows [W, D] x2, the fusion's input and output
       ([(n + 1) Ht], [Ht]), then the logits when the caller takes only the top */
    float *xcat = draft_buf, *xa = xcat + w * 2 * ht, *rc = xa + w * ha, *rs = rc + w * d, *fin = rs + w * d;
    float *fused = fin + (fz ? (ntaps + 1) * ht : 0), *lg = logits ? (float *)logits : fused + (fz ? ht : 0);
    if (fz) {  /* the hidden state this branch reads: first_state's product, as qlinear(.., "tap_norm") runs it */
        memcpy(fin, (const float *)taps, ntaps * ht * sizeof(float));
        memcpy(fin + ntaps * ht, (const float *)hidden, ht * sizeof(float));
        if (gemm_run((int)fz[0], fin, 1, (ntaps + 1) * ht, (const uint8_t *)fz[1], (const uint16_t *)fz[2],
                     (const uint16_t *)fz[3], NULL, fused, ht, PRE_TAPNORM, (const float *)tap_norm, eps, NULL, ht))
            return PyErr_NoMemory();
        hidden = (unsigned long long)fused;
    }
    for (int64_t i = 0; i < w; i++) {  /* every branch at the round's position: its RoPE row for each */
        memcpy(rc + i * d, (const float *)cos, d * sizeof(float));
        memcpy(rs + i * d, (const float *)sin, d * sizeof(float));
    }
    for (int64_t i = 0; i < w; i++) {
        const float *e = (const float *)emb + tok[i] * ht;
        float *row = xcat + i * 2 * ht;
        for (int64_t j = 0; j < ht; j++) row[j] = emb_scale == 1.0f ? e[j] : e[j] * emb_scale;
        memcpy(row + ht, (const float *)hidden + i * ht, ht * sizeof(float));
    }
    if (tree_paths(NULL, w)) {  /* (query-only layers: every branch over the slots before `position`) */
        PyErr_SetString(PyExc_ValueError, "draft_step: over 64 branches");
        return NULL;
    }
    const float *const rope[2][2] = {{rc, rs}, {rc, rs}};
    if (mat_gemm(m, 0, xcat, w, 2 * ht, NULL, xa, PRE_NONE, NULL, 0.0f, NULL) ||
        stack_run((const int64_t *)desc, layers, xa, w, ha, position, rope, (const int64_t *)kv, s, eps, scale, NULL,
                  0, NULL, NULL) ||
        mat_gemm(m, 1, xa, w, ha, NULL, (float *)hidden_out, PRE_RMSNORM, (const float *)norm, eps, NULL) ||
        mat_gemm(m, 2, (const float *)hidden_out, w, ht, NULL, lg, PRE_NONE, NULL, 0.0f, NULL))
        return PyErr_NoMemory();
    for (int64_t i = 0; i < w && top; i++)
        top_softmax(lg + i * nk, nk, (int)top, (const int64_t *)ids_map, (int64_t *)ids + i * top,
                    (float *)probs + i * top);
    Py_RETURN_NONE;
}

static PyObject *py_sgemm(PyObject *self, PyObject *args) {
    unsigned long long x, w, bias, y, res = 0;
    long long t, k, n;
    if (!PyArg_ParseTuple(args, "KLLKKKL|K", &x, &t, &k, &w, &bias, &y, &n, &res)) return NULL;
    if (t < 1 || k < 1 || n < 1) {
        PyErr_SetString(PyExc_ValueError, "T, K and N must be positive");
        return NULL;
    }
    if (sgemm_run((const float *)x, t, k, (const float *)w, bias ? (const float *)bias : NULL, (float *)y, n,
                  res ? (const float *)res : NULL))  /* the GIL stays held: the pool serves one call at a time */
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* The first index of the largest value of row[j0, j1) (fp32, finite logits; best -INFINITY and index j0 when none
 * is larger): 32 lanes of running maxima and their first indices, then the lanes compared (ties: the smaller index),
 * then the tail. */
static void argmax_range(const float *row, int64_t j0, int64_t j1, float *best_out, int64_t *at_out) {
    float best = -INFINITY;
    int64_t at = j0, j = j0;
#ifdef SPECMTP_X86
    if (use_avx2 && j1 - j0 >= 32) {
        float lanes_v[32];
        int32_t lanes_i[32];
        argmax_avx2(row + j0, j1 - j0, lanes_v, lanes_i);
        best = lanes_v[0], at = j0 + lanes_i[0];
        for (int u = 1; u < 32; u++)
            if (lanes_v[u] > best || (lanes_v[u] == best && j0 + lanes_i[u] < at)) best = lanes_v[u], at = j0 + lanes_i[u];
        j = j1 - (j1 - j0) % 32;
    }
#endif
    for (; j < j1; j++)
        if (row[j] > best) best = row[j], at = j;
    *best_out = best;
    *at_out = at;
}

typedef struct {
    const float *x;
    int64_t rows, n;
    float *best;  /* [rows, MAX_THREADS] each part's maximum */
    int64_t *at;  /* [rows, MAX_THREADS] and its index */
    int parts;
} argmax_args;

/* Each thread the columns an sgemm of the same width gave it (sgemm_part's split: the logits it just wrote, still in
   its own cache, where one thread reading them all would pull most from the other core's). */
static void argmax_part(const void *arg, int part, int parts) {
    argmax_args *a = (argmax_args *)arg;
    const int64_t tiles = (a->n + 3) / 4, per = (tiles + parts - 1) / parts;
    const int64_t j0 = 4 * per * part < a->n ? 4 * per * part : a->n;
    const int64_t j1 = 4 * per * (part + 1) < a->n ? 4 * per * (part + 1) : a->n;
    if (part == 0) a->parts = parts;
    for (int64_t r = 0; r < a->rows; r++)
        argmax_range(a->x + r * a->n, j0, j1, &a->best[r * MAX_THREADS + part], &a->at[r * MAX_THREADS + part]);
}

/* out[r] = the first index of the largest value of row r: the parts' maxima combined in column order, a later part
   taken only when strictly larger, so the first maximal index, as one pass over the row finds it. */
static int argmax_rows(const float *x, int64_t rows, int64_t n, int64_t *out) {
    float *best = (float *)malloc(sizeof(float) * (size_t)(rows * MAX_THREADS));
    int64_t *at = (int64_t *)malloc(sizeof(int64_t) * (size_t)(rows * MAX_THREADS));
    if (!best || !at) {
        free(best);
        free(at);
        return -1;
    }
    argmax_args a = {x, rows, n, best, at, 1};
    run_parts(argmax_part, &a, rows * n);
    for (int64_t r = 0; r < rows; r++) {
        int64_t k = r * MAX_THREADS;
        for (int p = 1; p < a.parts; p++)
            if (best[r * MAX_THREADS + p] > best[k]) k = r * MAX_THREADS + p;
        out[r] = at[k];
    }
    free(best);
    free(at);
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------- */
/* Greedy tokens of a dense fp32 output head, read mostly through its q8 copy (screen.py has the bound). For a   */
/* token x, the q8 logits a_j bound the fp32 ones: |l_j - a_j| <= e_j = X alpha_j + Y beta_j, X = |x| and Y from  */
/* x's own int8 quantization error. A row whose a_j + e_j is below max_i (a_i - e_i) has a logit below another's, */
/* so it is not the argmax; the rest (one to three rows, typically) are computed by the dense kernel, each (row,  */
/* token) the same bits the full fp32 product gives it, and the first largest wins: the full head's argmax,      */
/* exactly. A token with more than SCREEN_CAP rows left, or a non-finite input, takes the full fp32 product.     */

#define SCREEN_CAP 256
#ifdef SPECMTP_X86
__attribute__((target("avx2,fma"))) static float screen_low_avx2(const float *a, const float *al, const float *be,
                                                                 float X, float Y, int64_t n) {
    const __m256 vx = _mm256_set1_ps(X), vy = _mm256_set1_ps(Y);
    __m256 lo = _mm256_set1_ps(-INFINITY);
    for (int64_t j = 0; j + 8 <= n; j += 8) {
        const __m256 e = _mm256_fmadd_ps(vx, _mm256_loadu_ps(al + j), _mm256_mul_ps(vy, _mm256_loadu_ps(be + j)));
        lo = _mm256_max_ps(lo, _mm256_sub_ps(_mm256_loadu_ps(a + j), e));
    }
    float l[8];
    _mm256_storeu_ps(l, lo);
    float m = l[0];
    for (int j = 1; j < 8; j++) m = l[j] > m ? l[j] : m;
    return m;
}

/* screen_rows' 8 rows at a time, the rows left picked out of a lane mask */
__attribute__((target("avx2,fma"))) static int32_t screen_rows_avx2(const float *a, const float *al, const float *be,
                                                                    float X, float Y, float lo, int64_t n,
                                                                    int32_t *cand) {
    const __m256 vx = _mm256_set1_ps(X), vy = _mm256_set1_ps(Y), vlo = _mm256_set1_ps(lo);
    int32_t c = 0;
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 e = _mm256_fmadd_ps(vx, _mm256_loadu_ps(al + j), _mm256_mul_ps(vy, _mm256_loadu_ps(be + j)));
        unsigned mask = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_add_ps(_mm256_loadu_ps(a + j), e), vlo,
                                                                   _CMP_GE_OQ));
        for (; mask; mask &= mask - 1) {
            if (c == SCREEN_CAP) return -1;
            cand[c++] = (int32_t)(j + __builtin_ctz(mask));
        }
    }
    for (; j < n; j++)
        if (a[j] + (X * al[j] + Y * be[j]) >= lo) {
            if (c == SCREEN_CAP) return -1;
            cand[c++] = (int32_t)j;
        }
    return c;
}
#endif

typedef struct {
    const float *approx;         /* [T, N] the q8 logits */
    const float *x;              /* [T, K] */
    const float *alpha, *beta;   /* [N] */
    int64_t t, k, n;
    double g;                    /* the rounding term of both products (screen.py) */
    int32_t *cand;               /* [T, SCREEN_CAP] the rows left per token, ascending */
    int32_t *count;              /* [T] how many; -1: take the full product */
} screen_args;

/* max_j (a_j - (X alpha_j + Y beta_j)), and (with lo given) the rows j with a_j + X alpha_j + Y beta_j >= lo */
static float screen_low(const float *a, const float *al, const float *be, float X, float Y, int64_t n) {
    float lo = -INFINITY;
    int64_t j = 0;
#ifdef SPECMTP_X86
    if (use_avx2) {
        lo = screen_low_avx2(a, al, be, X, Y, n);
        j = n & ~(int64_t)7;
    }
#endif
    for (; j < n; j++) {
        const float v = a[j] - (X * al[j] + Y * be[j]);
        lo = v > lo ? v : lo;
    }
    return lo;
}

static int32_t screen_rows(const float *a, const float *al, const float *be, float X, float Y, float lo, int64_t n,
                           int32_t *cand) {
#ifdef SPECMTP_X86
    if (use_avx2) return screen_rows_avx2(a, al, be, X, Y, lo, n, cand);
#endif
    int32_t c = 0;
    for (int64_t j = 0; j < n; j++)
        if (a[j] + (X * al[j] + Y * be[j]) >= lo) {
            if (c == SCREEN_CAP) return -1;
            cand[c++] = (int32_t)j;
        }
    return c;
}

static void screen_part(const void *arg, int part, int parts) {  /* each thread: a range of tokens */
    const screen_args *s = (const screen_args *)arg;
    const int64_t per = (s->t + parts - 1) / parts, i0 = per * part, i1 = i0 + per < s->t ? i0 + per : s->t;
    for (int64_t i = i0; i < i1; i++) {
        const float *x = s->x + i * s->k;
        double xx = 0.0, dd = 0.0;  /* |x|^2, and |x - its int8 blocks as the q8 product reads them|^2 */
        for (int64_t b = 0; b < s->k / QK; b++) {
            int8_t q[QK];
            float xd, xs;
            quantize_block(x + b * QK, q, &xd, &xs);
            for (int j = 0; j < QK; j++) {
                const double v = x[b * QK + j], dv = v - (double)xd * q[j];
                xx += v * v;
                dd += dv * dv;
            }
        }
        const double X = sqrt(xx), D = sqrt(dd);
        if (!isfinite(X)) {
            s->count[i] = -1;
            continue;
        }
        /* each bound term rounded up well past float's own rounding of e_j (1e-5 against 2^-22) */
        const float Xf = (float)(X * (1.0 + 1e-5)), Yf = (float)((D + s->g * (X + D)) * (1.0 + 1e-5));
        const float *a = s->approx + i * s->n;
        float lo = screen_low(a, s->alpha, s->beta, Xf, Yf, s->n);
        if (!isfinite(lo)) {  /* logits past float's range: the full product decides */
            s->count[i] = -1;
            continue;
        }
        lo -= 1e-5f * (fabsf(lo) + 1.0f);  /* the additions' rounding, near lo */
        const int32_t c = screen_rows(a, s->alpha, s->beta, Xf, Yf, lo, s->n, s->cand + i * SCREEN_CAP);
        s->count[i] = c > 0 ? c : -1;  /* the row that set lo is always left; none left: not finite somewhere */
    }
}

/* The screen's q8 logits where AVX-512 VNNI is: the bound holds for any exact integer dot and the same float steps
   per block (acc += float(dot) * (d_w * d_x)), so this product need not match the q8 kernel's path, only its
   arithmetic. The screen keeps its q8 rows in a layout of its own (screen.py, "pairs"): in each 64-byte vector
   c of a group of 8 rows and a block, lanes 2r and 2r + 1 hold row r's words 2c and 2c + 1, so a token's two
   words 2c, 2c + 1 (8 bytes) broadcast to every lane pair straight from memory (one load, no shuffle) and its
   block is 32 bytes: every token's blocks stay in L1 while the rows stream. Each token's int8 block is shifted to
   unsigned (x + 128) so that vpdpbusd takes it as it is (no sign trick), and 128 times the row's block sum (sums:
   [N8, K/32, 8] int16) is taken back off; a row's two lanes are added at the end of the block. Each block's
   weights are loaded once for up to 8 tokens. Threads split the row groups. (Before, each token's words were laid
   out broadcast beforehand, 8 times its bytes: 8 tokens, 295 KB for SmolLM2's head, were read from L2 at every
   block, which bound the product on a Zen 4: 8 tokens 2.65 -> 1.39 ms, 4 tokens 1.74 -> 1.14.)
   With 2 or more tokens each group's first pass prefetches the weights SCREEN_AHEAD bytes ahead into L2 while it
   computes: the multiply-adds of several tokens otherwise left the memory idle between the hardware prefetcher's
   requests. On a 2-core Zen 4, each call right after a layer stack's pass (as in decoding; medians, settings
   interleaved), Qwen2.5-Coder-1.5B's head (233 MB of q8) for 3 / 5 / 8 tokens took 8.4 / 11.1 / 19.0 ms without and
   7.0 / 8.0 / 10.1 ms with it (8 to 64 KB ahead all alike), SmolLM2-135M's (28 MB) 1.43 / 1.82 / 2.47 against
   1.31 / 1.38 / 1.79 ms. One token streams faster without it (Qwen 6.0 against 6.9-7.8 ms). */
#define SCREEN_AHEAD 32768
#ifdef SPECMTP_X86
typedef struct {
    const uint8_t *xu;     /* [T, K/32, 32] the tokens' int8 blocks + 128 */
    const float *xd;       /* [T, K/32] their scales */
    const uint8_t *wq;     /* q8 [N8, K/32, 4, 8 rows, 2 words] (the pair layout) */
    const uint16_t *wd;    /* [N8, K/32, 8] fp16 */
    const int16_t *sums;   /* [N8, K/32, 8] */
    float *y;              /* [T, N] */
    int64_t t, k, n;
} screen_q8_args;

/* Row group g against tokens t0 .. t0 + TN - 1 (TN a constant after inlining: the accumulators stay in registers) */
__attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni"), always_inline)) static inline void screen_q8_tile(
    const screen_q8_args *a, int64_t g, int64_t t0, const int TN, const uint8_t *next) {
    const int64_t nb = a->k / QK;
    const uint8_t *wq = a->wq + g * nb * 256;
    const uint16_t *wd = a->wd + g * nb * 8;
    const int16_t *sm = a->sums + g * nb * 8;
    __m256 acc[8];
    for (int i = 0; i < TN; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        if (next)
            for (int c = 0; c < 4; c++) _mm_prefetch((const char *)(next + b * 256 + c * 64), _MM_HINT_T1);
        __m512i w[4];
        for (int c = 0; c < 4; c++) w[c] = _mm512_loadu_si512((const void *)(wq + b * 256 + c * 64));
        const __m256i corr = _mm256_slli_epi32(_mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i *)(sm + b * 8))), 7);
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wd + b * 8)));
        for (int i = 0; i < TN; i++) {
            const uint8_t *x = a->xu + ((t0 + i) * nb + b) * QK;
            __m512i s = _mm512_setzero_si512();
            for (int c = 0; c < 4; c++) {  /* words 2c, 2c + 1 to every lane pair */
                int64_t words;
                memcpy(&words, x + 8 * c, 8);
                s = _mm512_dpbusd_epi32(s, _mm512_set1_epi64(words), w[c]);
            }
            s = _mm512_add_epi32(s, _mm512_srli_epi64(s, 32));  /* row r's two lanes, in the low half of qword r */
            const __m256i dot = _mm256_sub_epi32(_mm512_cvtepi64_epi32(s), corr);
            const __m256 scale = _mm256_mul_ps(dw, _mm256_set1_ps(a->xd[(t0 + i) * nb + b]));
            acc[i] = _mm256_add_ps(acc[i], _mm256_mul_ps(_mm256_cvtepi32_ps(dot), scale));
        }
    }
    const int rows = a->n - g * 8 < 8 ? (int)(a->n - g * 8) : 8;
    for (int i = 0; i < TN; i++) {
        float out[8];
        _mm256_storeu_ps(out, acc[i]);
        for (int r = 0; r < rows; r++) a->y[(t0 + i) * a->n + g * 8 + r] = out[r];
    }
}

__attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni"))) static void screen_q8_part(
    const void *arg, int part, int parts) {
    const screen_q8_args *a = (const screen_q8_args *)arg;
    const int64_t groups = (a->n + 7) / 8, per = (groups + parts - 1) / parts;
    const int64_t g0 = per * part < groups ? per * part : groups, g1 = g0 + per < groups ? g0 + per : groups;
    const int64_t nb = a->k / QK, ahead = (SCREEN_AHEAD + nb * 256 - 1) / (nb * 256);  /* in row groups */
    for (int64_t g = g0; g < g1; g++)
        for (int64_t t0 = 0; t0 < a->t; t0 += 8) {
            const uint8_t *next = a->t >= 2 && t0 == 0 && g + ahead < g1 ? a->wq + (g + ahead) * nb * 256 : NULL;
            switch (a->t - t0 < 8 ? a->t - t0 : 8) {
                case 1: screen_q8_tile(a, g, t0, 1, next); break;
                case 2: screen_q8_tile(a, g, t0, 2, next); break;
                case 3: screen_q8_tile(a, g, t0, 3, next); break;
                case 4: screen_q8_tile(a, g, t0, 4, next); break;
                case 5: screen_q8_tile(a, g, t0, 5, next); break;
                case 6: screen_q8_tile(a, g, t0, 6, next); break;
                case 7: screen_q8_tile(a, g, t0, 7, next); break;
                default: screen_q8_tile(a, g, t0, 8, next); break;
            }
        }
}

static uint8_t *screen_xu = NULL;
static float *screen_xd = NULL;
static int64_t screen_xu_cap = 0, screen_xd_cap = 0;

/* y[T, N] = the tokens' q8 blocks . the q8 rows (screen_q8_part), or -1 when scratch memory cannot be had */
static int screen_q8(const float *x, int64_t t, int64_t k, const uint8_t *wq, const uint16_t *wd,
                     const int16_t *sums, float *y, int64_t n) {
    if (GROW(screen_xu, screen_xu_cap, t * k) || GROW(screen_xd, screen_xd_cap, t * k / QK)) return -1;
    for (int64_t i = 0; i < t * k / QK; i++) {  /* block i (token i / nb), + 128 */
        int8_t q[QK];
        float xs;
        quantize_block(x + i * QK, q, &screen_xd[i], &xs);
        for (int j = 0; j < QK; j++) screen_xu[i * QK + j] = (uint8_t)(q[j] + 128);
    }
    screen_q8_args a = {screen_xu, screen_xd, wq, wd, sums, y, t, k, n};
    run_parts(screen_q8_part, &a, n * k * t);
    return 0;
}
#endif

/* The same q8 logits from the pair layout without VNNI (where the ISA was switched after the screen was built: the
   tests): each (row, block) dot exact in int32, then the same float steps. */
static int screen_q8_plain(const float *x, int64_t t, int64_t k, const int8_t *wq, const uint16_t *wd, float *y,
                           int64_t n) {
    const int64_t nb = k / QK;
    if (GROW(screen_xd, screen_xd_cap, t * k / QK)) return -1;
    int8_t *xq = (int8_t *)malloc((size_t)(t * k));
    if (!xq) return -1;
    for (int64_t i = 0; i < t * nb; i++) {
        float xs;
        quantize_block(x + i * QK, xq + i * QK, &screen_xd[i], &xs);
    }
    for (int64_t i = 0; i < t; i++)
        for (int64_t j = 0; j < n; j++) {
            const int64_t g = j / 8, r = j % 8;
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const int8_t *wb = wq + (g * nb + b) * 256, *xb = xq + (i * nb + b) * QK;
                int32_t dot = 0;
                for (int c = 0; c < 8; c++) {  /* word c of row r: vector c / 2, lane 2r + c % 2 */
                    const int8_t *word = wb + (c / 2) * 64 + (2 * r + c % 2) * 4;
                    for (int p = 0; p < 4; p++) dot += (int32_t)word[p] * xb[4 * c + p];
                }
                acc += (float)dot * (half_to_float(wd[(g * nb + b) * 8 + r]) * screen_xd[i * nb + b]);
            }
            y[i * n + j] = acc;
        }
    free(xq);
    return 0;
}

static float *screen_approx = NULL, *screen_rows_buf = NULL;
static int32_t *screen_cand = NULL;  /* [T, SCREEN_CAP] rows left, then [T] their counts */
static int64_t screen_approx_cap = 0, screen_rows_cap = 0, screen_cand_cap = 0;

/* out[T] = the argmax of x[T, K] @ W[N, K]^T (fp32, first index of the largest), reading q (q8 [N, K]: qs, qd; with
   pairs, qs in the screen's own layout and sums its rows' block sums, for screen_q8; else quant.py's) and only the
   rows of W the screen leaves; *nfull_out: the tokens that took the full product. 0; -1 when scratch memory cannot
   be had; -2 past 64 tokens. */
static int screen_run(const float *x, int64_t t, int64_t k, const uint8_t *qs, const uint16_t *qd,
                      const int16_t *sums, int pairs, const float *w, const float *alpha, const float *beta, double g,
                      int64_t n, int64_t *out, int64_t *nfull_out) {
    if (t > MAX_TREE || t > SCREEN_CAP) return -2;
    if (GROW(screen_approx, screen_approx_cap, t * n) || GROW(screen_rows_buf, screen_rows_cap, SCREEN_CAP * k) ||
        GROW(screen_cand, screen_cand_cap, t * (SCREEN_CAP + 1)))
        return -1;
    int32_t *cand = screen_cand, *count = cand + t * SCREEN_CAP;
    int rc;
    if (pairs) {  /* the screen's own layout (screen_q8) */
#ifdef SPECMTP_X86
        if (isa == ISA_VNNI)
            rc = screen_q8(x, t, k, qs, qd, sums, screen_approx, n);
        else
#endif
            rc = screen_q8_plain(x, t, k, (const int8_t *)qs, qd, screen_approx, n);
    } else
        rc = gemm_run(8, x, t, k, qs, qd, NULL, NULL, screen_approx, n, PRE_NONE, NULL, 0.0f, NULL, 0);
    if (rc) return -1;
    screen_args s = {screen_approx, x, alpha, beta, t, k, n, g, cand, count};
    run_parts(screen_part, &s, t * n);
    float y[SCREEN_CAP];
    int64_t full = 0, which[MAX_TREE];  /* the tokens that take the full product, then one call for all of them */
    for (int64_t i = 0; i < t; i++) {
        const int32_t c = count[i], *rows = cand + i * SCREEN_CAP;
        if (c < 0) {
            which[full++] = i;
            continue;
        }
        for (int32_t r = 0; r < c; r++) memcpy(screen_rows_buf + r * k, w + (int64_t)rows[r] * k, sizeof(float) * k);
        sgemm_args a = {x + i * k, screen_rows_buf, NULL, NULL, y, 1, k, c, 0, NULL};
        sgemm_part(&a, 0, 1);  /* one token, narrow tiles: each row's sum as the full product computes it */
        int32_t best = 0;
        for (int32_t r = 1; r < c; r++)
            if (y[r] > y[best]) best = r;  /* ascending rows: the first largest */
        out[i] = rows[best];
    }
    if (full) {  /* the q8 logits are no longer needed: their scratch takes the tokens [full, K] and their logits */
        float *xs = screen_rows_buf, *logits = screen_approx;
        int64_t at[MAX_TREE];
        for (int64_t f = 0; f < full; f++) memcpy(xs + f * k, x + which[f] * k, sizeof(float) * k);
        if (sgemm_run(xs, full, k, w, NULL, logits, n, NULL) || argmax_rows(logits, full, n, at)) return -1;
        for (int64_t f = 0; f < full; f++) out[which[f]] = at[f];
    }
    nfull_out[0] = full;
    return 0;
}

/* A verified tree's accepted path moved into place: in each of `outer` planes of `slots` slots of `d` floats
 * (x + o * slots * d: every layer, K and V, KV head of one row), slot src[i] copied to dst[i], i in order. Each src
 * lies past every earlier dst and each dst before every later src (paths only move down), so in order every slot is
 * read before anything overwrites it. */
static PyObject *py_move_slots(PyObject *self, PyObject *args) {
    unsigned long long x, src, dst;
    long long outer, stride, slots, d, count;
    if (!PyArg_ParseTuple(args, "KLLLLKKL", &x, &outer, &stride, &slots, &d, &src, &dst, &count)) return NULL;
    const int64_t *from = (const int64_t *)src, *to = (const int64_t *)dst;
    for (int64_t i = 0; i < count; i++)
        if (from[i] < 0 || from[i] >= slots || to[i] < 0 || to[i] >= slots || (i && to[i] <= to[i - 1]) ||
            to[i] > from[i]) {
            PyErr_SetString(PyExc_ValueError, "move_slots: slots out of range, or not moving down in order");
            return NULL;
        }
    for (int64_t o = 0; o < outer; o++) {
        float *plane = (float *)x + o * stride;
        for (int64_t i = 0; i < count; i++)
            memcpy(plane + to[i] * d, plane + from[i] * d, sizeof(float) * (size_t)d);
    }
    Py_RETURN_NONE;
}

static PyObject *py_screen_argmax(PyObject *self, PyObject *args) {
    unsigned long long x, qs, qd, sums, w, alpha, beta, out;
    long long t, k, n;
    int pairs;
    double g;
    if (!PyArg_ParseTuple(args, "KLLKKKpKKKdLK", &x, &t, &k, &qs, &qd, &sums, &pairs, &w, &alpha, &beta, &g, &n,
                          &out))
        return NULL;
    if (t < 1 || k < 1 || k % QK || n < 1) {
        PyErr_SetString(PyExc_ValueError, "screen_argmax: T and N must be positive and K a positive multiple of 32");
        return NULL;
    }
    int64_t full = 0;
    const int rc = screen_run((const float *)x, t, k, (const uint8_t *)qs, (const uint16_t *)qd,
                              (const int16_t *)sums, pairs, (const float *)w,
                              (const float *)alpha, (const float *)beta, g, n, (int64_t *)out, &full);
    if (rc == -2) {
        PyErr_SetString(PyExc_ValueError, "screen_argmax: at most 64 tokens a call");
        return NULL;
    }
    if (rc) return PyErr_NoMemory();
    return PyLong_FromLongLong(full);
}

static PyObject *py_argmax(PyObject *self, PyObject *args) {
    unsigned long long x, out;
    long long rows, n;
    if (!PyArg_ParseTuple(args, "KLLK", &x, &rows, &n, &out)) return NULL;
    if (rows < 0 || n < 1 || n > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "argmax: bad shape");
        return NULL;
    }
    if (argmax_rows((const float *)x, rows, n, (int64_t *)out)) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_set_threads(PyObject *self, PyObject *args) {
    int n;
    if (!PyArg_ParseTuple(args, "i", &n)) return NULL;
    if (!pool_started) pool_size = n < 1 ? 0 : (n > MAX_THREADS ? MAX_THREADS : n);
    return PyLong_FromLong(pool_size);
}

static PyObject *py_info(PyObject *self, PyObject *args) {
    PyObject *avail = PyList_New(0);
    for (int i = 0; i < ISA_COUNT; i++)
        if (isa_supported(i)) {
            PyObject *name = PyUnicode_FromString(isa_names[i]);
            PyList_Append(avail, name);
            Py_DECREF(name);
        }
    return Py_BuildValue("{s:s,s:s,s:N,s:i,s:i}", "isa", isa_names[isa], "best", isa_names[best_isa()], "available",
                         avail, "threads", pool_size, "started", pool_started);
}

static PyObject *py_set_isa(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    const int best = best_isa();
    int want = -1;
    for (int i = 0; i < ISA_COUNT; i++)
        if (strcmp(name, isa_names[i]) == 0) want = i;
    if (strcmp(name, "best") == 0) want = best;
    if (want < 0 || !isa_supported(want)) {
        PyErr_Format(PyExc_ValueError, "instruction set %s is not known or not supported here (best: %s)", name,
                     isa_names[best]);
        return NULL;
    }
    choose_isa(want);
    return PyUnicode_FromString(isa_names[isa]);
}

static PyObject *py_sgemm_tiles(PyObject *self, PyObject *args) {
    const char *mode;
    if (!PyArg_ParseTuple(args, "s", &mode)) return NULL;
    if (strcmp(mode, "measured") == 0)
        tile_mode = -1;
    else if (strcmp(mode, "narrow") == 0)
        tile_mode = 0;
    else if (strcmp(mode, "wide") == 0)
        tile_mode = 1;
    else {
        PyErr_Format(PyExc_ValueError, "unknown tile mode %s (measured, narrow or wide)", mode);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *py_sgemm_chunks(PyObject *self, PyObject *args) {
    int chunks;
    if (!PyArg_ParseTuple(args, "i", &chunks)) return NULL;
    if (chunks < 0) {
        PyErr_Format(PyExc_ValueError, "chunks must be >= 0, got %d", chunks);
        return NULL;
    }
    sgemm_chunk(0);  /* the setting as the environment gave it, if not yet read */
    const int previous = sgemm_chunks;
    sgemm_chunks = chunks;
    return PyLong_FromLong(previous);
}

static PyObject *py_park(PyObject *self, PyObject *args) {
    atomic_store(&pool_park, 1);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"gemm", py_gemm, METH_VARARGS,
     "gemm(fmt, x, T, K, wq, wd, wm, bias, y, N[, pre, norm, eps, res]): y[T,N] = pre(x)[T,K] @ W[N,K]^T + res"},
    {"attend", py_attend, METH_VARARGS,
     "attend(qkv, T, Hq, Hkv, D, cos, sin, k_cache, v_cache, S, pos0, window, scale, out[, parents]): one row's new "
     "tokens (a chain, or a tree: parents int64 [T])"},
    {"layers_rows", py_layers_rows, METH_VARARGS,
     "layers_rows(desc, L, x, B, H, pos, cos0, sin0, cos1, sin1, kv, S, eps, scale[, taps, tap_out, ntaps]): a batched "
     "decode step, B rows of one token each at their own positions, through L plain layers over x [B, H] in place"},
    {"layers", py_layers, METH_VARARGS,
     "layers(desc, L, x, T, H, pos0, cos0, sin0, cos1, sin1, kv, S, eps, scale[, parents]): L plain layers over x [T, H] "
     "in place (a chain, or a tree)"},
    {"draft_step", py_draft_step, METH_VARARGS,
     "draft_step(tokens, W, emb, V, emb_scale, hidden, Ht, mats, norm, desc, L, cos, sin, kv, S, position, eps, scale, "
     "logits, hidden_out[, top, vocab, ids, probs]): a drafter's step of W branches (pre_projection, layers, norm + "
     "post_projection, head; with top, each branch's top likeliest tokens and their probabilities)"},
    {"sgemm", py_sgemm, METH_VARARGS, "sgemm(x, T, K, w, bias, y, N[, res]): y[T,N] = x[T,K] @ W[N,K]^T (+ bias) (+ res), fp32"},
    {"screen_argmax", py_screen_argmax, METH_VARARGS,
     "screen_argmax(x, T, K, qs, qd, sums, pairs, w, alpha, beta, g, N, out) -> tokens that took the full product: greedy "
     "tokens of a dense head via its q8 copy"},
    {"sgemm_tiles", py_sgemm_tiles, METH_VARARGS,
     "sgemm_tiles('measured' | 'narrow' | 'wide'): which tile takes 1 to 4 and 5 to 8 tokens (tests, benchmarks)"},
    {"sgemm_chunks", py_sgemm_chunks, METH_VARARGS,
     "sgemm_chunks(n) -> the previous n: row chunks per thread a dense product's threads claim (0: a fixed share each; tests, benchmarks)"},
    {"move_slots", py_move_slots, METH_VARARGS,
     "move_slots(x, outer, stride, slots, D, src, dst, count): in each plane slot src[i] -> dst[i], in order"},
    {"argmax", py_argmax, METH_VARARGS, "argmax(x, rows, N, out): out[r] = first index of the max of x[r, :N] (fp32)"},
    {"set_threads", py_set_threads, METH_VARARGS, "threads for the kernels (before the first call)"},
    {"park", py_park, METH_NOARGS, "idle workers sleep now instead of spinning (another thread pool is about to run)"},
    {"info", py_info, METH_NOARGS, "which code path and how many threads"},
    {"set_isa", py_set_isa, METH_VARARGS, "set_isa('scalar' | 'avx2' | 'vnni' | 'neon' | 'best'): the code path (tests)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_qkernels", "specmtp quantized CPU kernels", -1,
                                    methods};

PyMODINIT_FUNC PyInit__qkernels(void) {
#ifdef SPECMTP_X86
    __builtin_cpu_init();
#endif
    choose_isa(best_isa());
    return PyModule_Create(&module);
}
#endif  /* SPECMTP_NO_PYTHON */
