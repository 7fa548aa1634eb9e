"""What every eval CLI shares: UsageError, --dtype parsing, and model/cli.py's runner (a user error becomes one
line on stderr and exit 2; a bug keeps its traceback).

A user error is a model.errors.UserError: ours (UsageError), model.io's ArtifactError, data's
DataError. Every mistake a user can make in eval/ (a missing file or path, a bad flag value, an existing
output without --force, a prompt too long for the context, a bad dtype name) is raised as one of them
where it is detected, with a message that says what to do. Anything else (a ValueError, OSError or
KeyError from deep inside) is a bug or an environment failure, and its traceback is what a bug report needs.
"""

from __future__ import annotations

from model.cli import run as run  # the one runner; eval's commands import it from here
from model.dtypes import short
from model.errors import UserError


class UsageError(UserError, ValueError):
    """A mistake the user can fix (bad flag value, missing file, prompt too long); the message says how."""


def dtype_flag(name: str, flag: str = "--dtype") -> str:
    """A --dtype value (bf16, bfloat16, ...) as its short name, the one model.dtypes table deciding."""
    try:
        return short(name)
    except ValueError as e:
        raise UsageError(f"{flag}: {e}") from None
