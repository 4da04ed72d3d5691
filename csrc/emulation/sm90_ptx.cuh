// Emulated sm_90a instructions (the kernels' csrc/sm90_ptx.cuh) for the emulated core: wgmma, the
// async-proxy fence, mbarriers and TMA tile loads, carried out on the CPU at their documented
// semantics (PTX ISA: "Asynchronous Warpgroup Level Matrix Multiply-Accumulate", its matrix
// descriptor and canonical shared-memory layouts; "mbarrier"; "cp.async.bulk.tensor" and the
// driver's cuTensorMapEncodeTiled).
//
// wgmma.mma_async is asynchronous here as on the GPU: the hardware may read an issued operation's
// shared-memory operands at any time until the thread's wait for its group (wgmma.wait_group), so
// the emulation reads them at issue, reads them again at that wait and fails the launch if any
// element changed in between (a stage refilled, or a tile overwritten, before the wgmma reading it
// has completed), and writes the thread's accumulators only at the wait, the latest a GPU may (a
// kernel that reads them before the wait reads old values). Each thread computes its own
// accumulator elements (the fragment layout of the PTX ISA's m64nNk16 D matrix) from the operand
// elements it reads (together the warpgroup's threads read every element of both operands),
// products of halves exact in float, sums in k order.
//
// Descriptors: the kernel's own make_desc (csrc/sm90_desc.cuh, the one both builds include) builds
// them and every field is decoded here as the PTX ISA lays it out; the 128-byte swizzle with base
// offset 0 only (what the kernels use), which requires the start address to lie in the first
// 128-byte row of a 1,024-byte aligned swizzle atom (the base offset field is (addr >> 7) & 7
// otherwise), and the operand addresses must lie inside the launch's dynamic shared memory.
// Addresses are shared-window addresses, and the dynamic shared memory starts at
// GEOMOE_EMULATE_SMEM_BASE (emulator.h; 1,152 by default, not 1,024-byte aligned, as on a GPU where
// static shared memory comes first): the swizzle XORs the window address's bits 4-6 with its bits
// 7-9 as the hardware does, so a tile not 1,024-byte aligned is refused (TMA, wgmma) or read in the
// wrong swizzle phase.
//
// mbarrier: arrivals and transaction bytes per phase, phase parity; a thread waiting for a phase
// that has not completed blocks (a deadlock names it); a wait for a parity whose phase has completed
// returns at once, whatever is in flight on the barrier (a wrong parity reads a stage's old data).
// TMA: the box is read from global memory when the copy is issued (elements outside the tensor are
// zeros, as the tensor map's OOB fill NONE says), written to shared memory (with the 128-byte
// swizzle of its window addresses) and counted on its mbarrier when a thread waits on that
// barrier's current phase: the latest; GEOMOE_EMULATE_COPIES=eager lands it at issue instead.
// Every box issued is counted (Runtime::tma_boxes; the emulated core's emulated_tma_boxes()), so a
// test can tell a kernel's TMA path from its cp.async fallback.
//
// Not modelled (what covers it): that the 128 threads of a warpgroup pass the same descriptors and
// reach the same wgmma (the kernels compute them from warp-uniform values; the fresh-reader audit
// and the GPU tests); wgmma.fence and fence.proxy.async are no-ops (a CPU has one proxy: their
// placement is checked by review and on the GPU); the cluster scope (the kernels use one CTA). An
// in-flight operand overwritten with its own bits is not seen (nothing changed), and a refill whose
// copies land lazily after the wait is seen only with GEOMOE_EMULATE_COPIES=eager (the tests run both).
#pragma once
#include <cuda_runtime.h>

#include <cuda.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <cuda_pipeline_primitives.h>  // eager_copies()

#include "sm90_desc.cuh"  // make_desc: the kernels' own (csrc/sm90_desc.cuh)

#define GEOMOE_SM90A 1  // the emulation carries out the sm_90a code path

