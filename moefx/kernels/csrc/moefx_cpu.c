/* moefx's native CPU kernels, compiled on first use by moefx/kernels/native.py.
 *
 * Two kernels:
 *
 * - moefx_gelu_f32: the exact (erf) GELU, in place on float32. erf is a rational function of
 *   z^2 (no exp), which the compiler vectorises: ~1.4x the throughput of PyTorch's exp-based
 *   erf on the project's AVX2 CPU (2.4-2.6 vs 1.7-1.8 G values/s on two cores), at the same
 *   accuracy (|erf error| <= 4e-7 in float32, ATen's own is ~1.5e-7 + rounding; both far
 *   inside SPEC.md's 1e-5 relative). Coefficients: fit_erf.py beside this file (own fit).
 *
 * - moefx_expert_mlp_f32: the grouped expert MLP of moefx::moe_ffn, fused. Per block of an
 *   expert's rows: gather (and gate) the rows, GEMM1 (+ GLU's second GEMM), activation, GEMM2,
 *   gate, written to the pair-output buffer; the hidden activations of a block live in the
 *   core's L2 and never travel to memory. SliceMoE's experts have eight times the hidden
 *   activations of the dense FFN they stand for (~100 MB written and read back per layer call
 *   at T=2048 through separate PyTorch ops); here they stay in cache.
 *
 * Threads: OpenMP. The library is loaded into a process that already holds PyTorch's OpenMP
 * runtime (libgomp.so.1 on Linux wheels), so the dynamic linker binds it to that same runtime
 * and thread team; native.py checks this and runs single-threaded otherwise.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float moefx_gelu1(float x) {
    float a = x * 0.70710678118654752f; /* erf argument x / sqrt(2) */
    float z = a < 3.92f ? a : 3.92f;      /* the fit's range (compares, so that they vectorise) */
    z = z > -3.92f ? z : -3.92f;
    float y = z * z;
    float p = ((((2.048681945e-06f * y + 2.858894253e-04f) * y + 3.795532502e-03f) * y
                + 5.283763828e-02f) * y + 1.910593848e-01f) * y + 1.128379088e+00f;
    float q = ((((3.813150167e-05f * y + 1.170514466e-03f) * y + 1.502713892e-02f) * y
                + 1.143819635e-01f) * y + 5.026542238e-01f) * y + 1.0f;
    float e = z * p / q;
    e = a >= 3.92f ? 1.0f : e;            /* erf rounds to +-1 in float32 beyond 3.92: exact */
    e = a <= -3.92f ? -1.0f : e;          /* tails, so GELU(-large) is 0 as in ATen */
    return 0.5f * x + 0.5f * x * e;
}

/* Below this many values one thread does it: waking a second costs more than it saves. */
#define MOEFX_PARALLEL_MIN 65536

int moefx_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

void moefx_gelu_f32(float *restrict data, int64_t n, int num_threads) {
    if (num_threads <= 1 || n < MOEFX_PARALLEL_MIN) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) data[i] = moefx_gelu1(data[i]);
        return;
    }
#pragma omp parallel for simd num_threads(num_threads) schedule(static)
    for (int64_t i = 0; i < n; ++i) data[i] = moefx_gelu1(data[i]);
}

/* ------------------------------------------------------------------ expert MLP
 *
 * The GEMMs run transposed, so that neither weight matrix needs packing: a block's rows are
 * gathered as columns (X^T [d][P], P = the block's rows rounded up to 16 lanes), and
 *     H^T [h][P] = act(W1 [h][d] @ X^T + b1),    Y^T [d][P] = W2 [d][h] @ H^T + b2,
 * where the weights, in PyTorch's own [out, in] layout, are the broadcast operand (6 rows at a
 * time, each read sequentially) and the activations the vector operand (16 lanes = two 8-float
 * vectors). The 6x16 micro tile keeps 12 accumulators in registers (AVX2: 16 ymm). Vectors are
 * GCC/Clang vector extensions, so the file builds for any target; -march=native picks AVX2/FMA
 * here. Measured on the project's 2-core AVX2 CPU, SliceMoE T=2048 (16384 slices of 72, top-2 of
 * 16 experts 72->768->72): 50 ms against 73 ms for the PyTorch path and 57-60 ms for the dense
 * FFN of the same FLOPs.
 */

typedef float moefx_v8 __attribute__((vector_size(32)));
typedef float moefx_v8u __attribute__((vector_size(32), aligned(4)));

static inline moefx_v8 ld8(const float *p) { return *(const moefx_v8u *)p; }
static inline void st8(float *p, moefx_v8 v) { *(moefx_v8u *)p = v; }
static inline moefx_v8 bc8(float a) { return (moefx_v8){a, a, a, a, a, a, a, a}; }

#define MLP_MR 6     /* weight rows per micro tile */
#define MLP_LANES 16 /* activation rows (lanes) per micro tile */
#define MLP_BLOCK 48 /* rows per block (measured flat from 32 to 96) */

