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

// Every kernel's dynamic shared memory (sized by the host).
extern __shared__ __align__(16) float smem[];

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

// ==== tensor cores: FlashAttention-2's work split on mma.sync (bf16) ============
//
// The same three products as above with q, k, v and dO rounded to bf16 (as
// PyTorch's bf16 autocast feeds SDPA), the probabilities and dS rounded to
// bf16 for their products, every sum in f32: mma.sync.m16n8k16 (bf16 in, f32
// accumulate), head dimension DH in {32, 64, 128}. The inputs that every
// block re-reads (k, v; in the backward also q, dO) arrive converted
// (attention_cast_bf16, one pass: each element is then read T/64 times as 2
// bytes instead of 4); the forward's q, read once, is converted while it is
// staged. Outputs, lse and dsum are f32 with the f32 kernels' meaning (lse
// in natural-log units), so the two families can be mixed. The softmax
// runs in base 2: scores are scaled by scale * log2(e) and exponentiated
// with exp2f.
//
// Work split:
//   forward (8 warps), dq (4 warps): a block owns 128 or 64 queries of one
//     (b, h), 16 per warp (the rows of the warp's m16 tiles), and streams
//     64-key tiles of k and v through shared memory (two stages, cp.async);
//   dk/dv (4 warps): a block owns 64 keys of one (b, kv head), 16 per warp, and
//     streams tiles of BQ queries (q, dO, their lse and dsum) of every
//     query head of its group: no two blocks write the same dk/dv row, and
//     dq has its own kernel, so nothing is atomic (deterministic).
// Shared tiles are [rows][DH + 8] bf16: the 16-byte pad shifts consecutive
// rows by 4 banks, so the 8 row addresses of each ldmatrix phase hit
// distinct bank groups for any DH that is a multiple of 8.
// Fragments (g = lane / 4, t = lane % 4): an m16n8 accumulator holds rows
// g and g + 8, columns 2t and 2t + 1; two adjacent n8 accumulators of a
// score tile are exactly the A fragment of the next product (no shuffle).

#define ABQ 64  // queries per block (dq)
#define ABK 64  // keys per tile (forward, dq) and per block (dk/dv)
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

template <int DH>
struct AttnTile {
    static constexpr int RS = DH + 8;       // shared row stride (bf16 elements)
    static constexpr int CH = DH / 8;       // 16-byte chunks per row
    static constexpr int DT = DH / 8;       // n8 tiles of a head-dimension-wide accumulator
};

// Rows [r0, r0 + rows) of a bf16 [.., row_stride] tensor into a shared tile
// (row stride DH + 8), asynchronously; rows at or beyond `limit` become
// zeros (nothing is read for them).
template <int DH>
__device__ __forceinline__ void attn_rows_async(bf16_t* dst, const bf16_t* base, i64 row_stride, int r0, int rows,
                                                int limit) {
    typedef AttnTile<DH> L;
    for (int e = threadIdx.x; e < rows * L::CH; e += blockDim.x) {
        int r = e / L::CH, c = e % L::CH;
        bool ok = r0 + r < limit;
        const bf16_t* src = ok ? base + (i64)(r0 + r) * row_stride + c * 8 : base;
        cp_async16(smem_addr(dst + r * L::RS + c * 8), src, ok);
    }
}

// Rows [r0, r0 + rows) of an f32 [.., row_stride] tensor into a shared bf16
// tile (row stride DH + 8), converted on the way (synchronous loads: for
// tiles read once per block); rows at or beyond `limit` become zeros.
template <int DH>
__device__ __forceinline__ void attn_rows_cvt(bf16_t* dst, const float* base, i64 row_stride, int r0, int rows,
                                              int limit) {
    typedef AttnTile<DH> L;
    for (int e = threadIdx.x; e < rows * (DH / 2); e += blockDim.x) {
        int r = e / (DH / 2), c = 2 * (e % (DH / 2));
        float2 v;
        v.x = v.y = 0.0f;
        if (r0 + r < limit) v = *(const float2*)(base + (i64)(r0 + r) * row_stride + c);
        *(u32*)(dst + r * L::RS + c) = bf16x2_rn(v.x, v.y);
    }
}

