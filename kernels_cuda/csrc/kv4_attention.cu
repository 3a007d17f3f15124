// KV4 cache kernels: QServe-exact quantize (to codes, or written into the packed cache) and a
// GQA decode attention that dequantizes the 4-bit cache in registers and runs both products on
// fp16 tensor cores (mma.sync m16n8k16, fp32 accumulation). Device code, no torch headers.
//
// Decode attention, per CTA: one (batch row, KV head) and one context chunk; WARPS warps take
// 16-token blocks in turn (flash-decoding style online softmax, exp2 domain).
//  * S^T tile = Q (16 rows: the G query heads of this KV head, rows >= G zero) x K^T (8 tokens).
//    The k index (head dim) is permuted so that a lane's B fragments come straight out of the 16
//    contiguous bytes it loads of its token (dims [tig*D/4, tig*D/4 + D/4)): step c uses word
//    c/2 and nibble pairs j = 2(c%2), 2(c%2)+1 = dims (8*(c/2) + j, 8*(c/2) + j + 4); the Q A
//    fragments are loaded with the same permutation. Dequant per pair: one lop3 (magic 1024),
//    one hsub2 (exact), one hfma2 (= QServe's fp16 fma, bit-exact with kv4_dequantize).
//  * P (C layout of S) is reused in registers as the A operand of O += P x V (FA2 layout).
//    The output dim is permuted: tile j, column n <-> dim n*(D/8) + j, so a lane loads D/16
//    contiguous bytes of each of its 4 tokens; prmt pairs the same code of two tokens into one
//    half2 (the two tokens' own scales/zeros as half2 operands of the fma).
//  * Warps are combined in shared memory; with split > 1 the CTA writes (O, m, l) to a workspace
//    and a second kernel combines the chunks.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>

#include <algorithm>
#include <cstdlib>

#include "kv4_api.h"

