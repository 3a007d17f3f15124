// W4A16 GEMM on the QUICK interleaved layout (algorithms.md §4b): out = x · ((q − z)·s)ᵀ.
//
// Device code only: no torch headers, so `nvcc -c` checks it anywhere.
//
// The kernels share the math (weights dequantised in registers with the 1024-magic (fp16) /
// 128-magic (bf16) trick, (q' − z')·s, straight into mma.sync m16n8k16 B fragments — the point of
// the layout: a lane's 2×16 bytes per 32-row k-tile ARE its B fragments; dequantised weights are
// never written to shared memory; A goes through shared memory and ldmatrix.x4; fp32 accumulation):
//
//   * w4a16_gdec (decode, M ≤ 16): the CTA's whole K-slice of A is copied to shared memory once,
//     then the main loop has NO barrier: each lane streams its weight words global → registers
//     through a D-deep register ring of group chunks (predicated 128-bit loads, no branches).  A
//     barrier inside the loop would make every prefetched load drain first (seen in v1: ~1 µs per
//     step).  w4a16_tdec is its transposed form (fp16, M ≤ 16: the weights as the MMA's A operand).
//   * w4a16_staged (M > 16): a STAGES-deep cp.async ring carries both the A tile and the raw
//     packed weight words / scales / zeros of each k-tile (copied, not dequantised) into shared
//     memory; each lane then reads its own 32 bytes (conflict-free LDS.128) and dequantises in
//     registers.  cp.async keeps loads in flight across the per-step barrier.
//   (The wgmma kernels for M > 16 on Hopper are in w4a16_wgmma.cuh / w4a16_wgrs.cuh.)
//
// Split-K inside the CTA (WK warps along K, deterministic reduction in shared memory) and across
// the CTAs of one thread-block cluster (`split` CTAs, reduced through distributed shared memory,
// sm_90): one launch, no workspace, bitwise-deterministic.
//
// CTA geometry: WN warps along N (64 columns each, the layout's unit), WM warps along M (MT
// m16-tiles each), WK warps along K.  CTA tile = (16·MT·WM) rows × (64·WN) columns.
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "sm90_common.cuh"

