"""CIFAR-10 from the "python version" pickle batches (data_batch_1..5, test_batch).

Each batch is a pickled dict with ``data``: uint8 (10000, 3072), each row the 1024 red, then
1024 green, then 1024 blue pixels of a 32x32 image in row-major order, and ``labels``: 10000
ints in 0..9. The batches were written by Python 2, so keys may be bytes or str.

The pickles are read with a restricted unpickler that only rebuilds numpy arrays, dtypes and
byte strings: a file named like a CIFAR batch cannot run code when loaded.

``root`` may be the ``cifar-10-batches-py`` folder, a folder holding it, or the
``cifar-10-python.tar.gz`` archive itself. Only regular files are read, and a batch file (or
archive member, by its declared size) over :data:`BATCH_MAX_BYTES` (64 MiB; a real batch is
~31 MB) is refused before it is read.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np

from ._base import (DataFormatError, ImageArrayDataset, check_labels, default_roots,
                    normalize_split, open_tar, read_bytes, read_tar_member, tar_members,
                    to_uint8)

FOLDER = "cifar-10-batches-py"
ARCHIVE = "cifar-10-python.tar.gz"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
# a batch of 10,000 images pickles to ~31 MB; larger declared sizes are refused before reading
BATCH_MAX_BYTES = 64 << 20
_WHAT = "a CIFAR-10 batch file"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")

# (module, name) pairs a CIFAR batch may reference; numpy 2 renamed numpy.core to numpy._core
_ALLOWED = {
    ("_codecs", "encode"), ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, f, path):
        super().__init__(f, encoding="latin1")
        self._path = path

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise DataFormatError(self._path, f"not a CIFAR-10 batch: the pickle references "
                                              f"{module}.{name}, which is not allowed")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module[len("numpy.core"):]
        return super().find_class(module, name)


def load_batch(raw: bytes, path) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> images uint8 (N, 3, 32, 32), labels int64 (N,)."""
    try:
        obj = _SafeUnpickler(io.BytesIO(raw), path).load()
    except DataFormatError:
        raise
    except (pickle.UnpicklingError, EOFError) as e:
        raise DataFormatError(path, f"truncated or not a pickle ({e or type(e).__name__})") from e
    except Exception as e:  # malformed opcodes surface as many types (ValueError, KeyError, ...)
        raise DataFormatError(path, f"corrupt pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DataFormatError(path, f"expected a pickled dict, got {type(obj).__name__}")
    d = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    for key in ("data", "labels"):
        if key not in d:
            raise DataFormatError(path, f"missing the {key!r} entry (keys: {sorted(map(str, d))})")
    data = np.asarray(d["data"])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataFormatError(path, f"'data' must have shape (N, 3072), got {data.shape}")
    images = to_uint8(data, path).reshape(-1, 3, 32, 32)
    try:
        labels = np.asarray(d["labels"])
    except Exception as e:  # ragged lists and the like
        raise DataFormatError(path, f"'labels' is not a list of ints ({e})") from e
    labels = check_labels(labels, len(images), path, num_classes=10)
    return images, labels


def _locate(root) -> Path:
    """The batch folder or the tar archive that ``root`` points at."""
    candidates = []
    if root is None:
        for r in default_roots("cifar10", "cifar-10", FOLDER):
            candidates += [r / FOLDER, r, r / ARCHIVE]
        if not candidates:
            raise FileNotFoundError(
                "CIFAR-10 location unknown: pass root= (the cifar-10-batches-py folder, a folder "
                "holding it, or cifar-10-python.tar.gz) or set VAEBM_DATA_DIR")
    else:
        r = Path(root).expanduser()
        candidates = [r / FOLDER, r, r / ARCHIVE]
    for c in candidates:
        if c.is_file() and c.name.endswith((".tar.gz", ".tgz", ".tar")):
            return c
        if c.is_dir() and ((c / "test_batch").exists() or (c / "data_batch_1").exists()):
            return c
    raise FileNotFoundError(
        "no CIFAR-10 python batches (data_batch_1..5, test_batch) found; looked in "
        + ", ".join(str(c) for c in candidates)
        + ". Get them from https://www.cs.toronto.edu/~kriz/cifar.html (CIFAR-10 python version)")


def _read_members(loc: Path, names) -> list[tuple[bytes, str]]:
    if loc.is_dir():
        missing = [n for n in names if not (loc / n).exists()]
        if missing:
            raise FileNotFoundError(f"{loc}: missing CIFAR-10 batch file(s) {', '.join(missing)}")
        return [(read_bytes(loc / n, BATCH_MAX_BYTES, _WHAT), str(loc / n)) for n in names]
    try:
        with open_tar(loc) as tar:
            members = {Path(m.name).name: m for m in tar_members(tar, loc) if m.isfile()}
            missing = [n for n in names if n not in members]
            if missing:
                raise FileNotFoundError(f"{loc}: archive lacks CIFAR-10 batch(es) "
                                        f"{', '.join(missing)}")
            return [(read_tar_member(tar, members[n], loc, BATCH_MAX_BYTES, _WHAT),
                     f"{loc}:{members[n].name}") for n in names]
    except (tarfile.TarError, EOFError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DataFormatError(loc, f"unreadable tar archive ({e})") from e


def load_cifar10_arrays(root=None, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 as numpy: images uint8 (N, 3, 32, 32), labels int64 (N,); N = 50000 for
    'train' (batches 1..5 in order), 10000 for 'test'."""
    images, labels, _ = _load(root, split)
    return images, labels


def _load(root, split):
    split = normalize_split(split)
    loc = _locate(root)
    names = TRAIN_BATCHES if split == "train" else TEST_BATCHES
    parts = [load_batch(raw, p) for raw, p in _read_members(loc, names)]
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), loc)


class CIFAR10(ImageArrayDataset):
    """CIFAR-10: items (x (3, 32, 32) float32 in [0, 1], label in 0..9).

    root: see the module docstring; None looks under $VAEBM_DATA_DIR.
    split: 'train' (50,000) or 'test' (10,000; 'valid' is an alias, as in NVAE).
    Other keywords (pad, random_flip, binarize) go to :class:`ImageArrayDataset`.
    """

    classes = CLASSES

    def __init__(self, root=None, split: str = "train", **kw):
        images, labels, loc = _load(root, split)
        super().__init__(images, labels, source=os.fspath(loc), num_classes=10, **kw)
        self.split = normalize_split(split)
