"""vaebm_sample: batch invariance, seeding, known stationary laws, low-temperature starts, errors."""

import numpy as np
import pytest
import torch
from scipy import stats

from vaebm.imageio import make_grid, read_png, save_grid
from vaebm.models.eps_space import EpsDecode, EpsVAE
from vaebm.sampling.generate import initial_eps, vaebm_sample


class LinearVAE(torch.nn.Module):
    """z ~ N(0, I) (4 dims, one group); x = sigmoid-free affine image: mu = A z + b, sigma = s.
    Images (B, 1, 2, 2) kept inside [0, 1] loosely; exact maths needs no clamp."""

    def __init__(self, s=0.05):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.A = torch.nn.Parameter(0.1 * torch.randn(4, 4, generator=g))
        self.b = torch.nn.Parameter(torch.full((4,), 0.5))
        self.s = s

    def eps_shapes(self, batch):
        return [torch.Size((batch, 4)), torch.Size((batch, 1, 2, 2))]

    def decode_eps(self, eps, *, t=1.0, with_log_prob=False):
        z = t * eps[0]
        mu = (z @ self.A.T + self.b).view(-1, 1, 2, 2)
        x = mu + self.s * eps[1]
        lpz = lpx = None
        if with_log_prob:
            lpz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
            lpx = torch.distributions.Normal(mu, self.s).log_prob(x).flatten(1).sum(1)
        return EpsDecode(x, mu, lpz, lpx)

    def encode_eps(self, x, *, use_mean=False, generator=None):
        # least-squares inverse of the mean map; eps_x reproduces x exactly
        z = torch.linalg.solve(self.A, (x.flatten(1) - self.b).T).T
        mu = (z @ self.A.T + self.b).view(-1, 1, 2, 2)
        return [z, (x - mu) / self.s]


def test_contract_and_batch_invariance():
    vae = LinearVAE()
    assert isinstance(vae, EpsVAE)
    energy = lambda x: ((x - 0.3) ** 2).flatten(1).sum(1)  # noqa: E731
    a = vaebm_sample(vae, energy, 7, steps=5, step_size=1e-2, batch=7, seed=3, backend="torch")
    b = vaebm_sample(vae, energy, 7, steps=5, step_size=1e-2, batch=3, seed=3, backend="torch")
    torch.testing.assert_close(a["samples"], b["samples"], rtol=0, atol=1e-6)
    torch.testing.assert_close(a["initial"], b["initial"], rtol=0, atol=0)
    tail = vaebm_sample(vae, energy, 4, steps=5, step_size=1e-2, batch=2, seed=3,
                        backend="torch", first_index=3)
    torch.testing.assert_close(tail["samples"], a["samples"][3:], rtol=0, atol=1e-6)
    c = vaebm_sample(vae, energy, 7, steps=5, step_size=1e-2, batch=7, seed=4, backend="torch")
    assert (a["samples"] - c["samples"]).abs().max() > 1e-3  # another seed, other chains
    assert a["samples"].shape == (7, 1, 2, 2) and a["energy"].shape == (7,)
    torch.testing.assert_close(a["energy"], energy(a["samples"]))
    # the weights were frozen while sampling and restored afterwards
    assert all(p.requires_grad for p in vae.parameters())


def test_initial_eps_is_standard_normal():
    vae = LinearVAE()
    eps = initial_eps(vae, 0, 4000, seed=11)
    flat = torch.cat([e.flatten(1) for e in eps], 1).flatten().numpy()
    assert stats.kstest(flat, "norm").pvalue > 1e-3
    assert abs(np.corrcoef(eps[0][:, 0], eps[0][:, 1])[0, 1]) < 0.06


def test_zero_energy_keeps_the_prior():
    """With E = 0 the paper's eps-space target is N(0, I): chains started there stay there.
    Step size 0.1 for 30 steps; the stationary variance of this discretisation is
    1 / (1 - eta/4) = 1.026, within the test's tolerance of the exact 1."""
    vae = LinearVAE()
    zero = lambda x: 0.0 * x.flatten(1).sum(1)  # noqa: E731
    out = vaebm_sample(vae, zero, 2000, steps=30, step_size=0.1, batch=2000, seed=5,
                       output="sample", backend="torch")
    x = out["samples"].flatten(1).double()
    cov_true = (vae.A @ vae.A.T).detach().double() + vae.s ** 2 * torch.eye(4, dtype=torch.double)
    cov = torch.cov(x.T)
    assert torch.allclose(cov, cov_true * 1.026, atol=0.004), (cov, cov_true)
    assert torch.allclose(x.mean(0), torch.full((4,), 0.5, dtype=torch.double), atol=0.01)


