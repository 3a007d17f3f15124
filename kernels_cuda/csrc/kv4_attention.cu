// KV4 cache kernels: QServe-exact quantize (to codes, or written into the packed cache) and a
// GQA decode attention that dequantizes the 4-bit cache in registers and runs both products on
// fp16 tensor cores (mma.sync m16n8k16, fp32 accumulation). Device code, no torch headers.
//
// Decode attention, per CTA: one (batch row, KV head) and one context chunk; WARPS warps take
// 16-token blocks in turn (flash-decoding style online softmax, exp2 domain). Two kernels share
// this scheme: the default "u" kernel (G <= 8, both products transposed so that no MMA row is
// padding; see its comment below), and the "ring" kernel described here (G <= 16):
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
#include <string>

#include "kv4_api.h"
#include "float_cvt.cuh"

namespace qtool_kv4 {
namespace {

using qtool_cvt::to_f;

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

// One 16-token block of the online softmax (exp2 domain) for a lane's two query rows of an m16n8 C layout (row g:
// s[t][0..1], row g + 8: s[t][2..3], over the block's two 8-token tiles t): the rows' new maxima over the quad,
// p = 2^(s - max) (0 for a row with no valid token yet), the running sums l and the output accumulators o rescaled
// by al = 2^(old max - new max), the running sums cz of the V zero terms (p · vcz per token) rescaled like l, and the
// maxima m updated. The ring kernel runs it.
template <int NT>
__device__ __forceinline__ void online_softmax_block(const float (&s)[2][4], float& m0, float& m1, float& l0,
                                                     float& l1, float (&o)[NT][4], float (&p)[2][4], float (&cz)[2],
                                                     const float (&vcz)[2][2]) {
  float mx0 = fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1]));
  float mx1 = fmaxf(fmaxf(s[0][2], s[0][3]), fmaxf(s[1][2], s[1][3]));
  mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
  mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
  mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
  mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
  const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
  const float al0 = n0 == -CUDART_INF_F ? 1.f : exp2f(m0 - n0);
  const float al1 = n1 == -CUDART_INF_F ? 1.f : exp2f(m1 - n1);
#pragma unroll
  for (int t = 0; t < 2; ++t) {
    p[t][0] = n0 == -CUDART_INF_F ? 0.f : exp2f(s[t][0] - n0);
    p[t][1] = n0 == -CUDART_INF_F ? 0.f : exp2f(s[t][1] - n0);
    p[t][2] = n1 == -CUDART_INF_F ? 0.f : exp2f(s[t][2] - n1);
    p[t][3] = n1 == -CUDART_INF_F ? 0.f : exp2f(s[t][3] - n1);
  }
  l0 = l0 * al0 + (p[0][0] + p[0][1]) + (p[1][0] + p[1][1]);
  l1 = l1 * al1 + (p[0][2] + p[0][3]) + (p[1][2] + p[1][3]);
  cz[0] = cz[0] * al0 + (p[0][0] * vcz[0][0] + p[0][1] * vcz[0][1]) + (p[1][0] * vcz[1][0] + p[1][1] * vcz[1][1]);
  cz[1] = cz[1] * al1 + (p[0][2] * vcz[0][0] + p[0][3] * vcz[0][1]) + (p[1][2] * vcz[1][0] + p[1][3] * vcz[1][1]);
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

// A warp's cp.async ring of RING slots over its nmy blocks: the first RING - 1 blocks requested (one commit group
// each, empty past nmy) ...
template <int RING, typename Load>
__device__ __forceinline__ void ring_prime(int nmy, Load&& load) {
#pragma unroll
  for (int i = 0; i < RING - 1; ++i) {
    if (i < nmy) load(i, i);
    cp_async_commit();
  }
}
// ... then, before block i is used: wait until it has landed, and request block i + RING - 1 into the slot that
// block i - 1 (already used) leaves free.
template <int RING, typename Load>
__device__ __forceinline__ void ring_advance(int i, int nmy, Load&& load) {
  cp_async_wait<RING - 2>();
  __syncwarp();
  const int nxt = i + RING - 1;
  if (nxt < nmy) load(nxt, nxt % RING);
  cp_async_commit();
}

