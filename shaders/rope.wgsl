// rope: rotary position embedding in place on x = [rows, heads, head_dim],
// rotate_half convention. The (cos, sin) of every position and frequency
// come from a table computed on the host in f64 (f32 angles of large
// positions would lose the phase).
// params: rows, heads, head_dim, sign (+1 forward, −1 inverse)

@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> positions: array<u32>;
@group(0) @binding(3) var<storage, read> table: array<f32>; // [pos][half][cos, sin]

@compute @workgroup_size(256)
fn rope(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let rows = pu(0u);
    let heads = pu(1u);
    let hd = pu(2u);
    let sgn = pf(3u);
    let nhalf = hd / 2u;
    let n = rows * heads * nhalf;
    for (var e = gid.x; e < n; e += nwg.x * 256u) {
        let i = e % nhalf;
        let rh = e / nhalf; // r·heads + h
        let r = rh / heads;
        let t = (positions[r] * nhalf + i) * 2u;
        let cs = table[t];
        let sn = sgn * table[t + 1u];
        let base = rh * hd;
        let x1 = x[base + i];
        let x2 = x[base + i + nhalf];
        x[base + i] = x1 * cs - x2 * sn;
        x[base + i + nhalf] = x2 * cs + x1 * sn;
    }
}
