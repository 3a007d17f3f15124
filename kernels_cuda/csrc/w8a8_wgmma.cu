// W8A8 wgmma (sm_90a) instantiations; see w8a8_wgmma.cuh.
//
// Config c6 for W8 with split 1 runs `wg1::w8a8_wgmma_kernel`, the kernel of the first GPU run
// (its main loop kept verbatim; the copy descriptors are the shared TileCopier, SASS unchanged): same
// algorithm as the templated kernel, but a leaner main loop (~190 instead of
// ~320 instructions per k-tile around the four IGMMAs) that measured 1.3-1.4x faster at M >= 1024
// (4096x4096 M=4096: 133.5 vs 188.5 us on an H200). Split-K and the other tiles use the template.
// The same kernel with the per-channel W4A8 epilogue (EF = kW4PC: s1·s_x·Σ x8·q4 − sz·x_sum) runs the GEMM of the
// per-channel dequantizing config (kDequantCfg: the weights unpacked to int8 q4 first).
#include <cstdlib>

#include "w8a8_wgws.cuh"

namespace qtool_i8 {
#if defined(QTOOL_HAS_SM90A)
namespace wg1 {
constexpr int BM = 128, BN = 256, STAGES = 4, NTHR = 256;
constexpr int A_BYTES = BM * 128, B_BYTES = BN * 128, STAGE = A_BYTES + B_BYTES;
constexpr int LDR = BN + 8;
constexpr int EPI = BM * LDR * 4;
constexpr int SMEM = (STAGES * STAGE > EPI + BM * 8 ? STAGES * STAGE : EPI + BM * 8) + 1024;  // + row factors
constexpr int ITER_A = BM * 8 / NTHR, ITER_B = BN * 8 / NTHR;
using qtool_sm90::fence_proxy_async;

// The 16-bit output tile from the accumulators (tma_out): each thread scales its fragments with the rows' and
// columns' factors staged in shared memory (the same fp32 operations in the same order as Epi4::store_scaled, so the
// same bits), writes them as T pairs into four 128-row x 64-column boxes in the K-major SWIZZLE_128B layout
// (conflict-free 32-bit stores), and one thread stores the boxes with TMA, which clips rows >= M and columns >= N.
// Against the int32 tile through shared memory and reduce_store's row loop: one pass over the fragments and no
// per-row global address arithmetic or dtype branches (twenty-second session, docs/kernels-notes.md).
constexpr int OUT_BOX = BM * 128;  // one box: 128 rows x 64 16-bit columns
// Shared memory after the boxes: per column (sw, bias) and (EF = kW4PC) sz, per row (s_x, x_sum).
// (EF, the epilogue's weight format, must not be called EPI: that names the int32 tile's size here.)
constexpr int COLF = 4 * OUT_BOX, COLZ = COLF + BN * 8, ROWF = COLZ + BN * 4;
template <typename T, int EF>
__device__ __forceinline__ void scale_to_boxes(const int (&acc)[128], uint32_t box_u, const float2* colf,
                                               const float* colz, float2 rf0, float2 rf1, bool bias, int r0, int g,
                                               int tig) {
  const float sx0 = rf0.x, sx1 = rf1.x;
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    const int c = 8 * j + 2 * tig;
    const float4 f = *reinterpret_cast<const float4*>(colf + c);  // sw[c], b[c], sw[c + 1], b[c + 1]
    float y00 = (static_cast<float>(acc[4 * j]) * sx0) * f.x, y01 = (static_cast<float>(acc[4 * j + 1]) * sx0) * f.z;
    float y10 = (static_cast<float>(acc[4 * j + 2]) * sx1) * f.x, y11 = (static_cast<float>(acc[4 * j + 3]) * sx1) * f.z;
    if constexpr (EF == kW4PC) {
      const float2 z = *reinterpret_cast<const float2*>(colz + c);
      y00 = y00 - rf0.y * z.x, y01 = y01 - rf0.y * z.y, y10 = y10 - rf1.y * z.x, y11 = y11 - rf1.y * z.y;
    }
    if (bias) {
      y00 += f.y, y01 += f.w, y10 += f.y, y11 += f.w;
    }
    // rows r0 and r0 + 8 (both == g mod 8): 16-byte chunk j % 8 of the row, XOR-swizzled by g
    const uint32_t a = box_u + (c >> 6) * OUT_BOX + r0 * 128 + ((((j & 7) ^ g)) << 4) + 4 * tig;
    asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(a), "r"(pack2(T(), y00, y01)) : "memory");
    asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(a + 8 * 128), "r"(pack2(T(), y10, y11)) : "memory");
  }
}

