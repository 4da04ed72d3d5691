// Row gather into expert-major order, the deterministic weighted combine, and routing.

#include <cstdint>
#include <cstring>

#include "dtype.cuh"

namespace geomoe {
namespace {


constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / 32;  // permute, unpermute and its weight gradient: one warp per row

// kVec: every row starts 16-byte aligned and d is whole 16-byte chunks (the host checks), so a lane
// moves kWidth elements at once; otherwise lanes stride over single elements.
template <typename T> constexpr int kWidth = 16 / static_cast<int>(sizeof(T));

template <typename T> __device__ inline void load_chunk(const T* p, float (&v)[kWidth<T>]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  T h[kWidth<T>];
  std::memcpy(static_cast<void*>(h), &u, sizeof u);
#pragma unroll
  for (int j = 0; j < kWidth<T>; ++j) v[j] = to_f32(h[j]);
}

template <typename T> __device__ inline void store_chunk(T* p, const float (&v)[kWidth<T>]) {
  T h[kWidth<T>];
#pragma unroll
  for (int j = 0; j < kWidth<T>; ++j) h[j] = from_f32<T>(v[j]);
  uint4 u;
  std::memcpy(&u, static_cast<const void*>(h), sizeof u);
  *reinterpret_cast<uint4*>(p) = u;
}

// Host side: the base and every row start (ld elements apart) on 16 bytes.
template <typename T> bool rows_aligned16(const void* p, int64_t ld) {
  return reinterpret_cast<std::uintptr_t>(p) % 16 == 0 && (ld * static_cast<int64_t>(sizeof(T))) % 16 == 0;
}

template <typename T, bool kVec>
__global__ void permute_kernel(const T* __restrict__ x, int64_t ldx, const int64_t* __restrict__ row_to_flat,
                               const float* __restrict__ weights, int64_t rows, int64_t d, int top_k,
                               T* __restrict__ out, int64_t ldo) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (r >= rows) return;
  const int lane = threadIdx.x & 31;
  const int64_t f = row_to_flat[r];
  const T* src = x + (f / top_k) * ldx;
  T* dst = out + r * ldo;
  if constexpr (kVec) {
    constexpr int W = kWidth<T>;
    if (!weights) {
      for (int64_t c = lane * W; c < d; c += 32 * W)
        *reinterpret_cast<uint4*>(dst + c) = *reinterpret_cast<const uint4*>(src + c);
      return;
    }
    const float w = weights[f];
    for (int64_t c = lane * W; c < d; c += 32 * W) {
      float v[W];
      load_chunk(src + c, v);
#pragma unroll
      for (int j = 0; j < W; ++j) v[j] *= w;
      store_chunk(dst + c, v);
    }
  } else {
    const float w = weights ? weights[f] : 1.f;
    for (int64_t c = lane; c < d; c += 32) dst[c] = weights ? from_f32<T>(to_f32(src[c]) * w) : src[c];
  }
}

// Each element sums its token's slots in slot order in float32: the same sum every run, no atomics.
template <typename T, bool kVec>
__global__ void unpermute_kernel(const T* __restrict__ rows, int64_t ldr, const int64_t* __restrict__ flat_to_row,
                                 const float* __restrict__ weights, const T* __restrict__ shared, int64_t lds,
                                 int64_t tokens, int64_t d, int top_k, T* __restrict__ out, int64_t ldo) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (t >= tokens) return;
  const int lane = threadIdx.x & 31;
  if constexpr (kVec) {
    constexpr int W = kWidth<T>;
    for (int64_t c = lane * W; c < d; c += 32 * W) {
      float acc[W], v[W];
#pragma unroll
      for (int i = 0; i < W; ++i) acc[i] = 0.f;
      for (int j = 0; j < top_k; ++j) {
        const int64_t row = flat_to_row[t * top_k + j];
        load_chunk(rows + row * ldr + c, v);
        const float w = weights ? weights[t * top_k + j] : 1.f;
#pragma unroll
        for (int i = 0; i < W; ++i) acc[i] += weights ? w * v[i] : v[i];
      }
      if (shared) {
        load_chunk(shared + t * lds + c, v);
#pragma unroll
        for (int i = 0; i < W; ++i) acc[i] += v[i];
      }
      store_chunk(out + t * ldo + c, acc);
    }
  } else {
    for (int64_t c = lane; c < d; c += 32) {
      float acc = 0.f;
      for (int j = 0; j < top_k; ++j) {
        const int64_t row = flat_to_row[t * top_k + j];
        const float v = to_f32(rows[row * ldr + c]);
        acc += weights ? weights[t * top_k + j] * v : v;
      }
      if (shared) acc += to_f32(shared[t * lds + c]);
      out[t * ldo + c] = from_f32<T>(acc);
    }
  }
}

