"""The 2-D experiment's pieces against independent computations, and a smoke-sized run.

Known answers used below: a ToyVAE with ``layers=1`` is a linear-Gaussian model
(x = b + A z + s * eps_x), so p_vae(x) = N(x; b, A A^T + s^2 I) exactly; with a quadratic energy
E(x) = a |x - c|^2 / 2 the normaliser is Z = (2 pi / a) N(b; c, A A^T + (s^2 + 1/a) I) in 2-D.
"""

import math

import numpy as np
import pytest
import torch

from vaebm.models.eps_space import EpsVAE, eps_energy_fn
from vaebm.toy.data import std_for_log_likelihood, twenty_five_gaussians
from vaebm.toy.experiment import (eps_langevin, heldout_log_likelihoods, log_partition,
                                  prior_mh, run_demo)
from vaebm.toy.models import ToyVAE, normal_log_prob

LATENT = 4
B = torch.tensor([0.3, -0.2], dtype=torch.float64)
ALPHA = torch.tensor([0.8, 0.5], dtype=torch.float64)  # latent dims 0, 1 drive x_0, x_1
S = 0.4  # decoder std


def linear_vae() -> ToyVAE:
    """x = B + diag(ALPHA) z[:2] + S eps_x; the encoder is set to the exact posterior. (log
    sigmas pass through the models' soft clamp bound * tanh(. / bound), inverted here.)"""
    vae = ToyVAE(2, LATENT, hidden=8, layers=1)

    def unclamp(v):
        return vae.bound * math.atanh(v / vae.bound)

    dec, enc = vae.decoder[0], vae.encoder[0]
    with torch.no_grad():
        dec.weight.zero_(), dec.bias.zero_()
        dec.weight[0, 0], dec.weight[1, 1] = ALPHA[0], ALPHA[1]
        dec.bias[:2] = B.float()
        dec.bias[2:] = unclamp(math.log(S))
        # posterior of z_i (i < 2): precision 1 + a^2/s^2, mean a (x - b) / (a^2 + s^2);
        # the other latents keep their N(0, 1) prior
        enc.weight.zero_(), enc.bias.zero_()
        for i in range(2):
            a2 = float(ALPHA[i]) ** 2
            enc.weight[i, i] = float(ALPHA[i]) / (a2 + S**2)
            enc.bias[i] = -float(ALPHA[i] * B[i]) / (a2 + S**2)
            enc.bias[LATENT + i] = unclamp(-0.5 * math.log(1 + a2 / S**2))
    return vae.eval()


def linear_vae_log_density(x):
    var = ALPHA**2 + S**2
    return (-0.5 * (x.double() - B) ** 2 / var - 0.5 * torch.log(2 * math.pi * var)).sum(-1)


class Quadratic(torch.nn.Module):
    def __init__(self, a, c):
        super().__init__()
        self.a, self.c = a, torch.tensor(c)

    def forward(self, x):
        return 0.5 * self.a * ((x - self.c.to(x.dtype)) ** 2).sum(-1)


def quadratic_log_z(a, c):
    var = ALPHA**2 + S**2 + 1 / a
    c = torch.tensor(c, dtype=torch.float64)
    return float(math.log(2 * math.pi / a)  # (2 pi / a)^(d/2), d = 2
                 + (-0.5 * (B - c) ** 2 / var - 0.5 * torch.log(2 * math.pi * var)).sum())


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


def test_toy_vae_follows_the_eps_space_contract():
    torch.manual_seed(0)
    vae = ToyVAE(2, 5, hidden=16, layers=3).eval()
    assert isinstance(vae, EpsVAE)
    assert vae.eps_shapes(7) == [torch.Size((7, 5)), torch.Size((7, 2))]
    eps = [torch.randn(s) for s in vae.eps_shapes(7)]
    out = vae.decode_eps(eps, t=0.5, with_log_prob=True)
    mu, ls = vae.decode(0.5 * eps[0])
    torch.testing.assert_close(out.x_mean, mu)
    torch.testing.assert_close(out.x_sample, mu + ls.exp() * eps[1])
    torch.testing.assert_close(out.log_p_x, normal_log_prob(out.x_sample, mu, ls))
    torch.testing.assert_close(out.log_p_z, normal_log_prob(0.5 * eps[0], torch.zeros(7, 5),
                                                            torch.zeros(7, 5)))
    assert vae.decode_eps(eps).log_p_z is None
    # encode_eps inverts T exactly (eps_x absorbs the residual)
    x = torch.randn(6, 2)
    back = vae.decode_eps(vae.encode_eps(x, generator=torch.Generator().manual_seed(0))).x_sample
    torch.testing.assert_close(back, x, atol=1e-5, rtol=1e-5)
    z_mean = vae.encode_eps(x, use_mean=True)[0]
    torch.testing.assert_close(z_mean, vae.encode(x)[0])
    # the official eps-space energy subtracts log p(z) + log p(x|z)
    energy = Quadratic(1.0, [0.0, 0.0])
    fn, lam = eps_energy_fn(vae, energy, "official")
    o = vae.decode_eps(eps, with_log_prob=True)
    assert lam == 0.0
    torch.testing.assert_close(fn(eps), energy(o.x_sample) - o.log_p_z - o.log_p_x)
    # stage-1 contract: -ELBO terms
    terms = vae.loss_terms(x)
    assert terms["log_p_x"].shape == (6,) and len(terms["kl"]) == 1 and terms["kl"][0].shape == (6,)
    assert (terms["kl"][0] >= 0).all() and vae.regularizers() == {}


