// Host interface of the KV4 cache kernels (no torch headers).
//
// Cache layout (qtool "kv4 paged-free" layout, one sequence per batch row):
//   codes  uint8 [B, Hkv, S, D/2]  byte j of a token holds code 2j (low nibble) and 2j+1 (high nibble)
//   params fp16  [B, Hkv, S, 2]    (scale, zero) of the token, exactly as kv4_quantize makes them
//   dequantized value = fp16(q * scale + fp16(-scale * zero))      (QServe's fp16 fma)
// Decode attention: q [B, Hq, D] fp16, Hq = G * Hkv (GQA, query head h uses KV head h / G),
// context_lens int32 [B] (tokens 0..ctx-1 of row b are valid), out [B, Hq, D] fp16.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace qtool_kv4 {

enum DTag { kF16 = 0, kBF16 = 1, kF32 = 2 };

// Quantize rows of D values. mode 0: codes [rows, D] (one per byte), scale [rows], zero [rows] (fp16).
// mode 1 (write): x [B, H, D] -> codes/params of slot pos[b] in a [B, H, S, ...] cache.
int quantize(int dt, const void* x, int rows, int D, uint8_t* codes, void* scale, void* zero, int mode, int H, int S,
             const int* pos, cudaStream_t stream, const char** err);

struct AttnArgs {
  const void* q = nullptr;       // [B, Hq, D] fp16
  const uint8_t* kc = nullptr;   // [B, Hkv, S, D/2]
  const void* kp = nullptr;      // [B, Hkv, S, 2] fp16
  const uint8_t* vc = nullptr;
  const void* vp = nullptr;
  const int* ctx = nullptr;      // [B]
  void* out = nullptr;           // [B, Hq, D] fp16
  float* work = nullptr;         // split > 1: [B * Hq, split, D + 2] fp32
  int B = 0, Hq = 0, Hkv = 0, S = 0, D = 0;
  float sm_scale = 0.f;
};

// Splits (CTAs per (b, kv head) along the context) the kernel would pick; 1 means no workspace.
int choose_split(int B, int Hkv, int S, int D);
int decode_attention(const AttnArgs& a, int split, cudaStream_t stream, const char** err);

}  // namespace qtool_kv4
