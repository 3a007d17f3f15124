// Config table, launch and heuristics (host side), templated on the element type.
#pragma once
#include "w4a16_api.h"
#include "w4a16_kernel.cuh"

namespace qtool_w4a16 {

// cfg: MT WM WN WK D STAGES MINB.  CTA tile = 16·MT·WM rows × 64·WN cols, 32·WK K per step.
#define QTOOL_W4A16_CONFIGS(X)              \
  X(0, 1, 1, 2, 4, 4, 4, 1) /* m16  c128 */ \
  X(1, 2, 1, 2, 4, 4, 4, 1) /* m32  c128 */ \
  X(2, 4, 1, 2, 2, 3, 4, 1) /* m64  c128 */ \
  X(3, 2, 2, 2, 2, 3, 4, 1) /* m64  c128 8w */ \
  X(4, 4, 2, 2, 1, 2, 4, 1) /* m128 c128 */ \
  X(5, 4, 2, 4, 1, 2, 4, 1) /* m128 c256 */ \
  X(6, 4, 4, 2, 1, 2, 4, 1) /* m256 c128 */ \
  X(7, 1, 1, 4, 2, 4, 4, 1) /* m16  c256 */

constexpr int kNumConfigs = 8;

template <typename T, int MT, int WM, int WN, int WK, int D, int STAGES, int MINB>
struct Cfg {
  using G = Geo<MT, WM, WN, WK>;
  static int smem(int split) { return smem_bytes<T, MT, WM, WN, WK, D, STAGES>(WK > 1 || split > 1); }
  static cudaError_t run(const Params& p, cudaStream_t stream) {
    auto kern = w4a16_quick_kernel<T, MT, WM, WN, WK, D, STAGES, MINB>;
    static bool attr_done = false;
    const int sm_max = smem_bytes<T, MT, WM, WN, WK, D, STAGES>(true);
    if (!attr_done) {
      cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, sm_max);
      if (e != cudaSuccess) return e;
      attr_done = true;
    }
    cudaLaunchConfig_t lc = {};
    lc.gridDim = dim3(p.split, p.N / G::COLS, (p.M + G::R - 1) / G::R);
    lc.blockDim = dim3(G::NT, 1, 1);
    lc.dynamicSmemBytes = smem(p.split);
    lc.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = p.split;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    lc.attrs = attr;
    lc.numAttrs = p.split > 1 ? 1 : 0;
    cudaError_t e = cudaLaunchKernelEx(&lc, kern, p);
    if (e != cudaSuccess) return e;
    return cudaGetLastError();
  }
  static int occupancy() {
    static int occ = -1;
    if (occ < 0) {
      auto kern = w4a16_quick_kernel<T, MT, WM, WN, WK, D, STAGES, MINB>;
      const int sm_max = smem_bytes<T, MT, WM, WN, WK, D, STAGES>(true);
      cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, sm_max);
      int b = 1;
      if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, kern, G::NT, smem(1)) != cudaSuccess || b < 1) b = 1;
      occ = b;
    }
    return occ;
  }
};

template <typename T>
inline cudaError_t run_cfg(int cfg, const Params& p, cudaStream_t stream) {
  switch (cfg) {
#define X(id, MT, WM, WN, WK, D, S, MB) \
  case id:                              \
    return Cfg<T, MT, WM, WN, WK, D, S, MB>::run(p, stream);
    QTOOL_W4A16_CONFIGS(X)
#undef X
  }
  return cudaErrorInvalidValue;
}

template <typename T>
inline int occupancy_cfg(int cfg) {
  switch (cfg) {
#define X(id, MT, WM, WN, WK, D, S, MB) \
  case id:                              \
    return Cfg<T, MT, WM, WN, WK, D, S, MB>::occupancy();
    QTOOL_W4A16_CONFIGS(X)
#undef X
  }
  return 1;
}

}  // namespace qtool_w4a16