template <int EF>
__global__ void __launch_bounds__(NTHR, 1)
    w8a8_wgmma_kernel(const GemmArgs p, const __grid_constant__ CUtensorMap tmo, const int tma_out) {
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t raw_u = smem_u32(smem_raw);
  const uint32_t base_u = (raw_u + 1023u) & ~1023u;
  uint8_t* smem = smem_raw + (base_u - raw_u);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wgi = warp >> 2, wq = warp & 3;
  const int g = lane >> 2, tig = lane & 3;
  const int M = p.M, N = p.N, K = p.K;
  const int tiles_m = (M + BM - 1) / BM, tiles_n = (N + BN - 1) / BN;
  int tm, tn;
  raster(blockIdx.x, tiles_m, tiles_n, tm, tn);
  const int m0 = tm * BM, n0 = tn * BN;
  const int nk = (K + 127) / 128;
  const TileCopier<kW8, BN, NTHR, ITER_A, ITER_B, B_BYTES> copier(p, tid, m0, n0);
  auto load_stage = [&](int slot, int kt) {
    const uint32_t sA = base_u + slot * STAGE;
    copier.load(p, sA, sA + A_BYTES, n0, kt);
  };
  RowFactor<EF> rf;
  if (tid < BM) rf.fetch(p, m0 + tid);
  uint32_t cw = 0, cz = 0, cb = 0;  // tma_out: column n0 + tid's w_scale (s1), s1_szeros and bias bits
  if (tma_out) {
    const int n = min(n0 + tid, N - 1);
    cw = ld_bits(p.sw, p.sw_dt, n);
    if constexpr (EF == kW4PC) cz = ld_bits(p.sz, p.sz_dt, n);
    if (p.bias) cb = ld_bits(p.bias, p.bias_dt, n);
  }
  int acc[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) acc[i] = 0;
#pragma unroll
  for (int s = 0; s < STAGES - 2; ++s) {
    if (s < nk) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < nk; ++kt) {
    cp_async_wait<STAGES - 3>();
    fence_proxy_async();
    __syncthreads();
    {
      const int nxt = kt + STAGES - 2;
      if (nxt < nk) load_stage(nxt % STAGES, nxt);
      cp_async_commit();
    }
    const uint32_t sA = base_u + (kt % STAGES) * STAGE + wgi * 64 * 128, sB = base_u + (kt % STAGES) * STAGE + A_BYTES;
    wg::mma_ktile<BN>(acc, sA, sB);
  }
  wg::mma_drain(acc);
  cp_async_wait<0>();
  __syncthreads();
  if (tma_out) {
    float2* colf = reinterpret_cast<float2*>(smem + COLF);  // after the output boxes, inside the stages
    float* colz = reinterpret_cast<float*>(smem + COLZ);
    float(*rows)[2] = reinterpret_cast<float(*)[2]>(smem + ROWF);
    colf[tid] = make_float2(bits_f(cw, p.sw_dt), p.bias ? bits_f(cb, p.bias_dt) : 0.f);
    if constexpr (EF == kW4PC) colz[tid] = bits_f(cz, p.sz_dt);
    if (tid < BM) rf.put(p, rows, tid);
    __syncthreads();
    const int r0 = wgi * 64 + wq * 16 + g;
    const float2 rf0 = make_float2(rows[r0][0], rows[r0][1]), rf1 = make_float2(rows[r0 + 8][0], rows[r0 + 8][1]);
    if (p.out_dt == kBF16) {
      scale_to_boxes<__nv_bfloat16, EF>(acc, base_u, colf, colz, rf0, rf1, p.bias != nullptr, r0, g, tig);
    } else {
      scale_to_boxes<__half, EF>(acc, base_u, colf, colz, rf0, rf1, p.bias != nullptr, r0, g, tig);
    }
    fence_proxy_async();  // the boxes' generic-proxy writes, before the TMA unit reads them
    __syncthreads();
    if (tid == 0) {
      for (int b = 0; b < BN / 64 && n0 + 64 * b < N; ++b) qtool_sm90::tma_store_2d(&tmo, base_u + b * OUT_BOX, n0 + 64 * b, m0);
      qtool_sm90::bulk_commit();
      qtool_sm90::bulk_wait_read();  // the boxes stay in shared memory until read
    }
    return;
  }
  float(*rowf)[2] = reinterpret_cast<float(*)[2]>(smem + EPI);  // after the reduction tile, inside the stages
  if (tid < BM) rf.put(p, rowf, tid);
  int* red = reinterpret_cast<int*>(smem);
  wg::acc_to_tile<BN, LDR>(red, acc, wgi, wq, g, tig);
  __syncthreads();
  reduce_store<EF, BM, BN, LDR, NTHR>(p, red, m0, n0, 1, 0, nullptr, rowf);
}

