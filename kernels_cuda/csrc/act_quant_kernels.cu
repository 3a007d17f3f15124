// Activation quantization kernels: per-token int8 (+ row sum), fused RMSNorm + per-token int8,
// static per-tensor int8. Bit-exact with qtool.quant.activations (fp32 statistics, IEEE division,
// round half to even) for the quantizers; the RMSNorm reduction order differs from PyTorch's.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "act_quant_api.h"
#include "float_cvt.cuh"

namespace qtool_aq {
namespace {

using qtool_cvt::to_f;

// round to T and back (the dtype rounding HF's RMSNorm applies)
template <typename T>
__device__ __forceinline__ float round_t(float v);
template <>
__device__ __forceinline__ float round_t<__half>(float v) { return __half2float(__float2half_rn(v)); }
template <>
__device__ __forceinline__ float round_t<__nv_bfloat16>(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }
template <>
__device__ __forceinline__ float round_t<float>(float v) { return v; }

// 8 consecutive elements (16-byte aligned for 2-byte types, 32 for fp32) -> fp32
__device__ __forceinline__ void load8(const __half* p, float (&f)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __half22float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&f)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}
__device__ __forceinline__ void load8(const float* p, float (&f)[8]) {
  const float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
  f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
}

__device__ __forceinline__ int q8(float v, float s) {
  const int q = __float2int_rn(__fdiv_rn(v, s));
  return max(-127, min(127, q));
}

constexpr int NTHR = 256;
// PyTorch on CUDA divides by a CPU scalar as a multiplication by its fp32 reciprocal
// (div_true_kernel_cuda), so the reference `absmax.clamp(min=1e-5) / 127` is absmax * fl(1/127) there;
// we match the GPU reference bit for bit (on the CPU PyTorch divides: rare 1-ulp scale differences).
constexpr float kInv127 = 1.0f / 127.0f;

// Reductions over the TPR threads of one row (rows are TPR consecutive threads of the block): a warp shuffle tree,
// then, for rows of several warps, the warps' results through shared memory `sm` (one slot per warp).
// Every thread of the block calls these (uniformly), so the barriers are safe.
template <int TPR, typename T, typename Op>
__device__ __forceinline__ T row_reduce(T v, T* sm, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  if constexpr (TPR == 32) {
    return v;
  } else {
    constexpr int WPR = TPR / 32;
    const int w = threadIdx.x >> 5;
    __syncthreads();
    if ((threadIdx.x & 31) == 0) sm[w] = v;
    __syncthreads();
    const int w0 = (w / WPR) * WPR;
    T r = sm[w0];
#pragma unroll
    for (int i = 1; i < WPR; ++i) r = op(r, sm[w0 + i]);
    return r;
  }
}
template <int TPR>
__device__ __forceinline__ float row_max(float v, float* sm) {
  return row_reduce<TPR>(v, sm, [](float a, float b) { return fmaxf(a, b); });
}
template <int TPR>
__device__ __forceinline__ float row_sumf(float v, float* sm) {
  return row_reduce<TPR>(v, sm, [](float a, float b) { return a + b; });
}
template <int TPR>
__device__ __forceinline__ int row_sumi(int v, int* sm) {
  return row_reduce<TPR>(v, sm, [](int a, int b) { return a + b; });
}

// Fast path: K % 8 == 0, 16-byte aligned rows, K <= TPR * 8 * VPT (the row stays in registers).
template <typename T, int TPR, int VPT, bool NORM>
__global__ void __launch_bounds__(NTHR) per_token_vec_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                                             float eps, int8_t* __restrict__ q,
                                                             float* __restrict__ scale, float* __restrict__ sum,
                                                             int M, int K) {
  constexpr int RPB = NTHR / TPR;
  __shared__ float smf[NTHR / 32];
  __shared__ int smi[NTHR / 32];
  const int t = threadIdx.x % TPR;
  const int row = blockIdx.x * RPB + threadIdx.x / TPR;
  const bool valid = row < M;
  const T* xr = x + static_cast<size_t>(valid ? row : 0) * K;
  const int nvec = K / 8;
  float v[VPT][8];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int e = t + i * TPR;
    if (valid && e < nvec) {
      load8(xr + 8 * e, v[i]);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) v[i][j] = 0.f;
    }
  }
  if constexpr (NORM) {
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < VPT; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) ss = fmaf(v[i][j], v[i][j], ss);
    ss = row_sumf<TPR>(ss, smf);
    const float r = rsqrtf(ss * (1.0f / static_cast<float>(K)) + eps);
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int e = t + i * TPR;
      if (valid && e < nvec) {
        float wf[8];
        load8(w + 8 * e, wf);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[i][j] = round_t<T>(wf[j] * round_t<T>(v[i][j] * r));
      }
    }
  }
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < VPT; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) amax = fmaxf(amax, fabsf(v[i][j]));
  amax = row_max<TPR>(amax, smf);
  const float s = fmaxf(amax, 1e-5f) * kInv127;
  int isum = 0;
  int8_t* qr = q + static_cast<size_t>(valid ? row : 0) * K;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int e = t + i * TPR;
    if (valid && e < nvec) {
      uint32_t lo = 0, hi = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int a = q8(v[i][j], s), b = q8(v[i][j + 4], s);
        isum += a + b;
        lo |= (static_cast<uint32_t>(a) & 0xFFu) << (8 * j);
        hi |= (static_cast<uint32_t>(b) & 0xFFu) << (8 * j);
      }
      *reinterpret_cast<uint2*>(qr + 8 * e) = make_uint2(lo, hi);
    }
  }
  if (sum) isum = row_sumi<TPR>(isum, smi);
  if (valid && t == 0) {
    scale[row] = s;
    if (sum) sum[row] = static_cast<float>(isum) * s;
  }
}

