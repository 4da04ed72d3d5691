// Emulated WMMA (nvcuda::wmma) for the emulated core: fragments, fill_fragment, load_matrix_sync,
// mma_sync and store_matrix_sync with row- and column-major layouts.
//
// A GPU spreads a fragment's elements over the warp's lanes in an unspecified way. Here every lane
// holds the whole tile (num_elements = rows x cols), so code that treats x[] element-wise without
// relying on where an element sits (scaling, activation) still means the same thing. The *_sync
// operations are warp collectives: all 32 lanes must join, with the same pointer, leading
// dimension and layout (as CUDA requires), and with identical fragments; the pointer must be
// 32-byte aligned and the leading dimension a multiple of 16 bytes. mma_sync accumulates
// fp16/bf16 products in float, in k order; products of two halves are exact in float, so only
// the order and rounding of the sums can differ from a tensor core's.
#pragma once
#include <cuda_runtime.h>

#include <cstring>

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {
template <class Use, int M, int N, int K> struct Shape;
template <int M, int N, int K> struct Shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K> struct Shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K> struct Shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

template <class L> constexpr layout_t layout_of() {
  return std::is_same<L, col_major>::value ? mem_col_major : mem_row_major;
}

inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T> T from_float(float v);
template <> inline float from_float<float>(float v) { return v; }
template <> inline __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
}  // namespace detail

template <class Use, int M, int N, int K, class T, class Layout = void> class fragment {
 public:
  using element_type = T;
  using storage_element_type = T;
  static constexpr int rows = detail::Shape<Use, M, N, K>::rows;
  static constexpr int cols = detail::Shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  T x[num_elements];  // the tile, row-major
};

template <class Use, int M, int N, int K, class T, class L, class V>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, const V& v) {
  const T t = static_cast<T>(v);
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = t;
}

namespace detail {

using geomoe_emu::Error;
using geomoe_emu::format;

// The 32 lanes' fragments `which` (get(slot) points at each) must hold the same tile.
template <class Slot, class Get> void same_in_every_lane(const char* which, Slot* const* lanes, Get get) {
  for (unsigned l = 1; l < 32; ++l)
    if (std::memcmp(get(*lanes[l]), get(*lanes[0]), sizeof(*get(*lanes[0]))) != 0)
      throw Error(
          format("fragment %s differs between lanes 0 and %u; the emulator keeps the whole tile in every "
                 "lane and cannot model code that relies on which lane holds which element",
                 which, l));
}

// Every lane's memory operation: the same pointer, leading dimension and layout in all 32.
template <class Frag, class Ptr> struct MemorySlot {
  Ptr ptr;
  unsigned ldm;
  layout_t layout;
  Frag* frag;

  template <class Slot> static void check_uniform(Slot* const* lanes) {
    const Slot& a = *lanes[0];
    for (unsigned l = 1; l < 32; ++l)
      if (lanes[l]->ptr != a.ptr || lanes[l]->ldm != a.ldm || lanes[l]->layout != a.layout)
        throw Error(
            format("lanes 0 and %u pass different arguments (pointer %p / %p, ldm %u / %u, layout %d / %d); "
                   "every lane of the warp must pass the same",
                   l, (const void*)a.ptr, (const void*)lanes[l]->ptr, a.ldm, lanes[l]->ldm, int(a.layout),
                   int(lanes[l]->layout)));
    if (reinterpret_cast<std::uintptr_t>(a.ptr) % 32)
      throw Error(format("pointer %p is not 32-byte aligned", (const void*)a.ptr));
    const std::size_t bytes = a.ldm * sizeof(typename Frag::element_type);
    if (bytes % 16) throw Error(format("leading dimension %u (%zu bytes) is not a multiple of 16 bytes", a.ldm, bytes));
  }
  std::size_t offset(int r, int c) const {
    return layout == mem_row_major ? std::size_t(r) * ldm + c : r + std::size_t(c) * ldm;
  }
};

template <class Frag, class T> struct LoadSlot : MemorySlot<Frag, const T*> {
  static void complete(LoadSlot** lanes, unsigned /*mask: the whole warp*/) {
    LoadSlot::check_uniform(lanes);
    const LoadSlot& a = *lanes[0];
    for (int r = 0; r < Frag::rows; ++r)
      for (int c = 0; c < Frag::cols; ++c) a.frag->x[r * Frag::cols + c] = a.ptr[a.offset(r, c)];
    for (unsigned l = 1; l < 32; ++l) std::memcpy(lanes[l]->frag, a.frag, sizeof(Frag));
  }
};

template <class Frag, class T> struct StoreSlot : MemorySlot<Frag, T*> {
  static void complete(StoreSlot** lanes, unsigned /*mask: the whole warp*/) {
    StoreSlot::check_uniform(lanes);
    same_in_every_lane("c", lanes, [](const StoreSlot& s) { return s.frag; });
    const StoreSlot& a = *lanes[0];
    for (int r = 0; r < Frag::rows; ++r)
      for (int c = 0; c < Frag::cols; ++c) a.ptr[a.offset(r, c)] = a.frag->x[r * Frag::cols + c];
  }
};

template <class FD, class FA, class FB, class FC> struct MmaSlot {
  FD* d;
  const FA* a;
  const FB* b;
  const FC* c;

  static void complete(MmaSlot** lanes, unsigned /*mask: the whole warp*/) {
    same_in_every_lane("a", lanes, [](const MmaSlot& s) { return s.a; });
    same_in_every_lane("b", lanes, [](const MmaSlot& s) { return s.b; });
    same_in_every_lane("c", lanes, [](const MmaSlot& s) { return s.c; });
    const FA& A = *lanes[0]->a;
    const FB& B = *lanes[0]->b;
    const FC& C = *lanes[0]->c;
    constexpr int M = FA::rows, K = FA::cols, N = FB::cols;
    float out[M * N];  // d may be c
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < N; ++j) {
        float acc = to_float(C.x[i * N + j]);
        for (int k = 0; k < K; ++k) acc += to_float(A.x[i * K + k]) * to_float(B.x[k * N + j]);
        out[i * N + j] = acc;
      }
    for (unsigned l = 0; l < 32; ++l)
      for (int e = 0; e < M * N; ++e) lanes[l]->d->x[e] = from_float<typename FD::element_type>(out[e]);
  }
};

}  // namespace detail

