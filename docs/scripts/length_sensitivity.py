"""How much qtool's own perplexity of a checkpoint moves when one window is fed with one token less.

Mathematically the NLL of the first L-1 scored tokens does not depend on whether the last input token
is present (causal attention); numerically it changes the matrix shapes, hence float reduction order,
which can flip the rounding of dynamically quantized activations (int8 per token, KV4). This is the
noise floor under which lm-eval (input L-1 tokens) and qtool (input L tokens) can agree for W8A8 /
W4A8KV4 checkpoints (docs/benchmarks.md, "Evaluation report").

    python docs/scripts/length_sensitivity.py CKPT_DIR [CKPT_DIR ...]
"""

import os
import sys

import torch

from qtool import api


def nll(model, x: torch.Tensor, n: int) -> float:
    with torch.no_grad():
        logits = model(x[None]).logits.float()
    lp = torch.log_softmax(logits[0, : n - 1], -1)
    return -lp.gather(-1, x[1:n, None]).sum().item()


def main(targets: list[str]) -> None:
    home = os.environ.get("QTOOL_HOME", os.path.expanduser("~/.cache/qtool"))
    text = open(os.path.join(home, "corpus", "britannica.txt"), encoding="utf-8").read()
    for t in targets:
        model, tok, _ = api.load_target(t, "reference")
        w = tok(text, return_tensors="pt").input_ids[0][:2048].clone()
        w[0] = 1  # lm-eval's prefix token for SmolLM2
        full, short = nll(model, w, 2047), nll(model, w[:2047], 2047)
        print(f"{t}: input 2048 {full:.6f}  input 2047 {short:.6f}  rel diff {(full - short) / short:+.2e}")


if __name__ == "__main__":
    main(sys.argv[1:])
