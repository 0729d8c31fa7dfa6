// The CPU emulator's runtime: a scheduler that runs each CUDA thread of a
// block as a fiber, the warp-collective and asynchronous-copy instructions
// the kernels use, and the subset of the CUDA driver API that cudarc calls
// for the beft backend, exported under the driver's own names so that this
// library can stand in for libcuda.so (see emu.h and docs/cuda-emulator.md).
//
// Execution model. One launch at a time (a process-wide lock); blocks run
// one after the other in launch order; inside a block every thread is a
// fiber on the calling CPU thread, run until it reaches __syncthreads or a
// warp-collective instruction (shuffle, ldmatrix, mma, the wgmma family),
// where it yields.
// A warp is released when all of its live lanes wait at the same kind of
// collective; the block when all of its live threads wait at
// __syncthreads; a released warp runs on first, as far as it can, before
// any other thread (so a warp that reads shared memory without the barrier
// that orders it after the other warps' writes reads stale or poisoned
// values). Anything else that leaves no thread runnable is reported as a
// deadlock. Memory operations are executed in program order per
// thread; cp.async copies are held back until the wait that retires their
// group, and wgmma products until the wgmma.wait_group that retires theirs.
//
// Checks, reported as a launch error (CUDA_ERROR_ILLEGAL_ADDRESS or
// CUDA_ERROR_ILLEGAL_INSTRUCTION) with the kernel, block and thread on
// stderr: shared-window addresses outside the launch's dynamic shared
// memory, misaligned ldmatrix rows and cp.async addresses, a shuffle whose
// mask names an exited or missing lane, divergent warp collectives, wgmma
// without a wgmma.fence or never waited for, or outside whole warpgroups,
// barrier deadlocks, writes past the end of a device allocation (a guard
// zone after each one, checked after every launch), launches beyond the
// function's dynamic shared-memory limit (48 KiB unless raised with
// cuFuncSetAttribute, as on the real driver), and malformed launch shapes.
// Fresh device allocations and each block's dynamic shared memory are
// filled with 0xff bytes (NaN as f32) so that unwritten values show.

#include <sys/mman.h>
#include <time.h>

#include <algorithm>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "emu.h"

#define EXPORT extern "C" __attribute__((visibility("default")))

// CUresult values (cuda.h).
enum {
    CUDA_SUCCESS_CODE = 0,
    CUDA_ERROR_INVALID_VALUE_CODE = 1,
    CUDA_ERROR_OUT_OF_MEMORY_CODE = 2,
    CUDA_ERROR_INVALID_DEVICE_CODE = 101,
    CUDA_ERROR_INVALID_IMAGE_CODE = 200,
    CUDA_ERROR_INVALID_HANDLE_CODE = 400,
    CUDA_ERROR_NOT_FOUND_CODE = 500,
    CUDA_ERROR_ILLEGAL_ADDRESS_CODE = 700,
    CUDA_ERROR_ILLEGAL_INSTRUCTION_CODE = 715,
};

emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

// ---- kernel registry (filled by the generated per-file units) ---------------

static std::map<std::string, const EmuKernel*>& registry() {
    static std::map<std::string, const EmuKernel*> r;
    return r;
}

extern "C" void emu_register(const EmuKernel* k, int n) {
    for (int i = 0; i < n; i++) registry()[k[i].name] = &k[i];
}

// ---- fibers -----------------------------------------------------------------

