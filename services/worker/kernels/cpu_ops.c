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

#if defined(__AVX__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* One vector register of floats: 16 lanes where the machine has AVX-512, else 8 (AVX2, or
   whatever the compiler makes of 32-byte vectors elsewhere). Every kernel is written on
   `vf`, so one source serves both widths. */
#ifdef __AVX512F__
#define VW 16
#else
#define VW 8
#endif
typedef float vf __attribute__((vector_size(VW * 4), aligned(4), may_alias));
typedef int32_t vfi __attribute__((vector_size(VW * 4), aligned(4), may_alias));

static inline vf splat(float f) {
#if defined(__AVX512F__)
    return (vf)_mm512_set1_ps(f);
#elif defined(__AVX__)
    return (vf)_mm256_set1_ps(f);
#else
    return (vf){f, f, f, f, f, f, f, f};
#endif
}
static inline vf vzero(void) { return (vf){0}; }

/* exp of VW floats (Cephes' expf: range reduction by ln 2, degree-6 polynomial; within 2
   ulp of libm's expf over [-87, 88], inputs outside are clamped). */
static inline vf expv(vf x) {
    const vf hi = splat(88.3762626647949f), lo = splat(-87.3365447504f);
    vfi m = x > hi; /* lanes of all ones where true */
    x = (vf)(((vfi)hi & m) | ((vfi)x & ~m));
    m = x < lo;
    x = (vf)(((vfi)lo & m) | ((vfi)x & ~m));
    vf fx = x * splat(1.44269504088896341f) + splat(0.5f);
    vfi n = __builtin_convertvector(fx, vfi); /* truncates toward 0: make it floor */
    vf fn = __builtin_convertvector(n, vf);
    m = fn > fx;
    fn = fn - (vf)((vfi)splat(1.0f) & m);
    n = __builtin_convertvector(fn, vfi);
    x = x - fn * splat(0.693359375f) - fn * splat(-2.12194440e-4f);
    vf y = splat(1.9875691500e-4f);
    y = y * x + splat(1.3981999507e-3f);
    y = y * x + splat(8.3334519073e-3f);
    y = y * x + splat(4.1665795894e-2f);
    y = y * x + splat(1.6666665459e-1f);
    y = y * x + splat(5.0000001201e-1f);
    y = y * (x * x) + x + splat(1.0f);
    return y * (vf)((n + 127) << 23);
}

/* exp of VW floats for softmax weights (inputs <= 0 where it matters): expv's polynomial
   on FMAs, round-to-nearest for the range reduction and scalef for 2^n, 14 vector
   operations to expv's ~35 (expv was half of prefill attention's time outside its
   matmuls, by perf). Inputs below -87.3 give exp(-87.3) ~ 1e-38, as expv's clamp does.
   Machines without AVX-512 take expv. */
static inline vf exp_weights(vf x) {
#if defined(__AVX512F__)
    const __m512 v = _mm512_max_ps((__m512)x, _mm512_set1_ps(-87.3365447504f));
    const __m512 t = _mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), v);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return (vf)_mm512_scalef_ps(y, n);
#else
    return expv(x);
#endif
}

