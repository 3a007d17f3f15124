// Config table and launch (host side), templated on the element type.
#pragma once
#include "w4a16_api.h"
#include "w4a16_kernel.cuh"
#include "w4a16_wgmma.cuh"
#include "w4a16_wgrs.cuh"

namespace qtool_w4a16 {

// Retired ids (refused; kept so that the measurements in docs/ keep their names): the per-k-tile decode kernels the
// group-chunk / transposed ones replaced, never a default since: the register ring w4a16_ring (c0 n2 k4 d4, c1 n4
// k2 d4, c2 n2 k2 d4, c3 n2 k4 d2, c12 n2 k2 d2) and the cp.async ring w4a16_aring (c13 n2 k4 s6, c14 n2 k4 s8,
// c15 n2 k2 s8, c16 n4 k2 s6); last built at 0d6ad63.
#define QTOOL_W4A16_RETIRED(X) X(0) X(1) X(2) X(3) X(12) X(13) X(14) X(15) X(16)
// Group-chunk (decode) configs: GDEC(id, WN, WK, U, D, MINB); CTA = 16 rows × 64·WN cols, WN·WK
// warps, chunks of U k-tiles (needs group % (32·U) == 0), D chunks in the register ring.
#define QTOOL_W4A16_GDEC(X) \
  X(17, 2, 2, 4, 2, 2)      \
  X(18, 2, 2, 2, 3, 2)      \
  X(19, 2, 2, 2, 2, 3)      \
  X(20, 1, 4, 4, 2, 2)      \
  X(21, 2, 2, 1, 4, 2)      \
  X(22, 2, 4, 2, 2, 2)
// Transposed decode configs (fp16 only): TDEC(id, WN, WK, U, D, MINB, MB); CTA = 8·MB tokens ×
// 64·WN cols, WN·WK warps, chunks of U k-tiles (group % (32·U) == 0), D chunks in the ring.
#define QTOOL_W4A16_TDEC(X) \
  X(23, 2, 2, 4, 2, 2, 1)   \
  X(24, 2, 2, 4, 2, 2, 2)   \
  X(25, 1, 4, 4, 2, 2, 1)   \
  X(26, 2, 4, 2, 2, 2, 1)   \
  X(27, 2, 2, 2, 2, 3, 1)   \
  X(28, 2, 2, 2, 3, 2, 1)   \
  X(29, 2, 2, 4, 3, 2, 1)   \
  X(30, 2, 4, 4, 2, 1, 2)   \
  X(31, 2, 4, 2, 2, 1, 2)   \
  X(32, 1, 4, 4, 2, 2, 2)   \
  X(33, 2, 2, 1, 4, 2, 1)
// wgmma configs (fp16, sm_90a build on Hopper; K % 64 == 0, group % 64 == 0): WG(id, NWG, BN, STAGES,
// MINB); CTA = 64·NWG rows × BN cols, NWG consumer warpgroups + 1 producer warpgroup.
#define QTOOL_W4A16_WG(X) \
  X(34, 2, 256, 3, 1)     \
  X(35, 2, 128, 4, 1)
// Register-A wgmma configs (fp16, sm_90a build on Hopper; K % 64 == 0, group % 64 == 0):
// WRS(id, NWG, BT, S, FB, MINB, CR); CTA = BT tokens × 64·NWG·FB features, NWG consumer warpgroups of
// FB 64-feature blocks each + 1 producer warpgroup, S-deep ring. More features per CTA (FB = 2)
// halves how often each activation tile is re-read from L2. CR: registers per consumer thread after
// the producer hands its spare ones over (setmaxnreg; 0 = no hand-over), for 2 × 128-token blocks.
// PDL: programmatic dependent launch compiled in (the M <= 256 defaults: 1-2.5 us per call on the H200;
// c41, the large-M default, measured 4-9 % slower with that code, even with PDL off, so it has none).
// MC: 2 = the activation tile is TMA-multicast to two CTAs of neighbouring feature blocks (c44-c47 are
// c43 / c41 / c37 / c42 with it; N / (64·NWG·FB) must be even); clusters are those pairs, and split-K
// goes through a global workspace (Params::ws / sem) instead of the cluster.
#define QTOOL_W4A16_WRS(X)          \
  X(36, 2, 128, 6, 1, 1, 0, 0, 1)   \
  X(37, 2, 64, 8, 1, 1, 0, 1, 1)    \
  X(38, 1, 128, 5, 1, 2, 0, 0, 1)   \
  X(39, 1, 256, 6, 1, 1, 0, 0, 1)   \
  X(40, 2, 128, 8, 1, 1, 0, 0, 1)   \
  X(41, 2, 128, 6, 2, 1, 216, 0, 1) \
  X(42, 2, 64, 8, 2, 1, 0, 1, 1)    \
  X(43, 1, 128, 6, 2, 1, 0, 1, 1)   \
  X(44, 1, 128, 6, 2, 1, 0, 1, 2)   \
  X(45, 2, 128, 6, 2, 1, 216, 0, 2) \
  X(46, 2, 64, 8, 1, 1, 0, 1, 2)    \
  X(47, 2, 64, 8, 2, 1, 0, 1, 2)
// Staged configs: STAGED(id, MT, WM, WN, WK, STAGES, MINB); CTA = 16·MT·WM rows × 64·WN cols.
#define QTOOL_W4A16_STAGED(X) \
  X(4, 1, 1, 2, 4, 4, 1)      \
  X(5, 2, 1, 2, 4, 4, 1)      \
  X(6, 4, 1, 2, 2, 4, 1)      \
  X(7, 2, 2, 2, 2, 4, 1)      \
  X(8, 4, 2, 2, 1, 4, 1)      \
  X(9, 4, 2, 4, 1, 4, 1)      \
  X(10, 4, 4, 2, 1, 4, 1)     \
  X(11, 4, 2, 2, 1, 6, 1)

constexpr int kNumConfigs = 48;
constexpr int kMaxSmem = 227 * 1024;

// One launch of `kern` (shared by every config struct): raise its dynamic shared-memory limit once
// (to attr_smem), refuse a too-large request, launch with the cluster (default: the split-K partners,
// split × 1) / PDL attributes; `extra` follows Params in the kernel's arguments.
template <typename Kern, typename... Extra>
inline cudaError_t launch_cfg(Kern kern, bool& attr_done, int attr_smem, const Params& p, dim3 grid, int threads,
                              int smem, cudaStream_t stream, dim3 cluster = dim3(0, 0, 0), const Extra&... extra) {
  if (!attr_done) {
    cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, attr_smem);
    if (e != cudaSuccess) return e;
    attr_done = true;
  }
  if (smem > attr_smem) return cudaErrorInvalidValue;
  cudaLaunchAttribute attr[2];
  const cudaLaunchConfig_t lc =
      qtool_pdl::launch_config(grid, threads, smem, stream, cluster.x ? cluster : dim3(p.split, 1, 1), p.pdl != 0, attr);
  cudaError_t e = cudaLaunchKernelEx(&lc, kern, p, extra...);
  return e != cudaSuccess ? e : cudaGetLastError();
}

