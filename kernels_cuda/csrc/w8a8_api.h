// Host interface of the int8 tensor-core GEMMs (W8A8 and W4A8 on the QServe layout): plain C++,
// no torch headers. One engine serves three weight formats:
//   kW8   int8 W [N, K] row-major (compressed-tensors / QServe W8A8), per-channel w_scale;
//   kW4PC QServe W4A8 per-channel: uint4 codes in the compute-aware byte order, s1, s1_szeros;
//   kW4PG QServe W4A8 per-group: uint4 codes, s1, int8 s2_scales / s2_zeros [G, N] (permuted cols).
// Activations are int8 [M, K] row-major with a per-token (or one per-tensor) scale.
#pragma once
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

namespace qtool_i8 {

enum WFmt { kW8 = 0, kW4PC = 1, kW4PG = 2 };
enum DTag { kF16 = 0, kBF16 = 1, kF32 = 2 };  // dtype of a float vector / the output

struct GemmArgs {
  const int8_t* A = nullptr;  // [M, K]
  const void* B = nullptr;    // kW8: int8 [N, K]; kW4*: qweight bytes (32x32 tiles, 512 B each)
  const int8_t* s2 = nullptr; // kW4PG: [G, N]
  const int8_t* z2 = nullptr; // kW4PG: [G, N] (s2_zeros = -zs)
  const void* sx = nullptr;   // [M] (or 1 element when sx_bcast)
  int sx_dt = kF32, sx_bcast = 0;
  const void* sw = nullptr;   // [N]: kW8 w_scale, kW4* s1_scales
  int sw_dt = kF32;
  const void* sz = nullptr;   // [N]: kW4PC s1_szeros
  int sz_dt = kF16;
  const void* xsum = nullptr; // [M]: kW4PC per-token sum of the dequantized activations
  int xsum_dt = kF32;
  const void* bias = nullptr; // [N] or null
  int bias_dt = kF16;
  void* out = nullptr;        // [M, N]
  int out_dt = kF16;
  int M = 0, N = 0, K = 0, group = 0;
  int pdl = 0;                // set by launch(): programmatic dependent launch of the decode kernels
                              // (0 off, 1 on, 2 on + first weight copies before the wait)
  int8_t* ws = nullptr;       // scratch of workspace_bytes() (the int8 weights of the dequantizing config)
  // (last, so that the fields above keep their offsets in the kernels' parameter space)
  // kW4PG, optional: the same per-group scales packed tile-major for the decode kernels with one group per 128-k
  // chunk (group 128 · 2^j), 48 bytes per 32-column tile and group ([N / 32][G][48], 16-byte aligned): the tile's
  // 32 s2_zeros bytes, then (s2 - 1) as nibbles, two columns per byte (byte 2i + b of the 16: the columns 4i + b
  // (low nibble) and 4i + b + 2 (high), in the kernel's column order). Needs 1 <= s2 <= 16. 48 bytes where the
  // [G, N] rows take 64: 0.8 % fewer bytes per call. Null: those kernels read s2 / z2.
  const uint8_t* pgs = nullptr;
};

// The dequantizing config: W4A8 per-group as "W8 = q4·s2 + s2_zeros into scratch memory, then the W8A8
// GEMM" (the same int32 sums and epilogue acc·s_x·s1, so the same bits as the fused kernels). Its split
// is the split of that W8A8 GEMM.
constexpr int kDequantCfg = 20;
// The peer-dequantizing config (sm_90a): one launch of the W8A8 GEMM whose CTAs dequantize their shared weight
// column into the scratch together, a few k-tiles ahead of their own main loop (w4a8_peer_pg.cu). Same bits as
// kDequantCfg; between 4 and 64 row tiles of 128 tokens (385 <= M <= 8192), else it runs kDequantCfg.
constexpr int kPeerCfg = 25;

constexpr int kRetired = 6;  // CfgInfo::kind of a retired config id
struct CfgInfo {
  const char* name;
  int kind;     // 0: decode (warp-private cp.async ring, one 32-column tile per CTA), 1: tiled mma.sync, 2: wgmma,
                // 3: warp-specialised wgmma (weights as the A operand), 4: W4 per-group through int8 weights
                // (c20 / c25), 5: W8 wgmma on TMA-multicast tiles (c26), 6 (kRetired): a retired experiment, refused
  int bm, bn;   // CTA tile (rows of x / output features)
  int threads;
  int w4;       // 1: runs the W4A8 formats too
};

int num_configs();
CfgInfo config_info(int cfg);
// Whether `cfg` can run format `fmt` on this GPU / build (e.g. c12 is W8-only; the 16-warp decode c18 / c19 are
// W4-only: a W8 ring of 16 warps does not fit in shared memory).
bool config_supports(int cfg, int fmt);

// Default (cfg, split) for a problem on the current GPU.
void choose(int fmt, int M, int N, int K, int* cfg, int* split);

// Bytes of scratch memory (GemmArgs::ws) config `cfg` needs: N·K for kDequantCfg, N·K + a small header for
// kPeerCfg, else 0.
size_t workspace_bytes(int fmt, int cfg, int N, int K);

// W8[n, k] = q4·s2 + s2_zeros (int8, row-major [N, K]) from the QServe per-group tensors; the first
// kernel of kDequantCfg. Returns 0, a cudaError_t value, or -1 (bad argument, message in *err).
int dequantize_w4pg(const void* qweight, const int8_t* s2, const int8_t* z2, int N, int K, int group, int8_t* w8,
                    cudaStream_t stream, const char** err);
// W8[n, k] = q4 (0..15) from the QServe per-channel qweight: the first kernel of kDequantCfg for per-channel W4A8.
int dequantize_w4pc(const void* qweight, int N, int K, int8_t* w8, cudaStream_t stream, const char** err);

// Validate and launch on `stream`; cfg < 0 / split <= 0 mean "choose". Returns 0, a cudaError_t
// value, or -1 (bad argument, message in *err).
int launch(int fmt, const GemmArgs& p, int cfg, int split, cudaStream_t stream, const char** err);

}  // namespace qtool_i8
