// Hopper (sm_90a) int8 GEMMs on wgmma, for W8A8 and (dequantizing in shared memory) W4A8.
//
// CTA tile BM x BN (BM = 64 or 128: one or two consumer warpgroups of 64 rows; BN = 128 or 256),
// k-tile 128, STAGES-deep cp.async ring with prefetch distance STAGES - 2 (the wgmma group of the
// previous k-tile may still run while the next is issued: wgmma.wait_group 1). Operands come from
// shared memory via descriptors: the tiles use the same 128-byte-row XOR swizzle as the mma.sync
// kernels, which is the canonical K-major SWIZZLE_128B layout when the stage base is 1024-byte
// aligned; a k32 step advances the descriptor start address by 32 bytes.
//  * W8: the int8 weight tile is copied as is.
//  * W4 (per-channel / per-group): the raw QServe tiles (BN x 64 bytes per k-tile, + s2 / zero rows)
//    are copied by cp.async; after they land every thread unpacks its lanes' 16 bytes exactly as the
//    mma.sync kernels do (r & 0x0F0F0F0F, (r >> 4) & 0x0F0F0F0F, * s2, byte-wise + zero) and stores
//    the int8 words into a double-buffered swizzled B tile (conflict-free 32-bit stores), then
//    fence.proxy.async + barrier, then wgmma. The conversion of k-tile kt overlaps wgmma(kt - 1).
// Split-K over a thread-block cluster (DSMEM int32 reduction) as in w8a8_gemm.cuh.
#pragma once
#include "sm90_common.cuh"
#include "w8a8_gemm.cuh"

namespace qtool_i8 {

constexpr int kFirstWgmmaCfg = 6;
constexpr int kNumConfigs = 48;  // c10-c12: the warp-specialised kernels (w8a8_wgws.cuh); c13-c19: decode;
                                 // c20: kDequantCfg (w8a8_api.h); c21-c24: decode; c25: kPeerCfg;
                                 // c26: W8A8 with TMA-multicast tiles (w8a8_tma.cu); c27-c47: decode
                                 // (some retired: kInfo in w8a8_gemm.cu)
constexpr int kFirstTmaCfg = 26, kNumTmaCfgs = 1;
// X(id, BM, BN, STAGES, MINB)
#define QTOOL_I8_WGMMA(X) \
  X(6, 128, 256, 4, 1)    \
  X(7, 128, 128, 3, 2)    \
  X(8, 64, 256, 4, 1)     \
  X(9, 64, 128, 4, 2)

bool wgmma_available();  // compiled for sm_90a
FmtOps fmt_ops_wg_w8();
// c6's kernel (split 1) on int8 weights (GemmArgs::B = W8 [N, K]) with the per-channel W4A8 epilogue (sw = s1, sz,
// xsum): the GEMM of the per-channel dequantizing config
cudaError_t run_w8_weights_pc_epilogue(const GemmArgs& p, cudaStream_t stream);
FmtOps fmt_ops_wg_w4pc();
FmtOps fmt_ops_wg_w4pg();
// kPeerCfg (w4a8_peer_pg.cu): its scratch header, whether M suits it, the launch (memset of the header + kernel)
size_t peer_header_offset(int N, int K);
size_t peer_header_bytes(int N, int K);
bool peer_available();  // compiled for sm_90a
bool peer_fits(int M);
cudaError_t run_w4pg_peer(const GemmArgs& p, cudaStream_t stream);
// c26 (w8a8_tma.cu): W8 only, split 1
inline bool is_tma_cfg(int cfg) { return cfg >= kFirstTmaCfg && cfg < kFirstTmaCfg + kNumTmaCfgs; }
bool tma_w8_available();  // compiled for sm_90a
cudaError_t run_w8_tma(int cfg, const GemmArgs& p, cudaStream_t stream);

#if defined(QTOOL_HAS_SM90A) && defined(__CUDACC__)
namespace wg {

using qtool_sm90::desc_sw128;
using qtool_sm90::fence_proxy_async;
using qtool_sm90::wgmma_commit;
using qtool_sm90::wgmma_fence;
using qtool_sm90::wgmma_wait;

// d += A(64x32, smem desc) * B(128x32, smem desc)^T, int8 -> int32 (scale-d = 1: accumulate).
__device__ __forceinline__ void wgmma_n128(int (&d)[64], uint64_t da, uint64_t db) {
  const int scale_d = 1;
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p;\n"
      "}\n"
      : QTOOL_WG_ACC64("+r", d, 0)
      : "l"(da), "l"(db), "r"(scale_d));
}

// d += A(64x32, smem desc) * B(256x32, smem desc)^T, int8 -> int32 (scale-d = 1: accumulate).
__device__ __forceinline__ void wgmma_n256(int (&d)[128], uint64_t da, uint64_t db) {
  const int scale_d = 1;
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
      "%128, %129, p;\n"
      "}\n"
      : QTOOL_WG_ACC128("+r", d)
      : "l"(da), "l"(db), "r"(scale_d));
}

