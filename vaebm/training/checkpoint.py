"""Checkpoints that survive crashes and resume exactly, plus the in-memory rollback point.

File format: an 8-byte magic ``VAEBMCK1``, the payload length (8 bytes little-endian), the
SHA-256 of the payload (32 bytes), then the payload: a ``torch.save`` of a dict of tensors and
plain Python values. The header lets :func:`load_checkpoint` tell a truncated file, a corrupt one
and a foreign one apart before unpickling anything; unpickling itself runs with
``weights_only=True`` and an allow-list (:data:`SAFE_GLOBALS`). Files are untrusted: only
regular files are opened (:func:`open_regular`; a FIFO or device is refused by name, never
blocks), the header's payload length must equal the file's size before the payload is read, and
the payload's zip records must be stored uncompressed (as torch.save writes them), so loading
never takes more memory than the file's size. Models rebuilt from a checkpoint's stored config
are sized before they are built (:mod:`vaebm.loading`, :mod:`vaebm.models.nvae.limits`).

Writes are atomic: the bytes go to a temporary file in the same folder, which is flushed and
fsync'ed, the current file (if any) is hard-linked to ``<name>.prev``, then ``os.replace`` puts
the new file in place and the folder is fsync'ed. At every instant ``<name>`` is a complete old
or complete new checkpoint; a crash leaves at worst a stray ``.<name>.tmp-*`` file, removed by
the next save.

What a training checkpoint holds (see :func:`capture_rng` and the trainers): models, optimizer,
grad scaler, replay buffer, the RNG states of torch (CPU and every CUDA device), numpy and
Python's ``random``, the iteration, the config, the history and the trainer's own counters
(lr scale, seed offset, failures). The Langevin chains' noise is Philox keyed by
(seed, iteration, sample), so the config's seed and the iteration restore it.
"""

from __future__ import annotations

import argparse
import copy
import glob
import hashlib
import io
import os
import random
import stat
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._fileio import file_kind, fsync_dir

