// kPeerCfg (W4A8 per-group, sm_90a): c20's dequantization folded into the W8A8 GEMM's own launch.
//
// c20 runs the dequantizing kernel (W8 = q4·s2 + s2_zeros into scratch memory) and then the W8A8 GEMM; at M = 1024
// the separate pass adds 35-45 % to the GEMM's time, because the tensor cores idle while it streams. Here the
// tiles_m CTAs that share a 256-feature weight column (one per 128-token row tile) dequantize that column
// *together*, each 1/tiles_m of every k-tile, a few k-tiles ahead of their own main loop, and publish a per-(column,
// k-tile) count of converted 32x32 tiles; a CTA copies a k-tile of W8 only once the count is complete. Every W4
// tile is converted once, by a warp that otherwise waits on its wgmma, and the W8 k-tiles are read from L2 right
// after they are written. The main loop is c6's first-run kernel (w8a8_wgmma.cu), and the int32 sums and the
// epilogue are those of c20's W8A8 GEMM, so the output is bitwise c20's.
//
// Progress: CTAs take their tile from a ticket (an atomic counter), so the CTAs of a column hold consecutive
// tickets and a CTA waits only on CTAs that were already scheduled or will be as soon as any earlier one
// finishes — no deadlock whatever order the hardware starts CTAs in, as long as tiles_m CTAs fit on the GPU at
// once (the launcher restricts the config to 4 ≤ tiles_m ≤ 64; outside that it runs c20). The ticket and the
// counts live in a header after the W8 scratch, zeroed by a memset node before the kernel.
#include <cstdlib>

#include "w8a8_wgws.cuh"

namespace qtool_i8 {

__host__ __device__ __forceinline__ size_t header_offset(int N, int K) { return (static_cast<size_t>(N) * K + 15) / 16 * 16; }
size_t peer_header_offset(int N, int K) { return header_offset(N, K); }
size_t peer_header_bytes(int N, int K) {
  return 16 + 4 * static_cast<size_t>((N + 255) / 256) * ((K + 127) / 128);
}

#if defined(QTOOL_HAS_SM90A)
namespace peer {
constexpr int BM = 128, BN = 256, STAGES = 4, NTHR = 256;
constexpr int A_BYTES = BM * 128, B_BYTES = BN * 128, STAGE = A_BYTES + B_BYTES;
// per stage slot and converting warp: the lane's 16 raw bytes (512 B) + its s2 word (128 B) + zero word (128 B)
constexpr int CONV_WARP = 768, CONV_SLOT = 8 * CONV_WARP;
constexpr int MAIN = STAGES * STAGE + STAGES * CONV_SLOT;
constexpr int LDR = BN + 8;
constexpr int EPI = BM * LDR * 4;
constexpr int SMEM = (MAIN > EPI ? MAIN : EPI) + 1024;
constexpr int ITER_A = BM * 8 / NTHR, ITER_B = BN * 8 / NTHR;
static_assert(SMEM <= 227 * 1024, "shared memory");
using qtool_sm90::desc_sw128;
using qtool_sm90::fence_proxy_async;
using qtool_sm90::wgmma_commit;
using qtool_sm90::wgmma_fence;
using qtool_sm90::wgmma_wait;
using wg::wgmma_n256;

__device__ __forceinline__ int ld_relaxed(const int* a) {
  int v;
  asm volatile("ld.relaxed.gpu.global.s32 %0, [%1];\n" : "=r"(v) : "l"(a) : "memory");
  return v;
}
// +1 with release semantics: this thread's earlier stores (and, through __syncwarp, its warp's) are visible
// at GPU scope before the count is.
__device__ __forceinline__ void red_release_add1(int* a) {
  asm volatile("red.release.gpu.global.add.s32 [%0], 1;\n" ::"l"(a) : "memory");
}

// LEAD: how many k-tiles ahead of its main loop a CTA dequantizes its share (>= 3: the count of k-tile kt + 2, which
// the loop waits for at k-tile kt, is then published at the peers' k-tile kt - 1 or earlier)
// EARLY: convert right after the loop's barrier, before the stage copies are issued (else after the wgmma issue)
template <int LEAD, bool EARLY>
__global__ void __launch_bounds__(NTHR, 1) w4pg_peer_kernel(const GemmArgs p) {
  static_assert(LEAD >= 3, "lead");
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  __shared__ int s_ticket;
  const uint32_t raw_u = smem_u32(smem_raw);
  const uint32_t base_u = (raw_u + 1023u) & ~1023u;
  uint8_t* smem = smem_raw + (base_u - raw_u);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wgi = warp >> 2, wq = warp & 3;
  const int g = lane >> 2, tig = lane & 3;
  const int M = p.M, N = p.N, K = p.K, KT32 = K / 32;
  const int tiles_m = (M + BM - 1) / BM;
  const int nk = (K + 127) / 128;
  int* hdr = reinterpret_cast<int*>(p.ws + header_offset(N, K));
  if (tid == 0) s_ticket = atomicAdd(hdr, 1);
  __syncthreads();
  const int ticket = s_ticket;
  const int tn = ticket / tiles_m, tm = ticket % tiles_m;
  const int m0 = tm * BM, n0 = tn * BN;
  int* counts = hdr + 4 + tn * nk;
  const int rows32 = min(BN, N - n0) / 32;  // N % 32 == 0
  auto target = [&](int kt) { return rows32 * min(4, KT32 - 4 * kt); };

  // This warp's share of the column's dequantization: 32x32 tile t = tm + tiles_m·c of every k-tile (row tile
  // t / 4, k32 step t % 4), c spreading the converting warps over both warpgroups.
  const int c = 2 * wq + wgi;
  const int t = tm + tiles_m * c;
  const int ntile = n0 / 32 + (t >> 2), ks = t & 3;
  const bool conv = t < 32 && (t >> 2) < rows32;
  const uint8_t* qw = static_cast<const uint8_t*>(p.B) + (static_cast<size_t>(ntile) * KT32 + ks) * 512 + 16 * lane;
  int8_t* w8 = p.ws + static_cast<size_t>(ntile * 32 + g) * K + ks * 32 + 4 * tig;
  auto conv_ok = [&](int kt) { return conv && 4 * kt + ks < KT32; };
  auto s2_off = [&](int kt) { return static_cast<size_t>((kt * 128 + ks * 32) / p.group) * N + ntile * 32 + 4 * g; };
  // convert and store k-tile kt's tile from the words (w, s2w, zw), then count it
  auto convert_store = [&](int kt, uint4 w, uint32_t s2w, uint32_t zw) {
    uint32_t b[4][2];
    w4_fragments<kW4PG>(w, s2w, zw, b);
    int8_t* dst = w8 + kt * 128;
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) *reinterpret_cast<uint32_t*>(dst + static_cast<size_t>(8 * j) * K + 16 * h) = b[j][h];
    __syncwarp();
    if (lane == 0) red_release_add1(counts + kt);
  };
  // the words of k-tile kt into conversion slot `slot` (cp.async, in the stage's commit group)
  auto load_conv = [&](int slot, int kt) {
    if (!conv_ok(kt)) return;
    const uint32_t d = base_u + STAGES * STAGE + slot * CONV_SLOT + c * CONV_WARP;
    cp_async16(d + 16 * lane, qw + static_cast<size_t>(kt) * 2048, true);
    const size_t so = s2_off(kt);
    ws::cp_async4(d + 512 + 4 * lane, p.s2 + so, true);
    ws::cp_async4(d + 640 + 4 * lane, p.z2 + so, true);
  };