// Key tile `it` (keys 64 it ..) into stage it & 1 of the shared k and v
// tiles (asynchronously) and of the keys' flags Ms (1: a real key inside
// kv_seq; threads 0..63). kb, vb, mb: this (batch, kv head)'s k, v and mask.
template <int DH>
__device__ __forceinline__ void attn_kv_tile(bf16_t* Ks, bf16_t* Vs, float* Ms, const bf16_t* kb, const bf16_t* vb,
                                             const float* mb, i64 kstride, int kv_seq, int it) {
    typedef AttnTile<DH> L;
    const int j0 = it * ABK, st = it & 1, tid = threadIdx.x;
    attn_rows_async<DH>(Ks + st * ABK * L::RS, kb, kstride, j0, ABK, kv_seq);
    attn_rows_async<DH>(Vs + st * ABK * L::RS, vb, kstride, j0, ABK, kv_seq);
    if (tid < ABK) Ms[st * ABK + tid] = (j0 + tid < kv_seq && mb[j0 + tid] > 0.0f) ? 1.0f : 0.0f;
}

// A fragment (16 rows x 16 columns starting at row r0, column 16 * ks) of a
// shared tile, rows as the product's m.
template <int DH>
__device__ __forceinline__ void attn_frag_a(u32* f, const bf16_t* tile, int r0, int ks, int lane) {
    int row = r0 + ((lane >> 3) & 1) * 8 + (lane & 7), chunk = 2 * ks + (lane >> 4);
    ldsm_x4(smem_addr(tile + row * AttnTile<DH>::RS + chunk * 8), f[0], f[1], f[2], f[3]);
}

// B fragments of two adjacent n8 tiles where the tile's rows are the
// product's n (rows r0..r0+15) and its columns the k (16 * ks..): b0, b1
// for rows r0..r0+7 and b2, b3 for rows r0+8..r0+15.
template <int DH>
__device__ __forceinline__ void attn_frag_b_rows_n(u32* f, const bf16_t* tile, int r0, int ks, int lane) {
    int row = r0 + ((lane >> 4) & 1) * 8 + (lane & 7), chunk = 2 * ks + ((lane >> 3) & 1);
    ldsm_x4(smem_addr(tile + row * AttnTile<DH>::RS + chunk * 8), f[0], f[1], f[2], f[3]);
}

// B fragments of two adjacent n8 tiles where the tile's rows are the
// product's k (rows r0..r0+15) and its columns the n (16 * np..): b0, b1 for
// columns 16np..16np+7, b2, b3 for the next 8 (ldmatrix .trans).
template <int DH>
__device__ __forceinline__ void attn_frag_b_rows_k(u32* f, const bf16_t* tile, int r0, int np, int lane) {
    int row = r0 + ((lane >> 3) & 1) * 8 + (lane & 7), chunk = 2 * np + (lane >> 4);
    ldsm_x4_trans(smem_addr(tile + row * AttnTile<DH>::RS + chunk * 8), f[0], f[1], f[2], f[3]);
}

// The A fragment of columns 16 ks.. of a row block held as n8 accumulators
// (c[2ks], c[2ks+1]), rounded to bf16.
__device__ __forceinline__ void attn_acc_to_a(u32* f, const float (*c)[4], int ks) {
    f[0] = bf16x2_rn(c[2 * ks][0], c[2 * ks][1]);
    f[1] = bf16x2_rn(c[2 * ks][2], c[2 * ks][3]);
    f[2] = bf16x2_rn(c[2 * ks + 1][0], c[2 * ks + 1][1]);
    f[3] = bf16x2_rn(c[2 * ks + 1][2], c[2 * ks + 1][3]);
}

// acc[16 x DH] += a-rows (as n8 accumulators over KN columns) . tile rows
// r0..r0+KN-1 (k) x DH (n), the shared tile read with .trans.
template <int DH, int KN>
__device__ __forceinline__ void attn_acc_times_tile(float (*acc)[4], const float (*c)[4], const bf16_t* tile, int r0,
                                                    int lane) {
#pragma unroll
    for (int ks = 0; ks < KN / 16; ks++) {
        u32 af[4];
        attn_acc_to_a(af, c, ks);
#pragma unroll
        for (int np = 0; np < DH / 16; np++) {
            u32 bf[4];
            attn_frag_b_rows_k<DH>(bf, tile, r0 + 16 * ks, np, lane);
            mma_16816(acc[2 * np], af, bf);
            mma_16816(acc[2 * np + 1], af, bf + 2);
        }
    }
}

