"""Image grids as PNG files, with no dependency beyond numpy (zlib + struct write the PNG).

``make_grid(images)``: (N, C, H, W) in [0, 1] -> (H', W', C) uint8 tiled grid.
``save_png(array, path)``: writes an (H, W) or (H, W, C) uint8 array, C in {1, 3, 4}.
``save_grid(images, path)``: both. The write is atomic (temporary file + rename), so an
interrupted run never leaves a half-written image behind.
"""

from __future__ import annotations

import math
import os
import struct
import tempfile
import zlib

import numpy as np


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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