template <int BN>
__device__ __forceinline__ void wgmma_bn(int (&d)[BN / 2], uint64_t da, uint64_t db) {
  if constexpr (BN == 256) {
    wgmma_n256(d, da, db);
  } else {
    wgmma_n128(d, da, db);
  }
}

// One k-tile (128) of a warpgroup's 64 rows: four m64nBNk32 wgmma on the A tile at sA and the B tile at sB (K-major
// SWIZZLE_128B, 32 bytes per k32 step) in one commit group; at most one earlier group stays in flight after it.
template <int BN>
__device__ __forceinline__ void mma_ktile(int (&acc)[BN / 2], uint32_t sA, uint32_t sB) {
  wgmma_fence();
#pragma unroll
  for (int s = 0; s < 4; ++s) wgmma_bn<BN>(acc, desc_sw128(sA + 32 * s), desc_sw128(sB + 32 * s));
  wgmma_commit();
  wgmma_wait<1>();
}
// After the k loop: every group retired, and the accumulators pinned after that wait (so that nothing reads them
// before it).
template <int N>
__device__ __forceinline__ void mma_drain(int (&acc)[N]) {
  wgmma_wait<0>();
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(acc[i])::"memory");
}

// The accumulators of a warpgroup's m64nBN fragments (rows 16·wq + g and + 8 of warpgroup wgi's 64, columns 8j + 2·tig
// and + 1) into the int32 tile `red` [rows][LD] that reduce_store reads.
template <int BN, int LD>
__device__ __forceinline__ void acc_to_tile(int* red, const int (&acc)[BN / 2], int wgi, int wq, int g, int tig) {
  const int rbase = wgi * 64 + wq * 16 + g;
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) {
    const int c = 8 * j + 2 * tig;
    *reinterpret_cast<int2*>(red + rbase * LD + c) = make_int2(acc[4 * j], acc[4 * j + 1]);
    *reinterpret_cast<int2*>(red + (rbase + 8) * LD + c) = make_int2(acc[4 * j + 2], acc[4 * j + 3]);
  }
}

template <int FMT, int BM, int BN, int STAGES>
struct WgCfg {
  static constexpr int NWG = BM / 64;
  static constexpr int NTHR = NWG * 128;
  static constexpr int A_BYTES = BM * 128;
  static constexpr int B_BYTES = FMT == kW8 ? BN * 128 : BN * 64;  // W4: raw tiles
  static constexpr int S_BYTES = FMT == kW4PG ? 8 * BN : 0;
  static constexpr int STAGE = ((A_BYTES + B_BYTES + S_BYTES) + 1023) / 1024 * 1024;
  static constexpr int CONV = FMT == kW8 ? 0 : 2 * BN * 128;  // W4: double-buffered int8 B tiles
  static constexpr int LDR = BN + 8;
  static constexpr int EPI = BM * LDR * 4;
  static constexpr int MAIN = STAGES * STAGE + CONV;
  static constexpr int SMEM = (MAIN > EPI + BM * 8 ? MAIN : EPI + BM * 8) + 1024;  // + row factors, alignment slack
  static constexpr int ITER_A = BM * 8 / NTHR;
  static constexpr int ITER_B = FMT == kW8 ? BN * 8 / NTHR : BN * 4 / NTHR;
  static constexpr int TILES = BN / 32 * 4;  // W4 32x32 tiles per k-tile
  static_assert(BM * 8 % NTHR == 0 && ITER_B * NTHR == (FMT == kW8 ? BN * 8 : BN * 4), "loaders");
  static_assert(FMT != kW4PG || BN / 2 <= NTHR, "scale loader");
  static_assert(TILES % (NTHR / 32) == 0, "conversion split");
};

