// Rotary position embedding, in place on x = [rows, heads, head_dim]: the
// pair (i, i + head_dim/2) of every head rotated by pos * theta^(-2i/head_dim)
// (Hugging Face's rotate_half convention); `inverse` negates the angle (the
// backward pass). Angles in f64 as on the CPU: positions reach thousands of
// radians, where an f32 angle would already be off in the fourth digit.
#include "common.cuh"

extern "C" __global__ void rope_f32(float* x, const u32* positions, int rows, int heads, int head_dim, double theta,
                                    int inverse) {
    int half = head_dim / 2;
    GRID_LOOP(t, (i64)rows * heads * half) {
        int i = (int)(t % half);
        i64 rh = t / half;  // row * heads + head
        i64 r = rh / heads;
        double inv_freq = pow(theta, -2.0 * (double)i / (double)head_dim);
        double ang = (double)positions[r] * inv_freq;
        double sn = sin(ang), cs = cos(ang);
        if (inverse) sn = -sn;
        i64 base = rh * head_dim;
        double x1 = (double)x[base + i], x2 = (double)x[base + i + half];
        x[base + i] = (float)(x1 * cs - x2 * sn);
        x[base + i + half] = (float)(x2 * cs + x1 * sn);
    }
}
