/* The adapter delta of one adapted module on x86 CPUs, for every token of every row:

       y[t] += B_s^T (g_s(x[t]) ⊗ A_s x[t])      s = the row's slot, g = softmax(R_s x[t] + bias_s) or 1

   read straight from the slot bank: A [S, R, d_in] and B [S, R, d_out] (fp32, bf16 or fp16), router
   [S, K_max, d_in] and bias [S, n_modules, K_max] (fp32). Only each row's own rank r and head count K
   are read (expand width K·r, head-major: column h·r + j carries z[j]·g[h]), so a batch pays for its
   rows' own bytes, not for the widest row's. Decode is bound by reading the factors, so everything
   here is about streaming them once at full bandwidth; the arithmetic is fp32 throughout. Prompts are
   computed in blocks of TOKENS tokens of one row, so each factor vector loaded serves every token of the
   block (a prompt's cost is arithmetic, not loads).

   Built twice from this one source (adapters/cpu_kernel.py picks by the CPU's flags): with AVX-512
   (vectors of 16 floats) and with AVX2 + FMA + F16C (8 floats), the CPUs without AVX-512 (AMD before Zen 4,
   most Intel client chips). Only the vector layer below differs; the two round differently (their sums
   split d into different lanes), each the same way in every batch.

   fp16 factors are widened as they are loaded (vcvtph2ps). bf16 factors are widened without shuffles: a
   vector's worth of bytes holds 2·LANES bf16, and (v << 16) and (v & 0xffff0000) are exactly the even- and
   odd-indexed values as fp32. The activations are split into even/odd halves once per token to match
   (shrink), and the expand accumulates into even/odd halves that are interleaved back into y at the end.
   Each token of each row is computed by one thread, in an order that depends neither on the other rows nor
   on the other tokens of its block: a row's result is the same in any batch, and a token's the same in a
   prompt as in a decode step. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define LANES 16
typedef __m512 vec;
typedef __m512i bits;
static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec vset1(float v) { return _mm512_set1_ps(v); }
static inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
static inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
static inline vec vload_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
static inline bits vload_bits(const uint16_t* p) { return _mm512_loadu_si512(p); }
static inline vec even_half(bits v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
static inline vec odd_half(bits v) {
    return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000u)));
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LANES 8
typedef __m256 vec;
typedef __m256i bits;
static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec vset1(float v) { return _mm256_set1_ps(v); }
static inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vec v) {  /* halves, then pairs, then the last two: a fixed order */
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline vec vload_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
static inline bits vload_bits(const uint16_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
static inline vec even_half(bits v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
static inline vec odd_half(bits v) {
    return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
}
#else
#error "cpu_kernel.c needs AVX-512 (F, BW) or AVX2 with FMA and F16C"
#endif

enum { FACTORS_F32 = 0, FACTORS_BF16 = 1, FACTORS_F16 = 2 };

#define GROUP 4   /* factor rows read side by side (1, 2, 4 and 8 measured the same at decode) */
#define TOKENS 4  /* a row's tokens computed side by side (prompts): each factor vector loaded once per block */

static inline int group(int left) { return left < GROUP ? left : GROUP; }
static inline int block(int left) { return left < TOKENS ? left : TOKENS; }

static inline float bf16_value(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* fp32 and fp16 rows take the same path, LANES values per vector, widened (fp16) as they are loaded. */
static inline vec vload_f32(const float* p) { return vload(p); }
static inline float value_f32(float v) { return v; }
static inline float value_f16(uint16_t v) { return _cvtsh_ss(v); }

/* Every (factor row q, token t) pair is computed by the same sequence of operations whatever n and nt are, so
   a token's result does not depend on how many rows or tokens share its block. A prompt's full block
   (n = GROUP, nt = TOKENS) and a decode step's full group (n = GROUP, nt = 1) are dispatched to copies with
   constant bounds, whose accumulators the compiler keeps in registers. */
#define INLINE static inline __attribute__((always_inline))
#define SPECIALISE(F, ...)                                                                     \
    if (n == GROUP && nt == TOKENS) F(__VA_ARGS__, GROUP, TOKENS);                             \
    else if (n == GROUP && nt == 1) F(__VA_ARGS__, GROUP, 1);                                  \
    else F(__VA_ARGS__, n, nt)

#define DOT_AND_AXPY(NAME, T)                                                                                  \
/* out[t·ldo + q] = <row q of p, token t of x> for q < n <= GROUP, t < nt <= TOKENS; rows ld apart,             \
   tokens ldx apart. */                                                                                        \
INLINE void dot_block_##NAME(const T* p, int64_t ld, const float* x, int64_t ldx, int d, float* out, int ldo,   \
                             int n, int nt) {                                                                  \
    vec acc[GROUP][TOKENS];                                                                                 \
    for (int q = 0; q < n; q++)                                                                                \
        for (int t = 0; t < nt; t++) acc[q][t] = vzero();                                          \
    int i = 0;                                                                                                 \
    for (; i + LANES <= d; i += LANES) {                                                                             \
        vec xv[TOKENS];                                                                                     \
        for (int t = 0; t < nt; t++) xv[t] = vload(x + t * ldx + i);                                 \
        for (int q = 0; q < n; q++) {                                                                          \
            vec f = vload_##NAME(p + q * ld + i);                                                          \
            for (int t = 0; t < nt; t++) acc[q][t] = vfma(f, xv[t], acc[q][t]);                     \
        }                                                                                                      \
    }                                                                                                          \
    for (int q = 0; q < n; q++)                                                                                \
        for (int t = 0; t < nt; t++) {                                                                         \
            float s = vsum(acc[q][t]);                                                         \
            for (int k = i; k < d; k++) s += value_##NAME(p[q * ld + k]) * x[t * ldx + k];                     \
            out[t * ldo + q] = s;                                                                              \
        }                                                                                                      \
}                                                                                                              \
static void dot_##NAME(const T* p, int64_t ld, int n, const float* x, int64_t ldx, int nt, int d, float* out,  \
                       int ldo) {                                                                              \
    SPECIALISE(dot_block_##NAME, p, ld, x, ldx, d, out, ldo);                                                  \
}                                                                                                              \
/* y_t += sum_q c[t·ldc + q] · (row q of p) for t < nt, tokens of y ldy apart. */                              \
INLINE void axpy_block_##NAME(const T* p, int64_t ld, const float* c, int ldc, float* y, int64_t ldy, int d,   \
                              int n, int nt) {                                                                 \
    vec cv[TOKENS][GROUP];                                                                                  \
    for (int t = 0; t < nt; t++)                                                                               \
        for (int q = 0; q < n; q++) cv[t][q] = vset1(c[t * ldc + q]);                                 \
    int o = 0;                                                                                                 \
    for (; o + LANES <= d; o += LANES) {                                                                             \
        vec acc[TOKENS];                                                                                    \
        for (int t = 0; t < nt; t++) acc[t] = vload(y + t * ldy + o);                                \
        for (int q = 0; q < n; q++) {                                                                          \
            vec f = vload_##NAME(p + q * ld + o);                                                          \
            for (int t = 0; t < nt; t++) acc[t] = vfma(cv[t][q], f, acc[t]);                        \
        }                                                                                                      \
        for (int t = 0; t < nt; t++) vstore(y + t * ldy + o, acc[t]);                                \
    }                                                                                                          \
    for (; o < d; o++)                                                                                         \
        for (int t = 0; t < nt; t++)                                                                           \
            for (int q = 0; q < n; q++) y[t * ldy + o] += c[t * ldc + q] * value_##NAME(p[q * ld + o]);        \
}                                                                                                              \
static void axpy_##NAME(const T* p, int64_t ld, int n, const float* c, int ldc, float* y, int64_t ldy, int nt, \
                        int d) {                                                                               \
    SPECIALISE(axpy_block_##NAME, p, ld, c, ldc, y, ldy, d);                                                   \
}
DOT_AND_AXPY(f32, float)
DOT_AND_AXPY(f16, uint16_t)

/* Same for bf16 rows; xe/xo hold each token's even/odd elements (the first d/(2·LANES)·LANES of each, tokens h apart). */
INLINE void dot_block_bf16(const uint16_t* p, int64_t ld, const float* x, const float* xe, const float* xo, int h,
                           int64_t ldx, int d, float* out, int ldo, int n, int nt) {
    vec acc[GROUP][TOKENS];
    for (int q = 0; q < n; q++)
        for (int t = 0; t < nt; t++) acc[q][t] = vzero();
    int i = 0;
    for (; i + 2 * LANES <= d; i += 2 * LANES) {
        vec ev[TOKENS], ov[TOKENS];
        for (int t = 0; t < nt; t++)
            ev[t] = vload(xe + t * h + i / 2), ov[t] = vload(xo + t * h + i / 2);
        for (int q = 0; q < n; q++) {
            bits v = vload_bits(p + q * ld + i);
            vec e = even_half(v), od = odd_half(v);
            for (int t = 0; t < nt; t++)
                acc[q][t] = vfma(e, ev[t], vfma(od, ov[t], acc[q][t]));
        }
    }
    for (int q = 0; q < n; q++)
        for (int t = 0; t < nt; t++) {
            float s = vsum(acc[q][t]);
            for (int k = i; k < d; k++) s += bf16_value(p[q * ld + k]) * x[t * ldx + k];
            out[t * ldo + q] = s;
        }
}
static void dot_bf16(const uint16_t* p, int64_t ld, int n, const float* x, const float* xe, const float* xo, int h,
                     int64_t ldx, int nt, int d, float* out, int ldo) {
    SPECIALISE(dot_block_bf16, p, ld, x, xe, xo, h, ldx, d, out, ldo);
}

/* Same for bf16 rows, accumulating each token's even/odd outputs into ye/yo (the first d/(2·LANES)·LANES of each,
   tokens h apart) and the tail straight into y. */
INLINE void axpy_block_bf16(const uint16_t* p, int64_t ld, const float* c, int ldc, float* ye, float* yo, int h,
                            float* y, int64_t ldy, int d, int n, int nt) {
    vec cv[TOKENS][GROUP];
    for (int t = 0; t < nt; t++)
        for (int q = 0; q < n; q++) cv[t][q] = vset1(c[t * ldc + q]);
    int o = 0;
    for (; o + 2 * LANES <= d; o += 2 * LANES) {
        vec e[TOKENS], od[TOKENS];
        for (int t = 0; t < nt; t++)
            e[t] = vload(ye + t * h + o / 2), od[t] = vload(yo + t * h + o / 2);
        for (int q = 0; q < n; q++) {
            bits v = vload_bits(p + q * ld + o);
            vec fe = even_half(v), fo = odd_half(v);
            for (int t = 0; t < nt; t++) {
                e[t] = vfma(cv[t][q], fe, e[t]);
                od[t] = vfma(cv[t][q], fo, od[t]);
            }
        }
        for (int t = 0; t < nt; t++)
            vstore(ye + t * h + o / 2, e[t]), vstore(yo + t * h + o / 2, od[t]);
    }
    for (; o < d; o++)
        for (int t = 0; t < nt; t++)
            for (int q = 0; q < n; q++) y[t * ldy + o] += c[t * ldc + q] * bf16_value(p[q * ld + o]);
}
static void axpy_bf16(const uint16_t* p, int64_t ld, int n, const float* c, int ldc, float* ye, float* yo, int h,
                      float* y, int64_t ldy, int nt, int d) {
    SPECIALISE(axpy_block_bf16, p, ld, c, ldc, ye, yo, h, y, ldy, d);
}

/* Softmax of the router logits for heads < k, in place into g. */
static void gate(const float* router, const float* bias, int k, const float* x, int d, float* g) {
    float top = -INFINITY;
    for (int h = 0; h < k; h++) {
        dot_f32(router + (int64_t)h * d, 0, 1, x, 0, 1, d, g + h, 0);
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
   Work items are blocks of up to TOKENS tokens of one row. Returns 0, or -1 when scratch memory could not be
   allocated (y is then incomplete). */
int loraplex_add_delta(int rows, int tokens, const float* x, float* y, int d_in, int d_out,
                        const int32_t* slots, const int32_t* ranks, const int32_t* heads,
                        const void* a, const void* b, int factor_dtype, int max_rank,
                        const float* router, const float* bias, int64_t bias_stride, int max_heads,
                        int threads) {
    int failed = 0;  /* a thread that cannot get its scratch memory: reported, never a partial silent result */
    const int blocks = (tokens + TOKENS - 1) / TOKENS, items = rows * blocks;
    if (threads > items)  /* fewer work items than threads (a lone row's decode step): none woken to sit idle */
        threads = items > 1 ? items : 1;
    const int chunk = items / (threads * 8) > 1 ? items / (threads * 8) : 1;
    #pragma omp parallel num_threads(threads)
    {
        const int half_in = d_in / (2 * LANES) * LANES, half_out = d_out / (2 * LANES) * LANES;
        const size_t floats = (size_t)TOKENS * (2 * half_in + 2 * half_out + max_rank) + (size_t)max_heads;
        float* scratch = malloc(sizeof(float) * floats);
        const int ok = scratch != NULL;
        float *xe = scratch, *xo = xe + TOKENS * half_in, *ye = xo + TOKENS * half_in, *yo = ye + TOKENS * half_out;
        float *z = yo + TOKENS * half_out, *g = z + TOKENS * max_rank;  /* z: [TOKENS][max_rank] */
        #pragma omp for schedule(dynamic, chunk)
        for (int item = 0; item < items; item++) {
            const int row = item / blocks, t0 = item % blocks * TOKENS, nt = block(tokens - t0);
            const int s = slots[row], r = ranks[s];
            if (r == 0 || !ok) continue;
            const int k = heads[s], w = r * k;
            const float* xt = x + ((int64_t)row * tokens + t0) * d_in;
            float* yt = y + ((int64_t)row * tokens + t0) * d_out;
            const int64_t first = (int64_t)s * max_rank;  /* row index of the slot's first rank in A and B */
            if (factor_dtype == FACTORS_BF16)
                for (int t = 0; t < nt; t++)
                    for (int m = 0; m < half_in; m++)
                        xe[t * half_in + m] = xt[t * d_in + 2 * m], xo[t * half_in + m] = xt[t * d_in + 2 * m + 1];
            for (int j = 0; j < r; j += GROUP) {
                const int64_t at = (first + j) * d_in;
                if (factor_dtype == FACTORS_BF16)
                    dot_bf16((const uint16_t*)a + at, d_in, group(r - j), xt, xe, xo, half_in, d_in, nt, d_in,
                             z + j, max_rank);
                else if (factor_dtype == FACTORS_F16)
                    dot_f16((const uint16_t*)a + at, d_in, group(r - j), xt, d_in, nt, d_in, z + j, max_rank);
                else
                    dot_f32((const float*)a + at, d_in, group(r - j), xt, d_in, nt, d_in, z + j, max_rank);
            }
            if (k > 1 && router != NULL)  /* NULL: no slot of this module has a router (then k is 1) */
                for (int t = 0; t < nt; t++) {
                    float* zt = z + t * max_rank;
                    gate(router + (int64_t)s * max_heads * d_in, bias + s * bias_stride, k, xt + t * d_in, d_in, g);
                    for (int h = k - 1; h >= 0; h--)  /* backwards: column h*r + j is written after it is read */
                        for (int j = r - 1; j >= 0; j--) zt[h * r + j] = zt[j] * g[h];
                }
            if (factor_dtype == FACTORS_BF16)
                memset(ye, 0, sizeof(float) * (size_t)(2 * TOKENS * half_out));
            for (int c = 0; c < w; c += GROUP) {
                const int64_t at = (first + c) * d_out;
                if (factor_dtype == FACTORS_BF16)
                    axpy_bf16((const uint16_t*)b + at, d_out, group(w - c), z + c, max_rank, ye, yo, half_out, yt,
                              d_out, nt, d_out);
                else if (factor_dtype == FACTORS_F16)
                    axpy_f16((const uint16_t*)b + at, d_out, group(w - c), z + c, max_rank, yt, d_out, nt, d_out);
                else
                    axpy_f32((const float*)b + at, d_out, group(w - c), z + c, max_rank, yt, d_out, nt, d_out);
            }
            if (factor_dtype == FACTORS_BF16)
                for (int t = 0; t < nt; t++)
                    for (int m = 0; m < half_out; m++)
                        yt[t * d_out + 2 * m] += ye[t * half_out + m],
                        yt[t * d_out + 2 * m + 1] += yo[t * half_out + m];
        }
        free(scratch);
        if (!ok) {
            #pragma omp atomic write
            failed = 1;
        }
    }
    return failed ? -1 : 0;
}
