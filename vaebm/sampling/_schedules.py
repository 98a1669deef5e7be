"""Step-size and noise schedules of :class:`~vaebm.sampling.FusedLangevin`: a constant, a
callable of the global step, or a sequence indexed by it."""

from __future__ import annotations

import math
from typing import Callable, Sequence, Union

import torch

Schedule = Union[float, Callable[[int], float], Sequence[float]]


def _schedule(v, what: str):
    """(constant or None, callable t -> value or None) of a float, a callable or a sequence."""
    if callable(v):
        return None, v
    if isinstance(v, (list, tuple)) or (isinstance(v, torch.Tensor) and v.ndim == 1):
        seq = [float(u) for u in v]
        if not seq:
            raise ValueError(f"{what} schedule is empty")

        def at(t, seq=seq):
            if t >= len(seq):
                raise IndexError(f"{what} schedule has {len(seq)} entries; step {t} is past its end")
            return seq[t]
        return None, at
    return float(v), None


def _check_eta(eta: float) -> float:
    if not (math.isfinite(eta) and eta > 0):
        raise ValueError(f"step_size must be positive and finite, got {eta}")
    return eta


def _check_sigma(sigma: float) -> float:
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be non-negative and finite, got {sigma}")
    return sigma
