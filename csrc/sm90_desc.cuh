// The wgmma shared-memory matrix descriptor that the grouped GEMM's sm_90a kernels build. One
// definition, included by the kernels' csrc/sm90_ptx.cuh and by the emulated build's
// csrc/emulation/sm90_ptx.cuh alike, so that the emulation decodes the very bits the kernel passes
// to wgmma.mma_async (PTX ISA, "Matrix Descriptor Format"): a wrong field here fails the emulated
// tests as it would give wrong results on the GPU.
#pragma once
#include <cstdint>

namespace geomoe {
namespace sm90 {

// The descriptor of a 64-row x 16-column operand whose first element is at shared address `addr`
// (128-byte swizzle, SBO 1,024 bytes, LBO unused and set to 1, base offset 0: `addr` lies in the
// first 128-byte row of a 1,024-byte aligned swizzle atom).
__device__ inline uint64_t make_desc(uint32_t addr) {
  return (static_cast<uint64_t>((addr & 0x3FFFF) >> 4)) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) |
         (uint64_t(1) << 62);
}

}  // namespace sm90
}  // namespace geomoe
