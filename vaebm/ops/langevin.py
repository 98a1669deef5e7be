"""Dispatching front-ends of the fused Langevin ops (the maths is in :mod:`.langevin_ref`).

The ops ``vaebm::langevin_update_``, ``langevin_reduce`` and ``langevin_step_`` are declared
once (:mod:`._library`); the tables below say which backend implements which, in which dtypes.
Every implementation has the reference's semantics on validated, contiguous tensors of one dtype.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from . import _library  # noqa: F401  (the op schemas)
from . import _registry
from ._registry import Kernel
from .langevin_ref import reduce_ref, update_ref

FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MASK = 0xFFFFFFFF

# backend -> kernel of each op (the references: langevin_ref.update_ref / reduce_ref / step_ref)
UPDATE = {"cpp": Kernel("cpu", "langevin_update_", FAST_DTYPES, ("chain_ids",)),
          "cuda": Kernel("cuda", "langevin_update_", FAST_DTYPES),
          "triton": Kernel("triton", "triton_langevin_update_", FAST_DTYPES)}
REDUCE = {"cpp": Kernel("cpu", "langevin_reduce", FAST_DTYPES),
          "cuda": Kernel("cuda", "langevin_reduce", FAST_DTYPES),
          "triton": Kernel("triton", "triton_langevin_reduce", FAST_DTYPES)}
STEP = {"cpp": Kernel("cpu", "langevin_step_", FAST_DTYPES)}  # one call per step: cpp only
# MALA's accept uniforms (reference: philox.philox_uniform); resolved with the state's dtype
UNIFORM = {"cpp": Kernel("cpu", "philox_uniform", FAST_DTYPES)}


def _as_list(x, what: str) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    x = list(x)
    if not x:
        raise ValueError(f"{what} is empty: pass a tensor or a non-empty list of tensors")
    for t in x:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what} must hold tensors, got {type(t).__name__}")
    return x


def check_state(states: Sequence[torch.Tensor], what: str = "state") -> None:
    """Raise a clear error unless ``states`` share dtype, device and batch size."""
    x0 = states[0]
    if not (x0.is_floating_point()):
        raise TypeError(f"{what} must be floating point, got {x0.dtype}")
    for k, x in enumerate(states):
        if x.ndim == 0:
            raise ValueError(f"{what}[{k}] is a scalar; state tensors are (B, ...) with batch first")
        if x.dtype != x0.dtype:
            raise TypeError(f"{what}[{k}] has dtype {x.dtype} but {what}[0] has {x0.dtype}; "
                            "all state tensors must share one dtype")
        if x.device != x0.device:
            raise ValueError(f"{what}[{k}] is on {x.device} but {what}[0] is on {x0.device}; "
                             "all state tensors must be on one device")
        if x.shape[0] != x0.shape[0]:
            raise ValueError(f"{what}[{k}] has batch size {x.shape[0]} but {what}[0] has "
                             f"{x0.shape[0]}; dim 0 is the batch in every state tensor")
        if x.numel() == 0:
            raise ValueError(f"{what}[{k}] is empty (shape {tuple(x.shape)})")


def _check_like(others, states, what):
    if len(others) != len(states):
        raise ValueError(f"{what} has {len(others)} tensors but the state has {len(states)}")
    for k, (o, x) in enumerate(zip(others, states)):
        if o.shape != x.shape or o.dtype != x.dtype or o.device != x.device:
            raise ValueError(f"{what}[{k}] is {tuple(o.shape)} {o.dtype} on {o.device}, expected "
                             f"{tuple(x.shape)} {x.dtype} on {x.device} like state[{k}]")


def _per_sample(v, B, dtype, device, what):
    if v is None:
        return None
    if v.shape != (B,):
        raise ValueError(f"{what} must have shape ({B},), got {tuple(v.shape)}")
    return v.to(device=device, dtype=dtype).contiguous()


def _step_tensor(step, device):
    if isinstance(step, torch.Tensor):
        if step.numel() != 1:
            raise ValueError(f"step must be an int or a one-element tensor, got {tuple(step.shape)}")
        return step.reshape(1).to(device=device, dtype=torch.int64)
    return torch.tensor([int(step)], dtype=torch.int64, device=device)


def _pick(table, states, backend):
    return _registry.resolve_op(table, states[0].device, states[0].dtype, backend)


def langevin_update_(states, grads, outs=None, *, seed: int, step=0, sample_offset: int = 0,
                     step_size: float, lam: float = 0.0, sigma: float = 1.0,
                     clip_value: float | None = None, clamp: tuple[float, float] | None = None,
                     gscale: torch.Tensor | None = None, mode: torch.Tensor | None = None,
                     chain_ids: torch.Tensor | None = None, backend: str | None = None) -> None:
    """One fused Langevin update of every tensor in ``states``, in one launch.

    ``outs[k] <- states[k] - eta/2 * (gscale_i * clip(grads[k]) + lam * states[k])
    + sigma * sqrt(eta) * xi`` with Philox noise ``xi`` keyed by (seed, step, sample_offset + i,
    element). ``outs`` defaults to ``states`` (in place). ``mode`` (B,) int32 selects per sample
    update (0), keep (1) or reset to N(0, I) (2). ``chain_ids`` (B,) int64, if given, replace
    ``sample_offset + i`` as the rows' Philox sample ids (the ``cpp`` kernel takes them; the
    ``triton`` and ``cuda`` backends then run the reference). See :mod:`vaebm.ops.langevin_ref`.
    """
    states = _as_list(states, "state")
    grads = _as_list(grads, "grads")
    check_state(states)
    _check_like(grads, states, "grads")
    outs = states if outs is None else _as_list(outs, "outs")
    _check_like(outs, states, "outs")
    eta = float(step_size)
    if not (math.isfinite(eta) and eta > 0):
        raise ValueError(f"step_size must be positive and finite, got {step_size}")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be non-negative and finite, got {sigma}")
    lo, hi = (-math.inf, math.inf) if clamp is None else (float(clamp[0]), float(clamp[1]))
    if not lo < hi:
        raise ValueError(f"clamp must be (low, high) with low < high, got {clamp}")
    cv = 0.0 if clip_value is None else float(clip_value)
    if clip_value is not None and not cv > 0:
        raise ValueError(f"clip_value must be positive, got {clip_value}")
    B, dev = states[0].shape[0], states[0].device
    gscale = _per_sample(gscale, B, torch.float32, dev, "gscale")
    mode = _per_sample(mode, B, torch.int32, dev, "mode")
    a, b = eta / 2, float(sigma) * math.sqrt(eta)
    name, fn = _pick(UPDATE, states, backend)
    step_t = _step_tensor(step, dev)
    if chain_ids is not None:
        if chain_ids.shape != (B,):
            raise ValueError(f"chain_ids must have shape ({B},), got {tuple(chain_ids.shape)}")
        chain_ids = chain_ids.to(device=dev, dtype=torch.int64).contiguous()
        if fn is not None and "chain_ids" not in UPDATE[name].features:
            fn = None  # (the cuda and triton kernels key noise by row: run the reference)
    if fn is None:
        return update_ref(states, grads, outs, step=step_t, samples=chain_ids, seed=int(seed),
                          sample_offset=int(sample_offset), a=a, b=b, lam=float(lam),
                          clip_value=cv, lo=lo, hi=hi, gscale=gscale, mode=mode)
    cs = [x.contiguous() for x in states]
    cg = [g.contiguous() for g in grads]
    # a non-contiguous output is written through a contiguous buffer, then copied back
    co = [o if o.is_contiguous() else torch.empty(o.shape, dtype=o.dtype, device=o.device)
          for o in outs]
    seed = int(seed)
    # the 64-bit seed travels as two 32-bit halves; only sample_offset mod 2**32 enters Philox
    fn(cs, cg, co, step_t, seed & _MASK, seed >> 32, int(sample_offset) & _MASK, a, b,
       float(lam), cv, lo, hi, gscale, mode, chain_ids)
    for o, c in zip(outs, co):
        if c is not o:
            o.copy_(c)


def langevin_reduce(states, grads, others=None, *, step_size: float = 0.0, lam: float = 0.0,
                    clip_value: float | None = None, gscale: torch.Tensor | None = None,
                    backend: str | None = None) -> torch.Tensor:
    """Per-sample sums over all state tensors, (B, 4) float32: clipped squared gradient norm,
    non-finite count of state and gradient, squared state norm, and (with ``others``) the
    squared distance ``||others - (x - eta/2 (gscale_i clip(g) + lam x))||^2`` of MALA."""
    states = _as_list(states, "state")
    grads = _as_list(grads, "grads")
    check_state(states)
    _check_like(grads, states, "grads")
    if others is not None:
        others = _as_list(others, "others")
        _check_like(others, states, "others")
    B, dev = states[0].shape[0], states[0].device
    a, cv = float(step_size) / 2, 0.0 if clip_value is None else float(clip_value)
    gscale = _per_sample(gscale, B, torch.float32, dev, "gscale")
    name, fn = _pick(REDUCE, states, backend)
    if fn is None:
        return reduce_ref(states, grads, others, a=a, lam=float(lam), clip_value=cv,
                          gscale=gscale)
    c = lambda ts: None if ts is None else [t.contiguous() for t in ts]  # noqa: E731
    return fn(c(states), c(grads), c(others), a, float(lam), cv, gscale)