namespace qtool_w4a16 {

struct Params {
  const void* x;        // [M, K] T, row-major
  const uint4* qw;      // [K/4, N/2] int32 (QUICK)
  const __half* scales; // [G, 2N] fp16
  const uint32_t* qz;   // [G, N/4] int32
  void* out;            // [M, N] T
  int M, N, K, group;
  int gshift;           // log2(group / 32) when group/32 is a power of two, else -1
  int split;            // K slices (== gridDim.x): CTAs per cluster along K, or through `ws` (multicast configs)
  int pdl;              // programmatic dependent launch: 0 off, 1 on, 2 on + weight prefetch before the wait
  float* ws;            // split-K through global memory (multicast configs, split > 1): fp32 partial tiles
  int* sem;             // and one arrival counter per output tile, zero at launch
};

// ------------------------------------------------------------------------------------ helpers

template <typename T> struct Traits;
template <> struct Traits<__half> {
  static constexpr uint32_t MAGIC = 0x64006400u;  // 1024.0h in both halves
  static constexpr bool HI_IN_PLACE = true;       // 10 mantissa bits: MAGIC | 16q is exact
};
template <> struct Traits<__nv_bfloat16> {
  static constexpr uint32_t MAGIC = 0x43004300u;  // 128.0bf in both halves
  static constexpr bool HI_IN_PLACE = false;
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
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm(
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


__device__ __forceinline__ void ld_nc_v4_pred(uint4& r, const uint4* p, bool pred) {
  asm volatile(
      "{\n .reg .pred q;\n setp.ne.b32 q, %5, 0;\n @q ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];\n}\n"
      : "+r"(r.x), "+r"(r.y), "+r"(r.z), "+r"(r.w)
      : "l"(p), "r"((int)pred));
}
__device__ __forceinline__ void ld_nc_v2_pred(uint2& r, const uint2* p, bool pred) {
  asm volatile("{\n .reg .pred q;\n setp.ne.b32 q, %3, 0;\n @q ld.global.nc.v2.u32 {%0,%1}, [%2];\n}\n"
               : "+r"(r.x), "+r"(r.y)
               : "l"(p), "r"((int)pred));
}
__device__ __forceinline__ uint4 lds128(const void* p) {
  uint4 r;
  uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "r"(a));
  return r;
}
__device__ __forceinline__ uint2 lds64(const void* p) {
  uint2 r;
  uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ld.shared.v2.u32 {%0,%1}, [%2];\n" : "=r"(r.x), "=r"(r.y) : "r"(a));
  return r;
}

// The fp32 accumulators of MT 16-row tiles x 8 n8 blocks, zeroed.
template <int MT>
__device__ __forceinline__ void zero_acc(float (&acc)[MT][8][4]) {
#pragma unroll
  for (int a = 0; a < MT; ++a)
#pragma unroll
    for (int b = 0; b < 8; ++b)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[a][b][c] = 0.f;
}

template <int MT, int WM, int WN, int WK> struct Geo {
  static constexpr int NT = 32 * WM * WN * WK;
  static constexpr int R = 16 * MT * WM;   // rows per CTA
  static constexpr int COLS = 64 * WN;     // columns per CTA
  static constexpr int KS = 32 * WK;       // K columns per pipeline step
  static constexpr int AROW = KS + 8;      // smem row pitch in elements (+16 B: no ldmatrix conflicts)
  static constexpr int ASTAGE = R * AROW;  // elements per stage
  static constexpr int RS = COLS + 8;      // fp32 reduction row pitch
};

// Per-lane constants of the §4b layout for the warp owning 64-column block c64.
struct LaneB {
  size_t w_off;   // uint4 offset of the lane's 32 bytes inside a k-tile (k-tile stride: N uint4)
  size_t s_off;   // uint4 offset of the lane's 32 scale bytes inside a group row (row stride N/4)
  size_t z_off;   // uint2 offset of the lane's zero words inside a group row (row stride N/8)
};
__device__ __forceinline__ LaneB lane_b(int c64, int lane, int N) {
  const int bx = c64 >> 1, y = c64 & 1, h = lane >> 4, jm = (lane >> 2) & 3;
  const int Q = y * (N >> 4) + h * (N >> 5) + 4 * bx + jm;
  LaneB b;
  b.w_off = ((size_t)(2 * y + h) * N + 128 * bx + 8 * (lane & 15)) >> 2;
  b.s_off = (size_t)Q * 2;  // 16·Q halves = 2·Q uint4
  b.z_off = (size_t)Q;      // 2·Q words = Q uint2
  return b;
}

// Per-group B constants of one lane, unpacked once per group (or per k-tile where the caller does
// not hoist them): the 8 scale pairs (compute type) and the zero pairs in the forms the dequant
// below subtracts.
struct BConst {
  uint32_t sc[8];   // scale pairs, n8 tiles 0..7
  uint32_t zz[8];   // MAGIC | z       (low nibbles: (MAGIC|q) − zz = q − z, exact)
  uint32_t nzh[8];  // fp16 only: −(64 + z) (high nibbles: fma(MAGIC|16q, 1/16, nzh) = q − z, exact)
};
template <typename T>
__device__ __forceinline__ void unpack_bconst(BConst& b, const uint4& s0, const uint4& s1, const uint2& z) {
  const uint32_t MAGIC = Traits<T>::MAGIC, MASK = 0x000f000fu;
  const uint32_t sc[8] = {s0.x, s0.y, s0.z, s0.w, s1.x, s1.y, s1.z, s1.w};
#pragma unroll
  for (int t8 = 0; t8 < 8; ++t8) {
    b.sc[t8] = cvt_scale<T>(sc[t8]);
    b.zz[t8] = lop3_and_or((t8 < 4 ? z.x : z.y) >> (4 * (t8 & 3)), MASK, MAGIC);
    if constexpr (Traits<T>::HI_IN_PLACE) {
      uint32_t d;
      asm("sub.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(0x63806380u), "r"(b.zz[t8]));  // 960 − (1024 + z)
      b.nzh[t8] = d;
    } else {
      b.nzh[t8] = 0;
    }
  }
}

// The 4 B fragments (2 n8 tiles × k16) held in one packed word: nibbles (0,4), (1,5) → tile 2c,
// (2,6), (3,7) → tile 2c+1. fp16: the high nibble of each byte is taken in place (mask 0x00f0:
// MAGIC | 16q = 1024 + 16q, exact) and brought to q − z by one exact fma, so a word costs one
// shift instead of three; bf16 (7 mantissa bits: no room for 16q) shifts each nibble down.
template <typename T>
__device__ __forceinline__ void dequant_word(uint32_t w, const BConst& b, int c, uint32_t& b00, uint32_t& b01,
                                             uint32_t& b10, uint32_t& b11) {
  const uint32_t MAGIC = Traits<T>::MAGIC, MASK = 0x000f000fu;
  if constexpr (Traits<T>::HI_IN_PLACE) {
    const uint32_t HI = 0x00f000f0u, SIXTEENTH = 0x2c002c00u;  // 1/16 in both halves
    const uint32_t w8 = w >> 8;
    uint32_t h0, h1, e0, e1;
    asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(h0) : "r"(lop3_and_or(w, HI, MAGIC)), "r"(SIXTEENTH), "r"(b.nzh[2 * c]));
    asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(h1) : "r"(lop3_and_or(w8, HI, MAGIC)), "r"(SIXTEENTH), "r"(b.nzh[2 * c + 1]));
    asm("mul.rn.f16x2 %0, %1, %2;\n" : "=r"(e0) : "r"(h0), "r"(b.sc[2 * c]));
    asm("mul.rn.f16x2 %0, %1, %2;\n" : "=r"(e1) : "r"(h1), "r"(b.sc[2 * c + 1]));
    b00 = sub_mul<T>(lop3_and_or(w, MASK, MAGIC), b.zz[2 * c], b.sc[2 * c]);
    b01 = e0;
    b10 = sub_mul<T>(lop3_and_or(w8, MASK, MAGIC), b.zz[2 * c + 1], b.sc[2 * c + 1]);
    b11 = e1;
  } else {
    b00 = sub_mul<T>(lop3_and_or(w, MASK, MAGIC), b.zz[2 * c], b.sc[2 * c]);
    b01 = sub_mul<T>(lop3_and_or(w >> 4, MASK, MAGIC), b.zz[2 * c], b.sc[2 * c]);
    b10 = sub_mul<T>(lop3_and_or(w >> 8, MASK, MAGIC), b.zz[2 * c + 1], b.sc[2 * c + 1]);
    b11 = sub_mul<T>(lop3_and_or(w >> 12, MASK, MAGIC), b.zz[2 * c + 1], b.sc[2 * c + 1]);
  }
}

// acc[mt][tile] += A(16·MT rows × 32 k, from smem rows `a_row`.., cols `a_col`..) · B(k-tile) for
// one warp, with the group constants already unpacked; `Ast` row pitch `arow` elements.
template <typename T, int MT>
__device__ __forceinline__ void mma_ktile_b(float (&acc)[MT][8][4], const T* Ast, int arow, int a_row, int a_col,
                                            const uint4& w0, const uint4& w1, const BConst& bc) {
  const uint32_t wd[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
#pragma unroll
  for (int kh = 0; kh < 2; ++kh) {
    uint32_t af[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(af[mt], Ast + (a_row + mt * 16) * arow + a_col + kh * 16);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      uint32_t b00, b01, b10, b11;
      dequant_word<T>(wd[4 * kh + c], bc, c, b00, b01, b10, b11);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma16816<T>(acc[mt][2 * c], af[mt], b00, b01);
        mma16816<T>(acc[mt][2 * c + 1], af[mt], b10, b11);
      }
    }
  }
}

// Same, unpacking the k-tile's scales / zeros first (callers that do not hoist them per group).
template <typename T, int MT>
__device__ __forceinline__ void mma_ktile(float (&acc)[MT][8][4], const T* Ast, int arow, int a_row, int a_col,
                                          const uint4& w0, const uint4& w1, const uint4& s0, const uint4& s1,
                                          const uint2& z) {
  BConst bc;
  unpack_bconst<T>(bc, s0, s1, z);
  mma_ktile_b<T, MT>(acc, Ast, arow, a_row, a_col, w0, w1, bc);
}

template <typename T, int R, int COLS, int NT>
__device__ __forceinline__ void cluster_reduce_store(float* red, const Params& p, int row0, int col0, int srank);

// Epilogue shared by both kernels. Direct stores when nothing is split; otherwise a deterministic
// reduction over the K-warps into `red` (fp32, R × RS, reusing shared memory: the caller has
// drained cp.async and passed a barrier) and over the cluster's CTAs through DSMEM.
template <typename T, int MT, int WM, int WN, int WK>
__device__ __forceinline__ void epilogue(float (&acc)[MT][8][4], float* red, const Params& p, int row0, int col0,
                                         int srank) {
  using G = Geo<MT, WM, WN, WK>;
  constexpr int NT = G::NT, R = G::R, COLS = G::COLS, RS = G::RS;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wn = warp % WN, wm = (warp / WN) % WM, wk = warp / (WN * WM);
  const int gq = lane >> 2, tq = lane & 3;
  const int M = p.M, N = p.N, split = p.split;
  T* out = reinterpret_cast<T*>(p.out);
  if (WK == 1 && split == 1) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int r = row0 + wm * MT * 16 + mt * 16 + gq;
#pragma unroll
      for (int tl = 0; tl < 8; ++tl) {
        const int c = col0 + wn * 64 + tl * 8 + 2 * tq;
        if (r < M)
          *reinterpret_cast<uint32_t*>(out + (size_t)r * N + c) = pack2<T>(acc[mt][tl][0], acc[mt][tl][1]);
        if (r + 8 < M)
          *reinterpret_cast<uint32_t*>(out + (size_t)(r + 8) * N + c) = pack2<T>(acc[mt][tl][2], acc[mt][tl][3]);
      }
    }
    return;
  }
