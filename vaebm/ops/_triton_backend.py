"""Triton backend of the fused Langevin ops: thin wrappers over ``kernels/langevin.py``.

Triton is imported lazily (in :func:`load`), so importing vaebm never imports it. On CPU tensors
the kernels run only under ``TRITON_INTERPRET=1``, set before this module's :func:`load`.
"""

from __future__ import annotations

_kernels = None


def load():
    """Import triton and the kernels module; raise with the reason if that is impossible."""
    global _kernels
    if _kernels is None:
        try:
            import triton  # noqa: F401
        except ImportError as e:
            raise RuntimeError(f"triton is not installed ({e}); pip install triton") from e
        try:
            from vaebm._triton import langevin
        except ImportError as e:
            raise RuntimeError(f"vaebm's Triton kernels (kernels/langevin.py, installed as "
                               f"vaebm/_triton/langevin.py) cannot be imported: {e}") from e
        _kernels = langevin
    return _kernels


def update_(states, grads, outs, *, step, seed, sample_offset, a, b, lam, clip_value, lo, hi,
            gscale=None, mode=None):
    load().update_(states, grads, outs, step=step, seed=seed, sample_offset=sample_offset, a=a,
                   b=b, lam=lam, clip_value=clip_value, lo=lo, hi=hi, gscale=gscale, mode=mode)


def reduce(states, grads, others=None, *, a, lam, clip_value, gscale=None):
    return load().reduce(states, grads, others, a=a, lam=lam, clip_value=clip_value,
                         gscale=gscale)

from ._triton_nn import (swish_bwd, swish_bwd2, swish_fwd, weight_norm_bwd,  # noqa: E402,F401
                         weight_norm_fwd)
