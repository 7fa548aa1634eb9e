"""What tests/test_docs*.py share: every shell command that README.md and docs/*.md show runs as written,
on the CPU, offline, and prints what the document shows it printing.

The convention for whoever writes the docs:

- The commands are the lines of the ```bash and ```sh blocks; a line ending in a backslash continues
  on the next one. Blank lines and comment lines are not commands. Console transcripts and file
  layouts go in plain ``` blocks, which are not run.
- A command that cannot run on a CPU-only machine without a network says so in a trailing comment:
  `# needs: gpu`, `# needs: network`, `# needs: cluster` (several machines, SLURM) or `# needs: server`
  (starts a server that runs until stopped, or talks to one; tests/test_serve.py covers the server),
  comma-separated when it needs more than one. `<!-- needs: ... -->` on the line before a block marks every command
  of the block. Such a command is reported as skipped with what it needs, never run; any other
  `needs:` word is an error, so a typo cannot hide a command.
- Each document runs in its own temporary directory prepared like a user's clone (configs/ and
  launch.sh copied in, the packages importable), in the order shown: a document's earlier commands
  make the datasets and runs that its later ones use, so every document starts from nothing.
- To stay cheap, the test appends small overrides to some commands (OVERRIDES below): training stops
  after 2 steps (a step count the document gives is cut to 4) and evaluates 2 batches, samples are 8
  tokens long, evaluations 2 batches, benchmarks one short round, sweeps 2 trials. Flags appended
  later win over the document's.
- Output: a plain ``` block whose nearest fenced block above is a ```bash block is that block's
  transcript, unless it starts with a command (`$ ...`, `python ...`: a session of its own or a usage
  synopsis). Of its lines that are output (not `$ ` commands, not `...`, not a shown command line),
  at least one must appear in what the block's commands print, numbers matching any number (the test
  runs them shorter) and runs of spaces any spaces. Such a block that is not a transcript says so with
  `<!-- not output -->` on the line before it.
- Each document has its own test file, tests/test_docs_<name>.py (README.md: test_docs_readme.py), so
  xdist spreads the documents over its workers. Documents that begin with the same commands (the demo,
  the prepared pydoc dataset) share them: the first to need them runs them once per test run, in a
  directory every worker sees, and the others start from a copy of the result.
- The test command that .ci/run runs and README.md shows is not run here: CI runs it, and it would
  run this test again. test_readme_shows_the_ci_test_command checks that the two agree.
- A multi-process launch that a test file runs as the document shows it (its own overrides appended,
  as here) and checks against one process is left to that file (RUN_BY below): the file takes the
  command from the document (`documented`), so the document cannot drift from what runs.
"""

import hashlib
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import build_once, run_root

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NEEDS = {"gpu", "network", "cluster", "server"}
MAX_STEPS = 4  # a step count that a document gives is cut to this

# (regex on the command, flags appended, flags appended only when the command does not give them)
OVERRIDES = [
    (r"-m eval\.sample\b", ["--max-new-tokens", "8"], {}),
    (r"-m eval\.evaluate\b", ["--max-batches", "2"], {}),
    (
        r"-m eval\.bench\b",
        ["--batch-sizes", "1", "--new-tokens", "8", "--prompt-len", "4", "--prefill-len", "16"]
        + ["--nocache-steps", "2", "--repeats", "1", "--loss-batches", "2"],
        {"--models": "demo"},
    ),
    (r"-m eval\.serve\.bench\b", ["--clients", "1,4", "--requests", "1", "--max-tokens", "8"], {"--models": "demo"}),
    (r"-m train\.bench\b", ["--steps", "1", "--warmup", "1"], {"--settings": "baseline"}),
    (r"-m data\.bench\b", ["--mb", "0.05"], {}),
    (r"-m train\.race\b", ["--set", "train.max_steps=4", "--eval-every", "2", "--eval-tokens", "2048", "--quiet"], {}),
    (r"-m train\.sweep\b", ["--trials", "2", "train.max_steps=2", "train.eval_every=1", "train.eval_batches=2"], {}),
]
TRAINS = r"(-m train(\.lightning)?(\s|$)|launch\.sh)"  # python -m train (.lightning), torchrun -m train, bash launch.sh

