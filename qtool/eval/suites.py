"""Offline lm-eval task suites generated from the bundled corpus (no hub, no downloads).

`qtool-suite` expands to three local lm-eval tasks, written at run time under
`<QTOOL_HOME>/tasks/` with ABSOLUTE `data_files` paths (lm-eval resolves relative paths against the
working directory, so the YAML is generated, never shipped):

- `qtool_ppl` (loglikelihood_rolling): ~1.5-2 kB passages of the held-out play (hamlet, never used
  for calibration); lm-eval's own metrics word_perplexity, byte_perplexity, bits_per_byte. These are
  *document-level rolling* perplexities, not the GPTQ-style token perplexity of `qtool.eval.ppl`.
- `qtool_nextline` (multiple_choice): a few lines of the play, then pick the true next line among
  3 distractor lines of similar length from elsewhere in the same play; 200 items drawn with a fixed
  seed; acc and acc_norm (acc_norm divides by the choice's length in bytes). Few-shot examples
  (`--num-fewshot`) come from other plays (`bundled-calib`), never from the test play.
- `qtool_tokppl` (loglikelihood_rolling, custom `process_results`): token-level perplexity on the
  same token windows qtool's own evaluator uses, to show both harnesses agree (see
  `build_tokppl_task`). It depends on the tokenizer, so it is generated per tokenizer.

Generation is deterministic (fixed seed, sorted inputs); each directory's name carries a hash of
its inputs and parameters, and is written through a temporary directory plus an atomic rename, so a
cache hit is always complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from qtool.errors import ConfigError

log = logging.getLogger("qtool.eval.suites")

SUITE_VERSION = 1
_GEN_REV = 2  # bump whenever generated data changes for the same inputs (part of the cache key)
SUITE_ALIASES = ("qtool-suite", "qtool_suite")
PPL_TASK = "qtool_ppl"
NEXTLINE_TASK = "qtool_nextline"
TOKPPL_TASK = "qtool_tokppl"
SUITE_TASKS = (PPL_TASK, NEXTLINE_TASK, TOKPPL_TASK)
STATIC_TASKS = (PPL_TASK, NEXTLINE_TASK)

DEFAULT_SEED = 1234
PPL_TEXT = "hamlet"  # held out: not part of bundled-calib
NEXTLINE_TEXT = "hamlet"
FEWSHOT_TEXT = "bundled-calib"
N_NEXTLINE = 200
N_NEXTLINE_FEWSHOT = 32
N_CONTEXT_LINES = 4
N_DISTRACTORS = 3


def tasks_root(root: Optional[Path | str] = None) -> Path:
    if root is not None:
        return Path(root).expanduser()
    from qtool.assets import qtool_home

    return qtool_home() / "tasks"


def expand_tasks(tasks: Sequence[str]) -> list[str]:
    """`qtool-suite` → the suite's task names; duplicates dropped, order kept."""
    out: list[str] = []
    for t in tasks:
        t = t.strip()
        if not t:
            continue
        for name in (SUITE_TASKS if t in SUITE_ALIASES else (t,)):
            if name not in out:
                out.append(name)
    return out


# --- text → items ---------------------------------------------------------------------------
def _sha(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True).encode())
        h.update(b"\0")
    return h.hexdigest()


def _paragraphs(text: str) -> list[str]:
    from qtool.calib.data import split_paragraphs

    return [p.strip("\n") for p in split_paragraphs(text)]


def ppl_passages(text: str, min_chars: int = 1500, max_chars: int = 2000) -> list[str]:
    """Passages of `min_chars`..`max_chars` characters, in text order, with lines kept whole.

    Paragraphs (split on blank lines, rejoined with "\\n\\n") are accumulated line by line; a passage
    ends at the first paragraph end after `min_chars`, or earlier, at a line boundary, when the next
    line would take it past `max_chars` (long speeches are split between lines). A passage is
    shorter than `min_chars` only before a single line too long to fit, and longer than `max_chars`
    only when it is one such line; the last, short remainder is dropped.
    """
    out: list[str] = []
    cur = ""
    for para in _paragraphs(text):
        lines = para.split("\n")
        for j, line in enumerate(lines):
            sep = "" if not cur else ("\n\n" if j == 0 else "\n")
            if cur and len(cur) + len(sep) + len(line) > max_chars and len(cur) >= min_chars // 2:
                out.append(cur)
                cur, sep = "", ""
            cur += sep + line
            if j == len(lines) - 1 and len(cur) >= min_chars:
                out.append(cur)
                cur = ""
    return out


