"""The unadjusted Langevin step as differentiable torch ops, for ``FusedLangevin(...,
create_graph=True)`` (improved contrastive divergence and other differentiable chains): the same
update, Philox noise and non-finite guard as the kernels, written on new tensors so autograd can
follow the chain. ``self`` is the sampler."""

from __future__ import annotations

import math

import torch

from ..ops.philox import STREAM_NOISE, STREAM_RESET, philox_normal_rows


def differentiable_step(self, energy_fn):
    """The unadjusted step as differentiable torch ops (``create_graph=True``): the same
    update, noise and guard as the kernels, on new tensors."""
    xs = self.state
    if not any(x.requires_grad for x in xs):
        xs = [x.detach().requires_grad_(True) for x in xs]
    energy = self._check_energy(energy_fn(xs[0] if self.single else xs))
    grads = torch.autograd.grad(energy.sum(), xs, create_graph=True, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(xs, grads)]
    eta, sig = self.step_size, self.sigma
    a, b = eta / 2, sig * math.sqrt(eta)
    gf = [g.clamp(-self.clip_grad_value, self.clip_grad_value) if self.clip_grad_value else g
          for g in grads]
    B = self.batch
    with torch.no_grad():
        g2 = sum(g.detach().float().reshape(B, -1).pow(2).sum(1) for g in gf)
        bad = ~torch.isfinite(energy.detach())
        for x, g in zip(xs, grads):  # the raw gradient, as the kernels' reduction counts it
            bad |= ~torch.isfinite(x.detach()).reshape(B, -1).all(1)
            bad |= ~torch.isfinite(g.detach()).reshape(B, -1).all(1)
    if self.clip_grad_norm is not None:
        scale = (self.clip_grad_norm / (g2.sqrt() + 1e-12)).clamp(max=1.0)
        gf = [g * scale.to(g.dtype).view((-1,) + (1,) * (g.ndim - 1)) for g in gf]
    new = []
    for k, (x, g) in enumerate(zip(xs, gf)):
        n = x[0].numel()
        xi = philox_normal_rows(self.seed, self.step_t, self._samples, n, k,
                                STREAM_NOISE).reshape(x.shape).to(x.dtype)
        y = x - a * (g + self.lam * x) + b * xi
        if self.clamp is not None:
            y = y.clamp(*self.clamp)
        if self.on_nonfinite is not None:
            m = bad.view((-1,) + (1,) * (x.ndim - 1))
            fix = x if self.on_nonfinite == "reject" else philox_normal_rows(
                self.seed, self.step_t, self._samples, n, k, STREAM_RESET).reshape(x.shape)
            y = torch.where(m, fix.to(y.dtype), y)
        new.append(y)
    self.state = new
    if self.stats is not None:
        guarded = bad if self.on_nonfinite is not None else torch.zeros_like(bad)
        e = energy.detach().float()
        self.stats.record(self.step_t, torch.where(torch.isfinite(e), e, float("nan")),
                          g2.sqrt(), ~guarded, guarded)
    self._advance()
    return energy
