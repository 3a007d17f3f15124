// Hopper (sm_90a) building blocks shared by the W4A16 and the int8 wgmma kernels: the shared-memory
// matrix descriptor of the K-major SWIZZLE_128B tiles both use, wgmma fences / groups, the fence
// that orders generic-proxy shared-memory writes (cp.async, st.shared) before wgmma reads them, and
// the mbarrier operations of the warp-specialised (producer / consumer) rings; and programmatic
// dependent launch, used by the decode kernels of both families (compiled for every architecture,
// a no-op below sm_90), with the host-side launch configuration (cluster split-K, PDL) and device query both share.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>
#endif

#if defined(__CUDACC__)
namespace qtool_pdl {
// Let the next kernel in the stream (launched with programmatic stream serialization) be scheduled
// now, and wait for the previous one (its completion and memory flush) before reading what it wrote.
__device__ __forceinline__ void pdl_launch_dependents(int pdl) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (pdl) asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait(bool cond) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (cond) asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Host: the launch configuration of a kernel that reduces split-K over a thread-block cluster of
// `cluster` CTAs (no cluster attribute when it is 1 × 1 × 1) and/or uses PDL (`pdl`: launched with
// programmatic stream serialization). `attr` holds the attributes and must outlive the launch.
inline cudaLaunchConfig_t launch_config(dim3 grid, int threads, int smem, cudaStream_t stream, dim3 cluster,
                                        bool pdl, cudaLaunchAttribute (&attr)[2]) {
  cudaLaunchConfig_t lc = {};
  lc.gridDim = grid;
  lc.blockDim = dim3(threads, 1, 1);
  lc.dynamicSmemBytes = smem;
  lc.stream = stream;
  int n = 0;
  if (cluster.x * cluster.y * cluster.z > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = cluster.x;
    attr[n].val.clusterDim.y = cluster.y;
    attr[n].val.clusterDim.z = cluster.z;
    ++n;
  }
  if (pdl) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  lc.attrs = attr;
  lc.numAttrs = n;
  return lc;
}
}  // namespace qtool_pdl

namespace qtool_dev {
// Host: the current device's SM count and compute-capability major, queried once per device (the config rules of
// both kernel families read them on every call).
struct DevInfo {
  int sms = 0, major = 0;
};
inline DevInfo dev_info() {
  static DevInfo cache[64];
  int d = 0;
  cudaGetDevice(&d);
  if (d < 0 || d >= 64) d = 0;
  if (cache[d].sms == 0) {
    cudaDeviceGetAttribute(&cache[d].major, cudaDevAttrComputeCapabilityMajor, d);
    int sms = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, d);
    cache[d].sms = sms > 0 ? sms : 1;
  }
  return cache[d];
}
}  // namespace qtool_dev

namespace qtool_tma {
// Host: the TMA descriptor of a row-major matrix [rows, cols] (cols contiguous) of fp16 (elem_bytes 2) or
// int8 / uint8 (elem_bytes 1) read in boxes of box_rows rows × 128 bytes into K-major SWIZZLE_128B tiles (the
// layout desc_sw128 describes; rows and columns past the matrix arrive as zeros). The driver's encoder is fetched once through the runtime, so nothing links
// against libcuda. False when it is unavailable or refuses the shape (the caller reports).
inline bool encode_rows_sw128(CUtensorMap* map, const void* base, long long rows, long long cols, int box_rows,
                             int elem_bytes = 2) {
  using Encode = PFN_cuTensorMapEncodeTiled_v12000;
  static Encode encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult q;
#if CUDART_VERSION >= 12050
    const cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q);
#else  // toolkits before 12.5 have only the unversioned lookup
    const cudaError_t e = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &q);
#endif
    if (e != cudaSuccess || q != cudaDriverEntryPointSuccess) fn = nullptr;
    return reinterpret_cast<Encode>(fn);
  }();
  if (!encode) return false;
  const cuuint64_t dims[2] = {(cuuint64_t)cols, (cuuint64_t)rows};
  const cuuint64_t strides[1] = {(cuuint64_t)cols * elem_bytes};
  const cuuint32_t box[2] = {(cuuint32_t)(128 / elem_bytes), (cuuint32_t)box_rows};
  const cuuint32_t estr[2] = {1, 1};
  const CUtensorMapDataType dt = elem_bytes == 1 ? CU_TENSOR_MAP_DATA_TYPE_UINT8 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  return encode(map, dt, 2, const_cast<void*>(base), dims, strides, box, estr,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}
}  // namespace qtool_tma
#endif

