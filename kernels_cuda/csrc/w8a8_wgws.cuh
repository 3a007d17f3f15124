// Warp-specialised int8 wgmma GEMM (sm_90a) for W8A8 and W4A8, the weights as the wgmma A operand:
// outᵀ tile [COLS features × BT tokens] = W tile · xᵀ tile, int8 × int8 → int32.
//
// One producer warpgroup only copies: per 128-k stage the activation tile (BT rows × 128 B, the
// 128-byte-row XOR swizzle = K-major SWIZZLE_128B, the wgmma B operand), the weight tile and, for
// W4A8 per-group, the s2 / zero words, into an S-deep ring. Its cp.async arrive on the stage's "full"
// mbarrier when they land (cp.async.mbarrier.arrive.noinc), so it never waits for its own copies,
// only for "empty" slots. NWG consumer warpgroups of FB 64-feature blocks each only wait, issue
// wgmma and release the slot once the wgmma groups that read it have retired (wgmma.wait_group).
//  * W8: the weight tile (COLS rows × 128 B, swizzled) is the A operand in shared memory (SS).
//  * W4 (QServe layout): the raw 32×32 tiles are copied as they are; a lane's 16 bytes of a tile are,
//    after `r & 0x0F0F0F0F` / `(r >> 4) & 0x0F0F0F0F` (and × s2, + zero per group), the mma.sync B
//    fragments of features g, g + 8, g + 16, g + 24 — i.e. the m16k32 A fragments of two 64-feature
//    wgmma row blocks (warp w of a warpgroup takes the warpgroup's tile w: rows g, g + 8 of block j
//    are the tile's features 16j + g, 16j + 8 + g). So the consumers convert in registers and issue
//    register-A wgmma (RS): no converted weight goes through shared memory, no second barrier per
//    k-tile (the in-shared-memory conversion of c6–c9 was what held W4A8 at 0.5–0.7× W8A8). One
//    wgmma group per k32 step, four A-fragment buffers: step s + 1 converts while s, s − 1, s − 2 run.
// The epilogue transposes the accumulators through a shared-memory int32 tile [tokens][features]
// into reduce_store (split-K over a cluster through DSMEM, exact; then scales, bias, stores).
#pragma once
#include "w8a8_wgmma.cuh"

namespace qtool_i8 {

constexpr int kFirstWgwsCfg = 10;
// X(id, NWG, BT, FB, CR): NWG consumer warpgroups × FB 64-feature blocks (COLS = 64·NWG·FB features)
// × BT tokens per CTA; CR > 0: setmaxnreg gives the consumers CR registers (the producer the rest).
#define QTOOL_I8_WGWS(X) \
  X(10, 2, 128, 2, 216)  \
  X(11, 2, 64, 2, 0)     \
  X(12, 2, 256, 1, 0)

template <int FMT, int NWG, int BT, int FB, int CR>
struct WsGeo {
  static constexpr int NC = 128 * NWG, NT = NC + 128, NB = NWG * FB, COLS = 64 * NB;
  static constexpr int X_BYTES = BT * 128;
  static constexpr int W_BYTES = FMT == kW8 ? COLS * 128 : COLS * 64;  // W4: raw 512-byte tiles
  static constexpr int S_BYTES = FMT == kW4PG ? 8 * COLS : 0;          // s2 / zero words [COLS/32][8][2][4]
  static constexpr int IN = (X_BYTES + W_BYTES + S_BYTES + 1023) / 1024 * 1024;
  static constexpr int S = (210 * 1024) / IN < 8 ? (210 * 1024) / IN : 8;
  static constexpr int LDR = COLS + 4;  // [token][feature] int32; +4: the 8 × 4 lanes of a store hit 32 banks
  static constexpr int RED = BT * LDR * 4;
  static constexpr int BARS = S * IN > RED ? S * IN : RED;  // mbarriers after the ring and the reduction tile
  static constexpr int SMEM = BARS + 16 * S + 1024;
  static constexpr bool REG_SHIFT = CR > 0;
  static constexpr int PR = (168 * 384 - 256 * CR) / 128;
  static constexpr int X_IT = BT / 16, W_IT = FMT == kW8 ? COLS / 16 : COLS / 32;  // producer copies per stage
  static_assert(FMT == kW8 || FB == 2, "W4: a lane's 16 bytes of a tile are the A fragments of two 64-feature blocks");
  static_assert(S >= 3, "ring depth");
  static_assert(!REG_SHIFT || (NWG == 2 && CR % 8 == 0 && PR >= 24 && PR % 8 == 0), "register hand-over");
  static_assert(SMEM <= 227 * 1024, "shared memory");
  static_assert(RED + BT * 8 <= BARS, "the row factors after the reduction tile");
};

template <int FMT, int NWG, int BT, int FB, int CR>
constexpr bool ws_supported() {
  return FMT == kW8 || FB == 2;
}

#if defined(QTOOL_HAS_SM90A) && defined(__CUDACC__)
namespace ws {
using qtool_sm90::cp_async_mbar_arrive;
using qtool_sm90::desc_sw128;
using qtool_sm90::fence_proxy_async;
using qtool_sm90::mbar_arrive;
using qtool_sm90::mbar_init;
using qtool_sm90::mbar_wait;
using qtool_sm90::wgmma_commit;
using qtool_sm90::wgmma_fence;
using qtool_sm90::wgmma_wait;

// d += A(64x32: this warpgroup's registers, the mma.sync m16n8k32 A layout per warp) * B(Nx32, smem desc)^T
__device__ __forceinline__ void wgmma_rs_n64(int (&d)[32], const uint32_t (&a)[4], uint64_t db) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p;\n"
      "}\n"
      : QTOOL_WG_ACC32("+r", d, 0)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}

__device__ __forceinline__ void wgmma_rs_n128(int (&d)[64], const uint32_t (&a)[4], uint64_t db) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, p;\n"
      "}\n"
      : QTOOL_WG_ACC64("+r", d, 0)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}

