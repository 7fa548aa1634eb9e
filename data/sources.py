"""Where documents (one `str` each) come from.

`--source` takes
- `pydoc` (default): the embedded corpus, Python's own reference documentation as shipped with every
  CPython (`pydoc_data.topics`, about 466 KB of English), one document per topic, in sorted topic order.
  It needs no network and no extra package, so the demo and the tests always have data.
- a local file, a directory (searched recursively, hidden entries skipped) or a glob, of
  - `.txt` / `.txt.gz`: one document per file (`--txt-mode file`, the default), or one per block of
    non-blank lines (`--txt-mode paragraph`; whitespace-only lines separate blocks, and a block's text is
    its lines without the last line break). Read as UTF-8, line endings kept as they are.
  - `.jsonl` / `.json` (a JSON-lines file, or one array of objects; `.gz` too) and `.parquet`: the field
    `--text-field` (default `text`) of every row, read with Hugging Face `datasets` in streaming mode;
    rows whose field is null are skipped.
  Files are read in sorted path order, so the same files always give the same token stream.
- `hf:NAME` with `--hf-config` and `--hf-split`: a Hugging Face hub dataset, streamed
  (`datasets.load_dataset(NAME, CONFIG, split=SPLIT, streaming=True)`), e.g.
  `hf:HuggingFaceFW/fineweb-edu --hf-config sample-10BT`. Offline it fails at once, unless NAME is a
  local directory laid out like a hub dataset repository (a downloaded snapshot), read the same way.
"""

from __future__ import annotations

import glob
import gzip
import os
import re
import socket
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlparse

from data.errors import DataError

PYDOC = "pydoc"
HF_PREFIX = "hf:"
TXT_MODES = ("file", "paragraph")
_KINDS = {
    ".txt": "txt",
    ".txt.gz": "txt",
    ".jsonl": "json",
    ".json": "json",
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".parquet": "parquet",
}
_ROWS_PER_READ = 512  # rows per datasets batch: amortizes per-row Python overhead, stays small in memory


def open_source(
    source: str,
    *,
    text_field: str = "text",
    txt_mode: str = "file",
    hf_config: str | None = None,
    hf_split: str = "train",
) -> Iterator[str]:
    """Check `source` now (missing files, offline hub) and return its documents as a lazy iterator."""
    if txt_mode not in TXT_MODES:
        raise DataError(f"--txt-mode must be one of {', '.join(TXT_MODES)}, not {txt_mode!r}")
    if source == PYDOC:
        return pydoc_documents()
    if source.startswith(HF_PREFIX):
        return hub_documents(source.removeprefix(HF_PREFIX), hf_config, hf_split, text_field)
    return local_documents(local_files(source), text_field=text_field, txt_mode=txt_mode)


def source_slug(source: str | Iterable[str]) -> str:
    """A short name for a source, used as the shard-file prefix (`pydoc_train_000001.bin`)."""
    if not isinstance(source, str):
        return "docs"
    if source.startswith(HF_PREFIX):
        name = source.removeprefix(HF_PREFIX).rstrip("/").split("/")[-1]
    else:
        fixed = re.split(r"[*?\[]", source)[0]  # the part of a glob before its first wildcard
        path = Path(fixed or ".").expanduser().resolve()
        name = path.name if path.is_dir() or fixed != source else path.name.split(".")[0]
    # '_' is reserved: llm.c-style names are PREFIX_SPLIT_INDEX.bin and readers split on it.
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "data"


def pydoc_documents() -> Iterator[str]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


def local_files(source: str) -> list[Path]:
    """The supported files that `source` (a file, a directory or a glob) names, in sorted order."""
    path = Path(source).expanduser()
    if any(c in source for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True) if Path(p).is_file())
        unsupported = [f for f in files if _kind(f) is None]
        if unsupported:
            raise DataError(f"{unsupported[0]} matches {source!r} but is not one of {', '.join(_KINDS)}")
    elif path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and _kind(p) and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    elif path.is_file():
        if _kind(path) is None:
            raise DataError(f"{path}: unsupported file type; local sources are {', '.join(_KINDS)}")
        files = [path]
    else:
        raise DataError(
            f"source {source!r} is not a file, directory or glob that exists; --source takes "
            f"`{PYDOC}`, `{HF_PREFIX}NAME`, or local {', '.join(_KINDS)} files"
        )
    if not files:
        raise DataError(f"no {', '.join(_KINDS)} files in {source!r}")
    return files


def local_documents(files: list[Path], *, text_field: str = "text", txt_mode: str = "file") -> Iterator[str]:
    """Documents of `files` in order; runs of files of one kind go to `datasets` as one dataset."""
    run: list[Path] = []
    for i, f in enumerate(files):
        run.append(f)
        if i + 1 < len(files) and _kind(files[i + 1]) == _kind(f):
            continue
        kind = _kind(f)
        if kind == "txt":
            for path in run:
                yield from _txt_documents(path, txt_mode)
        else:
            yield from _datasets_documents(kind, run, text_field)
        run = []


def hub_documents(name: str, config: str | None, split: str, text_field: str) -> Iterator[str]:
    """Open a hub dataset in streaming mode now (so that errors come at once); its documents lazily.

    `name` may also be a local directory laid out like a hub dataset repository (data files, and configs
    declared in its README.md): `datasets` reads it exactly as it reads the hub, offline, which is how a
    downloaded snapshot (`huggingface-cli download --repo-type dataset`) is used and how this path is tested.
    """
    return _rows_text(_open_hub(name, config, split), text_field, f"{HF_PREFIX}{name}")


