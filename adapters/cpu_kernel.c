/* The adapter delta of one adapted module on x86 CPUs with AVX-512, for every token of every row:

       y[t] += B_s^T (g_s(x[t]) ⊗ A_s x[t])      s = the row's slot, g = softmax(R_s x[t] + bias_s) or 1

   read straight from the slot bank: A [S, R, d_in] and B [S, R, d_out] (fp32, bf16 or fp16), router
   [S, K_max, d_in] and bias [S, n_modules, K_max] (fp32). Only each row's own rank r and head count K
   are read (expand width K·r, head-major: column h·r + j carries z[j]·g[h]), so a batch pays for its
   rows' own bytes, not for the widest row's. Decode is bound by reading the factors, so everything
   here is about streaming them once at full bandwidth; the arithmetic is fp32 throughout.

   fp16 factors are widened as they are loaded (vcvtph2ps). bf16 factors are widened without shuffles: a 512-bit load holds 32 bf16, and (v << 16) and
   (v & 0xffff0000) are exactly the even- and odd-indexed values as fp32. The activations are split
   into even/odd halves once per token to match (shrink), and the expand accumulates into even/odd
   halves that are interleaved back into y at the end. Each token of each row is computed by one
   thread, in an order that does not depend on the other rows: a row's result is the same in any batch. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { FACTORS_F32 = 0, FACTORS_BF16 = 1, FACTORS_F16 = 2 };

#define GROUP 4  /* factor rows read side by side (1, 2, 4 and 8 measured the same) */

static inline int group(int left) { return left < GROUP ? left : GROUP; }

static inline float bf16_value(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline __m512 even_half(__m512i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
static inline __m512 odd_half(__m512i v) {
    return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000u)));
}

