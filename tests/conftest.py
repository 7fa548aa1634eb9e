"""Test environment: offline, CPU, small.

Every test runs without the network: Hugging Face is forced offline and the
GPT-2 BPE is read from TOKENIZER_DIR (../shared/tokenizers beside the checkout,
unless the caller set it).
"""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
_shared_tok = REPO.parent / "shared" / "tokenizers"
if "TOKENIZER_DIR" not in os.environ and _shared_tok.is_dir():
    os.environ["TOKENIZER_DIR"] = str(_shared_tok)


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path_factory, monkeypatch):
    """Keep any Hugging Face cache inside the test's tmp dir."""
    cache = tmp_path_factory.getbasetemp() / "hf_cache"
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache / "datasets"))
