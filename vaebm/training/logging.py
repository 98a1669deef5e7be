"""Training logs: a CSV file (always), TensorBoard (when installed) and progress (on by default).

``TrainLogger(out_dir)`` writes ``<out_dir>/<name>.csv`` with one row per logged iteration; the
columns are fixed by the first row (later keys that were not there go to TensorBoard only). On
resume, ``start=it`` drops rows of iterations >= it that a killed run had logged after its last
checkpoint, so the file reads as one uninterrupted run; :meth:`TrainLogger.rewind` does the same
in a running process (a divergence rollback runs those iterations again). Only rank 0 writes.

TensorBoard (``torch.utils.tensorboard``, pip extra ``vaebm[train]``) is imported lazily;
``tensorboard=None`` means "if installed", ``True`` means "required" (clear error when missing).
Progress (:class:`vaebm._progress.Progress`): ``progress=None`` means "unless vaebm is quiet"
(``VAEBM_QUIET=1``, ``vaebm --quiet``); a tqdm bar when tqdm is installed (``vaebm[train]``)
and stderr is a terminal, else a plain line on stderr every few seconds (iteration, rate, ETA,
loss). tqdm is never required.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path


def _fmt(v):
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return v


class TrainLogger:
    def __init__(self, out_dir=None, name: str = "train", *, start: int = 0,
                 tensorboard: bool | None = None, progress: bool | None = None,
                 total: int | None = None,
                 enabled: bool = True):
        self.enabled = enabled and out_dir is not None
        self.path = Path(out_dir) / f"{name}.csv" if out_dir is not None else None
        self.fields: list[str] | None = None
        self._file = None
        self.tb = None
        self.bar = None
        if enabled and out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            self._open(start)
            if tensorboard is not False:
                self.tb = self._tensorboard(Path(out_dir) / "tb", required=bool(tensorboard))
        if enabled and progress is not False:
            from .._progress import Progress

            self.bar = Progress(total, f"{name} training", "it", initial=start,
                                enabled=None if progress is None else True)

    @staticmethod
    def _tensorboard(logdir, required: bool):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if required:
                raise ImportError("tensorboard=True needs the tensorboard package: pip install "
                                  "'vaebm[train]' (or pip install tensorboard)") from None
            return None
        return SummaryWriter(str(logdir))

    def _open(self, start: int) -> None:
        self._truncate(start)
        self._file = open(self.path, "a", newline="")
        self._writer = csv.writer(self._file)

    def _truncate(self, start: int) -> None:
        """Atomically rewrite the CSV with its header and the rows of iterations < ``start``."""
        if not (self.path.exists() and self.path.stat().st_size > 0):
            return
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        header, body = rows[0], rows[1:]
        if "iteration" in header:
            k = header.index("iteration")
            body = [r for r in body if len(r) == len(header) and r[k].lstrip("-").isdigit()
                    and int(r[k]) < start]
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(header)
        w.writerows(body)
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.fields = header

    def rewind(self, start: int) -> None:
        """Drop the rows of iterations >= ``start`` (they will be logged again: a divergence
        rollback to iteration ``start``); the file is replaced atomically and appended to."""
        if self.bar is not None:
            self.bar.moveto(start)
        if not self.enabled:
            return
        if self._file is not None:
            self._file.close()
            self._file = None
        self._open(start)

    def log(self, iteration: int, values: dict) -> None:
        """One row: ``iteration`` then ``values`` (numbers; tensors must be converted first)."""
        if self.bar is not None:  # the loss first, then up to three other numbers
            short = {k: v for k, v in values.items() if isinstance(v, float)}
            keys = (["loss"] if "loss" in short else []) + [k for k in short if k != "loss"]
            self.bar.moveto(iteration + 1, **{k: short[k] for k in keys[:4]})
        if not self.enabled:
            return
        row = {"iteration": iteration, **values}
        if self.fields is None:
            self.fields = list(row)
            self._writer.writerow(self.fields)
        self._writer.writerow([_fmt(row.get(k, "")) for k in self.fields])
        self._file.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, iteration)

    def event(self, iteration: int, message: str) -> None:
        """A one-off event (rollback, checkpoint, error) to ``events.log`` and the bar."""
        if self.bar is not None:
            self.bar.write(f"[it {iteration}] {message}")
        if self.enabled:
            with open(self.path.parent / "events.log", "a") as f:
                f.write(f"{iteration}\t{message}\n")
            if self.tb is not None:
                self.tb.add_text("events", message, iteration)

    def image(self, tag: str, grid, iteration: int) -> None:
        """A (H, W, C) uint8 grid to TensorBoard (PNG files are written by the trainers)."""
        if self.tb is not None:
            self.tb.add_image(tag, grid, iteration, dataformats="HWC")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