def _open_hub(name: str, config: str | None, split: str):
    if not Path(name).expanduser().is_dir():
        _check_hub_reachable(name)
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # DatasetNotFoundError, ValueError (bad config/split), ConnectionError, ...
        raise DataError(
            f"cannot open {HF_PREFIX}{name} (config {config!r}, split {split!r}): {type(e).__name__}: {e}"
        ) from None


def source_parts(
    source: str,
    *,
    text_field: str = "text",
    txt_mode: str = "file",
    hf_config: str | None = None,
    hf_split: str = "train",
) -> list[tuple] | None:
    """A source of several files as one picklable part per file, in stream order (the documents of the parts
    laid end to end are the source's), so that processes can read and tokenize files in parallel; None
    for a source that is one stream (pydoc, a single file, a hub dataset of one data file).

    A hub part carries its file's streaming dataset, resolved here once (a few KB pickled: the data files'
    addresses), so that a worker reads its file without resolving the repository again (the hub's HTTP round
    trips per file)."""
    if source == PYDOC:
        return None
    if source.startswith(HF_PREFIX):
        name = source.removeprefix(HF_PREFIX)
        ds = _open_hub(name, hf_config, hf_split)
        n = ds.num_shards
        if n < 2:
            return None
        return [("hf", name, text_field, i, n, ds.shard(num_shards=n, index=i, contiguous=True)) for i in range(n)]
    files = local_files(source)
    return [("local", str(f), text_field, txt_mode) for f in files] if len(files) > 1 else None


def part_documents(part: tuple) -> Iterator[str]:
    """The documents of one part made by source_parts (in a worker process)."""
    if part[0] == "hf":
        _, name, text_field, index, n, ds = part
        yield from _rows_text(ds, text_field, f"{HF_PREFIX}{name} (file {index + 1} of {n})")
    else:
        _, path, text_field, txt_mode = part
        yield from local_documents([Path(path)], text_field=text_field, txt_mode=txt_mode)


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    return next((kind for suffix, kind in _KINDS.items() if name.endswith(suffix)), None)


def _txt_documents(path: Path, txt_mode: str) -> Iterator[str]:
    # Read here, not with datasets' "text" builder: its paragraph mode splits on the exact string "\n\n"
    # and it rewrites line endings, while we promise blank-line blocks and the text as it is on disk.
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as f:
            if txt_mode == "file":
                yield f.read()
                return
            block: list[str] = []
            for line in f:
                if line.strip():
                    block.append(line)
                elif block:
                    yield _join_block(block)
                    block = []
            if block:
                yield _join_block(block)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e}); convert it, e.g. with iconv -t utf-8") from None


def _join_block(lines: list[str]) -> str:
    return "".join(lines[:-1]) + lines[-1].rstrip("\r\n")


def _datasets_documents(kind: str, files: list[Path], text_field: str) -> Iterator[str]:
    import datasets

    where = str(files[0]) + (f" (and {len(files) - 1} more {kind} files)" if len(files) > 1 else "")
    kwargs = {}
    if kind == "parquet":  # a parquet file states its columns: check them now, and read only the one we need
        import pyarrow.parquet as pq

        for f in files:
            names = pq.read_schema(f).names
            if text_field not in names:
                raise DataError(f"no field {text_field!r} in {f}; its fields are {names}: pass one with --text-field")
        kwargs = {"columns": [text_field]}
    try:
        ds = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train", streaming=True, **kwargs)
    except Exception as e:
        raise DataError(f"cannot read {where}: {type(e).__name__}: {e}") from None
    yield from _rows_text(ds, text_field, where)


def _rows_text(ds, text_field: str, where: str) -> Iterator[str]:
    """The `text_field` of every row of a streaming datasets.IterableDataset."""
    rows = iter(ds.iter(batch_size=_ROWS_PER_READ))
    while True:
        try:
            batch = next(rows)
        except StopIteration:
            return
        except Exception as e:  # malformed JSON, schema clashes between files, unreadable parquet
            raise DataError(f"cannot read {where}: {type(e).__name__}: {str(e).strip().splitlines()[0]}") from None
        if text_field not in batch:
            raise DataError(
                f"no field {text_field!r} in {where}; its fields are {sorted(batch)}: pass one with --text-field"
            )
        for text in batch[text_field]:
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(f"field {text_field!r} in {where} holds {type(text).__name__}, not text")
            yield text


def exit_after_streaming(code: int = 0) -> NoReturn:
    """End a process that streamed a hub dataset, once its output is written: flush, then os._exit(code).

    After the last row of a streamed parquet file, an Arrow thread-pool worker can still hold the file's
    reader (its read cache keeps buffers of the Python file object that `datasets` opened) and release it
    a moment later. Releasing those buffers takes the GIL; if the interpreter is finalizing by then, the
    worker is ended with pthread_exit, whose unwinding through Arrow's noexcept destructor calls
    std::terminate: "terminate called without an active exception" and exit -6 after the work is done
    (apache/arrow#34314, huggingface/datasets#7566). os._exit skips the teardown that races with it."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _check_hub_reachable(name: str) -> None:
    """Fail at once when offline, instead of after datasets' minute of retries."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            raise DataError(
                f"{HF_PREFIX}{name} streams from the Hugging Face hub, but {var} is set: unset it and connect, "
                f"or download the dataset's files and pass their local path as --source"
            )
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # a proxy decides what is reachable; a direct probe would be wrong
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=5).close()
    except OSError as e:
        raise DataError(
            f"{HF_PREFIX}{name} streams from {url.geturl()}, which cannot be reached ({e}): connect, set "
            f"HF_ENDPOINT to a mirror, or download the dataset's files and pass their local path as --source"
        ) from None
