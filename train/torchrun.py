"""`python -m train.torchrun ARGS`: torchrun (torch.distributed.run) with the same arguments, less the Python
traceback of its own ChildFailedError when a rank exits non-zero.

The ranks already said why they stopped (a user error prints one line from rank 0, a bug its traceback), and
torchrun prints its failure summary (which rank, which exit code); the agent's traceback through
torch/distributed/elastic adds nothing a user can act on. launch.sh starts every distributed run through
this module; `torchrun` itself behaves as it always does.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(argv)
    except ChildFailedError as e:
        codes = sorted({f.exitcode for f in e.failures.values()})
        print(
            f"torchrun: {len(e.failures)} rank(s) failed (exit code {', '.join(map(str, codes))}); "
            "the first lines above say why",
            file=sys.stderr,
        )
        return codes[0] if len(codes) == 1 and 0 < codes[0] < 256 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
