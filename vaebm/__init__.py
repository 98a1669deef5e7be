"""VAEBM: variational autoencoders with energy-based priors on their output (Xiao et al., 2021)."""

from . import ops
from .ops import use_backend
from .models import EnergyNet
from .sampling import FusedLangevin, LangevinStats, SampleBank, langevin_sample

__version__ = "0.1.0"

__all__ = ["EnergyNet", "FusedLangevin", "LangevinStats", "SampleBank", "langevin_sample", "ops", "use_backend", "__version__"]
