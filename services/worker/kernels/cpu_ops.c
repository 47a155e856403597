/* MemServe's CPU kernels (float32), called through ctypes by services/worker/kernels/ops.py.

   Built once per machine by build.py with `cc -O3 -march=native -fopenmp -ffp-contract=off`.
   -ffp-contract=off keeps a*b+c as two roundings, as torch's elementwise kernels do, so the
   elementwise kernels (rotary, residual add) give torch's bits. The reductions (RMSNorm's
   sum of squares, attention's dot products and softmax) sum in another order than torch's
   and may differ in the last bits, like any two attention implementations.

   Layouts (row-major, strides in elements):
     KV cache of one layer: block b, slot o, kv head h at  base + b*block_stride + (o*H + h)*D,
       i.e. [num_blocks, block_size, H, D] with an arbitrary block stride (the engine's
       cache interleaves layers and K/V inside a block).
     qkv: [T, row] rows, q heads at column 0, k heads at q_cols, v heads at q_cols + kv_cols.

   Threads: OpenMP. torch's wheel ships libgomp with the soname libgomp.so.1 and loads it
   first, so these loops share torch's thread pool instead of starting a second one (two
   spinning pools on two cores would take turns stalling each other). */

#ifdef __FMA__
#include <immintrin.h>
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32), aligned(4), may_alias));

typedef int32_t v8i __attribute__((vector_size(32), aligned(4), may_alias));

static inline v8 splat(float f) { return (v8){f, f, f, f, f, f, f, f}; }

/* exp of 8 floats (Cephes' expf: range reduction by ln 2, degree-6 polynomial; within 2
   ulp of libm's expf over [-87, 88], inputs outside are clamped). */
static inline v8 exp8(v8 x) {
    const v8 hi = splat(88.3762626647949f), lo = splat(-87.3365447504f);
    v8i m = x > hi; /* lanes of all ones where true */
    x = (v8)(((v8i)hi & m) | ((v8i)x & ~m));
    m = x < lo;
    x = (v8)(((v8i)lo & m) | ((v8i)x & ~m));
    v8 fx = x * splat(1.44269504088896341f) + splat(0.5f);
    v8i n = __builtin_convertvector(fx, v8i); /* truncates toward 0: make it floor */
    v8 fn = __builtin_convertvector(n, v8);
    m = fn > fx;
    fn = fn - (v8)((v8i)splat(1.0f) & m);
    n = __builtin_convertvector(fn, v8i);
    x = x - fn * splat(0.693359375f) - fn * splat(-2.12194440e-4f);
    v8 y = splat(1.9875691500e-4f);
    y = y * x + splat(1.3981999507e-3f);
    y = y * x + splat(8.3334519073e-3f);
    y = y * x + splat(4.1665795894e-2f);
    y = y * x + splat(1.6666665459e-1f);
    y = y * x + splat(5.0000001201e-1f);
    y = y * (x * x) + x + splat(1.0f);
    return y * (v8)((n + 127) << 23);
}

