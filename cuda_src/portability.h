// One kernel source, two targets.
//
// Under nvcc (__CUDACC__ defined) this header is almost empty: the kernels are ordinary CUDA.
// Under a host C++ compiler it maps the CUDA vocabulary the kernels use to host code:
//   - __global__, __device__, __host__, __forceinline__, __restrict__ become plain C++;
//   - blockIdx, blockDim, threadIdx, gridDim are thread-local variables set by the launcher;
//   - MDR_HOST_LAUNCHER(kernel, Args) defines `extern "C" void launch_<kernel>(const Args*,
//     unsigned grid, unsigned block, int threads)`, which runs the whole 1-D launch grid on
//     `threads` OpenMP threads (blocks are handed out dynamically, threads of a block run in order).
// Kernels must not use __syncthreads, shared memory or atomics: each work item owns its outputs,
// which is also what makes both targets deterministic whatever the number of threads.
#pragma once

#ifdef __CUDACC__

#define MDR_DEVICE __device__ __forceinline__
#define MDR_HOST_LAUNCHER(kernel, Args)

#else  // host C++

#include <cmath>
#include <cstdint>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define MDR_DEVICE inline

// Denormal floats (below ~1e-38 in float32, as exp((zhat - m) / gamma) of hidden faces often is)
// cost x86 cores ~100 cycles per operation. GPUs flush them in fast paths; here each OpenMP
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

struct mdr_dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local mdr_dim3 blockIdx, threadIdx, blockDim, gridDim;

template <typename Body>
inline void mdr_run_grid(unsigned grid, unsigned block, int threads, const Body& body) {
#pragma omp parallel num_threads(threads)
    {
        const mdr_flush_denormals flush;
#pragma omp for schedule(dynamic, 1)
    for (long long b = 0; b < (long long)grid; ++b) {
        gridDim.x = grid;
        blockDim.x = block;
        blockIdx.x = (unsigned)b;
        for (unsigned t = 0; t < block; ++t) {
            threadIdx.x = t;
            body();
        }
    }
    }
}

#define MDR_HOST_LAUNCHER(kernel, Args)                                                         \
    extern "C" void launch_##kernel(const Args* args, unsigned grid, unsigned block, int threads) { \
        mdr_run_grid(grid, block, threads, [&] { kernel(*args); });                              \
    }

#endif

// Math with one spelling for float and double on both targets.
MDR_DEVICE float mdr_exp(float x) { return expf(x); }
MDR_DEVICE double mdr_exp(double x) { return exp(x); }
MDR_DEVICE float mdr_log(float x) { return logf(x); }
MDR_DEVICE double mdr_log(double x) { return log(x); }
MDR_DEVICE float mdr_sqrt(float x) { return sqrtf(x); }
MDR_DEVICE double mdr_sqrt(double x) { return sqrt(x); }
MDR_DEVICE float mdr_floor(float x) { return floorf(x); }
MDR_DEVICE double mdr_floor(double x) { return floor(x); }
MDR_DEVICE float mdr_ceil(float x) { return ceilf(x); }
MDR_DEVICE double mdr_ceil(double x) { return ceil(x); }
template <typename T>
MDR_DEVICE T mdr_min(T a, T b) { return b < a ? b : a; }
template <typename T>
MDR_DEVICE T mdr_max(T a, T b) { return a < b ? b : a; }
