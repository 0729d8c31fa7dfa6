// Softmax attention, flash-style: the T x T score matrix never exists in
// memory. The forward pass streams key/value tiles through shared memory
// with an online softmax and saves each query's log-sum-exp; the backward
// pass recomputes the probabilities from q, k and that log-sum-exp.
//
// Shapes (src/backend/mod.rs, `AttnDims`): q, out, dq = [B, T, H, Dh];
// k, v, dk, dv = [B, Tk, Hkv, Dh] (grouped-query attention: query head h
// reads key head h / (H / Hkv)); mask = [B, Tk] (> 0 = real token);
// lse, dsum = [B, H, T]. Causal: query i (absolute position q_start + i)
// sees keys j <= q_start + i. A query that sees no key gets out = 0 and
// lse = -inf. Probability dropout: score (b, h, i, j) is kept when
// dropout_keep(seed, ((b*H + h)*T + i)*Tk + j, p) (the CPU's
// `attn_dropout_index`), kept probabilities scaled by 1/(1-p).
//
// Work split: lanes of a warp own head dimensions d = lane + 32r (r < 8, so
// Dh <= 256) for the output accumulators, and key (or query) rows of a tile
// for the dot products. Shared-memory rows are padded to an odd stride so
// that 32 lanes reading 32 different rows at the same column hit 32 banks.
// The host sizes the tiles (KT rows, at most 32) and the dynamic shared
// memory from Dh.
#include "common.cuh"

#define QPB 16  // queries per block (forward and dq): 4 warps x 4 queries
#define QPW 4
#define KPW 2   // keys per warp (dk/dv): 4 warps x 2 keys
#define KPB 8
#define RMAX 8  // head-dimension registers per lane (Dh <= 256)

struct AttnArgs {
    int batch, seq, kv_seq, q_start, heads, kv_heads, head_dim, causal;
    float scale, drop_p, drop_scale;
    u32 seed_lo, seed_hi;
};

__device__ __forceinline__ bool attn_visible(const float* mask, const AttnArgs& a, int b, int i, int j) {
    return j < a.kv_seq && mask[(i64)b * a.kv_seq + j] > 0.0f && (!a.causal || j <= a.q_start + i);
}

// Dropout weight of score (b, h, i, j): 1 without dropout, else 0 or 1/(1-p).
__device__ __forceinline__ float attn_drop(const AttnArgs& a, int b, int h, int i, int j) {
    if (a.drop_p <= 0.0f) return 1.0f;
    u32 idx = (u32)((((u64)b * a.heads + h) * a.seq + i) * (u64)a.kv_seq + j);
    return dropout_keep(a.seed_lo, a.seed_hi, idx, a.drop_p) ? a.drop_scale : 0.0f;
}

__device__ __forceinline__ float dot_smem(const float* x, const float* y, int n) {
    float s = 0.0f;
    for (int d = 0; d < n; d++) s = fmaf(x[d], y[d], s);
    return s;
}

// Copy `rows` rows of width Dh starting at row `r0` of a [.., stride]
// tensor (row r at base + r*row_stride) into shared memory with stride ds,
// zero-filling rows at or beyond `limit`.
__device__ __forceinline__ void load_rows(float* dst, int ds, const float* base, i64 row_stride, int r0, int rows,
                                          int limit, int dh) {
    for (int e = threadIdx.x; e < rows * dh; e += blockDim.x) {
        int r = e / dh, d = e % dh;
        dst[r * ds + d] = (r0 + r < limit) ? base[(i64)(r0 + r) * row_stride + d] : 0.0f;
    }
}

