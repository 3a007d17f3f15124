// W8A8 wgmma (sm_90a) instantiations; see w8a8_wgmma.cuh.
//
// Config c6 for W8 with split 1 runs `wg1::w8a8_wgmma_kernel`, the kernel of the first GPU run
// (its main loop kept verbatim; the copy descriptors are the shared TileCopier, SASS unchanged): same
// algorithm as the templated kernel, but a leaner main loop (~190 instead of
// ~320 instructions per k-tile around the four IGMMAs) that measured 1.3-1.4x faster at M >= 1024
// (4096x4096 M=4096: 133.5 vs 188.5 us on an H200). Split-K and the other tiles use the template.
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
using qtool_sm90::desc_sw128;
using qtool_sm90::fence_proxy_async;
using qtool_sm90::wgmma_commit;
using qtool_sm90::wgmma_fence;
using qtool_sm90::wgmma_wait;
using wg::wgmma_n256;  // d += A(64x32) * B(256x32)^T, int8 -> int32, both from shared-memory descriptors

__global__ void __launch_bounds__(NTHR, 1) w8a8_wgmma_kernel(const GemmArgs p) {
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
  RowFactor<kW8> rf;
  if (tid < BM) rf.fetch(p, m0 + tid);
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
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < 4; ++s) wgmma_n256(acc, desc_sw128(sA + 32 * s), desc_sw128(sB + 32 * s));
    wgmma_commit();
    wgmma_wait<1>();
  }
  wgmma_wait<0>();
#pragma unroll
  for (int i = 0; i < 128; ++i) asm volatile("" : "+r"(acc[i])::"memory");
  cp_async_wait<0>();
  __syncthreads();
  float(*rowf)[2] = reinterpret_cast<float(*)[2]>(smem + EPI);  // after the reduction tile, inside the stages
  if (tid < BM) rf.put(p, rowf, tid);
  int* red = reinterpret_cast<int*>(smem);
  const int rbase = wgi * 64 + wq * 16 + g;
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    const int c = 8 * j + 2 * tig;
    *reinterpret_cast<int2*>(red + rbase * LDR + c) = make_int2(acc[4 * j], acc[4 * j + 1]);
    *reinterpret_cast<int2*>(red + (rbase + 8) * LDR + c) = make_int2(acc[4 * j + 2], acc[4 * j + 3]);
  }
  __syncthreads();
  reduce_store<kW8, BM, BN, LDR, NTHR>(p, red, m0, n0, 1, 0, nullptr, rowf);
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
  if (cfg == kFirstWgmmaCfg && split <= 1) {
    static cudaError_t e0 =
        cudaFuncSetAttribute(wg1::w8a8_wgmma_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, wg1::SMEM);
    if (e0 != cudaSuccess) return e0;
    const int ctas = ((p.M + wg1::BM - 1) / wg1::BM) * ((p.N + wg1::BN - 1) / wg1::BN);
    return launch_kernel(wg1::w8a8_wgmma_kernel, dim3(ctas, 1, 1), wg1::NTHR, wg1::SMEM, 1, stream, p);
  }
  return run_hopper<kW8>(cfg, p, split, stream);
}
static int occupancy_w8(int cfg) { return is_tma_cfg(cfg) ? 1 : occupancy_hopper<kW8>(cfg); }
FmtOps fmt_ops_wg_w8() { return {run_w8, occupancy_w8}; }
bool wgmma_available() { return true; }
#else
static cudaError_t no_run(int, const GemmArgs&, int, cudaStream_t) { return cudaErrorNotSupported; }
static int no_occ(int) { return 0; }
FmtOps fmt_ops_wg_w8() { return {no_run, no_occ}; }
bool wgmma_available() { return false; }
#endif
}  // namespace qtool_i8
