"""Langevin sampling in eps-space (and any other space): the fused sampler and its functional form."""

from .convergence import chain_report, ess, nested_rhat, rhat
from .diagnostics import LangevinStats
from .langevin import FusedLangevin
from .functional import langevin_sample
from .xbuffer import SampleBank

__all__ = ["FusedLangevin", "LangevinStats", "SampleBank", "chain_report", "ess", "langevin_sample",
           "nested_rhat", "rhat"]