// d += A(64x32, smem desc) * B(64x32, smem desc)^T
__device__ __forceinline__ void wgmma_ss_n64(int (&d)[32], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "%32, %33, p;\n"
      "}\n"
      : QTOOL_WG_ACC32("+r", d, 0)
      : "l"(da), "l"(db), "r"(1));
}

// 4-byte cp.async (src-size 0: zero-fill, nothing read)
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool pred) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(pred ? 4 : 0) : "memory");
}

template <int BT>
__device__ __forceinline__ void wgmma_rs(int (&d)[BT / 2], const uint32_t (&a)[4], uint64_t db) {
  static_assert(BT == 64 || BT == 128, "register-A tile");
  if constexpr (BT == 128) {
    wgmma_rs_n128(d, a, db);
  } else {
    wgmma_rs_n64(d, a, db);
  }
}
template <int BT>
__device__ __forceinline__ void wgmma_ss(int (&d)[BT / 2], uint64_t da, uint64_t db) {
  if constexpr (BT == 64) {
    wgmma_ss_n64(d, da, db);
  } else {
    wg::wgmma_bn<BT>(d, da, db);
  }
}

template <int FMT, int NWG, int BT, int FB, int CR>
__global__ void __launch_bounds__(128 * NWG + 128, 1) wgws_kernel(const GemmArgs p) {
  using C = WsGeo<FMT, NWG, BT, FB, CR>;
  constexpr int S = C::S;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t raw_u = smem_u32(smem_raw);
  const uint32_t base_u = (raw_u + 1023u) & ~1023u;
  uint8_t* smem = smem_raw + (base_u - raw_u);
  const uint32_t bar_full = base_u + C::BARS, bar_empty = bar_full + 8 * S;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int M = p.M, N = p.N, K = p.K;
  const TileWork tw = tile_work<BT, C::COLS>(M, N, K);
  const int m0 = tw.m0, n0 = tw.n0, split = tw.split, rank = tw.rank, kt_begin = tw.kt_begin, nk = tw.nk;
  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(bar_full + 8 * s, 128);    // the producer threads' cp.async arrivals
      mbar_init(bar_empty + 8 * s, C::NC);  // every consumer thread
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  // the producer threads hold the tile rows' activation factors (row pt, pt + 128) until the epilogue
  constexpr int RF = (BT + 127) / 128;
  RowFactor<FMT> rf[RF];
  if (tid >= C::NC) {
#pragma unroll
    for (int i = 0; i < RF; ++i)
      if (tid - C::NC + 128 * i < BT) rf[i].fetch(p, m0 + tid - C::NC + 128 * i);
  }
  if (tid >= C::NC) {
    if constexpr (C::REG_SHIFT) asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(C::PR) : "memory");
    // ------------------------------------------------------------------ producer: copies only
    const int pt = tid - C::NC;
    const int c8 = pt & 7, r8 = pt >> 3;  // X / W8: 16-byte chunk c8 of rows r8 + 16·it
    const int8_t* xa = p.A + static_cast<size_t>(min(m0 + r8, M - 1)) * K + 16 * c8;
    const int x_rows = M - m0 - r8;
    const uint32_t x_dst = swz(r8, c8);  // + 2048·it: rows r8 + 16·it share the XOR pattern
    const uint8_t* wb = static_cast<const uint8_t*>(p.B);
    int w_rows = 0;
    const uint8_t* wa = wb;
    uint32_t w_dst = 0;
    if constexpr (FMT == kW8) {
      w_rows = N - n0 - r8;
      wa = wb + static_cast<size_t>(min(n0 + r8, N - 1)) * K + 16 * c8;
      w_dst = swz(r8, c8);
    } else {
      // W4: tile it of the CTA's COLS / 32, its k32 sub-tile pt / 32, chunk pt % 32
      w_rows = N / 32 - n0 / 32;
      wa = wb + (static_cast<size_t>(n0 / 32) * (K / 32) + (pt >> 5)) * 512 + 16 * (pt & 31);
      w_dst = (pt >> 5) * 512 + 16 * (pt & 31);
    }
    // W4 per-group: word (tile t, lane group g, k32 sub-tile s) of the s2 (zero) rows lands at
    // [t][g][s2 | zero][s]: a consumer lane reads its 4 + 4 words of a stage with two 16-byte loads.
    // Thread pt copies s = pt & 3, s2 / zero = bit 2, g = bits 3-5, tiles pt / 64 + 2·it.
    const int sg_s = pt & 3, sg_z = (pt >> 2) & 1, sg_g = (pt >> 3) & 7, sg_t = pt >> 6;
    const int8_t* sg_src = (sg_z ? p.z2 : p.s2) + n0 + 32 * sg_t + 4 * sg_g;
    const uint32_t sg_dst = ((sg_t * 8 + sg_g) * 2 + sg_z) * 16 + 4 * sg_s;
    const int G = FMT == kW4PG ? K / p.group : 1;
    for (int i = 0; i < nk; ++i) {
      const int slot = i % S;
      if (i >= S) mbar_wait(bar_empty + 8 * slot, ((i / S) + 1) & 1);
      const uint32_t sx = base_u + slot * C::IN, sw = sx + C::X_BYTES;
      const int kt = kt_begin + i, k0 = kt * 128;
      const bool xk = k0 + 16 * c8 < K;
#pragma unroll
      for (int it = 0; it < C::X_IT; ++it) {
        const bool ok = xk && 16 * it < x_rows;
        cp_async16(sx + x_dst + 2048 * it, ok ? xa + static_cast<size_t>(16 * it) * K + k0 : p.A, ok);
      }
      if constexpr (FMT == kW8) {
#pragma unroll
        for (int it = 0; it < C::W_IT; ++it) {
          const bool ok = xk && 16 * it < w_rows;
          cp_async16(sw + w_dst + 2048 * it, ok ? wa + static_cast<size_t>(16 * it) * K + k0 : wb, ok);
        }
      } else {
        const bool wk = kt * 4 + (pt >> 5) < K / 32;
#pragma unroll
        for (int it = 0; it < C::W_IT; ++it) {
          const bool ok = wk && it < w_rows;
          cp_async16(sw + w_dst + 2048 * it, ok ? wa + (static_cast<size_t>(it) * (K / 32) + 4 * kt) * 512 : wb, ok);
        }
        if constexpr (FMT == kW4PG) {
          const size_t grow = min((k0 + 32 * sg_s) / p.group, G - 1);
#pragma unroll
          for (int it = 0; it < C::COLS / 64; ++it) {
            const bool ok = sg_t + 2 * it < w_rows;
            cp_async4(sw + C::W_BYTES + sg_dst + 512 * it, ok ? sg_src + grow * N + 64 * it : p.s2, ok);
          }
        }
      }
      cp_async_mbar_arrive(bar_full + 8 * slot);
    }
    cp_async_wait<0>();
    if constexpr (C::REG_SHIFT) asm volatile("setmaxnreg.inc.sync.aligned.u32 168;\n" ::: "memory");
  } else {
    // ------------------------------------------------------------------ consumers
    if constexpr (C::REG_SHIFT) asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(CR) : "memory");
    const int wgi = warp >> 2, wq = warp & 3, g = lane >> 2, tig = lane & 3;
    int acc[FB][BT / 2];
