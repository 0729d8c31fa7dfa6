// The products of kernels/gemm.cu on Hopper's warpgroup tensor-core
// instructions (wgmma.mma_async, sm_90a only): same semantics, arguments and
// preconditions, bigger tiles.
//
//   c[m x n] (+)= op(a) . op(b),  op(a)(i, p) = a[i*lda + p]   (a f32, k contiguous)
//                                 c(i, j)     = c[i*ldc + j]   (c f32, row-major)
//   NT: op(b)(p, j) = b[j*ldb + p]  (forward x . W^T, W stored [n][k])
//   NN: op(b)(p, j) = b[p*ldb + j]  (input gradient dy . W, W stored [k][n])
//
// Kernels (extern "C"), signature (float* c, const float* a, const bf16_t* b,
// int m, int n, int k, int lda, int ldb, int ldc, int accumulate,
// const float* bias, int bias_off, int epi, float* aux, double* part,
// float* aux2, float* out2) (bias and epilogue as in kernels/gemm.cu;
// EPI_PART's tile rows are 128 rows here too):
//   gemm_sm90_nt_f32_bf16_split, gemm_sm90_nn_f32_bf16_split: a split into
//       bf16 hi + lo, both multiplied (only the weights' rounding remains);
//   gemm_sm90_nt_f32_bf16, gemm_sm90_nn_f32_bf16: a rounded to bf16 once.
//
// Compiled for compute_90a only (wgmma exists on sm_90a and nowhere else:
// the PTX does not run on sm_100). The host loads this file on compute
// capability 9.0 alone.
//
// Launch contract:
//   grid  = (ceil(n / 256), ceil(m / 128), 1)
//   block = (256, 1, 1): two warpgroups, each 64 rows of the 128 x 256 tile
//   dynamic shared memory = W_SMEM_BYTES = 3 * (32768 + 32768) + 1024 = 197632
//       (opt-in above 48 KB with cuFuncSetAttribute; 1024 of it is slack to
//       align the stages to the 1024-byte period of the 128-byte swizzle).
// Preconditions: those of gemm.cu (k % 8 == 0, n % 8 == 0, lda % 4 == 0,
// ldb % 8 == 0, ldc % 2 == 0, 16-byte aligned a and b, 8-byte aligned c, no
// overlap of c with a or b); m, n, k otherwise arbitrary (edge tiles are
// zero-filled by cp.async with src-size 0 and never stored).
//
// Design:
//   block tile 128 x 256 x 64, 3-stage cp.async pipeline (each stage: a as
//   f32 [128][64] = 32 KB, b as bf16 = 32 KB);
//   a reaches the tensor cores through registers: each thread reads its
//   f32 pairs at the wgmma A-fragment positions (the m16n8k16 A layout, one
//   16-row slice per warp) and converts them to bf16 hi (and lo) with
//   cvt.rn.bf16x2; b is read by wgmma from shared memory through a matrix
//   descriptor, in the canonical 128-byte-swizzled layouts of the PTX ISA:
//     NT (K-major): [256 n rows][64 k] bf16, 128 bytes a row, 16-byte chunk c
//       of row r at chunk c ^ (r % 8); descriptor: leading byte offset
//       unused (1), stride byte offset 1024 (8 rows), the k16 step j at
//       start + 32 j;
//     NN (N-major, imm-trans-b = 1): four atoms of 64 n, each [64 k rows]
//       [64 n] = 8 KB, 128 bytes a k row, chunk c of row r at c ^ (r % 8);
//       leading byte offset 8192 (atom to atom along n), stride byte offset
//       1024 (8 k rows), the k16 step j at start + 2048 j;
//   per k tile and warpgroup: 4 k16 steps of wgmma.m64n256k16 (two with
//   the split), one commit group; one group stays in flight while the next
//   tile is waited for (wgmma.wait_group 1), so the tensor cores run
//   through the barriers and the next cp.async issue;
//   cp.async writes are generic-proxy writes and wgmma reads through the
//   async proxy: each thread fences (fence.proxy.async) its landed copies
//   before the barrier that publishes them.
//   Epilogue: float2 stores of the accumulator pairs, bounds-checked.
#include "common.cuh"

