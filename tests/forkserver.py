"""A pre-imported Python for the processes the suite starts.

Most of the suite's time goes to child processes (`python -m train`, torchrun and its ranks, the documented
commands), and a fresh interpreter spends seconds importing torch and torch.distributed before it does
anything. This server imports them once per pytest worker. A test's `python` (sys.executable, and `python`,
`python3` and `torchrun` on PATH: the shims `write_shims` makes) hands its argv, environment, working
directory and open file descriptors to the server over a Unix socket; the server forks a child that becomes
that command. The child has the caller's fds, env, cwd, argv, sys.path and stdio buffering, receives the
signals the caller receives (the shim forwards them), ends as the interpreter ends up to module teardown
(non-daemon threads joined, atexit run, stdio flushed: `shutdown` says why no further), and its exit status
is the caller's (the shim exits with it, or dies of the same signal). If the caller is killed, the child
is killed.

What a fork cannot reproduce it does not take, and the shim execs the real interpreter instead, so the worst
case is the old speed, never a different result:
- an interpreter option other than -u, -m MODULE, -c CODE and a script path (-I, -E, -X, -W, -O, a REPL);
- an environment that differs from the server's in a variable read while the server imported (TORCH_LOGS,
  TORCHINDUCTOR_*, LOGLEVEL, ...: recorded during the imports) or read by C libraries and the interpreter at
  start-up (PYTHON*, LC_*, LD_*, OMP_*, MKL_*, ...); OMP_NUM_THREADS and PYTHONUNBUFFERED are applied;
- GPTRAIN_FORKSERVER unset or the server not up yet (it binds its socket only once its imports are done).

A test whose subject is a fresh interpreter (what a command imports, a crash at module teardown) or the
process tree (a process found as its caller's child, or by its /proc environ) passes
conftest.fresh_interpreter()'s environment to its child.

Run as `python tests/forkserver.py SOCKET`; tests/conftest.py starts one per pytest worker.
"""

import fcntl
import gc
import io
import json
import os
import runpy
import selectors
import signal
import socket
import struct
import sys

PRELOAD = (
    "numpy",
    "torch",
    "torch.nn.functional",
    "torch.distributed",
    "torch.distributed.run",
    "torch.distributed.fsdp",
    "torch.distributed.tensor.parallel",
    "torch.distributed.pipelining",
    "torch.distributed.checkpoint",
    "tiktoken",
    "yaml",
)
# Read by the interpreter or C libraries at start-up, where the server cannot see it (KMP_* is Intel's OpenMP:
# torch's Linux wheels load GNU's).
STARTUP_PREFIXES = ("PYTHON", "LC_", "LANG", "LD_", "OMP_", "GOMP_", "MKL_", "OPENBLAS_", "TORCH_CPP_")
APPLIED = {"PYTHONPATH", "PYTHONUNBUFFERED", "OMP_NUM_THREADS"}
# Read during the imports but not used by them: the shell's own, the user's, and what the child resets.
IGNORED = {"PATH", "PWD", "OLDPWD", "_", "SHLVL", "PS1", "TERM", "HOME", "USER", "USERNAME", "LOGNAME", "LNAME"}
IGNORED |= {"SHELL", "TMPDIR", "TMP", "TEMP", "GPTRAIN_FORKSERVER", "VIRTUAL_ENV", "VIRTUAL_ENV_PROMPT"}


def parse(args: list[str]) -> tuple[bool, str, str, list[str]] | None:
    """(unbuffered, kind, target, rest) for `[-u] (-m MODULE | -c CODE | SCRIPT) ARGS...`; None otherwise."""
    unbuffered = False
    for i, a in enumerate(args):
        if a == "-u":
            unbuffered = True
        elif a in ("-m", "-c"):
            return (unbuffered, a, args[i + 1], args[i + 2 :]) if i + 1 < len(args) else None
        elif a.startswith("-"):
            return None
        else:
            return unbuffered, "script", a, args[i + 1 :]
    return None