# A documented command (as shown, its trailing comment aside) -> the test file that runs it (documented()).
RUN_BY = {
    "bash launch.sh --nproc 2 configs/debug.yaml": "tests/test_launch.py",
    "bash launch.sh --nproc 4 configs/debug.yaml parallel.dp_shard=2 parallel.tp=2 model.vocab_size=258 "
    "train.run_dir=runs/mesh": "tests/test_dist_mesh_e2e.py",
    "bash launch.sh --nproc 2 configs/debug.yaml parallel.strategy=fsdp train.run_dir=runs/fsdp": (
        "tests/test_dist_loop.py"
    ),
    "bash launch.sh --nproc 2 configs/debug.yaml parallel.cp=2 train.run_dir=runs/cp2": "tests/test_dist_cp.py",
    "DS_ACCELERATOR=cpu bash launch.sh --nproc 2 --deepspeed configs/debug.yaml train.run_dir=runs/zero2": (
        "tests/test_dist_loop.py"
    ),
}


@dataclass
class Command:
    doc: str
    line: int  # 1-based, where the command starts
    text: str  # the command as shown, continuation lines joined
    needs: list[str]
    block: int = 0  # 1-based, which ```bash block of the document it is in

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def split_comment(line: str) -> tuple[str, str]:
    """The command and its trailing comment: the first unquoted `#` that starts a word."""
    quote = None
    i = 0
    while i < len(line):
        c = line[i]
        if c == "\\" and quote != "'":
            i += 2
            continue
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
        i += 1
    return line.rstrip(), ""


def parse_needs(comment: str, where: str) -> list[str]:
    m = re.search(r"needs:\s*([\w\s,-]+)", comment)
    if not m:
        return []
    needs = [w.strip() for w in m.group(1).split(",") if w.strip()]
    unknown = [w for w in needs if w not in NEEDS]
    assert not unknown, f"{where}: unknown 'needs: {', '.join(unknown)}' (known: {', '.join(sorted(NEEDS))})"
    return needs


def commands(path: Path) -> list[Command]:
    doc = str(path.relative_to(REPO))
    lines = path.read_text().splitlines()
    out: list[Command] = []
    blocks = 0
    in_block = False
    block_needs: list[str] = []
    pending, start = "", 0
    for n, raw in enumerate(lines, 1):
        stripped = raw.strip()
        if not in_block:
            if stripped in ("```bash", "```sh"):
                in_block, blocks = True, blocks + 1
                prev = next((p.strip() for p in reversed(lines[: n - 1]) if p.strip()), "")
                m = re.fullmatch(r"<!--\s*(needs:.*?)\s*-->", prev)
                block_needs = parse_needs(m.group(1), f"{doc}:{n}") if m else []
            continue
        if stripped == "```":
            in_block = False
            assert not pending, f"{doc}:{start}: a command ends in a backslash at the end of its block"
            continue
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if not pending:
            start = n
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        _, comment = split_comment(text)
        needs = sorted(set(block_needs) | set(parse_needs(comment, f"{doc}:{start}")))
        out.append(Command(doc, start, text, needs, blocks))
    assert not in_block, f"{doc}: a ```bash block is not closed"
    return out


def ci_test_command() -> str:
    m = re.search(r"^test_command=\((.+)\)$", (REPO / ".ci" / "run").read_text(), re.M)
    assert m, ".ci/run has no test_command=(...) line"
    return " ".join(shlex.split(m.group(1)))


def with_overrides(text: str) -> str:
    """The command as the test runs it: the document's, plus the flags that keep it short."""
    cmd, comment = split_comment(text)
    extra: list[str] = []
    if re.search(TRAINS, cmd) and "--print-config" not in cmd:
        steps = re.search(r"\btrain\.max_steps=(\d+)\b", cmd)
        if steps:
            cmd = cmd.replace(steps.group(0), f"train.max_steps={min(int(steps.group(1)), MAX_STEPS)}")
        else:
            extra.append("train.max_steps=2")
        if not re.search(r"\btrain\.eval_batches=", cmd):
            extra.append("train.eval_batches=2")
    for pattern, always, unless_given in OVERRIDES:
        if re.search(pattern, cmd):
            extra += always
            for flag, value in unless_given.items():
                if not re.search(rf"(^|\s){re.escape(flag)}(\s|=|$)", cmd):
                    extra += [flag, value]
    return " ".join([cmd, *extra])


