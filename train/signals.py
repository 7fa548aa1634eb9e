"""SIGTERM and Ctrl-C during training: checkpoint at the end of the step, then exit."""

from __future__ import annotations

import signal
import sys


class StopFlag:
    """SIGTERM (cluster preemption) and SIGINT (Ctrl-C) ask the loop to checkpoint at the end of the
    current step and exit cleanly; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name} received: saving a checkpoint at the end of this step, then "
            "exiting (Ctrl-C again to abort now)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. an embedding application): no handler
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
