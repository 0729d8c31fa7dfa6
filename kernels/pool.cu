// Sequence pooling: CLS (first token) or masked mean, and their backward.
// kind: 0 = CLS, 1 = mean (the order of `PoolKind`).
#include "common.cuh"

// out[b, d] from h[b, t, d]; one thread per (b, d).
extern "C" __global__ void pool_fwd_f32(int kind, float* out, const float* h, const float* mask, int nb, int t, int d) {
    GRID_LOOP(i, (i64)nb * d) {
        i64 b = i / d, c = i % d;
        if (kind == 0) {
            out[i] = h[b * t * d + c];
        } else {
            float acc = 0.0f, cnt = 0.0f;
            for (int ti = 0; ti < t; ti++) {
                float m = mask[b * t + ti];
                cnt += m;
                acc += h[(b * t + ti) * d + c] * m;
            }
            out[i] = acc / fmaxf(cnt, 1e-9f);
        }
    }
}

// dh (overwritten) from dout; one thread per (b, t, d).
extern "C" __global__ void pool_bwd_f32(int kind, float* dh, const float* dout, const float* mask, int nb, int t,
                                        int d) {
    GRID_LOOP(i, (i64)nb * t * d) {
        i64 c = i % d, bt = i / d, b = bt / t, ti = bt % t;
        if (kind == 0) {
            dh[i] = ti == 0 ? dout[b * d + c] : 0.0f;
        } else {
            float cnt = 0.0f;
            for (int k = 0; k < t; k++) cnt += mask[b * t + k];
            dh[i] = dout[b * d + c] * (mask[b * t + ti] / fmaxf(cnt, 1e-9f));
        }
    }
}
