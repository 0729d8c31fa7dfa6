// Shared helpers for every beft kernel file.
//
// The kernels are compiled by NVRTC at run time (src/backend/cuda/ptx.rs)
// and by scripts/compile_kernels.py in CI. Both prepend this header to each
// kernels/*.cu file in place of its include line for this file, so the
// kernels need no CUDA headers at all: bf16 values travel as raw 16-bit
// patterns (`bf16_t`) and are converted here with integer operations, and
// tensor-core instructions are written as inline PTX. That keeps run-time
// compilation free of any include path (a user's machine has the driver and
// NVRTC, not necessarily the toolkit's headers).
//
// Conventions shared with the CPU backend (src/backend/cpu/mod.rs):
// row-major matrices, heads interleaved as [B, T, H, Dh], every length in
// elements, outputs first. Sizes are passed as 32-bit ints (checked on the
// host) and widened to 64 bits before they are multiplied into an offset.
#pragma once

typedef unsigned short bf16_t;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#define BEFT_INF __int_as_float(0x7f800000)
#define BEFT_NEG_INF __int_as_float(0xff800000)
#define WARP 32
#define FULL_MASK 0xffffffffu

// ---- bf16 ------------------------------------------------------------------

__device__ __forceinline__ float bf16_to_f32(bf16_t h) {
    return __uint_as_float(((u32)h) << 16);
}

// Round to nearest even (NaN stays NaN), as `half::bf16::from_f32`.
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

// Two bf16 values packed into one 32-bit register, `lo` in the low half
// (the element order that mma.sync expects).
__device__ __forceinline__ u32 pack_bf16(bf16_t lo, bf16_t hi) {
    return ((u32)hi << 16) | (u32)lo;
}

// Load element `i` of a buffer of type T as f32.
__device__ __forceinline__ float load_f32(const float* p, i64 i) { return p[i]; }
__device__ __forceinline__ float load_f32(const bf16_t* p, i64 i) { return bf16_to_f32(p[i]); }

// ---- dropout: the same counter hash as src/backend/mod.rs ------------------

// The "lowbias32" finaliser (`hash32`).
__device__ __forceinline__ u32 hash32(u32 x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

// `dropout_keep(seed, idx, p)`: seed split into its two 32-bit halves on the
// host (seed_lo = seed as u32, seed_hi = seed >> 32).
__device__ __forceinline__ bool dropout_keep(u32 seed_lo, u32 seed_hi, u32 idx, float p) {
    if (p <= 0.0f) return true;
    u32 h = hash32(hash32(idx ^ seed_lo) ^ seed_hi);
    return ((float)(h >> 8)) * (1.0f / 16777216.0f) >= p;
}

// ---- reductions --------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Sum over a block of `blockDim.x` threads (a multiple of 32, at most 1024);
// every thread gets the total. `scratch` holds 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[w] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

__device__ __forceinline__ double block_sum_d(double v, double* scratch) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum_d(v);
    __syncthreads();
    if (lane == 0) scratch[w] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : 0.0;
    return warp_sum_d(v);
}

// Grid-stride loop over `n` elements (64-bit index).
#define GRID_LOOP(i, n) \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (i64)(n); i += (i64)blockDim.x * gridDim.x)
