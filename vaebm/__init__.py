"""VAEBM: variational autoencoders with energy-based priors on their output (Xiao et al., 2021)."""

from . import ops
from .ops import use_backend

__version__ = "0.1.0"

__all__ = ["ops", "use_backend", "__version__"]
