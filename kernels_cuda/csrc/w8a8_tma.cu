// W8A8 on sm_90a with TMA-multicast operand tiles: config c26 (kFirstTmaCfg), large M.
//
// The idea: c6 (w8a8_wgmma.cu) runs 128x256 CTA tiles whose k-tile of 128 reads 48 KB per CTA from L2 (16 KB of
// activations, 32 KB of weights) for 128·256·128 MACs; at the INT8 tensor-core rate (~4096 MACs per cycle and SM)
// that would be ~48 B per cycle and SM, ~11 TB/s over 132 SMs, more than the L2 was assumed to deliver. Here the CM
// CTAs of a thread-block cluster that share a weight column (consecutive 128-token row tiles) each load 1/CM of the
// 256 x 128 B weight tile and multicast it into all CM, so a CTA reads 16 + 32/CM KB per k-tile.
// Measured (H100, docs/benchmarks.md, twenty-second session): bitwise c6, and not faster — c26 (CM = 2) 0.97x c6;
// CM = 4 and a 2 x 2 cluster sharing the activations too (taken out) 0.52x at M = 1024, where their clusters of four
// do not all fit at once (4096x4096: 128 CTAs in two waves). L2 bandwidth is not what holds c6 below the INT8 peak
// (c6's k-tile runs at ~80 % of it; ~8 us per tile outside the k loop was the cost, ~6 after c6's TMA-store epilogue,
// docs/kernels-notes.md), so c26 is opt-in (QTOOL_I8_W8_TMA=26). Its epilogue is still the int32 tile + reduce_store.
//
// Structure (the usual Hopper warp-specialised ring): 4 stages of 48 KB; one producer thread issues the TMA copies
// of a stage once every consumer warp of every CTA in the cluster has released that slot (its "empty" mbarrier
// counts 8 warps x cluster size arrivals) and arms the stage's "full" mbarrier with the 48 KB the copies of all
// CTAs deliver into this CTA; two consumer warpgroups (64 rows each) wait on "full", issue c6's four m64n256k32
// wgmma per k-tile from shared-memory descriptors, and release the previous slot after wgmma.wait_group 1. The
// epilogue is c6's (int32 tile through shared memory, reduce_store): the same int32 sums, so the same bits as c6.
// No split-K (a split > 1 runs c6's cluster split-K kernel instead). Rows / columns past M / N and k past K arrive
// as zeros from the TMA unit; a cluster's row tiles past M compute zeros and store nothing.
#include "w8a8_wgws.cuh"