#if defined(QTOOL_HAS_SM90A) && defined(__CUDACC__)
// The accumulator operands of a wgmma inline asm, d[i] .. d[i + 31] / d[i + 63] / d[0] .. d[127], each with
// constraint C ("+f" for fp32 accumulators, "+r" for int32): `QTOOL_WG_ACC64("+r", d, 0)` is
// `"+r"(d[0]), ..., "+r"(d[63])`.
#define QTOOL_WG_ACC8(C, d, i) \
  C(d[i]), C(d[i + 1]), C(d[i + 2]), C(d[i + 3]), C(d[i + 4]), C(d[i + 5]), C(d[i + 6]), C(d[i + 7])
#define QTOOL_WG_ACC32(C, d, i) \
  QTOOL_WG_ACC8(C, d, i), QTOOL_WG_ACC8(C, d, i + 8), QTOOL_WG_ACC8(C, d, i + 16), QTOOL_WG_ACC8(C, d, i + 24)
#define QTOOL_WG_ACC64(C, d, i) QTOOL_WG_ACC32(C, d, i), QTOOL_WG_ACC32(C, d, i + 32)
#define QTOOL_WG_ACC128(C, d) QTOOL_WG_ACC64(C, d, 0), QTOOL_WG_ACC64(C, d, 64)

namespace qtool_sm90 {

// Descriptor of a K-major SWIZZLE_128B tile (128-byte rows, 1024-byte-aligned 8-row atoms) at `addr`.
__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr) {
  uint64_t d = 0;
  d |= static_cast<uint64_t>((addr & 0x3FFFF) >> 4);
  d |= static_cast<uint64_t>(1) << 16;          // leading byte offset (unused for swizzled K-major)
  d |= static_cast<uint64_t>(1024 >> 4) << 32;  // stride byte offset: 8 rows x 128 B
  d |= static_cast<uint64_t>(1) << 62;          // SWIZZLE_128B
  return d;
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// mbarriers (shared::cta) for producer / consumer rings
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, int parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// An arrival on `bar` once every cp.async this thread issued so far has landed (counted in the
// barrier's expected arrivals: .noinc), so a producer signals "stage full" without waiting for it.
__device__ __forceinline__ void cp_async_mbar_arrive(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

// Cluster-shared rings (TMA multicast): the barrier's expected transaction bytes for this phase
// (no arrival); an arrival on the barrier at the same offset in CTA `rank` of the cluster (default
// .release.cta semantics: what it orders is this CTA's own finished reads of the slot; .release.cluster
// costs a MEMBAR.ALL.GPU per arrival, which made the multicast kernels 35-70 % slower); cluster barriers
// with release / acquire, or ordering execution only (after mbarrier init and its fence).
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive_remote(uint32_t bar, uint32_t rank) {
  asm volatile(
      "{\n"
      ".reg .b32 ra;\n"
      "mapa.shared::cluster.u32 ra, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [ra];\n"
      "}\n" ::"r"(bar),
      "r"(rank)
      : "memory");
}
// An arrival on the local barrier that also adds `bytes` to the transactions its current phase expects.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// (cg's this_cluster().sync() emits the same barrier plus divergence handling; the measured kernels use this)
__device__ __forceinline__ void cluster_sync_all() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_sync_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\nbarrier.cluster.wait.aligned;\n" ::: "memory");
}
// A 2-D TMA tile load (box of the tensor map `tmap`, coordinates c0 innermost, c1) into `dst` of every
// CTA in `mask`, each completing the box's bytes as transactions on the barrier at offset `bar` of its
// own shared memory.
__device__ __forceinline__ void tma_load_2d_multicast(uint32_t dst, const void* tmap, int c0, int c1, uint32_t bar,
                                                      uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%3, %4}], [%2], %5;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(tmap)), "r"(bar), "r"(c0), "r"(c1), "h"(mask)
      : "memory");
}

// The same copy into this CTA's shared memory only.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const void* tmap, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(tmap)), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
}
// A 2-D TMA tile store of the shared-memory box at `src` to the tensor map's coordinates (c0 innermost, c1); parts
// of the box past the tensor's bounds are not written. Completion: bulk_commit, then bulk_wait_read before the
// shared memory is reused or the CTA exits.
__device__ __forceinline__ void tma_store_2d(const void* tmap, uint32_t src, int c0, int c1) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];\n" ::"l"(
                   reinterpret_cast<uint64_t>(tmap)),
               "r"(src), "r"(c0), "r"(c1)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}

}  // namespace qtool_sm90
#endif