# ----------------------------------------------------------------------------------------------- server


def _read_env_keys(modules) -> set[str]:
    """Import `modules`, returning the environment variables they looked up while importing (a copy of the
    whole environment, os.environ.copy() say, is not a lookup)."""
    seen: set[str] = set()
    copying = [0]
    cls = os._Environ
    getitem, contains, iterate = cls.__getitem__, cls.__contains__, cls.__iter__

    def logged_getitem(self, key):
        if not copying[0]:
            seen.add(key)
        return getitem(self, key)

    def logged_contains(self, key):
        seen.add(key)
        return contains(self, key)

    def unlogged_iter(self):
        copying[0] += 1
        try:
            yield from iterate(self)
        finally:
            copying[0] -= 1

    cls.__getitem__, cls.__contains__, cls.__iter__ = logged_getitem, logged_contains, unlogged_iter
    try:
        for m in modules:
            __import__(m)
    finally:
        cls.__getitem__, cls.__contains__, cls.__iter__ = getitem, contains, iterate
    return seen


def _recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    conn.settimeout(30)
    head, fds, _, _ = socket.recv_fds(conn, 4, 256)
    if len(head) < 4:
        head += _recv_exactly(conn, 4 - len(head))
    body = _recv_exactly(conn, struct.unpack("!I", head)[0])
    conn.settimeout(None)
    return json.loads(body), fds


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = conn.recv(n - len(out))
        if not chunk:
            raise ConnectionError("the shim closed the connection mid-request")
        out += chunk
    return out


def serve(path: str):
    """Accept requests until the parent (the pytest worker) is gone; returns only in a forked child, with
    (request, fds) for `become`. One thread: a fork from a threaded process could inherit a held lock."""
    before = dict(os.environ)
    compared = _read_env_keys(PRELOAD) - IGNORED - APPLIED
    server_env = dict(os.environ)
    gc.freeze()  # the collector leaves the imported objects alone, so children share their pages
    # What the imports set (torch sets TORCHINDUCTOR_CACHE_DIR, say): a fresh process would have it too.
    added = {k: v for k, v in server_env.items() if k not in before}
    base_path = [p for p in sys.path[1:] if p not in server_env.get("PYTHONPATH", "").split(os.pathsep)]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)  # only now: a shim that finds no socket runs the real interpreter meanwhile
    listener.listen(128)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, ("accept", None))
    running: dict[int, tuple[socket.socket, int]] = {}  # pid -> (connection to its shim, pidfd)
    parent = os.getppid()
    stop = []
    # At the end of the test session: the processes a failed test left behind go with the server.
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))

    def differs(env: dict) -> str:
        """The variables whose value the child would not see, comma-separated; empty if none."""
        keys = compared | {k for k in (*env, *server_env) if k.startswith(STARTUP_PREFIXES) and k != "PYTHON"}
        return ",".join(sorted(k for k in keys - APPLIED if env.get(k, added.get(k)) != server_env.get(k)))

    while os.getppid() == parent and not stop:
        for key, _ in sel.select(timeout=1.0):
            kind, pid = key.data
            if kind == "accept":
                conn, _ = listener.accept()
                try:
                    req, fds = _recv_request(conn)
                except (OSError, ValueError, ConnectionError):
                    conn.close()
                    continue
                why = "options" if parse(req["argv"]) is None else differs(req["env"])
                try:
                    child = -1 if why else os.fork()
                except OSError as e:  # out of memory or processes: the real interpreter may still start
                    child, why = -1, f"fork: {e}"
                if child == 0:
                    sel.close()
                    listener.close()
                    conn.close()
                    req["base_path"], req["added"] = base_path, added
                    return req, fds
                print(f"{'refused (' + why + ')' if why else 'forked'}: {req['argv'][:3]}", file=sys.stderr, flush=True)
                if child == -1:
                    try:
                        conn.sendall(b"R")
                    except OSError:
                        pass
                    conn.close()
                    for fd in fds:
                        os.close(fd)
                    continue
                for fd in fds:
                    os.close(fd)
                pidfd = os.pidfd_open(child)
                try:
                    conn.sendall(b"P" + struct.pack("!q", child))
                except OSError:  # the shim died meanwhile: so does its child (the "shim" event below)
                    pass
                running[child] = (conn, pidfd)
                sel.register(conn, selectors.EVENT_READ, ("shim", child))
                sel.register(pidfd, selectors.EVENT_READ, ("exit", child))
            elif kind == "exit":
                conn, pidfd = running.pop(pid)
                _, status = os.waitpid(pid, 0)
                if conn.fileno() in sel.get_map():
                    sel.unregister(conn)
                sel.unregister(pidfd)
                os.close(pidfd)
                try:
                    conn.sendall(b"X" + struct.pack("!i", os.waitstatus_to_exitcode(status)))
                except OSError:
                    pass  # the shim is gone already
                conn.close()
            elif kind == "shim":
                # The shim sends nothing after its request: readable means it died (killed: SIGKILL cannot be
                # forwarded), and a process whose parent kills it dies with it.
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                sel.unregister(running[pid][0])
    for pid in running:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    sys.exit(0)


