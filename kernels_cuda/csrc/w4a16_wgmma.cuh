// W4A16 on Hopper wgmma (sm_90a), for large M, warp-specialised. One producer warpgroup copies each
// 64-k stage (fp16 A tile, and the QUICK layout's raw packed words, scales and zeros of the CTA's
// columns) into a STAGES-deep ring by cp.async, then dequantises it — a lane's 32 bytes per (k-tile,
// 64-column block), exactly as the mma.sync kernels do (1024-magic, (q − z)·s in fp16, the same
// rounding) — into the slot's K-major SWIZZLE_128B fp16 B tile (BN rows × 128 B; conflict-free
// 32-bit stores: bank = 4·(chunk ^ gq) + tq), fences the async proxy and arrives on the slot's
// "full" mbarrier. NWG consumer warpgroups only wait, issue 4 × wgmma m64nBNk16 (fp32 accumulate)
// on A and B from shared memory, and release the slot on its "empty" mbarrier once the wgmma group
// that read it has completed. The producer loads stage i + 1 while it converts stage i, and the
// tensor cores run on stage i − 1 meanwhile. Dequantised weights do go through shared memory here —
// wgmma's B operand must — while the decode kernels keep the layout's register-only path. Split-K
// over a cluster as the other kernels (cluster_reduce_store). fp16 only, group % 64 == 0, K % 64 == 0.
#pragma once
#include "sm90_common.cuh"
#include "w4a16_kernel.cuh"

namespace qtool_w4a16 {

#if defined(QTOOL_HAS_SM90A)
constexpr bool kWgmmaCompiled = true;
#else
constexpr bool kWgmmaCompiled = false;
#endif

template <int NWG, int BN, int STAGES>
struct WgGeo {
  static constexpr int BM = 64 * NWG, NC = 128 * NWG, NT = NC + 128;  // consumers + 1 producer warpgroup
  static constexpr int B_BYTES = BN * 128;      // fp16 B tile: BN rows × 64 k, swizzled
  static constexpr int A_BYTES = BM * 128;      // BM rows × 64 fp16, swizzled
  static constexpr int W_BYTES = BN * 32;       // raw words: 2 k-tiles × BN/64 blocks × 32 lanes × 32 B
  static constexpr int S_BYTES = BN * 16;       // scale pairs: BN/64 blocks × 32 lanes × 32 B
  static constexpr int Z_BYTES = BN * 4;        // zero words: BN/64 blocks × 32 lanes × 8 B
  static constexpr int STAGE = (B_BYTES + A_BYTES + W_BYTES + S_BYTES + Z_BYTES + 1023) / 1024 * 1024;
  static constexpr int MAIN = STAGES * STAGE + 64;  // + 2·STAGES mbarriers
  static constexpr int RED = BM * (BN + 8) * 4;  // epilogue (reuses the ring)
  static constexpr int SMEM = (MAIN > RED ? MAIN : RED) + 1024;  // + alignment slack
  static constexpr int BLOCKS = 2 * (BN / 64);   // (k-tile, 64-col block) conversion units per stage
  static_assert(BLOCKS % 4 == 0, "conversion split over the 4 producer warps");
};

#if defined(QTOOL_HAS_SM90A) && defined(__CUDACC__)
namespace wg16 {
using qtool_sm90::desc_sw128;
using qtool_sm90::fence_proxy_async;
using qtool_sm90::wgmma_commit;
using qtool_sm90::wgmma_fence;
using qtool_sm90::wgmma_wait;
using qtool_sm90::cp_async_mbar_arrive;
using qtool_sm90::mbar_arrive;
using qtool_sm90::mbar_init;
using qtool_sm90::mbar_wait;
__device__ __forceinline__ uint32_t su32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ void cp16(uint32_t dst, const void* src, bool ok) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(ok ? 16 : 0));
}
__device__ __forceinline__ void cp8(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void producer_sync() { asm volatile("bar.sync 1, 128;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_f16_n128(float (&d)[64], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1, 0, 0;\n"
      "}\n"
      : QTOOL_WG_ACC64("+f", d, 0)
      : "l"(da), "l"(db), "r"(1));
}

__device__ __forceinline__ void wgmma_f16_n256(float (&d)[128], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
      "%128, %129, p, 1, 1, 0, 0;\n"
      "}\n"
      : QTOOL_WG_ACC128("+f", d)
      : "l"(da), "l"(db), "r"(1));
}

