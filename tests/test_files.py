"""model.files: the one atomic directory publish (complete or nothing, the old one kept on failure, the
rename-exchange path and the two-rename fallback with a crash between its renames) and the one sha256."""

import hashlib
import os

import pytest

from model import files
from model.files import atomic_dir, recover, sha256_file, symlink_atomic, write_text_atomic


def make_old(path):
    path.mkdir()
    (path / "a.txt").write_text("old a")
    (path / "b.txt").write_text("old b")


def contents(path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(path.iterdir())}


def leftovers(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_publishes_complete_or_nothing(tmp_path):
    final = tmp_path / "art"
    with atomic_dir(final) as tmp:
        (tmp / "x.txt").write_text("1")
        assert not final.exists()  # nothing visible while the directory is being built
        assert tmp.parent == final.parent and tmp.name.startswith(".art.tmp-")
        (tmp / "y.txt").write_text("2")
    assert contents(final) == {"x.txt": "1", "y.txt": "2"}
    assert leftovers(tmp_path) == []


def test_an_exception_inside_leaves_the_old_directory_untouched(tmp_path):
    final = tmp_path / "art"
    make_old(final)
    with pytest.raises(RuntimeError, match="check failed"):
        with atomic_dir(final, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("new a")
            raise RuntimeError("check failed")
    assert contents(final) == {"a.txt": "old a", "b.txt": "old b"}
    assert leftovers(tmp_path) == []
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C too
        with atomic_dir(tmp_path / "fresh") as tmp:
            raise KeyboardInterrupt
    assert not (tmp_path / "fresh").exists() and leftovers(tmp_path) == []


def test_an_existing_directory_is_refused_without_overwrite(tmp_path):
    final = tmp_path / "art"
    make_old(final)
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_dir(final):
            pytest.fail("the block must not run")
    assert contents(final) == {"a.txt": "old a", "b.txt": "old b"}


def test_replace_by_exchange(tmp_path, monkeypatch):
    """renameat2(RENAME_EXCHANGE): the new directory takes the name in one step; the old one is deleted."""
    probe_a, probe_b = tmp_path / "pa", tmp_path / "pb"
    probe_a.mkdir(), probe_b.mkdir()
    if not files._exchange(probe_a, probe_b):
        pytest.skip("this filesystem or OS cannot exchange two names atomically")
    calls = []
    real = files._exchange
    monkeypatch.setattr(files, "_exchange", lambda a, b: calls.append((a.name, b.name)) or real(a, b))
    monkeypatch.setattr(os, "replace", lambda *a: pytest.fail("the exchange path needs no rename"))
    final = tmp_path / "art"
    make_old(final)
    with atomic_dir(final, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("new a")
    assert contents(final) == {"a.txt": "new a"}  # b.txt went with the old directory
    assert len(calls) == 1 and calls[0][1] == "art"
    assert leftovers(tmp_path) == []


def test_replace_by_two_renames(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    final = tmp_path / "art"
    make_old(final)
    with atomic_dir(final, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("new a")
    assert contents(final) == {"a.txt": "new a"}
    assert leftovers(tmp_path) == []


def crash_on_second_replace(monkeypatch):
    """os.replace raises KeyboardInterrupt on its second call: a kill between the fallback's two renames
    (the old directory is already aside, the new one not yet in place)."""
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return calls


@pytest.mark.parametrize("then", ["recover", "next atomic_dir"])
def test_a_crash_between_the_two_renames_is_undone(tmp_path, monkeypatch, then):
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    calls = crash_on_second_replace(monkeypatch)
    final = tmp_path / "art"
    make_old(final)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(final, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("new a")
    assert len(calls) == 2
    assert not final.exists()  # the state a kill at that moment leaves: old aside, new not yet in place
    assert [p.name.split("-")[0] for p in sorted(tmp_path.iterdir())] == [".art.old", ".art.tmp"]
    monkeypatch.undo()
    if then == "recover":
        recover(final)
        assert contents(final) == {"a.txt": "old a", "b.txt": "old b"}
    else:
        with atomic_dir(final, overwrite=True) as tmp:
            assert contents(final) == {"a.txt": "old a", "b.txt": "old b"}  # restored before the new build
            (tmp / "c.txt").write_text("newer")
        assert contents(final) == {"c.txt": "newer"}
    assert leftovers(tmp_path) == []


def test_recover_leaves_a_complete_directory_alone(tmp_path):
    final = tmp_path / "art"
    make_old(final)
    recover(final)
    assert contents(final) == {"a.txt": "old a", "b.txt": "old b"}
    recover(tmp_path / "missing" / "x")  # no parent: nothing to do


def test_write_text_atomic_and_symlink_atomic(tmp_path):
    path = tmp_path / "latest"
    write_text_atomic(path, "step_1")
    write_text_atomic(path, "step_2")
    assert path.read_text() == "step_2" and sorted(p.name for p in tmp_path.iterdir()) == ["latest"]
    (tmp_path / "step_1").mkdir(), (tmp_path / "step_2").mkdir()
    link = tmp_path / "best"
    symlink_atomic(link, "step_1")
    symlink_atomic(link, "step_2")
    assert os.readlink(link) == "step_2" and not leftovers(tmp_path)


def test_sha256_file_matches_hashlib(tmp_path):
    data = os.urandom(3 * 1000 + 7)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path, block=1000) == hashlib.sha256(data).hexdigest()
    path.write_bytes(b"")
    assert sha256_file(path) == hashlib.sha256(b"").hexdigest()


def test_recover_leaves_a_running_writers_directories_alone(tmp_path):
    """A second writer of the same name (two data.prepare runs, say) must not delete the first one's
    directory while it is being built; a dead writer's leftovers go."""
    import socket
    import subprocess
    import sys

    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = tmp_path / f".art.tmp-{host}-{live.pid}"
        crashed = tmp_path / f".art.tmp-{host}-{int(dead.stdout)}"
        running.mkdir(), crashed.mkdir()
        recover(tmp_path / "art")
        assert running.is_dir() and not crashed.exists()
        with atomic_dir(tmp_path / "art") as tmp:
            (tmp / "a.txt").write_text("x")
        assert running.is_dir() and contents(tmp_path / "art") == {"a.txt": "x"}
    finally:
        live.kill()
        live.wait()
    recover(tmp_path / "art")
    assert not running.exists()
