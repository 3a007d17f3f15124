import json
import os

import pytest
import torch

from qtool.errors import CheckpointError
from qtool.io.checkpoint import open_checkpoint, write_checkpoint


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.codes": torch.randint(0, 16, (64, 32), generator=g, dtype=torch.uint8),
        "a.scales": torch.rand(64, 2, generator=g),
        "b.weight": torch.randn(10, 7, generator=g).half(),
        "c.int8": torch.randint(-127, 128, (33,), generator=g, dtype=torch.int8),
    }


def _write(path, **kw):
    return write_checkpoint(path, _tensors(), {"model_type": "llama"}, layout="unpacked@1", **kw)


def test_round_trip_sharded(tmp_path):
    out = tmp_path / "ckpt"
    res = _write(out, shard_size=2000)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 2
    ck = open_checkpoint(out)
    got = ck.load_tensors()
    for k, v in _tensors().items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(_tensors()) and index["metadata"]["total_size"] > 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["format"] == "qtool-checkpoint@1" and man["layout"] == "unpacked@1"
    assert set(man["files"]) == {p.name for p in out.iterdir() if p.name != "manifest.json"}
    assert res.path == out


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "ckpt"
    _write(out)
    with pytest.raises(CheckpointError, match="--overwrite") as e:
        _write(out)
    assert e.value.exit_code == 6
    (out / "marker").write_text("old")
    _write(out, overwrite=True)
    assert not (out / "marker").exists()
    open_checkpoint(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    calls = {"n": 0}

    def boom(name):
        calls["n"] += 1
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _write(out, on_file=boom)
    assert calls["n"] == 1
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # staging dir removed too


def test_interrupted_overwrite_keeps_old_checkpoint(tmp_path):
    out = tmp_path / "ckpt"
    _write(out)
    before = (out / "manifest.json").read_text()

    def boom(name):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        _write(out, overwrite=True, on_file=boom)
    assert (out / "manifest.json").read_text() == before
    open_checkpoint(out)


def test_tampered_shard_detected(tmp_path):
    out = tmp_path / "ckpt"
    _write(out)
    shard = out / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, one flipped bit in tensor data
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 of model.safetensors"):
        open_checkpoint(out)
    open_checkpoint(out, verify=False)  # sizes still match: only hashing catches it


def test_truncated_and_missing_files_detected(tmp_path):
    out = tmp_path / "ckpt"
    _write(out)
    with open(out / "model.safetensors", "ab") as f:
        f.write(b"x")
    with pytest.raises(CheckpointError, match="bytes"):
        open_checkpoint(out, verify=False)
    os.remove(out / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing"):
        open_checkpoint(out)


def test_half_written_dir_without_manifest_refused(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no manifest.json"):
        open_checkpoint(out)


@pytest.mark.parametrize("field, value, fragment", [
    ("format", "qtool-checkpoint@99", "upgrade qtool"),
    ("format", "something-else@1", "unknown checkpoint format"),
    ("layout", "unpacked@42", "newer than this qtool"),
    ("layout", "mystery@1", "unknown layout"),
])
def test_unknown_versions_refused(tmp_path, field, value, fragment):
    out = tmp_path / "ckpt"
    _write(out)
    m = json.loads((out / "manifest.json").read_text())
    m[field] = value
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=fragment):
        open_checkpoint(out)
