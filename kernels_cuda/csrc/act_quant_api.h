// Host interface of the activation quantizers (no torch headers).
//   per-token:  s = max(max_k |x|, 1e-5) / 127 (fp32), q = clamp(rint(x / s), -127, 127) (IEEE division,
//               round half to even), optional sum = s * sum_k q (the dequantized row sum, exact int sum)
//   rmsnorm:    y = T(w * T(x * rsqrt(mean(x^2) + eps))) in x's dtype T (Hugging Face LlamaRMSNorm), then
//               per-token as above on y
//   per-tensor: q = clamp(rint(x / s), -127, 127) with s read from device memory (no host sync)
#pragma once
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

namespace qtool_aq {

enum DTag { kF16 = 0, kBF16 = 1, kF32 = 2 };

// x [M, K] (row stride K), weight [K] (rmsnorm only, same dtype as x), q [M, K], scale [M], sum [M] or null.
int per_token(int dt, const void* x, const void* weight, float eps, int8_t* q, float* scale, float* sum, int M, int K,
              cudaStream_t stream, const char** err);
int per_tensor(int dt, const void* x, const float* scale, int8_t* q, size_t n, cudaStream_t stream, const char** err);

}  // namespace qtool_aq
