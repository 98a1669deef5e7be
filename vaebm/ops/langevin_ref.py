"""The fused Langevin step in plain PyTorch: the specification of every backend.

Paper Eq. 2, run in eps-space with the standard-normal base density of Eq. 9 (``lam = 1``)::

    eps <- eps - a * (s_i * clip(grad E(eps)) + lam * eps) + b * xi,   xi ~ N(0, I)
    a = eta / 2,  b = sigma * sqrt(eta)

``s_i`` is a per-sample gradient scale (norm clipping), ``clip`` clamps each gradient element
to +-clip_value, and ``xi`` is the counter-based Philox stream of :mod:`vaebm.ops.philox`.
Per sample ``mode`` selects what is written: 0 the update, 1 the old state (a rejected step),
2 fresh N(0, I) noise from the reset stream (a restarted chain). The result is clamped to
[lo, hi] (NaN stays NaN, so a broken chain is still visible next step). Arithmetic is float32;
the result is rounded to the output's dtype.

The reduction gives the per-sample sums the sampler needs before (or after) an update::

    col 0: sum clip(g)^2                       (the gradient norm, squared)
    col 1: number of non-finite entries in x and g (g before clipping)
    col 2: sum x^2                             (the base-density term of the potential)
    col 3: sum (o - x + a * (s_i clip(g) + lam x))^2   (MALA's proposal log-density; 0 without o)

Shapes: every state tensor is (B, ...) with the batch first; ``gscale`` and ``mode`` are (B,).
"""

from __future__ import annotations

import math

import torch

from .philox import STREAM_NOISE, STREAM_RESET, philox_normal_rows

MODE_UPDATE, MODE_KEEP, MODE_RESET = 0, 1, 2


def _noise(seed, step, sample_offset, k, shape, device, stream, samples=None):
    B, n = shape[0], math.prod(shape[1:])
    if samples is None:
        samples = torch.arange(sample_offset, sample_offset + B, device=device)
    return philox_normal_rows(seed, step, samples.to(device), n, k, stream).reshape(shape)


def _clip(g: torch.Tensor, clip_value: float) -> torch.Tensor:
    # torch.clamp keeps NaN, like the kernels' compare-and-select
    return g.clamp(-clip_value, clip_value) if clip_value > 0 else g


def _per_sample(v: torch.Tensor | None, ndim: int):
    return None if v is None else v.reshape((-1,) + (1,) * (ndim - 1))


def update_ref(states, grads, outs, *, seed, step, sample_offset, a, b, lam, clip_value, lo, hi,
               gscale=None, mode=None, samples=None):
    """Reference of ``langevin_update_``: writes ``outs[k]`` (which may alias ``states[k]``).
    ``samples`` (B,) int64, if given, are the Philox sample ids of the rows (chain ids) instead
    of ``sample_offset + i``."""
    a, b, lam = (torch.tensor(v, dtype=torch.float32) for v in (a, b, lam))
    for k, (x, g, out) in enumerate(zip(states, grads, outs)):
        xf = x.float()
        gf = _clip(g.float(), clip_value)
        if gscale is not None:
            gf = gf * _per_sample(gscale, x.ndim)
        xi = _noise(seed, step, sample_offset, k, x.shape, x.device, STREAM_NOISE, samples)
        y = xf - a.to(x.device) * (gf + lam.to(x.device) * xf) + b.to(x.device) * xi
        if mode is not None:
            m = _per_sample(mode, x.ndim)
            reset = _noise(seed, step, sample_offset, k, x.shape, x.device, STREAM_RESET, samples)
            y = torch.where(m == MODE_RESET, reset, y)
        if lo != -math.inf or hi != math.inf:
            y = y.clamp(lo, hi)
        if mode is not None:
            y = torch.where(_per_sample(mode, x.ndim) == MODE_KEEP, xf, y)
        out.copy_(y)


def reduce_ref(states, grads, others=None, *, a, lam, clip_value, gscale=None):
    """Reference of ``langevin_reduce``: a (B, 4) float32 tensor of per-sample sums."""
    B = states[0].shape[0]
    acc = torch.zeros(B, 4, dtype=torch.float32, device=states[0].device)
    for k, (x, g) in enumerate(zip(states, grads)):
        xf = x.float().reshape(B, -1)
        graw = g.float().reshape(B, -1)
        gf = _clip(graw, clip_value)
        acc[:, 0] += (gf * gf).sum(1)
        # the raw gradient: an infinite gradient is a broken chain even where clipping hides it
        acc[:, 1] += (~torch.isfinite(xf)).sum(1) + (~torch.isfinite(graw)).sum(1)
        acc[:, 2] += (xf * xf).sum(1)
        if others is not None:
            s = gf if gscale is None else gf * gscale.reshape(B, 1)
            d = others[k].float().reshape(B, -1) - xf + a * (s + lam * xf)
            acc[:, 3] += (d * d).sum(1)
    return acc


GUARD_NONE, GUARD_KEEP, GUARD_RESET = 0, 1, 2


def step_ref(states, grads, energy, step, *, seed, sample_offset=0, chain_ids=None, a, b, lam,
             clip_value, clip_norm, lo, hi, guard, stats=None):
    """Reference of ``langevin_step_``: one whole unadjusted FusedLangevin step, in place.

    Per sample: the reduction's clipped squared gradient norm ``g2`` and non-finite count give
    ``bad = ~isfinite(energy) | (count > 0)``; with ``clip_norm > 0`` the gradient scale is
    ``min(1, clip_norm / (sqrt(g2) + 1e-12))``; ``guard`` (GUARD_KEEP / GUARD_RESET) turns bad
    samples' mode into keep / reset. The states are updated by :func:`update_ref`. ``stats``
    (a float32 ring buffer (rows, 4, B) and an int64 counter) get row ``step % rows``: the
    energy (NaN where non-finite), sqrt(g2), accepted = 1 - guarded, guarded (0/1); the counter
    adds the guarded count. Then ``step`` (a 1-element int64 tensor) += 1.
    """
    B = states[0].shape[0]
    need = guard != GUARD_NONE or clip_norm > 0 or stats is not None
    gscale = mode = bad = g2 = None
    if need:
        red = reduce_ref(states, grads, a=a, lam=lam, clip_value=clip_value)
        g2 = red[:, 0]
        bad = red[:, 1] > 0
        if energy is not None:
            bad = bad | ~torch.isfinite(energy.float())
        if clip_norm > 0:
            gscale = (torch.tensor(clip_norm, dtype=torch.float32) / (g2.sqrt() + 1e-12)).clamp(max=1.0)
        if guard != GUARD_NONE:
            fix = MODE_RESET if guard == GUARD_RESET else MODE_KEEP
            mode = torch.where(bad, fix, MODE_UPDATE).to(torch.int32)
    update_ref(states, grads, states, seed=seed, step=step, sample_offset=sample_offset, a=a,
               b=b, lam=lam, clip_value=clip_value, lo=lo, hi=hi, gscale=gscale, mode=mode,
               samples=chain_ids)
    if stats is not None:
        rec, n_guarded = stats
        row = int(step.reshape(-1)[0]) % rec.shape[0]
        e = torch.zeros(B) if energy is None else energy.float()
        guarded = bad & (guard != GUARD_NONE)
        rec[row, 0] = torch.where(torch.isfinite(e), e, float("nan"))
        rec[row, 1] = g2.sqrt()
        rec[row, 2] = (~guarded).float()
        rec[row, 3] = guarded.float()
        n_guarded += guarded.sum()
    step += 1
