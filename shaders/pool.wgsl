// pool_fwd / pool_bwd: CLS (first token) or masked mean. One thread per
// (example, feature), walking the tokens in order (the CPU's sums).
// params: b, t, d, kind (0 cls, 1 mean)

@group(0) @binding(1) var<storage, read_write> out: array<f32>;  // fwd: out; bwd: dh
@group(0) @binding(2) var<storage, read> src: array<f32>;        // fwd: h; bwd: dout
@group(0) @binding(3) var<storage, read> mask: array<f32>;

@compute @workgroup_size(64)
fn pool_fwd(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let nb = pu(0u);
    let t = pu(1u);
    let d = pu(2u);
    let mean = pu(3u) != 0u;
    for (var e = gid.x; e < nb * d; e += nwg.x * 64u) {
        let bi = e / d;
        let c = e % d;
        if (!mean) {
            out[e] = src[bi * t * d + c];
        } else {
            var acc = 0.0;
            var cnt = 0.0;
            for (var ti = 0u; ti < t; ti++) {
                let m = mask[bi * t + ti];
                cnt += m;
                acc += src[(bi * t + ti) * d + c] * m;
            }
            out[e] = acc / max(cnt, 1e-9);
        }
    }
}

@compute @workgroup_size(64)
fn pool_bwd(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let nb = pu(0u);
    let t = pu(1u);
    let d = pu(2u);
    let mean = pu(3u) != 0u;
    for (var e = gid.x; e < nb * d; e += nwg.x * 64u) {
        let bi = e / d;
        let c = e % d;
        let g = src[e];
        if (!mean) {
            out[bi * t * d + c] = g;
            for (var ti = 1u; ti < t; ti++) {
                out[(bi * t + ti) * d + c] = 0.0;
            }
        } else {
            var cnt = 0.0;
            for (var ti = 0u; ti < t; ti++) {
                cnt += mask[bi * t + ti];
            }
            cnt = max(cnt, 1e-9);
            for (var ti = 0u; ti < t; ti++) {
                out[(bi * t + ti) * d + c] = g * (mask[bi * t + ti] / cnt);
            }
        }
    }
}
