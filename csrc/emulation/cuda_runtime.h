// The emulated CUDA runtime: what the host compiler sees as <cuda_runtime.h> when it builds the
// unchanged kernels of csrc/ into geomoe_kernels._cuda_emulated (setup.py puts this directory first
// on the include path; <mma.h> is emulated beside it).
//
// Execution. A launch runs at once on the calling host thread, block after block (the last first).
// The threads of a block are fibers (fiber.h) on that one host thread; each runs until it waits at
// __syncthreads or in a warp collective, or returns, and then the first runnable thread in index
// order (reverse order in odd blocks) goes on. So a barrier is a real barrier among concurrently
// live threads, warps do not run in lockstep (as on Volta and later), early (or late) warps run
// ahead as far as the barriers allow, and every run of a kernel is the same run.
//
// Types and arithmetic come from the CUDA toolkit's own headers (their host versions of __half,
// __nv_bfloat16 and the conversions), so an emulated kernel rounds as the GPU's conversions do.
//
// Checks. A launch outside the card's limits, a __syncthreads that not every thread of the block
// reaches (or that threads reach at different places), a warp collective whose mask names a lane
// that is absent or has exited, that lanes join with different masks or that reads a lane outside
// its mask, a deadlock, and WMMA
// misuse (mma.h) fail the launch; cudaGetLastError returns cudaErrorLaunchFailure (or
// cudaErrorInvalidConfiguration) and cudaGetErrorString says which kernel, block, thread and
// source line. Out-of-bounds accesses are left to AddressSanitizer: dynamic shared memory is a heap
// block of exactly the launch's size, static __shared__ arrays are instrumented globals.
//
// One thing the kernels' source cannot say to the host compiler: `extern __shared__ T name[];`.
// The build (build.py) rewrites that one declaration to `T* const name =
// geomoe_emu::dynamic_shared<T>();` in the copy it compiles; nothing else in a kernel changes, and
// launches go through GEOMOE_LAUNCH.
#pragma once
#include <cuda_runtime_api.h>  // the toolkit's types and declarations; nothing of the real runtime is linked
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#ifndef GEOMOE_EMULATION
#define GEOMOE_EMULATION 1
#endif

// The toolkit headers (parsed above, all include-guarded) are done with the execution-space
// keywords; from here on they mean what the emulator makes of them.
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __constant__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __shared__ static  // one copy per kernel instantiation, shared by the block that is running
#define __constant__ static
#define __launch_bounds__(...)

#include "emulator.h"

#define threadIdx (::geomoe_emu::g_thread->idx)
#define blockIdx (::geomoe_emu::g_block_idx)
#define blockDim (::geomoe_emu::g_block_dim)
#define gridDim (::geomoe_emu::g_grid_dim)
#define warpSize 32

#define cudaGetLastError ::geomoe_emu::get_last_error
#define cudaPeekAtLastError ::geomoe_emu::peek_at_last_error
#define cudaGetErrorString ::geomoe_emu::error_string
#define cudaFuncSetAttribute ::geomoe_emu::func_set_attribute
#define cudaStreamSynchronize ::geomoe_emu::synchronize
#define cudaDeviceSynchronize ::geomoe_emu::synchronize
#define cudaGetDevice ::geomoe_emu::get_device
#define cudaDeviceGetAttribute ::geomoe_emu::device_get_attribute
#undef __grid_constant__
#define __grid_constant__

// ---- barriers and warp collectives ----------------------------------------------------------------

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  geomoe_emu::syncthreads({file, line});
}

namespace geomoe_emu {

// A shuffle: each lane offers its value and names the lane it reads (-1: keeps its own).
template <class T> struct ShuffleSlot {
  T value;
  int src;
  T result;
  static void complete(ShuffleSlot** lanes, unsigned mask) {
    for_lanes(mask, [&](unsigned l) {
      const int s = lanes[l]->src;
      if (s >= 0 && !(mask >> s & 1u))
        throw Error(format("lane %u reads lane %d, which is not in the mask 0x%08x", l, s, mask));
      lanes[l]->result = s < 0 ? lanes[l]->value : lanes[s]->value;
    });
  }
};

template <class T> T shuffle(const char* what, unsigned mask, T v, int src, Site site) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffles move 4- or 8-byte values");
  ShuffleSlot<T> slot{v, src, v};
  collective(what, mask, slot, site);
  return slot.result;
}

inline int lane_id() { return static_cast<int>(g_thread->lane); }

inline void check_width(const char* what, int width, Site site) {
  if (width <= 0 || width > 32 || (width & (width - 1)))
    throw Error(format("%s at %s: width %d is not a power of two in 1..32", what, site.str().c_str(), width));
}

struct VoteSlot {
  std::uint64_t value;
  unsigned result;
  static void complete(VoteSlot** lanes, unsigned mask) {  // ballot: the lanes whose value is non-zero
    unsigned ballot = 0;
    for_lanes(mask, [&](unsigned l) { ballot |= unsigned(lanes[l]->value != 0) << l; });
    for_lanes(mask, [&](unsigned l) { lanes[l]->result = ballot; });
  }
};

struct MatchSlot {
  std::uint64_t value;
  unsigned result;
  static void complete(MatchSlot** lanes, unsigned mask) {  // the lanes holding the same value
    for_lanes(mask, [&](unsigned l) {
      unsigned same = 0;
      for_lanes(mask, [&](unsigned o) { same |= unsigned(lanes[o]->value == lanes[l]->value) << o; });
      lanes[l]->result = same;
    });
  }
};

