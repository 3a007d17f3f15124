// int8 tensor-core GEMM engine for W8A8 and W4A8 (QServe layout); device code, no torch headers.
//
//   y[m, n] = epilogue( sum_k A[m, k] * W8[n, k] )      (int32 accumulation, exact)
//
// W8[n, k] is the int8 weight (kW8), the uint4 code q4 (kW4PC, values 0..15) or q4*s2 + s2_zeros
// (kW4PG, formed per byte in registers: `r & 0x0F0F0F0F`, `(r >> 4) & 0x0F0F0F0F`, one 32-bit
// multiply-add by s2 and (s2_zeros + 128) -- no carries, by the layout's bounds -- and ^ 0x80808080).
// MMA: mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32.
//
// Two kernels:
//  * gemm_tiled_kernel  (M > 16): BM x BN CTA tile, WM x WN warps, STAGES-deep cp.async ring over
//    k-tiles of 128; A and W8 tiles live in shared memory with 128-byte rows whose 16-byte chunks
//    are XOR-swizzled by (row & 7) (conflict-free ldmatrix); W4 tiles are copied raw (the QServe
//    32x32 tile of 512 bytes gives each lane its 16 bytes, read with one conflict-free LDS.128).
//  * gemm_decode_kernel (M <= 16): one 32-column tile per CTA, WARPS warps each streaming their
//    own k-chunks of 128 through a warp-private cp.async ring (no CTA barrier in the main loop).
// Both reduce split-K partial sums (int32, so the order does not matter: bitwise deterministic)
// across the CTAs of a thread-block cluster through distributed shared memory, then apply the
// epilogue from a shared-memory staging tile with coalesced 4-column stores.
#pragma once
#include <cooperative_groups.h>
#include <cstdlib>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "sm90_common.cuh"
#include "w8a8_api.h"

namespace qtool_i8 {
namespace cg = cooperative_groups;

// Thread-block clusters exist from sm_90 on; below it the launcher never splits K (split == 1), so
// these compile to nothing there and the engine still builds for older GPUs.
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cg::this_cluster().sync();
#endif
}
__device__ __forceinline__ const int* cluster_peer(int* p, int rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cg::this_cluster().map_shared_rank(p, rank);
#else
  (void)rank;
  return p;
#endif
}

// ------------------------------------------------------------------------------------------ PTX

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool pred) {
  const int sz = pred ? 16 : 0;  // src-size 0: zero-fill, nothing read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(sz) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

using qtool_pdl::pdl_launch_dependents;
using qtool_pdl::pdl_wait;

__device__ __forceinline__ void ldsm_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldsm_x2(uint32_t& r0, uint32_t& r1, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r0), "=r"(r1) : "r"(addr) : "memory");
}

__device__ __forceinline__ void mma_s8(int (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// mma_s8, or with U8 the weight operand as u8 (W8 + 128) and the activations s8; W_IS_A when the weights are
// the A operand.
template <bool U8, bool W_IS_A>
__device__ __forceinline__ void mma_w(int (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (!U8) {
    mma_s8(c, a, b0, b1);
  } else if constexpr (W_IS_A) {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.u8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}
// Adds the four signed bytes of `word` to acc (Σx of activation fragments).
__device__ __forceinline__ int byte_sum4(uint32_t word, int acc) {
  return __dp4a(static_cast<int>(word), 0x01010101, acc);
}

// Swizzled byte offset of 16-byte chunk c of row r in a tile with 128-byte rows.
__device__ __forceinline__ int swz(int r, int c) { return r * 128 + ((c ^ (r & 7)) << 4); }

// The 16 bytes a lane holds of one QServe 32x32 tile -> B fragments of the four n8 sub-tiles
// (column offsets 0, 8, 16, 24): word (kps, nps) = w[2*kps + nps]; low nibbles are columns
// 8*nps + nl, high nibbles columns 16 + 8*nps + nl; b0 covers k 0..15 (kps 0), b1 k 16..31.
__device__ __forceinline__ void w4_unpack(const uint4 w, uint32_t (&b)[4][2]) {
  const uint32_t M4 = 0x0F0F0F0Fu;
  b[0][0] = w.x & M4;
  b[0][1] = w.z & M4;
  b[1][0] = w.y & M4;
  b[1][1] = w.w & M4;
  b[2][0] = (w.x >> 4) & M4;
  b[2][1] = (w.z >> 4) & M4;
  b[3][0] = (w.y >> 4) & M4;
  b[3][1] = (w.w >> 4) & M4;
}

template <int FMT>
__device__ __forceinline__ void w4_fragments(const uint4 w, uint32_t s2w, uint32_t zw, uint32_t (&b)[4][2]) {
  w4_unpack(w, b);
  if constexpr (FMT == kW4PG) {
    // W8 = q4·s2 + s2_zero is an int8 by the layout's bounds (checked by the packer,
    // qtool.layouts.w4a8kv4), so per byte q4·s2 + (s2_zero + 128) lies in [0, 255]: one 32-bit
    // multiply-add forms four bytes without carries, and ^ 0x80 per byte takes the 128 off again
    // (mod 256). Two instructions per word instead of a multiply and a 4-op wrap-around add.
    const uint32_t zb = zw ^ 0x80808080u;  // s2_zero + 128 per byte
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t s = __byte_perm(s2w, 0u, 0x4440u + j);  // byte j of s2w, zero-extended
      const uint32_t z = __byte_perm(zb, 0u, 0x1111u * j);    // byte j in all four bytes
      b[j][0] = (b[j][0] * s + z) ^ 0x80808080u;
      b[j][1] = (b[j][1] * s + z) ^ 0x80808080u;
    }
  }
}

// The same per-group step split in two, for a chunk whose four k32 steps share one group (the decode
// kernels' G1): the byte broadcasts of the lane's four columns once (s[j] = byte j of the s2 word,
// zero-extended; z[j] = byte j of s2_zero + 128 in all four bytes), then per word the multiply-add ...
struct PgBytes {
  uint32_t s[4], z[4];
};
__device__ __forceinline__ PgBytes pg_bytes(uint32_t s2w, uint32_t zw) {
  PgBytes f;
  const uint32_t zb = zw ^ 0x80808080u;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    f.s[j] = __byte_perm(s2w, 0u, 0x4440u + j);
    f.z[j] = __byte_perm(zb, 0u, 0x1111u * j);
  }
  return f;
}
// The s2 word of a lane's four columns from their packed half-word (GemmArgs::pgs): bytes n0 | n2 << 4 and
// n1 | n3 << 4 with n_j = s2_j - 1 become the bytes s2_0 .. s2_3 (n_j <= 15: no carries).
__device__ __forceinline__ uint32_t pg_s2_word(uint32_t h) { return ((h | (h << 12)) & 0x0F0F0F0Fu) + 0x01010101u; }
// ... as u8 = W8 + 128: no xor (the kernel takes 128·Σx off each token's sums after the k loop)
__device__ __forceinline__ void pg_apply_u8(const PgBytes& f, uint32_t (&b)[4][2]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    b[j][0] = b[j][0] * f.s[j] + f.z[j];
    b[j][1] = b[j][1] * f.s[j] + f.z[j];
  }
}

// ------------------------------------------------------------------------------------- epilogue

__device__ __forceinline__ float ld_f(const void* p, int dt, int i) {
  if (dt == kF32) return __ldg(static_cast<const float*>(p) + i);
  if (dt == kF16) return __half2float(static_cast<const __half*>(p)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}
// ld_f in two steps, so that several loads are in flight before the first conversion waits
__device__ __forceinline__ uint32_t ld_bits(const void* p, int dt, int i) {
  if (dt == kF32) return __ldg(static_cast<const unsigned int*>(p) + i);
  return static_cast<const unsigned short*>(p)[i];
}
__device__ __forceinline__ float bits_f(uint32_t b, int dt) {
  if (dt == kF32) return __uint_as_float(b);
  if (dt == kF16) return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
  return __uint_as_float(b << 16);  // bfloat16
}

// Four fp32 values (columns gn..gn+3) to a 16-bit output (fp16 / bf16): one 8-byte store when
// `full`, else the columns below N one by one.
__device__ __forceinline__ uint32_t pack2(__half, float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}
__device__ __forceinline__ uint32_t pack2(__nv_bfloat16, float a, float b) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}
__device__ __forceinline__ void to16(__half& o, float v) { o = __float2half_rn(v); }
__device__ __forceinline__ void to16(__nv_bfloat16& o, float v) { o = __float2bfloat16_rn(v); }
template <typename T>
__device__ __forceinline__ void store4_16(T* o, const float (&y)[4], bool full, int gn, int N) {
  if (full) {
    uint2 u;
    u.x = pack2(T(), y[0], y[1]);
    u.y = pack2(T(), y[2], y[3]);
    *reinterpret_cast<uint2*>(o) = u;
  } else {
    for (int j = 0; j < 4 && gn + j < N; ++j) to16(o[j], y[j]);
  }
}

// The epilogue of four consecutive output columns gn..gn+3 (a column >= N uses column N - 1's
// factors and is not stored): the per-column factors are loaded once per thread, then each row
// costs its own scale (and x_sum) load only. (Loading them per output element was 8-13 % of the
// stall samples of the wgmma kernels: ncu, H200.)
template <int FMT>
struct Epi4 {
  float sw[4], sz[4], b[4];
  int gn;
  __device__ __forceinline__ Epi4(const GemmArgs& p, int gn_) : gn(gn_) {
    uint32_t r[12];
    fetch(p, gn, r);
    convert(p, r);
  }
  // the raw bits of sw[4], sz[4], bias[4] (all loads issued before any is used)
  static __device__ __forceinline__ void fetch(const GemmArgs& p, int gn, uint32_t (&r)[12]) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = gn + j < p.N ? gn + j : p.N - 1;
      r[j] = ld_bits(p.sw, p.sw_dt, n);
      r[4 + j] = FMT == kW4PC ? ld_bits(p.sz, p.sz_dt, n) : 0u;
      r[8 + j] = p.bias ? ld_bits(p.bias, p.bias_dt, n) : 0u;
    }
  }
  __device__ __forceinline__ void convert(const GemmArgs& p, const uint32_t (&r)[12]) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      sw[j] = bits_f(r[j], p.sw_dt);
      sz[j] = FMT == kW4PC ? bits_f(r[4 + j], p.sz_dt) : 0.f;
      b[j] = p.bias ? bits_f(r[8 + j], p.bias_dt) : 0.f;
    }
  }
  // from factors preloaded by EpiPre::load (col: sw[4], sz[4], b[4])
  __device__ __forceinline__ Epi4(const float* col, int gn_) : gn(gn_) {
    if (!col) return;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      sw[j] = col[j];
      sz[j] = col[4 + j];
      b[j] = col[8 + j];
    }
  }
  __device__ __forceinline__ void store(const GemmArgs& p, int gm, int4 v) const {
    const float sx = ld_f(p.sx, p.sx_dt, p.sx_bcast ? 0 : gm);
    float xs = 0.f;
    if constexpr (FMT == kW4PC) xs = ld_f(p.xsum, p.xsum_dt, gm);
    store_scaled(p, gm, sx, xs, v);
  }
  // row gm's activation scale sx and (per-channel W4A8) activation sum xs given
  __device__ __forceinline__ void store_scaled(const GemmArgs& p, int gm, float sx, float xs, int4 v) const {
    const int acc[4] = {v.x, v.y, v.z, v.w};
    float y[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float r = (static_cast<float>(acc[j]) * sx) * sw[j];
      if constexpr (FMT == kW4PC) r = r - xs * sz[j];
      if (p.bias) r += b[j];
      y[j] = r;
    }
    const size_t off = static_cast<size_t>(gm) * p.N + gn;
    const bool full = (gn + 4 <= p.N) && ((p.N & 3) == 0);
    if (p.out_dt == kF32) {
      float* o = static_cast<float*>(p.out) + off;
      if (full) {
        *reinterpret_cast<float4*>(o) = make_float4(y[0], y[1], y[2], y[3]);
      } else {
        for (int j = 0; j < 4 && gn + j < p.N; ++j) o[j] = y[j];
      }
    } else if (p.out_dt == kF16) {
      store4_16(static_cast<__half*>(p.out) + off, y, full, gn, p.N);
    } else {
      store4_16(static_cast<__nv_bfloat16*>(p.out) + off, y, full, gn, p.N);
    }
  }
};

