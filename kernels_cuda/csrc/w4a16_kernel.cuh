// W4A16 GEMM on the QUICK interleaved layout (algorithms.md §4b): out = x · ((q − z)·s)ᵀ.
//
// Device code only: no torch headers, so `nvcc -c` checks it anywhere.
//
// Data path
//   * weights: global → registers, 2×128-bit loads per lane per 32-row k-tile, already in
//     mma.sync m16n8k16 B-fragment order (the point of the layout); dequantised in registers
//     with the 1024-magic (fp16) / 128-magic (bf16) trick, (q' − z')·s, never written to shared.
//   * activations: global → shared (cp.async, STAGES-deep ring) → ldmatrix.x4 → mma.
//   * fp32 accumulation; split-K inside the CTA (WK warps along K, reduced in shared memory)
//     and across the CTAs of one thread-block cluster (reduced through distributed shared
//     memory, sm_90), so a single launch covers decode-sized M without a workspace.
//
// CTA geometry (template): WN warps along N (64 columns each, the layout's unit), WM warps along
// M (MT m16-tiles each), WK warps along K.  CTA tile = (16·MT·WM) rows × (64·WN) columns; each
// pipeline step consumes 32·WK columns of K (one 32-row k-tile per K-warp).
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace qtool_w4a16 {

struct Params {
  const void* x;        // [M, K] T, row-major
  const uint4* qw;      // [K/4, N/2] int32 (QUICK)
  const __half* scales; // [G, 2N] fp16
  const uint32_t* qz;   // [G, N/4] int32
  void* out;            // [M, N] T
  int M, N, K, group;
  int split;            // CTAs per cluster along K (== gridDim.x)
};

// ------------------------------------------------------------------------------------ helpers

template <typename T> struct Traits;
template <> struct Traits<__half> {
  static constexpr uint32_t MAGIC = 0x64006400u;  // 1024.0h in both halves
};
template <> struct Traits<__nv_bfloat16> {
  static constexpr uint32_t MAGIC = 0x43004300u;  // 128.0bf in both halves
};

__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// (a − b)·s on packed pairs, each op rounded (the subtraction is exact: small integers).
template <typename T> __device__ __forceinline__ uint32_t sub_mul(uint32_t a, uint32_t b, uint32_t s);
template <> __device__ __forceinline__ uint32_t sub_mul<__half>(uint32_t a, uint32_t b, uint32_t s) {
  uint32_t d, e;
  asm("sub.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  asm("mul.rn.f16x2 %0, %1, %2;\n" : "=r"(e) : "r"(d), "r"(s));
  return e;
}
template <> __device__ __forceinline__ uint32_t sub_mul<__nv_bfloat16>(uint32_t a, uint32_t b, uint32_t s) {
  // fma.rn.bf16x2 exists from sm_80; a − b = fma(b, −1, a) exactly, then (a − b)·s + (−0).
  uint32_t d, e;
  const uint32_t neg1 = 0xBF80BF80u, negz = 0x80008000u;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(b), "r"(neg1), "r"(a));
  asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(e) : "r"(d), "r"(s), "r"(negz));
  return e;
}

// fp16 scale pair → the compute type's pair.
template <typename T> __device__ __forceinline__ uint32_t cvt_scale(uint32_t s);
template <> __device__ __forceinline__ uint32_t cvt_scale<__half>(uint32_t s) { return s; }
template <> __device__ __forceinline__ uint32_t cvt_scale<__nv_bfloat16>(uint32_t s) {
  __half2 h = *reinterpret_cast<__half2*>(&s);
  __nv_bfloat162 b = __float22bfloat162_rn(__half22float2(h));
  return *reinterpret_cast<uint32_t*>(&b);
}

template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <typename T>
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* smem_ptr) {
  uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem_ptr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

__device__ __forceinline__ void cp_async16(void* smem_ptr, const void* gptr, int src_bytes) {
  uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem_ptr));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(a), "l"(gptr), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ uint4 ld_nc_v4(const uint4* p) {
  uint4 r;
  asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}