// s[16 x N] = rows r0.. of tile `a` (16 x DH) . rows of tile `b` (N x DH)^T.
template <int DH, int N>
__device__ __forceinline__ void attn_scores(float (*s)[4], const bf16_t* ta, int ra, const bf16_t* tb, int lane) {
#pragma unroll
    for (int nt = 0; nt < N / 8; nt++) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < DH / 16; ks++) {
        u32 af[4];
        attn_frag_a<DH>(af, ta, ra, ks, lane);
#pragma unroll
        for (int np = 0; np < N / 16; np++) {
            u32 bf[4];
            attn_frag_b_rows_n<DH>(bf, tb, 16 * np, ks, lane);
            mma_16816(s[2 * np], af, bf);
            mma_16816(s[2 * np + 1], af, bf + 2);
        }
    }
}

// Store a 16 x DH accumulator block (rows row0 + g, row0 + g + 8) to f32
// rows of `base` (row r at base + r * stride), rows at or beyond `limit`
// skipped, each row scaled by mul[0] / mul[1].
template <int DH>
__device__ __forceinline__ void attn_store_rows(float* base, i64 stride, int row0, int limit, const float (*acc)[4],
                                                const float* mul, int lane) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        int r = row0 + g + 8 * hr;
        if (r >= limit) continue;
        float* row = base + (i64)r * stride + 2 * t;
#pragma unroll
        for (int dt = 0; dt < DH / 8; dt++) {
            float2 v;
            v.x = acc[dt][2 * hr] * mul[hr];
            v.y = acc[dt][2 * hr + 1] * mul[hr];
            *(float2*)(row + dt * 8) = v;
        }
    }
}

// dst (bf16) = src (f32) rounded to nearest even, for an even count n2 * 2.
extern "C" __global__ void attention_cast_bf16(bf16_t* dst, const float* src, i64 n2) {
    GRID_LOOP(i, n2) {
        float2 v = ((const float2*)src)[i];
        ((u32*)dst)[i] = bf16x2_rn(v.x, v.y);
    }
}

// Whether every query of this warp sees every key of the 64-key tile at j0
// (all real tokens, none past the causal diagonal): then the per-score mask
// is skipped (warp-uniform; every lane of the warp must call it). first_q:
// the warp's first query.
__device__ __forceinline__ bool attn_tile_full(const float* Mt, const AttnArgs& a, int j0, int first_q, int lane) {
    float f = fminf(Mt[lane], Mt[lane + 32]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) f = fminf(f, __shfl_xor_sync(FULL_MASK, f, o));
    return f > 0.0f && (!a.causal || j0 + ABK - 1 <= a.q_start + first_q);
}

// One key tile's online-softmax update of a warp's rows i0 and i0 + 8 (this
// thread's): scores s (raw, in) become the kept probabilities (out), the
// running max m, sum l and output o are rescaled. MASKED: apply the mask
// flags and the causal diagonal per score (else the tile is all visible).
template <bool MASKED, int DH>
__device__ __forceinline__ void attn_fwd_softmax(float (*s)[4], float* m, float* l, float (*o)[4], const float* Mt,
                                                 const AttnArgs& a, int b, int h, int i0, int j0, int t) {
    typedef AttnTile<DH> L;
    const float sl2 = a.scale * LOG2E;
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        const int i = i0 + 8 * hr;
        float mx = m[hr];
#pragma unroll
        for (int nt = 0; nt < ABK / 8; nt++)
#pragma unroll
            for (int c = 0; c < 2; c++) {
                int jl = nt * 8 + 2 * t + c, j = j0 + jl;
                const bool vis = !MASKED || (Mt[jl] > 0.0f && (!a.causal || j <= a.q_start + i));
                float x = vis ? s[nt][2 * hr + c] * sl2 : BEFT_NEG_INF;
                s[nt][2 * hr + c] = x;
                mx = fmaxf(mx, x);
            }
        mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 2));
        const float mu = mx == BEFT_NEG_INF ? 0.0f : mx;  // no visible key yet: p = 0
        const float alpha = exp2f(m[hr] - mu);
        m[hr] = mx;
        l[hr] *= alpha;
#pragma unroll
        for (int dt = 0; dt < L::DT; dt++) o[dt][2 * hr] *= alpha, o[dt][2 * hr + 1] *= alpha;
#pragma unroll
        for (int nt = 0; nt < ABK / 8; nt++)
#pragma unroll
            for (int c = 0; c < 2; c++) {
                float p = exp2f(s[nt][2 * hr + c] - mu);
                l[hr] += p;
                s[nt][2 * hr + c] = p * attn_drop(a, b, h, i, j0 + nt * 8 + 2 * t + c);
            }
    }
}