extern "C" void emu_switch(void** save_sp, void* to_sp);
// Saves the callee-saved registers on the current stack, stores the stack
// pointer in *save_sp, and resumes the context saved at to_sp (System V
// x86-64; the kernels never change MXCSR or the x87 control word, so those
// are not switched).
asm(R"(
    .text
    .globl emu_switch
    .hidden emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");

enum State { RUN, WARP_WAIT, BLOCK_WAIT, DONE };

// Which warp collective a lane waits at (a warp's lanes must agree).
enum Kind { K_NONE, K_SHFL, K_LDSM, K_MMA, K_WGFENCE, K_WGMMA, K_WGCOMMIT, K_WGWAIT };

static const char* kind_name(int k) {
    switch (k) {
        case K_SHFL:
            return "shuffle";
        case K_LDSM:
            return "ldmatrix";
        case K_MMA:
            return "mma";
        case K_WGFENCE:
            return "wgmma.fence";
        case K_WGMMA:
            return "wgmma.mma_async";
        case K_WGCOMMIT:
            return "wgmma.commit_group";
        case K_WGWAIT:
            return "wgmma.wait_group";
        default:
            return "?";
    }
}

struct CpOp {
    unsigned char* dst;
    const unsigned char* src;
    unsigned bytes, src_bytes;
};

struct Fiber {
    void* sp = nullptr;
    int state = DONE;
    // Warp collectives this lane has entered; the operands it offers to
    // collective number r sit in slot (r & 1), so a lane that runs ahead
    // into the next collective never overwrites what a slower lane still
    // reads from the last one.
    unsigned colls = 0;
    uint64_t val[2] = {0, 0};
    unsigned addr[2] = {0, 0};
    const unsigned* a[2] = {nullptr, nullptr};
    const unsigned* b[2] = {nullptr, nullptr};
    float* d[2] = {nullptr, nullptr};  // wgmma: the accumulator registers
    // cp.async: queued copies, and the end of each committed group in `cp`.
    std::vector<CpOp> cp;
    std::vector<size_t> groups;
};

// One wgmma.mma_async of a warp (its 16 rows of the warpgroup's 64), as
// issued: every lane's A registers (copied: the instruction has read them)
// and where its accumulators live (written when the op is retired).
struct WgOp {
    int n, scale_d, trans_b;
    uint64_t desc;
    unsigned a[32][4];
    float* d[32];
};

// Per warp: arrivals at the current collective, the results of the last
// ldmatrix/mma, computed once for all lanes by the first lane resumed, and
// the wgmma ops in flight.
struct Warp {
    int live = 0, waiting = 0, kind = K_NONE;
    unsigned done_round = ~0u;  // the collective count whose results are in `out`
    unsigned out[32][4];  // ldmatrix: each lane's registers
    float acc[16][8];     // mma: the 16 x 8 product a . b
    std::vector<WgOp> wg_ops;     // issued, not yet retired, in order
    std::vector<size_t> wg_groups;  // end (in wg_ops) of each committed group
    bool wg_fenced = false;         // a wgmma.fence since the last wait
};

static const size_t STACK_BYTES = 256 * 1024;
static std::vector<unsigned char*> stacks;  // top of each fiber stack
static std::vector<Fiber> fibers;
static std::vector<Warp> warps;
// Fibers to resume, front first. A released warp goes to the front: it runs
// on as far as it can before the other warps catch up (the schedule that
// exposes a missing __syncthreads: a warp reads shared memory that the
// others have not written yet).
static std::deque<int> runq;
static int block_live = 0, block_waiting = 0;
static void* sched_sp = nullptr;
static int cur = 0;       // the running fiber
static int nthreads = 0;  // threads of the block

static const EmuKernel* cur_kernel = nullptr;
static void** cur_params = nullptr;
static unsigned char* dyn_base = nullptr;
static unsigned dyn_bytes = 0;

// The first failure of the launch (empty: none), and its CUDA error.
static std::string failure;
static int failure_code = 0;
static unsigned char scratch[4096] __attribute__((aligned(128)));

static void fail(int code, const char* fmt, ...) {
    if (!failure.empty()) return;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    char where[256];
    snprintf(where, sizeof where, "kernel %s, block (%u, %u, %u), thread %d: ", cur_kernel ? cur_kernel->name : "?",
             blockIdx.x, blockIdx.y, blockIdx.z, cur);
    failure = std::string(where) + msg;
    failure_code = code;
}

static void release_warp(int w) {
    Warp& wp = warps[w];
    for (int i = std::min(nthreads, w * 32 + 32) - 1; i >= w * 32; i--)
        if (fibers[i].state == WARP_WAIT) {
            fibers[i].state = RUN;
            runq.push_front(i);
        }
    wp.waiting = 0;
    wp.kind = K_NONE;
}

static void release_block() {
    for (int i = 0; i < nthreads; i++)
        if (fibers[i].state == BLOCK_WAIT) {
            fibers[i].state = RUN;
            runq.push_back(i);
        }
    block_waiting = 0;
}

static void fiber_main() {
    cur_kernel->tramp(cur_params);
    const int me = cur;
    Fiber& f = fibers[me];
    f.state = DONE;
    Warp& w = warps[me >> 5];
    w.live--;
    block_live--;
    // Lanes (threads) that wait for this one wait no longer.
    if (w.waiting > 0 && w.waiting == w.live) release_warp(me >> 5);
    if (block_waiting > 0 && block_waiting == block_live) release_block();
    emu_switch(&f.sp, sched_sp);
    abort();  // a finished fiber is never resumed
}

static unsigned char* new_stack() {
    void* p = mmap(nullptr, STACK_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        fprintf(stderr, "beft CUDA emulator: cannot map a fiber stack\n");
        abort();
    }
    mprotect(p, 4096, PROT_NONE);  // overflow faults instead of corrupting
    return (unsigned char*)p + STACK_BYTES;
}

// A fresh context on stack `top` that starts in fiber_main: the six
// registers emu_switch pops, then its return address.
static void* init_context(unsigned char* top) {
    uint64_t* sp = (uint64_t*)(top - 64);
    memset(sp, 0, 64);
    sp[6] = (uint64_t)(void*)&fiber_main;  // return address of emu_switch
    sp[7] = 0;                               // fiber_main's (never used)
    return sp;
}

static void set_thread(int i) {
    cur = i;
    threadIdx.x = i % blockDim.x;
    threadIdx.y = (i / blockDim.x) % blockDim.y;
    threadIdx.z = i / (blockDim.x * blockDim.y);
}

static void wait_block() {
    const int me = cur;
    fibers[me].state = BLOCK_WAIT;
    if (++block_waiting == block_live) release_block();
    emu_switch(&fibers[me].sp, sched_sp);
}

// Enter warp collective `kind`: returns once every live lane of the warp
// has entered it (with its operands in slot `fibers[lane].colls & 1`).
static void wait_warp(int kind) {
    const int me = cur;
    Warp& w = warps[me >> 5];
    if (w.waiting > 0 && w.kind != kind)
        fail(CUDA_ERROR_ILLEGAL_INSTRUCTION_CODE, "lanes of warp %d wait at a %s and a %s", me >> 5,
             kind_name(w.kind), kind_name(kind));
    w.kind = kind;
    fibers[me].state = WARP_WAIT;
    if (++w.waiting == w.live) release_warp(me >> 5);
    emu_switch(&fibers[me].sp, sched_sp);
}

// Runs one block to completion; false on a deadlock.
static bool run_block() {
    while ((int)stacks.size() < nthreads) stacks.push_back(new_stack());
    const int nwarps = (nthreads + 31) / 32;
    warps.assign(nwarps, Warp());
    runq.clear();
    for (int i = 0; i < nthreads; i++) {
        Fiber& f = fibers[i];
        f.state = RUN;
        f.colls = 0;
        f.cp.clear();
        f.groups.clear();
        f.sp = init_context(stacks[i]);
        warps[i >> 5].live++;
        runq.push_back(i);
    }
    block_live = nthreads;
    block_waiting = 0;
    while (!runq.empty()) {
        const int i = runq.front();
        runq.pop_front();
        set_thread(i);
        emu_switch(&sched_sp, fibers[i].sp);
    }
    if (block_live == 0) {
        for (int w = 0; w < nwarps; w++)
            if (!warps[w].wg_ops.empty()) {
                cur = w * 32;
                fail(CUDA_ERROR_ILLEGAL_INSTRUCTION_CODE,
                     "warp %d exits with %zu wgmma.mma_async never retired by a wgmma.wait_group", w,
                     warps[w].wg_ops.size());
                return false;
            }
        return true;
    }
    int at_warp = -1;
    for (int i = 0; i < nthreads && at_warp < 0; i++)
        if (fibers[i].state == WARP_WAIT) at_warp = i;
    cur = at_warp >= 0 ? at_warp : 0;
    fail(CUDA_ERROR_ILLEGAL_INSTRUCTION_CODE,
         "deadlock: %d live threads, %d at __syncthreads, the rest at warp collectives (%s) their warps never "
         "complete",
         block_live, block_waiting, at_warp >= 0 ? kind_name(warps[at_warp >> 5].kind) : "none");
    return false;
}

// ---- device-side entry points (emu.h) ----------------------------------------

extern "C" void emu_syncthreads() { wait_block(); }

extern "C" int emu_lane_id() { return cur & 31; }

// Lanes of the current thread's warp that exist and have not exited.
static unsigned live_lanes(int me) {
    unsigned m = 0;
    const int w0 = me & ~31;
    for (int l = 0; l < 32; l++)
        if (w0 + l < nthreads && fibers[w0 + l].state != DONE) m |= 1u << l;
    return m;
}

extern "C" uint64_t emu_shfl(unsigned mask, uint64_t v, int src) {
    const int me = cur;
    const unsigned live = live_lanes(me);
    if ((mask & live) != mask)
        fail(CUDA_ERROR_ILLEGAL_INSTRUCTION_CODE, "shuffle mask %08x names lanes that exited or do not exist (live %08x)",
             mask, live);
    const unsigned round = fibers[me].colls++, slot = round & 1;
    fibers[me].val[slot] = v;
    wait_warp(K_SHFL);
    // A lane may have exited since it offered its value (it ran ahead).
    const int s = (me & ~31) + (src & 31);
    if (s < nthreads && fibers[s].colls > round) return fibers[s].val[slot];
    fail(CUDA_ERROR_ILLEGAL_INSTRUCTION_CODE, "shuffle reads lane %d, which exited or does not exist", src & 31);
    return ~0ull;
}

extern "C" unsigned emu_cvta_shared(const void* p) {
    const unsigned char* q = (const unsigned char*)p;
    if (dyn_base == nullptr || q < dyn_base || q > dyn_base + dyn_bytes) {
        fail(CUDA_ERROR_ILLEGAL_ADDRESS_CODE, "cvta.to.shared of a pointer outside the dynamic shared memory");
        return 0;
    }
    return (unsigned)(q - dyn_base);
}

extern "C" void* emu_shared_ptr(unsigned addr, unsigned bytes) {
    if ((uint64_t)addr + bytes > dyn_bytes) {
        fail(CUDA_ERROR_ILLEGAL_ADDRESS_CODE, "shared address %u (+%u bytes) beyond the %u bytes of dynamic shared memory",
             addr, bytes, dyn_bytes);
        return scratch;
    }
    return dyn_base + addr;
}

extern "C" void emu_cp_async(unsigned dst, const void* src, unsigned bytes, unsigned src_bytes) {
    if (dst % bytes != 0 || ((uintptr_t)src % bytes != 0 && src_bytes != 0))
        fail(CUDA_ERROR_ILLEGAL_ADDRESS_CODE, "cp.async of %u bytes from %p to shared %u: misaligned", bytes, src, dst);
    if (src_bytes > bytes) fail(CUDA_ERROR_ILLEGAL_INSTRUCTION_CODE, "cp.async src-size %u > cp-size %u", src_bytes, bytes);
    unsigned char* d = (unsigned char*)emu_shared_ptr(dst, bytes);
    fibers[cur].cp.push_back({d, (const unsigned char*)src, bytes, src_bytes});
}

extern "C" void emu_cp_commit() {
    Fiber& f = fibers[cur];
    f.groups.push_back(f.cp.size());
}

extern "C" void emu_cp_wait(int pending) {
    Fiber& f = fibers[cur];
    const int done_groups = (int)f.groups.size() - pending;
    if (done_groups <= 0) return;
    const size_t end = f.groups[done_groups - 1];
    for (size_t i = 0; i < end; i++) {
        const CpOp& op = f.cp[i];
        if (op.src_bytes) memcpy(op.dst, op.src, op.src_bytes);
        memset(op.dst + op.src_bytes, 0, op.bytes - op.src_bytes);
    }
    f.cp.erase(f.cp.begin(), f.cp.begin() + end);
    f.groups.erase(f.groups.begin(), f.groups.begin() + done_groups);
    for (size_t& g : f.groups) g -= end;
}

// ldmatrix and mma: the first lane resumed after the warp has gathered
// computes every lane's result at once (as the warp's single instruction
// does: no lane's later stores can reach it), the others copy theirs.
extern "C" void emu_ldmatrix_x4(unsigned addr, int trans, unsigned* r) {
    const int me = cur;
    if (addr % 16 != 0) fail(CUDA_ERROR_ILLEGAL_ADDRESS_CODE, "ldmatrix row address %u not 16-byte aligned", addr);
    if (warps[me >> 5].live != 32)
        fail(CUDA_ERROR_ILLEGAL_INSTRUCTION_CODE, "ldmatrix.sync.aligned without all 32 lanes");
    const unsigned round = fibers[me].colls++, slot = round & 1;
    fibers[me].addr[slot] = addr;
    wait_warp(K_LDSM);
    const int w0 = me & ~31;
    Warp& w = warps[me >> 5];
    if (w.done_round != round) {
        w.done_round = round;
        // Row `row` of matrix q is 16 bytes at the address of lane 8q + row.
        const unsigned short* rows[4][8];
        for (int q = 0; q < 4; q++)
            for (int row = 0; row < 8; row++)
                rows[q][row] = (const unsigned short*)emu_shared_ptr(fibers[w0 + 8 * q + row].addr[slot], 16);
        for (int lane = 0; lane < 32; lane++) {
            const int g = lane >> 2, t = lane & 3;
            for (int q = 0; q < 4; q++) {
                unsigned lo, hi;
                if (!trans) {
                    lo = rows[q][g][2 * t];
                    hi = rows[q][g][2 * t + 1];
                } else {
                    lo = rows[q][2 * t][g];
                    hi = rows[q][2 * t + 1][g];
                }
                w.out[lane][q] = lo | (hi << 16);
            }
        }
    }
    for (int q = 0; q < 4; q++) r[q] = w.out[me & 31][q];
}

static inline float bf16_lo(unsigned r) { return __uint_as_float(r << 16); }
static inline float bf16_hi(unsigned r) { return __uint_as_float(r & 0xffff0000u); }

// The 16 x 16 bf16 A operand of mma.m16n8k16 (and of each warp's 16 rows of
// wgmma.m64nNk16, the same layout) from the four registers of each lane:
// element (row, k) is register (row >= 8) + 2 (k >= 8) of lane
// (row % 8) * 4 + (k % 8) / 2, half k % 2.
static void unpack_a16x16(const unsigned* const regs[32], float A[16][16]) {
    for (int row = 0; row < 16; row++)
        for (int k = 0; k < 16; k++) {
            const unsigned reg = regs[(row & 7) * 4 + ((k & 7) >> 1)][(row >> 3) + 2 * (k >> 3)];
            A[row][k] = (k & 1) ? bf16_hi(reg) : bf16_lo(reg);
        }
}

extern "C" void emu_mma_16816_bf16(float* d, const unsigned* a, const unsigned* b) {
    const int me = cur;
    if (warps[me >> 5].live != 32) fail(CUDA_ERROR_ILLEGAL_INSTRUCTION_CODE, "mma.sync without all 32 lanes");
    const unsigned round = fibers[me].colls++, slot = round & 1;
    fibers[me].a[slot] = a;
    fibers[me].b[slot] = b;
    wait_warp(K_MMA);
    const int w0 = me & ~31;
    Warp& w = warps[me >> 5];
    if (w.done_round != round) {
        w.done_round = round;
        // A: unpack_a16x16. B (16 x 8, col): register (k >= 8) of lane
        // n * 4 + (k % 8) / 2, half k % 2.
        float A[16][16], B[16][8];
        const unsigned* regs[32];
        for (int l = 0; l < 32; l++) regs[l] = fibers[w0 + l].a[slot];
        unpack_a16x16(regs, A);
        for (int k = 0; k < 16; k++)
            for (int n = 0; n < 8; n++) {
                const unsigned reg = fibers[w0 + n * 4 + ((k & 7) >> 1)].b[slot][k >> 3];
                B[k][n] = (k & 1) ? bf16_hi(reg) : bf16_lo(reg);
            }
        // The products are exact in f32 (bf16 x bf16); summed in f32 in k
        // order (the tensor cores' order and rounding are unspecified).
        for (int row = 0; row < 16; row++) {
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            for (int k = 0; k < 16; k++) {
                const float x = A[row][k];
                for (int n = 0; n < 8; n++) acc[n] += x * B[k][n];
            }
            for (int n = 0; n < 8; n++) w.acc[row][n] = acc[n];
        }
    }
    const int g = (me & 31) >> 2, t = me & 3;
    for (int r = 0; r < 4; r++) d[r] += w.acc[g + 8 * (r >> 1)][2 * t + (r & 1)];
}

// ---- wgmma (sm_90a) -----------------------------------------------------------
// Each warp's share of a warpgroup MMA (its 16 rows) depends only on its own
// A registers and the shared B, so the emulation runs per warp: every
// wgmma instruction is a warp collective, queued at issue (with the A
// registers it read) and computed at the wgmma.wait_group that retires its
// group, reading B from shared memory then, the latest moment the
// instruction may read it: a kernel that overwrites a B tile before the
// wait that retires its readers computes with the new data and fails its
// checks.

// A bf16 shared-memory operand's matrix descriptor, decoded (the canonical
// layouts of the PTX ISA; the swizzled modes with base offset 0 only).
struct WgDesc {
    unsigned start, lbo, sbo;
    unsigned width;  // bytes of a swizzle row: 128, 64, 32
    bool trans;      // N-major (imm-trans-b 1), else K-major

    // false (and the launch failed) for a mode the emulator does not know.
    bool decode(uint64_t desc, int trans_b) {
        start = (unsigned)(desc & 0x3fff) << 4;
        lbo = (unsigned)((desc >> 16) & 0x3fff) << 4;
        sbo = (unsigned)((desc >> 32) & 0x3fff) << 4;
        trans = trans_b != 0;
        const unsigned base_off = (unsigned)((desc >> 49) & 7);
        const unsigned mode = (unsigned)(desc >> 62);
        if (mode == 0 || base_off != 0) {
            fail(CUDA_ERROR_ILLEGAL_INSTRUCTION_CODE,
                 "wgmma descriptor %016llx: swizzle mode %u, base offset %u not emulated (swizzled modes with base "
                 "offset 0 only)",
                 (unsigned long long)desc, mode, base_off);
            return false;
        }
        width = 128u >> (mode - 1);
        return true;
    }

    // Shared-window address of B(k, col).
    unsigned addr(int k, int col) const {
        unsigned a;
        if (!trans) {
            // K-major: rows of `width` bytes along k, 8-row groups `sbo` apart.
            a = start + (unsigned)(col & 7) * width + (unsigned)(col >> 3) * sbo + (unsigned)k * 2;
        } else {
            // N-major: atoms of width / 2 columns x 8 k rows; atoms `lbo`
            // apart along n, 8-row groups of k `sbo` apart.
            const unsigned e = width / 2;
            a = start + ((unsigned)col % e) * 2 + ((unsigned)col / e) * lbo + (unsigned)(k & 7) * width +
                (unsigned)(k >> 3) * sbo;
        }
        // The swizzle acts on the address itself: 16-byte chunk bits
        // [4, 4 + b) ^= bits [7, 7 + b), b = log2(width / 16).
        return a ^ (((a >> 7) & (width / 16 - 1)) << 4);
    }
};

static void wg_execute(const WgOp& op) {
    float A[16][16];
    const unsigned* regs[32];
    for (int l = 0; l < 32; l++) regs[l] = op.a[l];
    unpack_a16x16(regs, A);
    WgDesc desc;
    if (!desc.decode(op.desc, op.trans_b)) return;
    static float B[16][256];
    for (int k = 0; k < 16; k++)
        for (int col = 0; col < op.n; col++)
            B[k][col] = bf16_lo(*(const unsigned short*)emu_shared_ptr(desc.addr(k, col), 2));
    for (int lane = 0; lane < 32; lane++) {
        const int g = lane >> 2, t = lane & 3;
        float* d = op.d[lane];
        for (int i = 0; i < op.n / 8; i++)
            for (int r = 0; r < 4; r++) {
                const int row = g + 8 * (r >> 1), col = 8 * i + 2 * t + (r & 1);
                float s = 0;
                for (int k = 0; k < 16; k++) s += A[row][k] * B[k][col];
                d[4 * i + r] = op.scale_d ? d[4 * i + r] + s : s;
            }
    }
}

// The warpgroup instructions must find every warp of a whole warpgroup.
static void wg_check(int me, int kind) {
    if (warps[me >> 5].live != 32)
        fail(CUDA_ERROR_ILLEGAL_INSTRUCTION_CODE, "%s without all 32 lanes", kind_name(kind));
    if (nthreads % 128 != 0)
        fail(CUDA_ERROR_ILLEGAL_INSTRUCTION_CODE, "%s in a block of %d threads (not whole warpgroups of 128)",
             kind_name(kind), nthreads);
}

// Enter the operand-free warpgroup collective `kind` (fence, commit, wait):
// its warp, for the one lane that does the warp's work (the first resumed),
// else null.
static Warp* wg_enter(int kind) {
    const int me = cur;
    wg_check(me, kind);
    const unsigned round = fibers[me].colls++;
    wait_warp(kind);
    Warp& w = warps[me >> 5];
    if (w.done_round == round) return nullptr;
    w.done_round = round;
    return &w;
}

extern "C" void emu_wgmma_fence() {
    if (Warp* w = wg_enter(K_WGFENCE)) w->wg_fenced = true;
}

extern "C" void emu_wgmma_bf16(float* d, int n, const unsigned* a, unsigned long long desc, int scale_d,
                               int trans_b) {
    const int me = cur;
    wg_check(me, K_WGMMA);
    if (n < 8 || n > 256 || n % 8 != 0) fail(CUDA_ERROR_ILLEGAL_INSTRUCTION_CODE, "wgmma n = %d", n);
    const unsigned round = fibers[me].colls++, slot = round & 1;
    Fiber& f = fibers[me];
    f.a[slot] = a;
    f.d[slot] = d;
    f.val[slot] = desc;
    f.addr[slot] = (unsigned)n | (unsigned)(scale_d != 0) << 16 | (unsigned)(trans_b != 0) << 17;
    wait_warp(K_WGMMA);
    const int w0 = me & ~31;
    Warp& w = warps[me >> 5];
    if (w.done_round == round) return;
    w.done_round = round;
    if (!w.wg_fenced)
        fail(CUDA_ERROR_ILLEGAL_INSTRUCTION_CODE,
             "wgmma.mma_async without a wgmma.fence since the last wgmma.wait_group (warp %d)", me >> 5);
    for (int l = 1; l < 32; l++)
        if (fibers[w0 + l].val[slot] != f.val[slot] || fibers[w0 + l].addr[slot] != f.addr[slot])
            fail(CUDA_ERROR_ILLEGAL_INSTRUCTION_CODE, "wgmma.mma_async operands differ across the lanes of warp %d",
                 me >> 5);
    WgOp op;
    op.n = n;
    op.scale_d = scale_d != 0;
    op.trans_b = trans_b != 0;
    op.desc = desc;
    for (int l = 0; l < 32; l++) {
        for (int q = 0; q < 4; q++) op.a[l][q] = fibers[w0 + l].a[slot][q];
        op.d[l] = fibers[w0 + l].d[slot];
    }
    w.wg_ops.push_back(op);
}

extern "C" void emu_wgmma_commit() {
    if (Warp* w = wg_enter(K_WGCOMMIT)) w->wg_groups.push_back(w->wg_ops.size());
}

extern "C" void emu_wgmma_wait(int pending) {
    Warp* w = wg_enter(K_WGWAIT);
    if (w == nullptr) return;
    w->wg_fenced = false;
    const int done = (int)w->wg_groups.size() - pending;
    if (done <= 0) return;
    const size_t end = w->wg_groups[done - 1];
    for (size_t i = 0; i < end; i++) wg_execute(w->wg_ops[i]);
    w->wg_ops.erase(w->wg_ops.begin(), w->wg_ops.begin() + end);
    w->wg_groups.erase(w->wg_groups.begin(), w->wg_groups.begin() + done);
    for (size_t& g : w->wg_groups) g -= end;
}

// ---- the driver API ------------------------------------------------------------

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;

struct EmuModule {
    std::set<std::string> entries;  // the `.entry` names of its PTX
};
struct EmuFunc {
    const EmuKernel* k;
    int max_dyn_smem = 48 * 1024;
};
struct EmuEvent {
    double t = 0;
};
struct EmuStream {
    int unused = 0;
};

static const size_t GUARD = 256;           // bytes checked after each allocation
static const unsigned char GUARD_BYTE = 0xa5;

static std::recursive_mutex api_lock;
static int context_token = 1;  // the primary context handle points here

static std::map<uintptr_t, size_t> allocs;  // base -> size in bytes (without the guard)
static size_t allocated = 0;

static size_t total_memory() {
    static size_t t = [] {
        const char* e = getenv("BEFT_CUDA_EMU_MEMORY");
        size_t v = e ? strtoull(e, nullptr, 10) : 0;
        return v ? v : (size_t)16 << 30;
    }();
    return t;
}

static double now_ms() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

// A guard zone overwritten: reported as an out-of-bounds write of the
// kernel that just ran.
static void check_guards() {
    for (const auto& [base, bytes] : allocs) {
        const unsigned char* g = (const unsigned char*)base + bytes;
        for (size_t i = 0; i < GUARD; i++)
            if (g[i] != GUARD_BYTE) {
                fail(CUDA_ERROR_ILLEGAL_ADDRESS_CODE,
                     "wrote past the end of a %zu-byte device allocation (byte %zu after it)", bytes, i);
                return;
            }
    }
}

static CUresult mem_alloc(CUdeviceptr* p, size_t bytes) {
    std::lock_guard<std::recursive_mutex> l(api_lock);
    if (p == nullptr) return CUDA_ERROR_INVALID_VALUE_CODE;
    if (bytes == 0) bytes = 1;
    if (allocated + bytes > total_memory()) return CUDA_ERROR_OUT_OF_MEMORY_CODE;
    const size_t padded = (bytes + GUARD + 255) & ~(size_t)255;
    void* m = aligned_alloc(256, padded);
    if (m == nullptr) return CUDA_ERROR_OUT_OF_MEMORY_CODE;
    memset(m, 0xff, bytes);  // NaN as f32: unwritten values show
    memset((unsigned char*)m + bytes, GUARD_BYTE, GUARD);
    allocs[(uintptr_t)m] = bytes;
    allocated += bytes;
    *p = (CUdeviceptr)(uintptr_t)m;
    return CUDA_SUCCESS_CODE;
}

static CUresult mem_free(CUdeviceptr p) {
    std::lock_guard<std::recursive_mutex> l(api_lock);
    auto it = allocs.find((uintptr_t)p);
    if (it == allocs.end()) return CUDA_ERROR_INVALID_VALUE_CODE;
    allocated -= it->second;
    allocs.erase(it);
    free((void*)(uintptr_t)p);
    return CUDA_SUCCESS_CODE;
}

// Device ranges must lie inside one live allocation.
static bool in_device(CUdeviceptr p, size_t bytes) {
    auto it = allocs.upper_bound((uintptr_t)p);
    if (it == allocs.begin()) return false;
    --it;
    return (uintptr_t)p >= it->first && (uintptr_t)p + bytes <= it->first + it->second;
}

static CUresult bad_range(const char* what, CUdeviceptr p, size_t bytes) {
    fprintf(stderr, "beft CUDA emulator: %s of %zu bytes at 0x%llx is outside every device allocation\n", what,
            bytes, p);
    return CUDA_ERROR_INVALID_VALUE_CODE;
}

EXPORT CUresult cuInit(unsigned) { return CUDA_SUCCESS_CODE; }
EXPORT CUresult cuDriverGetVersion(int* v) {
    *v = 12060;
    return CUDA_SUCCESS_CODE;
}
EXPORT CUresult cuDeviceGetCount(int* n) {
    *n = 1;
    return CUDA_SUCCESS_CODE;
}
EXPORT CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE_CODE;
    *d = 0;
    return CUDA_SUCCESS_CODE;
}
EXPORT CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    snprintf(name, len, "beft CUDA emulator on the CPU (sm_90)");
    return CUDA_SUCCESS_CODE;
}
EXPORT CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) {
    *bytes = total_memory();
    return CUDA_SUCCESS_CODE;
}
EXPORT CUresult cuDeviceGetUuid(unsigned char* uuid, CUdevice) {
    memset(uuid, 0, 16);
    return CUDA_SUCCESS_CODE;
}
EXPORT CUresult cuDeviceGetUuid_v2(unsigned char* uuid, CUdevice) { return cuDeviceGetUuid(uuid, 0); }

