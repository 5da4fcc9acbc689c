/* One decode step of a few sequences through a MiniMax decoder (M2's softmax layers, M1's lightning and softmax
 * layers, MoE after each), in one parallel region.
 *
 * A compiled graph of this step runs ~27 OpenMP regions or work-sharing barriers a layer, and writes each weight
 * product as one dot product per output row: one accumulator chain per row, so int8 weights (widened as they are
 * read) run at ~10 multiply-adds a nanosecond where the core can do 40+. Here the whole step is one region: each
 * phase splits its rows between the threads and ends at a barrier (6 a layer). The weights come repacked into
 * panels (a copy the caller makes), each weight vector multiplied by up to 8 sequences as it is read, and the
 * experts' (token, expert) pairs are grouped by expert so that each chosen expert is read once; where the caller
 * made no copy (weights too large for one), the model's own layout is read: for one sequence 16 weight rows at a
 * time into 16 accumulators, for more 4 weight rows by 4 sequences. Called by mmx/engine/native_step.py through
 * ctypes, with the model as the structs below (pointers into the model's tensors or their panel copies, and the
 * cache's K/V pools).
 *
 * The arithmetic is the model's (mmx/model): float32 throughout (K/V stored in bfloat16 or float16 are rounded as
 * torch rounds them and widened exactly as they are read), int8 weights times their row scales, RMSNorm's
 * statistic in float32, NeoX rotary on the first rotary_dim channels of each head, M2's QK-norm over all heads at
 * once, a sigmoid router with a selection-only bias or a softmax one, the chosen experts' weights renormalised.
 * Every output element is summed by one thread in a fixed order, so the result does not depend on the thread
 * count. Requires hidden, head_dim and inner sizes that are multiples of 16 (the caller checks).
 */
#include <omp.h>

#include "rows.h"

typedef struct {
    const void *weight;  /* [rows, cols], float32 or int8; or, with panels, repacked (see "panels" below) */
    const void *scale;   /* int8: one scale per row (float32, or bfloat16 when scale_bf16); NULL for float32 */
    int32_t scale_bf16;
    int32_t panels;      /* the weight is repacked into panels */
} dm_matrix;

typedef struct {
    const float *input_norm, *post_norm;
    const float *q_norm, *k_norm; /* NULL without QK-norm */
    dm_matrix q, k, v, o;
    const float *router;          /* [experts, hidden], float32 */
    const float *bias;            /* [experts], the sigmoid router's selection bias, or NULL */
    dm_matrix gate_up, down;      /* [experts * 2 * inner, hidden] and [experts * hidden, inner] */
    void *keys, *values;          /* K/V pools [blocks, block_size, kv_heads, head_dim], of the model's kv_dtype */
    float attn_alpha, attn_beta, mlp_alpha, mlp_beta;
    /* a lightning layer (M1) instead: silu(qkv) packed per head [q | k | v], a decayed state per head, RMSNorm over
     * all heads, a sigmoid gate, and o as its output projection */
    int32_t lightning;
    dm_matrix qkv, gate;          /* [heads * 3 * head_dim, hidden], [heads * head_dim, hidden] */
    const float *lightning_norm;  /* [heads * head_dim] */
    const float *rates;           /* [heads]: the state decays by exp(-rate) a token */
    float *states;                /* state pool [slots, heads, head_dim, head_dim], float32 */
    float lightning_eps;
} dm_layer;

typedef struct {
    int32_t layers, hidden, heads, kv_heads, head_dim, rotary_dim, experts, top_k, inner, vocab, block_size;
    int32_t postnorm, sigmoid_router;
    int32_t kv_dtype; /* the K/V pools' element: KV_F32, KV_BF16 or KV_F16 */
    float eps, attn_scale;
    const float *embed;      /* [vocab, hidden] */
    const float *final_norm; /* [hidden] */
    dm_matrix lm_head;       /* [vocab, hidden] */
    const float *inv_freq;   /* [rotary_dim / 2] */
    const dm_layer *layer;
} dm_model;

/* ------------------------------------------------------------------------------------------------ products */

/* out[r - r0] = w[r] . x for rows r in [r0, r1): 16 rows at a time (16 accumulators, the transposing sum), then 4,
 * then one. IN_ORDER reads the 16 rows one after the other, in address order, two accumulators a row: float32 weights
 * stream from memory, and walking 16 rows side by side (16 streams 1-2 KB apart) read them at 27-39 GB/s on a 2-core
 * AMD EPYC (Zen 4) where reading in order reached 39-48. int8 rows sit in the L3 at these models' sizes and their
 * widening is the work: side by side (16 independent chains) made the step faster for them (docs/benchmarks.md,
 * "Weights read in address order"; bench/weight_order.py). */
#define DEFINE_ROWS(NAME, WTYPE, LOAD, BLOCK, IN_ORDER)                                                               \
    static void NAME(const WTYPE *w, const float *x, float *out, int r0, int r1, int n) {                             \
        int r = r0;                                                                                                   \
        for (; r + 16 <= r1; r += 16) {                                                                               \
            const WTYPE *wr = w + (int64_t)r * n;                                                                     \
            v16 acc[16] = {0};                                                                                        \
            if (IN_ORDER) {                                                                                           \
                for (int k = 0; k < 16; k++) {                                                                        \
                    const WTYPE *row = wr + (int64_t)k * n;                                                           \
                    v16 a = {0}, b = {0};                                                                             \
                    int d = 0;                                                                                        \
                    for (; d + 32 <= n; d += 32) {                                                                    \
                        a += load_f32(x + d) * LOAD(row + d);                                                         \
                        b += load_f32(x + d + 16) * LOAD(row + d + 16);                                               \
                    }                                                                                                 \
                    if (d < n) a += load_f32(x + d) * LOAD(row + d);                                                  \
                    acc[k] = a + b;                                                                                   \
                }                                                                                                     \
            } else {                                                                                                  \
                for (int d = 0; d < n; d += 16) {                                                                     \
                    v16 xv = load_f32(x + d);                                                                         \
                    for (int k = 0; k < 16; k++) acc[k] += xv * LOAD(wr + (int64_t)k * n + d);                        \
                }                                                                                                     \
            }                                                                                                         \
            v16 s = sums16(acc);                                                                                      \
            memcpy(out + (r - r0), &s, sizeof s);                                                                     \
        }                                                                                                             \
        const float *rows[1] = {x};                                                                                   \
        for (; r + 4 <= r1; r += 4) {                                                                                 \
            v16 s = BLOCK(w + (int64_t)r * n, rows, 1, n, 0);                                                         \
            memcpy(out + (r - r0), &s, 4 * sizeof(float));                                                           \
        }                                                                                                             \
        for (; r < r1; r++) {                                                                                         \
            v16 acc = {0};                                                                                            \
            for (int d = 0; d < n; d += 16) acc += load_f32(x + d) * LOAD(w + (int64_t)r * n + d);                    \
            out[r - r0] = hsum(acc);                                                                                  \
        }                                                                                                             \
    }
