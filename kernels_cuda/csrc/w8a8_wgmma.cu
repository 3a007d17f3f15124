// W8A8 wgmma (sm_90a) instantiations; see w8a8_wgmma.cuh.
//
// Config c6 for W8 with split 1 runs `wg1::w8a8_wgmma_kernel`, the kernel of the first GPU run
// (its main loop kept verbatim; the copy descriptors are the shared TileCopier, SASS unchanged): same
// algorithm as the templated kernel, but a leaner main loop (~190 instead of
// ~320 instructions per k-tile around the four IGMMAs) that measured 1.3-1.4x faster at M >= 1024
// (4096x4096 M=4096: 133.5 vs 188.5 us on an H200). Split-K and the other tiles use the template.
#include "w8a8_wgws.cuh"

namespace qtool_i8 {
#if defined(QTOOL_HAS_SM90A)
namespace wg1 {
constexpr int BM = 128, BN = 256, STAGES = 4, NTHR = 256;
constexpr int A_BYTES = BM * 128, B_BYTES = BN * 128, STAGE = A_BYTES + B_BYTES;
constexpr int LDR = BN + 8;
constexpr int EPI = BM * LDR * 4;
constexpr int SMEM = (STAGES * STAGE > EPI ? STAGES * STAGE : EPI) + 1024;
constexpr int ITER_A = BM * 8 / NTHR, ITER_B = BN * 8 / NTHR;
__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr) {
  uint64_t d = 0;
  d |= static_cast<uint64_t>((addr & 0x3FFFF) >> 4);
  d |= static_cast<uint64_t>(1) << 16;
  d |= static_cast<uint64_t>(1024 >> 4) << 32;
  d |= static_cast<uint64_t>(1) << 62;
  return d;
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// d += A(64x32, smem desc) * B(256x32, smem desc)^T, int8 -> int32 (scale-d = 1: accumulate).
__device__ __forceinline__ void wgmma_m64n256k32_s8(int (&d)[128], uint64_t da, uint64_t db) {
  const int scale_d = 1;
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
      "%128, %129, p;\n"
      "}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
        "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
        "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
        "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
        "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]),
        "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]),
        "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]),
        "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63]),
        "+r"(d[64]), "+r"(d[65]), "+r"(d[66]), "+r"(d[67]), "+r"(d[68]), "+r"(d[69]), "+r"(d[70]), "+r"(d[71]),
        "+r"(d[72]), "+r"(d[73]), "+r"(d[74]), "+r"(d[75]), "+r"(d[76]), "+r"(d[77]), "+r"(d[78]), "+r"(d[79]),
        "+r"(d[80]), "+r"(d[81]), "+r"(d[82]), "+r"(d[83]), "+r"(d[84]), "+r"(d[85]), "+r"(d[86]), "+r"(d[87]),
        "+r"(d[88]), "+r"(d[89]), "+r"(d[90]), "+r"(d[91]), "+r"(d[92]), "+r"(d[93]), "+r"(d[94]), "+r"(d[95]),
        "+r"(d[96]), "+r"(d[97]), "+r"(d[98]), "+r"(d[99]), "+r"(d[100]), "+r"(d[101]), "+r"(d[102]), "+r"(d[103]),
        "+r"(d[104]), "+r"(d[105]), "+r"(d[106]), "+r"(d[107]), "+r"(d[108]), "+r"(d[109]), "+r"(d[110]), "+r"(d[111]),
        "+r"(d[112]), "+r"(d[113]), "+r"(d[114]), "+r"(d[115]), "+r"(d[116]), "+r"(d[117]), "+r"(d[118]), "+r"(d[119]),
        "+r"(d[120]), "+r"(d[121]), "+r"(d[122]), "+r"(d[123]), "+r"(d[124]), "+r"(d[125]), "+r"(d[126]), "+r"(d[127])
      : "l"(da), "l"(db), "r"(scale_d));
}

__global__ void __launch_bounds__(NTHR, 1) w8a8_wgmma_kernel(const GemmArgs p) {
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t raw_u = smem_u32(smem_raw);
  const uint32_t base_u = (raw_u + 1023u) & ~1023u;
  uint8_t* smem = smem_raw + (base_u - raw_u);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wgi = warp >> 2, wq = warp & 3;
  const int g = lane >> 2, tig = lane & 3;
  const int M = p.M, N = p.N, K = p.K;
  const int tiles_m = (M + BM - 1) / BM, tiles_n = (N + BN - 1) / BN;
  int tm, tn;
  raster(blockIdx.x, tiles_m, tiles_n, tm, tn);
  const int m0 = tm * BM, n0 = tn * BN;
  const int nk = (K + 127) / 128;
  const TileCopier<kW8, BN, NTHR, ITER_A, ITER_B, B_BYTES> copier(p, tid, m0, n0);
  auto load_stage = [&](int slot, int kt) {
    const uint32_t sA = base_u + slot * STAGE;
    copier.load(p, sA, sA + A_BYTES, n0, kt);
  };
  int acc[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) acc[i] = 0;
#pragma unroll
  for (int s = 0; s < STAGES - 2; ++s) {
    if (s < nk) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < nk; ++kt) {
    cp_async_wait<STAGES - 3>();
    fence_proxy_async();
    __syncthreads();
    {
      const int nxt = kt + STAGES - 2;
      if (nxt < nk) load_stage(nxt % STAGES, nxt);
      cp_async_commit();
    }
    const uint32_t sA = base_u + (kt % STAGES) * STAGE + wgi * 64 * 128, sB = base_u + (kt % STAGES) * STAGE + A_BYTES;
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < 4; ++s) wgmma_m64n256k32_s8(acc, desc_sw128(sA + 32 * s), desc_sw128(sB + 32 * s));
    wgmma_commit();
    wgmma_wait<1>();
  }
  wgmma_wait<0>();
#pragma unroll
  for (int i = 0; i < 128; ++i) asm volatile("" : "+r"(acc[i])::"memory");
  cp_async_wait<0>();
  __syncthreads();
  int* red = reinterpret_cast<int*>(smem);
  const int rbase = wgi * 64 + wq * 16 + g;
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    const int c = 8 * j + 2 * tig;
    *reinterpret_cast<int2*>(red + rbase * LDR + c) = make_int2(acc[4 * j], acc[4 * j + 1]);
    *reinterpret_cast<int2*>(red + (rbase + 8) * LDR + c) = make_int2(acc[4 * j + 2], acc[4 * j + 3]);
  }
  __syncthreads();
  reduce_store<kW8, BM, BN, LDR, NTHR>(p, red, m0, n0, 1, 0);
}

}  // namespace wg1

static cudaError_t run_w8(int cfg, const GemmArgs& p, int split, cudaStream_t stream) {
  if (cfg == kFirstWgmmaCfg && split <= 1) {
    static cudaError_t e0 =
        cudaFuncSetAttribute(wg1::w8a8_wgmma_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, wg1::SMEM);
    if (e0 != cudaSuccess) return e0;
    const int ctas = ((p.M + wg1::BM - 1) / wg1::BM) * ((p.N + wg1::BN - 1) / wg1::BN);
    return launch_kernel(wg1::w8a8_wgmma_kernel, dim3(ctas, 1, 1), wg1::NTHR, wg1::SMEM, 1, stream, p);
  }
  return run_hopper<kW8>(cfg, p, split, stream);
}
FmtOps fmt_ops_wg_w8() { return {run_w8, occupancy_hopper<kW8>}; }
bool wgmma_available() { return true; }
#else
static cudaError_t no_run(int, const GemmArgs&, int, cudaStream_t) { return cudaErrorNotSupported; }
static int no_occ(int) { return 0; }
FmtOps fmt_ops_wg_w8() { return {no_run, no_occ}; }
bool wgmma_available() { return false; }
#endif
}  // namespace qtool_i8
