"""What every eval CLI shares: user errors become one line on stderr and a non-zero exit."""

from __future__ import annotations

import sys
from collections.abc import Callable

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


# Errors a user can cause anywhere below a CLI: ours, model.io's ArtifactError (a FileNotFoundError),
# data's DataError (a ValueError), ModelConfig's ValueError, a missing / unreadable / existing path.
USER_ERRORS = (UserError, ValueError, OSError)


def run(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> int:
    """Run a CLI entry point; a user error prints `error: <message>` and returns 2, no traceback."""
    try:
        main(argv)
    except USER_ERRORS as e:
        msg = str(e) or type(e).__name__
        if isinstance(e, FileNotFoundError) and e.filename and not msg.startswith(str(e.filename)):
            msg = f"{e.filename}: {e.strerror or msg}"
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
