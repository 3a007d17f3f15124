// Host interface of the W4A16 QUICK kernels: plain C++ (no torch), shared by the torch binding,
// the per-dtype launch units and any standalone test program.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace qtool_w4a16 {

enum DType { kF16 = 0, kBF16 = 1 };

constexpr int kRetired = 7;  // ConfigInfo::ring of a retired config id
struct ConfigInfo {
  const char* name;
  int rows, cols, wk, threads;  // CTA tile rows × cols, warps along K, threads per CTA
  int ring;                     // 0: staged; decode kernels (A slice resident): 3 group-chunk register ring,
                                // 4 transposed (fp16); 5 wgmma, 6 register-A wgmma (fp16, sm_90a);
                                // kRetired: a retired config, refused (1 / 2 were the per-k-tile decode rings)
  int kunit;                    // k-tiles per unit of work (gdec: U, needs group % (32·U) == 0)
  int avail = 1;                // 0: not runnable here (wgmma configs without an sm_90a build / Hopper)
  int pdl = 0;                  // 1: the kernel calls griddepcontrol (launched with programmatic serialization)
  int mc = 1;                   // CTAs sharing each activation tile (TMA multicast over a cluster column pair)
};

int num_configs();
ConfigInfo config_info(int cfg);

// Whether config cfg runs this problem at this split (the launcher's own checks, shared memory
// included), on the current GPU and build.
bool config_fits(int cfg, int dtype, int M, int N, int K, int group, int split);

// Default (cfg, split) for a problem: M rows, N (multiple of 128) columns, K (multiple of 32).
void choose(int M, int N, int K, int group, int dtype, int* cfg, int* split);

// Split-K through global memory (the multicast configs split K that way rather than over a cluster,
// so their clusters stay CTA pairs): fp32 partial tiles (`bytes`, any contents) and one int counter per
// output tile (`counters`), for this problem with cfg / split resolved as launch() resolves them.
struct Workspace {
  size_t bytes = 0;
  int counters = 0;
};
Workspace workspace_need(int dtype, int M, int N, int K, int group, int cfg, int split);

// Validate shapes and launch on `stream`. cfg < 0 / split <= 0 mean "choose". `workspace` (16-byte
// aligned) and `counters`: as workspace_need() says (may be null where it needs none); the counters must
// be zero at launch, and each launch leaves them zero again (the last K slice of a tile resets its own),
// so one zeroed array serves every launch of one stream. Returns 0 on success, a cudaError_t value on a
// CUDA error, or -1 (bad argument; `err` gets a message).
int launch(int dtype, const void* x, const int32_t* qweight, const void* scales, const int32_t* qzeros,
           void* out, int M, int N, int K, int group, int cfg, int split, void* workspace, int* counters,
           cudaStream_t stream, const char** err);

}  // namespace qtool_w4a16