EXPORT CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice) {
    switch (attr) {
        case 1: *v = 1024; break;                        // MAX_THREADS_PER_BLOCK
        case 2: case 3: *v = 1024; break;                // MAX_BLOCK_DIM_X, Y
        case 4: *v = 64; break;                          // MAX_BLOCK_DIM_Z
        case 5: *v = 2147483647; break;                  // MAX_GRID_DIM_X
        case 6: case 7: *v = 65535; break;               // MAX_GRID_DIM_Y, Z
        case 8: *v = 48 * 1024; break;                   // MAX_SHARED_MEMORY_PER_BLOCK
        case 10: *v = 32; break;                         // WARP_SIZE
        case 12: *v = 65536; break;                      // MAX_REGISTERS_PER_BLOCK
        case 13: *v = 1755000; break;                    // CLOCK_RATE (kHz)
        case 16: *v = 132; break;                        // MULTIPROCESSOR_COUNT
        case 36: *v = 2619000; break;                    // MEMORY_CLOCK_RATE (kHz)
        case 37: *v = 5120; break;                       // GLOBAL_MEMORY_BUS_WIDTH
        case 38: *v = 50 * 1024 * 1024; break;           // L2_CACHE_SIZE
        case 41: *v = 1; break;                          // UNIFIED_ADDRESSING
        case 75: *v = 9; break;                          // COMPUTE_CAPABILITY_MAJOR
        case 76: *v = 0; break;                          // COMPUTE_CAPABILITY_MINOR
        case 81: *v = 228 * 1024; break;                 // MAX_SHARED_MEMORY_PER_MULTIPROCESSOR
        case 97: *v = EMU_SMEM_OPTIN; break;                 // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        case 115: *v = 1; break;                         // MEMORY_POOLS_SUPPORTED
        default: *v = 0; break;
    }
    return CUDA_SUCCESS_CODE;
}

