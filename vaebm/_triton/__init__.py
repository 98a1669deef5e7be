"""Triton kernels. In an installed vaebm the files of the repository's ``kernels/`` folder are
copied here by setup.py; in a source checkout this package reads them from ``kernels/``."""

from .._paths import triton_dir as _triton_dir

_src = _triton_dir()
if _src is not None and str(_src) not in __path__:
    __path__.append(str(_src))
