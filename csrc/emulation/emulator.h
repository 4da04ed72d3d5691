// The engine of the emulated CUDA core: launches, blocks of fibers, __syncthreads, warp
// collectives, and the checks that turn what a GPU would reject (or hang on) into an error naming
// the kernel. Included through the emulated <cuda_runtime.h>; see that file for the overview.
#pragma once
#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "fiber.h"

namespace geomoe_emu {

// ---- limits of the card (sm_80 and sm_90 agree on these; shared memory is sm_80's, the smaller) ----
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxBlockDim[3] = {1024, 1024, 64};
constexpr unsigned kMaxGridDim[3] = {2147483647u, 65535, 65535};
constexpr std::size_t kDefaultMaxDynamicShared = 48 * 1024;  // without cudaFuncAttributeMaxDynamicSharedMemorySize
constexpr std::size_t kOptInMaxShared = 163 * 1024;          // the most that attribute may ask for on sm_80
constexpr int kWarpSize = 32;
constexpr std::size_t kStackBytes = 256 * 1024;  // per CUDA thread; address space only until touched

// A failure found while a kernel runs, thrown inside the fiber that found it and caught at the base
// of that fiber's stack.
struct Error : std::exception {
  std::string message;
  explicit Error(std::string m) : message(std::move(m)) {}
  const char* what() const noexcept override { return message.c_str(); }
};

inline std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
inline std::string format(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  return buf;
}

struct Site {
  const char* file;
  int line;
  bool operator==(const Site& o) const { return line == o.line && (file == o.file || std::strcmp(file, o.file) == 0); }
  std::string str() const {
    const char* slash = std::strrchr(file, '/');
    return format("%s:%d", slash ? slash + 1 : file, line);
  }
};

// "0-15, 32, 40-47" for a sorted list of indices
inline std::string ranges(const std::vector<unsigned>& ids) {
  std::string out;
  for (std::size_t i = 0; i < ids.size();) {
    std::size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (!out.empty()) out += ", ";
    out += j == i ? format("%u", ids[i]) : format("%u-%u", ids[i], ids[j]);
    i = j + 1;
  }
  return out;
}

inline std::vector<unsigned> lanes_of(unsigned mask) {
  std::vector<unsigned> v;
  for (unsigned l = 0; l < 32; ++l)
    if (mask >> l & 1u) v.push_back(l);
  return v;
}

// f(lane) for each lane of the mask, in order (no allocation: collectives complete this way)
template <class F> void for_lanes(unsigned mask, F&& f) {
  for (; mask; mask &= mask - 1) f(static_cast<unsigned>(__builtin_ctz(mask)));
}

// ---- the kernel's name, from the symbol table (kernels have internal linkage: not in dladdr's table) --

inline std::string demangled(const char* name) {
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> d(abi::__cxa_demangle(name, nullptr, nullptr, &status), std::free);
  std::string s = status == 0 && d ? d.get() : name;
  if (!s.empty() && s.back() == ')') {  // drop the parameter list
    int depth = 0;
    for (std::size_t i = s.size(); i-- > 0;) {
      depth += s[i] == ')' ? 1 : s[i] == '(' ? -1 : 0;
      if (depth == 0) {
        s.resize(i);
        break;
      }
    }
  }
  if (s.rfind("void ", 0) == 0) s.erase(0, 5);  // a template's mangled name carries its return type
  for (std::size_t p; (p = s.find("(anonymous namespace)::")) != std::string::npos;) s.erase(p, 23);
  return s;
}

inline std::string symbol_name(const void* fn) {
  Dl_info info{};
  if (!dladdr(fn, &info) || !info.dli_fname) return {};
  if (info.dli_sname && info.dli_saddr == fn) return demangled(info.dli_sname);
  std::string found;
  const int fd = open(info.dli_fname, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return {};
  struct stat st{};
  void* map = fstat(fd, &st) == 0 ? mmap(nullptr, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0) : MAP_FAILED;
  close(fd);
  if (map == MAP_FAILED) return {};
  const auto* base = static_cast<const char*>(map);
  const auto* eh = reinterpret_cast<const ElfW(Ehdr)*>(base);
  const auto want = reinterpret_cast<std::uintptr_t>(fn) -
                    (eh->e_type == ET_DYN ? reinterpret_cast<std::uintptr_t>(info.dli_fbase) : 0);
  const bool elf = std::memcmp(eh->e_ident, ELFMAG, SELFMAG) == 0;
  if (elf && eh->e_shoff + eh->e_shnum * sizeof(ElfW(Shdr)) <= std::size_t(st.st_size)) {
    const auto* sh = reinterpret_cast<const ElfW(Shdr)*>(base + eh->e_shoff);
    for (unsigned i = 0; i < eh->e_shnum && found.empty(); ++i) {
      if (sh[i].sh_type != SHT_SYMTAB) continue;
      const auto* syms = reinterpret_cast<const ElfW(Sym)*>(base + sh[i].sh_offset);
      const char* names = base + sh[sh[i].sh_link].sh_offset;
      for (std::size_t k = 0; k < sh[i].sh_size / sizeof(ElfW(Sym)); ++k)
        if (ELF64_ST_TYPE(syms[k].st_info) == STT_FUNC && syms[k].st_value == want) {
          found = demangled(names + syms[k].st_name);
          break;
        }
    }
  }
  munmap(map, st.st_size);
  return found;
}

// ---- the state of a launch ----------------------------------------------------------------------

enum class State : unsigned char { kRunnable, kBarrier, kCollective, kMbarrier, kDone };

// An asynchronous global -> shared copy (cuda_pipeline_primitives.h): the source bytes are read when
// it is issued, the destination written when the thread waits for its batch.
struct AsyncCopy {
  unsigned char* dst;
  unsigned size;
  unsigned char bytes[16];
  Site site;
};

struct Thread {
  fiber::Context ctx;
  uint3 idx;
  unsigned warp, lane;
  State state;
  Site site;                               // where it waits
  const char* what;                        // in what (a barrier or a collective)
  unsigned mask;                           // the collective's lane mask
  std::vector<AsyncCopy> async_copies;     // issued and not yet landed, oldest first
  std::vector<std::size_t> async_batches;  // copies in each committed batch not yet waited for, oldest first
  // sm_90 (sm90_ptx.cuh): wgmma.mma_async issued and not yet carried out, oldest first, and the
  // operations in each committed group not yet waited for
  std::vector<std::function<void()>> wgmma_ops;
  std::vector<Site> wgmma_issues;  // where each was issued
  std::vector<std::size_t> wgmma_groups;
  Site wgmma_wait_site;  // the wait carrying them out
};

// An mbarrier (sm90_ptx.cuh) in shared memory: arrivals expected per phase, those still missing, the
// transaction bytes still to complete, the current phase's parity, and the TMA copies issued on it
// that have not landed (they land when a thread waits on the barrier, the latest they may).
struct Mbarrier {
  unsigned count = 0, pending = 0, phase = 0;
  long long tx = 0;
  std::vector<std::function<void()>> copies;
  Site site{"", 0};  // the oldest unlanded copy's issue
};

// A warp collective that some of the lanes named in its mask have reached. Lanes post their slot
// (their arguments and room for their result); the last to arrive completes it for all.
struct Group {
  const char* what;
  void (*complete)(void** slots, unsigned mask);  // also tells collectives of different kinds apart
  unsigned mask, arrived;
  void* slots[32];
};

struct Warp {
  unsigned present;  // lanes that exist (a block's last warp may be partial)
  unsigned exited;
  std::vector<Group> groups;
};

struct LaunchSpec {
  const char* expr;    // the kernel as written at the launch
  const void* kernel;  // its address (for its name and its attributes)
  dim3 grid, block;
  std::size_t smem;
  Site site;
  void (*body)(const void* ctx);  // runs the kernel in the calling fiber
  const void* ctx;
};

struct Runtime {
  std::mutex mutex;  // one launch at a time: blocks and their fibers all run on the launching thread
  std::vector<fiber::Stack> stacks;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  fiber::Context scheduler;
  const LaunchSpec* spec = nullptr;
  std::string kernel_name;
  unsigned n_threads = 0, at_barrier = 0, exited = 0;
  bool woken = false;  // a barrier or collective has made waiting threads runnable again
  bool failed = false;
  std::string failure;
  unsigned char* dynamic_smem = nullptr;
  std::size_t smem_base = 0;  // the shared-window address of dynamic_smem[0] (emulated_smem_base)
  cudaError_t last_error = cudaSuccess;
  std::string last_message;
  std::map<const void*, int> max_dynamic_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel
  std::size_t dynamic_smem_bytes = 0;
  std::map<const void*, Mbarrier> mbarriers;  // the running block's, by address
  unsigned long long tma_boxes = 0;           // TMA boxes issued since the process started (the tests read it)

  const std::string& name() {
    if (kernel_name.empty()) {
      kernel_name = symbol_name(spec->kernel);
      if (kernel_name.empty()) kernel_name = spec->expr;
    }
    return kernel_name;
  }
};

inline Runtime& runtime() {
  static Runtime r;
  return r;
}

// What threadIdx, blockIdx, blockDim and gridDim read (plain globals: one launch runs at a time).
inline Thread* g_thread = nullptr;
inline uint3 g_block_idx;
inline dim3 g_block_dim, g_grid_dim;

inline void set_error(cudaError_t code, std::string message) {
  Runtime& r = runtime();
  r.last_error = code;
  r.last_message = std::move(message);
}

// The launch fails with `why`, found by `t` (or by the scheduler when t is null).
inline void fail(Thread* t, const std::string& why) {
  Runtime& r = runtime();
  if (r.failed) return;
  r.failed = true;
  r.failure = format("kernel %s (launched at %s), block (%u,%u,%u)", r.name().c_str(), r.spec->site.str().c_str(),
                     g_block_idx.x, g_block_idx.y, g_block_idx.z);
  if (t) r.failure += format(", thread (%u,%u,%u)", t->idx.x, t->idx.y, t->idx.z);
  r.failure += ": " + why;
}

inline void yield(Thread& t) { fiber::switch_to(t.ctx, runtime().scheduler); }

// ---- barriers -------------------------------------------------------------------------------------

inline std::string exited_threads() {
  Runtime& r = runtime();
  std::vector<unsigned> ids;
  for (unsigned i = 0; i < r.n_threads; ++i)
    if (r.threads[i].state == State::kDone) ids.push_back(i);
  return ranges(ids);
}

inline void syncthreads(Site site) {
  Runtime& r = runtime();
  Thread& t = *g_thread;
  if (r.exited)
    throw Error(format("__syncthreads at %s is not reached by every thread of the block: threads %s have exited",
                       site.str().c_str(), exited_threads().c_str()));
  t.state = State::kBarrier;
  t.site = site;
  t.what = "__syncthreads";
  if (++r.at_barrier < r.n_threads) {
    yield(t);
    return;
  }
  r.at_barrier = 0;
  bool one_site = true;
  for (unsigned i = 1; i < r.n_threads && one_site; ++i) one_site = r.threads[i].site == r.threads[0].site;
  if (!one_site) {
    std::map<std::string, std::vector<unsigned>> sites;
    for (unsigned i = 0; i < r.n_threads; ++i) sites[r.threads[i].site.str()].push_back(i);
    std::string where;
    for (auto& [s, ids] : sites)
      where += format("%sthreads %s at %s", where.empty() ? "" : "; ", ranges(ids).c_str(), s.c_str());
    throw Error("the block's threads wait at different __syncthreads: " + where);
  }
  for (unsigned i = 0; i < r.n_threads; ++i) r.threads[i].state = State::kRunnable;
  r.woken = true;
  yield(t);  // the scheduler's order, not the last arrival, decides who goes on first
}

// ---- warp collectives ----------------------------------------------------------------------------

template <class Slot> void complete_thunk(void** slots, unsigned mask) {
  Slot::complete(reinterpret_cast<Slot**>(slots), mask);
}

// Lane `t` joins the collective `what` over `mask`, offering `slot`; returns once every lane named
// in the mask has joined and the collective has been completed.
template <class Slot> void collective(const char* what, unsigned mask, Slot& slot, Site site) {
  Runtime& r = runtime();
  Thread& t = *g_thread;
  Warp& w = r.warps[t.warp];
  const unsigned me = 1u << t.lane;
  if (!(mask & me))
    throw Error(format("%s at %s: lane %u calls it with mask 0x%08x, which leaves the lane itself out", what,
                       site.str().c_str(), t.lane, mask));
  if (mask & ~w.present)
    throw Error(format("%s at %s: mask 0x%08x names lanes %s, which warp %u of this %u-thread block does not have",
                       what, site.str().c_str(), mask, ranges(lanes_of(mask & ~w.present)).c_str(), t.warp,
                       r.n_threads));
  if (mask & w.exited)
    throw Error(format("%s at %s: mask 0x%08x names lanes %s, which have exited", what, site.str().c_str(), mask,
                       ranges(lanes_of(mask & w.exited)).c_str()));
  Group* g = nullptr;
  for (Group& o : w.groups)
    if (o.mask & mask) g = &o;
  if (g && (g->mask != mask || g->complete != &complete_thunk<Slot>))
    throw Error(format("lanes %s wait in %s with mask 0x%08x while lane %u calls %s at %s with mask 0x%08x",
                       ranges(lanes_of(g->arrived)).c_str(), g->what, g->mask, t.lane, what, site.str().c_str(), mask));
  if (!g) {
    w.groups.push_back(Group{what, &complete_thunk<Slot>, mask, 0, {}});
    g = &w.groups.back();
  }
  g->slots[t.lane] = &slot;
  g->arrived |= me;
  if (g->arrived != mask) {
    t.state = State::kCollective;
    t.site = site;
    t.what = what;
    t.mask = mask;
    yield(t);
    return;
  }
  const Group done = *g;
  w.groups.erase(w.groups.begin() + (g - w.groups.data()));
  try {
    done.complete(const_cast<void**>(done.slots), mask);
  } catch (const Error& e) { throw Error(format("%s at %s: ", what, site.str().c_str()) + e.message); }
  for_lanes(mask, [&](unsigned l) { r.threads[t.warp * kWarpSize + l].state = State::kRunnable; });
  r.woken = true;
  yield(t);  // the scheduler's order, not the last arrival, decides who goes on first
}

// A thread returns from the kernel: nobody may still be waiting for it.
inline void thread_exit(Thread& t) {
  Runtime& r = runtime();
  if (!t.wgmma_ops.empty())
    throw Error(
        format("the thread returns with %zu wgmma.mma_async not waited for (the first issued at %s); "
               "wgmma.wait_group before reading the accumulators or returning",
               t.wgmma_ops.size(), t.wgmma_issues.front().str().c_str()));
  if (!t.async_copies.empty())
    throw Error(
        format("the thread returns with %zu asynchronous copies not waited for (the first issued at %s); "
               "__pipeline_wait_prior(0) before returning",
               t.async_copies.size(), t.async_copies.front().site.str().c_str()));
  ++r.exited;
  Warp& w = r.warps[t.warp];
  w.exited |= 1u << t.lane;
  for (const Group& g : w.groups)
    if (g.mask >> t.lane & 1u)
      throw Error(format("lane %u exits while lanes %s wait for it in %s (mask 0x%08x)", t.lane,
                         ranges(lanes_of(g.arrived)).c_str(), g.what, g.mask));
  if (r.at_barrier) {
    std::vector<unsigned> ids;
    for (unsigned i = 0; i < r.n_threads; ++i)
      if (r.threads[i].state == State::kBarrier) ids.push_back(i);
    throw Error(
        format("__syncthreads at %s is not reached by every thread of the block: threads %s wait there "
               "while this thread exits",
               r.threads[ids[0]].site.str().c_str(), ranges(ids).c_str()));
  }
}

// ---- launches -------------------------------------------------------------------------------------

inline void thread_main(void* arg) {
  Runtime& r = runtime();
  Thread& t = *static_cast<Thread*>(arg);
  fiber::started(r.scheduler);
  try {
    r.spec->body(r.spec->ctx);
    thread_exit(t);
  } catch (const Error& e) { fail(&t, e.message); } catch (const std::exception& e) {
    fail(&t, std::string("the emulator failed: ") + e.what());
  }
  t.state = State::kDone;
  fiber::switch_to(t.ctx, r.scheduler, /*finishing=*/true);
  __builtin_unreachable();
}

inline std::string deadlock() {
  Runtime& r = runtime();
  std::map<std::string, std::vector<unsigned>> waits;
  for (unsigned i = 0; i < r.n_threads; ++i) {
    const Thread& t = r.threads[i];
    if (t.state == State::kBarrier) waits["at __syncthreads at " + t.site.str()].push_back(i);
    if (t.state == State::kCollective)
      waits[format("in %s (mask 0x%08x) at %s", t.what, t.mask, t.site.str().c_str())].push_back(i);
    if (t.state == State::kMbarrier) waits["on an mbarrier at " + t.site.str()].push_back(i);
  }
  std::string out = "deadlock: no thread can go on:";
  for (auto& [where, ids] : waits)
    out += format("%s threads %s wait %s", out.back() == ':' ? "" : ";", ranges(ids).c_str(), where.c_str());
  return out;
}

// The scheduler always resumes the first runnable thread in index order in even blocks, and in
// reverse order in odd ones: the first warps (or the last) run ahead as far as the barriers let
// them. So a read that relies on another thread's write without a barrier between them, or a
// write that a barrier should have kept from overtaking another warp's read, goes wrong in one of
// the two orders.
inline void run_block(unsigned block_linear) {
  Runtime& r = runtime();
  const dim3 b = g_block_dim;
  for (unsigned i = 0; i < r.n_threads; ++i) {
    Thread& t = r.threads[i];
    t.idx = uint3{i % b.x, i / b.x % b.y, i / (b.x * b.y)};
    t.warp = i / kWarpSize;
    t.lane = i % kWarpSize;
    t.state = State::kRunnable;
    t.async_copies.clear();
    t.async_batches.clear();
    t.wgmma_ops.clear();
    t.wgmma_issues.clear();
    t.wgmma_groups.clear();
    t.ctx.prepare(r.stacks[i], &thread_main, &t);
  }
  for (unsigned w = 0; w < r.warps.size(); ++w) {
    const unsigned lanes = std::min<unsigned>(kWarpSize, r.n_threads - w * kWarpSize);
    r.warps[w].present = lanes == 32 ? ~0u : (1u << lanes) - 1;
    r.warps[w].exited = 0;
    r.warps[w].groups.clear();
  }
  r.at_barrier = r.exited = 0;
  r.woken = false;
  r.mbarriers.clear();
  const bool reverse = block_linear & 1u;
  // threads before position p in the order are waiting (or done) unless something woke them since
  for (unsigned p = 0, done = 0; done < r.n_threads;) {
    auto at = [&](unsigned q) -> Thread& { return r.threads[reverse ? r.n_threads - 1 - q : q]; };
    while (p < r.n_threads && at(p).state != State::kRunnable) ++p;
    if (p == r.n_threads) {
      fail(nullptr, deadlock());
      return;
    }
    Thread& t = at(p);
    g_thread = &t;
    fiber::switch_to(r.scheduler, t.ctx);  // back when t waits or returns
    g_thread = nullptr;
    if (r.failed) return;
    done += t.state == State::kDone;
    if (r.woken) r.woken = false, p = 0;
  }
}

inline std::string config_error(const LaunchSpec& s) {
  const unsigned g[3] = {s.grid.x, s.grid.y, s.grid.z}, b[3] = {s.block.x, s.block.y, s.block.z};
  const char* axis = "xyz";
  for (int i = 0; i < 3; ++i) {
    if (g[i] == 0 || g[i] > kMaxGridDim[i])
      return format("grid %c dimension %u is outside 1..%u", axis[i], g[i], kMaxGridDim[i]);
    if (b[i] == 0 || b[i] > kMaxBlockDim[i])
      return format("block %c dimension %u is outside 1..%u", axis[i], b[i], kMaxBlockDim[i]);
  }
  const unsigned long long threads = 1ull * b[0] * b[1] * b[2];
  if (threads > kMaxThreadsPerBlock)
    return format("%llu threads per block (%ux%ux%u), more than %u", threads, b[0], b[1], b[2], kMaxThreadsPerBlock);
  auto it = runtime().max_dynamic_smem.find(s.kernel);
  const std::size_t limit = it == runtime().max_dynamic_smem.end() ? kDefaultMaxDynamicShared : it->second;
  if (s.smem > limit)
    return format("%zu bytes of dynamic shared memory, more than the %zu configured for it", s.smem, limit);
  return {};
}

// Where the launch's dynamic shared memory starts in the emulated shared window (what the sm_90
// instructions of sm90_ptx.cuh address): GEOMOE_EMULATE_SMEM_BASE bytes (read once per process; a
// multiple of 128 below 64 KiB), 1,152 by default. On a GPU the dynamic shared memory follows the
// block's reserved 1 KiB and the kernel's static __shared__ variables, so it is rarely 1,024-byte
// aligned: a kernel whose 128-byte-swizzled tiles (TMA, wgmma) assume it is meets a descriptor or
// TMA alignment error here, and one whose swizzle phase is off reads the wrong elements. Host
// pointers keep the window's alignment modulo 128 (the buffer is 128-byte aligned).
// SIZE_MAX where the variable holds anything else (every launch then fails, naming it).
inline std::size_t emulated_smem_base() {
  static const std::size_t base = [] {
    const char* v = std::getenv("GEOMOE_EMULATE_SMEM_BASE");
    if (v == nullptr || *v == 0) return std::size_t(1152);
    char* end = nullptr;
    const unsigned long long b = std::strtoull(v, &end, 0);
    return *end != 0 || b % 128 != 0 || b >= 65536 ? SIZE_MAX : std::size_t(b);
  }();
  return base;
}

inline cudaError_t launch(const LaunchSpec& s) {
  Runtime& r = runtime();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.spec = &s;
  r.kernel_name.clear();
  r.failed = false;
  r.failure.clear();
  if (emulated_smem_base() == SIZE_MAX) {
    set_error(cudaErrorInvalidConfiguration,
              format("GEOMOE_EMULATE_SMEM_BASE expected a multiple of 128 below 65536 (bytes), got '%s'",
                     std::getenv("GEOMOE_EMULATE_SMEM_BASE")));
    return cudaErrorInvalidConfiguration;
  }
  if (std::string why = config_error(s); !why.empty()) {
    set_error(cudaErrorInvalidConfiguration,
              format("kernel %s (launched at %s): %s", r.name().c_str(), s.site.str().c_str(), why.c_str()));
    return cudaErrorInvalidConfiguration;
  }
  g_grid_dim = s.grid;
  g_block_dim = s.block;
  r.n_threads = s.block.x * s.block.y * s.block.z;
  while (r.stacks.size() < r.n_threads) {
    r.stacks.emplace_back();
    r.stacks.back().allocate(kStackBytes);
  }
  if (r.threads.size() < r.n_threads) r.threads.resize(r.n_threads);
  r.warps.resize((r.n_threads + kWarpSize - 1) / kWarpSize);
  // exactly the launch's bytes, so that a sanitizer sees a read past them; 128-byte aligned as on a
  // GPU (WMMA needs 32 bytes, malloc gives 16)
  void* raw = nullptr;
  if (s.smem && posix_memalign(&raw, 128, s.smem) != 0) raw = nullptr;
  std::unique_ptr<unsigned char, void (*)(void*)> smem(static_cast<unsigned char*>(raw), std::free);
  r.dynamic_smem = smem.get();
  r.dynamic_smem_bytes = s.smem;
  r.smem_base = emulated_smem_base();
  const unsigned long long blocks = 1ull * s.grid.x * s.grid.y * s.grid.z;
  // last block first: a kernel that expects earlier blocks to have finished fails here as it may on a GPU
  for (unsigned long long n = blocks; n-- > 0 && !r.failed;) {
    g_block_idx =
        uint3{unsigned(n % s.grid.x), unsigned(n / s.grid.x % s.grid.y), unsigned(n / (1ull * s.grid.x * s.grid.y))};
    if (s.smem) std::memset(r.dynamic_smem, 0xff, s.smem);  // no kernel may rely on its contents: NaNs
    run_block(static_cast<unsigned>(n));
  }
  r.dynamic_smem = nullptr;
  r.spec = nullptr;
  if (r.failed) {
    set_error(cudaErrorLaunchFailure, r.failure);
    return cudaErrorLaunchFailure;
  }
  return cudaSuccess;
}

// What GEOMOE_LAUNCH(grid, block, smem, stream, kernel)(args...) makes of the launch: the arguments
// are converted to the kernel's parameter types once, as a launch copies them, and every thread
// gets its own copy of them as its parameters.
template <class... P> struct Launcher {
  void (*kernel)(P...);
  const char* expr;
  dim3 grid, block;
  std::size_t smem;
  Site site;

  struct Params {
    void (*kernel)(P...);
    std::tuple<std::decay_t<P>...> args;
  };
  static void run(const void* p) {
    const Params& x = *static_cast<const Params*>(p);
    std::apply(x.kernel, x.args);
  }

  template <class... A> void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "a kernel launch needs one argument per parameter");
    const Params params{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
    launch(LaunchSpec{expr, reinterpret_cast<const void*>(kernel), grid, block, smem, site, &run, &params});
  }
};

template <class... P> Launcher<P...> launcher(const char* expr, void (*kernel)(P...), dim3 grid, dim3 block,
                                              std::size_t smem, cudaStream_t /*stream: launches run at once, in order*/,
                                              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return Launcher<P...>{kernel, expr, grid, block, smem, Site{file, line}};
}

template <class T> T* dynamic_shared() { return reinterpret_cast<T*>(runtime().dynamic_smem); }

// ---- the runtime API the core calls ---------------------------------------------------------------

inline cudaError_t get_last_error() {
  Runtime& r = runtime();
  const cudaError_t e = r.last_error;
  r.last_error = cudaSuccess;  // the message stays for error_string
  return e;
}

inline cudaError_t peek_at_last_error() { return runtime().last_error; }

// The emulator's own account of the last failure for the codes it raises, which says far more
// than the runtime's fixed strings.
inline const char* error_string(cudaError_t e) {
  Runtime& r = runtime();
  if ((e == cudaErrorLaunchFailure || e == cudaErrorInvalidConfiguration) && !r.last_message.empty())
    return r.last_message.c_str();
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    default: return "an error the emulator does not raise";
  }
}

template <class K> cudaError_t func_set_attribute(K* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || std::size_t(value) > kOptInMaxShared) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(runtime().mutex);
  runtime().max_dynamic_smem[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}

inline cudaError_t synchronize(...) { return cudaSuccess; }  // every launch has finished when it returns

// The compute capability the emulated device reports: 8.0, or 9.0 with GEOMOE_EMULATE_SM=90 (read
// once per process), which makes the launchers choose their sm_90 kernels (wgmma, TMA, mbarriers:
// sm90_ptx.cuh), as on an H100.
inline int emulated_sm() {
  static const int sm = [] {
    const char* v = std::getenv("GEOMOE_EMULATE_SM");
    return v != nullptr && std::strcmp(v, "90") == 0 ? 90 : 80;
  }();
  return sm;
}

inline cudaError_t get_device(int* device) {
  *device = 0;
  return cudaSuccess;
}

inline cudaError_t device_get_attribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor: *value = emulated_sm() / 10; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = emulated_sm() % 10; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace geomoe_emu
