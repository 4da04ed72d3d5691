// Kernels for tests/test_cuda_emulated.py only, built there with the emulated build's recipe
// (csrc/emulation/build.py): two correct ones, and one per rule a GPU enforces, each breaking it.
// run_case(name, a, b, out) launches the named case and returns cudaGetErrorString of the launch's
// error ("no error" when it ran).
#include <mma.h>

#include <cstring>

#include "geomoe_core.h"
#include "sm90_ptx.cuh"  // the emulated sm_90a instructions (csrc/emulation/sm90_ptx.cuh)

namespace broken {

using namespace nvcuda;

// Correct: a warp sum by shuffles, then a block sum through shared memory behind a barrier.
__global__ void block_sum(const float* in, float* out) {
  __shared__ float partial[32];
  float v = in[threadIdx.x];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.f;
    for (unsigned w = 0; w < blockDim.x / 32; ++w) s += partial[w];
    out[0] = s;
  }
}

// block_sum per block of 96 inputs without the barrier: thread 0 may read the other warps' partial
// sums before they are written (on a GPU as here, where one of the two thread orders does).
__global__ void block_sums_without_barrier(const float* in, float* out) {
  __shared__ float partial[32];
  float v = in[blockIdx.x * blockDim.x + threadIdx.x];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  if (threadIdx.x == 0) {
    float s = 0.f;
    for (unsigned w = 0; w < blockDim.x / 32; ++w) s += partial[w];
    out[blockIdx.x] = s;
  }
}

// Correct: D = A B + C for 16 x 16 tiles, A read column-major, B row-major, C and D column-major.
__global__ void wmma_layouts(const __half* a, const __half* b, float* cd) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::col_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::load_matrix_sync(acc, cd, 16, wmma::mem_col_major);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(cd, acc, 16, wmma::mem_col_major);
}

__global__ void touch(float* out) { out[0] = 1.f; }

__global__ void uses_dynamic_shared(float* out) {
  extern __shared__ float dyn[];
  dyn[threadIdx.x] = 1.f;
  out[0] = dyn[0];
}

__global__ void opts_in_to_more_shared(float* out) {  // the same, with its own attribute
  extern __shared__ float dyn[];
  dyn[threadIdx.x] = 1.f;
  out[0] = dyn[0];
}

__global__ void barrier_in_branch(float* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1.f;
}

__global__ void barriers_at_two_places(float* out) {
  if (threadIdx.x < 16) {
    out[threadIdx.x] = 1.f;
    __syncthreads();
  } else {
    out[threadIdx.x] = 2.f;
    __syncthreads();
  }
}

__global__ void full_mask_shuffle(float* out) {  // launched with 48 threads: warp 1 has lanes 0-15 only
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, float(threadIdx.x), 1);
}

__global__ void shuffle_after_exit(float* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, float(threadIdx.x), 1);
}

// Correct: the routing scatter's ranking (csrc/permute.cu) on the 20 values in[0..19]: each lane's
// rank among the lanes below it holding the same value; lanes 20-31 have no value, take part in the
// match with -1 (full mask) and write -1.
__global__ void match_rank(const float* in, float* out) {
  const unsigned lane = threadIdx.x;
  const int64_t v = lane < 20 ? static_cast<int64_t>(in[lane]) : -1;
  const unsigned peers = __match_any_sync(0xffffffffu, v);
  out[lane] = lane < 20 ? static_cast<float>(__popc(peers & ((1u << lane) - 1u))) : -1.f;
}

__global__ void match_after_exit(const float* in, float* out) {  // the tail lanes leave before the match
  const unsigned lane = threadIdx.x;
  if (lane >= 20) return;
  const unsigned peers = __match_any_sync(0xffffffffu, static_cast<int64_t>(in[lane]));
  out[lane] = static_cast<float>(__popc(peers & ((1u << lane) - 1u)));
}

__global__ void shuffle_from_outside_mask(float* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(0x0000ffffu, float(threadIdx.x), 20);
}

__global__ void shuffle_against_barrier(float* out) {
  if (threadIdx.x < 16)
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, float(threadIdx.x), 1);
  else
    __syncthreads();
}

__global__ void wmma_misaligned(const __half* a) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::load_matrix_sync(fa, a + 8, 16);  // 16 bytes past a 32-byte boundary
}

__global__ void wmma_lanes_disagree(const __half* a) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::load_matrix_sync(fa, a + (threadIdx.x / 16) * 256, 16);  // half the warp loads the next tile
}

__global__ void wmma_half_warp(const __half* a) {  // launched with 16 threads
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::load_matrix_sync(fa, a, 16);
}

