// Thin torch binding of the W4A16 QUICK kernels: schema (TORCH_LIBRARY) + CUDA impl.
// All device code lives in the .cu files, which include no torch headers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdio>
#include <map>
#include <mutex>
#include <utility>

#include "act_quant_api.h"
#include "kv4_api.h"
#include "w4a16_api.h"
#include "w8a8_api.h"

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

// Tile counters for split-K through global memory. Every launch leaves its counters zero again, so an
// array is cleared only when it is made:
// - eager launches: one zeroed int32 array per (device, stream), kept for the process (never freed:
//   launches in flight point into it) and grown as needed; launches on one stream never overlap, and
//   launches on two streams at once use their own arrays;
// - under CUDA graph capture: one array per capture, made (from the graph's memory pool, cleared by a
//   memset node) at the capture's first call that needs it and shared by its later calls, which run in
//   order; it belongs to that graph, so a replay never shares counters with eager launches or other graphs.
at::Tensor split_counters(cudaStream_t stream, int n, const at::TensorOptions& opts) {
  struct Counters {
    at::Tensor eager, captured;
    unsigned long long capture = 0;  // id of the capture that made `captured`
  };
  static std::mutex mu;
  static auto* arrays = new std::map<std::pair<int, cudaStream_t>, Counters>();
  std::lock_guard<std::mutex> lock(mu);
  Counters& c = (*arrays)[{opts.device().index(), stream}];
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  unsigned long long capture = 0;
  QCHECK(cudaStreamGetCaptureInfo(stream, &status, &capture) == cudaSuccess,
         "qtool_cuda::w4a16_gemm: cudaStreamGetCaptureInfo failed");
  if (status != cudaStreamCaptureStatusNone) {
    if (!c.captured.defined() || c.capture != capture || c.captured.numel() < n) {
      c.captured = at::zeros({n}, opts);  // the previous capture's array goes back to its graph's pool
      c.capture = capture;
    }
    return c.captured;
  }
  if (!c.eager.defined() || c.eager.numel() < n) c.eager = at::zeros({std::max(n, 4096)}, opts);  // on `stream`
  return c.eager;
}

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
    // split-K through global memory (multicast configs): partial tiles from the caching allocator (stream-
    // ordered; a CUDA graph's pool under capture), tile counters from the stream's zeroed array
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    const auto need = qtool_w4a16::workspace_need(dtype, (int)M, (int)N, (int)K, (int)group_size, (int)cfg, (int)split);
    at::Tensor ws, counters;
    if (need.bytes) {
      ws = at::empty({(int64_t)need.bytes}, x2.options().dtype(at::kByte));
      counters = split_counters(stream, need.counters, x2.options().dtype(at::kInt));
    }
    const int rc = qtool_w4a16::launch(dtype, x2.data_ptr(), qw.data_ptr<int32_t>(), sc.data_ptr(),
                                       qz.data_ptr<int32_t>(), out.data_ptr(), (int)M, (int)N, (int)K,
                                       (int)group_size, (int)cfg, (int)split, need.bytes ? ws.data_ptr() : nullptr,
                                       need.bytes ? counters.data_ptr<int>() : nullptr, stream, &err);
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

bool w4a16_config_fits(int64_t cfg, int64_t M, int64_t N, int64_t K, int64_t group_size, int64_t bf16,
                       int64_t split) {
  return qtool_w4a16::config_fits((int)cfg, bf16 ? qtool_w4a16::kBF16 : qtool_w4a16::kF16, (int)M, (int)N, (int)K,
                                  (int)group_size, (int)split);
}

std::vector<int64_t> w4a16_config_info(int64_t cfg) {
  auto ci = qtool_w4a16::config_info((int)cfg);
  return {ci.rows, ci.cols, ci.wk, ci.threads, qtool_w4a16::num_configs(), ci.ring, ci.kunit, ci.avail, ci.pdl, ci.mc};
}


// ------------------------------------------------------------------------------------------------
// int8 activation quantizers, W8A8 / W4A8 GEMMs, KV4 cache kernels (issue 7)
// ------------------------------------------------------------------------------------------------

int ftag(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return 0;
    case at::kBFloat16:
      return 1;
    case at::kFloat:
      return 2;
    default:
      return -1;
  }
}

// A [n]-element float vector the kernels can read (fp16/bf16/fp32, contiguous), on `dev`.
at::Tensor fvec(const at::Tensor& t, int64_t n, const char* what, const at::Device& dev) {
  QCHECK(t.numel() == n, "qtool_cuda: %s has %lld elements, expected %lld", what, (long long)t.numel(), (long long)n);
  QCHECK(t.device() == dev, "qtool_cuda: %s must be on the same device as the activations", what);
  at::Tensor v = t.reshape({n});
  if (ftag(v) < 0) v = v.to(at::kFloat);
  return v.contiguous();
}

