"""Lazy loader of the qtool CUDA extension and its op table.

Importing this module touches neither CUDA nor the compiler. `load()` JIT-builds the extension
with ninja (torch.utils.cpp_extension) into a cache folder keyed by a hash of the sources, the
torch/CUDA versions and the GPU architecture, then loads it; later calls are free.

    from kernels_cuda import ops
    ops.load()                     # raises RuntimeError with the reason where it cannot run
    fns = ops.cuda_ops()           # {"w4a16_gemm": callable(x, qweight, scales, qzeros, group_size)}

Build folder: ``$QTOOL_KERNELS_BUILD`` if set, else ``$QTOOL_HOME/kernels_cuda-build``, else
``~/.cache/qtool/kernels_cuda-build``; one sub-folder per hash.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Callable

CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = ("binding.cpp", "w4a16_host.cu", "w4a16_f16.cu", "w4a16_bf16.cu")
_HEADERS = ("w4a16_api.h", "w4a16_kernel.cuh", "w4a16_launch.cuh")
LIB = "qtool_cuda"

_lock = threading.Lock()
_loaded: str | None = None  # path of the loaded library


def build_root() -> Path:
    if os.environ.get("QTOOL_KERNELS_BUILD"):
        return Path(os.environ["QTOOL_KERNELS_BUILD"])
    if os.environ.get("QTOOL_HOME"):
        return Path(os.environ["QTOOL_HOME"]) / "kernels_cuda-build"
    return Path.home() / ".cache" / "qtool" / "kernels_cuda-build"


def _arch_flags(major: int, minor: int) -> tuple[str, list[str]]:
    if (major, minor) == (9, 0):
        arch = "90a"  # Hopper: the sm_90a target (clusters, and room for wgmma later)
    else:
        arch = f"{major}{minor}"
    return arch, [f"-gencode=arch=compute_{arch},code=sm_{arch}"]


def source_hash(extra: str = "") -> str:
    h = hashlib.sha256()
    for name in _SOURCES + _HEADERS:
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    h.update(extra.encode())
    return h.hexdigest()[:16]


def load(verbose: bool | None = None) -> str:
    """Build (if needed) and load the extension; returns the library path. Idempotent."""
    global _loaded
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(
                "kernels_cuda needs an NVIDIA GPU visible to PyTorch (torch.cuda.is_available() is "
                f"False; torch {torch.__version__}, CUDA build: {torch.version.cuda})"
            )
        if torch.version.cuda is None:
            raise RuntimeError(f"kernels_cuda needs a CUDA build of PyTorch, this is {torch.__version__}")
        from torch.utils import cpp_extension

        if cpp_extension.CUDA_HOME is None:
            raise RuntimeError("kernels_cuda: no CUDA toolkit (nvcc) found; set CUDA_HOME")
        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            raise RuntimeError(f"kernels_cuda needs compute capability >= 8.0, this GPU is {major}.{minor}")
        arch, gencode = _arch_flags(major, minor)
        cxxstd = os.environ.get("QTOOL_KERNELS_CXXSTD", "")
        key = source_hash(f"{torch.__version__}|{torch.version.cuda}|{arch}|{cxxstd}")
        name = f"qtool_cuda_{key}"
        build_dir = build_root() / name
        build_dir.mkdir(parents=True, exist_ok=True)
        if verbose is None:
            verbose = os.environ.get("QTOOL_KERNELS_VERBOSE", "") not in ("", "0")
        old_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}" + ("a" if arch.endswith("a") else "")
        try:
            cpp_extension.load(
                name=name,
                sources=[str(CSRC / s) for s in _SOURCES],
                extra_cflags=["-O3"] + ([f"-std={cxxstd}"] if cxxstd else []),
                extra_cuda_cflags=["-O3", "-lineinfo", *gencode],
                extra_include_paths=[str(CSRC)],
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=verbose,
            )
        except Exception as e:
            raise RuntimeError(f"kernels_cuda: building/loading the extension in {build_dir} failed: {e}") from e
        finally:
            if old_arch is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = old_arch
        _register_fakes()
        _loaded = str(build_dir)
        return _loaded


def _register_fakes() -> None:
    import torch

    if not hasattr(torch.library, "register_fake"):
        return

    def _fake(x, qweight, scales, qzeros, group_size, *rest):
        return x.new_empty((*x.shape[:-1], qweight.shape[1] * 2))

    for op in ("w4a16_gemm", "w4a16_gemm_cfg"):
        try:
            torch.library.register_fake(f"{LIB}::{op}")(_fake)
        except RuntimeError:
            pass  # already registered (a second load in the same process)


def check_args(x, qweight, scales, qzeros, group_size: int) -> None:
    """Python-side argument checks with clear messages (the C++ op checks again)."""
    import torch

    K = x.shape[-1]
    if x.dim() < 1 or qweight.dim() != 2 or scales.dim() != 2 or qzeros.dim() != 2:
        raise ValueError("w4a16_gemm: x [..., K], qweight [K/4, N/2], scales [G, 2N], qzeros [G, N/4]")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"w4a16_gemm: x must be float16/bfloat16 (or float32), got {x.dtype}")
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32 or scales.dtype != torch.float16:
        raise TypeError("w4a16_gemm: qweight and qzeros must be int32, scales float16")
    N = qweight.shape[1] * 2
    if qweight.shape[0] * 4 != K:
        raise ValueError(f"w4a16_gemm: x has K={K} columns but qweight holds {qweight.shape[0] * 4}")
    if N % 128 or K % 32:
        raise ValueError(f"w4a16_gemm: need N % 128 == 0 and K % 32 == 0 (N={N}, K={K})")
    if group_size <= 0 or group_size % 32 or K % group_size:
        raise ValueError(f"w4a16_gemm: group_size {group_size} must be a multiple of 32 dividing K={K}")
    G = K // group_size
    if tuple(scales.shape) != (G, 2 * N) or tuple(qzeros.shape) != (G, N // 4):
        raise ValueError(
            f"w4a16_gemm: scales must be [{G}, {2 * N}] and qzeros [{G}, {N // 4}], "
            f"got {tuple(scales.shape)} and {tuple(qzeros.shape)}"
        )
    if not (x.is_cuda and qweight.is_cuda and scales.is_cuda and qzeros.is_cuda):
        raise ValueError("w4a16_gemm: all tensors must be on the GPU")


def w4a16_gemm(x, qweight, scales, qzeros, group_size: int):
    """x [..., Kp] fp16/bf16 (fp32 runs in fp16 and returns fp32) → [..., Np] in x's dtype."""
    import torch

    check_args(x, qweight, scales, qzeros, group_size)
    if x.dtype == torch.float32:
        return torch.ops.qtool_cuda.w4a16_gemm(x.half(), qweight, scales, qzeros, group_size).float()
    return torch.ops.qtool_cuda.w4a16_gemm(x, qweight, scales, qzeros, group_size)