template <int BN>
__device__ __forceinline__ void wgmma_f16(float (&d)[BN / 2], uint64_t da, uint64_t db) {
  if constexpr (BN == 256) {
    wgmma_f16_n256(d, da, db);
  } else {
    wgmma_f16_n128(d, da, db);
  }
}
}  // namespace wg16
#endif

#if defined(QTOOL_HAS_SM90A) && defined(__CUDACC__)
// Producer-side copiers shared by the wgmma kernels, run by the 128 threads of the producer
// warpgroup (pt = 0..127). Descriptors are computed once; a stage's copy is a pointer bump.

// The activation tile: ROWS rows × 64 fp16 from row m0, column k0, as ROWS × 128-byte swizzled rows
// (rows ≥ M zero-filled).
template <int ROWS>
struct ActCopier {
  // thread pt copies 16 bytes (chunk c = pt % 8) of rows r0 + 16·it: the row stride and, as
  // r0 + 16·it ≡ r0 (mod 8), the swizzle are the same for every it, so one pointer and one
  // offset describe all (few registers: the producer of the register-A kernel c41 runs on 72)
  static constexpr int IA = ROWS * 8 / 128;
  const __half* src0;  // row m0 + r0 (only read where that row exists)
  const __half* xg;
  uint32_t dst0;
  int rows_left;       // M − m0 − r0: copies of rows r0 + 16·it ≥ this are zero-filled
  size_t step;         // 16 rows of x
  __device__ __forceinline__ ActCopier(const Params& p, int m0, int pt) {
    xg = reinterpret_cast<const __half*>(p.x);
    const int r0 = pt >> 3, c = pt & 7;
    rows_left = p.M - m0 - r0;
    src0 = xg + (size_t)(m0 + r0) * p.K + 8 * c;
    dst0 = r0 * 128 + ((c ^ (r0 & 7)) << 4);
    step = (size_t)16 * p.K;
  }
  __device__ __forceinline__ void copy(uint32_t base, int k0) const {
#pragma unroll
    for (int it = 0; it < IA; ++it) {
      const bool ok = 16 * it < rows_left;
      wg16::cp16(base + dst0 + it * 16 * 128, ok ? src0 + it * step + k0 : xg, ok);
    }
  }
};

// The QUICK layout's scale pairs (NB × 32 lanes × 32 B) and zero words (NB × 32 × 8 B) of NB 64-column
// blocks from column n0, for the group of one 64-k stage, lane-major as the layout holds them.
template <int NB>
struct ScaleZeroCopier {
  static constexpr int IS = (NB * 64 + 127) / 128;
  const uint4* s_src[IS];
  const uint2* z_src[IS];
  uint32_t s_dst[IS];
  bool s_on[IS], z_on[IS];
  size_t sstride, zstride;
  __device__ __forceinline__ ScaleZeroCopier(const Params& p, int n0, int pt) {
#pragma unroll
    for (int it = 0; it < IS; ++it) {
      const int i = min(pt + it * 128, NB * 64 - 1);  // (cb, lane, half)
      const int hf = i & 1, ln = (i >> 1) & 31, cb = i >> 6;
      const LaneB lb = lane_b((n0 >> 6) + cb, ln, p.N);
      s_on[it] = pt + it * 128 < NB * 64;
      z_on[it] = s_on[it] && hf == 0;
      s_src[it] = reinterpret_cast<const uint4*>(p.scales) + lb.s_off + hf;
      z_src[it] = reinterpret_cast<const uint2*>(p.qz) + lb.z_off;
      s_dst[it] = (cb * 32 + ln) * 2 + hf;
    }
    sstride = (size_t)(p.N >> 2);
    zstride = (size_t)(p.N >> 3);
  }
  // stage st (64-k index) into the S / Z areas at sS, sZ
  __device__ __forceinline__ void copy(const Params& p, uint32_t sS, uint32_t sZ, int st) const {
    const int g = group_of(p, 2 * st);
#pragma unroll
    for (int it = 0; it < IS; ++it) {
      if (s_on[it]) wg16::cp16(sS + s_dst[it] * 16, s_src[it] + (size_t)g * sstride, true);
      if (z_on[it]) wg16::cp8(sZ + (s_dst[it] >> 1) * 8, z_src[it] + (size_t)g * zstride);
    }
  }
};