namespace geomoe_emu {

// The shared-window address of p (the dynamic shared memory starts at the window address
// runtime().smem_base): descriptors and TMA address only the launch's dynamic shared memory. An
// mbarrier (any shared object) is known by its own address, never through the window.
inline uint32_t shared_offset(const void* p, const char* what) {
  Runtime& r = runtime();
  const auto* q = static_cast<const unsigned char*>(p);
  if (q < r.dynamic_smem || q >= r.dynamic_smem + r.dynamic_smem_bytes)
    throw Error(format("%s: address %p is not in the launch's %zu bytes of dynamic shared memory", what, p,
                       r.dynamic_smem_bytes));
  return static_cast<uint32_t>(r.smem_base + (q - r.dynamic_smem));
}

// The bytes at shared-window address `addr`, which must lie in the launch's dynamic shared memory.
inline unsigned char* shared_at(uint64_t addr, std::size_t bytes, const char* what) {
  Runtime& r = runtime();
  if (addr < r.smem_base || addr - r.smem_base + bytes > r.dynamic_smem_bytes)
    throw Error(format("%s: shared address 0x%llx (+%zu bytes) is outside the launch's %zu bytes of dynamic shared "
                       "memory at 0x%zx",
                       what, static_cast<unsigned long long>(addr), bytes, r.dynamic_smem_bytes, r.smem_base));
  return r.dynamic_smem + (addr - r.smem_base);
}

// The 128-byte swizzle of a shared-window address: its 16-byte chunk (bits 4-6) XOR its row in the
// 1,024-byte atom (bits 7-9), the pattern TMA's SWIZZLE_128B writes and wgmma's layout 1 reads.
inline uint64_t swizzle128(uint64_t addr) { return addr ^ (((addr >> 7) & 7) << 4); }

// The window address of element (mn, k) of a wgmma operand described by desc (a T of 2 bytes);
// K-major: row mn, column k (mn / 8 selects the 8-row group: an operand 128 rows wide is 16 groups
// SBO apart); MN-major: row k, column mn (the rows 128 bytes, 8-row groups SBO apart, 64-element
// column groups LBO apart), swizzled. The fields, as the PTX ISA's "Matrix Descriptor
// Format" lays them out: start address bits 0-13 (>> 4), LBO 16-29, SBO 32-45, base offset 49-51,
// swizzle mode 62-63 (1: 128 bytes).
inline uint64_t wgmma_operand_address(uint64_t desc, int mn, int k, bool mn_major, std::size_t elem) {
  const uint64_t start = (desc & 0x3FFF) << 4, lbo = ((desc >> 16) & 0x3FFF) << 4, sbo = ((desc >> 32) & 0x3FFF) << 4;
  const int row = mn_major ? k : mn, col = mn_major ? mn : k;
  return swizzle128(start + uint64_t(row / 8) * sbo + uint64_t(row % 8) * 128 + uint64_t(col / 64) * lbo +
                    uint64_t(col % 64) * elem);
}

// What the emulator requires of a descriptor (and the hardware of its fields): the 128-byte swizzle,
// base offset 0 and so a start address in the first row of a 1,024-byte aligned atom, SBO 1,024
// bytes (8 rows of 128), a nonzero LBO field. LBO (PTX ISA, "Leading Dimension Byte Offset"): in a
// swizzled K-major operand not used (assumed 1: its 16 k lie in one 128-byte row); in a swizzled
// MN-major one the offset from one (swizzle bytes / 16) = 8 groups of 8 M / N elements, a 64-wide
// atom, to the next: wgmma_operand_address adds (mn / 64) LBO, so an m64n128k16 B of two 64-column
// atoms reads its columns 64..127 where the descriptor's LBO says, right or wrong.
inline void check_wgmma_descriptor(uint64_t desc, const char* operand) {
  const uint64_t start = (desc & 0x3FFF) << 4, sbo = ((desc >> 32) & 0x3FFF) << 4;
  const unsigned base_offset = (desc >> 49) & 7, layout = static_cast<unsigned>(desc >> 62);
  if (layout != 1 || base_offset != 0)
    throw Error(format("wgmma descriptor of %s 0x%016llx: swizzle mode %u, base offset %u; the emulator models the "
                       "128-byte swizzle (mode 1) with base offset 0",
                       operand, static_cast<unsigned long long>(desc), layout, base_offset));
  if ((start >> 7) & 7)
    throw Error(format("wgmma descriptor of %s 0x%016llx: start address 0x%llx is in row %u of its 1,024-byte "
                       "swizzle atom, but the base offset field is 0 (128-byte swizzled tiles start 1,024-byte "
                       "aligned in the shared window)",
                       operand, static_cast<unsigned long long>(desc), static_cast<unsigned long long>(start),
                       static_cast<unsigned>((start >> 7) & 7)));
  if (sbo != 1024 || ((desc >> 16) & 0x3FFF) == 0)
    throw Error(format("wgmma descriptor of %s 0x%016llx: stride byte offset %llu, leading byte offset field %llu; "
                       "a 128-byte swizzled operand has 8-row groups 1,024 bytes apart",
                       operand, static_cast<unsigned long long>(desc), static_cast<unsigned long long>(sbo),
                       static_cast<unsigned long long>((desc >> 16) & 0x3FFF)));
}

// One issued wgmma.mma_async (m64nNk16) of one thread: the window addresses of the operand elements
// it reads (rows l / 4 and l / 4 + 8 of its warp's 16 of A, its N / 4 columns of B; 16 k each) and
// their bits as read at issue.
template <int N> struct WgmmaOperands {
  static constexpr int kA = 2 * 16, kB = N / 4 * 16;
  uint32_t addr[kA + kB];
  uint16_t bits[kA + kB];
};

}  // namespace geomoe_emu