// d(out)/d(weight) per slot: a dot product of the token's output gradient with the slot's row, the
// lanes' partial sums reduced with a fixed shuffle tree (deterministic).
template <typename T, bool kVec>
__global__ void weight_grad_kernel(const T* __restrict__ grad, int64_t ldg, const T* __restrict__ rows, int64_t ldr,
                                   const int64_t* __restrict__ flat_to_row, int64_t tokens, int64_t d, int top_k,
                                   float* __restrict__ out) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (t >= tokens) return;
  const int lane = threadIdx.x & 31;
  const T* g = grad + t * ldg;
  for (int j = 0; j < top_k; ++j) {
    const T* r = rows + flat_to_row[t * top_k + j] * ldr;
    float acc = 0.f;
    if constexpr (kVec) {
      constexpr int W = kWidth<T>;
      for (int64_t c = lane * W; c < d; c += 32 * W) {
        float a[W], b[W];
        load_chunk(g + c, a);
        load_chunk(r + c, b);
#pragma unroll
        for (int i = 0; i < W; ++i) acc += a[i] * b[i];
      }
    } else {
      for (int64_t c = lane; c < d; c += 32) acc += to_f32(g[c]) * to_f32(r[c]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) out[t * top_k + j] = acc;
  }
}

__global__ void histogram_kernel(const int64_t* __restrict__ ids, int64_t n, int num_experts, int block,
                                 int64_t* __restrict__ per_block) {
  extern __shared__ unsigned int counts[];
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) counts[e] = 0;
  __syncthreads();
  const int64_t start = static_cast<int64_t>(blockIdx.x) * block;
  for (int64_t i = start + threadIdx.x; i < n && i < start + block; i += blockDim.x) atomicAdd(&counts[ids[i]], 1u);
  __syncthreads();
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) per_block[static_cast<int64_t>(blockIdx.x) * num_experts + e] = counts[e];
}

// One warp per block of 32 ids (the caller's block, ROUTE_BLOCK in cuda.py), lane l holding id
// start + l: the lanes with the same expert find each other with one __match_any_sync, and a lane's
// rank within its expert is the number of those peers on lower lanes (earlier ids), so the order
// within an expert stays the ids' order (stable, as the reference's). All 32 lanes take part in
// the match (full mask); lanes past the last id offer -1, which no expert id equals, and write
// nothing. kThreads / 32 blocks of ids per thread block: 196,608 ids make 768 thread blocks.
constexpr int kRouteBlock = 32;

__global__ void scatter_kernel(const int64_t* __restrict__ ids, int64_t n, int num_experts,
                               const int64_t* __restrict__ base, int64_t* __restrict__ row_to_flat,
                               int64_t* __restrict__ flat_to_row, int64_t blocks) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  if (b >= blocks) return;  // whole warps: b is the same on all lanes
  const unsigned lane = threadIdx.x & 31u;
  const int64_t i = b * kRouteBlock + lane;
  const int64_t e = i < n ? ids[i] : -1;
  const unsigned peers = __match_any_sync(0xffffffffu, e);
  if (i >= n) return;
  const int64_t row = base[b * num_experts + e] + __popc(peers & ((1u << lane) - 1u));
  row_to_flat[row] = i;
  flat_to_row[i] = row;
}

