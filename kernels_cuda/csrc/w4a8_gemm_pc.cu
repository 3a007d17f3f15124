// W4A8 per-channel (QServe layout) instantiations of the int8 GEMM engine.
#include "w8a8_gemm.cuh"

namespace qtool_i8 {
FmtOps fmt_ops_w4pc() { return {run_fmt<kW4PC>, occupancy_fmt<kW4PC>}; }
}  // namespace qtool_i8
