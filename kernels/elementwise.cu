// Element-wise ops: add, scale, fill, copy, scale_rows, sum_sq.
// One thread per element on a grid-stride loop; all f32 unless named.
#include "common.cuh"

// y[i] += x[i]
extern "C" __global__ void add_f32(float* y, const float* x, int n) {
    GRID_LOOP(i, n) y[i] += x[i];
}

// y[i] *= s
extern "C" __global__ void scale_f32(float* y, float s, int n) {
    GRID_LOOP(i, n) y[i] *= s;
}

// y[i] = value
extern "C" __global__ void fill_f32(float* y, float value, int n) {
    GRID_LOOP(i, n) y[i] = value;
}

// dst[dst_off + i] = src[src_off + i]
extern "C" __global__ void copy_f32(float* dst, int dst_off, const float* src, int src_off, int n) {
    GRID_LOOP(i, n) dst[dst_off + i] = src[src_off + i];
}

// The same from a bf16 buffer (a frozen weight), converting.
extern "C" __global__ void copy_bf16(float* dst, int dst_off, const bf16_t* src, int src_off, int n) {
    GRID_LOOP(i, n) dst[dst_off + i] = bf16_to_f32(src[src_off + i]);
}

// y[r, :] *= w[r] for a rows x cols matrix.
extern "C" __global__ void scale_rows_f32(float* y, const float* w, int rows, int cols) {
    GRID_LOOP(i, (i64)rows * cols) y[i] *= w[i / cols];
}

// Partial sums of squares in f64: block b writes partial[b]; the host adds
// the partials in order (deterministic, no atomics). 256 threads a block.
extern "C" __global__ void sum_sq_f32(double* partial, const float* y, int n) {
    __shared__ double scratch[32];
    double acc = 0.0;
    GRID_LOOP(i, n) {
        double v = (double)y[i];
        acc += v * v;
    }
    acc = block_sum_d(acc, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}
