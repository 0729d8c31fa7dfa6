// bias_add and bias_grad (the column sum that is every bias gradient).

@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read> src: array<f32>;

// bias_add: y[r, c] += bias[off + c], bias bound as `src`.
// params: rows, cols, off
@compute @workgroup_size(256)
fn bias_add(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let rows = pu(0u);
    let cols = pu(1u);
    let off = pu(2u);
    let n = rows * cols;
    for (var i = gid.x; i < n; i += nwg.x * 256u) {
        y[i] = y[i] + src[off + i % cols];
    }
}

var<workgroup> part: array<f32, 256>;

// Column sums of rows r0..r1 of dy (bound as `src`) for column c of a 64 x 4
// workgroup: each of the 4 lanes of a column sums every 4th row, then the
// lanes are added in a fixed order (deterministic). Call from uniform
// control flow (a barrier).
fn col_sum(lid: vec3<u32>, r0: u32, r1: u32, cols: u32, c: u32) -> f32 {
    var s = 0.0;
    if (c < cols) {
        for (var r = r0 + lid.y; r < r1; r += 4u) {
            s += src[r * cols + c];
        }
    }
    part[lid.y * 64u + lid.x] = s;
    workgroupBarrier();
    return (part[lid.x] + part[64u + lid.x]) + (part[128u + lid.x] + part[192u + lid.x]);
}

// bias_grad: db[off + c] += Σ_r dy[r, c], db bound as `y`, dy as `src`.
// A workgroup owns 64 columns.
// params: rows, cols, off
@compute @workgroup_size(64, 4)
fn bias_grad(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let rows = pu(0u);
    let cols = pu(1u);
    let off = pu(2u);
    let c = group_id(wid, nwg) * 64u + lid.x;
    let t = col_sum(lid, 0u, rows, cols, c);
    if (lid.y == 0u && c < cols) {
        y[off + c] = y[off + c] + t;
    }
}

// For many rows, two passes so that the whole GPU takes part (64-column
// workgroups alone are a dozen for a 768-wide bias). bias_grad_part: the
// column sums of chunk k (rows k·chunk ..) of dy into part[k, :], part bound
// as `y`, dy as `src`; workgroup g takes column group g % ncg of chunk
// g / ncg.
// params: rows, cols, chunk, ncg
@compute @workgroup_size(64, 4)
fn bias_grad_part(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let rows = pu(0u);
    let cols = pu(1u);
    let chunk = pu(2u);
    let ncg = pu(3u);
    let g = group_id(wid, nwg);
    let k = g / ncg;
    let r0 = k * chunk;
    if (r0 >= rows) {
        return; // a spare workgroup of the 2-D grid (uniform: the whole group)
    }
    let c = (g % ncg) * 64u + lid.x;
    let t = col_sum(lid, r0, min(rows, r0 + chunk), cols, c);
    if (lid.y == 0u && c < cols) {
        y[k * cols + c] = t;
    }
}

// bias_grad_sum: db[off + c] += Σ_k part[k, c] in chunk order, db bound as
// `y`, part as `src`.
// params: chunks, cols, off
@compute @workgroup_size(256)
fn bias_grad_sum(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let chunks = pu(0u);
    let cols = pu(1u);
    let off = pu(2u);
    for (var c = gid.x; c < cols; c += nwg.x * 256u) {
        var s = 0.0;
        for (var k = 0u; k < chunks; k++) {
            s += src[k * cols + c];
        }
        y[off + c] = y[off + c] + s;
    }
}