void check_rc(int rc, const char* op, const char* err) {
  QCHECK(rc != -1, "qtool_cuda::%s: %s", op, err ? err : "bad arguments");
  QCHECK(rc == 0, "qtool_cuda::%s: CUDA error %s", op, cudaGetErrorString((cudaError_t)rc));
}

// x [..., K] -> q [..., K] int8, scale [..., 1] fp32, sum [..., 1] fp32 (when want_sum).
void act_quant_run(const at::Tensor& x, const c10::optional<at::Tensor>& weight, double eps, const at::Tensor& q,
                   const at::Tensor& scale, const at::Tensor& sum, bool want_sum) {
  QCHECK(x.is_cuda(), "qtool_cuda::quantize_per_token: x must be a CUDA tensor");
  QCHECK(ftag(x) >= 0, "qtool_cuda::quantize_per_token: x must be float16, bfloat16 or float32");
  QCHECK(x.dim() >= 1 && x.size(-1) > 0, "qtool_cuda::quantize_per_token: x must be [..., K] with K > 0");
  const int64_t K = x.size(-1);
  auto x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  QCHECK(M < (1LL << 31) && K < (1LL << 31), "qtool_cuda::quantize_per_token: too large");
  QCHECK(q.is_contiguous() && q.numel() == M * K && q.scalar_type() == at::kChar && q.device() == x.device(),
         "qtool_cuda::quantize_per_token: q must be a contiguous int8 tensor of x's size on x's device");
  QCHECK(scale.is_contiguous() && scale.numel() == M && scale.scalar_type() == at::kFloat && scale.device() == x.device(),
         "qtool_cuda::quantize_per_token: scale must be a contiguous float32 tensor with one element per row");
  if (want_sum)
    QCHECK(sum.is_contiguous() && sum.numel() == M && sum.scalar_type() == at::kFloat && sum.device() == x.device(),
           "qtool_cuda::quantize_per_token: sum must be a contiguous float32 tensor with one element per row");
  at::Tensor w;
  if (weight.has_value()) {
    QCHECK(weight->numel() == K && weight->device() == x.device(),
           "qtool_cuda::rmsnorm_quantize: weight must have K elements on x's device");
    w = weight->reshape({K}).to(x.scalar_type()).contiguous();
  }
  if (M == 0) return;
  c10::cuda::CUDAGuard guard(x.device());
  const char* err = nullptr;
  const int rc = qtool_aq::per_token(ftag(x2), x2.data_ptr(), w.defined() ? w.data_ptr() : nullptr, (float)eps,
                                     q.data_ptr<int8_t>(), scale.data_ptr<float>(),
                                     want_sum ? sum.data_ptr<float>() : nullptr, (int)M, (int)K,
                                     c10::cuda::getCurrentCUDAStream().stream(), &err);
  check_rc(rc, "quantize_per_token", err);
}

std::vector<int64_t> lead_shape(const at::Tensor& x, int64_t last) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end() - 1);
  s.push_back(last);
  return s;
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cuda(const at::Tensor& x) {
  auto q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  auto s = at::empty(lead_shape(x, 1), x.options().dtype(at::kFloat));
  act_quant_run(x, c10::nullopt, 0.0, q, s, s, false);
  return {q, s};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_per_token_sum_cuda(const at::Tensor& x) {
  auto q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  auto s = at::empty(lead_shape(x, 1), x.options().dtype(at::kFloat));
  auto sm = at::empty(lead_shape(x, 1), x.options().dtype(at::kFloat));
  act_quant_run(x, c10::nullopt, 0.0, q, s, sm, true);
  return {q, s, sm};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rmsnorm_quantize_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                                     double eps) {
  auto q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  auto s = at::empty(lead_shape(x, 1), x.options().dtype(at::kFloat));
  auto sm = at::empty(lead_shape(x, 1), x.options().dtype(at::kFloat));
  act_quant_run(x, weight, eps, q, s, sm, true);
  return {q, s, sm};
}

void act_quant_out_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& weight, double eps, const at::Tensor& q,
                        const at::Tensor& scale, const at::Tensor& sum, bool want_sum) {
  act_quant_run(x, weight, eps, q, scale, sum, want_sum);
}

at::Tensor quantize_per_tensor_cuda(const at::Tensor& x, const at::Tensor& scale) {
  QCHECK(x.is_cuda() && ftag(x) >= 0, "qtool_cuda::quantize_per_tensor: x must be a float16/bfloat16/float32 CUDA tensor");
  QCHECK(scale.numel() == 1 && scale.device() == x.device(),
         "qtool_cuda::quantize_per_tensor: scale must be one element on x's device");
  auto xc = x.contiguous();
  auto s = scale.reshape({1}).to(at::kFloat).contiguous();
  auto q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  if (x.numel() == 0) return q;
  c10::cuda::CUDAGuard guard(x.device());
  const char* err = nullptr;
  const int rc = qtool_aq::per_tensor(ftag(xc), xc.data_ptr(), s.data_ptr<float>(), q.data_ptr<int8_t>(),
                                      (size_t)xc.numel(), c10::cuda::getCurrentCUDAStream().stream(), &err);
  check_rc(rc, "quantize_per_tensor", err);
  return q;
}