// For AddressSanitizer: each reads one element past the end of its array.
__global__ void read_past_end(const float* in, float* out) { out[threadIdx.x] = in[threadIdx.x + 1]; }

__global__ void static_shared_past_end(float* out) {
  __shared__ float tile[64];
  tile[threadIdx.x] = 1.f;
  __syncthreads();
  out[threadIdx.x] = tile[threadIdx.x + 1];
}

__global__ void dynamic_shared_past_end(float* out) {
  extern __shared__ float dyn[];
  dyn[threadIdx.x] = 1.f;
  __syncthreads();
  out[threadIdx.x] = dyn[threadIdx.x + 1];
}

// ---- sm_90a: wgmma, TMA, mbarriers (launched on an emulated window whose dynamic shared memory
// starts at 1,152, GEOMOE_EMULATE_SMEM_BASE's default: not 1,024-byte aligned) ----

// The element offset of (row, col) in a 128-byte swizzled 64 x 64 tile of halves (the kernels' swz).
__device__ inline int swz(int row, int col) { return row * 64 + (((col >> 3) ^ (row & 7)) << 3) + (col & 7); }

__device__ inline unsigned char* aligned_1024(unsigned char* smem) {
  const uint32_t a = geomoe::sm90::smem_addr(smem);
  return smem + ((1024 - (a & 1023)) & 1023);
}

enum WgmmaCase { kCorrect, kNotAligned, kOverwrite };

// One warpgroup: D (64 x 64) = A (64 x 16, K-major) B (16 x 64, MN-major), from swizzled tiles.
// kCorrect: the tiles 1,024-byte aligned in the shared window. kNotAligned: at the start of the
// dynamic shared memory (aligned in the host buffer, not in the window). kOverwrite: an element of
// B is changed after every thread has issued the wgmma and before they wait for it.
template <int CASE> __global__ void wgmma_tile(const __half* a, const __half* b, float* out) {
  extern __shared__ __align__(128) unsigned char smem[];
  __half* const as = reinterpret_cast<__half*>(CASE == kNotAligned ? smem : aligned_1024(smem));
  __half* const bs = as + 64 * 64;
  const int t = threadIdx.x;
  for (int i = t; i < 64 * 16; i += 128) as[swz(i / 16, i % 16)] = a[i];  // A[m][k]: row m
  for (int i = t; i < 16 * 64; i += 128) bs[swz(i / 64, i % 64)] = b[i];  // B[k][n]: row k
  geomoe::sm90::fence_proxy_async();
  __syncthreads();
  float d[32];
  for (int r = 0; r < 32; ++r) d[r] = 0.f;
  geomoe::sm90::wgmma_fence();
  geomoe::sm90::wgmma_m64n64k16<__half, 0, 1>(d, geomoe::sm90::make_desc(geomoe::sm90::smem_addr(as)),
                                              geomoe::sm90::make_desc(geomoe::sm90::smem_addr(bs)), 1);
  geomoe::sm90::wgmma_commit();
  if (CASE == kOverwrite) {
    __syncthreads();  // every thread has issued
    if (t == 0) bs[swz(3, 7)] = __hneg(bs[swz(3, 7)]);
  }
  geomoe::sm90::wgmma_wait<0>();
  for (int r = 0; r < 32; ++r)
    out[(16 * (t / 32) + t % 32 / 4 + 8 * ((r / 2) % 2)) * 64 + 8 * (r / 4) + 2 * (t % 4) + r % 2] = d[r];
}

enum WgmmaN128Case { kMnMajorApart, kKMajor, kMnMajorLboUnset };