EXPORT CUresult cuDevicePrimaryCtxRetain(void** ctx, CUdevice) {
    *ctx = &context_token;
    return CUDA_SUCCESS_CODE;
}
EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return CUDA_SUCCESS_CODE; }
EXPORT CUresult cuCtxSetCurrent(void*) { return CUDA_SUCCESS_CODE; }
EXPORT CUresult cuCtxGetCurrent(void** ctx) {
    *ctx = &context_token;
    return CUDA_SUCCESS_CODE;
}
EXPORT CUresult cuCtxSynchronize() { return CUDA_SUCCESS_CODE; }
EXPORT CUresult cuCtxGetStreamPriorityRange(int* least, int* greatest) {
    if (least) *least = 0;
    if (greatest) *greatest = 0;
    return CUDA_SUCCESS_CODE;
}

// Every operation runs to completion when it is issued: streams and events
// only keep their handles (and an event its time, for elapsed times).
EXPORT CUresult cuStreamCreate(void** s, unsigned) {
    *s = new EmuStream;
    return CUDA_SUCCESS_CODE;
}
EXPORT CUresult cuStreamCreateWithPriority(void** s, unsigned, int) { return cuStreamCreate(s, 0); }
EXPORT CUresult cuStreamDestroy_v2(void* s) {
    delete (EmuStream*)s;
    return CUDA_SUCCESS_CODE;
}
EXPORT CUresult cuStreamSynchronize(void*) { return CUDA_SUCCESS_CODE; }
EXPORT CUresult cuStreamQuery(void*) { return CUDA_SUCCESS_CODE; }
EXPORT CUresult cuStreamWaitEvent(void*, void*, unsigned) { return CUDA_SUCCESS_CODE; }
EXPORT CUresult cuEventCreate(void** e, unsigned) {
    *e = new EmuEvent;
    return CUDA_SUCCESS_CODE;
}
EXPORT CUresult cuEventDestroy_v2(void* e) {
    delete (EmuEvent*)e;
    return CUDA_SUCCESS_CODE;
}
EXPORT CUresult cuEventRecord(void* e, void*) {
    ((EmuEvent*)e)->t = now_ms();
    return CUDA_SUCCESS_CODE;
}
EXPORT CUresult cuEventSynchronize(void*) { return CUDA_SUCCESS_CODE; }
EXPORT CUresult cuEventQuery(void*) { return CUDA_SUCCESS_CODE; }
EXPORT CUresult cuEventElapsedTime(float* ms, void* a, void* b) {
    *ms = (float)(((EmuEvent*)b)->t - ((EmuEvent*)a)->t);
    return CUDA_SUCCESS_CODE;
}
EXPORT CUresult cuEventElapsedTime_v2(float* ms, void* a, void* b) { return cuEventElapsedTime(ms, a, b); }

