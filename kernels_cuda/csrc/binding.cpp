// Thin torch binding of the W4A16 QUICK kernels: schema (TORCH_LIBRARY) + CUDA impl.
// All device code lives in the .cu files, which include no torch headers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdio>

#include "w4a16_api.h"

namespace {

// Argument errors are formatted with snprintf and raised with a plain C string: on the GPU image
// (torch 2.11, gcc 13) a TORCH_CHECK whose message streams integers / IntArrayRef segfaulted
// instead of raising (docs/kernels-notes.md); plain-string messages raise cleanly.
#define QCHECK(cond, ...)                                  \
  do {                                                     \
    if (!(cond)) {                                         \
      char qcheck_buf_[320];                               \
      std::snprintf(qcheck_buf_, sizeof(qcheck_buf_), __VA_ARGS__); \
      TORCH_CHECK(false, static_cast<const char*>(qcheck_buf_)); \
    }                                                      \
  } while (0)

// Checks the arguments and computes into `out_opt` ([M, N], x's dtype, contiguous) or a new tensor.
at::Tensor w4a16_gemm_run(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                          const at::Tensor& qzeros, int64_t group_size, int64_t cfg, int64_t split,
                          const at::Tensor* out_opt) {
  QCHECK(x.is_cuda() && qweight.is_cuda() && scales.is_cuda() && qzeros.is_cuda(),
         "qtool_cuda::w4a16_gemm: all tensors must be on a CUDA device");
  QCHECK(x.device() == qweight.device() && x.device() == scales.device() && x.device() == qzeros.device(),
         "qtool_cuda::w4a16_gemm: all tensors must be on the same device");
  QCHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
         "qtool_cuda::w4a16_gemm: x must be float16 or bfloat16");
  QCHECK(qweight.scalar_type() == at::kInt && qzeros.scalar_type() == at::kInt,
         "qtool_cuda::w4a16_gemm: qweight and qzeros must be int32");
  QCHECK(scales.scalar_type() == at::kHalf, "qtool_cuda::w4a16_gemm: scales must be float16");
  QCHECK(x.dim() >= 1 && qweight.dim() == 2 && scales.dim() == 2 && qzeros.dim() == 2,
         "qtool_cuda::w4a16_gemm: x [..., K], qweight [K/4, N/2], scales [G, 2N], qzeros [G, N/4]");
  const int64_t K = x.size(-1);
  const int64_t N = qweight.size(1) * 2;
  QCHECK(qweight.size(0) * 4 == K, "qtool_cuda::w4a16_gemm: qweight.shape[0] * 4 = %lld != K = %lld",
         (long long)(qweight.size(0) * 4), (long long)K);
  QCHECK(group_size > 0 && K % group_size == 0, "qtool_cuda::w4a16_gemm: group_size %lld must divide K = %lld",
         (long long)group_size, (long long)K);
  const int64_t G = K / group_size;
  QCHECK(scales.size(0) == G && scales.size(1) == 2 * N, "qtool_cuda::w4a16_gemm: scales must be [%lld, %lld]",
         (long long)G, (long long)(2 * N));
  QCHECK(qzeros.size(0) == G && qzeros.size(1) * 4 == N, "qtool_cuda::w4a16_gemm: qzeros must be [%lld, %lld]",
         (long long)G, (long long)(N / 4));
  QCHECK(K < (1LL << 31) && N < (1LL << 31), "qtool_cuda::w4a16_gemm: K and N must fit in int32");