/* Sum of the lanes (in a shuffle tree: the order differs from a sequential sum). */
static inline float hsum(vf a) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps((__m512)a);
#elif defined(__AVX__)
    __m128 s = _mm_add_ps(_mm256_castps256_ps128((__m256)a), _mm256_extractf128_ps((__m256)a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
#else
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
#endif
}

/* a * b + c in one rounding where the machine has FMA (sums only: nothing they feed is
   compared bit for bit with torch). */
static inline vf fmav(vf a, vf b, vf c) {
#if defined(__AVX512F__)
    return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
    return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    return a * b + c;
#endif
}

static inline vf loadv(const float *p) { return *(const vf *)p; }
static inline void storev(float *p, vf v) { *(vf *)p = v; }

static inline float dot(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
    if (n >= 2 * VW) { /* two accumulators: half the dependency chain */
        vf acc0 = vzero(), acc1 = acc0;
        for (; i + 2 * VW <= n; i += 2 * VW) {
            acc0 = fmav(loadv(a + i), loadv(b + i), acc0);
            acc1 = fmav(loadv(a + i + VW), loadv(b + i + VW), acc1);
        }
        s = hsum(acc0 + acc1);
    }
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* y += p * x over n floats */
static inline void axpy(float *y, float p, const float *x, int64_t n) {
    int64_t i = 0;
    const vf pv = splat(p);
    for (; i + VW <= n; i += VW) storev(y + i, fmav(pv, loadv(x + i), loadv(y + i)));
    for (; i < n; i++) y[i] += p * x[i];
}

int memserve_abi_version(void) { return 3; }

/* One decode-attention task: a sequence's keys [start, len) (n of them), `heads` query
   heads reading kv heads from column kv0 of each token's row. */
struct attn_task {
    const int64_t *table;
    int64_t start, len, n, heads, group, head_dim, block_size, block_stride, row, kv0;
};

/* The largest of n >= 1 floats: lane-wise maxima first (a scalar max is one long
   dependency chain), then across the lanes. */
static inline float max_of(const float *x, int64_t n) {
    float m = x[0];
    int64_t i = 0;
    if (n >= VW) {
        vf mv = loadv(x);
        for (i = VW; i + VW <= n; i += VW) {
            const vf v = loadv(x + i);
            mv = (vf)(((vfi)v & (v > mv)) | ((vfi)mv & ~(v > mv)));
        }
        for (int l = 0; l < VW; l++) m = mv[l] > m ? mv[l] : m;
    }
    for (; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

/* Each query head's scores -> softmax probabilities, in place (rows of n). */
static void softmax_rows(float *scores, int64_t heads, int64_t n) {
    for (int64_t h = 0; h < heads; h++) {
        float *sc = scores + h * n;
        const float m = max_of(sc, n);
        float sum = 0.0f;
        int64_t i = 0;
        if (n >= VW) {
            vf acc = vzero();
            for (; i + VW <= n; i += VW) {
                const vf e = expv(loadv(sc + i) - splat(m));
                storev(sc + i, e);
                acc += e;
            }
            sum = hsum(acc);
        }
        for (; i < n; i++) {
            sc[i] = expf(sc[i] - m);
            sum += sc[i];
        }
        const float inv = 1.0f / sum;
        for (int64_t i = 0; i < n; i++) sc[i] *= inv;
    }
}

/* Any geometry: a dot product per (token, head), an axpy per (token, head) into `o`. */
static void attend_plain(float *o, float *scores, const float *qs, const float *k_cache,
                         const float *v_cache, const struct attn_task *a, float scale) {
    const int64_t hd = a->head_dim, bs = a->block_size;
    /* scores[h * n + i] = q_h . k_(start + i) * scale */
    for (int64_t b = a->start / bs, t = a->start; t < a->len; b++) {
        const int64_t base = a->table[b] * a->block_stride;
        const int64_t stop = (b + 1) * bs < a->len ? (b + 1) * bs : a->len;
        for (int64_t off = t - b * bs; t < stop; t++, off++) {
            const float *k = k_cache + base + off * a->row + a->kv0;
            for (int64_t h = 0; h < a->heads; h++)
                scores[h * a->n + (t - a->start)] =
                    dot(qs + h * hd, k + (h / a->group) * hd, hd) * scale;
        }
    }
    softmax_rows(scores, a->heads, a->n);
    memset(o, 0, sizeof(float) * (size_t)(a->heads * hd));
    for (int64_t b = a->start / bs, t = a->start; t < a->len; b++) {
        const int64_t base = a->table[b] * a->block_stride;
        const int64_t stop = (b + 1) * bs < a->len ? (b + 1) * bs : a->len;
        for (int64_t off = t - b * bs; t < stop; t++, off++) {
            const float *v = v_cache + base + off * a->row + a->kv0;
            for (int64_t h = 0; h < a->heads; h++)
                axpy(o + h * hd, scores[h * a->n + (t - a->start)], v + (h / a->group) * hd, hd);
        }
    }
}

#if defined(__AVX512F__) || defined(__AVX__)
#define FAST_ATTN 1
/* VW partial sums -> one vector of their totals, in a transpose-and-add tree. The tree
   leaves sum i in lane lane_of(i); partial sums are placed at slot_of(token) so that
   token t's total lands in lane t. */
static inline int slot_of(int t) { return VW == 16 ? 4 * (t % 4) + t / 4 : 2 * (t % 4) + t / 4; }

static inline vf reduce_lanes(const vf *a) {
#ifdef __AVX512F__
    __m512 b[8], c[4], d[2];
    for (int k = 0; k < 8; k++)
        b[k] = _mm512_add_ps(_mm512_shuffle_f32x4((__m512)a[2 * k], (__m512)a[2 * k + 1], 0x44),
                             _mm512_shuffle_f32x4((__m512)a[2 * k], (__m512)a[2 * k + 1], 0xEE));
    for (int k = 0; k < 4; k++)
        c[k] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], 0x88),
                             _mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], 0xDD));
    for (int k = 0; k < 2; k++)
        d[k] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * k], c[2 * k + 1], 0x44),
                             _mm512_shuffle_ps(c[2 * k], c[2 * k + 1], 0xEE));
    return (vf)_mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x88),
                             _mm512_shuffle_ps(d[0], d[1], 0xDD));
#else
    __m256 b[4], c[2];
    for (int k = 0; k < 4; k++)
        b[k] = _mm256_add_ps(_mm256_permute2f128_ps((__m256)a[2 * k], (__m256)a[2 * k + 1], 0x20),
                             _mm256_permute2f128_ps((__m256)a[2 * k], (__m256)a[2 * k + 1], 0x31));
    for (int k = 0; k < 2; k++)
        c[k] = _mm256_add_ps(_mm256_shuffle_ps(b[2 * k], b[2 * k + 1], 0x44),
                             _mm256_shuffle_ps(b[2 * k], b[2 * k + 1], 0xEE));
    return (vf)_mm256_add_ps(_mm256_shuffle_ps(c[0], c[1], 0x88),
                             _mm256_shuffle_ps(c[0], c[1], 0xDD));
#endif
}

/* Registers that accumulate a head chunk's outputs in the V pass. */
#define ACC_REGS (VW == 16 ? 16 : 8)

/* head_dim = dv * VW (dv constant where inlined). Scores: VW tokens of a block at a time,
   each token's dot product kept as a vector of partial sums, the VW vectors reduced
   together (one tree instead of VW horizontal sums). Outputs: a chunk of heads at a time
   accumulated in registers over every token, V read straight from the blocks. */
