// matmul: c[m×n] (+)= op(a)·op(b) with transpose flags, 64×64 output tiles
// per workgroup staged through workgroup memory in 16-deep k slices; each of
// the 16×16 threads accumulates a 4×4 block (rows ty+16r, columns tx+16c).
//
// The operands are addressed through offsets and leading dimensions so that
// one call can work on a slice of a problem: a weight split across several
// bindings is multiplied one piece at a time (see `matmul` in
// src/backend/wgpu/mod.rs).
//   op(a)[i, p] = ta ? a[a_off + p·a_ld + i] : a[a_off + i·a_ld + p]
//   op(b)[p, j] = tb ? b[j·b_ld + p]         : b[p·b_ld + j]
//   c[c_off + i·c_ld + j]
// params: m, n, k, ta, tb, accumulate, a_off, a_ld, b_ld, c_off, c_ld

@group(0) @binding(1) var<storage, read_write> c: array<f32>;
@group(0) @binding(2) var<storage, read> a: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;

const BM: u32 = 64u;
const BN: u32 = 64u;
const BK: u32 = 16u;

var<workgroup> As: array<f32, 1024>; // [BK][BM]
var<workgroup> Bs: array<f32, 1024>; // [BK][BN]

@compute @workgroup_size(16, 16)
fn matmul(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let m = pu(0u);
    let n = pu(1u);
    let k = pu(2u);
    let ta = pu(3u) != 0u;
    let tb = pu(4u) != 0u;
    let accumulate = pu(5u) != 0u;
    let a_off = pu(6u);
    let a_ld = pu(7u);
    let b_ld = pu(8u);
    let c_off = pu(9u);
    let c_ld = pu(10u);

    let row0 = wid.y * BM;
    let col0 = wid.x * BN;
    let tid = lid.y * 16u + lid.x;
    var acc: array<f32, 16>;
    for (var q = 0u; q < 16u; q++) {
        acc[q] = 0.0;
    }

    for (var k0 = 0u; k0 < k; k0 += BK) {
        // Stage op(a)[row0.., k0..] and op(b)[k0.., col0..]: 1024 values
        // each, 4 per thread, with the contiguous index running fastest.
        for (var e = 0u; e < 4u; e++) {
            let idx = tid + e * 256u;
            var kk: u32;
            var ii: u32;
            if (ta) {
                kk = idx / BM;
                ii = idx % BM;
            } else {
                kk = idx % BK;
                ii = idx / BK;
            }
            let i = row0 + ii;
            let p = k0 + kk;
            var va = 0.0;
            if (i < m && p < k) {
                if (ta) {
                    va = a[a_off + p * a_ld + i];
                } else {
                    va = a[a_off + i * a_ld + p];
                }
            }
            As[kk * BM + ii] = va;

            var jj: u32;
            if (tb) {
                kk = idx % BK;
                jj = idx / BK;
            } else {
                kk = idx / BN;
                jj = idx % BN;
            }
            let j = col0 + jj;
            let pb = k0 + kk;
            var vb = 0.0;
            if (j < n && pb < k) {
                if (tb) {
                    vb = b[j * b_ld + pb];
                } else {
                    vb = b[pb * b_ld + j];
                }
            }
            Bs[kk * BN + jj] = vb;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            var ar: array<f32, 4>;
            var br: array<f32, 4>;
            for (var r = 0u; r < 4u; r++) {
                ar[r] = As[kk * BM + lid.y + 16u * r];
                br[r] = Bs[kk * BN + lid.x + 16u * r];
            }
            for (var r = 0u; r < 4u; r++) {
                for (var q = 0u; q < 4u; q++) {
                    acc[r * 4u + q] = fma(ar[r], br[q], acc[r * 4u + q]);
                }
            }
        }
        workgroupBarrier();
    }

    for (var r = 0u; r < 4u; r++) {
        let i = row0 + lid.y + 16u * r;
        for (var q = 0u; q < 4u; q++) {
            let j = col0 + lid.x + 16u * q;
            if (i < m && j < n) {
                let o = c_off + i * c_ld + j;
                if (accumulate) {
                    c[o] = c[o] + acc[r * 4u + q];
                } else {
                    c[o] = acc[r * 4u + q];
                }
            }
        }
    }
}
