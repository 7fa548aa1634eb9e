"""The documents themselves: links, the README's size, the CI command, and one test file per document
(tests/test_docs_<name>.py, which run the commands; docs_helpers.py says how)."""

import re

from docs_helpers import DOCS, REPO, by_doc, ci_test_command, commands, doc_file


def test_docs_show_commands_and_the_layout_rule_holds():
    assert (REPO / "docs").is_dir() and sum(len(c) for c in by_doc().values()) > 20
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


def test_every_document_has_its_test_file():
    for doc in by_doc():
        path = REPO / "tests" / doc_file(doc)
        assert path.is_file(), f"{doc} has no {path.relative_to(REPO)}: copy another tests/test_docs_*.py"
        assert f'doc_test("{doc}")' in path.read_text(), f"{path.name} does not run {doc}"