static inline __attribute__((always_inline)) void attend_fast(
    float *o, float *scores, const float *qs, const float *k_cache, const float *v_cache,
    const struct attn_task *a, const int dv, float scale) {
    const int64_t hd = a->head_dim, bs = a->block_size, n = a->n;
    for (int64_t b = a->start / bs, t = a->start; t < a->len; b++) {
        const int64_t base = a->table[b] * a->block_stride;
        const int64_t stop = (b + 1) * bs < a->len ? (b + 1) * bs : a->len;
        for (int64_t cw; t < stop; t += cw) {
            cw = stop - t < VW ? stop - t : VW;
            const float *k = k_cache + base + (t - b * bs) * a->row + a->kv0;
            for (int64_t h = 0; h < a->heads; h++) {
                const float *qh = qs + h * hd, *kh = k + (h / a->group) * hd;
                vf qv[8], acc[VW];
#pragma GCC unroll 8
                for (int d = 0; d < dv; d++) qv[d] = loadv(qh + d * VW);
#pragma GCC unroll 16
                for (int i = 0; i < VW; i++) {
                    vf s = vzero();
                    if (i < cw)
#pragma GCC unroll 8
                        for (int d = 0; d < dv; d++) s = fmav(qv[d], loadv(kh + i * a->row + d * VW), s);
                    acc[slot_of(i)] = s;
                }
                const vf sv = reduce_lanes(acc) * splat(scale);
                float *dst = scores + h * n + (t - a->start);
                if (cw == VW)
                    storev(dst, sv);
                else
                    for (int64_t i = 0; i < cw; i++) dst[i] = sv[i];
            }
        }
    }
    softmax_rows(scores, a->heads, n);
    const int64_t hc = ACC_REGS / dv > 0 ? ACC_REGS / dv : 1; /* heads per chunk */
    for (int64_t h0 = 0; h0 < a->heads; h0 += hc) {
        const int64_t hn = a->heads - h0 < hc ? a->heads - h0 : hc;
        vf acc[ACC_REGS];
#pragma GCC unroll 16
        for (int i = 0; i < ACC_REGS; i++) acc[i] = vzero();
        for (int64_t b = a->start / bs, t = a->start; t < a->len; b++) {
            const int64_t base = a->table[b] * a->block_stride;
            const int64_t stop = (b + 1) * bs < a->len ? (b + 1) * bs : a->len;
            for (int64_t off = t - b * bs; t < stop; t++, off++) {
                const float *v = v_cache + base + off * a->row + a->kv0;
#pragma GCC unroll 16
                for (int hh = 0; hh < ACC_REGS; hh++) {
                    if (hh >= hc || hh >= hn) break;
                    const vf p = splat(scores[(h0 + hh) * n + (t - a->start)]);
                    const float *vh = v + ((h0 + hh) / a->group) * hd;
#pragma GCC unroll 8
                    for (int d = 0; d < dv; d++)
                        acc[hh * dv + d] = fmav(p, loadv(vh + d * VW), acc[hh * dv + d]);
                }
            }
        }
        for (int64_t hh = 0; hh < hn; hh++)
            for (int d = 0; d < dv; d++) storev(o + (h0 + hh) * hd + d * VW, acc[hh * dv + d]);
    }
}
#else
#define FAST_ATTN 0
static inline void attend_fast(float *o, float *scores, const float *qs, const float *k_cache,
                               const float *v_cache, const struct attn_task *a, int dv,
                               float scale) {
    (void)dv;
    attend_plain(o, scores, qs, k_cache, v_cache, a, scale);
}
#endif

/* Decode attention over paged KV, one query token per sequence, read in place.
   q, out: [S, Hq, D]; tables: [S, max_blocks] block ids; ctx_lens: [S] keys per sequence
   (the new token's K/V already written); window <= 0: none, else keys in
   (ctx_len - 1 - window, ctx_len). Hq = G * Hkv: query head h reads kv head h / G.

   A task is one sequence and a range of its kv heads; it walks the sequence's blocks in
   order, reading each token's K (then V) rows for all its heads in one pass. Within a block
   a token's heads are adjacent, so a task whose range is every head streams whole blocks
   (prefetchers follow; reading one head's 256 bytes per token, 1 KB apart, was three times
   slower: a 4 KB page holds only 4 such rows and stride prefetch stops at page ends). Few
   sequences split their heads across tasks so every thread has work. Head sizes that are
   1, 2, 4 or 8 vectors take attend_fast (scores VW tokens at a time, outputs accumulated
   in registers: 0.66-0.8x attend_plain's time at 64 sequences x 128 keys); others
   attend_plain. Software prefetch of the next block was tried and did not help. */
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
            const struct attn_task at = {table,      start,        len, n,  heads, group,
                                         head_dim,   block_size,   block_stride, row, kv0};
            const int64_t dv = head_dim / VW;
            if (FAST_ATTN && head_dim % VW == 0 && dv <= 8) {
                switch (dv) {
                case 1: attend_fast(o, scores, qs, k_cache, v_cache, &at, 1, scale); break;
                case 2: attend_fast(o, scores, qs, k_cache, v_cache, &at, 2, scale); break;
                case 4: attend_fast(o, scores, qs, k_cache, v_cache, &at, 4, scale); break;
                case 8: attend_fast(o, scores, qs, k_cache, v_cache, &at, 8, scale); break;
                default: attend_plain(o, scores, qs, k_cache, v_cache, &at, scale); break;
                }
            } else {
                attend_plain(o, scores, qs, k_cache, v_cache, &at, scale);
            }
        }
        free(scores);
    }
}

/* y = x w^T (+ bias) for a few rows of x: y [M, N], x [M, K], w [N, K], all contiguous.

   Decode steps multiply a handful of rows by every weight: the work is reading the weights
   once (a GEMM library tuned for big M packs and re-reads them; at M = 8 oneDNN ran at a
   fifth of this machine's bandwidth). Each task streams 4 weight rows and multiplies them
   with up to XR rows of x at a time (4 x XR accumulators in registers); the 4 rows stay in
   L1/L2 while every row of x passes, so the weights cross the memory bus once. */
/* Rows of x multiplied per pass over 4 weight rows: 4 x 4 accumulators fit AVX-512's 32
   registers, 4 x 2 fit AVX2's 16. */
#ifdef __AVX512F__
#define XR 6
#else
#define XR 2
#endif

