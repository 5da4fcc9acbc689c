/* Vector helpers shared by the CPU kernels (expert_rows.c, decode_rows.c, fused_rows.c): 16-float vectors, loads of float32 and
 * int8 weights, the transposing sum of 16 accumulators, dot-product blocks of 4 weight rows, exp and SiLU,
 * RMSNorm and rotary of one row, and int8 row scales. */
#ifndef MMX_ROWS_H
#define MMX_ROWS_H
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

/* the sum of a vector's lanes, as a tree (a scalar loop would be 16 dependent additions) */
INLINE float hsum(v16 a) {
    v16 zero = {0};
    v16 s = fold1(fold2(fold4(fold8(a, zero), zero), zero), zero);
    return s[0];
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

/* the sum of squares of n floats (n a multiple of 16) */
INLINE float sum_squares(const float *x, int n) {
    v16 acc = {0};
    for (int d = 0; d < n; d += 16) {
        v16 v = load_f32(x + d);
        acc += v * v;
    }
    return hsum(acc);
}

/* RMSNorm of one row: out = w * x / sqrt(mean(x^2) + eps) (out may be x) */
INLINE void rms_norm(const float *x, const float *w, float *out, int n, float eps) {
    float r = 1.0f / sqrtf(sum_squares(x, n) / (float)n + eps);
    for (int d = 0; d < n; d++) out[d] = w[d] * (x[d] * r);
}

/* NeoX rotary on the first rotary_dim channels of one head, by the position's cos / sin */
INLINE void rotate(float *head, const float *cos_, const float *sin_, int rotary_dim) {
    int half = rotary_dim / 2;
    for (int j = 0; j < half; j++) {
        float a = head[j], b = head[j + half];
        head[j] = a * cos_[j] - b * sin_[j];
        head[j + half] = b * cos_[j + half] + a * sin_[j + half];
    }
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

#endif