int out_tag(at::ScalarType t) {
  if (t == at::kHalf) return qtool_i8::kF16;
  if (t == at::kBFloat16) return qtool_i8::kBF16;
  if (t == at::kFloat) return qtool_i8::kF32;
  return -1;
}

void i8_run(int fmt, qtool_i8::GemmArgs& p, int64_t cfg, int64_t split, const char* op) {
  if (p.M == 0) return;
  const char* err = nullptr;
  const int rc = qtool_i8::launch(fmt, p, (int)cfg, (int)split, c10::cuda::getCurrentCUDAStream().stream(), &err);
  check_rc(rc, op, err);
}

void w8a8_run(const at::Tensor& xq, const at::Tensor& x_scale, const at::Tensor& w, const at::Tensor& w_scale,
              const c10::optional<at::Tensor>& bias, const at::Tensor& out, int64_t cfg, int64_t split) {
  QCHECK(xq.is_cuda() && w.is_cuda() && xq.device() == w.device(), "qtool_cuda::w8a8_gemm: xq and w must be on one CUDA device");
  QCHECK(xq.scalar_type() == at::kChar && w.scalar_type() == at::kChar, "qtool_cuda::w8a8_gemm: xq and w must be int8");
  QCHECK(xq.dim() == 2 && w.dim() == 2 && xq.size(1) == w.size(1), "qtool_cuda::w8a8_gemm: xq [M, K], w [N, K]");
  const int64_t M = xq.size(0), K = xq.size(1), N = w.size(0);
  QCHECK(M < (1LL << 31) && N < (1LL << 31) && K < (1LL << 31), "qtool_cuda::w8a8_gemm: too large");
  QCHECK(x_scale.numel() == 1 || x_scale.numel() == M, "qtool_cuda::w8a8_gemm: x_scale needs 1 or M elements");
  QCHECK(out.is_contiguous() && out.numel() == M * N && out_tag(out.scalar_type()) >= 0 && out.device() == xq.device(),
         "qtool_cuda::w8a8_gemm: out must be a contiguous [M, N] float16/bfloat16/float32 tensor on xq's device");
  c10::cuda::CUDAGuard guard(xq.device());
  auto A = xq.contiguous();
  auto B = w.contiguous();
  auto sx = fvec(x_scale, x_scale.numel(), "x_scale", xq.device());
  auto sw = fvec(w_scale, N, "w_scale", xq.device());
  at::Tensor bs;
  if (bias.has_value()) bs = fvec(*bias, N, "bias", xq.device());
  qtool_i8::GemmArgs p;
  p.A = A.data_ptr<int8_t>();
  p.B = B.data_ptr<int8_t>();
  p.sx = sx.data_ptr();
  p.sx_dt = ftag(sx);
  p.sx_bcast = sx.numel() == 1 ? 1 : 0;
  p.sw = sw.data_ptr();
  p.sw_dt = ftag(sw);
  if (bs.defined()) {
    p.bias = bs.data_ptr();
    p.bias_dt = ftag(bs);
  }
  p.out = out.data_ptr();
  p.out_dt = out_tag(out.scalar_type());
  p.M = (int)M;
  p.N = (int)N;
  p.K = (int)K;
  i8_run(qtool_i8::kW8, p, cfg, split, "w8a8_gemm");
}

at::Tensor w8a8_gemm_cuda(const at::Tensor& xq, const at::Tensor& x_scale, const at::Tensor& w, const at::Tensor& w_scale,
                          const c10::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  QCHECK(out_tag(out_dtype) >= 0, "qtool_cuda::w8a8_gemm: out_dtype must be float16, bfloat16 or float32");
  QCHECK(xq.dim() == 2 && w.dim() == 2, "qtool_cuda::w8a8_gemm: xq [M, K], w [N, K]");
  auto out = at::empty({xq.size(0), w.size(0)}, xq.options().dtype(out_dtype));
  w8a8_run(xq, x_scale, w, w_scale, bias, out, -1, 0);
  return out;
}

void w8a8_gemm_out_cuda(const at::Tensor& xq, const at::Tensor& x_scale, const at::Tensor& w, const at::Tensor& w_scale,
                        const c10::optional<at::Tensor>& bias, int64_t cfg, int64_t split, const at::Tensor& out) {
  w8a8_run(xq, x_scale, w, w_scale, bias, out, cfg, split);
}