// A decode-attention CTA's work: batch row b, KV head hk (query heads hk*G .. hk*G + G-1) and the context chunk
// [t_begin, t_end) (blockIdx.y of gridDim.y chunks of `chunk` tokens, clipped to the row's context length).
struct KvCta {
  int b, hk, G, t_begin, t_end;
};
__device__ __forceinline__ KvCta kv_cta(const AttnArgs& a, int chunk) {
  const int bh = blockIdx.x, split = blockIdx.y;  // signed arithmetic from here on
  KvCta c;
  c.b = bh / a.Hkv;
  c.hk = bh % a.Hkv;
  c.G = a.Hq / a.Hkv;
  const int ctx = min(a.ctx[c.b], a.S);
  c.t_begin = split * chunk;
  c.t_end = min(ctx, c.t_begin + chunk);
  return c;
}
// The (b, hk) rows of the code caches and of the params.
struct KvRows {
  const uint8_t* kc;
  const uint8_t* vc;
  const uint32_t* kp;
  const uint32_t* vp;
};
template <int D>
__device__ __forceinline__ KvRows kv_rows(const AttnArgs& a, const KvCta& c) {
  const size_t kvrow = (static_cast<size_t>(c.b) * a.Hkv + c.hk) * a.S;
  return {a.kc + kvrow * (D / 2), a.vc + kvrow * (D / 2), static_cast<const uint32_t*>(a.kp) + kvrow,
          static_cast<const uint32_t*>(a.vp) + kvrow};
}

// A lane's V code words of a ring slot's 16-token block (sv): tokens 2tig, 2tig + 1, 2tig + 8, 2tig + 9 (e = 0..3),
// the D/16 contiguous bytes of dims g*D/8 .. (the output dims' permutation of both kernels).
template <int D>
__device__ __forceinline__ void v_words(const uint8_t* sv, int g, int tig, uint32_t (&vw)[4][D / 64]) {
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const uint8_t* vr = sv + (2 * tig + (e & 1) + 8 * (e >> 1)) * (D / 2) + g * (D / 16);
    if constexpr (D / 64 == 2) {
      const uint2 u = *reinterpret_cast<const uint2*>(vr);
      vw[e][0] = u.x, vw[e][1] = u.y;
    } else {
      vw[e][0] = *reinterpret_cast<const uint32_t*>(vr);
    }
  }
}

