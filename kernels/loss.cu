// Losses: softmax cross-entropy (chunked over the classes: one block per row
// streams the logits twice — an online max/sum pass, then the gradient pass
// — and never stores the softmax), squared error, and the candidate-scoring
// loss of decoder classification (three small deterministic kernels).
#include "common.cuh"

// Combine two online-softmax partials (max m, sum s of exp(x - m)).
__device__ __forceinline__ void lse_combine(float& m, float& s, float m2, float s2) {
    if (m2 == BEFT_NEG_INF) return;
    if (m == BEFT_NEG_INF) {
        m = m2;
        s = s2;
        return;
    }
    float mx = fmaxf(m, m2);
    s = s * expf(m - mx) + s2 * expf(m2 - mx);
    m = mx;
}

// losses[r] = lse(x_r) - x_r[y_r]; dlogits = (softmax(x_r) - onehot(y_r)) * grad_scale.
// One block (256 threads) per row.
extern "C" __global__ void cross_entropy_f32(float* losses, float* dlogits, const float* logits, const u32* labels,
                                             int rows, int classes, float grad_scale) {
    __shared__ float sm[32], ss[32];
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* x = logits + (i64)r * classes;
    float m = BEFT_NEG_INF, s = 0.0f;
    for (int c = threadIdx.x; c < classes; c += blockDim.x) lse_combine(m, s, x[c], 1.0f);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(FULL_MASK, m, o), s2 = __shfl_xor_sync(FULL_MASK, s, o);
        lse_combine(m, s, m2, s2);
    }
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) {
        sm[w] = m;
        ss[w] = s;
    }
    __syncthreads();
    m = BEFT_NEG_INF;
    s = 0.0f;
    for (int k = 0; k < nw; k++) lse_combine(m, s, sm[k], ss[k]);  // same order in every thread
    float lse = m + logf(s);
    int y = (int)labels[r];
    if (threadIdx.x == 0) losses[r] = lse - x[y];
    float* d = dlogits + (i64)r * classes;
    for (int c = threadIdx.x; c < classes; c += blockDim.x)
        d[c] = (expf(x[c] - lse) - (c == y ? 1.0f : 0.0f)) * grad_scale;
}

// losses[r] = (x[r] - t[r])^2; dx = 2 (x - t) * grad_scale.
extern "C" __global__ void mse_f32(float* losses, float* dx, const float* x, const float* target, int rows,
                                   float two_grad_scale) {
    GRID_LOOP(r, rows) {
        float e = x[r] - target[r];
        losses[r] = e * e;
        dx[r] = two_grad_scale * e;
    }
}

// Candidate scores s_c = -mean of its rows' token losses (f64 scratch `s`,
// row counts in `len`); also written to `scores` as f32. One thread per
// candidate, rows scanned in order.
extern "C" __global__ void candidate_scores_f32(float* scores, double* s, int* len, const float* tok_loss,
                                                const u32* tok_cand, int rows, int cands) {
    GRID_LOOP(c, cands) {
        double sum = 0.0;
        int n = 0;
        for (int r = 0; r < rows; r++)
            if ((i64)tok_cand[r] == c) {
                sum += (double)tok_loss[r];
                n++;
            }
        double sc = -sum / (double)(n > 0 ? n : 1);
        s[c] = sc;
        len[c] = n;
        scores[c] = (float)sc;
    }
}

// Per example: ex_loss = logsumexp(s over its candidates) - s[gold], and
// dsc[c] = softmax_c - [c = gold] for its candidates. One thread per example.
extern "C" __global__ void candidate_examples_f32(float* ex_loss, double* dsc, const double* s, const u32* cand_ex,
                                                  const u32* gold, int cands, int examples) {
    GRID_LOOP(e, examples) {
        double mx = -1.0 / 0.0;
        for (int c = 0; c < cands; c++)
            if ((i64)cand_ex[c] == e) mx = fmax(mx, s[c]);
        double z = 0.0;
        for (int c = 0; c < cands; c++)
            if ((i64)cand_ex[c] == e) z += exp(s[c] - mx);
        int g = (int)gold[e];
        ex_loss[e] = (float)(mx + log(z) - s[g]);
        for (int c = 0; c < cands; c++)
            if ((i64)cand_ex[c] == e) dsc[c] = exp(s[c] - mx) / z - (c == g ? 1.0 : 0.0);
    }
}

// row_w[r] = -grad_scale * dsc[c] / len[c] for the row's candidate c.
extern "C" __global__ void candidate_rows_f32(float* row_w, const double* dsc, const int* len, const u32* tok_cand,
                                              int rows, double grad_scale) {
    GRID_LOOP(r, rows) {
        int c = (int)tok_cand[r];
        int n = len[c] > 0 ? len[c] : 1;
        row_w[r] = (float)(-grad_scale * dsc[c] / (double)n);
    }
}