/* y[m0 : m0 + r, n0 : n0 + 4] for r <= XR rows of x (r constant where inlined). */
static inline __attribute__((always_inline)) void linear_tile(
    float *y, const float *x, const float *w, int64_t N, int64_t K, int64_t n0, int64_t m0,
    int r, const float *ahead, int j0, int j1) {
    const float *wr = w + n0 * K;
    vf acc[4][XR];
#pragma GCC unroll 8
    for (int j = 0; j < 4; j++)
#pragma GCC unroll 8
        for (int i = 0; i < XR; i++) acc[j][i] = vzero();
    for (int64_t k = 0; k < K; k += VW) {
        if (ahead != NULL && (k & 15) == 0)
            for (int64_t j = j0; j < j1; j++) __builtin_prefetch(ahead + j * K + k, 0, 3);
        vf u[XR];
#pragma GCC unroll 8
        for (int i = 0; i < XR; i++)
            if (i < r) u[i] = loadv(x + (m0 + i) * K + k);
#pragma GCC unroll 8
        for (int j = 0; j < 4; j++) {
            const vf wv = loadv(wr + j * K + k);
#pragma GCC unroll 8
            for (int i = 0; i < XR; i++)
                if (i < r) acc[j][i] = fmav(wv, u[i], acc[j][i]);
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < XR; i++)
        if (i < r)
#pragma GCC unroll 8
            for (int j = 0; j < 4; j++) y[(m0 + i) * N + n0 + j] = hsum(acc[j][i]);
}

static inline void linear_rows4(float *y, const float *x, const float *w, int64_t M,
                                int64_t N, int64_t K, int64_t n0) {
    /* The next 4 rows (where this thread goes next) are asked for while these are used,
       rows j0..j1 of them during pass p, so memory stays busy in every pass (all during
       the first left it idle during the second: 4-8% slower at 8 rows). */
    const float *ahead = w + (n0 + 4 < N - 4 ? n0 + 4 : n0) * K;
    /* Passes of nearly equal row counts (8 rows: 4 + 4, not 6 + 2). */
    const int64_t passes = (M + XR - 1) / XR;
    for (int64_t p = 0, m = 0; p < passes; p++) {
        const int64_t r = M / passes + (p < M % passes);
        const int j0 = (int)(4 * p / passes), j1 = (int)(4 * (p + 1) / passes);
        switch (r) {
        case 1: linear_tile(y, x, w, N, K, n0, m, 1, ahead, j0, j1); break;
        case 2: linear_tile(y, x, w, N, K, n0, m, 2, ahead, j0, j1); break;
#if XR > 2
        case 3: linear_tile(y, x, w, N, K, n0, m, 3, ahead, j0, j1); break;
        case 4: linear_tile(y, x, w, N, K, n0, m, 4, ahead, j0, j1); break;
        case 5: linear_tile(y, x, w, N, K, n0, m, 5, ahead, j0, j1); break;
        case 6: linear_tile(y, x, w, N, K, n0, m, 6, ahead, j0, j1); break;
#endif
        default: break;
        }
        m += r;
    }
}

void memserve_linear_small(float *y, const float *x, const float *w, const float *bias,
                           int64_t M, int64_t N, int64_t K) {
    const int64_t blocks = (N + 3) / 4;
#pragma omp parallel for schedule(static) if (N * K >= 65536)
    for (int64_t nb = 0; nb < blocks; nb++) {
        const int64_t n0 = nb * 4;
        if (n0 + 4 <= N && K % VW == 0) {
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

/* y = x w^T (+ bias) for decode batches (9 to 128 rows), on a packed copy of w.

   Packed layout: w [N, K] as panels of LNR columns; panel p holds w[p*LNR + j, k] at
   packed[(p*K + k)*LNR + j], zero for columns past N. A tile is up to LMR rows of x times
   one panel, LMR*LNV vector accumulators for the whole K: per k, LNV panel vectors are
   loaded and each x value is broadcast once (the outer-product kernel; the dot-product
   form of memserve_linear_small spends its time in loads and horizontal sums past ~12
   rows). With AVX-512 a tile is 8 rows x 3 vectors (48 columns): decode batches of 16,
   32 or 64 rows fill every tile (12 x 32 tiles left 11% of the multiplies idle at 64
   rows), with 11 loads per 24 multiplies instead of 14.
   x is interleaved per tile first (by all threads), so a tile's broadcasts read one
   stream. A thread takes a run of (panel, tile) units, an equal share of the outputs: its
   panels (K*LNR floats, L2-sized) are fetched from memory once and reused by all its tiles
   of them (by threads' whole panels, N = 512 left 2 threads at 6 and 4.7 panels of work:
   o and down projections 10-17% slower); the next panel is asked into L2 a slice per
   tile, at an even pace under all of the panel's multiplies. Without that the weights'
   memory wait and the multiplies took turns (oneDNN's packed matmul ran at ~105 GFLOP/s
   at 32 rows here, ~half its speed at 2048 rows); asking for the whole next panel during
   the first tile made that tile wait on more than one core's share of memory bandwidth
   (10-15% slower at 16-64 rows).

   The prefill attention below uses the same tile on MR x NR (12 x 2 vectors with AVX-512). */
#define NR (2 * VW)
#ifdef __AVX512F__
#define MR 12
#define LMR 8
#define LNV 3
#else
#define MR 6
#define LMR 6
#define LNV 2
#endif
#define LNR (LNV * VW)

int64_t memserve_pack_columns(void) { return LNR; }

void memserve_pack_weight(float *packed, const float *w, int64_t N, int64_t K) {
    const int64_t panels = (N + LNR - 1) / LNR;
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        float *dst = packed + p * K * LNR;
        for (int64_t j = 0; j < LNR; j++) {
            const int64_t n = p * LNR + j;
            if (n < N)
                for (int64_t k = 0; k < K; k++) dst[k * LNR + j] = w[n * K + k];
            else
                for (int64_t k = 0; k < K; k++) dst[k * LNR + j] = 0.0f;
        }
    }
}

/* y[0 : mr, 0 : cols] of one panel of nv vectors (mr, nv constant where inlined; mr <= MR,
   nv <= 3), rows of y `ldy` apart; xp: the tile's rows of x interleaved, xp[k*ldx + i] =
   x[i, k] (ldx = the tile height for a packed tile). Meanwhile the `lines` cache lines from
   `ahead` on are asked into L2, spread over the K steps. rs (NULL: none): row i of y is
   scaled by rs[i] as it is stored. */
static inline __attribute__((always_inline)) void gemm_tile(float *y, int64_t ldy,
                                                           const float *xp, int64_t ldx,
                                                           int64_t K, const float *panel,
                                                           int mr, int nv, int64_t cols,
                                                           const char *ahead, int64_t lines,
                                                           const float *rs) {
    vf acc[MR][3];
#pragma GCC unroll 12
    for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = acc[i][2] = vzero();
    int64_t due = 0; /* `lines` prefetches spread evenly over the K steps */
    for (int64_t k = 0; k < K; k++) {
        for (due += lines; due >= K; due -= K, ahead += 64) __builtin_prefetch(ahead, 0, 2);
        vf b[3];
#pragma GCC unroll 3
        for (int v = 0; v < nv; v++) b[v] = loadv(panel + (k * nv + v) * VW);
#pragma GCC unroll 12
        for (int i = 0; i < MR; i++)
            if (i < mr) {
                const vf a = splat(xp[k * ldx + i]);
#pragma GCC unroll 3
                for (int v = 0; v < nv; v++) acc[i][v] = fmav(a, b[v], acc[i][v]);
            }
    }
#pragma GCC unroll 12
    for (int i = 0; i < MR; i++)
        if (i < mr) {
            if (rs != NULL)
#pragma GCC unroll 3
                for (int v = 0; v < nv; v++) acc[i][v] *= splat(rs[i]);
            if (cols == nv * VW) {
#pragma GCC unroll 3
                for (int v = 0; v < nv; v++) storev(y + i * ldy + v * VW, acc[i][v]);
            } else {
                float tmp[3 * VW];
#pragma GCC unroll 3
                for (int v = 0; v < nv; v++) storev(tmp + v * VW, acc[i][v]);
                memcpy(y + i * ldy, tmp, sizeof(float) * (size_t)cols);
            }
        }
}

/* gemm_tile on MR x NR tiles for a run-time row count 1..MR (one instance per count). */
static void gemm_rows(float *y, int64_t ldy, const float *xp, int64_t ldx, int64_t K,
                      const float *panel, int r, int64_t cols, const float *rs) {
    switch (r) {
    case 1: gemm_tile(y, ldy, xp, ldx, K, panel, 1, 2, cols, NULL, 0, rs); break;
    case 2: gemm_tile(y, ldy, xp, ldx, K, panel, 2, 2, cols, NULL, 0, rs); break;
    case 3: gemm_tile(y, ldy, xp, ldx, K, panel, 3, 2, cols, NULL, 0, rs); break;
    case 4: gemm_tile(y, ldy, xp, ldx, K, panel, 4, 2, cols, NULL, 0, rs); break;
    case 5: gemm_tile(y, ldy, xp, ldx, K, panel, 5, 2, cols, NULL, 0, rs); break;
    case 6: gemm_tile(y, ldy, xp, ldx, K, panel, 6, 2, cols, NULL, 0, rs); break;
#if MR > 6
    case 7: gemm_tile(y, ldy, xp, ldx, K, panel, 7, 2, cols, NULL, 0, rs); break;
    case 8: gemm_tile(y, ldy, xp, ldx, K, panel, 8, 2, cols, NULL, 0, rs); break;
    case 9: gemm_tile(y, ldy, xp, ldx, K, panel, 9, 2, cols, NULL, 0, rs); break;
    case 10: gemm_tile(y, ldy, xp, ldx, K, panel, 10, 2, cols, NULL, 0, rs); break;
    case 11: gemm_tile(y, ldy, xp, ldx, K, panel, 11, 2, cols, NULL, 0, rs); break;
    case 12: gemm_tile(y, ldy, xp, ldx, K, panel, 12, 2, cols, NULL, 0, rs); break;
#endif
    default: break;
    }
}

/* gemm_tile on LMR x LNR tiles of packed x (ldx = LMR) for a run-time row count 1..LMR. */
static void linear_tile_rows(float *y, int64_t ldy, const float *xp, int64_t K,
                             const float *panel, int r, int64_t cols, const char *ahead,
                             int64_t lines) {
    switch (r) {
    case 1: gemm_tile(y, ldy, xp, LMR, K, panel, 1, LNV, cols, ahead, lines, NULL); break;
    case 2: gemm_tile(y, ldy, xp, LMR, K, panel, 2, LNV, cols, ahead, lines, NULL); break;
    case 3: gemm_tile(y, ldy, xp, LMR, K, panel, 3, LNV, cols, ahead, lines, NULL); break;
    case 4: gemm_tile(y, ldy, xp, LMR, K, panel, 4, LNV, cols, ahead, lines, NULL); break;
    case 5: gemm_tile(y, ldy, xp, LMR, K, panel, 5, LNV, cols, ahead, lines, NULL); break;
    case 6: gemm_tile(y, ldy, xp, LMR, K, panel, 6, LNV, cols, ahead, lines, NULL); break;
#if LMR > 6
    case 7: gemm_tile(y, ldy, xp, LMR, K, panel, 7, LNV, cols, ahead, lines, NULL); break;
    case 8: gemm_tile(y, ldy, xp, LMR, K, panel, 8, LNV, cols, ahead, lines, NULL); break;
#endif
    default: break;
    }
}

void memserve_linear_packed(float *y, const float *x, const float *packed, const float *bias,
                            int64_t M, int64_t N, int64_t K) {
    const int64_t panels = (N + LNR - 1) / LNR;
    const int64_t passes = (M + LMR - 1) / LMR; /* tiles of nearly equal row counts */
    int64_t rows[passes + 1];
    rows[0] = 0;
    for (int64_t t = 0; t < passes; t++) rows[t + 1] = rows[t] + M / passes + (t < M % passes);
    /* x interleaved per tile (every thread reads all of it). */
    float *xp = (float *)malloc(sizeof(float) * (size_t)(passes * K * LMR));
#pragma omp parallel if (M * N * K >= 262144)
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < passes; t++)
            for (int64_t i = rows[t]; i < rows[t + 1]; i++)
                for (int64_t k = 0; k < K; k++)
                    xp[(t * K + k) * LMR + (i - rows[t])] = x[i * K + k];
        /* (implicit barrier: every tile of x is packed before any is read) */
        int threads = 1, tid = 0;
#ifdef _OPENMP
        threads = omp_get_num_threads();
        tid = omp_get_thread_num();
#endif
        /* Units are (panel, tile) in panel-major order, weighed by their columns x rows
           (the M x N outputs); a thread takes the units whose middle falls in its equal
           share of that work. Whole panels would leave threads uneven where the panel
           count is small or the last panel narrow (N = 512: 11 panels of 48, 6 against
           4.7 panels' work on 2 threads); a panel split between two threads is read by
           both (one panel, at most, per thread boundary). */
        const int64_t lo = M * N * tid / threads, hi = M * N * (tid + 1) / threads;
        int64_t u0 = -1, u1 = -1; /* this thread's units [u0, u1) */
        for (int64_t p = 0, done = 0; p < panels; p++) {
            const int64_t cols = N - p * LNR < LNR ? N - p * LNR : LNR;
            for (int64_t t = 0; t < passes; t++) {
                const int64_t w = cols * (rows[t + 1] - rows[t]), mid2 = 2 * done + w;
                if (mid2 >= 2 * lo && mid2 < 2 * hi) {
                    if (u0 < 0) u0 = p * passes + t;
                    u1 = p * passes + t + 1;
                }
                done += w;
            }
        }
        for (int64_t u = u0 < 0 ? 0 : u0; u < u1;) {
            const int64_t p = u / passes;
            const float *panel = packed + p * K * LNR;
            const int64_t n0 = p * LNR, cols = N - n0 < LNR ? N - n0 : LNR;
            /* This thread's tiles of panel p: [t0, t1). */
            const int64_t t0 = u % passes, t1 = u1 - p * passes < passes ? u1 - p * passes : passes;
            /* The next panel this thread takes (none past its last unit) is asked into L2 a
               slice per tile. */
            const char *next = u1 > (p + 1) * passes ? (const char *)(panel + K * LNR) : NULL;
            const int64_t lines = next != NULL ? K * LNR * (int64_t)sizeof(float) / 64 : 0;
            for (int64_t t = t0; t < t1; t++) {
                const int64_t r = rows[t + 1] - rows[t];
                float *yt = y + rows[t] * N + n0;
                const float *xt = xp + t * K * LMR;
                const int64_t from = lines * (t - t0) / (t1 - t0);
                const int64_t to = lines * (t + 1 - t0) / (t1 - t0);
                linear_tile_rows(yt, N, xt, K, panel, (int)r, cols,
                                 next != NULL ? next + from * 64 : NULL, to - from);
                if (bias != NULL)
                    for (int64_t i = 0; i < r; i++)
                        for (int64_t j = 0; j < cols; j++) yt[i * N + j] += bias[n0 + j];
            }
            u = p * passes + t1;
        }
    }
    free(xp);
}

/* The keys [*k0, *hi) a block of queries [i0, i0 + qb) reads in a prefill chunk whose
   first query sits at position `off`: up to the block's last query, from the first one's
   window on; k0 rounded down to a whole key tile (MR keys), the extra keys masked. */
static inline void block_keys(int64_t i0, int64_t qb, int64_t off, int64_t window, int64_t *k0,
                              int64_t *hi) {
    int64_t lo = 0;
    if (window > 0 && off + i0 - window + 1 > 0) lo = off + i0 - window + 1;
    *k0 = lo / MR * MR;
    *hi = off + i0 + qb;
}

/* Softmax down the columns of a block's transposed scores st[(j - k0) * NR + c] (key j,
   query c, the query at position pos0 + c), in place: exp(s * scale - max * scale) for the
   keys the query sees (j <= its position, and within `window` when > 0), 0 for the others;
   inv[c] = 1 / the column's sum. Every column sees at least its own position's key.
   Without a window every query sees the keys before pos0, so those rows go unmasked. */
static void softmax_columns(float *st, int64_t k0, int64_t hi, int64_t pos0, int64_t window,
                            float scale, float *inv) {
    vfi lane;
    for (int l = 0; l < VW; l++) lane[l] = l;
    const vf neg = splat(-INFINITY), sc = splat(scale);
    const int64_t open = window > 0 ? k0 : (pos0 < hi ? pos0 : hi); /* [k0, open) unmasked */
    vf mx[2] = {neg, neg}, sum[2] = {vzero(), vzero()};
    for (int64_t j = k0; j < open; j++) {
        const float *row = st + (j - k0) * NR;
        for (int u = 0; u < 2; u++) {
            const vf v = loadv(row + u * VW);
            const vfi gt = v > mx[u];
            mx[u] = (vf)(((vfi)v & gt) | ((vfi)mx[u] & ~gt));
        }
    }
    for (int64_t j = open; j < hi; j++) {
        const float *row = st + (j - k0) * NR;
        const int32_t rel = (int32_t)(j - pos0); /* query c sees key j iff c >= rel */
        for (int u = 0; u < 2; u++) {
            const vfi c = lane + u * VW;
            vfi ok = c >= rel;
            if (window > 0) ok &= c < rel + (int32_t)window;
            const vf v = loadv(row + u * VW);
            const vfi gt = (v > mx[u]) & ok;
            mx[u] = (vf)(((vfi)v & gt) | ((vfi)mx[u] & ~gt));
        }
    }
    const vf ms[2] = {mx[0] * sc, mx[1] * sc};
    for (int64_t j = k0; j < open; j++) {
        float *row = st + (j - k0) * NR;
        for (int u = 0; u < 2; u++) {
            const vf e = exp_weights(loadv(row + u * VW) * sc - ms[u]);
            storev(row + u * VW, e);
            sum[u] += e;
        }
    }
    for (int64_t j = open; j < hi; j++) {
        float *row = st + (j - k0) * NR;
        const int32_t rel = (int32_t)(j - pos0);
        for (int u = 0; u < 2; u++) {
            const vfi c = lane + u * VW;
            vfi ok = c >= rel;
            if (window > 0) ok &= c < rel + (int32_t)window;
            const vf e = (vf)((vfi)exp_weights(loadv(row + u * VW) * sc - ms[u]) & ok);
            storev(row + u * VW, e);
            sum[u] += e;
        }
    }
    for (int u = 0; u < 2; u++)
        for (int l = 0; l < VW; l++) inv[u * VW + l] = 1.0f / sum[u][l];
}

/* Causal attention of one prefill chunk on the packed-panel GEMM tiles.

   q, out: [T, Hq, D] rows `q_row` / `out_row` floats apart; k, v: [S, Hkv, D] rows `kv_row`
   apart, S >= T keys of which the chunk's queries are the last T: query i sits at position
   S - T + i and sees keys j <= S - T + i (and j > S - T + i - window when window > 0).

   A task is one query head's block of NR queries. Its scores are computed transposed,
   S^T = K Q^T: the keys are a tile's rows (K packed as tiles of MR keys, interleaved) and
   the block's queries lie across the vector lanes, so only key tiles up to the block's last
   query are computed and the softmax over each query's keys runs down the columns a
   vector at a time. Its probabilities P^T are then read as the interleaved rows of the
   second product, O = P V (tiles of MR queries, V packed as panels of NR dims), whose
   rows go straight to `out`, scaled by 1 / their sums as they are stored. Tasks are split
   between the threads by their key counts (later blocks see more keys), in head order, so
   a thread packs a kv head's K and V once for the run of its tasks that read them (a kv
   head whose query heads straddle two threads' runs is packed by both: cheaper than
   making every thread wait for a shared packing). Memory per thread: K, V packed and one
   block's scores (NR x S floats). */
void memserve_prefill_attention(float *out, int64_t out_row, const float *q, int64_t q_row,
                                const float *k, const float *v, int64_t kv_row, int64_t T,
                                int64_t S, int64_t num_heads, int64_t num_kv_heads,
                                int64_t head_dim, int64_t window, float scale) {
    const int64_t group = num_heads / num_kv_heads, D = head_dim, off = S - T;
    const int64_t blocks = (T + NR - 1) / NR, tasks = num_heads * blocks;
    const int64_t s_pad = (S + MR - 1) / MR * MR, d_panels = (D + NR - 1) / NR;
    int64_t head_cost = 0; /* keys read by one head's blocks, plus a block's fixed work */
    for (int64_t b = 0; b < blocks; b++) {
        int64_t k0, hi;
        block_keys(b * NR, T - b * NR < NR ? T - b * NR : NR, off, window, &k0, &hi);
        head_cost += hi - k0 + NR;
    }
#pragma omp parallel
    {
        int64_t tid = 0, threads = 1;
#ifdef _OPENMP
        tid = omp_get_thread_num();
        threads = omp_get_num_threads();
#endif
        /* This thread's tasks: those whose cost starts in its share of the total. */
        const int64_t total = head_cost * num_heads;
        const int64_t from = total * tid / threads, to = total * (tid + 1) / threads;
        float *kp = (float *)malloc(sizeof(float) * (size_t)(s_pad * D));
        float *vp = (float *)malloc(sizeof(float) * (size_t)(d_panels * NR * S));
        float *st = (float *)malloc(sizeof(float) * (size_t)(s_pad * NR));
        float *qp = (float *)malloc(sizeof(float) * (size_t)(D * NR));
        int64_t packed_kv = -1, start = 0;
        for (int64_t task = 0; task < tasks; task++) {
            const int64_t h = task / blocks, i0 = (task % blocks) * NR;
            const int64_t qb = T - i0 < NR ? T - i0 : NR;
            int64_t k0, hi;
            block_keys(i0, qb, off, window, &k0, &hi);
            const int64_t begins = start;
            start += hi - k0 + NR;
            if (begins < from || begins >= to) continue;
            const int64_t g = h / group;
            if (g != packed_kv) { /* K as tiles of MR keys, V as panels of NR dims */
                for (int64_t j = 0; j < s_pad; j++) {
                    float *kt = kp + (j / MR) * D * MR + j % MR;
                    if (j >= S) {
                        for (int64_t d = 0; d < D; d++) kt[d * MR] = 0.0f;
                        continue;
                    }
                    const float *kr = k + j * kv_row + g * D, *vr = v + j * kv_row + g * D;
                    /* rows far apart: each a cache miss the copy would otherwise wait on */
                    if (j + MR < S)
                        for (int64_t d = 0; d < D; d += 64 / (int64_t)sizeof(float)) {
                            __builtin_prefetch(kr + MR * kv_row + d, 0, 0);
                            __builtin_prefetch(vr + MR * kv_row + d, 0, 0);
                        }
                    for (int64_t d = 0; d < D; d++) kt[d * MR] = kr[d];
                    for (int64_t pnl = 0; pnl < d_panels; pnl++)
                        for (int64_t c = 0; c < NR; c++) {
                            const int64_t d = pnl * NR + c;
                            vp[(pnl * S + j) * NR + c] = d < D ? vr[d] : 0.0f;
                        }
                }
                packed_kv = g;
            }
            /* The block's queries: its rows (D floats each) fit L1, so read across them
               and write whole lines. */
            const float *qr = q + i0 * q_row + h * D;
            for (int64_t d = 0; d < D; d++) {
                for (int64_t c = 0; c < qb; c++) qp[d * NR + c] = qr[c * q_row + d];
                for (int64_t c = qb; c < NR; c++) qp[d * NR + c] = 0.0f;
            }
            for (int64_t j0 = k0; j0 < hi; j0 += MR)
                gemm_rows(st + (j0 - k0) * NR, NR, kp + (j0 / MR) * D * MR, MR, D, qp,
                          (int)(hi - j0 < MR ? hi - j0 : MR), NR, NULL);
            float inv[NR];
            softmax_columns(st, k0, hi, off + i0, window, scale, inv);
            for (int64_t c0 = 0; c0 < qb; c0 += MR) {
                const int r = (int)(qb - c0 < MR ? qb - c0 : MR);
                float *o = out + (i0 + c0) * out_row + h * D;
                for (int64_t pnl = 0; pnl < d_panels; pnl++)
                    gemm_rows(o + pnl * NR, out_row, st + c0, NR, hi - k0,
                              vp + (pnl * S + k0) * NR, r, D - pnl * NR < NR ? D - pnl * NR : NR,
                              inv + c0);
            }
        }
        free(kp);
        free(vp);
        free(st);
        free(qp);
    }
}

/* K/V of T new tokens into their slots: k, v rows of Hkv*D floats, `row` apart. */
void memserve_write_kv(float *k_cache, float *v_cache, const float *k, const float *v,
                       int64_t row, const int64_t *slot_blocks, const int64_t *slot_offsets,
                       int64_t num_tokens, int64_t kv_cols, int64_t block_stride) {
    /* Each row lands on a line of the cache not touched for a while (a read from memory
       before the write): two threads keep twice the misses in flight. */
#pragma omp parallel for schedule(static) if (num_tokens >= 32)
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
        for (; i + VW <= inter; i += VW) {
            const vf gv = loadv(g + i);
            storev(o + i, (gv / (splat(1.0f) + expv(-gv))) * loadv(u + i));
        }
        for (; i < inter; i++) o[i] = (g[i] / (1.0f + expf(-g[i]))) * u[i];
    }
}

