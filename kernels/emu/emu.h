// The CUDA device dialect of kernels/*.cu, for the CPU emulator.
//
// `kernels/emu/build.py` compiles every kernel file with g++, with this
// header forced in front (-include), into a shared library that stands in
// for the CUDA driver (`libcuda.so`, see runtime.cpp). A CUDA thread becomes
// a fiber; the threads of one block run together on one CPU thread,
// switching at barriers and warp-collective operations, blocks one after
// the other. It runs the kernels' own source text, so the Rust CUDA backend
// and its tests run unchanged on a machine without a GPU (set
// BEFT_CUDA_EMU to the library). What it checks and what it cannot:
// docs/cuda-emulator.md.
//
// The kernels stay plain CUDA: only the inline-PTX helpers (common.cuh,
// gemm.cu, gemm_sm90.cu, matmul.cu) carry an `#ifdef BEFT_CUDA_EMU` branch
// that calls the emulations below.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#define BEFT_CUDA_EMU 1

// Dynamic shared memory a function may opt into (an H100's maximum), and
// what the emulator reserves for each kernel file's `extern __shared__` array.
#define EMU_SMEM_OPTIN (227 * 1024)

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Shared memory: a block's threads run one block at a time, so a
// function-local static is exactly one block's shared array.
#define __shared__ static

struct emu_dim3 {
    unsigned x, y, z;
};
// Set by the scheduler before it resumes a thread (runtime.cpp).
extern emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

struct __attribute__((aligned(8))) float2 {
    float x, y;
};

inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }

// ---- the runtime's entry points (runtime.cpp) --------------------------------

extern "C" {
// Block barrier.
void emu_syncthreads();
// The running thread's lane: its linear index in the block, mod 32.
int emu_lane_id();
// Warp exchange: every lane of the warp offers `v`; returns the value that
// lane `src` offered. `mask` is checked against the lanes still running.
uint64_t emu_shfl(unsigned mask, uint64_t v, int src);
// Generic pointer -> shared-window address, and back (bounds-checked
// against the launch's dynamic shared memory).
unsigned emu_cvta_shared(const void* p);
void* emu_shared_ptr(unsigned addr, unsigned bytes);
// cp.async: queued per thread, landed at the wait that retires its group
// (the latest moment the PTX memory model allows).
void emu_cp_async(unsigned dst, const void* src, unsigned bytes, unsigned src_bytes);
void emu_cp_commit();
void emu_cp_wait(int pending);
// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16.
void emu_ldmatrix_x4(unsigned addr, int trans, unsigned* r);
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: d += a . b.
void emu_mma_16816_bf16(float* d, const unsigned* a, const unsigned* b);
// Hopper's warpgroup MMA (sm_90a): wgmma.fence, commit_group, wait_group,
// and wgmma.mma_async.m64nNk16.f32.bf16.bf16 with A in registers and B in
// shared memory through a matrix descriptor (scale-d, imm-trans-b). Queued
// per warp and computed at the wait that retires its group, reading B then.
void emu_wgmma_fence();
void emu_wgmma_commit();
void emu_wgmma_wait(int pending);
void emu_wgmma_bf16(float* d, int n, const unsigned* a, unsigned long long desc, int scale_d, int trans_b);
// fence.proxy.async: nothing to do on the CPU (one memory, one proxy).
inline void emu_fence_proxy_async() {}
}

inline void __syncthreads() { emu_syncthreads(); }

template <typename T>
inline T emu_shfl_t(unsigned mask, T v, int src) {
    static_assert(sizeof(T) <= 8, "shuffle of a value wider than 64 bits");
    uint64_t u = 0;
    std::memcpy(&u, &v, sizeof(T));
    u = emu_shfl(mask, u, src);
    T r;
    std::memcpy(&r, &u, sizeof(T));
    return r;
}

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    const int lane = emu_lane_id();
    return emu_shfl_t(mask, v, (lane & ~(width - 1)) | (src & (width - 1)));
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    const int lane = emu_lane_id();
    int src = lane ^ lane_mask;
    if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;
    return emu_shfl_t(mask, v, src);
}

// ---- kernel registration (the units generated by build.py) -------------------

#include <cstddef>
#include <type_traits>
#include <utility>

struct EmuKernel {
    const char* name;
    void (*tramp)(void** params);
    void* dyn_smem;       // the file's `extern __shared__` array, or null
    size_t dyn_smem_cap;  // its size in bytes
};

extern "C" void emu_register(const EmuKernel* k, int n);

// Calls a kernel with cuLaunchKernel's `kernelParams`: one pointer per
// argument, to a value of the argument's type.
template <typename F>
struct EmuArgs;
template <typename... A>
struct EmuArgs<void (*)(A...)> {
    template <size_t... I>
    static void call(void (*f)(A...), void** p, std::index_sequence<I...>) {
        f(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(p[I])...);
    }
    static void run(void (*f)(A...), void** p) { call(f, p, std::index_sequence_for<A...>{}); }
};
template <auto F>
void emu_tramp(void** p) {
    EmuArgs<decltype(F)>::run(F, p);
}
