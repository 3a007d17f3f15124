"""Checkpoint writing and reading: sharded safetensors + index + config + manifest, written atomically.

Layout of a qtool checkpoint directory:

    model-00001-of-00002.safetensors ...   shards (safetensors only; metadata names the layout)
    model.safetensors.index.json           {"metadata": {"total_size": ...}, "weight_map": {...}}
    config.json                            HF config with a `quantization_config`
    recipe.resolved.yaml                   the resolved recipe of the run (when produced by quantize)
    tokenizer files                        copied from the source model
    manifest.json                          written last: format, layout@version, versions, sha256 of every file

Everything is written into `<parent>/.<name>.partial-<pid>` and renamed into place; an interrupted
write leaves no directory under the target name. Loading verifies the manifest (sizes always,
sha256 unless verify=False) and refuses unknown format versions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from qtool.errors import CheckpointError

FORMAT_NAME = "qtool-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "model.safetensors.index.json"


def parse_size(s: str | int) -> int:
    if isinstance(s, int):
        return s
    s = s.strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_output_dir(out: Path, overwrite: bool) -> list[str]:
    """Plan-time problems with writing to `out`."""
    problems = []
    if out.exists() and not overwrite:
        problems.append(f"output {out} already exists: pass --overwrite (output.overwrite=true) to replace it")
    if out.exists() and not out.is_dir():
        problems.append(f"output {out} exists and is not a directory")
    parent = out.parent if out.parent != Path("") else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        problems.append(f"cannot write to {parent}")
    return problems


@dataclass
class WriteResult:
    path: Path
    files: dict[str, dict[str, Any]]
    total_bytes: int


def write_checkpoint(
    out: str | Path,
    tensors: dict[str, "torch.Tensor"],
    config: dict,
    *,
    layout: str,
    overwrite: bool = False,
    shard_size: str | int = "2GB",
    extra_files: Optional[dict[str, str | bytes]] = None,
    copy_files: Iterable[Path] = (),
    manifest_extra: Optional[dict] = None,
    on_file: Optional[Callable[[str], None]] = None,
) -> WriteResult:
    """Write a complete checkpoint atomically. `layout` is "name@version"."""
    import torch
    from safetensors.torch import save_file

    import qtool

    out = Path(out)
    problems = check_output_dir(out, overwrite)
    if problems:
        raise CheckpointError(problems[0])
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    stage = parent / f".{out.name}.partial-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    try:
        # Shards: greedy by bytes in insertion order (block by block), CPU + contiguous.
        limit = parse_size(shard_size)
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        total = 0
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > limit:
                shards.append({})
                size = 0
            shards[-1][name] = t.detach().to("cpu").contiguous()
            size += nbytes
            total += nbytes
        n = len(shards)
        weight_map = {}
        # Only one metadata key: safetensors serialises metadata in hash order, and more keys would
        # make identical runs produce different bytes. Layout and versions live in the manifest.
        meta = {"format": "pt"}
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file(shard, str(stage / fname), metadata=meta)
            weight_map.update({k: fname for k in shard})
            if on_file:
                on_file(fname)
        (stage / INDEX).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
        (stage / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        for name, content in (extra_files or {}).items():
            p = stage / name
            p.write_bytes(content if isinstance(content, bytes) else content.encode())
        for src in copy_files:
            src = Path(src)
            if src.is_file() and not (stage / src.name).exists():
                shutil.copy2(src, stage / src.name)
        files = {}
        for p in sorted(stage.iterdir()):
            if p.is_file():
                files[p.name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        manifest = {
            "format": f"{FORMAT_NAME}@{FORMAT_VERSION}",
            "layout": layout,
            "qtool_version": qtool.__version__,
            "torch_version": torch.__version__,
            **(manifest_extra or {}),
            "files": files,
        }
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        for p in stage.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(stage)
        old = None
        if out.exists():
            old = parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        os.rename(stage, out)
        _fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return WriteResult(out, files, total)


@dataclass
class Checkpoint:
    path: Path
    manifest: dict
    config: dict
    weight_map: dict[str, str]

    @property
    def layout(self) -> str:
        return self.manifest["layout"].split("@")[0]

    @property
    def layout_version(self) -> int:
        return int(self.manifest["layout"].split("@")[1])

    @property
    def quantization_config(self) -> dict:
        return self.config.get("quantization_config", {})

    def tensor_names(self) -> list[str]:
        return list(self.weight_map)

    def load_tensors(self, names: Optional[Iterable[str]] = None, device: str = "cpu") -> dict:
        """Load the named tensors (all when None), opening each shard once."""
        from safetensors import safe_open

        wanted = set(self.weight_map) if names is None else set(names)
        missing = wanted - set(self.weight_map)
        if missing:
            raise CheckpointError(
                f"checkpoint {self.path} is missing tensors: {', '.join(sorted(missing)[:5])}"
                + (" ..." if len(missing) > 5 else "")
            )
        by_file: dict[str, list[str]] = {}
        for k in wanted:
            by_file.setdefault(self.weight_map[k], []).append(k)
        out = {}
        for fname, keys in by_file.items():
            with safe_open(str(self.path / fname), framework="pt", device=device) as f:
                for k in keys:
                    out[k] = f.get_tensor(k)
        return out


def open_checkpoint(path: str | Path, verify: bool = True) -> Checkpoint:
    """Open and verify a qtool checkpoint (sizes always, sha256 when verify)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}", "give the directory written by `qtool quantize`")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(
            f"{path} has no {MANIFEST}: not a complete qtool checkpoint",
            "it may be a partial write or a foreign checkpoint; re-run `qtool quantize`",
        )
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mpath} is corrupt: {e}") from e
    fmt = manifest.get("format", "")
    name, _, ver = fmt.partition("@")
    if name != FORMAT_NAME or not ver.isdigit():
        raise CheckpointError(f"{path}: unknown checkpoint format {fmt!r}")
    if int(ver) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written in {fmt} by qtool {manifest.get('qtool_version')}; this qtool reads up to "
            f"{FORMAT_NAME}@{FORMAT_VERSION}",
            "upgrade qtool",
        )
    _check_layout_version(path, manifest.get("layout", ""))
    for fname, info in manifest.get("files", {}).items():
        p = path / fname
        if not p.is_file():
            raise CheckpointError(f"{path}: file {fname} listed in the manifest is missing")
        if p.stat().st_size != info["bytes"]:
            raise CheckpointError(
                f"{path}: {fname} has {p.stat().st_size} bytes, manifest says {info['bytes']} (corrupt or modified)"
            )
        if verify and sha256_file(p) != info["sha256"]:
            raise CheckpointError(
                f"{path}: sha256 of {fname} does not match the manifest (corrupt or tampered)",
                "re-create the checkpoint, or pass --no-verify to skip hashing",
            )
    config = json.loads((path / "config.json").read_text())
    index = json.loads((path / INDEX).read_text())
    return Checkpoint(path, manifest, config, index["weight_map"])


def _check_layout_version(path: Path, layout: str) -> None:
    from qtool.layouts.base import available_layouts

    name, _, ver = layout.partition("@")
    layouts = available_layouts()
    if name not in layouts:
        raise CheckpointError(f"{path}: unknown layout {name!r}", f"known: {', '.join(sorted(layouts))}")
    if not ver.isdigit() or int(ver) > layouts[name].version:
        raise CheckpointError(
            f"{path}: layout {layout} is newer than this qtool supports ({name}@{layouts[name].version})",
            "upgrade qtool",
        )