__device__ __forceinline__ int4 add4(int4 a, int4 b) { return make_int4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w); }

// The epilogue factors of a decode CTA (32 columns, up to 16 rows). Warp 0 requests them into
// registers before the k loop (fetch) and puts them into shared memory after it (put): loaded only
// after the loop, their DRAM latency stalled every CTA at its end, with all CTAs of an SM in step
// (ncu, H200, W4A8 decode 4096x22016 M=1: ~15 % of the stall samples); loaded and stored before the
// loop, warp 0 started late and held its CTA's end (W8A8 4096x22016 M=1 +1 us).
struct EpiPre {
  float col[8][12];  // per 4-column group: sw[4], sz[4], bias[4]
  float row[16][2];  // per row: sx, x_sum
  // raw bits into v: thread tid < 8 column group tid's factors; 8 <= tid < 24 row tid - 8's
  template <int FMT>
  static __device__ __forceinline__ void fetch(const GemmArgs& p, int n0, int tid, uint32_t (&v)[12]) {
    if (tid < 8) {
      if (n0 + 4 * tid < p.N) Epi4<FMT>::fetch(p, n0 + 4 * tid, v);
    } else if (tid < 24) {
      const int r = tid - 8;
      if (r < p.M) {
        v[0] = ld_bits(p.sx, p.sx_dt, p.sx_bcast ? 0 : r);
        v[1] = FMT == kW4PC ? ld_bits(p.xsum, p.xsum_dt, r) : 0u;
      }
    }
  }
  template <int FMT>
  __device__ __forceinline__ void put(const GemmArgs& p, int tid, const uint32_t (&v)[12]) {
    if (tid < 8) {
      Epi4<FMT> e(nullptr, 0);
      e.convert(p, v);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        col[tid][j] = e.sw[j];
        col[tid][4 + j] = e.sz[j];
        col[tid][8 + j] = e.b[j];
      }
    } else if (tid < 24) {
      row[tid - 8][0] = bits_f(v[0], p.sx_dt);
      row[tid - 8][1] = FMT == kW4PC ? bits_f(v[1], p.xsum_dt) : 0.f;
    }
  }
};

// The activation factors of one tile row (s_x, and x_sum for per-channel W4A8) for reduce_store: fetched into
// registers before a kernel's main loop, so their latency hides under it, and put into shared memory after it.
// (reduce_store loading them row by row waited one L2 round trip per row: 32 in a row per thread in c6's epilogue.)
template <int FMT>
struct RowFactor {
  uint32_t v0 = 0, v1 = 0;
  __device__ __forceinline__ void fetch(const GemmArgs& p, int gm) {
    if (gm < p.M) {
      v0 = ld_bits(p.sx, p.sx_dt, p.sx_bcast ? 0 : gm);
      if constexpr (FMT == kW4PC) v1 = ld_bits(p.xsum, p.xsum_dt, gm);
    }
  }
  __device__ __forceinline__ void put(const GemmArgs& p, float (*rowf)[2], int r) const {
    rowf[r][0] = bits_f(v0, p.sx_dt);
    rowf[r][1] = FMT == kW4PC ? bits_f(v1, p.xsum_dt) : 0.f;
  }
};

