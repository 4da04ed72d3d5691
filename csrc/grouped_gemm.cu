// Tensor-core grouped GEMM (WMMA, fp16/bf16 in, fp32 accumulate) over expert-major rows.
//   forward / dgrad: out[r] = act(A[r] @ W[e(r)] + b[e(r)]); A[r] = a[gather[r] / top_k] when gathered;
//                    trans_w reads W[e] as [N, K] (dgrad: dA = dPre @ W^T); with grad_act the dgrad's
//                    epilogue reads pre and writes d pre = (dH @ W^T) * act'(pre) (expert_mlp backward).
//   wgrad:           dW[s, e] = sum over split s of expert e's rows of A^T G, and db[s, e] = the sum of
//                    G's rows (fp32 partials, summed by the caller); a_act forms act(A) in shared memory.
//
// Design (issue 14): 256 threads (8 warps) per block, 128-row tiles (128 x 128 or 128 x 64 in the
// forward and dgrad, 128 x 128 of dW in the wgrad), 16 x 16 x 16 WMMA fragments; a 3-stage pipeline
// of asynchronous 16-byte global -> shared copies (__pipeline_memcpy_async, cp.async on sm_80+;
// the emulated build completes them at the wait, csrc/emulation/cuda_pipeline_primitives.h) with
// a scalar fallback where a row is not 16-byte aligned; a 1-D grid with the column tile fastest, so
// the blocks that run together share their A rows in L2. Each thread's source rows (the gather's
// row -> token division included) are found once per block, never in the K loop. The transposed
// weight of the dgrad is copied as stored ([N, K] rows, coalesced) and read by col_major
// fragments; the wgrad's A tile likewise stays [m][k] and is read as a col_major A^T. Every shared
// row is padded by 16 bytes (conflict-free fragment loads), the pipeline's buffers hold the fp32
// tile for the epilogue afterwards (dynamic shared memory), and __launch_bounds__(256, 2) keeps
// registers at <= 128 so that two blocks fit on an SM.
// On a 9.0 device (sm_90a build) the launchers run the wgmma + TMA kernels of namespace wg instead
// (see "sm_90: wgmma + TMA" below); every other device runs the mma.sync kernels described here.
// Each block finds its row block's expert and first row from the offsets (expert e owns
// ceil(count_e / 128) consecutive row blocks; the grid's static bound leaves surplus blocks that
// exit), so nothing is read back to the host and no schedule is built before the launch.
#include <cuda_pipeline_primitives.h>
#include <mma.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "dtype.cuh"
#include "sm90_ptx.cuh"  // the emulated build finds csrc/emulation/sm90_ptx.cuh first

// The sm_90a cubin: the mma.sync kernels compile to a trap there (never launched: the wgmma ones are).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GEOMOE_SM90A_CUBIN 1
#else
#define GEOMOE_SM90A_CUBIN 0
#endif

namespace geomoe {
namespace {

using namespace nvcuda;

constexpr int kThreads = 256, kWarps = kThreads / 32;
constexpr int BM = 128, BK = 32, kStages = 3;
constexpr int PAD = 8;   // halves after each shared row: ldm a multiple of 16 bytes, rows 16 bytes apart in the banks
constexpr int CPAD = 4;  // floats after each row of the fp32 epilogue tile
constexpr int kNone = static_cast<int>(Activation::kNone), kGelu = static_cast<int>(Activation::kGelu),
              kSilu = static_cast<int>(Activation::kSilu), kSwiglu = static_cast<int>(Activation::kSwiglu);

template <typename T> __device__ inline T zero() { return from_f32<T>(0.f); }

using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

__device__ inline float activate(float x, int act) {
  if (act == kGelu) return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));  // GELU (erf)
  if (act == kSilu) return x / (1.f + __expf(-x));                             // SiLU
  return x;
}

__device__ inline float sigmoid(float x) { return 1.f / (1.f + __expf(-x)); }

// SwiGLU's halves in a row of 2H pre-activation columns: hidden column o reads gate column
// gate_col(o) and up column gate_col(o) + up_step. Concat ([gate | up]): o and H + o; interleaved
// ([g0, u0, g1, u1, ...]): 2o and 2o + 1.
__host__ __device__ inline int64_t gate_col(int64_t o, bool interleaved) { return interleaved ? 2 * o : o; }
__host__ __device__ inline int64_t up_step(int64_t H, bool interleaved) { return interleaved ? 1 : H; }

__device__ inline float activate_grad(float x, int act) {
  if (act == kGelu)
    return 0.5f * (1.f + erff(x * 0.70710678118654752f)) + x * 0.3989422804014327f * __expf(-0.5f * x * x);
  const float s = 1.f / (1.f + __expf(-x));  // SiLU
  return s * (1.f + x * (1.f - s));
}

__host__ __device__ inline bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15) == 0; }

__device__ inline int clamp8(int64_t n) { return n < 0 ? 0 : n > 8 ? 8 : static_cast<int>(n); }

// The token row of routed row `flat` (gather[r] / top_k): 32-bit division where it fits.
__device__ inline int64_t token_of(int64_t flat, int top_k) {
  if (top_k == 1) return flat;
  return flat < 0x7fffffff ? static_cast<int64_t>(static_cast<unsigned>(flat) / static_cast<unsigned>(top_k))
                           : flat / top_k;
}

// 8 elements (16 bytes) from global `src` into shared `dst`, of which the first `valid` are in bounds
// and the rest are zeros. vec: both 16-byte aligned, one asynchronous copy (cp.async zero-fills past
// the bytes it reads; with none valid it reads nothing); otherwise plain scalar loads and stores.
template <typename T> __device__ inline void copy8(T* dst, const T* src, int valid, bool vec) {
  if (vec) {
    __pipeline_memcpy_async(dst, src, 16, (8 - valid) * sizeof(T));
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) dst[j] = j < valid ? src[j] : zero<T>();
  }
}

// 8 consecutive elements (the first `valid`) of a global row as floats; 16 bytes at once when vec and whole.
template <typename T> __device__ inline void load8(const T* p, int valid, bool vec, float (&v)[8]) {
  if (vec && valid == 8) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    T h[8];
    std::memcpy(static_cast<void*>(h), &u, sizeof u);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = to_f32(h[j]);
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = j < valid ? to_f32(p[j]) : 0.f;
  }
}

template <typename T> __device__ inline void store8(T* p, int valid, bool vec, const float (&v)[8]) {
  if (vec && valid == 8) {
    T h[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) h[j] = from_f32<T>(v[j]);
    uint4 u;
    std::memcpy(&u, static_cast<const void*>(h), sizeof u);
    *reinterpret_cast<uint4*>(p) = u;
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (j < valid) p[j] = from_f32<T>(v[j]);
  }
}

// The gate and up values of hidden columns o .. o + 7 (the first `valid`) of a pre-activation row p
// (2H columns, `interleaved` or concat): 16-byte reads where vec (p 16-byte aligned, and H % 8 == 0
// for the concat's up half), scalar ones otherwise.
template <typename T>
__device__ inline void load_gate_up(const T* p, int64_t o, int64_t H, bool interleaved, int valid, bool vec,
                                    float (&g)[8], float (&u)[8]) {
  if (interleaved) {
    float v0[8], v1[8];
    load8(p + 2 * o, clamp8(2 * valid), vec, v0);
    load8(p + 2 * o + 8, clamp8(2 * valid - 8), vec, v1);
#pragma unroll
    for (int j = 0; j < 4; ++j) g[j] = v0[2 * j], u[j] = v0[2 * j + 1], g[j + 4] = v1[2 * j], u[j + 4] = v1[2 * j + 1];
  } else {
    load8(p + o, valid, vec, g);
    load8(p + H + o, valid, vec, u);
  }
}

template <typename T>
__device__ inline void store_gate_up(T* p, int64_t o, int64_t H, bool interleaved, int valid, bool vec,
                                     const float (&g)[8], const float (&u)[8]) {
  if (interleaved) {  // (gate, up) pairs, 8 values (4 columns) at a time, packed as T
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      T v[8];
#pragma unroll
      for (int j = 0; j < 4; ++j) v[2 * j] = from_f32<T>(g[4 * h + j]), v[2 * j + 1] = from_f32<T>(u[4 * h + j]);
      const int n = clamp8(2 * valid - 8 * h);
      T* q = p + 2 * o + 8 * h;
      if (vec && n == 8) {
        uint4 x;
        std::memcpy(&x, static_cast<const void*>(v), 16);
        *reinterpret_cast<uint4*>(q) = x;
      } else {
        for (int j = 0; j < n; ++j) q[j] = v[j];
      }
    }
  } else {
    store8(p + o, valid, vec, g);
    store8(p + H + o, valid, vec, u);
  }
}

// The hidden values silu(gate) * up of columns o .. o + 7 (the first `valid`; zeros after) of a
// pre-activation row p into dst, as T. The halves stay packed (16-byte loads where vec) until each
// product is formed: the weight gradient calls this in its K loop, beside the accumulators.
template <typename T>
__device__ inline void swiglu8(T* dst, const T* p, int64_t o, int64_t H, bool interleaved, int valid, bool vec) {
  T g[8], u[8];
  if (vec && valid == 8) {
    if (interleaved) {
      T v[16];
      const uint4 x0 = *reinterpret_cast<const uint4*>(p + 2 * o), x1 = *reinterpret_cast<const uint4*>(p + 2 * o + 8);
      std::memcpy(static_cast<void*>(v), &x0, 16);
      std::memcpy(static_cast<void*>(v + 8), &x1, 16);
#pragma unroll
      for (int j = 0; j < 8; ++j) g[j] = v[2 * j], u[j] = v[2 * j + 1];
    } else {
      const uint4 xg = *reinterpret_cast<const uint4*>(p + o), xu = *reinterpret_cast<const uint4*>(p + H + o);
      std::memcpy(static_cast<void*>(g), &xg, 16);
      std::memcpy(static_cast<void*>(u), &xu, 16);
    }
  } else {  // one column at a time (rows not 16-byte aligned, or the last columns)
    const T* q = p + gate_col(o, interleaved);
    const int64_t step = interleaved ? 2 : 1, up = up_step(H, interleaved);
#pragma unroll 1
    for (int j = 0; j < 8; ++j) {
      const float x = j < valid ? to_f32(q[j * step]) : 0.f, y = j < valid ? to_f32(q[j * step + up]) : 0.f;
      dst[j] = from_f32<T>(x * sigmoid(x) * y);
    }
    return;
  }
  T h[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const float x = to_f32(g[j]);
    h[j] = from_f32<T>(x * sigmoid(x) * to_f32(u[j]));  // 0 for the zeros past `valid`
  }
  uint4 y;  // dst: a shared row, 16-byte aligned
  std::memcpy(&y, static_cast<const void*>(h), 16);
  *reinterpret_cast<uint4*>(dst) = y;
}