#pragma unroll 1
  for (int pass = 0; pass < WK; ++pass) {  // fixed order: bitwise deterministic
    if (wk == pass) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int r = wm * MT * 16 + mt * 16 + gq;
#pragma unroll
        for (int tl = 0; tl < 8; ++tl) {
          float2* p0 = reinterpret_cast<float2*>(red + r * RS + wn * 64 + tl * 8 + 2 * tq);
          float2* p1 = reinterpret_cast<float2*>(red + (r + 8) * RS + wn * 64 + tl * 8 + 2 * tq);
          float2 v0 = make_float2(acc[mt][tl][0], acc[mt][tl][1]);
          float2 v1 = make_float2(acc[mt][tl][2], acc[mt][tl][3]);
          if (pass > 0) {
            const float2 o0 = *p0, o1 = *p1;
            v0.x += o0.x; v0.y += o0.y; v1.x += o1.x; v1.y += o1.y;
          }
          *p0 = v0;
          *p1 = v1;
        }
      }
    }
    __syncthreads();
  }
  cluster_reduce_store<T, R, COLS, NT>(red, p, row0, col0, srank);
}

// Second half of the epilogue: `red` (fp32, R × RS, this CTA's K-warps already summed) is summed
// over the cluster's CTAs in fixed rank order through DSMEM and stored; each CTA stores a 1/split
// share of the rows.
template <typename T, int R, int COLS, int NT>
__device__ __forceinline__ void cluster_reduce_store(float* red, const Params& p, int row0, int col0, int srank) {
  constexpr int RS = COLS + 8;
  const int M = p.M, N = p.N, split = p.split;
  T* out = reinterpret_cast<T*>(p.out);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  if (split > 1) cluster.sync();
#endif
  const int rows = min(R, M - row0);
  constexpr int CH = COLS / 4;  // float4 chunks per row
  const int total = rows * CH;
  for (int i = srank * NT + threadIdx.x; i < total; i += split * NT) {
    const int r = i / CH, c4 = i % CH;
    float4 v = *reinterpret_cast<const float4*>(red + r * RS + c4 * 4);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    for (int q = 0; q < split; ++q) {  // fixed rank order
      if (q == srank) continue;
      const float* rp = cluster.map_shared_rank(red, q);
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

__device__ __forceinline__ void ktile_range(const Params& p, int srank, int& kt_beg, int& kt_end) {
  const int KT = p.K >> 5;
  kt_beg = (int)((long long)KT * srank / p.split);
  kt_end = (int)((long long)KT * (srank + 1) / p.split);
}

// Group index of k-tile kt (a k-tile never straddles groups: group % 32 == 0).
__device__ __forceinline__ int group_of(const Params& p, int kt) {
  return p.gshift >= 0 ? (kt >> p.gshift) : (kt << 5) / p.group;
}


// Programmatic dependent launch (sm_90, decode kernels). With pdl ≥ 1 the kernel is launched with
// programmatic stream serialization: it lets the next such kernel in the stream be scheduled at once
// (launch_dependents) and waits for its own predecessor (griddepcontrol.wait: completion and memory
// flush) before its first global load, so stream semantics are unchanged while launch latency and
// the next kernel's prologue overlap this kernel's tail. pdl == 2 issues the weight prefetch before
// the wait: only valid when no kernel just before it writes the weights (static weights).
using qtool_pdl::pdl_launch_dependents;
using qtool_pdl::pdl_wait;

// The CTA's A slice (rows [row0, row0 + rows), K columns [kc0, kc_end)) → shared memory (row pitch
// arow, KC columns, zero past the slice), then a barrier.
template <typename T, int NT>
__device__ __forceinline__ void copy_a_slice(T* As, const Params& p, int row0, int rows, int kc0, int kc_end,
                                             int KC, int arow) {
  const T* xg = reinterpret_cast<const T*>(p.x);
  const int cpr = KC >> 3;
  for (int i = threadIdx.x; i < rows * cpr; i += NT) {
    const int r = i / cpr, cc = i - r * cpr;
    const int gk = kc0 + cc * 8;
    const bool ok = gk < kc_end;
    cp_async16(As + r * arow + cc * 8, ok ? xg + (size_t)(row0 + r) * p.K + gk : xg, ok ? 16 : 0);
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
}

// ------------------------------------------------------------------ decode kernel (group chunks)

// w4a16_gdec (decode, M ≤ 16): a CTA of 16 rows × 64·WN columns holds its K slice of the activations in shared
// memory once; its WN·WK warps stream the weights through register rings. A warp's unit of work is a chunk of U
// consecutive k-tiles inside one quantization group (group % (32·U) == 0), so the lane's scales and zeros are
// loaded and unpacked once per chunk instead of once per k-tile (for g128 / U = 4: 1 load set and 24 unpack
// instructions per 4 k-tiles instead of 4 and 96), and the ring holds U k-tiles of weights per slot (D slots: D·U
// k-tiles in flight per warp). The CTA's chunks are split over the cluster by rank, then dealt to its WK K-warps in
// turn. (The per-k-tile register ring and cp.async ring kernels it replaced, w4a16_ring / w4a16_aring, c0-c3 / c12 /
// c13-c16, were retired in the twenty-seventh session; last built at 0d6ad63.)
template <int U> struct WChunk {
  uint4 w[2 * U];  // U k-tiles × (words 0-3, 4-7)
  uint4 s0, s1;    // scale pairs of the chunk's group
  uint2 z;         // zero nibbles of the chunk's group
};

template <int WK, int U, int D>
__host__ __device__ constexpr int gdec_kc(int nchunks) {  // A columns held (padded to whole rings)
  return ((((nchunks + WK - 1) / WK) + D - 1) / D) * D * WK * U * 32;
}

__device__ __forceinline__ void chunk_range(const Params& p, int U, int srank, int& c_beg, int& c_end) {
  const int NC = p.K / (32 * U);
  c_beg = (int)((long long)NC * srank / p.split);
  c_end = (int)((long long)NC * (srank + 1) / p.split);
}

// A lane's stream of weight chunks for the group-chunk decode kernels (gdec, tdec): chunk c_beg + wk
// + WK·step of the CTA's slice, predicated 128-bit loads, clamped to the slice (the ring's padding
// steps reload the last chunk and meet zero A columns).
template <int U>
struct ChunkStream {
  const uint4* wbase;
  const uint4* sbase;
  const uint2* zbase;
  size_t wstride, sstride, zstride;
  int first, step_stride, last;
  __device__ __forceinline__ ChunkStream(const Params& p, int c64, int lane, int c_beg, int c_end, int wk, int WK) {
    const LaneB lb = lane_b(c64, lane, p.N);
    wbase = p.qw + lb.w_off;
    sbase = reinterpret_cast<const uint4*>(p.scales) + lb.s_off;
    zbase = reinterpret_cast<const uint2*>(p.qz) + lb.z_off;
    wstride = (size_t)p.N;
    sstride = (size_t)(p.N >> 2);
    zstride = (size_t)(p.N >> 3);
    first = c_beg + wk;
    step_stride = WK;
    last = c_end - 1;
  }
  __device__ __forceinline__ void load(const Params& p, WChunk<U>& s, int step, bool pred) const {
    const int c = min(first + step_stride * step, last);
    const int g = group_of(p, c * U);
    const uint4* wp = wbase + (size_t)(c * U) * wstride;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      ld_nc_v4_pred(s.w[2 * u], wp + (size_t)u * wstride, pred);
      ld_nc_v4_pred(s.w[2 * u + 1], wp + (size_t)u * wstride + 1, pred);
    }
    const uint4* sp = sbase + (size_t)g * sstride;
    ld_nc_v4_pred(s.s0, sp, pred);
    ld_nc_v4_pred(s.s1, sp + 1, pred);
    ld_nc_v2_pred(s.z, zbase + (size_t)g * zstride, pred);
  }
  // PDL entry, then the first D chunks in flight (before the wait in mode 2: weights only)
  template <int D>
  __device__ __forceinline__ void start(const Params& p, WChunk<U> (&ring)[D]) const {
    pdl_launch_dependents(p.pdl);
    pdl_wait(p.pdl == 1);
#pragma unroll
    for (int d = 0; d < D; ++d) {
#pragma unroll
      for (int u = 0; u < 2 * U; ++u) ring[d].w[u] = make_uint4(0, 0, 0, 0);
      ring[d].s0 = ring[d].s1 = make_uint4(0, 0, 0, 0);
      ring[d].z = make_uint2(0, 0);
      load(p, ring[d], d, true);
    }
    pdl_wait(p.pdl == 2);
  }
};

template <typename T, int WN, int WK, int U, int D, int MINB>
__global__ void __launch_bounds__(32 * WN * WK, MINB) w4a16_gdec(const Params p) {
  using G = Geo<1, 1, WN, WK>;
  constexpr int NT = G::NT;
  extern __shared__ __align__(16) unsigned char smem[];
  T* As = reinterpret_cast<T*>(smem);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wn = warp % WN, wk = warp / WN;
  const int srank = blockIdx.x, col0 = blockIdx.y * G::COLS, row0 = blockIdx.z * 16;
  const int M = p.M;
  int c_beg, c_end;
  chunk_range(p, U, srank, c_beg, c_end);
  const int KC = gdec_kc<WK, U, D>(c_end - c_beg);
  const int steps = KC / (32 * U * WK);  // multiple of D
  const int arow = KC + 8;

  const ChunkStream<U> cs(p, (col0 >> 6) + wn, lane, c_beg, c_end, wk, WK);
  WChunk<U> ring[D];
  cs.start(p, ring);
  // A slice → shared memory once, zero past the slice: only the rows < M are held (ldmatrix rows ≥ M alias the last
  // valid row: they only feed output rows that are never stored, MMA rows being independent), so shared memory
  // scales with M.
  const int rows = min(16, M - row0);
  copy_a_slice<T, NT>(As, p, row0, rows, c_beg * U * 32, c_end * U * 32, KC, arow);

  float acc[1][8][4];
  zero_acc(acc);

  const int a_row = min(lane & 15, rows - 1);
  for (int st0 = 0; st0 < steps; st0 += D) {
#pragma unroll
    for (int i = 0; i < D; ++i) {
      const int st = st0 + i;
      const int a_col = (wk + WK * st) * (32 * U) + (lane >> 4) * 8;
      BConst bc;
      unpack_bconst<T>(bc, ring[i].s0, ring[i].s1, ring[i].z);
#pragma unroll
      for (int u = 0; u < U; ++u)
        mma_ktile_b<T, 1>(acc, As, arow, a_row, a_col + 32 * u, ring[i].w[2 * u], ring[i].w[2 * u + 1], bc);
      cs.load(p, ring[i], st + D, st + D < steps);
    }
  }
  __syncthreads();  // all ldmatrix reads of As done before it becomes the reduction buffer
  epilogue<T, 1, 1, WN, WK>(acc, reinterpret_cast<float*>(smem), p, row0, col0, srank);
}

// ------------------------------------------------------- decode kernel (transposed, fp16 only)

// w4a16_tdec (decode, fp16): computes outᵀ = W · xᵀ on mma m16n8k16 with the WEIGHTS as the A
// operand (16 output columns per MMA row block) and xᵀ as the B operand (8 tokens per n8 block,
// MB blocks per CTA: 8·MB tokens). The QUICK layout serves this directly: a lane's B fragments of
// n8 tiles 2c and 2c+1 (one packed word) are its A fragment {a0, a1, a2, a3} = {b00, b10, b01, b11}
// of the 16-column block (2c, 2c+1), so for M ≤ 8 one MMA covers what took two 16-row-padded MMAs,
// and the accumulator rows are the lane's own B-order columns — zero and scale need no shuffle.
// Codes enter raw with a per-k offset (k % 16 < 8: MAGIC_1024 | q = 1024 + q from bits 0-3; k % 16 ≥ 8:
// MAGIC_64 | 16q = 64 + q from bits 4-7, where a half's unit is 1/16; both exact, one shift and four lop3
// per word), and per
// chunk of U k-tiles (one group) y += s·(gacc − O) − s·z·X in fp32, with X = Σ x, O = Σ off(k)·x
// per (token, chunk) precomputed from the A slice in shared memory. Per k-tile a warp issues
// 8 words × (1 shift + 4 lop3 + MB MMAs) + MB ldmatrix.x4, about half of w4a16_gdec.
template <int WN, int WK, int U, int D, int MINB, int MB>
__global__ void __launch_bounds__(32 * WN * WK, MINB) w4a16_tdec(const Params p) {
  constexpr int NT = 32 * WN * WK, COLS = 64 * WN, R = 8 * MB, RS = COLS + 8;
  extern __shared__ __align__(16) unsigned char smem[];
  __half* As = reinterpret_cast<__half*>(smem);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wn = warp % WN, wk = warp / WN;
  const int srank = blockIdx.x, col0 = blockIdx.y * COLS, row0 = blockIdx.z * R;
  const int M = p.M;
  int c_beg, c_end;
  chunk_range(p, U, srank, c_beg, c_end);
  const int KC = gdec_kc<WK, U, D>(c_end - c_beg);
  const int steps = KC / (32 * U * WK);  // multiple of D
  const int arow = KC + 8;

  const ChunkStream<U> cs(p, (col0 >> 6) + wn, lane, c_beg, c_end, wk, WK);
  WChunk<U> ring[D];
  cs.start(p, ring);
  // A slice (rows < M only, zero past the slice) → shared memory once.
  const int rows = min(R, M - row0);
  copy_a_slice<__half, NT>(As, p, row0, rows, c_beg * U * 32, c_end * U * 32, KC, arow);

  // acc[mb][c][i]: column (tile 2c + (i >> 1), gq) of the warp's 64, token 8·mb + 2·tq + (i & 1)
  float acc[MB][4][4];
#pragma unroll
  for (int mb = 0; mb < MB; ++mb)
#pragma unroll
    for (int c = 0; c < 4; ++c)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mb][c][i] = 0.f;

  const int gq = lane >> 2, tq = lane & 3;
  int b_row[MB];  // ldmatrix source row (token) of this lane per n8 block; rows ≥ M alias the last
#pragma unroll
  for (int mb = 0; mb < MB; ++mb) b_row[mb] = min(8 * mb + (lane & 7), rows - 1);
  const uint32_t LO = 0x000f000fu, HI = 0x00f000f0u, M1024 = 0x64006400u, M64 = 0x54005400u;
  // A operand whose rows 0-7 are off(k) and rows 8-15 are 1: one more MMA per k16 yields, in the
  // lane's own accumulator slots, O = Σ off(k)·x and X = Σ x of its tokens 2tq, 2tq+1 (same
  // tensor-core accumulation as g, no shuffles, no shared memory).
  const uint32_t aoff[4] = {M1024, 0x3C003C00u, M64, 0x3C003C00u};
  for (int st0 = 0; st0 < steps; st0 += D) {
#pragma unroll
    for (int i = 0; i < D; ++i) {
      const int st = st0 + i;
      const int cr = wk + WK * st;  // chunk index inside the CTA's slice
      float g[MB][4][4], h[MB][4];
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          h[mb][e] = 0.f;
#pragma unroll
          for (int c = 0; c < 4; ++c) g[mb][c][e] = 0.f;
        }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int k0 = cr * (32 * U) + 32 * u;
        uint32_t bx[MB][4];  // xᵀ fragments: [0], [1] = b0, b1 of k16 half 0; [2], [3] of half 1
#pragma unroll
        for (int mb = 0; mb < MB; ++mb) ldmatrix_x4(bx[mb], As + b_row[mb] * arow + k0 + (lane >> 3) * 8);
        const uint32_t wd[8] = {ring[i].w[2 * u].x, ring[i].w[2 * u].y, ring[i].w[2 * u].z, ring[i].w[2 * u].w,
                                ring[i].w[2 * u + 1].x, ring[i].w[2 * u + 1].y, ring[i].w[2 * u + 1].z,
                                ring[i].w[2 * u + 1].w};
#pragma unroll
        for (int kh = 0; kh < 2; ++kh) {
#pragma unroll
          for (int mb = 0; mb < MB; ++mb) mma16816<__half>(h[mb], aoff, bx[mb][2 * kh], bx[mb][2 * kh + 1]);
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const uint32_t w = wd[4 * kh + c], w8 = w >> 8;
            const uint32_t a[4] = {lop3_and_or(w, LO, M1024), lop3_and_or(w8, LO, M1024), lop3_and_or(w, HI, M64),
                                   lop3_and_or(w8, HI, M64)};
#pragma unroll
            for (int mb = 0; mb < MB; ++mb) mma16816<__half>(g[mb][c], a, bx[mb][2 * kh], bx[mb][2 * kh + 1]);
          }
        }
      }
      // y += s·(g − O) − s·z·X: s, z of the lane's own columns (B order), X, O of its tokens.
      const uint32_t sw[8] = {ring[i].s0.x, ring[i].s0.y, ring[i].s0.z, ring[i].s0.w,
                              ring[i].s1.x, ring[i].s1.y, ring[i].s1.z, ring[i].s1.w};
#pragma unroll
      for (int mb = 0; mb < MB; ++mb) {
        const float2 q0 = make_float2(h[mb][2], h[mb][0]), q1 = make_float2(h[mb][3], h[mb][1]);  // (X, O)
#pragma unroll
        for (int c = 0; c < 4; ++c)
#pragma unroll
          for (int h = 0; h < 2; ++h) {  // tile 2c + h
            const int t = 2 * c + h;
            const float sb = __low2float(*reinterpret_cast<const __half2*>(&sw[t]));
            const float zb = (float)(((t < 4 ? ring[i].z.x : ring[i].z.y) >> (4 * (t & 3))) & 0xFu);
            const float szb = sb * zb;
            acc[mb][c][2 * h] = fmaf(sb, g[mb][c][2 * h] - q0.y, fmaf(-szb, q0.x, acc[mb][c][2 * h]));
            acc[mb][c][2 * h + 1] = fmaf(sb, g[mb][c][2 * h + 1] - q1.y, fmaf(-szb, q1.x, acc[mb][c][2 * h + 1]));
          }
      }
      cs.load(p, ring[i], st + D, st + D < steps);
    }
  }
  __syncthreads();  // all reads of As done before shared memory becomes the reduction buffer
  float* red = reinterpret_cast<float*>(smem);