# ------------------------------------------------------------------------------------------------ child


def _install_fds(received: list[int], targets: list[int]) -> None:
    """Give the child exactly the caller's open fds, at the caller's numbers."""
    floor = max([*received, *targets, 2]) + 1  # above every fd in play: no dup2 below overwrites a source
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, floor) for fd in received]
    keep = set(high)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # listdir's own fd
    for fd, target in zip(high, targets, strict=True):
        os.dup2(fd, target)
        os.close(fd)


def _stdio(unbuffered: bool) -> None:
    """New sys.std* over fds 0-2 as CPython makes them: stdout block-buffered unless a tty or -u, stderr
    line-buffered, a closed fd gives None."""
    enc, errors = sys.__stdout__.encoding, sys.__stdout__.errors

    def stream(fd: int, write: bool, err: bool):
        try:
            os.fstat(fd)
        except OSError:
            return None
        raw = io.FileIO(fd, "w" if write else "r", closefd=False)
        tty = raw.isatty()
        if write and unbuffered:
            buf = raw
        else:
            buf = io.BufferedWriter(raw) if write else io.BufferedReader(raw)
        return io.TextIOWrapper(
            buf,
            encoding=enc,
            errors="backslashreplace" if err else errors,
            newline="\n",
            line_buffering=err or (tty and not unbuffered),
            write_through=write and unbuffered,
        )

    sys.stdin = sys.__stdin__ = stream(0, False, False)
    sys.stdout = sys.__stdout__ = stream(1, True, False)
    sys.stderr = sys.__stderr__ = stream(2, True, True)