_TAG = re.compile(r"^[A-Z][A-Za-z' ]{0,24}\.$")  # speaker tags: "Ham.", "First Clown.", "King."


def _play_lines(text: str) -> list[str]:
    """Non-empty lines (right-stripped) from the first "ACT" heading on (front matter dropped)."""
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").split("\n")]
    start = next((i for i, ln in enumerate(lines) if ln.strip().startswith("ACT ")), 0)
    return [ln for ln in lines[start:] if ln.strip()]


def _is_content(line: str, min_len: int) -> bool:
    s = line.strip()
    return (len(s) >= min_len and not _TAG.match(s) and not s.startswith("[") and not s.isupper()
            and not s.startswith(("ACT ", "Scene ", "SCENE ")))


def nextline_items(
    text: str, n: int = N_NEXTLINE, seed: int = DEFAULT_SEED, n_context: int = N_CONTEXT_LINES,
    n_distractors: int = N_DISTRACTORS, min_len: int = 24, min_gap: int = 40,
) -> list[dict]:
    """Multiple-choice items: `n_context` lines of the play → the true next line or a distractor.

    The answer is a content line (not a speaker tag or stage direction, at least `min_len`
    characters); distractors are distinct content lines at least `min_gap` lines away, of similar
    length (0.75-1.33x, widened only if too few exist), so neither sum nor length-normalised
    log-likelihood can win on length alone. Items are drawn with `random.Random(seed)` and kept in
    text order; the choice order is shuffled with the same generator.
    """
    rng = random.Random(seed)
    lines = _play_lines(text)
    content = [i for i, ln in enumerate(lines) if _is_content(ln, min_len)]
    eligible = [i for i in content
                if i >= n_context and any(_is_content(x, 1) for x in lines[i - n_context:i])]
    if len(eligible) < n:
        raise ConfigError(f"text has only {len(eligible)} eligible next-line items, {n} requested")
    picked = sorted(rng.sample(eligible, n))
    items = []
    for i in picked:
        true = lines[i].strip()
        ctx = "\n".join(x.strip() for x in lines[i - n_context:i])
        distractors: list[str] = []
        for lo, hi in ((0.75, 1.34), (0.5, 2.0), (0.0, math.inf)):
            pool = sorted({lines[j].strip() for j in content
                           if abs(j - i) >= min_gap and lo * len(true) <= len(lines[j].strip()) <= hi * len(true)}
                          - {true} - set(distractors))
            if len(pool) >= n_distractors - len(distractors):
                distractors += rng.sample(pool, n_distractors - len(distractors))
                break
        choices = [true] + distractors
        rng.shuffle(choices)
        items.append({"context": ctx, "choices": choices, "label": choices.index(true), "line": i})
    return items


# --- writing task directories ---------------------------------------------------------------
def _write_jsonl(path: Path, rows: Sequence[dict]) -> str:
    data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode("utf-8")
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _q(s: str) -> str:
    """A YAML double-quoted scalar (JSON strings are valid YAML)."""
    return json.dumps(s)


def _publish(tmp: Path, final: Path) -> None:
    try:
        os.replace(tmp, final)
    except OSError:  # another process published the same (deterministic) content first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / "SUITE.json").is_file():
            raise


def _ppl_yaml(data: Path) -> str:
    return f"""# generated by qtool.eval.suites (v{SUITE_VERSION}); lm-eval document-level rolling perplexity
task: {PPL_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {_q(str(data))}
output_type: loglikelihood_rolling
test_split: test
num_fewshot: 0
doc_to_text: ""
doc_to_target: "{{{{page}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: {SUITE_VERSION}.0
"""


def _nextline_yaml(test: Path, train: Path) -> str:
    return f"""# generated by qtool.eval.suites (v{SUITE_VERSION}); pick the true next line of the play
task: {NEXTLINE_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {_q(str(test))}
    train: {_q(str(train))}
output_type: multiple_choice
test_split: test
fewshot_split: train
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: "\\n"
fewshot_delimiter: "\\n\\n"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: {SUITE_VERSION}.0
"""


