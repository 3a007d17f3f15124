// Host side of the W4A16 QUICK kernels: argument checks, default config choice, dispatch.
#include <algorithm>
#include <cstdlib>
#include <mutex>

#include "w4a16_launch.cuh"

namespace qtool_w4a16 {

cudaError_t run_f16(int cfg, const Params& p, cudaStream_t stream);
cudaError_t run_bf16(int cfg, const Params& p, cudaStream_t stream);
int smem_f16(int cfg, int M, int K, int split);
int smem_bf16(int cfg, int M, int K, int split);
int occupancy_f16(int cfg, int smem, int threads);
int occupancy_bf16(int cfg, int smem, int threads);

namespace {
const char* const kRetiredMsg = "this config is retired (a decode kernel the group-chunk / transposed ones replaced)";

struct InfoTable {
  ConfigInfo t[kNumConfigs];
  InfoTable() {
#define X(id) t[id] = {"c" #id " retired (per-k-tile decode ring)", 16, 128, 1, 64, kRetired, 1, 0};
    QTOOL_W4A16_RETIRED(X)
#undef X
#define X(id, WN, WK, U, D, MB) \
  t[id] = {"c" #id " gdec n" #WN " k" #WK " u" #U " d" #D, 16, 64 * WN, WK, 32 * WN * WK, 3, U, 1, 1};
    QTOOL_W4A16_GDEC(X)
#undef X
#define X(id, WN, WK, U, D, MB, NB) \
  t[id] = {"c" #id " tdec n" #WN " k" #WK " u" #U " d" #D " m" #NB, 8 * NB, 64 * WN, WK, 32 * WN * WK, 4, U, 1, 1};
    QTOOL_W4A16_TDEC(X)
#undef X
#define X(id, NWG, BN, S, MB) \
  t[id] = {"c" #id " wgmma m" #NWG "x64 n" #BN " s" #S, 64 * NWG, BN, 1, 128 * NWG + 128, 5, 2};
    QTOOL_W4A16_WG(X)
#undef X
#define X(id, NWG, BT, S, FB, MB, CR, PDL, MC) \
  t[id] = {"c" #id " wgrs t" #BT " f" #NWG "x" #FB "x64 s" #S " r" #CR " mc" #MC, BT, 64 * NWG * FB, 1, 128 * NWG + 128, 6, 2, 1, PDL, MC};
    QTOOL_W4A16_WRS(X)
#undef X
#define X(id, MT, WM, WN, WK, S, MB) \
  t[id] = {"c" #id " staged m" #MT "x" #WM " n" #WN " k" #WK " s" #S, 16 * MT * WM, 64 * WN, WK, 32 * WM * WN * WK, 0, 1};
    QTOOL_W4A16_STAGED(X)
#undef X
  }
};
const InfoTable kTable;
const ConfigInfo* const kInfo = kTable.t;

using qtool_dev::DevInfo;  // (sm90_common.cuh)
using qtool_dev::dev_info;

int smem_of(int dtype, int cfg, int M, int K, int split) {
  return dtype == kBF16 ? smem_bf16(cfg, M, K, split) : smem_f16(cfg, M, K, split);
}

int occupancy(int dtype, int cfg, int smem) {
  // cache: (dtype, cfg, smem / 1 KiB) → CTAs per SM
  static std::mutex mu;
  static int cache[2][kNumConfigs][232];
  const int kb = std::min(231, (smem + 1023) / 1024);
  std::lock_guard<std::mutex> lock(mu);
  int& c = cache[dtype == kBF16][cfg][kb];
  if (c == 0) {
    c = dtype == kBF16 ? occupancy_bf16(cfg, kb * 1024, kInfo[cfg].threads)
                       : occupancy_f16(cfg, kb * 1024, kInfo[cfg].threads);
  }
  return c;
}
}  // namespace

int num_configs() { return kNumConfigs; }
ConfigInfo config_info(int cfg) {
  ConfigInfo ci = kInfo[(cfg >= 0 && cfg < kNumConfigs) ? cfg : 0];
  ci.avail = ci.ring != kRetired && (ci.ring < 5 || (kWgmmaCompiled && dev_info().major == 9));
  return ci;
}

static int max_split(int cfg, int K, int major) {
  if (major < 9) return 1;  // clusters need sm_90
  const int KT = K / 32;
  if (kInfo[cfg].ring >= 5)  // wgmma: >= 4 stages of 64 k per CTA; up to 3 (6 for register-A wgmma)
    return std::max(1, std::min(kInfo[cfg].ring == 6 ? 6 : 3, KT / 2 / 4));
  if (kInfo[cfg].ring >= 3)  // >= 1 chunk per K-warp
    return std::max(1, std::min(8, KT / kInfo[cfg].kunit / kInfo[cfg].wk));
  return std::max(1, std::min(8, KT / (2 * kInfo[cfg].wk)));  // >= 2 k-tiles per K-warp
}

static bool split_ok(int dtype, int cfg, int M, int K, int split, int major) {
  return split >= 1 && split <= max_split(cfg, K, major) && smem_of(dtype, cfg, M, K, split) <= kMaxSmem;
}

// Default configs, from the sweeps in docs/kernels-notes.md and docs/benchmarks.md (H100, g128):
//   M <= 8, fp16   transposed decode: c23 (g % 128 == 0), c27 (g % 64), c33 (g % 32)
//   M <= 16        transposed decode for 16 tokens c24 when K >= 8192 (fp16, g % 128 == 0), else
//                  group-chunk decode: c19 (g % 64 == 0), c21 (g % 32)
//   16 < M <= 32   staged c5 (32×128, K split over 4 warps)
//   32 < M <= 64   staged c6 (64×128, K split over 2 warps)
//   64 < M <= 128  staged c8 (128×128, 2 CTAs/SM)
//   128 < M <= 256 staged c6
//   M > 256        staged c8
// and on Hopper (sm_90a build) for fp16 with K % 64 == 0 and g % 64 == 0:
//   32 < M <= 64   register-A wgmma, 64 tokens: c47 (256 features, activations multicast to a CTA pair)
//                  for N >= 16384 (N % 512 == 0), c42 for N >= 8192 or K >= 8192 (split 6 where it has
//                  few CTAs), else c37 (128 features)
//   64 < M <= 128  register-A wgmma, 128 tokens: c41 (2 warpgroups × 128 features) for N >= 8192 or
//                  K >= 8192 (split 6 where it has few CTAs), else c43 (1 warpgroup × 128 features)
//   128 < M <= 256 c44 (c43 with the multicast) for N >= 16384 (no split) and for 4096 <= N < 8192
//                  (split 2 through global memory), c41 for N >= 8192, else c43
//   M > 256        register-A wgmma c41 (128 tokens × 256 features; c45 = with the multicast for
//                  N >= 16384; both 20-30 % faster than the dequantise-to-shared-memory wgmma c34),
//                  c35 (128×128) where N % 256 != 0
static bool wgmma_ok(int K, int group, int dtype) {
  return kWgmmaCompiled && dtype == kF16 && dev_info().major == 9 && K % 64 == 0 && group % 64 == 0;
}

static int choose_cfg(int M, int N, int K, int group, int dtype) {
  if (M > 32 && wgmma_ok(K, group, dtype)) {
    // c44-c47: the activation tile multicast to a CTA pair (eleventh session, H100 + H200 sweeps: M = 64
    // 4096x12288 / 4096x22016 -4 / -11 %, M = 256 4096x22016 -12 %, M >= 1024 4096x22016 -3 to -12 %);
    // they need an even number of CTA-wide column blocks (N % 256 for 128 features, N % 512 for 256)
    // Where N is wide (many column blocks re-reading each activation tile) it pays on both H100 and
    // H200; on N = 4096 it was within +-5 % either way while their split-K was a cluster of split x 2.
    // Their split-K goes through global memory (twelfth session): at 128 < M <= 256 with N = 4096, c44/s2
    // beats c43/s2 on every K (H100: 4096^2 25.4 vs 26.8 us, 11008x4096 52.8 vs 63.5, 14336x4096 66.1
    // vs 81.1); at M = 64 a split one (c47/s2 on 4096x12288: 29.0 vs c42/s2 27.6) does not.
    const bool wide = N >= 16384;
    if (M > 256) return N % 256 == 0 ? (wide && N % 512 == 0 ? 45 : 41) : 35;
    if (M > 128) {
      if (N % 256 != 0) return 43;
      return N >= 8192 ? (wide ? 44 : 41) : N >= 4096 ? 44 : 43;
    }
    if (M > 64) return N % 256 == 0 && (N >= 8192 || K >= 8192) ? 41 : 43;
    // 11008x4096 / 14336x4096 M=64: c42/s6 29.6 / 36.8 us vs c37/s3 32.0 / 40.9 (H200, seventh session)
    if (N % 256 == 0 && N >= 8192) return wide && N % 512 == 0 ? 47 : 42;
    return N % 256 == 0 && K >= 8192 ? 42 : 37;
  }
  if (M <= 8 && dtype == kF16) return group % 128 == 0 ? 23 : group % 64 == 0 ? 27 : 33;
  // 9-16 tokens on long K: the transposed decode for 16 tokens (H200 sweep, sixth session: 11008x4096
  // M=16 c24/s6 16.4 us vs c19/s8 18.5; 14336x4096 19.9 vs 21.7; at K = 4096 c19 stays ahead)
  if (M <= 16 && dtype == kF16 && group % 128 == 0 && K >= 8192) return 24;
  if (M <= 16) return group % 64 == 0 ? 19 : 21;
  if (M <= 32) return 5;
  if (M <= 64) return 6;
  if (M <= 128) return 8;
  if (M <= 256) return 6;
  return 8;
}

// Split-K: the largest split that keeps every CTA resident in one wave. Cluster sizes 4, 5, 7
// (and 8 where one CTA fits per SM) measured slower than the neighbouring 3 / 6 / 8 (cluster
// packing into GPCs), so they are skipped; staged configs stop at 6.
// wgmma (one CTA per SM): split 6 for the register-A kernel on at most sms/6 CTAs, 2-3 for long K at
// up to half a wave, split while the CTAs do not fill the GPU (up to 3), else the split with the
// better wave efficiency (sweeps in docs/benchmarks.md). 4 and 5 measured slow (cluster packing; the
// multicast configs, whose split is not a cluster, follow the same rule: measured there at 2 only).
static int choose_split_wgmma(int dtype, int cfg, int M, int N, int K) {
  const DevInfo di = dev_info();
  const ConfigInfo ci = kInfo[cfg];
  const long long ctas = (long long)((M + ci.rows - 1) / ci.rows) * (N / ci.cols);
  auto eff = [&](int s) { const long long c = ctas * s; return (double)c / (double)(((c + di.sms - 1) / di.sms) * di.sms); };
  int s = 1;
  if (ci.ring == 6 && ctas * 6 <= di.sms) s = 6;  // register-A kernel on very few CTAs (M <= 128, N = 4096)
  else if (K >= 8192 && ctas * 2 <= di.sms) s = ctas * 3 <= di.sms ? 3 : 2;
  else if (ctas < di.sms) s = std::min<long long>(3, di.sms / ctas);
  else if (eff(2) > eff(1) + 0.1) s = 2;
  while (s > 1 && (s == 4 || s == 5 || !split_ok(dtype, cfg, M, K, s, di.major))) --s;
  return s;
}

static int choose_split(int dtype, int cfg, int M, int N, int K) {
  const DevInfo di = dev_info();
  const ConfigInfo ci = kInfo[cfg];
  if (ci.ring >= 5) return choose_split_wgmma(dtype, cfg, M, N, K);
  const long long base = (long long)((M + ci.rows - 1) / ci.rows) * (N / ci.cols);
  const int cap = ci.ring ? 8 : 6;
  int best = 0;
  for (int s = 1; s <= cap; ++s) {
    if (!split_ok(dtype, cfg, M, K, s, di.major)) continue;
    if (best == 0) best = s;  // smallest legal split
    const int occ = occupancy(dtype, cfg, smem_of(dtype, cfg, M, K, s));
    if (s == 4 || s == 5 || s == 7 || (occ == 1 && s == 8)) continue;
    if (ci.ring == 4 && ci.rows == 16 && s == 8) continue;  // 16-token tdec: s6 ahead of s8 (H200 sweep)
    if (base * s <= (long long)di.sms * occ) best = s;
  }
  return best;  // 0: no legal split (caller reports)
}

// Why config c cannot run this problem at split s (nullptr: it can). The launcher's rules, also
// answered to tools and tests through config_fits.
static const char* config_problem(int c, int dtype, int M, int N, int K, int group, int s) {
  if (c < 0 || c >= kNumConfigs) return "unknown kernel config";
  if (kInfo[c].ring == kRetired) return kRetiredMsg;
  if (group % (32 * kInfo[c].kunit) != 0) return "this config needs group_size to be a multiple of 32 * its k-unit";
  if (kInfo[c].ring == 4 && dtype != kF16) return "this config (transposed decode) is float16-only";
  if (kInfo[c].ring >= 5) {
    if (dtype != kF16) return "this config (wgmma) is float16-only";
    if (!kWgmmaCompiled || dev_info().major != 9) return "this config (wgmma) needs an sm_90a build on a Hopper GPU";
    if (K % 64 != 0) return "this config (wgmma) needs K to be a multiple of 64";
  }
  if (N % kInfo[c].cols != 0) return "N is not a multiple of this config's CTA width";
  if ((N / kInfo[c].cols) % kInfo[c].mc != 0)
    return "this config (activation multicast) needs an even number of CTA-wide column blocks";
  if (!split_ok(dtype, c, M, K, s, dev_info().major))
    return "split not possible for this K (k-tiles per warp, shared memory, or no clusters on this GPU)";
  return nullptr;
}

bool config_fits(int cfg, int dtype, int M, int N, int K, int group, int split) {
  if (M <= 0 || N <= 0 || N % 128 != 0 || K <= 0 || K % 32 != 0 || group <= 0 || group % 32 != 0 || K % group != 0)
    return false;
  return config_problem(cfg, dtype, M, N, K, group, split) == nullptr;
}

void choose(int M, int N, int K, int group, int dtype, int* cfg_out, int* split_out) {
  int cfg = choose_cfg(M, N, K, group, dtype);
  int s = choose_split(dtype, cfg, M, N, K);
  if (s == 0 && kInfo[cfg].ring) {  // ring kernel cannot hold this K: staged fallback
    cfg = 4;
    s = choose_split(dtype, cfg, M, N, K);
  }
  *cfg_out = cfg;
  *split_out = std::max(1, s);
}

namespace {
// cfg / split as launch() runs them (cfg < 0 / split <= 0: chosen); nullptr, or why they cannot run.
const char* resolve(int dtype, int M, int N, int K, int group, int cfg, int split, int* c_out, int* s_out) {
  if (dtype != kF16 && dtype != kBF16) return "x must be float16 or bfloat16";
  if (N <= 0 || N % 128 != 0) return "N (= 2 * qweight.shape[1]) must be a positive multiple of 128";
  if (K <= 0 || K % 32 != 0) return "K (= x.shape[-1]) must be a positive multiple of 32";
  if (group <= 0 || group % 32 != 0 || K % group != 0) return "group_size must be a multiple of 32 that divides K";
  if (M < 0) return "M must be >= 0";
  int c = cfg, s = split;
  if (c < 0) {
    int cc, ss;
    choose(std::max(M, 1), N, K, group, dtype, &cc, &ss);
    c = cc;
    if (s <= 0) s = ss;
  }
  if (c >= kNumConfigs) return "unknown kernel config";
  if (kInfo[c].ring == kRetired) return kRetiredMsg;
  if (s <= 0) s = std::max(1, choose_split(dtype, c, std::max(M, 1), N, K));
  *c_out = c;
  *s_out = s;
  return M == 0 ? nullptr : config_problem(c, dtype, M, N, K, group, s);
}

long long tiles_of(int c, int M, int N) { return (long long)((M + kInfo[c].rows - 1) / kInfo[c].rows) * (N / kInfo[c].cols); }
bool splits_in_memory(int c, int s) { return kInfo[c].mc > 1 && s > 1; }
}  // namespace

Workspace workspace_need(int dtype, int M, int N, int K, int group, int cfg, int split) {
  Workspace w;
  int c = 0, s = 1;
  if (M <= 0 || resolve(dtype, M, N, K, group, cfg, split, &c, &s) || !splits_in_memory(c, s)) return w;
  const long long tiles = tiles_of(c, M, N);
  w.bytes = (size_t)tiles * s * kInfo[c].rows * kInfo[c].cols * sizeof(float);
  w.counters = (int)tiles;
  return w;
}

int launch(int dtype, const void* x, const int32_t* qweight, const void* scales, const int32_t* qzeros,
           void* out, int M, int N, int K, int group, int cfg, int split, void* workspace, int* counters,
           cudaStream_t stream, const char** err) {
  auto bad = [&](const char* m) {
    if (err) *err = m;
    return -1;
  };
  int c = 0, s = 1;
  if (const char* why = resolve(dtype, M, N, K, group, cfg, split, &c, &s)) return bad(why);
  if (M == 0) return 0;
  if ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(qweight) |
       reinterpret_cast<uintptr_t>(scales) | reinterpret_cast<uintptr_t>(out)) % 16 ||
      reinterpret_cast<uintptr_t>(qzeros) % 16 || reinterpret_cast<uintptr_t>(workspace) % 16)
    return bad("x, qweight, scales, qzeros, out and the workspace must be 16-byte aligned");
  const bool in_memory = splits_in_memory(c, s);
  if (in_memory && (!workspace || !counters))
    return bad("this config splits K through a workspace: pass what workspace_need() asks for");
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
  const int gk = group / 32;
  p.gshift = (gk & (gk - 1)) == 0 ? __builtin_ctz(gk) : -1;
  p.split = s;
  p.ws = nullptr;
  p.sem = nullptr;
  if (in_memory) {
    p.ws = static_cast<float*>(workspace);
    p.sem = counters;
  }
  p.pdl = 0;
  if (kInfo[c].pdl && dev_info().major >= 9) {  // kernels calling griddepcontrol
    // The decode kernels and the M <= 256 register-A wgmma ones use programmatic dependent launch
    // (kernel notes: "PDL"): default mode 2 (weight prefetch before the wait; weights must not be
    // written by the kernel just before, which holds for static model weights).
    // QTOOL_W4A16_PDL=0 / 1 / 2 overrides, read per call.
    const char* env = getenv("QTOOL_W4A16_PDL");
    p.pdl = (env && env[0] >= '0' && env[0] <= '2' && env[1] == 0) ? env[0] - '0' : 2;
  }
  cudaError_t e = dtype == kBF16 ? run_bf16(c, p, stream) : run_f16(c, p, stream);
  if (e != cudaSuccess && p.pdl) {  // a driver without programmatic launch: plain launch
    cudaGetLastError();
    p.pdl = 0;
    e = dtype == kBF16 ? run_bf16(c, p, stream) : run_f16(c, p, stream);
  }
  return e == cudaSuccess ? 0 : (int)e;
}

}  // namespace qtool_w4a16
