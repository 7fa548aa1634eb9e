"""The import rules of the layout (README.md, "Reading order"), read from the source with ast, and the
README's file tree, which must name every module.

The rules:
- model/ imports none of data/, train/, eval/ (it is imported by all of them).
- data/ imports model/ only.
- eval/ never imports train/ (eval/ reads the model artifact, not training state).
- No library module imports a command module. A command module is a `__main__.py`, or a module with
  a top-level `if __name__ == "__main__":` block (what `python -m pkg.mod` runs). train/ may import
  eval/'s library modules (the evaluation tasks training runs), never its commands.
- No import circles among our modules.

Every import counts, also one inside a function: a lazy import hides a dependency from the reader, not
from the graph. `from pkg import name` depends on the module pkg.name when it is one, else on pkg.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "data", "train", "eval")
# The imports each package may make of ours (besides its own modules).
ALLOWED = {"model": set(), "data": {"model"}, "train": {"model", "data", "eval"}, "eval": {"model", "data"}}
# train.loop draws the training log's samples from train.sample, which also serves
# `python -m train.sample`; the one exception until that command has its own module.
EXCEPTIONS = {("train.loop", "train.sample")}


def modules(root: Path = REPO) -> dict[str, Path]:
    """Dotted name -> file of every module of the four packages (a package is its __init__)."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = f.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def is_command(path: Path) -> bool:
    if path.name == "__main__.py":
        return True
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test) and "__main__" in ast.unparse(node.test):
            return True
    return False