def test_toy_vae_rejects_bad_eps():
    vae = ToyVAE(2, 5, hidden=16, layers=2)
    with pytest.raises(ValueError, match="eps_z"):
        vae.decode_eps([torch.randn(3, 4), torch.randn(3, 2)])
    with pytest.raises(ValueError, match="eps_x"):
        vae.decode_eps([torch.randn(3, 5), torch.randn(2, 2)])
    with pytest.raises(ValueError, match="list"):
        vae.decode_eps(torch.randn(3, 7))
    with pytest.raises(ValueError, match="x must be"):
        vae.encode_eps(torch.randn(3, 3))


def test_iwae_is_exact_for_the_exact_posterior():
    vae = linear_vae()
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    iw = vae.iwae(x, 3, generator=torch.Generator().manual_seed(1)).double()
    torch.testing.assert_close(iw, linear_vae_log_density(x), atol=2e-4, rtol=0)


def test_log_partition_against_closed_form():
    vae = linear_vae()
    for a, c in ((4.0, [0.5, 0.2]), (30.0, [-0.4, 0.9])):
        lz = log_partition(vae, Quadratic(a, c), lim=4.0, grid_n=256, n_samples=2**14,
                           generator=torch.Generator().manual_seed(0))
        want = quadratic_log_z(a, c)
        assert lz["log_z"] == pytest.approx(want, abs=0.02), (a, c)
        assert lz["log_z_mc"] == pytest.approx(want, abs=0.1)
    # E = 0 integrates p_vae itself: log Z = 0 up to the Monte Carlo error of the z draws
    x = torch.randn(2000, 2, generator=torch.Generator().manual_seed(5)) * 0.5
    lz0 = log_partition(vae, Quadratic(0.0, [0.0, 0.0]), lim=4.0, grid_n=256, n_samples=2**12,
                        generator=torch.Generator().manual_seed(0), x_check=x)
    assert lz0["log_z"] == pytest.approx(0.0, abs=1e-3)
    # the grid's cell densities reproduce the VAE's log density at test points
    assert lz0["vae_ll_grid"] == pytest.approx(linear_vae_log_density(x).mean().item(), abs=0.03)
    assert lz0["x_check_inside"] == 1.0


def test_a_grid_too_small_is_caught_by_the_tail_term():
    """Mass outside the grid comes from decoder samples that land there: with a grid of
    half-width 1 the estimate must still be close to the closed form."""
    vae = linear_vae()
    energy = Quadratic(1.0, [0.0, 0.0])
    lz = log_partition(vae, energy, lim=1.0, grid_n=128, n_samples=2**16,
                       generator=torch.Generator().manual_seed(0))
    assert lz["vae_mass_in_grid"] < 0.8
    assert lz["log_z"] == pytest.approx(quadratic_log_z(1.0, [0.0, 0.0]), abs=0.03)


