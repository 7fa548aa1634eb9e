"""Test environment: offline, CPU, small.

Every test runs without the network: Hugging Face is forced offline, and the
GPT-2 BPE ships inside the package (data/tokenizers), so nothing beside the
checkout is needed.
"""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path_factory, monkeypatch):
    """Keep any Hugging Face cache inside the test's tmp dir."""
    cache = tmp_path_factory.getbasetemp() / "hf_cache"
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache / "datasets"))


def in_ci() -> bool:
    """CI sets CI=true (.ci/run exports it, as GitHub Actions and GitLab do)."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_extra(module: str, extra: str, minversion: str | None = None):
    """Import an optional extra's module; skip without it, except in CI, where every extra is installed.

    pytest.importorskip alone would turn a broken install (DeepSpeed failing to import, say) into a
    quiet skip of every test that needs it; CI installs every extra, so there a failed import fails.
    """
    try:
        return pytest.importorskip(
            module, minversion=minversion, reason=f"the {extra} extra ({module}) is not installed"
        )
    except pytest.skip.Exception as e:
        if in_ci():
            pytest.fail(f"CI installs every extra, but {module} did not import: {e}", pytrace=False)
        raise