static inline float hsum8(v8 a) {
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

/* a * b + c in one rounding where the machine has FMA (attention's sums only: nothing
   there is compared bit for bit with torch). */
static inline v8 fma8(v8 a, v8 b, v8 c) {
#ifdef __FMA__
    return (v8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    return a * b + c;
#endif
}

static inline float dot(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
    if (n >= 16) { /* two accumulators: half the dependency chain */
        v8 acc0 = {0, 0, 0, 0, 0, 0, 0, 0}, acc1 = acc0;
        for (; i + 16 <= n; i += 16) {
            acc0 = fma8(*(const v8 *)(a + i), *(const v8 *)(b + i), acc0);
            acc1 = fma8(*(const v8 *)(a + i + 8), *(const v8 *)(b + i + 8), acc1);
        }
        s = hsum8(acc0 + acc1);
    }
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* y += p * x over n floats */
static inline void axpy(float *y, float p, const float *x, int64_t n) {
    int64_t i = 0;
    v8 pv = {p, p, p, p, p, p, p, p};
    for (; i + 8 <= n; i += 8) *(v8 *)(y + i) = fma8(pv, *(const v8 *)(x + i), *(v8 *)(y + i));
    for (; i < n; i++) y[i] += p * x[i];
}

int memserve_abi_version(void) { return 1; }

/* Decode attention over paged KV, one query token per sequence, read in place.
   q, out: [S, Hq, D]; tables: [S, max_blocks] block ids; ctx_lens: [S] keys per sequence
   (the new token's K/V already written); window <= 0: none, else keys in
   (ctx_len - 1 - window, ctx_len). Hq = G * Hkv: query head h reads kv head h / G.

   A task is one sequence and a range of its kv heads; it walks the sequence's blocks in
   order, reading each token's K (then V) rows for all its heads in one pass. Within a block
   a token's heads are adjacent, so a task whose range is every head streams whole blocks
   (prefetchers follow; reading one head's 256 bytes per token, 1 KB apart, was three times
   slower: a 4 KB page holds only 4 such rows and stride prefetch stops at page ends). Few
   sequences split their heads across tasks so every thread has work. */
void memserve_paged_decode(float *out, const float *q, const float *k_cache,
                           const float *v_cache, const int64_t *tables,
                           const int64_t *ctx_lens, int64_t num_seqs, int64_t max_blocks,
                           int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                           int64_t block_size, int64_t block_stride, int64_t window,
                           float scale) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t split = num_seqs < 8 ? num_kv_heads : 1; /* tasks per sequence */
    const int64_t per_task = num_kv_heads / split;
    const int64_t tasks = num_seqs * split;
    const int64_t row = num_kv_heads * head_dim; /* one token's K (or V) for all heads */
    /* A fork/join costs microseconds: small steps (one short sequence) run on one thread. */
    const int64_t work = num_seqs * max_blocks * block_size * num_heads * head_dim;
#pragma omp parallel if (tasks > 1 && work >= 65536)
    {
        int64_t cap = 0;
        float *scores = NULL;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; task++) {
            const int64_t s = task / split, h0 = (task % split) * per_task;
            const int64_t heads = per_task * group; /* query heads of this task */
            const int64_t len = ctx_lens[s];
            int64_t start = 0;
            if (window > 0 && len - window > 0) start = len - window;
            const int64_t n = len - start;
            if (n <= 0) continue;
            if (n * heads > cap) {
                cap = n * heads;
                free(scores);
                scores = (float *)malloc(sizeof(float) * (size_t)cap);
            }
            const int64_t *table = tables + s * max_blocks;
            const float *qs = q + (s * num_heads + h0 * group) * head_dim;
            float *o = out + (s * num_heads + h0 * group) * head_dim;
            const int64_t kv0 = h0 * head_dim;
            /* scores[h * n + i] = q_h . k_(start + i) * scale */
            for (int64_t b = start / block_size, t = start; t < len; b++) {
                const int64_t base = table[b] * block_stride;
                const int64_t stop = (b + 1) * block_size < len ? (b + 1) * block_size : len;
                for (int64_t off = t - b * block_size; t < stop; t++, off++) {
                    const float *k = k_cache + base + off * row + kv0;
                    for (int64_t h = 0; h < heads; h++)
                        scores[h * n + (t - start)] =
                            dot(qs + h * head_dim, k + (h / group) * head_dim, head_dim) * scale;
                }
            }
            for (int64_t h = 0; h < heads; h++) {
                float *sc = scores + h * n;
                float m = sc[0];
                for (int64_t i = 1; i < n; i++) m = sc[i] > m ? sc[i] : m;
                float sum = 0.0f;
                int64_t i = 0;
                if (n >= 8) {
                    v8 acc = splat(0.0f);
                    for (; i + 8 <= n; i += 8) {
                        const v8 e = exp8(*(const v8 *)(sc + i) - splat(m));
                        *(v8 *)(sc + i) = e;
                        acc += e;
                    }
                    sum = hsum8(acc);
                }
                for (; i < n; i++) {
                    sc[i] = expf(sc[i] - m);
                    sum += sc[i];
                }
                const float inv = 1.0f / sum;
                for (int64_t i = 0; i < n; i++) sc[i] *= inv;
            }
            memset(o, 0, sizeof(float) * (size_t)(heads * head_dim));
            for (int64_t b = start / block_size, t = start; t < len; b++) {
                const int64_t base = table[b] * block_stride;
                const int64_t stop = (b + 1) * block_size < len ? (b + 1) * block_size : len;
                for (int64_t off = t - b * block_size; t < stop; t++, off++) {
                    const float *v = v_cache + base + off * row + kv0;
                    for (int64_t h = 0; h < heads; h++)
                        axpy(o + h * head_dim, scores[h * n + (t - start)],
                             v + (h / group) * head_dim, head_dim);
                }
            }
        }
        free(scores);
    }
}

/* y = x w^T (+ bias) for a few rows of x: y [M, N], x [M, K], w [N, K], all contiguous.

   Decode steps multiply a handful of rows by every weight: the work is reading the weights
   once (a GEMM library tuned for big M packs and re-reads them; at M = 8 oneDNN ran at a
   fifth of this machine's bandwidth). Each task streams 4 weight rows and multiplies them
   with the rows of x two at a time (8 accumulators in registers); the 4 rows stay in L1/L2
   while every row of x passes, so the weights cross the memory bus once. */
static inline void linear_rows4(float *y, const float *x, const float *w, int64_t M,
                                int64_t N, int64_t K, int64_t n0) {
    const float *w0 = w + n0 * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
    /* The next 4 rows (where this thread goes next) are asked for while these are used:
       the first pass over x overlaps the memory wait with the multiplies. */
    const float *ahead = w + (n0 + 4 < N - 4 ? n0 + 4 : n0) * K;
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) {
        const float *xa = x + m * K, *xb = xa + K;
        v8 a0 = {0, 0, 0, 0, 0, 0, 0, 0}, a1 = a0, a2 = a0, a3 = a0;
        v8 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (int64_t k = 0; k < K; k += 8) {
            if (m == 0 && (k & 15) == 0)
                for (int64_t r = 0; r < 4; r++) __builtin_prefetch(ahead + r * K + k, 0, 3);
            const v8 u = *(const v8 *)(xa + k), v = *(const v8 *)(xb + k);
            const v8 r0 = *(const v8 *)(w0 + k), r1 = *(const v8 *)(w1 + k);
            const v8 r2 = *(const v8 *)(w2 + k), r3 = *(const v8 *)(w3 + k);
            a0 = fma8(r0, u, a0), b0 = fma8(r0, v, b0);
            a1 = fma8(r1, u, a1), b1 = fma8(r1, v, b1);
            a2 = fma8(r2, u, a2), b2 = fma8(r2, v, b2);
            a3 = fma8(r3, u, a3), b3 = fma8(r3, v, b3);
        }
        float *ya = y + m * N + n0, *yb = ya + N;
        ya[0] = hsum8(a0), ya[1] = hsum8(a1), ya[2] = hsum8(a2), ya[3] = hsum8(a3);
        yb[0] = hsum8(b0), yb[1] = hsum8(b1), yb[2] = hsum8(b2), yb[3] = hsum8(b3);
    }
    if (m < M) {
        const float *xa = x + m * K;
        v8 a0 = {0, 0, 0, 0, 0, 0, 0, 0}, a1 = a0, a2 = a0, a3 = a0;
        for (int64_t k = 0; k < K; k += 8) {
            if (m == 0 && (k & 15) == 0)
                for (int64_t r = 0; r < 4; r++) __builtin_prefetch(ahead + r * K + k, 0, 3);
            const v8 u = *(const v8 *)(xa + k);
            a0 = fma8(*(const v8 *)(w0 + k), u, a0);
            a1 = fma8(*(const v8 *)(w1 + k), u, a1);
            a2 = fma8(*(const v8 *)(w2 + k), u, a2);
            a3 = fma8(*(const v8 *)(w3 + k), u, a3);
        }
        float *ya = y + m * N + n0;
        ya[0] = hsum8(a0), ya[1] = hsum8(a1), ya[2] = hsum8(a2), ya[3] = hsum8(a3);
    }
}