// ---- forward ------------------------------------------------------------------
// Grid (ceil(T / 16), H, B), 128 threads. Shared: K and V tiles [kt][ds],
// the block's queries [16][ds].
extern "C" __global__ void __launch_bounds__(128)
    attention_fwd_f32(float* out, float* lse, const float* q, const float* k, const float* v, const float* mask,
                      AttnArgs a, int kt) {
    extern __shared__ float smem[];
    const int dh = a.head_dim, ds = dh | 1;
    float* Ks = smem;
    float* Vs = Ks + kt * ds;
    float* Qs = Vs + kt * ds;
    const int b = blockIdx.z, h = blockIdx.y, kh = h / (a.heads / a.kv_heads);
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int q0 = blockIdx.x * QPB;
    const i64 qstride = (i64)a.heads * dh, kstride = (i64)a.kv_heads * dh;
    const float* qb = q + (i64)b * a.seq * qstride + (i64)h * dh;
    const float* kb = k + (i64)b * a.kv_seq * kstride + (i64)kh * dh;
    const float* vb = v + (i64)b * a.kv_seq * kstride + (i64)kh * dh;

    load_rows(Qs, ds, qb, qstride, q0, QPB, a.seq, dh);

    float o[QPW][RMAX], m[QPW], l[QPW];
#pragma unroll
    for (int u = 0; u < QPW; u++) {
        m[u] = BEFT_NEG_INF;
        l[u] = 0.0f;
#pragma unroll
        for (int r = 0; r < RMAX; r++) o[u][r] = 0.0f;
    }
    int last_q = min(q0 + QPB, a.seq) - 1;
    int kv_end = a.causal ? min(a.kv_seq, a.q_start + last_q + 1) : a.kv_seq;
    for (int j0 = 0; j0 < kv_end; j0 += kt) {
        __syncthreads();
        load_rows(Ks, ds, kb, kstride, j0, kt, a.kv_seq, dh);
        load_rows(Vs, ds, vb, kstride, j0, kt, a.kv_seq, dh);
        __syncthreads();
#pragma unroll
        for (int u = 0; u < QPW; u++) {
            int qr = warp * QPW + u, i = q0 + qr;
            if (i >= a.seq) continue;  // warp-uniform
            int j = j0 + lane;
            bool vis = lane < kt && attn_visible(mask, a, b, i, j);
            float s = vis ? dot_smem(Qs + qr * ds, Ks + lane * ds, dh) * a.scale : BEFT_NEG_INF;
            float tmax = warp_max(s);
            if (tmax == BEFT_NEG_INF) continue;  // nothing visible in this tile
            float mnew = fmaxf(m[u], tmax);
            float corr = expf(m[u] - mnew);  // 0 on the first visible tile
            float p = vis ? expf(s - mnew) : 0.0f;
            l[u] = l[u] * corr + warp_sum(p);
            float pd = vis ? p * attn_drop(a, b, h, i, j) : 0.0f;
#pragma unroll
            for (int r = 0; r < RMAX; r++) o[u][r] *= corr;
            for (int jj = 0; jj < kt; jj++) {
                float pj = __shfl_sync(FULL_MASK, pd, jj);
#pragma unroll
                for (int r = 0; r < RMAX; r++) {
                    int d = lane + WARP * r;
                    if (d < dh) o[u][r] = fmaf(pj, Vs[jj * ds + d], o[u][r]);
                }
            }
            m[u] = mnew;
        }
    }
#pragma unroll
    for (int u = 0; u < QPW; u++) {
        int i = q0 + warp * QPW + u;
        if (i >= a.seq) continue;
        bool none = m[u] == BEFT_NEG_INF;
        float inv = none ? 0.0f : 1.0f / l[u];
        float* orow = out + ((i64)b * a.seq + i) * qstride + (i64)h * dh;
#pragma unroll
        for (int r = 0; r < RMAX; r++) {
            int d = lane + WARP * r;
            if (d < dh) orow[d] = o[u][r] * inv;
        }
        if (lane == 0) lse[((i64)b * a.heads + h) * a.seq + i] = none ? BEFT_NEG_INF : m[u] + logf(l[u]);
    }
}

// ---- backward -------------------------------------------------------------------

// dsum[b, h, i] = dO_i . O_i (= sum_j P_ij dP_ij, with dropout too). One warp per (b, i, h).
extern "C" __global__ void attention_bwd_prep_f32(float* dsum, const float* dout, const float* out, AttnArgs a) {
    i64 row = ((i64)blockIdx.x * blockDim.x + threadIdx.x) / WARP;  // (b*T + i)*H + h
    int lane = threadIdx.x % WARP;
    if (row >= (i64)a.batch * a.seq * a.heads) return;
    const float* x = dout + row * a.head_dim;
    const float* y = out + row * a.head_dim;
    float s = 0.0f;
    for (int d = lane; d < a.head_dim; d += WARP) s = fmaf(x[d], y[d], s);
    s = warp_sum(s);
    int h = (int)(row % a.heads);
    i64 bi = row / a.heads;
    int i = (int)(bi % a.seq), b = (int)(bi / a.seq);
    if (lane == 0) dsum[((i64)b * a.heads + h) * a.seq + i] = s;
}