/* fp32 and fp16 rows take the same path, 16 values per vector, widened (fp16) as they are loaded. */
static inline __m512 load16_f32(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
static inline float value_f32(float v) { return v; }
static inline float value_f16(uint16_t v) { return _cvtsh_ss(v); }

#define DOT_AND_AXPY(NAME, T)                                                                                  \
/* out[q] = <row q of p, x> for q < n (n <= GROUP), rows ld elements apart. */                                 \
static void dot_##NAME(const T* p, int64_t ld, int n, const float* x, int d, float* out) {                     \
    __m512 acc[GROUP];                                                                                         \
    for (int q = 0; q < n; q++) acc[q] = _mm512_setzero_ps();                                                  \
    int i = 0;                                                                                                 \
    for (; i + 16 <= d; i += 16) {                                                                             \
        __m512 xv = _mm512_loadu_ps(x + i);                                                                    \
        for (int q = 0; q < n; q++) acc[q] = _mm512_fmadd_ps(load16_##NAME(p + q * ld + i), xv, acc[q]);       \
    }                                                                                                          \
    for (int q = 0; q < n; q++) {                                                                              \
        float s = _mm512_reduce_add_ps(acc[q]);                                                                \
        for (int k = i; k < d; k++) s += value_##NAME(p[q * ld + k]) * x[k];                                   \
        out[q] = s;                                                                                            \
    }                                                                                                          \
}                                                                                                              \
/* y += sum_q c[q] * (row q of p), n <= GROUP rows ld elements apart. */                                       \
static void axpy_##NAME(const T* p, int64_t ld, int n, const float* c, float* y, int d) {                      \
    __m512 cv[GROUP];                                                                                          \
    for (int q = 0; q < n; q++) cv[q] = _mm512_set1_ps(c[q]);                                                  \
    int o = 0;                                                                                                 \
    for (; o + 16 <= d; o += 16) {                                                                             \
        __m512 acc = _mm512_loadu_ps(y + o);                                                                   \
        for (int q = 0; q < n; q++) acc = _mm512_fmadd_ps(cv[q], load16_##NAME(p + q * ld + o), acc);         \
        _mm512_storeu_ps(y + o, acc);                                                                          \
    }                                                                                                          \
    for (; o < d; o++)                                                                                         \
        for (int q = 0; q < n; q++) y[o] += c[q] * value_##NAME(p[q * ld + o]);                                \
}
DOT_AND_AXPY(f32, float)
DOT_AND_AXPY(f16, uint16_t)

/* Same for bf16 rows; xe/xo are x's even/odd elements (the first d/32*16 of each). */
static void dot_bf16(const uint16_t* p, int64_t ld, int n, const float* x, const float* xe, const float* xo,
                     int d, float* out) {
    __m512 acc[GROUP];
    for (int q = 0; q < n; q++) acc[q] = _mm512_setzero_ps();
    int i = 0;
    for (; i + 32 <= d; i += 32) {
        __m512 ev = _mm512_loadu_ps(xe + i / 2), ov = _mm512_loadu_ps(xo + i / 2);
        for (int q = 0; q < n; q++) {
            __m512i v = _mm512_loadu_si512(p + q * ld + i);
            acc[q] = _mm512_fmadd_ps(even_half(v), ev, _mm512_fmadd_ps(odd_half(v), ov, acc[q]));
        }
    }
    for (int q = 0; q < n; q++) {
        float s = _mm512_reduce_add_ps(acc[q]);
        for (int k = i; k < d; k++) s += bf16_value(p[q * ld + k]) * x[k];
        out[q] = s;
    }
}

/* Same for bf16 rows, accumulating even/odd outputs into ye/yo (the first d/32*16 of each) and the tail
   straight into y. */
static void axpy_bf16(const uint16_t* p, int64_t ld, int n, const float* c, float* ye, float* yo, float* y,
                      int d) {
    __m512 cv[GROUP];
    for (int q = 0; q < n; q++) cv[q] = _mm512_set1_ps(c[q]);
    int o = 0;
    for (; o + 32 <= d; o += 32) {
        __m512 e = _mm512_loadu_ps(ye + o / 2), od = _mm512_loadu_ps(yo + o / 2);
        for (int q = 0; q < n; q++) {
            __m512i v = _mm512_loadu_si512(p + q * ld + o);
            e = _mm512_fmadd_ps(cv[q], even_half(v), e);
            od = _mm512_fmadd_ps(cv[q], odd_half(v), od);
        }
        _mm512_storeu_ps(ye + o / 2, e);
        _mm512_storeu_ps(yo + o / 2, od);
    }
    for (; o < d; o++)
        for (int q = 0; q < n; q++) y[o] += c[q] * bf16_value(p[q * ld + o]);
}

/* Softmax of the router logits for heads < k, in place into g. */
static void gate(const float* router, const float* bias, int k, const float* x, int d, float* g) {
    float top = -INFINITY;
    for (int h = 0; h < k; h++) {
        dot_f32(router + (int64_t)h * d, 0, 1, x, d, g + h);
        g[h] += bias[h];
        if (g[h] > top) top = g[h];
    }
    float total = 0.0f;
    for (int h = 0; h < k; h++) total += (g[h] = expf(g[h] - top));
    for (int h = 0; h < k; h++) g[h] /= total;
}

/* rows x tokens activations x [rows, tokens, d_in] and outputs y [rows, tokens, d_out] (both fp32,
   contiguous). slots[row] indexes the bank; ranks/heads[slot] are this module's (rank 0: not adapted).
   router may be NULL when no slot adapts this module with a router; bias rows are bias_stride apart.
   Returns 0, or -1 when scratch memory could not be allocated (y is then incomplete). */
int loraplex_add_delta(int rows, int tokens, const float* x, float* y, int d_in, int d_out,
                        const int32_t* slots, const int32_t* ranks, const int32_t* heads,
                        const void* a, const void* b, int factor_dtype, int max_rank,
                        const float* router, const float* bias, int64_t bias_stride, int max_heads,
                        int threads) {
    int failed = 0;  /* a thread that cannot get its scratch memory: reported, never a partial silent result */
    const int items = rows * tokens;  /* one token of one row each; a row's tokens may go to different threads */
    const int chunk = items / (threads * 8) > 1 ? items / (threads * 8) : 1;
    #pragma omp parallel num_threads(threads)
    {
        const int half_in = d_in / 32 * 16, half_out = d_out / 32 * 16;
        float* scratch = malloc(sizeof(float) * (size_t)(2 * half_in + 2 * half_out + max_rank + max_heads));
        const int ok = scratch != NULL;
        float *xe = scratch, *xo = xe + half_in, *ye = xo + half_in, *yo = ye + half_out;
        float *z = yo + half_out, *g = z + max_rank;
        #pragma omp for schedule(dynamic, chunk)
        for (int item = 0; item < items; item++) {
            const int s = slots[item / tokens], r = ranks[s];
            if (r == 0 || !ok) continue;
            const int k = heads[s], w = r * k;
            const float* xt = x + (int64_t)item * d_in;
            float* yt = y + (int64_t)item * d_out;
            const int64_t first = (int64_t)s * max_rank;  /* row index of the slot's first rank in A and B */
            if (factor_dtype == FACTORS_BF16)
                for (int m = 0; m < half_in; m++) xe[m] = xt[2 * m], xo[m] = xt[2 * m + 1];
            for (int j = 0; j < r; j += GROUP) {
                const int64_t at = (first + j) * d_in;
                if (factor_dtype == FACTORS_BF16)
                    dot_bf16((const uint16_t*)a + at, d_in, group(r - j), xt, xe, xo, d_in, z + j);
                else if (factor_dtype == FACTORS_F16)
                    dot_f16((const uint16_t*)a + at, d_in, group(r - j), xt, d_in, z + j);
                else
                    dot_f32((const float*)a + at, d_in, group(r - j), xt, d_in, z + j);
            }
            if (k > 1 && router != NULL) {  /* NULL: no slot of this module has a router (then k is 1) */
                gate(router + (int64_t)s * max_heads * d_in, bias + s * bias_stride, k, xt, d_in, g);
                for (int h = k - 1; h >= 0; h--)  /* backwards: column h*r + j is written after it is read */
                    for (int j = r - 1; j >= 0; j--) z[h * r + j] = z[j] * g[h];
            }
            if (factor_dtype == FACTORS_BF16)
                memset(ye, 0, sizeof(float) * (size_t)(2 * half_out));
            for (int c = 0; c < w; c += GROUP) {
                const int64_t at = (first + c) * d_out;
                if (factor_dtype == FACTORS_BF16)
                    axpy_bf16((const uint16_t*)b + at, d_out, group(w - c), z + c, ye, yo, yt, d_out);
                else if (factor_dtype == FACTORS_F16)
                    axpy_f16((const uint16_t*)b + at, d_out, group(w - c), z + c, yt, d_out);
                else
                    axpy_f32((const float*)b + at, d_out, group(w - c), z + c, yt, d_out);
            }
            if (factor_dtype == FACTORS_BF16)
                for (int m = 0; m < half_out; m++) yt[2 * m] += ye[m], yt[2 * m + 1] += yo[m];
        }
        free(scratch);
        if (!ok) {
            #pragma omp atomic write
            failed = 1;
        }
    }
    return failed ? -1 : 0;
}