DEFINE_ROWS(rows_f32, float, load_f32, block_f32, 1)
DEFINE_ROWS(rows_i8, int8_t, load_i8, block_i8, 0)

/* out[r - r0] = (m[r] . x) for rows [r0, r1) of m, int8 rows times their scales */
static void product(const dm_matrix *m, const float *x, float *out, int r0, int r1, int n) {
    if (r0 >= r1) return;
    if (!m->scale) {
        rows_f32((const float *)m->weight, x, out, r0, r1, n);
        return;
    }
    rows_i8((const int8_t *)m->weight, x, out, r0, r1, n);
    for (int r = r0; r < r1; r++) out[r - r0] *= scale_at(m->scale, m->scale_bf16, r);
}

/* Panels: a matrix repacked (mmx/engine/native_step.py, a copy of the model's weights) so that each weight vector
 * read is multiplied by up to 8 tokens with no sum across lanes, and a thread's share is one stream. A dense matrix
 * [rows, cols] becomes panels of 16 rows, each [cols][16] (the last one padded with zero rows); the experts' layouts
 * are described at act_experts and down_experts. Against the dot-product blocks over the model's own layout (4
 * weight rows by 4 tokens, a sum across lanes for each block) panels took tiny M2's 16-sequence experts from 3.0-3.8
 * to 1.3-1.6 ms a step on a 2-core AMD EPYC (docs/benchmarks.md, "Weights in panels"). */
#define PANEL 32 /* floats in a panel row */

/* acc[r * V + v] = sum over j < n of x[r][j] * w[j * 16V + 16v + lane], for T rows of x (up to 8) and a panel of V
 * (1 or 2) vectors a row; with few rows, S chains over j (summed at the end) keep the FMA units busy (n is a
 * multiple of 16, so of S) */
#define DEFINE_PANEL(NAME, WTYPE, LOAD)                                                                               \
    INLINE void NAME(const WTYPE *w, int V, const float *const *x, int T, int n, v16 *acc) {                          \
        const int S = T * V <= 4 ? 4 : T * V <= 8 ? 2 : 1;                                                            \
        v16 part[4][16];                                                                                              \
        for (int s = 0; s < S; s++)                                                                                   \
            for (int a = 0; a < T * V; a++) part[s][a] = splat(0.0f);                                                 \
        for (int j = 0; j < n; j += S)                                                                                \
            for (int s = 0; s < S; s++) {                                                                             \
                const WTYPE *row = w + (int64_t)(j + s) * 16 * V;                                                     \
                v16 w0 = LOAD(row), w1 = V == 2 ? LOAD(row + 16) : w0;                                                \
                for (int r = 0; r < T; r++) {                                                                         \
                    v16 xb = splat(x[r][j + s]);                                                                      \
                    part[s][r * V] += xb * w0;                                                                        \
                    if (V == 2) part[s][r * V + 1] += xb * w1;                                                        \
                }                                                                                                     \
            }                                                                                                         \
        for (int a = 0; a < T * V; a++) {                                                                             \
            acc[a] = part[0][a];                                                                                      \
            for (int s = 1; s < S; s++) acc[a] += part[s][a];                                                         \
        }                                                                                                             \
    }
DEFINE_PANEL(panel_f32, float, load_f32)
DEFINE_PANEL(panel_i8, int8_t, load_i8)

/* the panel product for T (1-8) rows and V vectors, with both constants in each copy so the loops unroll */
#define PANEL_FOR(FN, w, V, x, T, n, acc)                                                                             \
    do {                                                                                                              \
        switch ((T) * 2 + (V) - 1) {                                                                                  \
        case 2: FN(w, 1, x, 1, n, acc); break;                                                                        \
        case 3: FN(w, 2, x, 1, n, acc); break;                                                                        \
        case 4: FN(w, 1, x, 2, n, acc); break;                                                                        \
        case 5: FN(w, 2, x, 2, n, acc); break;                                                                        \
        case 6: FN(w, 1, x, 3, n, acc); break;                                                                        \
        case 7: FN(w, 2, x, 3, n, acc); break;                                                                        \
        case 8: FN(w, 1, x, 4, n, acc); break;                                                                        \
        case 9: FN(w, 2, x, 4, n, acc); break;                                                                        \
        case 10: FN(w, 1, x, 5, n, acc); break;                                                                       \
        case 11: FN(w, 2, x, 5, n, acc); break;                                                                       \
        case 12: FN(w, 1, x, 6, n, acc); break;                                                                       \
        case 13: FN(w, 2, x, 6, n, acc); break;                                                                       \
        case 14: FN(w, 1, x, 7, n, acc); break;                                                                       \
        case 15: FN(w, 2, x, 7, n, acc); break;                                                                       \
        case 16: FN(w, 1, x, 8, n, acc); break;                                                                       \
        default: FN(w, 2, x, 8, n, acc); break;                                                                       \
        }                                                                                                             \
    } while (0)

