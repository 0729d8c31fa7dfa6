// LayerNorm and RMSNorm over rows, forward and backward. One warp per row
// (4 rows per 128-thread block); each lane strides over the columns.
// Statistics use two passes over the row (mean, then squared deviations) in
// f32; the row is re-read from L1/L2, not kept in registers, so any width
// works without spilling.
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
