"""``langevin_sample``: the functional form of :class:`FusedLangevin`, k-diffusion style."""

from __future__ import annotations

import functools

import torch

from .langevin import EnergyFn, FusedLangevin


def langevin_sample(energy_fn: EnergyFn, state, n_steps: int, step_size: float, *,
                    lam: float = 0.0, sigma: float = 1.0, seed: int | None = None,
                    extra_args: dict | None = None, callback=None, return_stats: bool = False,
                    **sampler_kwargs):
    """Run ``n_steps`` Langevin steps from ``state`` and return the final state.

    ``energy_fn(x, **extra_args)`` returns one energy per sample, shape (B,); gradients are
    taken with respect to the state only (model parameters are left untouched). ``state`` is a
    (B, ...) tensor or a list of them and is not modified: the chains run on a copy.
    ``callback({"i", "x", "energy", "sampler"})`` is called after every step. Other keyword
    arguments (``clip_grad_norm``, ``clamp``, ``mala``, ``on_nonfinite``, ``backend`` ...) go
    to :class:`FusedLangevin`. With ``return_stats=True`` returns ``(state, stats)``.
    """
    if int(n_steps) != n_steps or n_steps < 0:
        raise ValueError(f"n_steps must be a non-negative integer, got {n_steps}")
    single = isinstance(state, torch.Tensor)
    x = state.detach().clone() if single else [s.detach().clone() for s in state]
    fn = functools.partial(energy_fn, **extra_args) if extra_args else energy_fn
    # statistics keep at most the last 1024 steps (max_steps= changes it): bounded memory
    max_steps = sampler_kwargs.pop("max_steps", max(1, min(int(n_steps), 1024)))
    sampler = FusedLangevin(x, step_size, lam=lam, sigma=sigma, seed=seed, max_steps=max_steps,
                            **sampler_kwargs)
    for i in range(int(n_steps)):
        energy = sampler.step(fn)
        if callback is not None:
            callback({"i": i, "x": x, "energy": energy, "sampler": sampler})
    return (x, sampler.stats) if return_stats else x