void w4a8_run(const at::Tensor& xq, const at::Tensor& x_scale, const c10::optional<at::Tensor>& x_sum,
              const at::Tensor& qweight, const at::Tensor& s1_scales, const c10::optional<at::Tensor>& s1_szeros,
              const c10::optional<at::Tensor>& s2_scales, const c10::optional<at::Tensor>& s2_zeros, int64_t group_size,
              const c10::optional<at::Tensor>& bias, const at::Tensor& out, int64_t cfg, int64_t split,
              const c10::optional<at::Tensor>& s2_tiles) {
  QCHECK(xq.is_cuda() && qweight.is_cuda() && xq.device() == qweight.device(),
         "qtool_cuda::w4a8_gemm: xq and qweight must be on one CUDA device");
  QCHECK(xq.scalar_type() == at::kChar, "qtool_cuda::w4a8_gemm: xq must be int8");
  QCHECK(qweight.scalar_type() == at::kChar || qweight.scalar_type() == at::kByte,
         "qtool_cuda::w4a8_gemm: qweight must be int8 (uint4 pairs)");
  QCHECK(xq.dim() == 2 && qweight.dim() == 2, "qtool_cuda::w4a8_gemm: xq [M, K], qweight [N, K/2]");
  const int64_t M = xq.size(0), K = xq.size(1), N = qweight.size(0);
  QCHECK(qweight.size(1) * 2 == K, "qtool_cuda::w4a8_gemm: xq has K = %lld columns, qweight holds %lld", (long long)K,
         (long long)(qweight.size(1) * 2));
  QCHECK(M < (1LL << 31) && N < (1LL << 31) && K < (1LL << 31), "qtool_cuda::w4a8_gemm: too large");
  QCHECK(x_scale.numel() == 1 || x_scale.numel() == M, "qtool_cuda::w4a8_gemm: x_scale needs 1 or M elements");
  QCHECK(out.is_contiguous() && out.numel() == M * N && out_tag(out.scalar_type()) >= 0 && out.device() == xq.device(),
         "qtool_cuda::w4a8_gemm: out must be a contiguous [M, N] float16/bfloat16/float32 tensor on xq's device");
  const bool per_group = s2_scales.has_value();
  QCHECK(per_group ? (s2_zeros.has_value() && !s1_szeros.has_value()) : (s1_szeros.has_value() && !s2_zeros.has_value()),
         "qtool_cuda::w4a8_gemm: per-group needs s2_scales and s2_zeros (no s1_szeros), per-channel s1_szeros");
  c10::cuda::CUDAGuard guard(xq.device());
  const auto dev = xq.device();
  auto A = xq.contiguous();
  auto B = qweight.contiguous();
  auto sx = fvec(x_scale, x_scale.numel(), "x_scale", dev);
  auto s1 = fvec(s1_scales, N, "s1_scales", dev);
  at::Tensor sz, xs, s2, z2, bs;
  qtool_i8::GemmArgs p;
  int fmt;
  if (per_group) {
    QCHECK(group_size > 0 && K % group_size == 0, "qtool_cuda::w4a8_gemm: group_size %lld must divide K = %lld",
           (long long)group_size, (long long)K);
    const int64_t G = K / group_size;
    QCHECK(s2_scales->dim() == 2 && s2_scales->size(0) == G && s2_scales->size(1) == N && s2_zeros->dim() == 2 &&
               s2_zeros->size(0) == G && s2_zeros->size(1) == N,
           "qtool_cuda::w4a8_gemm: s2_scales and s2_zeros must be [%lld, %lld]", (long long)G, (long long)N);
    QCHECK(s2_scales->scalar_type() == at::kChar && s2_zeros->scalar_type() == at::kChar,
           "qtool_cuda::w4a8_gemm: s2_scales and s2_zeros must be int8");
    QCHECK(s2_scales->device() == dev && s2_zeros->device() == dev, "qtool_cuda::w4a8_gemm: s2 tensors on xq's device");
    s2 = s2_scales->contiguous();
    z2 = s2_zeros->contiguous();
    p.s2 = s2.data_ptr<int8_t>();
    p.z2 = z2.data_ptr<int8_t>();
    p.group = (int)group_size;
    if (s2_tiles.has_value()) {  // the same scales packed for the decode kernels (kernels_cuda.ops.pack_s2_tiles)
      QCHECK(s2_tiles->scalar_type() == at::kByte && s2_tiles->dim() == 3 && s2_tiles->size(0) == N / 32 &&
                 s2_tiles->size(1) == G && s2_tiles->size(2) == 48 && s2_tiles->is_contiguous() &&
                 s2_tiles->device() == dev,
             "qtool_cuda::w4a8_gemm: s2_tiles must be a contiguous uint8 [%lld, %lld, 48] tensor on xq's device "
             "(kernels_cuda.ops.pack_s2_tiles)",
             (long long)(N / 32), (long long)G);
      p.pgs = s2_tiles->data_ptr<uint8_t>();
    }
    fmt = qtool_i8::kW4PG;
  } else {
    QCHECK(!s2_tiles.has_value(), "qtool_cuda::w4a8_gemm: s2_tiles is for per-group weights only");
    sz = fvec(*s1_szeros, N, "s1_szeros", dev);
    QCHECK(x_sum.has_value(), "qtool_cuda::w4a8_gemm: per-channel needs x_sum (the Python wrapper computes it)");
    xs = fvec(*x_sum, M, "x_sum", dev);
    p.sz = sz.data_ptr();
    p.sz_dt = ftag(sz);
    p.xsum = xs.data_ptr();
    p.xsum_dt = ftag(xs);
    fmt = qtool_i8::kW4PC;
  }
  if (bias.has_value()) {
    bs = fvec(*bias, N, "bias", dev);
    p.bias = bs.data_ptr();
    p.bias_dt = ftag(bs);
  }
  p.A = A.data_ptr<int8_t>();
  p.B = B.data_ptr();
  p.sx = sx.data_ptr();
  p.sx_dt = ftag(sx);
  p.sx_bcast = sx.numel() == 1 ? 1 : 0;
  p.sw = s1.data_ptr();
  p.sw_dt = ftag(s1);
  p.out = out.data_ptr();
  p.out_dt = out_tag(out.scalar_type());
  p.M = (int)M;
  p.N = (int)N;
  p.K = (int)K;
  // the config is resolved here (as launch() would), so that the dequantizing config's scratch for the int8
  // weights can be allocated first (caching allocator, this stream)
  int c = (int)cfg, s = (int)split;
  if (c < 0) {
    int cc, ss;
    qtool_i8::choose(fmt, p.M, p.N, p.K, &cc, &ss);
    c = cc;
    if (s <= 0) s = ss;
  }
  at::Tensor ws;
  if (M > 0) {
    if (const size_t wsb = qtool_i8::workspace_bytes(fmt, c, p.N, p.K)) {
      ws = at::empty({(int64_t)wsb}, xq.options().dtype(at::kChar));
      p.ws = ws.data_ptr<int8_t>();
    }
  }
  i8_run(fmt, p, c, s, "w4a8_gemm");
}