void memserve_linear_small(float *y, const float *x, const float *w, const float *bias,
                           int64_t M, int64_t N, int64_t K) {
    const int64_t blocks = (N + 3) / 4;
#pragma omp parallel for schedule(static) if (N * K >= 65536)
    for (int64_t nb = 0; nb < blocks; nb++) {
        const int64_t n0 = nb * 4;
        if (n0 + 4 <= N && K % 8 == 0) {
            linear_rows4(y, x, w, M, N, K, n0);
        } else {
            for (int64_t n = n0; n < N && n < n0 + 4; n++)
                for (int64_t m = 0; m < M; m++) y[m * N + n] = dot(x + m * K, w + n * K, K);
        }
        if (bias != NULL)
            for (int64_t m = 0; m < M; m++)
                for (int64_t n = n0; n < N && n < n0 + 4; n++) y[m * N + n] += bias[n];
    }
}

/* K/V of T new tokens into their slots: k, v rows of Hkv*D floats, `row` apart. */
void memserve_write_kv(float *k_cache, float *v_cache, const float *k, const float *v,
                       int64_t row, const int64_t *slot_blocks, const int64_t *slot_offsets,
                       int64_t num_tokens, int64_t kv_cols, int64_t block_stride) {
    for (int64_t t = 0; t < num_tokens; t++) {
        const int64_t at = slot_blocks[t] * block_stride + slot_offsets[t] * kv_cols;
        memcpy(k_cache + at, k + t * row, sizeof(float) * (size_t)kv_cols);
        memcpy(v_cache + at, v + t * row, sizeof(float) * (size_t)kv_cols);
    }
}

