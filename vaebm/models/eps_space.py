"""The eps-space contract between a VAE and VAEBM's sampler and trainer (paper Eq. 8-9).

A VAE usable by VAEBM exposes its reparameterisation T: eps -> (z, x) as a method. The state of
a Langevin chain is the list ``eps = [eps_z_1, ..., eps_z_L, eps_x]``: one tensor per latent
group, shapes ``(B, C_l, H_l, W_l)`` (or ``(B, D)`` for MLP VAEs), then the pixel noise with the
data's shape. Both :class:`vaebm.toy.models.ToyVAE` and :class:`vaebm.models.nvae.NVAE` follow it.

Two eps-space energies (both documented in the README):

- ``paper``: E(T(eps)) + 0.5 * ||eps||^2 (Eq. 9). The Gaussian term is the sampler's ``lam=1``
  base density, so the energy function handed to the sampler is just E(x) at x = T(eps).
- ``official``: E(x) - log p(z) - log p(x|z) at (z, x) = T(eps), what the published code
  differentiates (``lam=0``). It keeps the log-scale (log-det Jacobian) terms that Eq. 9 cancels.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Protocol, Sequence, runtime_checkable

import torch

ENERGY_MODES = ("paper", "official")


class EpsDecode(NamedTuple):
    """What :meth:`EpsVAE.decode_eps` returns.

    x_sample: x = T_x(z, eps_x), in the energy network's input range (images: [0, 1]).
    x_mean:   the decoder mean mu_x(z) in the same range (the published test-time output).
    log_p_z:  (B,) log p(z) at z = T_z(eps_z) (sum over all groups and elements), or None when
              the caller asked for ``with_log_prob=False``.
    log_p_x:  (B,) log p(x | z) at x_sample, or None likewise.
    """

    x_sample: torch.Tensor
    x_mean: torch.Tensor
    log_p_z: torch.Tensor | None
    log_p_x: torch.Tensor | None


@runtime_checkable
class EpsVAE(Protocol):
    def eps_shapes(self, batch: int) -> list[torch.Size]:
        """Shapes of the chain state: one per latent group, then eps_x."""

    def decode_eps(self, eps: Sequence[torch.Tensor], *, t: float = 1.0,
                   with_log_prob: bool = False) -> EpsDecode:
        """Deterministic and differentiable in eps. ``t`` scales the prior's std (temperature)."""

    def encode_eps(self, x: torch.Tensor, *, use_mean: bool = False,
                   generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Inverse of T: data -> eps (posterior mean or sample, through the prior's shift and
        scale) with eps_x chosen so that T(eps) reproduces x as closely as the decoder allows."""


def sample_eps(vae: EpsVAE, batch: int, *, device=None, dtype=torch.float32,
               generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Fresh chain starts eps ~ N(0, I) with :meth:`EpsVAE.eps_shapes`."""
    return [torch.randn(s, device=device, dtype=dtype, generator=generator)
            for s in vae.eps_shapes(batch)]


def eps_energy_fn(vae: EpsVAE, energy: Callable[[torch.Tensor], torch.Tensor],
                  mode: str = "paper", *, t: float = 1.0, negative: str = "sample"):
    """The sampler's ``(energy_fn, lam)`` for eps-space Langevin on ``vae`` and ``energy``.

    ``negative`` picks the point the energy net sees: ``sample`` = T(eps) (Eq. 9) or ``mean``
    = mu_x(z) (what the published code feeds E for CelebA 64, LSUN and CelebA HQ)."""
    if mode not in ENERGY_MODES:
        raise ValueError(f"mode must be one of {ENERGY_MODES}, got {mode!r}")
    if negative not in ("sample", "mean"):
        raise ValueError(f"negative must be 'sample' or 'mean', got {negative!r}")
    official = mode == "official"

    def fn(state):
        out = vae.decode_eps(state, t=t, with_log_prob=official)
        x = out.x_sample if negative == "sample" else out.x_mean
        e = energy(x)
        if official:
            e = e - out.log_p_z - out.log_p_x
        return e

    return fn, (0.0 if official else 1.0)


class StageOneVAE(Protocol):
    """What the stage-1 trainer (:mod:`vaebm.training.vae`) needs from a VAE. Images enter as
    (B, C, H, W) in [0, 1]."""

    def loss_terms(self, x: torch.Tensor) -> dict:
        """One reparameterised pass: ``{"log_p_x": (B,), "kl": [ (B,) per latent group ]}``;
        -ELBO = -log_p_x + sum(kl). The trainer applies KL warm-up and balancing."""

    def regularizers(self) -> dict:
        """Scalars added to the loss with the trainer's weights, e.g. ``{"spectral": ..,
        "bn": ..}`` (NVAE); empty for models without them."""

    def iwae(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Importance-weighted bound on log p(x) in nats, (B,)."""