namespace qtool_i8 {

#if defined(QTOOL_HAS_SM90A)
namespace tma8 {
constexpr int BM = 128, BN = 256, STAGES = 4, NCONS = 256, NTHR = NCONS + 128;
// registers after setmaxnreg: consumers CR (128 accumulators), the producer warpgroup PR (384 threads start with
// 168; 2 x 128 x 232 + 128 x 40 = 64512 <= 65536)
constexpr int CR = 232, PR = 40;
constexpr int A_BYTES = BM * 128, B_BYTES = BN * 128, STAGE = A_BYTES + B_BYTES;
constexpr int LDR = BN + 8;
constexpr int EPI = BM * LDR * 4;
constexpr int MAIN = STAGES * STAGE;
constexpr int BARS = MAIN > EPI + BM * 8 ? MAIN : EPI + BM * 8;  // mbarriers after the stages, the epilogue tile
                                                                 // and its row factors
constexpr int SMEM = BARS + 16 * STAGES + 1024;  // + alignment slack
using qtool_sm90::mbar_arrive_expect_tx;
using qtool_sm90::mbar_arrive_remote;
using qtool_sm90::mbar_init;
using qtool_sm90::mbar_wait;

__device__ __forceinline__ void consumer_sync() { asm volatile("bar.sync 1, %0;\n" ::"n"(NCONS) : "memory"); }

template <int CM>
__global__ void __launch_bounds__(NTHR, 1)
    w8a8_tma_kernel(const GemmArgs p, const __grid_constant__ CUtensorMap tma, const __grid_constant__ CUtensorMap tmb) {
  constexpr int CS = CM;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t raw_u = smem_u32(smem_raw);
  const uint32_t base_u = (raw_u + 1023u) & ~1023u;
  uint8_t* smem = smem_raw + (base_u - raw_u);
  const uint32_t bar_full = base_u + BARS, bar_empty = bar_full + 8 * STAGES;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int M = p.M, N = p.N, K = p.K;
  const int tiles_m = (M + BM - 1) / BM, tiles_n = (N + BN - 1) / BN;
  // cluster rank rm: the row tile within the cluster's CM (one weight column)
  const int rm = CS > 1 ? static_cast<int>(qtool_sm90::cluster_ctarank()) : 0;
  int tmc, tn;
  raster(blockIdx.x / CS, (tiles_m + CM - 1) / CM, tiles_n, tmc, tn);
  const int m0 = (tmc * CM + rm) * BM, n0 = tn * BN;
  const int nk = (K + 127) / 128;
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(bar_full + 8 * s, 1);                  // the producer's arrive.expect_tx
      mbar_init(bar_empty + 8 * s, NCONS / 32 * CS);  // every consumer warp of the cluster
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  // the peers' multicasts and arrivals find our barriers initialised
  if constexpr (CS > 1) {
    qtool_sm90::cluster_sync_relaxed();
  } else {
    __syncthreads();
  }

  if (warp >= NCONS / 32) {
    // ------------------------------------------------------------------ producer: one thread issues the copies
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(PR) : "memory");
    if (tid == NCONS) {
      const uint16_t bmask = static_cast<uint16_t>((1u << CM) - 1u);  // the weights: every CTA of the cluster
      for (int i = 0; i < nk; ++i) {
        const int slot = i % STAGES;
        if (i >= STAGES) mbar_wait(bar_empty + 8 * slot, ((i / STAGES) + 1) & 1);
        const uint32_t full = bar_full + 8 * slot;
        mbar_arrive_expect_tx(full, STAGE);  // what all the cluster's copies deliver into this CTA's slot
        const uint32_t sA = base_u + slot * STAGE, sB = sA + A_BYTES;
        qtool_sm90::tma_load_2d(sA, &tma, i * 128, m0, full);
        if constexpr (CM == 1) {
          qtool_sm90::tma_load_2d(sB, &tmb, i * 128, n0, full);
        } else {
          qtool_sm90::tma_load_2d_multicast(sB + rm * (BN / CM) * 128, &tmb, i * 128, n0 + rm * (BN / CM), full, bmask);
        }
      }
    }
    __syncwarp();
  } else {
    // ------------------------------------------------------------------ consumers: c6's wgmma stream
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(CR) : "memory");
    const int wgi = warp >> 2, wq = warp & 3;
    const int g = lane >> 2, tig = lane & 3;
    auto release = [&](int slot) {  // this warp has finished reading `slot`: tell every CTA that writes into it
      if (lane == 0) {
        if constexpr (CS == 1) {
          qtool_sm90::mbar_arrive(bar_empty + 8 * slot);
        } else {
#pragma unroll
          for (int q = 0; q < CS; ++q) mbar_arrive_remote(bar_empty + 8 * slot, static_cast<uint32_t>(q));
        }
      }
    };
    RowFactor<kW8> rf;
    if (tid < BM) rf.fetch(p, m0 + tid);
    int acc[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0;
    for (int i = 0; i < nk; ++i) {
      const int slot = i % STAGES;
      mbar_wait(bar_full + 8 * slot, (i / STAGES) & 1);
      const uint32_t sA = base_u + slot * STAGE + wgi * 64 * 128, sB = base_u + slot * STAGE + A_BYTES;
      wg::mma_ktile<BN>(acc, sA, sB);
      if (i >= 1) release((i - 1) % STAGES);  // the wgmma group of k-tile i - 1 has retired
    }
    wg::mma_drain(acc);
    // every copy into this CTA has landed (each was waited on), and both warpgroups are done reading the stages
    consumer_sync();
    float(*rowf)[2] = reinterpret_cast<float(*)[2]>(smem + EPI);  // after the reduction tile, inside the stages
    if (tid < BM) rf.put(p, rowf, tid);
    int* red = reinterpret_cast<int*>(smem);
    wg::acc_to_tile<BN, LDR>(red, acc, wgi, wq, g, tig);
    consumer_sync();
    reduce_store<kW8, BM, BN, LDR, NCONS>(p, red, m0, n0, 1, 0, nullptr, rowf);
  }
  // no peer arrival reaches this CTA's barriers after it exits
  __syncwarp();
  if constexpr (CS > 1) qtool_sm90::cluster_sync_all();
}

template <int CM>
cudaError_t run(const GemmArgs& p, cudaStream_t stream) {
  auto kern = w8a8_tma_kernel<CM>;
  static const cudaError_t e0 = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM);
  if (e0 != cudaSuccess) return e0;
  CUtensorMap ta, tb;
  if (!qtool_tma::encode_rows_sw128(&ta, p.A, p.M, p.K, BM, 1) ||
      !qtool_tma::encode_rows_sw128(&tb, p.B, p.N, p.K, BN / CM, 1))
    return cudaErrorNotSupported;  // the caller runs c6
  const int tiles_m = (p.M + BM - 1) / BM, tiles_n = (p.N + BN - 1) / BN;
  const int clusters = ((tiles_m + CM - 1) / CM) * tiles_n;
  cudaLaunchAttribute attr[2];
  const cudaLaunchConfig_t lc =
      qtool_pdl::launch_config(dim3(clusters * CM, 1, 1), NTHR, SMEM, stream, dim3(CM, 1, 1), false, attr);
  return cudaLaunchKernelEx(&lc, kern, p, ta, tb);
}
}  // namespace tma8

bool tma_w8_available() { return true; }
cudaError_t run_w8_tma(int cfg, const GemmArgs& p, cudaStream_t stream) {
  switch (cfg - kFirstTmaCfg) {
    case 0:
      return tma8::run<2>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}
#else
bool tma_w8_available() { return false; }
cudaError_t run_w8_tma(int, const GemmArgs&, cudaStream_t) { return cudaErrorNotSupported; }
#endif

}  // namespace qtool_i8
