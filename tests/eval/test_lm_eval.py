"""lm-eval through qtool (`qtool.eval.lm_eval`) on a tiny random model, checked by hand.

One lm-eval run (module fixture) covers three local tasks written here: a multiple-choice task, a
rolling-loglikelihood task and qtool's generated `qtool_tokppl`; every per-sample number lm-eval
reports is recomputed directly from the model's log-softmax. Also: the offline suite generator.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

pytest.importorskip("lm_eval")

from helpers import tiny_llama, tiny_tokenizer, write_mc_task  # noqa: E402

from qtool.eval import suites  # noqa: E402
from qtool.eval.lm_eval import run_lm_eval  # noqa: E402

MC_ITEMS = [
    {"q": "The cat sat on the", "choices": [" mat", " dog", " moon!"], "label": 0},
    {"q": "One, two,", "choices": [" three", " 3", " four five"], "label": 2},
]
ROLL_DOCS = ["To be, or not to be: that is the question.", "Hello world!"]


def _write_tasks(d):
    write_mc_task(d, MC_ITEMS, metrics=("acc", "acc_norm"))
    (d / "roll.jsonl").write_text("".join(json.dumps({"page": x}) + "\n" for x in ROLL_DOCS))
    (d / "t_roll.yaml").write_text(f"""task: t_roll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(d / 'roll.jsonl'))}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{page}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
""")


def _text(n_lines=400, seed=0):
    rng = random.Random(seed)
    words = "the of and to a in that is was he for it with as his on be at by had not are but from or".split()
    return "".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 10))).capitalize() + ".\n"
                   for _ in range(n_lines))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    _write_tasks(d)
    (d / "corpus.txt").write_text(_text())
    model, tok = tiny_llama(vocab=128), tiny_tokenizer()
    tp = suites.build_tokppl_task(tok, str(d / "corpus.txt"), seqlen=48, max_windows=3, root=d / "gen")
    out = d / "out"
    res = run_lm_eval(model, tok, ["t_mc", "t_roll", "qtool_tokppl"], include_path=[d, tp.directory],
                      batch_size=2, max_length=64, log_samples=True, output_dir=out)
    return model, tok, res, tp, out


def _ll(model, ids, start):
    """Σ log p(ids[i] | ids[:i]) for i >= start, from the model's log-softmax."""
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return sum(lp[i - 1, ids[i]].item() for i in range(start, len(ids)))


def test_hflm_accepts_char_tokenizer_and_model_object(run):
    model, tok, res, tp, out = run
    assert res["qtool"]["prefix_token_id"] == tok.bos_token_id == tp.prefix_token_id
    assert res["qtool"]["max_length"] == 64 and res["qtool"]["device"] == "cpu"
    assert set(res["qtool"]["metrics"]) == {"t_mc", "t_roll", "qtool_tokppl"}


def test_multiple_choice_matches_hand_computation(run):
    model, tok, res, _, _ = run
    samples = sorted(res["samples"]["t_mc"], key=lambda s: s["doc_id"])
    accs, norms = [], []
    for item, s in zip(MC_ITEMS, samples):
        got = [r[0][0] for r in s["resps"]]
        ctx = tok.encode(item["q"])
        want = [_ll(model, tok.encode(item["q"] + c), len(ctx)) for c in item["choices"]]
        assert got == pytest.approx(want, rel=1e-5, abs=1e-4)
        accs.append(float(max(range(3), key=lambda i: want[i]) == item["label"]))
        norms.append(float(max(range(3), key=lambda i: want[i] / len(item["choices"][i].encode())) == item["label"]))
    m = res["qtool"]["metrics"]["t_mc"]
    assert m["acc"] == pytest.approx(sum(accs) / len(accs))
    assert m["acc_norm"] == pytest.approx(sum(norms) / len(norms))


def test_rolling_loglikelihood_matches_hand_computation(run):
    model, tok, res, _, _ = run
    nll = res["qtool"]["doc_nll"]["t_roll"]
    total, words, nbytes = 0.0, 0, 0
    for i, doc in enumerate(ROLL_DOCS):
        ids = [tok.bos_token_id] + tok.encode(doc)  # lm-eval conditions the first token on the prefix token
        want = -_ll(model, ids, 1)
        assert nll[i] == pytest.approx(want, rel=1e-5)
        total += want
        words += len(doc.split())
        nbytes += len(doc.encode())
    m = res["qtool"]["metrics"]["t_roll"]
    assert m["word_perplexity"] == pytest.approx(math.exp(total / words), rel=1e-5)
    assert m["byte_perplexity"] == pytest.approx(math.exp(total / nbytes), rel=1e-5)


def test_tokppl_agrees_with_qtool_perplexity(run):
    model, tok, res, tp, _ = run
    lm_nll = res["qtool"]["doc_nll"]["qtool_tokppl"]
    assert sorted(lm_nll) == tp.window_index == [0, 1, 2]
    ref = suites.qtool_tokppl_reference(model, tp)
    a = suites.compare_tokppl(lm_nll, ref)
    assert abs(a["rel_diff_prefixed_ppl"]) < 1e-5 and a["max_rel_diff_prefixed_window_nll"] < 1e-5
    assert res["qtool"]["metrics"]["qtool_tokppl"]["token_perplexity"] == pytest.approx(a["qtool_prefixed_ppl"], rel=1e-5)
    # the GPTQ-style windows (real token 0 as context) differ only through that first token
    assert a["rel_diff_protocol_ppl"] != 0.0 and abs(a["rel_diff_protocol_ppl"]) < 0.1
    # and the prefixed windows are exactly [p] + tokens 1.. of qtool's protocol windows
    assert torch.equal(tp.prefixed[:, 1:], tp.protocol[:, 1:]) and (tp.prefixed[:, 0] == tp.prefix_token_id).all()


