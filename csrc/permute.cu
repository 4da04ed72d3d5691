// Row gather into expert-major order, the deterministic weighted combine, and routing.

#include "dtype.cuh"

namespace geomoe {
namespace {


constexpr int kThreads = 256;

// One block per row (or token); threads stride over the columns.
template <typename T>
__global__ void permute_kernel(const T* __restrict__ x, int64_t ldx, const int64_t* __restrict__ row_to_flat,
                               const float* __restrict__ weights, int64_t d, int top_k, T* __restrict__ out,
                               int64_t ldo) {
  const int64_t r = blockIdx.x;
  const int64_t f = row_to_flat[r];
  const T* src = x + (f / top_k) * ldx;
  T* dst = out + r * ldo;
  const float w = weights ? weights[f] : 1.f;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) dst[c] = weights ? from_f32<T>(to_f32(src[c]) * w) : src[c];
}

template <typename T>
__global__ void unpermute_kernel(const T* __restrict__ rows, int64_t ldr, const int64_t* __restrict__ flat_to_row,
                                 const float* __restrict__ weights, const T* __restrict__ shared, int64_t lds,
                                 int64_t d, int top_k, T* __restrict__ out, int64_t ldo) {
  const int64_t t = blockIdx.x;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < top_k; ++j) {  // slot order: the same sum every run
      const int64_t row = flat_to_row[t * top_k + j];
      const float v = to_f32(rows[row * ldr + c]);
      acc += weights ? weights[t * top_k + j] * v : v;
    }
    if (shared) acc += to_f32(shared[t * lds + c]);
    out[t * ldo + c] = from_f32<T>(acc);
  }
}

template <typename T>
__global__ void weight_grad_kernel(const T* __restrict__ grad, int64_t ldg, const T* __restrict__ rows, int64_t ldr,
                                   const int64_t* __restrict__ flat_to_row, int64_t d, int top_k,
                                   float* __restrict__ out) {
  __shared__ float partial[kThreads / 32];
  const int64_t t = blockIdx.x;
  for (int j = 0; j < top_k; ++j) {
    const int64_t row = flat_to_row[t * top_k + j];
    float acc = 0.f;
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) acc += to_f32(grad[t * ldg + c]) * to_f32(rows[row * ldr + c]);
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
      float s = 0.f;
      for (int w = 0; w < blockDim.x / 32; ++w) s += partial[w];  // fixed order
      out[t * top_k + j] = s;
    }
    __syncthreads();
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
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) per_block[blockIdx.x * num_experts + e] = counts[e];
}

// One thread per block of ids walks them in order: stable without a sort, and the block sizes keep
// the walk short next to the rows it places.
__global__ void scatter_kernel(const int64_t* __restrict__ ids, int64_t n, int num_experts, int block,
                               const int64_t* __restrict__ base, int64_t* __restrict__ row_to_flat,
                               int64_t* __restrict__ flat_to_row, int64_t blocks) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= blocks) return;
  const int64_t* my_base = base + b * num_experts;
  const int64_t start = b * block;
  const int64_t end = start + block < n ? start + block : n;
  for (int64_t i = start; i < end; ++i) {
    const int64_t e = ids[i];
    int64_t rank = 0;
    for (int64_t j = start; j < i; ++j) rank += ids[j] == e;
    const int64_t row = my_base[e] + rank;
    row_to_flat[row] = i;
    flat_to_row[i] = row;
  }
}


}  // namespace

cudaError_t permute(DType dtype, const void* x, int64_t ldx, const int64_t* row_to_flat, const float* weights,
                    int64_t rows, int64_t d, int top_k, void* out, int64_t ldo, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    GEOMOE_LAUNCH(rows, kThreads, 0, stream, permute_kernel<T>)(static_cast<const T*>(x), ldx, row_to_flat, weights, d,
                                                                top_k, static_cast<T*>(out), ldo);
    return cudaGetLastError();
  });
}

cudaError_t unpermute(DType dtype, const void* rows, int64_t ldr, const int64_t* flat_to_row, const float* weights,
                      const void* shared, int64_t lds, int64_t tokens, int64_t d, int top_k, void* out, int64_t ldo,
                      cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    GEOMOE_LAUNCH(tokens, kThreads, 0, stream, unpermute_kernel<T>)(static_cast<const T*>(rows), ldr, flat_to_row,
                                                                    weights, static_cast<const T*>(shared), lds, d,
                                                                    top_k, static_cast<T*>(out), ldo);
    return cudaGetLastError();
  });
}

cudaError_t unpermute_weight_grad(DType dtype, const void* grad_out, int64_t ldg, const void* rows, int64_t ldr,
                                  const int64_t* flat_to_row, int64_t tokens, int64_t d, int top_k, float* grad_w,
                                  cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    GEOMOE_LAUNCH(tokens, kThreads, 0, stream, weight_grad_kernel<T>)(static_cast<const T*>(grad_out), ldg,
                                                                      static_cast<const T*>(rows), ldr, flat_to_row, d,
                                                                      top_k, grad_w);
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
  const int64_t blocks = (n + block - 1) / block;
  if (blocks == 0) return cudaSuccess;
  GEOMOE_LAUNCH((blocks + kThreads - 1) / kThreads, kThreads, 0, stream, scatter_kernel)(
      ids, n, num_experts, block, base, row_to_flat, flat_to_row, blocks);
  return cudaGetLastError();
}

}  // namespace geomoe