template <typename T, int WN, int WK, int U, int D, int MINB>
struct GDecCfg {
  using G = Geo<1, 1, WN, WK>;
  static int smem(int M, int K, int split) {
    const int NC = K / (32 * U);
    const int nchunks = (NC + split - 1) / split;  // largest slice
    const int a = (M < 16 ? M : 16) * (gdec_kc<WK, U, D>(nchunks) + 8) * 2;
    const int r = (WK > 1 || split > 1) ? 16 * G::RS * 4 : 0;
    return a > r ? a : r;
  }
  static void* fn() { return (void*)w4a16_gdec<T, WN, WK, U, D, MINB>; }
  static cudaError_t run(const Params& p, cudaStream_t stream) {
    auto kern = w4a16_gdec<T, WN, WK, U, D, MINB>;
    static bool attr_done = false;
    const int sm = smem(p.M, p.K, p.split);
    return launch_cfg(kern, attr_done, kMaxSmem, p, dim3(p.split, p.N / G::COLS, (p.M + 15) / 16), G::NT, sm, stream);
  }
};

template <typename T, int WN, int WK, int U, int D, int MINB, int MB>
struct TDecCfg {
  static constexpr int R = 8 * MB, COLS = 64 * WN, NT = 32 * WN * WK;
  static int smem(int M, int K, int split) {
    const int NC = K / (32 * U);
    const int nchunks = (NC + split - 1) / split;  // largest slice
    const int a = (M < R ? M : R) * (gdec_kc<WK, U, D>(nchunks) + 8) * 2;
    const int r = R * (COLS + 8) * 4;
    return a > r ? a : r;
  }
  static void* fn() { return (void*)w4a16_tdec<WN, WK, U, D, MINB, MB>; }
  static cudaError_t run(const Params& p, cudaStream_t stream) {
    if (!Traits<T>::HI_IN_PLACE) return cudaErrorInvalidValue;  // fp16 only (host refuses earlier)
    auto kern = w4a16_tdec<WN, WK, U, D, MINB, MB>;
    static bool attr_done = false;
    const int sm = smem(p.M, p.K, p.split);
    return launch_cfg(kern, attr_done, kMaxSmem, p, dim3(p.split, p.N / COLS, (p.M + R - 1) / R), NT, sm, stream);
  }
};

template <typename T, int NWG, int BN, int STAGES, int MINB>
struct WgCfg {
  using C = WgGeo<NWG, BN, STAGES>;
  static int smem(int M, int K, int split) {
    (void)M;
    (void)K;
    (void)split;
    return C::SMEM;
  }
  static void* fn() { return (void*)w4a16_wgmma<NWG, BN, STAGES, MINB>; }
  static cudaError_t run(const Params& p, cudaStream_t stream) {
    if (!Traits<T>::HI_IN_PLACE || !kWgmmaCompiled) return cudaErrorInvalidValue;  // host refuses earlier
    auto kern = w4a16_wgmma<NWG, BN, STAGES, MINB>;
    static bool attr_done = false;
    return launch_cfg(kern, attr_done, C::SMEM, p, dim3(p.split, p.N / BN, (p.M + C::BM - 1) / C::BM), C::NT, C::SMEM, stream);
  }
};

