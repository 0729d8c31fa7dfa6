// Fast products of f32 activations with bf16 frozen weights on the tensor
// cores: the two shapes that dominate a training step, with exactly the
// semantics of matmul_f32_bf16 (kernels/matmul.cu) restricted to
//
//   c[m x n] (+)= op(a) . op(b),  op(a)(i, p) = a[i*lda + p]   (a f32, k contiguous)
//                                 c(i, j)     = c[i*ldc + j]   (c f32, row-major)
//   NT: op(b)(p, j) = b[j*ldb + p]  (forward x . W^T, W stored [n][k])
//   NN: op(b)(p, j) = b[p*ldb + j]  (input gradient dy . W, W stored [k][n])
//
// `accumulate` = 0 overwrites c without reading it. With bias_off >= 0 the
// epilogue adds bias[bias_off + j] to column j first (a linear layer's bias,
// fused: no separate pass over c): c(i, j) (+)= (op(a) . op(b))(i, j) + bias;
// bias_off < 0: no bias (the pointer is not read). `epi` (common.cuh) fuses
// an activation: EPI_FWD + act also writes aux = act(c) (the layer's
// activation, no pass of its own), EPI_GRAD + act multiplies the product by
// act'(aux) (the gradient at the activation's input from the product that
// gives the one at its output); aux has c's shape and stride (ldc) and is
// not read with EPI_NONE. EPI_GLU (with EPI_FWD or EPI_GRAD) is a gated
// unit's epilogue instead, with aux2 and out2 (c's shape too; see
// common.cuh). EPI_PART adds the column sums of the stored values
// per 128-row tile into part (ceil(m / 128) x n doubles; not touched
// without it): a fused bias gradient.
//
// Kernels (extern "C"), all with the signature
//   (float* c, const float* a, const bf16_t* b, int m, int n, int k,
//    int lda, int ldb, int ldc, int accumulate, const float* bias, int bias_off,
//    int epi, float* aux, double* part, float* aux2, float* out2):
//   gemm_nt_f32_bf16_split, gemm_nn_f32_bf16_split: every f32 value of a is
//       split into hi = bf16(a) and lo = bf16(a - hi) and both are multiplied
//       by the (exact) bf16 weight, as matmul_f32_bf16: only the weight's
//       rounding remains.
//   gemm_nt_f32_bf16, gemm_nn_f32_bf16: a rounded to bf16 once (round to
//       nearest even, like PyTorch autocast), one mma per step.
//
// Launch contract:
//   grid  = (ceil(n / 128), ceil(m / 128), 1)   (so m <= 65535 * 128)
//   block = (256, 1, 1)                         (the index math assumes exactly 256)
//   dynamic shared memory = GEMM_SMEM_BYTES
//       = GSTAGES * (GBM*GBK*4 + GBN*GBK*2) = 3 * (16384 + 8192) = 73728 bytes,
//   above the 48 KB default: the host must first call
//   cuFuncSetAttribute(f, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, >= 73728)
//   on each of the four kernels (every sm_80+ GPU allows it; two blocks fit
//   an SM on A100 and H100: 128 registers a thread at most).
// Preconditions (the host checks them before choosing these kernels, else it
// falls back to matmul_f32_bf16):
//   m >= 1, n >= 1, k >= 1 (k = 0 never launches: the host fills or skips);
//   k % 8 == 0, n % 8 == 0, lda % 4 == 0, ldb % 8 == 0, ldc % 2 == 0;
//   lda >= k, ldc >= n, NT: ldb >= k, NN: ldb >= n;
//   a and b 16-byte aligned, c 8-byte aligned (buffer bases from the
//   allocator are 256-byte aligned; an offset view must keep this);
//   c does not overlap a or b.
// m is arbitrary, and n and k need not be multiples of the tile: the
// out-of-range parts of edge tiles are zero-filled (cp.async with src-size 0,
// the source pointer replaced by the buffer's base) and never stored. (k % 8
// makes every 16-byte chunk of a's and NT-b's rows either wholly inside or
// wholly outside [0, k); n % 8 does the same for NN-b's rows, and keeps each
// pair of output columns inside [0, n).)
//
// Design (sm_80 / sm_90, mma.sync.m16n8k16 bf16, f32 accumulate):
//   block tile 128 x 128 x 32, 8 warps as 4 (m) x 2 (n), each warp 32 x 64 =
//   2 x 8 mma tiles (64 f32 accumulators per thread);
//   a 3-stage cp.async pipeline (16-byte cp.async.cg, one commit group per
//   k tile, one __syncthreads per k tile);
//   a tile staged as f32 (128 rows x 32 floats), read as float2 pairs at the
//   mma A fragment positions and converted to bf16 hi (and lo) in registers
//   (cvt.rn.bf16x2.f32);
//   b tile staged as bf16 and read with ldmatrix.x4 (NT: [n][k], NN: [k][n]
//   with .trans);
//   16-byte chunks XOR-swizzled inside each row (see gemm_a_sw, gemm_bnt_sw),
//   so the cp.async writes, the float2 reads and the ldmatrix reads are all
//   free of bank conflicts;
//   blocks walk the output in groups of 8 block rows (L2 reuse);
//   epilogue: float2 stores of the accumulator pairs, bounds-checked.
#include "common.cuh"