// The CTA's result from its warps' partial softmax states (in shared memory: maxima sm_m and sums sm_l at
// [warp * hstride + head], and o_part(w, h, pad(d)), warp w's unnormalized output of head h, dim d, at the padded
// column pad(d)): per head h < rows and dim d, M = max_w m_w, L = sum_w l_w 2^(m_w - M), O = sum_w o_w 2^(m_w - M).
// One chunk: out = O / L (0 for an empty context); several: (O, M, L) into the workspace row of this chunk, for
// kv4_combine_kernel.
template <int D, int NTHR, typename Pad, typename OPart>
__device__ __forceinline__ void merge_warps_and_store(const AttnArgs& a, const KvCta& c, int rows, const float* sm_m,
                                                      const float* sm_l, int hstride, Pad pad, OPart o_part) {
  constexpr int WARPS = NTHR / 32;
  const int split = blockIdx.y, nsplit = gridDim.y;
  for (int idx = threadIdx.x; idx < rows * D; idx += NTHR) {
    const int h = idx / D, d = idx % D;
    const int pi = pad(d);
    float M = -CUDART_INF_F;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) M = fmaxf(M, sm_m[w * hstride + h]);
    float L = 0.f, O = 0.f;
    if (M != -CUDART_INF_F) {
#pragma unroll
      for (int w = 0; w < WARPS; ++w) {
        const float mw = sm_m[w * hstride + h];
        const float f = mw == -CUDART_INF_F ? 0.f : exp2f(mw - M);
        L += sm_l[w * hstride + h] * f;
        O += o_part(w, h, pi) * f;
      }
    }
    const size_t orow = static_cast<size_t>(c.b) * a.Hq + c.hk * c.G + h;
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
  const KvCta cta = kv_cta(a, chunk);
  const int G = cta.G, t_begin = cta.t_begin, t_end = cta.t_end;

  // Q fragments (rows g, g + 8 = query heads hk*G + row when row < G) and row sums of Q
  const __half* qb = static_cast<const __half*>(a.q) + (static_cast<size_t>(cta.b) * a.Hq + cta.hk * G) * D;
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

  const KvRows kv = kv_rows<D>(a, cta);
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
      cp_async16(dst + 16 * q, kv.kc + off, ok);
      cp_async16(dst + R::KB + 16 * q, kv.vc + off, ok);
    }
    {
      const int tok = blk + (lane & 15);
      const bool ok = tok < t_end;
      const uint32_t* src = (lane < 16 ? kv.kp : kv.vp) + (ok ? tok : 0);
      cp_async4(dst + 2 * R::KB + 4 * lane, src, ok);
    }
  };

  float o[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m0 = -CUDART_INF_F, m1 = -CUDART_INF_F, l0 = 0.f, l1 = 0.f, cz[2] = {0.f, 0.f};

  ring_prime<RING>(nmy, load);
  for (int i = 0; i < nmy; ++i) {
    ring_advance<RING>(i, nmy, load);
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
    float p[2][4];
    online_softmax_block<NT>(s, m0, m1, l0, l1, o, p, cz, vcz);
    uint32_t pa[4];  // P' = p * s_v (fp16), FA2 C -> A register reuse
    pa[0] = h2u(__floats2half2_rn(p[0][0] * vsc[0][0], p[0][1] * vsc[0][1]));
    pa[1] = G8 ? 0u : h2u(__floats2half2_rn(p[0][2] * vsc[0][0], p[0][3] * vsc[0][1]));
    pa[2] = h2u(__floats2half2_rn(p[1][0] * vsc[1][0], p[1][1] * vsc[1][1]));
    pa[3] = G8 ? 0u : h2u(__floats2half2_rn(p[1][2] * vsc[1][0], p[1][3] * vsc[1][1]));

    // ---- O += P' x codes(V): tokens 2tig, 2tig+1 (b0) and 2tig+8, 2tig+9 (b1), dims g*CB + j
    uint32_t vw[4][VW];
    v_words<D>(sv, g, tig, vw);
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
  cz[0] += __shfl_xor_sync(0xffffffffu, cz[0], 1);
  cz[0] += __shfl_xor_sync(0xffffffffu, cz[0], 2);
  cz[1] += __shfl_xor_sync(0xffffffffu, cz[1], 1);
  cz[1] += __shfl_xor_sync(0xffffffffu, cz[1], 2);
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
    so[(warp * 16 + g) * RS + i0] = o[j][0] + cz[0];
    so[(warp * 16 + g) * RS + i1] = o[j][1] + cz[0];
    so[(warp * 16 + g + 8) * RS + i0] = o[j][2] + cz[1];
    so[(warp * 16 + g + 8) * RS + i1] = o[j][3] + cz[1];
  }
  __syncthreads();
  merge_warps_and_store<D, WARPS * 32>(
      a, cta, G < 16 ? G : 16, sm_m, sm_l, 16, [](int d) { return d + 4 * (d / CB); },
      [&](int w, int h, int pi) { return so[(w * 16 + h) * RS + pi]; });
}

