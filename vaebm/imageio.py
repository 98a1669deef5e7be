"""Image grids as PNG files, with no dependency beyond numpy (zlib + struct write the PNG).

``make_grid(images)``: (N, C, H, W) in [0, 1] -> (H', W', C) uint8 tiled grid.
``save_png(array, path)``: writes an (H, W) or (H, W, C) uint8 array, C in {1, 3, 4}.
``save_grid(images, path)``: both. The write is atomic (temporary file + rename), so an
interrupted run never leaves a half-written image behind; a new file gets the permissions an
ordinary ``open(path, "wb")`` would give it (0o666 less the umask), not a temporary file's 0600.
``AtomicFiles``: several files written all or nothing (every one staged in a temporary file
first, then all renamed into place), for outputs that belong together.
"""

from __future__ import annotations

import errno
import math
import os
import secrets
import struct
import zlib

import numpy as np

from ._fileio import fsync_dir


def make_grid(images, nrow: int | None = None, padding: int = 2, pad_value: float = 1.0) -> np.ndarray:
    """Tile ``images`` (N, C, H, W) with values in [0, 1] (torch tensor or numpy array) into one
    (rows*(H+p)+p, nrow*(W+p)+p, C) uint8 image; ``nrow`` defaults to ceil(sqrt(N))."""
    a = images.detach().float().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4 or a.shape[1] not in (1, 3, 4):
        raise ValueError(f"images must be (N, C, H, W) with C in 1, 3, 4; got shape {a.shape}")
    if a.shape[0] == 0:
        raise ValueError("images is empty")
    if not np.isfinite(a).all():
        raise ValueError("images contain NaN or Inf values")
    n, c, h, w = a.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / nrow))
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c),
                   pad_value, dtype=np.float32)
    for i in range(n):
        r, q = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        grid[y:y + h, x:x + w] = a[i].transpose(1, 2, 0)
    return np.round(np.clip(grid, 0.0, 1.0) * 255).astype(np.uint8)


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_bytes(img: np.ndarray) -> bytes:
    """PNG encoding of an (H, W) or (H, W, C) uint8 array (C = 1 grey, 3 RGB, 4 RGBA)."""
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 array, got {img.dtype}")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected (H, W) or (H, W, C) with C in 1, 3, 4; got {img.shape}")
    h, w, c = img.shape
    colour = {1: 0, 3: 2, 4: 6}[c]
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))  # filter type 0 per row
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b""))


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


_fsync_dir = fsync_dir


def _new_temp(path: str, tag: str = "tmp") -> tuple[int, str]:
    """(fd, name) of a new, uniquely named file ``.<name>.<tag>-<pid>-<random>`` beside ``path``
    (same folder, so a rename into place is atomic). Created with ``os.open(..., 0o666)`` like
    ``open(path, "wb")`` creates a file, so the umask decides its permissions (``mkstemp``'s
    0600 would make every image private to its writer)."""
    d, base = os.path.split(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    flags = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
             | getattr(os, "O_CLOEXEC", 0))
    for _ in range(100):
        tmp = os.path.join(d, f".{base}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", os.path.join(d, base))