// Split-K reduction over the cluster + epilogue. `red` is this CTA's [rows][ld] int32 partial tile
// (already complete for this CTA and visible after a barrier/cluster sync). Rows r with
// r % split == rank are finished by this CTA. A thread keeps the same four columns for every row.
// With `pre` (decode: m0 = 0, 32 columns), the epilogue factors come from shared memory; with `rowf`, the rows'
// activation factors (RowFactor::put).
template <int FMT, int ROWS, int COLS, int LD, int NTHR>
__device__ __forceinline__ void reduce_store(const GemmArgs& p, int* red, int m0, int n0, int split, int rank,
                                             const EpiPre* pre = nullptr, const float (*rowf)[2] = nullptr) {
  constexpr int C4 = COLS / 4;
  static_assert(NTHR % C4 == 0, "a thread keeps its four columns across rows");
  const int c4 = static_cast<int>(threadIdx.x) % C4, gn = n0 + 4 * c4;
  if (gn >= p.N) return;
  const Epi4<FMT> epi = pre ? Epi4<FMT>(pre->col[c4], gn) : Epi4<FMT>(p, gn);
  for (int r = static_cast<int>(threadIdx.x) / C4; r < ROWS; r += NTHR / C4) {
    if (r % split != rank) continue;
    const int gm = m0 + r;
    if (gm >= p.M) break;
    int4 v = *reinterpret_cast<const int4*>(red + r * LD + 4 * c4);
    for (int q = 0; q < split; ++q) {
      if (q == rank) continue;
      const int* rr = cluster_peer(red, q);
      v = add4(v, *reinterpret_cast<const int4*>(rr + r * LD + 4 * c4));
    }
    if (pre) {
      epi.store_scaled(p, gm, pre->row[r][0], pre->row[r][1], v);
    } else if (rowf) {
      epi.store_scaled(p, gm, rowf[r][0], rowf[r][1], v);
    } else {
      epi.store(p, gm, v);
    }
  }
}

// ---------------------------------------------------------------------------------- tiled kernel

// Per-thread cp.async descriptors of one k-tile (128 k) of a CTA tile, computed once: the BM x 128
// activation tile (rows >= M and k >= K zero-filled) and the BN-column weight tile -- W8 rows, or the raw
// QServe W4 tiles (512 bytes per 32 x 32) plus, per-group, the (s2 | zero) x 4 k-substep rows of BN bytes.
// Shared by the mma.sync tiled kernel and the templated wgmma kernel.
template <int FMT, int BN, int NTHR, int ITER_A, int ITER_B, int B_BYTES>
struct TileCopier {
  const int8_t* a_src[ITER_A];
  int a_dst[ITER_A], a_kc[ITER_A];
  bool a_ok[ITER_A];
  const uint8_t* b_src[ITER_B];
  int b_dst[ITER_B], b_k[ITER_B];
  bool b_ok[ITER_B];
  int s_row, s_c, G, KT32;
  bool s_thread, s_ok;
  __device__ __forceinline__ TileCopier(const GemmArgs& p, int tid, int m0, int n0) {
    const int M = p.M, N = p.N, K = p.K;
    KT32 = K / 32;
#pragma unroll
    for (int it = 0; it < ITER_A; ++it) {
      const int q = tid + it * NTHR, r = q >> 3, c = q & 7;
      a_ok[it] = m0 + r < M;
      a_src[it] = p.A + static_cast<size_t>(a_ok[it] ? m0 + r : 0) * K + 16 * c;
      a_dst[it] = swz(r, c);
      a_kc[it] = 16 * c;
    }
#pragma unroll
    for (int it = 0; it < ITER_B; ++it) {
      const int q = tid + it * NTHR;
      if constexpr (FMT == kW8) {
        const int r = q >> 3, c = q & 7;
        b_ok[it] = n0 + r < N;
        b_src[it] = static_cast<const uint8_t*>(p.B) + static_cast<size_t>(b_ok[it] ? n0 + r : 0) * K + 16 * c;
        b_dst[it] = swz(r, c);
        b_k[it] = 16 * c;  // k offset inside the k-tile
      } else {
        const int ntl = q >> 7, ktl = (q >> 5) & 3, c = q & 31;
        const int ntg = n0 / 32 + ntl;
        b_ok[it] = ntg < N / 32;
        b_src[it] =
            static_cast<const uint8_t*>(p.B) + (static_cast<size_t>(b_ok[it] ? ntg : 0) * KT32 + ktl) * 512 + 16 * c;
        b_dst[it] = (ntl * 4 + ktl) * 512 + 16 * c;
        b_k[it] = ktl;  // 32-column k-tile inside the k-tile
      }
    }
    s_row = tid / (BN / 16);
    s_c = tid % (BN / 16);
    s_thread = FMT == kW4PG && tid < BN / 2;
    s_ok = s_thread && n0 + 16 * s_c < N;
    G = FMT == kW4PG ? K / p.group : 1;
  }
  // k-tile kt into the stage at shared addresses sA (activations) / sB (weights, then the s2 / zero rows)
  __device__ __forceinline__ void load(const GemmArgs& p, uint32_t sA, uint32_t sB, int n0, int kt) const {
    const int K = p.K, k0 = kt * 128;
#pragma unroll
    for (int it = 0; it < ITER_A; ++it) {
      const bool ok = a_ok[it] && k0 + a_kc[it] < K;
      cp_async16(sA + a_dst[it], ok ? a_src[it] + k0 : p.A, ok);
    }
#pragma unroll
    for (int it = 0; it < ITER_B; ++it) {
      if constexpr (FMT == kW8) {
        const bool ok = b_ok[it] && k0 + b_k[it] < K;
        cp_async16(sB + b_dst[it], ok ? b_src[it] + k0 : p.B, ok);
      } else {
        const bool ok = b_ok[it] && kt * 4 + b_k[it] < KT32;
        cp_async16(sB + b_dst[it], ok ? b_src[it] + static_cast<size_t>(kt) * 2048 : p.B, ok);
      }
    }
    if constexpr (FMT == kW4PG) {
      if (s_thread) {
        const int s = s_row & 3;
        const int grow = min((k0 + 32 * s) / p.group, G - 1);
        const int8_t* base = (s_row >> 2) ? p.z2 : p.s2;
        cp_async16(sB + B_BYTES + s_row * BN + 16 * s_c,
                   s_ok ? base + static_cast<size_t>(grow) * p.N + n0 + 16 * s_c : p.s2, s_ok);
      }
    }
  }
};

template <int FMT, int BM, int BN, int WM, int WN, int STAGES>
struct TiledCfg {
  static constexpr int NTHR = WM * WN * 32;
  static constexpr int WTM = BM / WM, WTN = BN / WN;
  static constexpr int MT = WTM / 16, NT = WTN / 8;
  static constexpr int A_BYTES = BM * 128;
  static constexpr int B_BYTES = FMT == kW8 ? BN * 128 : BN * 64;
  static constexpr int S_BYTES = FMT == kW4PG ? 8 * BN : 0;  // s2 rows [4][BN], zero rows [4][BN]
  static constexpr int STAGE = A_BYTES + B_BYTES + S_BYTES;
  static constexpr int LDR = BN + 8;
  static constexpr int EPI = BM * LDR * 4;
  static constexpr int SMEM = STAGES * STAGE > EPI ? STAGES * STAGE : EPI;
  static constexpr int ITER_A = BM * 8 / NTHR;
  static constexpr int ITER_B = FMT == kW8 ? BN * 8 / NTHR : BN * 4 / NTHR;
  static_assert(WTM % 16 == 0, "warp tile rows");
  static_assert(WTN % (FMT == kW8 ? 16 : 32) == 0, "warp tile cols");
  static_assert((BM * 8) % NTHR == 0 && ITER_B * NTHR == (FMT == kW8 ? BN * 8 : BN * 4), "loaders");
  static_assert(FMT != kW4PG || BN / 2 <= NTHR, "scale loader");
};

// Grouped rasterization (GROUP_M m-tiles sweep all n-tiles): keeps an A panel in L2 while the
// weights stream once per group.
__device__ __forceinline__ void raster(int id, int tiles_m, int tiles_n, int& tm, int& tn) {
  constexpr int GROUP_M = 8;
  const int group_sz = GROUP_M * tiles_n;
  const int gid = id / group_sz;
  const int first_m = gid * GROUP_M;
  const int gm = min(tiles_m - first_m, GROUP_M);
  const int r = id % group_sz;
  tm = first_m + r % gm;
  tn = r / gm;
}
// A tiled kernel's work: its BM x BN output tile (rasterized), and the k-tiles of 128 of its split-K rank (blockIdx.z
// of gridDim.z): nk tiles from kt_begin.
struct TileWork {
  int m0, n0, split, rank, kt_begin, nk;
};
template <int BM, int BN>
__device__ __forceinline__ TileWork tile_work(int M, int N, int K) {
  const int tiles_m = (M + BM - 1) / BM, tiles_n = (N + BN - 1) / BN;
  int tm, tn;
  raster(blockIdx.x, tiles_m, tiles_n, tm, tn);
  TileWork w;
  w.m0 = tm * BM;
  w.n0 = tn * BN;
  w.split = gridDim.z;
  w.rank = blockIdx.z;
  const int KT = (K + 127) / 128;
  const int kt_per = (KT + w.split - 1) / w.split;
  w.kt_begin = w.rank * kt_per;
  w.nk = max(0, min(KT, w.kt_begin + kt_per) - w.kt_begin);
  return w;
}

