"""``get_dataset(name, root=None, split="train", **kw)``: one entry point for every data set.

Factories take ``(root, split, **kw)``. Names are case-insensitive; '-' and '_' are the same.
"""

from __future__ import annotations

from typing import Callable

from torch.utils.data import Dataset

from .cifar import CIFAR10
from .folder import ImageFolder, celeba64, celebahq256, lsun_church64
from .idx import MNIST, FashionMNIST
from .stacked import StackedMNIST


def _stacked(root, split, **kw):
    return StackedMNIST(kw.pop("base", "mnist"), root, split, **kw)


def _folder(root, split, **kw):
    if root is None:
        raise ValueError("get_dataset('folder') needs root= (a folder of image files)")
    return ImageFolder(root, split=split, **kw)


_REGISTRY: dict[str, Callable[..., Dataset]] = {
    "cifar10": CIFAR10,
    "mnist": MNIST,
    "fashion_mnist": FashionMNIST,
    "stacked_mnist": _stacked,
    "celeba64": celeba64,
    "celebahq256": celebahq256,
    "lsun_church64": lsun_church64,
    "folder": _folder,
}
_ALIASES = {"cifar_10": "cifar10", "fashionmnist": "fashion_mnist", "fmnist": "fashion_mnist",
            "stackedmnist": "stacked_mnist", "celeba_64": "celeba64",
            "celebahq_256": "celebahq256", "celeba_hq_256": "celebahq256",
            "celeba_256": "celebahq256", "lsun_church_64": "lsun_church64",
            "lsun_church_outdoor_64": "lsun_church64"}


def _key(name: str) -> str:
    k = str(name).strip().lower().replace("-", "_")
    return _ALIASES.get(k, k)


def available_datasets() -> list[str]:
    """Registered names (aliases such as 'celeba_64' are accepted too)."""
    return sorted(_REGISTRY)


def register_dataset(name: str, factory: Callable[..., Dataset], *, overwrite: bool = False):
    """Add ``factory(root, split, **kw) -> Dataset`` under ``name``."""
    k = _key(name)
    if k in _REGISTRY and not overwrite:
        raise ValueError(f"dataset {name!r} is already registered (pass overwrite=True)")
    _REGISTRY[k] = factory


def get_dataset(name: str, root=None, split: str = "train", **kw) -> Dataset:
    """Build a registered dataset. Every item is ``(x, y)``: x float32 (C, H, W) in [0, 1].

    name: cifar10, mnist, fashion_mnist, stacked_mnist, celeba64, celebahq256, lsun_church64,
          folder (or one added with :func:`register_dataset`).
    root: where the files are; None looks in the dataset's default places ($VAEBM_DATA_DIR,
          and /usr/share/datasets/fashion-mnist for Fashion-MNIST).
    split: 'train' or 'test' ('valid' / 'val' accepted; image folders also 'all').
    kw: passed to the dataset, e.g. ``pad=2`` (MNIST sets to 32x32), ``random_flip=True``,
        ``binarize=True``, ``in_memory=True`` (image folders), ``resolution=``, ``crop=``
        (folder), ``base=``, ``seed=``, ``length=``, ``balanced=`` (stacked_mnist).
    """
    k = _key(name)
    if k not in _REGISTRY:
        raise KeyError(f"unknown dataset {name!r}; available: {', '.join(available_datasets())}")
    return _REGISTRY[k](root, split, **kw)