// ---- forward ------------------------------------------------------------------
// Grid (ceil(T / (16 NW)), H, B), 32 NW threads; q is f32 (converted while
// it is staged), k and v bf16. Shared: k and v tiles [2][64][RS], the
// block's queries [16 NW][RS], the key tiles' visibility flags [2][64].
// NW = 8 (128 queries a block, as FlashAttention-2's forward): each k/v
// tile brought in from L2 serves twice the queries of a 4-warp block.
template <int DH, int NW>
__device__ __forceinline__ void attn_fwd_mma(float* out, float* lse, const float* q, const bf16_t* k,
                                             const bf16_t* v, const float* mask, const AttnArgs& a) {
    typedef AttnTile<DH> L;
    bf16_t* Ks = (bf16_t*)smem;
    bf16_t* Vs = Ks + 2 * ABK * L::RS;
    bf16_t* Qs = Vs + 2 * ABK * L::RS;
    constexpr int BQF = 16 * NW;  // queries per block
    float* Ms = (float*)(Qs + BQF * L::RS);
    const int b = blockIdx.z, h = blockIdx.y, kh = h / (a.heads / a.kv_heads);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const int q0 = blockIdx.x * BQF, qw = q0 + 16 * warp;  // this warp's first query
    const i64 qstride = (i64)a.heads * DH, kstride = (i64)a.kv_heads * DH;
    const bf16_t* kb = k + (i64)b * a.kv_seq * kstride + (i64)kh * DH;
    const bf16_t* vb = v + (i64)b * a.kv_seq * kstride + (i64)kh * DH;
    const float* mb = mask + (i64)b * a.kv_seq;
    const int last_q = min(q0 + BQF, a.seq) - 1;
    const int kv_end = a.causal ? min(a.kv_seq, a.q_start + last_q + 1) : a.kv_seq;
    const int tiles = (kv_end + ABK - 1) / ABK;

    // The queries (f32, converted here: read once), then key tile 0 as
    // group 0 and one group per tile after it.
    attn_rows_cvt<DH>(Qs, q + (i64)b * a.seq * qstride + (i64)h * DH, qstride, q0, BQF, a.seq);
    auto load_tile = [&](int it) { attn_kv_tile<DH>(Ks, Vs, Ms, kb, vb, mb, kstride, a.kv_seq, it); };
    if (tiles > 0) load_tile(0);
    cp_async_commit();

    float o[L::DT][4], m[2] = {BEFT_NEG_INF, BEFT_NEG_INF}, l[2] = {0.0f, 0.0f};
#pragma unroll
    for (int dt = 0; dt < L::DT; dt++) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
    // Warp-uniform: does the warp have a real query, and the last one it sees.
    const bool warp_live = qw < a.seq;
    const int warp_kv_last = a.causal ? a.q_start + min(qw + 15, a.seq - 1) : a.kv_seq - 1;

    for (int it = 0; it < tiles; it++) {
        if (it + 1 < tiles) load_tile(it + 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const int j0 = it * ABK, st = it & 1;
        const bf16_t* Kt = Ks + st * ABK * L::RS;
        const bf16_t* Vt = Vs + st * ABK * L::RS;
        const float* Mt = Ms + st * ABK;
        if (warp_live && j0 <= warp_kv_last) {
            float s[ABK / 8][4];
            attn_scores<DH, ABK>(s, Qs, 16 * warp, Kt, lane);
            if (attn_tile_full(Mt, a, j0, qw, lane))
                attn_fwd_softmax<false, DH>(s, m, l, o, Mt, a, b, h, qw + g, j0, t);
            else
                attn_fwd_softmax<true, DH>(s, m, l, o, Mt, a, b, h, qw + g, j0, t);
            attn_acc_times_tile<DH, ABK>(o, s, Vt, 0, lane);
        }
        __syncthreads();
    }
    cp_async_wait<0>();

    float inv[2];
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        l[hr] += __shfl_xor_sync(FULL_MASK, l[hr], 1);
        l[hr] += __shfl_xor_sync(FULL_MASK, l[hr], 2);
        inv[hr] = l[hr] > 0.0f ? 1.0f / l[hr] : 0.0f;
        const int i = qw + g + 8 * hr;
        if (t == 0 && i < a.seq)
            lse[((i64)b * a.heads + h) * a.seq + i] = l[hr] > 0.0f ? (m[hr] + log2f(l[hr])) * LN2 : BEFT_NEG_INF;
    }
    attn_store_rows<DH>(out + (i64)b * a.seq * qstride + (i64)h * DH, qstride, qw, a.seq, o, inv, lane);
}