// One warpgroup: D (64 x 128) = A (64 x 16, K-major) B (16 x 128) by one m64n128k16. kKMajor: B's 128
// rows n (16 k each) are two 64-row tiles back to back, 16 8-row groups SBO apart. kMnMajorApart: B's
// rows k, its two 64-column swizzle atoms 16 KB apart and the descriptor's LBO saying so.
// kMnMajorLboUnset: the same tiles, LBO left at the K-major convention (16 bytes): columns 64..127
// are read from the wrong place.
template <int CASE> __global__ void wgmma_n128(const __half* a, const __half* b, float* out) {
  extern __shared__ __align__(128) unsigned char smem[];
  __half* const as = reinterpret_cast<__half*>(aligned_1024(smem));
  __half* const bs = as + 64 * 64;
  constexpr int kApart = 2 * 64 * 64;  // elements from B's first 64-column atom to its second
  const int t = threadIdx.x;
  for (int i = t; i < 4 * 64 * 64; i += 128) as[i] = __float2half(0.f);  // A, B and the gap: no stale bits
  __syncthreads();
  for (int i = t; i < 64 * 16; i += 128) as[swz(i / 16, i % 16)] = a[i];
  for (int i = t; i < 16 * 128; i += 128) {  // B[k][n]
    const int k = i / 128, n = i % 128;
    if (CASE == kKMajor)
      bs[swz(n, k)] = b[i];
    else
      bs[n / 64 * kApart + swz(k, n % 64)] = b[i];
  }
  geomoe::sm90::fence_proxy_async();
  __syncthreads();
  float d[64];
  for (int r = 0; r < 64; ++r) d[r] = 0.f;
  const uint32_t sb = geomoe::sm90::smem_addr(bs);
  const uint64_t db = CASE == kKMajor ? geomoe::sm90::make_desc(sb)
                                      : geomoe::sm90::make_desc(sb, CASE == kMnMajorApart ? kApart * 2 : 16);
  geomoe::sm90::wgmma_fence();
  geomoe::sm90::wgmma_m64n128k16<__half, 0, CASE == kKMajor ? 0 : 1>(
      d, geomoe::sm90::make_desc(geomoe::sm90::smem_addr(as)), db, 1);
  geomoe::sm90::wgmma_commit();
  geomoe::sm90::wgmma_wait<0>();
  for (int r = 0; r < 64; ++r)
    out[(16 * (t / 32) + t % 32 / 4 + 8 * ((r / 2) % 2)) * 128 + 8 * (r / 4) + 2 * (t % 4) + r % 2] = d[r];
}

// One thread: a 3-stage ring of TMA boxes (64 x 64 halves) on three mbarriers, 6 steps, so each
// barrier completes two phases; step kt waits with parity (kt / 3) & 1 (WRONG_PARITY: 0) and
// writes the first element of its box, row 64 kt of x, to out[kt]; the stage is refilled after.
template <bool WRONG_PARITY> __global__ void tma_ring(const __grid_constant__ CUtensorMap map, float* out) {
  extern __shared__ __align__(128) unsigned char smem[];
  __half* const tiles = reinterpret_cast<__half*>(aligned_1024(smem));
  __shared__ __align__(8) uint64_t full[3];
  for (int s = 0; s < 3; ++s) geomoe::sm90::mbar_init(&full[s], 1);
  auto load = [&](int step) {
    geomoe::sm90::mbar_arrive_expect_tx(&full[step % 3], 64 * 64 * 2);
    geomoe::sm90::tma_load_3d(tiles + step % 3 * 64 * 64, &map, &full[step % 3], 0, 64 * step, 0);
  };
  for (int kt = 0; kt < 3; ++kt) load(kt);
  for (int kt = 0; kt < 6; ++kt) {
    geomoe::sm90::mbar_wait(&full[kt % 3], WRONG_PARITY ? 0u : unsigned(kt / 3) & 1u);
    out[kt] = __half2float(tiles[kt % 3 * 64 * 64]);
    if (kt + 3 < 6) load(kt + 3);
  }
}

// x: 384 rows of 64 halves, as a 3-D tensor map of 64 x 64 boxes with the 128-byte swizzle.
inline CUtensorMap ring_map(const void* x) {
  alignas(64) CUtensorMap map;
  const cuuint64_t dims[3] = {64, 384, 1}, strides[2] = {64 * 2, 384 * 64 * 2};
  const cuuint32_t box[3] = {64, 64, 1}, ones[3] = {1, 1, 1};
  void* fn = nullptr;
  cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, nullptr);
  using Encode = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                              const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                              CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  reinterpret_cast<Encode>(fn)(&map, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 3, const_cast<void*>(x), dims, strides, box, ones,
                               CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                               CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return map;
}

