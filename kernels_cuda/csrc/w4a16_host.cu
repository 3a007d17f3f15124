// Host side of the W4A16 QUICK kernels: argument checks, default config choice, dispatch.
#include <algorithm>

#include "w4a16_launch.cuh"

namespace qtool_w4a16 {

cudaError_t run_f16(int cfg, const Params& p, cudaStream_t stream);
cudaError_t run_bf16(int cfg, const Params& p, cudaStream_t stream);
int occupancy_f16(int cfg);
int occupancy_bf16(int cfg);

namespace {
const char* kNames[kNumConfigs] = {
#define X(id, MT, WM, WN, WK, D, S, MB) \
  "c" #id ":m" #MT "x" #WM " n" #WN " k" #WK " d" #D " s" #S,
    QTOOL_W4A16_CONFIGS(X)
#undef X
};
const ConfigInfo kInfo[kNumConfigs] = {
#define X(id, MT, WM, WN, WK, D, S, MB) \
  {kNames[id], 16 * MT * WM, 64 * WN, WK, 32 * WM * WN * WK},
    QTOOL_W4A16_CONFIGS(X)
#undef X
};

struct DevInfo {
  int sms = 0, major = 0;
};
DevInfo dev_info() {
  static DevInfo cache[64];
  int d = 0;
  cudaGetDevice(&d);
  if (d < 0 || d >= 64) d = 0;
  if (cache[d].sms == 0) {
    cudaDeviceGetAttribute(&cache[d].sms, cudaDevAttrMultiProcessorCount, d);
    cudaDeviceGetAttribute(&cache[d].major, cudaDevAttrComputeCapabilityMajor, d);
    if (cache[d].sms <= 0) cache[d].sms = 1;
  }
  return cache[d];
}
}  // namespace

int num_configs() { return kNumConfigs; }
ConfigInfo config_info(int cfg) { return kInfo[(cfg >= 0 && cfg < kNumConfigs) ? cfg : 0]; }

static int max_split(int cfg, int K, int major) {
  if (major < 9) return 1;  // clusters need sm_90
  const int KT = K / 32;
  return std::max(1, std::min(8, KT / (2 * kInfo[cfg].wk)));  // ≥ 2 k-tiles per K-warp
}

void choose(int M, int N, int K, int group, int dtype, int* cfg_out, int* split_out) {
  (void)group;
  const DevInfo di = dev_info();
  int cfg;
  if (M <= 16) cfg = 0;
  else if (M <= 32) cfg = 1;
  else if (M <= 64) cfg = 2;
  else if (M <= 128) cfg = 4;
  else cfg = (N % 256 == 0) ? 5 : 6;
  const ConfigInfo ci = kInfo[cfg];
  const long long base = (long long)((M + ci.rows - 1) / ci.rows) * (N / ci.cols);
  const int occ = dtype == kBF16 ? occupancy_bf16(cfg) : occupancy_f16(cfg);
  const long long slots = (long long)di.sms * occ;
  int split = (int)std::max(1LL, std::min<long long>(8, slots / std::max(1LL, base)));
  split = std::min(split, max_split(cfg, K, di.major));
  *cfg_out = cfg;
  *split_out = std::max(1, split);
}

int launch(int dtype, const void* x, const int32_t* qweight, const void* scales, const int32_t* qzeros,
           void* out, int M, int N, int K, int group, int cfg, int split, cudaStream_t stream,
           const char** err) {
  auto bad = [&](const char* m) {
    if (err) *err = m;
    return -1;
  };
  if (dtype != kF16 && dtype != kBF16) return bad("x must be float16 or bfloat16");
  if (N <= 0 || N % 128 != 0) return bad("N (= 2 * qweight.shape[1]) must be a positive multiple of 128");
  if (K <= 0 || K % 32 != 0) return bad("K (= x.shape[-1]) must be a positive multiple of 32");
  if (group <= 0 || group % 32 != 0 || K % group != 0)
    return bad("group_size must be a multiple of 32 that divides K");
  if (M < 0) return bad("M must be >= 0");
  if (M == 0) return 0;
  if ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(qweight) |
       reinterpret_cast<uintptr_t>(scales) | reinterpret_cast<uintptr_t>(out)) % 16 ||
      reinterpret_cast<uintptr_t>(qzeros) % 8)
    return bad("x, qweight, scales and out must be 16-byte aligned, qzeros 8-byte aligned");
  int c = cfg, s = split;
  if (c < 0 || s <= 0) {
    int cc, ss;
    choose(M, N, K, group, dtype, &cc, &ss);
    if (c < 0) c = cc;
    if (s <= 0) s = (cfg < 0) ? ss : 1;
  }
  if (c >= kNumConfigs) return bad("unknown kernel config");
  if (N % kInfo[c].cols != 0) return bad("N is not a multiple of this config's CTA width");
  if (s > max_split(c, K, dev_info().major)) return bad("split too large for K (or GPU has no clusters)");
  Params p;
  p.x = x;
  p.qw = reinterpret_cast<const uint4*>(qweight);
  p.scales = reinterpret_cast<const __half*>(scales);
  p.qz = reinterpret_cast<const uint32_t*>(qzeros);
  p.out = out;
  p.M = M;
  p.N = N;
  p.K = K;
  p.group = group;
  p.split = s;
  cudaError_t e = dtype == kBF16 ? run_bf16(c, p, stream) : run_f16(c, p, stream);
  return e == cudaSuccess ? 0 : (int)e;
}

}  // namespace qtool_w4a16
