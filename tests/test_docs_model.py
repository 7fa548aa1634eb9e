"""Every command of docs/model.md runs as written and prints what it shows (docs_helpers.py)."""

from docs_helpers import doc_test

workspace, test_doc_command_runs = doc_test("docs/model.md")