// Shared-memory layout of the u kernel's final merge: the warps' partial softmax states (only the
// G <= 8 real heads) and their O^T rows, head rows padded so the fragment stores hit 32 banks.
template <int D>
struct TComb {
  static constexpr int CB = D / 8;           // dims per lane group g
  static constexpr int HS = D + D / CB + 4;  // padded head row: fragment stores hit 32 banks
  static __device__ __forceinline__ int pd(int d) { return d + d / CB; }
  static constexpr int bytes(int warps) { return (warps * 8 * HS + 3 * warps * 8) * 4; }
};

// ---- "u" kernel (G <= 8, the default): both products transposed, so that no MMA row is padding.
//  * S^T [16 tokens x 8 heads] = codes(K) [16 tokens x 16 dims] x Q^T per k-step: the K codes fill the
//    A operand (rows g, g + 8 = tokens, k = dims in the ring kernel's permutation), Q^T is the B
//    operand (head g = lane group g; heads >= G zero): 8 MMAs per 16 tokens at D=128, not 16.
//  * O^T [dims x 8 heads] += codes(V)^T [dims x 16 tokens] x P'^T [16 tokens x 8 heads]: the V codes
//    fill the A operand (rows g, g + 8 = two of the lane's dims, k = its tokens); P'^T's B fragments
//    are the two 8x8 halves of S^T's C fragment, transposed in registers by movmatrix. Half the PV
//    MMAs and accumulators of the ring kernel, so it fits 4 CTAs of 4 warps per SM and the 512
//    (batch, KV head) CTAs of B=64 x 8 KV heads run as one wave (the ring kernel: 3 CTAs, 1.29 waves).
//  * A lane's S^T columns (heads 2tig, 2tig+1) are its O^T columns: the softmax rescale needs no
//    shuffle, and each lane needs the scale/zero of two tokens (g, g + 8), not four.
//  * Codes -> fp16 in 2 instructions per half2: one lop3 (mask and magic 1024; the magic comes from a
//    kernel argument so that ptxas keeps it in a register and the lop3 stays one instruction) and
//    one hadd2 (-1024) for the low nibble or hfma2 (x/16 - 64) for the high nibble of a byte, with
//    one shift per 4 half2; all exact.
__device__ __forceinline__ uint32_t lop3_and_or(uint32_t x, uint32_t mask, uint32_t magic) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(x), "r"(mask), "r"(magic));  // (x & mask) | magic
  return r;
}
// word w (8 codes = dims 0..7 of the word) -> h[j] = half2(code j, code j + 4), j = 0..3
__device__ __forceinline__ void codes8(uint32_t w, uint32_t magic, uint32_t (&h)[4]) {
  const __half2 m1024 = u2h(0x64006400u), sixteenth = u2h(0x2C002C00u), m64 = u2h(0xD400D400u);  // 1024, 1/16, -64
  const uint32_t w8 = w >> 8;
  h[0] = h2u(__hsub2(u2h(lop3_and_or(w, 0x000F000Fu, magic)), m1024));
  h[1] = h2u(__hfma2(u2h(lop3_and_or(w, 0x00F000F0u, magic)), sixteenth, m64));
  h[2] = h2u(__hsub2(u2h(lop3_and_or(w8, 0x000F000Fu, magic)), m1024));
  h[3] = h2u(__hfma2(u2h(lop3_and_or(w8, 0x00F000F0u, magic)), sixteenth, m64));
}
__device__ __forceinline__ float ex2f(float x) {  // 2^x, flush to zero under 2^-126 (x <= 0 here)
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
  return r;
}
__device__ __forceinline__ uint32_t movtrans(uint32_t x) {
  uint32_t r;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(r) : "r"(x));
  return r;
}