MAGIC = b"VAEBMCK1"
_HEADER = struct.Struct("<8sQ32s")
SAFE_GLOBALS: list = [argparse.Namespace]  # what NVAE's published checkpoints pickle


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used: missing, truncated, corrupt, foreign or of the wrong
    kind. The message starts with the path."""


class CheckpointFallbackWarning(UserWarning):
    """:func:`load_latest` used ``<name>.prev`` because ``<name>`` was unusable."""


# --------------------------------------------------------------------------- write
_fsync_dir = fsync_dir


def save_checkpoint(obj: dict, path, *, keep_prev: bool = True) -> Path:
    """Atomically write ``obj`` (a dict) to ``path``; the replaced file becomes ``path.prev``."""
    if not isinstance(obj, dict):
        raise TypeError(f"a checkpoint is a dict, got {type(obj).__name__}")
    path = Path(path)
    d = path.parent.resolve()
    d.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getbuffer()
    header = _HEADER.pack(MAGIC, len(payload), hashlib.sha256(payload).digest())
    for stale in glob.glob(str(d / f".{path.name}.tmp-*")):  # left by a killed writer
        try:
            os.unlink(stale)
        except OSError:
            pass
    tmp = d / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        if keep_prev and path.exists():
            prev, prev_tmp = Path(str(path) + ".prev"), d / f".{path.name}.tmp-prev-{os.getpid()}"
            try:
                os.link(path, prev_tmp)  # the old file stays in place while .prev is made
            except OSError:
                import shutil
                shutil.copyfile(path, prev_tmp)
            os.replace(prev_tmp, prev)
            if prev_tmp.exists():  # rename is a no-op when both names already link one file
                prev_tmp.unlink()
        os.replace(tmp, path)
        _fsync_dir(str(d))
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return path


# --------------------------------------------------------------------------- read
_file_kind = file_kind


def open_regular(path) -> tuple[Any, int]:
    """(binary file object, size) of ``path``, which must be a regular file (symlinks to one are
    fine). A FIFO, device, socket or directory raises :class:`CheckpointError` naming the path
    before any read could block: the type is checked with ``os.stat``, the file opened with
    ``O_NONBLOCK`` and checked again with ``fstat`` (so a swap in between is caught too).
    FileNotFoundError when it does not exist."""
    path = os.fspath(path)
    st = os.stat(path)  # FileNotFoundError propagates
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: not a regular file ({_file_kind(st.st_mode)}); "
                              "checkpoints are read from regular files only")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: not a regular file ({_file_kind(st.st_mode)}); "
                              "checkpoints are read from regular files only")
    return os.fdopen(fd, "rb"), st.st_size


def read_payload(path) -> bytes:
    """The verified payload bytes of a checkpoint file (raises :class:`CheckpointError`). The
    header's payload length is compared with the file's size before the payload is read."""
    path = Path(path)
    try:
        f, size = open_regular(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    with f:
        data = f.read(_HEADER.size)
        if len(data) < _HEADER.size or not data.startswith(MAGIC):
            if data[:2] == b"PK" or data[:1] == b"\x80":
                kind = "a plain torch.save file, not a vaebm checkpoint"
            elif not data:
                kind = "an empty file"
            else:
                kind = "not a vaebm checkpoint (unknown format)"
            if len(data) < _HEADER.size and MAGIC.startswith(data[:8]) and data:
                kind = f"truncated: {len(data)} bytes, shorter than the {_HEADER.size}-byte header"
            raise CheckpointError(f"{path}: {kind}")
        _, n, digest = _HEADER.unpack_from(data)
        have = size - _HEADER.size
        if have < n:
            raise CheckpointError(f"{path}: truncated: {have} of {n} payload bytes present "
                                  "(the write was interrupted or the copy is incomplete)")
        if have > n:
            raise CheckpointError(f"{path}: corrupt: {have - n} unexpected trailing bytes")
        payload = f.read(n + 1)  # one more: the file may have grown since fstat
    if len(payload) != n:
        raise CheckpointError(f"{path}: changed while being read ({len(payload)} payload bytes "
                              f"read, the header says {n})")
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{path}: corrupt: SHA-256 of the payload does not match its header")
    return payload


def _check_records(payload: bytes, path) -> None:
    """A payload is a torch.save zip archive whose records are stored, not compressed: a
    compressed record (which torch.load would inflate) could expand a small file to any size.
    Checked from the zip directory alone, before torch.load allocates anything."""
    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: cannot be loaded safely: the payload is not a torch.save "
                              f"zip archive ({e})") from None
    declared = sum(i.file_size for i in infos)
    packed = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED]
    if packed or declared > len(payload):
        raise CheckpointError(f"{path}: cannot be loaded safely: its zip records declare "
                              f"{declared:,} bytes in a {len(payload):,}-byte payload "
                              f"({len(packed)} compressed record(s)); torch.save stores records "
                              "uncompressed, so the file was crafted or corrupted")


def load_checkpoint(path, *, map_location="cpu", kind: str | None = None,
                    safe_globals: tuple = ()) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.
    ``kind`` ("ebm", "vae"), when given, must match the stored one. ``safe_globals`` extends
    :data:`SAFE_GLOBALS` for this call. Only regular files are read; payloads whose zip records
    are compressed (or declare more bytes than the payload holds) are refused unread."""
    payload = read_payload(path)
    _check_records(payload, path)
    allowed = list(SAFE_GLOBALS) + list(safe_globals)
    try:
        with torch.serialization.safe_globals(allowed):
            obj = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as e:  # the hash matched, so this is content we refuse to unpickle
        raise CheckpointError(f"{path}: cannot be loaded safely: {e}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a dict")
    if kind is not None and obj.get("kind") != kind:
        raise CheckpointError(f"{path}: is a {obj.get('kind')!r} checkpoint, expected {kind!r}")
    return obj


