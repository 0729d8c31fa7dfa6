// Bias ops: bias_add (y += b per row) and bias_grad (db += column sums of dy).
// A bias is read at an offset so that it may be a slot of the trainable slab.
#include "common.cuh"

// y[r, c] += bias[bias_off + c]
extern "C" __global__ void bias_add_f32(float* y, const float* bias, int bias_off, int rows, int cols) {
    GRID_LOOP(i, (i64)rows * cols) y[i] += bias[bias_off + (int)(i % cols)];
}

// Column sums of dy[r0..r1, :] for the block's 32 columns (block (32, 8)):
// each thread adds every 8th row in order, then the 8 partials are added in
// order through shared memory, in f64 — a fixed order, so deterministic.
// The sum is valid in threadIdx.y == 0.
__device__ double col_sum(const float* dy, int r0, int r1, int cols, int c) {
    __shared__ double part[8][33];
    double acc = 0.0;
    if (c < cols)
        for (int r = r0 + threadIdx.y; r < r1; r += 8) acc += (double)dy[(i64)r * cols + c];
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    double s = 0.0;
    if (threadIdx.y == 0) {
#pragma unroll
        for (int k = 0; k < 8; k++) s += part[k][threadIdx.x];
    }
    return s;
}

// db[db_off + c] += sum_r dy[r, c] in one pass (few rows). Grid: ceil(cols / 32).
extern "C" __global__ void bias_grad_f32(float* db, int db_off, const float* dy, int rows, int cols) {
    int c = blockIdx.x * 32 + threadIdx.x;
    double s = col_sum(dy, 0, rows, cols, c);
    if (threadIdx.y == 0 && c < cols) db[db_off + c] = (float)((double)db[db_off + c] + s);
}

// The same for many rows, in two passes so that the whole GPU takes part:
// chunk blockIdx.y of `chunk` rows writes its column sums to
// part[blockIdx.y, :] (grid (ceil(cols / 32), chunks)), then
// bias_grad_sum_f32 adds the chunks' sums in order.
extern "C" __global__ void bias_grad_part_f32(double* part, const float* dy, int rows, int cols, int chunk) {
    int c = blockIdx.x * 32 + threadIdx.x;
    int r0 = blockIdx.y * chunk;
    int r1 = min(rows, r0 + chunk);
    double s = col_sum(dy, r0, r1, cols, c);
    if (threadIdx.y == 0 && c < cols) part[(i64)blockIdx.y * cols + c] = s;
}

extern "C" __global__ void bias_grad_sum_f32(float* db, int db_off, const double* part, int chunks, int cols) {
    GRID_LOOP(c, cols) {
        double s = 0.0;
        for (int k = 0; k < chunks; k++) s += part[(i64)k * cols + c];
        db[db_off + c] = (float)((double)db[db_off + c] + s);
    }
}
