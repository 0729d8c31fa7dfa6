// Activations (act_fwd / act_bwd), SwiGLU and inverted dropout.
//
// The activation formulas (`act_value`, `act_grad`, shared with the GEMM
// epilogues) are in common.cuh.
#include "common.cuh"

// y = act(x)
extern "C" __global__ void act_fwd_f32(int act, float* y, const float* x, int n) {
    GRID_LOOP(i, n) y[i] = act_value(act, x[i]);
}

// dx = dy * act'(x)
extern "C" __global__ void act_bwd_f32(int act, float* dx, const float* x, const float* dy, int n) {
    GRID_LOOP(i, n) dx[i] = dy[i] * act_grad(act, x[i]);
}

// h = silu(gate) * up
extern "C" __global__ void swiglu_fwd_f32(float* h, const float* gate, const float* up, int n) {
    GRID_LOOP(i, n) h[i] = act_value(ACT_SILU, gate[i]) * up[i];
}

// dgate = dh * up * silu'(gate), dup = dh * silu(gate)
extern "C" __global__ void swiglu_bwd_f32(float* dgate, float* dup, const float* dh, const float* gate,
                                          const float* up, int n) {
    GRID_LOOP(i, n) {
        float g = gate[i], d = dh[i];
        dgate[i] = d * up[i] * act_grad(ACT_SILU, g);
        dup[i] = d * act_value(ACT_SILU, g);
    }
}

// In-place inverted dropout: y[i] = keep(i) ? y[i] * scale : 0, with the
// mask of `dropout_keep` (element index i, as u32).
extern "C" __global__ void dropout_f32(float* y, int n, float p, float scale, u32 seed_lo, u32 seed_hi) {
    GRID_LOOP(i, n) y[i] = dropout_keep(seed_lo, seed_hi, (u32)i, p) ? y[i] * scale : 0.0f;
}

// The same dropout fused with its neighbour pass (one read and write of y
// instead of two): y = dropout(y) + x (a residual connection after a
// dropped-out sublayer), and y = dropout(x) (out of place: a copy and the
// mask in one).
extern "C" __global__ void dropout_add_f32(float* y, const float* x, int n, float p, float scale, u32 seed_lo,
                                           u32 seed_hi) {
    GRID_LOOP(i, n) y[i] = (dropout_keep(seed_lo, seed_hi, (u32)i, p) ? y[i] * scale : 0.0f) + x[i];
}

extern "C" __global__ void dropout_from_f32(float* y, const float* x, int n, float p, float scale, u32 seed_lo,
                                            u32 seed_hi) {
    GRID_LOOP(i, n) y[i] = dropout_keep(seed_lo, seed_hi, (u32)i, p) ? x[i] * scale : 0.0f;
}
