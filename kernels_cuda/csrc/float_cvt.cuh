// to_f: an fp16 / bf16 / fp32 element as fp32 (device code), for the kernels that take any of the three.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace qtool_cvt {
template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_f<float>(float v) { return v; }
}  // namespace qtool_cvt
