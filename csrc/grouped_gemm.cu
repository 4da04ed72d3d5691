// Tensor-core grouped GEMM (WMMA, fp16/bf16 in, fp32 accumulate) over expert-major rows.
//   forward / dgrad: out[r] = act(A[r] @ W[e(r)] + b[e(r)]); A[r] = a[gather[r] / top_k] when gathered;
//                    trans_w reads W[e] as [N, K] (dgrad: dA = dPre @ W^T); with grad_act the dgrad's
//                    epilogue reads pre and writes d pre = (dH @ W^T) * act'(pre) (expert_mlp backward).
//   wgrad:           dW[s, e] = sum over split s of expert e's rows of A^T G, and db[s, e] = the sum of
//                    G's rows (fp32 partials, summed by the caller); a_act forms act(A) as A loads.
// Row blocks come from a device-side schedule (expert and first row of each 64-row block, -1 for
// surplus blocks), so nothing is read back to the host.
#include <mma.h>

#include "dtype.cuh"

namespace geomoe {
namespace {

using namespace nvcuda;

constexpr int BM = 64, BN = 64, BK = 32, kThreads = 128;  // 4 warps, each a 32 x 32 tile of 2 x 2 fragments
constexpr int PAD = 8;
constexpr int kNone = static_cast<int>(Activation::kNone), kGelu = static_cast<int>(Activation::kGelu),
              kSilu = static_cast<int>(Activation::kSilu);

template <typename T> __device__ inline T zero() { return from_f32<T>(0.f); }

using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// One warp's 32 x 32 tile += a[32 x depth] @ b[depth x 32], both in shared memory, row-major.
template <typename T, int DEPTH>
__device__ inline void warp_mma(Acc (&acc)[2][2], const T* a, int lda, const T* b, int ldb) {
#pragma unroll
  for (int kk = 0; kk < DEPTH; kk += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], a + i * 16 * lda + kk, lda);
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], b + kk * ldb + j * 16, ldb);
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
  }
}

__device__ inline void warp_zero(Acc (&acc)[2][2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
}

// The warp's tile into shared memory (c points at its top-left corner).
__device__ inline void warp_store(const Acc (&acc)[2][2], float* c, int ldc) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::store_matrix_sync(c + i * 16 * ldc + j * 16, acc[i][j], ldc, wmma::mem_row_major);
}

__device__ inline float activate(float x, int act) {
  if (act == kGelu) return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));  // GELU (erf)
  if (act == kSilu) return x / (1.f + __expf(-x));                             // SiLU
  return x;
}

__device__ inline float activate_grad(float x, int act) {
  if (act == kGelu)
    return 0.5f * (1.f + erff(x * 0.70710678118654752f)) + x * 0.3989422804014327f * __expf(-0.5f * x * x);
  const float s = 1.f / (1.f + __expf(-x));  // SiLU
  return s * (1.f + x * (1.f - s));
}