// ---- forward and dgrad ------------------------------------------------------------------------------

// The tile shapes of the BM x BN block: WM x WN warps, each FM x FN fragments.
template <typename T, int BN, bool TRANS_W> struct GemmTile {
  static constexpr int WM = BN == 128 ? 2 : 4, WN = kWarps / WM;
  static constexpr int FM = BM / WM / 16, FN = BN / WN / 16;
  static constexpr int LDA = BK + PAD;                     // As[BM][LDA]
  static constexpr int LDB = TRANS_W ? BK + PAD : BN + PAD;  // Bs[BN][LDB] (W^T rows as stored) or Bs[BK][LDB]
  static constexpr int LDC = BN + CPAD;                    // Cs[BM][LDC], over the pipeline's buffers
  static_assert(LDC % 4 == 0, "Cs rows start on 16 bytes (the epilogue's float4 reads)");
  static constexpr int A_STAGE = BM * LDA, B_STAGE = TRANS_W ? BN * LDB : BK * LDB;
  static constexpr std::size_t pipe_bytes = std::size_t(kStages) * (A_STAGE + B_STAGE) * sizeof(T);
  static constexpr std::size_t c_bytes = std::size_t(BM) * LDC * sizeof(float);
  static constexpr std::size_t smem_bytes = pipe_bytes > c_bytes ? pipe_bytes : c_bytes;
  // copies of 8 elements per thread per stage
  static constexpr int A_CPR = BK / 8, A_PER = BM * A_CPR / kThreads;
  static constexpr int B_CPR = TRANS_W ? BK / 8 : BN / 8, B_PER = (TRANS_W ? BN : BK) * B_CPR / kThreads;
  static_assert(FM * 16 * WM == BM && FN * 16 * WN == BN, "warps cover the tile");
  static_assert(A_PER >= 1 && B_PER >= 1 && kThreads % A_CPR == 0 && kThreads % B_CPR == 0, "copies per thread");
};

// The sum of v over the threads before this one (in thread order), for every thread: a warp scan
// with shuffles, then the warps' totals through part (kWarps shared slots). One barrier inside: part
// stays in use until the caller's next barrier.
__device__ inline int64_t block_exclusive_scan(int64_t v, int64_t* part) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int64_t incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t up = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += up;
  }
  if (lane == 31) part[warp] = incl;
  __syncthreads();
  int64_t before = incl - v;
  for (int w = 0; w < warp; ++w) before += part[w];
  return before;
}

// (expert, first row) of row block rb, -1 for a surplus block: each thread counts the row blocks of
// a contiguous run of ceil(E / kThreads) experts, a block-wide scan (warp shuffles, then the warps'
// totals) places the runs, and the thread whose run holds rb finds the expert. Every thread returns
// the shared {expert, first row}; the kernel reads it again for its epilogue rather than keep it live
// in registers through the K loop.
__device__ inline const int64_t* block_of_expert(const int64_t* __restrict__ offsets, int num_experts, int64_t rb) {
  __shared__ int64_t warp_total[kWarps], found[2];
  const int tid = threadIdx.x;
  const int per = (num_experts + kThreads - 1) / kThreads;
  const int lo = tid * per < num_experts ? tid * per : num_experts, hi = lo + per < num_experts ? lo + per : num_experts;
  int64_t mine = 0;
  for (int i = lo; i < hi; ++i) mine += (offsets[i + 1] - offsets[i] + BM - 1) / BM;
  if (tid == 0) found[0] = -1, found[1] = 0;  // ordered before the writes below by the scan's barrier
  int64_t first = block_exclusive_scan(mine, warp_total);
  if (first <= rb && rb < first + mine) {
    for (int i = lo; i < hi; ++i) {
      const int64_t n = (offsets[i + 1] - offsets[i] + BM - 1) / BM;
      if (rb < first + n) {
        found[0] = i;
        found[1] = offsets[i] + (rb - first) * BM;
        break;
      }
      first += n;
    }
  }
  __syncthreads();
  return found;
}

// The sum of v over the warp, returned to every lane.
__device__ inline int64_t warp_total(int64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The sum of v over the lanes before this one.
__device__ inline int64_t warp_exclusive_scan(int64_t v) {
  const int lane = threadIdx.x % 32;
  int64_t incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t up = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += up;
  }
  return incl - v;
}

// (expert, first row) of the slot-th row block in the interleaved order (rounds > 0), -1 for a
// surplus slot: round r holds expert e's blocks ceil(r n_e / rounds) .. ceil((r + 1) n_e / rounds) - 1
// (n_e its block count), rounds in order, experts in order within a round, the order of the Triton
// kernel's _interleaved_block. Every expert's rows are in token order, so the blocks that run
// together gather nearby tokens whatever their expert, and a token read by top_k experts comes from
// DRAM about once. The round is found by a binary search on the blocks before round r, the expert by
// a scan of the round's blocks. The first warp alone searches, each lane holding a contiguous run of
// ceil(E / 32) experts, so the ~log2(rounds) halvings are warp shuffles, not block barriers (one
// barrier in all, at the end, while the other warps wait there); every lane takes the same branches.
__device__ inline const int64_t* interleaved_block(const int64_t* __restrict__ offsets, int num_experts,
                                                   int64_t slot, int64_t rounds) {
  __shared__ int64_t found[2];
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    const int per = (num_experts + 31) / 32;
    const int lo = lane * per < num_experts ? lane * per : num_experts, hi = lo + per < num_experts ? lo + per : num_experts;
    auto blocks_of = [&](int i) { return (offsets[i + 1] - offsets[i] + BM - 1) / BM; };
    auto first_in_round = [&](int i, int64_t r) { return (r * blocks_of(i) + rounds - 1) / rounds; };
    auto before_round = [&](int64_t r) {
      int64_t mine = 0;
      for (int i = lo; i < hi; ++i) mine += first_in_round(i, r);
      return warp_total(mine);
    };
    int64_t expert = -1, row0 = 0;
    if (slot < before_round(rounds)) {  // else past the last block
      int64_t r_lo = 0, r_hi = rounds - 1;  // the last round starting at or before slot
      while (r_lo < r_hi) {
        const int64_t mid = (r_lo + r_hi + 1) / 2;
        if (before_round(mid) <= slot)
          r_lo = mid;
        else
          r_hi = mid - 1;
      }
      const int64_t u = slot - before_round(r_lo);  // the slot's place within its round
      int64_t mine = 0;
      for (int i = lo; i < hi; ++i) mine += first_in_round(i, r_lo + 1) - first_in_round(i, r_lo);
      int64_t first = warp_exclusive_scan(mine);
      if (first <= u && u < first + mine) {
        for (int i = lo; i < hi; ++i) {
          const int64_t j0 = first_in_round(i, r_lo), n = first_in_round(i, r_lo + 1) - j0;
          if (u < first + n) {
            expert = i;
            row0 = offsets[i] + (j0 + u - first) * BM;
            break;
          }
          first += n;
        }
      }
    }
    // one writer: the lane that found the block, or lane 0 for a surplus slot
    const unsigned hit = __ballot_sync(0xffffffffu, expert >= 0);
    if (lane == (hit ? __ffs(static_cast<int>(hit)) - 1 : 0)) found[0] = expert, found[1] = row0;
  }
  __syncthreads();
  return found;
}

// The epilogue of the forward and dgrad kernels (mma.sync and wgmma alike) from the fp32 tile Cs
// [BM][LDC] of column tile nt: 8 consecutive columns per thread and step (16-byte accesses where
// aligned), bias, activation, pre, or act'(pre) for the dgrad.
// The routing weights' gradient's last partial column: <g, b2[e]> of each row of the block (column tile
// 0's blocks), one row a thread, in K order (RoutedDgrad).
template <typename T>
__device__ inline void routed_bias_column(const RoutedDgrad& route, const T* __restrict__ a, int64_t lda,
                                          const int64_t* __restrict__ gather, int top_k, int64_t K, int64_t e,
                                          int64_t row0, int rows, int64_t N) {
  const int64_t col = (N + 7) / 8;
  for (int r = threadIdx.x; r < rows; r += kThreads) {
    const int64_t flat = gather[row0 + r];
    float s = 0.f;
    if (route.b2) {
      const T* g = a + token_of(flat, top_k) * lda;
      const T* b = static_cast<const T*>(route.b2) + e * K;
      for (int64_t k = 0; k < K; ++k) s += to_f32(g[k]) * to_f32(b[k]);
    }
    route.partial[flat * route.ldq + col] = s;
  }
}

