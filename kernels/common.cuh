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

// ---- the tiled tensor-core GEMMs (gemm.cu, gemm_sm90.cu) -----------------------
// Asynchronous global -> shared copies (cp.async, sm_80+), bf16 packing and
// the block raster. Inline PTX; under the CPU emulator (kernels/emu) each
// has an emulated twin.

// Generic pointer -> address in the shared window.
__device__ __forceinline__ u32 smem_addr(const void* p) {
#ifdef BEFT_CUDA_EMU
    return emu_cvta_shared(p);
#else
    u32 r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
    return r;
#endif
}

// 16 bytes global -> shared, asynchronously; `ok` false: 16 zero bytes (the
// source is not read).
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, bool ok) {
#ifdef BEFT_CUDA_EMU
    emu_cp_async(dst, src, 16, ok ? 16 : 0);
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(ok ? 16 : 0)
                 : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef BEFT_CUDA_EMU
    emu_cp_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most N of this thread's committed groups are pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef BEFT_CUDA_EMU
    emu_cp_wait(N);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// ldmatrix.x4: lanes 8q..8q+7 give the row addresses of 8x8 b16 matrix q;
// register q of lane l receives row l/4, columns 2(l%4), 2(l%4)+1 of matrix
// q (.trans: rows 2(l%4), 2(l%4)+1 of column l/4).
__device__ __forceinline__ void ldsm_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
#ifdef BEFT_CUDA_EMU
    u32 r[4];
    emu_ldmatrix_x4(addr, 0, r);
    r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
#endif
}

__device__ __forceinline__ void ldsm_x4_trans(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
#ifdef BEFT_CUDA_EMU
    u32 r[4];
    emu_ldmatrix_x4(addr, 1, r);
    r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
#endif
}

