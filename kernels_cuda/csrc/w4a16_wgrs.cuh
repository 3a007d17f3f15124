// W4A16 on Hopper wgmma with the WEIGHTS as the register A operand ("RS" wgmma), for M ≥ 64:
// outᵀ tile = W tile · xᵀ tile. The QUICK layout's point holds again: a lane's B fragments of n8
// tiles 2w, 2w+1 (word w of its 32 bytes, and word 4 + w for the second k16 half) are warp w's
// m16k16 A fragment {b00, b10, b01, b11} of a 64-feature wgmma row block, so each consumer thread
// reads 2 words per k-tile (raw; the producer transposes them word-major on the way into shared
// memory, WordCopierT, so those reads are conflict-free), dequantises them in registers with the mma.sync
// kernels' math ((q − z)·s in fp16, same rounding), and issues wgmma m64nBTk16 with the activations
// (BT tokens × 64 k, K-major SWIZZLE_128B, the B operand) from shared memory. No dequantised weight
// is written to shared memory; nothing is converted by another warp. One producer warpgroup only
// copies — the activation tile and the raw packed words / scales / zeros of each 64-k stage — into
// an S-deep ring (cp.async; the full barrier completes through cp.async.mbarrier.arrive when the copies
// land, so the producer never waits for them, only for empty slots; a first version loaded the
// weights per consumer thread from global memory through a 2-stage register ring and was latency-
// bound). NWG consumer warpgroups cover FB 64-feature blocks each (FB wgmma per k16 step sharing the
// activation descriptor: a wider CTA re-reads each activation tile from L2 fewer times, N / (64·NWG·FB));
// A fragments are double-buffered so stage i + 1 dequantises while wgmma(i) runs. Split-K
// over a cluster (cluster_reduce_store, which also transposes back to [tokens, features]).
// MC = 2: the activation tile — most of a stage's bytes at M ≥ 128, re-read from L2 by every
// feature-block CTA — comes by TMA, each of two CTAs of neighbouring feature blocks (a cluster of
// two) loading half the token rows and multicasting them into both; a slot is refilled only
// when the consumers of both CTAs have released it (the empty barriers count the peer's warps too).
// Their split-K goes through global memory (global_reduce_store), not a cluster: split × 2 clusters
// of 4 or more did not fit one wave at one CTA per SM.
// fp16 only; K % 64 == 0, group % 64 == 0.
#pragma once
#include "w4a16_wgmma.cuh"

namespace qtool_w4a16 {

template <int NWG, int BT, int S, int FB, int CR, int MC = 1>
struct WrsGeo {
  static constexpr int NC = 128 * NWG, NT = NC + 128, NB = NWG * FB, COLS = 64 * NB;
  static constexpr int X_BYTES = BT * 128;   // BT tokens × 64 fp16, swizzled
  static constexpr int W_BYTES = COLS * 32;  // raw words: 2 k-tiles × NB blocks × 32 lanes × 32 B
  static constexpr int S_BYTES = COLS * 16;  // scale pairs: NB blocks × 32 lanes × 32 B
  static constexpr int Z_BYTES = COLS * 4;   // zero words: NB blocks × 32 lanes × 8 B
  static constexpr int IN = (X_BYTES + W_BYTES + S_BYTES + Z_BYTES + 1023) / 1024 * 1024;
  static constexpr int MAIN = S * IN + 16 * S;
  static constexpr int RED = BT * (COLS + 8) * 4;
  static constexpr int SMEM = (MAIN > RED ? MAIN : RED) + 1024;
  // CR > 0: the producer hands registers to the consumers (setmaxnreg: consumers CR, producer what
  // is left of 168 × 384), for FB · BT / 2 = 128 accumulators per consumer thread, where 384 threads
  // otherwise cap every thread at 168. At CR = 216 ptxas serialises the wgmma (warning C7512: it
  // waits for each before the next); at 224 it does not and the producer spills 28 bytes, but that
  // measured 5-15 % slower at every M (H200 sweep, docs/kernels-notes.md), so c41 keeps 216.
  static constexpr bool REG_SHIFT = CR > 0;
  static constexpr int PR = (168 * 384 - 256 * CR) / 128;
  static_assert(!REG_SHIFT || (NWG == 2 && CR % 8 == 0 && PR >= 24 && PR % 8 == 0), "register hand-over");
  static_assert(S >= 3, "ring depth");
  static_assert(MC == 1 || (MC == 2 && BT / MC % 8 == 0), "multicast: two CTAs, whole 8-row swizzle atoms each");
  // the consumers write the reduction tile while the producer may still be polling an empty barrier
  static_assert(RED + 16 <= S * IN, "reduction tile (+ the split-K flag) must not reach the mbarriers");
};

#if defined(QTOOL_HAS_SM90A) && defined(__CUDACC__)
namespace wg16 {
__device__ __forceinline__ void wgmma_rs_n64(float (&d)[32], const uint32_t (&a)[4], uint64_t db) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n"
      "}\n"
      : QTOOL_WG_ACC32("+f", d, 0)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}

__device__ __forceinline__ void wgmma_rs_n128(float (&d)[64], const uint32_t (&a)[4], uint64_t db) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n"
      "}\n"
      : QTOOL_WG_ACC64("+f", d, 0)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}