template <typename T, int BN, int ACT, int GRAD_ACT, int LDC>
__device__ inline void gemm_epilogue(const float* Cs, const int64_t* blk, const int64_t* __restrict__ offsets,
                                     unsigned nt, int64_t N, const T* __restrict__ bias, T* __restrict__ out,
                                     int64_t ldo, T* __restrict__ pre, int64_t ldp, bool interleaved,
                                     const RoutedDgrad& route = {}, const T* __restrict__ a = nullptr, int64_t lda = 0,
                                     const int64_t* __restrict__ gather = nullptr, int top_k = 1, int64_t K = 0) {
  constexpr bool SWI = ACT == kSwiglu;
  const int tid = threadIdx.x;
  const int64_t n0 = static_cast<int64_t>(nt) * BN;
  const int64_t e = blk[0], row0 = blk[1];  // read again after the barriers: not held through the K loop
  const int rows = static_cast<int>(offsets[e + 1] - row0 < BM ? offsets[e + 1] - row0 : BM);
  const bool vec_o = ldo % 8 == 0 && aligned16(out), vec_p = pre && ldp % 8 == 0 && aligned16(pre);
  const bool vec_bias = bias && N % 8 == 0 && aligned16(bias);
  if (SWI || GRAD_ACT == kSwiglu) {  // 8 hidden columns per thread and step: their gates and ups
    constexpr int HALF = SWI ? BN / 2 : BN, HCPR = HALF / 8;
    const int64_t H = SWI ? N / 2 : N, o0 = static_cast<int64_t>(nt) * HALF;
    const bool whole = interleaved || H % 8 == 0;  // the up half on 16 bytes too
    for (int c = tid; c < BM * HCPR; c += kThreads) {
      const int r = c / HCPR, oc = c % HCPR * 8;
      if (r >= rows) break;
      const int64_t row = row0 + r, o = o0 + oc;
      const int valid = clamp8(H - o);
      if (valid == 0) continue;
      float g[8], u[8];
      const float* src = Cs + r * LDC;
      if (GRAD_ACT == kSwiglu) {  // acc = d hidden; pre = (gate, up); out = (d gate, d up)
        float p[8], q[8];
        load_gate_up(pre + row * ldp, o, H, interleaved, valid, vec_p && whole, p, q);
        const int64_t flat = route.partial ? gather[row] : 0;
        const float wr = route.partial ? route.weights[flat] : 1.f;
        float hs = 0.f;  // the routing weights' gradient: sum of acc * hidden over these 8 columns
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float s = sigmoid(p[j]), acc = src[oc + j], dh = acc * wr;
          if (route.partial && j < valid) hs += acc * to_f32(from_f32<T>(p[j] * s * q[j]));
          g[j] = dh * q[j] * s * (1.f + p[j] * (1.f - s));
          u[j] = dh * p[j] * s;
        }
        if (route.partial) route.partial[flat * route.ldq + o / 8] = hs;
        store_gate_up(out + row * ldo, o, H, interleaved, valid, vec_o && whole, g, u);
        continue;
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) {  // the tile's columns: [gates | ups] or (gate, up) pairs
        g[j] = src[interleaved ? 2 * (oc + j) : oc + j];
        u[j] = src[interleaved ? 2 * (oc + j) + 1 : HALF + oc + j];
      }
      if (bias) {  // scalar reads (the bias rows stay in L1): no third array of 8 beside gate and up
        const T* bg = bias + e * N + gate_col(o, interleaved);
        const int64_t step = interleaved ? 2 : 1, up = up_step(H, interleaved);
#pragma unroll
        for (int j = 0; j < 8; ++j)
          if (j < valid) g[j] += to_f32(bg[j * step]), u[j] += to_f32(bg[j * step + up]);
      }
      if (pre) store_gate_up(pre + row * ldp, o, H, interleaved, valid, vec_p && whole, g, u);
#pragma unroll
      for (int j = 0; j < 8; ++j) g[j] = g[j] * sigmoid(g[j]) * u[j];
      store8(out + row * ldo + o, valid, vec_o, g);
    }
    if (GRAD_ACT && route.partial && nt == 0) routed_bias_column(route, a, lda, gather, top_k, K, e, row0, rows, N);
    return;
  }
  constexpr int CPR = BN / 8;
  for (int c = tid; c < BM * CPR; c += kThreads) {
    const int r = c / CPR, cc = c % CPR * 8;
    if (r >= rows) break;
    const int64_t row = row0 + r, n = n0 + cc;
    const int valid = clamp8(N - n);
    if (valid == 0) continue;
    // Two 16-byte shared reads. A 16-byte read is served 8 lanes at a time, and 8 lanes 32 bytes
    // apart cover only half the banks (lanes t and t + 4 meet): lanes 4-7 of every 8 read their
    // second half first, so each read's 8 lanes cover all 32 banks once.
    float v[8];
    const int swap = (c >> 2) & 1;  // c and the lane agree mod 8 (kThreads is a multiple of 32)
    const float4* const src = reinterpret_cast<const float4*>(Cs + r * LDC + cc);
    const float4 first = src[swap], second = src[swap ^ 1];
    const float4 lo = swap ? second : first, hi = swap ? first : second;
    v[0] = lo.x, v[1] = lo.y, v[2] = lo.z, v[3] = lo.w, v[4] = hi.x, v[5] = hi.y, v[6] = hi.z, v[7] = hi.w;
    if (GRAD_ACT) {  // pre is an input here: d pre = d hidden * act'(pre)
      float p[8];
      load8(pre + row * ldp + n, valid, vec_p, p);
      if (route.partial) {  // the routing weights' gradient over these 8 columns, then d hidden = w * acc
        const int64_t flat = gather[row];
        const float wr = route.weights[flat];
        float hs = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j)
          if (j < valid) hs += v[j] * to_f32(from_f32<T>(activate(p[j], GRAD_ACT)));
        route.partial[flat * route.ldq + n / 8] = hs;
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] *= wr;
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] *= activate_grad(p[j], GRAD_ACT);
      store8(out + row * ldo + n, valid, vec_o, v);
      continue;
    }
    if (bias) {
      float b[8];
      load8(bias + e * N + n, valid, vec_bias, b);
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] += b[j];
    }
    if (pre) store8(pre + row * ldp + n, valid, vec_p, v);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = activate(v[j], ACT);
    store8(out + row * ldo + n, valid, vec_o, v);
  }
  if (GRAD_ACT && route.partial && nt == 0) routed_bias_column(route, a, lda, gather, top_k, K, e, row0, rows, N);
}

