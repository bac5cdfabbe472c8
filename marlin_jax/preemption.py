"""SIGTERM as a flag: long loops (the trainer, evaluation fits) check it at a safe point, save,
and exit cleanly instead of dying mid-write. Imports nothing of ours."""

from __future__ import annotations

import contextlib
import logging
import signal
from typing import Any

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 143  # 128 + SIGTERM: what schedulers expect of a process ended by SIGTERM


class PreemptedError(Exception):
    """A loop stopped at a safe point after SIGTERM, its state saved (not a finished run).

    CLIs exit with :data:`EXIT_PREEMPTED` on it so that schedulers requeue the job; a rerun of the
    same command resumes at ``step``.
    """

    def __init__(self, step: int, directory: str):
        self.step = step
        self.directory = directory
        super().__init__(f"preempted at step {step}, saved to {directory}; rerun the same command "
                         "to resume")


class SigtermFlag:
    """Context manager: while active, SIGTERM sets ``requested`` instead of killing the process.

    Only the main thread can install signal handlers; elsewhere (or with ``enabled=False``) it is
    inert and SIGTERM keeps its previous behaviour. The previous handler is restored on exit.
    """

    def __init__(self, message: str = "SIGTERM received: stopping at the next safe point",
                 enabled: bool = True):
        self.message = message
        self.enabled = enabled
        self.requested = False
        self._installed = False
        self._previous: Any = None

    def __enter__(self) -> SigtermFlag:
        if self.enabled:
            with contextlib.suppress(ValueError):  # not the main thread: leave SIGTERM alone
                self._previous = signal.signal(signal.SIGTERM, self._handle)
                self._installed = True
        return self

    def _handle(self, signum, frame) -> None:
        log.warning(self.message)
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._installed:  # None: the previous handler was not set from Python
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
            self._installed = False