template <int FMT, int BM, int BN, int WM, int WN, int STAGES>
__global__ void __launch_bounds__(WM* WN * 32, 1) gemm_tiled_kernel(const GemmArgs p) {
  using C = TiledCfg<FMT, BM, BN, WM, WN, STAGES>;
  extern __shared__ __align__(1024) uint8_t smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / WN, wn = warp % WN;
  const int g = lane >> 2, tig = lane & 3;
  const int M = p.M, N = p.N, K = p.K;

  const TileWork tw = tile_work<BM, BN>(M, N, K);
  const int m0 = tw.m0, n0 = tw.n0, split = tw.split, rank = tw.rank, kt_begin = tw.kt_begin, nk = tw.nk;

  const TileCopier<FMT, BN, C::NTHR, C::ITER_A, C::ITER_B, C::B_BYTES> copier(p, tid, m0, n0);
  auto load_stage = [&](int slot, int kt) {
    const uint32_t sA = smem_u32(smem + slot * C::STAGE);
    copier.load(p, sA, sA + C::A_BYTES, n0, kt);
  };

  int acc[C::MT][C::NT][4];
#pragma unroll
  for (int i = 0; i < C::MT; ++i)
#pragma unroll
    for (int j = 0; j < C::NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nk) load_stage(s, kt_begin + s);
    cp_async_commit();
  }

  const int l7 = lane & 7;
  for (int i = 0; i < nk; ++i) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    {
      const int nxt = i + STAGES - 1;
      if (nxt < nk) load_stage(nxt % STAGES, kt_begin + nxt);
      cp_async_commit();
    }
    const uint8_t* st = smem + (i % STAGES) * C::STAGE;
    const uint32_t sA = smem_u32(st), sB = sA + C::A_BYTES;
    const uint8_t* sBp = st + C::A_BYTES;
    const uint8_t* sS = sBp + C::B_BYTES;
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      uint32_t a[C::MT][4];
#pragma unroll
      for (int mt = 0; mt < C::MT; ++mt) {
        const int r = wm * C::WTM + mt * 16 + l7 + ((lane >> 3) & 1) * 8;
        const int c = 2 * s + (lane >> 4);
        ldsm_x4(a[mt][0], a[mt][1], a[mt][2], a[mt][3], sA + r * 128 + ((c ^ l7) << 4));
      }
      uint32_t b[C::NT][2];
      if constexpr (FMT == kW8) {
#pragma unroll
        for (int np = 0; np < C::NT / 2; ++np) {
          const int r = wn * C::WTN + np * 16 + l7 + (lane >> 4) * 8;
          const int c = 2 * s + ((lane >> 3) & 1);
          ldsm_x4(b[2 * np][0], b[2 * np][1], b[2 * np + 1][0], b[2 * np + 1][1], sB + r * 128 + ((c ^ l7) << 4));
        }
      } else {
#pragma unroll
        for (int j = 0; j < C::NT / 4; ++j) {
          const uint4 w = *reinterpret_cast<const uint4*>(sBp + ((wn * C::WTN / 32 + j) * 4 + s) * 512 + lane * 16);
          uint32_t s2w = 0, zw = 0;
          if constexpr (FMT == kW4PG) {
            s2w = *reinterpret_cast<const uint32_t*>(sS + s * BN + wn * C::WTN + 32 * j + 4 * g);
            zw = *reinterpret_cast<const uint32_t*>(sS + (4 + s) * BN + wn * C::WTN + 32 * j + 4 * g);
          }
          uint32_t bb[4][2];
          w4_fragments<FMT>(w, s2w, zw, bb);
#pragma unroll
          for (int jj = 0; jj < 4; ++jj) {
            b[4 * j + jj][0] = bb[jj][0];
            b[4 * j + jj][1] = bb[jj][1];
          }
        }
      }
#pragma unroll
      for (int mt = 0; mt < C::MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < C::NT; ++nt) mma_s8(acc[mt][nt], a[mt], b[nt][0], b[nt][1]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();

  // ---- stage the int32 tile in shared memory, reduce over the cluster, epilogue
  int* red = reinterpret_cast<int*>(smem);
#pragma unroll
  for (int mt = 0; mt < C::MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < C::NT; ++nt) {
      const int r = wm * C::WTM + mt * 16 + g, c = wn * C::WTN + nt * 8 + 2 * tig;
      *reinterpret_cast<int2*>(red + r * C::LDR + c) = make_int2(acc[mt][nt][0], acc[mt][nt][1]);
      *reinterpret_cast<int2*>(red + (r + 8) * C::LDR + c) = make_int2(acc[mt][nt][2], acc[mt][nt][3]);
    }
  if (split > 1) {
    cluster_sync();
  } else {
    __syncthreads();
  }
  reduce_store<FMT, BM, BN, C::LDR, C::NTHR>(p, red, m0, n0, split, rank);
  if (split > 1) cluster_sync();  // keep our shared memory alive for the other readers
}

// --------------------------------------------------------------------------------- decode kernel

// NB: 32-column tiles per CTA: a chunk's activations are read once for NB weight tiles, so the CTAs together read
// 1 / NB of the activation bytes from L2 (at 16 rows as many as the W4 weight bytes, half the W8 ones). No live config
// has NB > 1 (the two-tile configs c29-c33 lost and are retired); the parameter stays because taking its code out
// reschedules the 2-6-warp per-group kernels (c0 / c1 / c27 / c28 / c37 / c42: sm_90a SASS differs by up to 8
// instructions), which needs a GPU run to accept.
template <int FMT, int WARPS, int STAGES, int MR, int NB = 1>
struct DecodeCfg {
  static constexpr int NTHR = WARPS * 32;
  static constexpr int A_B = MR * 128;
  static constexpr int B_B = FMT == kW8 ? 32 * 128 : 4 * 512;
  static constexpr int S_B = FMT == kW4PG ? 256 : 0;  // [s2|zero][4 substeps][32 cols]
  static constexpr int TB = B_B + S_B;                // one tile's weights (+ scale rows) in a ring slot
  static constexpr int STG = A_B + NB * TB;
  static constexpr int WARP_BYTES = STAGES * STG;
  static constexpr int LDR = 36;
  static constexpr int RED = (WARPS + 1) * 16 * LDR * 4;
  static constexpr int PRE = WARPS * WARP_BYTES > RED ? WARPS * WARP_BYTES : RED;  // offset of the EpiPre
  static constexpr int SMEM = PRE + NB * static_cast<int>(sizeof(EpiPre));
  static constexpr int ITER_A = MR * 8 / 32;
  static constexpr int ITER_B = FMT == kW8 ? 8 : 4;
};

// The W4 part of a decode chunk: a lane's words of the chunk (its 16 bytes of each k32 tile and, per-group,
// the s2 / zero words of its column group) read first, then per k32 step s its unpacked B fragments
// b[n8 block][k half] handed to step(s, b).
// PK: the chunk's scales arrived packed (GemmArgs::pgs): 32 zero bytes, then the s2 nibbles.
template <int FMT, int B_B, bool G1, bool PK, typename Step>
__device__ __forceinline__ void w4_chunk_steps(const uint8_t* sBp, int lane, Step&& step) {
  const int g = lane >> 2;
  uint4 w[4];
#pragma unroll
  for (int s = 0; s < 4; ++s) w[s] = *reinterpret_cast<const uint4*>(sBp + s * 512 + lane * 16);
  if constexpr (FMT == kW4PG && G1) {
    // the group spans the chunk (group = 128 · 2^j): one s2 / zero pair, its byte broadcasts formed once
    PgBytes f;
    if constexpr (PK) {
      f = pg_bytes(pg_s2_word(*reinterpret_cast<const uint16_t*>(sBp + B_B + 32 + 2 * g)),
                   *reinterpret_cast<const uint32_t*>(sBp + B_B + 4 * g));
    } else {
      f = pg_bytes(*reinterpret_cast<const uint32_t*>(sBp + B_B + 4 * g),
                   *reinterpret_cast<const uint32_t*>(sBp + B_B + 4 * 32 + 4 * g));
    }
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      uint32_t b[4][2];
      w4_unpack(w[s], b);
      pg_apply_u8(f, b);
      step(s, b);
    }
  } else {
    uint32_t s2w[4] = {0u, 0u, 0u, 0u}, zw[4] = {0u, 0u, 0u, 0u};
    if constexpr (FMT == kW4PG) {
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        s2w[s] = *reinterpret_cast<const uint32_t*>(sBp + B_B + s * 32 + 4 * g);
        zw[s] = *reinterpret_cast<const uint32_t*>(sBp + B_B + (4 + s) * 32 + 4 * g);
      }
    }
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      uint32_t b[4][2];
      w4_fragments<FMT>(w[s], s2w[s], zw[s], b);
      step(s, b);
    }
  }
}

