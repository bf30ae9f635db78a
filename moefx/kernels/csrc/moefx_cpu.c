/* moefx's native CPU kernels, compiled on first use by moefx/kernels/native.py.
 *
 * One kernel so far: the exact (erf) GELU, in place on float32. SliceMoE's experts have eight
 * times the hidden activations of the dense FFN they stand for (25M values per layer call at
 * T=2048), and PyTorch's GELU spends ~3 cycles per value on them (an exp-based erf). Here erf is
 * a rational function of z^2 (no exp), which the compiler vectorises: ~1.4x the throughput of
 * PyTorch's on the project's AVX2 CPU (2.4-2.6 vs 1.7-1.8 G values/s on two cores), at the same accuracy (|erf error| <= 4e-7 in float32,
 * ATen's own is ~1.5e-7 + rounding; both far inside SPEC.md's 1e-5 relative).
 *
 * Coefficients: fit_erf.py beside this file (own least-squares fit; it prints them back).
 * Threads: OpenMP. The library is loaded into a process that already holds PyTorch's OpenMP
 * runtime (libgomp.so.1 on Linux wheels), so the dynamic linker binds it to that same runtime
 * and thread team; native.py checks this and runs single-threaded otherwise.
 */
#include <stdint.h>

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
