"""The Triton launchers (``kernels/*.py``, installed as ``vaebm/_triton``) as ops of
``torch.ops.vaebm``, registered on first use (triton is never imported with vaebm).

* Swish and weight norm: ``vaebm::triton_swish_fwd`` ... through ``torch.library.triton_op``
  (the launchers start their kernels with ``wrap_triton``, so ``torch.compile`` sees the kernels
  themselves); on a torch without ``triton_op`` (< 2.6), plain custom ops.
* The Langevin update and reduction: implementations of ``vaebm::triton_langevin_update_`` /
  ``triton_langevin_reduce``, whose schemas and fakes :mod:`._library` declares with those of the
  C++ ops (same arguments). Their kernels walk a device table of raw data pointers (one launch for
  any number of state tensors), which cannot be traced, so they stay opaque custom ops.

On CPU tensors the kernels run only under ``TRITON_INTERPRET=1``, set before this first use.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._library import LIB

_done = False


def _kernels():
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"triton is not installed ({e}); pip install triton") from e
    try:
        from vaebm._triton import langevin, swish, weight_norm
    except ImportError as e:
        raise RuntimeError(f"vaebm's Triton kernels (kernels/*.py, installed as vaebm/_triton) "
                           f"cannot be imported: {e}") from e
    return langevin, swish, weight_norm


def load() -> None:
    """Import triton and the launchers and register the ops (once); raise with the reason."""
    global _done
    if _done:
        return
    langevin, swish, weight_norm = _kernels()
    define = getattr(torch.library, "triton_op", None)

    def op(name, fn):
        if define is not None:
            return define(f"vaebm::triton_{name}", fn, mutates_args=())
        return torch.library.custom_op(f"vaebm::triton_{name}", fn, mutates_args=())

    def swish_fwd(x: Tensor, bias: Optional[Tensor]) -> Tensor:
        return swish.swish_fwd(x, bias)

    def swish_bwd(grad: Tensor, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        return swish.swish_bwd(grad, x, bias)

    def swish_bwd2(gg: Tensor, grad: Tensor, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        return swish.swish_bwd2(gg, grad, x, bias)

    def weight_norm_fwd(v: Tensor, log_g: Tensor) -> Tensor:
        return weight_norm.weight_norm_fwd(v, log_g)

    def weight_norm_bwd(grad_w: Tensor, v: Tensor, log_g: Tensor) -> Tuple[Tensor, Tensor]:
        return weight_norm.weight_norm_bwd(grad_w, v, log_g)

    for fn in (swish_fwd, swish_bwd, swish_bwd2, weight_norm_fwd, weight_norm_bwd):
        op(fn.__name__, fn)

    def update_(states, grads, outs, step, seed_lo, seed_hi, sample_offset, a, b, lam,
                clip_value, lo, hi, gscale, chain_mode, chain_ids=None):
        if chain_ids is not None:
            raise RuntimeError("vaebm::triton_langevin_update_: chain_ids are not supported by "
                               "the Triton kernel (vaebm.ops.langevin_update_ runs the reference)")
        langevin.update_(states, grads, outs, step=step, seed=seed_lo | (seed_hi << 32),
                         sample_offset=sample_offset, a=a, b=b, lam=lam, clip_value=clip_value,
                         lo=lo, hi=hi, gscale=gscale, mode=chain_mode)

    def reduce(states, grads, others, a, lam, clip_value, gscale):
        return langevin.reduce(states, grads, others, a=a, lam=lam, clip_value=clip_value,
                               gscale=gscale)

    for key in ("CPU", "CUDA"):
        LIB.impl("triton_langevin_update_", update_, key)
        LIB.impl("triton_langevin_reduce", reduce, key)
    _done = True