// The QUICK layout's raw data of NB 64-column blocks from column n0 for one 64-k stage: packed words
// (2 k-tiles × NB × 32 lanes × 32 B, lane-major) and the stage's scale pairs and zero words.
template <int NB>
struct RawWeightCopier {
  static constexpr int IW = (2 * NB * 64 + 127) / 128;
  const uint4* w_src[IW];
  uint32_t w_dst[IW];
  bool w_on[IW];
  size_t wstep;
  ScaleZeroCopier<NB> sz;
  __device__ __forceinline__ RawWeightCopier(const Params& p, int n0, int pt) : sz(p, n0, pt) {
    const int N = p.N;
#pragma unroll
    for (int it = 0; it < IW; ++it) {
      const int i = min(pt + it * 128, 2 * NB * 64 - 1);  // (ktl, cb, lane, half)
      const int hf = i & 1, ln = (i >> 1) & 31, cb = (i >> 6) % NB, ktl = (i >> 6) / NB;
      const LaneB lb = lane_b((n0 >> 6) + cb, ln, N);
      w_on[it] = pt + it * 128 < 2 * NB * 64;
      w_src[it] = p.qw + lb.w_off + (size_t)ktl * N + hf;
      w_dst[it] = (((ktl * NB + cb) * 32 + ln) * 2 + hf) * 16;
    }
    wstep = 2 * (size_t)N;
  }
  // stage st (64-k index) into the W / S / Z areas at sW, sS, sZ
  __device__ __forceinline__ void copy(const Params& p, uint32_t sW, uint32_t sS, uint32_t sZ, int st) const {
#pragma unroll
    for (int it = 0; it < IW; ++it)
      if (w_on[it]) wg16::cp16(sW + w_dst[it], w_src[it] + (size_t)st * wstep, true);
    sz.copy(p, sS, sZ, st);
  }
};
#endif