__device__ __forceinline__ uint2 ld_nc_v2(const uint2* p) {
  uint2 r;
  asm volatile("ld.global.nc.v2.u32 {%0,%1}, [%2];\n" : "=r"(r.x), "=r"(r.y) : "l"(p));
  return r;
}

// One k-tile's worth of a lane's B data: 8 packed weight words, 8 scale pairs, 2 zero words.
struct WStage {
  uint4 w0, w1;  // words 0-3 (k16 half 0), 4-7 (k16 half 1)
  uint4 s0, s1;  // scale pairs for n8 tiles 0-3, 4-7
  uint2 z;       // zero nibbles: tiles 0-3, 4-7
};

// ------------------------------------------------------------------------------------ kernel

template <int MT, int WM, int WN, int WK> struct Geo {
  static constexpr int NT = 32 * WM * WN * WK;
  static constexpr int R = 16 * MT * WM;   // rows per CTA
  static constexpr int COLS = 64 * WN;     // columns per CTA
  static constexpr int KS = 32 * WK;       // K columns per pipeline step
  static constexpr int AROW = KS + 8;      // smem row pitch in elements (+16 B: no ldmatrix conflicts)
  static constexpr int ASTAGE = R * AROW;  // elements per stage
  static constexpr int RS = COLS + 8;      // fp32 reduction row pitch
};

template <typename T, int MT, int WM, int WN, int WK, int D, int STAGES>
constexpr int smem_bytes(bool reduce) {
  using G = Geo<MT, WM, WN, WK>;
  int a = STAGES * G::ASTAGE * 2;
  int r = reduce ? G::R * G::RS * 4 : 0;
  return a > r ? a : r;
}

template <typename T, int MT, int WM, int WN, int WK, int D, int STAGES, int MINB>
__global__ void __launch_bounds__(32 * WM * WN * WK, MINB) w4a16_quick_kernel(const Params p) {
  using G = Geo<MT, WM, WN, WK>;
  constexpr int NT = G::NT, R = G::R, COLS = G::COLS, KS = G::KS, AROW = G::AROW;
  extern __shared__ __align__(16) unsigned char smem[];
  T* As = reinterpret_cast<T*>(smem);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wn = warp % WN, wm = (warp / WN) % WM, wk = warp / (WN * WM);
  const int split = p.split, srank = blockIdx.x;
  const int col0 = blockIdx.y * COLS, row0 = blockIdx.z * R;
  const int M = p.M, N = p.N, K = p.K;
  const int KT = K >> 5;
  const int kt_beg = (int)((long long)KT * srank / split);
  const int kt_end = (int)((long long)KT * (srank + 1) / split);
  const int nsteps = (kt_end - kt_beg + WK - 1) / WK;

  // ---- per-lane B coordinates (algorithms.md §4b)
  const int c64 = (col0 >> 6) + wn;  // global 64-column index: bx = c64/2, y = c64%2
  const int bx = c64 >> 1, y = c64 & 1;
  const int h = lane >> 4, jm = (lane >> 2) & 3;
  // word offset within a k-tile: (2y+h)·N + 128·bx + 8·(lane%16); in uint4 units: /4
  const uint4* wbase = p.qw + (((size_t)(2 * y + h) * N + 128 * bx + 8 * (lane & 15)) >> 2);
  const size_t wstride = (size_t)N;  // one k-tile = 4N words = N uint4
  const int Q = y * (N >> 4) + h * (N >> 5) + 4 * bx + jm;
  const uint4* sbase = reinterpret_cast<const uint4*>(p.scales + 16 * Q);  // + g·2N halves
  const size_t sstride = (size_t)N >> 2;                                     // 2N halves = N/4 uint4
  const uint2* zbase = reinterpret_cast<const uint2*>(p.qz + 2 * Q);        // + g·N/4 words
  const size_t zstride = (size_t)N >> 3;                                     // N/4 words = N/8 uint2
  const int group = p.group;

  auto load_w = [&](WStage& s, int step) {
    const int kt = kt_beg + step * WK + wk;
    if (step < nsteps && kt < kt_end) {
      const uint4* wp = wbase + (size_t)kt * wstride;
      s.w0 = ld_nc_v4(wp);
      s.w1 = ld_nc_v4(wp + 1);
      const int g = (kt << 5) / group;
      const uint4* sp = sbase + (size_t)g * sstride;
      s.s0 = ld_nc_v4(sp);
      s.s1 = ld_nc_v4(sp + 1);
      s.z = ld_nc_v2(zbase + (size_t)g * zstride);
    }
  };

  const T* xg = reinterpret_cast<const T*>(p.x);
  auto load_a = [&](int step) {
    if (step < nsteps) {
      T* dst = As + (step % STAGES) * G::ASTAGE;
      const int kc0 = (kt_beg + step * WK) << 5;
      const int kc_end = kt_end << 5;
      constexpr int CPR = KS / 8;  // 16-byte chunks per row
#pragma unroll
      for (int i0 = 0; i0 < R * CPR; i0 += NT) {
        const int i = i0 + threadIdx.x;
        if (R * CPR % NT == 0 || i < R * CPR) {
          const int r = i / CPR, cc = i % CPR;
          const int grow = row0 + r, gk = kc0 + cc * 8;
          const bool ok = grow < M && gk < kc_end;
          const T* src = ok ? xg + (size_t)grow * K + gk : xg;
          cp_async16(dst + r * AROW + cc * 8, src, ok ? 16 : 0);
        }
      }
    }
  };

  float acc[MT][8][4];
#pragma unroll
  for (int a = 0; a < MT; ++a)
#pragma unroll
    for (int b = 0; b < 8; ++b)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[a][b][c] = 0.f;

  WStage ring[D];
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    load_a(s);
    cp_async_commit();
  }