// ACT, TRANS_W and GRAD_ACT are compile-time: fewer live registers and no branches in the loops.
// Block b of the 1-D grid computes row block b / n_tiles and column tile b % n_tiles.
// SwiGLU (ACT, forward: W has N = 2H columns, out H): column tile t copies the BN weight columns of
// hidden columns t BN / 2 .. (t + 1) BN / 2 - 1, gates then ups (concat: [gate | up] halves of the
// tile) or pairs (interleaved: W's columns t BN .. (t + 1) BN - 1 as stored), so that one accumulator
// holds both halves and the epilogue pairs them; pre keeps all 2H columns in W's layout.
// GRAD_ACT SwiGLU (dgrad: N = H columns of d hidden): pre and out have 2H columns (d gate, d up).
template <typename T, int BN, int ACT, bool TRANS_W, int GRAD_ACT = 0>
__global__ void __launch_bounds__(kThreads, 2) gmm_kernel(
    const T* __restrict__ a, int64_t lda, const int64_t* __restrict__ gather, int top_k, const T* __restrict__ w,
    int64_t K, int64_t N, int64_t ldw, int64_t stride_we, const T* __restrict__ bias,
    const int64_t* __restrict__ offsets, int num_experts, T* __restrict__ out, int64_t ldo, T* __restrict__ pre, int64_t ldp, int n_tiles,
    int64_t rounds, bool interleaved, RoutedDgrad route) {
#if GEOMOE_SM90A_CUBIN
  __trap();  // the sm_90a build runs wg::gmm_kernel (use_wgmma)
#else
  using G = GemmTile<T, BN, TRANS_W>;
  constexpr bool SWI = ACT == kSwiglu;
  static_assert(!(SWI && TRANS_W), "SwiGLU is a forward activation");
  extern __shared__ __align__(128) unsigned char smem[];
  T* const As = reinterpret_cast<T*>(smem);
  T* const Bs = As + kStages * G::A_STAGE;
  float* const Cs = reinterpret_cast<float*>(smem);  // after the K loop

  const unsigned rb = blockIdx.x / static_cast<unsigned>(n_tiles), nt = blockIdx.x % static_cast<unsigned>(n_tiles);
  const int64_t* const blk = rounds > 0 ? interleaved_block(offsets, num_experts, rb, rounds)
                                        : block_of_expert(offsets, num_experts, rb);  // {expert, first row}
  if (blk[0] < 0) return;
  int64_t e = blk[0], row0 = blk[1];
  int rows = static_cast<int>(offsets[e + 1] - row0 < BM ? offsets[e + 1] - row0 : BM);
  const int64_t n0 = static_cast<int64_t>(nt) * BN;
  const T* we = w + e * stride_we;
  const int tid = threadIdx.x, warp = tid / 32, wm = warp / G::WN, wn = warp % G::WN;

  // This thread's copies, the same rows (A) or columns (W) at every K step: sources found once.
  const bool vec_a = lda % 8 == 0 && aligned16(a);
  const bool vec_b = ldw % 8 == 0 && stride_we % 8 == 0 && aligned16(w) && (!SWI || interleaved || (N / 2) % 8 == 0);
  const int a_kc = tid % G::A_CPR * 8;
  const T* a_src[G::A_PER];  // row start, null past the block's rows
#pragma unroll
  for (int i = 0; i < G::A_PER; ++i) {
    const int r = tid / G::A_CPR + i * (kThreads / G::A_CPR);
    a_src[i] = r < rows ? a + (gather ? token_of(gather[row0 + r], top_k) : row0 + r) * lda : nullptr;
  }
  const int b_c = tid % G::B_CPR * 8;  // TRANS_W: the k offset in a row of W^T; else the column n0 + b_c
  const T* b_src[TRANS_W ? G::B_PER : 1];
  int b_valid = 0;  // !TRANS_W: columns in bounds
  if (TRANS_W) {
#pragma unroll
    for (int i = 0; i < G::B_PER; ++i) {
      const int64_t n = n0 + tid / G::B_CPR + i * (kThreads / G::B_CPR);
      b_src[i] = n < N ? we + n * ldw : nullptr;
    }
  } else if (SWI) {
    const int64_t H = N / 2, o = static_cast<int64_t>(nt) * (BN / 2) + b_c % (BN / 2);  // this copy's hidden columns
    const int64_t col = interleaved ? n0 + b_c : b_c < BN / 2 ? o : H + o;
    b_src[0] = we + col;
    b_valid = interleaved ? clamp8(N - col) : clamp8(H - o);
  } else {
    b_src[0] = we + n0 + b_c;
    b_valid = clamp8(N - n0 - b_c);
  }

  auto load_stage = [&](int64_t k0, int stage) {
    T* as = As + stage * G::A_STAGE;
    T* bs = Bs + stage * G::B_STAGE;
    const int ka = clamp8(K - k0 - a_kc);
#pragma unroll
    for (int i = 0; i < G::A_PER; ++i) {
      const int r = tid / G::A_CPR + i * (kThreads / G::A_CPR);
      copy8(as + r * G::LDA + a_kc, a_src[i] ? a_src[i] + k0 + a_kc : a, a_src[i] ? ka : 0, vec_a);
    }
    if (TRANS_W) {
      const int kb = clamp8(K - k0 - b_c);
#pragma unroll
      for (int i = 0; i < G::B_PER; ++i) {
        const int r = tid / G::B_CPR + i * (kThreads / G::B_CPR);
        copy8(bs + r * G::LDB + b_c, b_src[i] ? b_src[i] + k0 + b_c : w, b_src[i] ? kb : 0, vec_b);
      }
    } else {
#pragma unroll
      for (int i = 0; i < G::B_PER; ++i) {
        const int kr = tid / G::B_CPR + i * (kThreads / G::B_CPR);
        const bool in = k0 + kr < K && b_valid > 0;
        copy8(bs + kr * G::LDB + b_c, in ? b_src[0] + (k0 + kr) * ldw : w, in ? b_valid : 0, vec_b);
      }
    }
  };

  Acc acc[G::FM][G::FN];
#pragma unroll
  for (int i = 0; i < G::FM; ++i)
#pragma unroll
    for (int j = 0; j < G::FN; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  // kStages - 1 tiles in flight; one commit per step (empty past the end) keeps the group count uniform
  const int nk = static_cast<int>((K + BK - 1) / BK);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < nk) load_stage(static_cast<int64_t>(s) * BK, s);
    __pipeline_commit();
  }
  using BLayout = typename std::conditional<TRANS_W, wmma::col_major, wmma::row_major>::type;
  for (int kt = 0; kt < nk; ++kt) {
    __pipeline_wait_prior(kStages - 2);  // this thread's copies of tile kt have landed
    __syncthreads();                     // everyone's have, and everyone is done with tile kt - 1's stage
    const int next = kt + kStages - 1;
    if (next < nk) load_stage(static_cast<int64_t>(next) * BK, next % kStages);
    __pipeline_commit();
    const T* as = As + (kt % kStages) * G::A_STAGE + wm * G::FM * 16 * G::LDA;
    const T* bs = Bs + (kt % kStages) * G::B_STAGE + (TRANS_W ? wn * G::FN * 16 * G::LDB : wn * G::FN * 16);
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[G::FM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> fb[G::FN];
#pragma unroll
      for (int i = 0; i < G::FM; ++i) wmma::load_matrix_sync(fa[i], as + i * 16 * G::LDA + kk, G::LDA);
#pragma unroll
      for (int j = 0; j < G::FN; ++j)  // TRANS_W: Bs[n][k] is W^T column-major, element (k, n) at k + n * LDB
        wmma::load_matrix_sync(fb[j], TRANS_W ? bs + j * 16 * G::LDB + kk : bs + kk * G::LDB + j * 16, G::LDB);
#pragma unroll
      for (int i = 0; i < G::FM; ++i)
#pragma unroll
        for (int j = 0; j < G::FN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }
  __pipeline_wait_prior(0);
  __syncthreads();  // the pipeline's buffers become Cs
#pragma unroll
  for (int i = 0; i < G::FM; ++i)
#pragma unroll
    for (int j = 0; j < G::FN; ++j)
      wmma::store_matrix_sync(Cs + (wm * G::FM * 16 + i * 16) * G::LDC + wn * G::FN * 16 + j * 16, acc[i][j], G::LDC,
                              wmma::mem_row_major);
  __syncthreads();

  gemm_epilogue<T, BN, ACT, GRAD_ACT, G::LDC>(Cs, blk, offsets, nt, N, bias, out, ldo, pre, ldp, interleaved, route, a, lda,
                                              gather, top_k, K);
#endif
}

// ---- weight gradient --------------------------------------------------------------------------------

constexpr int TK = 128, TN = 128, TM = 32;  // a 128 x 128 tile of dW over 32-row steps
struct WgradTile {
  static constexpr int WK = 2, WN = kWarps / WK, FK = TK / WK / 16, FN = TN / WN / 16;
  static constexpr int LDA = TK + PAD, LDG = TN + PAD, LDC = TN + CPAD;  // As[TM][LDA], Gs[TM][LDG], Cs[TK][LDC]
  static constexpr int A_STAGE = TM * LDA, G_STAGE = TM * LDG;
  static constexpr int CPR = TK / 8, PER = TM * CPR / kThreads;  // the A and G tiles are both 32 x 128
  template <typename T> static constexpr std::size_t smem_bytes() {
    const std::size_t pipe = std::size_t(kStages) * (A_STAGE + G_STAGE) * sizeof(T), c = std::size_t(TK) * LDC * 4;
    return pipe > c ? pipe : c;
  }
  static_assert(TK == TN && PER >= 1 && kThreads % CPR == 0, "one copy layout serves both tiles");
};

// Block b of the 1-D grid: tile b % tiles of expert (b / tiles) % E, split b / (tiles * E); an expert's
// tiles are consecutive (its rows stay in L2), column tiles fastest within a row of tiles.
// A_ACT SwiGLU: a holds pre (2K columns, `interleaved` or [gate | up]); the hidden columns are formed
// in registers from both halves by plain loads (there is no async copy that multiplies) and stored
// to the stage as the copies would have; G's tile stays asynchronous.
template <typename T, int A_ACT>
__global__ void __launch_bounds__(kThreads, 2) wgrad_kernel(
    const T* __restrict__ a, int64_t lda, const int64_t* __restrict__ gather, int top_k, const T* __restrict__ g,
    int64_t ldg, const int64_t* __restrict__ offsets, int num_experts, int64_t K, int64_t N, int splits, int n_tiles,
    int tiles, float* __restrict__ partial, float* __restrict__ partial_db, bool interleaved) {
#if GEOMOE_SM90A_CUBIN
  __trap();  // the sm_90a build runs wg::wgrad_kernel (use_wgmma)
#else
  using W = WgradTile;
  extern __shared__ __align__(128) unsigned char smem[];
  T* const As = reinterpret_cast<T*>(smem);
  T* const Gs = As + kStages * W::A_STAGE;
  float* const Cs = reinterpret_cast<float*>(smem);  // after the row loop
  __shared__ float db_sum[kThreads / W::CPR][TN];    // column sums of G, one row per group of copying threads

  const unsigned tile = blockIdx.x % static_cast<unsigned>(tiles), se = blockIdx.x / static_cast<unsigned>(tiles);
  const int e = static_cast<int>(se % static_cast<unsigned>(num_experts)),
            s = static_cast<int>(se / static_cast<unsigned>(num_experts));
  const int64_t k0 = static_cast<int64_t>(tile / n_tiles) * TK, n0 = static_cast<int64_t>(tile % n_tiles) * TN;
  const int64_t start = offsets[e], end = offsets[e + 1];
  const int64_t chunk = (end - start + splits - 1) / splits;
  const int64_t lo = start + s * chunk, hi = lo + chunk < end ? lo + chunk : end;
  const int tid = threadIdx.x, warp = tid / 32, wk = warp / W::WN, wn = warp % W::WN;

  // This thread copies 8 columns (k0 + c of A, n0 + c of G) of rows m_i = tid / CPR + i * (kThreads / CPR).
  const int c = tid % W::CPR * 8;
  const int ka = clamp8(K - k0 - c), gn = clamp8(N - n0 - c);
  const bool vec_a = lda % 8 == 0 && aligned16(a) && (A_ACT != kSwiglu || interleaved || K % 8 == 0),
             vec_g = ldg % 8 == 0 && aligned16(g);
  const T* const a_col = a + k0 + c;  // row 0's columns; only read where in bounds
  const T* const g_col = g + n0 + c;
  auto load_stage = [&](int64_t m0, int stage) {
    T* as = As + stage * W::A_STAGE + c;
    T* gs = Gs + stage * W::G_STAGE + c;
    if (A_ACT == kSwiglu) {  // one row at a time: the values live beside the accumulators
#pragma unroll 1
      for (int i = 0; i < W::PER; ++i) {
        const int m = tid / W::CPR + i * (kThreads / W::CPR);
        const int64_t row = m0 + m;
        const bool in = row < hi;
        const int64_t src = in ? (gather ? token_of(gather[row], top_k) : row) : 0;
        swiglu8(as + m * W::LDA, in ? a + src * lda : a, k0 + c, K, interleaved, in ? ka : 0, vec_a);
      }
    }
#pragma unroll
    for (int i = 0; i < W::PER; ++i) {
      const int m = tid / W::CPR + i * (kThreads / W::CPR);
      const int64_t row = m0 + m;
      const bool in = row < hi;
      const int64_t src = in ? (gather ? token_of(gather[row], top_k) : row) : 0;  // not in the k loop
      if (A_ACT != kSwiglu) copy8(as + m * W::LDA, in ? a_col + src * lda : a, in ? ka : 0, vec_a);
      copy8(gs + m * W::LDG, in ? g_col + row * ldg : g, in ? gn : 0, vec_g);
    }
  };

  // the first K tile's blocks also sum G's columns (the bias gradient): each thread the 8 columns of the
  // rows it copied, as soon as they have landed, into its own shared slots (registers stay with the
  // fragments); the slots are summed at the end
  const bool sums_bias = partial_db != nullptr && k0 == 0;
  // slot j of the thread's 8 columns at my_sum[j * CPR]: column c + j at (c + j) % 8 * CPR + (c + j) / 8,
  // 16 banks for 16 threads (8 consecutive floats per thread would be an 8-way conflict)
  float* const my_sum = &db_sum[tid / W::CPR][tid % W::CPR];
  if (sums_bias)
#pragma unroll
    for (int j = 0; j < 8; ++j) my_sum[j * W::CPR] = 0.f;
  Acc acc[W::FK][W::FN];
#pragma unroll
  for (int i = 0; i < W::FK; ++i)
#pragma unroll
    for (int j = 0; j < W::FN; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  const int nm = static_cast<int>((hi - lo + TM - 1) / TM);  // hi < lo: an empty split
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < nm) load_stage(lo + static_cast<int64_t>(st) * TM, st);
    __pipeline_commit();
  }
  for (int mt = 0; mt < nm; ++mt) {
    __pipeline_wait_prior(kStages - 2);
    T* as = As + (mt % kStages) * W::A_STAGE;
    const T* gs = Gs + (mt % kStages) * W::G_STAGE;
    if (A_ACT && A_ACT != kSwiglu) {  // a holds pre: the hidden rows formed in place, each thread its own copies (act(0) = 0)
#pragma unroll
      for (int i = 0; i < W::PER; ++i) {
        T* p = as + (tid / W::CPR + i * (kThreads / W::CPR)) * W::LDA + c;
#pragma unroll
        for (int j = 0; j < 8; ++j) p[j] = from_f32<T>(activate(to_f32(p[j]), A_ACT));
      }
    }
    if (sums_bias) {
#pragma unroll
      for (int i = 0; i < W::PER; ++i) {
        const T* p = gs + (tid / W::CPR + i * (kThreads / W::CPR)) * W::LDG + c;
#pragma unroll
        for (int j = 0; j < 8; ++j) my_sum[j * W::CPR] += to_f32(p[j]);
      }
    }
    __syncthreads();
    const int next = mt + kStages - 1;
    if (next < nm) load_stage(lo + static_cast<int64_t>(next) * TM, next % kStages);
    __pipeline_commit();
#pragma unroll
    for (int kk = 0; kk < TM; kk += 16) {
      // A^T as matrix_a: As[m][k] is A^T column-major, element (k, m) at k + m * LDA
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[W::FN];
#pragma unroll
      for (int j = 0; j < W::FN; ++j)
        wmma::load_matrix_sync(fb[j], gs + kk * W::LDG + wn * W::FN * 16 + j * 16, W::LDG);
#pragma unroll
      for (int i = 0; i < W::FK; ++i) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa;
        wmma::load_matrix_sync(fa, as + kk * W::LDA + wk * W::FK * 16 + i * 16, W::LDA);
#pragma unroll
        for (int j = 0; j < W::FN; ++j) wmma::mma_sync(acc[i][j], fa, fb[j], acc[i][j]);
      }
    }
  }
  __pipeline_wait_prior(0);
  __syncthreads();  // the pipeline's buffers become Cs
  const int64_t slot = static_cast<int64_t>(s) * num_experts + e;
  if (sums_bias && tid < TN && n0 + tid < N) {
    float sum = 0.f;
    for (int q = 0; q < kThreads / W::CPR; ++q) sum += db_sum[q][tid % 8 * W::CPR + tid / 8];
    partial_db[slot * N + n0 + tid] = sum;
  }