// One 128-k chunk of a decode warp (32 columns, up to MR rows), from its ring slot at sA (shared
// address; the weights follow the activations) into the m16n8k32 accumulators.
//  * SW = false: activations are the A operand (m16 = tokens), weights B; acc[n8 block][4].
//  * SW = true (MR = 8, M <= 8): swapped -- weights are the A operand (m16 = 16 features; a QServe
//    W4 lane's unpacked words are already the A fragments of two feature tiles), activations B
//    (n8 = tokens): half the MMAs per chunk. acc[2 * feature tile + (k32 step & 1)]: two
//    accumulators per tile halve the MMA dependency chains; summed after the k loop.
template <int FMT, int MR, int A_B, int B_B, bool SW, bool G1, int NB = 1, int TB = 0, bool PK = false>
__device__ __forceinline__ void decode_chunk(uint32_t sA, const uint8_t* slot, int lane, int (&acc)[4 * NB][4],
                                             int (&xsum)[2]) {
  static_assert(!SW || MR == 8 || MR == 4, "the swapped decode holds 8 (or 4) tokens");
  static_assert(NB == 1 || !SW, "several tiles per CTA: the unswapped decode only");
  const int l7 = lane & 7;
  const uint32_t sB = sA + A_B;
  const uint8_t* sBp = slot + A_B;
  if constexpr (SW) {
    uint32_t xb[4][2];  // B fragments (tokens) of the four k32 steps
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      // MR = 4: the n8 operand's token columns 4..7 repeat tokens 0..3 (the ring holds 4 rows; those columns of the
      // result are never stored)
      const int c = 4 * q + (lane >> 3), r = l7 & (MR - 1);
      ldsm_x4(xb[2 * q][0], xb[2 * q][1], xb[2 * q + 1][0], xb[2 * q + 1][1], sA + r * 128 + ((c ^ r) << 4));
    }
    if constexpr (FMT == kW8) {
#pragma unroll
      for (int s = 0; s < 4; ++s) {
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          uint32_t a[4];
          const int r = mt * 16 + l7 + ((lane >> 3) & 1) * 8, c = 2 * s + (lane >> 4);
          ldsm_x4(a[0], a[1], a[2], a[3], sB + r * 128 + ((c ^ l7) << 4));
          mma_s8(acc[2 * mt + (s & 1)], a, xb[s][0], xb[s][1]);
        }
      }
    } else {
      if constexpr (G1) {  // Σx: this lane's 8 bytes of token g per k32 step
#pragma unroll
        for (int s = 0; s < 4; ++s)
          xsum[0] = byte_sum4(xb[s][1], byte_sum4(xb[s][0], xsum[0]));
      }
      w4_chunk_steps<FMT, B_B, G1, PK>(sBp, lane, [&](int s, const uint32_t (&b)[4][2]) {
        const uint32_t a0[4] = {b[0][0], b[1][0], b[0][1], b[1][1]};  // features 0..15
        const uint32_t a1[4] = {b[2][0], b[3][0], b[2][1], b[3][1]};  // features 16..31
        mma_w<G1, true>(acc[0 + (s & 1)], a0, xb[s][0], xb[s][1]);
        mma_w<G1, true>(acc[2 + (s & 1)], a1, xb[s][0], xb[s][1]);
      });
    }
  } else {
    // every shared-memory read of the chunk first (A fragments, weight words, s2 / zero words), then
    // the math: the loads' latencies overlap instead of stalling each k32 step in turn (ncu: the
    // W4 decode warps spent ~50 % of their samples on short-scoreboard / dependency waits)
    uint32_t a[4][4];
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      if constexpr (MR == 16) {
        const int r = l7 + ((lane >> 3) & 1) * 8, c = 2 * s + (lane >> 4);
        ldsm_x4(a[s][0], a[s][1], a[s][2], a[s][3], sA + r * 128 + ((c ^ l7) << 4));
      } else {
        const int c = 2 * s + ((lane >> 3) & 1);
        ldsm_x2(a[s][0], a[s][2], sA + l7 * 128 + ((c ^ l7) << 4));
        a[s][1] = 0u;
        a[s][3] = 0u;
      }
    }
    if constexpr (FMT == kW8) {
#pragma unroll
      for (int t = 0; t < NB; ++t) {  // the same A fragments for every tile
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          uint32_t b[4][2];
#pragma unroll
          for (int np = 0; np < 2; ++np) {
            const int r = np * 16 + l7 + (lane >> 4) * 8, c = 2 * s + ((lane >> 3) & 1);
            ldsm_x4(b[2 * np][0], b[2 * np][1], b[2 * np + 1][0], b[2 * np + 1][1],
                    sB + t * TB + r * 128 + ((c ^ l7) << 4));
          }
#pragma unroll
          for (int nt = 0; nt < 4; ++nt) mma_s8(acc[4 * t + nt], a[s], b[nt][0], b[nt][1]);
        }
      }
    } else {
      if constexpr (G1) {  // Σx: tokens g (a0, a2) and g + 8 (a1, a3)
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          xsum[0] = byte_sum4(a[s][2], byte_sum4(a[s][0], xsum[0]));
          xsum[1] = byte_sum4(a[s][3], byte_sum4(a[s][1], xsum[1]));
        }
      }
#pragma unroll
      for (int t = 0; t < NB; ++t) {  // the same A fragments for every tile
        w4_chunk_steps<FMT, B_B, G1, PK>(sBp + t * TB, lane, [&](int s, const uint32_t (&b)[4][2]) {
#pragma unroll
          for (int nt = 0; nt < 4; ++nt) mma_w<G1, false>(acc[4 * t + nt], a[s], b[nt][0], b[nt][1]);
        });
      }
    }
  }
}