at::Tensor w4a8_dequantize_cuda(const at::Tensor& qweight, const at::Tensor& s2_scales, const at::Tensor& s2_zeros,
                                int64_t group_size) {
  QCHECK(qweight.is_cuda() && qweight.dim() == 2 &&
             (qweight.scalar_type() == at::kChar || qweight.scalar_type() == at::kByte),
         "qtool_cuda::w4a8_dequantize: qweight must be a CUDA int8 [N, K/2] tensor");
  const int64_t N = qweight.size(0), K = 2 * qweight.size(1);
  QCHECK(N < (1LL << 31) && K < (1LL << 31), "qtool_cuda::w4a8_dequantize: too large");
  QCHECK(group_size > 0 && K % group_size == 0, "qtool_cuda::w4a8_dequantize: group_size %lld must divide K = %lld",
         (long long)group_size, (long long)K);
  const int64_t G = K / group_size;
  QCHECK(s2_scales.scalar_type() == at::kChar && s2_zeros.scalar_type() == at::kChar && s2_scales.dim() == 2 &&
             s2_zeros.dim() == 2 && s2_scales.size(0) == G && s2_scales.size(1) == N && s2_zeros.size(0) == G &&
             s2_zeros.size(1) == N && s2_scales.device() == qweight.device() && s2_zeros.device() == qweight.device(),
         "qtool_cuda::w4a8_dequantize: s2_scales and s2_zeros must be int8 [%lld, %lld] on qweight's device",
         (long long)G, (long long)N);
  c10::cuda::CUDAGuard guard(qweight.device());
  auto B = qweight.contiguous();
  auto s2 = s2_scales.contiguous();
  auto z2 = s2_zeros.contiguous();
  auto out = at::empty({N, K}, qweight.options().dtype(at::kChar));
  const char* err = nullptr;
  const int rc = qtool_i8::dequantize_w4pg(B.data_ptr(), s2.data_ptr<int8_t>(), z2.data_ptr<int8_t>(), (int)N, (int)K,
                                           (int)group_size, out.data_ptr<int8_t>(),
                                           c10::cuda::getCurrentCUDAStream().stream(), &err);
  check_rc(rc, "w4a8_dequantize", err);
  return out;
}

at::Tensor w4a8_gemm_cuda(const at::Tensor& xq, const at::Tensor& x_scale, const c10::optional<at::Tensor>& x_sum,
                          const at::Tensor& qweight, const at::Tensor& s1_scales,
                          const c10::optional<at::Tensor>& s1_szeros, const c10::optional<at::Tensor>& s2_scales,
                          const c10::optional<at::Tensor>& s2_zeros, int64_t group_size,
                          const c10::optional<at::Tensor>& bias, c10::optional<at::ScalarType> out_dtype,
                          const c10::optional<at::Tensor>& s2_tiles) {
  // fp32 by default (the reference op's result); fp16 / bf16 round the same fp32 epilogue value once, in the
  // kernel's store (a layer's output without a separate cast, and half the output bytes)
  const at::ScalarType odt = out_dtype.value_or(at::kFloat);
  QCHECK(out_tag(odt) >= 0, "qtool_cuda::w4a8_gemm: out_dtype must be float16, bfloat16 or float32");
  QCHECK(xq.dim() == 2 && qweight.dim() == 2, "qtool_cuda::w4a8_gemm: xq [M, K], qweight [N, K/2]");
  auto out = at::empty({xq.size(0), qweight.size(0)}, xq.options().dtype(odt));
  w4a8_run(xq, x_scale, x_sum, qweight, s1_scales, s1_szeros, s2_scales, s2_zeros, group_size, bias, out, -1, 0,
           s2_tiles);
  return out;
}