// The routing scatter over the gating blocks' histograms (gate_route_kernel): thread block b is one
// warp over gating block b's nb entries in chunks of 32, entry f of expert e at row offsets[e] +
// prefix[b, e] + (earlier entries of e in the block): each chunk's lanes with the same expert find
// each other with __match_any_sync (rank: peers on lower lanes), and the lowest of them adds the
// group's size to the expert's running start (shared memory, [EA] int64) for the next chunk.
__global__ void gate_scatter_kernel(const int64_t* __restrict__ ids, int64_t n, int num_experts, int nb,
                                    const int64_t* __restrict__ prefix, const int64_t* __restrict__ offsets,
                                    int64_t* __restrict__ row_to_flat, int64_t* __restrict__ flat_to_row) {
  extern __shared__ long long start[];
  const int64_t b = blockIdx.x;
  const unsigned lane = threadIdx.x;
  for (int e = lane; e < num_experts; e += 32) start[e] = prefix[b * num_experts + e] + offsets[e];
  __syncthreads();
  const unsigned below = (1u << lane) - 1u;
  for (int c = 0; c < nb; c += 32) {
    const int64_t i = b * nb + c + lane;
    const bool ok = c + static_cast<int>(lane) < nb && i < n;
    const int64_t e = ok ? ids[i] : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    if (ok) {
      const int64_t row = start[e] + __popc(peers & below);
      row_to_flat[row] = i;
      flat_to_row[i] = row;
    }
    __syncthreads();
    if (ok && (peers & below) == 0u) start[e] += __popc(peers);
    __syncthreads();
  }
}

// The layer plan's weight pack: up to kPackMax contiguous tensors of one dtype, each cast to the
// output's, one after another in one flat buffer; thread block b copies kPackBlock elements of the
// segment whose blocks hold b.
constexpr int kPackMax = 8;
constexpr int kPackBlock = 1024;
struct PackSegments {
  const void* src[kPackMax];
  int64_t offset[kPackMax];
  int64_t n[kPackMax];
  int64_t first_block[kPackMax];
  int count;
};

template <typename S, typename D>
__global__ void pack_kernel(PackSegments segs, D* __restrict__ out) {
  const int64_t b = blockIdx.x;
  int s = 0;
  while (s + 1 < segs.count && b >= segs.first_block[s + 1]) ++s;
  const S* src = static_cast<const S*>(segs.src[s]);
  const int64_t base = (b - segs.first_block[s]) * kPackBlock, n = segs.n[s];
  D* dst = out + segs.offset[s];
  for (int j = threadIdx.x; j < kPackBlock; j += blockDim.x) {
    const int64_t i = base + j;
    if (i < n) dst[i] = from_f32<D>(to_f32(src[i]));
  }
}

}  // namespace

cudaError_t pack(DType src_dtype, DType out_dtype, int count, const void* const* srcs, const int64_t* sizes, void* out,
                 cudaStream_t stream) {
  if (count < 1 || count > kPackMax) return cudaErrorInvalidValue;
  PackSegments segs{};
  int64_t at = 0, blocks = 0;
  for (int s = 0; s < count; ++s) {
    if (sizes[s] < 0) return cudaErrorInvalidValue;
    segs.src[s] = srcs[s];
    segs.offset[s] = at;
    segs.n[s] = sizes[s];
    segs.first_block[s] = blocks;
    at += sizes[s];
    blocks += (sizes[s] + kPackBlock - 1) / kPackBlock;
  }
  segs.count = count;
  if (blocks == 0) return cudaSuccess;
  return by_dtype(src_dtype, [&](auto stag) {
    return by_dtype(out_dtype, [&](auto dtag) {
      using S = decltype(stag);
      using D = decltype(dtag);
      GEOMOE_LAUNCH(blocks, 256, 0, stream, pack_kernel<S, D>)(segs, static_cast<D*>(out));
      return cudaGetLastError();
    });
  });
}

cudaError_t gate_scatter(const int64_t* ids, int64_t n, int num_experts, int entries_per_block, int64_t blocks,
                         const int64_t* prefix, const int64_t* offsets, int64_t* row_to_flat, int64_t* flat_to_row,
                         cudaStream_t stream) {
  if (num_experts < 1 || entries_per_block < 1 || blocks < 0 || blocks * entries_per_block < n) return cudaErrorInvalidValue;
  if (blocks == 0) return cudaSuccess;
  GEOMOE_LAUNCH(blocks, 32, num_experts * sizeof(long long), stream, gate_scatter_kernel)(
      ids, n, num_experts, entries_per_block, prefix, offsets, row_to_flat, flat_to_row);
  return cudaGetLastError();
}