// dq (overwritten). Grid (ceil(T / 16), H, B), 128 threads. Shared: K and V
// tiles [kt][ds], the block's q and dO rows [16][ds] each.
extern "C" __global__ void __launch_bounds__(128)
    attention_bwd_dq_f32(float* dq, const float* dout, const float* q, const float* k, const float* v,
                         const float* lse, const float* dsum, const float* mask, AttnArgs a, int kt) {
    extern __shared__ float smem[];
    const int dh = a.head_dim, ds = dh | 1;
    float* Ks = smem;
    float* Vs = Ks + kt * ds;
    float* Qs = Vs + kt * ds;
    float* Gs = Qs + QPB * ds;  // dO rows
    const int b = blockIdx.z, h = blockIdx.y, kh = h / (a.heads / a.kv_heads);
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int q0 = blockIdx.x * QPB;
    const i64 qstride = (i64)a.heads * dh, kstride = (i64)a.kv_heads * dh;
    const float* kb = k + (i64)b * a.kv_seq * kstride + (i64)kh * dh;
    const float* vb = v + (i64)b * a.kv_seq * kstride + (i64)kh * dh;
    load_rows(Qs, ds, q + (i64)b * a.seq * qstride + (i64)h * dh, qstride, q0, QPB, a.seq, dh);
    load_rows(Gs, ds, dout + (i64)b * a.seq * qstride + (i64)h * dh, qstride, q0, QPB, a.seq, dh);

    float acc[QPW][RMAX], li[QPW], di[QPW];
#pragma unroll
    for (int u = 0; u < QPW; u++) {
        int i = q0 + warp * QPW + u;
        i64 x = ((i64)b * a.heads + h) * a.seq + i;
        li[u] = i < a.seq ? lse[x] : BEFT_NEG_INF;
        di[u] = i < a.seq ? dsum[x] : 0.0f;
#pragma unroll
        for (int r = 0; r < RMAX; r++) acc[u][r] = 0.0f;
    }
    int last_q = min(q0 + QPB, a.seq) - 1;
    int kv_end = a.causal ? min(a.kv_seq, a.q_start + last_q + 1) : a.kv_seq;
    for (int j0 = 0; j0 < kv_end; j0 += kt) {
        __syncthreads();
        load_rows(Ks, ds, kb, kstride, j0, kt, a.kv_seq, dh);
        load_rows(Vs, ds, vb, kstride, j0, kt, a.kv_seq, dh);
        __syncthreads();
#pragma unroll
        for (int u = 0; u < QPW; u++) {
            int qr = warp * QPW + u, i = q0 + qr;
            if (i >= a.seq || li[u] == BEFT_NEG_INF) continue;  // warp-uniform
            int j = j0 + lane;
            float dsv = 0.0f;
            if (lane < kt && attn_visible(mask, a, b, i, j)) {
                float s = dot_smem(Qs + qr * ds, Ks + lane * ds, dh) * a.scale;
                float p = expf(s - li[u]);
                float dp = attn_drop(a, b, h, i, j) * dot_smem(Gs + qr * ds, Vs + lane * ds, dh);
                dsv = p * (dp - di[u]) * a.scale;
            }
            for (int jj = 0; jj < kt; jj++) {
                float sj = __shfl_sync(FULL_MASK, dsv, jj);
#pragma unroll
                for (int r = 0; r < RMAX; r++) {
                    int d = lane + WARP * r;
                    if (d < dh) acc[u][r] = fmaf(sj, Ks[jj * ds + d], acc[u][r]);
                }
            }
        }
    }
#pragma unroll
    for (int u = 0; u < QPW; u++) {
        int i = q0 + warp * QPW + u;
        if (i >= a.seq) continue;
        float* row = dq + ((i64)b * a.seq + i) * qstride + (i64)h * dh;
#pragma unroll
        for (int r = 0; r < RMAX; r++) {
            int d = lane + WARP * r;
            if (d < dh) row[d] = acc[u][r];
        }
    }
}

