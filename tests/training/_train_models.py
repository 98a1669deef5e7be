"""Test-only models implementing the eps-space and stage-1 contracts
(vaebm/models/eps_space.py): a tiny two-group hierarchical conv VAE on (B, 3, 8, 8) images."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vaebm.models.eps_space import EpsDecode

LOG_2PI = math.log(2 * math.pi)


def _normal_lp(x, mu, ls):
    return (-0.5 * ((x - mu) * torch.exp(-ls)) ** 2 - ls - 0.5 * LOG_2PI).flatten(1).sum(1)


class TinyVAE(nn.Module):
    """z1 (B, 2, 2, 2) ~ N(0, I); z2 (B, 2, 4, 4) ~ N(mu(z1), sigma(z1)); x (B, C, R, R) ~
    N(mu(z2), sigma(z2)). T: z1 = eps1, z2 = mu + sigma eps2, x = mu_x + sigma_x eps_x."""

    def __init__(self, channels: int = 3, res: int = 8):
        super().__init__()
        self.c, self.r = channels, res
        self.p2 = nn.Conv2d(2, 4, 3, padding=1)           # prior of z2 given up(z1)
        self.dec = nn.Conv2d(2, 2 * channels, 3, padding=1)  # x given up(z2)
        self.enc1 = nn.Conv2d(channels, 4, 3, padding=1)  # q(z1 | x) at 2x2
        self.enc2 = nn.Conv2d(channels + 2, 4, 3, padding=1)  # q(z2 | x, z1) at 4x4
        self.bn = nn.BatchNorm2d(2)

    def eps_shapes(self, batch):
        return [torch.Size((batch, 2, 2, 2)), torch.Size((batch, 2, 4, 4)),
                torch.Size((batch, self.c, self.r, self.r))]

    def _prior2(self, z1):
        mu, ls = self.p2(F.interpolate(z1, scale_factor=2)).chunk(2, 1)
        return mu, 2 * torch.tanh(ls / 2)

    def _decoder(self, z2):
        mu, ls = self.dec(F.interpolate(z2, size=self.r)).chunk(2, 1)
        return torch.sigmoid(mu), -1.5 + torch.tanh(ls)

    def decode_eps(self, eps, *, t=1.0, with_log_prob=False):
        e1, e2, ex = eps
        z1 = t * e1
        mu2, ls2 = self._prior2(z1)
        z2 = mu2 + t * torch.exp(ls2) * e2
        mx, lx = self._decoder(z2)
        x = mx + torch.exp(lx) * ex
        lpz = lpx = None
        if with_log_prob:
            lpz = _normal_lp(z1, torch.zeros_like(z1), torch.zeros_like(z1)) + _normal_lp(z2, mu2, ls2)
            lpx = _normal_lp(x, mx, lx)
        return EpsDecode(x, mx, lpz, lpx)

    def _posterior(self, x, generator=None, use_mean=False):
        m1, l1 = self.enc1(F.adaptive_avg_pool2d(x, 2)).chunk(2, 1)
        z1 = m1 if use_mean else m1 + torch.exp(l1) * torch.randn(m1.shape, generator=generator)
        h = torch.cat([F.adaptive_avg_pool2d(x, 4), F.interpolate(z1, scale_factor=2)], 1)
        m2, l2 = self.enc2(h).chunk(2, 1)
        z2 = m2 if use_mean else m2 + torch.exp(l2) * torch.randn(m2.shape, generator=generator)
        return (z1, m1, l1), (z2, m2, l2)

    def encode_eps(self, x, *, use_mean=False, generator=None):
        (z1, _, _), (z2, _, _) = self._posterior(x, generator, use_mean)
        mu2, ls2 = self._prior2(z1)
        mx, lx = self._decoder(z2)
        return [z1, (z2 - mu2) * torch.exp(-ls2), (x - mx) * torch.exp(-lx)]

    def loss_terms(self, x):
        (z1, m1, l1), (z2, m2, l2) = self._posterior(x)
        mu2, ls2 = self._prior2(z1)
        kl1 = _normal_lp(z1, m1, l1) - _normal_lp(z1, torch.zeros_like(z1), torch.zeros_like(z1))
        kl2 = _normal_lp(z2, m2, l2) - _normal_lp(z2, mu2, ls2)
        mx, lx = self._decoder(z2)
        return {"log_p_x": _normal_lp(x, mx, lx), "kl": [kl1, kl2]}

    def regularizers(self):
        spec = sum(torch.linalg.matrix_norm(m.weight.flatten(1), ord=2)
                   for m in (self.p2, self.dec, self.enc1, self.enc2))
        return {"spectral": spec, "bn": self.bn.weight.abs().max()}

    @torch.no_grad()
    def iwae(self, x, k):
        out = []
        for _ in range(k):
            (z1, m1, l1), (z2, m2, l2) = self._posterior(x)
            mu2, ls2 = self._prior2(z1)
            mx, lx = self._decoder(z2)
            zero = torch.zeros_like(z1)
            out.append(_normal_lp(x, mx, lx) + _normal_lp(z1, zero, zero) + _normal_lp(z2, mu2, ls2)
                       - _normal_lp(z1, m1, l1) - _normal_lp(z2, m2, l2))
        return torch.logsumexp(torch.stack(out, 1), 1) - math.log(k)


def make_models(seed: int = 0, energy_preset: str = "tiny"):
    from vaebm.models import EnergyNet
    torch.manual_seed(seed)
    vae = TinyVAE()
    energy = EnergyNet(energy_preset)
    return vae, energy


def make_data(n: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g)
