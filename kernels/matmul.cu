// Matrix products c[m x n] (+)= op(a) . op(b) with general strides, so that
// one kernel serves every transpose combination (and the host can swap the
// operands to compute a transposed product):
//   op(a)(i, p) = a[i*sam + p*sak],  op(b)(p, j) = b[p*sbk + j*sbn],
//   c(i, j) = c[i*scm + j*scn].
// `accumulate` = 0 overwrites c without reading it.
//
// matmul_f32:       f32 x f32, SIMT FFMA, 64x64 tile, 256 threads, 4x4 each.
// matmul_f32_bf16:  f32 activations x bf16 frozen weights on the tensor
//                   cores (mma.sync m16n8k16, f32 accumulate). Each f32
//                   value of a is split into hi = bf16(a) and
//                   lo = bf16(a - hi), and both halves are multiplied by the
//                   (exact) bf16 weight: the product keeps about 16 bits of
//                   a's mantissa, close to an f32 product with bf16 weights.
// matmul_bf16_bf16: bf16 x bf16 (a weight times a weight), one mma per step.
// Tile 64x64x32, 128 threads = 4 warps in 2x2, each warp 32x32 = 2x4 mma
// tiles. Every load is bounds-checked (ragged m, n, k).
#include "common.cuh"

// ---- f32 SIMT ------------------------------------------------------------------

#define SBM 64
#define SBN 64
#define SBK 16

