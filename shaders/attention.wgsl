// attention_fwd and attention_bwd: softmax attention with a key padding mask,
// causal masking (with a query offset for the KV-cache shape), grouped-query
// heads and probability dropout (the same hash as the CPU, so the masks match
// bit for bit). Nothing of size seq×seq is ever stored: probabilities are
// recomputed from q, k and the saved log-sum-exp.
//
// q, out, dq, dout: [batch, seq, heads, head_dim]; k, v, dk, dv:
// [batch, kv_seq, kv_heads, head_dim]; lse: [batch, heads, seq];
// mask: [batch, kv_seq]. head_dim ≤ 256 (4 values per thread of 64).
//
// params (all entries): 0 batch, 1 seq, 2 kv_seq, 3 q_start, 4 heads,
// 5 kv_heads, 6 head_dim, 7 causal, 8 scale, 9 dropout p (0 = none),
// 10 seed_lo, 11 seed_hi, 12 1/(1-p) (rounded to f32 on the host)

@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read_write> lse: array<f32>;
@group(0) @binding(3) var<storage, read> q: array<f32>;
@group(0) @binding(4) var<storage, read> k: array<f32>;
@group(0) @binding(5) var<storage, read> v: array<f32>;
@group(0) @binding(6) var<storage, read> mask: array<f32>;
// backward
@group(0) @binding(7) var<storage, read_write> dq: array<f32>;
@group(0) @binding(8) var<storage, read_write> dsum: array<f32>;   // D_i = dO_i·O_i, [batch, heads, seq]
@group(0) @binding(9) var<storage, read> dout: array<f32>;
@group(0) @binding(10) var<storage, read> out_in: array<f32>;
@group(0) @binding(11) var<storage, read> lse_in: array<f32>;
@group(0) @binding(12) var<storage, read_write> dk: array<f32>;
@group(0) @binding(13) var<storage, read_write> dv: array<f32>;
@group(0) @binding(14) var<storage, read> dsum_in: array<f32>;

const WG: u32 = 64u;

var<workgroup> vec_a: array<f32, 256>;  // q_i (fwd, dq) or k_j (dk/dv)
var<workgroup> vec_b: array<f32, 256>;  // dO_i (dq) or v_j (dk/dv)
var<workgroup> blk_a: array<f32, 64>;   // per-key or per-query weights of a block
var<workgroup> blk_b: array<f32, 64>;
var<workgroup> red_m: array<f32, 64>;
var<workgroup> red_s: array<f32, 64>;

fn visible(b: u32, i: u32, j: u32) -> bool {
    let tk = pu(2u);
    let causal = pu(7u) != 0u;
    return mask[b * tk + j] > 0.0 && (!causal || j <= pu(3u) + i);
}

// Dropout weight of score (b, h, i, j): 0 or 1/(1-p); 1 without dropout.
fn drop_w(b: u32, h: u32, i: u32, j: u32) -> f32 {
    let p = pf(9u);
    if (p <= 0.0) {
        return 1.0;
    }
    let idx = ((b * pu(4u) + h) * pu(1u) + i) * pu(2u) + j;
    return select(0.0, pf(12u), dropout_keep(pu(10u), pu(11u), idx, p));
}

// (max, sum) pair of an online softmax, merged.
fn merge_m(m1: f32, m2: f32) -> f32 {
    return max(m1, m2);
}

// A thread that saw no key has s = 0 (and m = -inf): it adds nothing.
fn merge_s(m1: f32, s1: f32, m2: f32, s2: f32) -> f32 {
    let m = max(m1, m2);
    var s = 0.0;
    if (s1 > 0.0) {
        s += s1 * exp(m1 - m);
    }
    if (s2 > 0.0) {
        s += s2 * exp(m2 - m);
    }
    return s;
}

