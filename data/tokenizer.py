"""The one tokenizer entry point: `get_tokenizer(spec) -> tiktoken.Encoding`.

`spec` is one of
- `bytes`: 256 byte tokens plus `<|endoftext|>` = 256 (n_vocab 257); needs no file and no network.
- `gpt2`: read from the file that ships inside this package (`data/tokenizers/gpt2.tiktoken`, tiktoken's
  r50k_base ranks), checked against tiktoken's published sha256; never TOKENIZER_DIR, never the network.
- another tiktoken name (`r50k_base`, `p50k_base`, `cl100k_base`, `o200k_base`, ...): read from
  `$TOKENIZER_DIR/<name>.tiktoken` when that file exists (offline use; checked against tiktoken's
  published sha256), otherwise from tiktoken, which downloads and caches it once.
- a path to a `.tiktoken` file (lines `base64(token) rank`). Datasets record it by file name and
  sha256 (see `tokenizer_record`), so a bare file name is also looked up in `$TOKENIZER_DIR`, then among
  the packaged files. A file named after a tiktoken encoding (`gpt2.tiktoken`) gets that encoding's
  split pattern and special tokens; any other file gets GPT-2's pattern and `<|endoftext|>` after its
  last rank.
"""

from __future__ import annotations

import base64
import functools
import os
import types
from pathlib import Path

import tiktoken
import tiktoken_ext.openai_public as openai_public

from data.errors import DataError
from model.files import sha256_file

ENDOFTEXT = "<|endoftext|>"
BYTES_SPEC = "bytes"

# gpt2 is built by tiktoken from GPT-2's original vocab.bpe/encoder.json, so it has no .tiktoken hash of
# its own; its ranks are exactly r50k_base's, whose published file is what `gpt2.tiktoken` must hold.
_SAME_RANKS_AS = {"gpt2": "r50k_base"}

# pip installs packages unpacked, so the package data is a plain file beside this module.
PACKAGED_DIR = Path(__file__).with_name("tokenizers")
# Encodings whose ranks ship with the package (name -> file in PACKAGED_DIR): `gpt2`, the one every
# config uses, so that it works on a machine with no network and no TOKENIZER_DIR.
_PACKAGED = {"gpt2": "gpt2.tiktoken"}

_HOW_TO_PROVIDE = (
    "To work offline, put the file `{name}.tiktoken` in a folder and set TOKENIZER_DIR to that folder "
    "(or pass the file's path as the tokenizer spec); run once online to let tiktoken download and cache "
    "it; or use the tokenizer `bytes`, which needs no file."
)


def get_tokenizer(spec: str, *, sha256: str | None = None) -> tiktoken.Encoding:
    """Return the tiktoken Encoding named by `spec` (see the module docstring).

    `sha256`, when given, must match the .tiktoken file the spec resolves to (meta.json records it for
    file specs, so a dataset is never decoded with a different file of the same name).
    """
    spec = str(spec)
    if spec == BYTES_SPEC:
        return _bytes_encoding()
    if spec in openai_public.ENCODING_CONSTRUCTORS or spec in tiktoken.list_encoding_names():
        return _named_encoding(spec)
    path = resolve_tokenizer_file(spec)
    if path is None:
        raise DataError(
            f"unknown tokenizer {spec!r}: use `bytes`, a tiktoken name "
            f"({', '.join(sorted(openai_public.ENCODING_CONSTRUCTORS))}) or the path of a .tiktoken file"
            + (f" (no file {spec!r} here or in TOKENIZER_DIR)" if spec.endswith(".tiktoken") else "")
        )
    return _file_encoding(path, sha256)


def tokenizer_record(spec: str) -> tuple[str, str | None]:
    """What meta.json stores for `spec`: (spec, sha256 of its file or None).

    A file spec is stored by file name, not absolute path, so that a dataset moved to another machine
    still names its tokenizer; the sha256 tells whether the file found there is the same one.
    """
    spec = str(spec)
    if spec == BYTES_SPEC or spec in openai_public.ENCODING_CONSTRUCTORS or spec in tiktoken.list_encoding_names():
        return spec, None
    path = resolve_tokenizer_file(spec)
    if path is None:
        get_tokenizer(spec)  # raises the clear error
        raise AssertionError("unreachable")
    return path.name, sha256_file(path)


