// act_fwd / act_bwd (GELU erf and tanh forms, ReLU, tanh, SiLU), dropout,
// swiglu_fwd / swiglu_bwd. Activation codes: 0 gelu, 1 gelu_tanh, 2 relu,
// 3 tanh, 4 silu (`act_code` in src/backend/wgpu/mod.rs).

@group(0) @binding(1) var<storage, read_write> out1: array<f32>;  // y, dx, h, dgate
@group(0) @binding(2) var<storage, read> in_a: array<f32>;        // x, gate
@group(0) @binding(3) var<storage, read> in_b: array<f32>;        // dy, up
@group(0) @binding(4) var<storage, read_write> out2: array<f32>;  // dup
@group(0) @binding(5) var<storage, read> in_c: array<f32>;        // dh

const WG: u32 = 256u;
const SQRT_HALF: f32 = 0.70710678118654752;
const INV_SQRT_2PI: f32 = 0.39894228040143268;
const GELU_C: f32 = 0.7978845608028654; // sqrt(2/pi)

// erf(x), Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7; WGSL has no erf).
fn erf_approx(x: f32) -> f32 {
    let ax = abs(x);
    let t = 1.0 / (1.0 + 0.3275911 * ax);
    let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    let r = 1.0 - poly * exp(-ax * ax);
    return select(r, -r, x < 0.0);
}

fn act_value(act: u32, x: f32) -> f32 {
    switch act {
        case 0u: {
            return 0.5 * x * (1.0 + erf_approx(x * SQRT_HALF));
        }
        case 1u: {
            let inner = GELU_C * (x + 0.044715 * x * x * x);
            return 0.5 * x * tanh_parts(inner).y;
        }
        case 2u: {
            return select(0.0, x, x > 0.0);
        }
        case 3u: {
            return tanh_safe(x);
        }
        default: {
            return silu(x);
        }
    }
}

fn act_grad(act: u32, x: f32) -> f32 {
    switch act {
        case 0u: {
            let cdf = 0.5 * (1.0 + erf_approx(x * SQRT_HALF));
            let pdf = exp(-(x * x) * 0.5) * INV_SQRT_2PI;
            return cdf + x * pdf;
        }
        case 1u: {
            let inner = GELU_C * (x + 0.044715 * x * x * x);
            let tp = tanh_parts(inner);
            let dinner = GELU_C * (1.0 + 3.0 * 0.044715 * x * x);
            return 0.5 * tp.y + 0.5 * x * (tp.y * tp.z) * dinner;
        }
        case 2u: {
            return select(0.0, 1.0, x > 0.0);
        }
        case 3u: {
            let tp = tanh_parts(x);
            return tp.y * tp.z;
        }
        default: {
            return silu_grad(x);
        }
    }
}

// act_fwd: y = act(x).  params: n, act
@compute @workgroup_size(256)
fn act_fwd(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let n = pu(0u);
    let act = pu(1u);
    for (var i = gid.x; i < n; i += nwg.x * WG) {
        out1[i] = act_value(act, in_a[i]);
    }
}

// act_bwd: dx = dy·act'(x).  params: n, act
@compute @workgroup_size(256)
fn act_bwd(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let n = pu(0u);
    let act = pu(1u);
    for (var i = gid.x; i < n; i += nwg.x * WG) {
        out1[i] = in_b[i] * act_grad(act, in_a[i]);
    }
}

// dropout (in place): y[i] = keep(i) ? y[i]·s : 0.
// params: n, p, seed_lo, seed_hi, s (= 1/(1-p) rounded to f32 on the host)
@compute @workgroup_size(256)
fn dropout(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let n = pu(0u);
    let p = pf(1u);
    let lo = pu(2u);
    let hi = pu(3u);
    let s = pf(4u);
    for (var i = gid.x; i < n; i += nwg.x * WG) {
        if (dropout_keep(lo, hi, i, p)) {
            out1[i] = out1[i] * s;
        } else {
            out1[i] = 0.0;
        }
    }
}

// swiglu_fwd: h = silu(gate)·up.  params: n
@compute @workgroup_size(256)
fn swiglu_fwd(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let n = pu(0u);
    for (var i = gid.x; i < n; i += nwg.x * WG) {
        out1[i] = silu(in_a[i]) * in_b[i];
    }
}

// swiglu_bwd: dgate = dh·up·silu'(gate), dup = dh·silu(gate).  params: n
@compute @workgroup_size(256)
fn swiglu_bwd(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let n = pu(0u);
    for (var i = gid.x; i < n; i += nwg.x * WG) {
        let g = in_a[i];
        let dh = in_c[i];
        out1[i] = dh * in_b[i] * silu_grad(g);
        out2[i] = dh * silu(g);
    }
}
