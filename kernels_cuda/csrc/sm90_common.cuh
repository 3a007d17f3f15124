// Hopper (sm_90a) building blocks shared by the W4A16 and the int8 wgmma kernels: the shared-memory
// matrix descriptor of the K-major SWIZZLE_128B tiles both use, wgmma fences / groups, and the fence
// that orders generic-proxy shared-memory writes (cp.async, st.shared) before wgmma reads them.
#pragma once
#include <stdint.h>

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

}  // namespace qtool_sm90
#endif
