"""get_tokenizer: the packaged GPT-2 BPE, other tiktoken names from TOKENIZER_DIR, .tiktoken files, `bytes`,
clear errors."""

import base64
import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tiktoken.load
from conftest import require_extra

import data.tokenizer
from data.errors import DataError
from data.tokenizer import PACKAGED_DIR, get_tokenizer, tokenizer_record

REPO = Path(__file__).resolve().parents[1]
GPT2_FILE = PACKAGED_DIR / "gpt2.tiktoken"
R50K_BASE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # tiktoken_ext/openai_public.py
TEXT = "Tokenizers don't lose text: naïve café, 東京, 🙂\n\ttabs"


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No network for tiktoken (local files still read) and an empty tiktoken cache."""
    read_file = tiktoken.load.read_file

    def local_only(blobpath):
        if "://" in blobpath:
            raise ConnectionError(f"network disabled by the test: {blobpath}")
        return read_file(blobpath)

    monkeypatch.setattr(tiktoken.load, "read_file", local_only)  # tiktoken's only network call
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))


def write_tiktoken(path, ranks):
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)))


def test_gpt2_known_answer():
    enc = get_tokenizer("gpt2")
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert (enc.n_vocab, enc.eot_token) == (50257, 50256)
    assert enc.decode(enc.encode_ordinary(TEXT)) == TEXT
    assert get_tokenizer("gpt2") is enc  # built once per process: the same file gives the same Encoding


@pytest.mark.parametrize("tokenizer_dir", ["unset", "unrelated", "holding a wrong gpt2.tiktoken"])
def test_gpt2_works_with_no_network_and_no_tokenizer_dir(tokenizer_dir, offline, tmp_path, monkeypatch):
    """The packaged file is all `gpt2` needs, and it comes first: TOKENIZER_DIR can neither help nor hurt."""
    if tokenizer_dir == "unset":
        monkeypatch.delenv("TOKENIZER_DIR", raising=False)
    else:
        folder = tmp_path / "tokenizers"
        folder.mkdir()
        if tokenizer_dir != "unrelated":
            (folder / "gpt2.tiktoken").write_text("this is not the GPT-2 BPE\n")
        monkeypatch.setenv("TOKENIZER_DIR", str(folder))
    enc = get_tokenizer("gpt2")
    assert enc.encode_ordinary(" the") == [262]
    assert enc.decode(enc.encode_ordinary(TEXT)) == TEXT
    assert tokenizer_record("gpt2") == ("gpt2", None)


def test_gpt2_loads_when_the_tiktoken_cache_cannot_be_written(tmp_path, monkeypatch):
    """A read-only shared TIKTOKEN_CACHE_DIR is common on clusters; local files must not go through it."""
    (tmp_path / "a-file").write_text("")
    # A folder under a regular file can never be created, even by root (who ignores permission bits).
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    assert get_tokenizer("gpt2").encode_ordinary(" the") == [262]


def test_damaged_packaged_file_is_refused(tmp_path, monkeypatch):
    (tmp_path / "gpt2.tiktoken").write_bytes(GPT2_FILE.read_bytes()[:-20] + b"\n")
    monkeypatch.setattr(data.tokenizer, "PACKAGED_DIR", tmp_path)
    with pytest.raises(DataError, match="not tiktoken's gpt2 file.*reinstall the package"):
        get_tokenizer("gpt2")


def test_missing_packaged_file_is_a_broken_install_not_a_fallback(tmp_path, monkeypatch):
    monkeypatch.setattr(data.tokenizer, "PACKAGED_DIR", tmp_path / "empty")
    monkeypatch.setenv("TOKENIZER_DIR", str(GPT2_FILE.parent))  # would work, but must not be used
    with pytest.raises(DataError, match="gpt2.tiktoken is missing.*reinstall"):
        get_tokenizer("gpt2")


def test_other_tiktoken_name_from_tokenizer_dir_offline(offline, tmp_path, monkeypatch):
    # r50k_base is published as exactly the packaged file, so it stands in for any encoding a user adds.
    shutil.copy(GPT2_FILE, tmp_path / "r50k_base.tiktoken")
    monkeypatch.setenv("TOKENIZER_DIR", str(tmp_path))
    enc = get_tokenizer("r50k_base")
    assert enc.name == "r50k_base"
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert (enc.n_vocab, enc.eot_token) == (50257, 50256)


def test_wrong_file_under_a_tiktoken_name_is_refused(tmp_path, monkeypatch):
    (tmp_path / "r50k_base.tiktoken").write_bytes(GPT2_FILE.read_bytes()[:-20] + b"\n")
    monkeypatch.setenv("TOKENIZER_DIR", str(tmp_path))
    with pytest.raises(DataError, match="not tiktoken's r50k_base file.*replace it with the published file"):
        get_tokenizer("r50k_base")


def test_path_spec_matches_name_and_is_recorded_by_file_name(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    copy = shutil.copy(GPT2_FILE, elsewhere / "gpt2.tiktoken")
    by_path = get_tokenizer(str(copy))
    assert by_path.encode_ordinary("Hello world") == [15496, 995]
    assert by_path.eot_token == 50256
    name, sha = tokenizer_record(str(copy))
    assert name == "gpt2.tiktoken" and len(sha) == 64
    # The recorded spec (a bare file name) resolves on a machine without that folder or TOKENIZER_DIR,
    # since the same file ships with the package...
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TOKENIZER_DIR", raising=False)
    assert get_tokenizer(name, sha256=sha).encode_ordinary("Hello world") == [15496, 995]
    # ...and a different file under that name is refused.
    with pytest.raises(DataError, match="sha256"):
        get_tokenizer(name, sha256="0" * 64)


def test_bare_custom_file_name_resolves_through_tokenizer_dir(tmp_path, monkeypatch):
    write_tiktoken(tmp_path / "tiny.tiktoken", [bytes([i]) for i in range(256)] + [b"ab"])
    name, sha = tokenizer_record(str(tmp_path / "tiny.tiktoken"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.delenv("TOKENIZER_DIR", raising=False)
    with pytest.raises(DataError, match="no file 'tiny.tiktoken' here or in TOKENIZER_DIR"):
        get_tokenizer(name, sha256=sha)
    monkeypatch.setenv("TOKENIZER_DIR", str(tmp_path))
    assert get_tokenizer(name, sha256=sha).encode_ordinary("ab") == [256]


def test_bytes_tokenizer_needs_nothing(monkeypatch):
    monkeypatch.delenv("TOKENIZER_DIR", raising=False)
    enc = get_tokenizer("bytes")
    assert (enc.n_vocab, enc.eot_token) == (257, 256)
    text = "héllo 🙂 <|endoftext|>"
    assert enc.encode_ordinary(text) == list(text.encode("utf-8"))
    assert enc.decode(enc.encode_ordinary(text) + [256]) == text + "<|endoftext|>"
    assert tokenizer_record("bytes") == ("bytes", None)


def test_custom_tiktoken_file(tmp_path):
    path = tmp_path / "tiny.tiktoken"
    write_tiktoken(path, [bytes([i]) for i in range(256)] + [b"ab", b"abc"])
    enc = get_tokenizer(str(path))
    assert enc.encode_ordinary("abc ab") == [257, 32, 256]
    assert (enc.n_vocab, enc.eot_token, enc.name) == (259, 258, "tiny")


def test_a_rewritten_file_is_read_again(tmp_path):
    """tiktoken caches local files by path; a file changed in place must not come back stale."""
    path = tmp_path / "tiny.tiktoken"
    write_tiktoken(path, [bytes([i]) for i in range(256)] + [b"ab"])
    assert get_tokenizer(str(path)).encode_ordinary("ab xy") == [256, 32, 120, 121]
    write_tiktoken(path, [bytes([i]) for i in range(256)] + [b"xy"])
    assert get_tokenizer(str(path)).encode_ordinary("ab xy") == [97, 98, 32, 256]


def test_not_a_tiktoken_file(tmp_path):
    path = tmp_path / "junk.tiktoken"
    path.write_text("this is not base64 at all\n")
    with pytest.raises(DataError, match="not a .tiktoken file"):
        get_tokenizer(str(path))


def test_unknown_spec_says_what_is_accepted():
    with pytest.raises(DataError, match="use `bytes`, a tiktoken name"):
        get_tokenizer("no-such-tokenizer")


def test_offline_without_file_says_how_to_provide_it(offline, tmp_path, monkeypatch):
    """No file in TOKENIZER_DIR and no network: one error naming TOKENIZER_DIR and `bytes`."""
    monkeypatch.setenv("TOKENIZER_DIR", str(tmp_path))
    shutil.copy(GPT2_FILE, tmp_path / "gpt2.tiktoken")  # another name's file does not help
    with pytest.raises(DataError, match="p50k_base.tiktoken.*TOKENIZER_DIR.*bytes"):
        get_tokenizer("p50k_base")


@pytest.mark.slow
def test_the_wheel_ships_the_gpt2_file(tmp_path):
    """A non-editable install gets the tokenizer (and every subpackage) only if the wheel has them."""
    require_extra("setuptools", "dev", minversion="77")
    src = tmp_path / "src"  # a copy, so that the build's egg-info and build/ stay out of the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for package in ("model", "data", "train", "eval"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    proc = subprocess.run([*cmd, "-w", str(tmp_path / "wheels"), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "wheels").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert hashlib.sha256(z.read("data/tokenizers/gpt2.tiktoken")).hexdigest() == R50K_BASE_SHA256
    assert {"data/tokenizers/LICENSE-gpt2", "train/strategies/__init__.py"} <= names
