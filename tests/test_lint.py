"""The linter gives the same answer on a used checkout as on a clean clone: the demo's datasets/ folder
(or wandb/, written by W&B) at the repository root must not make ruff count the third-party package of
that name as first-party (pyproject.toml names the first-party packages instead)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def ruff_check(root: Path) -> tuple[int, str]:
    r = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
        cwd=root,
        capture_output=True,
        text=True,
    )
    return r.returncode, r.stdout


def test_ruff_ignores_run_folders_at_the_root(tmp_path):
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py", "pyproject.toml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / rel, tmp_path / rel)
    assert (tmp_path / "data" / "bench.py").is_file()  # it imports the HF `datasets` package
    clean = ruff_check(tmp_path)
    (tmp_path / "datasets" / "pydoc-bytes").mkdir(parents=True)  # what the demo leaves behind
    (tmp_path / "wandb").mkdir()
    assert ruff_check(tmp_path) == clean
