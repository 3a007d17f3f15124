// kPeerCfg (W4A8 per-group, sm_90a): c20's dequantization folded into the W8A8 GEMM's own launch.
//
// c20 runs the dequantizing kernel (W8 = q4·s2 + s2_zeros into scratch memory) and then the W8A8 GEMM; at M = 1024
// the separate pass adds 35-45 % to the GEMM's time, because the tensor cores idle while it streams. Here the
// tiles_m CTAs that share a 256-feature weight column (one per 128-token row tile) dequantize that column
// *together*, each 1/tiles_m of every k-tile, a few k-tiles ahead of their own main loop, and publish a per-(column,
// k-tile) count of converted 32x32 tiles; a CTA copies a k-tile of W8 only once the count is complete. Every W4
// tile is converted once, by a converter warpgroup beside the two consumer warpgroups, and the W8 k-tiles are read
// from L2 soon after they are written. The main loop is c6's first-run kernel (w8a8_wgmma.cu), and the int32 sums and the
// epilogue are those of c20's W8A8 GEMM, so the output is bitwise c20's.
//
// Measured (H100, twenty-first session, docs/benchmarks.md): correct, and slower than c20 — x W8A8 0.51 at M = 1024
// and 0.71 at M = 4096 against c20's 0.76 / 0.93 — so it is opt-in (QTOOL_I8_W4PG_PEER=1); docs/kernels-notes.md has
// the three versions tried and what was not yet isolated.
//
// Progress: CTAs take their tile from a ticket (an atomic counter), so the CTAs of a column hold consecutive
// tickets and a CTA waits only on CTAs that were already scheduled or will be as soon as any earlier one
// finishes — no deadlock whatever order the hardware starts CTAs in, as long as tiles_m CTAs fit on the GPU at
// once (the launcher restricts the config to 4 ≤ tiles_m ≤ 64; outside that it runs c20). The ticket and the
// counts live in a header after the W8 scratch, zeroed by a memset node before the kernel.
#include "w8a8_wgws.cuh"

namespace qtool_i8 {

__host__ __device__ __forceinline__ size_t header_offset(int N, int K) { return (static_cast<size_t>(N) * K + 15) / 16 * 16; }
size_t peer_header_offset(int N, int K) { return header_offset(N, K); }
size_t peer_header_bytes(int N, int K) {
  return 16 + 4 * static_cast<size_t>((N + 255) / 256) * ((K + 127) / 128);
}

#if defined(QTOOL_HAS_SM90A)
namespace peer {
constexpr int BM = 128, BN = 256, STAGES = 4, NTHR = 256, NTHR_ALL = NTHR + 128;
// registers per thread after setmaxnreg: consumers CR, converters PR (384 threads start with 168; 2 x 128 x 208 +
// 128 x 88 = 65536 - 1024; ptxas allots per region: a smaller PR spills the converters' chunk)
constexpr int CR = 208, PR = 88;
constexpr int A_BYTES = BM * 128, B_BYTES = BN * 128, STAGE = A_BYTES + B_BYTES;
constexpr int LDR = BN + 8;
constexpr int EPI = BM * LDR * 4;
constexpr int MAIN = STAGES * STAGE;
constexpr int SMEM = (MAIN > EPI ? MAIN : EPI) + 1024;
constexpr int ITER_A = BM * 8 / NTHR, ITER_B = BN * 8 / NTHR;
constexpr int CMAX = 8;  // a CTA's 32x32 tiles per k-tile of its column: 32 / tiles_m <= 8 (tiles_m >= 4)
using qtool_sm90::fence_proxy_async;

__device__ __forceinline__ int ld_acquire_gpu(const int* a) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];\n" : "=r"(v) : "l"(a) : "memory");
  return v;
}
__device__ __forceinline__ void red_relaxed_add(int* a, int v) {
  asm volatile("red.relaxed.gpu.global.add.s32 [%0], %1;\n" ::"l"(a), "r"(v) : "memory");
}
__device__ __forceinline__ int ld_acquire_cta_shared(const int* a) {
  int v;
  asm volatile("ld.acquire.cta.shared.s32 %0, [%1];\n" : "=r"(v) : "r"(smem_u32(a)) : "memory");
  return v;
}
__device__ __forceinline__ void st_release_cta_shared(int* a, int v) {
  asm volatile("st.release.cta.shared.s32 [%0], %1;\n" ::"r"(smem_u32(a)), "r"(v) : "memory");
}
__device__ __forceinline__ void consumer_sync() { asm volatile("bar.sync 1, %0;\n" ::"n"(NTHR) : "memory"); }