def test_vaebm_log_likelihood_against_the_exact_density():
    """h(x) = p_vae(x) e^{-E(x)} / Z is Gaussian for the linear VAE and a quadratic energy."""
    vae = linear_vae()
    a, c = 10.0, [0.1, -0.3]
    energy = Quadratic(a, c)
    lz = log_partition(vae, energy, lim=4.0, grid_n=256, n_samples=2**14,
                       generator=torch.Generator().manual_seed(0))["log_z"]
    x = torch.randn(200, 2, generator=torch.Generator().manual_seed(2)) * 0.3
    ll = heldout_log_likelihoods(vae, energy, x, iwae_k=4, log_z=lz,
                              generator=torch.Generator().manual_seed(3))
    # exact: product of N(b, v) and N(c, 1/a) renormalised = N(m, w), per dimension
    m, w = _tilted_gaussian(a, c)
    exact = (-0.5 * (x.double() - m) ** 2 / w - 0.5 * torch.log(2 * math.pi * w)).sum(-1)
    torch.testing.assert_close(ll["vaebm"], exact, atol=0.02, rtol=0)
    torch.testing.assert_close(ll["vae"], linear_vae_log_density(x), atol=1e-3, rtol=0)


def _tilted_gaussian(a, c):
    """Mean and variance per dimension of p_vae(x) e^{-a |x - c|^2 / 2} / Z for the linear VAE."""
    v, ca = ALPHA**2 + S**2, torch.tensor(c, dtype=torch.float64)
    w = 1 / (1 / v + a)
    return w * (B / v + a * ca), w


@pytest.mark.parametrize("moves", ["prior_mh", "mala+prior_mh"])
def test_eps_space_chains_sample_the_vaebm_density(moves):
    """Chains from N(0, I) (VAE samples) moved by prior independence MH (and MALA) reach
    h(x) = p_vae(x) e^{-E(x)} / Z, a Gaussian with known mean and variance here."""
    vae, a, c = linear_vae(), 3.0, [0.6, -0.5]
    energy = Quadratic(a, c)
    g = torch.Generator().manual_seed(0)
    state = [torch.randn(s, generator=g) for s in vae.eps_shapes(4000)]
    acc = []
    for i in range(25):
        state, r = prior_mh(vae, energy, state, generator=g)
        acc.append(r)
        if moves == "mala+prior_mh":
            state, _ = eps_langevin(vae, energy, state, 1, 0.2, seed=i, mala=True)
    x = vae.decode_eps(state).x_sample.double()
    m, w = _tilted_gaussian(a, c)
    assert 0.05 < sum(acc) / len(acc) < 0.95
    torch.testing.assert_close(x.mean(0), m, atol=4 * (w / 4000).sqrt().max().item(), rtol=0)
    torch.testing.assert_close(x.var(0), w, atol=0.1 * w.max().item(), rtol=0)
    # and the VAE itself (no moves) is visibly different, so the test can fail
    x0 = vae.sample(4000, torch.Generator().manual_seed(1)).double()
    assert (x0.mean(0) - m).abs().max() > 10 * (w / 4000).sqrt().max()


def test_smoke_run_gives_finite_consistent_numbers(tmp_path):
    r = run_demo(str(tmp_path), plot=False, log=lambda *a: None, vae_steps=30, vae_batch=128,
                 ebm_steps=5, ebm_batch=64, ld_steps=3, n_test=300, iwae_k=20, grid_n=64,
                 z_samples=2048, n_plot=100, sample_steps=3)
    for k in ("vae", "vaebm", "true"):
        assert math.isfinite(r["test_ll"][k])
    assert r["gap_to_true"]["vae"] == pytest.approx(r["test_ll"]["true"] - r["test_ll"]["vae"])
    # an untrained-ish VAE is far below the truth; the IWAE bound can't beat the true density by much
    assert r["test_ll"]["vae"] < r["test_ll"]["true"] + 0.1
    assert 0.0 < r["ebm_final_accept"] <= 1.0
    for f in ("results.json", "vae.pt", "energy.pt", "samples.pt"):
        assert (tmp_path / f).is_file()


@pytest.mark.slow
def test_default_demo_closes_the_gap_to_the_true_density():
    """The full default run (a few minutes on 2 CPU cores): VAEBM within 0.40 nats of the true
    density (the paper's gap), and a clear improvement over the VAE."""
    r = run_demo(None, plot=False, log=lambda *a: None)
    assert r["gap_to_true"]["vaebm"] <= 0.40
    assert r["gap_to_true"]["vae"] - r["gap_to_true"]["vaebm"] >= 0.8