// One key tile's dS = P * (dP * dropout - dsum) * scale for this thread's rows
// i0 and i0 + 8 (lse l2 in base 2, dsum dd), written over s. MASKED: the
// mask flags, the causal diagonal and rows without keys per score (else the
// tile is all visible and every row of the warp has keys).
template <bool MASKED>
__device__ __forceinline__ void attn_dq_ds(float (*s)[4], const float (*dp)[4], const float* l2, const float* dd,
                                           const float* Mt, const AttnArgs& a, int b, int h, int i0, int j0, int t) {
    const float sl2 = a.scale * LOG2E;
#pragma unroll
    for (int nt = 0; nt < ABK / 8; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int hr = e >> 1, i = i0 + 8 * hr, jl = nt * 8 + 2 * t + (e & 1), j = j0 + jl;
            const bool vis =
                !MASKED || (l2[hr] != BEFT_NEG_INF && Mt[jl] > 0.0f && (!a.causal || j <= a.q_start + i));
            float ds = 0.0f;
            if (vis) {
                float p = exp2f(s[nt][e] * sl2 - l2[hr]);
                ds = p * (dp[nt][e] * attn_drop(a, b, h, i, j) - dd[hr]) * a.scale;
            }
            s[nt][e] = ds;
        }
}

// ---- dq -------------------------------------------------------------------------
// Grid (ceil(T / 64), H, B), 128 threads. Shared: k and v tiles [2][64][RS],
// the block's q and dO rows [64][RS] each, the key tiles' flags [2][64].
template <int DH>
__device__ __forceinline__ void attn_dq_mma(float* dq, const bf16_t* dout, const bf16_t* q, const bf16_t* k,
                                            const bf16_t* v, const float* lse, const float* dsum, const float* mask,
                                            const AttnArgs& a) {
    typedef AttnTile<DH> L;
    bf16_t* Ks = (bf16_t*)smem;
    bf16_t* Vs = Ks + 2 * ABK * L::RS;
    bf16_t* Qs = Vs + 2 * ABK * L::RS;
    bf16_t* Gs = Qs + ABQ * L::RS;
    float* Ms = (float*)(Gs + ABQ * L::RS);
    const int b = blockIdx.z, h = blockIdx.y, kh = h / (a.heads / a.kv_heads);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const int q0 = blockIdx.x * ABQ, qw = q0 + 16 * warp;
    const i64 qstride = (i64)a.heads * DH, kstride = (i64)a.kv_heads * DH;
    const bf16_t* kb = k + (i64)b * a.kv_seq * kstride + (i64)kh * DH;
    const bf16_t* vb = v + (i64)b * a.kv_seq * kstride + (i64)kh * DH;
    const float* mb = mask + (i64)b * a.kv_seq;
    const int last_q = min(q0 + ABQ, a.seq) - 1;
    const int kv_end = a.causal ? min(a.kv_seq, a.q_start + last_q + 1) : a.kv_seq;
    const int tiles = (kv_end + ABK - 1) / ABK;

    attn_rows_async<DH>(Qs, q + (i64)b * a.seq * qstride + (i64)h * DH, qstride, q0, ABQ, a.seq);
    attn_rows_async<DH>(Gs, dout + (i64)b * a.seq * qstride + (i64)h * DH, qstride, q0, ABQ, a.seq);
    auto load_tile = [&](int it) { attn_kv_tile<DH>(Ks, Vs, Ms, kb, vb, mb, kstride, a.kv_seq, it); };
    if (tiles > 0) load_tile(0);
    cp_async_commit();

    // This thread's two rows: lse in base 2 (-inf: the row sees no key, or
    // is past the end) and dsum.
    float l2[2], dd[2];
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        int i = qw + g + 8 * hr;
        i64 x = ((i64)b * a.heads + h) * a.seq + i;
        l2[hr] = i < a.seq ? lse[x] * LOG2E : BEFT_NEG_INF;
        dd[hr] = i < a.seq ? dsum[x] : 0.0f;
    }
    float acc[L::DT][4];