// General path (any K / alignment): one block per row, passes re-read the row (L1/L2 resident).
template <typename T, bool NORM>
__global__ void __launch_bounds__(NTHR) per_token_gen_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                                             float eps, int8_t* __restrict__ q,
                                                             float* __restrict__ scale, float* __restrict__ sum,
                                                             int M, int K) {
  __shared__ float smf[NTHR / 32];
  __shared__ int smi[NTHR / 32];
  const int row = blockIdx.x;
  const T* xr = x + static_cast<size_t>(row) * K;
  float r = 1.f;
  if constexpr (NORM) {
    float ss = 0.f;
    for (int e = threadIdx.x; e < K; e += NTHR) {
      const float f = to_f(xr[e]);
      ss = fmaf(f, f, ss);
    }
    ss = row_sumf<NTHR>(ss, smf);
    r = rsqrtf(ss * (1.0f / static_cast<float>(K)) + eps);
  }
  auto val = [&](int e) {
    float f = to_f(xr[e]);
    if constexpr (NORM) f = round_t<T>(to_f(w[e]) * round_t<T>(f * r));
    return f;
  };
  float amax = 0.f;
  for (int e = threadIdx.x; e < K; e += NTHR) amax = fmaxf(amax, fabsf(val(e)));
  amax = row_max<NTHR>(amax, smf);
  const float s = fmaxf(amax, 1e-5f) * kInv127;
  int isum = 0;
  int8_t* qr = q + static_cast<size_t>(row) * K;
  for (int e = threadIdx.x; e < K; e += NTHR) {
    const int a = q8(val(e), s);
    isum += a;
    qr[e] = static_cast<int8_t>(a);
  }
  if (sum) isum = row_sumi<NTHR>(isum, smi);
  if (threadIdx.x == 0) {
    scale[row] = s;
    if (sum) sum[row] = static_cast<float>(isum) * s;
  }
}

template <typename T>
__global__ void per_tensor_kernel(const T* __restrict__ x, const float* __restrict__ sp, int8_t* __restrict__ q,
                                  size_t n, int vec) {
  const float s = *sp;
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (vec) {
    const size_t nv = n / 8;
    for (; i < nv; i += stride) {
      float f[8];
      load8(x + 8 * i, f);
      uint32_t lo = 0, hi = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        lo |= (static_cast<uint32_t>(q8(f[j], s)) & 0xFFu) << (8 * j);
        hi |= (static_cast<uint32_t>(q8(f[j + 4], s)) & 0xFFu) << (8 * j);
      }
      *reinterpret_cast<uint2*>(q + 8 * i) = make_uint2(lo, hi);
    }
  } else {
    for (; i < n; i += stride) q[i] = static_cast<int8_t>(q8(to_f(x[i]), s));
  }
}

