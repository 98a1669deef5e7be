"""2-D toy densities with exact log densities: the 25-Gaussians set of Sec. 5.4 (and 8 Gaussians).

The paper gives no scale for the 25 Gaussians. The default puts the means on the grid
{-2, -1, 0, 1, 2}^2 (spacing 1) with isotropic component std 0.084: the components are ~12 std
apart, so the mixture's entropy is log 25 + log(2 pi e std^2) to within 1e-9 and its expected
log-likelihood is -(log 25 + log(2 pi e) + 2 log 0.084) = -1.1026 nats, the paper's -1.10.
"""

from __future__ import annotations

import math

import torch

#: std of each component, chosen so the true density scores about -1.10 nats (paper Sec. 5.4).
STD_25 = 0.084
SPACING_25 = 1.0
LOG_2PI = math.log(2 * math.pi)


class GaussianMixture2D:
    """Mixture of isotropic 2-D Gaussians: means (K, 2), one std per component (K,), weights (K,)."""

    def __init__(self, means, std, weights=None):
        self.means = torch.as_tensor(means, dtype=torch.float64).reshape(-1, 2)
        k = self.means.shape[0]
        self.std = torch.as_tensor(std, dtype=torch.float64).expand(k).clone()
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (k,) or (w < 0).any() or not torch.isclose(w.sum(), w.new_tensor(1.0)):
            raise ValueError("weights must be K non-negative numbers summing to 1")
        if (self.std <= 0).any():
            raise ValueError("std must be positive")
        self.weights = w

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n samples, (n, 2) float32; reproducible given ``generator``."""
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (self.means[idx] + self.std[idx, None] * noise).float()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log density at x (..., 2), computed in float64; returns (...) in x's dtype."""
        x64 = x.to(torch.float64)[..., None, :]  # (..., 1, 2)
        d2 = ((x64 - self.means) ** 2).sum(-1)  # (..., K)
        var = self.std**2
        comp = -0.5 * d2 / var - torch.log(2 * math.pi * var)
        return torch.logsumexp(comp + torch.log(self.weights), dim=-1).to(x.dtype)

    def separated_entropy(self) -> float:
        """Entropy if the components did not overlap: H(weights) + sum_k w_k log(2 pi e std_k^2).
        A lower bound-free closed form that is exact up to the (tiny) overlap."""
        w = self.weights
        h_cat = -(w * torch.log(w)).sum()
        return float(h_cat + (w * torch.log(2 * math.pi * math.e * self.std**2)).sum())

    @property
    def extent(self) -> float:
        """Half-width of a square centred at 0 that holds all but ~1e-15 of the mass."""
        return float((self.means.abs().max(1).values + 8 * self.std).max())


def twenty_five_gaussians(std: float = STD_25, spacing: float = SPACING_25) -> GaussianMixture2D:
    """25 equal-weight isotropic Gaussians on a 5 x 5 grid centred at the origin (Sec. 5.4)."""
    r = spacing * torch.arange(-2, 3, dtype=torch.float64)
    means = torch.cartesian_prod(r, r)
    return GaussianMixture2D(means, std)


def eight_gaussians(std: float = 0.02, radius: float = 2.0) -> GaussianMixture2D:
    """8 equal-weight Gaussians on a circle, a common companion toy set."""
    a = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    return GaussianMixture2D(radius * torch.stack([a.cos(), a.sin()], 1), std)


def std_for_log_likelihood(target: float, n_components: int = 25) -> float:
    """Component std giving expected log-likelihood ``target`` for well-separated, equal-weight
    components: target = -(log K + log(2 pi e) + 2 log std)."""
    return math.exp(0.5 * (-target - math.log(n_components) - LOG_2PI - 1.0))


DATASETS = {"25gaussians": twenty_five_gaussians, "8gaussians": eight_gaussians}


def get_dataset(name: str, **kwargs) -> GaussianMixture2D:
    if name not in DATASETS:
        raise ValueError(f"unknown toy data set {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name](**kwargs)
