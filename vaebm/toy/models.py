"""MLP VAE and MLP energy for the 2-D experiment of Sec. 5.4.

VAE: standard-normal prior p(z) = N(0, I) (latent_dim 20), Gaussian decoder
p(x|z) = N(mu(z), diag sigma(z)^2), Gaussian encoder q(z|x); encoder and decoder are 4 fully
connected layers with 256 hidden units. Its reparameterisation (Eq. 8) is
z = T_z(eps_z) = eps_z and x = T_x(z, eps_x) = mu(z) + sigma(z) * eps_x, so VAEBM's eps-space
energy (Eq. 9) is E(T(eps)) + |eps|^2 / 2: see :meth:`ToyVAE.decode_eps`. ToyVAE implements
the eps-space contract of :mod:`vaebm.models.eps_space` (``EpsVAE``: eps_shapes, decode_eps,
encode_eps; ``StageOneVAE``: loss_terms, regularizers, iwae).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..models.eps_space import EpsDecode

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

    # ---- the eps-space contract (vaebm/models/eps_space.py) ----------------------------------

    def eps_shapes(self, batch: int) -> list[torch.Size]:
        """Chain state shapes: [eps_z (batch, latent_dim), eps_x (batch, data_dim)]."""
        return [torch.Size((batch, self.latent_dim)), torch.Size((batch, self.data_dim))]

    def _check_eps(self, eps) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(eps, torch.Tensor) or len(eps) != 2:
            raise ValueError("eps must be a list [eps_z (B, latent_dim), eps_x (B, data_dim)]")
        eps_z, eps_x = eps
        if eps_z.dim() != 2 or eps_z.shape[1] != self.latent_dim:
            raise ValueError(f"eps_z must be (B, {self.latent_dim}), got {tuple(eps_z.shape)}")
        if eps_x.shape != (eps_z.shape[0], self.data_dim):
            raise ValueError(f"eps_x must be ({eps_z.shape[0]}, {self.data_dim}), "
                             f"got {tuple(eps_x.shape)}")
        return eps_z, eps_x

    def decode_eps(self, eps, *, t: float = 1.0, with_log_prob: bool = False) -> EpsDecode:
        """x = T(eps) (Eq. 8): z = t * eps_z (prior N(0, t^2 I)), x = mu(z) + sigma(z) * eps_x.
        eps: [eps_z (B, latent_dim), eps_x (B, data_dim)]. log_p_z is log N(z; 0, I) and
        log_p_x is log N(x; mu(z), sigma(z)^2), both (B,), when ``with_log_prob``."""
        eps_z, eps_x = self._check_eps(eps)
        z = eps_z * t if t != 1.0 else eps_z
        mu, ls = self.decode(z)
        x = mu + torch.exp(ls) * eps_x
        if not with_log_prob:
            return EpsDecode(x, mu, None, None)
        log_p_z = (-0.5 * z**2 - 0.5 * LOG_2PI).sum(-1)
        log_p_x = (-0.5 * eps_x**2 - ls - 0.5 * LOG_2PI).sum(-1)  # = normal_log_prob(x, mu, ls)
        return EpsDecode(x, mu, log_p_z, log_p_x)

    def encode_eps(self, x: torch.Tensor, *, use_mean: bool = False,
                   generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Inverse of T: z from q(z|x) (its mean with ``use_mean``), eps_z = z (the prior is
        N(0, I)), eps_x = (x - mu(z)) / sigma(z), so decode_eps reproduces x exactly."""
        if x.dim() != 2 or x.shape[1] != self.data_dim:
            raise ValueError(f"x must be (B, {self.data_dim}), got {tuple(x.shape)}")
        mu_q, ls_q = self.encode(x)
        z = mu_q if use_mean else mu_q + torch.exp(ls_q) * torch.randn(
            mu_q.shape, generator=generator, dtype=mu_q.dtype, device=mu_q.device)
        mu, ls = self.decode(z)
        return [z, (x - mu) * torch.exp(-ls)]

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n VAE samples x ~ p(x), (n, data_dim)."""
        eps = [torch.randn(s, generator=generator) for s in self.eps_shapes(n)]
        return self.decode_eps(eps).x_sample

    # ---- stage-1 training contract -------------------------------------------------------------

    def loss_terms(self, x: torch.Tensor) -> dict:
        """One reparameterised pass: {"log_p_x": (B,), "kl": [(B,)]} (one latent group, analytic
        KL to N(0, I)); -ELBO = -log_p_x + sum(kl)."""
        mu_q, ls_q = self.encode(x)
        z = mu_q + torch.exp(ls_q) * torch.randn_like(mu_q)
        mu_x, ls_x = self.decode(z)
        kl = 0.5 * (mu_q**2 + torch.exp(2 * ls_q) - 1 - 2 * ls_q).sum(-1)
        return {"log_p_x": normal_log_prob(x, mu_x, ls_x), "kl": [kl]}

    def regularizers(self) -> dict:
        """No spectral or BatchNorm regulariser in the MLP VAE."""
        return {}

    def elbo(self, x: torch.Tensor, kl_weight: float = 1.0) -> torch.Tensor:
        """One-sample reparameterised ELBO (Eq. 3) per data point, (B,); analytic KL."""
        t = self.loss_terms(x)
        return t["log_p_x"] - kl_weight * t["kl"][0]

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
    (spectral bias); the energy must carve wells as narrow as one mixture component (std 0.084)
    with walls between modes 1 apart, and scaling x up (by 8 in the demo) lets it do so in
    hundreds rather than thousands of steps."""

    def __init__(self, data_dim: int = 2, hidden: int = 256, layers: int = 4,
                 input_scale: float = 8.0):
        super().__init__()
        self.input_scale = float(input_scale)
        self.net = mlp(data_dim, 1, hidden, layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * self.input_scale).squeeze(-1)