namespace geomoe {
namespace sm90 {

inline uint32_t smem_addr(const void* p) { return geomoe_emu::shared_offset(p, "shared address"); }

inline void wgmma_fence() {}
template <int R> inline void fence_operand(float (&)[R]) {}  // the compiler's register moves: nothing to emulate
inline void fence_proxy_async() {}

inline void wgmma_commit() {
  geomoe_emu::Thread& t = *geomoe_emu::g_thread;
  std::size_t grouped = 0;
  for (std::size_t n : t.wgmma_groups) grouped += n;
  t.wgmma_groups.push_back(t.wgmma_ops.size() - grouped);
}

// Carries out every committed group but the newest N, oldest first (each operation checks that its
// operands still hold what it read at issue).
template <int N> inline void wgmma_wait(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  geomoe_emu::Thread& t = *geomoe_emu::g_thread;
  std::size_t done = 0, groups = 0;
  for (; t.wgmma_groups.size() - groups > static_cast<std::size_t>(N); ++groups) done += t.wgmma_groups[groups];
  t.wgmma_wait_site = {file, line};  // for the operations' messages
  for (std::size_t i = 0; i < done; ++i) t.wgmma_ops[i]();
  t.wgmma_ops.erase(t.wgmma_ops.begin(), t.wgmma_ops.begin() + done);
  t.wgmma_issues.erase(t.wgmma_issues.begin(), t.wgmma_issues.begin() + done);
  t.wgmma_groups.erase(t.wgmma_groups.begin(), t.wgmma_groups.begin() + groups);
}

// wgmma.mma_async.m64nNk16 (N = 64 or 128): the thread's N / 2 accumulators, d[r] at row
// 16 w + l / 4 + 8 ((r / 2) % 2), column 8 (r / 4) + 2 (l % 4) + r % 2 (the PTX ISA's D fragment).
template <typename T, int N, int TRANS_A, int TRANS_B>
inline void wgmma_m64nNk16(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int scale_d, const char* file,
                           int line) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value, "fp16 or bf16 operands");
  static_assert(sizeof(T) == sizeof(uint16_t), "16-bit operands");
  static_assert(N == 64 || N == 128, "the shapes the kernels issue");
  using WgmmaOperands = geomoe_emu::WgmmaOperands<N>;
  geomoe_emu::Thread& t = *geomoe_emu::g_thread;
  const geomoe_emu::Site issue{file, line};
  const unsigned in_group = (t.warp % 4) * 32 + t.lane;  // the thread's place in its warpgroup
  const unsigned w = in_group / 32, l = in_group % 32;
  // read at issue, the earliest the hardware may: A's rows 16 w + l / 4 (+ 8), B's columns
  // 8 q + 2 (l % 4) + p (the thread's accumulator elements' rows and columns)
  auto ops = std::make_shared<WgmmaOperands>();
  try {
    geomoe_emu::check_wgmma_descriptor(desc_a, "A");
    geomoe_emu::check_wgmma_descriptor(desc_b, "B");
    for (int h = 0; h < 2; ++h)
      for (int k = 0; k < 16; ++k)
        ops->addr[h * 16 + k] = static_cast<uint32_t>(
            geomoe_emu::wgmma_operand_address(desc_a, 16 * w + l / 4 + 8 * h, k, TRANS_A, sizeof(T)));
    for (int c = 0; c < N / 4; ++c)
      for (int k = 0; k < 16; ++k)
        ops->addr[WgmmaOperands::kA + c * 16 + k] = static_cast<uint32_t>(
            geomoe_emu::wgmma_operand_address(desc_b, 8 * (c / 2) + 2 * (l % 4) + c % 2, k, TRANS_B, sizeof(T)));
    for (int i = 0; i < WgmmaOperands::kA + WgmmaOperands::kB; ++i)
      std::memcpy(&ops->bits[i], geomoe_emu::shared_at(ops->addr[i], 2, "wgmma.mma_async operand"), 2);
  } catch (const geomoe_emu::Error& e) {
    throw geomoe_emu::Error(geomoe_emu::format("wgmma.mma_async at %s: ", issue.str().c_str()) + e.message);
  }
  t.wgmma_issues.push_back(issue);
  // at the wait (the latest the hardware may read them): the same bits, then the products
  t.wgmma_ops.push_back([&d, ops, scale_d, issue, &t] {
    const geomoe_emu::Site wait = t.wgmma_wait_site;
    for (int i = 0; i < WgmmaOperands::kA + WgmmaOperands::kB; ++i) {
      uint16_t now;
      std::memcpy(&now, geomoe_emu::shared_at(ops->addr[i], 2, "wgmma.mma_async operand"), 2);
      if (now != ops->bits[i]) {
        const bool a = i < WgmmaOperands::kA;
        const int j = a ? i : i - WgmmaOperands::kA;
        throw geomoe_emu::Error(geomoe_emu::format(
            "wgmma.mma_async issued at %s: its operand %s changed before the wgmma.wait_group at %s that completes it "
            "(shared address 0x%x, k %d: 0x%04x at issue, 0x%04x now); the hardware may read the operands at any time "
            "until that wait",
            issue.str().c_str(), a ? "A" : "B", wait.str().c_str(), ops->addr[i], j % 16, ops->bits[i], now));
      }
    }
    auto value = [&](int i) {
      T v;
      std::memcpy(static_cast<void*>(&v), &ops->bits[i], sizeof v);
      return static_cast<float>(v);
    };
    float out[N / 2];
    for (int r = 0; r < N / 2; ++r) {  // row half (r / 2) % 2, column c = 2 (r / 4) + r % 2 of the thread's N / 4
      const int h = (r / 2) % 2, c = 2 * (r / 4) + r % 2;
      float acc = scale_d ? d[r] : 0.f;
      for (int k = 0; k < 16; ++k) acc += value(h * 16 + k) * value(WgmmaOperands::kA + c * 16 + k);
      out[r] = acc;
    }
    std::memcpy(d, out, sizeof out);
  });
}