  GemmArgs q = p;
  q.B = p.ws;  // the GEMM reads the W8 scratch
  const TileCopier<kW8, BN, NTHR, ITER_A, ITER_B, B_BYTES> copier(q, tid, m0, n0);
  auto wait_count = [&](int kt, int seen) {  // thread 0: until k-tile kt of the column is complete
    const int want = target(kt);
    // (bounded: a peer that can never run — fewer free SMs than tiles_m — ends in an error, not a hang)
    for (unsigned spins = 0; seen < want; ++spins) {
      if (spins == (1u << 24)) __trap();
      seen = ld_relaxed(counts + kt);
    }
  };
  auto load_stage = [&](int slot, int kt) {
    const uint32_t sA = base_u + slot * STAGE;
    copier.load(q, sA, sA + A_BYTES, n0, kt);
    load_conv(slot, kt + LEAD);
  };

  // prologue: this CTA's share of k-tiles 0 .. LEAD-1, straight from global memory (loads first)
  {
    uint4 w[LEAD];
    uint32_t s2w[LEAD], zw[LEAD];
#pragma unroll
    for (int kt = 0; kt < LEAD; ++kt) {
      if (kt < nk && conv_ok(kt)) {
        w[kt] = __ldg(reinterpret_cast<const uint4*>(qw + static_cast<size_t>(kt) * 2048));
        const size_t so = s2_off(kt);
        s2w[kt] = __ldg(reinterpret_cast<const unsigned int*>(p.s2 + so));
        zw[kt] = __ldg(reinterpret_cast<const unsigned int*>(p.z2 + so));
      }
    }
#pragma unroll
    for (int kt = 0; kt < LEAD; ++kt)
      if (kt < nk && conv_ok(kt)) convert_store(kt, w[kt], s2w[kt], zw[kt]);
  }

