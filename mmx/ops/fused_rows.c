/* One-pass kernels of an eager float32 forward: RMSNorm, QK-norm with rotary, SwiGLU's silu(gate) * up, and causal
 * softmax attention (online softmax over blocks of keys). Written as torch ops the first three are 3-6 kernels each,
 * every one reading and writing the whole activation; torch's CPU flash attention computes and masks the hidden half
 * of its diagonal blocks. Called by mmx/ops/fused_rows.py through ctypes; work is split between `threads` threads
 * (torch's OpenMP pool), each output row done by one thread in a fixed order, so results do not depend on the thread
 * count. Row lengths and head sizes are multiples of 16 (the caller checks). The norm, rotary and SiLU arithmetic is
 * the decode step's (decode_rows.c, through rows.h).
 */
#include "rows.h"

/* Below this many floats a call stays on the calling thread: waking the pool costs more than it saves. */
#define PARALLEL_MIN (1 << 14)

/* out[r] = w * (x[r] / sqrt(mean(x[r]^2) + eps)) for `rows` rows of n floats */
void mmx_rms_norm_rows(const float *x, const float *w, float *out, int64_t rows, int32_t n, float eps,
                       int32_t threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * n >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) rms_norm(x + r * n, w, out + r * n, n, eps);
}

/* out[r] = rotary(norm(x[r])) for `rows` rows of heads x head_dim floats: the norm's statistic over the whole row
 * (M2's QK-norm over all heads at once) when w is not NULL, then NeoX rotary on the first rotary_dim channels of
 * each head by the row's cos / sin [rotary_dim] (out may be x) */
void mmx_norm_rotary_rows(const float *x, const float *w, float eps, const float *cos_, const float *sin_, float *out,
                          int64_t rows, int32_t heads, int32_t head_dim, int32_t rotary_dim, int32_t threads) {
    int32_t n = heads * head_dim;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * n >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float *o = out + r * n;
        if (w)
            rms_norm(xr, w, o, n, eps);
        else if (o != xr)
            memcpy(o, xr, (size_t)n * sizeof(float));
        for (int32_t h = 0; h < heads; h++)
            rotate(o + (int64_t)h * head_dim, cos_ + r * rotary_dim, sin_ + r * rotary_dim, rotary_dim);
    }
}

/* out[r, j] = silu(gate_up[r, j]) * gate_up[r, inner + j]: gate | up side by side in each row of 2 * inner */
void mmx_silu_mul_rows(const float *gate_up, float *out, int64_t rows, int32_t inner, int32_t threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * inner >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gate_up + r * 2 * inner, *u = g + inner;
        float *o = out + r * inner;
        for (int32_t j = 0; j < inner; j += 16) *(v16 *)(o + j) = silu16(load_f32(g + j)) * load_f32(u + j);
    }
}

/* ------------------------------------------------------------------------------------------------ attention */

#define KEYS 64 /* keys per block: a block's scores for ROWS rows are ROWS x 4 vectors */
#define ROWS 6 /* query rows per tile */

/* scores of ROWS query rows (q, row stride qs) against a block of keys stored transposed (kt [d][KEYS]) */
static inline void block_scores(const float *q, int64_t qs, const float *kt, int32_t d, v16 s[ROWS][4]) {
    for (int r = 0; r < ROWS; r++)
        for (int u = 0; u < 4; u++) s[r][u] = splat(0.0f);
    for (int32_t c = 0; c < d; c++) {
        v16 k0 = load_f32(kt + c * KEYS), k1 = load_f32(kt + c * KEYS + 16), k2 = load_f32(kt + c * KEYS + 32),
            k3 = load_f32(kt + c * KEYS + 48);
        for (int r = 0; r < ROWS; r++) {
            v16 a = splat(q[r * qs + c]);
            s[r][0] += a * k0, s[r][1] += a * k1, s[r][2] += a * k2, s[r][3] += a * k3;
        }
    }
}

/* o[r][:NV*16] += sum over the block's `keys` keys of p[r][j] * v[j][:NV*16] */
#define DEFINE_VALUES(NV)                                                                                             \
    static inline void block_values##NV(const float *p, const float *v, int64_t vs, int keys, float *o, int32_t d) { \
        v16 acc[ROWS][NV];                                                                                            \
        for (int r = 0; r < ROWS; r++)                                                                                \
            for (int u = 0; u < NV; u++) acc[r][u] = load_f32(o + r * d + u * 16);                                    \
        for (int j = 0; j < keys; j++) {                                                                              \
            v16 w[NV];                                                                                                \
            for (int u = 0; u < NV; u++) w[u] = load_f32(v + j * vs + u * 16);                                        \
            for (int r = 0; r < ROWS; r++) {                                                                          \
                v16 a = splat(p[r * KEYS + j]);                                                                       \
                for (int u = 0; u < NV; u++) acc[r][u] += a * w[u];                                                   \
            }                                                                                                         \
        }                                                                                                             \
        for (int r = 0; r < ROWS; r++)                                                                                \
            for (int u = 0; u < NV; u++) *(v16 *)(o + r * d + u * 16) = acc[r][u];                                    \
    }