// ACT, TRANS_W, GATHER and GRAD_ACT are compile-time: fewer live registers and no branches in the loops.
template <typename T, int ACT, bool TRANS_W, bool GATHER, int GRAD_ACT = 0>
__global__ void __launch_bounds__(kThreads, 1) gmm_kernel(
    const T* __restrict__ a, int64_t lda, const int64_t* __restrict__ gather, int top_k, const T* __restrict__ w,
    int64_t K, int64_t N, int64_t ldw, int64_t stride_we, const T* __restrict__ bias,
    const int64_t* __restrict__ blk_expert, const int64_t* __restrict__ blk_row0, const int64_t* __restrict__ offsets,
    T* __restrict__ out, int64_t ldo, T* __restrict__ pre, int64_t ldp) {
  __shared__ __align__(32) T As[BM][BK + PAD];
  __shared__ __align__(32) T Bs[BK][BN + PAD];
  __shared__ __align__(32) float Cs[BM][BN + 4];
  const int64_t e = blk_expert[blockIdx.x];
  if (e < 0) return;
  const int64_t row0 = blk_row0[blockIdx.x], end = offsets[e + 1];
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  const T* we = w + e * stride_we;
  const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
  Acc acc[2][2];
  warp_zero(acc);
  for (int64_t k0 = 0; k0 < K; k0 += BK) {
    for (int idx = threadIdx.x; idx < BM * BK; idx += kThreads) {
      const int r = idx / BK, c = idx % BK;
      const int64_t row = row0 + r, k = k0 + c;
      T v = zero<T>();
      if (row < end && k < K) {
        const int64_t src = GATHER ? gather[row] / top_k : row;
        v = a[src * lda + k];
      }
      As[r][c] = v;
    }
    for (int idx = threadIdx.x; idx < BK * BN; idx += kThreads) {
      const int kr = idx / BN, c = idx % BN;
      const int64_t k = k0 + kr, n = n0 + c;
      T v = zero<T>();
      if (k < K && n < N) v = TRANS_W ? we[n * ldw + k] : we[k * ldw + n];
      Bs[kr][c] = v;
    }
    __syncthreads();
    warp_mma<T, BK>(acc, &As[wm * 32][0], BK + PAD, &Bs[0][wn * 32], BN + PAD);
    __syncthreads();
  }
  warp_store(acc, &Cs[wm * 32][wn * 32], BN + 4);
  __syncthreads();
  for (int idx = threadIdx.x; idx < BM * BN; idx += kThreads) {  // epilogue: bias, pre-activation, activation
    const int r = idx / BN, c = idx % BN;
    const int64_t row = row0 + r, n = n0 + c;
    if (row >= end || n >= N) continue;
    float v = Cs[r][c];
    if (GRAD_ACT) {  // pre is an input here: d pre = d hidden * act'(pre)
      out[row * ldo + n] = from_f32<T>(v * activate_grad(to_f32(pre[row * ldp + n]), GRAD_ACT));
      continue;
    }
    if (bias) v += to_f32(bias[e * N + n]);
    if (pre) pre[row * ldp + n] = from_f32<T>(v);
    out[row * ldo + n] = from_f32<T>(activate(v, ACT));
  }
}

template <typename T, int A_ACT>
__global__ void __launch_bounds__(kThreads, 1) wgrad_kernel(
    const T* __restrict__ a, int64_t lda, const int64_t* __restrict__ gather, int top_k, const T* __restrict__ g,
    int64_t ldg, const int64_t* __restrict__ offsets, int64_t K, int64_t N, int splits, float* __restrict__ partial,
    float* __restrict__ partial_db) {
  constexpr int TK = 64, TN = 64, TM = 32;
  __shared__ __align__(32) T At[TK][TM + PAD];  // A^T tile: [k][m]
  __shared__ __align__(32) T Gs[TM][TN + PAD];
  __shared__ __align__(32) float Cs[TK][TN + 4];
  const int64_t e = blockIdx.x;
  const int64_t n_tiles = (N + TN - 1) / TN;
  const int64_t k0 = (blockIdx.y / n_tiles) * TK, n0 = (blockIdx.y % n_tiles) * TN;
  const int s = blockIdx.z;
  const int64_t start = offsets[e], end = offsets[e + 1];
  const int64_t chunk = (end - start + splits - 1) / splits;
  const int64_t lo = start + s * chunk, hi = lo + chunk < end ? lo + chunk : end;
  const int warp = threadIdx.x / 32, wk = warp / 2, wn = warp % 2;
  // the first K tile's blocks also sum G's columns (the bias gradient), one column per thread
  const bool sums_bias = partial_db != nullptr && k0 == 0 && threadIdx.x < TN;
  float col_sum = 0.f;
  Acc acc[2][2];
  warp_zero(acc);
  for (int64_t m0 = lo; m0 < hi; m0 += TM) {
    for (int idx = threadIdx.x; idx < TK * TM; idx += kThreads) {
      const int m = idx / TK, kc = idx % TK;  // consecutive threads along k: coalesced row reads
      const int64_t row = m0 + m, k = k0 + kc;
      T v = zero<T>();
      if (row < hi && k < K) {
        v = a[(gather ? gather[row] / top_k : row) * lda + k];
        if (A_ACT) v = from_f32<T>(activate(to_f32(v), A_ACT));  // a holds pre: the hidden rows, formed here
      }
      At[kc][m] = v;
    }
    for (int idx = threadIdx.x; idx < TM * TN; idx += kThreads) {
      const int m = idx / TN, c = idx % TN;
      const int64_t row = m0 + m, n = n0 + c;
      Gs[m][c] = (row < hi && n < N) ? g[row * ldg + n] : zero<T>();
    }
    __syncthreads();
    if (sums_bias) {
#pragma unroll 8
      for (int m = 0; m < TM; ++m) col_sum += to_f32(Gs[m][threadIdx.x]);
    }
    warp_mma<T, TM>(acc, &At[wk * 32][0], TM + PAD, &Gs[0][wn * 32], TN + PAD);
    __syncthreads();
  }
  if (sums_bias && n0 + threadIdx.x < N) partial_db[(static_cast<int64_t>(s) * gridDim.x + e) * N + n0 + threadIdx.x] = col_sum;
  warp_store(acc, &Cs[wk * 32][wn * 32], TN + 4);
  __syncthreads();
  float* dst = partial + (static_cast<int64_t>(s) * gridDim.x + e) * K * N;
  for (int idx = threadIdx.x; idx < TK * TN; idx += kThreads) {  // every element written: empty experts get zeros
    const int kr = idx / TN, c = idx % TN;
    const int64_t k = k0 + kr, n = n0 + c;
    if (k < K && n < N) dst[k * N + n] = Cs[kr][c];
  }
}

