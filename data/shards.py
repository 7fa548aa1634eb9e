"""The token-shard format and everything that reads it.

A shard is llm.c's token file, so that shards made by llm.c or modded-nanogpt load here and ours load
there: a header of 256 little-endian int32 (h[0] magic, h[1] version, h[2] token count, the rest 0),
then the tokens.
    magic 20240520, version 1: uint16 tokens (vocabularies up to 65,535)
    magic 20240801, version 7: uint32 tokens (larger vocabularies, llm.c's llama-3 variant)
Shards are named PREFIX_SPLIT_INDEX.bin (`pydoc_val_000000.bin`, `pydoc_train_000001.bin`); the index
runs across both splits, val first, as llm.c numbers them. `meta.json` beside them (written last by
data.prepare) records the tokenizer, vocab size, dtype and each shard's token count and sha256.

Readers memory-map shards (a shard is never read into RAM) and check magic, version, the file size
against the header, and dtype/vocab/token counts against meta.json; any mismatch raises one DataError
naming the file. nanoGPT's headerless uint16 `train.bin` / `val.bin` are read when asked (`nanogpt=True`).
"""

from __future__ import annotations

import bisect
import json
import re
from pathlib import Path

import numpy as np

from data.errors import DataError
from model.files import recover, sha256_file

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAGIC_U16, VERSION_U16 = 20240520, 1
MAGIC_U32, VERSION_U32 = 20240801, 7
_BY_MAGIC = {MAGIC_U16: (VERSION_U16, np.dtype("<u2")), MAGIC_U32: (VERSION_U32, np.dtype("<u4"))}
_DTYPE_NAMES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
META_NAME = "meta.json"
SPLITS = ("train", "val")
META_KEYS = (
    "tokenizer",
    "vocab_size",
    "eot_id",
    "dtype",
    "shards",
    "documents",
    "train_tokens",
    "val_tokens",
    "command",
)
SHARD_RE = re.compile(r"^.+_(train|val)_\d+\.bin$")
MAX_SHARD_TOKENS = 2**31 - 1  # the header's count is an int32


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65,535), else llm.c's uint32 variant."""
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


def dtype_name(dtype: np.dtype) -> str:
    return {np.dtype("<u2"): "uint16", np.dtype("<u4"): "uint32"}[np.dtype(dtype)]


def make_header(num_tokens: int, dtype: np.dtype) -> np.ndarray:
    """The 256 x int32 llm.c header for a shard of `num_tokens` tokens of `dtype`."""
    header = np.zeros(HEADER_INTS, dtype="<i4")
    magic, version = (MAGIC_U16, VERSION_U16) if np.dtype(dtype).itemsize == 2 else (MAGIC_U32, VERSION_U32)
    header[:3] = magic, version, num_tokens
    return header


def read_header(path: str | Path) -> tuple[np.dtype, int]:
    """(token dtype, token count) of a shard, after checking magic, version and file size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        header = np.fromfile(path, dtype="<i4", count=HEADER_INTS) if size >= HEADER_BYTES else None
    except OSError as e:
        raise DataError(f"cannot read shard {path}: {e}") from None
    if header is None:
        raise DataError(f"{path}: truncated shard: {size} bytes, less than the {HEADER_BYTES}-byte header")
    magic, version, count = (int(v) for v in header[:3])
    if magic not in _BY_MAGIC:
        raise DataError(
            f"{path}: not a token shard (magic {magic}, expected {MAGIC_U16} or {MAGIC_U32}); "
            f"a headerless nanoGPT .bin is read only when asked for (nanogpt=True)"
        )
    want_version, dtype = _BY_MAGIC[magic]
    if version != want_version:
        raise DataError(f"{path}: corrupt shard header: version {version} with magic {magic} (expected {want_version})")
    expected = HEADER_BYTES + count * dtype.itemsize
    if count < 0 or size != expected:
        raise DataError(
            f"{path}: truncated or corrupt shard: the header says {count} tokens ({expected} bytes) but the "
            f"file has {size} bytes; prepare the dataset again (python -m data.prepare ... --force)"
        )
    return dtype, count


def open_shard(path: str | Path, *, dtype: np.dtype | None = None, tokens: int | None = None) -> np.ndarray:
    """A read-only memmap of a shard's tokens, shape (count,); `dtype`/`tokens` are what meta.json expects."""
    file_dtype, count = read_header(path)
    if dtype is not None and np.dtype(dtype) != file_dtype:
        raise DataError(
            f"{path}: holds {dtype_name(file_dtype)} tokens but meta.json says {dtype_name(dtype)}; "
            f"the shard does not belong to this dataset"
        )
    if tokens is not None and tokens != count:
        raise DataError(f"{path}: holds {count} tokens but meta.json says {tokens}; the shard was replaced or damaged")
    if count == 0:
        return np.empty(0, dtype=file_dtype)  # mmap cannot map zero bytes
    # A plain ndarray view of the map: slicing np.memmap objects costs microseconds of Python per slice.
    return np.memmap(path, dtype=file_dtype, mode="r", offset=HEADER_BYTES, shape=(count,)).view(np.ndarray)