def _block_matplotlib(monkeypatch):
    import sys

    for name in ("matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError


def test_fig4_is_drawn_without_matplotlib(tmp_path, monkeypatch):
    """A fresh install has no matplotlib: the figure is drawn with numpy instead of skipped.
    Panel j shows points exactly where set j's samples are, nowhere else."""
    from vaebm.imageio import read_png
    from vaebm.toy.experiment import plot_samples

    _block_matplotlib(monkeypatch)
    lim, size, pad = 2.0, 480, 16  # render_panels' defaults
    sets = {"left": torch.tensor([[1.0, 1.0]]).repeat(50, 1),
            "right": torch.tensor([[-1.0, -1.5]]).repeat(50, 1)}
    path = plot_samples(str(tmp_path / "fig4.png"), sets, lim=lim)
    assert path == str(tmp_path / "fig4.png")
    raw = (tmp_path / "fig4.png").read_bytes()
    assert b"tEXt" in raw and b"left, right" in raw  # the panels' names
    img = read_png(path).astype(int)
    assert img.shape == (size + 2 * pad, 2 * size + 3 * pad, 3)

    def pixel(panel, x, y):
        col = int((x + lim) / (2 * lim) * size)
        row = int((lim - y) / (2 * lim) * size)
        return img[pad + row, pad + panel * (size + pad) + col]

    white = np.array([255, 255, 255])
    for panel, (x, y) in enumerate([(1.0, 1.0), (-1.0, -1.5)]):
        drawn = pixel(panel, x, y)
        assert drawn[2] > drawn[0] + 60, drawn  # the points' blue
        other = (-1.0, -1.5) if panel == 0 else (1.0, 1.0)
        assert (pixel(panel, *other) == white).all()  # the other set's place is empty here
    # only the splats are coloured inside the panels: 2 sets x 5 pixels
    inner = np.concatenate([img[pad:pad + size, pad + j * (size + pad):pad + j * (size + pad) + size]
                            .reshape(-1, 3) for j in range(2)])
    assert ((inner != white).any(1)).sum() == 2 * 5
    assert (img[pad - 1, pad:pad + size] < 128).all()  # a frame around each panel


def test_demo_reports_stages_by_time_and_draws_fig4_without_matplotlib(tmp_path, monkeypatch):
    """The README's main command on a fresh install: fig4.png is written (no 'skipping'), and
    every stage reports progress by time with its name (here every update: interval 0)."""
    _block_matplotlib(monkeypatch)
    monkeypatch.setenv("VAEBM_PROGRESS_INTERVAL", "0")
    monkeypatch.delenv("VAEBM_QUIET", raising=False)
    lines = []
    r = run_demo(str(tmp_path), log=lines.append, vae_steps=8, vae_batch=64, ebm_steps=4,
                 ebm_batch=32, ld_steps=2, n_test=100, iwae_k=5, grid_n=16, z_samples=1024,
                 n_plot=50, sample_steps=20)
    assert r["figure"] == str(tmp_path / "fig4.png") and (tmp_path / "fig4.png").is_file()
    text = "\n".join(lines)
    assert "skipping" not in text and "matplotlib" not in text
    for stage in ("stage 1/4 VAE: 4/8 steps (50%)", "stage 2/4 energy: 2/4 steps (50%)",
                  "stage 3/4 log Z: ", "stage 3/4 IWAE: 100/100 test points",
                  "stage 4/4 samples: 10/20 MALA steps (50%)"):
        assert stage in text, (stage, text)
    assert "ETA" in text and "-elbo" in text and "MALA accept" in text


def test_demo_plots_nothing_with_no_plot(tmp_path):
    r = run_demo(str(tmp_path), plot=False, log=lambda *a: None, vae_steps=2, vae_batch=16,
                 ebm_steps=1, ebm_batch=16, ld_steps=1, n_test=20, iwae_k=2, grid_n=8,
                 z_samples=256, n_plot=10, sample_steps=1)
    assert r["figure"] is None and not (tmp_path / "fig4.png").exists()


def test_cli_demo_is_quiet_with_quiet(monkeypatch, capsys, tmp_path):
    """``vaebm --quiet demo`` prints the results only; without it the stages come through."""
    import vaebm.toy.experiment as X
    from vaebm.cli import main

    def fake_run_demo(out, *, paper, plot, seed, log=print):
        log("stage 1/4 VAE: 1/2 steps")
        return {"timings": {"total_s": 1.0}, "figure": None}

    monkeypatch.setattr(X, "run_demo", fake_run_demo)
    monkeypatch.setattr(X, "format_table", lambda res: "RESULTS TABLE")
    for argv, talks in ((["demo"], True), (["--quiet", "demo"], False),
                        (["demo", "--quiet"], False)):
        assert main([*argv, "--out", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        assert "RESULTS TABLE" in out
        assert ("stage 1/4 VAE" in out) == talks, (argv, out)