/* C[m][0:16] = init[m] + sum_k A[m][k] * B[k][0:16] for m < 6; B's rows ldb apart. */
static inline void mlp_micro(const float *const *A, const float *B, int64_t ldb, int64_t K,
                             const float *init, float *C, int64_t ldc) {
    moefx_v8 c00 = bc8(init[0]), c01 = c00, c10 = bc8(init[1]), c11 = c10;
    moefx_v8 c20 = bc8(init[2]), c21 = c20, c30 = bc8(init[3]), c31 = c30;
    moefx_v8 c40 = bc8(init[4]), c41 = c40, c50 = bc8(init[5]), c51 = c50;
    const float *a0 = A[0], *a1 = A[1], *a2 = A[2], *a3 = A[3], *a4 = A[4], *a5 = A[5];
    for (int64_t k = 0; k < K; ++k) {
        moefx_v8 b0 = ld8(B + k * ldb), b1 = ld8(B + k * ldb + 8), t;
        t = bc8(a0[k]); c00 += t * b0; c01 += t * b1;
        t = bc8(a1[k]); c10 += t * b0; c11 += t * b1;
        t = bc8(a2[k]); c20 += t * b0; c21 += t * b1;
        t = bc8(a3[k]); c30 += t * b0; c31 += t * b1;
        t = bc8(a4[k]); c40 += t * b0; c41 += t * b1;
        t = bc8(a5[k]); c50 += t * b0; c51 += t * b1;
    }
    st8(C, c00); st8(C + 8, c01); st8(C + ldc, c10); st8(C + ldc + 8, c11);
    st8(C + 2 * ldc, c20); st8(C + 2 * ldc + 8, c21); st8(C + 3 * ldc, c30); st8(C + 3 * ldc + 8, c31);
    st8(C + 4 * ldc, c40); st8(C + 4 * ldc + 8, c41); st8(C + 5 * ldc, c50); st8(C + 5 * ldc + 8, c51);
}

/* C [M][P] = bias + A [M][K] (rows lda apart) @ B [K][P], P a multiple of 16. A last partial
 * tile of rows repeats row M-1 and lands in `scratch`, from which only real rows are copied. */
static void mlp_gemm(const float *A0, int64_t lda, int64_t M, const float *B, int64_t P, int64_t K,
                     const float *bias, float *C, float *scratch) {
    for (int64_t m0 = 0; m0 < M; m0 += MLP_MR) {
        const float *A[MLP_MR];
        float init[MLP_MR];
        int64_t mr = M - m0 < MLP_MR ? M - m0 : MLP_MR;
        for (int m = 0; m < MLP_MR; ++m) {
            int64_t r = m0 + (m < mr ? m : mr - 1);
            A[m] = A0 + r * lda;
            init[m] = bias ? bias[r] : 0.0f;
        }
        for (int64_t p0 = 0; p0 < P; p0 += MLP_LANES) {
            if (mr == MLP_MR) {
                mlp_micro(A, B + p0, P, K, init, C + m0 * P + p0, P);
            } else {
                mlp_micro(A, B + p0, P, K, init, scratch, MLP_LANES);
                for (int64_t m = 0; m < mr; ++m)
                    memcpy(C + (m0 + m) * P + p0, scratch + m * MLP_LANES, MLP_LANES * sizeof(float));
            }
        }
    }
}

/* exp for |x| <= 88 as 2^n e^r, |r| <= ln2/2, e^r = 1 + r + r^2 R(r) with R of degree 5 (own
 * fit: fit_erf.py exp; relative error 6e-11 before float32 rounding); clamped beyond, NaN kept.
 * Written with selects and a rounding constant so that it vectorises. */
static inline float moefx_exp1(float x) {
    float c = x < 88.0f ? x : 88.0f;
    c = c > -87.0f ? c : -87.0f;
    float n = (c * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest */
    float r = c - n * 0.693359375f + n * 2.12194440e-4f;               /* ln2 in two parts */
    float q = ((((1.9826508054e-04f * r + 1.3946028089e-03f) * r + 8.3334299788e-03f) * r
                + 4.1666270184e-02f) * r + 1.6666666164e-01f) * r + 5.0000000782e-01f;
    q = q * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float s;
    memcpy(&s, &bits, sizeof s);
    return x != x ? x : q * s;
}

enum { MOEFX_IDENTITY = 0, MOEFX_RELU = 1, MOEFX_GELU = 2, MOEFX_SILU = 3, MOEFX_QUICK_GELU = 4,
       MOEFX_GELU_TANH = 5, MOEFX_RELU2 = 6 };

static void mlp_activation(float *v, int64_t n, int act) {
    switch (act) {
    case MOEFX_RELU:
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) v[i] = v[i] > 0.0f ? v[i] : 0.0f;
        break;
    case MOEFX_GELU:
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) v[i] = moefx_gelu1(v[i]);
        break;
    case MOEFX_SILU:
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) v[i] = v[i] / (1.0f + moefx_exp1(-v[i]));
        break;
    case MOEFX_QUICK_GELU:
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) v[i] = v[i] / (1.0f + moefx_exp1(-1.702f * v[i]));
        break;
    case MOEFX_GELU_TANH: /* 0.5 x (1 + tanh(u)) = x sigmoid(2u) */
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
            float x = v[i];
            float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
            v[i] = x / (1.0f + moefx_exp1(-2.0f * u));
        }
        break;
    case MOEFX_RELU2:
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
            float r = v[i] > 0.0f ? v[i] : 0.0f;
            v[i] = r * r;
        }
        break;
    default:
        break;
    }
}

