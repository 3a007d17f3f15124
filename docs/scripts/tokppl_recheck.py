"""Re-check a report's lm-eval vs qtool token-perplexity agreement with qtool's current reference.

Reads report.json (lm-eval's NLL sums per target are stored there), rebuilds the same tokppl windows,
recomputes qtool's side with `qtool.eval.suites.qtool_tokppl_reference` and prints the relative
differences. Used for docs/eval-report after the reference started feeding lm-eval's exact input.

    python docs/scripts/tokppl_recheck.py docs/eval-report/report.json
"""

import json
import math
import sys

from qtool import api
from qtool.eval import suites


def main(path: str) -> None:
    doc = json.load(open(path, encoding="utf-8"))
    targets = {t["label"]: t["target"] for t in doc["targets"]}
    for a in doc["agreement"]:
        model, tok, _ = api.load_target(targets[a["label"]], "reference")
        data = suites.build_tokppl_task(tok, a["dataset"], seqlen=a["seqlen"], max_windows=a["n_windows"])
        ref = suites.qtool_tokppl_reference(model, data, a["windows"])
        nll = sum(ref["prefixed"][k] for k in a["windows"])
        n = a["n_scored_tokens"]
        ppl_q, ppl_l = math.exp(nll / n), math.exp(a["lm_eval_nll_sum"] / n)
        rel = ppl_l / ppl_q - 1
        print(f"{a['label']:28s} lm-eval {ppl_l:.6f}  qtool {ppl_q:.6f}  rel {rel:+.2e}  "
              f"{'agree' if abs(rel) <= a['tolerance'] else 'DISAGREE'} (≤ {a['tolerance']:.0e})", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