#pragma unroll
  for (int i = 0; i < W::FK; ++i)
#pragma unroll
    for (int j = 0; j < W::FN; ++j)
      wmma::store_matrix_sync(Cs + (wk * W::FK * 16 + i * 16) * W::LDC + wn * W::FN * 16 + j * 16, acc[i][j], W::LDC,
                              wmma::mem_row_major);
  __syncthreads();
  float* dst = partial + slot * K * N;
  const bool vec_d = N % 4 == 0 && aligned16(partial);
  for (int q = tid; q < TK * TN / 4; q += kThreads) {  // every element written: empty experts get zeros
    const int kr = q / (TN / 4), cc = q % (TN / 4) * 4;
    const int64_t k = k0 + kr, n = n0 + cc;
    if (k >= K || n >= N) continue;
    const float* src = Cs + kr * W::LDC + cc;
    if (vec_d && n + 4 <= N) {
      *reinterpret_cast<float4*>(dst + k * N + n) = make_float4(src[0], src[1], src[2], src[3]);
    } else {
      for (int j = 0; j < 4 && n + j < N; ++j) dst[k * N + n + j] = src[j];
    }
  }
#endif
}

// ---- sm_90: wgmma + TMA ------------------------------------------------------------------------------
//
// The forward, dgrad and weight gradient for sm_90a (H100 / H200), chosen at run time where the device
// is 9.0 and the build has sm_90a code (mma.sync stays the path of every other device). Hand-written
// PTX (sm90_ptx.cuh): wgmma.mma_async with both operands in shared memory, fp32 accumulators in
// registers; 256 threads = two warpgroups, each computing 64 rows of the 128 x 128 tile (64
// registers a thread); BK = 64 (one 128-byte swizzled row per operand row), a 3-stage pipeline
// (96 KB: two blocks per SM). Shape: m64n128k16, one instruction per warpgroup and k16 for all 128
// columns (4 a 64-deep step), which reads each A element from shared memory once per 128 columns
// (two m64n64k16 read it twice); B's two 64 x 64 tiles stay as they are: K-major (the dgrad's W^T)
// they are 16 8-row groups SBO = 1 KB apart in a row, MN-major (the forward's W, the weight
// gradient's G) two swizzle atoms one LBO = 8 KB apart (desc_b128). The weight gradient with
// SwiGLU formed in its load keeps two m64n64k16 (8 a step): there ptxas spilled around the 64
// contiguous accumulator registers the wide instruction takes. The accumulator fragment of
// m64n128k16 is m64n64k16's extended (acc_row / acc_col): element r < 32 of the second 64-column
// half is element 32 + r of the wide one.
// Operands: the rows of A of the forward and dgrad (gathered through the routing or not), and the
// weight gradient's gathered A and act(pre), by 16-byte cp.async (or plain loads where a row is not
// 16-byte aligned) into the swizzled layout, each thread's chunks found as in the mma.sync kernels:
// a box cannot gather rows, and the activation is formed from the copies in shared memory. What is
// one contiguous box comes by TMA (one 64 x 64 box per half of the tile, SWIZZLE_128B, out-of-range
// elements zeros, completing on the stage's mbarrier; one thread issues it, so the copy work and
// its registers leave the other 255): the weight W of the forward and dgrad (3-D tensor map over
// [E, rows, cols]), the forward's and dgrad's A where it is not gathered (the down projection's
// hidden rows, the dgrad's output gradient: map over [1, M, K], the launcher told M), and the
// weight gradient's G (map over [1, M, N]) and its A where it is taken as stored (not gathered, no
// activation). Where TMA cannot address an operand (a base or row stride not on 16 bytes) it comes
// by cp.async. A box runs past the row block's last row into the next expert's rows (or past M:
// zeros): in the forward and dgrad those tile rows reach only accumulator rows that no epilogue
// reads (every epilogue path, the routed dgrad's partials and act'(pre) included, stops at the
// block's rows, and a row's outputs depend on its own A row only), so they stay as loaded; the
// weight gradient sums over its rows, and zeroes them in shared memory (see wgrad_kernel). The forward's W
// [K, N] and the weight gradient's A^T and G are MN-major operands (transposed descriptors), the
// dgrad's W^T and every A K-major.
// Per K step: wait for this thread's copies (and the stage's mbarrier), fence.proxy.async (the
// generic-proxy copies become visible to wgmma), __syncthreads (everyone's copies, and everyone's
// wgmma of the step before has completed: its stage may be refilled), issue the copies of step
// kt + 2, then 4 wgmma (one m64n128k16 a k16), commit, wait for them. The epilogue is the mma.sync
// kernels': the accumulators go to shared memory (the pipeline's buffers) and gemm_epilogue reads them.
namespace wg {

constexpr int kThreads = 256, BM = 128, BN = 128, BK = 64, kStages = 3;
constexpr int TILE = 64 * 64;            // elements of one swizzled 64 x 64 operand tile (8 KB)
constexpr int STAGE = 4 * TILE;          // A: two tiles, B: two tiles
constexpr int LDC = BN + CPAD;           // the fp32 epilogue tile, over the pipeline's buffers
constexpr std::size_t pipe_bytes = std::size_t(kStages) * STAGE * 2, c_bytes = std::size_t(BM) * LDC * 4;
constexpr std::size_t smem_bytes = (pipe_bytes > c_bytes ? pipe_bytes : c_bytes) + 1024;  // + 1,024-byte alignment
static_assert(kThreads == ::geomoe::kThreads && BM == ::geomoe::BM, "the row-block search and epilogue are shared");

// The element offset of (row, col) in a swizzled 64 x 64 tile: 16-byte chunk col / 8 of the 128-byte
// row sits at chunk (col / 8) ^ (row % 8) (TMA's SWIZZLE_128B and wgmma's 128-byte layout).
__device__ inline int swz(int row, int col) { return row * 64 + (((col >> 3) ^ (row & 7)) << 3) + (col & 7); }

// The 1,024-byte aligned start of the tiles in dynamic shared memory (aligned in the shared window).
template <typename T> __device__ inline T* aligned_tiles(unsigned char* smem) {
  const uint32_t a = sm90::smem_addr(smem);
  return reinterpret_cast<T*>(smem + ((1024 - (a & 1023)) & 1023));
}

// Thread t's accumulator element r (of 64: one m64n128k16 fragment) in its warpgroup's 64 rows:
// (row, column) in the 128 x 128 tile (the wgmma D fragment: sm90_ptx.cuh).
__device__ inline int acc_row(int r) {
  const int t = threadIdx.x;
  return 64 * (t / 128) + 16 * (t % 128 / 32) + t % 32 / 4 + 8 * ((r / 2) % 2);
}
__device__ inline int acc_col(int r) { return 8 * (r / 4) + 2 * (threadIdx.x % 4) + r % 2; }

// B's descriptor for one k16 of a 128-wide operand of two 64 x 64 tiles back to back (8 KB each) at
// `tiles`: K-major (the 128 rows are 16 8-row groups, SBO 1,024 bytes, the second tile's first at
// group 8), k0 columns in (2 k0 bytes along the row); MN-major (row k0, the second tile's columns
// one LBO = 8 KB further: its own swizzle atoms).
template <typename T, bool K_MAJOR> __device__ inline uint64_t desc_b128(uint32_t tiles, int k0) {
  return K_MAJOR ? sm90::make_desc(tiles + k0 * sizeof(T)) : sm90::make_desc(tiles + k0 * 128, TILE * sizeof(T));
}

template <typename T, int ACT, bool TRANS_W, int GRAD_ACT>
__global__ void __launch_bounds__(kThreads, 2) gmm_kernel(
    const T* __restrict__ a, int64_t lda, const int64_t* __restrict__ gather, int top_k, const T* __restrict__ w,
    const __grid_constant__ CUtensorMap w_map, const __grid_constant__ CUtensorMap a_map, int tma, int64_t K, int64_t N,
    int64_t ldw, int64_t stride_we,
    const T* __restrict__ bias, const int64_t* __restrict__ offsets, int num_experts, T* __restrict__ out, int64_t ldo,
    T* __restrict__ pre, int64_t ldp, int n_tiles, int64_t rounds, bool interleaved, RoutedDgrad route) {
#if !GEOMOE_SM90A
  __trap();  // no sm_90a code here (sm_80, the compute_90 PTX): the launcher never chooses this kernel
#else
  constexpr bool SWI = ACT == kSwiglu;
  static_assert(!(SWI && TRANS_W), "SwiGLU is a forward activation");
  extern __shared__ __align__(128) unsigned char smem[];
  T* const tiles = aligned_tiles<T>(smem);
  float* const Cs = reinterpret_cast<float*>(tiles);  // after the K loop
  __shared__ __align__(8) uint64_t full[kStages];      // the TMA boxes (W's, A's) of each stage
  __shared__ const T* a_rows[BM];                      // each tile row's source row (null past the block's rows)
  const bool w_tma = tma & 1, a_tma = tma & 2;         // a_tma: the launcher's A map (A not gathered)

  const unsigned rb = blockIdx.x / static_cast<unsigned>(n_tiles), nt = blockIdx.x % static_cast<unsigned>(n_tiles);
  const int64_t* const blk = rounds > 0 ? interleaved_block(offsets, num_experts, rb, rounds)
                                        : block_of_expert(offsets, num_experts, rb);  // {expert, first row}
  if (blk[0] < 0) return;
  const int64_t e = blk[0], row0 = blk[1];
  const int rows = static_cast<int>(offsets[e + 1] - row0 < BM ? offsets[e + 1] - row0 : BM);
  const int tid = threadIdx.x;
  const T* we = w + e * stride_we;

  // W's two 64-column (forward) or 64-row (dgrad) halves of the tile: their first column / row and
  // bound (recomputed where used: the registers stay with the accumulators). SwiGLU: [gate | up]
  // halves, or W's columns as stored (interleaved pairs).
  auto b_start = [&](int j) -> int64_t {
    return SWI && !interleaved ? static_cast<int64_t>(nt) * (BN / 2) + j * (N / 2) : static_cast<int64_t>(nt) * BN + 64 * j;
  };
  auto b_end = [&](int j) -> int64_t { return SWI && !interleaved ? (j + 1) * (N / 2) : N; };

  // A: 1,024 chunks of 8 a stage, 4 a thread: row tid / 8 + 32 i, chunk tid % 8 (the same each step);
  // the rows' sources found once, kept in shared memory
  const bool vec_a = lda % 8 == 0 && aligned16(a);
  const int a_kc = tid % 8 * 8;
  if (tid < BM && !a_tma)
    a_rows[tid] = tid < rows ? a + (gather ? token_of(gather[row0 + tid], top_k) : row0 + tid) * lda : nullptr;
  const bool vec_b = ldw % 8 == 0 && stride_we % 8 == 0 && aligned16(w) && (!SWI || interleaved || (N / 2) % 8 == 0);

  auto load_stage = [&](int64_t k0, int stage) {
    T* const as = tiles + stage * STAGE;
    T* const bs = as + 2 * TILE;
    if (!a_tma) {
      const int ka = clamp8(K - k0 - a_kc);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = tid / 8 + 32 * i;
        const T* src = a_rows[r];
        copy8(as + (r / 64) * TILE + swz(r % 64, a_kc), src ? src + k0 + a_kc : a, src ? ka : 0, vec_a);
      }
    }
    if ((w_tma || a_tma) && tid == 0) {  // one thread: two 8 KB boxes an operand on the stage's barrier
      sm90::mbar_arrive_expect_tx(&full[stage], (int(w_tma) + int(a_tma)) * 2 * TILE * sizeof(T));
#pragma unroll
      for (int i = 0; i < 2; ++i)  // A's rows row0 + 64 i.., K columns k0.. (past the expert: see above)
        if (a_tma)
          sm90::tma_load_3d(as + i * TILE, &a_map, &full[stage], static_cast<int>(k0), static_cast<int>(row0 + 64 * i), 0);
    }
    if (w_tma) {
      if (tid == 0) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          if (TRANS_W)  // rows b_start(j).. of W (the output columns), K columns k0..
            sm90::tma_load_3d(bs + j * TILE, &w_map, &full[stage], static_cast<int>(k0), static_cast<int>(b_start(j)),
                              static_cast<int>(e));
          else  // K rows k0.., columns b_start(j)..
            sm90::tma_load_3d(bs + j * TILE, &w_map, &full[stage], static_cast<int>(b_start(j)), static_cast<int>(k0),
                              static_cast<int>(e));
        }
      }
      return;
    }