// G1 (per-group only, group = 128 · 2^j): every 128-k chunk lies inside one group, so a chunk loads one s2 / zero
// row pair instead of one per k32 step and forms the byte broadcasts once; and the weights enter the MMAs as u8
// (W8 + 128, `mma ... .u8.s8`), which drops the xor per word for one dp4a per activation word and a correction
// of 128·Σx per token after the k loop.
// PK (with G1, one tile per CTA): the scales come from GemmArgs::pgs, 48 bytes per chunk instead of 64.
template <int FMT, int WARPS, int STAGES, int MR, bool SW, bool G1 = false, int NB = 1, bool PK = false>
__global__ void __launch_bounds__(WARPS * 32) gemm_decode_kernel(const GemmArgs p) {
  static_assert(!G1 || FMT == kW4PG, "G1 is a per-group variant");
  static_assert(!PK || (G1 && NB == 1), "packed scales: the G1 kernels with one tile per CTA");
  using C = DecodeCfg<FMT, WARPS, STAGES, MR, NB>;
  extern __shared__ __align__(1024) uint8_t smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, tig = lane & 3;
  const int M = p.M, N = p.N, K = p.K;
  const int n0 = blockIdx.x * 32 * NB;
  const int split = gridDim.z, rank = blockIdx.z;
  const int KC = (K + 127) / 128;
  const int per = (KC + split - 1) / split;
  const int cb = rank * per, ce = min(KC, cb + per);
  const int nmy = ce > cb + warp ? (ce - cb - warp + WARPS - 1) / WARPS : 0;
  uint8_t* ws = smem + warp * C::WARP_BYTES;
  const uint32_t ws_u = smem_u32(ws);
  const int KT32 = K / 32;

  const int8_t* a_src[C::ITER_A];
  int a_dst[C::ITER_A], a_kc[C::ITER_A];
  bool a_ok[C::ITER_A];
#pragma unroll
  for (int it = 0; it < C::ITER_A; ++it) {
    const int q = lane + 32 * it, r = q >> 3, c = q & 7;
    a_ok[it] = r < M;
    a_src[it] = p.A + static_cast<size_t>(a_ok[it] ? r : 0) * K + 16 * c;
    a_dst[it] = swz(r, c);
    a_kc[it] = 16 * c;
  }
  // Lean copies (the unswapped configs and the 16-warp rings): W4 weights from one pointer per lane (the CTA's QServe
  // tiles are contiguous, 512 bytes per 32 x 32 and the k32 tiles of a chunk one after another, so chunk kc's tile t is
  // at w4_src + 2048 kc + 512 t), predicates only in a partial last chunk, the G1 scale rows from a per-lane base, and
  // whole-chunk activation copies without the k test: a c23 chunk's copy issue ~110 -> ~63 SASS instructions. H100
  // A/B (seventeenth session, us): g128 4096x4096 M=16 c13 5.8 -> 5.5, 4096x22016 M=16 c1 20.4 -> 19.9, 14336x4096
  // M=1 c23 11.7 -> 11.6; but the 8-warp swapped rings lost (g128 4096x12288 M=1 c22 9.6 -> 10.0, per-channel c15
  // 9.2 -> 9.6), so they keep per-tile descriptors.
  constexpr bool kLean = !SW || WARPS == 16;
  const uint8_t* b_src[C::ITER_B];
  int b_dst[C::ITER_B], b_k[C::ITER_B];
  bool b_ok[C::ITER_B];
  if constexpr (FMT == kW8) {
#pragma unroll
    for (int it = 0; it < C::ITER_B; ++it) {
      const int q = lane + 32 * it, r = q >> 3, c = q & 7;
      b_ok[it] = n0 + r < N;
      b_src[it] = static_cast<const uint8_t*>(p.B) + static_cast<size_t>(b_ok[it] ? n0 + r : 0) * K + 16 * c;
      b_dst[it] = swz(r, c);
      b_k[it] = 16 * c;
    }
  } else if constexpr (!kLean) {
#pragma unroll
    for (int it = 0; it < C::ITER_B; ++it) {
      b_ok[it] = true;
      b_src[it] = static_cast<const uint8_t*>(p.B) + (static_cast<size_t>(blockIdx.x) * KT32 + it) * 512 + 16 * lane;
      b_dst[it] = it * 512 + 16 * lane;
      b_k[it] = it;
    }
  }
  static_assert(NB == 1 || kLean, "several tiles per CTA: lean copies only");
  // tile t of the CTA (a tile past N, in the last CTA when N / 32 is odd, copies the last tile again; not stored)
  auto tile_of = [&](int t) {
    return NB == 1 ? static_cast<int>(blockIdx.x) : min(static_cast<int>(blockIdx.x) * NB + t, N / 32 - 1);
  };
  const uint8_t* w4_src[NB];
#pragma unroll
  for (int t = 0; t < NB; ++t)
    w4_src[t] = kLean ? static_cast<const uint8_t*>(p.B) + static_cast<size_t>(tile_of(t)) * KT32 * 512 + 16 * lane
                      : nullptr;
  const int G = FMT == kW4PG ? K / p.group : 1;
  // G1: the group is 128 · 2^g1_shift (the launcher checks), so a chunk's group row is a shift, not a division (an
  // integer division by p.group was ~30 of the ~280 instructions per chunk of c18); lanes 0-3 load the chunk's s2 /
  // zero row pieces
  const int g1_shift = G1 ? 31 - __clz(p.group >> 7) : 0;
  // (NB tiles: lanes 4t..4t+3 for tile t)
  const int8_t* g1_src =
      G1 && kLean && !PK ? ((lane >> 1) & 1 ? p.z2 : p.s2) + 32 * tile_of(min(lane >> 2, NB - 1)) + 16 * (lane & 1)
                         : nullptr;
  // PK: lanes 0-2 copy the chunk's 48 bytes from the tile's row of packed scales
  const uint8_t* pk_src = PK ? p.pgs + static_cast<size_t>(blockIdx.x) * G * 48 + 16 * lane : nullptr;

  auto load_act = [&](int slot, int kc) {
    const uint32_t sA = ws_u + slot * C::STG;
    const int k0 = kc * 128;
    if constexpr (kLean) {
      if (k0 + 128 <= K) {  // a whole chunk: a row >= M reads nothing (its address is row 0's)
#pragma unroll
        for (int it = 0; it < C::ITER_A; ++it) cp_async16(sA + a_dst[it], a_src[it] + k0, a_ok[it]);
        return;
      }
    }
#pragma unroll
    for (int it = 0; it < C::ITER_A; ++it) {
      const bool ok = a_ok[it] && k0 + a_kc[it] < K;
      cp_async16(sA + a_dst[it], ok ? a_src[it] + k0 : p.A, ok);
    }
  };
  auto load_weights = [&](int slot, int kc) {
    const uint32_t sB = ws_u + slot * C::STG + C::A_B;
    const int k0 = kc * 128;
    if constexpr (FMT == kW8) {
#pragma unroll
      for (int it = 0; it < C::ITER_B; ++it) {
        const bool ok = b_ok[it] && k0 + b_k[it] < K;
        cp_async16(sB + b_dst[it], ok ? b_src[it] + k0 : p.B, ok);
      }
      // tiles t > 0: their rows are 32 t further down, each checked against N (W8's N need not divide by 32)
#pragma unroll
      for (int t = 1; t < NB; ++t) {
#pragma unroll
        for (int it = 0; it < C::ITER_B; ++it) {
          const bool ok = n0 + 32 * t + ((lane + 32 * it) >> 3) < N && k0 + b_k[it] < K;
          cp_async16(sB + t * C::TB + b_dst[it], ok ? b_src[it] + static_cast<size_t>(32 * t) * K + k0 : p.B, ok);
        }
      }
    } else if constexpr (kLean) {
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) {
        const uint8_t* src = w4_src[nb] + static_cast<size_t>(kc) * 2048;
        const uint32_t dst = sB + nb * C::TB + 16 * lane;
        if (kc * 4 + 4 <= KT32) {  // a whole chunk (every chunk but a last one of K % 128 == 32, 64 or 96)
#pragma unroll
          for (int t = 0; t < 4; ++t) cp_async16(dst + 512 * t, src + 512 * t, true);
        } else {
#pragma unroll
          for (int t = 0; t < 4; ++t) {
            const bool ok = kc * 4 + t < KT32;
            cp_async16(dst + 512 * t, ok ? src + 512 * t : p.B, ok);
          }
        }
      }
    } else {
#pragma unroll
      for (int it = 0; it < C::ITER_B; ++it) {
        const bool ok = kc * 4 + b_k[it] < KT32;
        cp_async16(sB + b_dst[it], ok ? b_src[it] + static_cast<size_t>(kc) * 2048 : p.B, ok);
      }
    }
    if constexpr (FMT == kW4PG) {
      if constexpr (G1 && PK) {  // the chunk's one group, kc >> g1_shift: 32 zero bytes, 16 of s2 nibbles
        if (lane < 3) cp_async16(sB + C::B_B + 16 * lane, pk_src + static_cast<size_t>(kc >> g1_shift) * 48, true);
      } else if constexpr (G1) {  // rows 0 (s2) and 4 (zero) of the chunk's one group, kc >> g1_shift
        if (lane < 4 * NB) {
          if constexpr (kLean) {
            cp_async16(sB + (lane >> 2) * C::TB + C::B_B + ((lane >> 1) & 1) * 128 + 16 * (lane & 1),
                       g1_src + static_cast<size_t>(kc >> g1_shift) * N, true);
          } else {  // the same addresses; kept as they were because the per-lane base changes these kernels' code
            const int c = lane & 1;
            const int8_t* base = (lane >> 1) ? p.z2 : p.s2;
            cp_async16(sB + C::B_B + (lane >> 1) * 128 + 16 * c,
                       base + static_cast<size_t>(kc >> g1_shift) * N + n0 + 16 * c, true);
          }
        }
      } else if (lane < 16) {
        static_assert(NB == 1, "several tiles per CTA: per-group with G1 only");
        const int row = lane >> 1, c = lane & 1, s = row & 3;
        const int grow = min((k0 + 32 * s) / p.group, G - 1);
        const int8_t* base = (row >> 2) ? p.z2 : p.s2;
        cp_async16(sB + C::B_B + row * 32 + 16 * c, base + static_cast<size_t>(grow) * N + n0 + 16 * c, true);
      }
    }
  };
  auto load_chunk = [&](int slot, int kc) {
    load_act(slot, kc);
    load_weights(slot, kc);
  };

  int acc[4 * NB][4];
