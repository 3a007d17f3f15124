// W8A8 instantiations of the int8 GEMM engine + the host side shared by all formats:
// config table, default choice, argument checks, dispatch.
#include <algorithm>
#include <cstdlib>
#include <mutex>

#include "w8a8_gemm.cuh"
#include "w8a8_wgmma.cuh"

namespace qtool_i8 {

FmtOps fmt_ops_w8() { return {run_fmt<kW8>, occupancy_fmt<kW8>}; }

namespace {

const CfgInfo kInfo[kNumConfigs] = {
    {"c0 decode 4 warps s4 m8", 0, 8, 32, 128, 1},
    {"c1 decode 4 warps s4 m16", 0, 16, 32, 128, 1},
    {"c2 mma 32x128 1x4 s4", 1, 32, 128, 128, 1},
    {"c3 mma 64x128 2x2 s4", 1, 64, 128, 128, 1},
    {"c4 mma 128x128 2x4 s4", 1, 128, 128, 256, 1},
    {"c5 mma 128x256 2x4 s3", 1, 128, 256, 256, 1},
    {"c6 wgmma 128x256 s4", 2, 128, 256, 256, 1},
    {"c7 wgmma 128x128 s3 (2/SM)", 2, 128, 128, 256, 1},
    {"c8 wgmma 64x256 s4", 2, 64, 256, 128, 1},
    {"c9 wgmma 64x128 s4 (2/SM)", 2, 64, 128, 128, 1},
    {"c10 wgws 128x256 (2 consumer WGs)", 3, 128, 256, 384, 1},
    {"c11 wgws 64x256 (2 consumer WGs)", 3, 64, 256, 384, 1},
    {"c12 wgws 256x128 (2 consumer WGs, W8 only)", 3, 256, 128, 384, 0},
    {"c13 decode 8 warps s3 m16", 0, 16, 32, 256, 1},
    {"c14 decode swapped 4 warps s4 m8", 0, 8, 32, 128, 1},
    {"c15 decode swapped 8 warps s3 m8", 0, 8, 32, 256, 1},
    {"c16 decode swapped 4 warps s6 m8", 0, 8, 32, 128, 1},
    {"c17 decode swapped 8 warps s4 m8", 0, 8, 32, 256, 1},
    {"c18 decode swapped 16 warps s4 m8 (W4 only)", 0, 8, 32, 512, 1},
    {"c19 decode 16 warps s3 m16 (W4 only)", 0, 16, 32, 512, 1},
    // kDequantCfg (W4 only): the dequantizing kernel, then the W8A8 default (per-channel: c6 with the W4PC epilogue)
    {"c20 W4: dequantize to int8, then the W8A8 GEMM", 4, 128, 256, 128, 1},
    {"c21 decode swapped 4 warps s3 m4", 0, 4, 32, 128, 1},
    {"c22 decode swapped 8 warps s3 m4", 0, 4, 32, 256, 1},
    {"c23 decode swapped 16 warps s4 m4 (W4 only)", 0, 4, 32, 512, 1},
    {"c24 decode swapped 8 warps s5 m4", 0, 4, 32, 256, 1},
    // kPeerCfg (W4 per-group only): c6's W8A8 GEMM whose CTAs dequantize their weight column together, one launch
    {"c25 W4 per-group: W8A8 GEMM, each column's CTAs dequantize it together", 4, 128, 256, 256, 1},
    // W8 only, TMA tiles multicast across a thread-block cluster of (row tiles x weight columns) CTAs (w8a8_tma.cu)
    {"c26 wgmma 128x256 TMA, weights multicast to 2 row tiles", 5, 128, 256, 384, 0},
    // decode rings of 16 token rows small enough for 4 (c27) / 6 (c28, W4) CTAs per SM
    {"c27 decode 4 warps s3 m16", 0, 16, 32, 128, 1},
    {"c28 decode 4 warps s2 m16", 0, 16, 32, 128, 1},
    // Retired (kind kRetired: refused, ids kept so that the measurements in docs/benchmarks.md keep their names):
    // two 32-column tiles per CTA (c29-c33) and the activation copies through L1 (c34-c36), twenty-fifth session:
    // slower than the one-tile defaults on every shape and format (the L2 hypothesis refuted)
    {"c29 retired: decode 4 warps s4 m16 2 tiles", kRetired, 16, 64, 128, 0},
    {"c30 retired: decode 4 warps s3 m16 2 tiles", kRetired, 16, 64, 128, 0},
    {"c31 retired: decode 4 warps s2 m16 2 tiles", kRetired, 16, 64, 128, 0},
    {"c32 retired: decode 16 warps s2 m16 2 tiles", kRetired, 16, 64, 512, 0},
    {"c33 retired: decode 8 warps s2 m16 2 tiles", kRetired, 16, 64, 256, 0},
    {"c34 retired: decode 4 warps s4 m16 act-L1", kRetired, 16, 32, 128, 0},
    {"c35 retired: decode 4 warps s4 m16 2 tiles act-L1", kRetired, 16, 64, 128, 0},
    {"c36 retired: decode 4 warps s3 m16 act-L1", kRetired, 16, 32, 128, 0},
    // other warp / stage counts of the 16-row ring: c37 (2 warps, 4 stages: 6 per-group CTAs per SM), c42 (6 warps,
    // 4 stages, 2 per SM), and one CTA per SM for the shapes whose tiles do not fill the GPU (c40 12 warps x 4 stages,
    // c47 8 x 6; W4 only). The others were slower than these or the older defaults wherever measured (twenty-fifth and
    // twenty-sixth sessions, H100, M = 16) and are retired.
    {"c37 decode 2 warps s4 m16", 0, 16, 32, 64, 1},
    {"c38 retired: decode 2 warps s6 m16", kRetired, 16, 32, 64, 0},
    {"c39 retired: decode 3 warps s4 m16", kRetired, 16, 32, 96, 0},
    {"c40 decode 12 warps s4 m16 (W4 only)", 0, 16, 32, 384, 1},
    {"c41 retired: decode 11 warps s4 m16", kRetired, 16, 32, 352, 0},
    {"c42 decode 6 warps s4 m16", 0, 16, 32, 192, 1},
    {"c43 retired: decode 1 warp s8 m16", kRetired, 16, 32, 32, 0},
    {"c44 retired: decode 1 warp s6 m16", kRetired, 16, 32, 32, 0},
    {"c45 retired: decode 2 warps s3 m16", kRetired, 16, 32, 64, 0},
    {"c46 retired: decode 10 warps s5 m16", kRetired, 16, 32, 320, 0},
    {"c47 decode 8 warps s6 m16 (W4 only)", 0, 16, 32, 256, 1},
};

using qtool_dev::DevInfo;  // (sm90_common.cuh)
using qtool_dev::dev_info;

FmtOps ops_of(int fmt, int cfg) {
  const bool wgm = kInfo[cfg].kind >= 2;
  if (fmt == kW4PC) return wgm ? fmt_ops_wg_w4pc() : fmt_ops_w4pc();
  if (fmt == kW4PG) return wgm ? fmt_ops_wg_w4pg() : fmt_ops_w4pg();
  return wgm ? fmt_ops_wg_w8() : fmt_ops_w8();
}

int occupancy(int fmt, int cfg) {
  static std::mutex mu;
  static int cache[3][kNumConfigs];
  std::lock_guard<std::mutex> lock(mu);
  int& c = cache[fmt][cfg];
  if (c == 0) {
    c = ops_of(fmt, cfg).occupancy(cfg);
    if (c <= 0) c = -1;
  }
  return c;
}

int ctas_of(int cfg, int M, int N) {
  const CfgInfo& ci = kInfo[cfg];
  if (ci.kind == 0) return (N + ci.bn - 1) / ci.bn;
  return ((M + ci.bm - 1) / ci.bm) * ((N + ci.bn - 1) / ci.bn);
}

int max_split(int cfg, int K) {
  if (dev_info().major < 9) return 1;  // clusters need sm_90
  const int KT = (K + 127) / 128;
  const CfgInfo& ci = kInfo[cfg];
  // decode: >= 2 k-chunks per warp; tiled / wgmma: >= 4 k-tiles per CTA
  const int per = ci.kind == 0 ? 2 * (ci.threads / 32) : 4;
  return std::max(1, std::min(8, KT / per));
}

// Split-K (from the second GPU run's sweep, H200):
//  * decode: W8 splits only to reach one CTA per SM (4096x4096 M=1: s1 7.8 us, s2 8.6); W4 moves
//    half the bytes per CTA and wants two CTAs per SM (4096x4096: s2 8.2, s1 8.9; 14336x4096:
//    s2 17.9, s1 23.0), never more (wave-efficiency splits of 3-4 cost 20-35 %) -- except W4 on the
//    8-warp configs below K = 8192, which does not split (sixth session, per-channel: 4096x4096 M=1
//    c17 s1 4.6 us, s2 4.9; M=16 c13 s1 5.1, s2 5.7; 14336x4096 M=1 c17 s2 9.4, s1 10.5; tenth
//    session, g128 on an H100: 4096x4096 M=1 c17 s1 5.6, s2 6.2; M=16 c13 s1 6.2, s2 7.1);
//  * wgmma: at most 3 (clusters of 4 and 8 measured ~2x slower: 4096x4096 M=256 c7 s3 22.9 us,
//    s4 48.8), and only while the CTAs do not fill the GPU;
//  * mma.sync tiles: the largest split that keeps one wave.
int choose_split(int fmt, int cfg, int M, int N, int K) {
  const int occ = occupancy(fmt, cfg);
  if (occ <= 0) return 1;
  const long long sms = dev_info().sms;
  const long long ctas = ctas_of(cfg, M, N);
  const int ms = max_split(cfg, K);
  long long s;
  if (kInfo[cfg].kind == 0) {
    if (fmt != kW8 && kInfo[cfg].threads == 256 && K < 8192) return 1;
    // W4 configs that hold an SM alone (c18 / c19 / c23 and the big rings c40 / c47): one CTA per SM's worth
    s = (fmt == kW8 || occ == 1 ? sms : 2 * sms) / ctas;
  } else if (kInfo[cfg].kind == 3) {
    // warp-specialised: a power of two up to 4 while the CTAs do not fill the GPU (H200, c11 at
    // 4096x4096 M=64: s4 17.2 us, s3 22.6, s8 slower again)
    s = 1;
    while (s < 4 && 2 * s * ctas <= sms * occ) s *= 2;
  } else if (kInfo[cfg].kind == 5) {
    s = 1;  // no split-K of their own
  } else if (kInfo[cfg].kind == 2) {
    s = std::min<long long>(3, sms * occ / ctas);
  } else {
    s = sms * occ / ctas;
  }
  return static_cast<int>(std::max<long long>(1, std::min<long long>(ms, s)));
}

}  // namespace

int num_configs() { return kNumConfigs; }
size_t workspace_bytes(int fmt, int cfg, int N, int K) {
  if (fmt == kW8) return 0;
  if (cfg == kDequantCfg) return static_cast<size_t>(N) * static_cast<size_t>(K);
  if (fmt != kW4PG) return 0;
  if (cfg == kPeerCfg) return peer_header_offset(N, K) + peer_header_bytes(N, K);
  return 0;
}
CfgInfo config_info(int cfg) { return kInfo[(cfg >= 0 && cfg < kNumConfigs) ? cfg : 0]; }
bool config_supports(int cfg, int fmt) {
  if (cfg < 0 || cfg >= kNumConfigs || fmt < kW8 || fmt > kW4PG) return false;
  if (kInfo[cfg].kind == kRetired) return false;
  // per-channel: its GEMM is c6's kernel with the per-channel epilogue (sm_90a)
  if (cfg == kDequantCfg) return fmt == kW4PG || (fmt == kW4PC && dev_info().major == 9 && wgmma_available());
  if (cfg == kPeerCfg) return fmt == kW4PG && dev_info().major == 9 && peer_available();
  if (fmt != kW8 && !kInfo[cfg].w4) return false;
  if (is_tma_cfg(cfg)) return dev_info().major == 9 && tma_w8_available();
  const bool fits = fmt == kW8 ? decode_fits<kW8>(cfg) : fmt == kW4PC ? decode_fits<kW4PC>(cfg) : decode_fits<kW4PG>(cfg);
  if (!fits) return false;  // a decode ring too large for shared memory (c18 / c19 with W8 tiles)
  if (kInfo[cfg].kind >= 2) return dev_info().major == 9 && wgmma_available();
  return true;
}

// Defaults (docs/kernels-notes.md, "int8 GEMM engine"; sweeps on an H200): decode kernels up to 16
// rows (the swapped c14 / c15 / c17 up to 8, c13 / c1 above; plain mma.sync, so on every GPU, though
// only measured on the H200). On Hopper, W8A8: the warp-specialised c11 up to M = 64, wgmma c6
// (128x256; split-K up to 3 while its tiles do not fill the GPU) up to 256 and beyond when its tiles
// fill half the GPU, c7 (128x128, 2 CTAs/SM) otherwise (fifth session's sweep, with the hoisted
// epilogue). W4A8: the warp-specialised register-A kernels — c11 (64 tokens x 256 features) while its CTAs do not fill the
// GPU (it then splits K), c10 (128 x 256) otherwise (fifth session: 10-30 % faster than c7 at every
// M > 16). The mma.sync tiles elsewhere.
// W4A8 per-group from M = kDequantMinM on: dequantize to int8 in scratch memory, then the W8A8 GEMM
// (kDequantCfg; see w4a8_gemm_pg.cu). H100, fourteenth session (us, fused default vs c20): M = 1024 faster on all five
// bench shapes (4096x4096 43.6 vs 41.0, 14336x4096 126.7 vs 117.1, 4096x22016 261.2 vs 229.1), M = 4096 by 1.3-1.6x
// (4096x4096 183.8 vs 133.8); M = 512 slower on all five (4096x4096 33.8 vs 38.6, 14336x4096 75.7 vs 113.2).
// QTOOL_I8_W4PG_DQ=0 never, =1 for every M > 16 (read per call).
constexpr int kDequantMinM = 1024;
static bool dequant_wanted(int M) {
  const char* e = std::getenv("QTOOL_I8_W4PG_DQ");
  if (e && e[0] == '0') return false;
  if (e && e[0] == '1') return M > 16;
  return M >= kDequantMinM;
}

// kPeerCfg in place of kDequantCfg (where it fits: 4-64 row tiles). QTOOL_I8_W4PG_PEER=1 (read per call) asks for it.
// Not the default: H100, twenty-first session, x W8A8 paired, median of the five bench shapes, c20 vs c25:
// M = 1024 0.756 vs 0.513, M = 4096 0.926 vs 0.707 (4096x4096 M = 1024: 39.0 vs 58.7 us).
constexpr bool kPeerDefault = false;
static bool peer_wanted(int M) {
  if (!config_supports(kPeerCfg, kW4PG) || !peer_fits(M)) return false;
  const char* e = std::getenv("QTOOL_I8_W4PG_PEER");
  if (e && (e[0] == '0' || e[0] == '1')) return e[0] == '1';
  return kPeerDefault;
}

// W8A8 beyond M = 256 on TMA-multicast tiles (c26) instead of c6 / c7: QTOOL_I8_W8_TMA=26 (read per call); off by
// default. H100, twenty-second session, paired, M = 1024 / 4096 median x c6: c26 0.973 / 0.973; clusters of 4 (weights
// to 4 row tiles, or 2 x 2 with the activations; taken out) 0.52 / 0.79 — 4096x4096 M = 1024 in two waves.
constexpr int kTmaDefault = 0;
static int tma_wanted() {
  const char* e = std::getenv("QTOOL_I8_W8_TMA");
  int c = kTmaDefault;
  if (e && e[0]) c = std::atoi(e);
  return is_tma_cfg(c) && config_supports(c, kW8) ? c : 0;
}

// Per-channel W4A8 from M = kDequantPcMinM on: kDequantCfg too (q4 unpacked to int8, then c6 with the per-channel
// epilogue) in place of c10. H100, twenty-second session, paired, median x W8A8 of the five bench shapes, c10 vs c20:
// M = 4096 0.699 vs 0.909; M = 1024 0.723 vs 0.743, rows split 2 : 3 (11008x4096 / 14336x4096 favour c10), so not
// below M = 2048. QTOOL_I8_W4PC_DQ=0 never, =1 for every M > 16 (read per call).
constexpr int kDequantPcMinM = 2048;
static bool dequant_pc_wanted(int M) {
  if (!config_supports(kDequantCfg, kW4PC)) return false;
  const char* e = std::getenv("QTOOL_I8_W4PC_DQ");
  if (e && e[0] == '0') return false;
  if (e && e[0] == '1') return M > 16;
  return M >= kDequantPcMinM;
}

static int choose_cfg(int fmt, int M, int N, int K) {
  // decode: c13 (8 warps, 2 CTAs/SM) while the 32-column tiles do not fill the GPU (it then splits
  // K: H200 W4A8 g128 14336x4096 M=1 c1/s2 16.2 us, c13/s2 12.4), else c1 (4 warps, 3 CTAs/SM)
  if (M <= 16) {
    const bool few = (N + 31) / 32 < dev_info().sms;
    // up to 8 rows, the swapped decode (weights as the m16 operand: half the MMAs). H200 sweep, M = 1
    // and 4, us (swapped vs the c13 / c1 it replaces): while the 32-column tiles do not fill the GPU
    // c17 (4096x4096 chn 5.0 vs 5.9, g128 5.8 vs 6.0; 14336x4096 chn 10.5 vs 10.8, g128 11.9 vs 12.5,
    // W8 16.4 vs 16.8); else c14 (4096x22016 g128 17.3 vs 20.1, W8 26.2 vs 26.4) or, per-channel, c15
    // (15.5 vs 16.8; its 3 CTAs per SM do not fit with the per-group scale rows).
    // QTOOL_I8_DECODE_SW=0 keeps the unswapped kernels.
    // W4 while the tiles do not fill the GPU: the 16-warp c18 / c19, one CTA per SM and no split-K
    // (H100, thirteenth session, us vs the c17 / c13 at split 2 they replace: per-channel 14336x4096
    // M=1 11.1 vs 12.1, M=16 11.9 vs 12.9; 11008x4096 M=1 8.9 vs 10.0; g128 14336x4096 M=1 12.1 vs
    // 12.4, 11008x4096 M=16 10.5 vs 11.4; 4096x4096 M=1 g128 5.2 vs 5.6, chn 4.8 both). Below K = 8192
    // at M > 8 c13 stays (4096x4096 M=16 chn c13 5.1, c19 5.4).
    const char* sw = std::getenv("QTOOL_I8_DECODE_SW");
    const bool swap = M <= 8 && !(sw && sw[0] == '0');
    // Up to 4 rows, rings of 4 token rows (QTOOL_I8_DECODE_M4=0, read per call, keeps the 8-row c18 / c17 / c1)
    // (H200, sixteenth session, us, 8-row config vs 4-row): while the tiles do not fill the GPU, W4 c23 (c18's 16 warps
    // and 4 stages; g128 M=1 11008x4096 8.2 vs 8.0, 14336x4096 9.5 vs 9.3, 4096x4096 4.6 vs 4.5; chn equal) and W8 c24
    // (c17's 8 warps, a 5th stage in the smem the rows free: 11008x4096 12.9 vs 12.6, 14336x4096 16.2 vs 15.7);
    // per-group W4 below c14's wave c22 (8 warps, 3 CTAs per SM: 4096x12288's 384 tiles in one wave; c1 9.2 vs 8.4).
    // H100, same calls' A/B: c22 10.6 -> 9.6; c23 / c24 within 0.1-0.2 us of c18 / c17 (W8 11008x4096 16.6 -> 16.4).
    // Deeper rings of 4 rows did not help (c18's 16 warps with 5 stages: 11008x4096 g128 8.4; 12 warps with 6: 8.9),
    // nor L2 prefetches beyond the ring, nor 12 / 16-warp rings small enough for two CTAs per SM (8.9-12.2).
    const char* m4 = std::getenv("QTOOL_I8_DECODE_M4");
    const bool ring4 = swap && M <= 4 && !(m4 && m4[0] == '0');
    if (few && ring4) return fmt == kW8 ? 24 : 23;
    // At 9-16 rows the 12-warp c40 (4 stages) in place of c19 (16 warps, 3 stages; H100, twenty-fifth session, paired,
    // M = 16, us, c19 vs c40: g128 11008x4096 10.19 vs 10.06, 14336x4096 12.52 vs 12.43; chn 9.91 vs 9.59, 12.11 vs
    // 11.95; 4096x4096, below K = 8192, keeps c13: g128 5.55, c40 5.83).
    if (fmt != kW8 && few && (swap || K >= 8192)) return swap ? 18 : 40;
    if (swap) {
      if (few) return 17;
      if (fmt == kW4PC) return 15;
      // per-group: c14 only once its tiles fill a wave (4096x12288, 384 tiles for 4 x 132 slots: c14
      // 11.1 us, c1 10.2)
      if (fmt == kW4PG && (N + 31) / 32 < dev_info().sms * occupancy(fmt, 14))
        return ring4 && (N + 31) / 32 <= dev_info().sms * occupancy(fmt, 22) ? 22 : 1;
      // up to 4 rows, c21: a 3-stage ring of 4 token rows, so 6 per-group CTAs per SM instead of c14's 4 and
      // 4096x22016's 688 tiles in one wave (H100, fifteenth session, us, M = 1 / 4: g128 4096x22016 c21 16.7 / 17.0
      // with G1, 17.7 / 17.9 without, c14 19.0 / 19.4; W8 4096x12288 18.3 / 18.5 vs 19.8 / 20.0, 4096x22016
      // 32.0 / 32.3 vs 32.4 / 32.8). Not below 384 tiles (4096x12288 g128 M = 1: c1 10.3, c21 10.9).
      if (M <= 4) return 21;
      return 14;
    }
    if (few) return 13;
    // Where the tiles fill the GPU, rings of 16 rows small enough for more CTAs per SM (H100, twenty-third session,
    // paired, M = 16, us): W8 c27 (3 CTAs per SM against c1's 2: 4096x12288 18.9 vs 21.1, 4096x22016 33.1 vs 34.4);
    // per-channel W4 c28 (6 per SM) where c1's 3 per SM leave a second wave (4096x22016 18.0 vs 19.2; 4096x12288,
    // one wave of c1: 11.1 vs 10.4); per-group W4 there c37 (2 warps, 4 stages: 6 per SM; twenty-fifth session,
    // 4096x22016 18.61 vs c1 19.64, c28 22.44; 4096x12288, one wave of c1: 12.41 vs 10.77).
    if (fmt == kW8) return 27;
    const long long tiles = (N + 31) / 32, sms = dev_info().sms;
    const int second_wave_cfg = fmt == kW4PC ? 28 : 37;
    if (tiles > sms * occupancy(fmt, 1) && tiles <= sms * occupancy(fmt, second_wave_cfg)) return second_wave_cfg;
    return 1;
  }
  if (fmt == kW4PG && dequant_wanted(M)) return peer_wanted(M) ? kPeerCfg : kDequantCfg;
  if (fmt == kW4PC && dequant_pc_wanted(M)) return kDequantCfg;
  const char* w4wg = std::getenv("QTOOL_I8_W4_WGMMA");  // "0": W4A8 defaults avoid the wgmma configs
  const bool wg_ok = fmt == kW8 || !(w4wg && w4wg[0] == '0');
  if (wg_ok && config_supports(kFirstWgmmaCfg, fmt)) {
    if (fmt != kW8) return (M <= 256 && ctas_of(11, M, N) < dev_info().sms) ? 11 : 10;
    if (M <= 64) return 11;
    if (M <= 256) return 6;
    if (const int t = tma_wanted()) return t;
    return 2 * ctas_of(6, M, N) >= dev_info().sms ? 6 : 7;
  }
  if (M <= 32) return 2;
  if (M <= 128) return 3;
  if (M <= 256) return 4;
  return 5;
}

void choose(int fmt, int M, int N, int K, int* cfg_out, int* split_out) {
  const int cfg = choose_cfg(fmt, M, N, K);
  *cfg_out = cfg;
  if (cfg == kDequantCfg && fmt == kW4PC) {  // c6's kernel, split 1
    *split_out = 1;
    return;
  }
  if (cfg == kDequantCfg || cfg == kPeerCfg) {  // its split is that of the W8A8 GEMM it runs (kPeerCfg: 1)
    int c8;
    choose(kW8, M, N, K, &c8, split_out);
    return;
  }
  // W8 c6 at split 1 is the first run's kernel (w8a8_wgmma.cu), the fastest once the tiles fill the GPU
  *split_out = (cfg == 6 && fmt == kW8 && M > 256) ? 1 : choose_split(fmt, cfg, M, N, K);
}

// fresh_weights: B was written by the kernel just before (c20's scratch), so no PDL mode 2 (weights before the wait)
static int launch_impl(int fmt, const GemmArgs& p, int cfg, int split, cudaStream_t stream, const char** err,
                       bool fresh_weights);

// kDequantCfg: the dequantizing kernel, then the W8A8 default on its output. (Column slices whose dequantization
// overlaps the previous slice's GEMM on a side stream were measured and taken out, fourteenth session: 4096x22016
// M=1024 2 slices 229.7 us vs 228.1, M=4096 4 slices 806.1 vs 686.6. So were slices run one after another through
// one L2-sized scratch, seventeenth session: 4096x22016 M=1024 223-236 us in one pass, 227-240 in 4096-column
// slices; no shape gained.)
static int launch_dequant(int fmt, const GemmArgs& p, int split, cudaStream_t stream, const char** err) {
  if (!p.ws) {
    if (err) *err = "the dequantizing config needs a workspace of N*K bytes (GemmArgs::ws)";
    return -1;
  }
  if (fmt == kW4PC) {  // W8 = q4, then c6's kernel with the per-channel epilogue (same int32 sums: c10's bits)
    const int rc = dequantize_w4pc(p.B, p.N, p.K, p.ws, stream, err);
    if (rc != 0) return rc;
    GemmArgs q = p;
    q.B = p.ws;
    q.ws = nullptr;
    q.pdl = 0;
    const cudaError_t e = run_w8_weights_pc_epilogue(q, stream);
    return e == cudaSuccess ? 0 : static_cast<int>(e);
  }
  const int rc = dequantize_w4pg(p.B, p.s2, p.z2, p.N, p.K, p.group, p.ws, stream, err);
  if (rc != 0) return rc;
  GemmArgs q = p;
  q.B = p.ws;
  q.s2 = q.z2 = nullptr;
  q.pgs = nullptr;
  q.ws = nullptr;
  return launch_impl(kW8, q, -1, split, stream, err, true);
}

int launch(int fmt, const GemmArgs& p, int cfg, int split, cudaStream_t stream, const char** err) {
  return launch_impl(fmt, p, cfg, split, stream, err, false);
}

static int launch_impl(int fmt, const GemmArgs& p, int cfg, int split, cudaStream_t stream, const char** err,
                       bool fresh_weights) {
  auto bad = [&](const char* m) {
    if (err) *err = m;
    return -1;
  };
  if (fmt < kW8 || fmt > kW4PG) return bad("unknown weight format");
  if (p.M < 0 || p.N <= 0 || p.K <= 0) return bad("empty or negative dimensions");
  if (p.M == 0) return 0;
  if (fmt == kW8) {
    if (p.K % 16 != 0) return bad("W8A8 needs K % 16 == 0");
  } else {
    if (p.K % 32 != 0 || p.N % 32 != 0) return bad("W4A8 needs N and K multiples of 32");
    if (fmt == kW4PG && (p.group <= 0 || p.group % 32 != 0 || p.K % p.group != 0))
      return bad("W4A8 per-group needs a group size that is a multiple of 32 and divides K");
    if (fmt == kW4PC && (!p.sz || !p.xsum)) return bad("W4A8 per-channel needs s1_szeros and x_sum");
    if (fmt == kW4PG && (!p.s2 || !p.z2)) return bad("W4A8 per-group needs s2_scales and s2_zeros");
  }
  if (p.pgs && fmt != kW4PG) return bad("packed s2 tiles (GemmArgs::pgs) are for per-group W4A8 only");
  if (!p.A || !p.B || !p.sx || !p.sw || !p.out) return bad("missing tensor");
  const uintptr_t al = reinterpret_cast<uintptr_t>(p.A) | reinterpret_cast<uintptr_t>(p.B) |
                       reinterpret_cast<uintptr_t>(p.s2) | reinterpret_cast<uintptr_t>(p.z2) |
                       reinterpret_cast<uintptr_t>(p.pgs) | reinterpret_cast<uintptr_t>(p.out);
  if (al % 16) return bad("xq, the weight tensors and out must be 16-byte aligned");
  int c = cfg, s = split;
  if (c < 0) {
    int cc, ss;
    choose(fmt, p.M, p.N, p.K, &cc, &ss);
    c = cc;
    if (s <= 0) s = ss;
  }
  if (c >= kNumConfigs) return bad("unknown kernel config");
  if (kInfo[c].kind == kRetired) return bad("this config is retired (an experiment slower than the defaults)");
  if (!config_supports(c, fmt)) return bad("this config does not run this weight format on this GPU / build");
  if (c == kDequantCfg) return launch_dequant(fmt, p, s, stream, err);
  if (c == kPeerCfg) {
    if (!p.ws) return bad("the peer-dequantizing config needs a workspace (GemmArgs::ws, workspace_bytes())");
    // too few (or too many) row tiles to share a column: c20 in its scratch (its W8A8 GEMM picks the split if s <= 0)
    if (!peer_fits(p.M)) return launch_dequant(fmt, p, s, stream, err);
    const cudaError_t e = run_w4pg_peer(p, stream);
    return e == cudaSuccess ? 0 : static_cast<int>(e);
  }
  if (kInfo[c].kind == 0 && p.M > kInfo[c].bm) return bad("this decode config holds fewer rows than M");
  if (s <= 0) s = choose_split(fmt, c, p.M, p.N, p.K);
  if (s > 8 || (s > 1 && dev_info().major < 9)) return bad("split must be <= 8 (and 1 without clusters)");
  if (s > 1 && ctas_of(c, p.M, p.N) > 65535) return bad("too many CTAs for split-K");
  GemmArgs q = p;
  q.pdl = 0;
  if (kInfo[c].kind == 0 && dev_info().major >= 9) {
    // The decode kernels use programmatic dependent launch: default mode 2 (the first weight copies
    // before waiting for the previous kernel; weights must not be written by the kernel just before,
    // which holds for model weights). QTOOL_I8_PDL=0 / 1 / 2 overrides, read per call.
    const char* env = std::getenv("QTOOL_I8_PDL");
    q.pdl = (env && env[0] >= '0' && env[0] <= '2' && env[1] == 0) ? env[0] - '0' : 2;
    if (fresh_weights) q.pdl = std::min(q.pdl, 1);  // mode 2 would read the weights before they are written
  }
  cudaError_t e = ops_of(fmt, c).run(c, q, s, stream);
  if (e != cudaSuccess && q.pdl) {  // a driver without programmatic launch: plain launch
    cudaGetLastError();
    q.pdl = 0;
    e = ops_of(fmt, c).run(c, q, s, stream);
  }
  return e == cudaSuccess ? 0 : static_cast<int>(e);
}

}  // namespace qtool_i8
