"""`qtool.eval.report.evaluate_many` on a tiny FP model and a tiny qtool checkpoint of it."""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("lm_eval")

from qtool import api, pipeline  # noqa: E402
from qtool.eval import report as rep  # noqa: E402
from qtool.recipe import load_recipe  # noqa: E402

MC = [{"q": "Pack my box with five dozen", "choices": [" liquor jugs!", " zebras", " fox"], "label": 0},
      {"q": "The quick brown fox jumps over the", "choices": [" dog", " lazy dog.", " box"], "label": 1}]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from helpers import SAMPLE_TEXT, save_tiny, tiny_llama, write_mc_task

    tmp = tmp_path_factory.mktemp("rep")
    mp = pytest.MonkeyPatch()
    mp.setenv("QTOOL_HOME", str(tmp / "home"))
    fp = save_tiny(tiny_llama(), tmp / "tiny")
    text = tmp / "text.txt"
    text.write_text(SAMPLE_TEXT * 40)
    recipe = load_recipe([], [f"model.path={fp}", f"output.dir={tmp / 'ckpt'}", f"calib.data={text}",
                              "calib.n_samples=2", "calib.seqlen=32", "layout=unpacked", "quant.group_size=32",
                              "quant.w_bits=3"])
    ckpt = pipeline.run_quantize(pipeline.plan(recipe)).output
    tasks = tmp / "tasks"
    tasks.mkdir()
    write_mc_task(tasks, MC)
    out = tmp / "report"
    doc = rep.evaluate_many([str(fp), str(ckpt)], datasets=[str(text)], seqlen=32, max_windows=2,
                            tasks=["t_mc", "qtool_tokppl"], include_path=tasks, batch_size=2, backend="reference",
                            report_dir=out, tokppl_windows=2)
    yield doc, fp, ckpt, text, out
    mp.undo()


def test_report_metrics_and_deltas(evaluated):
    doc, fp, ckpt, text, out = evaluated
    base, q = doc["targets"]
    assert base["is_base"] and not q["is_base"]
    assert base["info"]["kind"] == "fp-model" and q["info"]["kind"] == "checkpoint"
    # qtool's own perplexity, as api.perplexities computes it
    model, tok, _ = api.load_target(str(ckpt), "reference")
    (row,) = api.perplexities(model, tok, [str(text)], 32, 2)
    assert q["metrics"]["ppl/text"] == pytest.approx(row.ppl, rel=1e-6)
    for k in ("ppl/text", "t_mc/acc", "qtool_tokppl/token_perplexity"):
        assert k in base["metrics"] and k in q["metrics"]
        assert base["delta"][k] == 0.0
        assert q["delta"][k] == pytest.approx(q["metrics"][k] - base["metrics"][k])
    assert q["metrics"]["ppl/text"] != base["metrics"]["ppl/text"]  # 3-bit quantization changed the model
    assert base["higher_is_better"]["t_mc/acc"] is True and base["higher_is_better"]["ppl/text"] is False
    assert base["eval_s"] > 0 and q["eval_s"] > 0


def test_report_sizes(evaluated):
    doc, fp, ckpt, *_ = evaluated
    base, q = doc["targets"]
    assert base["size_bytes"] == 4 * base["n_params_dense"]  # fp32 parameter bytes of model.safetensors
    assert q["size_bytes"] == sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    assert q["size_ratio"] == pytest.approx(q["size_bytes"] / base["size_bytes"])


def test_report_agreement(evaluated):
    doc = evaluated[0]
    assert [a["label"] for a in doc["agreement"]] == [t["label"] for t in doc["targets"]]
    for a in doc["agreement"]:
        assert a["agree"] and abs(a["rel_diff_prefixed_ppl"]) < 1e-5 and a["n_windows"] == 2 and a["seqlen"] == 32


def test_report_files(evaluated):
    doc, fp, ckpt, text, out = evaluated
    saved = json.loads((out / "report.json").read_text())
    assert saved["targets"][1]["metrics"] == pytest.approx(doc["targets"][1]["metrics"])
    md = (out / "report.md").read_text()
    assert doc["command"] in md and "qtool eval" in doc["command"] and "--compare" in doc["command"]
    assert "lm-eval" in md and saved["environment"]["torch"] in md and "Agreement" in md
    if "matplotlib" in sys.modules or saved["environment"]["matplotlib"]:
        assert (out / "report.png").stat().st_size > 1000 and "report.png" in md
    for t in doc["targets"]:
        assert (out / "lm_eval").is_dir() and t["lm_eval"]["files"]["results"]


def test_render_table(evaluated):
    from rich.console import Console
    from rich.table import Table

    doc = evaluated[0]
    t = rep.render_table(doc)
    assert isinstance(t, Table) and len(t.columns) == 1 + len(doc["targets"])
    c = Console(width=200, record=True)
    c.print(t)
    s = c.export_text()
    assert "ppl/text" in s and "t_mc/acc" in s and "agree" in s


def test_chart_skipped_without_matplotlib(evaluated, tmp_path, monkeypatch):
    doc = json.loads(json.dumps(evaluated[0], default=str))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    files = rep.write_report(doc, tmp_path)
    assert "chart" not in files and not (tmp_path / "report.png").exists()
    assert "matplotlib is not installed" in (tmp_path / "report.md").read_text()


def test_reuse_skips_identical_evaluations(evaluated, tmp_path, monkeypatch):
    _, fp, ckpt, text, _ = evaluated
    kw = dict(datasets=[str(text)], seqlen=32, max_windows=2, backend="reference", reuse_dir=tmp_path / "cache")
    first = rep.evaluate_many([str(fp), str(ckpt)], **kw)
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2

    def no_load(*a, **k):
        raise AssertionError("a reused target must not be loaded")

    monkeypatch.setattr(api, "load_target", no_load)
    again = rep.evaluate_many([str(ckpt), str(fp)], **kw)  # order changed: the base changes, rows are reused
    assert [t["reused"] is not None for t in again["targets"]] == [True, True]
    assert again["targets"][0]["is_base"] and again["targets"][1]["metrics"] == first["targets"][0]["metrics"]
    assert again["targets"][1]["delta"]["ppl/text"] == pytest.approx(-first["targets"][1]["delta"]["ppl/text"])
    with pytest.raises(AssertionError, match="must not be loaded"):  # other settings: evaluated again
        rep.evaluate_many([str(ckpt)], **{**kw, "seqlen": 16})
