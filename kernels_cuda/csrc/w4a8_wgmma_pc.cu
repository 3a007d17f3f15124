// W4A8 per-channel wgmma (sm_90a) instantiations; see w8a8_wgmma.cuh and w8a8_wgws.cuh.
#include "w8a8_wgws.cuh"

namespace qtool_i8 {
#if defined(QTOOL_HAS_SM90A)
FmtOps fmt_ops_wg_w4pc() { return {run_hopper<kW4PC>, occupancy_hopper<kW4PC>}; }
#else
static cudaError_t no_run(int, const GemmArgs&, int, cudaStream_t) { return cudaErrorNotSupported; }
static int no_occ(int) { return 0; }
FmtOps fmt_ops_wg_w4pc() { return {no_run, no_occ}; }
#endif
}  // namespace qtool_i8
