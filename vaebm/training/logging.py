"""Training logs: a CSV file (always), TensorBoard (when installed) and a tqdm bar (optional).

``TrainLogger(out_dir)`` writes ``<out_dir>/<name>.csv`` with one row per logged iteration; the
columns are fixed by the first row (later keys that were not there go to TensorBoard only). On
resume, ``start=it`` drops rows of iterations >= it that a killed run had logged after its last
checkpoint, so the file reads as one uninterrupted run. Only rank 0 writes.

TensorBoard (``torch.utils.tensorboard``, pip extra ``vaebm[tensorboard]``) and tqdm
(``vaebm[progress]``) are imported lazily; ``tensorboard=None`` means "if installed",
``True`` means "required" (clear error when missing).
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
                 tensorboard: bool | None = None, progress: bool = False, total: int | None = None,
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
        if enabled and progress:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                raise ImportError("progress=True needs tqdm: pip install 'vaebm[progress]' "
                                  "(or pip install tqdm)") from None
            self.bar = tqdm(total=total, initial=start, desc=name, unit="it", dynamic_ncols=True)

    @staticmethod
    def _tensorboard(logdir, required: bool):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if required:
                raise ImportError("tensorboard=True needs the tensorboard package: pip install "
                                  "'vaebm[tensorboard]' (or pip install tensorboard)") from None
            return None
        return SummaryWriter(str(logdir))

    def _open(self, start: int) -> None:
        if self.path.exists() and self.path.stat().st_size > 0:
            # keep the header and the rows of iterations before `start`
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
            tmp.write_text(buf.getvalue())
            os.replace(tmp, self.path)
            self.fields = header
        self._file = open(self.path, "a", newline="")
        self._writer = csv.writer(self._file)

    def log(self, iteration: int, values: dict) -> None:
        """One row: ``iteration`` then ``values`` (numbers; tensors must be converted first)."""
        if self.bar is not None:
            self.bar.update(iteration + 1 - self.bar.n)
            short = {k: f"{v:.4g}" for k, v in values.items() if isinstance(v, float)}
            self.bar.set_postfix(dict(list(short.items())[:4]), refresh=False)
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