// d += a . b for one m16n8k16 tile (bf16 in, f32 accumulate).
__device__ __forceinline__ void mma_16816(float* d, const u32* a, const u32* b) {
#ifdef BEFT_CUDA_EMU
    emu_mma_16816_bf16(d, a, b);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// Two f32 -> packed bf16x2 (round to nearest even), `lo` in the low half.
__device__ __forceinline__ u32 bf16x2_rn(float lo, float hi) {
#ifdef BEFT_CUDA_EMU
    return pack_bf16(f32_to_bf16(lo), f32_to_bf16(hi));
#else
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#endif
}

// Origin (bm, bn) of this block's output tile of TM x TN elements. Block
// raster: groups of 8 block rows, column-major inside a group (the blocks
// running at once share b's column tiles and a's row tiles in L2). The
// special registers are read with volatile asm, so that the compiler
// recomputes what derives from them instead of keeping it live (or
// spilling it) through a k loop.
template <int TM, int TN>
__device__ __forceinline__ void raster_origin(int& bm, int& bn) {
    const int GROUP = 8;
    u32 bx, by, gx, gy;
#ifdef BEFT_CUDA_EMU
    bx = blockIdx.x, by = blockIdx.y, gx = gridDim.x, gy = gridDim.y;
#else
    asm volatile("mov.u32 %0, %%ctaid.x;\n" : "=r"(bx));
    asm volatile("mov.u32 %0, %%ctaid.y;\n" : "=r"(by));
    asm volatile("mov.u32 %0, %%nctaid.x;\n" : "=r"(gx));
    asm volatile("mov.u32 %0, %%nctaid.y;\n" : "=r"(gy));
#endif
    const int gm = (int)gy, gn = (int)gx;
    const int pid = (int)by * gn + (int)bx;
    const int per_group = GROUP * gn;
    const int first_m = (pid / per_group) * GROUP;
    const int gsize = gm - first_m < GROUP ? gm - first_m : GROUP;
    const int tile_m = first_m + (pid % per_group) % gsize;
    const int tile_n = (pid % per_group) / gsize;
    bm = tile_m * TM;
    bn = tile_n * TN;
}

// Activations, shared by activation.cu and the GEMM epilogues. Formulas
// mirror src/backend/cpu/mod.rs (`act_value`, `act_grad`) in f32; `act`
// codes: 0 GELU (erf), 1 GELU (tanh approximation), 2 ReLU, 3 tanh, 4 SiLU
// (the order of `Act` in src/backend/mod.rs).
#define ACT_GELU 0
#define ACT_GELU_TANH 1
#define ACT_RELU 2
#define ACT_TANH 3
#define ACT_SILU 4

#define GELU_C 0.7978845608028654f   // sqrt(2/pi)
#define GELU_A 0.044715f
#define INV_SQRT2 0.7071067811865476f
#define INV_SQRT_2PI 0.3989422804014327f

__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ __forceinline__ float act_value(int act, float x) {
    switch (act) {
        case ACT_GELU: return 0.5f * x * (1.0f + erff(x * INV_SQRT2));
        case ACT_GELU_TANH: {
            float inner = GELU_C * (x + GELU_A * x * x * x);
            return 0.5f * x * (1.0f + tanhf(inner));
        }
        case ACT_RELU: return x > 0.0f ? x : 0.0f;
        case ACT_TANH: return tanhf(x);
        default: return x * sigmoidf(x);
    }
}

__device__ __forceinline__ float act_grad(int act, float x) {
    switch (act) {
        case ACT_GELU: {
            float cdf = 0.5f * (1.0f + erff(x * INV_SQRT2));
            float pdf = expf(-0.5f * x * x) * INV_SQRT_2PI;
            return cdf + x * pdf;
        }
        case ACT_GELU_TANH: {
            float inner = GELU_C * (x + GELU_A * x * x * x);
            float t = tanhf(inner);
            float dinner = GELU_C * (1.0f + 3.0f * GELU_A * x * x);
            return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * dinner;
        }
        case ACT_RELU: return x > 0.0f ? 1.0f : 0.0f;
        case ACT_TANH: {
            float t = tanhf(x);
            return 1.0f - t * t;
        }
        default: {
            float s = sigmoidf(x);
            return s * (1.0f + x * (1.0f - s));
        }
    }
}

// The epilogue of the tiled GEMMs: the accumulator pair (x, y) into
// c(gi, gj), c(gi, gj + 1), added to what is there when `accumulate`;
// nothing outside the m x n output (n even, so a pair is wholly in or out).
__device__ __forceinline__ void store_pair(float* c, int ldc, int m, int n, int gi, int gj, float x, float y,
                                           int accumulate) {
    if (gi >= m || gj >= n) return;
    float2* p = (float2*)(c + ((i64)gi * ldc + gj));
    float2 v;
    v.x = x;
    v.y = y;
    if (accumulate) {
        const float2 o = *p;
        v.x = o.x + v.x;
        v.y = o.y + v.y;
    }
    *p = v;
}

// The epilogue's bias for output columns gj, gj + 1: bias[bias_off + gj],
// [.. + 1] (zeros when bias_off < 0: no bias, the pointer is not read, or
// when gj is past the n columns).
__device__ __forceinline__ float2 bias_pair(const float* bias, int bias_off, int n, int gj) {
    float2 v;
    v.x = v.y = 0.0f;
    if (bias_off >= 0 && gj < n) {
        v.x = bias[bias_off + gj];
        v.y = bias[bias_off + gj + 1];
    }
    return v;
}

// This thread's index in the block (x), read afresh (see raster_origin).
__device__ __forceinline__ int tid_x() {
#ifdef BEFT_CUDA_EMU
    return (int)threadIdx.x;
#else
    u32 r;
    asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(r));
    return (int)r;
#endif
}

// The fused epilogue of the tiled GEMMs (gemm.cu, gemm_sm90.cu), `epi`:
//   EPI_NONE        c = product (+ bias)
//   EPI_FWD + act   c = pre = product (+ bias), aux = act(pre): a linear
//                   layer and its activation, one pass (aux: c's shape)
//   EPI_GRAD + act  c = product * act'(aux): the gradient at an activation's
//                   input, aux holding its saved input (pre)
//   EPI_FWD + EPI_GLU + act   a gated unit's second product: c = up =
//                   product (+ bias), aux holding the gate (the first
//                   product), aux2 = act(gate) * up
//   EPI_GRAD + EPI_GLU + act  its gradients from the product dh: c = dgate
//                   = dh * up * act'(gate), out2 = dup = dh * act(gate), aux
//                   holding the gate, aux2 up (not with EPI_PART)
//   | EPI_PART      also the column sums of what the epilogue stores (before
//                   accumulate adds c's old value): the block's tile row r
//                   writes part[r * n + j] (f64) for its columns j, in a
//                   fixed order; bias_grad_sum_f32 then adds the tile rows'
//                   sums into a bias gradient (the pass over c it saves)
// (accumulate then adds c's old value, as without an epilogue.)
// The tiled GEMMs' parameter list (gemm.cu's header comment says what each
// is) and its forwarding from a kernel to its body.
#define GEMM_PARAMS                                                                                            \
    float *c, const float *a, const bf16_t *b, int m, int n, int k, int lda, int ldb, int ldc, int accumulate, \
        const float *bias, int bias_off, int epi, float *aux, double *part, float *aux2, float *out2