#pragma unroll
  for (int d = 0; d < D; ++d) load_w(ring[d], d);

  const uint32_t MAGIC = Traits<T>::MAGIC, MASK = 0x000f000fu;
  // ldmatrix.x4 source row/col of this lane inside a 16×16 A tile
  const int a_row = wm * MT * 16 + (lane & 15);
  const int a_col = wk * 32 + (lane >> 4) * 8;

  for (int st0 = 0; st0 < nsteps; st0 += D) {
#pragma unroll
    for (int i = 0; i < D; ++i) {
      const int st = st0 + i;
      if (st < nsteps) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        load_a(st + STAGES - 1);
        cp_async_commit();
        const int kt = kt_beg + st * WK + wk;
        if (kt < kt_end) {
          const WStage& s = ring[i];
          const T* Ast = As + (st % STAGES) * G::ASTAGE;
          uint32_t sc[8] = {s.s0.x, s.s0.y, s.s0.z, s.s0.w, s.s1.x, s.s1.y, s.s1.z, s.s1.w};
          uint32_t zz[8];
#pragma unroll
          for (int t8 = 0; t8 < 8; ++t8) {
            sc[t8] = cvt_scale<T>(sc[t8]);
            zz[t8] = lop3_and_or((t8 < 4 ? s.z.x : s.z.y) >> (4 * (t8 & 3)), MASK, MAGIC);
          }
          const uint32_t wd[8] = {s.w0.x, s.w0.y, s.w0.z, s.w0.w, s.w1.x, s.w1.y, s.w1.z, s.w1.w};
#pragma unroll
          for (int kh = 0; kh < 2; ++kh) {
            uint32_t af[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
              ldmatrix_x4(af[mt], Ast + (a_row + mt * 16) * AROW + a_col + kh * 16);
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              const uint32_t w = wd[4 * kh + c];
              const uint32_t b00 = sub_mul<T>(lop3_and_or(w, MASK, MAGIC), zz[2 * c], sc[2 * c]);
              const uint32_t b01 = sub_mul<T>(lop3_and_or(w >> 4, MASK, MAGIC), zz[2 * c], sc[2 * c]);
              const uint32_t b10 = sub_mul<T>(lop3_and_or(w >> 8, MASK, MAGIC), zz[2 * c + 1], sc[2 * c + 1]);
              const uint32_t b11 = sub_mul<T>(lop3_and_or(w >> 12, MASK, MAGIC), zz[2 * c + 1], sc[2 * c + 1]);
#pragma unroll
              for (int mt = 0; mt < MT; ++mt) {
                mma16816<T>(acc[mt][2 * c], af[mt], b00, b01);
                mma16816<T>(acc[mt][2 * c + 1], af[mt], b10, b11);
              }
            }
          }
        }
        load_w(ring[i], st + D);
      }
    }
  }
  cp_async_wait<0>();

  // ---- epilogue
  const int gq = lane >> 2, tq = lane & 3;
  if (WK == 1 && split == 1) {
    T* out = reinterpret_cast<T*>(p.out);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int r = row0 + wm * MT * 16 + mt * 16 + gq;
#pragma unroll
      for (int tl = 0; tl < 8; ++tl) {
        const int c = col0 + wn * 64 + tl * 8 + 2 * tq;
        if (r < M)
          *reinterpret_cast<uint32_t*>(out + (size_t)r * N + c) = pack2<T>(acc[mt][tl][0], acc[mt][tl][1]);
        if (r + 8 < M)
          *reinterpret_cast<uint32_t*>(out + (size_t)(r + 8) * N + c) =
              pack2<T>(acc[mt][tl][2], acc[mt][tl][3]);
      }
    }
    return;
  }

  // CTA-level reduction into an fp32 tile in shared memory (reuses the A ring)
  __syncthreads();
  float* red = reinterpret_cast<float*>(smem);
  constexpr int RS = G::RS;