def transcripts(path: Path) -> dict[int, list[tuple[int, list[str]]]]:
    """{bash block number: [(line, the output lines a plain block below it shows), ...]}."""
    lines = path.read_text().splitlines()
    out: dict[int, list[tuple[int, list[str]]]] = {}
    blocks, last, n = 0, None, 0
    while n < len(lines):
        stripped = lines[n].strip()
        if not stripped.startswith("```"):
            n += 1
            continue
        end = next(i for i in range(n + 1, len(lines)) if lines[i].strip() == "```")
        lang = stripped[3:].strip()
        if lang in ("bash", "sh"):
            blocks += 1
        prev = next((p.strip() for p in reversed(lines[:n]) if p.strip()), "")
        first = next((ln.strip() for ln in lines[n + 1 : end] if ln.strip()), "")
        own = first.startswith(COMMAND_STARTS)  # a transcript of its own `$ ` commands, or a usage synopsis
        if not lang and last in ("bash", "sh") and prev != "<!-- not output -->" and not own:
            shown = [ln for ln in lines[n + 1 : end] if is_output(ln)]
            if shown:
                out.setdefault(blocks, []).append((n + 1, shown))
        last, n = lang, end + 1
    return out


COMMAND_STARTS = ("$ ", "python ", "bash ", "torchrun ")


def is_output(line: str) -> bool:
    s = line.strip()
    if not s or s in ("...", "[...]") or s.startswith(("#", "-", *COMMAND_STARTS)):
        return False
    return sum(c.isalpha() for c in s) >= 3


NUMBER = r"[-+]?(?:\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?|nan|inf)"


def line_pattern(line: str) -> re.Pattern:
    """A shown output line as a pattern: any number where it shows one, any spaces where it shows some."""
    parts = re.split(r"(\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?)", line.strip())
    rx = "".join(NUMBER if i % 2 else re.sub(r"(\\ )+", r"\\s+", re.escape(p)) for i, p in enumerate(parts))
    return re.compile(rx)


def shows(output: str, shown: list[str]) -> bool:
    """Whether at least one shown output line appears in `output`."""
    got = [ln.strip() for ln in output.splitlines()]
    return any(line_pattern(s).search(g) for s in shown for g in got)


def by_doc() -> dict[str, list[Command]]:
    return {str(d.relative_to(REPO)): commands(d) for d in DOCS}


def run_by(cmd: Command) -> str | None:
    """The test file that runs this command (RUN_BY), if another file does."""
    return RUN_BY.get(split_comment(cmd.text)[0])


def documented(command: str) -> list[str]:
    """The argv of a command that README.md or docs/ shows (a RUN_BY key), for the test file that runs it;
    fails when no document shows it any more."""
    assert command in RUN_BY, f"{command!r} is not in tests/docs_helpers.py's RUN_BY"
    shown = [c for cmds in by_doc().values() for c in cmds if split_comment(c.text)[0] == command]
    assert shown, f"no document shows {command!r} any more: update RUN_BY and {RUN_BY[command]}"
    return shlex.split(command)


