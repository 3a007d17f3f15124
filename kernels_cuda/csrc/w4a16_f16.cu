// Instantiations of the W4A16 QUICK kernels for __half (device code; no torch headers).
#include "w4a16_launch.cuh"

namespace qtool_w4a16 {
cudaError_t run_f16(int cfg, const Params& p, cudaStream_t stream) { return run_cfg<__half>(cfg, p, stream); }
int smem_f16(int cfg, int M, int K, int split) { return smem_cfg<__half>(cfg, M, K, split); }
int occupancy_f16(int cfg, int smem, int threads) { return occupancy_cfg<__half>(cfg, smem, threads); }
}  // namespace qtool_w4a16