/* The grouped expert MLP. Rows of expert e are pairs offsets[e] .. offsets[e+1]-1 of the
 * grouped order; pair i reads x row rows[i] (x rows ldx apart) and writes out row i ([M][d],
 * contiguous). gate: per-pair routing weights or NULL (all ones); gate_input: multiply the
 * input row (else the output row, bias included). w1/w3 [E][h][d], b1/b3 [E][h], w2 [E][d][h],
 * b2 [E][d]; any bias and w3 may be NULL (w3 given: GLU, act(x W1 + b1) * (x W3 + b3)).
 * Returns 0, or -1 when scratch memory could not be allocated (out is then incomplete). */
int moefx_expert_mlp_f32(const float *x, int64_t ldx, const int64_t *rows, const int64_t *offsets,
                         int64_t E, const float *gate, int gate_input,
                         const float *w1, const float *b1, const float *w3, const float *b3,
                         const float *w2, const float *b2, int64_t d, int64_t h, int act,
                         float *out, int num_threads) {
    int64_t nblocks = 0;
    for (int64_t e = 0; e < E; ++e) nblocks += (offsets[e + 1] - offsets[e] + MLP_BLOCK - 1) / MLP_BLOCK;
    if (nblocks == 0) return 0;
    int64_t *block_expert = malloc(sizeof(int64_t) * 2 * (size_t)nblocks);
    if (!block_expert) return -1;
    int64_t *block_start = block_expert + nblocks, nb = 0;
    for (int64_t e = 0; e < E; ++e)
        for (int64_t s = offsets[e]; s < offsets[e + 1]; s += MLP_BLOCK) {
            block_expert[nb] = e;
            block_start[nb++] = s;
        }
    int threads = num_threads > 1 && nblocks > 1 ? num_threads : 1;
    if (threads > nblocks) threads = (int)nblocks;
    int failed = 0;
    const int64_t P_MAX = MLP_BLOCK;
#pragma omp parallel num_threads(threads)
    {
        size_t floats = (size_t)(d * P_MAX + (w3 ? 2 : 1) * h * P_MAX + d * P_MAX + MLP_MR * MLP_LANES);
        float *xt = malloc(sizeof(float) * floats);
        float *ht = xt ? xt + d * P_MAX : NULL;
        float *ut = xt ? ht + h * P_MAX : NULL;
        float *yt = xt ? ut + (w3 ? h * P_MAX : 0) : NULL;
        float *scratch = xt ? yt + d * P_MAX : NULL;
        if (!xt) {
#pragma omp atomic write
            failed = 1;
        }
        /* contiguous ranges of blocks per thread: an expert's blocks stay on one core, whose
           caches then hold its weights */
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nb; ++b) {
            if (!xt) continue;
            int64_t e = block_expert[b], s = block_start[b];
            int64_t c = offsets[e + 1] - s < MLP_BLOCK ? offsets[e + 1] - s : MLP_BLOCK;
            int64_t P = (c + MLP_LANES - 1) / MLP_LANES * MLP_LANES;
            for (int64_t i = 0; i < c; ++i) {
                const float *xr = x + rows[s + i] * ldx;
                float g = gate && gate_input ? gate[s + i] : 1.0f;
                for (int64_t k = 0; k < d; ++k) xt[k * P + i] = xr[k] * g;
            }
            for (int64_t k = 0; k < d; ++k)
                for (int64_t i = c; i < P; ++i) xt[k * P + i] = 0.0f;
            mlp_gemm(w1 + e * h * d, d, h, xt, P, d, b1 ? b1 + e * h : NULL, ht, scratch);
            mlp_activation(ht, h * P, act);
            if (w3) {
                mlp_gemm(w3 + e * h * d, d, h, xt, P, d, b3 ? b3 + e * h : NULL, ut, scratch);
                for (int64_t i = 0; i < h * P; ++i) ht[i] *= ut[i];
            }
            mlp_gemm(w2 + e * d * h, h, d, ht, P, h, b2 ? b2 + e * d : NULL, yt, scratch);
            for (int64_t i = 0; i < c; ++i) {
                float *o = out + (s + i) * d;
                float g = gate && !gate_input ? gate[s + i] : 1.0f;
                for (int64_t k = 0; k < d; ++k) o[k] = yt[k * P + i] * g;
            }
        }
        free(xt);
    }
    free(block_expert);
    return failed ? -1 : 0;
}
