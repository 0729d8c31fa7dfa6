// LayerNorm and RMSNorm over rows, forward and backward. One warp per row
// (4 rows per 128-thread block); each lane strides over the columns.
// Statistics use two passes over the row (mean, then squared deviations) in
// f32. These first four kernels re-read the row from L1/L2 for each pass
// (any width, no spilling); the _w1024 / _w4096 ones below keep it in
// registers and read it once.
#include "common.cuh"

// y = xhat * gamma + beta[beta_off..], saving xhat (rows x cols) and rstd (rows).
extern "C" __global__ void layernorm_fwd_f32(float* y, float* xhat, float* rstd, const float* x, const float* gamma,
                                             const float* beta, int beta_off, int rows, int cols, float eps) {
    int row = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (row >= rows) return;
    const float* xr = x + (i64)row * cols;
    float s = 0.0f;
    for (int c = lane; c < cols; c += WARP) s += xr[c];
    float mean = warp_sum(s) / (float)cols;
    float v = 0.0f;
    for (int c = lane; c < cols; c += WARP) {
        float d = xr[c] - mean;
        v += d * d;
    }
    float var = warp_sum(v) / (float)cols;
    float rs = 1.0f / sqrtf(var + eps);
    if (lane == 0) rstd[row] = rs;
    float* yr = y + (i64)row * cols;
    float* hr = xhat + (i64)row * cols;
    for (int c = lane; c < cols; c += WARP) {
        float h = (xr[c] - mean) * rs;
        hr[c] = h;
        yr[c] = h * gamma[c] + beta[beta_off + c];
    }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * gamma.
extern "C" __global__ void layernorm_bwd_f32(float* dx, const float* dy, const float* xhat, const float* rstd,
                                             const float* gamma, int rows, int cols) {
    int row = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (row >= rows) return;
    i64 o = (i64)row * cols;
    float sg = 0.0f, sgx = 0.0f;
    for (int c = lane; c < cols; c += WARP) {
        float g = dy[o + c] * gamma[c];
        sg += g;
        sgx += g * xhat[o + c];
    }
    float mean_g = warp_sum(sg) / (float)cols;
    float mean_gx = warp_sum(sgx) / (float)cols;
    float rs = rstd[row];
    for (int c = lane; c < cols; c += WARP) {
        float g = dy[o + c] * gamma[c];
        dx[o + c] = rs * (g - mean_g - xhat[o + c] * mean_gx);
    }
}

// y = xhat * gamma, xhat = x / sqrt(mean(x^2) + eps), saving xhat and rstd.
extern "C" __global__ void rmsnorm_fwd_f32(float* y, float* xhat, float* rstd, const float* x, const float* gamma,
                                           int rows, int cols, float eps) {
    int row = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (row >= rows) return;
    const float* xr = x + (i64)row * cols;
    float s = 0.0f;
    for (int c = lane; c < cols; c += WARP) s += xr[c] * xr[c];
    float rs = 1.0f / sqrtf(warp_sum(s) / (float)cols + eps);
    if (lane == 0) rstd[row] = rs;
    float* yr = y + (i64)row * cols;
    float* hr = xhat + (i64)row * cols;
    for (int c = lane; c < cols; c += WARP) {
        float h = xr[c] * rs;
        hr[c] = h;
        yr[c] = h * gamma[c];
    }
}

// dx = rstd * (g - xhat * mean(g * xhat)), g = dy * gamma.
extern "C" __global__ void rmsnorm_bwd_f32(float* dx, const float* dy, const float* xhat, const float* rstd,
                                           const float* gamma, int rows, int cols) {
    int row = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (row >= rows) return;
    i64 o = (i64)row * cols;
    float sgx = 0.0f;
    for (int c = lane; c < cols; c += WARP) sgx += dy[o + c] * gamma[c] * xhat[o + c];
    float mean_gx = warp_sum(sgx) / (float)cols;
    float rs = rstd[row];
    for (int c = lane; c < cols; c += WARP) dx[o + c] = rs * (dy[o + c] * gamma[c] - xhat[o + c] * mean_gx);
}

// ---- the row held in registers ---------------------------------------------------
// The same four ops reading each row from global memory once (the kernels
// above re-read it for each pass): WPR warps own a row (one warp for up to
// 1024 columns, a 128-thread block for up to 4096), each lane holding up to
// 32 of its values: value k of lane l of the row's warp p is column
// 32 * (WPR * k + p) + l (coalesced loads, all independent). Launch: 128 threads a block, 4 / WPR rows a
// block, grid ceil(rows / (4 / WPR)). Wider rows use the kernels above.

#define NORM_NV 32  // values per lane

// Sum over the WPR warps of this thread's row (every thread of the block
// must call it: it holds barriers when WPR > 1). scratch: 4 floats shared.
template <int WPR>
__device__ __forceinline__ float norm_row_sum(float v, float* scratch) {
    v = warp_sum(v);
    if (WPR == 1) return v;
    const int warp = threadIdx.x >> 5, first = (warp / WPR) * WPR;
    __syncthreads();  // the previous sum's reads are done
    if ((threadIdx.x & 31) == 0) scratch[warp] = v;
    __syncthreads();
    float s = 0.0f;
#pragma unroll
    for (int w = 0; w < WPR; w++) s += scratch[first + w];
    return s;
}

// This thread's row, whether it exists, and the column of its value k.
template <int WPR>
struct NormLane {
    int row, base;
    bool live;
    __device__ __forceinline__ NormLane(int rows) {
        const int warp = threadIdx.x >> 5;
        row = blockIdx.x * (4 / WPR) + warp / WPR;
        base = (warp % WPR) * WARP + (threadIdx.x & 31);
        live = row < rows;
    }
    __device__ __forceinline__ int col(int k) const { return base + k * WARP * WPR; }
};

// A residual sum formed as the row is read (norm_fwd_reg's RES): the row is
// drop(x) + res, dropout_f32's mask (element index row * cols + c; p = 0
// keeps all, scale 1) -- what dropout_add_f32 would have left in x.
struct NormRes {
    const float* res;
    float p, scale;
    u32 seed_lo, seed_hi;
};

// Forward of a row held in registers. CENTER: LayerNorm (the mean taken
// out, then y = xhat * gamma + beta[beta_off..]); else RMSNorm (no mean, y =
// xhat * gamma; beta is not read). RES: the row is the residual sum of `r`
// (above), not x alone.
template <int WPR, bool CENTER, bool RES = false>
__device__ __forceinline__ void norm_fwd_reg(float* y, float* xhat, float* rstd, const float* x, const float* gamma,
                                             const float* beta, int beta_off, int rows, int cols, float eps,
                                             NormRes r = NormRes{nullptr, 0.0f, 1.0f, 0u, 0u}) {
    __shared__ float scratch[4];
    const NormLane<WPR> ln(rows);
    const i64 o = (i64)ln.row * cols;
    float v[NORM_NV], s = 0.0f;
#pragma unroll
    for (int k = 0; k < NORM_NV; k++) {
        const int c = ln.col(k);
        const bool in = ln.live && c < cols;
        v[k] = in ? x[o + c] : 0.0f;
        if (RES && in) {
            const bool keep = dropout_keep(r.seed_lo, r.seed_hi, (u32)(o + c), r.p);
            v[k] = (keep ? v[k] * r.scale : 0.0f) + r.res[o + c];
        }
        s += CENTER ? v[k] : v[k] * v[k];
    }
    float mean = 0.0f, q = s;
    if (CENTER) {
        mean = norm_row_sum<WPR>(s, scratch) / (float)cols;
        q = 0.0f;
#pragma unroll
        for (int k = 0; k < NORM_NV; k++) {
            const float d = ln.col(k) < cols ? v[k] - mean : 0.0f;
            q += d * d;
        }
    }
    const float rs = 1.0f / sqrtf(norm_row_sum<WPR>(q, scratch) / (float)cols + eps);
    if (!ln.live) return;  // after the last barrier
    if (ln.base == 0) rstd[ln.row] = rs;
#pragma unroll
    for (int k = 0; k < NORM_NV; k++) {
        const int c = ln.col(k);
        if (c < cols) {
            const float h = (CENTER ? v[k] - mean : v[k]) * rs;
            xhat[o + c] = h;
            y[o + c] = CENTER ? h * gamma[c] + beta[beta_off + c] : h * gamma[c];
        }
    }
}

// Backward of a row held in registers: dx = rstd * (g - mean(g) - xhat *
// mean(g * xhat)) with g = dy * gamma; RMSNorm (!CENTER) has no mean(g).
template <int WPR, bool CENTER>
__device__ __forceinline__ void norm_bwd_reg(float* dx, const float* dy, const float* xhat, const float* rstd,
                                             const float* gamma, int rows, int cols) {
    __shared__ float scratch[4];
    const NormLane<WPR> ln(rows);
    const i64 o = (i64)ln.row * cols;
    float g[NORM_NV], h[NORM_NV], sg = 0.0f, sgx = 0.0f;
#pragma unroll
    for (int k = 0; k < NORM_NV; k++) {
        const int c = ln.col(k);
        const bool in = ln.live && c < cols;
        g[k] = in ? dy[o + c] * gamma[c] : 0.0f;
        h[k] = in ? xhat[o + c] : 0.0f;
        sg += g[k];
        sgx += g[k] * h[k];
    }
    const float mean_g = CENTER ? norm_row_sum<WPR>(sg, scratch) / (float)cols : 0.0f;
    const float mean_gx = norm_row_sum<WPR>(sgx, scratch) / (float)cols;
    if (!ln.live) return;
    const float rs = rstd[ln.row];
#pragma unroll
    for (int k = 0; k < NORM_NV; k++) {
        const int c = ln.col(k);
        if (c < cols) dx[o + c] = rs * (CENTER ? g[k] - mean_g - h[k] * mean_gx : g[k] - h[k] * mean_gx);
    }
}

// The kernels: _w1024 one warp a row, _w4096 one block a row.
extern "C" __global__ void __launch_bounds__(128)
    layernorm_fwd_f32_w1024(float* y, float* xhat, float* rstd, const float* x, const float* gamma,
                             const float* beta, int beta_off, int rows, int cols, float eps) {
    norm_fwd_reg<1, true>(y, xhat, rstd, x, gamma, beta, beta_off, rows, cols, eps);
}
extern "C" __global__ void __launch_bounds__(128)
    layernorm_bwd_f32_w1024(float* dx, const float* dy, const float* xhat, const float* rstd, const float* gamma,
                             int rows, int cols) {
    norm_bwd_reg<1, true>(dx, dy, xhat, rstd, gamma, rows, cols);
}
extern "C" __global__ void __launch_bounds__(128)
    rmsnorm_fwd_f32_w1024(float* y, float* xhat, float* rstd, const float* x, const float* gamma, int rows,
                           int cols, float eps) {
    norm_fwd_reg<1, false>(y, xhat, rstd, x, gamma, nullptr, 0, rows, cols, eps);
}
extern "C" __global__ void __launch_bounds__(128)
    rmsnorm_bwd_f32_w1024(float* dx, const float* dy, const float* xhat, const float* rstd, const float* gamma,
                           int rows, int cols) {
    norm_bwd_reg<1, false>(dx, dy, xhat, rstd, gamma, rows, cols);
}
extern "C" __global__ void __launch_bounds__(128)
    layernorm_fwd_f32_w4096(float* y, float* xhat, float* rstd, const float* x, const float* gamma,
                             const float* beta, int beta_off, int rows, int cols, float eps) {
    norm_fwd_reg<4, true>(y, xhat, rstd, x, gamma, beta, beta_off, rows, cols, eps);
}
// y = LN(drop(s) + res): a post-LN block's residual sum and its LayerNorm,
// one read of each input (the sum is not written); xhat and rstd as above.
extern "C" __global__ void __launch_bounds__(128)
    layernorm_res_fwd_f32_w1024(float* y, float* xhat, float* rstd, const float* s, const float* res,
                                 const float* gamma, const float* beta, int beta_off, int rows, int cols, float eps,
                                 float p, float scale, u32 seed_lo, u32 seed_hi) {
    norm_fwd_reg<1, true, true>(y, xhat, rstd, s, gamma, beta, beta_off, rows, cols, eps,
                                NormRes{res, p, scale, seed_lo, seed_hi});
}
extern "C" __global__ void __launch_bounds__(128)
    layernorm_res_fwd_f32_w4096(float* y, float* xhat, float* rstd, const float* s, const float* res,
                                 const float* gamma, const float* beta, int beta_off, int rows, int cols, float eps,
                                 float p, float scale, u32 seed_lo, u32 seed_hi) {
    norm_fwd_reg<4, true, true>(y, xhat, rstd, s, gamma, beta, beta_off, rows, cols, eps,
                                NormRes{res, p, scale, seed_lo, seed_hi});
}
extern "C" __global__ void __launch_bounds__(128)
    layernorm_bwd_f32_w4096(float* dx, const float* dy, const float* xhat, const float* rstd, const float* gamma,
                             int rows, int cols) {
    norm_bwd_reg<4, true>(dx, dy, xhat, rstd, gamma, rows, cols);
}
extern "C" __global__ void __launch_bounds__(128)
    rmsnorm_fwd_f32_w4096(float* y, float* xhat, float* rstd, const float* x, const float* gamma, int rows,
                           int cols, float eps) {
    norm_fwd_reg<4, false>(y, xhat, rstd, x, gamma, nullptr, 0, rows, cols, eps);
}
extern "C" __global__ void __launch_bounds__(128)
    rmsnorm_bwd_f32_w4096(float* dx, const float* dy, const float* xhat, const float* rstd, const float* gamma,
                           int rows, int cols) {
    norm_bwd_reg<4, false>(dx, dy, xhat, rstd, gamma, rows, cols);
}
