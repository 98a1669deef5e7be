"""StackedMNIST: three grey digits on the R, G and B channels, 10^3 = 1000 modes.

Item ``i`` stacks base images ``indices[i] = (a, b, c)`` as channels (R, G, B) and has the mode
label ``100 * y[a] + 10 * y[b] + y[c]`` (as NVAE's StackedMNIST and the mode-counting protocol
of Metz et al. 2017 / Lin et al. 2018). Built from any 10-class grey image set (MNIST,
Fashion-MNIST, ...), with indices drawn once from ``seed`` (numpy's PCG64), so a given
(base, length, seed, balanced) always yields the same set.

``balanced=False`` picks each channel's image uniformly among all base images, so mode m =
(d1, d2, d3) has probability p[d1] p[d2] p[d3] with p the base class frequencies (MNIST's are
not exactly uniform). ``balanced=True`` first draws the three digits uniformly, then an image
of that digit, so every one of the 1000 modes has probability exactly 1/1000.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ._base import DataFormatError, check_labels, pad_images, to_uint8

NUM_MODES = 1000


def _base_arrays(base, root, split):
    """(images uint8 (N, H, W), labels int64 (N,)) from a name, dataset or (images, labels)."""
    if isinstance(base, str):
        from .idx import MNIST, FashionMNIST
        key = base.lower().replace("-", "_")
        cls = {"mnist": MNIST, "fashion_mnist": FashionMNIST}.get(key)
        if cls is None:
            raise ValueError(f"unknown StackedMNIST base {base!r}; use 'mnist', 'fashion_mnist', "
                             "a dataset or an (images, labels) pair")
        base = cls(root, split)
    if isinstance(base, (tuple, list)) and len(base) == 2:
        images, labels = base
    elif hasattr(base, "data") and hasattr(base, "targets") and base.data is not None:
        images, labels = base.data, base.targets
    elif isinstance(base, Dataset):  # any dataset of (x (1, H, W) in [0, 1], y): read it once
        items = [base[i] for i in range(len(base))]
        images = torch.stack([torch.as_tensor(x) for x, _ in items])
        labels = torch.as_tensor([int(y) for _, y in items])
    else:
        raise TypeError(f"StackedMNIST base must be a name, a dataset or (images, labels); got "
                        f"{type(base).__name__}")
    images = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else images
    labels = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else labels
    a = np.asarray(images)
    if a.ndim == 4:
        if a.shape[1] != 1:
            raise DataFormatError("StackedMNIST base", f"images must be grey (N, 1, H, W); got "
                                                       f"{a.shape[1]} channels")
        a = a[:, 0]
    if a.ndim != 3:
        raise DataFormatError("StackedMNIST base", f"images must be (N, H, W) or (N, 1, H, W); "
                                                   f"got shape {a.shape}")
    a = to_uint8(a, "StackedMNIST base")
    y = check_labels(labels, len(a), "StackedMNIST base", num_classes=10)
    missing = sorted(set(range(10)) - set(np.unique(y).tolist()))
    if missing:
        raise DataFormatError("StackedMNIST base", f"needs all ten classes for 1000 modes; "
                                                   f"digits {missing} are absent")
    return a, y


def draw_indices(labels: np.ndarray, length: int, seed: int, balanced: bool) -> np.ndarray:
    """(length, 3) int64 base indices (the draw StackedMNIST uses)."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    if not balanced:
        return rng.integers(0, n, size=(length, 3), dtype=np.int64)
    digits = rng.integers(0, 10, size=(length, 3))
    idx = np.empty((length, 3), dtype=np.int64)
    for d in range(10):
        members = np.flatnonzero(labels == d)
        where = digits == d
        idx[where] = members[rng.integers(0, len(members), size=int(where.sum()))]
    return idx


class StackedMNIST(Dataset):
    """Items (x (3, H, W) float32 in [0, 1] (H = 28 + 2 pad), mode label in 0..999).

    base: 'mnist', 'fashion_mnist' (loaded from ``root`` / ``split``), a dataset with ``data``
          and ``targets`` (e.g. :class:`vaebm.data.MNIST`), any dataset of (x (1, H, W), y), or
          an (images (N, H, W) or (N, 1, H, W), labels (N,)) pair; labels in 0..9.
    length: number of stacked images (default: as many as base images).
    seed, balanced: see the module docstring.
    pad: zero padding on every side (2 gives NVAE's 32x32).

    Attributes: ``indices`` (length, 3) base indices per channel, ``digits`` (length, 3) their
    labels, ``targets`` (length,) mode labels; all int64 tensors.
    """

    def __init__(self, base="mnist", root=None, split: str = "train", *, length: int | None = None,
                 seed: int = 0, balanced: bool = False, pad: int = 0):
        images, labels = _base_arrays(base, root, split)
        length = len(images) if length is None else int(length)
        if length <= 0:
            raise ValueError(f"length must be positive, got {length}")
        if int(pad) < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        idx = draw_indices(labels, length, seed, balanced)
        self.base_images = torch.from_numpy(np.ascontiguousarray(images))
        self.base_labels = torch.from_numpy(labels)
        self.indices = torch.from_numpy(idx)
        self.digits = self.base_labels[self.indices]
        self.targets = self.digits[:, 0] * 100 + self.digits[:, 1] * 10 + self.digits[:, 2]
        self.seed, self.balanced, self.pad = seed, bool(balanced), int(pad)
        counts = np.bincount(labels, minlength=10)
        self.class_frequencies = counts / counts.sum()

    def __len__(self) -> int:
        return self.indices.shape[0]

    def load_uint8(self, i) -> torch.Tensor:
        """Item ``i`` (an int or an index tensor) unpadded: uint8 (3, H, W) or (B, 3, H, W)."""
        return self.base_images[self.indices[i]]

    def __getitem__(self, i):
        x = pad_images(self.load_uint8(i).float().div_(255.0), self.pad)
        return x, int(self.targets[i])

    def as_tensors(self, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """All items: images (length, 3, H', W') in [0, 1], mode labels (length,) int64."""
        x = pad_images(self.base_images.to(device)[self.indices.to(device)].to(dtype) / 255.0,
                       self.pad)
        return x, self.targets.to(device)

    def mode_counts(self) -> np.ndarray:
        """(1000,) how many items carry each mode label."""
        return np.bincount(self.targets.numpy(), minlength=NUM_MODES)

    def mode_probabilities(self) -> np.ndarray:
        """(1000,) the probability of each mode under this set's draw: 1/1000 when balanced,
        else p[d1] p[d2] p[d3] (p = base class frequencies)."""
        if self.balanced:
            return np.full(NUM_MODES, 1.0 / NUM_MODES)
        p = self.class_frequencies
        return np.einsum("i,j,k->ijk", p, p, p).reshape(-1)

    def __repr__(self) -> str:
        return (f"StackedMNIST(n={len(self)}, base_n={len(self.base_images)}, seed={self.seed}, "
                f"balanced={self.balanced}, pad={self.pad})")
