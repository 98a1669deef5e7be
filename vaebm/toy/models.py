"""MLP VAE and MLP energy for the 2-D experiment of Sec. 5.4.

VAE: standard-normal prior p(z) = N(0, I) (latent_dim 20), Gaussian decoder
p(x|z) = N(mu(z), diag sigma(z)^2), Gaussian encoder q(z|x); encoder and decoder are 4 fully
connected layers with 256 hidden units. Its reparameterisation (Eq. 8) is
z = T_z(eps_z) = eps_z and x = T_x(z, eps_x) = mu(z) + sigma(z) * eps_x, so VAEBM's eps-space
energy (Eq. 9) is E(T(eps)) + |eps|^2 / 2: see :meth:`ToyVAE.decode_eps`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

LOG_2PI = math.log(2 * math.pi)


def mlp(d_in: int, d_out: int, hidden: int = 256, layers: int = 4) -> nn.Sequential:
    """``layers`` fully connected layers (layers - 1 hidden layers of width ``hidden``), SiLU
    between them: smooth, so Langevin gradients through it are well behaved."""
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    dims = [d_in] + [hidden] * (layers - 1) + [d_out]
    mods: list[nn.Module] = []
    for i in range(layers):
        mods.append(nn.Linear(dims[i], dims[i + 1]))
        if i < layers - 1:
            mods.append(nn.SiLU())
    return nn.Sequential(*mods)


def soft_clamp(x: torch.Tensor, bound: float) -> torch.Tensor:
    """bound * tanh(x / bound): identity near 0, smooth, never beyond +-bound."""
    return bound * torch.tanh(x / bound)


def normal_log_prob(x: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """log N(x; mu, diag exp(log_sigma)^2) summed over the last dimension."""
    return (-0.5 * ((x - mu) * torch.exp(-log_sigma)) ** 2 - log_sigma - 0.5 * LOG_2PI).sum(-1)


class ToyVAE(nn.Module):
    """VAE with MLP encoder/decoder. Shapes: x (B, data_dim), z and eps_z (B, latent_dim)."""

    def __init__(self, data_dim: int = 2, latent_dim: int = 20, hidden: int = 256,
                 layers: int = 4, log_sigma_bound: float = 6.0):
        super().__init__()
        self.data_dim, self.latent_dim, self.bound = data_dim, latent_dim, float(log_sigma_bound)
        self.encoder = mlp(data_dim, 2 * latent_dim, hidden, layers)
        self.decoder = mlp(latent_dim, 2 * data_dim, hidden, layers)

    def encode(self, x: torch.Tensor):
        """q(z|x): (mu, log_sigma), each (B, latent_dim)."""
        mu, ls = self.encoder(x).chunk(2, dim=-1)
        return mu, soft_clamp(ls, self.bound)

    def decode(self, z: torch.Tensor):
        """p(x|z): (mu, log_sigma), each (B, data_dim)."""
        mu, ls = self.decoder(z).chunk(2, dim=-1)
        return mu, soft_clamp(ls, self.bound)

    def decode_eps(self, eps_z: torch.Tensor, eps_x: torch.Tensor) -> torch.Tensor:
        """x = T(eps) (Eq. 8): z = eps_z under the N(0, I) prior, x = mu(z) + sigma(z) * eps_x."""
        mu, ls = self.decode(eps_z)
        return mu + torch.exp(ls) * eps_x

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        eps_z = torch.randn(n, self.latent_dim, generator=generator)
        eps_x = torch.randn(n, self.data_dim, generator=generator)
        return self.decode_eps(eps_z, eps_x)

    def elbo(self, x: torch.Tensor, kl_weight: float = 1.0) -> torch.Tensor:
        """One-sample reparameterised ELBO (Eq. 3) per data point, (B,); analytic KL."""
        mu_q, ls_q = self.encode(x)
        z = mu_q + torch.exp(ls_q) * torch.randn_like(mu_q)
        mu_x, ls_x = self.decode(z)
        kl = 0.5 * (mu_q**2 + torch.exp(2 * ls_q) - 1 - 2 * ls_q).sum(-1)
        return normal_log_prob(x, mu_x, ls_x) - kl_weight * kl

    @torch.no_grad()
    def iwae(self, x: torch.Tensor, k: int, *, max_rows: int = 32768,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """IWAE bound (Burda et al., 2015) on log p(x) with k importance samples from q(z|x), (B,).
        A stochastic lower bound that tightens as k grows; evaluated in chunks of at most
        ``max_rows`` decoder rows."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        mu_q, ls_q = self.encode(x)
        out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
        kc = min(k, max_rows)  # samples per pass
        per = max(1, max_rows // kc)  # points per pass
        for i in range(0, x.shape[0], per):
            xs, mq, lq = x[i:i + per], mu_q[i:i + per], ls_q[i:i + per]
            parts = []
            for j in range(0, k, kc):
                kk = min(kc, k - j)
                eps = torch.randn(xs.shape[0], kk, self.latent_dim, generator=generator,
                                  dtype=x.dtype, device=x.device)
                z = mq[:, None] + torch.exp(lq)[:, None] * eps
                mu_x, ls_x = self.decode(z.reshape(-1, self.latent_dim))
                log_px = normal_log_prob(xs.repeat_interleave(kk, 0), mu_x, ls_x).view(-1, kk)
                log_pz = (-0.5 * z**2 - 0.5 * LOG_2PI).sum(-1)
                log_qz = (-0.5 * eps**2 - lq[:, None] - 0.5 * LOG_2PI).sum(-1)
                parts.append(torch.logsumexp(log_px + log_pz - log_qz, dim=1))
            out[i:i + per] = torch.logsumexp(torch.stack(parts, 1), dim=1) - math.log(k)
        return out


class ToyEnergy(nn.Module):
    """E(x): 4 fully connected layers of 256 units, x (B, data_dim) -> (B,).

    ``input_scale`` multiplies x before the first layer. An MLP learns low frequencies first
    (spectral bias); the energy must carve bumps as narrow as one mixture component (std 0.084),
    and scaling x up by 4 lets it do so in hundreds rather than thousands of steps."""

    def __init__(self, data_dim: int = 2, hidden: int = 256, layers: int = 4,
                 input_scale: float = 4.0):
        super().__init__()
        self.input_scale = float(input_scale)
        self.net = mlp(data_dim, 1, hidden, layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * self.input_scale).squeeze(-1)
