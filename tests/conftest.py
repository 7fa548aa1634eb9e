"""Test environment: offline, CPU, small.

Every test runs without the network: Hugging Face is forced offline, and the
GPT-2 BPE ships inside the package (data/tokenizers), so nothing beside the
checkout is needed.
"""

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

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


def run_root(tmp_path_factory) -> Path:
    """The directory of this test run that every xdist worker shares (pytest-xdist's documented recipe:
    each worker's basetemp sits inside the run's); without xdist, the run's basetemp."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def build_once(root: Path, key: str, build: Callable[[Path], None]) -> Path:
    """root/key, made by build(root/key) (which creates it) once per test run, whichever xdist worker
    asks first: the others wait on a file lock, then reuse it. A build that failed leaves no marker, so
    the next asker retries."""
    root.mkdir(parents=True, exist_ok=True)
    out, done = root / key, root / f"{key}.done"
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not done.exists():
                shutil.rmtree(out, ignore_errors=True)  # a build that failed half-way
                build(out)
                done.touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """A module's tiny models on one intra-op thread (train_helpers.one_thread says why); a module asks
    for it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    from train_helpers import one_thread

    yield from one_thread()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The prepared pydoc dataset (train_helpers.prepared_dataset: built once per test run); a module
    with data of its own defines its own data_dir."""
    from train_helpers import prepared_dataset

    return prepared_dataset(tmp_path_factory)


def fresh_interpreter(env: dict | None = None) -> dict:
    """`env` (default: this process's) for a child that must start as a fresh interpreter rather than a
    fork of the suite's pre-imported one: a test of what a command imports, or one that finds a process
    by its parent or by its /proc environment."""
    env = dict(os.environ if env is None else env)
    env.pop("GPTRAIN_FORKSERVER", None)
    return env


@pytest.fixture(scope="session", autouse=True)
def _fork_server():
    """This worker's processes start from a pre-imported interpreter (tests/forkserver.py says how, and
    what falls back to the real one); GPTRAIN_FORKSERVER=0 turns it off, GPTRAIN_FORKSERVER_LOG=DIR keeps
    each worker's log of what it forked and what it refused."""
    if os.environ.get("GPTRAIN_FORKSERVER") == "0":
        yield
        return
    import subprocess
    import sys
    import tempfile

    import forkserver

    real = sys.executable
    work = tempfile.mkdtemp(prefix="gptrain-forkserver-")  # short: a socket path has at most 107 bytes
    sock = os.path.join(work, "socket")
    shim = forkserver.write_shims(os.path.join(work, "bin"), real)
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(shim), os.environ.get("PATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("GPTRAIN_FORKSERVER", None)
    logs = os.environ.get("GPTRAIN_FORKSERVER_LOG") or work
    os.makedirs(logs, exist_ok=True)
    with open(os.path.join(logs, f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')}.log"), "w") as log:
        server = subprocess.Popen(
            [real, forkserver.__file__, sock], env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
    os.environ["GPTRAIN_FORKSERVER"] = sock
    sys.executable = shim
    yield
    sys.executable = real
    os.environ.pop("GPTRAIN_FORKSERVER", None)
    server.terminate()  # it kills what its children left running
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    shutil.rmtree(work, ignore_errors=True)