template <int D, int WARPS, int RING>
__global__ void __launch_bounds__(WARPS * 32, 4)
    kv4_decode_u_kernel(const AttnArgs a, int chunk, float scale_log2, uint32_t magic) {
  constexpr int KSTEPS = D / 16, VW = D / 64, NM = D / 16, CB = D / 8, HS = TComb<D>::HS, KW = D / 32;
  using R = Ring<D>;
  extern __shared__ __align__(16) uint8_t smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, tig = lane & 3;
  const KvCta cta = kv_cta(a, chunk);
  const int G = cta.G, t_begin = cta.t_begin, t_end = cta.t_end;

  const KvRows kv = kv_rows<D>(a, cta);
  uint8_t* ring = smem + warp * RING * R::SLOT;
  const uint32_t ring_u = static_cast<uint32_t>(__cvta_generic_to_shared(ring));

  const int nblk = t_end > t_begin ? (t_end - t_begin + 15) / 16 : 0;
  const int nmy = nblk > warp ? (nblk - warp + WARPS - 1) / WARPS : 0;
  // a 16-token block's codes are 16 * D/2 contiguous bytes: lane l copies 16-byte chunks l + 32 it
  // (token 32 it / (D/32) + l / (D/32)) of K and of V, and lane l < 16 (>= 16) the K (V) params of
  // token l % 16; everything but the block offset is fixed per lane
  const uint8_t* kq = kv.kc + 16 * lane;
  const uint8_t* vq = kv.vc + 16 * lane;
  const uint32_t* pq = (lane < 16 ? kv.kp : kv.vp) + (lane & 15);
  const uint32_t dq = ring_u + 16 * lane;
  const int tq = lane / (D / 32);
  auto load = [&](int i, int slot) {
    const int blk = t_begin + 16 * (warp + WARPS * i);
    const uint32_t dst = dq + slot * R::SLOT;
    const size_t off = static_cast<size_t>(blk) * (D / 2);
#pragma unroll
    for (int it = 0; it < R::KB / 16 / 32; ++it) {
      const bool ok = blk + tq + it * (32 / (D / 32)) < t_end;
      const size_t o2 = off + 512 * it;
      cp_async16(dst + 512 * it, kq + o2, ok);  // src-size 0 when !ok: nothing is read (zero fill)
      cp_async16(dst + R::KB + 512 * it, vq + o2, ok);
    }
    {
      const bool ok = blk + (lane & 15) < t_end;
      cp_async4(dst - 12 * lane + 2 * R::KB, pq + blk, ok);
    }
  };
  ring_prime<RING>(nmy, load);

  // Q^T B fragments of head g (zero for g >= G) and the row sums of heads 2tig, 2tig + 1 (scaled)
  const __half* qb = static_cast<const __half*>(a.q) + (static_cast<size_t>(cta.b) * a.Hq + cta.hk * G) * D;
  uint32_t qf[KSTEPS][2];
  float qs = 0.f;
#pragma unroll
  for (int c = 0; c < KSTEPS; ++c) {
    const int base = tig * (D / 4) + 8 * (c >> 1), j0 = 2 * (c & 1);
    uint32_t lo = 0u, hi = 0u;
    if (g < G) {
      const __half* qr = qb + g * D + base;
      lo = h2u(__halves2half2(qr[j0], qr[j0 + 4]));
      hi = h2u(__halves2half2(qr[j0 + 1], qr[j0 + 5]));
      qs += __half2float(qr[j0]) + __half2float(qr[j0 + 4]) + __half2float(qr[j0 + 1]) + __half2float(qr[j0 + 5]);
    }
    qf[c][0] = lo;
    qf[c][1] = hi;
  }
  qs += __shfl_xor_sync(0xffffffffu, qs, 1);
  qs += __shfl_xor_sync(0xffffffffu, qs, 2);
  const float qsA = __shfl_sync(0xffffffffu, qs, 8 * tig) * scale_log2;
  const float qsB = __shfl_sync(0xffffffffu, qs, 8 * tig + 4) * scale_log2;

  float o[NM][4];
#pragma unroll
  for (int j = 0; j < NM; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  // heads 2tig (A) and 2tig + 1 (B): running max, and this lane's partial sums over its tokens
  float mA = -CUDART_INF_F, mB = -CUDART_INF_F, lA = 0.f, lB = 0.f, cA = 0.f, cB = 0.f;

  for (int i = 0; i < nmy; ++i) {
    ring_advance<RING>(i, nmy, load);
    const int blk = t_begin + 16 * (warp + WARPS * i);
    const uint8_t* sl = ring + (i % RING) * R::SLOT;
    const uint8_t* sk = sl;
    const uint8_t* sv = sl + R::KB;
    const uint32_t* spk = reinterpret_cast<const uint32_t*>(sl + 2 * R::KB);
    const uint32_t* spv = spk + 16;

    // ---- raw S^T: tokens g (s[0], s[1]) and g + 8 (s[2], s[3]) x heads 2tig, 2tig + 1
    uint32_t k0[KW], k1[KW];
    {
      const uint8_t* kr = sk + g * (D / 2) + tig * (D / 8);
      if constexpr (D == 128) {
        const uint4 u0 = *reinterpret_cast<const uint4*>(kr);
        const uint4 u1 = *reinterpret_cast<const uint4*>(kr + 8 * (D / 2));
        k0[0] = u0.x, k0[1] = u0.y, k0[2] = u0.z, k0[3] = u0.w;
        k1[0] = u1.x, k1[1] = u1.y, k1[2] = u1.z, k1[3] = u1.w;
      } else {
        const uint2 u0 = *reinterpret_cast<const uint2*>(kr);
        const uint2 u1 = *reinterpret_cast<const uint2*>(kr + 8 * (D / 2));
        k0[0] = u0.x, k0[1] = u0.y;
        k1[0] = u1.x, k1[1] = u1.y;
      }
    }
    float s[4] = {0.f, 0.f, 0.f, 0.f}, s2[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int wi = 0; wi < KW; ++wi) {  // word wi = k-steps 2wi (nibbles 0, 1) and 2wi + 1 (nibbles 2, 3)
      uint32_t h0[4], h1[4];
      codes8(k0[wi], magic, h0);
      codes8(k1[wi], magic, h1);
      const uint32_t a0[4] = {h0[0], h1[0], h0[1], h1[1]};
      const uint32_t a1[4] = {h0[2], h1[2], h0[3], h1[3]};
      mma16816(s, a0, qf[2 * wi][0], qf[2 * wi][1]);
      mma16816(s2, a1, qf[2 * wi + 1][0], qf[2 * wi + 1][1]);
    }
    // ---- scale/zero of tokens g, g + 8; mask; exp2 domain
    const uint32_t pk0 = spk[g], pk1 = spk[g + 8], pv0 = spv[g], pv1 = spv[g + 8];
    const bool ok0 = blk + g < t_end, ok1 = blk + g + 8 < t_end;
    {
      const float ks0 = __half2float(u2h(pk0).x) * scale_log2, kz0 = __half2float(neg_sz(pk0));
      const float ks1 = __half2float(u2h(pk1).x) * scale_log2, kz1 = __half2float(neg_sz(pk1));
      s[0] = ok0 ? fmaf(ks0, s[0] + s2[0], kz0 * qsA) : -CUDART_INF_F;
      s[1] = ok0 ? fmaf(ks0, s[1] + s2[1], kz0 * qsB) : -CUDART_INF_F;
      s[2] = ok1 ? fmaf(ks1, s[2] + s2[2], kz1 * qsA) : -CUDART_INF_F;
      s[3] = ok1 ? fmaf(ks1, s[3] + s2[3], kz1 * qsB) : -CUDART_INF_F;
    }
    float mxA = fmaxf(s[0], s[2]), mxB = fmaxf(s[1], s[3]);
#pragma unroll
    for (int o_ = 4; o_ < 32; o_ <<= 1) {
      mxA = fmaxf(mxA, __shfl_xor_sync(0xffffffffu, mxA, o_));
      mxB = fmaxf(mxB, __shfl_xor_sync(0xffffffffu, mxB, o_));
    }
    // every block holds a valid token (blk < t_end), so nA, nB are finite: ex2(-inf) = 0 at the start
    const float nA = fmaxf(mA, mxA), nB = fmaxf(mB, mxB);
    const float alA = ex2f(mA - nA), alB = ex2f(mB - nB);
    const float p0 = ex2f(s[0] - nA), p1 = ex2f(s[1] - nB), p2 = ex2f(s[2] - nA), p3 = ex2f(s[3] - nB);
    const float vs0 = __half2float(u2h(pv0).x), vz0 = __half2float(neg_sz(pv0));
    const float vs1 = __half2float(u2h(pv1).x), vz1 = __half2float(neg_sz(pv1));
    lA = fmaf(lA, alA, p0 + p2);
    lB = fmaf(lB, alB, p1 + p3);
    cA = fmaf(cA, alA, fmaf(p0, vz0, p2 * vz1));
    cB = fmaf(cB, alB, fmaf(p1, vz0, p3 * vz1));
    if (__any_sync(0xffffffffu, alA != 1.f || alB != 1.f)) {
#pragma unroll
      for (int j = 0; j < NM; ++j) {
        o[j][0] *= alA;
        o[j][1] *= alB;
        o[j][2] *= alA;
        o[j][3] *= alB;
      }
    }
    mA = nA;
    mB = nB;
    // P'^T B fragments: tokens 2tig, 2tig+1 (b0) and 2tig+8, 2tig+9 (b1) of head g
    const uint32_t pb0 = movtrans(h2u(__floats2half2_rn(p0 * vs0, p1 * vs0)));
    const uint32_t pb1 = movtrans(h2u(__floats2half2_rn(p2 * vs1, p3 * vs1)));

    // ---- O^T += codes(V)^T x P'^T (as the t kernel)
    uint32_t vw[4][VW];
    v_words<D>(sv, g, tig, vw);
#pragma unroll
    for (int u = 0; u < VW; ++u) {
      // x: tokens 2tig, 2tig+1 (dims 8u + 0..3 | 8u + 4..7 in x0 | x1); y: tokens 2tig+8, 2tig+9
      uint32_t hx0[4], hx1[4], hy0[4], hy1[4];
      codes8(__byte_perm(vw[0][u], vw[1][u], 0x5410), magic, hx0);  // (jj) -> code pairs of dim 8u + jj
      codes8(__byte_perm(vw[0][u], vw[1][u], 0x7632), magic, hx1);  //         dim 8u + 4 + jj
      codes8(__byte_perm(vw[2][u], vw[3][u], 0x5410), magic, hy0);
      codes8(__byte_perm(vw[2][u], vw[3][u], 0x7632), magic, hy1);
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        const uint32_t av[4] = {hx0[jj], hx1[jj], hy0[jj], hy1[jj]};
        mma16816(o[4 * u + jj], av, pb0, pb1);
      }
    }
  }
  cp_async_wait<0>();

  // ---- combine the warps (the ring's shared memory is reused)
#pragma unroll
  for (int o_ = 4; o_ < 32; o_ <<= 1) {
    lA += __shfl_xor_sync(0xffffffffu, lA, o_);
    lB += __shfl_xor_sync(0xffffffffu, lB, o_);
    cA += __shfl_xor_sync(0xffffffffu, cA, o_);
    cB += __shfl_xor_sync(0xffffffffu, cB, o_);
  }
  __syncthreads();
  float* so = reinterpret_cast<float*>(smem);  // [WARPS][8 heads][HS]
  float* sm_m = so + WARPS * 8 * HS;            // [WARPS][8]
  float* sm_l = sm_m + WARPS * 8;
  float* sm_c = sm_l + WARPS * 8;
  if (g == 0) {
    sm_m[warp * 8 + 2 * tig] = mA;
    sm_m[warp * 8 + 2 * tig + 1] = mB;
    sm_l[warp * 8 + 2 * tig] = lA;
    sm_l[warp * 8 + 2 * tig + 1] = lB;
    sm_c[warp * 8 + 2 * tig] = cA;
    sm_c[warp * 8 + 2 * tig + 1] = cB;
  }
  {
    float* r0 = so + (warp * 8 + 2 * tig) * HS;
    float* r1 = r0 + HS;
#pragma unroll
    for (int u = 0; u < VW; ++u)
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        const int d0 = TComb<D>::pd(g * CB + 8 * u + jj), d1 = d0 + 4;
        r0[d0] = o[4 * u + jj][0];
        r1[d0] = o[4 * u + jj][1];
        r0[d1] = o[4 * u + jj][2];
        r1[d1] = o[4 * u + jj][3];
      }
  }
  __syncthreads();
  merge_warps_and_store<D, WARPS * 32>(
      a, cta, G, sm_m, sm_l, 8, [](int d) { return TComb<D>::pd(d); },
      [&](int w, int h, int pi) { return so[(w * 8 + h) * HS + pi] + sm_c[w * 8 + h]; });
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

