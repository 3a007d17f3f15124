// W4A8 per-group wgmma (sm_90a) instantiations; see w8a8_wgmma.cuh and w8a8_wgws.cuh.
#include "w8a8_wgws.cuh"

namespace qtool_i8 {
#if defined(QTOOL_HAS_SM90A)
FmtOps fmt_ops_wg_w4pg() { return {run_hopper<kW4PG>, occupancy_hopper<kW4PG>}; }
#else
static cudaError_t no_run(int, const GemmArgs&, int, cudaStream_t) { return cudaErrorNotSupported; }
static int no_occ(int) { return 0; }
FmtOps fmt_ops_wg_w4pg() { return {no_run, no_occ}; }
#endif
}  // namespace qtool_i8