EXPORT CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) { return mem_alloc(p, bytes); }
EXPORT CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, void*) { return mem_alloc(p, bytes); }
EXPORT CUresult cuMemFree_v2(CUdeviceptr p) { return mem_free(p); }
EXPORT CUresult cuMemFreeAsync(CUdeviceptr p, void*) { return mem_free(p); }
EXPORT CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    std::lock_guard<std::recursive_mutex> l(api_lock);
    *total = total_memory();
    *free_bytes = total_memory() - allocated;
    return CUDA_SUCCESS_CODE;
}
EXPORT CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    *p = aligned_alloc(4096, (bytes + 4095) & ~(size_t)4095);
    return *p ? CUDA_SUCCESS_CODE : CUDA_ERROR_OUT_OF_MEMORY_CODE;
}
EXPORT CUresult cuMemFreeHost(void* p) {
    free(p);
    return CUDA_SUCCESS_CODE;
}

EXPORT CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t bytes) {
    std::lock_guard<std::recursive_mutex> l(api_lock);
    if (!in_device(dst, bytes)) return bad_range("host-to-device copy", dst, bytes);
    memcpy((void*)(uintptr_t)dst, src, bytes);
    return CUDA_SUCCESS_CODE;
}
EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t bytes, void*) {
    return cuMemcpyHtoD_v2(dst, src, bytes);
}
EXPORT CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t bytes) {
    std::lock_guard<std::recursive_mutex> l(api_lock);
    if (!in_device(src, bytes)) return bad_range("device-to-host copy", src, bytes);
    memcpy(dst, (const void*)(uintptr_t)src, bytes);
    return CUDA_SUCCESS_CODE;
}
EXPORT CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t bytes, void*) {
    return cuMemcpyDtoH_v2(dst, src, bytes);
}
EXPORT CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes) {
    std::lock_guard<std::recursive_mutex> l(api_lock);
    if (!in_device(dst, bytes)) return bad_range("device-to-device copy (destination)", dst, bytes);
    if (!in_device(src, bytes)) return bad_range("device-to-device copy (source)", src, bytes);
    memmove((void*)(uintptr_t)dst, (const void*)(uintptr_t)src, bytes);
    return CUDA_SUCCESS_CODE;
}
EXPORT CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes, void*) {
    return cuMemcpyDtoD_v2(dst, src, bytes);
}
EXPORT CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
    std::lock_guard<std::recursive_mutex> l(api_lock);
    if (!in_device(dst, n)) return bad_range("memset", dst, n);
    memset((void*)(uintptr_t)dst, v, n);
    return CUDA_SUCCESS_CODE;
}
EXPORT CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, void*) { return cuMemsetD8_v2(dst, v, n); }
EXPORT CUresult cuMemsetD32_v2(CUdeviceptr dst, unsigned v, size_t n) {
    std::lock_guard<std::recursive_mutex> l(api_lock);
    if (!in_device(dst, 4 * n)) return bad_range("memset", dst, 4 * n);
    unsigned* p = (unsigned*)(uintptr_t)dst;
    for (size_t i = 0; i < n; i++) p[i] = v;
    return CUDA_SUCCESS_CODE;
}
EXPORT CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned v, size_t n, void*) { return cuMemsetD32_v2(dst, v, n); }