#pragma unroll
  for (int pass = 0; pass < (WK > 1 ? 2 : 1); ++pass) {
    if ((pass == 0) == (wk == 0)) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int r = wm * MT * 16 + mt * 16 + gq;
#pragma unroll
        for (int tl = 0; tl < 8; ++tl) {
          const int c = wn * 64 + tl * 8 + 2 * tq;
          float* p0 = red + r * RS + c;
          float* p1 = red + (r + 8) * RS + c;
          if (pass == 0) {
            *reinterpret_cast<float2*>(p0) = make_float2(acc[mt][tl][0], acc[mt][tl][1]);
            *reinterpret_cast<float2*>(p1) = make_float2(acc[mt][tl][2], acc[mt][tl][3]);
          } else {
            atomicAdd(p0, acc[mt][tl][0]);
            atomicAdd(p0 + 1, acc[mt][tl][1]);
            atomicAdd(p1, acc[mt][tl][2]);
            atomicAdd(p1 + 1, acc[mt][tl][3]);
          }
        }
      }
    }
    __syncthreads();
  }

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  if (split > 1) cluster.sync();
#endif
  const int rows = min(R, M - row0);
  constexpr int CH = COLS / 4;  // float4 chunks per row
  const int total = rows * CH;
  T* out = reinterpret_cast<T*>(p.out);
  for (int i = srank * NT + threadIdx.x; i < total; i += split * NT) {
    const int r = i / CH, c4 = i % CH;
    float4 v = *reinterpret_cast<const float4*>(red + r * RS + c4 * 4);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    for (int q = 1; q < split; ++q) {
      const int rk = (srank + q) % split;  // stagger the remote reads
      const float* rp = cluster.map_shared_rank(red, rk);
      const float4 u = *reinterpret_cast<const float4*>(rp + r * RS + c4 * 4);
      v.x += u.x; v.y += u.y; v.z += u.z; v.w += u.w;
    }
#endif
    uint2 o;
    o.x = pack2<T>(v.x, v.y);
    o.y = pack2<T>(v.z, v.w);
    *reinterpret_cast<uint2*>(out + (size_t)(row0 + r) * N + col0 + c4 * 4) = o;
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (split > 1) cluster.sync();  // keep our shared memory alive until every reader is done
#endif
}

}  // namespace qtool_w4a16