/* acc for T rows of x against one panel of m (V vectors a row, n rows), int8 panels unscaled */
static void panel(const dm_matrix *m, int64_t at, int V, const float *const *x, int T, int n, v16 *acc) {
    if (m->scale)
        PANEL_FOR(panel_i8, (const int8_t *)m->weight + at, V, x, T, n, acc);
    else
        PANEL_FOR(panel_f32, (const float *)m->weight + at, V, x, T, n, acc);
}

/* the row scales of an int8 matrix for rows k .. k + count - 1 (count <= 16), or ones for float32 */
static v16 scales16(const dm_matrix *m, int64_t k, int count) {
    v16 s = splat(1.0f);
    if (m->scale)
        for (int o = 0; o < count; o++) s[o] = scale_at(m->scale, m->scale_bf16, k + o);
    return s;
}

/* out[t * ldo + (r - r0)] = m[r] . x[t * ldx] for N rows of x and the rows [r0, r1) of a matrix in panels of 16
 * rows (r0 a multiple of 16), each panel read once for up to 8 rows of x at a time */
static void panel_products(const dm_matrix *m, const float *x, int N, int ldx, float *out, int ldo, int r0, int r1,
                           int n) {
    for (int r = r0; r < r1; r += 16) {
        int rows = r1 - r < 16 ? r1 - r : 16;
        v16 scale = scales16(m, r, rows);
        for (int t = 0; t < N; t += 8) {
            int count = N - t < 8 ? N - t : 8;
            const float *xs[8];
            v16 acc[16];
            for (int j = 0; j < count; j++) xs[j] = x + (int64_t)(t + j) * ldx;
            panel(m, (int64_t)r * n, 1, xs, count, n, acc);
            for (int j = 0; j < count; j++) {
                v16 y = acc[j] * scale;
                memcpy(out + (int64_t)(t + j) * ldo + (r - r0), &y, sizeof(float) * rows);
            }
        }
    }
}

/* out[t * ldo + (r - r0)] = m[r] . x[t * ldx] for N rows of x and the weight rows [r0, r1): one row as above, more
 * in blocks of 4 weight rows by up to 4 rows of x (the weight block read once for all of them) */
static void products(const dm_matrix *m, const float *x, int N, int ldx, float *out, int ldo, int r0, int r1, int n) {
    if (m->panels) {
        panel_products(m, x, N, ldx, out, ldo, r0, r1, n);
        return;
    }
    if (N == 1) {
        product(m, x, out, r0, r1, n);
        return;
    }
    int r = r0;
    for (; r + 4 <= r1; r += 4) {
        for (int t = 0; t < N; t += 4) {
            int count = N - t < 4 ? N - t : 4;
            const float *rows[4];
            for (int j = 0; j < count; j++) rows[j] = x + (int64_t)(t + j) * ldx;
            v16 y;
            if (m->scale) {
                y = BLOCK_FOR(block_i8, (const int8_t *)m->weight + (int64_t)r * n, rows, count, n, t == 0);
                y *= (v16){SCALES4(m->scale, m->scale_bf16, r)};
            } else {
                y = BLOCK_FOR(block_f32, (const float *)m->weight + (int64_t)r * n, rows, count, n, t == 0);
            }
            for (int j = 0; j < count; j++) memcpy(out + (int64_t)(t + j) * ldo + (r - r0), (float *)&y + 4 * j, 16);
        }
    }
    for (; r < r1; r++)
        for (int t = 0; t < N; t++) product(m, x + (int64_t)t * ldx, out + (int64_t)t * ldo + (r - r0), r, r + 1, n);
}

/* this thread's share [*r0, *r1) of n rows, in whole blocks of 16 */
static void share(int n, int tid, int nt, int *r0, int *r1) {
    int blocks = (n + 15) / 16;
    int b0 = (int)((int64_t)blocks * tid / nt), b1 = (int)((int64_t)blocks * (tid + 1) / nt);
    *r0 = b0 * 16 < n ? b0 * 16 : n;
    *r1 = b1 * 16 < n ? b1 * 16 : n;
}

/* ------------------------------------------------------------------------------------------------ pieces */

/* out[p] = offset of position p's K/V rows in the pools (head 0), through the block table: no division per
 * position */
static void positions_at(const dm_model *m, const int64_t *table, int64_t length, int64_t *out) {
    int bs = m->block_size;
    int64_t row = (int64_t)m->kv_heads * m->head_dim;
    for (int64_t p = 0, b = 0; p < length; b++)
        for (int j = 0; j < bs && p < length; j++, p++) out[p] = (table[b] * bs + j) * row;
}

enum { KV_F32, KV_BF16, KV_F16 };
typedef uint16_t v16u16 __attribute__((vector_size(32), aligned(2)));
typedef uint32_t v16u32 __attribute__((vector_size(64)));
typedef _Float16 v16f16 __attribute__((vector_size(32), aligned(2)));

/* 16 K/V elements from element ``at`` of a pool, widened to float32 (exactly: bf16 is a float32's upper half) */
static inline __attribute__((always_inline)) v16 load_kv(const void *pool, int64_t at, const int KV) {
    if (KV == KV_BF16) return (v16)(__builtin_convertvector(*(const v16u16 *)((const uint16_t *)pool + at), v16u32) << 16);
    if (KV == KV_F16) return __builtin_convertvector(*(const v16f16 *)((const _Float16 *)pool + at), v16);
    return load_f32((const float *)pool + at);
}