def build_static_suite(root: Optional[Path | str] = None, seed: int = DEFAULT_SEED, *,
                       ppl_text: str = PPL_TEXT, nextline_text: str = NEXTLINE_TEXT,
                       fewshot_text: str = FEWSHOT_TEXT, n_nextline: int = N_NEXTLINE) -> Path:
    """Write (or reuse) the `qtool_ppl` + `qtool_nextline` task directory; returns its path."""
    from qtool.calib.data import load_text

    texts = {k: load_text(spec) for k, spec in
             (("ppl", ppl_text), ("nextline", nextline_text), ("fewshot", fewshot_text))}
    key = _sha(SUITE_VERSION, _GEN_REV, seed, n_nextline, {k: [n, hashlib.sha256(t.encode()).hexdigest()]
                                                 for k, (n, t) in texts.items()})
    base = tasks_root(root)
    final = base / f"qtool-suite-v{SUITE_VERSION}-{key[:12]}"
    if (final / "SUITE.json").is_file():
        return final
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".suite-", dir=base))
    try:
        passages = ppl_passages(texts["ppl"][1])
        ppl_sha = _write_jsonl(tmp / "ppl.jsonl", [{"page": p} for p in passages])
        test = nextline_items(texts["nextline"][1], n=n_nextline, seed=seed)
        shots = nextline_items(texts["fewshot"][1], n=N_NEXTLINE_FEWSHOT, seed=seed + 1)
        test_sha = _write_jsonl(tmp / "nextline_test.jsonl", test)
        train_sha = _write_jsonl(tmp / "nextline_train.jsonl", shots)
        # the YAML names the FINAL absolute paths (the directory is renamed into place below)
        (tmp / f"{PPL_TASK}.yaml").write_text(_ppl_yaml((final / "ppl.jsonl").resolve()))
        (tmp / f"{NEXTLINE_TASK}.yaml").write_text(
            _nextline_yaml((final / "nextline_test.jsonl").resolve(), (final / "nextline_train.jsonl").resolve()))
        meta = {
            "suite_version": SUITE_VERSION, "seed": seed, "key": key,
            "tasks": {
                PPL_TASK: {"text": texts["ppl"][0], "n_docs": len(passages), "sha256": ppl_sha,
                           "chars": [min(map(len, passages)), max(map(len, passages))]},
                NEXTLINE_TASK: {"text": texts["nextline"][0], "n_docs": len(test), "sha256": test_sha,
                                "fewshot_text": texts["fewshot"][0], "n_fewshot_docs": len(shots),
                                "fewshot_sha256": train_sha, "n_choices": N_DISTRACTORS + 1},
            },
        }
        (tmp / "SUITE.json").write_text(json.dumps(meta, indent=2) + "\n")
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote offline lm-eval suite %s", final)
    return final


def suite_meta(directory: Path | str) -> dict:
    return json.loads((Path(directory) / "SUITE.json").read_text())


# --- token perplexity on qtool's windows ------------------------------------------------------
_TOKPPL_UTILS = '''"""process_results for qtool_tokppl (generated by qtool.eval.suites)."""


def process_results(doc, results):
    (loglikelihood,) = results
    return {"token_perplexity": (loglikelihood, doc["n_tokens"]), "nll_sum": -loglikelihood}


def total(items):
    return float(sum(items))
'''


def _tokppl_yaml(data: Path) -> str:
    return f"""# generated by qtool.eval.suites (v{SUITE_VERSION}); token perplexity on qtool's windows
task: {TOKPPL_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {_q(str(data))}
output_type: loglikelihood_rolling
test_split: test
num_fewshot: 0
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
process_results: !function qtool_tokppl_utils.process_results
metric_list:
  - metric: token_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: nll_sum
    aggregation: !function qtool_tokppl_utils.total
    higher_is_better: false
metadata:
  version: {SUITE_VERSION}.0
"""


def lm_eval_prefix_token_id(tokenizer: Any) -> int:
    """The token lm-eval's HFLM conditions the first token of a document on (BOS, else EOS)."""
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise ConfigError("the tokenizer has neither a BOS nor an EOS token; lm-eval needs a prefix token")
    return int(tid)


@dataclass
class TokPplData:
    """The `qtool_tokppl` task for one tokenizer, and the token windows it was made from.

    `protocol[i]` is qtool's GPTQ-style window `ids[k*L:(k+1)*L]` (k = `window_index[i]`).
    `prefixed[i]` is `[p] + lm_tokens`, where `lm_tokens` is what lm-eval's HFLM gets from the
    document's text (tokens 1..L-1 of the window, after any special tokens the tokenizer adds by
    default, e.g. a BOS) — the exact sequence lm-eval scores for document i. `n_scored` tokens are
    scored per document on that side (L-1, plus the special tokens the tokenizer adds).
    """

    directory: Path
    dataset: str
    seqlen: int
    prefix_token_id: int
    window_index: list[int]
    skipped: list[int]
    protocol: Any  # LongTensor [n, L]
    prefixed: Any  # LongTensor [n, n_scored + 1]
    n_scored: int = 0
    added_special: int = 0
    total_windows: int = 0
    meta: dict = field(default_factory=dict)