// One workgroup per query (b, h, i). Pass 1: each thread runs an online
// softmax over every 64th key, then the 64 (max, sum) pairs are merged into
// the log-sum-exp. Pass 2: 64 keys at a time, each thread computes one
// probability, then each thread accumulates its own output dimensions.
@compute @workgroup_size(64)
fn attention_fwd(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let t = pu(1u);
    let tk = pu(2u);
    let nh = pu(4u);
    let nkv = pu(5u);
    let dh = pu(6u);
    let scale = pf(8u);
    let qid = group_id(wid, nwg);
    if (qid >= pu(0u) * nh * t) {
        return;
    }
    let i = qid % t;
    let h = (qid / t) % nh;
    let b = qid / (t * nh);
    let kh = h / (nh / nkv);
    let qs = nh * dh;
    let ks = nkv * dh;
    let qrow = (b * t + i) * qs + h * dh;
    for (var d = lid; d < dh; d += WG) {
        vec_a[d] = q[qrow + d];
    }
    workgroupBarrier();

    var m = neg_inf();
    var s = 0.0;
    for (var j = lid; j < tk; j += WG) {
        if (visible(b, i, j)) {
            let kr = (b * tk + j) * ks + kh * dh;
            var sdot = 0.0;
            for (var d = 0u; d < dh; d++) {
                sdot = fma(vec_a[d], k[kr + d], sdot);
            }
            let sc = sdot * scale;
            if (s == 0.0) {
                m = sc;
                s = 1.0;
            } else if (sc > m) {
                s = s * exp(m - sc) + 1.0;
                m = sc;
            } else {
                s += exp(sc - m);
            }
        }
    }
    red_m[lid] = m;
    red_s[lid] = s;
    workgroupBarrier();
    for (var w = 32u; w > 0u; w >>= 1u) {
        if (lid < w) {
            let m1 = red_m[lid];
            let m2 = red_m[lid + w];
            red_s[lid] = merge_s(m1, red_s[lid], m2, red_s[lid + w]);
            red_m[lid] = merge_m(m1, m2);
        }
        workgroupBarrier();
    }
    let mx = red_m[0];
    // A query that sees no key: lse = -inf, output zero (every p below is 0).
    var l = neg_inf();
    if (red_s[0] > 0.0) {
        l = mx + log(red_s[0]);
    }
    if (lid == 0u) {
        lse[(b * nh + h) * t + i] = l;
    }

    var acc: array<f32, 4>;
    for (var r = 0u; r < 4u; r++) {
        acc[r] = 0.0;
    }
    for (var j0 = 0u; j0 < tk; j0 += WG) {
        let j = j0 + lid;
        var p = 0.0;
        if (j < tk && l > neg_inf() && visible(b, i, j)) {
            let kr = (b * tk + j) * ks + kh * dh;
            var sdot = 0.0;
            for (var d = 0u; d < dh; d++) {
                sdot = fma(vec_a[d], k[kr + d], sdot);
            }
            p = exp(sdot * scale - l) * drop_w(b, h, i, j);
        }
        blk_a[lid] = p;
        workgroupBarrier();
        let nj = min(WG, tk - j0);
        for (var r = 0u; r < 4u; r++) {
            let d = lid + r * WG;
            if (d < dh) {
                var a = acc[r];
                for (var jj = 0u; jj < nj; jj++) {
                    a = fma(blk_a[jj], v[(b * tk + j0 + jj) * ks + kh * dh + d], a);
                }
                acc[r] = a;
            }
        }
        workgroupBarrier();
    }
    for (var r = 0u; r < 4u; r++) {
        let d = lid + r * WG;
        if (d < dh) {
            out[qrow + d] = acc[r];
        }
    }
}

// Backward, part 1 — one workgroup per query (b, h, i): D_i = dO_i·O_i
// (saved for part 2) and dq_i = Σ_j dS_ij k_j with
// dS_ij = P_ij (w_ij dO_i·v_j − D_i)·scale. Training shape (kv_seq = seq).
@compute @workgroup_size(64)
fn attention_bwd_dq(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let t = pu(1u);
    let nh = pu(4u);
    let nkv = pu(5u);
    let dh = pu(6u);
    let scale = pf(8u);
    let qid = group_id(wid, nwg);
    if (qid >= pu(0u) * nh * t) {
        return;
    }
    let i = qid % t;
    let h = (qid / t) % nh;
    let b = qid / (t * nh);
    let kh = h / (nh / nkv);
    let qs = nh * dh;
    let ks = nkv * dh;
    let qrow = (b * t + i) * qs + h * dh;
    var part = 0.0;
    for (var d = lid; d < dh; d += WG) {
        vec_a[d] = q[qrow + d];
        vec_b[d] = dout[qrow + d];
        part += dout[qrow + d] * out_in[qrow + d];
    }
    red_s[lid] = part;
    workgroupBarrier();
    for (var w = 32u; w > 0u; w >>= 1u) {
        if (lid < w) {
            red_s[lid] += red_s[lid + w];
        }
        workgroupBarrier();
    }
    let di = red_s[0];
    let li = (b * nh + h) * t + i;
    let l = lse_in[li];
    if (lid == 0u) {
        dsum[li] = di;
    }

    var acc: array<f32, 4>;
    for (var r = 0u; r < 4u; r++) {
        acc[r] = 0.0;
    }
    for (var j0 = 0u; j0 < t; j0 += WG) {
        let j = j0 + lid;
        var ds = 0.0;
        if (j < t && l > neg_inf() && visible(b, i, j)) {
            let kr = (b * t + j) * ks + kh * dh;
            var sdot = 0.0;
            var pdot = 0.0;
            for (var d = 0u; d < dh; d++) {
                sdot = fma(vec_a[d], k[kr + d], sdot);
                pdot = fma(vec_b[d], v[kr + d], pdot);
            }
            let p = exp(sdot * scale - l);
            let dp = pdot * drop_w(b, h, i, j);
            ds = p * (dp - di) * scale;
        }
        blk_a[lid] = ds;
        workgroupBarrier();
        let nj = min(WG, t - j0);
        for (var r = 0u; r < 4u; r++) {
            let d = lid + r * WG;
            if (d < dh) {
                var a = acc[r];
                for (var jj = 0u; jj < nj; jj++) {
                    a = fma(blk_a[jj], k[(b * t + j0 + jj) * ks + kh * dh + d], a);
                }
                acc[r] = a;
            }
        }
        workgroupBarrier();
    }
    for (var r = 0u; r < 4u; r++) {
        let d = lid + r * WG;
        if (d < dh) {
            dq[qrow + d] = acc[r];
        }
    }
}

