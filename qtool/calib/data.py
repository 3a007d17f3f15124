"""Calibration text → token blocks, and named evaluation texts.

Protocol of `calibration_blocks` (deterministic for a given seed, tokenizer and data):
  1. Read the source as a list of documents: a `.txt` file is split into paragraphs on blank
     lines; a `.jsonl` file gives one document per line (`text_key` field); a `.parquet` file one
     per row (`text_key` column); a directory contributes every such file below it in sorted path
     order; `hf:NAME[:CONFIG]` reads split `split` of a hub dataset, shuffled with the seed.
     Empty documents are dropped.
  2. Tokenize each document on its own (the tokenizer's default special tokens, e.g. a BOS, are
     kept per document, as in AWQ's calibration loader). A `.txt` paragraph is tokenized with the
     blank line that separated it ("\n\n" appended), so the stream reads like the original text.
  3. Concatenate all documents into one token stream and cut it into `T // seqlen` consecutive,
     non-overlapping blocks (tail dropped).
  4. Pick `n_samples` of these blocks without replacement with `random.Random(seed).sample`, in the
     order drawn. Blocks therefore come from the whole corpus, never overlap, and never repeat.
     Fewer than `n_samples` blocks → CalibrationError naming the tokens needed and available.
The sha256 of the result is taken over the int64 little-endian bytes of the `[n_samples, seqlen]`
id matrix (row-major).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from qtool.assets import CORPUS_FILES, corpus_path
from qtool.errors import CalibrationError, ConfigError

if TYPE_CHECKING:
    import torch

    from qtool.recipe import CalibCfg

log = logging.getLogger("qtool.calib.data")

_FILE_KINDS = (".txt", ".jsonl", ".parquet")
_TOKENIZE_CHUNK = 512  # documents per tokenizer call
_HUB_STOP_FACTOR = 2  # hub datasets: stop tokenizing once 2x the needed tokens are in the stream


@dataclass
class CalibData:
    ids: "torch.Tensor"  # LongTensor [n_samples, seqlen]
    sha256: str  # over the int64 little-endian bytes of `ids`
    source: str  # what was read (resolved path or hub spec)
    total_tokens: int = 0  # tokens in the stream the blocks were drawn from


def ids_sha256(ids: "torch.Tensor") -> str:
    """sha256 of a token-id tensor as contiguous int64 little-endian bytes."""
    import numpy as np
    import torch

    arr = ids.detach().to("cpu", torch.int64).contiguous().numpy().astype("<i8", copy=False)
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


# --- documents ------------------------------------------------------------------------------
def split_paragraphs(text: str) -> list[str]:
    """Paragraphs of a text: split on blank lines (lines holding only whitespace count as blank)."""
    paras: list[str] = []
    cur: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if line.strip():
            cur.append(line)
        elif cur:
            paras.append("\n".join(cur))
            cur = []
    if cur:
        paras.append("\n".join(cur))
    return paras


def _txt_docs(path: Path) -> list[str]:
    return [p + "\n\n" for p in split_paragraphs(path.read_text(encoding="utf-8", errors="replace"))]


def _jsonl_docs(path: Path, key: str) -> list[str]:
    docs: list[str] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise CalibrationError(f"{path}:{n}: invalid JSON: {e.msg}") from e
            if not isinstance(rec, dict) or key not in rec:
                keys = ", ".join(rec) if isinstance(rec, dict) else type(rec).__name__
                raise CalibrationError(f"{path}:{n}: no field {key!r} (found: {keys})", "set calib.text_key")
            if isinstance(rec[key], str) and rec[key].strip():
                docs.append(rec[key])
    return docs


def _parquet_docs(path: Path, key: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise CalibrationError(f"reading {path} needs pyarrow", "pip install pyarrow (or qtool[data])") from e
    table = pq.read_table(path)
    if key not in table.column_names:
        raise CalibrationError(f"{path}: no column {key!r} (found: {', '.join(table.column_names)})", "set calib.text_key")
    return [t for t in table.column(key).to_pylist() if isinstance(t, str) and t.strip()]


def _file_docs(path: Path, key: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _txt_docs(path)
    if suffix == ".jsonl":
        return _jsonl_docs(path, key)
    if suffix == ".parquet":
        return _parquet_docs(path, key)
    raise ConfigError(f"calibration file {path} has an unsupported type", "use .txt, .jsonl or .parquet")


def _local_docs(path: Path, key: str) -> list[str]:
    if path.is_file():
        return _file_docs(path, key)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _FILE_KINDS)
    if not files:
        raise CalibrationError(f"calibration directory {path} holds no .txt, .jsonl or .parquet file")
    docs: list[str] = []
    for f in files:
        docs.extend(_file_docs(f, key))
    return docs


def _hub_docs(spec: str, split: str, key: str, seed: int) -> Iterator[str]:
    rest = spec[len("hf:"):]
    name, _, config = rest.partition(":")
    if not name:
        raise ConfigError(f"calib.data={spec!r}: expected hf:NAME or hf:NAME:CONFIG")
    try:
        import datasets
    except ImportError as e:
        raise ConfigError(f"calib.data={spec!r} needs the `datasets` package", "pip install 'qtool[data]'") from e
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
        raise CalibrationError(
            f"cannot load hub dataset {rest!r} (split {split!r}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            "hub datasets need network access; offline, use calib.data=bundled or a local .txt/.jsonl/.parquet file",
        ) from e
    if key not in ds.column_names:
        raise CalibrationError(f"hub dataset {rest!r} has no column {key!r} (found: {', '.join(ds.column_names)})",
                               "set calib.text_key")
    for rec in ds.shuffle(seed=seed):
        t = rec[key]
        if isinstance(t, str) and t.strip():
            yield t


def _documents(cfg: "CalibCfg") -> tuple[Iterable[str], str, bool]:
    """(documents, source description, is_streamed_from_hub)."""
    data = cfg.data
    if data == "bundled":
        p = corpus_path("bundled-calib")
        return _txt_docs(p), str(p), False
    if data.startswith("hf:"):
        return _hub_docs(data, cfg.split, cfg.text_key, cfg.seed), data, True
    p = Path(data).expanduser()
    if not p.exists():
        raise ConfigError(f"calibration data not found: {data}",
                          "calib.data is bundled, a .txt/.jsonl/.parquet file or directory, or hf:NAME[:CONFIG]")
    return _local_docs(p, cfg.text_key), str(p.resolve()), False


# --- tokens ---------------------------------------------------------------------------------
def _chunks(it: Iterable[str], n: int) -> Iterator[list[str]]:
    buf: list[str] = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def calibration_blocks(tokenizer: Any, cfg: "CalibCfg") -> CalibData:
    """Calibration token blocks `[cfg.n_samples, cfg.seqlen]` per the module's protocol."""
    import torch

    if cfg.n_samples < 1 or cfg.seqlen < 1:
        raise ConfigError(f"calib.n_samples={cfg.n_samples} and calib.seqlen={cfg.seqlen} must be positive")
    needed = cfg.n_samples * cfg.seqlen
    docs, source, streamed = _documents(cfg)
    stream: list[int] = []
    for batch in _chunks(docs, _TOKENIZE_CHUNK):
        for ids in tokenizer(batch, verbose=False)["input_ids"]:
            stream.extend(ids)
        if streamed and len(stream) >= _HUB_STOP_FACTOR * needed:
            break
    total = len(stream)
    n_blocks = total // cfg.seqlen
    if n_blocks < cfg.n_samples:
        raise CalibrationError(
            f"not enough calibration tokens in {source}: {cfg.n_samples} x {cfg.seqlen} = {needed} tokens needed, "
            f"{total} available ({n_blocks} blocks of {cfg.seqlen})",
            "lower calib.n_samples or calib.seqlen, or give more text",
        )
    picks = random.Random(cfg.seed).sample(range(n_blocks), cfg.n_samples)
    full = torch.tensor(stream[: n_blocks * cfg.seqlen], dtype=torch.long).view(n_blocks, cfg.seqlen)
    ids = full[torch.tensor(picks, dtype=torch.long)].contiguous()
    sha = ids_sha256(ids)
    log.info("calibration: %d x %d tokens from %s (%d tokens available), sha256 %s",
             cfg.n_samples, cfg.seqlen, source, total, sha[:16])
    return CalibData(ids=ids, sha256=sha, source=source, total_tokens=total)