def resolve_tokenizer_file(spec: str) -> Path | None:
    """The .tiktoken file a spec names: the path itself, else its file name inside $TOKENIZER_DIR, else
    among the packaged files (a dataset made from a copy of `gpt2.tiktoken` still finds it anywhere)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if not spec.endswith(".tiktoken"):
        return None
    tok_dir = os.environ.get("TOKENIZER_DIR")
    for folder in ([Path(tok_dir)] if tok_dir else []) + [PACKAGED_DIR]:
        if (folder / path.name).is_file():
            return folder / path.name
    return None


def _bytes_encoding() -> tiktoken.Encoding:
    # Each byte is its own rank and there are no merges, so the split pattern only decides how text is cut
    # into pieces before the (trivial) BPE; GPT-2's word-level pattern keeps those pieces short and fast.
    return tiktoken.Encoding(
        name=BYTES_SPEC,
        pat_str=openai_public.r50k_pat_str,
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={ENDOFTEXT: 256},
        explicit_n_vocab=257,
    )


def _named_encoding(name: str) -> tiktoken.Encoding:
    if name in _PACKAGED:
        # A missing packaged file is a broken install; falling back to TOKENIZER_DIR or the network would
        # hide that until the one machine without either.
        packaged = PACKAGED_DIR / _PACKAGED[name]
        if not packaged.is_file():
            raise DataError(
                f"{packaged} is missing; it ships with the package: reinstall the package, or in a clone "
                f"restore it with `git checkout -- data/tokenizers`."
            )
        return _published_encoding(name, packaged, fix="the installation is damaged: reinstall the package.")
    tok_dir = os.environ.get("TOKENIZER_DIR")
    local = Path(tok_dir) / f"{name}.tiktoken" if tok_dir else None
    if local is not None and local.is_file() and name in openai_public.ENCODING_CONSTRUCTORS:
        return _published_encoding(
            name,
            local,
            fix="replace it with the published file, or pass its path as the tokenizer to use it as a custom one.",
        )
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # network errors come in many types (requests, urllib3, OSError)
        where = f"no {local}" if local is not None else "TOKENIZER_DIR is not set"
        raise DataError(
            f"cannot load tokenizer {name!r}: {where}, and tiktoken could not download it "
            f"({type(e).__name__}: {str(e)[:200]}). " + _HOW_TO_PROVIDE.format(name=name)
        ) from None


def _published_encoding(name: str, path: Path, *, fix: str) -> tiktoken.Encoding:
    """Encoding `name` with its ranks read from `path`, which must be the file tiktoken publishes for it."""
    params = _constructor_params(name)
    expected = params.pop("expected_hash")
    actual = sha256_file(path)
    if expected is not None and actual != expected:
        raise DataError(
            f"{path} is not tiktoken's {name} file (sha256 {actual[:12]}..., expected {expected[:12]}...): {fix}"
        )
    return _encoding_from_file(path, actual, name)


def _file_encoding(path: Path, sha256: str | None) -> tiktoken.Encoding:
    actual = sha256_file(path)
    if sha256 is not None and actual != sha256:
        raise DataError(
            f"tokenizer file {path} has sha256 {actual[:12]}..., but the dataset was made with a file "
            f"of the same name and sha256 {sha256[:12]}...; find the original file (put it in TOKENIZER_DIR)."
        )
    return _encoding_from_file(path, actual, path.name.removesuffix(".tiktoken"))


@functools.lru_cache(maxsize=8)
def _encoding_from_file(path: Path, sha256: str, name: str) -> tiktoken.Encoding:
    """The Encoding of a .tiktoken file whose sha256 the caller has checked; a tiktoken name gets that
    encoding's pattern and special tokens, any other name GPT-2's pattern and `<|endoftext|>` last.

    Parsing the ranks and building the BPE is the slow part of loading a tokenizer, and a process asks for
    the same one several times; `sha256` in the key makes a file rewritten in place a new entry.
    """
    ranks = _load_ranks(path)
    if name in openai_public.ENCODING_CONSTRUCTORS:
        params = _constructor_params(name)
        params.pop("expected_hash")
        return tiktoken.Encoding(**params, mergeable_ranks=ranks)
    eot = max(ranks.values()) + 1
    return tiktoken.Encoding(
        name=name, pat_str=openai_public.r50k_pat_str, mergeable_ranks=ranks, special_tokens={ENDOFTEXT: eot}
    )


def _load_ranks(path: Path) -> dict[bytes, int]:
    """The ranks of a local .tiktoken file, parsed as tiktoken.load.load_tiktoken_bpe parses them.

    Not load_tiktoken_bpe itself: it copies every file it reads, local ones too, into tiktoken's cache
    under a key made from the path alone, so a file rewritten in place came back stale, and a
    TIKTOKEN_CACHE_DIR that cannot be written (a read-only shared cache) made even the packaged file
    unreadable.
    """
    try:
        lines = path.read_bytes().splitlines()
        ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}
    except ValueError as e:  # a line that is not `token rank`, bad base64 (binascii.Error), a non-integer rank
        raise DataError(
            f"{path} is not a .tiktoken file (lines of `base64(token) rank`): {type(e).__name__}: {e}"
        ) from None
    if not ranks:
        raise DataError(f"{path} is empty: a .tiktoken file holds one `base64(token) rank` line per token")
    return ranks


def _constructor_params(name: str) -> dict:
    """pat_str, special tokens and n_vocab of a tiktoken_ext.openai_public encoding, without downloading.

    The constructors download their ranks through two module-level loaders. We run copies of the
    constructors whose globals replace those loaders with stubs, so that patterns and special tokens come
    from tiktoken itself (never a copy here that could drift) and nothing touches the network.
    """
    hashes: list[str | None] = []

    def stub_load(blobpath: str, expected_hash: str | None = None) -> dict:
        hashes.append(expected_hash)
        return {}

    env = dict(vars(openai_public), load_tiktoken_bpe=stub_load, data_gym_to_mergeable_bpe_ranks=lambda **kw: {})
    for fn in openai_public.ENCODING_CONSTRUCTORS.values():  # o200k_harmony calls o200k_base()
        env[fn.__name__] = types.FunctionType(fn.__code__, env, fn.__name__)
    params = env[openai_public.ENCODING_CONSTRUCTORS[name].__name__]()
    params.pop("mergeable_ranks")
    params["expected_hash"] = hashes[0] if hashes else None
    if name in _SAME_RANKS_AS:
        params["expected_hash"] = _constructor_params(_SAME_RANKS_AS[name])["expected_hash"]
    return params
