// Hopper (sm_90a) building blocks shared by the W4A16 and the int8 wgmma kernels: the shared-memory
// matrix descriptor of the K-major SWIZZLE_128B tiles both use, wgmma fences / groups, the fence
// that orders generic-proxy shared-memory writes (cp.async, st.shared) before wgmma reads them, and
// the mbarrier operations of the warp-specialised (producer / consumer) rings; and programmatic
// dependent launch, used by the decode kernels of both families (compiled for every architecture,
// a no-op below sm_90), with the host-side launch configuration (cluster split-K, PDL) both share.
#pragma once
#include <stdint.h>

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
#endif

#if defined(QTOOL_HAS_SM90A) && defined(__CUDACC__)
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

}  // namespace qtool_sm90
#endif