#pragma unroll
    for (int dt = 0; dt < L::DT; dt++) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.0f;
    const bool warp_live = qw < a.seq;
    const int warp_kv_last = a.causal ? a.q_start + min(qw + 15, a.seq - 1) : a.kv_seq - 1;
    // Every row of the warp real and seeing a key (lse finite): warp-uniform.
    float ok = l2[0] != BEFT_NEG_INF && l2[1] != BEFT_NEG_INF ? 1.0f : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ok = fminf(ok, __shfl_xor_sync(FULL_MASK, ok, o));
    const bool rows_ok = ok > 0.0f;

    for (int it = 0; it < tiles; it++) {
        if (it + 1 < tiles) load_tile(it + 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const int j0 = it * ABK, st = it & 1;
        const bf16_t* Kt = Ks + st * ABK * L::RS;
        const bf16_t* Vt = Vs + st * ABK * L::RS;
        const float* Mt = Ms + st * ABK;
        if (warp_live && j0 <= warp_kv_last) {
            float s[ABK / 8][4], dp[ABK / 8][4];
            attn_scores<DH, ABK>(s, Qs, 16 * warp, Kt, lane);
            attn_scores<DH, ABK>(dp, Gs, 16 * warp, Vt, lane);
            if (rows_ok && attn_tile_full(Mt, a, j0, qw, lane))
                attn_dq_ds<false>(s, dp, l2, dd, Mt, a, b, h, qw + g, j0, t);
            else
                attn_dq_ds<true>(s, dp, l2, dd, Mt, a, b, h, qw + g, j0, t);
            attn_acc_times_tile<DH, ABK>(acc, s, Kt, 0, lane);
        }
        __syncthreads();
    }
    cp_async_wait<0>();
    const float one[2] = {1.0f, 1.0f};
    attn_store_rows<DH>(dq + (i64)b * a.seq * qstride + (i64)h * DH, qstride, qw, a.seq, acc, one, lane);
}

// Whether every query of the BQ-query tile at i0 is real, sees a key (lse
// finite) and sees all 16 keys of the warp from jw (causal): then the
// per-score mask of dk/dv is skipped (warp-uniform; every lane must call it).
template <int BQ>
__device__ __forceinline__ bool attn_qtile_full(const float* Lt, const AttnArgs& a, int jw, int i0, int lane) {
    float f = 1.0f;
#pragma unroll
    for (int r = lane; r < BQ; r += 32) f = Lt[r] != BEFT_NEG_INF ? f : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) f = fminf(f, __shfl_xor_sync(FULL_MASK, f, o));
    return f > 0.0f && (!a.causal || jw + 15 <= a.q_start + i0);
}

// One query tile's P * dropout (written over s) and dS = P * (dP * dropout -
// dsum) * scale (over dp) for this thread's keys j and j + 8 (rows) and the
// tile's queries from i0 (columns; their lse in base 2 in Lt, dsum in Dt).
// MASKED: the keys' flags, rows without keys and the causal diagonal per
// score (else every score of the warp's block is visible).
template <bool MASKED, int BQ>
__device__ __forceinline__ void attn_dkv_pds(float (*s)[4], float (*dp)[4], const bool* kvis, const float* Lt,
                                             const float* Dt, const AttnArgs& a, int b, int h, int jr, int i0,
                                             int t) {
    const float sl2 = a.scale * LOG2E;
#pragma unroll
    for (int nt = 0; nt < BQ / 8; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int hr = e >> 1, j = jr + 8 * hr, il = nt * 8 + 2 * t + (e & 1), i = i0 + il;
            const bool vis =
                !MASKED || (kvis[hr] && Lt[il] != BEFT_NEG_INF && (!a.causal || j <= a.q_start + i));
            float pw = 0.0f, ds = 0.0f;
            if (vis) {
                const float p = exp2f(s[nt][e] * sl2 - Lt[il]);
                const float w = attn_drop(a, b, h, i, j);
                pw = p * w;
                ds = p * (dp[nt][e] * w - Dt[il]) * a.scale;
            }
            s[nt][e] = pw;
            dp[nt][e] = ds;
        }
}