template <int FMT, int BM, int BN, int STAGES, int MINB>
__global__ void __launch_bounds__(BM / 64 * 128, MINB) wgmma_gemm_kernel(const GemmArgs p) {
  using C = WgCfg<FMT, BM, BN, STAGES>;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t raw_u = smem_u32(smem_raw);
  const uint32_t base_u = (raw_u + 1023u) & ~1023u;
  uint8_t* smem = smem_raw + (base_u - raw_u);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wgi = warp >> 2, wq = warp & 3;
  const int g = lane >> 2, tig = lane & 3;
  const int M = p.M, N = p.N, K = p.K;
  const TileWork tw = tile_work<BM, BN>(M, N, K);
  const int m0 = tw.m0, n0 = tw.n0, split = tw.split, rank = tw.rank, kt_begin = tw.kt_begin, nk = tw.nk;

  const TileCopier<FMT, BN, C::NTHR, C::ITER_A, C::ITER_B, C::B_BYTES> copier(p, tid, m0, n0);
  auto load_stage = [&](int slot, int kt) {
    const uint32_t sA = base_u + slot * C::STAGE;
    copier.load(p, sA, sA + C::A_BYTES, n0, kt);
  };

  // W4: unpack the raw tiles of stage `slot` into the swizzled int8 B tile `dst` (BN rows x 128 B)
  auto convert = [&](int slot, uint8_t* dst) {
    const uint8_t* raw = smem + slot * C::STAGE + C::A_BYTES;
    const uint8_t* sS = raw + C::B_BYTES;
#pragma unroll
    for (int i = 0; i < C::TILES / (C::NTHR / 32); ++i) {
      const int t = warp + i * (C::NTHR / 32);
      const int ntl = t >> 2, ktl = t & 3;
      const uint4 w = *reinterpret_cast<const uint4*>(raw + t * 512 + 16 * lane);
      uint32_t s2w = 0, zw = 0;
      if constexpr (FMT == kW4PG) {
        s2w = *reinterpret_cast<const uint32_t*>(sS + ktl * BN + ntl * 32 + 4 * g);
        zw = *reinterpret_cast<const uint32_t*>(sS + (4 + ktl) * BN + ntl * 32 + 4 * g);
      }
      uint32_t b[4][2];
      w4_fragments<FMT>(w, s2w, zw, b);
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        const int n = ntl * 32 + 8 * jj + g;  // (n & 7) == g
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int c = 2 * ktl + h;
          *reinterpret_cast<uint32_t*>(dst + n * 128 + ((c ^ g) << 4) + 4 * tig) = b[jj][h];
        }
      }
    }
  };

  RowFactor<FMT> rf;
  if (tid < BM) rf.fetch(p, m0 + tid);
  int acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0;

#pragma unroll
  for (int s = 0; s < STAGES - 2; ++s) {
    if (s < nk) load_stage(s, kt_begin + s);
    cp_async_commit();
  }
  for (int i = 0; i < nk; ++i) {
    cp_async_wait<STAGES - 3>();
    fence_proxy_async();
    __syncthreads();  // stage i landed for everyone; wgmma(i - 2) finished in every warpgroup
    {
      const int nxt = i + STAGES - 2;
      if (nxt < nk) load_stage(nxt % STAGES, kt_begin + nxt);
      cp_async_commit();
    }
    const uint32_t sA = base_u + (i % STAGES) * C::STAGE + wgi * 64 * 128;
    uint32_t sB;
    if constexpr (FMT == kW8) {
      sB = base_u + (i % STAGES) * C::STAGE + C::A_BYTES;
    } else {
      uint8_t* dst = smem + STAGES * C::STAGE + (i & 1) * (BN * 128);
      convert(i % STAGES, dst);
      fence_proxy_async();
      __syncthreads();
      sB = smem_u32(dst);
    }
    mma_ktile<BN>(acc, sA, sB);
  }
  mma_drain(acc);
  cp_async_wait<0>();
  __syncthreads();

  float(*rowf)[2] = reinterpret_cast<float(*)[2]>(smem + C::EPI);  // after the reduction tile, inside the stages
  if (tid < BM) rf.put(p, rowf, tid);
  int* red = reinterpret_cast<int*>(smem);
  acc_to_tile<BN, C::LDR>(red, acc, wgi, wq, g, tig);
  if (split > 1) {
    cluster_sync();
  } else {
    __syncthreads();
  }
  reduce_store<FMT, BM, BN, C::LDR, C::NTHR>(p, red, m0, n0, split, rank, nullptr, rowf);
  if (split > 1) cluster_sync();
}

template <int FMT, int BM, int BN, int STAGES, int MINB>
using WgRunner = KernelRunner<wgmma_gemm_kernel<FMT, BM, BN, STAGES, MINB>, WgCfg<FMT, BM, BN, STAGES>::NTHR,
                              WgCfg<FMT, BM, BN, STAGES>::SMEM, BM, BN>;

template <int FMT>
cudaError_t run_wg(int cfg, const GemmArgs& p, int split, cudaStream_t stream) {
  switch (cfg) {
#define X(id, BM, BN, S, MINB) \
  case id:                     \
    return WgRunner<FMT, BM, BN, S, MINB>::run(p, split, stream);
    QTOOL_I8_WGMMA(X)
#undef X
    default:
      return cudaErrorInvalidValue;
  }
}
template <int FMT>
int occupancy_wg(int cfg) {
  switch (cfg) {
#define X(id, BM, BN, S, MINB) \
  case id:                     \
    return WgRunner<FMT, BM, BN, S, MINB>::occupancy();
    QTOOL_I8_WGMMA(X)
#undef X
    default:
      return 0;
  }
}

}  // namespace wg
#endif

}  // namespace qtool_i8
