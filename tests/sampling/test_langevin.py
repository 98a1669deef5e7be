"""FusedLangevin and langevin_sample: statistics, reproducibility, guard and input errors."""

import math

import numpy as np
import pytest
import torch

from vaebm import FusedLangevin, langevin_sample
from vaebm.ops import BackendUnavailable

CPU_BACKENDS = ["torch", "cpp"]  # triton is covered op by op (the interpreter is too slow for chains)


def quadratic(x):
    return 0.5 * x.flatten(1).pow(2).sum(1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("eta,sigma", [(0.5, 1.0), (0.2, 0.3)])
def test_stationary_variance_of_discretised_chain(backend, eta, sigma):
    """E = |x|^2/2, lam = 0: x' = (1 - eta/2) x + sigma sqrt(eta) xi has the exact stationary
    variance sigma^2 / (1 - eta/4) (not sigma^2: the discretisation bias is part of the check)."""
    B, D = 512, 64
    x = torch.zeros(B, D)
    burn = int(math.ceil(12 / eta))  # (1 - eta/2)^(2 burn) < 1e-5: the start is forgotten
    x = langevin_sample(quadratic, x, burn, eta, sigma=sigma, seed=11, backend=backend)
    want = sigma**2 / (1 - eta / 4)
    n = B * D
    got = x.double().pow(2).mean().item()  # the mean is 0 by symmetry
    se = want * math.sqrt(2 / n)
    assert abs(got - want) < 5 * se, (got, want, se)
    # the naive value sigma^2 is distinguishable at this size: the test has power
    assert abs(sigma**2 - want) > 5 * se


def test_lam_adds_standard_normal_base_density():
    """E = 0 and lam = 1: the eps-space chain of Eq. 9 targets N(0, 1/(1 - eta/4))."""
    eta = 0.4
    x = langevin_sample(lambda x: 0 * x.sum(1), torch.full((1024, 32), 3.0), 60, eta, lam=1.0,
                        seed=3, backend="torch")
    want = 1 / (1 - eta / 4)
    assert abs(x.mean().item()) < 0.01
    assert abs(x.var().item() - want) < 5 * want * math.sqrt(2 / x.numel())


def banana_energy(x):
    # x1 ~ N(0, 1), x2 | x1 ~ N(x1^2 / 2, 0.5^2)
    x1, x2 = x[:, 0], x[:, 1]
    return 0.5 * x1**2 + 0.5 * (x2 - 0.5 * x1**2) ** 2 / 0.25


def banana_exact(n, gen):
    x1 = torch.randn(n, generator=gen)
    return torch.stack([x1, 0.5 * x1**2 + 0.5 * torch.randn(n, generator=gen)], 1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mala_matches_exact_samples_where_ula_is_biased(backend):
    stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(0)
    B, eta, steps = 4000, 0.35, 300
    x0 = torch.randn(B, 2, generator=gen)  # not the target
    exact = banana_exact(B, gen).numpy()
    mala, st = langevin_sample(banana_energy, x0, steps, eta, seed=5, mala=True, backend=backend,
                               return_stats=True)
    ula = langevin_sample(banana_energy, x0, steps, eta, seed=5, backend=backend)
    rate = st.acceptance_rate.item()
    assert 0.3 < rate < 0.99
    proj = lambda a: a[:, 1] - 0.25 * a[:, 0] ** 2  # noqa: E731 (a non-trivial 1-D statistic)
    for j, f in enumerate([lambda a: a[:, 0], lambda a: a[:, 1], proj]):
        p = stats.ks_2samp(f(mala.numpy()), f(exact)).pvalue
        assert p > 1e-3, (j, p)
    # at this step size the unadjusted chain is measurably wrong: the test can fail
    worst = min(stats.ks_2samp(f(ula.numpy()), f(exact)).pvalue
                for f in [lambda a: a[:, 0], lambda a: a[:, 1], proj])
    assert worst < 1e-4


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mala", [False, True])
def test_batch_invariance(backend, mala):
    gen = torch.Generator().manual_seed(2)
    shapes = [(3, 4, 4), (5,)]
    x = [torch.randn(64, *s, generator=gen) for s in shapes]
    kw = dict(seed=99, lam=1.0, clip_grad_norm=3.0, mala=mala, backend=backend)
    energy = lambda xs: sum(quadratic(t) for t in xs) + xs[0].flatten(1).sin().sum(1)  # noqa
    full = langevin_sample(energy, x, 7, 0.05, **kw)
    for i in (0, 17, 63):
        one = langevin_sample(energy, [t[i:i + 1] for t in x], 7, 0.05, sample_offset=i, **kw)
        for f, o in zip(full, one):
            torch.testing.assert_close(o[0], f[i], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("policy", ["reject", "reset"])
@pytest.mark.parametrize("mala", [False, True])
def test_nan_in_one_chain_leaves_others_identical(backend, policy, mala):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(16, 10, generator=gen)
    kw = dict(seed=8, lam=1.0, on_nonfinite=policy, mala=mala, backend=backend)

    def energy(z):
        return quadratic(z) + torch.cos(z).sum(1)

    clean = langevin_sample(energy, x, 6, 0.1, **kw)
    bad = x.clone()
    bad[5, 3] = float("nan")
    out, st = langevin_sample(energy, bad, 6, 0.1, return_stats=True, **kw)
    others = torch.arange(16) != 5
    assert torch.equal(out[others], clean[others])
    assert st.guarded[:, others].sum() == 0
    if policy == "reject":
        assert st.n_guarded.item() == 6 and torch.isnan(out[5, 3])
    else:  # restarted from fresh noise at the first step, then sampled normally
        assert st.n_guarded.item() == 1 and torch.isfinite(out[5]).all()


def test_energy_nan_for_one_chain_is_rejected_and_counted():
    x = torch.randn(8, 4)

    def energy(z):
        # an infinite constant for chain 2 (a where() over e * inf would poison every gradient)
        return quadratic(z) + torch.where(torch.arange(8) == 2, float("inf"), 0.0)

    sampler = FusedLangevin(x, 0.1, seed=1, backend="torch")
    x0 = x.clone()
    for _ in range(3):
        sampler.step(energy)
    assert torch.equal(x[2], x0[2])
    assert not torch.equal(x[3], x0[3])
    s = sampler.stats.summary()
    assert s["guarded"] == 3 and math.isfinite(s["energy_last"])


def test_clipping_and_clamping():
    x = torch.zeros(4, 100)
    # a steep energy: gradient 1e4 per element; clipped to norm 1 the drift is tiny
    steep = lambda z: 1e4 * z.sum(1)  # noqa: E731
    out = langevin_sample(steep, x, 1, 1e-2, sigma=0.0, clip_grad_norm=1.0, seed=0)
    torch.testing.assert_close(out.norm(dim=1), torch.full((4,), 0.5e-2))
    out = langevin_sample(steep, x, 1, 1e-2, sigma=0.0, clip_grad_value=0.1, seed=0)
    torch.testing.assert_close(out, torch.full_like(x, -0.5e-3))
    out = langevin_sample(steep, x, 5, 1.0, clamp=(-1.0, 1.0), seed=0)
    assert out.min() == -1.0 and out.max() <= 1.0


def test_parameters_untouched_and_input_not_modified():
    net = torch.nn.Linear(6, 1)
    x = torch.randn(5, 6)
    x0 = x.clone()
    w0 = net.weight.detach().clone()
    out = langevin_sample(lambda z: net(z).squeeze(1) + quadratic(z), x, 3, 0.1, seed=0)
    assert net.weight.grad is None and torch.equal(net.weight, w0)
    assert torch.equal(x, x0) and not torch.equal(out, x0)


def test_seed_reproducible_and_distinct():
    x = torch.zeros(3, 7)
    a = langevin_sample(quadratic, x, 4, 0.1, seed=1)
    b = langevin_sample(quadratic, x, 4, 0.1, seed=1)
    c = langevin_sample(quadratic, x, 4, 0.1, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_callback_sees_every_step():
    seen = []
    langevin_sample(quadratic, torch.zeros(2, 3), 5, 0.1, seed=0,
                    callback=lambda d: seen.append((d["i"], d["energy"].shape)))
    assert seen == [(i, (2,)) for i in range(5)]


@pytest.mark.parametrize("make,match", [
    (lambda: FusedLangevin([], 0.1), "empty"),
    (lambda: FusedLangevin([torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64)], 0.1), "dtype"),
    (lambda: FusedLangevin([torch.zeros(2, 3), torch.zeros(3, 3)], 0.1), "batch size"),
    (lambda: FusedLangevin([torch.zeros(2, 3), torch.zeros(2, 3, device="meta")], 0.1), "device"),
    (lambda: FusedLangevin(torch.zeros(2, 3), 0.0), "step_size"),
    (lambda: FusedLangevin(torch.zeros(2, 3), float("nan")), "step_size"),
    (lambda: FusedLangevin(torch.zeros(2, 3), -1e-3), "step_size"),
    (lambda: FusedLangevin(torch.zeros(2, 3), 0.1, mala=True, clamp=(0, 1)), "clamp"),
    (lambda: FusedLangevin(torch.zeros(2, 3), 0.1, on_nonfinite="explode"), "on_nonfinite"),
    (lambda: FusedLangevin(torch.zeros(2, 3, dtype=torch.int64), 0.1), "floating point"),
    (lambda: FusedLangevin(torch.zeros(2, 0), 0.1), "empty"),
    (lambda: FusedLangevin(torch.zeros(2, 3), 0.1, capturable=True), "CUDA"),
])
def test_bad_construction_errors(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_energy_of_wrong_shape_is_a_clear_error():
    s = FusedLangevin(torch.zeros(4, 3), 0.1, seed=0)
    with pytest.raises(ValueError, match=r"one energy per sample, shape \(4,\) \(or \(B, 1, ...\)\), got \(4, 3\)"):
        s.step(lambda z: z**2)
    with pytest.raises(ValueError, match="does not depend on the state"):
        s.step(lambda z: torch.zeros(4))
    with pytest.raises(TypeError, match="tensor"):
        s.step(lambda z: 1.0)


def test_explicit_backend_that_cannot_run():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(BackendUnavailable, match="CUDA"):
        langevin_sample(quadratic, torch.zeros(2, 3), 1, 0.1, seed=0, backend="cuda")


def test_env_and_context_select_backend(monkeypatch):
    from vaebm.ops import _registry, use_backend

    monkeypatch.setenv("VAEBM_BACKEND", "torch")
    assert _registry.resolve(torch.device("cpu"))[0] == "torch"
    with use_backend("cpp"):
        assert _registry.requested_backend() == "cpp"
        assert _registry.requested_backend("torch") == "torch"  # the argument wins
    monkeypatch.setenv("VAEBM_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend"):
        _registry.requested_backend()


def test_fp16_state_runs_in_fp32_arithmetic():
    x = torch.randn(256, 16).half()
    out = langevin_sample(lambda z: quadratic(z.float()), x, 20, 0.3, seed=0, backend="torch")
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert np.isclose(out.float().var().item(), 1 / (1 - 0.3 / 4), rtol=0.15)


@pytest.mark.parametrize("shape", [(64, 2), (4, 3, 8, 8)])
def test_energy_gradients_match_the_summed_energy_bit_for_bit(shape):
    """A step backpropagates a kept vector of ones from the (B,) energies instead of E.sum():
    the gradients must be exactly those of autograd.grad(E(x).sum(), x)."""
    g = torch.Generator().manual_seed(5)
    if len(shape) == 2:
        net = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.SiLU(), torch.nn.Linear(32, 1))
        energy = lambda x: net(x).squeeze(-1)  # noqa: E731
    else:
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.SiLU(), torch.nn.Flatten(),
                                  torch.nn.Linear(8 * 36, 1))
        energy = lambda x: net(x)  # (B, 1)  # noqa: E731
    x = torch.randn(shape, generator=g)
    s = FusedLangevin(x.clone(), 0.01, seed=0, backend="torch")
    e, (grad,) = s._energy_grad(energy, s.state)
    leaf = x.clone().requires_grad_(True)
    ref = torch.autograd.grad(energy(leaf).sum(), leaf)[0]
    assert torch.equal(grad, ref)
    assert torch.equal(e, energy(x).detach().reshape(-1))


@pytest.mark.parametrize("clip_norm", [None, 0.7])
def test_mala_chains_agree_across_cpu_backends(clip_norm):
    """A MALA chain on the planned cpp kernels (update, reductions and the accept uniforms
    called directly) against the same chain on the torch reference: the same accept decisions
    step by step and the same states (the kernels' normals are within 1 ulp)."""
    x0 = torch.randn(64, 3, 5, generator=torch.Generator().manual_seed(8))
    out = {}
    for backend in CPU_BACKENDS:
        x = x0.clone()
        s = FusedLangevin(x, 0.3, lam=0.5, mala=True, seed=2**40 + 3, sample_offset=9,
                          clip_grad_norm=clip_norm, backend=backend)
        if backend == "cpp":  # the direct path: kernels resolved once, accept uniforms included
            assert s._kernels is not None and s._kernels.uniform is not None
        for _ in range(25):
            s.step(lambda v: 0.25 * (v**4).flatten(1).sum(1) - v.flatten(1).sum(1))
        out[backend] = (x, s.stats.accepted)
    (xa, acc_a), (xb, acc_b) = out["torch"], out["cpp"]
    assert torch.equal(acc_a, acc_b)
    assert 0.2 < acc_a.float().mean() < 0.98  # both outcomes occur: the comparison has power
    torch.testing.assert_close(xb, xa, rtol=1e-5, atol=1e-5)
