// Activations (act_fwd / act_bwd), SwiGLU and inverted dropout.
//
// Formulas mirror src/backend/cpu/mod.rs (`act_value`, `act_grad`) in f32;
// `act` codes: 0 GELU (erf), 1 GELU (tanh approximation), 2 ReLU, 3 tanh,
// 4 SiLU (the order of `Act` in src/backend/mod.rs).
#include "common.cuh"

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