#pragma unroll
    for (int j = 0; j < FB; ++j)
#pragma unroll
      for (int i = 0; i < BT / 2; ++i) acc[j][i] = 0;
    if constexpr (FMT == kW8) {
#pragma unroll 1
      for (int st = 0; st < nk; ++st) {
        const int slot = st % S;
        mbar_wait(bar_full + 8 * slot, (st / S) & 1);
        fence_proxy_async();  // the copies (generic proxy) become visible to wgmma (async proxy)
        const uint32_t sx = base_u + slot * C::IN, sw = sx + C::X_BYTES + wgi * FB * 64 * 128;
        wgmma_fence();
#pragma unroll
        for (int s = 0; s < 4; ++s)
#pragma unroll
          for (int j = 0; j < FB; ++j) wgmma_ss<BT>(acc[j], desc_sw128(sw + j * 64 * 128 + 32 * s), desc_sw128(sx + 32 * s));
        wgmma_commit();
        wgmma_wait<1>();  // wgmma(st − 1) done: its slot is free
        if (st >= 1) mbar_arrive(bar_empty + 8 * ((st - 1) % S));
      }
    } else {
      // One commit group per k32 step; up to DEPTH groups stay in flight while the next step's A
      // fragments are converted (with one group in flight the conversion was exposed: 4096³ 197 µs).
      // wgmma reads its register A operand asynchronously: a buffer keeps its registers until the
      // group that reads it has retired (an empty asm reading every buffer after each wait).
      constexpr int DEPTH = 3;
      uint32_t afr[4][FB][4];  // [buffer = k32 step][feature block][a0..a3]
      auto keep = [&afr]() {
#pragma unroll
        for (int b = 0; b < 4; ++b)
#pragma unroll
          for (int j = 0; j < FB; ++j)
            asm volatile("" ::"r"(afr[b][j][0]), "r"(afr[b][j][1]), "r"(afr[b][j][2]), "r"(afr[b][j][3]) : "memory");
      };
      const int t = 4 * wgi + wq;  // this warp's 32-feature tile of the CTA
#pragma unroll 1
      for (int st = 0; st < nk; ++st) {
        const int slot = st % S;
        mbar_wait(bar_full + 8 * slot, (st / S) & 1);
        fence_proxy_async();
        const uint8_t* raw = smem + slot * C::IN + C::X_BYTES;
        const uint32_t sx = base_u + slot * C::IN;
        // per group: this lane's s2 / zero words of the stage's 4 k32 sub-tiles, two 16-byte loads
        // (per-k32 32-bit loads here made ptxas serialise the wgmma: warning C7515)
        uint32_t s2v[4] = {0u, 0u, 0u, 0u}, zv[4] = {0u, 0u, 0u, 0u};
        if constexpr (FMT == kW4PG) {
          const uint4 a = *reinterpret_cast<const uint4*>(raw + C::W_BYTES + (t * 8 + g) * 32);
          const uint4 z = *reinterpret_cast<const uint4*>(raw + C::W_BYTES + (t * 8 + g) * 32 + 16);
          s2v[0] = a.x, s2v[1] = a.y, s2v[2] = a.z, s2v[3] = a.w;
          zv[0] = z.x, zv[1] = z.y, zv[2] = z.z, zv[3] = z.w;
        }
        uint4 wr[4];  // the stage's raw words up front: their load latency is paid once per stage
#pragma unroll
        for (int s = 0; s < 4; ++s) wr[s] = *reinterpret_cast<const uint4*>(raw + (t * 4 + s) * 512 + 16 * lane);
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          uint32_t bf[4][2];
          w4_fragments<FMT>(wr[s], s2v[s], zv[s], bf);
          uint32_t (&a)[FB][4] = afr[s];
#pragma unroll
          for (int j = 0; j < FB; ++j) {
            a[j][0] = bf[2 * j][0];
            a[j][1] = bf[2 * j + 1][0];
            a[j][2] = bf[2 * j][1];
            a[j][3] = bf[2 * j + 1][1];
          }
          wgmma_fence();
#pragma unroll
          for (int j = 0; j < FB; ++j) wgmma_rs<BT>(acc[j], a[j], desc_sw128(sx + 32 * s));
          wgmma_commit();
          wgmma_wait<DEPTH>();  // step s − DEPTH retired: buffer s + 1 is free
          keep();
          // at s = DEPTH − 1 the previous stage's last step (4·st − 1) has retired: release its slot
          if (s == DEPTH - 1 && st >= 1) mbar_arrive(bar_empty + 8 * ((st - 1) % S));
        }
      }
      wgmma_wait<0>();
      keep();
    }
    wgmma_wait<0>();