def load_latest(path, *, on_fallback=None, **kwargs) -> tuple[dict, Path]:
    """Load ``path``, falling back to ``path.prev`` when ``path`` is unusable. Returns the
    checkpoint and the file it came from; raises with both reasons if neither loads. A fallback
    is never silent: a :class:`CheckpointFallbackWarning` names both files and the reason, and
    ``on_fallback(message)`` (e.g. a run's event log) gets the same message."""
    path = Path(path)
    try:
        return load_checkpoint(path, **kwargs), path
    except CheckpointError as first:
        prev = Path(str(path) + ".prev")
        if not prev.exists():
            raise
        try:
            ck = load_checkpoint(prev, **kwargs)
        except CheckpointError as second:
            raise CheckpointError(f"{first}; and the fallback {second}") from None
        reason = str(first)
        if reason.startswith(f"{path}: "):
            reason = reason[len(f"{path}: "):]
        msg = (f"checkpoint {path} is unusable ({reason}); loaded the previous one, {prev}, "
               "instead")
        warnings.warn(msg, CheckpointFallbackWarning, stacklevel=2)
        if on_fallback is not None:
            on_fallback(msg)
        return ck, prev


# --------------------------------------------------------------------------- RNG
def capture_rng() -> dict:
    """RNG states of torch (CPU + all CUDA devices), numpy and Python ``random`` as tensors and
    plain values (weights_only-loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {"torch": torch.get_rng_state(),
          "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                    "has_gauss": int(has_gauss), "gauss": float(gauss)},
          "python": _py_state_to_plain(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def restore_rng(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    random.setstate(_py_state_from_plain(st["python"]))
    if "cuda" in st and torch.cuda.is_available():
        states = st["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def _py_state_to_plain(s):
    version, internal, gauss = s
    return {"version": version, "internal": list(internal), "gauss": gauss}


def _py_state_from_plain(d):
    return (d["version"], tuple(d["internal"]), d["gauss"])


# --------------------------------------------------------------------------- snapshots
def to_cpu(obj: Any) -> Any:
    """Deep copy with every tensor cloned to the CPU (a rollback point that later in-place
    updates cannot touch)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        t = [to_cpu(v) for v in obj]
        return t if isinstance(obj, list) else tuple(t)
    return copy.deepcopy(obj)


class TrainingDiverged(RuntimeError):
    """Training failed ``max_failures`` times in a row after rolling back."""


class DivergenceGuard:
    """Decides when an iteration has diverged and counts consecutive failures.

    ``check(loss, gap, grad_norm)`` returns a reason string or None. ``ok()`` after a good
    iteration that moved past the rollback point resets the count. ``fail(reason, it)`` counts
    and raises :class:`TrainingDiverged` after ``max_failures`` in a row."""

    def __init__(self, max_gap: float | None, max_grad_norm: float | None, max_failures: int):
        self.max_gap, self.max_grad_norm, self.max_failures = max_gap, max_grad_norm, max_failures
        self.failures = 0

    def check(self, loss: float, gap: float | None = None, grad_norm: float | None = None):
        if not np.isfinite(loss):
            return f"non-finite loss ({loss})"
        if gap is not None and self.max_gap is not None and not abs(gap) <= self.max_gap:
            return f"|E_pos - E_neg| = {abs(gap):.4g} beyond {self.max_gap:g}"
        if grad_norm is not None and self.max_grad_norm is not None \
                and not grad_norm <= self.max_grad_norm:
            return f"gradient norm {grad_norm:.4g} beyond {self.max_grad_norm:g}"
        return None

    def fail(self, reason: str, it: int) -> None:
        self.failures += 1
        if self.failures > self.max_failures:
            raise TrainingDiverged(f"training diverged at iteration {it} ({reason}) "
                                   f"{self.failures} times in a row after rolling back; "
                                   "giving up (lower the lr or check the data and models)")
