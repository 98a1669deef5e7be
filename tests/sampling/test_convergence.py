"""Convergence diagnostics on chains with known answers: iid and AR(1) chains, superchains
started apart, the paper's definitions written out as loops, and (where installed) scipy and
ArviZ as independent references."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vaebm.sampling.convergence import (
    chain_report,
    ess,
    nested_rhat,
    rank_normalize,
    rhat,
    split_chains,
)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def ar1(steps, shape, rho, seed, start=None):
    """AR(1) x_{t+1} = rho x_t + sqrt(1 - rho^2) e_t, stationary N(0, 1) (started from it when
    ``start`` is None), returned as (steps, *shape) float64."""
    g = _gen(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) if start is None else start.clone()
    s = math.sqrt(1 - rho * rho)
    out = torch.empty((steps,) + tuple(shape), dtype=torch.float64)
    for t in range(steps):
        out[t] = x
        x = rho * x + s * torch.randn(shape, generator=g, dtype=torch.float64)
    return out


# ------------------------------------------------------------------ references written as loops
def nested_rhat_loops(x, k):
    """Margossian et al. (2024) nested R-hat for one parameter, x (N, C) numpy, K contiguous
    superchains, written term by term."""
    n, c = x.shape
    m = c // k
    chains = [[x[:, kk * m + mm] for mm in range(m)] for kk in range(k)]
    chain_mean = [[float(np.mean(ch)) for ch in sc] for sc in chains]
    super_mean = [sum(cm) / m for cm in chain_mean]
    overall = sum(super_mean) / k
    b_nu = sum((s - overall) ** 2 for s in super_mean) / (k - 1)
    w_nu = 0.0
    for kk in range(k):
        b_k = 0.0 if m == 1 else sum((cm - super_mean[kk]) ** 2 for cm in chain_mean[kk]) / (m - 1)
        w_k = 0.0 if n == 1 else sum(
            sum((v - chain_mean[kk][mm]) ** 2 for v in chains[kk][mm]) / (n - 1)
            for mm in range(m)) / m
        w_nu += (b_k + w_k) / k
    return math.sqrt(1 + b_nu / w_nu)


def ess_stan_loops(x):
    """Stan's ESS for x (N, M) numpy (chains as given), a sequential transcription of the
    algorithm in Vehtari et al. (2021) / the Stan reference manual."""
    n, m = x.shape
    acov = np.empty((n, m))
    for j in range(m):
        y = x[:, j] - x[:, j].mean()
        for t in range(n):
            acov[t, j] = np.dot(y[: n - t], y[t:]) / n
    mean_var = acov[0].mean() * n / (n - 1)
    var_plus = acov[0].mean() + (np.var(x.mean(0), ddof=1) if m > 1 else 0.0)
    rho = np.zeros(n)
    rho[0] = even = 1.0
    rho[1] = odd = 1 - (mean_var - acov[1].mean()) / var_plus
    t = 0
    while t < n - 5 and even + odd > 0:
        t += 2
        even = 1 - (mean_var - acov[t].mean()) / var_plus
        odd = 1 - (mean_var - acov[t + 1].mean()) / var_plus
        if even + odd >= 0:
            rho[t], rho[t + 1] = even, odd
    max_t = t
    if even > 0:
        rho[max_t] = even
    t = 0
    while t <= max_t - 4:
        t += 2
        if rho[t] + rho[t + 1] > rho[t - 2] + rho[t - 1]:
            rho[t] = rho[t + 1] = (rho[t - 2] + rho[t - 1]) / 2
    tau = -1 + 2 * rho[:max_t].sum() + rho[max_t]
    tau = max(tau, 1 / math.log10(n * m))
    return n * m / tau


# ---------------------------------------------------------------------------- R-hat, iid chains
def test_iid_chains_rhat_and_nested_rhat_near_one():
    x = torch.randn(2000, 8, generator=_gen(0), dtype=torch.float64)
    for r in (rhat(x), rhat(x, rank=False), rhat(x, split=False, rank=False)):
        assert r.shape == () and abs(float(r) - 1) < 0.01
    nr = float(nested_rhat(x, 4))
    assert 1 <= nr < 1.01


def test_nested_rhat_iid_one_draw_per_chain_expectation():
    # N = 1: B_nu/W_nu = (var of superchain means) / (pooled within-superchain variance), two
    # independent scaled chi-squares, so E[nR^2 - 1] = (1/M) * nu/(nu - 2), nu = K(M - 1).
    k, m, p = 8, 32, 4000
    x = torch.randn(1, k * m, p, generator=_gen(1), dtype=torch.float64)
    nr = nested_rhat(x, k)
    assert nr.shape == (p,) and bool((nr >= 1).all())
    nu = k * (m - 1)
    expected = (1 / m) * nu / (nu - 2)
    got = float((nr ** 2 - 1).mean())
    assert got == pytest.approx(expected, rel=0.05)


def test_nested_rhat_iid_short_chains_expectation():
    # N > 1: E[B_nu] = 1/(MN), E[W_nu] = 1 + 1/N (unbiased within-chain variance plus the
    # variance of chain means); W_nu has ~KMN degrees of freedom, so E[B/W] ~ E[B]/E[W].
    k, m, n, p = 8, 16, 10, 2000
    x = torch.randn(n, k * m, p, generator=_gen(2), dtype=torch.float64)
    got = float((nested_rhat(x, k) ** 2 - 1).mean())
    assert got == pytest.approx((1 / (m * n)) / (1 + 1 / n), rel=0.06)


def test_nested_rhat_one_chain_per_superchain_is_rhat_plus_one_over_n():
    # M = 1: nR^2 = 1 + var(chain means)/W while R-hat^2 = (N-1)/N + var(chain means)/W
    n = 7
    x = torch.randn(n, 6, 3, generator=_gen(3), dtype=torch.float64) * 2 + 1
    nr, r = nested_rhat(x, 6), rhat(x, split=False, rank=False)
    torch.testing.assert_close(nr ** 2 - r ** 2, torch.full((3,), 1 / n, dtype=torch.float64))


@pytest.mark.parametrize("n,k,m", [(5, 3, 4), (1, 3, 4), (6, 2, 1), (1, 4, 2)])
def test_nested_rhat_matches_the_paper_written_as_loops(n, k, m):
    x = torch.randn(n, k * m, 2, generator=_gen(4), dtype=torch.float64)
    x[..., 1] += torch.arange(k * m, dtype=torch.float64) // m  # superchains apart
    got = nested_rhat(x, k)
    for j in range(2):
        assert float(got[j]) == pytest.approx(nested_rhat_loops(x[..., j].numpy(), k), rel=1e-12)


# ----------------------------------------------------------------- superchains started apart
def test_superchains_started_apart_one_draw_known_answer():
    # AR(1) with rho from mu_k after w steps, one draw per chain: theta = a mu_k + s e with
    # a = rho^w, s^2 = 1 - a^2. Superchain means and within-superchain deviations are independent
    # Gaussians, so E[nR^2 - 1] = (a^2 S2_mu + s^2/M)/s^2 * nu/(nu-2), S2_mu the sample variance
    # of the starting points, nu = K(M-1).
    rho, k, m, p = 0.9, 8, 64, 400
    mu = torch.linspace(-4, 4, k, dtype=torch.float64)
    s2_mu = float(mu.var())
    start = mu.repeat_interleave(m)[:, None].expand(k * m, p)
    nu = k * (m - 1)
    means = []
    for i, w in enumerate((2, 5, 10, 20, 40, 80)):
        x = ar1(w + 1, (k * m, p), rho, seed=10 + i, start=start)[-1:]   # the draw after w steps
        nr = nested_rhat(x, k)
        a2 = rho ** (2 * w)
        expected = (a2 * s2_mu + (1 - a2) / m) / (1 - a2) * nu / (nu - 2)
        assert float((nr ** 2 - 1).mean()) == pytest.approx(expected, rel=0.08), w
        means.append(float(nr.mean()))
    assert means[0] > 1.1 and means[-1] < 1.01
    assert all(a > b for a, b in zip(means, means[1:])), means


def test_superchains_started_apart_short_chains_nested_rhat_decreases():
    # N = 10 draws after w warmup steps: clearly > 1.1 when too short, then decreasing to ~1.
    rho, k, m, n, p = 0.8, 4, 16, 10, 32
    start = torch.linspace(-5, 5, k, dtype=torch.float64).repeat_interleave(m)[:, None]
    start = start.expand(k * m, p)
    means = []
    for i, w in enumerate((2, 6, 12, 40)):
        x = ar1(w + n, (k * m, p), rho, seed=30 + i, start=start)[w:]
        means.append(float(nested_rhat(x, k).mean()))
    assert means[0] > 1.1, means
    assert all(a > b for a, b in zip(means, means[1:])), means
    # stationary: B_nu/W_nu ~ var(mean of 10 correlated draws)/M, nR ~ 1.015 here
    assert means[-1] < 1.03, means


def test_classic_rhat_flags_superchains_started_apart():
    start = torch.tensor([-5.0, 5.0], dtype=torch.float64).repeat_interleave(2)
    x = ar1(40, (4,), 0.95, seed=5, start=start)
    assert float(rhat(x)) > 1.1 and float(rhat(x, rank=False)) > 1.1


# ------------------------------------------------------------------------------------------ ESS
@pytest.mark.parametrize("rho,steps", [(0.5, 2000), (0.9, 8000), (-0.3, 2000)])
def test_ess_of_ar1_chains(rho, steps):
    # an AR(1) chain has integrated autocorrelation time (1 + rho)/(1 - rho); 8 chains, each of
    # 8 independent parameters: the estimator's mean over the parameters within 10%, each
    # parameter's estimate within 20%
    c, p = 8, 8
    x = ar1(steps, (c, p), rho, seed=40)
    target = steps * c * (1 - rho) / (1 + rho)
    for method in ("bulk", "mean"):
        ratio = ess(x, method=method) / target
        assert float(ratio.mean()) == pytest.approx(1, abs=0.1), method
        assert float((ratio - 1).abs().max()) < 0.2, method


def test_ess_iid_and_tail():
    x = torch.randn(2000, 4, generator=_gen(6), dtype=torch.float64)
    assert float(ess(x)) == pytest.approx(8000, rel=0.1)
    assert float(ess(x, method="mean")) == pytest.approx(8000, rel=0.1)
    # the indicator of a 5% quantile of iid draws is iid too
    assert float(ess(x, method="tail")) == pytest.approx(8000, rel=0.15)


@pytest.mark.parametrize("n,c,rho", [(6, 3, 0.9), (7, 2, 0.0), (9, 4, -0.6), (50, 4, 0.95),
                                     (301, 2, 0.7), (400, 3, -0.9), (40, 1, 0.5)])
def test_ess_vectorised_matches_the_sequential_algorithm(n, c, rho):
    x = ar1(n, (c, 5), rho, seed=7)
    got = ess(x, method="mean", split=False)
    for j in range(5):
        assert float(got[j]) == pytest.approx(ess_stan_loops(x[:, :, j].numpy()), rel=1e-9)
    sx = split_chains(x)
    got = ess(x, method="mean")
    if sx.shape[0] < 6:  # too short to estimate after the split
        assert bool(got.isnan().all())
        return
    for j in range(5):
        assert float(got[j]) == pytest.approx(ess_stan_loops(sx[:, :, j].numpy()), rel=1e-9)


def test_rank_normalize_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    x = torch.randn(30, 4, 2, generator=_gen(8), dtype=torch.float64).round(decimals=1)  # ties
    z = rank_normalize(x)
    for j in range(2):
        v = x[..., j].numpy().ravel()
        r = stats.rankdata(v, method="average")
        ref = stats.norm.ppf((r - 3 / 8) / (v.size + 1 / 4)).reshape(30, 4)
        np.testing.assert_allclose(z[..., j].numpy(), ref, rtol=1e-10, atol=1e-12)


def test_matches_arviz():
    az = pytest.importorskip("arviz")
    x = ar1(501, (4,), 0.6, seed=9) + torch.tensor([0.0, 0.0, 0.1, 0.3], dtype=torch.float64)
    a = x.T.numpy()   # arviz: (chain, draw)
    assert float(rhat(x)) == pytest.approx(float(az.rhat(a, method="rank")), rel=1e-6)
    assert float(rhat(x, rank=False)) == pytest.approx(float(az.rhat(a, method="split")),
                                                       rel=1e-6)
    for method in ("bulk", "tail", "mean"):
        assert float(ess(x, method=method)) == pytest.approx(
            float(az.ess(a, method=method)), rel=1e-6), method


# ----------------------------------------------------------------------------------- invariance
def test_shift_scale_and_monotone_invariance():
    start = torch.tensor([-2.0, 2.0], dtype=torch.float64).repeat_interleave(4)
    x = ar1(60, (8,), 0.8, seed=11, start=start)
    y = 3.5 * x - 7.0
    for f in (lambda v: rhat(v), lambda v: rhat(v, rank=False), lambda v: ess(v),
              lambda v: ess(v, method="mean"), lambda v: ess(v, method="tail"),
              lambda v: nested_rhat(v, 2), lambda v: nested_rhat(v[:1], 2)):
        torch.testing.assert_close(f(y), f(x))
    # rank-based diagnostics only see ranks: any increasing transform
    e = torch.exp(x)
    for f in (lambda v: rhat(v), lambda v: ess(v), lambda v: ess(v, method="tail")):
        torch.testing.assert_close(f(e), f(x))


def test_nested_rhat_invariant_to_chain_order_within_and_across_superchains():
    k, m = 4, 6
    start = torch.linspace(-1, 1, k, dtype=torch.float64).repeat_interleave(m)
    x = ar1(12, (k * m,), 0.7, seed=12, start=start)
    ref = nested_rhat(x, k)
    g = _gen(13)
    within = torch.cat([kk * m + torch.randperm(m, generator=g) for kk in range(k)])
    torch.testing.assert_close(nested_rhat(x[:, within], k), ref)
    blocks = torch.randperm(k, generator=g)
    across = torch.cat([torch.arange(b * m, (b + 1) * m) for b in blocks.tolist()])
    torch.testing.assert_close(nested_rhat(x[:, across], k), ref)
    # ids instead of a count: contiguous ids, then any shuffle of chains with their ids
    ids = torch.arange(k * m) // m
    torch.testing.assert_close(nested_rhat(x, ids), ref)
    perm = torch.randperm(k * m, generator=g)
    torch.testing.assert_close(nested_rhat(x[:, perm], ids[perm] * 10 + 3), ref)
    torch.testing.assert_close(nested_rhat(x[:, perm], np.asarray(ids[perm])), ref)


def test_trailing_parameter_dims_are_diagnosed_separately():
    x = ar1(40, (8, 2, 3), 0.5, seed=14)
    for f in (rhat, ess, lambda v: nested_rhat(v, 4), lambda v: ess(v, method="tail")):
        out = f(x)
        assert out.shape == (2, 3) and out.dtype == torch.float64
        for i in range(2):
            for j in range(3):
                torch.testing.assert_close(out[i, j], f(x[:, :, i, j]))


def test_non_finite_constant_and_too_short():
    x = torch.randn(20, 4, 3, generator=_gen(15), dtype=torch.float64)
    x[3, 1, 0] = float("nan")
    x[:, :, 1] = 2.0
    for f in (rhat, ess, lambda v: nested_rhat(v, 2), lambda v: ess(v, method="tail")):
        out = f(x)
        assert math.isnan(out[0]) and math.isnan(out[1]) and math.isfinite(out[2])
    short = torch.randn(1, 8, generator=_gen(16))
    assert math.isnan(rhat(short)) and math.isnan(ess(short))
    assert math.isfinite(nested_rhat(short, 4))
    assert math.isnan(ess(torch.randn(11, 4, generator=_gen(17))))   # 5 draws after the split
    assert math.isfinite(ess(torch.randn(12, 4, generator=_gen(17))))


# --------------------------------------------------------------------------------------- errors
def test_errors_name_the_sizes():
    x = torch.randn(5, 8)
    with pytest.raises(ValueError, match=r"groups=3 superchains do not divide the 8 chains"):
        nested_rhat(x, 3)
    with pytest.raises(ValueError, match=r"sizes by id: \{0: 3, 1: 5\}"):
        nested_rhat(x, torch.tensor([0, 0, 0, 1, 1, 1, 1, 1]))
    with pytest.raises(ValueError, match=r"\(8,\) tensor .* got shape \(6,\) for 8 chains"):
        nested_rhat(x, torch.zeros(6))
    with pytest.raises(ValueError, match="at least 2 superchains"):
        nested_rhat(x, 1)
    with pytest.raises(ValueError, match="at least 2 superchains"):
        nested_rhat(x, torch.zeros(8))
    with pytest.raises(ValueError, match="N=1 draw and M=1 chain"):
        nested_rhat(x[:1], 8)
    with pytest.raises(TypeError):
        nested_rhat(x, True)
    with pytest.raises(ValueError, match=r"\(T, C\)"):
        rhat(torch.randn(10))
    with pytest.raises(ValueError, match="method"):
        ess(x, method="median")
    with pytest.raises(ValueError, match="groups=3"):
        chain_report(x, groups=3)


# --------------------------------------------------------------------------------------- report
def test_chain_report_drops_and_counts_non_finite_chains():
    start = torch.zeros(12, dtype=torch.float64)
    trace = ar1(200, (12,), 0.5, seed=18, start=start).float()
    trace[50, 1] = float("nan")
    trace[7, 6] = float("inf")
    trace[:, 7] = float("nan")
    rep = chain_report(SimpleNamespace(energy=trace), groups=4)
    assert rep["chains"] == 12 and rep["nonfinite_chains"] == 3 and rep["chains_used"] == 9
    assert rep["draws"] == 200
    keep = [0, 2, 3, 4, 5, 8, 9, 10, 11]
    ref = trace[:, keep]
    assert rep["rhat"] == pytest.approx(float(rhat(ref)))
    assert rep["ess_bulk"] == pytest.approx(float(ess(ref)))
    assert rep["ess_tail"] == pytest.approx(float(ess(ref, method="tail")))
    assert rep["ess_bulk_per_chain"] == pytest.approx(rep["ess_bulk"] / 9)
    # superchains {0,1,2} {3,4,5} {6,7,8} {9,10,11} keep 2, 3, 1, 3 finite chains: trimmed to 1
    assert rep["superchains_used"] == 4 and rep["chains_per_superchain"] == 1
    assert rep["nested_rhat"] == pytest.approx(float(nested_rhat(trace[:, [0, 3, 8, 9]], 4)))
    for key in ("rhat", "ess_bulk", "ess_tail", "ess_bulk_per_chain", "nested_rhat"):
        assert type(rep[key]) is float and math.isfinite(rep[key])
    assert abs(rep["rhat"] - 1) < 0.05


def test_chain_report_short_chains_and_all_bad():
    trace = torch.randn(1, 64, generator=_gen(19))
    rep = chain_report(trace, groups=8)
    assert math.isnan(rep["rhat"]) and math.isnan(rep["ess_bulk"])
    assert 1 <= rep["nested_rhat"] < 1.2 and rep["chains_per_superchain"] == 8
    rep = chain_report(torch.full((5, 4), float("nan")), groups=2)
    assert rep["chains_used"] == 0 and rep["superchains_used"] == 0
    assert all(math.isnan(rep[k]) for k in ("rhat", "ess_bulk", "nested_rhat"))
    assert "nested_rhat" not in chain_report(torch.randn(30, 4))