/* n floats into a pool at element ``at``, rounded to its element as torch rounds (to nearest, ties to even) */
static void store_kv(void *pool, int64_t at, const float *x, int n, int kv) {
    for (int i = 0; i < n; i++) {
        if (kv == KV_F32) {
            ((float *)pool)[at + i] = x[i];
        } else if (kv == KV_F16) {
            ((_Float16 *)pool)[at + i] = (_Float16)x[i];
        } else {
            uint32_t bits;
            memcpy(&bits, x + i, 4);
            uint16_t top = isnan(x[i]) ? 0x7fc0 : (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
            ((uint16_t *)pool)[at + i] = top;
        }
    }
}

/* softmax attention of HB query heads h0 .. h0 + HB of K/V head g over the positions at[0 .. length) of the pools (the
 * newest written there first), reading each position's K and V once for all HB heads. Scores go 16 / HB positions
 * x HB heads at a time into 16 accumulators and one transposing sum (scores[h * length + p] for head h0 + h), the
 * exponentials 16 at a time, then the values 64 channels at a time for the HB heads together. Each score and output
 * element is summed in the same order whatever HB is. DH is the head size, a constant in each copy. */
static inline __attribute__((always_inline)) void attend_pass(const dm_model *m, const dm_layer *l, const float *q,
                                                              const int64_t *at, int64_t length, int g, int h0,
                                                              float *out, float *scores, const int HB, const int DH,
                                                              const int KV) {
    const int PB = 16 / HB; /* positions a block */
    int64_t head = (int64_t)g * DH; /* head g's offset in each position's row */
    const float *qh = q + (int64_t)h0 * DH;
    int64_t p = 0;
    for (; p + PB <= length; p += PB) {
        v16 acc[16] = {0};
        for (int d = 0; d < DH; d += 16) {
            v16 qv[HB];
            for (int h = 0; h < HB; h++) qv[h] = load_f32(qh + (int64_t)h * DH + d);
            for (int j = 0; j < PB; j++) {
                v16 kv = load_kv(l->keys, head + at[p + j] + d, KV);
                for (int h = 0; h < HB; h++) acc[j * HB + h] += qv[h] * kv;
            }
        }
        v16 s = sums16(acc) * splat(m->attn_scale);
        for (int j = 0; j < PB; j++)
            for (int h = 0; h < HB; h++) scores[h * length + p + j] = s[j * HB + h];
    }
    for (; p < length; p++)
        for (int h = 0; h < HB; h++) {
            v16 acc = {0};
            for (int d = 0; d < DH; d += 16)
                acc += load_f32(qh + (int64_t)h * DH + d) * load_kv(l->keys, head + at[p] + d, KV);
            scores[h * length + p] = hsum(acc) * m->attn_scale;
        }
    float scale[HB];
    for (int h = 0; h < HB; h++) {
        float *sh = scores + h * length, top = -INFINITY, total = 0.0f;
        for (p = 0; p < length; p++) top = sh[p] > top ? sh[p] : top;
        for (p = 0; p + 16 <= length; p += 16) {
            v16 e = exp16(load_f32(sh + p) - splat(top));
            memcpy(sh + p, &e, sizeof e);
            total += hsum(e);
        }
        for (; p < length; p++) total += sh[p] = expf(sh[p] - top);
        scale[h] = 1.0f / total;
    }
    for (int c = 0; c < DH; c += 64) {
        const int CV = DH - c < 64 ? (DH - c) / 16 : 4; /* vectors of this channel block */
        v16 o[HB][4];
        for (int h = 0; h < HB; h++)
            for (int v = 0; v < 4; v++) o[h][v] = splat(0.0f);
        for (p = 0; p < length; p++) {
            v16 vv[4];
            for (int v = 0; v < CV; v++) vv[v] = load_kv(l->values, head + at[p] + c + 16 * v, KV);
            for (int h = 0; h < HB; h++) {
                v16 w = splat(scores[h * length + p]);
                for (int v = 0; v < CV; v++) o[h][v] += w * vv[v];
            }
        }
        for (int h = 0; h < HB; h++)
            for (int v = 0; v < CV; v++) {
                v16 oc = o[h][v] * splat(scale[h]);
                memcpy(out + (int64_t)(h0 + h) * DH + c + 16 * v, &oc, sizeof oc);
            }
    }
}

/* K/V head g's query heads, up to 4 in each pass over its K and V (MiniMax-M2 has 6 a K/V head: a pass of 4 and one
 * of 2, where one pass a head read them 6 times) */
static inline __attribute__((always_inline)) void attend_heads(const dm_model *m, const dm_layer *l, const float *q,
                                                               const int64_t *at, int64_t length, int g, float *out,
                                                               float *scores, const int DH, const int KV) {
    int R = m->heads / m->kv_heads;
    for (int h0 = g * R, left = R; left > 0;) {
        if (left >= 4) {
            attend_pass(m, l, q, at, length, g, h0, out, scores, 4, DH, KV);
            h0 += 4, left -= 4;
        } else if (left >= 2) {
            attend_pass(m, l, q, at, length, g, h0, out, scores, 2, DH, KV);
            h0 += 2, left -= 2;
        } else {
            attend_pass(m, l, q, at, length, g, h0, out, scores, 1, DH, KV);
            h0 += 1, left -= 1;
        }
    }
}

#define ATTEND_KV(DH)                                                                                                 \
    (m->kv_dtype == KV_BF16  ? attend_heads(m, l, q, at, length, g, out, scores, DH, KV_BF16)                        \
     : m->kv_dtype == KV_F16 ? attend_heads(m, l, q, at, length, g, out, scores, DH, KV_F16)                         \
                             : attend_heads(m, l, q, at, length, g, out, scores, DH, KV_F32))

static void attend(const dm_model *m, const dm_layer *l, const float *q, const int64_t *at, int64_t length, int g,
                   float *out, float *scores) {
    switch (m->head_dim) {
    case 64: ATTEND_KV(64); break;
    case 128: ATTEND_KV(128); break;
    default: ATTEND_KV(m->head_dim);
    }
}

/* ids and renormalised weights of the chosen experts, from the router's logits (every thread the same) */
static void route(const dm_model *m, const dm_layer *l, const float *logits, int *ids, float *weights) {
    int E = m->experts, K = m->top_k;
    float scores[E], choice[E];
    if (m->sigmoid_router) {
        for (int e = 0; e < E; e++) {
            scores[e] = 1.0f / (1.0f + expf(-logits[e]));
            choice[e] = l->bias ? scores[e] + l->bias[e] : scores[e];
        }
    } else {
        float top = -INFINITY, total = 0.0f;
        for (int e = 0; e < E; e++) top = logits[e] > top ? logits[e] : top;
        for (int e = 0; e < E; e++) total += scores[e] = expf(logits[e] - top);
        for (int e = 0; e < E; e++) choice[e] = scores[e] /= total;
    }
    float sum = 0.0f;
    for (int k = 0; k < K; k++) { /* top-k, highest first; ties to the lower id */
        int best = -1;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int j = 0; j < k; j++) taken |= ids[j] == e;
            if (!taken && (best < 0 || choice[e] > choice[best])) best = e;
        }
        ids[k] = best;
        weights[k] = scores[best];
        sum += scores[best];
    }
    for (int k = 0; k < K; k++) weights[k] /= sum;
}

