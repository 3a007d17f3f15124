import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _fresh_backend_cache():
    """Backend choice is cached per process; tests that pick backends start clean."""
    from qtool import kernels

    kernels._selected.clear()
    yield


@pytest.fixture
def tiny_dir(tmp_path):
    """A saved tiny GQA Llama with its tokenizer and a small calibration/eval text."""
    from helpers import SAMPLE_TEXT, save_tiny, tiny_llama

    d = save_tiny(tiny_llama(), tmp_path / "tiny")
    (tmp_path / "text.txt").write_text(SAMPLE_TEXT * 40)
    return d
