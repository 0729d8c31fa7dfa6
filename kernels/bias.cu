// Bias ops: bias_add (y += b per row) and bias_grad (db += column sums of dy).
// A bias is read at an offset so that it may be a slot of the trainable slab.
#include "common.cuh"

// y[r, c] += bias[bias_off + c]
extern "C" __global__ void bias_add_f32(float* y, const float* bias, int bias_off, int rows, int cols) {
    GRID_LOOP(i, (i64)rows * cols) y[i] += bias[bias_off + (int)(i % cols)];
}

// db[db_off + c] += sum_r dy[r, c], accumulated in f64 in a fixed order
// (deterministic). Block (32, 8): 32 columns, 8 row-strided partial sums
// each, reduced through shared memory. Grid: ceil(cols / 32).
extern "C" __global__ void bias_grad_f32(float* db, int db_off, const float* dy, int rows, int cols) {
    __shared__ double part[8][33];
    int c = blockIdx.x * 32 + threadIdx.x;
    double acc = 0.0;
    if (c < cols)
        for (int r = threadIdx.y; r < rows; r += 8) acc += (double)dy[(i64)r * cols + c];
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        double s = 0.0;
#pragma unroll
        for (int k = 0; k < 8; k++) s += part[k][threadIdx.x];
        db[db_off + c] = (float)((double)db[db_off + c] + s);
    }
}
