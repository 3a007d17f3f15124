"""Lazy loader of the qtool CUDA extension and its op table.

Importing this module touches neither CUDA nor the compiler. `load()` JIT-builds the extension
with ninja (torch.utils.cpp_extension) into a cache folder keyed by a hash of the sources, the
torch/CUDA versions and the GPU architecture, then loads it; later calls are free.

    from kernels_cuda import ops
    ops.load()                     # raises RuntimeError with the reason where it cannot run
    fns = ops.cuda_ops()           # {"w4a16_gemm": callable(x, qweight, scales, qzeros, group_size), ...}

Ops (issue 7; CUDA kernels with the reference ops' signatures where a reference op exists):
``quantize_per_token``, ``quantize_per_tensor``, ``w8a8_gemm`` (qtool.nn.w8a8), ``w4a8_gemm``,
``kv4_quantize`` (qtool.nn.w4a8); plus ``quantize_per_token_sum``, ``rmsnorm_quantize``,
``kv4_write`` and ``kv4_decode_attention`` with PyTorch references in this module
(``*_reference``). KV4 cache layout: see ``kv4_pack_cache``.

Build folder: ``$QTOOL_KERNELS_BUILD`` if set, else ``$QTOOL_HOME/kernels_cuda-build``, else
``~/.cache/qtool/kernels_cuda-build``; one sub-folder per hash.
"""

from __future__ import annotations

import hashlib
import os
import threading
import weakref
from pathlib import Path
from typing import Callable

CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = (
    "binding.cpp",
    "w4a16_host.cu",
    "w4a16_f16.cu",
    "w4a16_bf16.cu",
    "w8a8_gemm.cu",
    "w8a8_wgmma.cu",
    "w4a8_wgmma_pc.cu",
    "w4a8_wgmma_pg.cu",
    "w4a8_gemm_pc.cu",
    "w4a8_gemm_pg.cu",
    "w4a8_peer_pg.cu",
    "w8a8_tma.cu",
    "act_quant_kernels.cu",
    "kv4_attention.cu",
)
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
    # every source and header in csrc/, so a new header can never be left out of the cache key
    for path in sorted(q for q in CSRC.iterdir() if q.suffix in (".cu", ".cuh", ".cpp", ".h")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
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
        defines = ["-DQTOOL_HAS_SM90A"] if arch == "90a" else []  # the wgmma W8A8 kernel
        try:
            cpp_extension.load(
                name=name,
                sources=[str(CSRC / s) for s in _SOURCES],
                extra_cflags=["-O3"] + ([f"-std={cxxstd}"] if cxxstd else []),
                extra_cuda_cflags=["-O3", "-lineinfo", *gencode, *defines],
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

    def _reg(op, fn):
        try:
            torch.library.register_fake(f"{LIB}::{op}")(fn)
        except RuntimeError:
            pass  # already registered (a second load in the same process)

    for op in ("w4a16_gemm", "w4a16_gemm_cfg"):
        _reg(op, _fake)

    def _rowvec(x):
        return x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)

    _reg("quantize_per_token", lambda x: (x.new_empty(x.shape, dtype=torch.int8), _rowvec(x)))
    _reg("quantize_per_token_sum", lambda x: (x.new_empty(x.shape, dtype=torch.int8), _rowvec(x), _rowvec(x)))
    _reg("rmsnorm_quantize",
         lambda x, w, eps: (x.new_empty(x.shape, dtype=torch.int8), _rowvec(x), _rowvec(x)))
    _reg("quantize_per_tensor", lambda x, s: x.new_empty(x.shape, dtype=torch.int8))
    _reg("w8a8_gemm", lambda xq, xs, w, ws, b, dt: xq.new_empty((xq.shape[0], w.shape[0]), dtype=dt))
    _reg("w4a8_gemm", lambda xq, xs, xsum, qw, s1, sz, s2, z2, g, b=None, dt=None, tiles=None:
         xq.new_empty((xq.shape[0], qw.shape[0]), dtype=torch.float32 if dt is None else dt))
    _reg("w4a8_dequantize", lambda qw, s2, z2, g: qw.new_empty((qw.shape[0], 2 * qw.shape[1]), dtype=torch.int8))
    _reg("kv4_quantize", lambda x: (x.new_empty(x.shape, dtype=torch.uint8),
                                    x.new_empty((*x.shape[:-1], 1), dtype=torch.float16),
                                    x.new_empty((*x.shape[:-1], 1), dtype=torch.float16)))
    _reg("kv4_decode_attention", lambda q, kc, kp, vc, vp, ctx, sc, split=0: q.new_empty(q.shape))
    for op in ("act_quant_out", "w8a8_gemm_out", "w4a8_gemm_out", "kv4_write", "kv4_decode_attention_out"):
        _reg(op, lambda *a, **k: None)


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

    rows, cols, wk, threads, n, kind, kunit, avail, pdl, mc = torch.ops.qtool_cuda.w4a16_config_info(cfg)
    return {"rows": rows, "cols": cols, "wk": wk, "threads": threads, "num_configs": n,
            "kind": ("staged", "ring", "aring", "gdec", "tdec", "wgmma", "wgrs", "retired")[kind],
            "kunit": kunit, "available": bool(avail), "pdl": bool(pdl), "multicast": mc}


def config_fits(cfg: int, N: int, K: int, group_size: int, split: int, M: int = 1, bf16: bool = False) -> bool:
    """Whether W4A16 config `cfg` runs this problem at this split-K: the launcher's own checks (CTA
    width, k-unit vs group, work per K-warp, shared memory, GPU / build)."""
    import torch

    return bool(torch.ops.qtool_cuda.w4a16_config_fits(cfg, M, N, K, group_size, int(bf16), split))


# ================================================================================================
# issue 7: int8 activation quantization, W8A8 / W4A8 GEMMs, KV4 cache (csrc/act_quant_*, w8a8_*,
# w4a8_*, kv4_*). Each wrapper has the signature of the reference op it replaces and falls back to
# that reference where the kernel does not apply (CPU tensors, unsupported shapes), so a backend
# mapping it is always correct.
# ================================================================================================

FMT_W8, FMT_W4PC, FMT_W4PG = 0, 1, 2
_FLOATS = None


def _floats():
    global _FLOATS
    if _FLOATS is None:
        import torch

        _FLOATS = (torch.float16, torch.bfloat16, torch.float32)
    return _FLOATS


def quantize_per_token(x):
    """x [..., K] → (q int8 [..., K], scale fp32 [..., 1]); bit-exact with qtool.quant.activations."""
    import torch

    if not x.is_cuda or x.dtype not in _floats() or x.shape[-1] == 0:
        from qtool.quant.activations import quantize_per_token as ref

        return ref(x)
    q, s = torch.ops.qtool_cuda.quantize_per_token(x)
    return q, s


def quantize_per_token_sum(x):
    """x [..., K] → (q, scale, sum) with sum = scale · Σ_k q (the row sum of the dequantized
    activations, what the per-channel W4A8 epilogue subtracts: x_sum in `w4a8_gemm`)."""
    import torch

    if not x.is_cuda or x.dtype not in _floats() or x.shape[-1] == 0:
        return quantize_per_token_sum_reference(x)
    return tuple(torch.ops.qtool_cuda.quantize_per_token_sum(x))


def quantize_per_token_sum_reference(x):
    from qtool.quant.activations import quantize_per_token as ref

    q, s = ref(x)
    return q, s, q.to(s.dtype).sum(dim=-1, keepdim=True) * s


def rmsnorm_quantize(x, weight, eps: float = 1e-6):
    """Fused RMSNorm (Hugging Face LlamaRMSNorm numerics, in x's dtype) + per-token int8 + row sum."""
    import torch

    if not x.is_cuda or x.dtype not in _floats() or x.shape[-1] == 0:
        return rmsnorm_quantize_reference(x, weight, eps)
    return tuple(torch.ops.qtool_cuda.rmsnorm_quantize(x, weight, float(eps)))


def rmsnorm_quantize_reference(x, weight, eps: float = 1e-6):
    """PyTorch reference: y = weight · (x · rsqrt(mean(x²) + eps)).to(x.dtype) (HF), then per-token."""
    import torch

    xf = x.to(torch.float32)
    var = xf.pow(2).mean(-1, keepdim=True)
    h = (xf * torch.rsqrt(var + eps)).to(x.dtype)
    y = weight.to(x.dtype) * h
    return quantize_per_token_sum_reference(y)


def quantize_per_tensor(x, scale):
    """x, static scale (float or one-element tensor) → int8; the kernel reads the scale on the GPU
    (no host sync), so unlike the reference it does not validate that the scale is positive."""
    import torch

    if not x.is_cuda or x.dtype not in _floats():
        from qtool.quant.activations import quantize_per_tensor as ref

        return ref(x, scale)
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    if s.numel() != 1:
        raise ValueError(f"a per-tensor scale has one element, got shape {tuple(s.shape)}")
    return torch.ops.qtool_cuda.quantize_per_tensor(x, s.reshape(1))


def w8a8_gemm(xq, x_scale, w, w_scale, bias, out_dtype):
    """Same signature and result as qtool.nn.w8a8.w8a8_gemm (int32 accumulation on int8 tensor
    cores, epilogue x_scale · w_scale (+ bias) fused). Falls back to the reference for CPU tensors,
    K % 16 != 0 or an unsupported out_dtype."""
    import torch

    from qtool.nn.w8a8 import check_w8a8_gemm_args

    check_w8a8_gemm_args(xq, x_scale, w, w_scale)
    if not (xq.is_cuda and w.is_cuda) or xq.shape[1] % 16 or out_dtype not in _floats():
        from qtool.nn.w8a8 import w8a8_gemm as ref

        return ref(xq, x_scale, w, w_scale, bias, out_dtype)
    dev = xq.device
    x_scale, w_scale, bias = _on(x_scale, dev), _on(w_scale, dev), _on(bias, dev)
    return torch.ops.qtool_cuda.w8a8_gemm(xq, x_scale, w, w_scale, bias, out_dtype)


def _on(t, dev):
    """Small per-row / per-channel vectors (scales, zeros, bias) may live elsewhere (a module's CPU
    buffer, a python float); the kernels read them on the activations' device."""
    import torch

    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        return torch.tensor(t, dtype=torch.float32, device=dev)
    return t if t.device == dev else t.to(dev)


def w8a8_gemm_out(xq, x_scale, w, w_scale, bias, out, cfg: int = -1, split: int = 0) -> None:
    """Explicit kernel config / split-K, writing into `out` [M, N] (tests poison it first)."""
    import torch

    from qtool.nn.w8a8 import check_w8a8_gemm_args

    check_w8a8_gemm_args(xq, x_scale, w, w_scale)
    torch.ops.qtool_cuda.w8a8_gemm_out(xq, x_scale, w, w_scale, bias, cfg, split, out)


def _w4a8_x_sum(xq, x_scale, x_sum, s1_szeros):
    import torch

    if s1_szeros is not None and x_sum is None:  # the reference's default: Σ dequantized activations
        x_sum = xq.to(torch.float32).sum(dim=-1, keepdim=True) * x_scale.to(torch.float32).reshape(-1, 1)
    return x_sum


def pack_s2_tiles(s2_scales, s2_zeros):
    """The per-group W4A8 scales packed for the decode kernels that read one group per 128-k chunk (GemmArgs::pgs in
    csrc/w8a8_api.h): uint8 [N/32, G, 48], per 32-column tile and group the tile's 32 s2_zeros bytes, then (s2 − 1)
    as nibbles, byte 2i + b holding the columns 4i + b (low nibble) and 4i + b + 2 (high), all in the kernel's column
    order (the order of s2_scales / s2_zeros [G, N]). 48 bytes where the two [G, N] rows take 64. None when some s2
    lies outside [1, 16] (the kernels then read s2_scales / s2_zeros); exact inverse: `unpack_s2_tiles`."""
    import torch

    if s2_scales.dim() != 2 or s2_scales.shape != s2_zeros.shape or s2_scales.shape[1] % 32:
        raise ValueError(f"s2_scales / s2_zeros must be one [G, N] shape with N % 32 == 0, got "
                         f"{tuple(s2_scales.shape)} / {tuple(s2_zeros.shape)}")
    if s2_scales.dtype != torch.int8 or s2_zeros.dtype != torch.int8:
        raise ValueError("s2_scales / s2_zeros must be int8")
    G, N = s2_scales.shape
    if s2_scales.numel() and not bool(((s2_scales >= 1) & (s2_scales <= 16)).all()):
        return None
    n = (s2_scales - 1).view(torch.uint8).reshape(G, N // 32, 8, 4)
    nib = torch.stack((n[..., 0] | (n[..., 2] << 4), n[..., 1] | (n[..., 3] << 4)), dim=-1).reshape(G, N // 32, 16)
    z = s2_zeros.view(torch.uint8).reshape(G, N // 32, 32)
    return torch.cat((z, nib), dim=-1).permute(1, 0, 2).contiguous()


def unpack_s2_tiles(tiles):
    """uint8 [N/32, G, 48] → (s2_scales, s2_zeros), int8 [G, N]: the exact inverse of `pack_s2_tiles`."""
    import torch

    T, G, w = tiles.shape
    if tiles.dtype != torch.uint8 or w != 48:
        raise ValueError(f"s2 tiles must be uint8 [N/32, G, 48], got {tiles.dtype} {tuple(tiles.shape)}")
    t = tiles.permute(1, 0, 2)
    z = t[..., :32].reshape(G, 32 * T).view(torch.int8)
    b = t[..., 32:].reshape(G, T, 8, 2)
    n = torch.stack((b[..., 0] & 15, b[..., 1] & 15, b[..., 0] >> 4, b[..., 1] >> 4), dim=-1)
    return (n.reshape(G, 32 * T) + 1).view(torch.int8), z.contiguous()


# s2_scales tensor id -> (weakref to it, (s2_zeros data_ptr, versions), its packed tiles or None): the packing runs
# once per weight (the first call), not per call; an entry goes with its tensor, and an in-place change of either
# tensor (its version) packs again.
_S2_TILES: dict[int, tuple] = {}


def _s2_tiles_of(s2_scales, s2_zeros, group_size: int):
    """With QTOOL_I8_DECODE_PK=1 (read per call; opt-in until measured on a GPU), the cached `pack_s2_tiles` of a
    weight's CUDA scale tensors where the decode kernels can use it (group 128 · 2^j); else None. Never packs during
    CUDA graph capture (the warm-up call before a capture packs)."""
    import torch

    if os.environ.get("QTOOL_I8_DECODE_PK", "") != "1":
        return None
    if s2_scales is None or not s2_scales.is_cuda or group_size < 128 or group_size & (group_size - 1):
        return None
    key = id(s2_scales)
    state = (s2_zeros.data_ptr(), s2_scales._version, s2_zeros._version)
    hit = _S2_TILES.get(key)
    if hit is not None and hit[0]() is s2_scales and hit[1] == state:
        return hit[2]
    if torch.cuda.is_current_stream_capturing():
        return None
    tiles = pack_s2_tiles(s2_scales, s2_zeros)
    _S2_TILES[key] = (weakref.ref(s2_scales, lambda _r, k=key: _S2_TILES.pop(k, None)), state, tiles)
    return tiles


def w4a8_gemm(xq, x_scale, x_sum, qweight, s1_scales, s1_szeros, s2_scales, s2_zeros, group_size, bias=None,
              out_dtype=None, s2_tiles="auto"):
    """Same signature and result as qtool.nn.w4a8.w4a8_gemm: [M, N] in out_dtype (default fp32). Per-group:
    s_x·s1·Σ x8·(q4·s2 + s2_zeros); per-channel: s1·s_x·Σ q4·x8 − sz·x_sum.
    `s2_tiles`: "auto" packs the per-group scales once per weight for the decode kernels (`pack_s2_tiles`) when
    QTOOL_I8_DECODE_PK=1; None reads s2_scales / s2_zeros; or the packed tensor itself."""
    import torch

    ok = (xq.is_cuda and qweight.is_cuda and xq.dtype == torch.int8 and xq.dim() == 2 and qweight.dim() == 2
          and xq.shape[1] == 2 * qweight.shape[1] and xq.shape[1] % 32 == 0 and qweight.shape[0] % 32 == 0
          and (out_dtype is None or out_dtype in _floats()))
    if ok and s2_scales is not None:
        ok = group_size > 0 and group_size % 32 == 0 and xq.shape[1] % group_size == 0
    if not ok:
        from qtool.nn.w4a8 import w4a8_gemm as ref

        return ref(xq, x_scale, x_sum, qweight, s1_scales, s1_szeros, s2_scales, s2_zeros, group_size, bias, out_dtype)
    dev = xq.device
    x_scale, x_sum, s1_scales, s1_szeros = _on(x_scale, dev), _on(x_sum, dev), _on(s1_scales, dev), _on(s1_szeros, dev)
    s2_scales, s2_zeros, bias = _on(s2_scales, dev), _on(s2_zeros, dev), _on(bias, dev)
    x_sum = _w4a8_x_sum(xq, x_scale, x_sum, s1_szeros)
    if isinstance(s2_tiles, str):
        s2_tiles = _s2_tiles_of(s2_scales, s2_zeros, int(group_size))
    return torch.ops.qtool_cuda.w4a8_gemm(xq, x_scale, x_sum, qweight, s1_scales, s1_szeros, s2_scales, s2_zeros,
                                          int(group_size), bias, out_dtype, s2_tiles)


def w4a8_gemm_out(xq, x_scale, x_sum, qweight, s1_scales, s1_szeros, s2_scales, s2_zeros, group_size, bias, out,
                  cfg: int = -1, split: int = 0, s2_tiles="auto") -> None:
    """Explicit kernel config / split-K, writing into `out`; `s2_tiles` as for `w4a8_gemm`."""
    import torch

    x_sum = _w4a8_x_sum(xq, x_scale, x_sum, s1_szeros)
    if isinstance(s2_tiles, str):
        s2_tiles = _s2_tiles_of(s2_scales, s2_zeros, int(group_size))
    torch.ops.qtool_cuda.w4a8_gemm_out(xq, x_scale, x_sum, qweight, s1_scales, s1_szeros, s2_scales, s2_zeros,
                                       int(group_size), bias, cfg, split, out, s2_tiles)


def i8_choose(fmt: int, M: int, N: int, K: int) -> tuple[int, int]:
    """The (cfg, split) the int8 GEMM engine picks for format fmt (FMT_W8 / FMT_W4PC / FMT_W4PG)."""
    import torch

    c, s = torch.ops.qtool_cuda.i8_gemm_choose(fmt, M, N, K)
    return int(c), int(s)


def i8_config_info(cfg: int) -> dict:
    import torch

    kind, bm, bn, threads, n, w8, w4, w4pg = torch.ops.qtool_cuda.i8_gemm_config_info(cfg)
    # available: runs W8A8; available_w4: W4A8 per-channel; available_w4pg: W4A8 per-group ("dequant", c20,
    # runs per-group only: the int8 weights written to scratch memory, then the W8A8 GEMM)
    # ("retired": an experiment's id kept for the records, refused by every format)
    kinds = ("decode", "tiled", "wgmma", "wgws", "dequant", "tma", "retired")
    return {"kind": kinds[kind], "bm": bm, "bn": bn, "threads": threads, "num_configs": n, "available": bool(w8),
            "available_w4": bool(w4), "available_w4pg": bool(w4pg)}


def i8_supports(info: dict, fmt: int) -> bool:
    """Whether a config (i8_config_info) runs weight format fmt (FMT_W8 / FMT_W4PC / FMT_W4PG)."""
    return info[{FMT_W8: "available", FMT_W4PC: "available_w4", FMT_W4PG: "available_w4pg"}[fmt]]


def w4a8_dequantize(qweight, s2_scales, s2_zeros, group_size: int):
    """QServe per-group tensors → the int8 weights W8 = q4·s2 + s2_zeros, [N, K] row-major (the first kernel of
    the dequantizing config c20)."""
    import torch

    return torch.ops.qtool_cuda.w4a8_dequantize(qweight, s2_scales, s2_zeros, int(group_size))


def kv4_quantize(x):
    """Same as qtool.nn.w4a8.kv4_quantize: x [..., D] → (codes uint8 [..., D], scale fp16 [..., 1],
    zero fp16 [..., 1]), bit-exact. Kernel for D in (64, 128, 256), reference otherwise."""
    import torch

    if not x.is_cuda or x.dtype not in _floats() or x.shape[-1] not in (64, 128, 256):
        from qtool.nn.w4a8 import kv4_quantize as ref

        return ref(x)
    return tuple(torch.ops.qtool_cuda.kv4_quantize(x))


# KV4 cache layout used by kv4_write / kv4_decode_attention (one sequence per batch row):
#   codes  uint8 [B, Hkv, S, D/2]: byte j of a token = code[2j] | code[2j+1] << 4
#   params fp16  [B, Hkv, S, 2]:   (scale, zero) from kv4_quantize
# dequantized value = fp16(code · scale + fp16(−scale · zero)) (kv4_dequantize, bit-exact).


def kv4_pack_cache(codes, scale, zero):
    """kv4_quantize output (codes [..., D], scale/zero [..., 1]) → (packed [..., D/2], params [..., 2])."""
    import torch

    c = codes.to(torch.uint8)
    packed = (c[..., 0::2] | (c[..., 1::2] << 4)).contiguous()
    params = torch.cat([scale.to(torch.float16), zero.to(torch.float16)], dim=-1).contiguous()
    return packed, params


def kv4_unpack_cache(packed, params):
    """Inverse of kv4_pack_cache: (codes [..., D], scale [..., 1], zero [..., 1])."""
    import torch

    lo, hi = packed & 0x0F, packed >> 4
    codes = torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return codes, params[..., 0:1], params[..., 1:2]


def kv4_write(x, cache, params, positions) -> None:
    """Quantize-on-write (after RoPE): x [B, H, D] → slot positions[b] of cache [B, H, S, D/2] and
    params [B, H, S, 2], the same values kv4_quantize + kv4_pack_cache give."""
    import torch

    torch.ops.qtool_cuda.kv4_write(x, cache, params, positions)


def kv4_decode_attention(q, k_cache, k_params, v_cache, v_params, context_lens, sm_scale=None, split: int = 0):
    """One decode step of GQA attention over a KV4 cache: q [B, Hq, D] fp16 → [B, Hq, D] fp16.
    Query head h reads KV head h // (Hq / Hkv); row b attends to tokens 0 .. context_lens[b] − 1.
    split = 0 picks the number of context chunks per (b, KV head) (flash-decoding)."""
    import torch

    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5
    return torch.ops.qtool_cuda.kv4_decode_attention(q, k_cache, k_params, v_cache, v_params, context_lens,
                                                     float(sm_scale), int(split))


def kv4_decode_attention_out(q, k_cache, k_params, v_cache, v_params, context_lens, sm_scale, split, out) -> None:
    import torch

    torch.ops.qtool_cuda.kv4_decode_attention_out(q, k_cache, k_params, v_cache, v_params, context_lens,
                                                  float(sm_scale), int(split), out)


def kv4_decode_attention_reference(q, k_cache, k_params, v_cache, v_params, context_lens, sm_scale=None):
    """Reference: kv4_dequantize the cache, fp32 attention per row over its context (float32 out)."""
    import torch

    from qtool.nn.w4a8 import kv4_dequantize

    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    if sm_scale is None:
        sm_scale = D ** -0.5
    out = torch.zeros(B, Hq, D, dtype=torch.float32, device=q.device)
    lens = [int(v) for v in context_lens.reshape(-1).tolist()]
    for b in range(B):
        n = lens[b]
        if n <= 0:
            continue
        kq, ks, kz = kv4_unpack_cache(k_cache[b, :, :n], k_params[b, :, :n])
        vq, vs, vz = kv4_unpack_cache(v_cache[b, :, :n], v_params[b, :, :n])
        k = kv4_dequantize(kq, ks, kz, torch.float32).repeat_interleave(G, dim=0)  # [Hq, n, D]
        v = kv4_dequantize(vq, vs, vz, torch.float32).repeat_interleave(G, dim=0)
        s = torch.einsum("hd,hnd->hn", q[b].to(torch.float32), k) * sm_scale
        out[b] = torch.einsum("hn,hnd->hd", torch.softmax(s, dim=-1), v)
    return out


def cuda_ops() -> dict[str, Callable]:
    """Op name → callable with the reference op's signature (loads the extension)."""
    load()
    return {
        "w4a16_gemm": w4a16_gemm,
        "quantize_per_token": quantize_per_token,
        "quantize_per_tensor": quantize_per_tensor,
        "w8a8_gemm": w8a8_gemm,
        "w4a8_gemm": w4a8_gemm,
        "kv4_quantize": kv4_quantize,
    }