#define GBM 128
#define GBN 128
#define GBK 32
#define GSTAGES 3
#define GA_STAGE (GBM * GBK)  // floats of one a stage (16 KB)
#define GB_STAGE (GBN * GBK)  // bf16 of one b stage (8 KB)
#define GEMM_SMEM_BYTES (GSTAGES * (GA_STAGE * 4 + GB_STAGE * 2))  // 73728

// Shared-memory layouts (16-byte chunks XOR-swizzled within a row, so that
// both the cp.async writes and the fragment reads hit distinct banks):
//   a slot: [GBM][GBK] f32, 8 chunks a row, chunk c of row r stored at
//           chunk c ^ gemm_a_sw(r);
//   b slot, NT: [GBN][GBK] bf16 (n rows, k contiguous), 4 chunks a row,
//           chunk c of row r at c ^ gemm_bnt_sw(r);
//   b slot, NN: [GBK][GBN] bf16 (k rows, n contiguous), 16 chunks a row,
//           chunk c of row r at c ^ (r % 8).
__device__ __forceinline__ int gemm_a_sw(int row) { return ((row & 1) << 2) | (row & 2); }
__device__ __forceinline__ int gemm_bnt_sw(int row) { return (row & 2) | ((row >> 2) & 1); }

// Offset (in floats) of a(row, col) inside one a slot.
__device__ __forceinline__ int gemm_a_off(int row, int col) {
    return row * GBK + (((col >> 2) ^ gemm_a_sw(row)) << 2) + (col & 3);
}

template <bool NN, bool SPLIT>
__device__ __forceinline__ void gemm_body(GEMM_PARAMS) {
    extern __shared__ __align__(16) unsigned char gemm_smem[];
    // Slots: a at [0, GSTAGES * GA_STAGE * 4) bytes ([GSTAGES][GBM][GBK] f32),
    // b after it ([GSTAGES][GB_STAGE] bf16).
    const u32 as_base = smem_addr(gemm_smem);
    const u32 bs_base = as_base + GSTAGES * GA_STAGE * 4;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int wm = (warp >> 1) * 32, wn = (warp & 1) * 64;
    int bm, bn;
    raster_origin<GBM, GBN>(bm, bn);

    // Per-thread copy roles (each 16-byte chunk: one cp.async).
    //   a: GBM rows x 8 chunks; rows a_row + 64 l, chunks a_ch + 4 h (l, h in {0, 1});
    //      one warp instruction covers 8 rows x 64 contiguous bytes.
    //   b NT: GBN rows x 4 chunks; row b_row, chunks b_ch + 2 h.
    //   b NN: GBK rows x 16 chunks; row b_row, chunks b_ch + 8 h.
    // a_ld / b_ld point at chunk (l = 0, h = 0) of k tile 0.
    const int a_row = tid >> 2, a_ch = tid & 3;
    const int b_row = NN ? tid >> 3 : tid >> 1, b_ch = NN ? tid & 7 : tid & 1;
    const float* a_ld = a + ((i64)(bm + a_row) * lda + a_ch * 4);
    const bf16_t* b_ld = NN ? b + ((i64)b_row * ldb + bn + b_ch * 8) : b + ((i64)(bn + b_row) * ldb + b_ch * 8);
    // Destination byte offsets inside a slot of chunk (l = 0, h = 0):
    //   a: h = 1 is chunk a_ch + 4, stored at (a_ch ^ sw) ^ 4: offset ^ 64; l = 1 is + 64 rows = + 8192;
    //   b NT: h = 1 is chunk b_ch + 2, stored at (b_ch ^ sw) ^ 2: offset ^ 32;
    //   b NN: h = 1 is chunk b_ch + 8, stored at (b_ch ^ sw) + 8: offset + 128.
    const u32 a_dst = (u32)(a_row * GBK + ((a_ch ^ gemm_a_sw(a_row)) << 2)) * 4u;
    const u32 b_dst = NN ? (u32)(b_row * GBN + ((b_ch ^ (b_row & 7)) << 3)) * 2u
                         : (u32)(b_row * GBK + ((b_ch ^ gemm_bnt_sw(b_row)) << 3)) * 2u;
    const int a_rows_left = m - bm - a_row;  // row a_row + 64 l is in range iff 64 l < a_rows_left

    // Stage the k tile starting at k0 into slot `s`.
    auto load_tile = [&](int s, int k0) {
        const u32 as = as_base + (u32)s * (GA_STAGE * 4u);
#pragma unroll
        for (int l = 0; l < 2; l++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const bool ok = 64 * l < a_rows_left && k0 + a_ch * 4 + 16 * h < k;
                const float* src = ok ? a_ld + ((i64)l * 64 * lda + k0 + 16 * h) : a;
                cp_async16(as + ((a_dst ^ (64u * h)) + 8192u * l), src, ok);
            }
        const u32 bs = bs_base + (u32)s * (GB_STAGE * 2u);
#pragma unroll
        for (int h = 0; h < 2; h++) {
            bool ok;
            const bf16_t* src;
            u32 dst;
            if (!NN) {
                ok = bn + b_row < n && k0 + b_ch * 8 + 16 * h < k;
                src = ok ? b_ld + (k0 + 16 * h) : b;
                dst = b_dst ^ (32u * h);
            } else {
                ok = k0 + b_row < k && bn + b_ch * 8 + 64 * h < n;
                src = ok ? b_ld + ((i64)k0 * ldb + 64 * h) : b;
                dst = b_dst + 128u * h;
            }
            cp_async16(bs + dst, src, ok);
        }
    };

    float acc[2][8][4];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int r = 0; r < 4; r++) acc[i][j][r] = 0.0f;

    // Prologue: the first GSTAGES - 1 k tiles, one commit group each (empty
    // groups past the end keep the group count uniform).
