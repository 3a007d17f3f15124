"""Evaluate several models/checkpoints and report them side by side (JSON, Markdown, chart).

`evaluate_many` loads each target in turn (the first is the base every Δ refers to), measures
qtool's own GPTQ-style token perplexity (`qtool.eval.ppl`) on each dataset, runs the lm-eval tasks
(`qtool.eval.lm_eval`; `qtool-suite` expands to the offline suite of `qtool.eval.suites`), records
size on disk and time, and frees the model before loading the next. With `report_dir` it writes
`report.json`, `report.md` (tables, the exact command, the environment) and `report.png`
(one bar panel per metric; skipped with a note when matplotlib is absent), plus lm-eval's own
results under `lm_eval/<target>/`.

Two perplexities appear and are labelled apart: `ppl/<text>` is qtool's token perplexity
(non-overlapping windows of `seqlen` tokens, algorithms.md §5.1); `qtool_ppl/word_perplexity` etc.
are lm-eval's document-level rolling perplexities per word/byte. `qtool_tokppl/token_perplexity` is
lm-eval measuring the same token windows as qtool; the "agreement" section compares the two.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import platform
import re
import shlex
import struct
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

log = logging.getLogger("qtool.eval.report")

SCHEMA_VERSION = 1
AGREEMENT_TOL = 1e-4  # relative; like-for-like lm-eval vs qtool token perplexity
_SKIP_METRICS = {"sample_len", "nll_sum"}


# --- sizes ----------------------------------------------------------------------------------
def _safetensors_header(path: Path | str) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def safetensors_tensor_bytes(path: Path | str) -> int:
    """Bytes of tensor data in a .safetensors file (from its header; the header itself excluded)."""
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for v in _safetensors_header(path).values())


def checkpoint_size_breakdown(d: Path) -> Optional[dict]:
    """Tensor bytes of a qtool checkpoint split into quantized modules and everything else (by dtype)."""
    q = d / "qtool_quant.json"
    if not q.is_file():
        return None
    mods = set(json.loads(q.read_text()).get("modules", {}))
    out = {"quantized_modules": 0, "other": 0, "other_by_dtype": {}}
    for f in _safetensors_in(d):
        for name, v in _safetensors_header(f).items():
            b = v["data_offsets"][1] - v["data_offsets"][0]
            if name.rsplit(".", 1)[0] in mods:
                out["quantized_modules"] += b
            else:
                out["other"] += b
                out["other_by_dtype"][v["dtype"]] = out["other_by_dtype"].get(v["dtype"], 0) + b
    return out


def _safetensors_in(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def target_size(info: dict, target: Optional[str] = None) -> dict:
    """Size facts of a loaded target: bytes of weights on disk and what they are."""
    path = Path(info.get("path", ""))
    if info.get("kind") == "checkpoint":
        files = _safetensors_in(path)
        return {"size_bytes": sum(f.stat().st_size for f in files), "files_bytes": info.get("bytes"),
                "size_breakdown": checkpoint_size_breakdown(path),
                "size_what": "safetensors shards of the checkpoint (packed weights + unquantized tensors)"}
    src = info.get("source")
    d = None
    if src in ("builtin", "hf-dir"):
        d = path
    elif src == "gguf":
        try:
            from qtool.io.hf import converted_dir, resolve_source

            d = converted_dir(resolve_source(target)) if target else None
        except Exception:
            d = None
    if d is not None and d.is_dir() and _safetensors_in(d):
        files = _safetensors_in(d)
        return {"size_bytes": sum(safetensors_tensor_bytes(f) for f in files),
                "files_bytes": sum(f.stat().st_size for f in files),
                "size_what": "parameter bytes of the FP model's safetensors"}
    return {"size_bytes": None, "files_bytes": None, "size_what": f"unknown for a {src} source"}


def _param_facts(model: Any) -> dict:
    n = 0
    dtypes = set()
    for p in model.parameters():  # parameters() yields tied tensors once
        n += p.numel()
        dtypes.add(str(p.dtype).replace("torch.", ""))
    return {"n_params_dense": n, "param_dtypes": sorted(dtypes)}


# --- environment ------------------------------------------------------------------------------
def _version(mod: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return None


def _git_head() -> Optional[str]:
    """The qtool checkout's HEAD commit, read from .git (no git command run)."""
    try:
        g = Path(__file__).resolve().parents[2] / ".git"
        head = (g / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = head[5:]
            p = g / ref
            if p.is_file():
                return p.read_text().strip()
            packed = g / "packed-refs"
            for line in packed.read_text().splitlines() if packed.is_file() else []:
                if line.endswith(" " + ref):
                    return line.split()[0]
            return None
        return head
    except OSError:
        return None


def environment() -> dict:
    import torch

    from qtool import __version__

    return {
        "qtool": __version__, "qtool_git_head": _git_head(), "python": platform.python_version(),
        "platform": platform.platform(), "torch": torch.__version__, "transformers": _version("transformers"),
        "lm_eval": _version("lm_eval"), "datasets": _version("datasets"), "matplotlib": _version("matplotlib"),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_avg_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _command(targets, datasets, seqlen, max_windows, tasks, include_path, limit, num_fewshot, batch_size,
             backend, verify, report_dir) -> str:
    argv0 = Path(sys.argv[0]).name if sys.argv else ""
    if argv0 == "qtool" or argv0.startswith("qtool"):
        return shlex.join(["qtool"] + sys.argv[1:])
    parts = ["qtool", "eval", targets[0]]
    for t in targets[1:]:
        parts += ["--compare", t]
    if datasets:
        parts += ["--ppl", ",".join(datasets)]
    parts += ["--seqlen", str(seqlen)]
    if max_windows is not None:
        parts += ["--max-windows", str(max_windows)]
    if tasks:
        parts += ["--tasks", ",".join(tasks)]
    if include_path:
        parts += ["--include-path", str(include_path)]
    if limit is not None:
        parts += ["--limit", str(limit)]
    if num_fewshot is not None:
        parts += ["--num-fewshot", str(num_fewshot)]
    parts += ["--batch-size", str(batch_size), "--backend", backend]
    if not verify:
        parts.append("--no-verify")
    if report_dir:
        parts += ["--report", str(report_dir)]
    return shlex.join(parts)


# --- evaluation -------------------------------------------------------------------------------
def _label(target: str, info: dict) -> str:
    name = Path(target.rstrip("/")).name or target
    if info.get("kind") == "checkpoint":
        return f"{name} ({str(info.get('layout', '')).split('@')[0]})"
    return f"{name} (fp)"


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "target"


def _free() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


def evaluate_many(
    targets: Sequence[str],
    datasets: Sequence[str] = ("bundled",),
    seqlen: int = 2048,
    max_windows: Optional[int] = None,
    tasks: Sequence[str] = (),
    include_path: Optional[Path | str] = None,
    limit: Optional[float] = None,
    num_fewshot: Optional[int] = None,
    batch_size: int = 4,
    backend: str = "auto",
    verify: bool = True,
    report_dir: Optional[Path | str] = None,
    seed: int = 1234,
    log_samples: bool = False,
    max_length: Optional[int] = None,
    tokppl_windows: int = 4,
    command: Optional[str] = None,
    progress: Optional[Callable[[str], None]] = None,
    reuse_dir: Optional[Path | str | bool] = None,
) -> dict:
    """Evaluate `targets` (first = base) and return the report document (JSON-serializable).

    `datasets`: texts for qtool's token perplexity (`--ppl`). `tasks`: lm-eval tasks, `qtool-suite`
    = qtool_ppl, qtool_nextline, qtool_tokppl (offline, generated under <QTOOL_HOME>/tasks);
    `include_path`: a directory of the user's task YAMLs. `max_length`: lm-eval context (default
    max(2048, seqlen)). `tokppl_windows`: windows of `datasets[0]` (or bundled) the qtool_tokppl
    agreement check uses (also capped by `max_windows` and an integer `limit`). `seed`: lm-eval
    seeds. `log_samples`: also write lm-eval's per-sample outputs. With `report_dir`, writes
    report.json, report.md, report.png and lm-eval's results there. `reuse_dir`: a cache of per-target
    results; a target whose bytes, texts, settings, task data and code/library versions all match an
    earlier evaluation there is not evaluated again (its row says `reused`), others are evaluated and
    stored — so adding one checkpoint to a comparison costs one evaluation (`True`: the default
    cache `<QTOOL_HOME>/eval-cache`).
    """
    from qtool.errors import ConfigError
    from qtool.eval import suites

    if not targets:
        raise ConfigError("no model or checkpoint to evaluate")
    say = progress or (lambda msg: log.info(msg))
    datasets = list(datasets or [])
    task_list = suites.expand_tasks(list(tasks or []))
    if not datasets and not task_list:
        raise ConfigError("nothing to evaluate", "give --ppl TEXT and/or --tasks")
    report_path = Path(report_dir) if report_dir else None
    if report_path is not None:
        report_path.mkdir(parents=True, exist_ok=True)
    from qtool.eval.lm_eval import set_offline_env

    set_offline_env()
    include: list[Path] = []
    suite_info: dict = {}
    if any(t in suites.STATIC_TASKS for t in task_list):
        sdir = suites.build_static_suite(seed=seed)
        include.append(sdir)
        suite_info = {"dir": str(sdir), **suites.suite_meta(sdir)}
    if include_path:
        include.append(Path(include_path))
    use_tokppl = suites.TOKPPL_TASK in task_list
    hf_max_len = max_length or max(2048, seqlen)
    tok_windows = tokppl_windows
    if max_windows is not None:
        tok_windows = min(tok_windows, max_windows)
    if limit is not None and limit >= 1:
        tok_windows = min(tok_windows, int(limit))
    tok_dataset = datasets[0] if datasets else "bundled"
    if use_tokppl and hf_max_len < seqlen:
        raise ConfigError(f"qtool_tokppl scores {seqlen}-token windows in one piece: lm-eval max_length "
                          f"{hf_max_len} is too short", f"use max_length >= {seqlen} or a smaller --seqlen")

    cmd = command or _command(list(targets), datasets, seqlen, max_windows, list(tasks or []), include_path,
                              limit, num_fewshot, batch_size, backend, verify, report_dir)
    doc: dict = {
        "schema_version": SCHEMA_VERSION, "kind": "qtool-eval-report", "command": cmd,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {"targets": list(targets), "datasets": datasets, "seqlen": seqlen, "max_windows": max_windows,
                     "tasks": task_list, "include_path": str(include_path) if include_path else None,
                     "limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size, "backend": backend,
                     "verify": verify, "seed": seed, "lm_eval_max_length": hf_max_len,
                     "tokppl": {"dataset": tok_dataset, "seqlen": seqlen, "windows": tok_windows} if use_tokppl else None},
        "suite": suite_info, "environment": environment(), "targets": [], "agreement": [],
    }
    ctx = dict(datasets=datasets, seqlen=seqlen, max_windows=max_windows, task_list=task_list, include=include,
               batch_size=batch_size, hf_max_len=hf_max_len, limit=limit, num_fewshot=num_fewshot, seed=seed,
               log_samples=log_samples, use_tokppl=use_tokppl, tok_dataset=tok_dataset, tok_windows=tok_windows,
               backend=backend, verify=verify, report_path=report_path, say=say)
    cache = default_reuse_dir() if reuse_dir is True else (Path(reuse_dir).expanduser() if reuse_dir else None)
    labels: list[str] = []
    for i, target in enumerate(targets):
        say(f"[{i + 1}/{len(targets)}] {target}")
        key = _reuse_key(target, ctx, suite_info) if cache is not None else None
        hit = cache / f"{key}.json" if key else None
        if hit is not None and hit.is_file():
            saved = json.loads(hit.read_text())
            row, agree = saved["row"], saved.get("agreement")
            row["reused"] = {"from": str(hit), "evaluated": saved.get("created")}
            say(f"  reusing the results of {saved.get('created')} ({hit.name}): same target, settings and versions")
        else:
            row, agree = _evaluate_target(target, ctx)
            if hit is not None:
                cache.mkdir(parents=True, exist_ok=True)
                tmp = hit.with_suffix(".tmp")
                tmp.write_text(json.dumps({"key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "row": row,
                                           "agreement": agree}, default=str, indent=1))
                os.replace(tmp, hit)
        if row.get("reused") and report_path is not None and (row.get("lm_eval") or {}).get("files"):
            _adopt_lm_eval_files(row, report_path / "lm_eval" / _slug(row["label"]))
        label = row["label"]
        while label in labels:
            label += "'"
        labels.append(label)
        row["label"] = label
        row["is_base"] = i == 0
        if agree is not None:
            agree["label"] = label
            doc["agreement"].append(agree)
        doc["targets"].append(row)
    _add_deltas(doc)
    if report_path is not None:
        doc["files"] = write_report(doc, report_path)
    return doc


def _evaluate_target(target: str, c: dict) -> tuple[dict, Optional[dict]]:
    """Load one target, measure everything, free it; (report row, tokppl agreement or None)."""
    from qtool import api
    from qtool.eval import suites

    say = c["say"]
    t_start = time.perf_counter()
    model, tok, info = api.load_target(target, c["backend"], verify=c["verify"])
    load_s = time.perf_counter() - t_start
    label = _label(target, info)
    row: dict = {"label": label, "target": target, "info": dict(info), **target_size(info, target),
                 **_param_facts(model), "load_s": load_s, "metrics": {}, "ppl": {}, "lm_eval": None}
    for r in api.perplexities(model, tok, c["datasets"], c["seqlen"], c["max_windows"]):
        say(f"  ppl {r.dataset}: {r.ppl:.4f} ({r.n_windows} x {r.seqlen} tokens, {r.seconds:.1f} s)")
        row["ppl"][r.dataset] = dict(r.__dict__)
        row["metrics"][f"ppl/{r.dataset}"] = r.ppl
    higher: dict = {f"ppl/{d}": False for d in row["ppl"]}
    agree = None
    if c["task_list"]:
        from qtool.eval.lm_eval import run_lm_eval

        inc = list(c["include"])
        tdata = None
        if c["use_tokppl"]:
            tdata = suites.build_tokppl_task(tok, c["tok_dataset"], seqlen=c["seqlen"], max_windows=c["tok_windows"])
            inc.append(tdata.directory)
        out_dir = c["report_path"] / "lm_eval" / _slug(label) if c["report_path"] else None
        say(f"  lm-eval {', '.join(c['task_list'])}")
        res = run_lm_eval(model, tok, c["task_list"], include_path=inc, batch_size=c["batch_size"],
                          max_length=c["hf_max_len"], limit=c["limit"], num_fewshot=c["num_fewshot"], seed=c["seed"],
                          log_samples=c["log_samples"], output_dir=out_dir)
        meta = res["qtool"]
        for task, metrics in meta["metrics"].items():
            hib = (res.get("higher_is_better") or {}).get(task, {})
            for m, v in metrics.items():
                if m in _SKIP_METRICS or m.endswith("_stderr") or "_stderr," in m:
                    continue
                row["metrics"][f"{task}/{m}"] = v
                if m in hib:
                    higher[f"{task}/{m}"] = bool(hib[m])
                se = metrics.get(f"{m}_stderr")
                if se is not None:
                    row.setdefault("stderr", {})[f"{task}/{m}"] = se
        row["lm_eval"] = {"seconds": meta["seconds"], "max_length": meta["max_length"],
                          "prefix_token_id": meta["prefix_token_id"], "n_samples": res.get("n-samples"),
                          "versions": res.get("versions"), "files": meta["files"],
                          "include_path": meta["include_path"]}
        if tdata is not None:
            if meta["prefix_token_id"] != tdata.prefix_token_id:
                raise RuntimeError(f"lm-eval used prefix token {meta['prefix_token_id']}, "
                                   f"qtool_tokppl assumed {tdata.prefix_token_id}")
            lm_nll = meta["doc_nll"].get(suites.TOKPPL_TASK, {})
            say(f"  qtool perplexity on the {len(lm_nll)} qtool_tokppl window(s)")
            ref = suites.qtool_tokppl_reference(model, tdata, windows=[k for k in tdata.window_index if k in lm_nll])
            agree = suites.compare_tokppl(lm_nll, ref)
            agree.update({"label": label, "dataset": tdata.dataset, "prefix_token_id": tdata.prefix_token_id,
                          "skipped_windows": tdata.skipped, "tolerance": AGREEMENT_TOL,
                          "agree": abs(agree["rel_diff_prefixed_ppl"]) <= AGREEMENT_TOL
                          and agree["max_rel_diff_prefixed_window_nll"] <= AGREEMENT_TOL,
                          "task_dir": str(tdata.directory)})
            say(f"  agreement: lm-eval {agree['lm_eval_ppl']:.6f} vs qtool {agree['qtool_prefixed_ppl']:.6f} "
                f"(rel {agree['rel_diff_prefixed_ppl']:+.2e}); protocol windows {agree['qtool_protocol_ppl']:.6f}")
    row["higher_is_better"] = higher
    row["eval_s"] = time.perf_counter() - t_start
    del model, tok
    _free()
    return row, agree


# --- reuse of earlier results -------------------------------------------------------------------
def default_reuse_dir() -> Path:
    from qtool.assets import qtool_home

    return qtool_home() / "eval-cache"


def _adopt_lm_eval_files(row: dict, new_dir: Path) -> None:
    """Copy a reused row's lm-eval output files into this report's folder (when they still exist)."""
    import shutil

    files = row["lm_eval"]["files"]
    for k, f in list(files.items()):
        src = Path(f)
        if src.is_file() and src.parent.resolve() != new_dir.resolve():
            new_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, new_dir / src.name)
            files[k] = str(new_dir / src.name)

# Source files whose change can change an evaluation number of an existing model or checkpoint.
_EVAL_CODE = ("eval", "io", "nn", "layouts", "models", "quant", "api.py", "kernels.py")


def _code_hash() -> str:
    import hashlib

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for part in _EVAL_CODE:
        p = root / part
        for f in sorted([p] if p.is_file() else p.rglob("*.py")):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    ops = root.parent / "kernels_cuda" / "ops.py"
    if ops.is_file():
        h.update(ops.read_bytes())
    return h.hexdigest()


def _files_fingerprint(paths: Sequence[Path]) -> list:
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in paths if p.is_file()]