def test_tokppl_with_a_tokenizer_that_adds_bos(tmp_path):
    """lm-eval then also scores the BOS the tokenizer adds; qtool's side scores [p, BOS, ...] too."""
    (tmp_path / "corpus.txt").write_text(_text(seed=1))
    model, tok = tiny_llama(vocab=128, seed=1), tiny_tokenizer(add_bos=True)
    tp = suites.build_tokppl_task(tok, str(tmp_path / "corpus.txt"), seqlen=40, max_windows=2, root=tmp_path / "gen")
    assert tp.added_special == 1 and tp.n_scored == 40 and tp.prefixed.shape == (2, 41)
    res = run_lm_eval(model, tok, ["qtool_tokppl"], include_path=tp.directory, batch_size=2, max_length=64)
    a = suites.compare_tokppl(res["qtool"]["doc_nll"]["qtool_tokppl"], suites.qtool_tokppl_reference(model, tp))
    assert a["n_windows"] == 2 and abs(a["rel_diff_prefixed_ppl"]) < 1e-5


def test_outputs_written(run):
    _, _, res, _, out = run
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["results"]) == {"t_mc", "t_roll", "qtool_tokppl"} and "samples" not in saved
    for t in ("t_mc", "t_roll", "qtool_tokppl"):
        assert (out / f"samples_{t}.jsonl").is_file()


def test_expand_tasks():
    assert suites.expand_tasks(["qtool-suite", "foo", "qtool_ppl"]) == list(suites.SUITE_TASKS) + ["foo"]
    assert suites.expand_tasks(["a", "", "a"]) == ["a"]


def _play(seed=0, n=600):
    rng = random.Random(seed)
    words = ("love death king crown sword night ghost father mother queen time blood heaven earth speak "
             "thou thee lord good sweet soul").split()
    lines = ["A PLAY", "", "ACT I.", "", "Scene I. A room.", ""]
    for i in range(n):
        lines.append(rng.choice(["Ham.", "King.", "First Clown.", "Queen."]))
        for _ in range(rng.randint(1, 3)):
            lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(5, 11))).capitalize() + ",")
        lines.append("")
    return "\n".join(lines)


def test_static_suite_is_deterministic_and_absolute(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "corpus").mkdir(parents=True)
    (home / "corpus" / "hamlet.txt").write_text(_play(0))
    (home / "corpus" / "calib.txt").write_text(_play(1))
    monkeypatch.setenv("QTOOL_HOME", str(home))
    d1 = suites.build_static_suite()
    files1 = {p.name: p.read_bytes() for p in d1.iterdir()}
    import shutil

    shutil.rmtree(d1)
    d2 = suites.build_static_suite()
    assert d1 == d2 and {p.name: p.read_bytes() for p in d2.iterdir()} == files1
    assert d2.parent == home / "tasks"
    meta = suites.suite_meta(d2)
    assert meta["tasks"]["qtool_nextline"]["n_docs"] == suites.N_NEXTLINE
    for y in ("qtool_ppl.yaml", "qtool_nextline.yaml"):
        for line in (d2 / y).read_text().splitlines():
            if line.strip().startswith(("test:", "train:")):
                p = json.loads(line.split(":", 1)[1].strip())
                assert p.startswith("/") and (d2 / p.rsplit("/", 1)[1]).is_file()
    lines = [ln.strip() for ln in (home / "corpus" / "hamlet.txt").read_text().split("\n") if ln.strip()]
    items = [json.loads(x) for x in (d2 / "nextline_test.jsonl").read_text().splitlines()]
    for it in items[:50]:
        ch = it["choices"]
        assert len(ch) == 4 == len(set(ch))
        true = ch[it["label"]]
        ctx = it["context"].split("\n")
        pos = [i for i in range(len(lines) - 4) if lines[i:i + 4] == ctx and lines[i + 4] == true]
        assert pos, "the labelled choice is the line that follows the context"
    assert len({it["label"] for it in items}) == 4  # answers not always in the same slot
    pages = [json.loads(x)["page"] for x in (d2 / "ppl.jsonl").read_text().splitlines()]
    assert all(1500 <= len(p) <= 2000 for p in pages)


def test_ppl_passages_bounds_with_long_speeches():
    rng = random.Random(3)
    paras = ["\n".join("x" * rng.randint(20, 70) for _ in range(rng.randint(1, 60))) for _ in range(200)]
    text = "\n\n".join(paras)
    pages = suites.ppl_passages(text)
    assert len(pages) > 20 and all(1500 <= len(p) <= 2000 for p in pages)
    joined = "\n".join(p.replace("\n\n", "\n") for p in pages)
    assert joined in text.replace("\n\n", "\n")  # text order, nothing reordered or invented
