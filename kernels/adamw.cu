// One AdamW step (PyTorch's: decoupled weight decay, bias-corrected
// moments), in f64 like the CPU reference; the bias corrections are computed
// on the host.
#include "common.cuh"

extern "C" __global__ void adamw_f32(float* params, const float* grads, float* m, float* v, int n, double lr,
                                     double beta1, double beta2, double eps, double weight_decay, double bc1,
                                     double bc2) {
    GRID_LOOP(i, n) {
        double g = (double)grads[i];
        double mi = beta1 * (double)m[i] + (1.0 - beta1) * g;
        double vi = beta2 * (double)v[i] + (1.0 - beta2) * g * g;
        m[i] = (float)mi;
        v[i] = (float)vi;
        double p = (double)params[i] * (1.0 - lr * weight_decay);
        p -= (lr / bc1) * mi / (sqrt(vi) / sqrt(bc2) + eps);
        params[i] = (float)p;
    }
}
