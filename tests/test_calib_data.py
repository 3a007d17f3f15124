"""Calibration blocks and evaluation texts: protocol, determinism, sources, errors."""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest
import torch

from helpers import tiny_tokenizer, tiny_vocab
from qtool.calib.data import CalibData, calibration_blocks, ids_sha256, load_text, split_paragraphs
from qtool.errors import AssetError, CalibrationError, ConfigError
from qtool.recipe import CalibCfg

PARAS = [
    "First paragraph, line one.\nLine two of it.",
    "Second: short.",
    "Third paragraph has\nthree\nlines!",
    "Fourth and last.",
]


def _char_ids(text: str) -> list[int]:
    v = tiny_vocab()
    return [v[c] for c in text]


def _expected(stream: list[int], n: int, L: int, seed: int) -> torch.Tensor:
    """Reference: consecutive blocks of the stream, n picked with random.Random(seed).sample."""
    blocks = [stream[i * L:(i + 1) * L] for i in range(len(stream) // L)]
    picks = random.Random(seed).sample(range(len(blocks)), n)
    return torch.tensor([blocks[i] for i in picks], dtype=torch.long)


def test_split_paragraphs():
    text = "a\nb\n\n\n  \nc\r\n\r\nd  \n"
    assert split_paragraphs(text) == ["a\nb", "c", "d  "]
    assert split_paragraphs("\n\n") == []


def test_txt_protocol_matches_reference(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("\n\n\n".join(PARAS) * 1 + "\n")
    cfg = CalibCfg(data=str(f), n_samples=5, seqlen=16, seed=7)
    out = calibration_blocks(tiny_tokenizer(), cfg)
    assert isinstance(out, CalibData)
    stream = _char_ids("".join(p + "\n\n" for p in PARAS))
    assert out.total_tokens == len(stream)
    exp = _expected(stream, 5, 16, 7)
    assert out.ids.dtype == torch.long and out.ids.shape == (5, 16)
    assert torch.equal(out.ids, exp)
    assert out.sha256 == hashlib.sha256(exp.numpy().astype("<i8").tobytes()).hexdigest()
    assert out.source == str(f.resolve())
    # deterministic for the seed; another seed draws other blocks
    again = calibration_blocks(tiny_tokenizer(), cfg)
    assert torch.equal(again.ids, out.ids) and again.sha256 == out.sha256
    other = calibration_blocks(tiny_tokenizer(), CalibCfg(data=str(f), n_samples=5, seqlen=16, seed=8))
    assert other.sha256 != out.sha256
    # blocks never overlap: every picked row is a distinct block of the stream
    assert len({tuple(r) for r in out.ids.tolist()}) == 5


def test_bos_is_added_per_document(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("\n\n".join(PARAS))
    tok = tiny_tokenizer(add_bos=True)
    n_tokens = sum(1 + len(p) + 2 for p in PARAS)
    L = 8
    out = calibration_blocks(tok, CalibCfg(data=str(f), n_samples=n_tokens // L, seqlen=L, seed=0))
    stream = []
    for p in PARAS:
        stream += [1] + _char_ids(p + "\n\n")
    assert torch.equal(out.ids, _expected(stream, n_tokens // L, L, 0))


def test_jsonl_parquet_and_directory(tmp_path):
    docs = ["alpha beta gamma " * 3, "delta epsilon " * 4, "zeta eta theta " * 3]
    jl = tmp_path / "d" / "a.jsonl"
    jl.parent.mkdir()
    jl.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)) + "\n\n")
    cfg = CalibCfg(data=str(jl), text_key="body", n_samples=4, seqlen=20, seed=1)
    out = calibration_blocks(tiny_tokenizer(), cfg)
    stream = _char_ids("".join(docs))  # jsonl documents are concatenated without separators
    assert torch.equal(out.ids, _expected(stream, 4, 20, 1))

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": docs[::-1]}), tmp_path / "d" / "b.parquet")
    pout = calibration_blocks(tiny_tokenizer(), CalibCfg(data=str(tmp_path / "d" / "b.parquet"), text_key="body",
                                                         n_samples=4, seqlen=20, seed=1))
    assert torch.equal(pout.ids, _expected(_char_ids("".join(docs[::-1])), 4, 20, 1))

    # a directory: files in sorted path order (a.jsonl, then b.parquet)
    dout = calibration_blocks(tiny_tokenizer(), CalibCfg(data=str(tmp_path / "d"), text_key="body",
                                                         n_samples=6, seqlen=20, seed=2))
    assert torch.equal(dout.ids, _expected(_char_ids("".join(docs) + "".join(docs[::-1])), 6, 20, 2))

    with pytest.raises(CalibrationError, match="no field 'text'"):
        calibration_blocks(tiny_tokenizer(), CalibCfg(data=str(jl), n_samples=1, seqlen=4))


def test_not_enough_tokens(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("short text")  # 10 chars + "\n\n" = 12 tokens
    with pytest.raises(CalibrationError) as e:
        calibration_blocks(tiny_tokenizer(), CalibCfg(data=str(f), n_samples=4, seqlen=4))
    msg = str(e.value)
    assert "16 tokens needed" in msg and "12 available" in msg


def test_missing_data_and_bad_specs(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        calibration_blocks(tiny_tokenizer(), CalibCfg(data=str(tmp_path / "nope.txt")))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match="unsupported"):
        calibration_blocks(tiny_tokenizer(), CalibCfg(data=str(tmp_path / "x.csv")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError):
        calibration_blocks(tiny_tokenizer(), CalibCfg(data=str(tmp_path / "empty")))


def test_bundled_uses_fetched_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("QTOOL_HOME", str(tmp_path / "home"))
    with pytest.raises(AssetError, match="qtool assets fetch"):
        calibration_blocks(tiny_tokenizer(), CalibCfg(data="bundled", n_samples=1, seqlen=4))
    corpus = tmp_path / "home" / "corpus"
    corpus.mkdir(parents=True)
    (corpus / "calib.txt").write_text("\n\n".join(PARAS))
    out = calibration_blocks(tiny_tokenizer(), CalibCfg(data="bundled", n_samples=3, seqlen=10, seed=5))
    assert out.source == str(corpus / "calib.txt")
    assert torch.equal(out.ids, _expected(_char_ids("".join(p + "\n\n" for p in PARAS)), 3, 10, 5))


def test_hub_dataset_offline_and_faked(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(CalibrationError, match="cannot load hub dataset 'org/data'") as e:
        calibration_blocks(tiny_tokenizer(), CalibCfg(data="hf:org/data", n_samples=1, seqlen=4))
    assert "network" in str(e.value)

    rows = [f"document number {i} " * 3 for i in range(40)]
    seen = {}

    def fake(name, config=None, split=None):
        seen.update(name=name, config=config, split=split)
        return datasets.Dataset.from_dict({"content": rows})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    cfg = CalibCfg(data="hf:org/data:sub", split="validation", text_key="content", n_samples=3, seqlen=16, seed=4)
    out = calibration_blocks(tiny_tokenizer(), cfg)
    assert seen == {"name": "org/data", "config": "sub", "split": "validation"}
    shuffled = datasets.Dataset.from_dict({"content": rows}).shuffle(seed=4)["content"]
    stream = _char_ids("".join(shuffled))
    # all 40 documents fit in one tokenizer chunk, so the whole shuffled set forms the stream
    assert torch.equal(out.ids, _expected(stream, 3, 16, 4))
    assert out.source == "hf:org/data:sub"


def test_ids_sha256_is_int64_le():
    t = torch.tensor([[1, 2], [3, 258]], dtype=torch.int32)
    assert ids_sha256(t) == hashlib.sha256(np.array([1, 2, 3, 258], dtype="<i8").tobytes()).hexdigest()


def test_load_text(tmp_path, monkeypatch):
    monkeypatch.setenv("QTOOL_HOME", str(tmp_path / "home"))
    with pytest.raises(AssetError):
        load_text("bundled")
    corpus = tmp_path / "home" / "corpus"
    corpus.mkdir(parents=True)
    (corpus / "britannica.txt").write_text("encyclopaedia")
    (corpus / "hamlet.txt").write_text("to be")
    assert load_text("bundled") == ("britannica", "encyclopaedia")
    assert load_text("britannica") == ("britannica", "encyclopaedia")
    assert load_text("hamlet") == ("hamlet", "to be")
    f = tmp_path / "my_text.txt"
    f.write_text("local")
    assert load_text(str(f)) == ("my_text", "local")
    with pytest.raises(ConfigError, match="unknown evaluation text"):
        load_text("c4")

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: {"text": ["a", "", "b"]})
    assert load_text("wikitext2") == ("wikitext2", "a\n\n\n\nb")

    def offline(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConfigError, match="wikitext-2-raw-v1"):
        load_text("wikitext2")
