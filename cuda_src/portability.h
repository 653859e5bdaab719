// One kernel source, two targets.
//
// Under nvcc (__CUDACC__ defined) this header is almost empty: the kernels are ordinary CUDA.
// Under a host C++ compiler it maps the CUDA vocabulary the kernels use to host code:
//   - __device__ and __restrict__ become plain C++;
//   - MDR_ENTRY(name, item_fn, Args) defines, instead of the `__global__ void name(const Args)`
//     kernel that runs item_fn(args, item) for item = blockIdx.x * blockDim.x + threadIdx.x
//     < args.n_items, `extern "C" void launch_<name>(const Args*, unsigned grid, unsigned block,
//     int threads)`, which runs the same items of the 1-D launch grid on `threads` threads
//     (blocks are handed out dynamically, the items of a block run in order);
//   - work items take MDR_LANES adjacent pixels instead of one, and loops over them (MDR_SIMD)
//     become SIMD instructions.
// Kernels must not use __syncthreads, shared memory or atomics: each work item owns its outputs,
// which is also what makes both targets deterministic whatever the number of threads.
#pragma once

#include <cfloat>

#ifdef __CUDACC__

#define MDR_DEVICE __device__ __forceinline__
// A function called once per work item, kept out of line so that its registers are not added to
// its caller's (the caller's own may be at the limit).
#define MDR_DEVICE_CALL __device__ __noinline__
#define MDR_ENTRY(name, item_fn, Args)                                          \
    extern "C" __global__ void name(const Args args) {                           \
        const long long item = (long long)blockIdx.x * blockDim.x + threadIdx.x; \
        if (item < args.n_items) item_fn(args, item);                            \
    }
// One pixel per thread: the warp is the vector.
#define MDR_LANES 1
#define MDR_SIMD
#define MDR_SIMD_SUM(var)


#else  // host C++

#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

#define __device__
#define __restrict__ __restrict
// Everything a lane loop calls must be inlined into it for the loop to vectorize.
#define MDR_DEVICE inline __attribute__((always_inline))
#define MDR_DEVICE_CALL inline
// Work items take MDR_LANES adjacent pixels, and their loops over them (marked MDR_SIMD) become
// SIMD instructions: 8 floats fill one AVX register, 8 doubles two (cpu_build.py picks AVX2
// where the CPU has it). -DMDR_LANES=1 builds the GPU's shape instead, one pixel per work item,
// so that its indexing runs and is tested without a GPU (microdr/raster/cpu.py, cpu_target).
#ifndef MDR_LANES
#define MDR_LANES 8
#endif
#define MDR_SIMD _Pragma("omp simd")  // needs -fopenmp-simd (the pragma alone, no runtime)
// A lane loop that adds up into var.
#define MDR_PRAGMA(text) _Pragma(#text)
#define MDR_SIMD_SUM(var) MDR_PRAGMA(omp simd reduction(+ : var))

// Denormal floats (below ~1e-38 in float32, as exp((zhat - m) / gamma) of hidden faces often is)
// cost x86 cores ~100 cycles per operation. GPUs flush them in fast paths; here each launch
// thread sets flush-to-zero and denormals-are-zero for the kernels it runs.
// The caller's own setting is restored afterwards (the calling thread is one of the team).
#if defined(__SSE2__)
#include <xmmintrin.h>
struct mdr_flush_denormals {
    unsigned saved = _mm_getcsr();
    mdr_flush_denormals() { _mm_setcsr(saved | 0x8040); }
    ~mdr_flush_denormals() { _mm_setcsr(saved); }
};
#else
struct mdr_flush_denormals {};
#endif

// Plain threads rather than an OpenMP team: torch's OpenMP runtime is the process's, and its
// idle workers spin for milliseconds after every parallel region, which on a 2-core machine
// took a core from the kernels and made 2 threads slower than 1. Starting a thread costs tens of
// microseconds, far less than a launch's work. Blocks go to whichever thread asks next.
inline int mdr_min_threads(int threads, long long blocks) { return blocks < threads ? (int)blocks : threads; }

template <typename Body>
inline void mdr_run_grid(unsigned grid, unsigned block, int threads, const Body& body) {
    std::atomic<long long> next_block{0};
    const auto work = [&] {
        const mdr_flush_denormals flush;
        for (long long b; (b = next_block.fetch_add(1, std::memory_order_relaxed)) < (long long)grid;)
            for (unsigned t = 0; t < block; ++t) body(b * block + t);
    };
    std::vector<std::thread> helpers;
    for (int i = 1; i < mdr_min_threads(threads, (long long)grid); ++i) helpers.emplace_back(work);
    work();  // the calling thread is one of them
    for (std::thread& helper : helpers) helper.join();
}