template <typename F>
cudaError_t by_half_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;  // fp32: the Triton kernel (IEEE dot) serves it
  }
}

}  // namespace

int grouped_mm_block_rows() { return BM; }

cudaError_t grouped_mm(DType dtype, const void* a, int64_t lda, const int64_t* gather, int top_k, const void* w,
                       int64_t K, int64_t N, int64_t ldw, int64_t stride_we, bool trans_w, const void* bias,
                       const int64_t* blk_expert, const int64_t* blk_row0, int64_t blocks, const int64_t* offsets,
                       int act, void* out, int64_t ldo, void* pre, int64_t ldp, int grad_act, cudaStream_t stream) {
  if (blocks == 0 || N == 0) return cudaSuccess;
  const dim3 grid(blocks, (N + BN - 1) / BN);
  return by_half_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto launch = [&](auto kernel) {
      GEOMOE_LAUNCH(grid, kThreads, 0, stream, kernel)(static_cast<const T*>(a), lda, gather, top_k,
                                                       static_cast<const T*>(w), K, N, ldw, stride_we,
                                                       static_cast<const T*>(bias), blk_expert, blk_row0, offsets,
                                                       static_cast<T*>(out), ldo, static_cast<T*>(pre), ldp);
      return cudaGetLastError();
    };
    if (trans_w) {  // dgrad: no activation, rows not gathered; maybe act'(pre) in the epilogue
      switch (grad_act) {
        case kNone: return launch(gmm_kernel<T, kNone, true, false, kNone>);
        case kGelu: return launch(gmm_kernel<T, kNone, true, false, kGelu>);
        case kSilu: return launch(gmm_kernel<T, kNone, true, false, kSilu>);
        default: return cudaErrorInvalidValue;
      }
    }
    if (grad_act != kNone) return cudaErrorInvalidValue;  // act' applies to a dgrad only
    const bool g = gather != nullptr;
    switch (act) {
      case kNone: return g ? launch(gmm_kernel<T, kNone, false, true>) : launch(gmm_kernel<T, kNone, false, false>);
      case kGelu: return g ? launch(gmm_kernel<T, kGelu, false, true>) : launch(gmm_kernel<T, kGelu, false, false>);
      case kSilu: return g ? launch(gmm_kernel<T, kSilu, false, true>) : launch(gmm_kernel<T, kSilu, false, false>);
      default: return cudaErrorInvalidValue;
    }
  });
}

cudaError_t grouped_mm_wgrad(DType dtype, const void* a, int64_t lda, const int64_t* gather, int top_k, const void* g,
                             int64_t ldg, const int64_t* offsets, int64_t num_experts, int64_t K, int64_t N, int splits,
                             int a_act, float* partial, float* partial_db, cudaStream_t stream) {
  if (num_experts == 0 || K == 0 || N == 0) return cudaSuccess;
  const dim3 grid(num_experts, ((K + 63) / 64) * ((N + 63) / 64), splits);
  return by_half_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto launch = [&](auto kernel) {
      GEOMOE_LAUNCH(grid, kThreads, 0, stream, kernel)(static_cast<const T*>(a), lda, gather, top_k,
                                                       static_cast<const T*>(g), ldg, offsets, K, N, splits, partial,
                                                       partial_db);
      return cudaGetLastError();
    };
    switch (a_act) {
      case kNone: return launch(wgrad_kernel<T, kNone>);
      case kGelu: return launch(wgrad_kernel<T, kGelu>);
      case kSilu: return launch(wgrad_kernel<T, kSilu>);
      default: return cudaErrorInvalidValue;
    }
  });
}

}  // namespace geomoe