#pragma unroll 1
  for (int pass = 0; pass < WK; ++pass) {  // fixed order: bitwise deterministic
    if (wk == pass) {
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int c = 0; c < 4; ++c)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int tok = 8 * mb + 2 * tq + (e & 1), col = wn * 64 + (2 * c + (e >> 1)) * 8 + gq;
            float* r = red + tok * RS + col;
            *r = pass > 0 ? *r + acc[mb][c][e] : acc[mb][c][e];
          }
    }
    __syncthreads();
  }
  cluster_reduce_store<__half, R, COLS, NT>(red, p, row0, col0, srank);
}

// ------------------------------------------------------------------------ staged kernel

// Per K-warp and stage, the raw B bytes: 64 chunks of weights (lane-major: [half][lane] × 16 B),
// 16 chunks of scales ([h][jm][2] × 16 B), 4 chunks of zeros ([h][2] × 16 B).
constexpr int kWSlot = 84 * 16;

template <typename T, int MT, int WM, int WN, int WK, int STAGES>
__host__ __device__ constexpr int staged_stage_bytes() {
  return Geo<MT, WM, WN, WK>::ASTAGE * 2 + WN * WK * kWSlot;
}
template <typename T, int MT, int WM, int WN, int WK, int STAGES>
__host__ __device__ constexpr int staged_smem(bool reduce) {
  using G = Geo<MT, WM, WN, WK>;
  const int a = STAGES * staged_stage_bytes<T, MT, WM, WN, WK, STAGES>();
  const int r = reduce ? G::R * G::RS * 4 : 0;
  return a > r ? a : r;
}