  // at k-tile kt: this CTA's share of k-tile kt + LEAD (its words landed with stage kt)
  auto convert_ahead = [&](int kt) {
    if (kt + LEAD < nk && conv_ok(kt + LEAD)) {
      const uint8_t* d = smem + STAGES * STAGE + (kt % STAGES) * CONV_SLOT + c * CONV_WARP;
      const uint4 w = *reinterpret_cast<const uint4*>(d + 16 * lane);
      const uint32_t s2w = *reinterpret_cast<const uint32_t*>(d + 512 + 4 * lane);
      const uint32_t zw = *reinterpret_cast<const uint32_t*>(d + 640 + 4 * lane);
      convert_store(kt + LEAD, w, s2w, zw);
    }
  };

  int acc[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) acc[i] = 0;
#pragma unroll
  for (int s = 0; s < STAGES - 2; ++s) {
    if (s < nk) {
      if (tid == 0) wait_count(s, 0);
      __syncthreads();
      load_stage(s, s);
    }
    cp_async_commit();
  }
  int seen = 0;  // thread 0: the count of k-tile kt + STAGES - 1, read one iteration early
  for (int kt = 0; kt < nk; ++kt) {
    cp_async_wait<STAGES - 3>();
    fence_proxy_async();
    const int nxt = kt + STAGES - 2;
    if (tid == 0 && nxt < nk) wait_count(nxt, seen);
    __syncthreads();  // stage kt landed; wgmma(kt - 2) finished; k-tile nxt of W8 complete
    if constexpr (EARLY) convert_ahead(kt);
    if (nxt < nk) load_stage(nxt % STAGES, nxt);
    cp_async_commit();
    const uint32_t sA = base_u + (kt % STAGES) * STAGE + wgi * 64 * 128, sB = base_u + (kt % STAGES) * STAGE + A_BYTES;
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < 4; ++s) wgmma_n256(acc, desc_sw128(sA + 32 * s), desc_sw128(sB + 32 * s));
    wgmma_commit();
    if (tid == 0 && nxt + 1 < nk) seen = ld_relaxed(counts + nxt + 1);
    if constexpr (!EARLY) convert_ahead(kt);  // while the tensor cores run
    wgmma_wait<1>();
  }
  wgmma_wait<0>();
#pragma unroll
  for (int i = 0; i < 128; ++i) asm volatile("" : "+r"(acc[i])::"memory");
  cp_async_wait<0>();
  __syncthreads();
  int* red = reinterpret_cast<int*>(smem);
  const int rbase = wgi * 64 + wq * 16 + g;
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    const int cc = 8 * j + 2 * tig;
    *reinterpret_cast<int2*>(red + rbase * LDR + cc) = make_int2(acc[4 * j], acc[4 * j + 1]);
    *reinterpret_cast<int2*>(red + (rbase + 8) * LDR + cc) = make_int2(acc[4 * j + 2], acc[4 * j + 3]);
  }
  __syncthreads();
  reduce_store<kW8, BM, BN, LDR, NTHR>(q, red, m0, n0, 1, 0);
}
}  // namespace peer

bool peer_fits(int M) {
  const int tiles_m = (M + peer::BM - 1) / peer::BM;
  return tiles_m >= 4 && tiles_m <= 64;
}

cudaError_t run_w4pg_peer(const GemmArgs& p, cudaStream_t stream) {
  // Variants (read per call): QTOOL_I8_PEER_LEAD=6 dequantizes 6 k-tiles ahead instead of 4; QTOOL_I8_PEER_EARLY=1
  // converts before the stage copies instead of after the wgmma issue
  using Kern = void (*)(GemmArgs);
  static const Kern kerns[4] = {peer::w4pg_peer_kernel<4, false>, peer::w4pg_peer_kernel<6, false>,
                                peer::w4pg_peer_kernel<4, true>, peer::w4pg_peer_kernel<6, true>};
  static const cudaError_t e0 = [] {
    for (Kern k : kerns) {
      const cudaError_t e = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, peer::SMEM);
      if (e != cudaSuccess) return e;
    }
    return cudaSuccess;
  }();
  if (e0 != cudaSuccess) return e0;
  const char* lead = std::getenv("QTOOL_I8_PEER_LEAD");
  const char* early = std::getenv("QTOOL_I8_PEER_EARLY");
  const Kern kern = kerns[(lead && lead[0] == '6' ? 1 : 0) + (early && early[0] == '1' ? 2 : 0)];
  cudaError_t e = cudaMemsetAsync(p.ws + peer_header_offset(p.N, p.K), 0, peer_header_bytes(p.N, p.K), stream);
  if (e != cudaSuccess) return e;
  const int ctas = ((p.M + peer::BM - 1) / peer::BM) * ((p.N + peer::BN - 1) / peer::BN);
  GemmArgs q = p;
  q.pdl = 0;
  return launch_kernel(kern, dim3(ctas, 1, 1), peer::NTHR, peer::SMEM, 1, stream, q);
}
bool peer_available() { return true; }
#else
bool peer_fits(int) { return false; }
cudaError_t run_w4pg_peer(const GemmArgs&, cudaStream_t) { return cudaErrorNotSupported; }
bool peer_available() { return false; }
#endif

}  // namespace qtool_i8