def w4a16_gemm_cfg(x, qweight, scales, qzeros, group_size: int, cfg: int = -1, split: int = 0):
    """Same as w4a16_gemm with an explicit kernel config / split-K (for tuning and tests)."""
    import torch

    check_args(x, qweight, scales, qzeros, group_size)
    return torch.ops.qtool_cuda.w4a16_gemm_cfg(x, qweight, scales, qzeros, group_size, cfg, split)


def w4a16_gemm_cfg_out(x, qweight, scales, qzeros, group_size: int, cfg: int, split: int, out) -> None:
    """Writes into `out` ([M, N], x's dtype, contiguous): lets tests poison the output first."""
    import torch

    check_args(x, qweight, scales, qzeros, group_size)
    torch.ops.qtool_cuda.w4a16_gemm_cfg_out(x, qweight, scales, qzeros, group_size, cfg, split, out)


def choose(M: int, N: int, K: int, group_size: int, bf16: bool = False) -> tuple[int, int]:
    """The (cfg, split) the op picks by default for this problem on the current GPU."""
    import torch

    cfg, split = torch.ops.qtool_cuda.w4a16_choose(M, N, K, group_size, int(bf16))
    return int(cfg), int(split)


def config_info(cfg: int) -> dict:
    import torch

    rows, cols, wk, threads, n, ring = torch.ops.qtool_cuda.w4a16_config_info(cfg)
    return {"rows": rows, "cols": cols, "wk": wk, "threads": threads, "num_configs": n, "ring": bool(ring)}


def cuda_ops() -> dict[str, Callable]:
    """Op name → callable with the reference op's signature (loads the extension)."""
    load()
    return {"w4a16_gemm": w4a16_gemm}