def _owner(name: str, known: dict[str, Path]) -> str | None:
    """The module of ours that `name` (a dotted module path) is, or is inside; None for a third-party one."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of ours that module `name` imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {_owner(a.name, known) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x, from ..pkg import x
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for a in node.names:
                sub = f"{source}.{a.name}"
                out.add(sub if sub in known else _owner(source, known))
    return out - {None, name}


def graph(root: Path = REPO) -> tuple[dict[str, set[str]], set[str]]:
    known = modules(root)
    return {m: imports(m, f, known) for m, f in known.items()}, {m for m, f in known.items() if is_command(f)}


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan 1972), each one a circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def violations(g: dict[str, set[str]], commands: set[str]) -> list[str]:
    bad = []
    for m, deps in sorted(g.items()):
        pkg = m.split(".")[0]
        for d in sorted(deps):
            if d.split(".")[0] not in ALLOWED[pkg] | {pkg}:
                bad.append(f"{m} imports {d}: {pkg}/ may import only {sorted(ALLOWED[pkg]) or 'nothing of ours'}")
            if m not in commands and d in commands and (m, d) not in EXCEPTIONS:
                bad.append(f"{m} (a library module) imports the command module {d}")
    return bad


# Optional extras whose imports stay inside one subpackage of ours, so that everything else runs without them:
# the extra -> the subpackage that alone may import it (and that nothing outside it imports).
EXTRA_HOMES = {"lightning": "train.lightning", "pytorch_lightning": "train.lightning"}


def extra_violations(root: Path = REPO) -> list[str]:
    g, _ = graph(root)
    bad = []
    for m, path in sorted(modules(root).items()):
        for home in sorted(set(EXTRA_HOMES.values())):
            inside = m == home or m.startswith(home + ".")
            if not inside and any(d == home or d.startswith(home + ".") for d in g[m]):
                bad.append(f"{m} imports {home}, which needs an optional extra")
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            for name in names:
                home = EXTRA_HOMES.get(name.split(".")[0])
                if home and not (m == home or m.startswith(home + ".")):
                    bad.append(f"{m} imports {name}: only {home} may (an optional extra)")
    return bad


def test_only_their_subpackage_imports_optional_extras(tmp_path):
    assert extra_violations() == []
    files = {
        "model/__init__.py": "",
        "data/__init__.py": "",
        "eval/__init__.py": "",
        "train/__init__.py": "",
        "train/loop.py": "def f():\n    import lightning.pytorch as pl\n",
        "train/bench.py": "from train.lightning.fit import run\n",
        "train/lightning/__init__.py": "",
        "train/lightning/fit.py": "import lightning as L\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert extra_violations(tmp_path) == [
        "train.bench imports train.lightning, which needs an optional extra",
        "train.loop imports lightning.pytorch: only train.lightning may (an optional extra)",
    ]


def test_the_import_rules_hold():
    g, commands = graph()
    assert violations(g, commands) == []


def test_there_are_no_import_circles():
    g, _ = graph()
    assert circles(g) == []


def test_the_checks_see_a_broken_rule(tmp_path):
    """The rules and the circle count on a small tree that breaks each of them once."""
    files = {
        "model/__init__.py": "",
        "model/gpt.py": "def f():\n    from train import loop\n",  # model -> train, lazily
        "data/__init__.py": "",
        "data/loader.py": "from eval.sample import x\n",  # data -> eval
        "train/__init__.py": "",
        "train/loop.py": "from train.optim import step\nfrom . import sample\n",
        "train/optim.py": "import train.loop\n",  # a circle with train.loop
        "train/sample.py": 'if __name__ == "__main__":\n    pass\n',  # a command, imported relatively by a library
        "eval/__init__.py": "",
        "eval/sample.py": "from train.config import Config\n",  # eval -> train
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    g, commands = graph(tmp_path)
    assert commands == {"train.sample"}
    assert g["train.loop"] == {"train.optim", "train.sample"}
    assert circles(g) == [["train.loop", "train.optim"]]
    bad = violations(g, commands)
    assert any(b.startswith("model.gpt imports train.loop") for b in bad)
    assert any(b.startswith("data.loader imports eval.sample") for b in bad)
    assert any(b.startswith("eval.sample imports train") for b in bad)
    assert sum("library module" in b for b in bad) == 0  # train.loop -> train.sample is the listed exception
    g["train.optim"] = {"train.sample"}
    assert "train.optim (a library module) imports the command module train.sample" in violations(g, commands)


# ----------------------------------------------------------------------------- the README's file tree


def readme_tree() -> dict[str, set[str]]:
    """The files that README.md's tree lists under each package, as paths inside it. A tree line is
    `pkg/  a.py · b.py` (continued on indented lines), `pkg/sub/  a.py · b.py`, or lists a subfolder's
    modules as `sub/ (a, b)`."""
    text = (REPO / "README.md").read_text()
    entries: list[list[str]] = []  # [package, subfolder prefix, its text over all its lines]
    for lang, block in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M):
        if lang:  # a ```bash block is commands, not the tree
            continue
        for line in block.splitlines():
            head = re.match(r"^(\w+)/((?:\w+/)*)\s+(.*)$", line)
            if head and head.group(1) in PACKAGES:
                entries.append([head.group(1), head.group(2), head.group(3)])
            elif entries and entries[-1][0] in PACKAGES and line.startswith(" "):
                entries[-1][2] += " " + line.strip()
            else:
                entries.append(["", "", ""])  # the end of a package's entry
    listed: dict[str, set[str]] = {}
    for pkg, prefix, rest in entries:
        if not pkg:
            continue
        names = listed.setdefault(pkg, set())
        for sub, inner in re.findall(r"(\w+)/\s*\(([^)]*)\)", rest):
            names |= {f"{prefix}{sub}/{n.strip()}.py" for n in inner.split(",") if re.fullmatch(r"\w+", n.strip())}
        names |= {prefix + f for f in re.findall(r"(?<![\w/])((?:\w+/)*\w+\.py)", rest)}
    return listed


def test_the_readme_tree_names_every_module():
    listed = readme_tree()
    missing = []
    for path in modules().values():
        rel = path.relative_to(REPO)
        pkg, inner = rel.parts[0], "/".join(rel.parts[1:])
        if inner == "__init__.py" or (len(rel.parts) > 2 and rel.name == "__init__.py"):
            continue  # a package's __init__ is its folder
        if inner not in listed.get(pkg, set()):
            missing.append(str(rel))
    assert missing == [], f"README.md's file tree does not name {missing}"
    stale = [f"{pkg}/{f}" for pkg, names in listed.items() for f in names if not (REPO / pkg / f).is_file()]
    assert stale == [], f"README.md's file tree names files that do not exist: {stale}"


def test_commands_that_build_no_mesh_do_not_import_dtensor():
    # torch.distributed.tensor is a large share of a command's start-up; a top-level import of it in a
    # module every command loads (model/gpt.py, model/moe.py, train/optim.py) would cost every one
    import subprocess
    import sys

    from conftest import fresh_interpreter

    mods = "model.gpt, model.generation, train.loop, train.__main__, eval.sample, eval.evaluate, data.prepare"
    code = f"import sys, {mods}; print('torch.distributed.tensor' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], env=fresh_interpreter(), capture_output=True, text=True, cwd=REPO, check=True
    )
    assert out.stdout.strip() == "False"
