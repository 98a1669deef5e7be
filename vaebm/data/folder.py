"""Folders of image files (CelebA, CelebA HQ, LSUN Church exported as images), decoded with PIL.

Preprocessing follows NVAE / VAEBM's evaluation transforms, which torchvision expresses as
``Resize(r)`` (shorter side to r, bilinear with PIL's antialiasing) then ``CenterCrop(r)``:

- ``crop="center"``: shorter side to ``resolution``, then a centred square (LSUN Church 64,
  CelebA HQ 256 whose images are square already). The crop offset is
  ``round((size - resolution) / 2)``, as torchvision's CenterCrop.
- ``crop="celeba"``: NVAE's CelebA 64 crop: the 148x148 box (left 15, top 40, right 163,
  bottom 188) of the 178x218 aligned CelebA images (5 pixels below the vertical centre), then
  resize to ``resolution``.
- ``crop=None``: resize the whole image to ``resolution`` x ``resolution`` (aspect not kept).
With ``resolution=None`` images are used as they are and must all share one size.

Splits: CelebA's ``list_eval_partition.txt`` (0 train, 1 valid, 2 test) is honoured when it
lies in root (images in root or root/img_align_celeba), or beside root when root is
``img_align_celeba``; otherwise a sub-folder named after the split (train, valid / val /
validation, test) is used; otherwise 'train' (or 'all') means every image under root.
Training augmentations (random crops, flips) are not applied unless ``random_flip=True``.

Only regular files are read (a FIFO named ``*.png`` would block the reader forever). Decision:
entries of a folder listing that are not regular files (FIFO, socket, device, dangling link)
are *skipped* with one :class:`NonRegularFileWarning` naming them, since a folder data set is
"every image under root"; a file named explicitly (CelebA's partition list) or turned into a
non-regular file after listing raises :class:`DataFormatError` naming it. Files are opened with
``O_NONBLOCK`` and checked with ``fstat``, so neither case can block. An image whose header
declares more than :data:`MAX_IMAGE_PIXELS` pixels is refused before it is decoded.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ._base import DataFormatError, default_roots, is_regular_file, open_regular

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm",
                    ".pgm")
MAX_IMAGE_PIXELS = 1 << 26  # 64 Mpixel (8192 x 8192); CelebA HQ is 1 Mpixel
CELEBA_SIZE = (178, 218)               # (width, height) of img_align_celeba
CELEBA64_BOX = (15, 40, 178 - 15, 218 - 30)  # (left, top, right, bottom): 148 x 148
CROPS = ("center", "celeba", None)
_SPLIT_DIRS = {"train": ("train",), "valid": ("valid", "val", "validation"), "test": ("test",)}
_CELEBA_PARTITION = {"train": "0", "valid": "1", "test": "2"}


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("image folders need Pillow: pip install pillow") from e
    return Image


class NonRegularFileWarning(UserWarning):
    """An image folder holds entries named like images that are not regular files (FIFOs,
    sockets, devices, dangling links); they were skipped."""


def list_images(root, extensions=IMAGE_EXTENSIONS) -> list[Path]:
    """Image files under ``root`` (recursively, hidden files skipped), sorted by path. Only
    regular files (or symlinks to one) count: other entries with an image extension (a FIFO,
    which would block the reader, a socket, a device, a dangling link) are skipped with one
    :class:`NonRegularFileWarning` naming them."""
    root = Path(root)
    out, skipped = [], []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        for f in files:
            if f.startswith(".") or not f.lower().endswith(tuple(extensions)):
                continue
            p = Path(d) / f
            (out if is_regular_file(p) else skipped).append(p)
    if skipped:
        skipped.sort()
        shown = ", ".join(str(p) for p in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        warnings.warn(f"{root}: skipped {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} "
                      f"named like images that are not regular files (FIFO, socket, device or "
                      f"dangling link): {shown}", NonRegularFileWarning, stacklevel=2)
    return sorted(out)


def _celeba_partition(root: Path):
    """CelebA's partition file in root, or beside root when root is img_align_celeba itself."""
    for d in (root, root.parent) if root.name == "img_align_celeba" else (root,):
        f = d / "list_eval_partition.txt"
        if f.is_file():
            return f
    return None


