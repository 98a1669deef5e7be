"""Stopping a long run on SIGINT (Ctrl-C) or SIGTERM (``timeout``, a scheduler, ``kill``)
without losing work: the first signal lets the unit of work under way finish (a training
iteration, a batch of samples), then the command saves its progress and raises
:class:`RunInterrupted` (:class:`TrainingInterrupted` for training); running the same command
again continues from it. A second signal aborts at once, as it would have without this."""

from __future__ import annotations

import signal
import threading

__all__ = ["RunInterrupted", "TrainingInterrupted", "StopOnSignal"]


class RunInterrupted(KeyboardInterrupt):
    """A long command stopped by a signal at a safe point, with its progress saved. (A
    KeyboardInterrupt, so code that lets Ctrl-C through lets this through too; the CLI prints
    the message and exits with :attr:`exit_status`.)"""

    def __init__(self, signame: str, message: str):
        self.signame = signame
        super().__init__(message)

    @property
    def exit_status(self) -> int:
        """128 + the signal number, the shell's convention for a run ended by a signal."""
        try:
            return 128 + int(signal.Signals[self.signame])
        except KeyError:
            return 130


class TrainingInterrupted(RunInterrupted):
    """A training run stopped by a signal after a completed iteration, its checkpoint saved."""

    def __init__(self, signame: str, iteration: int, path):
        self.iteration, self.path = int(iteration), path
        where = f"checkpoint saved to {path}" if path is not None else "no checkpoint (no out_dir)"
        super().__init__(signame, f"stopped by {signame} after {self.iteration} iterations; "
                                  f"{where}; run the same command to resume")


class StopOnSignal:
    """Context manager: while active, SIGINT / SIGTERM only set ``signum`` (the training loop
    checks it between iterations); a second one restores the previous handlers and re-raises
    the signal. Outside the main thread (where handlers cannot be installed) it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._prev: dict = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a signal"

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                try:
                    self._prev[s] = signal.signal(s, self._handle)
                except (ValueError, OSError):  # e.g. an embedded interpreter
                    pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # the second signal: what it would have done without us
            self._restore()
            signal.raise_signal(signum)
            return
        self.signum = signum
        print(f"vaebm: {signal.Signals(signum).name}: stopping at the next safe point and saving "
              "(send it again to abort at once)", flush=True)

    def _restore(self) -> None:
        for s, h in self._prev.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._prev = {}

    def __exit__(self, *exc) -> None:
        self._restore()
