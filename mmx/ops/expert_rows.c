/* SwiGLU experts for a few tokens, each expert's weights read once for all the tokens routed to it.
 *
 * Called by expert_rows_op.cpp (the op's checks), built with it by mmx/ops/expert_rows.py (gcc -O3 -march=native
 * -fopenmp; OpenMP shares libgomp's pool with torch). Weights stay in the model's layout, rows of the input
 * dimension: gate|up [E, 2I, D] and down [E, D, I], float32, or int8 with one float32 or bfloat16 scale per output
 * row. Products are dot products over 16-float vectors in blocks of 4 routed rows x 4 weight rows: 16 accumulators,
 * so every weight vector loaded serves up to 4 rows and every row vector 4 weight rows, and a transposing tree of
 * shuffles turns the 16 accumulators into 16 sums. The first block of an expert's rows prefetches the next 4 weight
 * rows: the expert's weights stream from memory while the block computes (tiny M2's 16-row layer, 8 layers' weights
 * in turn: 361 -> 228 us).
 *
 * Requires D % 16 == 0 and I % 16 == 0 (the caller checks). Returns 1 when its scratch memory cannot be had, 2
 * when an expert id is out of range.
 * Sums are float32, in a fixed order: the result depends only on the inputs, not on the thread count.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int8_t v16b __attribute__((vector_size(16), aligned(1)));
typedef int32_t v16i __attribute__((vector_size(64)));

#define INLINE static inline __attribute__((always_inline))

INLINE v16 load_f32(const float *p) { return *(const v16 *)p; }
/* gcc turns a generic int8 -> float32 vector conversion into sixteen scalar ones: with AVX-512, one sign
 * extension and one conversion */