namespace qtool_kv4 {
namespace {

template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_f<float>(float v) { return v; }

// ------------------------------------------------------------------------------------ quantize

template <typename T, int EPL>
__global__ void kv4_quant_kernel(const T* __restrict__ x, int rows, uint8_t* __restrict__ codes, __half* scale,
                                 __half* zero, int mode, int H, int S, const int* __restrict__ pos) {
  constexpr int D = 32 * EPL;
  const int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
  if (row >= rows) return;
  const T* xr = x + static_cast<size_t>(row) * D + lane * EPL;
  float v[EPL];
#pragma unroll
  for (int e = 0; e < EPL; ++e) v[e] = to_f(xr[e]);
  float mx = v[0], mn = v[0];
#pragma unroll
  for (int e = 1; e < EPL; ++e) {
    mx = fmaxf(mx, v[e]);
    mn = fminf(mn, v[e]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, o));
  }
  // same operations, in the same order, as qtool.nn.w4a8._kv_quantize (fp32)
  const float rng = __fsub_rn(mx, mn);
  float scale_f = __fdiv_rn(rng, 15.0f);
  const float fl = fmaxf(__fdiv_rn(fabsf(mn), 1024.0f), 5.9604644775390625e-08f);
  const bool deg = scale_f < fl;
  const float pow2 = exp2f(ceilf(log2f(fl)));
  const float safe = deg ? 1.0f : rng;
  const float zero_f = deg ? __fdiv_rn(-mn, pow2) : __fdiv_rn(__fmul_rn(-15.0f, mn), safe);
  scale_f = deg ? pow2 : scale_f;
  const __half sh = __float2half_rn(scale_f), zh = __float2half_rn(zero_f);
  const float inv = __fdiv_rn(1.0f, __half2float(sh));
  const float zf = __half2float(zh);
  uint32_t c[EPL];
#pragma unroll
  for (int e = 0; e < EPL; ++e) {
    const float t = fminf(fmaxf(rintf(__fadd_rn(__fmul_rn(v[e], inv), zf)), 0.0f), 15.0f);
    c[e] = static_cast<uint32_t>(t);
  }
  if (mode == 0) {
    uint8_t* dst = codes + static_cast<size_t>(row) * D + lane * EPL;
#pragma unroll
    for (int e = 0; e < EPL; ++e) dst[e] = static_cast<uint8_t>(c[e]);
    if (lane == 0) {
      scale[row] = sh;
      zero[row] = zh;
    }
  } else {
    const int b = row / H;
    const size_t slot = static_cast<size_t>(row) * S + pos[b];
    uint8_t* dst = codes + slot * (D / 2) + lane * (EPL / 2);
#pragma unroll
    for (int e = 0; e < EPL / 2; ++e) dst[e] = static_cast<uint8_t>(c[2 * e] | (c[2 * e + 1] << 4));
    if (lane == 0) reinterpret_cast<__half2*>(scale)[slot] = __halves2half2(sh, zh);
  }
}

template <typename T>
cudaError_t quant_t(const void* x, int rows, int D, uint8_t* codes, void* scale, void* zero, int mode, int H, int S,
                    const int* pos, cudaStream_t st) {
  const int blocks = (rows + 7) / 8;
  const T* xp = static_cast<const T*>(x);
  __half* sp = static_cast<__half*>(scale);
  __half* zp = static_cast<__half*>(zero);
  if (D == 64) {
    kv4_quant_kernel<T, 2><<<blocks, 256, 0, st>>>(xp, rows, codes, sp, zp, mode, H, S, pos);
  } else if (D == 128) {
    kv4_quant_kernel<T, 4><<<blocks, 256, 0, st>>>(xp, rows, codes, sp, zp, mode, H, S, pos);
  } else {
    kv4_quant_kernel<T, 8><<<blocks, 256, 0, st>>>(xp, rows, codes, sp, zp, mode, H, S, pos);
  }
  return cudaGetLastError();
}

// ------------------------------------------------------------------------------------ attention

__device__ __forceinline__ uint32_t h2u(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ __half2 u2h(uint32_t u) { return *reinterpret_cast<__half2*>(&u); }

__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// (scale, zero) half2 -> fp16(-scale * zero) (the fp32 product of two fp16 values is exact)
__device__ __forceinline__ __half neg_sz(uint32_t par) {
  const float2 f = __half22float2(u2h(par));
  return __float2half_rn(-(f.x * f.y));
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool pred) {
  const int sz = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(sz) : "memory");
}
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool pred) {
  const int sz = pred ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(sz) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Two 4-bit codes (bits 0-3 and 16-19 of `nib`) -> half2 (code, code), exact (magic 1024).
__device__ __forceinline__ uint32_t codes2(uint32_t nib) {
  const uint32_t h = (nib & 0x000F000Fu) | 0x64006400u;
  return h2u(__hsub2(u2h(h), u2h(0x64006400u)));
}

// Per-warp ring slot: K codes [16][D/2], V codes [16][D/2], K params [16], V params [16] (half2)
template <int D>
struct Ring {
  static constexpr int KB = 16 * (D / 2);
  static constexpr int SLOT = 2 * KB + 2 * 16 * 4;
};

// With dequantized values x = code * s + c (s, c per token), the two products are taken on the
// raw codes (exact small integers in fp16) and the scales applied around them:
//   score_t = s_t * (q . code_t) + c_t * sum(q)
//   out     = sum_t (p_t s_t) code_t + sum_t p_t c_t          (P' = p * s feeds the tensor cores)
// This skips the per-element fp16 rounding of the dequantized cache (differences ~1e-4 relative).
template <int D, int WARPS, int RING, bool G8>
__global__ void __launch_bounds__(WARPS * 32, D == 128 ? 3 : 4) kv4_decode_kernel(const AttnArgs a, int chunk, float scale_log2) {
  constexpr int KSTEPS = D / 16, VW = D / 64, NT = D / 8;
  constexpr int CB = D / 8;          // dims per output column block
  constexpr int RS = D + 4 * 8 + 1;  // padded combine row (conflict-free fragment stores)
  using R = Ring<D>;
  extern __shared__ __align__(16) uint8_t smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, tig = lane & 3;
  const int bh = blockIdx.x, split = blockIdx.y, nsplit = gridDim.y;
  const int b = bh / a.Hkv, hk = bh % a.Hkv;
  const int G = a.Hq / a.Hkv;
  const int ctx = min(a.ctx[b], a.S);
  const int t_begin = split * chunk, t_end = min(ctx, t_begin + chunk);

  // Q fragments (rows g, g + 8 = query heads hk*G + row when row < G) and row sums of Q
  const __half* qb = static_cast<const __half*>(a.q) + (static_cast<size_t>(b) * a.Hq + hk * G) * D;
  uint32_t qa[KSTEPS][4];
  float qs0 = 0.f, qs1 = 0.f;
#pragma unroll
  for (int c = 0; c < KSTEPS; ++c) {
    const int base = tig * (D / 4) + 8 * (c >> 1), j0 = 2 * (c & 1);
#pragma unroll
    for (int h = 0; h < (G8 ? 1 : 2); ++h) {
      const int r = g + 8 * h;
      uint32_t lo = 0u, hi = 0u;
      if (r < G) {
        const __half* qr = qb + r * D + base;
        lo = h2u(__halves2half2(qr[j0], qr[j0 + 4]));
        hi = h2u(__halves2half2(qr[j0 + 1], qr[j0 + 5]));
        const float s = __half2float(qr[j0]) + __half2float(qr[j0 + 4]) + __half2float(qr[j0 + 1]) +
                        __half2float(qr[j0 + 5]);
        if (h == 0) {
          qs0 += s;
        } else {
          qs1 += s;
        }
      }
      qa[c][h] = lo;
      qa[c][2 + h] = hi;
    }
    if (G8) {
      qa[c][1] = 0u;
      qa[c][3] = 0u;
    }
  }
  qs0 += __shfl_xor_sync(0xffffffffu, qs0, 1);
  qs0 += __shfl_xor_sync(0xffffffffu, qs0, 2);
  qs1 += __shfl_xor_sync(0xffffffffu, qs1, 1);
  qs1 += __shfl_xor_sync(0xffffffffu, qs1, 2);

  const size_t kvrow = (static_cast<size_t>(b) * a.Hkv + hk) * a.S;
  const uint8_t* kc = a.kc + kvrow * (D / 2);
  const uint8_t* vc = a.vc + kvrow * (D / 2);
  const uint32_t* kp = static_cast<const uint32_t*>(a.kp) + kvrow;
  const uint32_t* vp = static_cast<const uint32_t*>(a.vp) + kvrow;
  uint8_t* ring = smem + warp * RING * R::SLOT;
  const uint32_t ring_u = static_cast<uint32_t>(__cvta_generic_to_shared(ring));

  // this warp's 16-token blocks: t_begin + 16 * (warp + WARPS * i)
  const int nblk = t_end > t_begin ? (t_end - t_begin + 15) / 16 : 0;
  const int nmy = nblk > warp ? (nblk - warp + WARPS - 1) / WARPS : 0;
  auto load = [&](int i, int slot) {
    const int blk = t_begin + 16 * (warp + WARPS * i);
    const uint32_t dst = ring_u + slot * R::SLOT;
#pragma unroll
    for (int it = 0; it < R::KB / 16 / 32; ++it) {  // 16-byte chunks of the K and V code rows
      const int q = lane + 32 * it;
      const int tok = blk + q / (D / 32);
      const bool ok = tok < t_end;
      const size_t off = static_cast<size_t>(ok ? tok : 0) * (D / 2) + (q % (D / 32)) * 16;
      cp_async16(dst + 16 * q, kc + off, ok);
      cp_async16(dst + R::KB + 16 * q, vc + off, ok);
    }
    {
      const int tok = blk + (lane & 15);
      const bool ok = tok < t_end;
      const uint32_t* src = (lane < 16 ? kp : vp) + (ok ? tok : 0);
      cp_async4(dst + 2 * R::KB + 4 * lane, src, ok);
    }
  };

  float o[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m0 = -CUDART_INF_F, m1 = -CUDART_INF_F, l0 = 0.f, l1 = 0.f, cz0 = 0.f, cz1 = 0.f;

#pragma unroll
  for (int i = 0; i < RING - 1; ++i) {
    if (i < nmy) load(i, i);
    cp_async_commit();
  }
  for (int i = 0; i < nmy; ++i) {
    cp_async_wait<RING - 2>();
    __syncwarp();
    {
      const int nxt = i + RING - 1;
      if (nxt < nmy) load(nxt, nxt % RING);
      cp_async_commit();
    }
    const int blk = t_begin + 16 * (warp + WARPS * i);
    const uint8_t* sl = ring + (i % RING) * R::SLOT;
    const uint8_t* sk = sl;
    const uint8_t* sv = sl + R::KB;
    const uint32_t* spk = reinterpret_cast<const uint32_t*>(sl + 2 * R::KB);
    const uint32_t* spv = spk + 16;

    // ---- raw scores: Q (rows) x codes^T (8 tokens per tile)
    float s[2][4];
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.f;
      uint32_t kw[D / 32];
      const uint8_t* kr = sk + (8 * t + g) * (D / 2) + tig * (D / 8);
      if constexpr (D == 128) {
        const uint4 u = *reinterpret_cast<const uint4*>(kr);
        kw[0] = u.x, kw[1] = u.y, kw[2] = u.z, kw[3] = u.w;
      } else {
        const uint2 u = *reinterpret_cast<const uint2*>(kr);
        kw[0] = u.x, kw[1] = u.y;
      }
#pragma unroll
      for (int c = 0; c < KSTEPS; ++c) {
        const uint32_t w = kw[c >> 1];
        const int j0 = 2 * (c & 1);
        mma16816(s[t], qa[c], codes2(w >> (4 * j0)), codes2(w >> (4 * j0 + 4)));
      }
    }
    // ---- scale/zero of this lane's C columns (tokens 8t + 2tig + e), mask, exp2 domain
    float vsc[2][2], vcz[2][2];
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      const uint2 pk = *reinterpret_cast<const uint2*>(spk + 8 * t + 2 * tig);
      const uint2 pv = *reinterpret_cast<const uint2*>(spv + 8 * t + 2 * tig);
      const uint32_t pks[2] = {pk.x, pk.y}, pvs[2] = {pv.x, pv.y};
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float ks = __half2float(u2h(pks[e]).x);
        const float kcz = __half2float(neg_sz(pks[e]));
        vsc[t][e] = __half2float(u2h(pvs[e]).x);
        vcz[t][e] = __half2float(neg_sz(pvs[e]));
        const bool ok = blk + 8 * t + 2 * tig + e < t_end;
        s[t][e] = ok ? (ks * s[t][e] + kcz * qs0) * scale_log2 : -CUDART_INF_F;
        s[t][2 + e] = ok ? (ks * s[t][2 + e] + kcz * qs1) * scale_log2 : -CUDART_INF_F;
      }
    }
    // ---- online softmax (rows g: e = 0, 1; rows g + 8: e = 2, 3)
    float mx0 = fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1]));
    float mx1 = fmaxf(fmaxf(s[0][2], s[0][3]), fmaxf(s[1][2], s[1][3]));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
    const float al0 = n0 == -CUDART_INF_F ? 1.f : exp2f(m0 - n0);
    const float al1 = n1 == -CUDART_INF_F ? 1.f : exp2f(m1 - n1);
    float p[2][4];
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      p[t][0] = n0 == -CUDART_INF_F ? 0.f : exp2f(s[t][0] - n0);
      p[t][1] = n0 == -CUDART_INF_F ? 0.f : exp2f(s[t][1] - n0);
      p[t][2] = n1 == -CUDART_INF_F ? 0.f : exp2f(s[t][2] - n1);
      p[t][3] = n1 == -CUDART_INF_F ? 0.f : exp2f(s[t][3] - n1);
    }
    l0 = l0 * al0 + (p[0][0] + p[0][1]) + (p[1][0] + p[1][1]);
    l1 = l1 * al1 + (p[0][2] + p[0][3]) + (p[1][2] + p[1][3]);
    cz0 = cz0 * al0 + (p[0][0] * vcz[0][0] + p[0][1] * vcz[0][1]) + (p[1][0] * vcz[1][0] + p[1][1] * vcz[1][1]);
    cz1 = cz1 * al1 + (p[0][2] * vcz[0][0] + p[0][3] * vcz[0][1]) + (p[1][2] * vcz[1][0] + p[1][3] * vcz[1][1]);
    if (__any_sync(0xffffffffu, al0 != 1.f || al1 != 1.f)) {
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        o[j][0] *= al0;
        o[j][1] *= al0;
        o[j][2] *= al1;
        o[j][3] *= al1;
      }
    }
    m0 = n0;
    m1 = n1;
    uint32_t pa[4];  // P' = p * s_v (fp16), FA2 C -> A register reuse
    pa[0] = h2u(__floats2half2_rn(p[0][0] * vsc[0][0], p[0][1] * vsc[0][1]));
    pa[1] = G8 ? 0u : h2u(__floats2half2_rn(p[0][2] * vsc[0][0], p[0][3] * vsc[0][1]));
    pa[2] = h2u(__floats2half2_rn(p[1][0] * vsc[1][0], p[1][1] * vsc[1][1]));
    pa[3] = G8 ? 0u : h2u(__floats2half2_rn(p[1][2] * vsc[1][0], p[1][3] * vsc[1][1]));

    // ---- O += P' x codes(V): tokens 2tig, 2tig+1 (b0) and 2tig+8, 2tig+9 (b1), dims g*CB + j
    uint32_t vw[4][VW];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const uint8_t* vr = sv + (2 * tig + (e & 1) + 8 * (e >> 1)) * (D / 2) + g * (D / 16);
      if constexpr (VW == 2) {
        const uint2 u = *reinterpret_cast<const uint2*>(vr);
        vw[e][0] = u.x, vw[e][1] = u.y;
      } else {
        vw[e][0] = *reinterpret_cast<const uint32_t*>(vr);
      }
    }