template <typename T, int TRANS_A, int TRANS_B>
inline void wgmma_m64n64k16(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int scale_d,
                            const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  wgmma_m64nNk16<T, 64, TRANS_A, TRANS_B>(d, desc_a, desc_b, scale_d, file, line);
}

template <typename T, int TRANS_A, int TRANS_B>
inline void wgmma_m64n128k16(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int scale_d,
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  wgmma_m64nNk16<T, 128, TRANS_A, TRANS_B>(d, desc_a, desc_b, scale_d, file, line);
}

// ---- mbarriers and TMA ----------------------------------------------------------------------------

inline geomoe_emu::Mbarrier& mbarrier_of(const uint64_t* bar, const char* what) {
  auto& table = geomoe_emu::runtime().mbarriers;
  auto it = table.find(bar);
  if (it == table.end())
    throw geomoe_emu::Error(geomoe_emu::format("%s on %p, which no mbarrier.init of this block set up", what, (const void*)bar));
  return it->second;
}

// The phase completes when every arrival has come and every transaction byte has landed: waiters go on.
inline void mbarrier_settle(geomoe_emu::Mbarrier& b) {
  if (b.pending == 0 && b.tx == 0) {
    b.phase ^= 1u;
    b.pending = b.count;
  }
  geomoe_emu::Runtime& r = geomoe_emu::runtime();
  for (unsigned i = 0; i < r.n_threads; ++i)
    if (r.threads[i].state == geomoe_emu::State::kMbarrier) r.threads[i].state = geomoe_emu::State::kRunnable;
  r.woken = true;  // every waiter looks again (a copy to land, or its phase done)
}

