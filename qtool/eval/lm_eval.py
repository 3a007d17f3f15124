"""Run lm-evaluation-harness tasks on a model object qtool has built (FP or quantized modules).

lm-eval is an optional dependency (`pip install 'qtool[eval]'`); it is imported only inside
`run_lm_eval`. Runs are offline by default (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE /
TRANSFORMERS_OFFLINE are set unless the caller set them): hub tasks fail fast, local YAML tasks
(`include_path`, qtool's offline suite in `qtool.eval.suites`) work.

The model goes to lm-eval as an object (`HFLM(pretrained=model, tokenizer=tok, ...)`), so it runs
exactly the modules qtool loaded — packed layouts and kernel backend included.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from qtool.errors import ConfigError

log = logging.getLogger("qtool.eval.lm_eval")

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
INSTALL_HINT = "pip install 'qtool[eval]'  (lm-eval[hf] >= 0.4, < 0.5)"
_NOISY = ("lm_eval", "lm-eval", "datasets", "accelerate", "evaluate", "filelock", "fsspec")


def set_offline_env() -> None:
    """Offline defaults for the HF stack (values the caller already set are kept)."""
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)


def _import_lm_eval():
    set_offline_env()
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ConfigError(f"lm-eval tasks need the `lm-eval` package ({e})", INSTALL_HINT) from e
    return lm_eval, HFLM, TaskManager


class _DropMessages(logging.Filter):
    """Drops known-harmless lm-eval messages when they do get through (e.g. with -vv)."""

    _PATTERNS = ("`pretrained` model kwarg is not of type `str`",
                 "Passed an already-initialized model through `pretrained`")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(p in msg for p in self._PATTERNS)


@contextlib.contextmanager
def _quiet_logs(verbose: bool) -> Iterator[None]:
    """lm-eval/datasets logging down to ERROR for the duration (INFO when qtool logs at DEBUG)."""
    level = logging.INFO if verbose else logging.ERROR
    saved = {n: logging.getLogger(n).level for n in _NOISY}
    filt = _DropMessages()
    for n in _NOISY:
        logging.getLogger(n).setLevel(level)
        logging.getLogger(n).addFilter(filt)
    try:
        import datasets

        bars = datasets.utils.logging.is_progress_bar_enabled()
        if not verbose:
            datasets.disable_progress_bars()
    except Exception:  # datasets absent or API moved: nothing to silence
        datasets, bars = None, None
    try:
        yield
    finally:
        for n, lv in saved.items():
            logging.getLogger(n).setLevel(lv)
            logging.getLogger(n).removeFilter(filt)
        if datasets is not None and bars:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def _light_env_info(enabled: bool) -> Iterator[None]:
    """Replace lm-eval's `add_env_info` (torch.utils.collect_env: ~5 s of subprocesses) by a
    versions-only record for the duration of one call; restored afterwards."""
    if not enabled:
        yield
        return
    import lm_eval.evaluator as ev

    orig = ev.add_env_info

    def light(storage: dict) -> None:
        import platform

        import torch
        import transformers

        try:
            from importlib.metadata import version

            lm_v = version("lm_eval")
        except Exception as e:  # pragma: no cover - metadata missing
            lm_v = str(e)
        storage.update({
            "pretty_env_info": f"(collected by qtool) python {platform.python_version()}, torch {torch.__version__}, "
                               f"{platform.platform()}",
            "transformers_version": transformers.__version__, "lm_eval_version": lm_v, "upper_git_hash": None,
        })

    ev.add_env_info = light
    try:
        yield
    finally:
        ev.add_env_info = orig


def _model_device(model: Any) -> str:
    dev = getattr(model, "device", None)
    if dev is None:
        for p in model.parameters():
            dev = p.device
            break
    return str(dev) if dev is not None else "cpu"


def _task_manager(TaskManager, tasks: Sequence[str], include: list[str]):
    """A TaskManager that indexes only `include` when that suffices (built-in index: ~18 s)."""
    if include:
        tm = TaskManager(include_path=include, include_defaults=False)
        if all(t in tm.all_tasks for t in tasks):
            return tm
    return TaskManager(include_path=include or None)


def _json_default(o: Any) -> Any:
    try:
        from lm_eval.utils import handle_non_serializable

        return handle_non_serializable(o)
    except Exception:
        return str(o)


def _task_results(res: dict) -> dict:
    """{task: {metric: value}} from lm-eval's "results", metric names without the ",none" filter."""
    out: dict = {}
    for task, metrics in (res.get("results") or {}).items():
        row = {}
        for k, v in metrics.items():
            if k in ("alias", "name", " "):
                continue
            name, _, filt = k.partition(",")
            key = name if filt in ("", "none") else f"{name},{filt}"
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                row[key] = float(v)
            elif v == "N/A":
                row[key] = None
        out[task] = row
    return out


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    include_path: Optional[Path | str | Sequence[Path | str]] = None,
    batch_size: int = 4,
    max_length: int = 2048,
    limit: Optional[float] = None,
    num_fewshot: Optional[int] = None,
    seed: int = 1234,
    log_samples: bool = False,
    output_dir: Optional[Path | str] = None,
    bootstrap_iters: int = 1000,
    full_env_info: bool = False,
) -> dict:
    """Evaluate `model` (an HF causal LM object) on lm-eval `tasks`; returns lm-eval's results dict.

    `include_path`: one or more directories of task YAMLs (qtool's suite directories, the user's).
    `limit`: examples per task (an int count, or a fraction < 1). `seed` seeds lm-eval's python,
    numpy, torch and few-shot samplers. The returned dict is what `lm_eval.simple_evaluate` returns
    (its "results", "configs", "versions", "n-samples", ...; "samples" only with `log_samples`),
    plus "qtool": {"metrics": {task: {metric: value}}, "seconds", "max_length", "prefix_token_id",
    "device", "doc_nll": per-document -loglikelihood of rolling tasks, "files"}. With `output_dir`,
    the results are written to `<output_dir>/results.json` and, with `log_samples`, each task's
    samples to `<output_dir>/samples_<task>.jsonl`.
    """
    tasks = [t for t in tasks if t]
    if not tasks:
        raise ConfigError("no lm-eval task given")
    if isinstance(include_path, (str, Path)):
        include = [str(Path(include_path).expanduser().resolve())]
    else:
        include = [str(Path(p).expanduser().resolve()) for p in (include_path or [])]
    for p in include:
        if not Path(p).is_dir():
            raise ConfigError(f"lm-eval include path {p} is not a directory")
    if limit is not None and limit <= 0:
        raise ConfigError(f"--limit must be positive, got {limit}")
    lim: Optional[float] = int(limit) if limit is not None and limit >= 1 else limit
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    verbose = logging.getLogger("qtool").getEffectiveLevel() <= logging.DEBUG
    t0 = time.perf_counter()
    with _quiet_logs(verbose), _light_env_info(not full_env_info):
        tm = _task_manager(TaskManager, tasks, include)
        unknown = [t for t in tasks if t not in tm.all_tasks]
        if unknown:
            raise ConfigError(
                f"unknown lm-eval task(s): {', '.join(unknown)}",
                "use qtool-suite (offline), a task of --include-path, or a built-in lm-eval task "
                "(built-in tasks download their data: they need network access and HF_HUB_OFFLINE=0)",
            )
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                  device=_model_device(model))
        try:
            res = lm_eval.simple_evaluate(
                model=lm, tasks=list(tasks), task_manager=tm, limit=lim, num_fewshot=num_fewshot,
                log_samples=True, bootstrap_iters=bootstrap_iters, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed,
            )
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if "offline" in msg.lower() or "ConnectionError" in type(e).__name__ or "reach" in msg:
                raise ConfigError(f"lm-eval could not load task data offline: {msg}",
                                  "use the offline qtool-suite or local task YAMLs (--include-path)") from e
            raise
    seconds = time.perf_counter() - t0
    samples = res.pop("samples", None) or {}
    doc_nll: dict = {}
    for task, rows in samples.items():
        cfg = (res.get("configs") or {}).get(task, {})
        if cfg.get("output_type") != "loglikelihood_rolling":
            continue
        per = {}
        for r in rows:
            resp = r.get("filtered_resps") or r.get("resps")
            ll = resp[0] if resp else None
            while isinstance(ll, (list, tuple)):
                ll = ll[0]
            doc = r.get("doc", {})
            key = doc.get("window", r.get("doc_id"))
            per[int(key)] = -float(ll)
        doc_nll[task] = per
    meta = {
        "metrics": _task_results(res), "seconds": seconds, "max_length": int(lm.max_length),
        "batch_size": batch_size, "prefix_token_id": int(lm.prefix_token_id), "device": _model_device(model),
        "tasks": list(tasks), "include_path": include, "limit": lim, "num_fewshot": num_fewshot, "seed": seed,
        "doc_nll": doc_nll, "files": {},
    }
    res["qtool"] = meta
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "results.json"
        path.write_text(json.dumps(res, indent=2, default=_json_default, ensure_ascii=False) + "\n")
        meta["files"]["results"] = str(path)
        if log_samples:
            for task, rows in samples.items():
                sp = out / f"samples_{task}.jsonl"
                with open(sp, "w", encoding="utf-8") as f:
                    for r in rows:
                        f.write(json.dumps(r, default=_json_default, ensure_ascii=False) + "\n")
                meta["files"][f"samples_{task}"] = str(sp)
    if log_samples:
        res["samples"] = samples
    log.info("lm-eval %s in %.1f s", ", ".join(tasks), seconds)
    return res
