"""Early shutdown requests: SIGTERM/SIGINT received before a stage's loop has started still mean
"stop cleanly" (the loop then starts, commits nothing new and exits 0). SIGUSR1 prints every thread's stack
from the first moment (a diagnosis request must never end a process that is still starting)."""

from __future__ import annotations

import faulthandler
import signal
import sys

REQUESTED: list[int] = []


def install_early_handlers() -> None:
    """Record SIGTERM/SIGINT in ``REQUESTED`` until the stage runner installs its own handlers."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: REQUESTED.append(signum))
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