template <typename T, int MT, int WM, int WN, int WK, int STAGES, int MINB>
__global__ void __launch_bounds__(32 * WM * WN * WK, MINB) w4a16_staged(const Params p) {
  using G = Geo<MT, WM, WN, WK>;
  constexpr int NT = G::NT, R = G::R, KS = G::KS, AROW = G::AROW;
  constexpr int SB = staged_stage_bytes<T, MT, WM, WN, WK, STAGES>();
  constexpr int ABYTES = G::ASTAGE * 2;
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wn = warp % WN, wm = (warp / WN) % WM, wk = warp / (WN * WM);
  const int srank = blockIdx.x, col0 = blockIdx.y * G::COLS, row0 = blockIdx.z * R;
  const int M = p.M, N = p.N, K = p.K;
  int kt_beg, kt_end;
  ktile_range(p, srank, kt_beg, kt_end);
  const int nsteps = (kt_end - kt_beg + WK - 1) / WK;
  const T* xg = reinterpret_cast<const T*>(p.x);
  const uint4* qw = p.qw;
  const uint4* sc = reinterpret_cast<const uint4*>(p.scales);
  const uint4* qz = reinterpret_cast<const uint4*>(p.qz);

  // Per-thread copy descriptors, computed once: which 16-byte chunks of each stage this thread
  // moves, where from (without the k-tile/group offset) and where to.
  constexpr int CPR = KS / 8;  // A chunks per row (power of two)
  constexpr int ACH = R * CPR, NA = (ACH + NT - 1) / NT;
  constexpr int WCH = WN * WK * 84, NW = (WCH + NT - 1) / NT;
  const T* a_src[NA];
  int a_cc[NA];
  uint32_t a_dst[NA];
  bool a_ok[NA];
#pragma unroll
  for (int j = 0; j < NA; ++j) {
    const int i = j * NT + threadIdx.x;
    const int r = i / CPR, cc = i % CPR;
    a_ok[j] = (ACH % NT == 0 || i < ACH) && row0 + r < M;
    a_src[j] = xg + (size_t)(a_ok[j] ? row0 + r : 0) * K + cc * 8;
    a_cc[j] = (ACH % NT == 0 || i < ACH) ? cc * 8 : 1 << 30;  // 1<<30: never copies
    a_dst[j] = (uint32_t)((r * AROW + cc * 8) * 2);
  }
  const uint4* w_src[NW];
  uint32_t w_stride[NW], w_dst[NW];
  int w_kind[NW], w_swk[NW];
  bool w_ok[NW];
#pragma unroll
  for (int j = 0; j < NW; ++j) {
    const int i0 = j * NT + threadIdx.x;
    w_ok[j] = WCH % NT == 0 || i0 < WCH;
    const int i = w_ok[j] ? i0 : 0;
    const int slot = i / 84, c = i % 84;
    const int swn = slot % WN;
    w_swk[j] = slot / WN;
    const int c64 = (col0 >> 6) + swn, bx = c64 >> 1, y = c64 & 1;
    if (c < 64) {
      const int L = c & 31, half = c >> 5, h = L >> 4;
      w_src[j] = qw + ((((size_t)(2 * y + h) * N + 128 * bx + 8 * (L & 15)) >> 2) + half);
      w_stride[j] = N;
      w_kind[j] = 0;
      w_dst[j] = ABYTES + slot * kWSlot + (half * 32 + L) * 16;
    } else if (c < 80) {
      const int cc = c - 64, h = cc >> 3, r8 = cc & 7;
      const int Q0 = y * (N >> 4) + h * (N >> 5) + 4 * bx;
      w_src[j] = sc + 2 * Q0 + r8;
      w_stride[j] = N >> 2;
      w_kind[j] = 1;
      w_dst[j] = ABYTES + slot * kWSlot + 1024 + cc * 16;
    } else {
      const int cc = c - 80, h = cc >> 1, part = cc & 1;
      const int Q0 = y * (N >> 4) + h * (N >> 5) + 4 * bx;
      w_src[j] = qz + (Q0 >> 1) + part;
      w_stride[j] = N >> 4;
      w_kind[j] = 1;
      w_dst[j] = ABYTES + slot * kWSlot + 1280 + cc * 16;
    }
  }
  const uint32_t smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));

  auto load_stage = [&](int step) {
    if (step < nsteps) {
      const uint32_t base = smem_base + (step % STAGES) * SB;
      const int kc0 = (kt_beg + step * WK) << 5, kc_end = kt_end << 5;
#pragma unroll
      for (int j = 0; j < NA; ++j) {
        const bool ok = a_ok[j] && kc0 + a_cc[j] < kc_end;
        const T* src = ok ? a_src[j] + kc0 : xg;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(base + a_dst[j]), "l"(src),
                     "r"(ok ? 16 : 0));
      }
#pragma unroll
      for (int j = 0; j < NW; ++j) {
        if (WCH % NT == 0 || w_ok[j]) {
          const int kt = min(kt_beg + step * WK + w_swk[j], kt_end - 1);
          const int idx = w_kind[j] ? group_of(p, kt) : kt;
          asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(base + w_dst[j]),
                       "l"(w_src[j] + (size_t)idx * w_stride[j]));
        }
      }
    }
  };

  float acc[MT][8][4];
  zero_acc(acc);

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    load_stage(s);
    cp_async_commit();
  }
  const int a_row = wm * MT * 16 + (lane & 15);
  const int a_col = wk * 32 + (lane >> 4) * 8;
  const int h = lane >> 4, jm = (lane >> 2) & 3;
  const int wslot_off = ABYTES + (wk * WN + wn) * kWSlot;
#pragma unroll 1
  for (int st = 0; st < nsteps; ++st) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    load_stage(st + STAGES - 1);
    cp_async_commit();
    const unsigned char* base = smem + (st % STAGES) * SB;
    const unsigned char* wb = base + wslot_off;
    const uint4 w0 = lds128(wb + lane * 16), w1 = lds128(wb + (32 + lane) * 16);
    const uint4 s0 = lds128(wb + 1024 + (h * 8 + jm * 2) * 16), s1 = lds128(wb + 1024 + (h * 8 + jm * 2 + 1) * 16);
    const uint2 z = lds64(wb + 1280 + (h * 4 + jm) * 8);
    // past-the-end K-warps of the last step see zero A columns (cp.async zero-fill): no branch
    mma_ktile<T, MT>(acc, reinterpret_cast<const T*>(base), AROW, a_row, a_col, w0, w1, s0, s1, z);
  }
  cp_async_wait<0>();
  __syncthreads();
  epilogue<T, MT, WM, WN, WK>(acc, reinterpret_cast<float*>(smem), p, row0, col0, srank);
}

}  // namespace qtool_w4a16