/* ------------------------------------------------------------------------------------------------ the experts */

/* A step's experts come in panels (below) or, where no copy was made (weights too large for one), in the model's
 * own layout, read with the dot-product blocks above. */

/* the (token, slot) pairs grouped by expert: pair[start[e] .. start[e + 1]) are expert e's, in token order */
static void group(const int *ids, int P, int E, int *start, int *pair) {
    int fill[E];
    for (int e = 0; e <= E; e++) start[e] = 0;
    for (int p = 0; p < P; p++) start[ids[p] + 1]++;
    for (int e = 0; e < E; e++) start[e + 1] += start[e];
    for (int e = 0; e < E; e++) fill[e] = start[e];
    for (int p = 0; p < P; p++) pair[fill[ids[p]]++] = p;
}

/* ---- experts in panels */

/* act[p * I + i] = silu(gate_i . h) * (up_i . h) for every pair p: this thread's share of each chosen expert's
 * panels, each read once for up to 8 of the expert's pairs at a time. gate_up in panels: expert e's panel p
 * (features 16p .. 16p + 15) is [hidden][32], a row holding those features' 16 gate weights, then their 16 up
 * weights; int8 row scales in the model's order [experts, 2 * inner]. */
static void act_experts(const dm_model *m, const dm_layer *l, const float *h, const int *start, const int *pair,
                        float *act, int tid, int nt) {
    int D = m->hidden, I = m->inner, K = m->top_k, panels = I / 16;
    const dm_matrix *w = &l->gate_up;
    int p0 = (int)((int64_t)panels * tid / nt), p1 = (int)((int64_t)panels * (tid + 1) / nt);
    for (int e = 0; e < m->experts; e++) {
        if (start[e] == start[e + 1]) continue;
        for (int p = p0; p < p1; p++) {
            int64_t gate_row = (int64_t)e * 2 * I + 16 * p;
            v16 gate_scale = scales16(w, gate_row, 16), up_scale = scales16(w, gate_row + I, 16);
            for (int j = start[e]; j < start[e + 1]; j += 8) {
                int count = start[e + 1] - j < 8 ? start[e + 1] - j : 8;
                const float *rows[8];
                v16 acc[16];
                for (int r = 0; r < count; r++) rows[r] = h + (int64_t)(pair[j + r] / K) * D;
                panel(w, ((int64_t)e * panels + p) * D * PANEL, 2, rows, count, D, acc);
                for (int r = 0; r < count; r++) {
                    v16 a = silu16(acc[2 * r] * gate_scale) * (acc[2 * r + 1] * up_scale);
                    memcpy(act + (int64_t)pair[j + r] * I + 16 * p, &a, sizeof a);
                }
            }
        }
    }
}

/* y[t * D + d] = sum over token t's pairs of mix * (down_d . act[pair]), for this thread's share of the down
 * panels: the hidden rows [*d0, *d1) they hold; each panel read once for up to 8 of its expert's pairs at a time.
 * down in panels: expert e's panel p (outputs 32p .. 32p + 31) is [inner][32], the last one [inner][16] where hidden
 * is an odd number of 16s; int8 row scales in the model's order [experts, hidden]. */
static void down_experts(const dm_model *m, const dm_layer *l, const float *act, const int *start, const int *pair,
                         const float *mix, int N, float *y, int tid, int nt, int *d0_, int *d1_) {
    int D = m->hidden, I = m->inner, K = m->top_k, panels = (D + PANEL - 1) / PANEL;
    const dm_matrix *w = &l->down;
    int p0 = (int)((int64_t)panels * tid / nt), p1 = (int)((int64_t)panels * (tid + 1) / nt);
    int d0 = p0 * PANEL, d1 = p1 * PANEL < D ? p1 * PANEL : D;
    *d0_ = d0, *d1_ = d1;
    for (int t = 0; t < N; t++)
        for (int d = d0; d < d1; d++) y[(int64_t)t * D + d] = 0.0f;
    for (int e = 0; e < m->experts; e++) {
        if (start[e] == start[e + 1]) continue;
        for (int p = p0; p < p1; p++) {
            int V = D - p * PANEL >= PANEL ? 2 : 1;
            int64_t row = (int64_t)e * D + p * PANEL;
            v16 scale[2] = {scales16(w, row, 16), scales16(w, row + 16, V == 2 ? 16 : 0)};
            for (int j = start[e]; j < start[e + 1]; j += 8) {
                int count = start[e + 1] - j < 8 ? start[e + 1] - j : 8;
                const float *rows[8];
                v16 acc[16];
                for (int r = 0; r < count; r++) rows[r] = act + (int64_t)pair[j + r] * I;
                panel(w, (int64_t)e * D * I + (int64_t)p * PANEL * I, V, rows, count, I, acc);
                for (int r = 0; r < count; r++) {
                    float *yt = y + (int64_t)(pair[j + r] / K) * D + p * PANEL;
                    for (int v = 0; v < V; v++) {
                        v16 sum = load_f32(yt + 16 * v) + splat(mix[pair[j + r]]) * (acc[r * V + v] * scale[v]);
                        memcpy(yt + 16 * v, &sum, sizeof sum);
                    }
                }
            }
        }
    }
}