#pragma unroll
    for (int u = 0; u < VW; ++u) {
      const uint32_t x0 = __byte_perm(vw[0][u], vw[1][u], 0x5410);
      const uint32_t x1 = __byte_perm(vw[0][u], vw[1][u], 0x7632);
      const uint32_t y0 = __byte_perm(vw[2][u], vw[3][u], 0x5410);
      const uint32_t y1 = __byte_perm(vw[2][u], vw[3][u], 0x7632);
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        mma16816(o[8 * u + jj], pa, codes2(x0 >> (4 * jj)), codes2(y0 >> (4 * jj)));
        mma16816(o[8 * u + 4 + jj], pa, codes2(x1 >> (4 * jj)), codes2(y1 >> (4 * jj)));
      }
    }
  }
  cp_async_wait<0>();

  // ---- combine the warps (the ring's shared memory is reused)
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  cz0 += __shfl_xor_sync(0xffffffffu, cz0, 1);
  cz0 += __shfl_xor_sync(0xffffffffu, cz0, 2);
  cz1 += __shfl_xor_sync(0xffffffffu, cz1, 1);
  cz1 += __shfl_xor_sync(0xffffffffu, cz1, 2);
  __syncthreads();
  float* so = reinterpret_cast<float*>(smem);         // [WARPS][16][RS]
  float* sm_m = so + WARPS * 16 * RS;                 // [WARPS][16]
  float* sm_l = sm_m + WARPS * 16;
  if (tig == 0) {
    sm_m[warp * 16 + g] = m0;
    sm_l[warp * 16 + g] = l0;
    sm_m[warp * 16 + g + 8] = m1;
    sm_l[warp * 16 + g + 8] = l1;
  }
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    // dim (2tig + h) * CB + j, padded index dim + 4 * (dim / CB)
    const int i0 = (2 * tig) * (CB + 4) + j, i1 = (2 * tig + 1) * (CB + 4) + j;
    so[(warp * 16 + g) * RS + i0] = o[j][0] + cz0;
    so[(warp * 16 + g) * RS + i1] = o[j][1] + cz0;
    so[(warp * 16 + g + 8) * RS + i0] = o[j][2] + cz1;
    so[(warp * 16 + g + 8) * RS + i1] = o[j][3] + cz1;
  }
  __syncthreads();
  const int rows = G < 16 ? G : 16;
  for (int idx = tid; idx < rows * D; idx += WARPS * 32) {
    const int h = idx / D, d = idx % D;
    const int pi = d + 4 * (d / CB);
    float M = -CUDART_INF_F;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) M = fmaxf(M, sm_m[w * 16 + h]);
    float L = 0.f, O = 0.f;
    if (M != -CUDART_INF_F) {
#pragma unroll
      for (int w = 0; w < WARPS; ++w) {
        const float mw = sm_m[w * 16 + h];
        const float f = mw == -CUDART_INF_F ? 0.f : exp2f(mw - M);
        L += sm_l[w * 16 + h] * f;
        O += so[(w * 16 + h) * RS + pi] * f;
      }
    }
    const size_t orow = static_cast<size_t>(b) * a.Hq + hk * G + h;
    if (nsplit == 1) {
      static_cast<__half*>(a.out)[orow * D + d] = __float2half_rn(L > 0.f ? O / L : 0.f);
    } else {
      float* wrow = a.work + (orow * nsplit + split) * (D + 2);
      wrow[d] = O;
      if (d == 0) {
        wrow[D] = M;
        wrow[D + 1] = L;
      }
    }
  }
}