__device__ __forceinline__ void wgmma_rs_n256(float (&d)[128], const uint32_t (&a)[4], uint64_t db) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %133, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
      "{%128, %129, %130, %131}, %132, p, 1, 1, 0;\n"
      "}\n"
      : QTOOL_WG_ACC128("+f", d)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}

template <int BT>
__device__ __forceinline__ void wgmma_rs(float (&d)[BT / 2], const uint32_t (&a)[4], uint64_t db) {
  if constexpr (BT == 256) {
    wgmma_rs_n256(d, a, db);
  } else if constexpr (BT == 128) {
    wgmma_rs_n128(d, a, db);
  } else {
    wgmma_rs_n64(d, a, db);
  }
}
}  // namespace wg16
#endif

#if defined(QTOOL_HAS_SM90A) && defined(__CUDACC__)
// The raw weight words of a stage, transposed on the way into shared memory: word w of lane L's 32 bytes
// of (k-tile ktl, 64-feature block cb) lands at ((ktl·NB + cb)·8 + w)·128 + 4·(L ^ 4w). Consumer warp wq
// reads words wq and 4 + wq of every lane, so each of its loads is one 128-byte row (one shared-memory
// wavefront; as copied, a lane stride of 32 bytes made every such load an 8-way bank conflict), and the
// XOR keeps the producer's 4-byte writes (8 words × 4 lanes per warp instruction) conflict-free too.
// Thread pt copies word pt & 7 of lane (pt >> 3) & 15 (+ 16 for odd it) of block (ktl, cb) = it >> 1:
// a warp reads 128 contiguous bytes of global memory per copy.
template <int NB>
struct WordCopierT {
  static constexpr int IT = 4 * NB;  // 2 k-tiles × NB blocks × 32 lanes × 8 words / 128 threads
  const unsigned char* src;           // word w of lane l15 of 64-column block c0 = n0 / 64 with y = 0, stage 0
  uint32_t dst;                       // its shared-memory offset before the per-copy terms
  int c0;                             // the CTA's first 64-column block
  size_t n4;                          // 4·N bytes: the row stride of the QUICK layout
  __device__ __forceinline__ WordCopierT(const Params& p, int n0, int pt) {
    const int w = pt & 7, l15 = (pt >> 3) & 15;
    c0 = n0 >> 6;
    n4 = 4 * (size_t)p.N;
    src = reinterpret_cast<const unsigned char*>(p.qw) + 32 * l15 + 4 * w;
    if constexpr (NB % 2 == 0) src += 512 * (size_t)(c0 >> 1);  // n0 = blockIdx · 64·NB: c0 is even
    dst = w * 128 + 4 * (l15 ^ (4 * w));
  }
  __device__ __forceinline__ void copy(uint32_t sW, int st) const {
    const unsigned char* s0 = src + (size_t)st * 8 * n4;  // a 64-k stage = two 32-k tiles of 16·N bytes
#pragma unroll
    for (int it = 0; it < IT; ++it) {
      const int h = it & 1, q = it >> 1, ktl = q / NB, cb = q % NB;
      // lane_b's layout in bytes: (2y + h)·4N + 512·bx (+ 32·lane15 + 4·w) for column block c64 = 2·bx + y,
      // + 16N per k-tile; lanes 16..31 (h) land at the same offsets XOR 64
      const int c64 = NB % 2 == 0 ? cb : c0 + cb, y = c64 & 1, bx = c64 >> 1;
      const unsigned char* g = s0 + (size_t)(2 * y + h + 4 * ktl) * n4 + 512 * (size_t)bx;
      const uint32_t d = sW + (q * 8) * 128 + (dst ^ (64 * h));
      wg16::cp4(d, g);
    }
  }
};