def _target_identity(target: str) -> dict:
    import hashlib

    from qtool.io.qmodel import is_qtool_checkpoint

    if is_qtool_checkpoint(target):
        return {"checkpoint_manifest_sha256": hashlib.sha256((Path(target) / "manifest.json").read_bytes()).hexdigest()}
    from qtool.io.hf import resolve_source

    src = resolve_source(target)
    if src.kind in ("builtin", "hf-dir"):
        d = Path(src.path)
        files = sorted(d.glob("*.safetensors")) + [d / "config.json", d / "tokenizer.json", d / "tokenizer_config.json"]
        return {"kind": src.kind, "path": str(d.resolve()), "files": _files_fingerprint(files)}
    if src.kind == "gguf":
        return {"kind": "gguf", "file": _files_fingerprint([src.file])}
    return {"kind": src.kind, "path": src.path}


def _reuse_key(target: str, c: dict, suite_info: dict) -> str:
    """sha256 over everything an evaluation's numbers depend on: the target's bytes (checkpoint manifest
    with file hashes; FP model files by name/size/mtime), the texts, the settings, the task data and
    the versions of qtool's evaluation code, torch, transformers and lm-eval."""
    import hashlib

    from qtool.calib.data import load_text
    from qtool.kernels import select_backend

    def tree(d: Path) -> list:
        return [[str(f.relative_to(d)), hashlib.sha256(f.read_bytes()).hexdigest()]
                for f in sorted(d.rglob("*")) if f.is_file()]

    env = environment()
    parts = {
        "target": _target_identity(target),
        "texts": {spec: hashlib.sha256(load_text(spec)[1].encode()).hexdigest()
                  for spec in dict.fromkeys(list(c["datasets"]) + ([c["tok_dataset"]] if c["use_tokppl"] else []))},
        "settings": {k: c[k] for k in ("seqlen", "max_windows", "task_list", "batch_size", "hf_max_len", "limit",
                                       "num_fewshot", "seed", "use_tokppl", "tok_windows")},
        "backend": select_backend(c["backend"]).name,
        "suite": suite_info.get("key"),
        "include": [tree(Path(p)) for p in c["include"] if Path(p) != Path(suite_info.get("dir", "\0"))],
        "versions": {k: env[k] for k in ("qtool", "torch", "transformers", "lm_eval", "python")},
        "code": _code_hash(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _add_deltas(doc: dict) -> None:
    base = doc["targets"][0]
    for row in doc["targets"]:
        row["delta"], row["rel_delta"] = {}, {}
        for k, v in row["metrics"].items():
            b = base["metrics"].get(k)
            if v is None or b is None:
                continue
            row["delta"][k] = v - b
            row["rel_delta"][k] = (v / b - 1.0) if b else None
        if row.get("size_bytes") and base.get("size_bytes"):
            row["size_ratio"] = row["size_bytes"] / base["size_bytes"]


def _metric_keys(doc: dict) -> list[str]:
    keys: list[str] = []
    for row in doc["targets"]:
        for k in row["metrics"]:
            if k not in keys:
                keys.append(k)
    return keys


def _fmt(v: Any, key: str = "") -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            return str(v)
        a = abs(v)
        if key.endswith(("/acc", "/acc_norm")) or "/acc" in key:
            return f"{v:.4f}"
        if a >= 1e5:
            return f"{v:.4g}"
        return f"{v:.4f}" if a < 100 else f"{v:.2f}"
    return str(v)


def _fmt_delta(row: dict, key: str) -> str:
    d = row.get("delta", {}).get(key)
    if d is None or row.get("is_base"):
        return ""
    r = row.get("rel_delta", {}).get(key)
    return f"Δ {d:+.4g}" + (f", {100 * r:+.2f}%" if r is not None else "")


def _mb(b: Optional[int]) -> str:
    return "—" if not b else f"{b / 1e6:.1f} MB"


# --- outputs ----------------------------------------------------------------------------------
def render_table(doc: dict):
    """A rich Table: one row per metric, one column per target (value and Δ vs the base)."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=escape("evaluation (Δ vs " + doc["targets"][0]["label"] + ")"), show_lines=False)
    t.add_column("metric", style="bold")
    for row in doc["targets"]:
        t.add_column(escape(row["label"]), justify="right")
    for key in _metric_keys(doc):
        cells = []
        for row in doc["targets"]:
            v = row["metrics"].get(key)
            d = _fmt_delta(row, key)
            cells.append(_fmt(v, key) + (f"\n[dim]{d}[/]" if d else ""))
        arrow = " ↓" if not doc["targets"][0].get("higher_is_better", {}).get(key, False) else " ↑"
        t.add_row(escape(key) + arrow, *cells)
    t.add_row("size", *[_mb(r.get("size_bytes")) + (f"\n[dim]x{r['size_ratio']:.3f}[/]" if not r["is_base"] and r.get("size_ratio") else "")
                        for r in doc["targets"]])
    t.add_row("backend", *[str(r["info"].get("backend")) for r in doc["targets"]])
    t.add_row("eval time", *[f"{r['eval_s']:.1f} s" for r in doc["targets"]])
    cap = []
    for a in doc.get("agreement", []):
        cap.append(f"{escape(a['label'])}: lm-eval token ppl {a['lm_eval_ppl']:.6g} vs qtool {a['qtool_prefixed_ppl']:.6g} "
                   f"(rel {a['rel_diff_prefixed_ppl']:+.1e}, {'agree' if a['agree'] else 'DISAGREE'})")
    if doc.get("files"):
        cap.append("report: " + ", ".join(Path(p).name for p in doc["files"].values()))
    if cap:
        t.caption = "\n".join(cap)
    return t


def _md_escape(s: str) -> str:
    return str(s).replace("|", "\\|")


def _breakdown(r: dict) -> str:
    b = r.get("size_breakdown")
    if not b:
        return ""
    dt = ", ".join(f"{k} {_mb(v)}" for k, v in sorted(b["other_by_dtype"].items()))
    return f": quantized linears {_mb(b['quantized_modules'])}, other tensors {_mb(b['other'])} ({dt})"


def render_markdown(doc: dict, chart: Optional[str] = None, chart_note: Optional[str] = None) -> str:
    s = doc["settings"]
    base = doc["targets"][0]
    L: list[str] = ["# qtool evaluation report", ""]
    L.append(f"Base: **{_md_escape(base['label'])}** — every Δ is relative to it. Generated {doc['created']}.")
    L.append("")
    L += ["## Command", "", "```bash", doc["command"], "```", ""]
    L += ["## Results", ""]
    head = "| metric | " + " | ".join(_md_escape(r["label"]) for r in doc["targets"]) + " |"
    L += [head, "|---|" + "---:|" * len(doc["targets"])]
    for key in _metric_keys(doc):
        arrow = "↑" if base.get("higher_is_better", {}).get(key, False) else "↓"
        cells = []
        for r in doc["targets"]:
            v = _fmt(r["metrics"].get(key), key)
            se = (r.get("stderr") or {}).get(key)
            if se is not None:
                v += f" ± {se:.4f}"
            d = _fmt_delta(r, key)
            cells.append(v + (f" ({d})" if d else ""))
        L.append(f"| `{key}` {arrow} | " + " | ".join(cells) + " |")
    L.append("| size on disk | " + " | ".join(
        _mb(r.get("size_bytes")) + (f" (×{r['size_ratio']:.3f})" if not r["is_base"] and r.get("size_ratio") else "")
        for r in doc["targets"]) + " |")
    L.append("| eval time | " + " | ".join(f"{r['eval_s']:.1f} s" for r in doc["targets"]) + " |")
    L.append("")
    if chart:
        L += [f"![metrics per checkpoint]({chart})", ""]
    elif chart_note:
        L += [f"_Chart: {chart_note}_", ""]
    L += ["### Targets", "", "| target | kind | layout / source | backend | size | what the size counts | FP params | load s | eval s |",
          "|---|---|---|---|---:|---|---:|---:|---:|"]
    for r in doc["targets"]:
        info = r["info"]
        L.append(f"| `{_md_escape(r['target'])}` | {info.get('kind')} | {info.get('layout') or info.get('source')} | "
                 f"{info.get('backend')} | {_mb(r.get('size_bytes'))} | {r.get('size_what')}{_breakdown(r)} | "
                 f"{format(r['n_params_dense'], ',') if info.get('kind') != 'checkpoint' else 'packed'} | "
                 f"{r['load_s']:.1f} | {r['eval_s']:.1f}" + (f" (reused, evaluated {r['reused']['evaluated']})" if r.get("reused") else "") + " |")
    L.append("")
    keys = _metric_keys(doc)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    notes = []
    if has("ppl/"):
        notes.append(
            f"- `ppl/<text>`: qtool's own token perplexity, GPTQ-style (algorithms.md §5.1): the text tokenized once, "
            f"non-overlapping windows of **{s['seqlen']} tokens** (first {s['max_windows'] or 'all'} windows), token 0 "
            f"of each window is context only, ppl = exp(mean window NLL). The texts are the bundled corpora under their "
            f"real names (britannica = the EB 1911 \"Shakespeare\" article), not WikiText: not comparable with "
            f"published tables.")
    if has("qtool_ppl/"):
        notes.append(
            "- `qtool_ppl/*` (lm-eval, `loglikelihood_rolling`): document-level rolling log-likelihood of ~1.5–2 kB "
            "passages of *Hamlet* (held out from calibration); `word_perplexity` = exp(NLL / words), "
            "`byte_perplexity` = exp(NLL / UTF-8 bytes), `bits_per_byte` = NLL / bytes / ln 2. Word perplexity is "
            "per *word*, hence far larger than a token perplexity (algorithms.md §5.4).")
    if has("qtool_nextline/"):
        notes.append(
            "- `qtool_nextline/acc`, `acc_norm` (lm-eval, `multiple_choice`): given 4 lines of *Hamlet*, pick the true "
            "next line among 4 (3 distractor lines of similar length from elsewhere in the play); chance = 0.25; "
            "acc_norm divides each choice's log-likelihood by its length in bytes. ± is lm-eval's standard error.")
    if has("qtool_tokppl/"):
        tp = s.get("tokppl") or {}
        notes.append("- `qtool_tokppl/token_perplexity` (lm-eval): token perplexity on qtool's own token windows "
                     f"(the first {tp.get('windows')} round-tripping windows of {tp.get('seqlen')} tokens of "
                     f"`{(doc.get('agreement') or [{}])[0].get('dataset', tp.get('dataset'))}`, each starting with lm-eval's prefix token) — see the agreement check "
                     "below. It covers fewer windows than `ppl/` and conditions on the prefix token, so the two "
                     "numbers differ.")
    other = sorted({k.split("/")[0] for k in keys} - {"ppl", "qtool_ppl", "qtool_nextline", "qtool_tokppl"})
    if other:
        notes.append(f"- other lm-eval tasks: {', '.join(f'`{t}`' for t in other)} (metrics as lm-eval defines them).")
    size_note = ("- size: bytes of weight tensors on disk (see the targets table for what each counts); ×r is the "
                 "ratio to the base.")
    fp_rows = [r for r in doc["targets"] if r["info"].get("kind") != "checkpoint" and r.get("n_params_dense")]
    for r in fp_rows:
        dts = ", ".join(r.get("param_dtypes") or [])
        size_note += (f" {_md_escape(r['label'])} is loaded as {dts}; the same parameters in bf16 would take "
                      f"{_mb(2 * r['n_params_dense'])}.")
    notes.append(size_note)
    L += ["### What the metrics are", ""] + notes + [""]
    if s.get("limit") is not None:
        lim = s["limit"]
        lim = int(lim) if float(lim).is_integer() else lim
        n_used = (doc["targets"][0].get("lm_eval") or {}).get("n_samples") or {}
        used = "; ".join(f"`{t}` {v.get('effective')} of {v.get('original')}" for t, v in n_used.items()
                         if isinstance(v, dict))
        L += [f"lm-eval ran with `--limit {lim}` (examples per task)" + (f": {used}." if used else "."), ""]
    if doc.get("suite"):
        st = doc["suite"]
        L += ["Offline suite data (generated deterministically, seed "
              f"{st.get('seed')}): " + "; ".join(f"`{k}`: {v['n_docs']} docs from {v['text']} (sha256 {v['sha256'][:12]}…)"
                                                   for k, v in st.get("tasks", {}).items()), ""]
    if doc.get("agreement"):
        L += ["## Agreement: lm-eval vs qtool token perplexity", "",
              "lm-eval's `loglikelihood_rolling` scores every token of a document, the first one conditioned on a prefix "
              "token p (BOS, else EOS) that also stays in the context of all later tokens; qtool's protocol scores tokens "
              "1…L−1 of each L-token window with the window's real token 0 as context. The like-for-like comparison "
              "therefore uses documents made of tokens 1…L−1 of qtool's windows (text that re-tokenizes to exactly those "
              "tokens; others are skipped) scored by lm-eval with max_length ≥ L−1 (one rolling window), against qtool's "
              "evaluator on the same windows with token 0 replaced by p. The unmodified protocol windows are shown too: "
              "their gap is the effect of the first context token, not a disagreement.", "",
              "| target | text | windows × tokens scored | lm-eval token ppl | qtool, windows starting with p | rel. diff | max per-window rel. diff | qtool protocol windows | rel. diff | verdict |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for a in doc["agreement"]:
            L.append(f"| {_md_escape(a['label'])} | {a['dataset']} | {a['n_windows']} × {a.get('scored_per_window', {}).get('prefixed', a['seqlen'] - 1)} | {a['lm_eval_ppl']:.6f} | "
                     f"{a['qtool_prefixed_ppl']:.6f} | {a['rel_diff_prefixed_ppl']:+.2e} | {a['max_rel_diff_prefixed_window_nll']:.2e} | "
                     f"{a['qtool_protocol_ppl']:.6f} | {a['rel_diff_protocol_ppl']:+.2e} | "
                     f"{'agree (≤ %.0e)' % a['tolerance'] if a['agree'] else 'DISAGREE'} |")
        sk = sorted({w for a in doc["agreement"] for w in a["skipped_windows"]})
        L += ["", f"Prefix token id {doc['agreement'][0]['prefix_token_id']}; windows skipped because their text does not "
              f"round-trip through the tokenizer: {sk or 'none'}.", ""]
    env = doc["environment"]
    L += ["## Environment", "",
          f"- qtool {env['qtool']} (git {str(env.get('qtool_git_head') or 'unknown')[:12]}), Python {env['python']}, "
          f"{env['platform']}",
          f"- torch {env['torch']}, transformers {env['transformers']}, lm-eval {env['lm_eval']}, datasets "
          f"{env['datasets']}, matplotlib {env['matplotlib']}",
          f"- {env['torch_threads']} torch threads, {env['cpu_count']} CPUs"
          + (f" (1-min load average {env['load_avg_1m_at_start']:.1f} at the start: times are wall-clock on a "
             f"shared machine)" if env.get("load_avg_1m_at_start") is not None else "")
          + f", CUDA: {env['cuda'] or 'none'}; "
          f"kernel backend: {', '.join(sorted({str(r['info'].get('backend')) for r in doc['targets']}))} "
          f"(requested `{s['backend']}`)",
          f"- lm-eval: batch size {s['batch_size']}, max_length {s['lm_eval_max_length']}, seed {s['seed']}, "
          f"few-shot {s['num_fewshot'] if s['num_fewshot'] is not None else 'task default (0)'}; its own results JSON "
          "per target is under `lm_eval/`.", ""]
    return "\n".join(L)


def write_chart(doc: dict, path: Path) -> tuple[Optional[Path], Optional[str]]:
    """One bar panel per metric (bars = targets); (path, None) or (None, why it was skipped)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return None, "matplotlib is not installed (pip install 'qtool[eval]'); chart skipped"
    keys = [k for k in _metric_keys(doc)]
    if not keys:
        return None, "no metric to plot"
    ncol = min(3, len(keys))
    nrow = math.ceil(len(keys) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), squeeze=False)
    labels = [r["label"] for r in doc["targets"]]
    colors = [plt.cm.tab10(i % 10) for i in range(len(labels))]
    base = doc["targets"][0]
    for ax, key in zip(axes.flat, keys):
        vals = [r["metrics"].get(key) for r in doc["targets"]]
        ys = [v if v is not None else 0.0 for v in vals]
        errs = [(r.get("stderr") or {}).get(key) or 0.0 for r in doc["targets"]]
        bars = ax.bar(range(len(ys)), ys, color=colors, yerr=errs if any(errs) else None, capsize=4)
        hib = base.get("higher_is_better", {}).get(key, False)
        ax.set_title(f"{key} ({'higher' if hib else 'lower'} is better)", fontsize=9)
        ax.set_xticks(range(len(ys)))
        ax.set_xticklabels([lb if len(lb) <= 30 else lb[:29] + "…" for lb in labels], rotation=15, ha="right", fontsize=7)
        finite = [y for y in ys if y and math.isfinite(y)]
        if finite and max(finite) / max(min(finite), 1e-12) > 1e3:
            ax.set_yscale("log")
        elif finite and not hib and "acc" not in key:
            lo, hi = min(finite), max(finite)
            bottom = max(0.0, lo - (hi - lo) * 1.5 - 0.02 * hi)
            ax.set_ylim(bottom, hi + (hi - lo) * 0.6 + 0.02 * hi)
            if bottom > 0:
                ax.set_ylabel("axis does not start at 0", fontsize=7)
        for b, v, e in zip(bars, vals, errs):
            if v is not None:
                ax.annotate(_fmt(v, key), (b.get_x() + b.get_width() / 2, b.get_height() + e), ha="center",
                            va="bottom", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle("qtool eval: " + " vs ".join(labels), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, None


def write_report(doc: dict, report_dir: Path | str) -> dict:
    """Write report.png (if matplotlib), report.md and report.json into `report_dir`; return their paths."""
    d = Path(report_dir)
    d.mkdir(parents=True, exist_ok=True)
    files: dict = {}
    # the numbers first: if rendering fails, report.json is still there to re-render from
    (d / "report.json").write_text(json.dumps(doc, indent=2, default=str, ensure_ascii=False) + "\n")
    png, note = write_chart(doc, d / "report.png")
    if png is not None:
        files["chart"] = str(png)
    doc["chart_note"] = note
    (d / "report.md").write_text(render_markdown(doc, chart="report.png" if png else None, chart_note=note) + "\n")
    files["markdown"] = str(d / "report.md")
    files["json"] = str(d / "report.json")
    doc["files"] = files
    (d / "report.json").write_text(json.dumps(doc, indent=2, default=str, ensure_ascii=False) + "\n")
    return files
