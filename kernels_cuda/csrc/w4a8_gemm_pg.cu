// W4A8 per-group (QServe layout, progressive int8 -> uint4) instantiations of the int8 GEMM engine.
#include "w8a8_gemm.cuh"

namespace qtool_i8 {
FmtOps fmt_ops_w4pg() { return {run_fmt<kW4PG>, occupancy_fmt<kW4PG>}; }
}  // namespace qtool_i8