#pragma unroll
    for (int j = 0; j < FB; ++j)
#pragma unroll
      for (int i = 0; i < BT / 2; ++i) asm volatile("" : "+r"(acc[j][i])::"memory");
    // every consumer's wgmma retired and every copy landed: the ring becomes the reduction tile
    asm volatile("bar.sync 2, %0;\n" ::"n"(C::NC) : "memory");
    int* red = reinterpret_cast<int*>(smem);
#pragma unroll
    for (int j = 0; j < FB; ++j) {
      // row g (+8) of block j of this warp → local feature f0 (+8)
      const int f0 = FMT == kW8 ? (wgi * FB + j) * 64 + 16 * wq + g : 32 * (4 * wgi + wq) + 16 * j + g;
#pragma unroll
      for (int i = 0; i < BT / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) red[(8 * i + 2 * tig + (e & 1)) * C::LDR + f0 + 8 * (e >> 1)] = acc[j][4 * i + e];
    }
    if constexpr (C::REG_SHIFT) asm volatile("setmaxnreg.dec.sync.aligned.u32 168;\n" ::: "memory");
  }
  if (split > 1) {
    cluster_sync();
  } else {
    __syncthreads();
  }
  float(*rowf)[2] = reinterpret_cast<float(*)[2]>(smem + C::RED);  // after the reduction tile, inside the ring
  if (tid >= C::NC) {
#pragma unroll
    for (int i = 0; i < RF; ++i)
      if (tid - C::NC + 128 * i < BT) rf[i].put(p, rowf, tid - C::NC + 128 * i);
  }
  __syncthreads();
  reduce_store<FMT, BT, C::COLS, C::LDR, C::NT>(p, reinterpret_cast<int*>(smem), m0, n0, split, rank, nullptr, rowf);
  if (split > 1) cluster_sync();
}

