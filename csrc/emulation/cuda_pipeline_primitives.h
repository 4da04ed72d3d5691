// Emulated CUDA pipeline primitives (the toolkit's <cuda_pipeline_primitives.h>) for the emulated
// core: __pipeline_memcpy_async, __pipeline_commit and __pipeline_wait_prior, the asynchronous
// global -> shared copies (cp.async) that the grouped GEMM's multi-stage pipeline issues.
//
// The toolkit's header is device code only (inline PTX), so the host compiler cannot use it. Here a
// copy is asynchronous in the one sense a kernel can observe: each thread's copies are queued in
// issue order, __pipeline_commit closes the thread's current batch, and __pipeline_wait_prior(n)
// lands every committed batch but the newest n, in order. The source is read when the copy is
// issued (so AddressSanitizer names the line that issued an out-of-bounds copy); the destination is
// written only at the wait. A kernel that reads a stage before waiting for it, or before the
// __syncthreads that makes the other threads' copies visible, reads what was there before (the
// launch fills dynamic shared memory with NaNs), and the tests' results show it. Checked as the
// toolkit asserts: sizes 4, 8 or 16 bytes, zfill at most the size, both addresses aligned to the
// size (the source only when bytes are read); a thread that returns with copies it never waited for
// fails the launch. Not checked: that the destination is shared memory and the source global.
//
// Landing at the wait is the latest a GPU may land a copy, which shows a stage read too early but
// hides one overwritten too early (a copy issued into a stage that other threads still read, before
// the barrier that ends their reads): GEOMOE_EMULATE_COPIES=eager lands each copy as it is issued,
// the earliest, and then that race shows in the results instead. The tests run both.
#pragma once
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>

namespace geomoe_emu {
inline bool eager_copies() {
  static const bool eager = [] {
    const char* v = std::getenv("GEOMOE_EMULATE_COPIES");
    return v != nullptr && std::strcmp(v, "eager") == 0;
  }();
  return eager;
}
}  // namespace geomoe_emu

inline void __pipeline_memcpy_async(void* __restrict__ dst_shared, const void* __restrict__ src_global,
                                    size_t size_and_align, size_t zfill = 0, GEOMOE_EMU_SITE) {
  using geomoe_emu::Error;
  using geomoe_emu::format;
  const geomoe_emu::Site site{file, line};
  if (size_and_align != 4 && size_and_align != 8 && size_and_align != 16)
    throw Error(
        format("__pipeline_memcpy_async at %s: size %zu is not 4, 8 or 16 bytes", site.str().c_str(), size_and_align));
  if (zfill > size_and_align)
    throw Error(format("__pipeline_memcpy_async at %s: zfill %zu is more than the size %zu", site.str().c_str(), zfill,
                       size_and_align));
  const std::size_t read = size_and_align - zfill;
  if (reinterpret_cast<std::uintptr_t>(dst_shared) % size_and_align ||
      (read && reinterpret_cast<std::uintptr_t>(src_global) % size_and_align))
    throw Error(format("__pipeline_memcpy_async at %s: destination %p or source %p is not %zu-byte aligned",
                       site.str().c_str(), dst_shared, src_global, size_and_align));
  geomoe_emu::AsyncCopy c{static_cast<unsigned char*>(dst_shared), static_cast<unsigned>(size_and_align), {}, site};
  if (read) std::memcpy(c.bytes, src_global, read);
  std::memset(c.bytes + read, 0, zfill);
  if (geomoe_emu::eager_copies())
    std::memcpy(c.dst, c.bytes, c.size);  // lands now (and again, the same bytes, at the wait)
  geomoe_emu::g_thread->async_copies.push_back(c);
}

inline void __pipeline_commit() {
  geomoe_emu::Thread& t = *geomoe_emu::g_thread;
  std::size_t committed = 0;
  for (std::size_t n : t.async_batches) committed += n;
  t.async_batches.push_back(t.async_copies.size() - committed);
}

// As the toolkit's: more than 8 pending batches are waited for as 8.
inline void __pipeline_wait_prior(size_t prior) {
  geomoe_emu::Thread& t = *geomoe_emu::g_thread;
  if (prior > 8) prior = 8;
  std::size_t landed = 0, batches = 0;
  for (; t.async_batches.size() - batches > prior; ++batches) landed += t.async_batches[batches];
  for (std::size_t i = 0; i < landed; ++i)
    std::memcpy(t.async_copies[i].dst, t.async_copies[i].bytes, t.async_copies[i].size);
  t.async_copies.erase(t.async_copies.begin(), t.async_copies.begin() + landed);
  t.async_batches.erase(t.async_batches.begin(), t.async_batches.begin() + batches);
}