// ---- v1 (first GPU run, validated): registers hold the next block (one block of prefetch per warp),
// the cache is dequantized per element to fp16 exactly as kv4_dequantize (lop3, hsub2, hfma2).
__device__ __forceinline__ uint32_t dq2(uint32_t nib, uint32_t s2, uint32_t c2) {
  const uint32_t h = (nib & 0x000F000Fu) | 0x64006400u;
  const __half2 q = __hsub2(u2h(h), u2h(0x64006400u));
  return h2u(__hfma2(q, u2h(s2), u2h(c2)));
}

template <int D>
struct Blk {
  uint32_t k[2][D / 32];
  uint32_t kp[2];
  uint32_t v[4][D / 64];
  uint32_t vp[4];
};

template <int N>
__device__ __forceinline__ void ldg_words(uint32_t (&w)[N], const uint8_t* p) {
  if constexpr (N == 4) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    w[0] = u.x, w[1] = u.y, w[2] = u.z, w[3] = u.w;
  } else if constexpr (N == 2) {
    const uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
    w[0] = u.x, w[1] = u.y;
  } else {
    w[0] = __ldg(reinterpret_cast<const uint32_t*>(p));
  }
}

template <int D, int WARPS>
__global__ void __launch_bounds__(WARPS * 32) kv4_decode_v1_kernel(const AttnArgs a, int chunk, float scale_log2) {
  constexpr int KW = D / 32, KSTEPS = D / 16, VW = D / 64, NT = D / 8;
  constexpr int CB = D / 8;
  constexpr int RS = D + 4 * 8 + 1;
  __shared__ float so[WARPS][16][RS];
  __shared__ float sm_m[WARPS][16], sm_l[WARPS][16];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, tig = lane & 3;
  const int bh = blockIdx.x, split = blockIdx.y, nsplit = gridDim.y;
  const int b = bh / a.Hkv, hk = bh % a.Hkv;
  const int G = a.Hq / a.Hkv;
  const int ctx = min(a.ctx[b], a.S);
  const int t_begin = split * chunk, t_end = min(ctx, t_begin + chunk);
  const __half* qb = static_cast<const __half*>(a.q) + (static_cast<size_t>(b) * a.Hq + hk * G) * D;
  uint32_t qa[KSTEPS][4];
#pragma unroll
  for (int c = 0; c < KSTEPS; ++c) {
    const int base = tig * (D / 4) + 8 * (c >> 1), j0 = 2 * (c & 1);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = g + 8 * h;
      uint32_t lo = 0u, hi = 0u;
      if (r < G) {
        const __half* qr = qb + r * D + base;
        lo = h2u(__halves2half2(qr[j0], qr[j0 + 4]));
        hi = h2u(__halves2half2(qr[j0 + 1], qr[j0 + 5]));
      }
      qa[c][h] = lo;
      qa[c][2 + h] = hi;
    }
  }
  const size_t kvrow = (static_cast<size_t>(b) * a.Hkv + hk) * a.S;
  const uint8_t* kc = a.kc + kvrow * (D / 2);
  const uint8_t* vc = a.vc + kvrow * (D / 2);
  const uint32_t* kp = static_cast<const uint32_t*>(a.kp) + kvrow;
  const uint32_t* vp = static_cast<const uint32_t*>(a.vp) + kvrow;
  auto load = [&](int blk, Blk<D>& d) {
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      const int tok = min(blk + 8 * t + g, t_end - 1);
      ldg_words<KW>(d.k[t], kc + static_cast<size_t>(tok) * (D / 2) + tig * (D / 8));
      d.kp[t] = __ldg(kp + tok);
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int tok = min(blk + 2 * tig + (e & 1) + 8 * (e >> 1), t_end - 1);
      ldg_words<VW>(d.v[e], vc + static_cast<size_t>(tok) * (D / 2) + g * (D / 16));
      d.vp[e] = __ldg(vp + tok);
    }
  };
  float o[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m0 = -CUDART_INF_F, m1 = -CUDART_INF_F, l0 = 0.f, l1 = 0.f;
  Blk<D> cur, nxt;
  int blk = t_begin + warp * 16;
  if (blk < t_end) load(blk, cur);
  for (; blk < t_end; blk += WARPS * 16) {
    const int nb = blk + WARPS * 16;
    if (nb < t_end) load(nb, nxt);
    float s[2][4];
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.f;
      const __half sc = u2h(cur.kp[t]).x;
      const uint32_t s2 = h2u(__halves2half2(sc, sc));
      const __half cz = neg_sz(cur.kp[t]);
      const uint32_t c2 = h2u(__halves2half2(cz, cz));
#pragma unroll
      for (int c = 0; c < KSTEPS; ++c) {
        const uint32_t w = cur.k[t][c >> 1];
        const int j0 = 2 * (c & 1);
        mma16816(s[t], qa[c], dq2(w >> (4 * j0), s2, c2), dq2(w >> (4 * j0 + 4), s2, c2));
      }
    }
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int tok = blk + 8 * t + 2 * tig + (e & 1);
        s[t][e] = tok < t_end ? s[t][e] * scale_log2 : -CUDART_INF_F;
      }
    float mx0 = fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1]));
    float mx1 = fmaxf(fmaxf(s[0][2], s[0][3]), fmaxf(s[1][2], s[1][3]));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
    const float al0 = n0 == -CUDART_INF_F ? 1.f : exp2f(m0 - n0);
    const float al1 = n1 == -CUDART_INF_F ? 1.f : exp2f(m1 - n1);
    float p[2][4];
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      p[t][0] = n0 == -CUDART_INF_F ? 0.f : exp2f(s[t][0] - n0);
      p[t][1] = n0 == -CUDART_INF_F ? 0.f : exp2f(s[t][1] - n0);
      p[t][2] = n1 == -CUDART_INF_F ? 0.f : exp2f(s[t][2] - n1);
      p[t][3] = n1 == -CUDART_INF_F ? 0.f : exp2f(s[t][3] - n1);
    }
    l0 = l0 * al0 + (p[0][0] + p[0][1]) + (p[1][0] + p[1][1]);
    l1 = l1 * al1 + (p[0][2] + p[0][3]) + (p[1][2] + p[1][3]);
    if (__any_sync(0xffffffffu, al0 != 1.f || al1 != 1.f)) {
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        o[j][0] *= al0;
        o[j][1] *= al0;
        o[j][2] *= al1;
        o[j][3] *= al1;
      }
    }
    m0 = n0;
    m1 = n1;
    uint32_t pa[4];
    pa[0] = h2u(__floats2half2_rn(p[0][0], p[0][1]));
    pa[1] = h2u(__floats2half2_rn(p[0][2], p[0][3]));
    pa[2] = h2u(__floats2half2_rn(p[1][0], p[1][1]));
    pa[3] = h2u(__floats2half2_rn(p[1][2], p[1][3]));
    const uint32_t vs01 = h2u(__halves2half2(u2h(cur.vp[0]).x, u2h(cur.vp[1]).x));
    const uint32_t vc01 = h2u(__halves2half2(neg_sz(cur.vp[0]), neg_sz(cur.vp[1])));
    const uint32_t vs89 = h2u(__halves2half2(u2h(cur.vp[2]).x, u2h(cur.vp[3]).x));
    const uint32_t vc89 = h2u(__halves2half2(neg_sz(cur.vp[2]), neg_sz(cur.vp[3])));
