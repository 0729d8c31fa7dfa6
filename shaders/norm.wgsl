// layernorm_fwd/bwd and rmsnorm_fwd/bwd: one workgroup of 256 threads per
// row, sums by a fixed-order tree in workgroup memory.

@group(0) @binding(1) var<storage, read_write> y: array<f32>;      // fwd: y; bwd: dx
@group(0) @binding(2) var<storage, read_write> xhat: array<f32>;   // fwd only
@group(0) @binding(3) var<storage, read_write> rstd: array<f32>;   // fwd only
@group(0) @binding(4) var<storage, read> x: array<f32>;            // fwd: x; bwd: dy
@group(0) @binding(5) var<storage, read> gamma: array<f32>;
@group(0) @binding(6) var<storage, read> beta: array<f32>;         // layernorm_fwd only
@group(0) @binding(7) var<storage, read> xhat_in: array<f32>;      // bwd only
@group(0) @binding(8) var<storage, read> rstd_in: array<f32>;      // bwd only

var<workgroup> red: array<f32, 256>;

fn wg_sum(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var k = 128u; k > 0u; k >>= 1u) {
        if (lid < k) {
            red[lid] += red[lid + k];
        }
        workgroupBarrier();
    }
    let s = red[0];
    workgroupBarrier();
    return s;
}

// layernorm_fwd.  params: rows, cols, eps, beta_off
@compute @workgroup_size(256)
fn layernorm_fwd(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let rows = pu(0u);
    let cols = pu(1u);
    let eps = pf(2u);
    let boff = pu(3u);
    let row = group_id(wid, nwg);
    if (row >= rows) {
        return;
    }
    let o = row * cols;
    var s = 0.0;
    for (var c = lid; c < cols; c += 256u) {
        s += x[o + c];
    }
    let mean = wg_sum(lid, s) / f32(cols);
    var v = 0.0;
    for (var c = lid; c < cols; c += 256u) {
        let d = x[o + c] - mean;
        v += d * d;
    }
    let var_ = wg_sum(lid, v) / f32(cols);
    let rs = 1.0 / sqrt(var_ + eps);
    if (lid == 0u) {
        rstd[row] = rs;
    }
    for (var c = lid; c < cols; c += 256u) {
        let h = (x[o + c] - mean) * rs;
        xhat[o + c] = h;
        y[o + c] = h * gamma[c] + beta[boff + c];
    }
}

// layernorm_bwd: dx = rstd·(g − mean(g) − x̂·mean(g·x̂)), g = dy·γ.
// params: rows, cols
@compute @workgroup_size(256)
fn layernorm_bwd(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let rows = pu(0u);
    let cols = pu(1u);
    let row = group_id(wid, nwg);
    if (row >= rows) {
        return;
    }
    let o = row * cols;
    var sg = 0.0;
    var sgx = 0.0;
    for (var c = lid; c < cols; c += 256u) {
        let g = x[o + c] * gamma[c];
        sg += g;
        sgx += g * xhat_in[o + c];
    }
    let mean_g = wg_sum(lid, sg) / f32(cols);
    let mean_gx = wg_sum(lid, sgx) / f32(cols);
    let s = rstd_in[row];
    for (var c = lid; c < cols; c += 256u) {
        let g = x[o + c] * gamma[c];
        y[o + c] = s * (g - mean_g - xhat_in[o + c] * mean_gx);
    }
}

// rmsnorm_fwd: y = x̂·γ, x̂ = x / sqrt(mean(x²) + eps).  params: rows, cols, eps
@compute @workgroup_size(256)
fn rmsnorm_fwd(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let rows = pu(0u);
    let cols = pu(1u);
    let eps = pf(2u);
    let row = group_id(wid, nwg);
    if (row >= rows) {
        return;
    }
    let o = row * cols;
    var s = 0.0;
    for (var c = lid; c < cols; c += 256u) {
        s += x[o + c] * x[o + c];
    }
    let ms = wg_sum(lid, s) / f32(cols);
    let rs = 1.0 / sqrt(ms + eps);
    if (lid == 0u) {
        rstd[row] = rs;
    }
    for (var c = lid; c < cols; c += 256u) {
        let h = x[o + c] * rs;
        xhat[o + c] = h;
        y[o + c] = h * gamma[c];
    }
}

// rmsnorm_bwd: dx = rstd·(g − x̂·mean(g·x̂)), g = dy·γ.  params: rows, cols
@compute @workgroup_size(256)
fn rmsnorm_bwd(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let rows = pu(0u);
    let cols = pu(1u);
    let row = group_id(wid, nwg);
    if (row >= rows) {
        return;
    }
    let o = row * cols;
    var sgx = 0.0;
    for (var c = lid; c < cols; c += 256u) {
        sgx += x[o + c] * gamma[c] * xhat_in[o + c];
    }
    let mean_gx = wg_sum(lid, sgx) / f32(cols);
    let s = rstd_in[row];
    for (var c = lid; c < cols; c += 256u) {
        let g = x[o + c] * gamma[c];
        y[o + c] = s * (g - xhat_in[o + c] * mean_gx);
    }
}