def _link_backup(path: str) -> str | None:
    """A hard link ``.<name>.old-<pid>-<random>`` to the existing ``path`` (no data copied), or
    None where the file system has no hard links."""
    d, base = os.path.split(os.path.abspath(path))
    for _ in range(100):
        b = os.path.join(d, f".{base}.old-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.link(path, b)
            return b
        except FileExistsError:
            continue
        except OSError:
            return None
    return None


def _write_temp(path: str, write) -> str:
    """Stage ``write(f)`` (``f`` a binary file object) in a new temporary file beside ``path``,
    flushed and fsync'ed; returns its name. On any failure the temporary file is removed."""
    fd, tmp = _new_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _unlink_quiet(tmp)
        raise
    return tmp


def atomic_write(path: str | os.PathLike, write) -> None:
    """Write a file through ``write(f)`` (``f`` a binary file object) atomically: to a temporary
    file in the same folder, then renamed over ``path``. A failed write (full disk, ...) leaves
    ``path`` as it was and no temporary file behind."""
    path = os.fspath(path)
    tmp = _write_temp(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quiet(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    atomic_write(path, lambda f: f.write(data))


class AtomicFiles:
    """Several files written all or nothing.

    ``write(path, fn)`` / ``write_bytes(path, data)`` stage each file in a temporary file beside
    its target (flushed and fsync'ed); nothing is visible yet. ``commit()`` renames every staged
    file into place, then deletes the files given to ``remove(path)`` (stale outputs of an
    earlier run). Until ``commit`` the old files stay as they were; if a write fails, or the
    ``with`` block raises, every temporary file is removed and no target is touched. Should a
    rename fail during ``commit`` (no space is needed for a rename in one folder, so this is
    rare), the files already replaced are put back from hard-linked copies of the old ones.
    With ``overwrite=False`` an existing target is never replaced: ``commit`` raises
    :class:`FileExistsError` (checked atomically through a hard link where the file system has
    them) and places nothing.

    Used as a context manager it commits when the block ends normally and discards otherwise.
    """

    def __init__(self, *, overwrite: bool = True):
        self.overwrite = overwrite
        self._staged: list[tuple[str, str]] = []
        self._remove: list[str] = []

    def write(self, path, write) -> None:
        path = os.fspath(path)
        if any(p == path for p, _ in self._staged):
            raise ValueError(f"{path}: staged twice")
        self._staged.append((path, _write_temp(path, write)))

    def write_bytes(self, path, data: bytes) -> None:
        self.write(path, lambda f: f.write(data))

    def remove(self, path) -> None:
        """Delete ``path`` (if it exists) at commit."""
        self._remove.append(os.fspath(path))

    @property
    def paths(self) -> list[str]:
        return [p for p, _ in self._staged]

    def discard(self) -> None:
        for _, tmp in self._staged:
            _unlink_quiet(tmp)
        self._staged, self._remove = [], []

    def _place(self, tmp: str, path: str) -> None:
        if self.overwrite:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)  # fails if path exists: never replaces a file made meanwhile
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, "already exists", path) from None
        except OSError:  # no hard links here: check, then rename
            if os.path.lexists(path):
                raise FileExistsError(errno.EEXIST, "already exists", path) from None
            os.replace(tmp, path)
            return
        os.unlink(tmp)

    def commit(self) -> list[str]:
        """Put every staged file in place (all or none); returns their paths."""
        if not self.overwrite:
            for path, _ in self._staged:
                if os.path.lexists(path):
                    self.discard()
                    raise FileExistsError(errno.EEXIST, "already exists", path)
        placed, backups = [], {}
        try:
            for path, tmp in self._staged:
                if os.path.lexists(path):
                    b = _link_backup(path)
                    if b is not None:
                        backups[path] = b
                self._place(tmp, path)
                placed.append(path)
        except BaseException:
            for path in reversed(placed):
                try:
                    if path in backups:
                        os.replace(backups.pop(path), path)
                    else:
                        os.unlink(path)
                except OSError:
                    pass
            for b in backups.values():
                _unlink_quiet(b)
            self.discard()
            raise
        for b in backups.values():
            _unlink_quiet(b)
        for path in self._remove:
            if path not in placed:
                _unlink_quiet(path)
        for d in sorted({os.path.dirname(os.path.abspath(p)) for p in placed + self._remove}):
            _fsync_dir(d)
        self._staged, self._remove = [], []
        return placed

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.discard()
        return False


def save_png(img: np.ndarray, path) -> None:
    atomic_write_bytes(path, png_bytes(img))


def save_grid(images, path, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile (N, C, H, W) images in [0, 1] and write them to ``path`` as PNG; returns the grid."""
    grid = make_grid(images, nrow=nrow, padding=padding)
    save_png(grid, path)
    return grid


def read_png(path) -> np.ndarray:
    """Decode a PNG written by :func:`save_png` (8-bit, filter 0, non-interlaced) - for tests and
    for reading back grids without Pillow."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path}: not a PNG file")
    pos, idat, hdr = 8, b"", None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        pos += 12 + n
        if tag == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", body)
        elif tag == b"IDAT":
            idat += body
    if hdr is None:
        raise ValueError(f"{path}: PNG without IHDR")
    w, h, depth, colour = hdr[0], hdr[1], hdr[2], hdr[3]
    c = {0: 1, 2: 3, 6: 4}.get(colour)
    if depth != 8 or c is None:
        raise ValueError(f"{path}: only 8-bit grey/RGB/RGBA PNGs are supported")
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(h, 1 + w * c)
    if raw[:, 0].any():
        raise ValueError(f"{path}: PNG row filters other than 0 are not supported")
    return raw[:, 1:].reshape(h, w, c)