template <int NWG, int BN, int STAGES, int MINB>
__global__ void __launch_bounds__(128 * NWG + 128, MINB) w4a16_wgmma(const Params p) {
#if defined(QTOOL_HAS_SM90A) && defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = WgGeo<NWG, BN, STAGES>;
  using namespace wg16;
  constexpr int BM = C::BM, NT = C::NT, NB = BN / 64;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t raw_u = su32(smem_raw);
  const uint32_t base_u = (raw_u + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (base_u - raw_u);
  const uint32_t bar_full = base_u + STAGES * C::STAGE, bar_empty = bar_full + 8 * STAGES;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int gq = lane >> 2, tq = lane & 3;
  const int K = p.K;
  const int srank = blockIdx.x, n0 = blockIdx.y * BN, m0 = blockIdx.z * BM;
  const int NS = K >> 6;  // 64-k stages
  const int s_beg = (int)((long long)NS * srank / p.split), s_end = (int)((long long)NS * (srank + 1) / p.split);
  const int nk = s_end - s_beg;
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(bar_full + 8 * s, 128);      // the producer warpgroup's threads
      mbar_init(bar_empty + 8 * s, C::NC);   // every consumer thread
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  float acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;

  if (tid >= C::NC) {
    // ------------------------------------------------------------------ producer warpgroup
    const int pt = tid - C::NC, pw = pt >> 5;
    const ActCopier<BM> act(p, m0, pt);
    const RawWeightCopier<NB> raw(p, n0, pt);
    auto load_stage = [&](int slot, int st) {
      const uint32_t base = base_u + slot * C::STAGE + C::B_BYTES;
      act.copy(base, st * 64);
      raw.copy(p, base + C::A_BYTES, base + C::A_BYTES + C::W_BYTES, base + C::A_BYTES + C::W_BYTES + C::S_BYTES, st);
    };
    // dequantise the raw data of `slot` into its fp16 B tile
    auto convert = [&](int slot) {
      unsigned char* dst = smem + slot * C::STAGE;
      const unsigned char* sW = dst + C::B_BYTES + C::A_BYTES;
      const unsigned char* sS = sW + C::W_BYTES;
      const unsigned char* sZ = sS + C::S_BYTES;
#pragma unroll
      for (int u = pw; u < C::BLOCKS; u += 4) {
        const int ktl = u / NB, cb = u % NB;
        const uint4 w0 = *reinterpret_cast<const uint4*>(sW + ((ktl * NB + cb) * 32 + lane) * 32);
        const uint4 w1 = *reinterpret_cast<const uint4*>(sW + ((ktl * NB + cb) * 32 + lane) * 32 + 16);
        const uint4 s0 = *reinterpret_cast<const uint4*>(sS + (cb * 32 + lane) * 32);
        const uint4 s1 = *reinterpret_cast<const uint4*>(sS + (cb * 32 + lane) * 32 + 16);
        const uint2 z = *reinterpret_cast<const uint2*>(sZ + (cb * 32 + lane) * 8);
        BConst bc;
        unpack_bconst<__half>(bc, s0, s1, z);
        const uint32_t wd[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
#pragma unroll
        for (int kh = 0; kh < 2; ++kh)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            uint32_t b[2][2];  // [tile 2c + h][j: k +0 / +8]
            dequant_word<__half>(wd[4 * kh + c], bc, c, b[0][0], b[0][1], b[1][0], b[1][1]);
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
              for (int j = 0; j < 2; ++j) {
                const int n = cb * 64 + (2 * c + h) * 8 + gq;  // n & 7 == gq
                const int chunk = 4 * ktl + 2 * kh + j;          // 16-byte chunk of the 128-byte row
                *reinterpret_cast<uint32_t*>(dst + n * 128 + ((chunk ^ gq) << 4) + 4 * tq) = b[h][j];
              }
          }
      }
    };
    // stage i: wait until the consumers released its slot (use i / STAGES − 1), load; one stage
    // later convert it (its copies landed: wait_group 1 per thread, then a producer barrier).
    for (int i = 0; i <= nk; ++i) {
      if (i < nk) {
        const int slot = i % STAGES;
        if (i >= STAGES) mbar_wait(bar_empty + 8 * slot, ((i / STAGES) + 1) & 1);
        load_stage(slot, s_beg + i);
      }
      cp_async_commit();
      if (i >= 1) {
        const int j = i - 1, slot = j % STAGES;
        cp_async_wait<1>();
        producer_sync();
        convert(slot);
        fence_proxy_async();  // this thread's generic-proxy writes (cp.async A, B stores) → wgmma
        mbar_arrive(bar_full + 8 * slot);
      }
    }
    cp_async_wait<0>();
  } else {
    // ------------------------------------------------------------------ consumer warpgroups
    const int wgi = warp >> 2;
    for (int i = 0; i < nk; ++i) {
      const int slot = i % STAGES;
      mbar_wait(bar_full + 8 * slot, (i / STAGES) & 1);
      const uint32_t sB = base_u + slot * C::STAGE, sA = sB + C::B_BYTES + wgi * 64 * 128;
      wgmma_fence();
#pragma unroll
      for (int s = 0; s < 4; ++s) wgmma_f16<BN>(acc, desc_sw128(sA + 32 * s), desc_sw128(sB + 32 * s));
      wgmma_commit();
      wgmma_wait<1>();  // wgmma(i − 1) done: release its slot
      if (i >= 1) mbar_arrive(bar_empty + 8 * ((i - 1) % STAGES));
    }
    wgmma_wait<0>();
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) asm volatile("" : "+f"(acc[i])::"memory");
  }
  __syncthreads();  // every wgmma and copy done: the ring becomes the reduction buffer

  float* red = reinterpret_cast<float*>(smem);
  constexpr int RS = BN + 8;
  if (tid < C::NC) {
    const int rbase = (warp >> 2) * 64 + (warp & 3) * 16 + gq;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      const int c = 8 * j + 2 * tq;
      *reinterpret_cast<float2*>(red + rbase * RS + c) = make_float2(acc[4 * j], acc[4 * j + 1]);
      *reinterpret_cast<float2*>(red + (rbase + 8) * RS + c) = make_float2(acc[4 * j + 2], acc[4 * j + 3]);
    }
  }
  __syncthreads();
  cluster_reduce_store<__half, BM, BN, NT>(red, p, m0, n0, srank);
#endif
}

}  // namespace qtool_w4a16