template <int EF>
cudaError_t launch(const GemmArgs& p, cudaStream_t stream) {
  auto kern = w8a8_wgmma_kernel<EF>;
  static cudaError_t e0 = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM);
  if (e0 != cudaSuccess) return e0;
  const int ctas = ((p.M + BM - 1) / BM) * ((p.N + BN - 1) / BN);
  // 16-bit output with 16-byte rows: the TMA-store epilogue (QTOOL_I8_TMA_OUT=0, read per call, turns it off)
  CUtensorMap tmo = {};
  const char* env = std::getenv("QTOOL_I8_TMA_OUT");
  int tma_out = p.out_dt != kF32 && p.N % 8 == 0 && !(env && env[0] == '0');
  if (tma_out && !qtool_tma::encode_rows_sw128(&tmo, p.out, p.M, p.N, BM, 2)) tma_out = 0;
  cudaLaunchAttribute attr[2];
  const cudaLaunchConfig_t lc = qtool_pdl::launch_config(dim3(ctas, 1, 1), NTHR, SMEM, stream, dim3(1, 1, 1), false, attr);
  return cudaLaunchKernelEx(&lc, kern, p, tmo, tma_out);
}

}  // namespace wg1

static cudaError_t run_w8(int cfg, const GemmArgs& p, int split, cudaStream_t stream) {
  if (is_tma_cfg(cfg)) {  // no split-K of their own: a split runs c6's cluster split-K kernel
    if (split <= 1) {
      const cudaError_t e = run_w8_tma(cfg, p, stream);
      if (e != cudaErrorNotSupported) return e;  // else no TMA descriptor for these tensors: c6
    }
    cfg = kFirstWgmmaCfg;
  }
  if (cfg == kFirstWgmmaCfg && split <= 1) return wg1::launch<kW8>(p, stream);
  return run_hopper<kW8>(cfg, p, split, stream);
}
static int occupancy_w8(int cfg) { return is_tma_cfg(cfg) ? 1 : occupancy_hopper<kW8>(cfg); }
FmtOps fmt_ops_wg_w8() { return {run_w8, occupancy_w8}; }
cudaError_t run_w8_weights_pc_epilogue(const GemmArgs& p, cudaStream_t stream) { return wg1::launch<kW4PC>(p, stream); }
bool wgmma_available() { return true; }
#else
static cudaError_t no_run(int, const GemmArgs&, int, cudaStream_t) { return cudaErrorNotSupported; }
static int no_occ(int) { return 0; }
FmtOps fmt_ops_wg_w8() { return {no_run, no_occ}; }
cudaError_t run_w8_weights_pc_epilogue(const GemmArgs&, cudaStream_t) { return cudaErrorNotSupported; }
bool wgmma_available() { return false; }
#endif
}  // namespace qtool_i8