// Warps 0-7: c6's main loop and epilogue (their own named barrier). Warps 8-11: this CTA's share of the column's
// dequantization, CH 32x32 tiles per warp at a time (their loads first), one fence per CH tiles before the counts are
// raised; between its chunks warp 8 reads the column's counts (32 k-tiles per warp-wide read) and publishes in shared memory
// how many leading k-tiles are complete, which is all the consumers wait on: the converter's fences and L2 round
// trips stay off the wgmma issue path (v1 converted in the consumer warps after each wgmma issue: 0.32-0.39x W8A8,
// the fence per k-tile stalling the loop).
template <int CH>
__global__ void __launch_bounds__(NTHR_ALL, 1) w4pg_peer_kernel(const GemmArgs p) {
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  __shared__ int s_ticket, s_ready;
  const uint32_t raw_u = smem_u32(smem_raw);
  const uint32_t base_u = (raw_u + 1023u) & ~1023u;
  uint8_t* smem = smem_raw + (base_u - raw_u);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int M = p.M, N = p.N, K = p.K, KT32 = K / 32;
  const int tiles_m = (M + BM - 1) / BM;
  const int nk = (K + 127) / 128;
  int* hdr = reinterpret_cast<int*>(p.ws + header_offset(N, K));
  if (tid == 0) {
    s_ticket = atomicAdd(hdr, 1);
    s_ready = 0;
  }
  __syncthreads();
  const int ticket = s_ticket;
  const int tn = ticket / tiles_m, tm = ticket % tiles_m;
  const int m0 = tm * BM, n0 = tn * BN;
  int* counts = hdr + 4 + tn * nk;
  const int rows32 = min(BN, N - n0) / 32;  // N % 32 == 0
  auto target = [&](int kt) { return rows32 * min(4, KT32 - 4 * kt); };

  if (warp >= NTHR / 32) {
    // ------------------------------------------------------------------ converter warpgroup
    // (a ninth warp alone does not fit: an SM sub-partition holding three warps caps them at 168 registers, which
    // spills the consumers' 128 accumulators; so a whole warpgroup, with setmaxnreg as in the wgws kernels)
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(PR) : "memory");
    // warps 8-10 convert, chunks pw, pw + 3, ... (the next chunk's loads issued before this one's fence, so the fence
    // and the load latency overlap); warp 11 only publishes
    const int pw = warp - NTHR / 32;
    constexpr int NCW = 3;
    // this CTA's tiles of each k-tile: t = tm + tiles_m·c (row tile t / 4, k32 step t % 4), nc of them
    int nc = 0;
    while (nc < CMAX && tm + tiles_m * nc < 4 * rows32) ++nc;
    const int g = lane >> 2, tig = lane & 3;
    const int units = nc * nk;
    if (pw == NCW) {
      // the count of leading complete k-tiles, read 32 at a time; published for the consumers
      int published = 0;
      while (published < nk) {
        const int kt = published + lane;
        const bool done = kt >= nk || ld_acquire_gpu(counts + kt) >= target(kt);
        const unsigned nd = ~__ballot_sync(0xffffffffu, done);
        const int run = nd ? __ffs(nd) - 1 : 32;
        __syncwarp();
        if (run > 0) {
          published = min(nk, published + run);
          if (lane == 0) st_release_cta_shared(&s_ready, published);
        }
        if (run < 32) __nanosleep(100);
      }
      return;
    }
    struct Chunk {
      uint4 w[CH];
      uint32_t s2w[CH], zw[CH];
    };
    auto unit_ok = [&](int u) { return u < units && 4 * (u / nc) + ((tm + tiles_m * (u % nc)) & 3) < KT32; };
    auto load_chunk = [&](Chunk& c, int u0) {
#pragma unroll
      for (int i = 0; i < CH; ++i) {
        const int u = u0 + i, kt = u / nc, t = tm + tiles_m * (u % nc);
        const int ks = t & 3;
        if (unit_ok(u)) {
          const int ntile = n0 / 32 + (t >> 2);
          c.w[i] = __ldg(reinterpret_cast<const uint4*>(static_cast<const uint8_t*>(p.B) +
                                                        (static_cast<size_t>(ntile) * KT32 + 4 * kt + ks) * 512) + lane);
          const size_t so = static_cast<size_t>((kt * 128 + ks * 32) / p.group) * N + ntile * 32 + 4 * g;
          c.s2w[i] = __ldg(reinterpret_cast<const unsigned int*>(p.s2 + so));
          c.zw[i] = __ldg(reinterpret_cast<const unsigned int*>(p.z2 + so));
        }
      }
    };
    Chunk cur, nxt;
    int u0 = pw * CH;
    if (u0 < units) load_chunk(cur, u0);
    for (; u0 < units; u0 += NCW * CH) {
      const int un = u0 + NCW * CH;
      if (un < units) load_chunk(nxt, un);
#pragma unroll
      for (int i = 0; i < CH; ++i) {
        const int u = u0 + i;
        if (!unit_ok(u)) continue;
        const int kt = u / nc, t = tm + tiles_m * (u % nc);
        const int ntile = n0 / 32 + (t >> 2);
        uint32_t b[4][2];
        w4_fragments<kW4PG>(cur.w[i], cur.s2w[i], cur.zw[i], b);
        int8_t* dst = p.ws + static_cast<size_t>(ntile * 32 + g) * K + kt * 128 + (t & 3) * 32 + 4 * tig;
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int h = 0; h < 2; ++h)
            *reinterpret_cast<uint32_t*>(dst + static_cast<size_t>(8 * j) * K + 16 * h) = b[j][h];
      }
      // one fence for the chunk, then each k-tile it touched gets the number of its tiles converted here
      __syncwarp();
      __threadfence();
      const int kt_first = u0 / nc, kt_last = (min(units, u0 + CH) - 1) / nc;
      const int kt = kt_first + lane;
      if (kt <= kt_last) {
        int n = 0;
#pragma unroll
        for (int i = 0; i < CH; ++i) n += unit_ok(u0 + i) && (u0 + i) / nc == kt;
        if (n) red_relaxed_add(counts + kt, n);
      }
      cur = nxt;
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(CR) : "memory");

  // ------------------------------------------------------------------ consumers: c6's main loop
  const int wgi = warp >> 2, wq = warp & 3;
  const int g = lane >> 2, tig = lane & 3;
  GemmArgs q = p;
  q.B = p.ws;  // the GEMM reads the W8 scratch
  const TileCopier<kW8, BN, NTHR, ITER_A, ITER_B, B_BYTES> copier(q, tid, m0, n0);
  auto wait_ready = [&](int kt) {  // thread 0: until k-tile kt of the column is published complete
    // (bounded: a peer that can never run — fewer free SMs than tiles_m — ends in an error, not a hang)
    for (unsigned spins = 0; ld_acquire_cta_shared(&s_ready) <= kt; ++spins)
      if (spins == (1u << 26)) __trap();
  };
  auto load_stage = [&](int slot, int kt) {
    const uint32_t sA = base_u + slot * STAGE;
    copier.load(q, sA, sA + A_BYTES, n0, kt);
  };
  int acc[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) acc[i] = 0;