def open_nanogpt_bin(path: str | Path) -> np.ndarray:
    """nanoGPT's headerless uint16 token file as a read-only memmap, shape (count,)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no nanoGPT token file {path}")
    size = path.stat().st_size
    if size % 2:
        raise DataError(f"{path}: {size} bytes is not a whole number of uint16 tokens; the file is truncated")
    if size == 0:
        return np.empty(0, dtype="<u2")
    return np.memmap(path, dtype="<u2", mode="r").view(np.ndarray)


def read_meta(data_dir: str | Path, *, nanogpt: bool = False) -> dict:
    """The dataset's meta.json, checked. See module docstring for the keys.

    A directory of llm.c shards without meta.json (made by llm.c or modded-nanogpt) gets a synthesized
    one ("synthesized": true) when its shards are uint16, which by their convention means GPT-2 tokens;
    so does a nanoGPT directory (train.bin / val.bin) when `nanogpt=True`.
    """
    data_dir = _existing_dir(data_dir)
    if nanogpt:
        return _nanogpt_meta(data_dir)
    path = data_dir / META_NAME
    if not path.is_file():
        return _synthesized_meta(data_dir)
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable meta.json ({e}); prepare the dataset again") from None
    missing = [k for k in META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing or meta["dtype"] not in _DTYPE_NAMES:
        raise DataError(f"{path}: not a data.prepare meta.json (missing {missing or 'a valid dtype'})")
    if meta["vocab_size"] > 65535 and meta["dtype"] == "uint16":
        raise DataError(f"{path}: vocab_size {meta['vocab_size']} does not fit dtype {meta['dtype']}")
    return meta


def open_split(
    data_dir: str | Path, split: str, *, nanogpt: bool = False, vocab_size: int | None = None
) -> TokenStream:
    """All shards of one split as one token stream (memmaps, validated against meta.json).

    `vocab_size` is the consumer's (the model's): a dataset with a larger vocabulary is refused.
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, not {split!r}")
    data_dir = _existing_dir(data_dir)
    meta = read_meta(data_dir, nanogpt=nanogpt)
    if vocab_size is not None and meta["vocab_size"] > vocab_size:
        raise DataError(
            f"{data_dir} holds token ids up to {meta['vocab_size'] - 1} (tokenizer {meta['tokenizer']!r}) but the "
            f"model's vocab_size is {vocab_size}; set vocab_size >= {meta['vocab_size']} or use a matching dataset"
        )
    shards = [s for s in meta["shards"] if s["split"] == split]
    if not shards or sum(s["tokens"] for s in shards) == 0:
        raise DataError(f"{data_dir} has no {split} tokens (shards: {[s['name'] for s in meta['shards']]})")
    if nanogpt:
        return TokenStream([open_nanogpt_bin(data_dir / shards[0]["name"])], [shards[0]["name"]])
    dtype = _DTYPE_NAMES[meta["dtype"]]
    arrays = [open_shard(data_dir / s["name"], dtype=dtype, tokens=s["tokens"]) for s in shards]
    return TokenStream(arrays, [s["name"] for s in shards])