// A module is the PTX text NVRTC produced: its `.entry` names are the
// kernels it offers, each run by the g++-compiled twin of the same source.
EXPORT CUresult cuModuleLoadData(void** module, const void* image) {
    const char* ptx = (const char*)image;
    if (ptx == nullptr || strstr(ptx, ".version") == nullptr || strstr(ptx, ".target") == nullptr) {
        fprintf(stderr, "beft CUDA emulator: a module image that is not PTX text\n");
        return CUDA_ERROR_INVALID_IMAGE_CODE;
    }
    EmuModule* m = new EmuModule;
    for (const char* p = strstr(ptx, ".entry "); p; p = strstr(p + 1, ".entry ")) {
        const char* s = p + 7;
        while (*s == ' ') s++;
        const char* e = s;
        while (*e && *e != '(' && *e != ' ' && *e != '\n') e++;
        m->entries.insert(std::string(s, e));
    }
    *module = m;
    return CUDA_SUCCESS_CODE;
}
EXPORT CUresult cuModuleUnload(void* module) {
    delete (EmuModule*)module;
    return CUDA_SUCCESS_CODE;
}
EXPORT CUresult cuModuleGetFunction(void** f, void* module, const char* name) {
    const EmuModule* m = (const EmuModule*)module;
    if (m->entries.count(name) == 0) return CUDA_ERROR_NOT_FOUND_CODE;
    auto it = registry().find(name);
    if (it == registry().end()) {
        fprintf(stderr,
                "beft CUDA emulator: the PTX has kernel %s but the emulator was built without it: rebuild it "
                "(python3 kernels/emu/build.py)\n",
                name);
        return CUDA_ERROR_NOT_FOUND_CODE;
    }
    *f = new EmuFunc{it->second};
    return CUDA_SUCCESS_CODE;
}
EXPORT CUresult cuFuncSetAttribute(void* f, int attr, int value) {
    if (attr == 8) {  // MAX_DYNAMIC_SHARED_SIZE_BYTES
        if (value < 0 || value > EMU_SMEM_OPTIN) return CUDA_ERROR_INVALID_VALUE_CODE;
        ((EmuFunc*)f)->max_dyn_smem = value;
    }
    return CUDA_SUCCESS_CODE;
}
EXPORT CUresult cuFuncGetAttribute(int* v, int attr, void* f) {
    switch (attr) {
        case 0: *v = 1024; break;                              // MAX_THREADS_PER_BLOCK
        case 4: *v = 64; break;                                // NUM_REGS
        case 8: *v = ((EmuFunc*)f)->max_dyn_smem; break;       // MAX_DYNAMIC_SHARED_SIZE_BYTES
        default: *v = 0; break;
    }
    return CUDA_SUCCESS_CODE;
}
EXPORT CUresult cuFuncSetCacheConfig(void*, int) { return CUDA_SUCCESS_CODE; }