#pragma unroll
  for (int s = 0; s < STAGES - 2; ++s) {
    if (s < nk) {
      if (tid == 0) wait_ready(s);
      consumer_sync();
      load_stage(s, s);
    }
    cp_async_commit();
  }
  for (int kt = 0; kt < nk; ++kt) {
    cp_async_wait<STAGES - 3>();
    fence_proxy_async();
    const int nxt = kt + STAGES - 2;
    if (tid == 0 && nxt < nk) wait_ready(nxt);
    consumer_sync();  // stage kt landed; wgmma(kt - 2) finished; k-tile nxt of W8 complete
    if (nxt < nk) load_stage(nxt % STAGES, nxt);
    cp_async_commit();
    const uint32_t sA = base_u + (kt % STAGES) * STAGE + wgi * 64 * 128, sB = base_u + (kt % STAGES) * STAGE + A_BYTES;
    wg::mma_ktile<BN>(acc, sA, sB);
  }
  wg::mma_drain(acc);
  cp_async_wait<0>();
  consumer_sync();
  int* red = reinterpret_cast<int*>(smem);
  wg::acc_to_tile<BN, LDR>(red, acc, wgi, wq, g, tig);
  consumer_sync();
  reduce_store<kW8, BM, BN, LDR, NTHR>(q, red, m0, n0, 1, 0);
}
}  // namespace peer

bool peer_fits(int M) {
  const int tiles_m = (M + peer::BM - 1) / peer::BM;
  return tiles_m >= 4 && tiles_m <= 64;
}

cudaError_t run_w4pg_peer(const GemmArgs& p, cudaStream_t stream) {
  static const cudaError_t e0 =
      cudaFuncSetAttribute(peer::w4pg_peer_kernel<4>, cudaFuncAttributeMaxDynamicSharedMemorySize, peer::SMEM);
  if (e0 != cudaSuccess) return e0;
  cudaError_t e = cudaMemsetAsync(p.ws + peer_header_offset(p.N, p.K), 0, peer_header_bytes(p.N, p.K), stream);
  if (e != cudaSuccess) return e;
  const int ctas = ((p.M + peer::BM - 1) / peer::BM) * ((p.N + peer::BN - 1) / peer::BN);
  GemmArgs q = p;
  q.pdl = 0;
  return launch_kernel(peer::w4pg_peer_kernel<4>, dim3(ctas, 1, 1), peer::NTHR_ALL, peer::SMEM, 1, stream, q);
}
bool peer_available() { return true; }
#else
bool peer_fits(int) { return false; }
cudaError_t run_w4pg_peer(const GemmArgs&, cudaStream_t) { return cudaErrorNotSupported; }
bool peer_available() { return false; }
#endif

}  // namespace qtool_i8
