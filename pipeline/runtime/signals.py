"""Early shutdown requests: SIGTERM/SIGINT received before a stage's loop has started still mean
"stop cleanly" (the loop then starts, commits nothing new and exits 0)."""

from __future__ import annotations

import signal

REQUESTED: list[int] = []


def install_early_handlers() -> None:
    """Record SIGTERM/SIGINT in ``REQUESTED`` until the stage runner installs its own handlers."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: REQUESTED.append(signum))