def verify_dataset(data_dir: str | Path) -> None:
    """Re-hash every shard against meta.json's sha256 (reads every byte once, in blocks)."""
    data_dir = _existing_dir(data_dir)
    for shard in read_meta(data_dir)["shards"]:
        path = data_dir / shard["name"]
        read_header(path)
        if shard.get("sha256") and sha256_file(path) != shard["sha256"]:
            raise DataError(f"{path}: sha256 differs from meta.json: the shard is corrupt; prepare it again")


class TokenStream:
    """The tokens of several shards read as one sequence: windows may cross shard boundaries."""

    def __init__(self, arrays: list[np.ndarray], names: list[str]):
        kept = [(a, n) for a, n in zip(arrays, names, strict=True) if len(a)]
        self.arrays = [a for a, _ in kept]
        self.names = [n for _, n in kept]
        self.starts = [0]  # starts[i] = stream position of arrays[i][0]; starts[-1] = len(self)
        for a in self.arrays:
            self.starts.append(self.starts[-1] + len(a))

    def __len__(self) -> int:
        return self.starts[-1]

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) in the shards' dtype; a view when inside one shard."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"tokens [{start}, {start + length}) outside a stream of {len(self)}")
        i = bisect.bisect_right(self.starts, start) - 1
        offset = start - self.starts[i]
        if offset + length <= len(self.arrays[i]):
            return self.arrays[i][offset : offset + length]
        pieces = []
        while length > 0:  # a window that crosses into the next shard(s)
            piece = self.arrays[i][offset : offset + length]
            pieces.append(piece)
            length -= len(piece)
            i, offset = i + 1, 0
        return np.concatenate(pieces)


def _existing_dir(data_dir: str | Path) -> Path:
    data_dir = Path(data_dir)
    # A `data.prepare --force` killed between its two renames left the dataset aside as .NAME.old-*: put
    # it back. Only then: recover() also deletes .NAME.tmp-*, which a prepare running on another machine
    # of a shared filesystem may be writing (it spares only live processes of this host).
    if not data_dir.exists() and any(data_dir.parent.glob(f".{data_dir.name}.old-*")):
        recover(data_dir)
    if not data_dir.is_dir():
        raise DataError(
            f"dataset directory {data_dir} does not exist; make it with python -m data.prepare --out {data_dir}"
        )
    return data_dir


def _synthesized_meta(data_dir: Path) -> dict:
    files = sorted(p for p in data_dir.iterdir() if SHARD_RE.match(p.name))
    if not files:
        hint = (
            " (it has train.bin: pass nanogpt=True to read nanoGPT files)" if (data_dir / "train.bin").exists() else ""
        )
        raise DataError(
            f"{data_dir} has no meta.json and no *_train_*.bin / *_val_*.bin shards{hint}; "
            f"make a dataset with python -m data.prepare --out {data_dir}"
        )
    shards, dtypes = [], set()
    for p in files:
        dtype, count = read_header(p)
        dtypes.add(dtype)
        shards.append({"name": p.name, "split": SHARD_RE.match(p.name).group(1), "tokens": count, "sha256": None})
    if dtypes != {np.dtype("<u2")}:
        raise DataError(
            f"{data_dir} has uint32 llm.c shards but no meta.json, so their tokenizer is unknown; "
            f"write a meta.json beside them (see data/shards.py) naming tokenizer, vocab_size and eot_id"
        )
    return _gpt2_meta(shards, "llm.c", "uint16")


def _nanogpt_meta(data_dir: Path) -> dict:
    shards = []
    for split in SPLITS:
        path = data_dir / f"{split}.bin"
        if path.is_file():
            shards.append({"name": path.name, "split": split, "tokens": len(open_nanogpt_bin(path)), "sha256": None})
    if not shards:
        raise DataError(f"{data_dir} has neither train.bin nor val.bin (nanoGPT's token files)")
    return _gpt2_meta(shards, "nanogpt", "uint16")


def _gpt2_meta(shards: list[dict], fmt: str, dtype: str) -> dict:
    return {
        "format": fmt,
        "synthesized": True,
        "tokenizer": "gpt2",
        "vocab_size": 50257,
        "eot_id": 50256,
        "dtype": dtype,
        "shards": shards,
        "documents": None,
        "command": None,
        "train_tokens": sum(s["tokens"] for s in shards if s["split"] == "train"),
        "val_tokens": sum(s["tokens"] for s in shards if s["split"] == "val"),
    }