/* ---- experts in the model's own layout */

/* act[k * I + i] = silu(gate_i . h) * (up_i . h) of one token's K chosen experts, for this thread's share of the
 * (slot, 16 features) chunks */
static void act_one(const dm_model *m, const dm_layer *l, const float *h, const int *ids, float *act, int tid, int nt) {
    int K = m->top_k, I = m->inner, chunks = I / 16;
    for (int c = (int)((int64_t)K * chunks * tid / nt); c < (int)((int64_t)K * chunks * (tid + 1) / nt); c++) {
        int slot = c / chunks, i = (c % chunks) * 16, row = ids[slot] * 2 * I + i;
        v16 gate, up;
        product(&l->gate_up, h, (float *)&gate, row, row + 16, m->hidden);
        product(&l->gate_up, h, (float *)&up, row + I, row + I + 16, m->hidden);
        v16 a = silu16(gate) * up;
        memcpy(act + (size_t)slot * I + i, &a, sizeof a);
    }
}

/* y[d - d0] = sum over slots of mix[k] * (down_d . act[k]) of one token, for the hidden rows [d0, d1) */
static void down_one(const dm_model *m, const dm_layer *l, const float *act, const int *ids, const float *mix, float *y,
                     int d0, int d1) {
    int D = m->hidden, I = m->inner;
    for (int d = d0; d < d1; d++) y[d - d0] = 0.0f;
    for (int c0 = d0; c0 < d1; c0 += 16) {
        int c1 = c0 + 16 < d1 ? c0 + 16 : d1;
        float part[16];
        for (int slot = 0; slot < m->top_k; slot++) {
            int row = ids[slot] * D;
            product(&l->down, act + (size_t)slot * I, part, row + c0, row + c1, I);
            for (int j = 0; j < c1 - c0; j++) y[c0 - d0 + j] += part[j] * mix[slot];
        }
    }
}

/* act[p * I + i] for every pair p, this thread's share of the features in blocks of 4: each expert's 4 gate and 4
 * up rows read once for up to 4 of its pairs at a time */
static void act_grouped(const dm_model *m, const dm_layer *l, const float *h, const int *start, const int *pair,
                        float *act, int tid, int nt) {
    int D = m->hidden, I = m->inner, K = m->top_k, blocks = I / 4;
    const dm_matrix *w = &l->gate_up;
    for (int b = (int)((int64_t)blocks * tid / nt); b < (int)((int64_t)blocks * (tid + 1) / nt); b++) {
        int i = 4 * b;
        for (int e = 0; e < m->experts; e++) {
            int64_t gate_row = (int64_t)e * 2 * I + i, up_row = gate_row + I;
            for (int j = start[e]; j < start[e + 1]; j += 4) {
                int count = start[e + 1] - j < 4 ? start[e + 1] - j : 4, first = j == start[e];
                const float *rows[4];
                for (int r = 0; r < count; r++) rows[r] = h + (int64_t)(pair[j + r] / K) * D;
                v16 g, u;
                if (w->scale) {
                    g = BLOCK_FOR(block_i8, (const int8_t *)w->weight + gate_row * D, rows, count, D, first);
                    u = BLOCK_FOR(block_i8, (const int8_t *)w->weight + up_row * D, rows, count, D, first);
                    g *= (v16){SCALES4(w->scale, w->scale_bf16, gate_row)};
                    u *= (v16){SCALES4(w->scale, w->scale_bf16, up_row)};
                } else {
                    g = BLOCK_FOR(block_f32, (const float *)w->weight + gate_row * D, rows, count, D, first);
                    u = BLOCK_FOR(block_f32, (const float *)w->weight + up_row * D, rows, count, D, first);
                }
                v16 a = silu16(g) * u; /* lane 4r + o: pair r, feature i + o */
                for (int r = 0; r < count; r++) memcpy(act + (int64_t)pair[j + r] * I + i, (float *)&a + 4 * r, 16);
            }
        }
    }
}

/* y[t * D + d] = sum over token t's pairs of mix * (down_d . act[pair]), for the hidden rows [d0, d1) (multiples
 * of 4), each expert's 4 down rows read once for up to 4 of its pairs at a time */
static void down_grouped(const dm_model *m, const dm_layer *l, const float *act, const int *start, const int *pair,
                         const float *mix, int N, float *y, int d0, int d1) {
    int D = m->hidden, I = m->inner, K = m->top_k;
    const dm_matrix *w = &l->down;
    for (int t = 0; t < N; t++)
        for (int d = d0; d < d1; d++) y[(int64_t)t * D + d] = 0.0f;
    for (int d = d0; d < d1; d += 4) {
        for (int e = 0; e < m->experts; e++) {
            int64_t row = (int64_t)e * D + d;
            for (int j = start[e]; j < start[e + 1]; j += 4) {
                int count = start[e + 1] - j < 4 ? start[e + 1] - j : 4, first = j == start[e];
                const float *rows[4];
                for (int r = 0; r < count; r++) rows[r] = act + (int64_t)pair[j + r] * I;
                v16 s;
                if (w->scale) {
                    s = BLOCK_FOR(block_i8, (const int8_t *)w->weight + row * I, rows, count, I, first);
                    s *= (v16){SCALES4(w->scale, w->scale_bf16, row)};
                } else {
                    s = BLOCK_FOR(block_f32, (const float *)w->weight + row * I, rows, count, I, first);
                }
                for (int r = 0; r < count; r++)
                    for (int o = 0; o < 4; o++) y[(int64_t)(pair[j + r] / K) * D + d + o] += mix[pair[j + r]] * s[4 * r + o];
            }
        }
    }
}

/* one head's lightning step: q, k, v <- silu of their packed projections; state <- state * decay + k v^T;
 * out = q . state (over the key dimension) */