void w4a8_gemm_out_cuda(const at::Tensor& xq, const at::Tensor& x_scale, const c10::optional<at::Tensor>& x_sum,
                        const at::Tensor& qweight, const at::Tensor& s1_scales,
                        const c10::optional<at::Tensor>& s1_szeros, const c10::optional<at::Tensor>& s2_scales,
                        const c10::optional<at::Tensor>& s2_zeros, int64_t group_size,
                        const c10::optional<at::Tensor>& bias, int64_t cfg, int64_t split, const at::Tensor& out,
                        const c10::optional<at::Tensor>& s2_tiles) {
  w4a8_run(xq, x_scale, x_sum, qweight, s1_scales, s1_szeros, s2_scales, s2_zeros, group_size, bias, out, cfg, split,
           s2_tiles);
}

std::vector<int64_t> i8_gemm_choose(int64_t fmt, int64_t M, int64_t N, int64_t K) {
  int cfg = 0, split = 1;
  qtool_i8::choose((int)fmt, (int)M, (int)N, (int)K, &cfg, &split);
  return {cfg, split};
}

std::vector<int64_t> i8_gemm_config_info(int64_t cfg) {
  const auto ci = qtool_i8::config_info((int)cfg);
  return {ci.kind, ci.bm, ci.bn, ci.threads, qtool_i8::num_configs(), qtool_i8::config_supports((int)cfg, 0) ? 1 : 0,
          qtool_i8::config_supports((int)cfg, 1) ? 1 : 0, qtool_i8::config_supports((int)cfg, 2) ? 1 : 0};
}

// KV4 ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> kv4_quantize_cuda(const at::Tensor& x) {
  QCHECK(x.is_cuda() && ftag(x) >= 0, "qtool_cuda::kv4_quantize: x must be a float16/bfloat16/float32 CUDA tensor");
  QCHECK(x.dim() >= 1, "qtool_cuda::kv4_quantize: x must be [..., head_dim]");
  const int64_t D = x.size(-1);
  QCHECK(D == 64 || D == 128 || D == 256, "qtool_cuda::kv4_quantize: head_dim %lld not supported (64, 128, 256)",
         (long long)D);
  auto xc = x.contiguous();
  const int64_t rows = xc.numel() / D;
  QCHECK(rows < (1LL << 31), "qtool_cuda::kv4_quantize: too many rows");
  auto q = at::empty(x.sizes(), x.options().dtype(at::kByte));
  auto s = at::empty(lead_shape(x, 1), x.options().dtype(at::kHalf));
  auto z = at::empty(lead_shape(x, 1), x.options().dtype(at::kHalf));
  if (rows == 0) return {q, s, z};
  c10::cuda::CUDAGuard guard(x.device());
  const char* err = nullptr;
  const int rc = qtool_kv4::quantize(ftag(xc), xc.data_ptr(), (int)rows, (int)D, q.data_ptr<uint8_t>(), s.data_ptr(),
                                     z.data_ptr(), 0, 1, 1, nullptr, c10::cuda::getCurrentCUDAStream().stream(), &err);
  check_rc(rc, "kv4_quantize", err);
  return {q, s, z};
}

void kv4_write_cuda(const at::Tensor& x, const at::Tensor& cache, const at::Tensor& params, const at::Tensor& positions) {
  QCHECK(x.is_cuda() && ftag(x) >= 0 && x.dim() == 3, "qtool_cuda::kv4_write: x must be a CUDA [B, H, D] float tensor");
  const int64_t B = x.size(0), H = x.size(1), D = x.size(2);
  QCHECK(D == 64 || D == 128 || D == 256, "qtool_cuda::kv4_write: head_dim must be 64, 128 or 256");
  QCHECK(cache.is_contiguous() && cache.scalar_type() == at::kByte && cache.dim() == 4 && cache.size(0) == B &&
             cache.size(1) == H && cache.size(3) * 2 == D && cache.device() == x.device(),
         "qtool_cuda::kv4_write: cache must be a contiguous uint8 [B, H, S, D/2] tensor on x's device");
  const int64_t S = cache.size(2);
  QCHECK(params.is_contiguous() && params.scalar_type() == at::kHalf && params.numel() == B * H * S * 2 &&
             params.device() == x.device(),
         "qtool_cuda::kv4_write: params must be a contiguous float16 [B, H, S, 2] tensor");
  QCHECK(positions.numel() == B && positions.device() == x.device(),
         "qtool_cuda::kv4_write: positions must have B elements on x's device");
  auto pos = positions.reshape({B}).to(at::kInt).contiguous();
  auto xc = x.contiguous();
  if (B * H == 0) return;
  c10::cuda::CUDAGuard guard(x.device());
  const char* err = nullptr;
  const int rc = qtool_kv4::quantize(ftag(xc), xc.data_ptr(), (int)(B * H), (int)D, cache.data_ptr<uint8_t>(),
                                     params.data_ptr(), nullptr, 1, (int)H, (int)S, pos.data_ptr<int>(),
                                     c10::cuda::getCurrentCUDAStream().stream(), &err);
  check_rc(rc, "kv4_write", err);
}