def run_documented(command: str, extra: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """documented(command) with `extra` appended (later flags win), run from the repository root in the
    tests' environment (train_helpers.python_env); asserts that it exited 0."""
    from train_helpers import python_env

    argv = ["env", *documented(command), *extra]  # env: the document may start with VAR=value
    proc = subprocess.run(argv, cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{command} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def runnable(cmd: Command) -> bool:
    return not cmd.needs and cmd.text != ci_test_command() and run_by(cmd) is None


def shared_prefixes(docs: dict[str, list[Command]]) -> set[tuple[str, ...]]:
    """Runs of commands that start two or more documents: run once, copied to each."""
    seen: dict[tuple[str, ...], set[str]] = {}
    for doc, cmds in docs.items():
        run = tuple(with_overrides(c.text) for c in cmds if runnable(c))
        for k in range(1, len(run) + 1):
            seen.setdefault(run[:k], set()).add(doc)
    return {p for p, ds in seen.items() if len(ds) > 1}


def execute(cmd: Command, cwd: Path, why: str) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    shown = with_overrides(cmd.text)
    p = subprocess.run(
        ["bash", "-o", "pipefail", "-c", shown],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    out = p.stdout + p.stderr
    if p.returncode != 0:
        if len(out) > 8000:  # the first error and the last words; torchrun's summary alone hides the cause
            out = out[:3000] + "\n[...]\n" + out[-5000:]
        pytest.fail(f"{why}{cmd.id} exited {p.returncode}:\n$ {shown}\n{out}", pytrace=False)
    return out


def fresh_clone(d: Path) -> None:
    shutil.copytree(REPO / "configs", d / "configs")
    shutil.copy2(REPO / "launch.sh", d / "launch.sh")


class Workspace:
    """One document's temporary clone-like directory; runs its commands in order, once each, and keeps
    what each printed. A run of commands that starts other documents too comes from build_once."""

    def __init__(self, doc: str, root: Path, shared_root: Path):
        self.doc, self.dir, self.shared_root = doc, root, shared_root
        self.cmds = by_doc()[doc]
        self.shared = shared_prefixes(by_doc())
        self.done = 0  # commands of the document already run
        self.ran: list[str] = []  # the runnable commands run so far, as run
        self.outputs: dict[int, str] = {}  # command index -> what it printed
        fresh_clone(self.dir)

    def run(self, cmd: Command) -> None:
        index = self.cmds.index(cmd)
        # The commands before this one (when a test is run alone, or one was skipped) make its inputs.
        for i in range(self.done, index):
            if runnable(self.cmds[i]):
                self._run(i, f"(an earlier command of {self.doc}, needed by {cmd.id}) ")
        self.done = index + 1
        self._run(index, "")
        self._check_output(cmd)

    def _run(self, i: int, why: str) -> None:
        cmd = self.cmds[i]
        prefix = (*self.ran, with_overrides(cmd.text))
        if prefix in self.shared:
            key = hashlib.sha256("\n".join(prefix).encode()).hexdigest()[:16]
            tree = build_once(self.shared_root, key, lambda out: self._build(out, cmd, why))
            shutil.rmtree(self.dir)
            shutil.copytree(tree / "tree", self.dir, symlinks=True)
            self.outputs[i] = (tree / "output.txt").read_text()
        else:
            self.outputs[i] = execute(cmd, self.dir, why)
        self.ran.append(prefix[-1])

    def _build(self, out: Path, cmd: Command, why: str) -> None:
        """The shared state after `cmd`: this workspace so far, plus `cmd`, run in out/tree."""
        shutil.copytree(self.dir, out / "tree", symlinks=True)
        (out / "output.txt").write_text(execute(cmd, out / "tree", why))

    def _check_output(self, cmd: Command) -> None:
        """After the last command of a block, the block's transcripts against what its commands printed."""
        block = [i for i, c in enumerate(self.cmds) if c.block == cmd.block]
        if self.cmds.index(cmd) != max(i for i in block if runnable(self.cmds[i])):
            return
        printed = "\n".join(self.outputs.get(i, "") for i in block)
        for line, shown in transcripts(REPO / self.doc).get(cmd.block, []):
            assert shows(printed, shown), (
                f"{self.doc}:{line} shows output that none of the commands of the block above printed "
                f"(none of these lines, numbers aside, appears):\n"
                + "\n".join(shown)
                + f"\n--- printed:\n{printed[-4000:]}"
            )


def doc_file(doc: str) -> str:
    """tests/test_docs_<name>.py, the test file of one document."""
    name = Path(doc).stem.lower().replace("-", "_")
    return f"test_docs_{name}.py"


def doc_test(doc: str):
    """The test and fixture of one document's test file: every command of `doc`, in order."""

    @pytest.fixture(scope="module")
    def workspace(tmp_path_factory) -> Workspace:
        return Workspace(doc, tmp_path_factory.mktemp("doc"), run_root(tmp_path_factory) / "docs-shared")

    cmds = by_doc()[doc]

    @pytest.mark.slow
    @pytest.mark.parametrize("cmd", cmds, ids=[c.id for c in cmds])
    def test_doc_command_runs(cmd: Command, workspace: Workspace):
        if cmd.needs:
            pytest.skip(f"needs {', '.join(cmd.needs)}: {cmd.text}")
        if cmd.text == ci_test_command():
            pytest.skip("the test command: CI runs it (test_readme_shows_the_ci_test_command)")
        if run_by(cmd):
            pytest.skip(f"{run_by(cmd)} runs it and checks it against one process")
        workspace.run(cmd)

    return workspace, test_doc_command_runs
