"""Fused primitives, each with a pure-PyTorch reference beside its fast backends."""

from ._build import BuildError
from ._registry import BACKENDS, BackendUnavailable, available_backends, use_backend
from .langevin import langevin_reduce, langevin_update_
from .langevin_ref import MODE_KEEP, MODE_RESET, MODE_UPDATE, reduce_ref, update_ref
from .philox import philox4x32, philox_normal, philox_uniform
from . import swish, weight_norm  # modules: vaebm.ops.swish.swish, vaebm.ops.weight_norm.weight_norm

__all__ = [
    "BACKENDS", "BackendUnavailable", "BuildError", "available_backends", "use_backend",
    "langevin_update_", "langevin_reduce", "update_ref", "reduce_ref",
    "MODE_UPDATE", "MODE_KEEP", "MODE_RESET", "philox4x32", "philox_normal", "philox_uniform",
    "swish", "weight_norm",
]