def _split_files(root: Path, split: str, extensions) -> list[Path]:
    s = split.lower()
    s = {"val": "valid", "validation": "valid"}.get(s, s)
    if s not in ("train", "valid", "test", "all"):
        raise ValueError(f"unknown split {split!r}; expected train, valid, test or all")
    part = _celeba_partition(root)
    if part is not None and s != "all":
        img_dir = root / "img_align_celeba" if (root / "img_align_celeba").is_dir() else root
        want = _CELEBA_PARTITION[s]
        names = []
        for n, line in enumerate(part.read_text().splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise DataFormatError(part, f"line {n}: expected '<file> <0|1|2>', got {line!r}")
            if fields[1] == want:
                names.append(img_dir / fields[0])
        missing = [p for p in names if not p.exists()]
        if missing:
            raise FileNotFoundError(f"{part} lists {len(missing)} image(s) missing from "
                                    f"{img_dir}, e.g. {missing[0]}")
        return names
    if s != "all":
        for name in _SPLIT_DIRS[s]:
            if (root / name).is_dir():
                return list_images(root / name, extensions)
    if s in ("train", "all"):
        return list_images(root, extensions)
    raise FileNotFoundError(f"{root}: no {split!r} split (no list_eval_partition.txt and no "
                            f"sub-folder named {' / '.join(_SPLIT_DIRS[s])})")


def _resize(im, size):
    return im if im.size == size else im.resize(size, _pil().BILINEAR)


def preprocess(im, resolution: int | None, crop: str | None, path=None):
    """Apply the resize/crop rules of the module docstring to a PIL image."""
    w, h = im.size
    if crop == "celeba":
        if (w, h) != CELEBA_SIZE:
            raise DataFormatError(path, f"the CelebA 64 crop expects the 178x218 aligned CelebA "
                                        f"images, got {w}x{h}; use get_dataset('folder', "
                                        f"resolution=..., crop='center') for other images")
        im = im.crop(CELEBA64_BOX)
        return im if resolution is None else _resize(im, (resolution, resolution))
    if resolution is None:
        return im
    if crop is None:
        return _resize(im, (resolution, resolution))
    # torchvision Resize(int): the shorter side becomes `resolution`, the longer is truncated
    if w <= h:
        im = _resize(im, (resolution, int(resolution * h / w)))
    else:
        im = _resize(im, (int(resolution * w / h), resolution))
    w, h = im.size
    left, top = int(round((w - resolution) / 2.0)), int(round((h - resolution) / 2.0))
    return im.crop((left, top, left + resolution, top + resolution))


class ImageFolder(Dataset):
    """Every image file under ``root``: items (x (C, R, R) float32 in [0, 1], 0).

    root: folder of images (searched recursively); None uses $VAEBM_DATA_DIR/<name>.
    resolution: output side R (None: keep the files' size, which must then be equal).
    crop: 'center', 'celeba' or None (module docstring).
    split: 'train', 'valid', 'test' or 'all' (module docstring).
    channels: 3 (RGB) or 1 (grey).
    in_memory: decode everything once at construction into a uint8 tensor (N, C, R, R), using
               ``workers`` threads; otherwise files are decoded on each access.
    random_flip: horizontal flip with probability 1/2 (torch's global RNG).
    """

    def __init__(self, root=None, resolution: int | None = None, crop: str | None = "center", *,
                 split: str = "train", channels: int = 3, in_memory: bool = False,
                 random_flip: bool = False, extensions=IMAGE_EXTENSIONS,
                 workers: int | None = None, name: str = "images"):
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if resolution is not None and int(resolution) <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        if root is None:
            cands = default_roots(name)[:1]
            if not cands or not cands[0].is_dir():
                raise FileNotFoundError(f"no folder for {name!r}: pass root= (a folder of image "
                                        f"files) or set VAEBM_DATA_DIR to a folder holding "
                                        f"{name}/")
            root = cands[0]
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: image folder not found")
        self.files = _split_files(self.root, split, extensions)
        if not self.files:
            raise FileNotFoundError(f"{self.root}: no image files ({', '.join(extensions)}) for "
                                    f"split {split!r}")
        self.resolution = None if resolution is None else int(resolution)
        self.crop, self.split, self.channels = crop, split, channels
        self.random_flip = bool(random_flip)
        self._size = None  # (H, W) fixed by the first decoded image when resolution is None
        self.data = None
        if in_memory:
            self.data = self._decode_all(workers)

    def __len__(self) -> int:
        return len(self.files)

    def load_uint8(self, i: int) -> torch.Tensor:
        """Image ``i`` decoded and preprocessed: uint8 (C, R, R)."""
        path = self.files[i]
        Image = _pil()
        f, _ = open_regular(path)  # never blocks: a FIFO or device is refused by name
        try:
            with f, Image.open(f) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:  # checked from the header, before decoding
                    raise DataFormatError(path, f"the image declares {w}x{h} = {w * h:,} pixels, "
                                                f"over the limit of {MAX_IMAGE_PIXELS:,}")
                im.load()  # decode now, so truncated files fail here with their name
                im = im.convert("RGB" if self.channels == 3 else "L")
        except (FileNotFoundError, DataFormatError):
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            # UnidentifiedImageError is an OSError
            raise DataFormatError(path, f"cannot read or decode the image ({e})") from e
        im = preprocess(im, self.resolution, self.crop, path)
        a = np.array(im, dtype=np.uint8)  # a writable copy
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        if self._size is None:
            self._size = a.shape[1:]
        elif a.shape[1:] != self._size:
            raise DataFormatError(path, f"image is {a.shape[2]}x{a.shape[1]} but earlier ones are "
                                        f"{self._size[1]}x{self._size[0]}; set resolution= to "
                                        "resize them all")
        return torch.from_numpy(np.ascontiguousarray(a))

    def _decode_all(self, workers):
        first = self.load_uint8(0)
        out = torch.empty((len(self),) + tuple(first.shape), dtype=torch.uint8)
        out[0] = first

        def one(i):
            out[i] = self.load_uint8(i)

        workers = workers or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes without the GIL
            list(pool.map(one, range(1, len(self))))
        return out

    def __getitem__(self, i):
        u = self.data[i] if self.data is not None else self.load_uint8(i)
        x = u.float().div_(255.0)
        if self.random_flip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        return x, 0

    def __repr__(self) -> str:
        return (f"ImageFolder(root={str(self.root)!r}, n={len(self)}, resolution="
                f"{self.resolution}, crop={self.crop!r}, split={self.split!r})")


def celeba64(root=None, split: str = "train", **kw) -> ImageFolder:
    """CelebA 64x64 as NVAE/VAEBM: 148x148 crop of the aligned 178x218 images, resized to 64."""
    kw.setdefault("resolution", 64)
    return ImageFolder(root, crop=kw.pop("crop", "celeba"), split=split, name="celeba", **kw)


def celebahq256(root=None, split: str = "train", **kw) -> ImageFolder:
    """CelebA HQ at 256x256 (images resized, shorter side, and centre-cropped)."""
    kw.setdefault("resolution", 256)
    return ImageFolder(root, crop=kw.pop("crop", "center"), split=split, name="celebahq", **kw)


def lsun_church64(root=None, split: str = "train", **kw) -> ImageFolder:
    """LSUN Church Outdoor at 64x64 exported as image files: resize shorter side, centre crop."""
    kw.setdefault("resolution", 64)
    return ImageFolder(root, crop=kw.pop("crop", "center"), split=split, name="lsun_church",
                       **kw)
