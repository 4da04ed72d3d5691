// Fibers for the emulator: each CUDA thread of a block is a fiber with its own stack, and a block
// runs on one host thread. A fiber runs until it waits (a barrier, a warp collective) or returns,
// so every interleaving is a deterministic function of the kernel and its inputs.
//
// x86-64 switches with a few instructions (callee-saved registers, the stack pointer, MXCSR and
// the x87 control word); swapcontext would make a signal-mask system call on every switch, and the
// gating kernel switches tens of times per token. Elsewhere ucontext does the work, as it does on
// x86-64 when GEOMOE_EMU_UCONTEXT is defined (the tests build it that way too).
#pragma once
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>

#if defined(__SANITIZE_ADDRESS__)
#define GEOMOE_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define GEOMOE_EMU_ASAN 1
#endif
#endif
#ifdef GEOMOE_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if !defined(__x86_64__) && !defined(GEOMOE_EMU_UCONTEXT)
#define GEOMOE_EMU_UCONTEXT 1
#endif
#ifdef GEOMOE_EMU_UCONTEXT
#include <ucontext.h>
#endif

namespace geomoe_emu {
namespace fiber {

#ifndef GEOMOE_EMU_UCONTEXT
// switch_stack(&save, to): pushes the callee-saved state, stores the stack pointer in *save, loads
// `to` and pops the state saved there. A new fiber's stack is laid out as if it had called
// switch_stack, returning into start_trampoline with the entry function in r12 and its argument in r13.
__attribute__((naked, noinline)) inline void switch_stack(void** /*save*/, void* /*to*/) {
  asm("pushq %rbp\n\t"
      "pushq %rbx\n\t"
      "pushq %r12\n\t"
      "pushq %r13\n\t"
      "pushq %r14\n\t"
      "pushq %r15\n\t"
      "subq $8, %rsp\n\t"
      "stmxcsr (%rsp)\n\t"
      "fnstcw 4(%rsp)\n\t"
      "movq %rsp, (%rdi)\n\t"
      "movq %rsi, %rsp\n\t"
      "ldmxcsr (%rsp)\n\t"
      "fldcw 4(%rsp)\n\t"
      "addq $8, %rsp\n\t"
      "popq %r15\n\t"
      "popq %r14\n\t"
      "popq %r13\n\t"
      "popq %r12\n\t"
      "popq %rbx\n\t"
      "popq %rbp\n\t"
      "ret\n\t");
}

// The base of every fiber: rbp is 0 here and the return address is marked undefined, so both
// frame-pointer and DWARF unwinding (AddressSanitizer's reports, exceptions) stop here.
__attribute__((naked, noinline)) inline void start_trampoline() {
  asm(".cfi_undefined rip\n\t"
      "movq %r13, %rdi\n\t"
      "callq *%r12\n\t"
      "ud2\n\t");
}
#endif

// A stack with a guard page below it, reused from launch to launch.
struct Stack {
  char* base = nullptr;  // lowest usable address (the guard page lies just below)
  std::size_t size = 0;

  void allocate(std::size_t bytes) {
    const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    size = (bytes + page - 1) / page * page;
    void* p = mmap(nullptr, size + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    mprotect(p, page, PROT_NONE);  // an overflowing fiber faults instead of writing into its neighbour
    base = static_cast<char*>(p) + page;
  }
};

// One execution context: the host thread's own (the scheduler) or a fiber's.
struct Context {
#ifdef GEOMOE_EMU_UCONTEXT
  ucontext_t uc;
#else
  void* sp = nullptr;
#endif
#ifdef GEOMOE_EMU_ASAN
  const void* stack_bottom = nullptr;  // for the sanitizer's stack switch annotations
  std::size_t stack_size = 0;
  void* fake_stack = nullptr;
#endif

