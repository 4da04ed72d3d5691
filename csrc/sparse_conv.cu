// Submanifold depthwise k x k conv on visible rows [R, C]: every output row gathers its neighbour
// rows through the table [R, k*k] (-1: masked or outside, read as zero). Threads run along the
// channels, so each gather is a coalesced row read. dx is the same kernel with the kernel flipped
// (the table is symmetric); dweight and dbias are per-block partial sums the caller reduces in order.

#include "dtype.cuh"

namespace geomoe {
namespace {


constexpr int kChannels = 64;  // threads along C
constexpr int kRows = 4;       // rows per block (threadIdx.y)
constexpr int kGradRows = 64;  // rows each weight-gradient block sums

template <typename T, bool FLIP>
__global__ void dwconv_kernel(const T* __restrict__ x, int64_t ldx, const int64_t* __restrict__ nbr, int kk,
                              const T* __restrict__ w, const T* __restrict__ bias, int64_t R, int64_t C,
                              T* __restrict__ out, int64_t ldo) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kChannels + threadIdx.x;
  if (r >= R || c >= C) return;
  float acc = bias ? to_f32(bias[c]) : 0.f;
  for (int j = 0; j < kk; ++j) {
    const int64_t q = nbr[r * kk + j];
    if (q >= 0) acc += to_f32(x[q * ldx + c]) * to_f32(w[c * kk + (FLIP ? kk - 1 - j : j)]);
  }
  out[r * ldo + c] = from_f32<T>(acc);
}

template <typename T>
__global__ void dwconv_wgrad_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ g, int64_t ldg,
                                    const int64_t* __restrict__ nbr, int kk, int64_t R, int64_t C,
                                    float* __restrict__ dw_partial, float* __restrict__ db_partial) {
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kGradRows;
  const int64_t r1 = r0 + kGradRows < R ? r0 + kGradRows : R;
  float db = 0.f;
  for (int64_t r = r0; r < r1; ++r) db += to_f32(g[r * ldg + c]);
  db_partial[blockIdx.x * C + c] = db;
  for (int j = 0; j < kk; ++j) {
    float acc = 0.f;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t q = nbr[r * kk + j];
      if (q >= 0) acc += to_f32(g[r * ldg + c]) * to_f32(x[q * ldx + c]);
    }
    dw_partial[(blockIdx.x * C + c) * kk + j] = acc;
  }
}


}  // namespace

int dwconv_grad_rows_per_block() { return kGradRows; }

cudaError_t masked_depthwise_conv(DType dtype, const void* x, int64_t ldx, const int64_t* neighbors, int kk,
                                  const void* weight, const void* bias, int64_t rows, int64_t channels, bool flip,
                                  void* out, int64_t ldo, cudaStream_t stream) {
  if (rows == 0 || channels == 0) return cudaSuccess;
  const dim3 block(kChannels, kRows);
  const dim3 grid((rows + kRows - 1) / kRows, (channels + kChannels - 1) / kChannels);
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (flip)
      GEOMOE_LAUNCH(grid, block, 0, stream, dwconv_kernel<T, true>)(static_cast<const T*>(x), ldx, neighbors, kk,
                                                                    static_cast<const T*>(weight),
                                                                    static_cast<const T*>(bias), rows, channels,
                                                                    static_cast<T*>(out), ldo);
    else
      GEOMOE_LAUNCH(grid, block, 0, stream, dwconv_kernel<T, false>)(static_cast<const T*>(x), ldx, neighbors, kk,
                                                                     static_cast<const T*>(weight),
                                                                     static_cast<const T*>(bias), rows, channels,
                                                                     static_cast<T*>(out), ldo);
    return cudaGetLastError();
  });
}

cudaError_t masked_depthwise_conv_wgrad(DType dtype, const void* x, int64_t ldx, const void* grad_out, int64_t ldg,
                                        const int64_t* neighbors, int kk, int64_t rows, int64_t channels,
                                        float* dw_partial, float* db_partial, cudaStream_t stream) {
  if (rows == 0 || channels == 0) return cudaSuccess;
  const dim3 grid((rows + kGradRows - 1) / kGradRows, (channels + 127) / 128);
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    GEOMOE_LAUNCH(grid, 128, 0, stream, dwconv_wgrad_kernel<T>)(static_cast<const T*>(x), ldx,
                                                                static_cast<const T*>(grad_out), ldg, neighbors, kk,
                                                                rows, channels, dw_partial, db_partial);
    return cudaGetLastError();
  });
}

}  // namespace geomoe
