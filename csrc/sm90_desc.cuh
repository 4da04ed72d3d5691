// The wgmma shared-memory matrix descriptor that the grouped GEMM's sm_90a kernels build. One
// definition, included by the kernels' csrc/sm90_ptx.cuh and by the emulated build's
// csrc/emulation/sm90_ptx.cuh alike, so that the emulation decodes the very bits the kernel passes
// to wgmma.mma_async (PTX ISA, "Matrix Descriptor Format"): a wrong field here fails the emulated
// tests as it would give wrong results on the GPU.
#pragma once
#include <cstdint>

namespace geomoe {
namespace sm90 {

// The descriptor of an operand whose first element is at shared address `addr`, 128-byte swizzle
// (rows of 128 bytes, 8-row groups SBO = 1,024 bytes apart), base offset 0: `addr` lies in the first
// 128-byte row of a 1,024-byte aligned swizzle atom. The leading byte offset `lbo` (bytes, a multiple
// of 16 below 2^18): in an MN-major operand, the distance between its 64-element wide swizzle atoms
// along M / N (an operand 128 wide: the second 64-column tile); a K-major swizzled operand does not
// use it (its 16 k lie in one 128-byte row), nor an MN-major one 64 wide, and the default 16 (field 1)
// is the convention.
__device__ inline uint64_t make_desc(uint32_t addr, uint32_t lbo = 16) {
  return (static_cast<uint64_t>((addr & 0x3FFFF) >> 4)) | (static_cast<uint64_t>((lbo & 0x3FFFF) >> 4) << 16) |
         (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

}  // namespace sm90
}  // namespace geomoe