  // Prepares a fresh context on `stack` that calls entry(arg) when first switched to; entry must
  // never return (it switches away for the last time instead).
  void prepare(const Stack& stack, void (*entry)(void*), void* arg) {
#ifdef GEOMOE_EMU_ASAN
    stack_bottom = stack.base;
    stack_size = stack.size;
    __asan_unpoison_memory_region(stack.base, stack.size);  // frames abandoned by a failed launch
#endif
#ifdef GEOMOE_EMU_UCONTEXT
    getcontext(&uc);
    uc.uc_stack.ss_sp = stack.base;
    uc.uc_stack.ss_size = stack.size;
    uc.uc_link = nullptr;
    // makecontext passes int arguments: each pointer travels as two halves
    const auto f = reinterpret_cast<std::uintptr_t>(entry), a = reinterpret_cast<std::uintptr_t>(arg);
    makecontext(&uc, reinterpret_cast<void (*)()>(&ucontext_entry), 4, static_cast<unsigned>(f),
                static_cast<unsigned>(f >> 32), static_cast<unsigned>(a), static_cast<unsigned>(a >> 32));
#else
    // 64 zero bytes above the first frame keep a stray read of the caller's frame inside the stack
    auto top = (reinterpret_cast<std::uintptr_t>(stack.base + stack.size) - 64) & ~static_cast<std::uintptr_t>(15);
    std::memset(reinterpret_cast<void*>(top), 0, 64);
    auto* words = reinterpret_cast<std::uint64_t*>(top) - 8;  // 7 saved words + the return address, top 16-aligned
    std::uint32_t mxcsr = __builtin_ia32_stmxcsr();
    std::uint16_t fpcw;
    asm volatile("fnstcw %0" : "=m"(fpcw));
    words[0] = static_cast<std::uint64_t>(mxcsr) | (static_cast<std::uint64_t>(fpcw) << 32);
    words[1] = 0;                                       // r15
    words[2] = 0;                                       // r14
    words[3] = reinterpret_cast<std::uint64_t>(arg);    // r13
    words[4] = reinterpret_cast<std::uint64_t>(entry);  // r12
    words[5] = 0;                                       // rbx
    words[6] = 0;                                       // rbp
    words[7] = reinterpret_cast<std::uint64_t>(&start_trampoline);
    sp = words;
#endif
  }

#ifdef GEOMOE_EMU_UCONTEXT
  static void ucontext_entry(unsigned f_lo, unsigned f_hi, unsigned a_lo, unsigned a_hi) {
    auto join = [](unsigned lo, unsigned hi) {
      return static_cast<std::uintptr_t>(lo) | (static_cast<std::uintptr_t>(hi) << 32);
    };
    reinterpret_cast<void (*)(void*)>(join(f_lo, f_hi))(reinterpret_cast<void*>(join(a_lo, a_hi)));
  }
#endif
};

// Switch from `from` (saved) to `to`. `finishing`: `from` never runs again.
inline void switch_to(Context& from, Context& to, bool finishing = false) {
#ifdef GEOMOE_EMU_ASAN
  __sanitizer_start_switch_fiber(finishing ? nullptr : &from.fake_stack, to.stack_bottom, to.stack_size);
#else
  (void)finishing;
#endif
#ifdef GEOMOE_EMU_UCONTEXT
  swapcontext(&from.uc, &to.uc);
#else
  switch_stack(&from.sp, to.sp);
#endif
#ifdef GEOMOE_EMU_ASAN
  __sanitizer_finish_switch_fiber(from.fake_stack, nullptr, nullptr);
#endif
}

// The first thing a fiber does: tells the sanitizer that the switch has landed, and learns the
// bounds of the stack it came from (the host thread's, where the scheduler runs).
inline void started(Context& scheduler) {
#ifdef GEOMOE_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &scheduler.stack_bottom, &scheduler.stack_size);
#else
  (void)scheduler;
#endif
}

}  // namespace fiber
}  // namespace geomoe_emu
