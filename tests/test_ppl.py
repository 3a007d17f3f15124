"""Perplexity protocol (algorithms.md §5.1) against hand computations."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from helpers import tiny_llama, tiny_tokenizer
from qtool.errors import ConfigError
from qtool.eval.ppl import PplResult, perplexity, tokenize_text


def _hand_ppl(model, ids: torch.Tensor, seqlen: int, n_windows: int | None = None) -> tuple[float, int]:
    """Independent reference: one window at a time, float64 log-softmax, explicit target gather."""
    n = ids.numel() // seqlen if n_windows is None else n_windows
    window_means = []
    with torch.no_grad():
        for i in range(n):
            w = ids[i * seqlen:(i + 1) * seqlen].unsqueeze(0)
            logits = model(input_ids=w).logits[0].double()
            logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
            total = 0.0
            for t in range(seqlen - 1):
                total -= logp[t, w[0, t + 1]].item()
            window_means.append(total / (seqlen - 1))
    return math.exp(sum(window_means) / n), n


class ConstantLogits(torch.nn.Module):
    """A 'model' whose next-token distribution is a fixed table indexed by the current token."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids])


def test_matches_hand_computation_on_tiny_llama():
    model = tiny_llama(vocab=128, seed=3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (3 * 32 + 17,), generator=g)
    r = perplexity(model, ids, seqlen=32)
    ref, n = _hand_ppl(model, ids, 32)
    assert r.n_windows == n == 3
    assert r.n_tokens == 96 and r.total_tokens == ids.numel() and r.seqlen == 32
    assert r.ppl == pytest.approx(ref, rel=1e-5)
    assert r.nll_mean == pytest.approx(math.log(ref), rel=1e-5)
    assert r.seconds >= 0
    # a random model on random tokens is close to (but not exactly) uniform over the vocabulary
    assert 64 < r.ppl < 512


def test_uniform_logits_give_vocab_size():
    vocab = 50
    model = ConstantLogits(torch.zeros(vocab, vocab))
    ids = torch.arange(200) % vocab
    r = perplexity(model, ids, seqlen=20)
    assert r.n_windows == 10
    assert r.ppl == pytest.approx(vocab, rel=1e-6)  # fp32 cross-entropy


def test_known_bigram_table():
    """Deterministic bigram 'model': the perplexity has a closed form."""
    vocab = 4
    table = torch.log(torch.tensor([
        [0.1, 0.7, 0.1, 0.1],
        [0.25, 0.25, 0.25, 0.25],
        [0.5, 0.2, 0.2, 0.1],
        [0.4, 0.3, 0.2, 0.1],
    ]))
    model = ConstantLogits(table)
    ids = torch.tensor([0, 1, 2, 3, 0, 1, 1, 0, 3])  # seqlen 4 → two windows, last token dropped
    # window 0: 0→1 (0.7), 1→2 (0.25), 2→3 (0.1); window 1: 0→1 (0.7), 1→1 (0.25), 1→0 (0.25)
    w0 = -(math.log(0.7) + math.log(0.25) + math.log(0.1)) / 3
    w1 = -(math.log(0.7) + math.log(0.25) + math.log(0.25)) / 3
    r = perplexity(model, ids, seqlen=4)
    assert r.n_windows == 2
    assert r.nll_mean == pytest.approx((w0 + w1) / 2, rel=1e-6)
    assert r.ppl == pytest.approx(math.exp((w0 + w1) / 2), rel=1e-6)
    # the window boundary does not predict across windows: 3→0 (between windows) is never scored
    r1 = perplexity(model, ids, seqlen=4, max_windows=1)
    assert r1.ppl == pytest.approx(math.exp(w0), rel=1e-6)


def test_batching_max_windows_shapes_and_progress():
    model = tiny_llama(vocab=128, seed=1)
    ids = torch.randint(0, 128, (5 * 16 + 3,), generator=torch.Generator().manual_seed(1))
    base = perplexity(model, ids, seqlen=16)
    batched = perplexity(model, ids.unsqueeze(0), seqlen=16, batch_size=3)
    assert batched.n_windows == base.n_windows == 5
    assert batched.ppl == pytest.approx(base.ppl, rel=1e-5)
    calls = []
    two = perplexity(model, ids, seqlen=16, max_windows=2, progress=lambda i, n: calls.append((i, n)))
    assert two.n_windows == 2 and two.n_tokens == 32
    assert calls == [(1, 2), (2, 2)]
    ref, _ = _hand_ppl(model, ids, 16, n_windows=2)
    assert two.ppl == pytest.approx(ref, rel=1e-5)


def test_too_short_and_bad_arguments():
    model = ConstantLogits(torch.zeros(8, 8))
    with pytest.raises(ConfigError, match="fewer than one perplexity window"):
        perplexity(model, torch.arange(8) % 8, seqlen=16)
    with pytest.raises(ConfigError):
        perplexity(model, torch.arange(32) % 8, seqlen=16, max_windows=0)
    with pytest.raises(ValueError):
        perplexity(model, torch.zeros(2, 32, dtype=torch.long), seqlen=16)


def test_tokenize_text_is_one_encode():
    tok = tiny_tokenizer()
    text = "Hello world.\n\nSecond paragraph!"
    ids = tokenize_text(tok, text)
    assert ids.dtype == torch.long and ids.dim() == 1
    vocab = tok.get_vocab()
    assert ids.tolist() == [vocab[c] for c in text]
    bos = tiny_tokenizer(add_bos=True)
    assert tokenize_text(bos, "ab").tolist() == [1, vocab["a"], vocab["b"]]


def test_result_type():
    r = perplexity(ConstantLogits(torch.zeros(4, 4)), torch.arange(8) % 4, seqlen=4)
    assert isinstance(r, PplResult)


@pytest.mark.slow
def test_smollm2_bundled_perplexity():
    from qtool.assets import qtool_home

    if not (qtool_home() / "models" / "smollm2-135m" / "model.safetensors").is_file():
        pytest.skip("SmolLM2 not fetched (run `qtool assets fetch`)")
    from qtool.calib.data import load_text
    from qtool.io.hf import load_model

    model, tok = load_model("smollm2-135m")
    name, text = load_text("bundled")
    assert name == "britannica"
    ids = tokenize_text(tok, text)
    assert 80_000 < ids.numel() < 100_000
    r = perplexity(model, ids, seqlen=2048, max_windows=2)
    assert r.n_windows == 2 and r.n_tokens == 4096
    # environment.md: ~21 over 8 windows of the same text
    assert 8 < r.ppl < 40, r.ppl