#define MDR_ENTRY(name, item_fn, Args)                                                                \
    extern "C" void launch_##name(const Args* args, unsigned grid, unsigned block, int threads) {     \
        mdr_run_grid(grid, block, threads, [&](long long item) {                                      \
            if (item < args->n_items) item_fn(*args, item);                                           \
        });                                                                                           \
    }

#endif

// Math with one spelling for float and double on both targets.
MDR_DEVICE float mdr_sqrt(float x) { return sqrtf(x); }
MDR_DEVICE double mdr_sqrt(double x) { return sqrt(x); }
MDR_DEVICE float mdr_floor(float x) { return floorf(x); }
MDR_DEVICE double mdr_floor(double x) { return floor(x); }
MDR_DEVICE float mdr_ceil(float x) { return ceilf(x); }
MDR_DEVICE double mdr_ceil(double x) { return ceil(x); }
MDR_DEVICE float mdr_abs(float x) { return fabsf(x); }
MDR_DEVICE double mdr_abs(double x) { return fabs(x); }
// The smallest normal and the largest finite number of a type.
template <typename T>
MDR_DEVICE T mdr_tiny() { return sizeof(T) == 4 ? T(FLT_MIN) : T(DBL_MIN); }
template <typename T>
MDR_DEVICE T mdr_largest() { return sizeof(T) == 4 ? T(FLT_MAX) : T(DBL_MAX); }
// The spacing of a type's numbers at 1.
template <typename T>
MDR_DEVICE T mdr_epsilon() { return sizeof(T) == 4 ? T(FLT_EPSILON) : T(DBL_EPSILON); }
// The index of the lowest set bit of a nonzero mask.
#ifdef __CUDACC__
MDR_DEVICE int mdr_lowest_bit(unsigned mask) { return __ffs(mask) - 1; }
#else
MDR_DEVICE int mdr_lowest_bit(unsigned mask) { return std::countr_zero(mask); }
#endif
template <typename T>
MDR_DEVICE T mdr_min(T a, T b) { return b < a ? b : a; }
template <typename T>
MDR_DEVICE T mdr_max(T a, T b) { return a < b ? b : a; }

#ifdef __CUDACC__
MDR_DEVICE float mdr_exp(float x) { return expf(x); }
MDR_DEVICE double mdr_exp(double x) { return exp(x); }
#else
// exp that vectorizes: libm's is a call per value, which keeps a lane loop scalar. Branch-free:
// exp(x) = 2^n exp(r) with n = round(x / ln 2) and r = x - n ln 2 in [-ln 2 / 2, ln 2 / 2]
// (ln 2 split in two so that n ln 2 is exact), exp(r) by its Taylor series (degree 7 in float,
// 12 in double: truncation below half an ulp), and 2^n built in the exponent bits. Results within
// 2 ulp; below the smallest normal number it returns 0, as flush-to-zero would, and above
// `highest` (a little short of the overflow point) inf: the kernels only take exp of x <= 0.
template <typename T, typename Bits, int DEGREE>
MDR_DEVICE T mdr_exp_poly(T x, T lowest, T highest, T ln2_hi, T ln2_lo, T round_magic, int mantissa, int bias) {
    const T clamped = x == x ? mdr_min(mdr_max(x, lowest), highest) : T(0);
    // Adding 1.5 * 2^mantissa rounds to an integer and leaves it in the low bits.
    const T shifted = clamped * T(1.4426950408889634) + round_magic;
    const Bits n = std::bit_cast<Bits>(shifted) - std::bit_cast<Bits>(round_magic);
    const T n_real = shifted - round_magic;
    const T r = (clamped - n_real * ln2_hi) - n_real * ln2_lo;
    T factorial = T(1), coefficients[DEGREE + 1];
    for (int k = 0; k <= DEGREE; ++k) coefficients[k] = T(1) / factorial, factorial *= T(k + 1);
    T p = coefficients[DEGREE];
    for (int k = DEGREE - 1; k >= 0; --k) p = p * r + coefficients[k];
    const T result = p * std::bit_cast<T>((n + Bits(bias)) << mantissa);
    return x != x ? x : x > highest ? T(INFINITY) : x < lowest ? T(0) : result;
}
MDR_DEVICE float mdr_exp(float x) {
    return mdr_exp_poly<float, int32_t, 7>(x, -87.33654f, 88.0f, 0.693359375f, -2.12194440e-4f, 12582912.0f, 23, 127);
}
MDR_DEVICE double mdr_exp(double x) {
    return mdr_exp_poly<double, int64_t, 12>(x, -708.3964185322641, 709.0, 6.93147180369123816490e-01,
                                             1.90821492927058770002e-10, 6755399441055744.0, 52, 1023);
}
#endif