/* One decoder layer as memserve_decode_layers reads it: its weights (the matmuls' weights
   plain, or packed by memserve_pack_weight when the step's rows go to the packed kernel;
   a NULL bias is none) and its KV cache layer. Every field is 8 bytes, so Python fills an
   array of these as int64s (ops.py). */
struct memserve_layer {
    const float *input_norm, *qkv, *qkv_bias, *o, *o_bias;
    const float *post_norm, *gate_up, *gate_up_bias, *down, *down_bias;
    float *k_cache, *v_cache;
    int64_t block_stride, window; /* window 0: none */
};
_Static_assert(sizeof(struct memserve_layer) == 14 * 8, "ops.py fills 14 int64s a layer");

static void linear_any(int packed, float *y, const float *x, const float *w, const float *b,
                       int64_t M, int64_t N, int64_t K) {
    if (packed)
        memserve_linear_packed(y, x, w, b, M, N, K);
    else
        memserve_linear_small(y, x, w, b, M, N, K);
}

/* A decode step's decoder layers in one call: `tokens` rows of `hidden` (one token per
   sequence, sequence s = row s) through `num_layers` layers -> out [tokens, dim] (the
   residual stream after the last layer's MLP). The same kernel calls, in the same order
   and on the same buffers' contents, as the model's layer loop (llama.py) makes one by
   one, so the bits are the same; what goes is the Python between them (~100 us a layer).

   Per layer: x = RMSNorm(residual += h) (the first layer: residual = hidden, x = its
   norm); qkv = x Wqkv^T (+b); rotary on q, k; K/V written to their slots; decode
   attention of q over each sequence's blocks; h = attn Wo^T (+b); x = RMSNorm(residual
   += h); h = (silu(gate) * up)(x Wgu^T (+b)) Wd^T (+b). Then out = residual + h. */