#ifdef __AVX512F__
#include <immintrin.h>
INLINE v16 load_i8(const int8_t *p) {
    return (v16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
#else
INLINE v16 load_i8(const int8_t *p) { return __builtin_convertvector(*(const v16b *)p, v16); }
#endif

/* lanes 0-7 of the result: a's 8-lane partial sums; 8-15: b's (and so on down the tree) */
INLINE v16 fold8(v16 a, v16 b) {
    return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}
INLINE v16 fold4(v16 a, v16 b) {
    return __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
}
INLINE v16 fold2(v16 a, v16 b) {
    return __builtin_shufflevector(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
}
INLINE v16 fold1(v16 a, v16 b) {
    return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
           __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

/* lane k of the result: the full sum of acc[k] */
INLINE v16 sums16(const v16 *acc) {
    v16 h[8], q[4], p[2];
    for (int k = 0; k < 8; k++) h[k] = fold8(acc[2 * k], acc[2 * k + 1]);
    for (int k = 0; k < 4; k++) q[k] = fold4(h[2 * k], h[2 * k + 1]);
    for (int k = 0; k < 2; k++) p[k] = fold2(q[2 * k], q[2 * k + 1]);
    return fold1(p[0], p[1]);
}

/* out[r * 4 + o] = dot(rows[r], w + o * n) for r < M routed rows and 4 weight rows of length n */
#define DEFINE_BLOCK(NAME, WTYPE, LOAD)                                                                               \
    INLINE v16 NAME(const WTYPE *w, const float *const *rows, int M, int n, int prefetch) {                           \
        v16 acc[16] = {0};                                                                                            \
        for (int d = 0; d < n; d += 16) {                                                                             \
            if (prefetch)                                                                                             \
                for (int o = 4; o < 8; o++) __builtin_prefetch(w + o * n + d);                                        \
            v16 w0 = LOAD(w + d), w1 = LOAD(w + n + d), w2 = LOAD(w + 2 * n + d), w3 = LOAD(w + 3 * n + d);           \
            for (int r = 0; r < M; r++) {                                                                             \
                v16 x = load_f32(rows[r] + d);                                                                        \
                acc[4 * r] += x * w0;                                                                                 \
                acc[4 * r + 1] += x * w1;                                                                             \
                acc[4 * r + 2] += x * w2;                                                                             \
                acc[4 * r + 3] += x * w3;                                                                             \
            }                                                                                                         \
        }                                                                                                             \
        return sums16(acc);                                                                                           \
    }
DEFINE_BLOCK(block_f32, float, load_f32)
DEFINE_BLOCK(block_i8, int8_t, load_i8)

/* the block for m (1-4) rows, with the row count a constant in each copy so the row loop unrolls */
#define BLOCK_FOR(FN, w, rows, m, n, p)                                                                               \
    ((m) == 4   ? FN(w, rows, 4, n, p)                                                                                \
     : (m) == 3 ? FN(w, rows, 3, n, p)                                                                                \
     : (m) == 2 ? FN(w, rows, 2, n, p)                                                                                \
                : FN(w, rows, 1, n, p))

INLINE v16 splat(float a) { return (v16){a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a}; }
INLINE v16 pick(v16i mask, v16 a, v16 b) { return (v16)(((v16i)a & mask) | ((v16i)b & ~mask)); }

/* exp(x) to ~1 ulp: x = n ln2 + r with |r| <= ln2 / 2, Cephes' expf polynomial for e^r, 2^n through the exponent
 * bits; x is clamped to [-87.3, 88.7] (e^x stays a normal float), and a NaN stays NaN */
INLINE v16 exp16(v16 x) {
    x = pick(x > splat(88.7f), splat(88.7f), x);
    x = pick(x < splat(-87.3f), splat(-87.3f), x);
    const v16 round = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    v16 n = (x * splat(1.44269504f) + round) - round;
    v16 r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
    v16 p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    p = p * r * r + r + splat(1.0f);
    v16i bits = (__builtin_convertvector(n, v16i) + 127) << 23;
    return p * (v16)bits;
}

INLINE v16 silu16(v16 g) { return g / (splat(1.0f) + exp16(-g)); }

/* Group the N*K (token, slot) pairs by expert: pair[start[e] .. start[e+1]) are expert e's, in token order.
 * Returns 1, touching nothing, when an expert id is outside [0, E). */
static int group_pairs(const int64_t *ids, int P, int E, int32_t *start, int32_t *pair) {
    int32_t *fill = pair + P;
    for (int p = 0; p < P; p++)
        if (ids[p] < 0 || ids[p] >= E) return 1;
    memset(start, 0, sizeof(int32_t) * (E + 1));
    for (int p = 0; p < P; p++) start[ids[p] + 1]++;
    for (int e = 0; e < E; e++) start[e + 1] += start[e];
    memcpy(fill, start, sizeof(int32_t) * E);
    for (int p = 0; p < P; p++) pair[fill[ids[p]]++] = p;
    return 0;
}

/* one int8 weight row's scale, stored as float32 or as bfloat16 (the upper half of a float32) */
INLINE float scale_at(const void *s, int bf16, int64_t k) {
    if (!bf16) return ((const float *)s)[k];
    uint32_t bits = (uint32_t)((const uint16_t *)s)[k] << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
#define SCALES4(s, bf16, k)                                                                                           \
    scale_at(s, bf16, k), scale_at(s, bf16, k + 1), scale_at(s, bf16, k + 2), scale_at(s, bf16, k + 3),               \
        scale_at(s, bf16, k), scale_at(s, bf16, k + 1), scale_at(s, bf16, k + 2), scale_at(s, bf16, k + 3),           \
        scale_at(s, bf16, k), scale_at(s, bf16, k + 1), scale_at(s, bf16, k + 2), scale_at(s, bf16, k + 3),           \
        scale_at(s, bf16, k), scale_at(s, bf16, k + 1), scale_at(s, bf16, k + 2), scale_at(s, bf16, k + 3)

#define DEFINE_EXPERTS(NAME, WTYPE, BLOCK)                                                                            \
    int NAME(const float *x, const int64_t *ids, const float *mix, const WTYPE *gu, const void *gu_scale,             \
              const WTYPE *dn, const void *dn_scale, int scale_bf16, float *out, int N, int K, int E, int D, int I,   \
              int threads) {                                                                                          \
        int P = N * K;                                                                                                \
        int32_t *scratch = malloc(sizeof(int32_t) * (2 * E + 1 + P));                                                 \
        float *act = malloc(sizeof(float) * (size_t)P * I); /* silu(gate) * up of each pair */                        \
        if (!scratch || !act) {                                                                                       \
            free(act);                                                                                                \
            free(scratch);                                                                                            \
            return 1;                                                                                                 \
        }                                                                                                             \
        int32_t *start = scratch, *pair = scratch + E + 1;                                                            \
        if (group_pairs(ids, P, E, start, pair)) {                                                                    \
            free(act);                                                                                                \
            free(scratch);                                                                                            \
            return 2;                                                                                                 \
        }                                                                                                             \
        _Pragma("omp parallel num_threads(threads)")                                                                  \
        {                                                                                                             \
            /* act[p, i] = silu(gate_i . x) * (up_i . x) for pair p, 4 features i at a time */                        \
            _Pragma("omp for schedule(static)") for (int i = 0; i < I; i += 4) {                                      \
                for (int e = 0; e < E; e++) {                                                                         \
                    const WTYPE *wg = gu + ((int64_t)e * 2 * I + i) * D, *wu = wg + (int64_t)I * D;                   \
                    for (int j = start[e]; j < start[e + 1]; j += 4) {                                                \
                        int m = start[e + 1] - j < 4 ? start[e + 1] - j : 4;                                          \
                        const float *rows[4];                                                                         \
                        for (int r = 0; r < m; r++) rows[r] = x + (int64_t)(pair[j + r] / K) * D;                     \
                        int first = j == start[e];                                                                    \
                        v16 g = BLOCK_FOR(BLOCK, wg, rows, m, D, first);                                              \
                        v16 u = BLOCK_FOR(BLOCK, wu, rows, m, D, first);                                              \
                        if (gu_scale) {                                                                               \
                            int64_t k = (int64_t)e * 2 * I + i;                                                       \
                            g *= (v16){SCALES4(gu_scale, scale_bf16, k)};                                             \
                            u *= (v16){SCALES4(gu_scale, scale_bf16, k + I)};                                         \
                        }                                                                                             \
                        v16 a = silu16(g) * u; /* lane 4r + o: row r, feature i + o */                                \
                        for (int r = 0; r < m; r++)                                                                   \
                            memcpy(act + (int64_t)pair[j + r] * I + i, (float *)&a + 4 * r, 16);                      \
                    }                                                                                                 \
                }                                                                                                     \
            }                                                                                                         \
            /* out[t, d] = sum over t's pairs, by expert, of mix * (down_d . act[p]) */                               \
            _Pragma("omp for schedule(static)") for (int d = 0; d < D; d += 4) {                                      \
                for (int t = 0; t < N; t++)                                                                           \
                    for (int o = 0; o < 4; o++) out[(int64_t)t * D + d + o] = 0.0f;                                   \
                for (int e = 0; e < E; e++) {                                                                         \
                    const WTYPE *w = dn + ((int64_t)e * D + d) * I;                                                   \
                    for (int j = start[e]; j < start[e + 1]; j += 4) {                                                \
                        int m = start[e + 1] - j < 4 ? start[e + 1] - j : 4;                                          \
                        const float *rows[4];                                                                         \
                        for (int r = 0; r < m; r++) rows[r] = act + (int64_t)pair[j + r] * I;                         \
                        v16 y = BLOCK_FOR(BLOCK, w, rows, m, I, j == start[e]);                                       \
                        for (int r = 0; r < m; r++)                                                                   \
                            for (int o = 0; o < 4; o++) {                                                             \
                                float ys = y[4 * r + o];                                                              \
                                if (dn_scale) ys *= scale_at(dn_scale, scale_bf16, (int64_t)e * D + d + o);           \
                                out[(int64_t)(pair[j + r] / K) * D + d + o] += mix[pair[j + r]] * ys;                 \
                            }                                                                                         \
                    }                                                                                                 \
                }                                                                                                     \
            }                                                                                                         \
        }                                                                                                             \
        free(act);                                                                                                    \
        free(scratch);                                                                                                \
        return 0;                                                                                                     \
    }
DEFINE_EXPERTS(experts_f32, float, block_f32)
DEFINE_EXPERTS(experts_i8, int8_t, block_i8)

/* out[t, o] = x[t] . w[o] for N rows x [N, D] and a weight w [O, D] (float32, or int8 times a float32 or bfloat16
 * scale per row), in the same 4 x 4 blocks: each block of 4 weight rows is read from memory once and serves every
 * row of x from L1, where dot products per row read all of w again for each row. Requires D % 16 == 0 and
 * O % 4 == 0 (the caller checks). */
#define DEFINE_DENSE(NAME, WTYPE, BLOCK)                                                                              \
    int NAME(const float *x, const WTYPE *w, const void *scale, int scale_bf16, float *out, int N, int D, int O,       \
             int threads) {                                                                                           \
        _Pragma("omp parallel for num_threads(threads) schedule(static)") for (int o = 0; o < O; o += 4) {           \
            const WTYPE *wo = w + (int64_t)o * D;                                                                     \
            for (int t = 0; t < N; t += 4) {                                                                          \
                int m = N - t < 4 ? N - t : 4;                                                                        \
                const float *rows[4];                                                                                 \
                for (int r = 0; r < m; r++) rows[r] = x + (int64_t)(t + r) * D;                                       \
                v16 y = BLOCK_FOR(BLOCK, wo, rows, m, D, t == 0);                                                     \
                if (scale) {                                                                                          \
                    v16 s = {SCALES4(scale, scale_bf16, o)};                                                          \
                    y *= s;                                                                                           \
                }                                                                                                     \
                for (int r = 0; r < m; r++) memcpy(out + (int64_t)(t + r) * O + o, (float *)&y + 4 * r, 16);         \
            }                                                                                                         \
        }                                                                                                             \
        return 0;                                                                                                     \
    }
DEFINE_DENSE(dense_f32, float, block_f32)
DEFINE_DENSE(dense_i8, int8_t, block_i8)
