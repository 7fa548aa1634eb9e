"""Every command of docs/data.md runs as written and prints what it shows (docs_helpers.py)."""

from docs_helpers import doc_test

workspace, test_doc_command_runs = doc_test("docs/data.md")
