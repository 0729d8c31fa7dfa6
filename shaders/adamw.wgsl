// adamw: one AdamW step (PyTorch's: decoupled decay, bias-corrected moments).
// The step-dependent scalars are computed on the host in f64.
// params: n, beta1, 1−beta1, beta2, 1−beta2, lr/bc1, 1/sqrt(bc2), eps,
//         1 − lr·weight_decay

@group(0) @binding(1) var<storage, read_write> params: array<f32>;
@group(0) @binding(2) var<storage, read_write> m: array<f32>;
@group(0) @binding(3) var<storage, read_write> v: array<f32>;
@group(0) @binding(4) var<storage, read> grads: array<f32>;

@compute @workgroup_size(256)
fn adamw(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let n = pu(0u);
    let b1 = pf(1u);
    let ob1 = pf(2u);
    let b2 = pf(3u);
    let ob2 = pf(4u);
    let lr_bc1 = pf(5u);
    let inv_sqrt_bc2 = pf(6u);
    let eps = pf(7u);
    let decay = pf(8u);
    for (var i = gid.x; i < n; i += nwg.x * 256u) {
        let g = grads[i];
        let mi = b1 * m[i] + ob1 * g;
        let vi = b2 * v[i] + ob2 * g * g;
        m[i] = mi;
        v[i] = vi;
        params[i] = params[i] * decay - lr_bc1 * mi / (sqrt(vi) * inv_sqrt_bc2 + eps);
    }
}