// Kernel choice (QTOOL_KV4_KERNEL, read per call so that one process can time them all): "u4" (the
// default) / "u5" / "u6": the u kernel with a 4-, 5- or 6-slot cp.async ring per warp; "ring": the
// cp.async-ring kernel. The u kernel takes G <= 8; larger groups (<= 16) run the ring kernel.
// Removed once superseded: an intermediate "t" kernel (only the PV product transposed; 40.4/66.7/119.3 µs)
// and "v1" (the first validated kernel: one block of register prefetch per warp, per-element dequant;
// 50.3/83.7/152.7 µs; last built at 0d6ad63).
// H100, B=64, 32/8 heads, D=128, ctx 1024/2048/4096 (µs, check_issue7.py): u4 34.4-36.9/57.1-57.6/105
// (five timings), u5 37.0/58.4/106.2, u6 37.8/59.7/109.2, ring 46.0/78.5/143.7; SDPA (fp16 cache) 94.5/180.6/353.
enum Kern { kBadKern, kRingK, kU4, kU5, kU6 };
Kern kernel_choice() {
  const char* v = std::getenv("QTOOL_KV4_KERNEL");
  if (!v || !v[0]) return kU4;
  const std::string k(v);
  if (k == "u4") return kU4;
  if (k == "u5") return kU5;
  if (k == "u6") return kU6;
  if (k == "ring") return kRingK;
  return kBadKern;
}