#pragma unroll 1  // the fallback: one chunk's addresses at a time (the registers stay with the accumulators)
    for (int i = 0; i < 4; ++i) {  // 1,024 chunks: half j, row r, chunk c
      const int q = tid + kThreads * i, j = q / 512, r = q % 512 / 8, c = q % 8 * 8;
      if (TRANS_W) {  // K-major: W row b_start(j) + r (an output column), K columns k0 + c..
        const int64_t n = b_start(j) + r;
        const bool in = n < b_end(j);
        copy8(bs + j * TILE + swz(r, c), in ? we + n * ldw + k0 + c : w, in ? clamp8(K - k0 - c) : 0, vec_b);
      } else {  // MN-major: W row k0 + r, columns b_start(j) + c..
        const bool in = k0 + r < K;
        const int64_t n = b_start(j) + c;
        copy8(bs + j * TILE + swz(r, c), in ? we + (k0 + r) * ldw + n : w, in ? clamp8(b_end(j) - n) : 0, vec_b);
      }
    }
  };

  if (tid == 0)
#pragma unroll
    for (int s = 0; s < kStages; ++s) sm90::mbar_init(&full[s], 1);
  __syncthreads();  // the barriers and a_rows are set up before anyone uses them

  float acc[64];
#pragma unroll
  for (int r = 0; r < 64; ++r) acc[r] = 0.f;

  const int nk = static_cast<int>((K + BK - 1) / BK);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < nk) load_stage(static_cast<int64_t>(s) * BK, s);
    __pipeline_commit();
  }
  const int wgi = tid / 128;  // this thread's warpgroup: rows 64 wgi .. 64 wgi + 63
  for (int kt = 0; kt < nk; ++kt) {
    const int stage = kt % kStages;
    __pipeline_wait_prior(kStages - 2);                            // this thread's copies of step kt
    if (w_tma || a_tma) sm90::mbar_wait(&full[stage], (kt / kStages) & 1);  // the boxes of step kt
    sm90::fence_proxy_async();                                     // the copies, visible to wgmma
    __syncthreads();  // everyone's copies; everyone's wgmma of step kt - 1 done: its stage is free
    const int next = kt + kStages - 1;
    if (next < nk) load_stage(static_cast<int64_t>(next) * BK, next % kStages);
    __pipeline_commit();
    const uint32_t as = sm90::smem_addr(tiles + stage * STAGE + wgi * TILE), bs = sm90::smem_addr(tiles + stage * STAGE + 2 * TILE);
    sm90::fence_operand(acc);
    sm90::wgmma_fence();
#pragma unroll
    for (int s = 0; s < BK / 16; ++s) {  // A K-major: 16 columns = 32 bytes along the row
      sm90::wgmma_m64n128k16<T, 0, TRANS_W ? 0 : 1>(acc, sm90::make_desc(as + 32 * s), desc_b128<T, TRANS_W>(bs, 16 * s), 1);
    }
    sm90::wgmma_commit();
    sm90::wgmma_wait<0>();
    sm90::fence_operand(acc);
  }
  __pipeline_wait_prior(0);
  __syncthreads();  // the pipeline's buffers become Cs
#pragma unroll
  for (int r = 0; r < 64; ++r) Cs[acc_row(r) * LDC + acc_col(r)] = acc[r];
  __syncthreads();
  gemm_epilogue<T, BN, ACT, GRAD_ACT, LDC>(Cs, blk, offsets, nt, N, bias, out, ldo, pre, ldp, interleaved, route, a, lda,
                                           gather, top_k, K);
#endif
}

// The weight gradient: a 128 x 128 tile of dW (two warpgroups of 64 K rows, 128 columns: G's two
// 64-column tiles), 64 routed rows a step; A^T and G both MN-major (row m of the step is a swizzled row of 64 K or N
// values). G's rows (contiguous, [M, N]) come by TMA where g_map addresses them (tma & 1), A's where
// A is contiguous and taken as stored (tma & 2: not gathered, no activation formed in its load):
// two 64 x 64 boxes an operand (columns n0 + 64 j (k0 + 64 j), rows m0..m0 + 63) on the stage's
// mbarrier, the same swizzled bits the 16-byte copies would write. The gathered A and act(pre) stay
// cp.async (the rows are not one box; the activation is formed in shared memory from the copies).
// A step's rows past the split's end hi belong to the next expert (or lie past M: TMA zeros those),
// and 0 * Inf = NaN, so after the stage's barrier each thread zeroes the rows >= hi of its own
// chunks of the TMA tiles (only in a split's partial last step; the copies zero them by their
// source size): the tiles hold exactly what the cp.async path's do, and dW and db come out bit for
// bit the same. The bias gradient sums, per thread, the G chunks of its copy layout from shared
// memory after that (TMA or not), each column in a fixed order: deterministic.
template <typename T, int A_ACT>
__global__ void __launch_bounds__(kThreads, 2) wgrad_kernel(
    const T* __restrict__ a, int64_t lda, const int64_t* __restrict__ gather, int top_k, const T* __restrict__ g,
    int64_t ldg, const __grid_constant__ CUtensorMap g_map, const __grid_constant__ CUtensorMap a_map, int tma,
    const int64_t* __restrict__ offsets, int num_experts, int64_t K, int64_t N, int splits, int n_tiles, int tiles,
    float* __restrict__ partial, float* __restrict__ partial_db, bool interleaved) {
#if !GEOMOE_SM90A
  __trap();  // no sm_90a code here: the launcher never chooses this kernel
#else
  constexpr int TM = 64, CPR = 16;  // rows a step; 8-column chunks per 128-column row
  extern __shared__ __align__(128) unsigned char smem[];
  T* const tl = aligned_tiles<T>(smem);
  __shared__ float db_sum[kThreads / CPR][BN];  // column sums of G, one row per group of copying threads
  __shared__ __align__(8) uint64_t full[kStages];  // the TMA boxes of each stage

  const unsigned tile = blockIdx.x % static_cast<unsigned>(tiles), se = blockIdx.x / static_cast<unsigned>(tiles);
  const int e = static_cast<int>(se % static_cast<unsigned>(num_experts)),
            s = static_cast<int>(se / static_cast<unsigned>(num_experts));
  const int64_t k0 = static_cast<int64_t>(tile / n_tiles) * BM, n0 = static_cast<int64_t>(tile % n_tiles) * BN;
  const int64_t start = offsets[e], end = offsets[e + 1];
  const int64_t chunk = (end - start + splits - 1) / splits;
  const int64_t lo = start + s * chunk, hi = lo + chunk < end ? lo + chunk : end;
  const int tid = threadIdx.x;
  const bool g_tma = tma & 1, a_tma = A_ACT == kNone && (tma & 2);

  // this thread copies columns c .. c + 7 (of A's k0.. and G's n0..) of rows tid / 16 + 16 i
  const int c = tid % CPR * 8;
  const int ka = clamp8(K - k0 - c), gn = clamp8(N - n0 - c);
  const bool vec_a = lda % 8 == 0 && aligned16(a) && (A_ACT != kSwiglu || interleaved || K % 8 == 0),
             vec_g = ldg % 8 == 0 && aligned16(g);
  auto at = [&](int half_tile, int m) { return half_tile * TILE + swz(m, c % 64); };  // half c / 64
  auto load_stage = [&](int64_t m0, int stage) {
    T* const as = tl + stage * STAGE;
    T* const gs = as + 2 * TILE;
    if ((g_tma || a_tma) && tid == 0) {  // one thread: two 8 KB boxes an operand on the stage's barrier
      sm90::mbar_arrive_expect_tx(&full[stage], (g_tma + a_tma) * 2 * TILE * sizeof(T));
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        if (a_tma) sm90::tma_load_3d(as + j * TILE, &a_map, &full[stage], static_cast<int>(k0 + 64 * j), static_cast<int>(m0), 0);
        if (g_tma) sm90::tma_load_3d(gs + j * TILE, &g_map, &full[stage], static_cast<int>(n0 + 64 * j), static_cast<int>(m0), 0);
      }
    }
    if (A_ACT == kSwiglu) {  // one row at a time: the values live beside the accumulators
#pragma unroll 1
      for (int i = 0; i < TM * CPR / kThreads; ++i) {
        const int m = tid / CPR + i * (kThreads / CPR);
        const int64_t row = m0 + m;
        const bool in = row < hi;
        const int64_t src = in ? (gather ? token_of(gather[row], top_k) : row) : 0;
        swiglu8(as + at(c / 64, m), in ? a + src * lda : a, k0 + c, K, interleaved, in ? ka : 0, vec_a);
      }
    }
#pragma unroll
    for (int i = 0; i < TM * CPR / kThreads; ++i) {
      const int m = tid / CPR + i * (kThreads / CPR);
      const int64_t row = m0 + m;
      const bool in = row < hi;
      if (A_ACT != kSwiglu && !a_tma) {
        const int64_t src = in ? (gather ? token_of(gather[row], top_k) : row) : 0;  // not in the k loop
        copy8(as + at(c / 64, m), in ? a + src * lda + k0 + c : a, in ? ka : 0, vec_a);
      }
      if (!g_tma) copy8(gs + at(c / 64, m), in ? g + row * ldg + n0 + c : g, in ? gn : 0, vec_g);
    }
  };

  if (tid == 0)
