/* Row-wise pieces of an eager float32 forward, each one pass over memory: RMSNorm, QK-norm with rotary, and
 * SwiGLU's silu(gate) * up. Written as torch ops they are 3-6 kernels each (pow, mean, add, rsqrt, mul, mul; a cat
 * and a negation per rotary; chunk, silu, mul), every one reading and writing the whole activation: on a 4,096-token
 * prefill of tiny M2 about a tenth of the time. Called by mmx/ops/fused_rows.py through ctypes; rows are split
 * between `threads` threads (torch's OpenMP pool), each row done by one thread in a fixed order, so results do not
 * depend on the thread count. Row lengths are multiples of 16 (the caller checks). The arithmetic is the decode
 * step's (decode_rows.c, through rows.h), so a token's activations agree between prefill and native decode.
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