DEFINE_VALUES(1)
DEFINE_VALUES(2)
DEFINE_VALUES(3)
DEFINE_VALUES(4)

/* the largest of a vector's lanes, as a tree */
static inline float vmax(v16 a) {
    v16 b = __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    a = pick(a > b, a, b);
    b = __builtin_shufflevector(a, a, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    a = pick(a > b, a, b);
    b = __builtin_shufflevector(a, a, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    a = pick(a > b, a, b);
    b = __builtin_shufflevector(a, a, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    a = pick(a > b, a, b);
    return a[0];
}

/* Softmax attention of rows [r0, r1) of query head h (batch b) over keys [0, tk), online (one pass over the key
 * blocks, a running max and sum per row), query i seeing keys j <= offset + i when causal; out rows [b, t, h, d].
 * work: (n + ROWS) * (2 d + 2) + ROWS * KEYS floats, n = r1 - r0. */
static void attend_rows(const float *q, const int64_t *qst, const float *kt, const float *v, const int64_t *vst,
                        float *out, int64_t b, int32_t h, int32_t heads, int32_t group, int64_t r0, int64_t r1,
                        int64_t tq, int64_t tk, int32_t d, int32_t causal, int64_t offset, float scale, float *work) {
    int64_t n = r1 - r0, padded = n + ROWS;
    float *qs = work, *o = qs + padded * d, *m = o + padded * d, *l = m + padded, *p = l + padded;
    for (int64_t i = 0; i < padded; i++) {  /* the rows scaled, the last one repeated to fill the last tile */
        const float *src = q + b * qst[0] + (int64_t)h * qst[1] + (r0 + (i < n ? i : n - 1)) * qst[2];
        for (int32_t c = 0; c < d; c++) qs[i * d + c] = src[c] * scale, o[i * d + c] = 0.0f;
        m[i] = -INFINITY, l[i] = 0.0f;
    }
    int64_t visible = causal ? (offset + r1 < tk ? offset + r1 : tk) : tk;
    const float *vb = v + b * vst[0] + (int64_t)(h / group) * vst[1];
    for (int64_t j0 = 0; j0 < visible; j0 += KEYS) {
        int keys = (int)(tk - j0 < KEYS ? tk - j0 : KEYS);
        const float *ktb = kt + (j0 / KEYS) * (int64_t)d * KEYS;
        for (int64_t i0 = r0; i0 < r1; i0 += ROWS) {
            int rows = (int)(r1 - i0 < ROWS ? r1 - i0 : ROWS);
            if (causal && j0 > offset + i0 + rows - 1) continue; /* every key of the block hidden from the tile */
            v16 s[ROWS][4];
            block_scores(qs + (i0 - r0) * d, d, ktb, d, s);
            for (int r = 0; r < ROWS; r++) {
                if (r >= rows) {
                    for (int j = 0; j < KEYS; j++) p[r * KEYS + j] = 0.0f;
                    continue;
                }
                int64_t row = i0 - r0 + r;
                int64_t last = causal ? offset + i0 + r - j0 : KEYS - 1; /* the row's last key in the block */
                if (last > keys - 1) last = keys - 1;
                if (last < KEYS - 1)
                    for (int u = 0; u < 4; u++)
                        for (int e = 0; e < 16; e++)
                            if (u * 16 + e > last) s[r][u][e] = -INFINITY;
                v16 most = pick(s[r][0] > s[r][1], s[r][0], s[r][1]), other = pick(s[r][2] > s[r][3], s[r][2], s[r][3]);
                float top = vmax(pick(most > other, most, other));
                top = m[row] > top ? m[row] : top;
                float alpha = expf(m[row] - top);
                v16 sum = splat(0.0f);
                for (int u = 0; u < 4; u++) {
                    v16 e = exp16(s[r][u] - splat(top));
                    if (last < KEYS - 1) e = pick((v16i)(s[r][u] == splat(-INFINITY)), splat(0.0f), e);
                    *(v16 *)(p + r * KEYS + u * 16) = e;
                    sum += e;
                }
                m[row] = top;
                l[row] = l[row] * alpha + hsum(sum);
                float *orow = o + row * d;
                for (int32_t c = 0; c < d; c += 16) *(v16 *)(orow + c) = load_f32(orow + c) * splat(alpha);
            }
            /* the tile's output rows (rows past r1 add zeros to spare rows of o) */
            float *ot = o + (i0 - r0) * d;
            const float *vj = vb + j0 * vst[2];
            for (int32_t c = 0; c < d; c += 64) {
                int nv = (d - c) / 16 < 4 ? (d - c) / 16 : 4;
                if (nv == 4)
                    block_values4(p, vj + c, vst[2], keys, ot + c, d);
                else if (nv == 3)
                    block_values3(p, vj + c, vst[2], keys, ot + c, d);
                else if (nv == 2)
                    block_values2(p, vj + c, vst[2], keys, ot + c, d);
                else
                    block_values1(p, vj + c, vst[2], keys, ot + c, d);
            }
        }
    }
    for (int64_t i = 0; i < n; i++) {
        float *dst = out + ((b * tq + r0 + i) * heads + h) * (int64_t)d;
        float inv = 1.0f / l[i];
        for (int32_t c = 0; c < d; c++) dst[c] = o[i * d + c] * inv;
    }
}

#define ROW_BLOCK 72 /* query rows per work item (a multiple of ROWS) */

/* out [batch, tq, heads, d] = softmax(scale q k^T) v for q [batch, heads, tq, d], k / v [batch, kv_heads, tk, d]
 * (strides by batch, head, position in qst, kst, vst; channels contiguous); query head h reads K/V head
 * h / (heads / kv_heads); causal: query i sees keys j <= offset + i. d a multiple of 16. The keys are first packed
 * transposed, once for all the query rows that read them (a copy of K's size; packing each block per work item
 * instead, with no such copy, took up to 1.17x the time at head size 128); returns non-zero, having written nothing,
 * when that copy or a thread's work buffer cannot be allocated. */
int32_t mmx_attention_rows(const float *q, const int64_t *qst, const float *k, const int64_t *kst, const float *v,
                           const int64_t *vst, float *out, int64_t batch, int32_t heads, int32_t kv_heads, int64_t tq,
                           int64_t tk, int32_t d, int32_t causal, int64_t offset, float scale, int32_t threads) {
    int64_t blocks = (tk + KEYS - 1) / KEYS, per_head = blocks * d * KEYS;
    float *kt = malloc((size_t)(batch * kv_heads * per_head) * sizeof(float));
    if (!kt) return 1;
    int64_t row_blocks = (tq + ROW_BLOCK - 1) / ROW_BLOCK, items = batch * heads * row_blocks;
    int32_t group = heads / kv_heads, failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *work = malloc(((size_t)(ROW_BLOCK + ROWS) * (2 * d + 2) + ROWS * KEYS) * sizeof(float));
        if (!work) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        /* the keys transposed, block by block: [d][KEYS], zeros past tk */
#pragma omp for schedule(static)
        for (int64_t x = 0; x < batch * kv_heads * blocks; x++) {
            int64_t b = x / (kv_heads * blocks), g = (x / blocks) % kv_heads, j0 = (x % blocks) * KEYS;
            float *dst = kt + (b * kv_heads + g) * per_head + (j0 / KEYS) * d * KEYS;
            for (int j = 0; j < KEYS; j++) {
                const float *src = k + b * kst[0] + g * kst[1] + (j0 + j) * kst[2];
                for (int32_t c = 0; c < d; c++) dst[c * KEYS + j] = j0 + j < tk ? src[c] : 0.0f;
            }
        }
        /* the last row blocks see the most keys (causal): they go first */
#pragma omp for schedule(dynamic, 1)
        for (int64_t x = 0; x < items; x++) {
            if (failed) continue;
            int64_t rb = row_blocks - 1 - x / (batch * heads), bh = x % (batch * heads);
            int64_t b = bh / heads, h = bh % heads;
            int64_t r0 = rb * ROW_BLOCK, r1 = r0 + ROW_BLOCK < tq ? r0 + ROW_BLOCK : tq;
            attend_rows(q, qst, kt + (b * kv_heads + h / group) * per_head, v, vst, out, b, (int32_t)h, heads, group,
                        r0, r1, tq, tk, d, causal, offset, scale, work);
        }
        free(work);
    }
    free(kt);
    return failed;
}
