// Element conversions and the dtype switch shared by the kernels: arithmetic is float32 whatever
// the storage type.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "geomoe_core.h"

namespace geomoe {

template <typename T> __device__ inline float to_f32(T v) { return static_cast<float>(v); }
template <> __device__ inline float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ inline float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ inline T from_f32(float v) { return static_cast<T>(v); }
template <> __device__ inline __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ inline __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// f(tag) with a value of the storage type for `dtype`.
template <typename F>
inline cudaError_t by_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace geomoe
