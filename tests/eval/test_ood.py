"""OOD detection: AUROC against Mann-Whitney U and a brute-force pair count, the log h(x) score
from the VAE contract, and the OOD set builders."""

import numpy as np
import pytest
import torch

from vaebm.eval import ood

pytest.importorskip("sklearn")
stats = pytest.importorskip("scipy.stats")


def pair_count_auroc(a, b):
    """P(score_in > score_out) + 0.5 P(tie), by brute force over all pairs."""
    d = np.asarray(a)[:, None] - np.asarray(b)[None, :]
    return float(((d > 0) + 0.5 * (d == 0)).mean())


@pytest.mark.parametrize("seed", [0, 1])
def test_auroc_matches_mann_whitney_and_pairs(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(0.5, 1.0, 137)
    b = rng.normal(0.0, 1.0, 91)
    got = ood.auroc(a, b)
    u = stats.mannwhitneyu(a, b, alternative="two-sided").statistic
    assert got == pytest.approx(u / (a.size * b.size), rel=1e-12)
    assert got == pytest.approx(pair_count_auroc(a, b), rel=1e-12)
    # integer scores: many ties, which count one half
    ai, bi = rng.integers(0, 5, 60), rng.integers(0, 4, 70)
    assert ood.auroc(ai, bi) == pytest.approx(pair_count_auroc(ai, bi), rel=1e-12)


def test_auroc_extremes_and_errors():
    assert ood.auroc([3, 4, 5], [0, 1, 2]) == 1.0
    assert ood.auroc([0, 1, 2], [3, 4, 5]) == 0.0
    with pytest.raises(ValueError, match="NaN"):
        ood.auroc([0, np.nan], [1, 2])
    with pytest.raises(ValueError, match="both"):
        ood.auroc([], [1.0])


class ToyVAE:
    """Implements StageOneVAE's loss_terms and iwae with known values."""

    def loss_terms(self, x):
        s = x.flatten(1).sum(1)
        return {"log_p_x": -s, "kl": [0.5 * s, torch.ones_like(s)]}

    def iwae(self, x, k):
        return -x.flatten(1).sum(1) + float(k)


def test_log_h_from_elbo_and_iwae():
    vae = ToyVAE()
    x = torch.rand(5, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    s = x.flatten(1).sum(1)
    energy = lambda t: 2.0 * t.flatten(1).mean(1, keepdim=True)  # noqa: E731  (B, 1)
    elbo = ood.elbo_log_p(vae)(x)
    assert torch.allclose(elbo, -s - 0.5 * s - 1.0)
    h = ood.log_h_fn(ood.elbo_log_p(vae), energy)(x)
    assert h.shape == (5,) and torch.allclose(h, elbo - 2.0 * x.flatten(1).mean(1))
    assert torch.allclose(ood.log_h_fn(ood.iwae_log_p(vae, 7))(x), -s + 7.0)
    with pytest.raises(ValueError, match="k must"):
        ood.iwae_log_p(vae, 0)


def test_score_images_batches_and_errors():
    x = torch.rand(23, 1, 3, 3, generator=torch.Generator().manual_seed(1))
    fn = lambda t: t.flatten(1).sum(1)  # noqa: E731
    s = ood.score_images(x, fn, batch_size=5)
    np.testing.assert_allclose(s, x.flatten(1).sum(1).double().numpy(), rtol=1e-6)
    assert ood.score_images(x, fn, n=7).shape == (7,)
    with pytest.raises(ValueError, match="returned 1 scores"):
        ood.score_images(x, lambda t: t.sum().reshape(1), batch_size=4)


def test_ood_auroc_end_to_end():
    g = torch.Generator().manual_seed(2)
    inside = (0.5 + 0.05 * torch.randn(200, 3, 4, 4, generator=g)).clamp(0, 1)
    score = lambda t: -((t - 0.5) ** 2).flatten(1).sum(1)  # noqa: E731
    sets = {"noise": ood.noise_images(150, (3, 4, 4), generator=g),
            "interp": ood.interpolate_images(inside, 100, generator=g)}
    r = ood.ood_auroc(score, inside, sets, batch_size=64)
    assert r["in"]["n"] == 200 and r["noise"]["n"] == 150
    assert r["noise"]["auroc"] > 0.99  # uniform noise is far from 0.5
    # interpolations of near-0.5 images are themselves near 0.5 -- closer, so AUROC < 0.5
    assert r["interp"]["auroc"] < 0.5
    s_in, s_out = r["scores"]["in"], r["scores"]["noise"]
    assert r["noise"]["auroc"] == pytest.approx(pair_count_auroc(s_in, s_out))
    with pytest.raises(ValueError, match="empty"):
        ood.ood_auroc(score, inside, {})


def test_noise_images():
    g = torch.Generator().manual_seed(3)
    u = ood.noise_images(1000, (3, 8, 8), generator=g)
    assert u.shape == (1000, 3, 8, 8) and u.min() >= 0 and u.max() <= 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    n = ood.noise_images(1000, (3, 8, 8), kind="gaussian", generator=g)
    assert n.min() >= 0 and n.max() <= 1 and abs(n.mean().item() - 0.5) < 0.01
    c = ood.noise_images(4, (3, 8, 8), kind="constant", generator=g)
    assert (c == c[:, :1, :1, :1]).all()
    with pytest.raises(ValueError, match="kind"):
        ood.noise_images(2, kind="salt")


def test_interpolate_images():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(6, 3, 4, 4, generator=g)
    out, pairs, a = ood.interpolate_images(x, 50, alpha=0.3, generator=g, return_pairs=True)
    assert out.shape == (50, 3, 4, 4)
    assert (pairs[:, 0] != pairs[:, 1]).all() and set(pairs.flatten().tolist()) <= set(range(6))
    want = 0.7 * x[pairs[:, 0]] + 0.3 * x[pairs[:, 1]]
    assert torch.allclose(out, want) and torch.allclose(a, torch.full((50,), 0.3))
    _, _, a = ood.interpolate_images(x, 200, alpha=None, generator=g, return_pairs=True)
    assert a.min() >= 0 and a.max() <= 1 and a.std() > 0.2
    u8 = ood.interpolate_images((x * 255).round().to(torch.uint8), 3, generator=g)
    assert u8.dtype == torch.float32 and u8.max() <= 1
    with pytest.raises(ValueError, match="N >= 2"):
        ood.interpolate_images(x[:1])
    with pytest.raises(ValueError, match="alpha"):
        ood.interpolate_images(x, alpha=1.5)


def test_grey_to_rgb():
    g = torch.Generator().manual_seed(5)
    d = (torch.rand(4, 28, 28, generator=g) * 255).to(torch.uint8)
    out = ood.grey_to_rgb(d)
    assert out.shape == (4, 3, 32, 32)
    assert torch.equal(out[:, 0, 2:30, 2:30], d.float() / 255)
    assert out[:, :, :2].abs().sum() == 0 and out[:, :, :, 30:].abs().sum() == 0
    assert torch.equal(out[:, 0], out[:, 2])
    r = ood.grey_to_rgb(d.float() / 255, 32, mode="resize")
    assert r.shape == (4, 3, 32, 32) and r.min() >= 0 and r.max() <= 1
    # a dataset of (x (1, H, W), y), as vaebm.data yields
    ds = [(d[i:i + 1].float() / 255, i) for i in range(4)]
    assert torch.equal(ood.grey_to_rgb(ds), out)
    with pytest.raises(ValueError, match="mode='resize'"):
        ood.grey_to_rgb(d, 16)
    with pytest.raises(ValueError, match="grey"):
        ood.grey_to_rgb(torch.rand(2, 3, 28, 28))