#define GEMM_ARGS c, a, b, m, n, k, lda, ldb, ldc, accumulate, bias, bias_off, epi, aux, part, aux2, out2

#define EPI_NONE 0
#define EPI_FWD 16
#define EPI_GRAD 32
#define EPI_PART 64
#define EPI_GLU 128

// c(gi, gj), c(gi, gj + 1) from the product pair (x, y) (bias added) through
// the epilogue `epi` (above); nothing outside the m x n output. Returns the
// pair it stored before any accumulation (zeros outside), for EPI_PART.
__device__ __forceinline__ float2 epi_pair(float* c, float* aux, float* aux2, float* out2, int epi, int ldc, int m,
                                           int n, int gi, int gj, float x, float y, int accumulate) {
    float2 v;
    v.x = v.y = 0.0f;
    if (gi >= m || gj >= n) return v;
    const int act = epi & 15;
    if (epi & EPI_GLU) {
        const i64 o = (i64)gi * ldc + gj;
        const float2 g = *(const float2*)(aux + o);
        const float ax = act_value(act, g.x), ay = act_value(act, g.y);
        float2 w;
        if (epi & EPI_GRAD) {
            const float2 u = *(const float2*)(aux2 + o);
            w.x = x * ax;
            w.y = y * ay;
            *(float2*)(out2 + o) = w;
            x = x * u.x * act_grad(act, g.x);
            y = y * u.y * act_grad(act, g.y);
        } else {
            w.x = ax * x;
            w.y = ay * y;
            *(float2*)(aux2 + o) = w;
        }
    } else if (epi & (EPI_FWD | EPI_GRAD)) {
        float2* q = (float2*)(aux + ((i64)gi * ldc + gj));
        if (epi & EPI_GRAD) {
            const float2 pre = *q;
            x *= act_grad(act, pre.x);
            y *= act_grad(act, pre.y);
        } else {
            float2 o;
            o.x = act_value(act, x);
            o.y = act_value(act, y);
            *q = o;
        }
    }
    store_pair(c, ldc, m, n, gi, gj, x, y, accumulate);
    v.x = x;
    v.y = y;
    return v;
}

// EPI_PART, within a warp: the sum of v over the 8 lanes that share
// lane & 3 (the m16n8 accumulator rows g = lane >> 2 of one column), in a
// fixed butterfly order; every lane gets it.
__device__ __forceinline__ double col_sum_lanes(double v) {
    v += __shfl_xor_sync(0xffffffffu, v, 4);
    v += __shfl_xor_sync(0xffffffffu, v, 8);
    v += __shfl_xor_sync(0xffffffffu, v, 16);
    return v;
}

// EPI_PART, one column pair of a thread's accumulator tile: sx, sy (its
// rows' sums of the pair's two columns) summed over the warp's 8 row lanes;
// lanes 0-3 store them at slot[0], slot[1] (the warp's row-group slot in
// shared memory). Nothing without EPI_PART.
__device__ __forceinline__ void col_pair_part(int epi, double* slot, double sx, double sy, int lane) {
    if (!(epi & EPI_PART)) return;
    sx = col_sum_lanes(sx);
    sy = col_sum_lanes(sy);
    if (lane < 4) {
        slot[0] = sx;
        slot[1] = sy;
    }
}

// EPI_PART, across the block: red[group * COLS + c] holds row group `group`'s
// sum of tile column c (GROUPS groups, written before this call); the block
// (256 threads) adds them in order into part[tile_row * n + bn + c].
template <int GROUPS, int COLS>
__device__ __forceinline__ void col_sums_out(const double* red, double* part, int n, int tile_row, int bn) {
    __syncthreads();
    for (int c = tid_x(); c < COLS; c += 256) {
        if (bn + c >= n) continue;
        double s = 0.0;
#pragma unroll
        for (int g = 0; g < GROUPS; g++) s += red[g * COLS + c];
        part[(i64)tile_row * n + bn + c] = s;
    }
}