# --- named texts (shared with perplexity evaluation) ----------------------------------------
def load_text(spec: str) -> tuple[str, str]:
    """(name, text) of an evaluation text.

    `bundled` (= britannica), `britannica`, `hamlet`, `bundled-calib`: the fetched corpora;
    a local `.txt` file (name = file stem); `wikitext2`: WikiText-2 raw test split via `datasets`
    ("\\n\\n".join of the rows; needs network). The name is the text's real identity, used to label
    results (`bundled` → "britannica").
    """
    if spec in CORPUS_FILES:
        name = {"bundled": "britannica"}.get(spec, spec)
        return name, corpus_path(spec).read_text(encoding="utf-8")
    if spec == "wikitext2":
        try:
            import datasets
        except ImportError as e:
            raise ConfigError("wikitext2 needs the `datasets` package", "pip install 'qtool[data]'") from e
        try:
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
        except Exception as e:
            raise ConfigError(
                f"cannot load wikitext-2-raw-v1: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                "WikiText-2 needs network access; offline, use bundled, hamlet or a local .txt file",
            ) from e
        return "wikitext2", "\n\n".join(ds["text"])
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix.lower() == ".txt":
        return p.stem, p.read_text(encoding="utf-8")
    raise ConfigError(
        f"unknown evaluation text {spec!r}",
        f"use one of {', '.join(CORPUS_FILES)}, wikitext2, or the path of a .txt file",
    )
