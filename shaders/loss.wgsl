// cross_entropy (loss and gradient in one op), mse, candidate_loss.

@group(0) @binding(1) var<storage, read_write> losses: array<f32>;
@group(0) @binding(2) var<storage, read_write> dlogits: array<f32>;
@group(0) @binding(3) var<storage, read> logits: array<f32>;
@group(0) @binding(4) var<storage, read> labels: array<u32>;
@group(0) @binding(5) var<storage, read> targets: array<f32>;
// candidate_loss
@group(0) @binding(6) var<storage, read_write> ex_loss: array<f32>;
@group(0) @binding(7) var<storage, read_write> scores: array<f32>;
@group(0) @binding(8) var<storage, read_write> row_w: array<f32>;
@group(0) @binding(9) var<storage, read> tok_loss: array<f32>;
@group(0) @binding(10) var<storage, read> tok_cand: array<u32>;
@group(0) @binding(11) var<storage, read> cand_ex: array<u32>;
@group(0) @binding(12) var<storage, read> gold: array<u32>;
// [cands] candidate lengths, then [examples] (max, Σexp) pairs
@group(0) @binding(13) var<storage, read_write> scratch: array<f32>;

var<workgroup> red: array<f32, 256>;

fn wg_reduce(lid: u32, v: f32, is_max: bool) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var k = 128u; k > 0u; k >>= 1u) {
        if (lid < k) {
            if (is_max) {
                red[lid] = max(red[lid], red[lid + k]);
            } else {
                red[lid] += red[lid + k];
            }
        }
        workgroupBarrier();
    }
    let s = red[0];
    workgroupBarrier();
    return s;
}

// cross_entropy: one workgroup per row. losses[r] = lse − x[y],
// dlogits = (softmax − onehot)·grad_scale.  params: rows, classes, grad_scale
@compute @workgroup_size(256)
fn cross_entropy(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let rows = pu(0u);
    let classes = pu(1u);
    let gs = pf(2u);
    let r = group_id(wid, nwg);
    if (r >= rows) {
        return;
    }
    let o = r * classes;
    var m = neg_inf();
    for (var c = lid; c < classes; c += 256u) {
        m = max(m, logits[o + c]);
    }
    let mx = wg_reduce(lid, m, true);
    var s = 0.0;
    for (var c = lid; c < classes; c += 256u) {
        s += exp(logits[o + c] - mx);
    }
    let l = mx + log(wg_reduce(lid, s, false));
    let y = labels[r];
    if (lid == 0u) {
        losses[r] = l - logits[o + y];
    }
    for (var c = lid; c < classes; c += 256u) {
        let p = exp(logits[o + c] - l);
        dlogits[o + c] = (p - select(0.0, 1.0, c == y)) * gs;
    }
}

// mse: losses[r] = (x−y)², dx = 2(x−y)·grad_scale (losses → `losses`,
// dx → `dlogits`, x → `logits`, y → `targets`).  params: rows, 2·grad_scale
@compute @workgroup_size(256)
fn mse(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let rows = pu(0u);
    let g2 = pf(1u);
    for (var r = gid.x; r < rows; r += nwg.x * 256u) {
        let e = logits[r] - targets[r];
        losses[r] = e * e;
        dlogits[r] = g2 * e;
    }
}

// candidate_loss, step 1 — one thread per candidate: s_c = −mean of its
// answer tokens' losses.  params (all steps): rows, cands, examples, grad_scale
@compute @workgroup_size(64)
fn candidate_scores(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let rows = pu(0u);
    let nc = pu(1u);
    for (var c = gid.x; c < nc; c += nwg.x * 64u) {
        var sum = 0.0;
        var len = 0u;
        for (var r = 0u; r < rows; r++) {
            if (tok_cand[r] == c) {
                sum += tok_loss[r];
                len += 1u;
            }
        }
        scores[c] = -sum / f32(max(len, 1u));
        scratch[c] = f32(len);
    }
}

// Step 2 — one thread per example: log-softmax of its candidates' scores
// against the gold one.
@compute @workgroup_size(64)
fn candidate_examples(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let nc = pu(1u);
    let ne = pu(2u);
    for (var e = gid.x; e < ne; e += nwg.x * 64u) {
        var mx = neg_inf();
        for (var c = 0u; c < nc; c++) {
            if (cand_ex[c] == e) {
                mx = max(mx, scores[c]);
            }
        }
        var z = 0.0;
        for (var c = 0u; c < nc; c++) {
            if (cand_ex[c] == e) {
                z += exp(scores[c] - mx);
            }
        }
        ex_loss[e] = mx + log(z) - scores[gold[e]];
        scratch[nc + 2u * e] = mx;
        scratch[nc + 2u * e + 1u] = z;
    }
}

// Step 3 — one thread per answer token: row_w[r] = −grad_scale·(p_c −
// [c = gold])/len_c.
@compute @workgroup_size(64)
fn candidate_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let rows = pu(0u);
    let nc = pu(1u);
    let gs = pf(3u);
    for (var r = gid.x; r < rows; r += nwg.x * 64u) {
        let c = tok_cand[r];
        let e = cand_ex[c];
        let p = exp(scores[c] - scratch[nc + 2u * e]) / scratch[nc + 2u * e + 1u];
        let dsc = p - select(0.0, 1.0, gold[e] == c);
        row_w[r] = -gs * dsc / max(scratch[c], 1.0);
    }
}