#pragma unroll
    for (int s = 0; s < GSTAGES - 1; s++) {
        if (s * GBK < k) load_tile(s, s * GBK);
        cp_async_commit();
    }

    // Fragment read offsets (bytes inside a slot), fixed for the whole k loop.
    // Every swizzle is an XOR on the chunk index, so a fragment at a chunk
    // 2 j (j < 4) further along the same row is at offset ^ 32 j.
    // a: the float pair at (row wm + g, col 2 t); col + 8 j is a_frag ^ 32 j;
    //    rows + 8 and + 16 are + 1024 and + 2048 bytes (the swizzle depends
    //    on row % 4 only).
    const u32 a_frag = (u32)gemm_a_off(wm + g, 2 * t) * 4u;
    // b (ldmatrix.x4): lanes 8q..8q+7 address the 8 rows of matrix q; the
    // matrices are (nt 2jp, k kk..kk+7), (nt 2jp, k kk+8..kk+15),
    // (nt 2jp+1, k kk..kk+7), (nt 2jp+1, k kk+8..kk+15).
    //   NT: rows are n, columns k: chunk kk / 8 + q % 2 of row wn + 8 (q / 2) + r
    //       (+ 16 jp rows: + 1024 jp bytes): b_frag ^ 32 (kk / 16) + 1024 jp.
    //   NN: rows are k, columns n (transposed on load): chunk wn / 8 + 2 jp + q / 2
    //       of row kk + 8 (q % 2) + r: b_frag ^ 32 jp + 256 kk.
    const int lq = lane >> 3, lr = lane & 7;
    u32 b_frag;
    if (!NN) {
        const int nr = wn + (lq >> 1) * 8 + lr;
        b_frag = (u32)(nr * GBK + (((lq & 1) ^ gemm_bnt_sw(nr)) << 3)) * 2u;
    } else {
        const int kr = ((lq & 1) << 3) + lr;
        b_frag = (u32)(kr * GBN + ((((wn >> 3) + (lq >> 1)) ^ (kr & 7)) << 3)) * 2u;
    }

    int rs = 0;  // slot read this iteration; slot (rs - 1) mod GSTAGES is written
    for (int k0 = 0; k0 < k; k0 += GBK) {
        cp_async_wait<GSTAGES - 2>();  // tile k0 has landed (this thread's copies)
        __syncthreads();           // ... everyone's; and the slot read last iteration is free
        if (k0 + (GSTAGES - 1) * GBK < k) load_tile(rs == 0 ? GSTAGES - 1 : rs - 1, k0 + (GSTAGES - 1) * GBK);
        cp_async_commit();
        const unsigned char* Ast = gemm_smem + rs * (GA_STAGE * 4);
        const u32 bst = bs_base + (u32)rs * (GB_STAGE * 2u);
#pragma unroll
        for (int kk = 0; kk < GBK; kk += 16) {
            // b fragments of the warp's 8 n tiles: b[nt][0] = (k 2t..2t+1, n g),
            // b[nt][1] = (k 2t+8..2t+9, n g) of the tile's k16 x n8 block.
            u32 bf[8][2];
#pragma unroll
            for (int jp = 0; jp < 4; jp++) {
                if (!NN) {
                    ldsm_x4(bst + (b_frag ^ (32u * (kk >> 4))) + jp * 1024u, bf[2 * jp][0], bf[2 * jp][1],
                                 bf[2 * jp + 1][0], bf[2 * jp + 1][1]);
                } else {
                    ldsm_x4_trans(bst + (b_frag ^ (32u * jp)) + kk * 256u, bf[2 * jp][0], bf[2 * jp][1],
                                       bf[2 * jp + 1][0], bf[2 * jp + 1][1]);
                }
            }
#pragma unroll
            for (int mt = 0; mt < 2; mt++) {
                // a fragment: reg 0 = (row g, k 2t..2t+1), 1 = (row g+8, same k),
                // 2 = (row g, k 2t+8..2t+9), 3 = (row g+8, k 2t+8..2t+9).
                const unsigned char* p0 = Ast + (a_frag ^ (32u * (kk >> 3))) + mt * 2048;
                const unsigned char* p1 = Ast + (a_frag ^ (32u * ((kk >> 3) + 1))) + mt * 2048;
                float2 x[4];
                x[0] = *(const float2*)p0;
                x[1] = *(const float2*)(p0 + 1024);
                x[2] = *(const float2*)p1;
                x[3] = *(const float2*)(p1 + 1024);
                u32 ahi[4];
#pragma unroll
                for (int q = 0; q < 4; q++) ahi[q] = bf16x2_rn(x[q].x, x[q].y);
#pragma unroll
                for (int nt = 0; nt < 8; nt++) mma_16816(acc[mt][nt], ahi, bf[nt]);
                if (SPLIT) {
                    u32 alo[4];
#pragma unroll
                    for (int q = 0; q < 4; q++)
                        alo[q] = bf16x2_rn(x[q].x - __uint_as_float(ahi[q] << 16),
                                             x[q].y - __uint_as_float(ahi[q] & 0xffff0000u));
#pragma unroll
                    for (int nt = 0; nt < 8; nt++) mma_16816(acc[mt][nt], alo, bf[nt]);
                }
            }
        }
        rs = rs == GSTAGES - 1 ? 0 : rs + 1;
    }
    cp_async_wait<0>();

    // Accumulator layout of m16n8: c0, c1 at (g, 2t), (g, 2t+1); c2, c3 at row
    // g+8. The output origin is computed afresh (cheaper than keeping it in a
    // register through the k loop).
    // With EPI_PART, each warp's column sums go to red[row group][column]
    // (4 groups of 32 rows, in the pipeline's shared memory, free once every
    // warp is past its last read of it).
    int em, en;
    raster_origin<GBM, GBN>(em, en);
    const int ltid = tid_x();
    const int om = em + ((ltid >> 6) * 32) + ((ltid & 31) >> 2);
    const int tc = (((ltid >> 5) & 1) * 64) + 2 * (ltid & 3);
    const int on = en + tc;
    double* red = (double*)gemm_smem;
    if (epi & EPI_PART) __syncthreads();
