"""Crash-safe files and directories: the one atomic write, the one sha256.

Everything this project publishes (model artifacts, checkpoints, datasets, exports) is built under a
hidden temporary name beside its final path, flushed to disk, and renamed into place, so that a crash
at any moment leaves either the old complete thing or the new complete thing, never half of one.
Replacing an existing directory uses Linux's renameat2(RENAME_EXCHANGE), which swaps the two names in
one step; where that is unavailable, the old directory is moved aside first and `recover` (called by
the next writer) puts it back if the crash fell between the two renames.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in blocks (never the whole file in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def fsync_tree(root: str | os.PathLike) -> None:
    """Flush every file under root (and root itself) before a rename makes it visible: a power loss after
    the rename must not expose empty files."""
    root = Path(root)
    paths = [root] if root.is_file() else [*root.rglob("*"), root]
    for p in paths:
        if p.is_symlink():
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace a small text file atomically (a temporary sibling, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def symlink_atomic(link: str | os.PathLike, target: str) -> None:
    """Point a symlink at target atomically (a temporary link renamed over the old one)."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _tag() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2); False where the OS or filesystem cannot."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _in_use(p: Path) -> bool:
    """Whether p (named ...-HOST-PID by _tag) belongs to another process still running on this host: a
    directory being built or published right now, not the leftover of a crash."""
    pid = p.name.rpartition("-")[2]
    if not pid.isdigit() or int(pid) == os.getpid() or not p.name.endswith(f"-{socket.gethostname()}-{pid}"):
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def recover(final: str | os.PathLike) -> None:
    """Undo what a crash inside `publish_dir` left beside `final`: the old directory back in place if the
    crash fell between the two renames of the fallback path, and no leftover temporary directories.
    Those of another process still running on this host (a concurrent writer) are left alone."""
    final = Path(final)
    if not final.parent.is_dir():
        return
    olds = sorted(p for p in final.parent.glob(f".{final.name}.old-*") if not _in_use(p))
    if not final.exists() and olds:
        os.replace(olds.pop(), final)
    for p in [*olds, *(p for p in final.parent.glob(f".{final.name}.tmp-*") if not _in_use(p))]:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move the complete directory tmp to final (same filesystem), replacing final if it exists."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    if not final.exists():
        os.replace(tmp, final)
    elif _exchange(tmp, final):
        shutil.rmtree(tmp)  # tmp now holds the old directory
    else:
        old = final.parent / f".{final.name}.old-{_tag()}"
        os.replace(final, old)
        os.replace(tmp, final)  # a crash before this line: recover() moves old back
        shutil.rmtree(old)
    _fsync_dir(final.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary sibling name, then publish it as `final` in one rename.

        with atomic_dir(out) as tmp:
            (tmp / "model.json").write_text(...)

    An exception inside the block removes the temporary directory and leaves `final` untouched.
    overwrite=False refuses an existing `final` with FileExistsError before anything is written."""
    final = Path(final)
    recover(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; choose another output path or remove it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{_tag()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, final)