#pragma unroll
    for (int u = 0; u < VW; ++u) {
      const uint32_t x0 = __byte_perm(cur.v[0][u], cur.v[1][u], 0x5410);
      const uint32_t x1 = __byte_perm(cur.v[0][u], cur.v[1][u], 0x7632);
      const uint32_t y0 = __byte_perm(cur.v[2][u], cur.v[3][u], 0x5410);
      const uint32_t y1 = __byte_perm(cur.v[2][u], cur.v[3][u], 0x7632);
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        mma16816(o[8 * u + jj], pa, dq2(x0 >> (4 * jj), vs01, vc01), dq2(y0 >> (4 * jj), vs89, vc89));
        mma16816(o[8 * u + 4 + jj], pa, dq2(x1 >> (4 * jj), vs01, vc01), dq2(y1 >> (4 * jj), vs89, vc89));
      }
    }
    cur = nxt;
  }
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  if (tig == 0) {
    sm_m[warp][g] = m0;
    sm_l[warp][g] = l0;
    sm_m[warp][g + 8] = m1;
    sm_l[warp][g + 8] = l1;
  }
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int i0 = (2 * tig) * (CB + 4) + j, i1 = (2 * tig + 1) * (CB + 4) + j;
    so[warp][g][i0] = o[j][0];
    so[warp][g][i1] = o[j][1];
    so[warp][g + 8][i0] = o[j][2];
    so[warp][g + 8][i1] = o[j][3];
  }
  __syncthreads();
  const int rows = G < 16 ? G : 16;
  for (int idx = tid; idx < rows * D; idx += WARPS * 32) {
    const int h = idx / D, d = idx % D;
    const int pi = d + 4 * (d / CB);
    float M = -CUDART_INF_F;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) M = fmaxf(M, sm_m[w][h]);
    float L = 0.f, O = 0.f;
    if (M != -CUDART_INF_F) {
#pragma unroll
      for (int w = 0; w < WARPS; ++w) {
        const float f = sm_m[w][h] == -CUDART_INF_F ? 0.f : exp2f(sm_m[w][h] - M);
        L += sm_l[w][h] * f;
        O += so[w][h][pi] * f;
      }
    }
    const size_t orow = static_cast<size_t>(b) * a.Hq + hk * G + h;
    if (nsplit == 1) {
      static_cast<__half*>(a.out)[orow * D + d] = __float2half_rn(L > 0.f ? O / L : 0.f);
    } else {
      float* wrow = a.work + (orow * nsplit + split) * (D + 2);
      wrow[d] = O;
      if (d == 0) {
        wrow[D] = M;
        wrow[D + 1] = L;
      }
    }
  }
}

