"""get_tokenizer: tiktoken names read offline from TOKENIZER_DIR, .tiktoken files, `bytes`, clear errors."""

import base64
import os
import shutil
from pathlib import Path

import pytest
import tiktoken.load

from data.errors import DataError
from data.tokenizer import get_tokenizer, tokenizer_record

GPT2_FILE = Path(os.environ.get("TOKENIZER_DIR", "")) / "gpt2.tiktoken"
needs_gpt2 = pytest.mark.skipif(not GPT2_FILE.is_file(), reason="TOKENIZER_DIR/gpt2.tiktoken is absent")


@needs_gpt2
def test_gpt2_known_answer():
    enc = get_tokenizer("gpt2")
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert (enc.n_vocab, enc.eot_token) == (50257, 50256)
    text = "Tokenizers don't lose text: naïve café, 東京, 🙂\n\ttabs"
    assert enc.decode(enc.encode_ordinary(text)) == text


@needs_gpt2
def test_path_spec_matches_name_and_is_recorded_by_file_name(tmp_path, monkeypatch):
    by_path = get_tokenizer(str(GPT2_FILE))
    assert by_path.encode_ordinary("Hello world") == [15496, 995]
    assert by_path.eot_token == 50256
    name, sha = tokenizer_record(str(GPT2_FILE))
    assert name == "gpt2.tiktoken" and len(sha) == 64
    # The recorded spec (a bare file name) resolves through TOKENIZER_DIR on another machine...
    monkeypatch.chdir(tmp_path)
    assert get_tokenizer(name, sha256=sha).encode_ordinary("Hello world") == [15496, 995]
    # ...and a different file under that name is refused.
    with pytest.raises(DataError, match="sha256"):
        get_tokenizer(name, sha256="0" * 64)


@needs_gpt2
def test_wrong_file_under_a_tiktoken_name_is_refused(tmp_path, monkeypatch):
    (tmp_path / "gpt2.tiktoken").write_bytes(GPT2_FILE.read_bytes()[:-20] + b"\n")
    monkeypatch.setenv("TOKENIZER_DIR", str(tmp_path))
    with pytest.raises(DataError, match="not tiktoken's gpt2 file"):
        get_tokenizer("gpt2")


def test_bytes_tokenizer_needs_nothing(monkeypatch):
    monkeypatch.delenv("TOKENIZER_DIR", raising=False)
    enc = get_tokenizer("bytes")
    assert (enc.n_vocab, enc.eot_token) == (257, 256)
    text = "héllo 🙂 <|endoftext|>"
    assert enc.encode_ordinary(text) == list(text.encode("utf-8"))
    assert enc.decode(enc.encode_ordinary(text) + [256]) == text + "<|endoftext|>"
    assert tokenizer_record("bytes") == ("bytes", None)


def test_custom_tiktoken_file(tmp_path):
    ranks = [bytes([i]) for i in range(256)] + [b"ab", b"abc"]
    path = tmp_path / "tiny.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)))
    enc = get_tokenizer(str(path))
    assert enc.encode_ordinary("abc ab") == [257, 32, 256]
    assert (enc.n_vocab, enc.eot_token, enc.name) == (259, 258, "tiny")


def test_not_a_tiktoken_file(tmp_path):
    path = tmp_path / "junk.tiktoken"
    path.write_text("this is not base64 at all\n")
    with pytest.raises(DataError, match="not a .tiktoken file"):
        get_tokenizer(str(path))


def test_unknown_spec_says_what_is_accepted():
    with pytest.raises(DataError, match="use `bytes`, a tiktoken name"):
        get_tokenizer("no-such-tokenizer")


def test_offline_without_file_says_how_to_provide_it(tmp_path, monkeypatch):
    """No file in TOKENIZER_DIR and no network: one error naming TOKENIZER_DIR and `bytes`."""

    def offline(blobpath):
        raise ConnectionError(f"network disabled by the test: {blobpath}")

    monkeypatch.setattr(tiktoken.load, "read_file", offline)  # tiktoken's only network call
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("TOKENIZER_DIR", str(tmp_path))
    if GPT2_FILE.is_file():
        shutil.copy(GPT2_FILE, tmp_path / "gpt2.tiktoken")  # another name's file does not help
    with pytest.raises(DataError, match="p50k_base.tiktoken.*TOKENIZER_DIR.*bytes"):
        get_tokenizer("p50k_base")
