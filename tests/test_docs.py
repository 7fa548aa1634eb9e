"""Every shell command that README.md and docs/*.md show runs as written, on the CPU, offline.

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
- The test command that .ci/run runs and README.md shows is not run here: CI runs it, and it would
  run this test again. test_readme_shows_the_ci_test_command checks that the two agree.
"""

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

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
TRAINS = r"(-m train(\s|$)|launch\.sh)"  # python -m train, torchrun -m train, bash launch.sh


@dataclass
class Command:
    doc: str
    line: int  # 1-based, where the command starts
    text: str  # the command as shown, continuation lines joined
    needs: list[str]

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
    in_block = False
    block_needs: list[str] = []
    pending, start = "", 0
    for n, raw in enumerate(lines, 1):
        stripped = raw.strip()
        if not in_block:
            if stripped in ("```bash", "```sh"):
                in_block = True
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
        out.append(Command(doc, start, text, needs))
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


ALL = [c for doc in DOCS for c in commands(doc)]


class Workspace:
    """A temporary clone-like directory per document; runs its commands in order, once each."""

    def __init__(self, root: Path):
        self.root = root
        self.done: dict[str, int] = {}  # doc -> number of its commands already run
        self.dirs: dict[str, Path] = {}

    def dir(self, doc: str) -> Path:
        if doc not in self.dirs:
            d = self.root / doc.replace("/", "_")
            d.mkdir()
            shutil.copytree(REPO / "configs", d / "configs")
            shutil.copy2(REPO / "launch.sh", d / "launch.sh")
            self.dirs[doc] = d
        return self.dirs[doc]

    def run(self, cmd: Command) -> None:
        doc_cmds = [c for c in ALL if c.doc == cmd.doc]
        index = doc_cmds.index(cmd)
        # The commands before this one (when a test is run alone, or one was skipped) make its inputs.
        for earlier in doc_cmds[self.done.get(cmd.doc, 0) : index]:
            if not earlier.needs and earlier.text != ci_test_command():
                self._run(earlier, f"(an earlier command of {cmd.doc}, needed by {cmd.id}) ")
        self.done[cmd.doc] = index + 1
        self._run(cmd, "")

    def _run(self, cmd: Command, why: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        env.setdefault("OMP_NUM_THREADS", "1")
        shown = with_overrides(cmd.text)
        p = subprocess.run(
            ["bash", "-o", "pipefail", "-c", shown],
            cwd=self.dir(cmd.doc),
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        if p.returncode != 0:
            out = p.stdout + p.stderr
            if len(out) > 8000:  # the first error and the last words; torchrun's summary alone hides the cause
                out = out[:3000] + "\n[...]\n" + out[-5000:]
            pytest.fail(f"{why}{cmd.id} exited {p.returncode}:\n$ {shown}\n{out}", pytrace=False)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("docs"))


def test_docs_show_commands_and_the_layout_rule_holds():
    assert (REPO / "docs").is_dir() and len(ALL) > 20
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) < 15_000, "README.md is the front page: keep it under 15 KB, move detail to docs/"
    for link in re.findall(r"\]\((docs/[\w.-]+\.md)", readme):
        # docs/offline.md comes from another change of the same release
        assert (REPO / link).exists() or link == "docs/offline.md", f"README.md links to a missing {link}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_the_docs_resolve():
    for doc in DOCS:
        for target, anchor in re.findall(r"\]\(((?:docs/)?[\w.-]+\.md)(?:#([\w-]+))?\)", doc.read_text()):
            path = (doc.parent / target).resolve()
            if path.name == "offline.md" and not path.exists():
                continue  # written by another change of the same release
            assert path.exists(), f"{doc.name} links to a missing {target}"
            if anchor:
                anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", path.read_text(), re.M)}
                assert anchor in anchors, f"{doc.name} links to {target}#{anchor}, which has no such heading"


def test_readme_shows_the_ci_test_command():
    cmd = ci_test_command()
    shown = [c.text for c in commands(REPO / "README.md")]
    assert cmd in shown, f"README.md must show .ci/run's test command verbatim in a ```bash block: {cmd}"


def test_ci_lints_before_the_tests_and_fails_on_no_tests():
    script = (REPO / ".ci" / "run").read_text()
    code = [ln.strip() for ln in script.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    at = {
        k: next(i for i, ln in enumerate(code) if ln.startswith(k)) for k in ("ruff check .", "ruff format --check .")
    }
    run_tests = next(i for i, ln in enumerate(code) if ln.startswith('"${test_command[@]}"'))
    assert at["ruff check ."] < run_tests and at["ruff format --check ."] < run_tests
    assert not any("README" in ln for ln in code), "the test command is defined in .ci/run, not read from README.md"
    assert re.search(r"rc -eq 5", script), "pytest's exit code 5 (no tests collected) must fail CI"


@pytest.mark.slow
@pytest.mark.parametrize("cmd", ALL, ids=[c.id for c in ALL])
def test_doc_command_runs(cmd: Command, workspace: Workspace):
    if cmd.needs:
        pytest.skip(f"needs {', '.join(cmd.needs)}: {cmd.text}")
    if cmd.text == ci_test_command():
        pytest.skip("the test command: CI runs it (test_readme_shows_the_ci_test_command)")
    workspace.run(cmd)