struct SyncSlot {
  static void complete(SyncSlot**, unsigned) {}
};

template <class T> std::uint64_t bits_of(T v) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "4- or 8-byte values");
  std::uint64_t b = 0;
  std::memcpy(&b, &v, sizeof v);
  return b;
}

}  // namespace geomoe_emu

#define GEOMOE_EMU_SITE const char *file = __builtin_FILE(), int line = __builtin_LINE()

template <class T> T __shfl_sync(unsigned mask, T var, int srcLane, int width = 32, GEOMOE_EMU_SITE) {
  geomoe_emu::check_width("__shfl_sync", width, {file, line});
  const int lane = geomoe_emu::lane_id();
  return geomoe_emu::shuffle("__shfl_sync", mask, var, (lane & ~(width - 1)) + (srcLane & (width - 1)), {file, line});
}

template <class T> T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32, GEOMOE_EMU_SITE) {
  geomoe_emu::check_width("__shfl_up_sync", width, {file, line});
  const int lane = geomoe_emu::lane_id();
  const int src = (lane & (width - 1)) >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : -1;
  return geomoe_emu::shuffle("__shfl_up_sync", mask, var, src, {file, line});
}

template <class T> T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32, GEOMOE_EMU_SITE) {
  geomoe_emu::check_width("__shfl_down_sync", width, {file, line});
  const int lane = geomoe_emu::lane_id();
  const int src = (lane & (width - 1)) + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : -1;
  return geomoe_emu::shuffle("__shfl_down_sync", mask, var, src, {file, line});
}

// Lanes may read from earlier groups of `width` lanes but get their own value from later ones.
template <class T> T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = 32, GEOMOE_EMU_SITE) {
  geomoe_emu::check_width("__shfl_xor_sync", width, {file, line});
  const int lane = geomoe_emu::lane_id();
  const int src = lane ^ laneMask;
  const int src_ok = src >= 0 && src < 32 && src < (lane & ~(width - 1)) + width;
  return geomoe_emu::shuffle("__shfl_xor_sync", mask, var, src_ok ? src : -1, {file, line});
}

inline unsigned __ballot_sync(unsigned mask, int predicate, GEOMOE_EMU_SITE) {
  geomoe_emu::VoteSlot slot{static_cast<std::uint64_t>(predicate != 0), 0};
  geomoe_emu::collective("__ballot_sync", mask, slot, {file, line});
  return slot.result;
}

inline int __any_sync(unsigned mask, int predicate, GEOMOE_EMU_SITE) {
  geomoe_emu::VoteSlot slot{static_cast<std::uint64_t>(predicate != 0), 0};
  geomoe_emu::collective("__any_sync", mask, slot, {file, line});
  return slot.result != 0;
}

inline int __all_sync(unsigned mask, int predicate, GEOMOE_EMU_SITE) {
  geomoe_emu::VoteSlot slot{static_cast<std::uint64_t>(predicate != 0), 0};
  geomoe_emu::collective("__all_sync", mask, slot, {file, line});
  return slot.result == mask;
}

template <class T> unsigned __match_any_sync(unsigned mask, T value, GEOMOE_EMU_SITE) {
  geomoe_emu::MatchSlot slot{geomoe_emu::bits_of(value), 0};
  geomoe_emu::collective("__match_any_sync", mask, slot, {file, line});
  return slot.result;
}

inline void __syncwarp(unsigned mask = 0xffffffffu, GEOMOE_EMU_SITE) {
  geomoe_emu::SyncSlot slot;
  geomoe_emu::collective("__syncwarp", mask, slot, {file, line});
}

// ---- atomics: one host thread runs every thread of every block, so a plain update is atomic -------

template <class T> T atomicAdd(T* address, T val) {
  static_assert(std::is_arithmetic<T>::value, "atomicAdd on int, unsigned, unsigned long long, float or double");
  const T old = *address;
  *address = old + val;
  return old;
}
template <class T> T atomicMax(T* address, T val) {
  const T old = *address;
  *address = old < val ? val : old;
  return old;
}
template <class T> T atomicMin(T* address, T val) {
  const T old = *address;
  *address = val < old ? val : old;
  return old;
}
template <class T> T atomicExch(T* address, T val) {
  const T old = *address;
  *address = val;
  return old;
}
template <class T> T atomicCAS(T* address, T compare, T val) {
  const T old = *address;
  if (old == compare) *address = val;
  return old;
}

inline void __threadfence() {}
inline void __threadfence_block() {}

// ---- intrinsics: the fast-math ones compute the accurate function (the GPU's are within a few ulp) --

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanhf(float x) { return std::tanh(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : x > 1.f ? 1.f : x; }
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fmaf_rn(float x, float y, float z) { return std::fma(x, y, z); }
inline int __float_as_int(float x) {
  int i;
  std::memcpy(&i, &x, 4);
  return i;
}
inline float __int_as_float(int i) {
  float x;
  std::memcpy(&x, &i, 4);
  return x;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x ? __builtin_clz(static_cast<unsigned>(x)) : 32; }
inline int __ffs(int x) { return __builtin_ffs(x); }
template <class T> T __ldg(const T* p) { return *p; }
