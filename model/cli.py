"""The one command-line runner: every `python -m ...` entry point of data/, train/ and eval/ ends with
`sys.exit(run(main))`.

A user error (model.errors.UserError: DataError, TrainError, ConfigError, ArtifactError, UsageError) is
one line on stderr and exit code 2, never a traceback; Ctrl-C is exit 130; anything else is a bug and
keeps its traceback. Under torchrun every rank raises the same user error, so rank 0 alone prints it
(the other ranks exit after a grace period, so that torchrun does not stop rank 0 before it has);
an error that belongs to one rank's own environment (every_rank_reports, e.g. a missing GPU) is printed
by that rank. It lives in model/ because data/ imports nothing else of ours.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from model.errors import UserError

PEER_ERROR_GRACE_S = 5.0  # how long a rank other than 0 waits before exiting on a user error rank 0 prints


def run(
    main: Callable[[list[str] | None], int | None],
    argv: list[str] | None = None,
    *,
    prog: str = "",
    interrupted: str = "interrupted",
) -> int:
    """main(argv)'s exit code (None: 0). `prog` prefixes the error line (`data.prepare: error: ...`);
    an error class may name itself with a `label` attribute (ConfigError: `config error`)."""
    rank = os.environ.get("RANK", "0")
    try:
        code = main(argv)
    except UserError as e:
        if rank == "0" or getattr(e, "every_rank_reports", False):
            where = "" if rank == "0" else f" on rank {rank}"
            head = f"{prog}: " if prog else ""
            print(f"{head}{getattr(e, 'label', 'error')}{where}: {str(e) or type(e).__name__}", file=sys.stderr)
        else:
            # Rank 0 prints this error. torchrun stops every rank as soon as one exits, so a rank that
            # got here first would take rank 0's line with it: leave rank 0 the time to print and exit.
            time.sleep(PEER_ERROR_GRACE_S)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    return code or 0