void memserve_decode_layers(float *out, const float *hidden,
                            const struct memserve_layer *layers, int64_t num_layers,
                            int64_t packed, int64_t tokens, int64_t dim, int64_t num_heads,
                            int64_t num_kv_heads, int64_t head_dim, int64_t inter,
                            const float *cos_t, const float *sin_t, const int64_t *positions,
                            const int64_t *slot_blocks, const int64_t *slot_offsets,
                            const int64_t *tables, const int64_t *ctx_lens,
                            int64_t max_blocks, int64_t block_size, float eps, float scale) {
    const int64_t M = tokens, q_cols = num_heads * head_dim, kv_cols = num_kv_heads * head_dim;
    const int64_t row = q_cols + 2 * kv_cols;
    const int64_t scratch = M * (2 * dim + row + 2 * q_cols + 3 * inter);
    float *x = (float *)malloc(sizeof(float) * (size_t)scratch);
    float *h = x + M * dim, *qkv = h + M * dim, *q = qkv + M * row, *att = q + M * q_cols;
    float *gu = att + M * q_cols, *act = gu + M * 2 * inter;
    float *residual = out;
    memcpy(residual, hidden, sizeof(float) * (size_t)(M * dim));
    for (int64_t l = 0; l < num_layers; l++) {
        const struct memserve_layer *L = layers + l;
        if (l == 0)
            memserve_rms_norm(x, hidden, L->input_norm, M, dim, eps);
        else
            memserve_add_rms_norm(x, h, residual, L->input_norm, M, dim, eps);
        linear_any((int)packed, qkv, x, L->qkv, L->qkv_bias, M, row, dim);
        memserve_rotary(qkv, row, cos_t, sin_t, positions, M, num_heads, num_kv_heads, head_dim);
        memserve_write_kv(L->k_cache, L->v_cache, qkv + q_cols, qkv + q_cols + kv_cols, row,
                          slot_blocks, slot_offsets, M, kv_cols, L->block_stride);
        for (int64_t t = 0; t < M; t++)
            memcpy(q + t * q_cols, qkv + t * row, sizeof(float) * (size_t)q_cols);
        memserve_paged_decode(att, q, L->k_cache, L->v_cache, tables, ctx_lens, M, max_blocks,
                              num_heads, num_kv_heads, head_dim, block_size, L->block_stride,
                              L->window, scale);
        linear_any((int)packed, h, att, L->o, L->o_bias, M, dim, q_cols);
        memserve_add_rms_norm(x, h, residual, L->post_norm, M, dim, eps);
        linear_any((int)packed, gu, x, L->gate_up, L->gate_up_bias, M, 2 * inter, dim);
        memserve_silu_and_mul(act, gu, M, inter);
        linear_any((int)packed, h, act, L->down, L->down_bias, M, dim, inter);
    }
    if (num_layers > 0)
        for (int64_t i = 0; i < M * dim; i++) residual[i] = residual[i] + h[i];
    free(x);
}