__global__ void kv4_combine_kernel(const float* __restrict__ work, __half* __restrict__ out, int nsplit, int D) {
  const size_t row = blockIdx.x;
  const float* w = work + row * nsplit * (D + 2);
  float M = -CUDART_INF_F;
  for (int s = 0; s < nsplit; ++s) M = fmaxf(M, w[s * (D + 2) + D]);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float L = 0.f, O = 0.f;
    if (M != -CUDART_INF_F) {
      for (int s = 0; s < nsplit; ++s) {
        const float ms = w[s * (D + 2) + D];
        const float f = ms == -CUDART_INF_F ? 0.f : exp2f(ms - M);
        L += w[s * (D + 2) + D + 1] * f;
        O += w[s * (D + 2) + d] * f;
      }
    }
    out[row * D + d] = __float2half_rn(L > 0.f ? O / L : 0.f);
  }
}

constexpr int kWarps = 4;
constexpr int kRing = 4;  // 16-token blocks in flight per warp

int sms() {
  static int n = 0;
  if (n == 0) {
    int d = 0;
    cudaGetDevice(&d);
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, d);
    if (n <= 0) n = 1;
  }
  return n;
}

// Kernel choice: v1 (register prefetch, per-element dequant; the default: measured best with one
// context chunk per CTA, 1.39-1.53x SDPA at B=64) or, with QTOOL_KV4_KERNEL=ring, the cp.async-ring
// kernel with the dequantization around the MMAs (15-22 % faster than v1 at equal splits in the
// second GPU run, but not yet timed with one chunk per CTA).
bool use_v1() {
  const char* v = std::getenv("QTOOL_KV4_KERNEL");
  return !(v && v[0] == 'r');
}