inline void mbar_init(uint64_t* bar, unsigned count) {
  if (count == 0) throw geomoe_emu::Error("mbarrier.init with an arrival count of 0");
  auto& table = geomoe_emu::runtime().mbarriers;
  auto it = table.find(bar);
  if (it != table.end() && !it->second.copies.empty())
    throw geomoe_emu::Error(geomoe_emu::format("mbarrier.init on %p while a TMA copy issued at %s on it has not landed",
                                               (const void*)bar, it->second.site.str().c_str()));
  geomoe_emu::Mbarrier b;
  b.count = b.pending = count;
  table[bar] = b;
}

inline void mbar_arrive_expect_tx(uint64_t* bar, unsigned bytes) {
  geomoe_emu::Mbarrier& b = mbarrier_of(bar, "mbarrier.arrive.expect_tx");
  if (b.pending == 0) throw geomoe_emu::Error("mbarrier.arrive.expect_tx: more arrivals than the barrier's count");
  b.tx += bytes;
  --b.pending;
  mbarrier_settle(b);
}

inline void mbar_land(geomoe_emu::Mbarrier& b) {
  std::vector<std::function<void()>> copies;
  copies.swap(b.copies);
  for (auto& c : copies) c();  // each subtracts its bytes from b.tx
}

inline void mbar_wait(uint64_t* bar, unsigned parity, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  geomoe_emu::Thread& t = *geomoe_emu::g_thread;
  for (;;) {
    geomoe_emu::Mbarrier& b = mbarrier_of(bar, "mbarrier.try_wait.parity");
    // the phase of that parity has completed (the current one has the other parity): at once, and
    // what is in flight on the barrier (the current phase's copies) has not landed
    if (b.phase != (parity & 1u)) return;
    if (!b.copies.empty()) {  // the current phase's copies land now, the latest they may
      mbar_land(b);
      mbarrier_settle(b);
      continue;
    }
    t.state = geomoe_emu::State::kMbarrier;
    t.site = {file, line};
    t.what = "mbarrier.try_wait.parity";
    geomoe_emu::yield(t);
  }
}

// The emulated tensor map, inside the opaque CUtensorMap.
struct TensorMap {
  uint64_t magic;
  const unsigned char* base;
  uint8_t rank, elem, swizzle128, pad[5];
  uint64_t dims[5], strides[5];  // strides in bytes, strides[0] = elem
  uint16_t box[5];
};
static_assert(sizeof(TensorMap) <= sizeof(CUtensorMap), "the emulated tensor map fits the opaque one");
constexpr uint64_t kTensorMapMagic = 0x67656f6d6f65544dull;

inline void tma_load_3d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  using geomoe_emu::Error;
  using geomoe_emu::format;
  TensorMap m;
  std::memcpy(&m, map, sizeof m);
  if (m.magic != kTensorMapMagic || m.rank != 3)
    throw Error(format("cp.async.bulk.tensor.3d at %s: the tensor map is not a 3-D map from cuTensorMapEncodeTiled", geomoe_emu::Site{file, line}.str().c_str()));
  const uint32_t off = geomoe_emu::shared_offset(dst, "cp.async.bulk.tensor destination");
  if (off % (m.swizzle128 ? 1024 : 128))
    throw Error(format("cp.async.bulk.tensor at %s: shared destination 0x%x is not %d-byte aligned",
                       geomoe_emu::Site{file, line}.str().c_str(), off, m.swizzle128 ? 1024 : 128));
  const std::size_t row_bytes = std::size_t(m.box[0]) * m.elem, bytes = row_bytes * m.box[1] * m.box[2];
  geomoe_emu::shared_at(off, bytes, "cp.async.bulk.tensor destination");
  std::vector<unsigned char> box(bytes, 0);  // read now; outside the tensor: zeros
  const int64_t c[3] = {c0, c1, c2};
  for (uint32_t i2 = 0; i2 < m.box[2]; ++i2)
    for (uint32_t i1 = 0; i1 < m.box[1]; ++i1)
      for (uint32_t i0 = 0; i0 < m.box[0]; ++i0) {
        const int64_t g0 = c[0] + i0, g1 = c[1] + i1, g2 = c[2] + i2;
        if (g0 < 0 || g1 < 0 || g2 < 0 || uint64_t(g0) >= m.dims[0] || uint64_t(g1) >= m.dims[1] || uint64_t(g2) >= m.dims[2])
          continue;
        const unsigned char* src = m.base + g0 * m.strides[0] + g1 * m.strides[1] + g2 * m.strides[2];
        std::memcpy(&box[((std::size_t(i2) * m.box[1] + i1) * m.box[0] + i0) * m.elem], src, m.elem);
      }
  geomoe_emu::Mbarrier& b = mbarrier_of(bar, "cp.async.bulk.tensor");
  ++geomoe_emu::runtime().tma_boxes;
  const bool swz = m.swizzle128;
  auto land = [box = std::move(box), off, swz, bar, bytes] {
    for (std::size_t o = 0; o < bytes; o += 16) {  // 16-byte chunks, swizzled within 1,024-byte atoms
      const uint64_t at = swz ? geomoe_emu::swizzle128(off + o) : off + o;
      std::memcpy(geomoe_emu::shared_at(at, 16, "cp.async.bulk.tensor destination"), &box[o], 16);
    }
    geomoe_emu::runtime().mbarriers.at(bar).tx -= static_cast<long long>(bytes);
  };
  if (geomoe_emu::eager_copies()) {
    land();
    mbarrier_settle(b);
    return;
  }
  if (b.copies.empty()) b.site = {file, line};
  b.copies.push_back(std::move(land));
  mbarrier_settle(b);  // a waiter lands it
}

}  // namespace sm90
}  // namespace geomoe