#pragma unroll
    for (int nt = 0; nt < 8; nt++) {
        const float2 bb = bias_pair(bias, bias_off, n, on + nt * 8);
        double sx = 0.0, sy = 0.0;
#pragma unroll
        for (int mt = 0; mt < 2; mt++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const float2 v = epi_pair(c, aux, aux2, out2, epi, ldc, m, n, om + mt * 16 + 8 * h, on + nt * 8,
                                          acc[mt][nt][2 * h] + bb.x, acc[mt][nt][2 * h + 1] + bb.y, accumulate);
                sx += v.x;
                sy += v.y;
            }
        col_pair_part(epi, red + (ltid >> 6) * GBN + tc + nt * 8, sx, sy, ltid & 31);
    }
    if (epi & EPI_PART) col_sums_out<4, GBN>(red, part, n, em / GBM, en);
}

extern "C" __global__ void __launch_bounds__(256, 2)
    gemm_nt_f32_bf16_split(GEMM_PARAMS) {
    gemm_body<false, true>(GEMM_ARGS);
}

extern "C" __global__ void __launch_bounds__(256, 2)
    gemm_nn_f32_bf16_split(GEMM_PARAMS) {
    gemm_body<true, true>(GEMM_ARGS);
}

extern "C" __global__ void __launch_bounds__(256, 2)
    gemm_nt_f32_bf16(GEMM_PARAMS) {
    gemm_body<false, false>(GEMM_ARGS);
}

extern "C" __global__ void __launch_bounds__(256, 2)
    gemm_nn_f32_bf16(GEMM_PARAMS) {
    gemm_body<true, false>(GEMM_ARGS);
}