#pragma unroll
  for (int j = 0; j < 4 * NB; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0;
  int xsum[2] = {0, 0};  // G1: this lane's share of Σx of its token row(s), over the warp's chunks

  // Programmatic dependent launch (pdl_* in sm90_common.cuh). Mode 2: the weights of the first
  // STAGES - 1 chunks are requested before waiting for the previous kernel (one commit group), the
  // activations after it (one group per chunk): chunk s is complete once the weight group and
  // activation group s are, so wait_group<STAGES - 2> in the loop still means "chunk i landed".
  pdl_launch_dependents(p.pdl);
  if (p.pdl == 2) {
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s)
      if (s < nmy) load_weights(s, cb + warp + WARPS * s);
    cp_async_commit();
  }
  pdl_wait(p.pdl != 0);
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nmy) {
      if (p.pdl == 2) {
        load_act(s, cb + warp + WARPS * s);
      } else {
        load_chunk(s, cb + warp + WARPS * s);
      }
    }
    cp_async_commit();
  }
  uint32_t epv[12];
#pragma unroll
  for (int j = 0; j < 12; ++j) epv[j] = 0u;
  // warp t < NB: tile t's (NB = 1 spelled as it was, warp 0 with tid: the one-tile kernels keep their code)
  const int ep_tile = NB == 1 ? 0 : warp, ep_tid = NB == 1 ? tid : lane;
  if (warp < NB) EpiPre::fetch<FMT>(p, n0 + 32 * ep_tile, ep_tid, epv);  // consumed after the k loop
  for (int i = 0; i < nmy; ++i) {
    cp_async_wait<STAGES - 2>();
    __syncwarp();
    {
      const int nxt = i + STAGES - 1;
      if (nxt < nmy) load_chunk(nxt % STAGES, cb + warp + WARPS * nxt);
      cp_async_commit();
    }
    const int slot = i % STAGES;
    decode_chunk<FMT, MR, C::A_B, C::B_B, SW, G1, NB, C::TB, PK>(ws_u + slot * C::STG, ws + slot * C::STG, lane,
                                                                 acc, xsum);
  }
  cp_async_wait<0>();
  EpiPre* pre = reinterpret_cast<EpiPre*>(smem + C::PRE);
  if (warp < NB) pre[ep_tile].put<FMT>(p, ep_tid, epv);
  __syncthreads();

  int* red = reinterpret_cast<int*>(smem);
  int* tot = red + WARPS * 16 * C::LDR;
  if constexpr (G1) {
    // the weights went in as u8 = W8 + 128: take 128·Σx (over this warp's chunks) off every sum of a token. Modulo
    // 2^32 like the MMA accumulation, so exact whenever the true sum fits in int32.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      xsum[r] += __shfl_xor_sync(0xffffffffu, xsum[r], 1);
      xsum[r] += __shfl_xor_sync(0xffffffffu, xsum[r], 2);
    }
    auto sub = [](int& v, uint32_t c) { v = static_cast<int>(static_cast<uint32_t>(v) - c); };
    if constexpr (SW) {  // tokens 2 tig, 2 tig + 1 (odd elements); token t's sum sits in lane 4 t
      const uint32_t c0 = 128u * static_cast<uint32_t>(__shfl_sync(0xffffffffu, xsum[0], 8 * tig));
      const uint32_t c1 = 128u * static_cast<uint32_t>(__shfl_sync(0xffffffffu, xsum[0], 8 * tig + 4));
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {  // once per tile: acc[2 mt] and acc[2 mt + 1] are summed below
        sub(acc[2 * mt][0], c0);
        sub(acc[2 * mt][1], c1);
        sub(acc[2 * mt][2], c0);
        sub(acc[2 * mt][3], c1);
      }
    } else {  // rows g (elements 0, 1) and g + 8 (2, 3)
      const uint32_t c0 = 128u * static_cast<uint32_t>(xsum[0]), c1 = 128u * static_cast<uint32_t>(xsum[1]);
#pragma unroll
      for (int nt = 0; nt < 4 * NB; ++nt) {
        sub(acc[nt][0], c0);
        sub(acc[nt][1], c0);
        sub(acc[nt][2], c1);
        sub(acc[nt][3], c1);
      }
    }
  }
  // one tile at a time (NB > 1: the shared partial sums and epilogue factors of tile t, then its stores)
#pragma unroll
  for (int t = 0; t < NB; ++t) {
    if constexpr (SW) {
      // acc[2 mt + parity]: features mt * 16 + g (+ 8 for elements 2, 3), tokens 2 tig (+ 1 for odd
      // elements). Token rows 8..15 of the warp's block stay unwritten: only rows < M <= 8 are stored.
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        int* r0 = red + (warp * 16 + 2 * tig) * C::LDR + mt * 16 + g;
        r0[0] = acc[2 * mt][0] + acc[2 * mt + 1][0];
        r0[C::LDR] = acc[2 * mt][1] + acc[2 * mt + 1][1];
        r0[8] = acc[2 * mt][2] + acc[2 * mt + 1][2];
        r0[C::LDR + 8] = acc[2 * mt][3] + acc[2 * mt + 1][3];
      }
    } else {
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const int c = nt * 8 + 2 * tig;
        const int(&v)[4] = acc[4 * t + nt];
        *reinterpret_cast<int2*>(red + (warp * 16 + g) * C::LDR + c) = make_int2(v[0], v[1]);
        *reinterpret_cast<int2*>(red + (warp * 16 + g + 8) * C::LDR + c) = make_int2(v[2], v[3]);
      }
    }
    __syncthreads();  // (also: every thread is done with the previous tile's `tot`)
    for (int idx = tid; idx < 16 * 8; idx += C::NTHR) {
      const int r = idx >> 3, c4 = idx & 7;
      int4 v = *reinterpret_cast<const int4*>(red + r * C::LDR + 4 * c4);
#pragma unroll
      for (int w = 1; w < WARPS; ++w)
        v = add4(v, *reinterpret_cast<const int4*>(red + (w * 16 + r) * C::LDR + 4 * c4));
      *reinterpret_cast<int4*>(tot + r * C::LDR + 4 * c4) = v;
    }
    if (split > 1) {
      cluster_sync();
    } else {
      __syncthreads();
    }
    reduce_store<FMT, 16, 32, C::LDR, C::NTHR>(p, tot, 0, n0 + 32 * t, split, rank, pre + t);
    if (split > 1) cluster_sync();  // keep our shared memory alive for the other readers
  }
}

// ------------------------------------------------------------------------------------ launching

template <typename Kern>
cudaError_t launch_kernel(Kern kern, dim3 grid, int threads, int smem, int split, cudaStream_t stream,
                          const GemmArgs& p) {
  cudaLaunchAttribute attr[2];
  const cudaLaunchConfig_t lc =
      qtool_pdl::launch_config(grid, threads, smem, stream, dim3(1, 1, split), p.pdl != 0, attr);
  return cudaLaunchKernelEx(&lc, kern, p);
}

// Host side of one kernel instantiation: sets its shared-memory limit once, reports its occupancy,
// launches rows x cols tiles of BR x BC (ceil) times `split` CTAs (split-K over a cluster).
template <void (*KERN)(GemmArgs), int NTHR, int SMEM, int BR, int BC>
struct KernelRunner {
  static cudaError_t prepare() {
    static cudaError_t e = cudaFuncSetAttribute(KERN, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM);
    return e;
  }
  static int occupancy() {
    if (prepare() != cudaSuccess) return 0;
    int n = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, KERN, NTHR, SMEM);
    return n;
  }
  static int ctas(const GemmArgs& p) { return ((p.M + BR - 1) / BR) * ((p.N + BC - 1) / BC); }
  static cudaError_t run(const GemmArgs& p, int split, cudaStream_t stream) {
    cudaError_t e = prepare();
    if (e != cudaSuccess) return e;
    return launch_kernel(KERN, dim3(ctas(p), 1, split), NTHR, SMEM, split, stream, p);
  }
};