def test_energy_tilts_towards_its_minimum():
    """A quadratic energy pulls the samples' mean towards its centre: E = k |x - c|^2 with k
    large moves the mean of x from 0.5 most of the way to c = 0.2 (exact Gaussian product;
    unadjusted Langevin on a Gaussian target has the exact mean at any stable step size)."""
    vae = LinearVAE()
    k, c = 200.0, 0.2
    energy = lambda x: k * ((x - c) ** 2).flatten(1).sum(1)  # noqa: E731
    out = vaebm_sample(vae, energy, 1000, steps=200, step_size=0.05, batch=1000, seed=1,
                       output="sample", backend="torch")
    # exact target in x: N(m, S) with S = (C^-1 + 2k I)^-1, m = S (C^-1 mu0 + 2k c)
    C = ((vae.A @ vae.A.T) + vae.s ** 2 * torch.eye(4)).detach().double()
    Ci = torch.linalg.inv(C)
    S = torch.linalg.inv(Ci + 2 * k * torch.eye(4, dtype=torch.double))
    m = S @ (Ci @ torch.full((4,), 0.5, dtype=torch.double) + 2 * k * c)
    x = out["samples"].flatten(1).double()
    assert torch.allclose(x.mean(0), m, atol=0.01), (x.mean(0), m)


def test_official_mode_and_low_temperature_start():
    vae = LinearVAE()
    energy = lambda x: ((x - 0.3) ** 2).flatten(1).sum(1)  # noqa: E731
    a = vaebm_sample(vae, energy, 5, steps=3, step_size=1e-3, mode="official", seed=2,
                     backend="torch")
    assert torch.isfinite(a["samples"]).all()
    lt = vaebm_sample(vae, energy, 5, steps=0, step_size=1e-3, start="low_temp", start_t=0.5,
                      seed=2, backend="torch")
    # with no steps the output is the decoder mean of the encoded low-temperature sample
    eps = initial_eps(vae, 0, 5, 2)
    want = vae.decode_eps(eps, t=0.5).x_mean
    torch.testing.assert_close(lt["samples"], want.detach(), atol=1e-5, rtol=0)


def test_chain_frames_every_k():
    vae = LinearVAE()
    energy = lambda x: (x ** 2).flatten(1).sum(1)  # noqa: E731
    out = vaebm_sample(vae, energy, 4, steps=6, step_size=1e-2, every=2, seed=0, batch=3,
                       backend="torch")
    assert out["chain"].shape == (3, 4, 1, 2, 2)
    torch.testing.assert_close(out["chain"][-1], out["samples"])


@pytest.mark.parametrize("kw, msg", [({"n": 0}, "n must"), ({"steps": -1}, "steps"),
                                     ({"step_size": 0.0}, "step_size"), ({"batch": 0}, "batch"),
                                     ({"mode": "nope"}, "mode"), ({"start": "x"}, "start"),
                                     ({"output": "x"}, "output")])
def test_bad_arguments(kw, msg):
    args = {"n": 2, "steps": 1, "step_size": 1e-3, "batch": 2}
    args.update(kw)
    n = args.pop("n")
    with pytest.raises(ValueError, match=msg):
        vaebm_sample(LinearVAE(), lambda x: x.sum((1, 2, 3)), n, **args)
    with pytest.raises(TypeError, match="eps-space contract"):
        vaebm_sample(object(), lambda x: x, 2)


def test_png_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(5, 3, 4, 6, generator=g)
    grid = save_grid(imgs, tmp_path / "g.png", nrow=3, padding=1)
    back = read_png(tmp_path / "g.png")
    assert grid.shape == (2 * 5 + 1, 3 * 7 + 1, 3)
    np.testing.assert_array_equal(back, grid)
    # image 4 sits in row 1, column 1 of the grid
    want = np.round(imgs[4].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    np.testing.assert_array_equal(back[6:10, 8:14], want)
    grey = make_grid(torch.rand(2, 1, 3, 3))
    assert grey.shape[2] == 1
    with pytest.raises(ValueError, match="NaN"):
        make_grid(torch.full((1, 1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="C in 1, 3, 4"):
        make_grid(torch.rand(1, 2, 2, 2))


def test_samples_are_images_in_unit_range():
    """A decoder mean outside [0, 1] is clamped, so the samples can be fed to the metrics."""
    vae = LinearVAE()
    with torch.no_grad():
        vae.A.mul_(30.0)  # means spread far beyond [0, 1]
    zero = lambda x: x.flatten(1).sum(1) * 0.0  # noqa: E731
    r = vaebm_sample(vae, zero, 16, steps=2, step_size=1e-3, batch=8, seed=0, every=1,
                     backend="torch")
    for k in ("samples", "initial", "chain"):
        assert r[k].min() >= 0.0 and r[k].max() <= 1.0, k
    eps = initial_eps(vae, 0, 16, 0)
    raw = vae.decode_eps(eps).x_mean
    assert (raw < 0).any() and (raw > 1).any()  # the test would catch a missing clamp
    torch.testing.assert_close(r["initial"], raw.clamp(0, 1).detach())