// ---- dk, dv ---------------------------------------------------------------------
// Grid (ceil(Tk / 64), Hkv, B), 128 threads. Shared: the block's k and v
// rows [64][RS] each, query tiles of q and dO [2][BQ][RS] each, and the
// tiles' lse (base 2) and dsum [2][BQ] each. BQ = 32 at DH = 128 keeps the
// dk and dv accumulators (2 x 64 registers) and the two score blocks in
// registers.
template <int DH, int BQ>
__device__ __forceinline__ void attn_dkv_mma(float* dk, float* dv, const bf16_t* dout, const bf16_t* q,
                                             const bf16_t* k, const bf16_t* v, const float* lse, const float* dsum,
                                             const float* mask, const AttnArgs& a) {
    typedef AttnTile<DH> L;
    bf16_t* Kb = (bf16_t*)smem;
    bf16_t* Vb = Kb + ABK * L::RS;
    bf16_t* Qs = Vb + ABK * L::RS;
    bf16_t* Gs = Qs + 2 * BQ * L::RS;
    float* Ls = (float*)(Gs + 2 * BQ * L::RS);
    float* Ds = Ls + 2 * BQ;
    const int b = blockIdx.z, kh = blockIdx.y, group = a.heads / a.kv_heads;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const int j0 = blockIdx.x * ABK, jw = j0 + 16 * warp;  // this warp's first key
    const i64 qstride = (i64)a.heads * DH, kstride = (i64)a.kv_heads * DH;
    attn_rows_async<DH>(Kb, k + (i64)b * a.kv_seq * kstride + (i64)kh * DH, kstride, j0, ABK, a.kv_seq);
    attn_rows_async<DH>(Vb, v + (i64)b * a.kv_seq * kstride + (i64)kh * DH, kstride, j0, ABK, a.kv_seq);

    // Queries before i_begin see none of this block's keys (causal); the
    // tiles run over (head of the group, query tile) in one sequence.
    const int i_begin = a.causal ? max(0, j0 - a.q_start) : 0;
    const int qtiles = i_begin < a.seq ? (a.seq - i_begin + BQ - 1) / BQ : 0;
    const int tiles = group * qtiles;
    auto load_tile = [&](int it) {
        const int h = kh * group + it / qtiles, i0 = i_begin + (it % qtiles) * BQ, st = it & 1;
        attn_rows_async<DH>(Qs + st * BQ * L::RS, q + (i64)b * a.seq * qstride + (i64)h * DH, qstride, i0, BQ,
                            a.seq);
        attn_rows_async<DH>(Gs + st * BQ * L::RS, dout + (i64)b * a.seq * qstride + (i64)h * DH, qstride, i0, BQ,
                            a.seq);
        if (tid < BQ) {
            const int i = i0 + tid;
            const i64 x = ((i64)b * a.heads + h) * a.seq + i;
            Ls[st * BQ + tid] = i < a.seq ? lse[x] * LOG2E : BEFT_NEG_INF;
            Ds[st * BQ + tid] = i < a.seq ? dsum[x] : 0.0f;
        }
    };
    if (tiles > 0) load_tile(0);
    cp_async_commit();

    // This thread's two keys: visible at all (real token, inside Tk)?
    bool kvis[2];
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        const int j = jw + g + 8 * hr;
        kvis[hr] = j < a.kv_seq && mask[(i64)b * a.kv_seq + j] > 0.0f;
    }
    float gk[L::DT][4], gv[L::DT][4];
#pragma unroll
    for (int dt = 0; dt < L::DT; dt++)
#pragma unroll
        for (int e = 0; e < 4; e++) gk[dt][e] = gv[dt][e] = 0.0f;
    const bool warp_live = jw < a.kv_seq;
    // Every key of the warp real (warp-uniform).
    float kok = kvis[0] && kvis[1] ? 1.0f : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) kok = fminf(kok, __shfl_xor_sync(FULL_MASK, kok, o));
    const bool keys_ok = kok > 0.0f;

    for (int it = 0; it < tiles; it++) {
        if (it + 1 < tiles) load_tile(it + 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const int h = kh * group + it / qtiles, i0 = i_begin + (it % qtiles) * BQ, st = it & 1;
        const bf16_t* Qt = Qs + st * BQ * L::RS;
        const bf16_t* Gt = Gs + st * BQ * L::RS;
        const float* Lt = Ls + st * BQ;
        const float* Dt = Ds + st * BQ;
        // Causal: the tile's last query sees keys up to q_start + i0 + BQ - 1.
        if (warp_live && (!a.causal || jw <= a.q_start + i0 + BQ - 1)) {
            // Transposed blocks: rows are this warp's 16 keys, columns the tile's queries.
            float s[BQ / 8][4], dp[BQ / 8][4];
            attn_scores<DH, BQ>(s, Kb, 16 * warp, Qt, lane);
            attn_scores<DH, BQ>(dp, Vb, 16 * warp, Gt, lane);
            if (keys_ok && attn_qtile_full<BQ>(Lt, a, jw, i0, lane))
                attn_dkv_pds<false, BQ>(s, dp, kvis, Lt, Dt, a, b, h, jw + g, i0, t);
            else
                attn_dkv_pds<true, BQ>(s, dp, kvis, Lt, Dt, a, b, h, jw + g, i0, t);
            attn_acc_times_tile<DH, BQ>(gv, s, Gt, 0, lane);
            attn_acc_times_tile<DH, BQ>(gk, dp, Qt, 0, lane);
        }
        __syncthreads();
    }
    cp_async_wait<0>();
    const float one[2] = {1.0f, 1.0f};
    const i64 ko = (i64)b * a.kv_seq * kstride + (i64)kh * DH;
    attn_store_rows<DH>(dk + ko, kstride, jw, a.kv_seq, gk, one, lane);
    attn_store_rows<DH>(dv + ko, kstride, jw, a.kv_seq, gv, one, lane);
}