template <typename T, int NWG, int BT, int S, int FB, int MINB, int CR, int PDL, int MC>
struct WrsCfg {
  using C = WrsGeo<NWG, BT, S, FB, CR, MC>;
  static int smem(int M, int K, int split) {
    (void)M;
    (void)K;
    (void)split;
    return C::SMEM;
  }
  static void* fn() { return (void*)w4a16_wgrs<NWG, BT, S, FB, MINB, CR, PDL, MC>; }
  static cudaError_t run(const Params& p, cudaStream_t stream) {
    if (!Traits<T>::HI_IN_PLACE || !kWgmmaCompiled) return cudaErrorInvalidValue;  // host refuses earlier
    if ((p.N / C::COLS) % MC != 0) return cudaErrorInvalidValue;  // host refuses earlier
    if (MC > 1 && p.split > 1 && (!p.ws || !p.sem)) return cudaErrorInvalidValue;  // split-K through memory
    auto kern = w4a16_wgrs<NWG, BT, S, FB, MINB, CR, PDL, MC>;
    static bool attr_done = false;
    CUtensorMap tmx = {};
    if (MC > 1 && !qtool_tma::encode_rows_sw128(&tmx, p.x, p.M, p.K, BT / MC)) return cudaErrorInvalidValue;
    // MC = 2: clusters are the multicast pair only (split-K goes through p.ws), else the split partners
    const dim3 cluster = MC > 1 ? dim3(1, MC, 1) : dim3(p.split, 1, 1);
    return launch_cfg(kern, attr_done, C::SMEM, p, dim3(p.split, p.N / C::COLS, (p.M + BT - 1) / BT), C::NT, C::SMEM,
                      stream, cluster, tmx);
  }
};

template <typename T, int MT, int WM, int WN, int WK, int STAGES, int MINB>
struct StagedCfg {
  using G = Geo<MT, WM, WN, WK>;
  static int smem(int M, int K, int split) {
    (void)M;
    (void)K;
    return staged_smem<T, MT, WM, WN, WK, STAGES>(WK > 1 || split > 1);
  }
  static void* fn() { return (void*)w4a16_staged<T, MT, WM, WN, WK, STAGES, MINB>; }
  static cudaError_t run(const Params& p, cudaStream_t stream) {
    auto kern = w4a16_staged<T, MT, WM, WN, WK, STAGES, MINB>;
    static bool attr_done = false;
    return launch_cfg(kern, attr_done, staged_smem<T, MT, WM, WN, WK, STAGES>(true), p,
                      dim3(p.split, p.N / G::COLS, (p.M + G::R - 1) / G::R), G::NT, smem(p.M, p.K, p.split), stream);
  }
};

// Calls visit(Cfg{}) with the config struct of id `cfg` (GDecCfg<T, ...>, StagedCfg<T, ...>, ...); false for an
// unknown or retired id. The one switch over the config table: launching, shared-memory sizes and occupancy go through it.
template <typename T, typename Visit>
inline bool visit_cfg(int cfg, Visit&& visit) {
  switch (cfg) {
#define X(id, ...) \
  case id:         \
    visit(GDecCfg<T, __VA_ARGS__>{}); \
    return true;
    QTOOL_W4A16_GDEC(X)
#undef X
#define X(id, ...) \
  case id:         \
    visit(TDecCfg<T, __VA_ARGS__>{}); \
    return true;
    QTOOL_W4A16_TDEC(X)
#undef X
#define X(id, ...) \
  case id:         \
    visit(WgCfg<T, __VA_ARGS__>{}); \
    return true;
    QTOOL_W4A16_WG(X)
#undef X
#define X(id, ...) \
  case id:         \
    visit(WrsCfg<T, __VA_ARGS__>{}); \
    return true;
    QTOOL_W4A16_WRS(X)
#undef X
#define X(id, ...) \
  case id:         \
    visit(StagedCfg<T, __VA_ARGS__>{}); \
    return true;
    QTOOL_W4A16_STAGED(X)
#undef X
  }
  return false;
}

template <typename T>
inline cudaError_t run_cfg(int cfg, const Params& p, cudaStream_t stream) {
  cudaError_t e = cudaErrorInvalidValue;
  visit_cfg<T>(cfg, [&](auto c) { e = decltype(c)::run(p, stream); });
  return e;
}

// Dynamic shared memory of config `cfg` for this K and split (bytes).
template <typename T>
inline int smem_cfg(int cfg, int M, int K, int split) {
  int b = 0;
  visit_cfg<T>(cfg, [&](auto c) { b = decltype(c)::smem(M, K, split); });
  return b;
}

// Resident CTAs per SM for this config at this shared-memory size.
template <typename T>
inline int occupancy_cfg(int cfg, int smem, int threads) {
  void* f = nullptr;
  visit_cfg<T>(cfg, [&](auto c) { f = decltype(c)::fn(); });
  if (!f) return 1;
  cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxSmem);
  int b = 1;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, f, threads, smem) != cudaSuccess || b < 1) b = 1;
  return b;
}

}  // namespace qtool_w4a16