  auto x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  QCHECK(M < (1LL << 31), "qtool_cuda::w4a16_gemm: too many rows");
  auto qw = qweight.contiguous();
  auto sc = scales.contiguous();
  auto qz = qzeros.contiguous();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  out_shape.push_back(N);
  at::Tensor out;
  if (out_opt) {
    QCHECK(out_opt->is_contiguous() && out_opt->numel() == M * N && out_opt->scalar_type() == x.scalar_type() &&
               out_opt->device() == x.device(),
           "qtool_cuda::w4a16_gemm: out must be a contiguous [M, N] tensor of x's dtype on x's device");
    out = out_opt->view({M, N});
  } else {
    out = at::empty({M, N}, x2.options());
  }
  if (M > 0) {
    c10::cuda::CUDAGuard guard(x.device());
    const char* err = nullptr;
    const int dtype = x.scalar_type() == at::kBFloat16 ? qtool_w4a16::kBF16 : qtool_w4a16::kF16;
    const int rc = qtool_w4a16::launch(dtype, x2.data_ptr(), qw.data_ptr<int32_t>(), sc.data_ptr(),
                                       qz.data_ptr<int32_t>(), out.data_ptr(), (int)M, (int)N, (int)K,
                                       (int)group_size, (int)cfg, (int)split,
                                       c10::cuda::getCurrentCUDAStream().stream(), &err);
    QCHECK(rc != -1, "qtool_cuda::w4a16_gemm: %s", err ? err : "bad arguments");
    QCHECK(rc == 0, "qtool_cuda::w4a16_gemm: CUDA error %s", cudaGetErrorString((cudaError_t)rc));
  }
  return out.view(out_shape);
}

at::Tensor w4a16_gemm_impl(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const at::Tensor& qzeros, int64_t group_size, int64_t cfg, int64_t split) {
  return w4a16_gemm_run(x, qweight, scales, qzeros, group_size, cfg, split, nullptr);
}

void w4a16_gemm_out_impl(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                         const at::Tensor& qzeros, int64_t group_size, int64_t cfg, int64_t split,
                         const at::Tensor& out) {
  w4a16_gemm_run(x, qweight, scales, qzeros, group_size, cfg, split, &out);
}

at::Tensor w4a16_gemm_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const at::Tensor& qzeros, int64_t group_size) {
  return w4a16_gemm_impl(x, qweight, scales, qzeros, group_size, -1, 0);
}

std::vector<int64_t> w4a16_choose(int64_t M, int64_t N, int64_t K, int64_t group_size, int64_t bf16) {
  int cfg = 0, split = 1;
  qtool_w4a16::choose((int)M, (int)N, (int)K, (int)group_size, bf16 ? qtool_w4a16::kBF16 : qtool_w4a16::kF16,
                      &cfg, &split);
  return {cfg, split};
}

std::vector<int64_t> w4a16_config_info(int64_t cfg) {
  auto ci = qtool_w4a16::config_info((int)cfg);
  return {ci.rows, ci.cols, ci.wk, ci.threads, qtool_w4a16::num_configs(), ci.ring};
}

}  // namespace

TORCH_LIBRARY(qtool_cuda, m) {
  m.def("w4a16_gemm(Tensor x, Tensor qweight, Tensor scales, Tensor qzeros, int group_size) -> Tensor");
  // Same op with an explicit kernel config and split-K (cfg < 0 / split <= 0: automatic); for tuning.
  m.def(
      "w4a16_gemm_cfg(Tensor x, Tensor qweight, Tensor scales, Tensor qzeros, int group_size, int cfg, "
      "int split) -> Tensor");
  // Writes into a caller-provided [M, N] tensor (tests poison it first).
  m.def(
      "w4a16_gemm_cfg_out(Tensor x, Tensor qweight, Tensor scales, Tensor qzeros, int group_size, int cfg, "
      "int split, Tensor(a!) out) -> ()");
  // Host-only helpers (no tensors): the default (cfg, split) and a config's geometry.
  m.def("w4a16_choose(int M, int N, int K, int group_size, int bf16) -> int[]", &w4a16_choose);
  m.def("w4a16_config_info(int cfg) -> int[]", &w4a16_config_info);
}

TORCH_LIBRARY_IMPL(qtool_cuda, CUDA, m) {
  m.impl("w4a16_gemm", &w4a16_gemm_cuda);
  m.impl("w4a16_gemm_cfg", &w4a16_gemm_impl);
  m.impl("w4a16_gemm_cfg_out", &w4a16_gemm_out_impl);
}
