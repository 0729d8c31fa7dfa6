// Row gathers and their backward: embedding_fwd and scatter_add_rows.
#include "common.cuh"

// out[r, :] (+)= table[ids[r], :] for rows x dim; the table is f32 or bf16
// (a frozen embedding matrix is held in bf16).
template <typename T>
__device__ void embedding_fwd(float* out, const T* table, const u32* ids, int rows, int dim, int accumulate) {
    GRID_LOOP(i, (i64)rows * dim) {
        i64 r = i / dim, c = i % dim;
        float v = load_f32(table, (i64)ids[r] * dim + c);
        out[i] = accumulate ? out[i] + v : v;
    }
}

extern "C" __global__ void embedding_fwd_f32(float* out, const float* table, const u32* ids, int rows, int dim,
                                             int accumulate) {
    embedding_fwd(out, table, ids, rows, dim, accumulate);
}

extern "C" __global__ void embedding_fwd_bf16(float* out, const bf16_t* table, const u32* ids, int rows, int dim,
                                              int accumulate) {
    embedding_fwd(out, table, ids, rows, dim, accumulate);
}

// dx[idx[r], :] += dy[r, :] with repeated indices. One thread per column
// walks the rows in order: no atomics, the CPU's summation order exactly,
// so the result is deterministic.
extern "C" __global__ void scatter_add_rows_f32(float* dx, const float* dy, const u32* idx, int rows, int cols) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    for (int r = 0; r < rows; r++) dx[(i64)idx[r] * cols + c] += dy[(i64)r * cols + c];
}

// The same when no index repeats (the host saw them strictly increasing:
// the decoder's loss rows): every element of dx has at most one writer, so
// all rows go in parallel.
extern "C" __global__ void scatter_add_rows_distinct_f32(float* dx, const float* dy, const u32* idx, int rows,
                                                         int cols) {
    GRID_LOOP(i, (i64)rows * cols) {
        i64 r = i / cols, c = i % cols;
        dx[(i64)idx[r] * cols + c] += dy[i];
    }
}