template <int D>
constexpr int attn_smem() {
  constexpr int ring = kWarps * kRing * Ring<D>::SLOT;
  constexpr int comb = (kWarps * 16 * (D + 33) + 2 * kWarps * 16) * 4;
  return ring > comb ? ring : comb;
}

template <int D, bool G8>
cudaError_t launch_attn(const AttnArgs& a, dim3 grid, int chunk, float scale_log2, cudaStream_t st) {
  constexpr int smem = attn_smem<D>();
  static cudaError_t e0 = cudaFuncSetAttribute(kv4_decode_kernel<D, kWarps, kRing, G8>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e0 != cudaSuccess) return e0;
  kv4_decode_kernel<D, kWarps, kRing, G8><<<grid, kWarps * 32, smem, st>>>(a, chunk, scale_log2);
  return cudaGetLastError();
}

}  // namespace

int quantize(int dt, const void* x, int rows, int D, uint8_t* codes, void* scale, void* zero, int mode, int H, int S,
             const int* pos, cudaStream_t stream, const char** err) {
  if (D != 64 && D != 128 && D != 256) {
    if (err) *err = "kv4 quantize supports head_dim 64, 128 or 256";
    return -1;
  }
  if (rows <= 0) return 0;
  cudaError_t e;
  if (dt == kF16) {
    e = quant_t<__half>(x, rows, D, codes, scale, zero, mode, H, S, pos, stream);
  } else if (dt == kBF16) {
    e = quant_t<__nv_bfloat16>(x, rows, D, codes, scale, zero, mode, H, S, pos, stream);
  } else if (dt == kF32) {
    e = quant_t<float>(x, rows, D, codes, scale, zero, mode, H, S, pos, stream);
  } else {
    if (err) *err = "x must be float16, bfloat16 or float32";
    return -1;
  }
  return e == cudaSuccess ? 0 : static_cast<int>(e);
}