/* Rotary embedding in place on the q and k heads of qkv rows (transformers' rotate_half
   form): x1, x2 = halves; x1' = x1*cos - x2*sin, x2' = x2*cos + x1*sin, where cos/sin
   are rows `positions[t]` of [max_pos, D] tables whose two halves repeat. */
void memserve_rotary(float *qkv, int64_t row, const float *cos_t, const float *sin_t,
                     const int64_t *positions, int64_t num_tokens, int64_t num_heads,
                     int64_t num_kv_heads, int64_t head_dim) {
    const int64_t half = head_dim / 2, heads = num_heads + num_kv_heads;
#pragma omp parallel for schedule(static) if (num_tokens * heads >= 256)
    for (int64_t th = 0; th < num_tokens * heads; th++) {
        const int64_t t = th / heads, h = th % heads;
        float *x = qkv + t * row + h * head_dim;
        const float *c = cos_t + positions[t] * head_dim;
        const float *s = sin_t + positions[t] * head_dim;
        for (int64_t i = 0; i < half; i++) {
            const float x1 = x[i], x2 = x[i + half];
            const float a = x1 * c[i], b = (-x2) * s[i];
            const float d = x2 * c[i + half], e = x1 * s[i + half];
            x[i] = a + b;
            x[i + half] = d + e;
        }
    }
}

static inline void rms_row(float *out, const float *x, const float *w, int64_t n, float eps) {
    float ss = dot(x, x, n);
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
}

/* out = w * (x * rsqrt(mean(x^2) + eps)) per row of n floats. */
void memserve_rms_norm(float *out, const float *x, const float *w, int64_t rows, int64_t n,
                       float eps) {
#pragma omp parallel for schedule(static) if (rows >= 16)
    for (int64_t r = 0; r < rows; r++) rms_row(out + r * n, x + r * n, w, n, eps);
}

/* residual += x (torch's add: same bits), then out = rms_norm(residual). */
void memserve_add_rms_norm(float *out, const float *x, float *residual, const float *w,
                           int64_t rows, int64_t n, float eps) {
#pragma omp parallel for schedule(static) if (rows >= 16)
    for (int64_t r = 0; r < rows; r++) {
        float *res = residual + r * n;
        const float *xr = x + r * n;
        for (int64_t i = 0; i < n; i++) res[i] = res[i] + xr[i];
        rms_row(out + r * n, res, w, n, eps);
    }
}

/* out[t, i] = silu(gu[t, i]) * gu[t, inter + i], silu(x) = x / (1 + exp(-x)). */
void memserve_silu_and_mul(float *out, const float *gu, int64_t rows, int64_t inter) {
#pragma omp parallel for schedule(static) if (rows >= 4)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gu + r * 2 * inter, *u = g + inter;
        float *o = out + r * inter;
        int64_t i = 0;
        for (; i + 8 <= inter; i += 8) {
            const v8 gv = *(const v8 *)(g + i);
            *(v8 *)(o + i) = (gv / (splat(1.0f) + exp8(-gv))) * *(const v8 *)(u + i);
        }
        for (; i < inter; i++) o[i] = (g[i] / (1.0f + expf(-g[i]))) * u[i];
    }
}