void kv4_attn_run(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& k_params, const at::Tensor& v_cache,
                  const at::Tensor& v_params, const at::Tensor& context_lens, double sm_scale, int64_t split,
                  const at::Tensor& out) {
  QCHECK(q.is_cuda() && q.scalar_type() == at::kHalf && q.dim() == 3,
         "qtool_cuda::kv4_decode_attention: q must be a CUDA float16 [B, Hq, D] tensor");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  QCHECK(k_cache.dim() == 4 && k_cache.scalar_type() == at::kByte && k_cache.is_contiguous() && k_cache.size(0) == B &&
             k_cache.size(3) * 2 == D && k_cache.device() == q.device(),
         "qtool_cuda::kv4_decode_attention: k_cache must be a contiguous uint8 [B, Hkv, S, D/2] tensor");
  const int64_t Hkv = k_cache.size(1), S = k_cache.size(2);
  QCHECK(v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == at::kByte && v_cache.is_contiguous() &&
             v_cache.device() == q.device(),
         "qtool_cuda::kv4_decode_attention: v_cache must match k_cache");
  QCHECK(k_params.scalar_type() == at::kHalf && k_params.is_contiguous() && k_params.numel() == B * Hkv * S * 2 &&
             v_params.scalar_type() == at::kHalf && v_params.is_contiguous() && v_params.numel() == B * Hkv * S * 2,
         "qtool_cuda::kv4_decode_attention: params must be contiguous float16 [B, Hkv, S, 2]");
  QCHECK(context_lens.numel() == B && context_lens.device() == q.device(),
         "qtool_cuda::kv4_decode_attention: context_lens must have B elements on q's device");
  QCHECK(out.is_contiguous() && out.scalar_type() == at::kHalf && out.numel() == B * Hq * D && out.device() == q.device(),
         "qtool_cuda::kv4_decode_attention: out must be a contiguous float16 [B, Hq, D] tensor");
  QCHECK(B * Hkv < (1LL << 31) && S < (1LL << 31), "qtool_cuda::kv4_decode_attention: too large");
  c10::cuda::CUDAGuard guard(q.device());
  auto qc = q.contiguous();
  auto ctx = context_lens.reshape({B}).to(at::kInt).contiguous();
  qtool_kv4::AttnArgs a;
  a.q = qc.data_ptr();
  a.kc = k_cache.data_ptr<uint8_t>();
  a.kp = k_params.data_ptr();
  a.vc = v_cache.data_ptr<uint8_t>();
  a.vp = v_params.data_ptr();
  a.ctx = ctx.data_ptr<int>();
  a.out = out.data_ptr();
  a.B = (int)B;
  a.Hq = (int)Hq;
  a.Hkv = (int)Hkv;
  a.S = (int)S;
  a.D = (int)D;
  a.sm_scale = (float)sm_scale;
  if (B == 0) return;
  int s = split > 0 ? (int)split : qtool_kv4::choose_split((int)B, (int)Hkv, (int)S, (int)D);
  at::Tensor work;
  if (s > 1) {
    work = at::empty({B * Hq * s * (D + 2)}, q.options().dtype(at::kFloat));
    a.work = work.data_ptr<float>();
  }
  const char* err = nullptr;
  const int rc = qtool_kv4::decode_attention(a, s, c10::cuda::getCurrentCUDAStream().stream(), &err);
  check_rc(rc, "kv4_decode_attention", err);
}

at::Tensor kv4_decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& k_params,
                                     const at::Tensor& v_cache, const at::Tensor& v_params,
                                     const at::Tensor& context_lens, double sm_scale, int64_t split) {
  auto out = at::empty(q.sizes(), q.options());
  kv4_attn_run(q, k_cache, k_params, v_cache, v_params, context_lens, sm_scale, split, out);
  return out;
}

void kv4_decode_attention_out_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& k_params,
                                   const at::Tensor& v_cache, const at::Tensor& v_params,
                                   const at::Tensor& context_lens, double sm_scale, int64_t split,
                                   const at::Tensor& out) {
  kv4_attn_run(q, k_cache, k_params, v_cache, v_params, context_lens, sm_scale, split, out);
}

