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

// bias_grad: db[off + c] += Σ_r dy[r, c], db bound as `y`, dy as `src`.
// A workgroup owns 64 columns; its 4 lanes per column sum every 4th row and
// the lanes are added in a fixed order (deterministic).
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
    var s = 0.0;
    if (c < cols) {
        for (var r = lid.y; r < rows; r += 4u) {
            s += src[r * cols + c];
        }
    }
    part[lid.y * 64u + lid.x] = s;
    workgroupBarrier();
    if (lid.y == 0u && c < cols) {
        let t = (part[lid.x] + part[64u + lid.x]) + (part[128u + lid.x] + part[192u + lid.x]);
        y[off + c] = y[off + c] + t;
    }
}
