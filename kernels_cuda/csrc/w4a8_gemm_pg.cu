// W4A8 per-group (QServe layout, progressive int8 -> uint4) instantiations of the int8 GEMM engine,
// and the dequantizing kernel of kDequantCfg (per-group W8 = q4·s2 + s2_zeros, per-channel W8 = q4; then the GEMM).
#include <cstdlib>

#include "w8a8_gemm.cuh"

namespace qtool_i8 {
FmtOps fmt_ops_w4pg() { return {run_fmt<kW4PG>, occupancy_fmt<kW4PG>}; }

namespace {

// W4 -> int8 W8 (row-major [N, K]) for kDequantCfg. A CTA of 4 warps converts a 32-feature strip over R k-steps of
// 128 (warp w: QServe 32x32 tile 4r + w of the CTA's k range): every qweight load of the CTA is issued before the
// first conversion (R x 16 bytes per lane in flight). A lane's 16 bytes become, through the GEMM kernels' own
// w4_fragments, 8 words of 4 consecutive k of one feature (b[j][h]: feature 8j + lane/4, k 16h + 4·(lane%4)); they
// are staged in shared memory so that the global stores are whole 16-byte chunks of contiguous 128·R-byte rows.
// Row stride 128·R + 16 bytes: a store's banks are 4·(lane/4) + lane%4 + const, all different.
// The kernel lets the W8A8 GEMM behind it launch at once (griddepcontrol.launch_dependents: that GEMM, when chained,
// waits with griddepcontrol.wait before reading W8). HINT bit 0: qweight loads marked L2 evict-first (read once);
// bit 1: W8 stores marked L2 evict-last (the GEMM reads them next).
template <int FMT, int R, int HINT>
__global__ void __launch_bounds__(128) w4_dequant_kernel(const uint8_t* __restrict__ qw,
                                                           const int8_t* __restrict__ s2,
                                                           const int8_t* __restrict__ z2, int8_t* __restrict__ w8,
                                                           int N, int K, int group) {
  constexpr int ROW = 128 * R + 16;
  __shared__ __align__(16) uint8_t tile[32 * ROW];
  qtool_pdl::pdl_launch_dependents(1);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, tig = lane & 3;
  const int nt = blockIdx.x, kt32 = K >> 5;
  const int kt0 = blockIdx.y * 4 * R + warp;
  uint64_t pol_ld = 0, pol_st = 0;
  if constexpr (HINT & 1) asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(pol_ld));
  if constexpr (HINT & 2) asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;\n" : "=l"(pol_st));
  uint4 w[R];
  uint32_t s2w[R], zw[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int kt = kt0 + 4 * r;
    w[r] = make_uint4(0u, 0u, 0u, 0u);
    s2w[r] = zw[r] = 0u;
    if (kt < kt32) {
      const uint8_t* src = qw + (static_cast<size_t>(nt) * kt32 + kt) * 512 + 16 * lane;
      if constexpr (HINT & 1) {
        asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;\n"
                     : "=r"(w[r].x), "=r"(w[r].y), "=r"(w[r].z), "=r"(w[r].w)
                     : "l"(src), "l"(pol_ld));
      } else {
        w[r] = __ldg(reinterpret_cast<const uint4*>(src));
      }
      if constexpr (FMT == kW4PG) {
        // the s2 / zero bytes of the lane's four features 8j + g are one word (the permuted column order)
        const size_t so = static_cast<size_t>(kt * 32 / group) * N + nt * 32 + 4 * g;
        s2w[r] = __ldg(reinterpret_cast<const unsigned int*>(s2 + so));
        zw[r] = __ldg(reinterpret_cast<const unsigned int*>(z2 + so));
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    uint32_t b[4][2];
    w4_fragments<FMT>(w[r], s2w[r], zw[r], b);
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        *reinterpret_cast<uint32_t*>(tile + (8 * j + g) * ROW + r * 128 + warp * 32 + 16 * h + 4 * tig) = b[j][h];
  }
  __syncthreads();
  const int k0 = blockIdx.y * 128 * R;
#pragma unroll
  for (int i = threadIdx.x; i < 32 * 8 * R; i += 128) {
    const int row = i / (8 * R), c = i % (8 * R);
    if (k0 + 16 * c < K) {
      int8_t* dst = w8 + static_cast<size_t>(nt * 32 + row) * K + k0 + 16 * c;
      const uint4 v = *reinterpret_cast<const uint4*>(tile + row * ROW + 16 * c);
      if constexpr (HINT & 2) {
        asm volatile("st.global.L2::cache_hint.v4.u32 [%0], {%1, %2, %3, %4}, %5;\n" ::"l"(dst), "r"(v.x), "r"(v.y),
                     "r"(v.z), "r"(v.w), "l"(pol_st)
                     : "memory");
      } else {
        *reinterpret_cast<uint4*>(dst) = v;
      }
    }
  }
}

// The variant of the dequantizing kernel (QTOOL_I8_DQ_V, read per call): 0 = one k-step per CTA (the kernel of the
// fourteenth to twenty-second sessions), 1 = four k-steps per CTA, 2 = four + evict-first loads, 3 = 2 + evict-last
// stores.
int dq_variant() {
  const char* e = std::getenv("QTOOL_I8_DQ_V");
  if (e && e[0] >= '0' && e[0] <= '3' && e[1] == 0) return e[0] - '0';
  return 0;
}

template <int FMT>
cudaError_t launch_dq(const void* qweight, const int8_t* s2, const int8_t* z2, int N, int K, int group, int8_t* w8,
                      cudaStream_t stream) {
  const uint8_t* q = static_cast<const uint8_t*>(qweight);
  const int v = dq_variant();
  const int R = v == 0 ? 1 : 4;
  const dim3 grid(N / 32, (K + 128 * R - 1) / (128 * R));
  switch (v) {
    case 0:
      w4_dequant_kernel<FMT, 1, 0><<<grid, 128, 0, stream>>>(q, s2, z2, w8, N, K, group);
      break;
    case 1:
      w4_dequant_kernel<FMT, 4, 0><<<grid, 128, 0, stream>>>(q, s2, z2, w8, N, K, group);
      break;
    case 2:
      w4_dequant_kernel<FMT, 4, 1><<<grid, 128, 0, stream>>>(q, s2, z2, w8, N, K, group);
      break;
    default:
      w4_dequant_kernel<FMT, 4, 3><<<grid, 128, 0, stream>>>(q, s2, z2, w8, N, K, group);
      break;
  }
  return cudaGetLastError();
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
  const cudaError_t e = launch_dq<kW4PG>(qweight, s2, z2, N, K, group, w8, stream);
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
  const cudaError_t e = launch_dq<kW4PC>(qweight, nullptr, nullptr, N, K, 0, w8, stream);
  return e == cudaSuccess ? 0 : static_cast<int>(e);
}

}  // namespace qtool_i8