int64_t kv4_choose_split(int64_t B, int64_t Hkv, int64_t S, int64_t D) {
  return qtool_kv4::choose_split((int)B, (int)Hkv, (int)S, (int)D);
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
  m.def("w4a16_config_fits(int cfg, int M, int N, int K, int group_size, int bf16, int split) -> bool",
        &w4a16_config_fits);

  // issue 7: int8 activation quantizers, W8A8 / W4A8 GEMMs, KV4 cache
  m.def("quantize_per_token(Tensor x) -> (Tensor, Tensor)");
  m.def("quantize_per_token_sum(Tensor x) -> (Tensor, Tensor, Tensor)");
  m.def("rmsnorm_quantize(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "act_quant_out(Tensor x, Tensor? weight, float eps, Tensor(a!) q, Tensor(b!) scale, Tensor(c!) sum, "
      "bool want_sum) -> ()");
  m.def("quantize_per_tensor(Tensor x, Tensor scale) -> Tensor");
  m.def(
      "w8a8_gemm(Tensor xq, Tensor x_scale, Tensor w, Tensor w_scale, Tensor? bias, ScalarType out_dtype) -> Tensor");
  m.def(
      "w8a8_gemm_out(Tensor xq, Tensor x_scale, Tensor w, Tensor w_scale, Tensor? bias, int cfg, int split, "
      "Tensor(a!) out) -> ()");
  m.def(
      "w4a8_gemm(Tensor xq, Tensor x_scale, Tensor? x_sum, Tensor qweight, Tensor s1_scales, Tensor? s1_szeros, "
      "Tensor? s2_scales, Tensor? s2_zeros, int group_size, Tensor? bias=None, ScalarType? out_dtype=None, "
      "Tensor? s2_tiles=None) -> Tensor");
  m.def(
      "w4a8_gemm_out(Tensor xq, Tensor x_scale, Tensor? x_sum, Tensor qweight, Tensor s1_scales, Tensor? s1_szeros, "
      "Tensor? s2_scales, Tensor? s2_zeros, int group_size, Tensor? bias, int cfg, int split, Tensor(a!) out, "
      "Tensor? s2_tiles=None) -> ()");
  m.def("w4a8_dequantize(Tensor qweight, Tensor s2_scales, Tensor s2_zeros, int group_size) -> Tensor");
  m.def("i8_gemm_choose(int fmt, int M, int N, int K) -> int[]", &i8_gemm_choose);
  m.def("i8_gemm_config_info(int cfg) -> int[]", &i8_gemm_config_info);
  m.def("kv4_quantize(Tensor x) -> (Tensor, Tensor, Tensor)");
  m.def("kv4_write(Tensor x, Tensor(a!) cache, Tensor(b!) params, Tensor positions) -> ()");
  m.def(
      "kv4_decode_attention(Tensor q, Tensor k_cache, Tensor k_params, Tensor v_cache, Tensor v_params, "
      "Tensor context_lens, float sm_scale, int split=0) -> Tensor");
  m.def(
      "kv4_decode_attention_out(Tensor q, Tensor k_cache, Tensor k_params, Tensor v_cache, Tensor v_params, "
      "Tensor context_lens, float sm_scale, int split, Tensor(a!) out) -> ()");
  m.def("kv4_choose_split(int B, int Hkv, int S, int D) -> int", &kv4_choose_split);
}

TORCH_LIBRARY_IMPL(qtool_cuda, CUDA, m) {
  m.impl("w4a16_gemm", &w4a16_gemm_cuda);
  m.impl("w4a16_gemm_cfg", &w4a16_gemm_impl);
  m.impl("w4a16_gemm_cfg_out", &w4a16_gemm_out_impl);
  m.impl("quantize_per_token", &quantize_per_token_cuda);
  m.impl("quantize_per_token_sum", &quantize_per_token_sum_cuda);
  m.impl("rmsnorm_quantize", &rmsnorm_quantize_cuda);
  m.impl("act_quant_out", &act_quant_out_cuda);
  m.impl("quantize_per_tensor", &quantize_per_tensor_cuda);
  m.impl("w8a8_gemm", &w8a8_gemm_cuda);
  m.impl("w8a8_gemm_out", &w8a8_gemm_out_cuda);
  m.impl("w4a8_gemm", &w4a8_gemm_cuda);
  m.impl("w4a8_gemm_out", &w4a8_gemm_out_cuda);
  m.impl("w4a8_dequantize", &w4a8_dequantize_cuda);
  m.impl("kv4_quantize", &kv4_quantize_cuda);
  m.impl("kv4_write", &kv4_write_cuda);
  m.impl("kv4_decode_attention", &kv4_decode_attention_cuda);
  m.impl("kv4_decode_attention_out", &kv4_decode_attention_out_cuda);
}