#pragma unroll
    for (int st = 0; st < kStages; ++st) sm90::mbar_init(&full[st], 1);
  __syncthreads();  // the barriers are set up before anyone uses them

  const bool sums_bias = partial_db != nullptr && k0 == 0;
  float* const my_sum = &db_sum[tid / CPR][tid % CPR];  // column c + j at (c + j) % 8 * CPR + (c + j) / 8
  if (sums_bias)
#pragma unroll
    for (int j = 0; j < 8; ++j) my_sum[j * CPR] = 0.f;
  float acc[64];
#pragma unroll
  for (int r = 0; r < 64; ++r) acc[r] = 0.f;

  const int nm = static_cast<int>((hi - lo + TM - 1) / TM);  // hi < lo: an empty split
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < nm) load_stage(lo + static_cast<int64_t>(st) * TM, st);
    __pipeline_commit();
  }
  const int wgi = tid / 128;  // this warpgroup's 64 K rows of dW
  for (int mt = 0; mt < nm; ++mt) {
    __pipeline_wait_prior(kStages - 2);  // this thread's copies of step mt
    T* const as = tl + (mt % kStages) * STAGE;
    T* const gs = as + 2 * TILE;
    if (g_tma || a_tma) {
      sm90::mbar_wait(&full[mt % kStages], (mt / kStages) & 1);  // the boxes of step mt
      const int64_t m0 = lo + static_cast<int64_t>(mt) * TM;
      if (m0 + TM > hi) {  // the partial last step: the rows >= hi of this thread's chunks made zeros
#pragma unroll
        for (int i = 0; i < TM * CPR / kThreads; ++i) {
          const int m = tid / CPR + i * (kThreads / CPR);
          if (m0 + m < hi) continue;
          if (g_tma) *reinterpret_cast<uint4*>(gs + at(c / 64, m)) = make_uint4(0, 0, 0, 0);
          if (a_tma) *reinterpret_cast<uint4*>(as + at(c / 64, m)) = make_uint4(0, 0, 0, 0);
        }
      }
    }
    if (A_ACT && A_ACT != kSwiglu) {  // a holds pre: the hidden values formed in place, each thread its own copies
#pragma unroll
      for (int i = 0; i < TM * CPR / kThreads; ++i) {
        T* p = as + at(c / 64, tid / CPR + i * (kThreads / CPR));
#pragma unroll
        for (int j = 0; j < 8; ++j) p[j] = from_f32<T>(activate(to_f32(p[j]), A_ACT));
      }
    }
    if (sums_bias) {
#pragma unroll
      for (int i = 0; i < TM * CPR / kThreads; ++i) {
        const T* p = gs + at(c / 64, tid / CPR + i * (kThreads / CPR));
#pragma unroll
        for (int j = 0; j < 8; ++j) my_sum[j * CPR] += to_f32(p[j]);
      }
    }
    sm90::fence_proxy_async();  // the copies and this thread's zeros, visible to wgmma
    __syncthreads();  // everyone's; everyone's wgmma of step mt - 1 done: its stage is free
    const int next = mt + kStages - 1;
    if (next < nm) load_stage(lo + static_cast<int64_t>(next) * TM, next % kStages);
    __pipeline_commit();
    const uint32_t sa = sm90::smem_addr(as + wgi * TILE), sg = sm90::smem_addr(gs);
    sm90::fence_operand(acc);
    sm90::wgmma_fence();
#pragma unroll
    for (int k = 0; k < TM / 16; ++k) {  // 16 rows of the step = 2,048 bytes; G's 128 columns: two atoms
      const uint64_t da = sm90::make_desc(sa + 2048 * k);
      if (A_ACT != kSwiglu) {
        sm90::wgmma_m64n128k16<T, 1, 1>(acc, da, desc_b128<T, false>(sg, 16 * k), 1);
      } else {  // acc[32 j ..] = half j's m64n64 fragment (sm90_ptx.cuh): ptxas spilled this variant's
                // loads around the 64 contiguous registers one m64n128k16 takes
#pragma unroll
        for (int j = 0; j < 2; ++j)
          sm90::wgmma_m64n64k16<T, 1, 1>(*reinterpret_cast<float(*)[32]>(acc + 32 * j), da,
                                         sm90::make_desc(sg + j * TILE * sizeof(T) + 2048 * k), 1);
      }
    }
    sm90::wgmma_commit();
    sm90::wgmma_wait<0>();
    sm90::fence_operand(acc);
  }
  __pipeline_wait_prior(0);
  __syncthreads();  // every thread's bias sums are in
  const int64_t slot = static_cast<int64_t>(s) * num_experts + e;
  if (sums_bias && tid < BN && n0 + tid < N) {
    float sum = 0.f;
    for (int q = 0; q < kThreads / CPR; ++q) sum += db_sum[q][tid % 8 * CPR + tid / 8];
    partial_db[slot * N + n0 + tid] = sum;
  }
  float* dst = partial + slot * K * N;  // every element written: empty experts get zeros
#pragma unroll
  for (int r = 0; r < 64; ++r) {
    const int64_t k = k0 + acc_row(r), n = n0 + acc_col(r);
    if (k < K && n < N) dst[k * N + n] = acc[r];
  }
#endif
}

}  // namespace wg

template <typename F>
cudaError_t by_half_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;  // fp32: the Triton kernel (IEEE dot) serves it
  }
}

// A 1-D grid of `blocks` (a launch the card refuses where it is more than 2^31 - 1).
inline dim3 grid_1d(int64_t blocks) { return dim3(blocks > 0xffffffffll ? 0xffffffffu : static_cast<unsigned>(blocks)); }

// 128 x 64 column tiles where the last 128-column tile would be at most half full (N = 576: 9 full
// tiles instead of 5 with the last half empty), 128 x 128 otherwise.
inline bool narrow_tiles(int64_t N) { return N <= 64 || (N % 128 != 0 && N % 128 <= 64); }

// Which kernels the device can run is a property of the code it loaded from this file, not of its
// compute capability alone: the sm_90a cubin has live wgmma kernels and mma.sync kernels that trap;
// every other code (sm_80, a plain sm_90 cubin beside the sm_90a one, the compute_90 PTX on a newer
// device) the reverse. The driver picks that code per device, so the launchers ask it: the probe
// kernel below is never launched, and its __launch_bounds__ (the maxThreadsPerBlock that
// cudaFuncGetAttributes reports for the code the device loaded) differ between the sm_90a cubin and
// the rest, under the same condition as the traps.
constexpr int kProbeSm90a = 64, kProbeOther = 32;
#if !defined(GEOMOE_EMULATION) && GEOMOE_SM90A_CUBIN != GEOMOE_SM90A
#error "the mma.sync kernels trap exactly where the wgmma kernels are live (the probe tells the launchers which)"
#endif
__global__ void __launch_bounds__(GEOMOE_SM90A_CUBIN ? kProbeSm90a : kProbeOther) cubin_probe() {}

// The kernels for a device whose probe reports `probe` threads (0: the query failed, and no code of
// this file runs there): the wgmma ones exactly where that is the sm_90a cubin.
inline bool wgmma_for(int probe) { return probe == kProbeSm90a; }

// The probe on the current device. The emulated device carries out the sm_90a code where it is 9.0
// (GEOMOE_EMULATE_SM=90) and the other code elsewhere: the emulated build compiles both live.
inline int probe_current_device() {
#if defined(GEOMOE_EMULATION)
  (void)&cubin_probe;
  int major = 0;
  return cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0) == cudaSuccess && major == 9 ? kProbeSm90a
                                                                                                           : kProbeOther;
#else
  cudaFuncAttributes attr{};
  return cudaFuncGetAttributes(&attr, cubin_probe) == cudaSuccess ? attr.maxThreadsPerBlock : 0;
#endif
}

// Whether the launches go to the sm_90a (wgmma) kernels on the current device. Queried once per
// device (uncached past 64 devices); no host sync.
inline bool use_wgmma() {
  static std::atomic<int> known[64];  // 0: not asked yet, else the probe's answer
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return wgmma_for(probe_current_device());
  int v = known[dev].load(std::memory_order_relaxed);
  if (v == 0) {
    v = probe_current_device();
    known[dev].store(v == 0 ? -1 : v, std::memory_order_relaxed);
  }
  return wgmma_for(v);
}

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// The driver's cuTensorMapEncodeTiled through the runtime (the core links no libcuda), or null.
inline EncodeTiled tensor_map_encoder() {
  static const EncodeTiled fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      return static_cast<EncodeTiled>(nullptr);
    return reinterpret_cast<EncodeTiled>(p);
  }();
  return fn;
}

// W stored [E][rows][cols] (cols contiguous, rows ldw apart, experts stride_we apart) as a 3-D tensor
// map of 64 x 64 boxes with the 128-byte swizzle; false where TMA cannot address it (a base or stride
// not on 16 bytes, overlapping rows or experts, a dimension whose box coordinates would not fit the
// instruction's signed 32-bit ones), and the kernel copies W by cp.async instead.
constexpr int64_t kMaxBoxCoord = 0x7fffffff - 128;  // a box's int coordinates + 64 (x 2 halves) stay below 2^31

template <typename T>
bool weight_map(CUtensorMap* map, const T* w, int64_t rows, int64_t cols, int64_t ldw, int64_t stride_we, int64_t experts) {
  if (!aligned16(w) || ldw % 8 || stride_we % 8 || ldw < cols || (experts > 1 && stride_we < rows * ldw) ||
      rows > kMaxBoxCoord || cols > kMaxBoxCoord || experts > kMaxBoxCoord ||
      stride_we * int64_t(sizeof(T)) >= (int64_t(1) << 40))
    return false;
  const EncodeTiled encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const cuuint64_t dims[3] = {cuuint64_t(cols), cuuint64_t(rows), cuuint64_t(experts)};
  const cuuint64_t strides[2] = {cuuint64_t(ldw) * sizeof(T), cuuint64_t(experts > 1 ? stride_we : rows * ldw) * sizeof(T)};
  const cuuint32_t box[3] = {64, 64, 1}, element_strides[3] = {1, 1, 1};
  const CUtensorMapDataType type =
      std::is_same<T, __half>::value ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  return encode(map, type, 3, const_cast<T*>(w), dims, strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) ==
         CUDA_SUCCESS;
}