template <int FMT, int NWG, int BT, int FB, int CR>
using WsRunner = KernelRunner<wgws_kernel<FMT, NWG, BT, FB, CR>, WsGeo<FMT, NWG, BT, FB, CR>::NT,
                              WsGeo<FMT, NWG, BT, FB, CR>::SMEM, BT, WsGeo<FMT, NWG, BT, FB, CR>::COLS>;

template <int FMT>
cudaError_t run_ws(int cfg, const GemmArgs& p, int split, cudaStream_t stream) {
  switch (cfg) {
#define X(id, NWG, BT, FB, CR)                                  \
  case id:                                                      \
    if constexpr (ws_supported<FMT, NWG, BT, FB, CR>()) {       \
      return WsRunner<FMT, NWG, BT, FB, CR>::run(p, split, stream); \
    } else {                                                    \
      return cudaErrorInvalidValue;                             \
    }
    QTOOL_I8_WGWS(X)
#undef X
    default:
      return cudaErrorInvalidValue;
  }
}
template <int FMT>
int occupancy_ws(int cfg) {
  switch (cfg) {
#define X(id, NWG, BT, FB, CR)                            \
  case id:                                                \
    if constexpr (ws_supported<FMT, NWG, BT, FB, CR>()) { \
      return WsRunner<FMT, NWG, BT, FB, CR>::occupancy(); \
    } else {                                              \
      return 0;                                           \
    }
    QTOOL_I8_WGWS(X)
#undef X
    default:
      return 0;
  }
}

}  // namespace ws

// Every Hopper config of a format: wgmma c6–c9 (w8a8_wgmma.cuh), warp-specialised c10+ (here).
template <int FMT>
cudaError_t run_hopper(int cfg, const GemmArgs& p, int split, cudaStream_t stream) {
  return cfg >= kFirstWgwsCfg ? ws::run_ws<FMT>(cfg, p, split, stream) : wg::run_wg<FMT>(cfg, p, split, stream);
}
template <int FMT>
int occupancy_hopper(int cfg) {
  return cfg >= kFirstWgwsCfg ? ws::occupancy_ws<FMT>(cfg) : wg::occupancy_wg<FMT>(cfg);
}
#endif

}  // namespace qtool_i8
