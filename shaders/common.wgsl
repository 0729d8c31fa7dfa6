// Prepended to every shader module by src/backend/wgpu (WGSL has no
// #include): the parameter block, grid helpers and the functions that more
// than one op family needs.

// Every op's scalar parameters: up to 64 32-bit words at binding 0, read by
// index (`pu`, `pf`); each entry point documents its word order, and the Rust
// side (src/backend/wgpu/mod.rs) writes them in that order.
@group(0) @binding(0) var<uniform> prm: array<vec4<u32>, 16>;

fn pu(i: u32) -> u32 {
    return prm[i / 4u][i % 4u];
}

fn pf(i: u32) -> f32 {
    return bitcast<f32>(prm[i / 4u][i % 4u]);
}

// Linear id of a workgroup in a 2-D grid (grids wider than 65535 groups are
// folded into y by the host).
fn group_id(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.y * nwg.x + wid.x;
}

const NEG_INF_BITS: u32 = 0xff800000u;

// Through a variable: a constant bitcast to infinity is a shader-creation error.
fn neg_inf() -> f32 {
    var bits = NEG_INF_BITS;
    return bitcast<f32>(bits);
}

// The "lowbias32" mixer: identical to `hash32` in src/backend/mod.rs.
fn hash32(x0: u32) -> u32 {
    var x = x0;
    x ^= x >> 16u;
    x *= 0x7feb352du;
    x ^= x >> 15u;
    x *= 0x846ca68bu;
    x ^= x >> 16u;
    return x;
}

// `dropout_keep(seed, idx, p)` of src/backend/mod.rs, bit for bit (24
// uniform bits; the float conversion and the scaling by 2^-24 are exact).
fn dropout_keep(seed_lo: u32, seed_hi: u32, idx: u32, p: f32) -> bool {
    if (p <= 0.0) {
        return true;
    }
    let h = hash32(hash32(idx ^ seed_lo) ^ seed_hi);
    return f32(h >> 8u) * (1.0 / 16777216.0) >= p;
}

// (tanh x, 1 + tanh x, 1 − tanh x) without overflow for large |x| (some
// drivers' built-in tanh returns NaN there) and without the cancellation
// of computing 1 ± tanh x from tanh x (GELU-tanh and tanh' need them).
fn tanh_parts(x: f32) -> vec3<f32> {
    let e = exp(-2.0 * abs(x));
    let t = (1.0 - e) / (1.0 + e);
    let big = 2.0 / (1.0 + e);
    let small = 2.0 * e / (1.0 + e);
    if (x < 0.0) {
        return vec3<f32>(-t, small, big);
    }
    return vec3<f32>(t, big, small);
}

fn tanh_safe(x: f32) -> f32 {
    return tanh_parts(x).x;
}

fn sigmoid(x: f32) -> f32 {
    return 1.0 / (1.0 + exp(-x));
}

fn silu(x: f32) -> f32 {
    return x * sigmoid(x);
}

fn silu_grad(x: f32) -> f32 {
    let s = sigmoid(x);
    return s * (1.0 + x * (1.0 - s));
}
