// W4A8 per-group (QServe layout, progressive int8 -> uint4) instantiations of the int8 GEMM engine,
// and the dequantizing kernel of kDequantCfg (per-group W8 = q4·s2 + s2_zeros, per-channel W8 = q4; then the GEMM).
#include "w8a8_gemm.cuh"

namespace qtool_i8 {
FmtOps fmt_ops_w4pg() { return {run_fmt<kW4PG>, occupancy_fmt<kW4PG>}; }

namespace {

// One CTA: a 32-feature tile x 128 k (4 warps, one QServe 32x32 tile each). A lane's 16 bytes become,
// through the GEMM kernels' own w4_fragments, 8 words of 4 consecutive k of one feature (b[j][h]:
// feature 8j + lane/4, k 16h + 4·(lane%4)); they are staged in shared memory so that the global stores
// are whole 16-byte chunks of 128-byte rows. Row stride 144 bytes: a store's banks are 4·(lane/4) +
// lane%4 + const, all different.
constexpr int kDqRow = 144;

template <int FMT>
__global__ void __launch_bounds__(128) w4_dequant_kernel(const uint8_t* __restrict__ qw,
                                                           const int8_t* __restrict__ s2,
                                                           const int8_t* __restrict__ z2, int8_t* __restrict__ w8,
                                                           int N, int K, int group) {
  __shared__ __align__(16) uint8_t tile[32 * kDqRow];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int nt = blockIdx.x, kt32 = K >> 5;
  const int kt = blockIdx.y * 4 + warp;
  if (kt < kt32) {
    const uint4 w = __ldg(reinterpret_cast<const uint4*>(qw + (static_cast<size_t>(nt) * kt32 + kt) * 512) + lane);
    const int g = lane >> 2, tig = lane & 3;
    uint32_t s2w = 0, zw = 0;
    if constexpr (FMT == kW4PG) {
      // the s2 / zero bytes of the lane's four features 8j + g are one word (the permuted column order)
      const size_t so = static_cast<size_t>(kt * 32 / group) * N + nt * 32 + 4 * g;
      s2w = __ldg(reinterpret_cast<const unsigned int*>(s2 + so));
      zw = __ldg(reinterpret_cast<const unsigned int*>(z2 + so));
    }
    uint32_t b[4][2];
    w4_fragments<FMT>(w, s2w, zw, b);
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        *reinterpret_cast<uint32_t*>(tile + (8 * j + g) * kDqRow + warp * 32 + 16 * h + 4 * tig) = b[j][h];
  }
  __syncthreads();
  const int k0 = blockIdx.y * 128;
#pragma unroll
  for (int i = threadIdx.x; i < 32 * 8; i += 128) {
    const int r = i >> 3, c = i & 7;
    if (k0 + 16 * c < K)
      *reinterpret_cast<uint4*>(w8 + static_cast<size_t>(nt * 32 + r) * K + k0 + 16 * c) =
          *reinterpret_cast<const uint4*>(tile + r * kDqRow + 16 * c);
  }
}

}  // namespace

int dequantize_w4pg(const void* qweight, const int8_t* s2, const int8_t* z2, int N, int K, int group, int8_t* w8,
                    cudaStream_t stream, const char** err) {
  auto bad = [&](const char* m) {
    if (err) *err = m;
    return -1;
  };
  if (N <= 0 || K <= 0 || N % 32 || K % 32) return bad("W4A8 needs N and K multiples of 32");
  if (group <= 0 || group % 32 || K % group) return bad("W4A8 per-group needs a group size that is a multiple of 32 and divides K");
  if (!qweight || !s2 || !z2 || !w8) return bad("missing tensor");
  if ((reinterpret_cast<uintptr_t>(qweight) | reinterpret_cast<uintptr_t>(w8)) % 16 ||
      (reinterpret_cast<uintptr_t>(s2) | reinterpret_cast<uintptr_t>(z2)) % 4)
    return bad("qweight and the int8 output must be 16-byte aligned, s2_scales / s2_zeros 4-byte aligned");
  if ((K + 127) / 128 > 65535) return bad("K too large for the dequantizing kernel's grid");
  const dim3 grid(N / 32, (K + 127) / 128);
  w4_dequant_kernel<kW4PG><<<grid, 128, 0, stream>>>(static_cast<const uint8_t*>(qweight), s2, z2, w8, N, K, group);
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? 0 : static_cast<int>(e);
}

int dequantize_w4pc(const void* qweight, int N, int K, int8_t* w8, cudaStream_t stream, const char** err) {
  auto bad = [&](const char* m) {
    if (err) *err = m;
    return -1;
  };
  if (N <= 0 || K <= 0 || N % 32 || K % 32) return bad("W4A8 needs N and K multiples of 32");
  if (!qweight || !w8) return bad("missing tensor");
  if ((reinterpret_cast<uintptr_t>(qweight) | reinterpret_cast<uintptr_t>(w8)) % 16)
    return bad("qweight and the int8 output must be 16-byte aligned");
  if ((K + 127) / 128 > 65535) return bad("K too large for the dequantizing kernel's grid");
  const dim3 grid(N / 32, (K + 127) / 128);
  w4_dequant_kernel<kW4PC><<<grid, 128, 0, stream>>>(static_cast<const uint8_t*>(qweight), nullptr, nullptr, w8, N, K,
                                                     0);
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? 0 : static_cast<int>(e);
}

}  // namespace qtool_i8
