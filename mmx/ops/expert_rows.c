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
#include "rows.h"

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