template <typename T, bool NORM>
cudaError_t per_token_t(const T* x, const T* w, float eps, int8_t* q, float* scale, float* sum, int M, int K,
                        cudaStream_t st) {
  const bool vec = K % 8 == 0 && (reinterpret_cast<uintptr_t>(x) % 32 == 0) && (reinterpret_cast<uintptr_t>(q) % 8 == 0) &&
                   (!NORM || reinterpret_cast<uintptr_t>(w) % 32 == 0) && (K * sizeof(T)) % 16 == 0;
  const int nvec = K / 8;
  if (vec && nvec <= 32 * 4) {
    per_token_vec_kernel<T, 32, 4, NORM><<<(M + 7) / 8, NTHR, 0, st>>>(x, w, eps, q, scale, sum, M, K);
  } else if (vec && nvec <= 128 * 4) {
    per_token_vec_kernel<T, 128, 4, NORM><<<(M + 1) / 2, NTHR, 0, st>>>(x, w, eps, q, scale, sum, M, K);
  } else if (vec && nvec <= 256 * 4) {
    per_token_vec_kernel<T, 256, 4, NORM><<<M, NTHR, 0, st>>>(x, w, eps, q, scale, sum, M, K);
  } else if (vec && nvec <= 256 * 8) {
    per_token_vec_kernel<T, 256, 8, NORM><<<M, NTHR, 0, st>>>(x, w, eps, q, scale, sum, M, K);
  } else {
    per_token_gen_kernel<T, NORM><<<M, NTHR, 0, st>>>(x, w, eps, q, scale, sum, M, K);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t per_token_d(const void* x, const void* w, float eps, int8_t* q, float* scale, float* sum, int M, int K,
                        cudaStream_t st) {
  if (w) return per_token_t<T, true>(static_cast<const T*>(x), static_cast<const T*>(w), eps, q, scale, sum, M, K, st);
  return per_token_t<T, false>(static_cast<const T*>(x), nullptr, eps, q, scale, sum, M, K, st);
}

}  // namespace

int per_token(int dt, const void* x, const void* weight, float eps, int8_t* q, float* scale, float* sum, int M, int K,
              cudaStream_t stream, const char** err) {
  if (M < 0 || K <= 0) {
    if (err) *err = "bad shape";
    return -1;
  }
  if (M == 0) return 0;
  cudaError_t e;
  if (dt == kF16) {
    e = per_token_d<__half>(x, weight, eps, q, scale, sum, M, K, stream);
  } else if (dt == kBF16) {
    e = per_token_d<__nv_bfloat16>(x, weight, eps, q, scale, sum, M, K, stream);
  } else if (dt == kF32) {
    e = per_token_d<float>(x, weight, eps, q, scale, sum, M, K, stream);
  } else {
    if (err) *err = "x must be float16, bfloat16 or float32";
    return -1;
  }
  return e == cudaSuccess ? 0 : static_cast<int>(e);
}

int per_tensor(int dt, const void* x, const float* scale, int8_t* q, size_t n, cudaStream_t stream, const char** err) {
  if (n == 0) return 0;
  const int esz = dt == kF32 ? 4 : 2;
  const int vec = n % 8 == 0 && reinterpret_cast<uintptr_t>(x) % (8 * esz) == 0 && reinterpret_cast<uintptr_t>(q) % 8 == 0;
  const size_t work = vec ? n / 8 : n;
  const int blocks = static_cast<int>(work / 256 + 1 < 132 * 16 ? work / 256 + 1 : 132 * 16);
  if (dt == kF16) {
    per_tensor_kernel<__half><<<blocks, 256, 0, stream>>>(static_cast<const __half*>(x), scale, q, n, vec);
  } else if (dt == kBF16) {
    per_tensor_kernel<__nv_bfloat16><<<blocks, 256, 0, stream>>>(static_cast<const __nv_bfloat16*>(x), scale, q, n, vec);
  } else if (dt == kF32) {
    per_tensor_kernel<float><<<blocks, 256, 0, stream>>>(static_cast<const float*>(x), scale, q, n, vec);
  } else {
    if (err) *err = "x must be float16, bfloat16 or float32";
    return -1;
  }
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? 0 : static_cast<int>(e);
}

}  // namespace qtool_aq