// Split the context only when (batch x KV heads) CTAs leave SMs idle: the second GPU run picked
// 3-10 chunks at B=64 by a wave-efficiency rule and lost 20-45 % to the first run's single chunk.
int choose_split(int B, int Hkv, int S, int D) {
  (void)D;
  const long long bh = static_cast<long long>(B) * Hkv;
  const long long n = sms();
  if (bh >= n) return 1;
  const long long max_s = std::max(1, std::min(16, S / 256));  // >= 256 tokens per chunk
  return static_cast<int>(std::max<long long>(1, std::min<long long>(max_s, (2 * n + bh - 1) / bh)));
}

int decode_attention(const AttnArgs& a, int split, cudaStream_t stream, const char** err) {
  auto bad = [&](const char* m) {
    if (err) *err = m;
    return -1;
  };
  if (a.D != 64 && a.D != 128) return bad("kv4 decode attention supports head_dim 64 or 128");
  if (a.Hkv <= 0 || a.Hq % a.Hkv != 0) return bad("query heads must be a multiple of KV heads");
  if (a.Hq / a.Hkv > 16) return bad("at most 16 query heads per KV head");
  if ((reinterpret_cast<uintptr_t>(a.kc) | reinterpret_cast<uintptr_t>(a.vc)) % 16) return bad("caches must be 16-byte aligned");
  if (a.B == 0) return 0;
  if (a.S <= 0) return bad("empty cache");
  int s = split > 0 ? split : choose_split(a.B, a.Hkv, a.S, a.D);
  if (s > 1 && !a.work) return bad("split > 1 needs a workspace");
  int chunk = (a.S + s - 1) / s;
  chunk = (chunk + 15) / 16 * 16;
  s = (a.S + chunk - 1) / chunk;
  const float scale_log2 = a.sm_scale * 1.4426950408889634f;
  dim3 grid(a.B * a.Hkv, s);
  const bool g8 = a.Hq / a.Hkv <= 8;
  cudaError_t e;
  if (use_v1()) {
    if (a.D == 64) {
      kv4_decode_v1_kernel<64, kWarps><<<grid, kWarps * 32, 0, stream>>>(a, chunk, scale_log2);
    } else {
      kv4_decode_v1_kernel<128, kWarps><<<grid, kWarps * 32, 0, stream>>>(a, chunk, scale_log2);
    }
    e = cudaGetLastError();
  } else if (a.D == 64) {
    e = g8 ? launch_attn<64, true>(a, grid, chunk, scale_log2, stream)
           : launch_attn<64, false>(a, grid, chunk, scale_log2, stream);
  } else {
    e = g8 ? launch_attn<128, true>(a, grid, chunk, scale_log2, stream)
           : launch_attn<128, false>(a, grid, chunk, scale_log2, stream);
  }
  if (e == cudaSuccess && s > 1) {
    kv4_combine_kernel<<<a.B * a.Hq, a.D, 0, stream>>>(a.work, static_cast<__half*>(a.out), s, a.D);
    e = cudaGetLastError();
  }
  return e == cudaSuccess ? 0 : static_cast<int>(e);
}

}  // namespace qtool_kv4