template <int D, int RING>
cudaError_t launch_u(const AttnArgs& a, dim3 grid, int chunk, float scale_log2, cudaStream_t st) {
  constexpr int ring = kWarps * RING * Ring<D>::SLOT;
  constexpr int comb = TComb<D>::bytes(kWarps);
  constexpr int smem = ring > comb ? ring : comb;
  static cudaError_t e0 = cudaFuncSetAttribute(kv4_decode_u_kernel<D, kWarps, RING>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e0 != cudaSuccess) return e0;
  kv4_decode_u_kernel<D, kWarps, RING><<<grid, kWarps * 32, smem, st>>>(a, chunk, scale_log2, 0x64006400u);
  return cudaGetLastError();
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
  Kern k = kernel_choice();
  if (k == kBadKern) return bad("QTOOL_KV4_KERNEL must be unset or one of u4, u5, u6, ring");
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
  if (k != kRingK && !g8) k = kRingK;
  cudaError_t e;
  if (k == kU4) {
    e = a.D == 64 ? launch_u<64, 4>(a, grid, chunk, scale_log2, stream) : launch_u<128, 4>(a, grid, chunk, scale_log2, stream);
  } else if (k == kU5) {
    e = a.D == 64 ? launch_u<64, 5>(a, grid, chunk, scale_log2, stream) : launch_u<128, 5>(a, grid, chunk, scale_log2, stream);
  } else if (k == kU6) {
    e = a.D == 64 ? launch_u<64, 6>(a, grid, chunk, scale_log2, stream) : launch_u<128, 6>(a, grid, chunk, scale_log2, stream);
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