constexpr unsigned kFullWarp = 0xffffffffu;

template <class Use, int M, int N, int K, class T, class L>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const T* p, unsigned ldm, GEOMOE_EMU_SITE) {
  static_assert(!std::is_same<Use, accumulator>::value, "an accumulator load names its layout");
  using F = fragment<Use, M, N, K, T, L>;
  detail::LoadSlot<F, T> slot{{p, ldm, detail::layout_of<L>(), &f}};
  geomoe_emu::collective("wmma::load_matrix_sync", kFullWarp, slot, {file, line});
}

template <int M, int N, int K, class T> inline void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p,
                                                                     unsigned ldm, layout_t layout, GEOMOE_EMU_SITE) {
  using F = fragment<accumulator, M, N, K, T>;
  detail::LoadSlot<F, T> slot{{p, ldm, layout, &f}};
  geomoe_emu::collective("wmma::load_matrix_sync", kFullWarp, slot, {file, line});
}

template <int M, int N, int K, class T> inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f,
                                                                      unsigned ldm, layout_t layout, GEOMOE_EMU_SITE) {
  using F = fragment<accumulator, M, N, K, T>;
  detail::StoreSlot<F, T> slot{{p, ldm, layout, const_cast<F*>(&f)}};
  geomoe_emu::collective("wmma::store_matrix_sync", kFullWarp, slot, {file, line});
}

template <int M, int N, int K, class TA, class LA, class TB, class LB, class TC, class TD>
inline void mma_sync(fragment<accumulator, M, N, K, TD>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, TC>& c,
                     bool satf = false, GEOMOE_EMU_SITE) {
  static_assert(std::is_same<TA, TB>::value, "matrix_a and matrix_b hold the same element type");
  static_assert(std::is_same<TA, __half>::value || std::is_same<TA, __nv_bfloat16>::value,
                "the emulator's mma_sync takes fp16 or bf16 inputs");
  (void)satf;
  using Slot = detail::MmaSlot<fragment<accumulator, M, N, K, TD>, fragment<matrix_a, M, N, K, TA, LA>,
                               fragment<matrix_b, M, N, K, TB, LB>, fragment<accumulator, M, N, K, TC>>;
  Slot slot{&d, &a, &b, &c};
  geomoe_emu::collective("wmma::mma_sync", kFullWarp, slot, {file, line});
}

}  // namespace wmma
}  // namespace nvcuda