extern "C" __global__ void __launch_bounds__(256) matmul_f32(float* c, const float* a, const float* b, int m, int n,
                                                             int k, int sam, int sak, int sbk, int sbn, int scm,
                                                             int scn, int accumulate) {
    __shared__ float As[SBK][SBM + 4];
    __shared__ float Bs[SBK][SBN + 4];
    int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    int bm = blockIdx.y * SBM, bn = blockIdx.x * SBN;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;

    for (int k0 = 0; k0 < k; k0 += SBK) {
#pragma unroll
        for (int l = 0; l < 4; l++) {
            int e = tid + 256 * l;
            int i, p;
            if (sak == 1) {
                i = e / SBK;
                p = e % SBK;
            } else {
                p = e / SBM;
                i = e % SBM;
            }
            int gi = bm + i, gp = k0 + p;
            As[p][i] = (gi < m && gp < k) ? a[(i64)gi * sam + (i64)gp * sak] : 0.0f;
            int j;
            if (sbn == 1) {
                p = e / SBN;
                j = e % SBN;
            } else {
                j = e / SBK;
                p = e % SBK;
            }
            int gj = bn + j;
            gp = k0 + p;
            Bs[p][j] = (gj < n && gp < k) ? b[(i64)gp * sbk + (i64)gj * sbn] : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int p = 0; p < SBK; p++) {
            float av[4], bv[4];
#pragma unroll
            for (int i = 0; i < 4; i++) av[i] = As[p][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; j++) bv[j] = Bs[p][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int gi = bm + ty + 16 * i;
        if (gi >= m) continue;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int gj = bn + tx + 16 * j;
            if (gj >= n) continue;
            i64 o = (i64)gi * scm + (i64)gj * scn;
            c[o] = accumulate ? c[o] + acc[i][j] : acc[i][j];
        }
    }
}

// ---- tensor cores (bf16 mma.sync) ------------------------------------------------

#define TBM 64
#define TBN 64
#define TBK 32
#define TPAD 8  // row stride 40 halves = 20 words: fragment loads hit 32 distinct banks

// Split one element of a into its bf16 hi and lo parts.
__device__ __forceinline__ void split_bf16(float v, bf16_t& hi, bf16_t& lo) {
    hi = f32_to_bf16(v);
    lo = f32_to_bf16(v - bf16_to_f32(hi));
}
__device__ __forceinline__ void split_bf16(bf16_t v, bf16_t& hi, bf16_t& lo) {
    hi = v;
    lo = 0;
}

// SPLIT: multiply a's lo part too (a is f32); off when a is already bf16.
template <typename TA, bool SPLIT>
__device__ void matmul_mma(float* c, const TA* a, const bf16_t* b, int m, int n, int k, int sam, int sak,
                                  int sbk, int sbn, int scm, int scn, int accumulate) {
    __shared__ __align__(16) bf16_t Ahi[TBM][TBK + TPAD];
    __shared__ __align__(16) bf16_t Alo[SPLIT ? TBM : 1][TBK + TPAD];
    __shared__ __align__(16) bf16_t Bs[TBN][TBK + TPAD];  // n-major: k pairs are contiguous
    int tid = threadIdx.x, lane = tid % WARP, warp = tid / WARP;
    int g = lane / 4, t = lane % 4;
    int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
    int bm = blockIdx.y * TBM, bn = blockIdx.x * TBN;
    float acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int r = 0; r < 4; r++) acc[i][j][r] = 0.0f;

    for (int k0 = 0; k0 < k; k0 += TBK) {
        // Stage the tiles (bounds-checked, zero-filled), coalesced along
        // whichever of the two indices is contiguous in memory.
#pragma unroll 4
        for (int l = 0; l < (TBM * TBK) / 128; l++) {
            int e = tid + 128 * l;
            int i, p;
            if (sak == 1) {
                i = e / TBK;
                p = e % TBK;
            } else {
                p = e / TBM;
                i = e % TBM;
            }
            int gi = bm + i, gp = k0 + p;
            bf16_t hi = 0, lo = 0;
            if (gi < m && gp < k) split_bf16(a[(i64)gi * sam + (i64)gp * sak], hi, lo);
            Ahi[i][p] = hi;
            if (SPLIT) Alo[i][p] = lo;
            int j;
            if (sbk == 1) {
                j = e / TBK;
                p = e % TBK;
            } else {
                p = e / TBN;
                j = e % TBN;
            }
            int gj = bn + j;
            gp = k0 + p;
            Bs[j][p] = (gj < n && gp < k) ? b[(i64)gp * sbk + (i64)gj * sbn] : (bf16_t)0;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TBK; kk += 16) {
            u32 bf[4][2];
#pragma unroll
            for (int nt = 0; nt < 4; nt++) {
                int col = wn + nt * 8 + g;
                bf[nt][0] = *(const u32*)&Bs[col][kk + 2 * t];
                bf[nt][1] = *(const u32*)&Bs[col][kk + 8 + 2 * t];
            }
#pragma unroll
            for (int mt = 0; mt < 2; mt++) {
                int row = wm + mt * 16 + g;
                u32 af[4];
                af[0] = *(const u32*)&Ahi[row][kk + 2 * t];
                af[1] = *(const u32*)&Ahi[row + 8][kk + 2 * t];
                af[2] = *(const u32*)&Ahi[row][kk + 8 + 2 * t];
                af[3] = *(const u32*)&Ahi[row + 8][kk + 8 + 2 * t];
#pragma unroll
                for (int nt = 0; nt < 4; nt++) mma_16816(acc[mt][nt], af, bf[nt]);
                if (SPLIT) {
                    af[0] = *(const u32*)&Alo[row][kk + 2 * t];
                    af[1] = *(const u32*)&Alo[row + 8][kk + 2 * t];
                    af[2] = *(const u32*)&Alo[row][kk + 8 + 2 * t];
                    af[3] = *(const u32*)&Alo[row + 8][kk + 8 + 2 * t];
#pragma unroll
                    for (int nt = 0; nt < 4; nt++) mma_16816(acc[mt][nt], af, bf[nt]);
                }
            }
        }
        __syncthreads();
    }
    // Accumulator layout of m16n8: c0, c1 at (g, 2t), (g, 2t+1); c2, c3 at row g+8.
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int nt = 0; nt < 4; nt++)
#pragma unroll
            for (int r = 0; r < 4; r++) {
                int gi = bm + wm + mt * 16 + g + (r >= 2 ? 8 : 0);
                int gj = bn + wn + nt * 8 + 2 * t + (r & 1);
                if (gi < m && gj < n) {
                    i64 o = (i64)gi * scm + (i64)gj * scn;
                    c[o] = accumulate ? c[o] + acc[mt][nt][r] : acc[mt][nt][r];
                }
            }
}

extern "C" __global__ void __launch_bounds__(128) matmul_f32_bf16(float* c, const float* a, const bf16_t* b, int m,
                                                                  int n, int k, int sam, int sak, int sbk, int sbn,
                                                                  int scm, int scn, int accumulate) {
    matmul_mma<float, true>(c, a, b, m, n, k, sam, sak, sbk, sbn, scm, scn, accumulate);
}

extern "C" __global__ void __launch_bounds__(128) matmul_bf16_bf16(float* c, const bf16_t* a, const bf16_t* b, int m,
                                                                   int n, int k, int sam, int sak, int sbk, int sbn,
                                                                   int scm, int scn, int accumulate) {
    matmul_mma<bf16_t, false>(c, a, b, m, n, k, sam, sak, sbk, sbn, scm, scn, accumulate);
}
