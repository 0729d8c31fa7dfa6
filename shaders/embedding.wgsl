// embedding_fwd (row gather) and scatter_add_rows (its backward).

@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> table: array<f32>;
@group(0) @binding(3) var<storage, read> ids: array<u32>;

// embedding_fwd: out[r, :] (+)= table[ids[r], :]. A table split across
// bindings is gathered one piece at a time: this piece holds table rows
// [row0, row0 + piece_rows) and only ids in that range are read.
// params: rows, dim, accumulate, row0, piece_rows
@compute @workgroup_size(256)
fn embedding_fwd(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let rows = pu(0u);
    let dim = pu(1u);
    let accumulate = pu(2u) != 0u;
    let row0 = pu(3u);
    let nrows = pu(4u);
    let n = rows * dim;
    for (var e = gid.x; e < n; e += nwg.x * 256u) {
        let r = e / dim;
        let c = e % dim;
        let id = ids[r];
        if (id >= row0 && id - row0 < nrows) {
            let val = table[(id - row0) * dim + c];
            if (accumulate) {
                out[e] = out[e] + val;
            } else {
                out[e] = val;
            }
        }
    }
}

// scatter_add_rows: dx[idx[r], :] += dy[r, :] (dx bound as `out`, dy as
// `table`, idx as `ids`). Indices may repeat, so one thread owns a column
// and walks the rows in order: no atomics, the CPU's summation order.
// params: rows, cols
@compute @workgroup_size(64)
fn scatter_add_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let rows = pu(0u);
    let cols = pu(1u);
    for (var c = gid.x; c < cols; c += nwg.x * 64u) {
        for (var r = 0u; r < rows; r++) {
            let o = ids[r] * cols + c;
            out[o] = out[o] + table[r * cols + c];
        }
    }
}