static void lightning_head(const float *qkv, float rate, float *state, float *out, int Dh) {
    float q[Dh], k[Dh];
    for (int i = 0; i < Dh; i++) {
        q[i] = qkv[i] / (1.0f + expf(-qkv[i]));
        k[i] = qkv[Dh + i] / (1.0f + expf(-qkv[Dh + i]));
    }
    const float *vr = qkv + 2 * Dh;
    float decay = expf(-rate);
    for (int c = 0; c < Dh; c += 16) {
        v16 v = silu16(load_f32(vr + c)), o = {0};
        for (int i = 0; i < Dh; i++) {
            float *row = state + (int64_t)i * Dh + c;
            v16 sv = load_f32(row) * splat(decay) + splat(k[i]) * v;
            memcpy(row, &sv, sizeof sv);
            o += splat(q[i]) * sv;
        }
        memcpy(out + c, &o, sizeof o);
    }
}

/* x <- alpha * r + beta * y over the columns [d0, d1) of N rows of D: r is x itself (pre-norm, M2) or the
 * normalised input (post-norm, M1) */
static void residual(float *x, const float *r, float alpha, const float *y, float beta, int N, int D, int d0, int d1) {
    for (int t = 0; t < N; t++)
        for (int d = d0; d < d1; d++) {
            size_t at = (size_t)t * D + d;
            x[at] = alpha * r[at] + beta * y[at];
        }
}

/* ------------------------------------------------------------------------------------------------ the step */

/* Logits [N, vocab] of the next token of N sequences: sequence t feeds tokens[t] at positions[t], its K/V are
 * written at flat slot write_at[t] of each layer's pools, and it attends over lengths[t] (= positions[t] + 1)
 * positions through its block table, row t of tables [N, width]. Returns 0, or 1 when scratch memory cannot be
 * had (nothing written). */