// dk, dv (overwritten). Grid (ceil(Tk / 8), Hkv, B), 128 threads; each warp
// owns 2 keys and sums over every query of every query head of its group,
// so no two blocks write the same row (deterministic, no atomics). Shared:
// the block's k and v rows [8][ds] each, query tiles of q and dO [qt][ds]
// each, and the tile's lse and dsum.
extern "C" __global__ void __launch_bounds__(128)
    attention_bwd_dkv_f32(float* dk, float* dv, const float* dout, const float* q, const float* k, const float* v,
                          const float* lse, const float* dsum, const float* mask, AttnArgs a, int qt) {
    extern __shared__ float smem[];
    const int dh = a.head_dim, ds = dh | 1;
    float* Kb = smem;
    float* Vb = Kb + KPB * ds;
    float* Qs = Vb + KPB * ds;
    float* Gs = Qs + qt * ds;
    float* Ls = Gs + qt * ds;
    float* Ds = Ls + qt;
    const int b = blockIdx.z, kh = blockIdx.y, group = a.heads / a.kv_heads;
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int j0 = blockIdx.x * KPB;
    const i64 qstride = (i64)a.heads * dh, kstride = (i64)a.kv_heads * dh;
    const float* kb = k + (i64)b * a.kv_seq * kstride + (i64)kh * dh;
    const float* vb = v + (i64)b * a.kv_seq * kstride + (i64)kh * dh;
    load_rows(Kb, ds, kb, kstride, j0, KPB, a.kv_seq, dh);
    load_rows(Vb, ds, vb, kstride, j0, KPB, a.kv_seq, dh);

    float gk[KPW][RMAX], gv[KPW][RMAX];
#pragma unroll
    for (int c = 0; c < KPW; c++)
#pragma unroll
        for (int r = 0; r < RMAX; r++) gk[c][r] = gv[c][r] = 0.0f;

    // Queries before i_begin see none of this block's keys (causal).
    int i_begin = a.causal ? max(0, j0 - a.q_start) : 0;
    for (int g = 0; g < group; g++) {
        int h = kh * group + g;
        const float* qb = q + (i64)b * a.seq * qstride + (i64)h * dh;
        const float* gb = dout + (i64)b * a.seq * qstride + (i64)h * dh;
        const float* lb = lse + ((i64)b * a.heads + h) * a.seq;
        const float* db = dsum + ((i64)b * a.heads + h) * a.seq;
        for (int i0 = i_begin; i0 < a.seq; i0 += qt) {
            __syncthreads();
            load_rows(Qs, ds, qb, qstride, i0, qt, a.seq, dh);
            load_rows(Gs, ds, gb, qstride, i0, qt, a.seq, dh);
            for (int e = threadIdx.x; e < qt; e += blockDim.x) {
                Ls[e] = i0 + e < a.seq ? lb[i0 + e] : BEFT_NEG_INF;
                Ds[e] = i0 + e < a.seq ? db[i0 + e] : 0.0f;
            }
            __syncthreads();
#pragma unroll
            for (int c = 0; c < KPW; c++) {
                int kr = warp * KPW + c, j = j0 + kr;
                if (j >= a.kv_seq) continue;  // warp-uniform
                int i = i0 + lane;
                float dsv = 0.0f, pw = 0.0f;
                if (lane < qt && i < a.seq && Ls[lane] != BEFT_NEG_INF && attn_visible(mask, a, b, i, j)) {
                    float s = dot_smem(Qs + lane * ds, Kb + kr * ds, dh) * a.scale;
                    float p = expf(s - Ls[lane]);
                    float w = attn_drop(a, b, h, i, j);
                    float dp = w * dot_smem(Gs + lane * ds, Vb + kr * ds, dh);
                    dsv = p * (dp - Ds[lane]) * a.scale;
                    pw = p * w;
                }
                for (int ii = 0; ii < qt; ii++) {
                    float si = __shfl_sync(FULL_MASK, dsv, ii);
                    float wi = __shfl_sync(FULL_MASK, pw, ii);
#pragma unroll
                    for (int r = 0; r < RMAX; r++) {
                        int d = lane + WARP * r;
                        if (d < dh) {
                            gk[c][r] = fmaf(si, Qs[ii * ds + d], gk[c][r]);
                            gv[c][r] = fmaf(wi, Gs[ii * ds + d], gv[c][r]);
                        }
                    }
                }
            }
        }
    }
#pragma unroll
    for (int c = 0; c < KPW; c++) {
        int j = j0 + warp * KPW + c;
        if (j >= a.kv_seq) continue;
        i64 o = ((i64)b * a.kv_seq + j) * kstride + (i64)kh * dh;
#pragma unroll
        for (int r = 0; r < RMAX; r++) {
            int d = lane + WARP * r;
            if (d < dh) {
                dk[o + d] = gk[c][r];
                dv[o + d] = gv[c][r];
            }
        }
    }
}
