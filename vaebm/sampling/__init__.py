"""Langevin sampling in eps-space (and any other space): the fused sampler and its functional form."""

from .diagnostics import LangevinStats
from .langevin import FusedLangevin
from .functional import langevin_sample

__all__ = ["FusedLangevin", "LangevinStats", "langevin_sample"]