cudaError_t permute(DType dtype, const void* x, int64_t ldx, const int64_t* row_to_flat, const float* weights,
                    int64_t rows, int64_t d, int top_k, void* out, int64_t ldo, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto* xt = static_cast<const T*>(x);
    auto* ot = static_cast<T*>(out);
    if (d % kWidth<T> == 0 && rows_aligned16<T>(x, ldx) && rows_aligned16<T>(out, ldo))
      GEOMOE_LAUNCH(blocks, kThreads, 0, stream, permute_kernel<T, true>)(xt, ldx, row_to_flat, weights, rows, d,
                                                                          top_k, ot, ldo);
    else
      GEOMOE_LAUNCH(blocks, kThreads, 0, stream, permute_kernel<T, false>)(xt, ldx, row_to_flat, weights, rows, d,
                                                                           top_k, ot, ldo);
    return cudaGetLastError();
  });
}

cudaError_t unpermute(DType dtype, const void* rows, int64_t ldr, const int64_t* flat_to_row, const float* weights,
                      const void* shared, int64_t lds, int64_t tokens, int64_t d, int top_k, void* out, int64_t ldo,
                      cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  const int64_t blocks = (tokens + kRowsPerBlock - 1) / kRowsPerBlock;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto* rt = static_cast<const T*>(rows);
    const auto* st = static_cast<const T*>(shared);
    auto* ot = static_cast<T*>(out);
    if (d % kWidth<T> == 0 && rows_aligned16<T>(rows, ldr) && rows_aligned16<T>(out, ldo) &&
        (!shared || rows_aligned16<T>(shared, lds)))
      GEOMOE_LAUNCH(blocks, kThreads, 0, stream, unpermute_kernel<T, true>)(rt, ldr, flat_to_row, weights, st, lds,
                                                                            tokens, d, top_k, ot, ldo);
    else
      GEOMOE_LAUNCH(blocks, kThreads, 0, stream, unpermute_kernel<T, false>)(rt, ldr, flat_to_row, weights, st, lds,
                                                                             tokens, d, top_k, ot, ldo);
    return cudaGetLastError();
  });
}

cudaError_t unpermute_weight_grad(DType dtype, const void* grad_out, int64_t ldg, const void* rows, int64_t ldr,
                                  const int64_t* flat_to_row, int64_t tokens, int64_t d, int top_k, float* grad_w,
                                  cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  const int64_t blocks = (tokens + kRowsPerBlock - 1) / kRowsPerBlock;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto* gt = static_cast<const T*>(grad_out);
    const auto* rt = static_cast<const T*>(rows);
    if (d % kWidth<T> == 0 && rows_aligned16<T>(grad_out, ldg) && rows_aligned16<T>(rows, ldr))
      GEOMOE_LAUNCH(blocks, kThreads, 0, stream, weight_grad_kernel<T, true>)(gt, ldg, rt, ldr, flat_to_row, tokens, d,
                                                                              top_k, grad_w);
    else
      GEOMOE_LAUNCH(blocks, kThreads, 0, stream, weight_grad_kernel<T, false>)(gt, ldg, rt, ldr, flat_to_row, tokens,
                                                                               d, top_k, grad_w);
    return cudaGetLastError();
  });
}

cudaError_t route_histogram(const int64_t* ids, int64_t n, int num_experts, int block, int64_t* per_block,
                            cudaStream_t stream) {
  const int64_t blocks = (n + block - 1) / block;
  if (blocks == 0) return cudaSuccess;
  GEOMOE_LAUNCH(blocks, kThreads, num_experts * sizeof(unsigned int), stream, histogram_kernel)(
      ids, n, num_experts, block, per_block);
  return cudaGetLastError();
}

cudaError_t route_scatter(const int64_t* ids, int64_t n, int num_experts, int block, const int64_t* base,
                          int64_t* row_to_flat, int64_t* flat_to_row, cudaStream_t stream) {
  if (block != kRouteBlock) return cudaErrorInvalidValue;  // one warp's lanes per block of ids
  const int64_t blocks = (n + block - 1) / block;
  if (blocks == 0) return cudaSuccess;
  constexpr int kIdBlocksPerThreadBlock = kThreads / 32;
  GEOMOE_LAUNCH((blocks + kIdBlocksPerThreadBlock - 1) / kIdBlocksPerThreadBlock, kThreads, 0, stream, scatter_kernel)(
      ids, n, num_experts, base, row_to_flat, flat_to_row, blocks);
  return cudaGetLastError();
}

}  // namespace geomoe