// The kernels, one per head dimension (names end in _d<DH>).
extern "C" __global__ void __launch_bounds__(256)
    attention_fwd_bf16_d32(float* out, float* lse, const float* q, const bf16_t* k, const bf16_t* v,
                            const float* mask, AttnArgs a) {
    attn_fwd_mma<32, 8>(out, lse, q, k, v, mask, a);
}
extern "C" __global__ void __launch_bounds__(128)
    attention_bwd_dq_bf16_d32(float* dq, const bf16_t* dout, const bf16_t* q, const bf16_t* k, const bf16_t* v,
                               const float* lse, const float* dsum, const float* mask, AttnArgs a) {
    attn_dq_mma<32>(dq, dout, q, k, v, lse, dsum, mask, a);
}
extern "C" __global__ void __launch_bounds__(128)
    attention_bwd_dkv_bf16_d32(float* dk, float* dv, const bf16_t* dout, const bf16_t* q, const bf16_t* k,
                                const bf16_t* v, const float* lse, const float* dsum, const float* mask, AttnArgs a) {
    attn_dkv_mma<32, 64>(dk, dv, dout, q, k, v, lse, dsum, mask, a);
}
extern "C" __global__ void __launch_bounds__(256)
    attention_fwd_bf16_d64(float* out, float* lse, const float* q, const bf16_t* k, const bf16_t* v,
                            const float* mask, AttnArgs a) {
    attn_fwd_mma<64, 8>(out, lse, q, k, v, mask, a);
}
extern "C" __global__ void __launch_bounds__(128)
    attention_bwd_dq_bf16_d64(float* dq, const bf16_t* dout, const bf16_t* q, const bf16_t* k, const bf16_t* v,
                               const float* lse, const float* dsum, const float* mask, AttnArgs a) {
    attn_dq_mma<64>(dq, dout, q, k, v, lse, dsum, mask, a);
}
extern "C" __global__ void __launch_bounds__(128)
    attention_bwd_dkv_bf16_d64(float* dk, float* dv, const bf16_t* dout, const bf16_t* q, const bf16_t* k,
                                const bf16_t* v, const float* lse, const float* dsum, const float* mask, AttnArgs a) {
    attn_dkv_mma<64, 64>(dk, dv, dout, q, k, v, lse, dsum, mask, a);
}
extern "C" __global__ void __launch_bounds__(256)
    attention_fwd_bf16_d128(float* out, float* lse, const float* q, const bf16_t* k, const bf16_t* v,
                            const float* mask, AttnArgs a) {
    attn_fwd_mma<128, 8>(out, lse, q, k, v, mask, a);
}
extern "C" __global__ void __launch_bounds__(128)
    attention_bwd_dq_bf16_d128(float* dq, const bf16_t* dout, const bf16_t* q, const bf16_t* k, const bf16_t* v,
                               const float* lse, const float* dsum, const float* mask, AttnArgs a) {
    attn_dq_mma<128>(dq, dout, q, k, v, lse, dsum, mask, a);
}
extern "C" __global__ void __launch_bounds__(128)
    attention_bwd_dkv_bf16_d128(float* dk, float* dv, const bf16_t* dout, const bf16_t* q, const bf16_t* k,
                                const bf16_t* v, const float* lse, const float* dsum, const float* mask, AttnArgs a) {
    attn_dkv_mma<128, 32>(dk, dv, dout, q, k, v, lse, dsum, mask, a);
}