int mmx_decode_rows(const dm_model *m, int N, const int64_t *tokens, const int64_t *positions, const int64_t *write_at,
                    const int64_t *tables, int64_t width, const int64_t *lengths, const int64_t *slots, float *logits,
                    int threads) {
    int D = m->hidden, H = m->heads, G = m->kv_heads, Dh = m->head_dim, E = m->experts, K = m->top_k, I = m->inner;
    int QD = H * Dh, KD = G * Dh, rd = m->rotary_dim, half = rd / 2;
    int64_t longest = 1;
    for (int t = 0; t < N; t++) longest = lengths[t] > longest ? lengths[t] : longest;
    size_t shared = (size_t)N * (7 * QD + 3 * KD + 2 * D + E + (size_t)K * I + 2 * rd); /* + lightning's qkv, gate */
    float *buf = malloc(sizeof(float) * shared);
    /* h, h2, scores, then the positions' offsets (int64, 8-byte aligned: every count here is even) */
    size_t each = (size_t)2 * N * D + (size_t)N * QD + 4 * longest + 2 * longest; /* + z; scores of 4 heads */
    float *per_thread = malloc(sizeof(float) * each * threads);
    if (!buf || !per_thread) {
        free(buf);
        free(per_thread);
        return 1;
    }
    float *x = buf, *q = x + (size_t)N * D, *k = q + (size_t)N * QD, *v = k + (size_t)N * KD, *qr = v + (size_t)N * KD;
    float *kr = qr + (size_t)N * QD, *attn = kr + (size_t)N * KD, *o = attn + (size_t)N * QD;
    float *router = o + (size_t)N * D, *act = router + (size_t)N * E, *cos_ = act + (size_t)N * K * I;
    float *sin_ = cos_ + (size_t)N * rd, *lqkv = sin_ + (size_t)N * rd, *lgate = lqkv + (size_t)N * 3 * QD;
    for (int t = 0; t < N; t++) {
        memcpy(x + (size_t)t * D, m->embed + tokens[t] * D, sizeof(float) * D);
        for (int j = 0; j < half; j++) { /* float32 angles, as the model's RotaryEmbedding */
            float angle = (float)positions[t] * m->inv_freq[j];
            cos_[t * rd + j] = cos_[t * rd + j + half] = cosf(angle);
            sin_[t * rd + j] = sin_[t * rd + j + half] = sinf(angle);
        }
    }
    dm_matrix router_matrix = {NULL, NULL, 0}; /* float32 [experts, hidden] */
#pragma omp parallel num_threads(threads)
    {
        int tid = omp_get_thread_num(), nt = omp_get_num_threads();
        float *h = per_thread + each * tid, *h2 = h + (size_t)N * D, *z = h2 + (size_t)N * D, *scores = z + (size_t)N * QD;
        int64_t *offsets = (int64_t *)(scores + 4 * longest);
        int ids[N * K], start[E + 1], pair[N * K];
        float mix[N * K];
        int r0, r1;
        for (int li = 0; li < m->layers; li++) {
            const dm_layer *l = m->layer + li;
            for (int t = 0; t < N; t++) rms_norm(x + (size_t)t * D, l->input_norm, h + (size_t)t * D, D, m->eps);
            const float *mixed = attn; /* what the output projection reads */
            if (l->lightning) {
                /* lightning: the packed q|k|v and the gate of the normalised inputs */
                share(4 * QD, tid, nt, &r0, &r1);
                int a0 = r0 < 3 * QD ? r0 : 3 * QD, a1 = r1 < 3 * QD ? r1 : 3 * QD;
                products(&l->qkv, h, N, D, lqkv + a0, 3 * QD, a0, a1, D);
                a0 = r0 < 3 * QD ? 0 : r0 - 3 * QD, a1 = r1 < 3 * QD ? 0 : r1 - 3 * QD;
                products(&l->gate, h, N, D, lgate + a0, QD, a0, a1, D);
#pragma omp barrier
                /* this thread's (sequence, head) pairs: the state's step and the head's output */
                for (int item = (int)((int64_t)N * H * tid / nt); item < (int)((int64_t)N * H * (tid + 1) / nt); item++) {
                    int t = item / H, hd = item % H;
                    float *state = l->states + ((size_t)slots[t] * H + hd) * Dh * Dh;
                    lightning_head(lqkv + (size_t)t * 3 * QD + (size_t)hd * 3 * Dh, l->rates[hd], state,
                                   attn + (size_t)t * QD + (size_t)hd * Dh, Dh);
                }
#pragma omp barrier
                /* z = sigmoid(gate) * RMSNorm(heads), every sequence's by every thread (the products split rows) */
                for (int t = 0; t < N; t++) {
                    float *zt = z + (size_t)t * QD;
                    const float *gt = lgate + (size_t)t * QD;
                    rms_norm(attn + (size_t)t * QD, l->lightning_norm, zt, QD, l->lightning_eps);
                    for (int j = 0; j < QD; j++) zt[j] *= 1.0f / (1.0f + expf(-gt[j]));
                }
                mixed = z;
            } else {
                /* softmax attention: q, k, v of the normalised inputs */
                share(QD + 2 * KD, tid, nt, &r0, &r1);
                int a0 = r0 < QD ? r0 : QD, a1 = r1 < QD ? r1 : QD;
                products(&l->q, h, N, D, q + a0, QD, a0, a1, D);
                a0 = r0 < QD ? 0 : (r0 - QD < KD ? r0 - QD : KD), a1 = r1 < QD ? 0 : (r1 - QD < KD ? r1 - QD : KD);
                products(&l->k, h, N, D, k + a0, KD, a0, a1, D);
                a0 = r0 < QD + KD ? 0 : r0 - QD - KD, a1 = r1 < QD + KD ? 0 : r1 - QD - KD;
                products(&l->v, h, N, D, v + a0, KD, a0, a1, D);
#pragma omp barrier
                /* this thread's (sequence, K/V head) pairs: QK-norm (statistics over all heads) and rotary into qr / kr,
                 * the new K/V into the pools, then the attention of the head's queries */
                for (int item = (int)((int64_t)N * G * tid / nt); item < (int)((int64_t)N * G * (tid + 1) / nt); item++) {
                    int t = item / G, g = item % G;
                    const float *qt = q + (size_t)t * QD, *kt = k + (size_t)t * KD, *vt = v + (size_t)t * KD;
                    float *qrt = qr + (size_t)t * QD, *krt = kr + (size_t)t * KD;
                    float q_rms = l->q_norm ? 1.0f / sqrtf(sum_squares(qt, QD) / (float)QD + m->eps) : 1.0f;
                    float k_rms = l->k_norm ? 1.0f / sqrtf(sum_squares(kt, KD) / (float)KD + m->eps) : 1.0f;
                    int64_t at = (int64_t)g * Dh;
                    for (int d = 0; d < Dh; d++)
                        krt[at + d] = l->k_norm ? l->k_norm[at + d] * (kt[at + d] * k_rms) : kt[at + d];
                    rotate(krt + at, cos_ + (size_t)t * rd, sin_ + (size_t)t * rd, rd);
                    for (int64_t j = (int64_t)g * (H / G) * Dh; j < (int64_t)(g + 1) * (H / G) * Dh; j++)
                        qrt[j] = l->q_norm ? l->q_norm[j] * (qt[j] * q_rms) : qt[j];
                    for (int hq = g * (H / G); hq < (g + 1) * (H / G); hq++)
                        rotate(qrt + (int64_t)hq * Dh, cos_ + (size_t)t * rd, sin_ + (size_t)t * rd, rd);
                    store_kv(l->keys, (write_at[t] * G + g) * Dh, krt + at, Dh, m->kv_dtype);
                    store_kv(l->values, (write_at[t] * G + g) * Dh, vt + at, Dh, m->kv_dtype);
                    positions_at(m, tables + (size_t)t * width, lengths[t], offsets);
                    attend(m, l, qrt, offsets, lengths[t], g, attn + (size_t)t * QD, scores);
                }
#pragma omp barrier
            }
            /* output projection and the residual */
            share(D, tid, nt, &r0, &r1);
            products(&l->o, mixed, N, QD, o + r0, D, r0, r1, QD);
            residual(x, m->postnorm ? h : x, l->attn_alpha, o, l->attn_beta, N, D, r0, r1);
#pragma omp barrier
            /* the router over the normalised residuals */
            for (int t = 0; t < N; t++) rms_norm(x + (size_t)t * D, l->post_norm, h2 + (size_t)t * D, D, m->eps);
            share(E, tid, nt, &r0, &r1);
            router_matrix.weight = l->router;
            products(&router_matrix, h2, N, D, router + r0, E, r0, r1, D);
#pragma omp barrier
            for (int t = 0; t < N; t++) route(m, l, router + (size_t)t * E, ids + t * K, mix + t * K);
            group(ids, N * K, E, start, pair);
            if (l->gate_up.panels)
                act_experts(m, l, h2, start, pair, act, tid, nt);
            else if (N == 1)
                act_one(m, l, h2, ids, act, tid, nt);
            else
                act_grouped(m, l, h2, start, pair, act, tid, nt);
#pragma omp barrier
            /* down, mixed by the routing weights, and the residual */
            if (l->gate_up.panels) {
                down_experts(m, l, act, start, pair, mix, N, o, tid, nt, &r0, &r1);
            } else {
                share(D, tid, nt, &r0, &r1);
                if (N == 1)
                    down_one(m, l, act, ids, mix, o + r0, r0, r1);
                else
                    down_grouped(m, l, act, start, pair, mix, N, o, r0, r1);
            }
            residual(x, m->postnorm ? h2 : x, l->mlp_alpha, o, l->mlp_beta, N, D, r0, r1);
#pragma omp barrier
        }
        for (int t = 0; t < N; t++) rms_norm(x + (size_t)t * D, m->final_norm, h + (size_t)t * D, D, m->eps);
        share(m->vocab, tid, nt, &r0, &r1);
        products(&m->lm_head, h, N, D, logits + r0, m->vocab, r0, r1, D);
    }
    free(per_thread);
    free(buf);
    return 0;
}