#endif

// Split-K through global memory (the multicast configs, whose clusters are the multicast pair): every
// K slice stores its fp32 tile `red` (R × (COLS + 8), this CTA's sum) to its slot of p.ws and counts
// itself in the tile's counter; the slice that arrives last sums all slots in slice order (its own from
// shared memory: the same bits it stored) and writes the output. Fixed order, so bitwise deterministic.
// No slice waits for another, so it needs no co-residency. The counter wraps back to zero on the last
// arrival (atom.inc), ready for the next launch. One thread orders the CTA's stores by a release /
// acquire atomic after a CTA barrier (cumulativity), instead of a full fence in every thread.
// `flag`: a shared int.
template <int R, int COLS, int NT>
__device__ __forceinline__ void global_reduce_store(const float* red, const Params& p, int row0, int col0, int srank,
                                                    int* flag) {
  constexpr int RS = COLS + 8, CH = COLS / 4;  // float4 chunks per row
  constexpr int U = 4;                         // chunks in flight per thread in the sum
  const int split = p.split, tile = blockIdx.z * gridDim.y + blockIdx.y;
  const int total = min(R, p.M - row0) * CH;
  float4* slots = reinterpret_cast<float4*>(p.ws) + (size_t)tile * split * (R * CH);
  for (int i = threadIdx.x; i < total; i += NT)
    __stcg(slots + (size_t)srank * (R * CH) + i, *reinterpret_cast<const float4*>(red + (i / CH) * RS + (i % CH) * 4));
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t old;
    asm volatile("atom.acq_rel.gpu.global.inc.u32 %0, [%1], %2;\n"
                 : "=r"(old) : "l"(p.sem + tile), "r"((uint32_t)(split - 1)) : "memory");
    *flag = old == (uint32_t)(split - 1);
  }
  __syncthreads();
  if (!*flag) return;
  __half* out = reinterpret_cast<__half*>(p.out);
  for (int i0 = threadIdx.x; i0 < total; i0 += U * NT) {
    float4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = i0 + u * NT;
      if (i < total) v[u] = srank == 0 ? *reinterpret_cast<const float4*>(red + (i / CH) * RS + (i % CH) * 4)
                                       : __ldcg(slots + i);
    }
    for (int q = 1; q < split; ++q) {  // fixed slice order
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = i0 + u * NT;
        if (i < total) {
          const float4 w = q == srank ? *reinterpret_cast<const float4*>(red + (i / CH) * RS + (i % CH) * 4)
                                      : __ldcg(slots + (size_t)q * (R * CH) + i);
          v[u].x += w.x; v[u].y += w.y; v[u].z += w.z; v[u].w += w.w;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = i0 + u * NT;
      if (i < total) {
        uint2 o;
        o.x = pack2<__half>(v[u].x, v[u].y);
        o.y = pack2<__half>(v[u].z, v[u].w);
        *reinterpret_cast<uint2*>(out + (size_t)(row0 + i / CH) * p.N + col0 + (i % CH) * 4) = o;
      }
    }
  }
}