def become(req: dict, fds: list[int]):
    """Turn this forked child into the requested command; returns its exit code."""
    _install_fds(fds, req["fds"])
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    for k, v in req["added"].items():
        os.environ.setdefault(k, v)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    unbuffered, kind, target, rest = parse(req["argv"])
    _stdio(unbuffered or bool(req["env"].get("PYTHONUNBUFFERED")))
    sys.executable = req["executable"]
    import tempfile

    import numpy
    import torch

    tempfile.tempdir = None  # TMPDIR is the caller's
    numpy.random.seed()  # a fresh process's unseeded global state differs from its siblings'
    threads = req["env"].get("OMP_NUM_THREADS", "")
    torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0 else len(os.sched_getaffinity(0)))

    entries = [p for p in req["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    first = {"-m": os.getcwd(), "-c": "", "script": os.path.dirname(os.path.realpath(target))}[kind]
    sys.path[:] = [first, *[os.path.abspath(p) for p in entries], *req["base_path"]]
    try:
        if kind == "-m":
            sys.argv = [target, *rest]  # run_module puts the module's path in argv[0], as python -m does
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        elif kind == "-c":
            sys.argv = ["-c", *rest]
            main = type(sys)("__main__")
            sys.modules["__main__"] = main
            exec(compile(target, "<string>", "exec"), main.__dict__)
        else:
            sys.argv = [target, *rest]
            runpy.run_path(target, run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)  # sys.exit("message"), as the interpreter does
        return 1
    except KeyboardInterrupt:
        _print_traceback()
        sys.stdout and sys.stdout.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # as CPython: die of the SIGINT
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:  # noqa: BLE001 - printed as the interpreter prints it, exit 1 as it does
        _print_traceback()
        return 1
    return 0


def shutdown(code: int) -> None:
    """The interpreter's shutdown up to what a program can observe (Py_FinalizeEx's order: join the
    non-daemon threads, run atexit, flush stdio), then exit without tearing down modules: tearing down
    touches every object the server imported, which copies each of its pages into this child."""
    import atexit
    import threading

    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream and stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code & 0xFF)


def _print_traceback() -> None:
    """The uncaught exception as sys.excepthook prints it, without this module's and runpy's frames."""
    etype, value, tb = sys.exc_info()
    while tb is not None and tb.tb_frame.f_code.co_filename in (become.__code__.co_filename, "<frozen runpy>"):
        tb = tb.tb_next
    sys.excepthook(etype, value.with_traceback(tb), tb)


# ------------------------------------------------------------------------------------------------- shims

SHIM = """#!{real} -IS
# Written by tests/forkserver.py: run this command in the suite's fork server, or as {real}.
import os, sys
REAL, PREFIX = {real!r}, {prefix!r}
args = [*PREFIX, *sys.argv[1:]]
path = os.environ.get("GPTRAIN_FORKSERVER")
if not path:
    os.execv(REAL, [REAL, *args])
import json, signal, socket, struct
fds = []
for name in os.listdir("/proc/self/fd"):
    try:
        os.fstat(int(name))
        fds.append(int(name))
    except OSError:
        pass
pending = []
pid = None
def forward(sig, frame):
    if pid is None:
        pending.append(sig)
    else:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
for s in FORWARDED:
    signal.signal(s, forward)
try:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    req = dict(argv=args, env=dict(os.environ), cwd=os.getcwd(), fds=fds, executable={python!r})
    body = json.dumps(req).encode()
    socket.send_fds(sock, [struct.pack("!I", len(body))], fds)
    sock.sendall(body)
    def read(n):
        out = b""
        while len(out) < n:
            chunk = sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError
            out += chunk
        return out
    answer = read(1)
except OSError:
    answer = b"R"
if answer != b"P":
    for s in FORWARDED:
        signal.signal(s, signal.SIG_DFL)
    for s in pending:
        os.kill(os.getpid(), s)
    os.execv(REAL, [REAL, *args])
pid = struct.unpack("!q", read(8))[0]
for s in pending:
    forward(s, None)
try:
    read(1)
    code = struct.unpack("!i", read(4))[0]
except (OSError, ConnectionError):
    code = -signal.SIGKILL  # the server died with the child
if code < 0:
    if -code != signal.SIGKILL:
        signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
os._exit(code)
"""


def write_shims(directory: str, real: str) -> str:
    """`python`, `python3` and `torchrun` shims in `directory`; returns the python shim's path."""
    os.makedirs(directory, exist_ok=True)
    python = os.path.join(directory, "python")
    for name, prefix in (("python", []), ("python3", []), ("torchrun", ["-m", "torch.distributed.run"])):
        p = os.path.join(directory, name)
        with open(p, "w") as f:
            f.write(SHIM.format(real=real, prefix=prefix, python=python))
        os.chmod(p, 0o755)
    return python


if __name__ == "__main__":
    request, received = serve(sys.argv[1])  # returns only in a forked child
    shutdown(become(request, received))