EXPORT CUresult cuLaunchKernel(void* func, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                               unsigned bz, unsigned smem, void*, void** params, void** extra) {
    std::lock_guard<std::recursive_mutex> l(api_lock);
    const EmuFunc* f = (const EmuFunc*)func;
    if (f == nullptr) return CUDA_ERROR_INVALID_HANDLE_CODE;
    const EmuKernel* k = f->k;
    const unsigned long long threads = (unsigned long long)bx * by * bz;
    auto reject = [&](const char* why) {
        fprintf(stderr, "beft CUDA emulator: launch of %s (grid %u x %u x %u, block %u x %u x %u, %u bytes shared): %s\n",
                k->name, gx, gy, gz, bx, by, bz, smem, why);
        return CUDA_ERROR_INVALID_VALUE_CODE;
    };
    if (params == nullptr || extra != nullptr) return reject("arguments must come as kernelParams");
    if (threads == 0 || threads > 1024 || bz > 64) return reject("bad block shape");
    if (gx == 0 || gy == 0 || gz == 0 || gy > 65535 || gz > 65535) return reject("bad grid shape");
    if ((int)smem > f->max_dyn_smem)
        return reject("more dynamic shared memory than the function allows (cuFuncSetAttribute not called?)");
    if (smem > 0 && k->dyn_smem != nullptr && smem > k->dyn_smem_cap)
        return reject("more dynamic shared memory than the emulator reserves");
    failure.clear();
    cur_kernel = k;
    cur_params = params;
    dyn_base = (unsigned char*)k->dyn_smem;
    dyn_bytes = k->dyn_smem ? smem : 0;
    blockDim = {bx, by, bz};
    gridDim = {gx, gy, gz};
    nthreads = (int)threads;
    if ((int)fibers.size() < nthreads) fibers.resize(nthreads);
    bool ok = true;
    for (unsigned z = 0; z < gz && ok; z++)
        for (unsigned y = 0; y < gy && ok; y++)
            for (unsigned x = 0; x < gx && ok; x++) {
                blockIdx = {x, y, z};
                if (dyn_bytes) memset(dyn_base, 0xff, dyn_bytes);
                ok = run_block() && failure.empty();
            }
    if (failure.empty()) check_guards();
    cur_kernel = nullptr;
    if (!failure.empty()) {
        fprintf(stderr, "beft CUDA emulator: %s\n", failure.c_str());
        return failure_code;
    }
    return CUDA_SUCCESS_CODE;
}

// The error codes the emulator returns: name and text, as cuda.h has them.
static const struct {
    int code;
    const char* name;
    const char* text;
} ERRORS[] = {
    {0, "CUDA_SUCCESS", "no error"},
    {1, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {2, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {101, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {200, "CUDA_ERROR_INVALID_IMAGE", "device kernel image is invalid"},
    {400, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {500, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {700, "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access was encountered (emulator: see stderr)"},
    {715, "CUDA_ERROR_ILLEGAL_INSTRUCTION", "an illegal instruction was encountered (emulator: see stderr)"},
};

EXPORT CUresult cuGetErrorString(CUresult e, const char** s) {
    *s = "unknown error";
    for (const auto& x : ERRORS)
        if (x.code == e) *s = x.text;
    return CUDA_SUCCESS_CODE;
}
EXPORT CUresult cuGetErrorName(CUresult e, const char** s) {
    *s = "CUDA_ERROR_UNKNOWN";
    for (const auto& x : ERRORS)
        if (x.code == e) *s = x.name;
    return CUDA_SUCCESS_CODE;
}