// tmx: the activations' TMA descriptor (box BT / MC rows × 64; MC = 2 only, unread otherwise).
template <int NWG, int BT, int S, int FB, int MINB, int CR, int PDL, int MC>
__global__ void __launch_bounds__(128 * NWG + 128, MINB) w4a16_wgrs(const Params p, const __grid_constant__ CUtensorMap tmx) {
#if defined(QTOOL_HAS_SM90A) && defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = WrsGeo<NWG, BT, S, FB, CR, MC>;
  using namespace wg16;
  constexpr int NT = C::NT;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t raw_u = su32(smem_raw);
  const uint32_t base_u = (raw_u + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (base_u - raw_u);
  const uint32_t bar_full = base_u + S * C::IN, bar_empty = bar_full + 8 * S;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int gq = lane >> 2, tq = lane & 3;
  const int K = p.K;
  const int srank = blockIdx.x, n0 = blockIdx.y * C::COLS, m0 = blockIdx.z * BT;
  const int NS = K >> 6;
  const int s_beg = (int)((long long)NS * srank / p.split), s_end = (int)((long long)NS * (srank + 1) / p.split);
  const int nk = s_end - s_beg;
  // MC = 2: this CTA's rank in its cluster (1 × 2: the multicast pair) and its peer's
  const int yl = MC > 1 ? (int)(blockIdx.y & 1) : 0;
  const uint32_t peer = (uint32_t)(1 - yl);
  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(bar_full + 8 * s, 128);
      mbar_init(bar_empty + 8 * s, C::NC + (MC - 1) * C::NC / 32);  // + the peer's consumer warps
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  if constexpr (MC > 1) {
    // the peer's multicasts and arrivals find our barriers initialised (the init fence above orders them)
    qtool_sm90::cluster_sync_relaxed();
  } else {
    __syncthreads();
  }
  if (tid >= C::NC) {
    if constexpr (C::REG_SHIFT) asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(C::PR) : "memory");
    // ------------------------------------------------------------------ producer: copies only
    // per stage: the activation tile, and the QUICK layout's raw words / scale pairs / zero words of
    // the CTA's NB 64-column blocks (as the warp-specialised kernel's loader)
    const int pt = tid - C::NC;
    const ActCopier<BT> act(p, m0, pt);
    const WordCopierT<C::NB> words(p, n0, pt);
    const ScaleZeroCopier<C::NB> scl(p, n0, pt);  // their reads stay 8-way / 2-way conflicted: 2 of 6 loads
    auto copy_raw = [&](int i) {
      const uint32_t sW = base_u + (i % S) * C::IN + C::X_BYTES;
      words.copy(sW, s_beg + i);
      scl.copy(p, sW + C::W_BYTES, sW + C::W_BYTES + C::S_BYTES, s_beg + i);
    };
    // Programmatic dependent launch (PDL configs, as the decode kernels): only the producer reads
    // global memory, so only it waits for the previous kernel; mode 2 requests the first S stages'
    // weights (static) before that wait. A stage's full barrier tracks all earlier copies of the
    // thread, so the prefetched weights are covered by the arrive below.
    int pre = 0;
    if constexpr (PDL != 0) {
      pdl_launch_dependents(p.pdl);
      pre = p.pdl == 2 ? min(S, nk) : 0;
      for (int i = 0; i < pre; ++i) copy_raw(i);
      pdl_wait(p.pdl != 0);
    }
    for (int i = 0; i < nk; ++i) {
      const int slot = i % S;
      if (i >= S) mbar_wait(bar_empty + 8 * slot, ((i / S) + 1) & 1);
      if constexpr (MC > 1) {
        // half the token rows, into this slot of both CTAs; the slot's full barrier expects the whole
        // tile (the peer's half completes on it too, possibly before this expect: tx-counts may dip)
        if (pt == 0) {
          const uint32_t bar = bar_full + 8 * slot;
          qtool_sm90::mbar_expect_tx(bar, C::X_BYTES);
          qtool_sm90::tma_load_2d_multicast(base_u + slot * C::IN + yl * (C::X_BYTES / MC), &tmx, (s_beg + i) * 64,
                                            m0 + yl * (BT / MC), bar, (uint16_t)3u);
        }
      } else {
        act.copy(base_u + slot * C::IN, (s_beg + i) * 64);
      }
      if (i >= pre) copy_raw(i);
      // the stage's full barrier completes when every producer thread's copies have landed: the
      // producer never waits for its own copies and runs up to S stages ahead
      cp_async_mbar_arrive(bar_full + 8 * slot);
    }
    cp_async_wait<0>();
    if constexpr (C::REG_SHIFT) asm volatile("setmaxnreg.inc.sync.aligned.u32 168;\n" ::: "memory");
  } else {
    // ------------------------------------------------------------------ consumers
    if constexpr (C::REG_SHIFT) asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(CR) : "memory");
    const int wgi = warp >> 2, wq = warp & 3;
    const int zsh = 4 * ((2 * wq) & 3);
    float acc[FB][BT / 2];
#pragma unroll
    for (int j = 0; j < FB; ++j)
#pragma unroll
      for (int i = 0; i < BT / 2; ++i) acc[j][i] = 0.f;
    uint32_t afr[2][FB][4][4];  // [buffer][feature block][k16 step][a0..a3]
    // wgmma reads its register A operand asynchronously: a buffer must keep its registers until the
    // wgmma group that reads it has completed. The compiler does not know that, so the buffer of
    // wgmma(st − 1) is kept alive (an empty asm reading it) until after wait_group 1 in iteration st.
    auto keep = [](const uint32_t (&f)[FB][4][4]) {
#pragma unroll
      for (int j = 0; j < FB; ++j)
#pragma unroll
        for (int s = 0; s < 4; ++s)
          asm volatile("" ::"r"(f[j][s][0]), "r"(f[j][s][1]), "r"(f[j][s][2]), "r"(f[j][s][3]) : "memory");
    };
#pragma unroll 1
    for (int st0 = 0; st0 < nk; st0 += 2) {
#pragma unroll
      for (int b = 0; b < 2; ++b) {
        const int st = st0 + b;
        if (st < nk) {
          const int slot = st % S;
          mbar_wait(bar_full + 8 * slot, (st / S) & 1);
          fence_proxy_async();  // the copies (generic proxy) become visible to wgmma (async proxy)
          const unsigned char* in = smem + slot * C::IN;
#pragma unroll
          for (int j = 0; j < FB; ++j) {
            // block cb's words (wq, 4 + wq) of this lane's 32 bytes per k-tile; the lane's scale pairs
            // and zero word of tiles 2wq, 2wq + 1
            const int cb = wgi * FB + j;
            uint32_t wv[4];
#pragma unroll
            for (int ktl = 0; ktl < 2; ++ktl) {
              // words wq and 4 + wq of this lane (WordCopierT's transposed rows)
              const unsigned char* wb = in + C::X_BYTES + (ktl * C::NB + cb) * 1024;
              wv[2 * ktl] = *reinterpret_cast<const uint32_t*>(wb + wq * 128 + 4 * (lane ^ (4 * wq)));
              wv[2 * ktl + 1] = *reinterpret_cast<const uint32_t*>(wb + (4 + wq) * 128 + 4 * (lane ^ (16 + 4 * wq)));
            }
            const uint2 sp =
                *reinterpret_cast<const uint2*>(in + C::X_BYTES + C::W_BYTES + (cb * 32 + lane) * 32 + 8 * wq);
            const uint32_t zw = *reinterpret_cast<const uint32_t*>(in + C::X_BYTES + C::W_BYTES + C::S_BYTES +
                                                                   (cb * 32 + lane) * 8 + 4 * (wq >> 1));
            BConst bc;  // entries 0, 1 = tiles 2wq, 2wq + 1
            const uint4 sv = make_uint4(sp.x, sp.y, 0u, 0u);
            unpack_bconst<__half>(bc, sv, sv, make_uint2(zw >> zsh, 0u));
#pragma unroll
            for (int s = 0; s < 4; ++s) {
              uint32_t b00, b01, b10, b11;
              dequant_word<__half>(wv[s], bc, 0, b00, b01, b10, b11);
              afr[b][j][s][0] = b00;
              afr[b][j][s][1] = b10;
              afr[b][j][s][2] = b01;
              afr[b][j][s][3] = b11;
            }
          }
          const uint32_t sx = base_u + slot * C::IN;
          wgmma_fence();
#pragma unroll
          for (int s = 0; s < 4; ++s)
#pragma unroll
            for (int j = 0; j < FB; ++j) wgmma_rs<BT>(acc[j], afr[b][j][s], desc_sw128(sx + 32 * s));
          wgmma_commit();
          wgmma_wait<1>();  // wgmma(st − 1) done: its A registers and stage slot are free
          keep(afr[b ^ 1]);
          if (st >= 1) {
            mbar_arrive(bar_empty + 8 * ((st - 1) % S));
            if constexpr (MC > 1) {  // the peer multicasts into this slot too: one arrival per warp there
              __syncwarp();
              if (lane == 0) qtool_sm90::mbar_arrive_remote(bar_empty + 8 * ((st - 1) % S), peer);
            }
          }
        }
      }
    }
    wgmma_wait<0>();
    keep(afr[0]);
    keep(afr[1]);
#pragma unroll
    for (int j = 0; j < FB; ++j)  // the accumulators are read only after the wait above
#pragma unroll
      for (int i = 0; i < BT / 2; ++i) asm volatile("" : "+f"(acc[j][i])::"memory");
    // every consumer's wgmma done (the producer's copies all landed before the last full barrier):
    // the ring becomes the reduction buffer. Written here, inside the consumer branch, so the
    // accumulators never live where ptxas must assume the kernel-wide register cap.
    asm volatile("bar.sync 2, %0;\n" ::"n"(C::NC) : "memory");
    // accumulator of block cb (feature 64·cb + 16·wq + gq (+8), token 8i + 2tq (+1)) → red[token][feature]
    float* red = reinterpret_cast<float*>(smem);
    constexpr int RS = C::COLS + 8;
#pragma unroll
    for (int jb = 0; jb < FB; ++jb) {
      const int f0 = (wgi * FB + jb) * 64 + wq * 16 + gq;
#pragma unroll
      for (int i = 0; i < BT / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          red[(8 * i + 2 * tq + (e & 1)) * RS + f0 + 8 * (e >> 1)] = acc[jb][4 * i + e];
    }
    if constexpr (C::REG_SHIFT) asm volatile("setmaxnreg.dec.sync.aligned.u32 168;\n" ::: "memory");
  }
  if constexpr (MC > 1) {
    qtool_sm90::cluster_sync_all();  // no peer arrival or multicast reaches this CTA after here
  } else {
    __syncthreads();
  }
  float* red = reinterpret_cast<float*>(smem);
  if (MC > 1 && p.split > 1) {
    global_reduce_store<BT, C::COLS, NT>(red, p, m0, n0, srank, reinterpret_cast<int*>(smem + C::RED));
  } else {
    cluster_reduce_store<__half, BT, C::COLS, NT>(red, p, m0, n0, srank);
  }
#endif
}

}  // namespace qtool_w4a16
