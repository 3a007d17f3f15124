"""CLI behaviour: exit codes, JSON on stdout, errors on stderr."""

import json

import pytest
from typer.testing import CliRunner

from qtool.cli import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _common(tiny_dir, tmp_path):
    return ["-m", tiny_dir, "-o", tmp_path / "out", f"calib.data={tmp_path / 'text.txt'}",
            "calib.n_samples=2", "calib.seqlen=32", "layout=unpacked", "quant.group_size=32"]


def test_version():
    r = _run("--version")
    assert r.exit_code == 0 and r.stdout.startswith("qtool ")


def test_quantize_then_eval_json(tiny_dir, tmp_path):
    r = _run("quantize", *_common(tiny_dir, tmp_path), "--json", "-q")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["status"] == "ok" and doc["layout"] == "unpacked@1"
    assert any(f["name"] == "model.safetensors" and len(f["sha256"]) == 64 for f in doc["files"])
    r = _run("eval", tmp_path / "out", "--ppl", tmp_path / "text.txt", "--seqlen", 32, "--max-windows", 3,
             "--backend", "reference", "--json", "-q")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["kernels"] == "reference" and doc["metrics"]["ppl"]["text"] > 1


@pytest.mark.parametrize("args, code, fragment", [
    (["quant.gruop_size=32"], 3, "did you mean"),
    (["quant.group_size=128"], 4, "not a multiple of group_size"),
    (["-m", "/nonexistent/model"], 6, "not found"),
])
def test_quantize_exit_codes(tiny_dir, tmp_path, args, code, fragment):
    r = _run("quantize", *_common(tiny_dir, tmp_path)[2:], *(args if args[0] == "-m" else ["-m", tiny_dir, *args]),
             "--json")
    assert r.exit_code == code, r.output
    doc = json.loads(r.stdout)
    assert doc["status"] == "error" and doc["error"]["exit_code"] == code
    assert fragment in doc["error"]["message"] + (doc["error"]["hint"] or "")


def test_existing_output_exit_6_and_overwrite(tiny_dir, tmp_path):
    assert _run("quantize", *_common(tiny_dir, tmp_path), "-q").exit_code == 0
    r = _run("quantize", *_common(tiny_dir, tmp_path), "-q")
    assert r.exit_code == 6 and "--overwrite" in r.output
    assert _run("quantize", *_common(tiny_dir, tmp_path), "--overwrite", "-q").exit_code == 0


def test_dry_run_writes_nothing(tiny_dir, tmp_path):
    r = _run("quantize", *_common(tiny_dir, tmp_path), "--dry-run", "--json")
    assert r.exit_code == 0
    assert json.loads(r.stdout)["plan"]["n_linears"] == 14
    assert not (tmp_path / "out").exists()


def test_print_config(tiny_dir):
    r = _run("quantize", "quant.group_size=64", "--print-config")
    assert r.exit_code == 0 and "group_size: 64" in r.stdout


def test_eval_missing_checkpoint_and_cuda_unavailable(tmp_path):
    r = _run("eval", tmp_path / "nope", "--json")
    assert r.exit_code == 6
    import torch

    if not torch.cuda.is_available():
        r = _run("eval", tmp_path, "--backend", "cuda", "--json")
        assert r.exit_code == 5 and "no CUDA GPU" in json.loads(r.stdout)["error"]["message"]


def test_convert_list():
    r = _run("convert", "--list", "--json")
    assert r.exit_code == 0
    names = {t["name"] for t in json.loads(r.stdout)["targets"]}
    assert "unpacked" in names


def test_quantize_eval_reports_fake_and_packed(tiny_dir, tmp_path):
    """`--eval` prints FP, the in-memory fake-quant model and the packed checkpoint; the last two agree."""
    r = _run("quantize", *_common(tiny_dir, tmp_path), "eval.ppl=[" + str(tmp_path / "text.txt") + "]",
             "eval.seqlen=32", "eval.max_windows=3", "--eval", "--json", "-q")
    assert r.exit_code == 0, r.output
    rows = {row["model"].split(" ")[0]: row["ppl"] for row in json.loads(r.stdout)["metrics"]["ppl"]}
    assert set(rows) == {"fp", "fake-quant", "unpacked"}
    assert rows["unpacked"] == pytest.approx(rows["fake-quant"], rel=1e-4)
    assert rows["fp"] != rows["unpacked"]


def test_eval_compare_takes_several_checkpoints(tiny_dir, tmp_path, monkeypatch):
    seen = {}

    def fake_evaluate_many(targets, **kw):
        seen["targets"] = targets
        return {"targets": [], "metrics": {}}

    from qtool.eval import report as rep

    monkeypatch.setattr(rep, "evaluate_many", fake_evaluate_many)
    monkeypatch.setattr(rep, "render_table", lambda doc: "", raising=False)
    _run("eval", "base", "--compare", "a", "b", "--compare", "c,d", "--ppl", "bundled", "--json")
    # click hands repeated --compare values and the extra arguments over separately: order within is kept.
    assert seen["targets"][0] == "base" and sorted(seen["targets"][1:]) == ["a", "b", "c", "d"]


def test_eval_stray_argument_is_a_usage_error(tmp_path):
    r = _run("eval", tmp_path, tmp_path / "other", "--json")
    assert r.exit_code == 2
    err = json.loads(r.stdout)["error"]
    assert "unexpected argument" in err["message"] and "--compare" in err["hint"]


def test_bench_prints_the_tables_then_the_target_summary(monkeypatch):
    # the timing itself needs a GPU; the command's output on given rows does not
    import qtool.bench
    import qtool.kernels

    rows = [{"op": "w4a8", "variant": "g128", "K": 4096, "N": 4096, "M": M, "us": 10.0, "us_w8a8": 10.0 * x,
             "x_w8a8": x, "x_w8a8_paired": xp, "us_fp16": 13.0, "x_fp16": 1.3, "tops": 1.0, "floor_us": 2.0,
             "bound": "compute", "pct_floor": 20.0, "cfg": "c20/s1"} for M, x, xp in ((1024, 0.72, 0.76), (4096, 0.9, 0.94))]
    monkeypatch.setattr(qtool.kernels, "select_backend", lambda name: type("Be", (), {"name": name})())
    monkeypatch.setattr(qtool.bench, "run_bench", lambda **kw: rows)
    r = _run("bench", "--ops", "w4a8")
    assert r.exit_code == 0, r.output
    out = " ".join(r.stderr.split())  # human output goes to stderr (stdout is for --json); rich may wrap lines
    assert "×w8a8" in out and "paired median 0.85 min 0.76 (target >= 0.8 on paired: MET); by M: 1024 0.76, 4096 0.94" in out
    r = _run("bench", "--ops", "w4a8", "--json")
    doc = json.loads(r.stdout)
    assert doc["rows"] == rows and doc["summary"][0].startswith("W4A8 g128 M>=1024 ×w8a8: median 0.81")