template <int FMT, int BM, int BN, int WM, int WN, int STAGES>
using TiledRunner = KernelRunner<gemm_tiled_kernel<FMT, BM, BN, WM, WN, STAGES>,
                                 TiledCfg<FMT, BM, BN, WM, WN, STAGES>::NTHR, TiledCfg<FMT, BM, BN, WM, WN, STAGES>::SMEM,
                                 BM, BN>;
// decode: one 32-column tile per CTA, all M <= MR rows
template <int FMT, int WARPS, int STAGES, int MR, bool SW, bool G1 = false, int NB = 1, bool PK = false>
using DecodeRunner =
    KernelRunner<gemm_decode_kernel<FMT, WARPS, STAGES, MR, SW, G1, NB, PK>,
                 DecodeCfg<FMT, WARPS, STAGES, MR, NB>::NTHR, DecodeCfg<FMT, WARPS, STAGES, MR, NB>::SMEM, MR, 32 * NB>;

// The config table (ids are the `cfg` argument of the *_cfg ops). X(id, kind, ...):
//   decode: X(id, WARPS, STAGES, MR, SW, G1, NB)      tiled: X(id, BM, BN, WM, WN, STAGES)
// G1: per-group W4 with group = 128 · 2^j runs the one-group-per-chunk kernel (H100, thirteenth session, same
// build, QTOOL_I8_DECODE_G1=0 / 1, G1 with s8 weights: c18 14336x4096 M=1 12.3 -> 11.8 us, 11008x4096 10.4 -> 9.8,
// 4096x4096 5.4 -> 5.0; c19 11008x4096 M=16 10.6 -> 10.3; c13 4096x4096 M=16 6.4 -> 6.1; c1 4096x22016 M=16 21.0 ->
// 20.6; then u8 weights: c13 6.1 -> 5.9, the others within 0.1 us) -- except c14, which the s8 G1 made slower
// (4096x22016 M=1 19.7 -> 20.4).
#define QTOOL_I8_DECODE(X)         \
  X(0, 4, 4, 8, false, true, 1)    \
  X(1, 4, 4, 16, false, true, 1)   \
  X(13, 8, 3, 16, false, true, 1)  \
  X(14, 4, 4, 8, true, false, 1)   \
  X(15, 8, 3, 8, true, true, 1)    \
  X(16, 4, 6, 8, true, true, 1)    \
  X(17, 8, 4, 8, true, true, 1)    \
  X(18, 16, 4, 8, true, true, 1)   \
  X(19, 16, 3, 16, false, true, 1) \
  X(21, 4, 3, 4, true, true, 1)    \
  X(22, 8, 3, 4, true, true, 1)    \
  X(23, 16, 4, 4, true, true, 1)   \
  X(24, 8, 5, 4, true, true, 1)    \
  X(27, 4, 3, 16, false, true, 1)  \
  X(28, 4, 2, 16, false, true, 1)  \
  X(37, 2, 4, 16, false, true, 1)  \
  X(40, 12, 4, 16, false, true, 1) \
  X(42, 6, 4, 16, false, true, 1)  \
  X(47, 8, 6, 16, false, true, 1)
#define QTOOL_I8_TILED(X)   \
  X(2, 32, 128, 1, 4, 4)    \
  X(3, 64, 128, 2, 2, 4)    \
  X(4, 128, 128, 2, 4, 4)   \
  X(5, 128, 256, 2, 4, 3)
// ids 0-5, 13-19, 21-24, 27, 28, 37, 40, 42 and 47 (decode; 14-18 swapped, M <= 8, 21-24 swapped, M <= 4; 37-47 other
// warp / stage counts of the 16-row ring); the Hopper configs 6-12 are in w8a8_wgmma.cuh / w8a8_wgws.cuh, and
// w8a8_gemm.cu dispatches on each config's kind, not its id. The ids between are retired experiments (two tiles per
// CTA, activations through L1, other rings: slower where measured; w8a8_gemm.cu's kInfo names them).

// A decode config whose ring does not fit one CTA's shared memory for a format (the 16-warp c18 / c19 / c23 and the
// c40 / c47 rings with W8 tiles) is not instantiated for it, and config_supports refuses it.
constexpr int kMaxDecodeSmem = 227 * 1024;
template <int FMT>
constexpr bool decode_fits(int cfg) {
  switch (cfg) {
#define X(id, W, S, MR, SW, G1, NB) \
  case id:                          \
    return DecodeCfg<FMT, W, S, MR, NB>::SMEM <= kMaxDecodeSmem;
    QTOOL_I8_DECODE(X)
#undef X
    default:
      return true;  // not a decode config
  }
}
// The per-group decode kernels with G1 where the group is 128 · 2^j (128, 256, ...; other multiples of 128 take the
// general path); QTOOL_I8_DECODE_G1=0 (read per call) keeps the general ones.
inline bool decode_g1_group(int group) { return group >= 128 && (group & (group - 1)) == 0; }
inline bool decode_g1_enabled() {
  const char* e = std::getenv("QTOOL_I8_DECODE_G1");
  return !(e && e[0] == '0');
}

// Per-format entry points (one translation unit per format instantiates them).
struct FmtOps {
  cudaError_t (*run)(int cfg, const GemmArgs& p, int split, cudaStream_t stream);
  int (*occupancy)(int cfg);
};

template <int FMT>
cudaError_t run_fmt(int cfg, const GemmArgs& p, int split, cudaStream_t stream) {
  switch (cfg) {
// (NB > 1, which no live config has, needs G1 for per-group: other groups run the config with one tile per CTA)
#define X(id, W, S, MR, SW, G1, NB)                                                     \
  case id:                                                                              \
    if constexpr (!decode_fits<FMT>(id)) {                                              \
      return cudaErrorInvalidValue;                                                     \
    } else if constexpr (FMT == kW4PG && G1) {                                          \
      if (decode_g1_group(p.group) && decode_g1_enabled()) {                            \
        if (NB == 1 && p.pgs) /* the packed scales, when the caller passes them */      \
          return DecodeRunner<FMT, W, S, MR, SW, true, 1, true>::run(p, split, stream); \
        return DecodeRunner<FMT, W, S, MR, SW, true, NB>::run(p, split, stream);        \
      }                                                                                 \
      return DecodeRunner<FMT, W, S, MR, SW>::run(p, split, stream);                    \
    } else {                                                                            \
      return DecodeRunner<FMT, W, S, MR, SW, false, NB>::run(p, split, stream);         \
    }
    QTOOL_I8_DECODE(X)
#undef X
#define X(id, BM, BN, WM, WN, S) \
  case id:                       \
    return TiledRunner<FMT, BM, BN, WM, WN, S>::run(p, split, stream);
    QTOOL_I8_TILED(X)
#undef X
    default:
      return cudaErrorInvalidValue;
  }
}

template <int FMT>
int occupancy_fmt(int cfg) {
  switch (cfg) {
// (per-group: the general kernel's occupancy, the one the rules were measured with)
#define X(id, W, S, MR, SW, G1, NB)                                   \
  case id:                                                            \
    if constexpr (decode_fits<FMT>(id))                               \
      return DecodeRunner<FMT, W, S, MR, SW, false, NB>::occupancy(); \
    else                                                              \
      return 0;
    QTOOL_I8_DECODE(X)
#undef X
#define X(id, BM, BN, WM, WN, S) \
  case id:                       \
    return TiledRunner<FMT, BM, BN, WM, WN, S>::occupancy();
    QTOOL_I8_TILED(X)
#undef X
    default:
      return 0;
  }
}

FmtOps fmt_ops_w8();
FmtOps fmt_ops_w4pc();
FmtOps fmt_ops_w4pg();
// (the wgmma configs have their own FmtOps, declared in w8a8_wgmma.cuh)

}  // namespace qtool_i8