// Backward, part 2 — one workgroup per key (b, kv head, j), looping over the
// queries of every query head that reads it (GQA): dv_j = Σ P̃_ij dO_i and
// dk_j = Σ dS_ij q_i. Each key is owned by one workgroup: no atomics.
@compute @workgroup_size(64)
fn attention_bwd_dkdv(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let t = pu(1u);
    let nh = pu(4u);
    let nkv = pu(5u);
    let dh = pu(6u);
    let scale = pf(8u);
    let kid = group_id(wid, nwg);
    if (kid >= pu(0u) * nkv * t) {
        return;
    }
    let j = kid % t;
    let kh = (kid / t) % nkv;
    let b = kid / (t * nkv);
    let grp = nh / nkv;
    let qs = nh * dh;
    let ks = nkv * dh;
    let krow = (b * t + j) * ks + kh * dh;
    for (var d = lid; d < dh; d += WG) {
        vec_a[d] = k[krow + d];
        vec_b[d] = v[krow + d];
    }
    workgroupBarrier();

    var acc_k: array<f32, 4>;
    var acc_v: array<f32, 4>;
    for (var r = 0u; r < 4u; r++) {
        acc_k[r] = 0.0;
        acc_v[r] = 0.0;
    }
    for (var g = 0u; g < grp; g++) {
        let h = kh * grp + g;
        for (var i0 = 0u; i0 < t; i0 += WG) {
            let i = i0 + lid;
            var pw = 0.0;
            var ds = 0.0;
            if (i < t && visible(b, i, j)) {
                let li = (b * nh + h) * t + i;
                let l = lse_in[li];
                if (l > neg_inf()) {
                    let qr = (b * t + i) * qs + h * dh;
                    var sdot = 0.0;
                    var pdot = 0.0;
                    for (var d = 0u; d < dh; d++) {
                        sdot = fma(q[qr + d], vec_a[d], sdot);
                        pdot = fma(dout[qr + d], vec_b[d], pdot);
                    }
                    let p = exp(sdot * scale - l);
                    let w = drop_w(b, h, i, j);
                    pw = p * w;
                    ds = p * (pdot * w - dsum_in[li]) * scale;
                }
            }
            blk_a[lid] = pw;
            blk_b[lid] = ds;
            workgroupBarrier();
            let ni = min(WG, t - i0);
            for (var r = 0u; r < 4u; r++) {
                let d = lid + r * WG;
                if (d < dh) {
                    var av = acc_v[r];
                    var ak = acc_k[r];
                    for (var ii = 0u; ii < ni; ii++) {
                        let qr = (b * t + i0 + ii) * qs + h * dh + d;
                        av = fma(blk_a[ii], dout[qr], av);
                        ak = fma(blk_b[ii], q[qr], ak);
                    }
                    acc_v[r] = av;
                    acc_k[r] = ak;
                }
            }
            workgroupBarrier();
        }
    }
    for (var r = 0u; r < 4u; r++) {
        let d = lid + r * WG;
        if (d < dh) {
            dk[krow + d] = acc_k[r];
            dv[krow + d] = acc_v[r];
        }
    }
}
