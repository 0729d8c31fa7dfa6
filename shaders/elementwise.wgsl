// Element-wise ops over flat buffers: add, scale, fill, scale_rows, sum_sq.
// (`copy` is a buffer-to-buffer copy on the queue, no shader.) All use a
// grid-stride loop, so any length fits the 65535-group dispatch limit.

@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;

const WG: u32 = 256u;

// add: y[i] += x[i].  params: n
@compute @workgroup_size(256)
fn add(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let n = pu(0u);
    for (var i = gid.x; i < n; i += nwg.x * WG) {
        y[i] = y[i] + x[i];
    }
}

// scale: y[i] *= s.  params: n, s
@compute @workgroup_size(256)
fn scale(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let n = pu(0u);
    let s = pf(1u);
    for (var i = gid.x; i < n; i += nwg.x * WG) {
        y[i] = y[i] * s;
    }
}

// fill: y[i] = value.  params: n, value
@compute @workgroup_size(256)
fn fill(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let n = pu(0u);
    let v = pf(1u);
    for (var i = gid.x; i < n; i += nwg.x * WG) {
        y[i] = v;
    }
}

// scale_rows: y[r, c] *= x[r].  params: rows, cols
@compute @workgroup_size(256)
fn scale_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let rows = pu(0u);
    let cols = pu(1u);
    let n = rows * cols;
    for (var i = gid.x; i < n; i += nwg.x * WG) {
        y[i] = y[i] * x[i / cols];
    }
}

var<workgroup> red: array<f32, 256>;

// sum_sq: one partial Σ x² per workgroup into y[group]; the host adds the
// partials in f64.  params: n
@compute @workgroup_size(256)
fn sum_sq(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let n = pu(0u);
    var s = 0.0;
    for (var i = gid.x; i < n; i += nwg.x * WG) {
        s += x[i] * x[i];
    }
    red[lid] = s;
    workgroupBarrier();
    for (var k = 128u; k > 0u; k >>= 1u) {
        if (lid < k) {
            red[lid] += red[lid + k];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        y[wid.x] = red[0];
    }
}
