"""Progress and verbosity of long jobs, one switch for the whole library.

Quiet when ``VAEBM_QUIET`` is set (to anything but ``""`` or ``"0"``) or after
``set_verbosity(0)`` (what ``vaebm --quiet`` does); ``set_verbosity(None)`` goes back to the
environment's setting. Quiet silences :func:`say` (kernel builds, ...) and every
:class:`Progress` left at its default; results are never silenced.

:class:`Progress` shows a tqdm bar when tqdm is installed and stderr is a terminal; otherwise
one plain line to stderr every ``interval`` seconds (``VAEBM_PROGRESS_INTERVAL``, default 10;
0 prints at every update), for example::

    vaebm ebm training: 120/1000 it (12%), 2.31 it/s, ETA 6m21s, loss 1.234

A job shorter than the interval prints nothing; one that printed ends with a summary line.
tqdm is never required.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Callable, Iterable

__all__ = ["Progress", "progress_iter", "quiet", "say", "set_verbosity", "verbosity"]

QUIET_ENV = "VAEBM_QUIET"
INTERVAL_ENV = "VAEBM_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 10.0
_level: int | None = None  # None: from the environment


def set_verbosity(level: int | None) -> int | None:
    """0: quiet, 1 (or more): progress and messages, None: from ``$VAEBM_QUIET``. Returns the
    previous setting (to restore it)."""
    global _level
    prev = _level
    _level = None if level is None else int(level)
    return prev


def verbosity() -> int:
    if _level is not None:
        return _level
    return 0 if os.environ.get(QUIET_ENV, "") not in ("", "0") else 1


def quiet() -> bool:
    return verbosity() <= 0


def say(message: str) -> None:
    """One line to stderr unless quiet (``vaebm: `` is not added)."""
    if not quiet():
        print(message, file=sys.stderr, flush=True)


def interval(default: float = DEFAULT_INTERVAL) -> float:
    """Seconds between plain progress lines: ``$VAEBM_PROGRESS_INTERVAL`` or ``default``."""
    v = os.environ.get(INTERVAL_ENV, "")
    try:
        s = float(v) if v else default
    except ValueError:
        return default
    return s if math.isfinite(s) and s >= 0 else default


def format_duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _fmt_value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _fmt_rate(r: float) -> str:
    return f"{r:.0f}" if r >= 100 else f"{r:.3g}"


def _tqdm_class(stream):
    try:
        isatty = stream.isatty()
    except (AttributeError, ValueError):
        return None
    if not isatty:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm


class Progress:
    """Progress of a loop of ``total`` units (None: unknown).

    enabled: None (default) shows it unless quiet. write: a callable taking each plain line
    instead of stderr (never a bar then). prefix: put before ``desc`` in plain lines.
    final: print the summary line at :meth:`close` even if nothing was printed before."""

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "it", *,
                 initial: int = 0, enabled: bool | None = None, interval_s: float | None = None,
                 write: Callable[[str], None] | None = None, prefix: str = "vaebm ",
                 final: bool = False):
        self.total = None if total is None else int(total)
        self.desc, self.unit, self.prefix = desc, unit, prefix
        self.enabled = (not quiet()) if enabled is None else bool(enabled)
        self.interval = interval() if interval_s is None else float(interval_s)
        self.n = self._n0 = int(initial)
        self.info: dict = {}
        self._write = write
        self._final = final
        self._printed = False
        self._closed = False
        self.t0 = self._last = time.monotonic()
        self.bar = None
        if self.enabled and write is None:
            tqdm = _tqdm_class(sys.stderr)
            if tqdm is not None:
                kw = dict(total=self.total, initial=self.n, desc=desc, unit=unit,
                          dynamic_ncols=True, file=sys.stderr)
                try:  # delay: no bar at all for loops shorter than 2 s (tqdm >= 4.60)
                    self.bar = tqdm(**kw, delay=2.0)
                except TypeError:
                    self.bar = tqdm(**kw)

    # -- updates ----------------------------------------------------------------------------
    def update(self, n: int = 1, **info) -> None:
        """``n`` more units done; ``info`` (name=value) is shown after the counts."""
        self.moveto(self.n + n, **info)

    def moveto(self, n: int, **info) -> None:
        """``n`` units done in all."""
        if not self.enabled:
            return
        n = int(n)
        if info:
            self.info.update(info)
        if self.bar is not None:
            self.bar.update(n - self.bar.n)
            if info:
                self.bar.set_postfix({k: _fmt_value(v) for k, v in self.info.items()},
                                     refresh=False)
            self.n = n
            return
        self.n = n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._emit(self.line(now))

    def line(self, now: float | None = None, done: bool = False) -> str:
        now = time.monotonic() if now is None else now
        elapsed = max(now - self.t0, 1e-9)
        k = self.n - self._n0
        rate = k / elapsed
        head = f"{self.prefix}{self.desc}: " if self.desc else self.prefix
        count = f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"
        if self.total and not done:
            count += f" ({100 * self.n / self.total:.0f}%)"
        if done:
            count += f" in {format_duration(elapsed)}"
        parts = [count]
        if k > 0:
            parts.append(f"{_fmt_rate(rate)} {self.unit}/s" if rate >= 1 else
                         f"{_fmt_rate(1 / rate)} s/{self.unit}")
        if not done and self.total and k > 0:
            parts.append(f"ETA {format_duration(max(self.total - self.n, 0) / rate)}")
        elif not done:
            parts.append(f"{format_duration(elapsed)} elapsed")
        parts += [f"{name} {_fmt_value(v)}" for name, v in self.info.items()]
        return head + ", ".join(parts)

    def _emit(self, text: str) -> None:
        self._printed = True
        if self._write is not None:
            self._write(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def write(self, message: str) -> None:
        """A one-off line (an event) that does not break the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        elif self._write is not None:
            self._write(message)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self._printed or self._final:
            self._emit(self.line(done=True))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress_iter(iterable: Iterable, total: int | None = None, desc: str = "",
                  unit: str = "it", *, enabled: bool | None = None, count=None):
    """Yield the items of ``iterable`` with a :class:`Progress`; ``count(item)`` is how many
    units an item is (default 1, e.g. ``len`` for batches)."""
    p = Progress(total, desc, unit, enabled=enabled)
    try:
        for item in iterable:
            yield item
            p.update(count(item) if count is not None else 1)
    finally:
        p.close()