// The rows of a contiguous operand ([rows, cols], rows ld apart: the weight gradient's G, or A taken
// as stored) as a 3-D tensor map [1, rows, cols] of 64 x 64 boxes (weight_map's rules); false where
// TMA cannot address it or a coordinate would not fit the instruction's 32-bit ones.
template <typename T> bool rows_map(CUtensorMap* map, const T* p, int64_t rows, int64_t cols, int64_t ld) {
  if (rows <= 0 || cols <= 0) return false;
  return weight_map(map, p, rows, cols, ld, rows * ld, 1);
}

}  // namespace

int grouped_mm_block_rows() { return BM; }

const char* grouped_mm_kernels() { return use_wgmma() ? "wgmma" : "mma.sync"; }

const char* grouped_mm_kernels_for(int probe_threads) { return wgmma_for(probe_threads) ? "wgmma" : "mma.sync"; }

cudaError_t grouped_mm(DType dtype, const void* a, int64_t lda, const int64_t* gather, int top_k, const void* w,
                       int64_t K, int64_t N, int64_t ldw, int64_t stride_we, bool trans_w, const void* bias,
                       int64_t blocks, const int64_t* offsets, int num_experts, int act, void* out, int64_t ldo, void* pre, int64_t ldp, int grad_act,
                       int64_t rounds, bool interleaved, cudaStream_t stream, RoutedDgrad route, int64_t a_rows) {
  if (blocks == 0 || N == 0) return cudaSuccess;
  if (route.partial && (!trans_w || !gather || grad_act == kNone || !route.weights)) return cudaErrorInvalidValue;
  if ((act == kSwiglu && (N % 2 || trans_w)) || (grad_act == kSwiglu && !trans_w)) return cudaErrorInvalidValue;
  if (rounds < 0 || (rounds > 0 && (gather == nullptr || trans_w))) return cudaErrorInvalidValue;  // gathered forward only
  return by_half_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (use_wgmma()) {  // sm_90a: wgmma, W by TMA where it can address it
      auto launch90 = [&](auto kernel) {
        CUtensorMap map, a_map;
        const int64_t w_rows = trans_w ? N : K, w_cols = trans_w ? K : N;
        const bool tma = weight_map(&map, static_cast<const T*>(w), w_rows, w_cols, ldw, stride_we, num_experts);
        const bool a_tma = gather == nullptr && a_rows > 0 && rows_map(&a_map, static_cast<const T*>(a), a_rows, K, lda);
        if (!tma) std::memset(static_cast<void*>(&map), 0, sizeof map);
        if (!a_tma) std::memset(static_cast<void*>(&a_map), 0, sizeof a_map);
        const int64_t n_tiles = act == kSwiglu ? (N / 2 + wg::BN / 2 - 1) / (wg::BN / 2) : (N + wg::BN - 1) / wg::BN;
        if (n_tiles > 0x7fffffff) return cudaErrorInvalidValue;
        cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(wg::smem_bytes));
        if (err != cudaSuccess) return err;
        GEOMOE_LAUNCH(grid_1d(blocks * n_tiles), wg::kThreads, wg::smem_bytes, stream, kernel)(
            static_cast<const T*>(a), lda, gather, top_k, static_cast<const T*>(w), map, a_map, int(tma) | int(a_tma) << 1,
            K, N, ldw, stride_we,
            static_cast<const T*>(bias), offsets, num_experts, static_cast<T*>(out), ldo, static_cast<T*>(pre), ldp,
            static_cast<int>(n_tiles), rounds, interleaved, route);
        return cudaGetLastError();
      };
      if (trans_w) {
        switch (grad_act) {
          case kNone: return launch90(wg::gmm_kernel<T, kNone, true, kNone>);
          case kGelu: return launch90(wg::gmm_kernel<T, kNone, true, kGelu>);
          case kSilu: return launch90(wg::gmm_kernel<T, kNone, true, kSilu>);
          case kSwiglu: return launch90(wg::gmm_kernel<T, kNone, true, kSwiglu>);
          default: return cudaErrorInvalidValue;
        }
      }
      switch (act) {
        case kNone: return launch90(wg::gmm_kernel<T, kNone, false, kNone>);
        case kGelu: return launch90(wg::gmm_kernel<T, kGelu, false, kNone>);
        case kSilu: return launch90(wg::gmm_kernel<T, kSilu, false, kNone>);
        case kSwiglu: return launch90(wg::gmm_kernel<T, kSwiglu, false, kNone>);
        default: return cudaErrorInvalidValue;
      }
    }
    auto launch = [&](auto bn, auto kernel) {
      constexpr int BN = decltype(bn)::value;
      constexpr std::size_t smem = GemmTile<T, BN, false>::smem_bytes > GemmTile<T, BN, true>::smem_bytes
                                       ? GemmTile<T, BN, false>::smem_bytes
                                       : GemmTile<T, BN, true>::smem_bytes;
      const int64_t n_tiles = act == kSwiglu ? (N / 2 + BN / 2 - 1) / (BN / 2) : (N + BN - 1) / BN;  // SwiGLU: BN / 2 out
      if (n_tiles > 0x7fffffff) return cudaErrorInvalidValue;
      cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
      if (err != cudaSuccess) return err;
      GEOMOE_LAUNCH(grid_1d(blocks * n_tiles), kThreads, smem, stream, kernel)(
          static_cast<const T*>(a), lda, gather, top_k, static_cast<const T*>(w), K, N, ldw, stride_we,
          static_cast<const T*>(bias), offsets, num_experts, static_cast<T*>(out), ldo, static_cast<T*>(pre),
          ldp, static_cast<int>(n_tiles), rounds, interleaved, route);
      return cudaGetLastError();
    };
    auto by_width = [&](auto pick) {  // SwiGLU: 128 x 64 (with 128 x 128 ptxas spilled on sm_80)
      return narrow_tiles(N) || act == kSwiglu ? pick(std::integral_constant<int, 64>{})
                                               : pick(std::integral_constant<int, 128>{});
    };
    if (trans_w) {  // dgrad: no activation, rows not gathered; maybe act'(pre) in the epilogue
      return by_width([&](auto bn) {
        constexpr int BN = decltype(bn)::value;
        switch (grad_act) {
          case kNone: return launch(bn, gmm_kernel<T, BN, kNone, true, kNone>);
          case kGelu: return launch(bn, gmm_kernel<T, BN, kNone, true, kGelu>);
          case kSilu: return launch(bn, gmm_kernel<T, BN, kNone, true, kSilu>);
          case kSwiglu: return launch(bn, gmm_kernel<T, BN, kNone, true, kSwiglu>);
          default: return cudaErrorInvalidValue;
        }
      });
    }
    if (grad_act != kNone) return cudaErrorInvalidValue;  // act' applies to a dgrad only
    return by_width([&](auto bn) {
      constexpr int BN = decltype(bn)::value;
      switch (act) {
        case kNone: return launch(bn, gmm_kernel<T, BN, kNone, false>);
        case kGelu: return launch(bn, gmm_kernel<T, BN, kGelu, false>);
        case kSilu: return launch(bn, gmm_kernel<T, BN, kSilu, false>);
        case kSwiglu: return BN == 64 ? launch(bn, gmm_kernel<T, 64, kSwiglu, false>) : cudaErrorInvalidValue;
        default: return cudaErrorInvalidValue;
      }
    });
  });
}

cudaError_t grouped_mm_wgrad(DType dtype, const void* a, int64_t lda, int64_t a_rows, const int64_t* gather, int top_k,
                             const void* g, int64_t ldg, int64_t g_rows, const int64_t* offsets, int64_t num_experts,
                             int64_t K, int64_t N, int splits, int a_act, float* partial, float* partial_db,
                             bool interleaved, cudaStream_t stream) {
  if (num_experts == 0 || K == 0 || N == 0) return cudaSuccess;
  const int64_t n_tiles = (N + TN - 1) / TN, tiles = (K + TK - 1) / TK * n_tiles;
  if (tiles > 0x7fffffff || num_experts > 0x7fffffff) return cudaErrorInvalidValue;
  return by_half_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr std::size_t smem = WgradTile::smem_bytes<T>();
    if (use_wgmma()) {  // sm_90a: wgmma; G, and A taken as stored, by TMA where it can address them
      auto launch90 = [&](auto kernel) {
        CUtensorMap g_map, a_map;
        const bool g_tma = rows_map(&g_map, static_cast<const T*>(g), g_rows, N, ldg);
        const bool a_tma = a_act == kNone && gather == nullptr && rows_map(&a_map, static_cast<const T*>(a), a_rows, K, lda);
        if (!g_tma) std::memset(static_cast<void*>(&g_map), 0, sizeof g_map);
        if (!a_tma) std::memset(static_cast<void*>(&a_map), 0, sizeof a_map);
        cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(wg::smem_bytes));
        if (err != cudaSuccess) return err;
        GEOMOE_LAUNCH(grid_1d(splits * num_experts * tiles), wg::kThreads, wg::smem_bytes, stream, kernel)(
            static_cast<const T*>(a), lda, gather, top_k, static_cast<const T*>(g), ldg, g_map, a_map,
            int(g_tma) | int(a_tma) << 1, offsets, static_cast<int>(num_experts), K, N, splits, static_cast<int>(n_tiles),
            static_cast<int>(tiles), partial, partial_db, interleaved);
        return cudaGetLastError();
      };
      switch (a_act) {
        case kNone: return launch90(wg::wgrad_kernel<T, kNone>);
        case kGelu: return launch90(wg::wgrad_kernel<T, kGelu>);
        case kSilu: return launch90(wg::wgrad_kernel<T, kSilu>);
        case kSwiglu: return launch90(wg::wgrad_kernel<T, kSwiglu>);
        default: return cudaErrorInvalidValue;
      }
    }
    auto launch = [&](auto kernel) {
      cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
      if (err != cudaSuccess) return err;
      GEOMOE_LAUNCH(grid_1d(splits * num_experts * tiles), kThreads, smem, stream, kernel)(
          static_cast<const T*>(a), lda, gather, top_k, static_cast<const T*>(g), ldg, offsets,
          static_cast<int>(num_experts), K, N, splits, static_cast<int>(n_tiles), static_cast<int>(tiles), partial,
          partial_db, interleaved);
      return cudaGetLastError();
    };
    switch (a_act) {
      case kNone: return launch(wgrad_kernel<T, kNone>);
      case kGelu: return launch(wgrad_kernel<T, kGelu>);
      case kSilu: return launch(wgrad_kernel<T, kSilu>);
      case kSwiglu: return launch(wgrad_kernel<T, kSwiglu>);
      default: return cudaErrorInvalidValue;
    }
  });
}

}  // namespace geomoe