def _hflm_encode(tokenizer: Any, text: str, prefix_token_id: int) -> list[int]:
    """Token ids as lm-eval's HFLM.tok_encode gives them for a rolling document (add_bos_token unset):
    the tokenizer's default special tokens, none if the text already starts with the prefix token."""
    if text.startswith(tokenizer.decode([prefix_token_id])):
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(text))


def build_tokppl_task(tokenizer: Any, dataset: str = "bundled", seqlen: int = 2048,
                      max_windows: Optional[int] = 8, root: Optional[Path | str] = None,
                      prefix_token_id: Optional[int] = None) -> TokPplData:
    """Generate the `qtool_tokppl` task: lm-eval documents that ARE qtool's token windows.

    What is compared. qtool's protocol (`qtool.eval.ppl`) cuts the tokenized text into windows of L
    tokens and scores tokens 1..L-1 of each window given the previous ones (token 0 is context
    only). lm-eval's `loglikelihood_rolling` tokenizes a document's text and, when it fits in
    `max_length`, scores EVERY token, the first one conditioned on a prefix token p (BOS, else EOS)
    that stays in the context of all later tokens. The two therefore agree exactly when qtool's
    window starts with p: for window k the document is the text of tokens `ids[k*L+1:(k+1)*L]`
    (L-1 tokens); lm-eval scores them given [p, ...], and qtool's evaluator run on the window
    `[p] + ids[k*L+1:(k+1)*L]` scores the same L-1 tokens given the same context. A document is used
    only if its text re-tokenizes to exactly those L-1 tokens (windows that do not, e.g. a BPE merge
    across the cut, are skipped and listed), and lm-eval must run with max_length >= L-1 so the
    document is one window. A tokenizer that adds special tokens by default (a BOS) makes lm-eval
    score them too; the qtool side then uses `[p] + [BOS] + ...`, the same sequence. The unmodified
    protocol windows (real token 0 as context instead of p) differ only by that first context
    token; both are reported.
    """
    import torch

    from qtool.calib.data import load_text
    from qtool.eval.ppl import tokenize_text

    if seqlen < 3:
        raise ConfigError(f"qtool_tokppl needs seqlen >= 3, got {seqlen}")
    name, text = load_text(dataset)
    ids = tokenize_text(tokenizer, text)
    total = int(ids.numel()) // seqlen
    if total == 0:
        raise ConfigError(f"{name} has {ids.numel()} tokens, fewer than one window of {seqlen}")
    want = total if max_windows is None else min(total, max_windows)
    p = lm_eval_prefix_token_id(tokenizer) if prefix_token_id is None else int(prefix_token_id)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    docs, index, skipped, prot, pref = [], [], [], [], []
    n_extra: Optional[int] = None
    for k in range(total):
        if len(index) == want:
            break
        win = ids[k * seqlen:(k + 1) * seqlen]
        body = win[1:].tolist()
        txt = tokenizer.decode(body, clean_up_tokenization_spaces=False)
        lm = _hflm_encode(tokenizer, txt, p)
        extra = len(lm) - len(body)
        if (extra < 0 or lm[extra:] != body or not all(t in special for t in lm[:extra])
                or (n_extra is not None and extra != n_extra)):
            skipped.append(k)
            continue
        n_extra = extra
        index.append(k)
        docs.append({"text": txt, "n_tokens": len(lm), "window": k,
                     "ids_sha256": hashlib.sha256(json.dumps(lm).encode()).hexdigest()})
        prot.append(win)
        pref.append(torch.tensor([p] + lm, dtype=torch.long))
    if not index:
        raise ConfigError(f"no {seqlen}-token window of {name} round-trips through the tokenizer",
                          "qtool_tokppl needs text whose decoded windows re-tokenize identically")
    key = _sha(SUITE_VERSION, _GEN_REV, name, seqlen, p, [d["ids_sha256"] for d in docs])
    base = tasks_root(root)
    final = base / f"qtool-tokppl-v{SUITE_VERSION}-{key[:12]}"
    meta = {"suite_version": SUITE_VERSION, "task": TOKPPL_TASK, "dataset": name, "seqlen": seqlen,
            "prefix_token_id": p, "window_index": index, "skipped_windows": skipped,
            "total_windows": total, "n_scored": len(pref[0]) - 1, "added_special": n_extra, "key": key}
    if not (final / "SUITE.json").is_file():
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tokppl-", dir=base))
        try:
            meta["sha256"] = _write_jsonl(tmp / "tokppl.jsonl", docs)
            (tmp / "qtool_tokppl_utils.py").write_text(_TOKPPL_UTILS)
            (tmp / f"{TOKPPL_TASK}.yaml").write_text(_tokppl_yaml((final / "tokppl.jsonl").resolve()))
            (tmp / "SUITE.json").write_text(json.dumps(meta, indent=2) + "\n")
            _publish(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if skipped:
        log.info("qtool_tokppl: skipped %d window(s) of %s that do not round-trip: %s", len(skipped), name, skipped)
    return TokPplData(directory=final, dataset=name, seqlen=seqlen, prefix_token_id=p, window_index=index,
                      skipped=skipped, protocol=torch.stack(prot), prefixed=torch.stack(pref),
                      n_scored=len(pref[0]) - 1, added_special=n_extra or 0, total_windows=total,
                      meta=suite_meta(final))


def qtool_tokppl_reference(model: Any, data: TokPplData, windows: Optional[Sequence[int]] = None) -> dict:
    """qtool's NLL on the tokppl windows, one window at a time: `prefixed` with lm-eval's exact input
    (`[p] + tokens[:-1]`), `protocol` through qtool's evaluator (`qtool.eval.ppl.perplexity`).

    `windows` (window numbers, default all of `data.window_index`) restricts the work, e.g. to the
    documents lm-eval scored under `--limit`. Returns, per window number, the NLL sum (nats) for
    `prefixed` (`[p] + lm-eval's tokens`: the like-for-like number, `n_scored` tokens) and
    `protocol` (the unmodified GPTQ-style window, L-1 tokens), and the scored-token counts.
    """
    import torch

    from qtool.eval.ppl import _model_device, perplexity, token_nll

    def lm_eval_shaped_nll(w) -> float:
        # lm-eval's rolling window feeds [p] + tokens[:-1] (one token shorter than qtool's window) and
        # scores tokens; feed the very same input, since for models that quantize activations
        # dynamically the matrix shapes change float reduction order and with it some roundings.
        w = w.to(torch.long)[None].to(_model_device(model))
        with torch.inference_mode():
            return float(token_nll(model, w[:, :-1], w[:, 1:]).double().sum())

    want = list(data.window_index if windows is None else windows)
    pos = {k: i for i, k in enumerate(data.window_index)}
    out: dict = {"seqlen": data.seqlen, "windows": want, "prefixed": {}, "protocol": {},
                 "scored": {"prefixed": data.n_scored, "protocol": data.seqlen - 1}}
    for k in want:
        i = pos[k]
        out["prefixed"][k] = lm_eval_shaped_nll(data.prefixed[i])
        w = data.protocol[i]
        out["protocol"][k] = perplexity(model, w, seqlen=int(w.numel())).nll_mean * (int(w.numel()) - 1)
    return out


def compare_tokppl(lm_eval_window_nll: dict, reference: dict) -> dict:
    """Agreement of lm-eval's per-window NLL sums with qtool's on the same windows.

    `lm_eval_window_nll`: window number → NLL sum (= -loglikelihood) from lm-eval's samples.
    Perplexities are exp(total NLL / scored tokens) over the windows both evaluated; relative
    differences are lm-eval / qtool - 1 (of the perplexity, and the largest per-window NLL one).
    """
    common = [k for k in reference["windows"] if k in lm_eval_window_nll]
    if not common:
        raise ValueError("lm-eval and qtool evaluated no common tokppl window")
    n_lm = reference["scored"]["prefixed"]
    lm = [float(lm_eval_window_nll[k]) for k in common]
    lm_sum = math.fsum(lm)
    out = {"windows": common, "n_windows": len(common), "seqlen": reference["seqlen"],
           "n_scored_tokens": len(common) * n_lm, "scored_per_window": dict(reference["scored"]),
           "lm_eval_ppl": math.exp(lm_sum / (len(common) * n_lm)), "lm_eval_nll_sum": lm_sum}
    for kind in ("prefixed", "protocol"):
        ref = [reference[kind][k] for k in common]
        ref_sum = math.fsum(ref)
        out[f"qtool_{kind}_ppl"] = math.exp(ref_sum / (len(common) * reference["scored"][kind]))
        out[f"qtool_{kind}_nll_sum"] = ref_sum
        out[f"rel_diff_{kind}_ppl"] = out["lm_eval_ppl"] / out[f"qtool_{kind}_ppl"] - 1.0
        out[f"max_rel_diff_{kind}_window_nll"] = max(abs(a / b - 1.0) for a, b in zip(lm, ref))
    return out