#define WBM 128
#define WBN 256
#define WBK 64
#define WSTAGES 3
#define WA_STAGE (WBM * WBK * 4)  // bytes of one a stage (32 KB)
#define WB_STAGE (WBN * WBK * 2)  // bytes of one b stage (32 KB)
#define W_SMEM_BYTES (WSTAGES * (WA_STAGE + WB_STAGE) + 1024)

// The a slot: [128 rows][64 floats], 256 bytes a row (16 chunks); chunk c of
// row r stored at chunk c ^ ((r % 4) * 2), so that the float2 fragment reads
// of a half-warp (4 rows x 32 bytes) hit 32 distinct banks.
__device__ __forceinline__ u32 wa_off(int row, int col) {
    return (u32)(row * 256 + ((((col >> 2) ^ ((row & 3) << 1))) << 4) + (col & 3) * 4);
}

__device__ __forceinline__ void fence_proxy_async() {
#ifdef BEFT_CUDA_EMU
    emu_fence_proxy_async();
#else
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wgmma_fence() {
#ifdef BEFT_CUDA_EMU
    emu_wgmma_fence();
#else
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wgmma_commit() {
#ifdef BEFT_CUDA_EMU
    emu_wgmma_commit();
#else
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void wgmma_wait() {
#ifdef BEFT_CUDA_EMU
    emu_wgmma_wait(N);
#else
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

// Pins the accumulator registers in program order here: the compiler sees
// wgmma's results as written when it is issued, so without this it could
// move their reads above the wait that makes them valid.
__device__ __forceinline__ void wgmma_fence_acc(float* d) {
#ifndef BEFT_CUDA_EMU
#pragma unroll
    for (int i = 0; i < 128; i++) asm volatile("" : "+f"(d[i])::"memory");
#endif
}

// A 128-byte-swizzled shared-memory matrix descriptor: start address,
// leading and stride byte offsets (all in 16-byte units, 14 bits each),
// base offset 0 (every stage starts on a 1024-byte boundary), swizzle mode 1.
__device__ __forceinline__ u64 wdesc(u32 start, u32 lbo, u32 sbo) {
    return (u64)((start & 0x3ffff) >> 4) | ((u64)((lbo & 0x3ffff) >> 4) << 16) |
           ((u64)((sbo & 0x3ffff) >> 4) << 32) | (1ull << 62);
}

// d (64 x 256 per warpgroup, f32) += a (64 x 16 bf16, registers) . b (16 x
// 256 bf16, descriptor). TRANS: b is N-major.
template <int TRANS>
__device__ __forceinline__ void wgmma_256(float* d, const u32* a, u64 desc) {
#ifdef BEFT_CUDA_EMU
    emu_wgmma_bf16(d, 256, a, desc, 1, TRANS);
#else
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
        "{%128, %129, %130, %131}, %132, 1, 1, 1, %133;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
          "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
          "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
          "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
          "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]),
          "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]),
          "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]),
          "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]),
          "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(TRANS));
#endif
}

template <bool NN, bool SPLIT>
__device__ __forceinline__ void gemm_sm90_body(GEMM_PARAMS) {
    extern __shared__ __align__(16) unsigned char gemm_sm90_smem[];
    // Stages in the shared window, 1024-byte aligned: a slots first
    // ([WSTAGES][32 KB]), then b slots.
    const u32 base = (smem_addr(gemm_sm90_smem) + 1023u) & ~1023u;
    const unsigned char* gbase = gemm_sm90_smem + (base - smem_addr(gemm_sm90_smem));
    const u32 bs_base = base + WSTAGES * WA_STAGE;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    int bm, bn;
    raster_origin<WBM, WBN>(bm, bn);

    // Copy roles (16-byte chunks, 8 per thread and operand, rows l apart):
    //   a:    row (tid >> 4) + 16 l, chunk tid & 15 (a warp: 2 rows x 256 bytes);
    //   b NT: n row (tid >> 3) + 32 l, chunk tid & 7 (a warp: 4 rows x 128 bytes);
    //   b NN: k row (tid >> 5) + 8 l, n chunk tid & 31 (a warp: one k row,
    //         512 bytes), stored in atom (chunk >> 3) at chunk (chunk & 7).
    // The swizzle of each depends only on row % 4 or row % 8, the same for
    // every l.
    const int a_row = tid >> 4, a_ch = tid & 15;
    const u32 a_dst = (u32)(a_row * 256 + ((a_ch ^ ((a_row & 3) << 1)) << 4));
    const float* a_ld = a + ((i64)(bm + a_row) * lda + a_ch * 4);
    const int a_rows_left = m - bm - a_row;  // row a_row + 16 l in range iff 16 l < a_rows_left
    int b_row, b_ch;
    u32 b_dst;
    const bf16_t* b_ld;
    if (!NN) {
        b_row = tid >> 3, b_ch = tid & 7;
        b_dst = (u32)(b_row * 128 + ((b_ch ^ (b_row & 7)) << 4));
        b_ld = b + ((i64)(bn + b_row) * ldb + b_ch * 8);
    } else {
        b_row = tid >> 5, b_ch = tid & 31;
        b_dst = (u32)((b_ch >> 3) * 8192 + b_row * 128 + (((b_ch & 7) ^ (b_row & 7)) << 4));
        b_ld = b + ((i64)b_row * ldb + bn + b_ch * 8);
    }

    auto load_tile = [&](int s, int k0) {
        const u32 as = base + (u32)s * WA_STAGE;
        const bool a_k_ok = k0 + a_ch * 4 < k;
#pragma unroll
        for (int l = 0; l < 8; l++) {
            const bool ok = a_k_ok && 16 * l < a_rows_left;
            cp_async16(as + a_dst + 4096u * l, ok ? (const void*)(a_ld + ((i64)l * 16 * lda + k0)) : (const void*)a,
                       ok);
        }
        const u32 bs = bs_base + (u32)s * WB_STAGE;
#pragma unroll
        for (int l = 0; l < 8; l++) {
            bool ok;
            const bf16_t* src;
            if (!NN) {
                ok = bn + b_row + 32 * l < n && k0 + b_ch * 8 < k;
                src = b_ld + ((i64)l * 32 * ldb + k0);
            } else {
                ok = k0 + b_row + 8 * l < k && bn + b_ch * 8 < n;
                src = b_ld + ((i64)(k0 + 8 * l) * ldb);
            }
            cp_async16(bs + b_dst + (NN ? 1024u : 4096u) * l, ok ? (const void*)src : (const void*)b, ok);
        }
    };

    float acc[128];
#pragma unroll
    for (int i = 0; i < 128; i++) acc[i] = 0.0f;

    // k tiles, rounded up to an even count: the loop runs tiles in pairs (a
    // wgmma pipeline must not cross a branch, or ptxas serializes it); a
    // tile past k is all zeros (every copy of it zero-fills).
    const int kpad = ((k + 2 * WBK - 1) / (2 * WBK)) * (2 * WBK);
#pragma unroll
    for (int s = 0; s < WSTAGES - 1; s++) {
        if (s * WBK < kpad) load_tile(s, s * WBK);
        cp_async_commit();
    }

    // A fragment of the k16 step j: rows r0 = 64 wg + 16 w + g and r0 + 8,
    // columns 16 j + 2t (+1) and 16 j + 2t + 8 (+1): the m16n8k16 A layout.
    const int r0 = (warp >> 2) * 64 + (warp & 3) * 16 + g;

    wgmma_fence_acc(acc);
    // One k tile. The A registers are read by wgmma asynchronously, until
    // the wait that retires its group: tiles alternate between two register
    // sets, so that a tile's conversion never writes the registers of the
    // group still in flight (the previous tile's).
    int rs = 0;  // the slot read by this tile
    auto tile = [&](int k0, u32(&ahi)[4][4], u32(&alo)[4][4]) {
        cp_async_wait<WSTAGES - 2>();  // this thread's copies of tile k0 have landed
        fence_proxy_async();           // ... and are visible to the async proxy (wgmma)
        __syncthreads();               // ... everyone's
        const unsigned char* As = gbase + rs * WA_STAGE;
        const u32 bst = bs_base + (u32)rs * WB_STAGE;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            float2 x[4];
            x[0] = *(const float2*)(As + wa_off(r0, 16 * j + 2 * t));
            x[1] = *(const float2*)(As + wa_off(r0 + 8, 16 * j + 2 * t));
            x[2] = *(const float2*)(As + wa_off(r0, 16 * j + 2 * t + 8));
            x[3] = *(const float2*)(As + wa_off(r0 + 8, 16 * j + 2 * t + 8));
#pragma unroll
            for (int q = 0; q < 4; q++) {
                ahi[j][q] = bf16x2_rn(x[q].x, x[q].y);
                if (SPLIT)
                    alo[j][q] = bf16x2_rn(x[q].x - __uint_as_float(ahi[j][q] << 16),
                                          x[q].y - __uint_as_float(ahi[j][q] & 0xffff0000u));
            }
        }
        wgmma_fence();
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const u64 desc = NN ? wdesc(bst + 2048u * j, 8192u, 1024u) : wdesc(bst + 32u * j, 16u, 1024u);
            wgmma_256<NN ? 1 : 0>(acc, ahi[j], desc);
            if (SPLIT) wgmma_256<NN ? 1 : 0>(acc, alo[j], desc);
        }
        wgmma_commit();
        // This warpgroup's previous tile is done; after the barrier, every
        // warpgroup's is, and its slot ((rs - 1) mod 3) can be refilled.
        wgmma_wait<1>();
        __syncthreads();
        if (k0 + (WSTAGES - 1) * WBK < kpad) load_tile(rs == 0 ? WSTAGES - 1 : rs - 1, k0 + (WSTAGES - 1) * WBK);
        cp_async_commit();
        rs = rs == WSTAGES - 1 ? 0 : rs + 1;
    };
    u32 ahi0[4][4], alo0[4][4], ahi1[4][4], alo1[4][4];
    for (int k0 = 0; k0 < kpad; k0 += 2 * WBK) {
        tile(k0, ahi0, alo0);
        tile(k0 + WBK, ahi1, alo1);
    }
    wgmma_wait<0>();
    wgmma_fence_acc(acc);
    cp_async_wait<0>();

    // Accumulator layout (per warp, its 16 rows): acc[4i], acc[4i+1] at
    // (row g, columns 8i + 2t, +1); acc[4i+2], acc[4i+3] at row g + 8.
    // With EPI_PART, each warp's column sums go to red[warp][column] (8
    // groups of 16 rows, in the pipeline's shared memory, free once every
    // warp is past its last read of it).
    int em, en;
    raster_origin<WBM, WBN>(em, en);
    const int ltid = tid_x();
    const int om = em + (ltid >> 5) * 16 + ((ltid & 31) >> 2);
    const int tc = 2 * (ltid & 3);
    const int on = en + tc;
    double* red = (double*)gemm_sm90_smem;
    if (epi & EPI_PART) __syncthreads();
#pragma unroll
    for (int i = 0; i < 32; i++) {
        const float2 bb = bias_pair(bias, bias_off, n, on + 8 * i);
        double sx = 0.0, sy = 0.0;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const float2 v = epi_pair(c, aux, aux2, out2, epi, ldc, m, n, om + 8 * h, on + 8 * i,
                                      acc[4 * i + 2 * h] + bb.x, acc[4 * i + 2 * h + 1] + bb.y, accumulate);
            sx += v.x;
            sy += v.y;
        }
        col_pair_part(epi, red + (ltid >> 5) * WBN + tc + 8 * i, sx, sy, ltid & 31);
    }
    if (epi & EPI_PART) col_sums_out<8, WBN>(red, part, n, em / WBM, en);
}

extern "C" __global__ void __launch_bounds__(256, 1)
    gemm_sm90_nt_f32_bf16_split(GEMM_PARAMS) {
    gemm_sm90_body<false, true>(GEMM_ARGS);
}

extern "C" __global__ void __launch_bounds__(256, 1)
    gemm_sm90_nn_f32_bf16_split(GEMM_PARAMS) {
    gemm_sm90_body<true, true>(GEMM_ARGS);
}

extern "C" __global__ void __launch_bounds__(256, 1)
    gemm_sm90_nt_f32_bf16(GEMM_PARAMS) {
    gemm_sm90_body<false, false>(GEMM_ARGS);
}

extern "C" __global__ void __launch_bounds__(256, 1)
    gemm_sm90_nn_f32_bf16(GEMM_PARAMS) {
    gemm_sm90_body<true, false>(GEMM_ARGS);
}
