"""The 2-D experiment's pieces against independent computations, and a smoke-sized run."""

import math

import numpy as np
import pytest
import torch

from vaebm.toy.data import std_for_log_likelihood, twenty_five_gaussians
from vaebm.toy.experiment import run_demo


def test_mixture_log_density_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    special = pytest.importorskip("scipy.special")
    data = twenty_five_gaussians()
    x = data.sample(500, torch.Generator().manual_seed(0)).double()
    comps = np.stack([stats.multivariate_normal(m.numpy(), data.std[0].item() ** 2).logpdf(x.numpy())
                      for m in data.means], 1)
    want = special.logsumexp(comps, axis=1) - math.log(25)
    np.testing.assert_allclose(data.log_prob(x).numpy(), want, rtol=1e-10, atol=1e-10)


def test_scale_gives_the_papers_true_log_likelihood():
    data = twenty_five_gaussians()
    x = data.sample(200_000, torch.Generator().manual_seed(1))
    ll = data.log_prob(x).double().mean().item()
    assert abs(ll - (-1.10)) < 0.05
    assert abs(std_for_log_likelihood(-1.10) - data.std[0].item()) < 0.01


def test_smoke_run_gives_finite_consistent_numbers(tmp_path):
    r = run_demo(str(tmp_path), plot=False, log=lambda *a: None, vae_steps=30, ebm_steps=10,
                 n_test=300, iwae_k=20, grid_n=64, z_samples=2048, n_plot=100, sample_steps=3)
    for k in ("vae", "vaebm", "true"):
        assert math.isfinite(r["test_ll"][k])
    assert r["gap_to_true"]["vae"] == pytest.approx(r["test_ll"]["true"] - r["test_ll"]["vae"])
    # an untrained-ish VAE is far below the truth; the IWAE bound can't beat the true density by much
    assert r["test_ll"]["vae"] < r["test_ll"]["true"] + 0.1
    for f in ("results.json", "vae.pt", "energy.pt", "samples.pt"):
        assert (tmp_path / f).is_file()
