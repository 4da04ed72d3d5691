// Hopper (sm_90a) instructions of the grouped GEMM's wgmma kernels, as inline PTX: warpgroup MMA
// (wgmma.mma_async m64n64k16 and m64n128k16 on shared-memory descriptors, fence / commit_group /
// wait_group), the async-proxy
// fence, mbarriers (init, arrive.expect_tx, try_wait.parity) and TMA tile loads
// (cp.async.bulk.tensor completing on an mbarrier). Every function here compiles to its instruction
// only where the target is sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); elsewhere (sm_80, the compute_90 PTX)
// it traps: the launcher never chooses these kernels there.
//
// The emulated build has its own header of this name (csrc/emulation/sm90_ptx.cuh), first on its
// include path, which carries out the same operations on the CPU at their documented semantics.
//
// Shared-memory operand layout (the only one the kernels use): 128-byte swizzle. A tile of 16-bit
// elements is stored as rows of 64 elements (128 bytes); 8 rows make a 1,024-byte atom, and the
// 16-byte chunk c of row r sits at chunk c ^ (r % 8) of that row (the pattern TMA's SWIZZLE_128B
// writes). K-major operand (the reduction index k runs along the row): element (mn, k) of a 64 x 64
// tile at row mn, column k. MN-major (transposed) operand: at row k, column mn. Consecutive 8-row
// groups are SBO = 1,024 bytes apart. An m64n128k16 B is 128 wide: K-major, its 128 rows are two
// 64-row tiles back to back (16 8-row groups SBO apart: one descriptor); MN-major, its 128 columns
// are two 64-column swizzle atoms (one tile each), and the leading byte offset LBO is the distance
// between them (make_desc's lbo). Everywhere else LBO is unused (a K-major swizzled operand's 16 k
// lie in one 128-byte row; an MN-major operand 64 wide is one atom). Tiles start 1,024-byte
// aligned in the shared window.
#pragma once
#include <cstdint>
#include <type_traits>

#include <cuda.h>  // CUtensorMap (a type only: the encoder comes from the runtime's driver entry point)

#include "sm90_desc.cuh"  // make_desc: the wgmma descriptor (the emulated build decodes the same function's bits)

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GEOMOE_SM90A 1
#else
#define GEOMOE_SM90A 0
#endif

namespace geomoe {
namespace sm90 {

__device__ inline uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

__device__ inline void trap_unless_sm90a() {
#if !GEOMOE_SM90A
  __trap();
#endif
}

__device__ inline void wgmma_fence() {
#if GEOMOE_SM90A
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#else
  trap_unless_sm90a();
#endif
}

__device__ inline void wgmma_commit() {
#if GEOMOE_SM90A
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#else
  trap_unless_sm90a();
#endif
}

template <int N> __device__ inline void wgmma_wait() {
#if GEOMOE_SM90A
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#else
  trap_unless_sm90a();
#endif
}

// d (64 x 64 fp32 over the warpgroup, 32 per thread) = A (64 x 16) B (16 x 64) + (scale_d ? d : 0).
// TRANS_A / TRANS_B: the operand is MN-major in shared memory. Thread t of the warpgroup holds
// d[r] = D(16 (t / 32) + (t % 32) / 4 + 8 ((r / 2) % 2), 8 (r / 4) + 2 (t % 4) + r % 2).
template <typename T, int TRANS_A, int TRANS_B>
__device__ inline void wgmma_m64n64k16(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int scale_d) {
#if GEOMOE_SM90A
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, %35, %36;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(TRANS_A), "n"(TRANS_B));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, %35, %36;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(TRANS_A), "n"(TRANS_B));
  }
#else
  (void)d, (void)desc_a, (void)desc_b, (void)scale_d;
  trap_unless_sm90a();
#endif
}

// d (64 x 128 fp32 over the warpgroup, 64 per thread) = A (64 x 16) B (16 x 128) + (scale_d ? d : 0):
// one instruction for the 128 columns (half the reads of A per FLOP of two m64n64k16). The fragment
// is m64n64k16's extended: thread t holds d[r] = D(16 (t / 32) + (t % 32) / 4 + 8 ((r / 2) % 2),
// 8 (r / 4) + 2 (t % 4) + r % 2), r < 64 (so d[32 j + r] is element r of the j-th 64-column half's
// m64n64k16 fragment). B spans two 64-wide tiles: K-major, 16 8-row groups SBO apart (two 64-row
// tiles back to back); MN-major, two 64-column swizzle atoms LBO apart (make_desc's lbo).
template <typename T, int TRANS_A, int TRANS_B>
__device__ inline void wgmma_m64n128k16(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int scale_d) {
#if GEOMOE_SM90A
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, %67, %68;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(TRANS_A), "n"(TRANS_B));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, %67, %68;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(TRANS_A), "n"(TRANS_B));
  }
#else
  (void)d, (void)desc_a, (void)desc_b, (void)scale_d;
  trap_unless_sm90a();
#endif
}

// Keeps the compiler from moving (or copying) the accumulator registers across the asynchronous
// wgmma that writes them: placed before wgmma_fence and after wgmma_wait.
template <int R> __device__ inline void fence_operand(float (&d)[R]) {
#pragma unroll
  for (int r = 0; r < R; ++r) asm volatile("" : "+f"(d[r])::"memory");
}

// Orders this thread's generic-proxy writes to shared memory (stores, cp.async) before later
// async-proxy reads of it (wgmma, TMA stores).
__device__ inline void fence_proxy_async() {
#if GEOMOE_SM90A
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#else
  trap_unless_sm90a();
#endif
}

__device__ inline void mbar_init(uint64_t* bar, unsigned count) {
#if GEOMOE_SM90A
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // the initialised barrier, seen by TMA too
#else
  (void)bar, (void)count;
  trap_unless_sm90a();
#endif
}

// One arrival that also expects `bytes` more to complete on the barrier's current phase.
__device__ inline void mbar_arrive_expect_tx(uint64_t* bar, unsigned bytes) {
#if GEOMOE_SM90A
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
#else
  (void)bar, (void)bytes;
  trap_unless_sm90a();
#endif
}

// Returns once the phase of parity `parity` has completed.
__device__ inline void mbar_wait(uint64_t* bar, unsigned parity) {
#if GEOMOE_SM90A
  asm volatile(
      "{\n.reg .pred done;\nLAB_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra LAB_WAIT;\n}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
#else
  (void)bar, (void)parity;
  trap_unless_sm90a();
#endif
}

// The box at coordinates (c0 innermost, c1, c2) of the 3-D tensor map into shared `dst`, its bytes
// completing on `bar` (elements outside the tensor are zeros).
__device__ inline void tma_load_3d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2) {
#if GEOMOE_SM90A
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], [%2];\n" ::"r"(
          smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
#else
  (void)dst, (void)map, (void)bar, (void)c0, (void)c1, (void)c2;
  trap_unless_sm90a();
#endif
}

}  // namespace sm90
}  // namespace geomoe