namespace geomoe_emu {

// cuTensorMapEncodeTiled, as the driver checks it (for what the emulator models: 16-bit elements,
// no interleave, no swizzle or the 128-byte one, unit element strides).
inline CUresult encode_tensor_map_tiled(CUtensorMap* map, CUtensorMapDataType type, cuuint32_t rank, void* address,
                                        const cuuint64_t* dims, const cuuint64_t* strides, const cuuint32_t* box,
                                        const cuuint32_t* element_strides, CUtensorMapInterleave interleave,
                                        CUtensorMapSwizzle swizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill oob) {
  if (map == nullptr || reinterpret_cast<uintptr_t>(map) % 64 || rank < 1 || rank > 5 ||
      reinterpret_cast<uintptr_t>(address) % 16 || interleave != CU_TENSOR_MAP_INTERLEAVE_NONE ||
      oob != CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE ||
      (swizzle != CU_TENSOR_MAP_SWIZZLE_NONE && swizzle != CU_TENSOR_MAP_SWIZZLE_128B) ||
      (type != CU_TENSOR_MAP_DATA_TYPE_FLOAT16 && type != CU_TENSOR_MAP_DATA_TYPE_BFLOAT16))
    return CUDA_ERROR_INVALID_VALUE;
  geomoe::sm90::TensorMap m{};
  m.magic = geomoe::sm90::kTensorMapMagic;
  m.base = static_cast<const unsigned char*>(address);
  m.rank = static_cast<uint8_t>(rank);
  m.elem = 2;
  m.swizzle128 = swizzle == CU_TENSOR_MAP_SWIZZLE_128B;
  m.strides[0] = m.elem;
  for (cuuint32_t i = 0; i < rank; ++i) {
    if (dims[i] == 0 || dims[i] > (uint64_t(1) << 32) || box[i] == 0 || box[i] > 256 || element_strides[i] != 1)
      return CUDA_ERROR_INVALID_VALUE;
    m.dims[i] = dims[i];
    m.box[i] = static_cast<uint16_t>(box[i]);
    if (i > 0) {
      if (strides[i - 1] % 16 || strides[i - 1] >= (uint64_t(1) << 40)) return CUDA_ERROR_INVALID_VALUE;
      m.strides[i] = strides[i - 1];
    }
  }
  if ((m.box[0] * m.elem) % 16 || (m.swizzle128 && m.box[0] * m.elem > 128)) return CUDA_ERROR_INVALID_VALUE;
  std::memset(map, 0, sizeof *map);
  std::memcpy(map, &m, sizeof m);
  return CUDA_SUCCESS;
}

inline cudaError_t get_driver_entry_point(const char* symbol, void** fn, unsigned int, unsigned long long,
                                          cudaDriverEntryPointQueryResult* status = nullptr) {
  if (std::strcmp(symbol, "cuTensorMapEncodeTiled") != 0) {
    if (status) *status = cudaDriverEntryPointSymbolNotFound;
    return cudaErrorSymbolNotFound;
  }
  *fn = reinterpret_cast<void*>(&encode_tensor_map_tiled);
  if (status) *status = cudaDriverEntryPointSuccess;
  return cudaSuccess;
}

}  // namespace geomoe_emu

#define cudaGetDriverEntryPointByVersion ::geomoe_emu::get_driver_entry_point