cudaError_t run(const char* name, const void* a, const void* b, float* out) {
  auto is = [&](const char* n) { return std::strcmp(name, n) == 0; };
  const auto* fa = static_cast<const float*>(a);
  const auto* ha = static_cast<const __half*>(a);
  cudaStream_t s = nullptr;
  if (is("block_sum"))
    GEOMOE_LAUNCH(1, 96, 0, s, block_sum)(fa, out);
  else if (is("block_sums_without_barrier"))
    GEOMOE_LAUNCH(2, 96, 0, s, block_sums_without_barrier)(fa, out);
  else if (is("wmma_layouts"))
    GEOMOE_LAUNCH(1, 32, 0, s, wmma_layouts)(ha, static_cast<const __half*>(b), out);
  else if (is("grid_y_too_large"))
    GEOMOE_LAUNCH(dim3(1, 65536), 32, 0, s, touch)(out);
  else if (is("grid_z_too_large"))
    GEOMOE_LAUNCH(dim3(1, 1, 65536), 32, 0, s, touch)(out);
  else if (is("too_many_threads"))
    GEOMOE_LAUNCH(1, dim3(32, 33), 0, s, touch)(out);
  else if (is("too_much_shared"))
    GEOMOE_LAUNCH(1, 32, 48 * 1024 + 4, s, uses_dynamic_shared)(out);
  else if (is("shared_opted_in")) {
    const cudaError_t e =
        cudaFuncSetAttribute(opts_in_to_more_shared, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
    if (e != cudaSuccess) return e;
    GEOMOE_LAUNCH(1, 32, 64 * 1024, s, opts_in_to_more_shared)(out);
  } else if (is("barrier_in_branch"))
    GEOMOE_LAUNCH(1, 64, 0, s, barrier_in_branch)(out);
  else if (is("barriers_at_two_places"))
    GEOMOE_LAUNCH(1, 64, 0, s, barriers_at_two_places)(out);
  else if (is("full_mask_shuffle"))
    GEOMOE_LAUNCH(1, 48, 0, s, full_mask_shuffle)(out);
  else if (is("shuffle_after_exit"))
    GEOMOE_LAUNCH(1, 32, 0, s, shuffle_after_exit)(out);
  else if (is("match_rank"))
    GEOMOE_LAUNCH(1, 32, 0, s, match_rank)(fa, out);
  else if (is("match_after_exit"))
    GEOMOE_LAUNCH(1, 32, 0, s, match_after_exit)(fa, out);
  else if (is("shuffle_from_outside_mask"))
    GEOMOE_LAUNCH(1, 32, 0, s, shuffle_from_outside_mask)(out);
  else if (is("shuffle_against_barrier"))
    GEOMOE_LAUNCH(1, 32, 0, s, shuffle_against_barrier)(out);
  else if (is("wmma_misaligned"))
    GEOMOE_LAUNCH(1, 32, 0, s, wmma_misaligned)(ha);
  else if (is("wmma_lanes_disagree"))
    GEOMOE_LAUNCH(1, 32, 0, s, wmma_lanes_disagree)(ha);
  else if (is("wmma_half_warp"))
    GEOMOE_LAUNCH(1, 16, 0, s, wmma_half_warp)(ha);
  else if (is("read_past_end"))
    GEOMOE_LAUNCH(1, 64, 0, s, read_past_end)(fa, out);
  else if (is("static_shared_past_end"))
    GEOMOE_LAUNCH(1, 64, 0, s, static_shared_past_end)(out);
  else if (is("wgmma_tile"))
    GEOMOE_LAUNCH(1, 128, 3 * 8192, s, wgmma_tile<kCorrect>)(ha, static_cast<const __half*>(b), out);
  else if (is("wgmma_tile_not_1024_aligned"))
    GEOMOE_LAUNCH(1, 128, 3 * 8192, s, wgmma_tile<kNotAligned>)(ha, static_cast<const __half*>(b), out);
  else if (is("wgmma_operand_overwritten"))
    GEOMOE_LAUNCH(1, 128, 3 * 8192, s, wgmma_tile<kOverwrite>)(ha, static_cast<const __half*>(b), out);
  else if (is("wgmma_n128_k_major"))
    GEOMOE_LAUNCH(1, 128, 5 * 8192, s, wgmma_n128<kKMajor>)(ha, static_cast<const __half*>(b), out);
  else if (is("wgmma_n128_mn_major"))
    GEOMOE_LAUNCH(1, 128, 5 * 8192, s, wgmma_n128<kMnMajorApart>)(ha, static_cast<const __half*>(b), out);
  else if (is("wgmma_n128_lbo_unset"))
    GEOMOE_LAUNCH(1, 128, 5 * 8192, s, wgmma_n128<kMnMajorLboUnset>)(ha, static_cast<const __half*>(b), out);
  else if (is("tma_ring") || is("tma_ring_wrong_parity")) {
    const CUtensorMap map = ring_map(a);
    if (is("tma_ring"))
      GEOMOE_LAUNCH(1, 1, 4 * 8192, s, tma_ring<false>)(map, out);
    else
      GEOMOE_LAUNCH(1, 1, 4 * 8192, s, tma_ring<true>)(map, out);
  } else if (is("dynamic_shared_past_end"))
    GEOMOE_LAUNCH(1, 64, 64 * sizeof(float), s, dynamic_shared_past_end)(out);
  else
    return cudaErrorInvalidValue;
  return cudaGetLastError();
}

}  // namespace broken

extern "C" __attribute__((visibility("default"))) const char* run_case(const char* name, const void* a, const void* b,
                                                                       float* out) {
  return cudaGetErrorString(broken::run(name, a, b, out));
}
