"""The suite's fork server (tests/forkserver.py): a forked child behaves as a fresh interpreter would.

Every multi-process test trusts it, so each property a test relies on is checked here against a fresh
interpreter (the shim with GPTRAIN_FORKSERVER unset execs the real one): argv, cwd, environment, stdin,
stdout buffering, extra fds, exit codes, signals both ways, atexit and threads, and the refusals.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

# What a child reports about itself; `forked` is True only in a child of the server (torch is imported
# before the command starts).
PROBE = """
import json, os, sys
forked = "torch" in sys.modules
import torch
print(json.dumps(dict(forked=forked, argv=sys.argv, cwd=os.getcwd(), x=os.environ.get("GPTRAIN_X"),
    path0=sys.path[0], stdin=sys.stdin.read(), threads=torch.get_num_threads(), name=__name__)))
"""


@pytest.fixture(scope="module")
def server():
    path = os.environ.get("GPTRAIN_FORKSERVER")
    if not path or path == "0":
        pytest.skip("the fork server is off (GPTRAIN_FORKSERVER=0)")
    deadline = time.monotonic() + 120
    while not os.path.exists(path):  # it binds its socket once its imports are done
        assert time.monotonic() < deadline, "the fork server did not come up in 120 s"
        time.sleep(0.2)
    return path


def run(args, fresh=False, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, **kw.pop("env", {}))
    if fresh:
        env.pop("GPTRAIN_FORKSERVER")
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=120, **kw)


def test_a_forked_child_sees_what_a_fresh_interpreter_sees(server, tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    for args in (["-c", PROBE, "a", "b"], [str(tmp_path / "probe.py"), "a"], ["-u", "-c", PROBE]):
        kw = dict(cwd=tmp_path, input="from stdin", env={"GPTRAIN_X": "x1", "OMP_NUM_THREADS": "1"})
        forked, fresh = (json.loads(run(args, fresh=f, **kw).stdout) for f in (False, True))
        assert forked.pop("forked") and not fresh.pop("forked")
        assert forked == fresh
        assert forked["x"] == "x1" and forked["stdin"] == "from stdin" and forked["threads"] == 1
    mod = tmp_path / "pkg"
    mod.mkdir()
    (mod / "__main__.py").write_text(PROBE)
    forked, fresh = (json.loads(run(["-m", "pkg", "z"], fresh=f, cwd=tmp_path).stdout) for f in (False, True))
    assert forked.pop("forked") and not fresh.pop("forked")
    assert forked == fresh and forked["argv"] == [str(mod / "__main__.py"), "z"]


@pytest.mark.parametrize(
    "code, rc, err",
    [
        ("import sys; sys.exit(3)", 3, None),
        ("import sys; sys.exit('no such file')", 1, "no such file"),
        ("raise ValueError('boom')", 1, "ValueError: boom"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", -signal.SIGTERM, None),
        ("print('buffered', end='')", 0, None),  # block-buffered stdout is flushed at exit
    ],
)
def test_exit_status_and_output_are_the_programs(server, code, rc, err):
    forked, fresh = run(["-c", code]), run(["-c", code], fresh=True)
    assert forked.returncode == fresh.returncode == rc
    assert forked.stdout == fresh.stdout
    if err:
        assert err in forked.stderr and err in fresh.stderr
        assert "forkserver" not in forked.stderr  # the traceback starts at the program


def test_atexit_threads_and_extra_fds(server):
    read, write = os.pipe()
    code = f"""
import atexit, os, threading, time
atexit.register(lambda: print("atexit", flush=True))
threading.Thread(target=lambda: (time.sleep(0.3), print("thread", flush=True))).start()
os.write({write}, b"through fd {write}")
"""
    p = subprocess.run([sys.executable, "-c", code], pass_fds=(write,), capture_output=True, text=True, timeout=60)
    os.close(write)
    assert p.returncode == 0 and p.stdout == "thread\natexit\n"
    assert os.read(read, 100) == f"through fd {write}".encode()
    os.close(read)


def test_signals_reach_the_child_and_a_killed_caller_takes_it_down(server, tmp_path):
    code = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: (print("term", flush=True), sys.exit(7)))
open(sys.argv[1], "w").write(str(os.getpid()))
time.sleep(60)
"""
    pidfile = tmp_path / "pid"
    p = subprocess.Popen([sys.executable, "-c", code, str(pidfile)], stdout=subprocess.PIPE, text=True)
    _wait_for(pidfile)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 7 and p.stdout.read() == "term\n"

    pidfile.unlink()
    p = subprocess.Popen([sys.executable, "-c", code, str(pidfile)])
    child = int(_wait_for(pidfile))
    assert child != p.pid  # the program runs in the server's child, not in the shim
    p.kill()
    p.wait(timeout=30)
    deadline = time.monotonic() + 30
    while _alive(child):
        assert time.monotonic() < deadline, "the child outlived its killed caller"
        time.sleep(0.1)


def test_what_a_fork_cannot_reproduce_runs_the_real_interpreter(server):
    probe = "import sys; print('torch' in sys.modules)"
    assert run(["-c", probe]).stdout == "True\n"
    assert run(["-X", "dev", "-c", probe]).stdout == "False\n"  # an interpreter option
    assert run(["-c", probe], env={"LOGLEVEL": "DEBUG"}).stdout == "False\n"  # read while torch imported
    assert run(["-c", probe], env={"PYTHONHASHSEED": "1"}).stdout == "False\n"  # read at start-up


def _wait_for(path) -> str:
    deadline = time.monotonic() + 60
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.05)
    return path.read_text()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
