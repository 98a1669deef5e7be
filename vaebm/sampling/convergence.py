"""Convergence diagnostics for many chains run in parallel: R-hat, nested R-hat and ESS, in torch.

Every function takes ``draws`` shaped ``(T, C)`` or ``(T, C, *params)``: ``T`` draws per chain
(dimension 0), ``C`` chains (dimension 1), and any trailing dimensions index separate scalar
quantities, each diagnosed on its own. The result is a float64 tensor of shape ``params`` (a
0-dim tensor for ``(T, C)`` input) on the input's device. Computation is in float64 and
vectorised over the parameters (no Python loop over them), so a GPU trace can be diagnosed
where it lies.

What is here, and where it comes from:

* ``rhat``: split-R-hat (Gelman et al. 2013, BDA3 sec. 11.4) and the rank-normalised,
  folded split-R-hat of Vehtari, Gelman, Simpson, Carpenter and Buerkner (2021), "Rank-
  normalization, folding, and localization: an improved R-hat for assessing convergence of MCMC",
  Bayesian Analysis 16(2), doi:10.1214/20-BA1221.
* ``ess``: bulk-, tail- and basic ("mean") effective sample size across chains, from the same
  paper (sec. 3.2 for the multi-chain estimator), with FFT autocovariances and Geyer's initial
  positive and monotone sequences, following Stan's estimator (including its improved
  antithetic handling and its ``S * log10(S)`` cap).
* ``nested_rhat``: nested R-hat of Margossian, Hoffman, Sountsov, Riou-Durand, Vehtari and Gelman
  (2024), "Nested R-hat: assessing the convergence of Markov chain Monte Carlo when running many
  short chains", Bayesian Analysis, doi:10.1214/24-BA1453 (arXiv:2110.13017). It is defined for
  any number of draws per chain, including one, which is the many-short-chains regime.
* ``chain_report``: the above on one ``(T, C)`` trace (e.g. ``LangevinStats.energy``), as Python
  numbers, with non-finite chains dropped and counted.

What is *not* here: a "nested ESS". The nested-R-hat paper proposes a convergence diagnostic,
not an effective-sample-size estimator for the nested design (nor does the posterior package,
which implements nested R-hat), and that literature gives no cross-chain ESS for chains of one
draw each; ``ess`` therefore needs several draws per chain (see its docstring) and returns NaN
otherwise, rather than inventing a correction from nested R-hat.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter

import torch

__all__ = ["chain_report", "ess", "nested_rhat", "rank_normalize", "rhat", "split_chains"]

# Fewest draws per chain (after splitting) for which ``ess`` gives a number. Stan's estimator
# looks past lag 1 only when there are at least 6 draws per chain; below that it returns
# S * log10(S) whatever the draws, which is no estimate, so NaN is returned instead.
MIN_ESS_DRAWS = 6


# ------------------------------------------------------------------------------------ helpers
def _as_draws(draws) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``(T, C, *params)`` -> float64 ``(T, C, P)`` and ``params``."""
    x = draws.detach() if isinstance(draws, torch.Tensor) else torch.as_tensor(draws)
    if x.dim() < 2:
        raise ValueError("draws must be shaped (T, C) or (T, C, *params): T draws per chain, "
                         f"C chains; got shape {tuple(x.shape)}")
    params = tuple(x.shape[2:])
    x = x.to(torch.float64).reshape(x.shape[0], x.shape[1], -1)
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"draws must have at least one draw and one chain, got shape "
                         f"{(x.shape[0], x.shape[1]) + params}")
    return x, params


def _finite(x: torch.Tensor) -> torch.Tensor:
    """(P,) True where every draw of that parameter is finite."""
    return torch.isfinite(x).flatten(0, 1).all(0)


def _out(v: torch.Tensor, ok: torch.Tensor, params) -> torch.Tensor:
    return torch.where(ok, v, torch.full_like(v, math.nan)).reshape(params)


def _nan(x: torch.Tensor, params) -> torch.Tensor:
    return torch.full(params, math.nan, dtype=torch.float64, device=x.device)


def _split(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0] // 2
    return torch.cat([x[:n], x[x.shape[0] - n:]], dim=1)


def _average_ranks(v: torch.Tensor) -> torch.Tensor:
    """1-based ranks along dim 0 of (S, P), ties given their average rank (like scipy's
    ``rankdata(method="average")``)."""
    s = v.shape[0]
    sv, idx = torch.sort(v, dim=0)
    pos = torch.arange(s, device=v.device).unsqueeze(1).expand_as(sv)
    first = torch.ones_like(sv, dtype=torch.bool)
    first[1:] = sv[1:] != sv[:-1]
    last = torch.ones_like(sv, dtype=torch.bool)
    last[:-1] = sv[:-1] != sv[1:]
    start = torch.where(first, pos, torch.zeros_like(pos)).cummax(0).values
    end = torch.where(last, pos, torch.full_like(pos, s - 1)).flip(0).cummin(0).values.flip(0)
    ranks = torch.empty_like(v)
    ranks.scatter_(0, idx, (start + end).to(v.dtype) / 2 + 1)
    return ranks


def _z(x: torch.Tensor) -> torch.Tensor:
    """Rank normalisation of (N, C, P) over all N*C draws of each parameter."""
    n, c, p = x.shape
    s = n * c
    r = _average_ranks(x.reshape(s, p))
    return torch.special.ndtri((r - 0.375) / (s + 0.25)).reshape(n, c, p)


def _median(x: torch.Tensor) -> torch.Tensor:
    """(P,) median over all draws (the mean of the two middle ones for an even count)."""
    v = x.reshape(-1, x.shape[-1]).sort(dim=0).values
    s = v.shape[0]
    return (v[(s - 1) // 2] + v[s // 2]) / 2


def _quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """(P,) quantile over all draws, linear interpolation (R's type 7, numpy's default)."""
    v = x.reshape(-1, x.shape[-1]).sort(dim=0).values
    h = (v.shape[0] - 1) * q
    lo = math.floor(h)
    hi = min(lo + 1, v.shape[0] - 1)
    return v[lo] + (h - lo) * (v[hi] - v[lo])


# --------------------------------------------------------------------------- public helpers
def split_chains(draws) -> torch.Tensor:
    """Split each chain into its first and second half: ``(T, C, ...)`` -> ``(T // 2, 2C, ...)``.

    With an odd ``T`` the middle draw is dropped (as in Stan, posterior and ArviZ). Chains
    ``0..C-1`` of the result are the first halves, ``C..2C-1`` the second halves."""
    x = draws if isinstance(draws, torch.Tensor) else torch.as_tensor(draws)
    if x.dim() < 2:
        raise ValueError(f"draws must be shaped (T, C, ...), got shape {tuple(x.shape)}")
    return _split(x)


def rank_normalize(draws) -> torch.Tensor:
    """Rank-normalised draws (Vehtari et al. 2021), per parameter:

        z = Phi^-1((r - 3/8) / (S + 1/4)),

    with ``r`` the average rank of a draw among all ``S = T * C`` draws of that parameter
    (Blom's offsets, as in Stan's posterior package and ArviZ). Returns float64 draws of the
    input's shape."""
    x, params = _as_draws(draws)
    return _z(x).reshape(x.shape[:2] + params)


# ------------------------------------------------------------------------------------ R-hat
def _rhat_core(x: torch.Tensor) -> torch.Tensor:
    """Classic potential scale reduction of (N, C, P) chains, as is (no split): (P,)."""
    n, c, _ = x.shape
    if n < 2 or c < 2:
        return torch.full(x.shape[2:], math.nan, dtype=x.dtype, device=x.device)
    between = x.mean(0).var(0, correction=1)        # B / N
    within = x.var(0, correction=1).mean(0)          # W
    return torch.sqrt((n - 1) / n + between / within)


def rhat(draws, *, split: bool = True, rank: bool = True) -> torch.Tensor:
    """Potential scale reduction factor R-hat across chains, per parameter.

    For ``C`` chains of ``N`` draws ``theta[n, m]`` (after splitting each chain in two when
    ``split``, so ``N = T // 2`` and ``C -> 2C``)::

        W     = 1/C sum_m s_m^2,   s_m^2 = 1/(N-1) sum_n (theta[n,m] - mean_m)^2
        B / N = 1/(C-1) sum_m (mean_m - mean)^2
        R-hat = sqrt( ((N-1)/N W + B/N) / W )

    (Gelman et al., BDA3 sec. 11.4). With ``rank=True`` (the default, what Stan reports) this
    is the rank-normalised R-hat of Vehtari et al. (2021): the maximum of R-hat
    of the rank-normalised split draws (bulk) and of the rank-normalised split draws folded
    about the median, ``|theta - median(theta)|`` (tail). ``rank=False`` is the classic
    (split-)R-hat of the raw draws.

    R-hat is near 1 for converged chains and fluctuates slightly on both sides of 1 (it can be
    just below 1); Vehtari et al. recommend using the draws only when R-hat < 1.01. It needs at
    least two (split) chains of at least two draws; otherwise, for non-finite draws, and for
    constant draws (a constant quantity cannot be told from a stuck sampler), it is NaN."""
    x, params = _as_draws(draws)
    ok = _finite(x)
    if not rank:
        return _out(_rhat_core(_split(x) if split else x), ok, params)
    fold = (x - _median(x)).abs()
    if split:
        x, fold = _split(x), _split(fold)
    if x.shape[0] < 2 or x.shape[1] < 2:
        return _nan(x, params)
    bulk, tail = _rhat_core(_z(x)), _rhat_core(_z(fold))
    return _out(torch.maximum(bulk, tail), ok, params)


# -------------------------------------------------------------------------------------- ESS
def _ess_core(x: torch.Tensor) -> torch.Tensor:
    """Effective sample size of (N, C, P) chains as is (no split, no transform): (P,).

    Stan's multi-chain estimator (Vehtari et al. 2021 sec. 3.2; Stan reference manual,
    "Effective sample size"), vectorised over the parameters."""
    n, c, p = x.shape
    if n < MIN_ESS_DRAWS:
        return torch.full((p,), math.nan, dtype=x.dtype, device=x.device)
    s = n * c
    # biased (1/N) autocovariance of every chain at lags 0..N-1, by FFT zero-padded past 2N-1
    nfft = 1 << (2 * n - 1).bit_length()
    f = torch.fft.rfft(x - x.mean(0, keepdim=True), n=nfft, dim=0)
    acov = torch.fft.irfft(f.real.square() + f.imag.square(), n=nfft, dim=0)[:n] / n
    acov = acov.mean(1)                                        # (N, P) mean over chains
    w = acov[0] * n / (n - 1)                                  # W
    var_plus = acov[0] + (x.mean(0).var(0, correction=1) if c > 1 else 0.0)  # (N-1)/N W + B/N
    rho = 1 - (w - acov) / var_plus                           # combined autocorrelation
    rho[0] = 1.0
    # Geyer's initial positive sequence on pairs G_k = rho[2k] + rho[2k+1]: Stan evaluates pairs
    # k = 1, 2, ... while the previous pair was > 0 and 2(k-1) < N-5; k_last is the last one.
    npairs = n // 2
    g = rho[0:2 * npairs:2] + rho[1:2 * npairs:2]             # (npairs, P)
    cap = max(0, math.ceil((n - 5) / 2))
    k = torch.arange(npairs, device=x.device).unsqueeze(1)
    nonpos = ~(g > 0)                                         # NaN counts as non-positive
    first_nonpos = torch.where(nonpos, k, torch.full_like(k, npairs)).min(0).values
    k_last = first_nonpos.clamp(max=cap)                      # (P,)
    # Geyer's initial monotone sequence: the pairs before k_last, made non-increasing
    mono = torch.cummin(g, dim=0).values
    total = torch.where(k < k_last, mono, torch.zeros_like(mono)).sum(0)
    # Stan's improved estimate adds the even term of the last pair when it is kept
    g_last = g.gather(0, k_last.unsqueeze(0)).squeeze(0)
    even_last = rho[0::2][:npairs].gather(0, k_last.unsqueeze(0)).squeeze(0)
    r_last = torch.where((g_last >= 0) | (even_last > 0), even_last, torch.zeros_like(even_last))
    tau = (-1 + 2 * total + r_last).clamp(min=1 / math.log10(s))
    ok = torch.isfinite(var_plus) & (var_plus > 0) & (w > 0)
    return torch.where(ok, s / tau, torch.full_like(tau, math.nan))


def ess(draws, *, method: str = "bulk", split: bool = True) -> torch.Tensor:
    """Effective sample size across chains, per parameter (Vehtari et al. 2021, sec. 3.2).

    For ``M`` chains of ``N`` draws (after splitting each chain in two when ``split``),
    with ``acov_m(t)`` the FFT autocovariance of chain ``m`` at lag ``t`` (divided by ``N``)::

        W       = 1/M sum_m acov_m(0) N/(N-1)
        var+    = (N-1)/N W + B/N,   B/N = variance (1/(M-1)) of the chain means
        rho(t)  = 1 - (W - 1/M sum_m acov_m(t)) / var+,   rho(0) = 1
        tau     = -1 + 2 sum_{t < 2k} rho(t) + rho(2k)
        ESS     = N M / max(tau, 1 / log10(N M))

    where the sum runs over Geyer's (1992) initial positive sequence of pairs
    ``rho(2j) + rho(2j+1) > 0``, made monotone non-increasing, truncated at the first
    non-positive pair ``k``; the last even term and the ``N M log10(N M)`` cap are Stan's
    improvement for antithetic chains. This is the estimator of Stan, posterior and ArviZ.

    ``method``:
      ``"bulk"`` (default) ESS of the rank-normalised split draws: efficiency for the bulk (mean,
        median) of the distribution, defined even without finite moments;
      ``"tail"`` the smaller ESS of the indicators ``theta <= q05`` and ``theta <= q95`` (split
        draws, quantiles over all draws): efficiency for the 5% and 95% quantiles;
      ``"mean"`` ESS of the raw split draws, for the mean.

    The result estimates the number of independent draws with the same Monte Carlo error; for
    an AR(1) chain with coefficient ``rho`` it approaches ``N M (1-rho)/(1+rho)``. Vehtari et
    al. advise trusting it (and R-hat) only when it is at least about 100 per chain.

    Not defined here: ESS for chains shorter than ``MIN_ESS_DRAWS`` (6) draws after splitting
    (NaN) -- in particular one draw per chain, the many-short-chains case, for which the
    literature (including the nested-R-hat paper) defines no cross-chain ESS estimator; use
    ``nested_rhat`` there to judge convergence. Also NaN for non-finite or constant draws."""
    x, params = _as_draws(draws)
    if method not in ("bulk", "tail", "mean"):
        raise ValueError(f"method must be 'bulk', 'tail' or 'mean', got {method!r}")
    ok = _finite(x)
    if method == "tail":
        v = torch.nan_to_num(x)
        out = None
        for q in (0.05, 0.95):
            ind = (v <= _quantile(v, q)).to(torch.float64)
            e = _ess_core(_split(ind) if split else ind)
            out = e if out is None else torch.minimum(out, e)
        return _out(out, ok, params)
    if split:
        x = _split(x)
    if method == "bulk" and x.shape[0] >= 1:
        x = _z(torch.nan_to_num(x))
    return _out(_ess_core(x), ok, params)


# ------------------------------------------------------------------------------ nested R-hat
def _superchains(groups, c: int, device) -> torch.Tensor:
    """(K, M) chain indices of each superchain from ``groups`` (a count or per-chain ids)."""
    if isinstance(groups, bool):
        raise TypeError("groups must be a number of superchains or a tensor of superchain ids, "
                        "not a bool")
    if isinstance(groups, numbers.Integral) or (
            isinstance(groups, torch.Tensor) and groups.dim() == 0):
        k = int(groups)
        if k < 2:
            raise ValueError(f"nested R-hat needs at least 2 superchains, got groups={k}")
        if c % k:
            raise ValueError(f"groups={k} superchains do not divide the {c} chains evenly "
                             f"({c} = {c // k} * {k} + {c % k}); give a number of superchains "
                             f"that divides {c}, or a ({c},) tensor of superchain ids")
        return torch.arange(c, device=device).reshape(k, c // k)
    ids = torch.as_tensor(groups).detach().cpu()
    if ids.dim() != 1 or ids.shape[0] != c:
        raise ValueError(f"groups must be a number of superchains or a ({c},) tensor of "
                         f"superchain ids, one per chain; got shape {tuple(ids.shape)} for "
                         f"{c} chains")
    labels, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    if labels.numel() < 2:
        raise ValueError(f"nested R-hat needs at least 2 superchains, got {labels.numel()} "
                         "distinct superchain id")
    if counts.min() != counts.max():
        sizes = dict(sorted(Counter(ids.tolist()).items()))
        raise ValueError(f"superchains must hold equal numbers of chains; sizes by id: {sizes}")
    order = torch.argsort(inverse, stable=True)
    return order.reshape(labels.numel(), int(counts[0])).to(device)


def nested_rhat(draws, groups) -> torch.Tensor:
    """Nested R-hat (Margossian et al. 2024), per parameter.

    ``groups`` is the number ``K`` of superchains, the ``C`` chains forming ``K`` contiguous
    groups of ``M = C / K`` (chains ``0..M-1`` are superchain 0, and so on), or a ``(C,)``
    tensor of superchain ids (any values, equal group sizes). The chains of a superchain are
    meant to share their initial point; superchains start at different, overdispersed points.

    With draws ``theta[n, m, k]`` (``N = T`` draws, chain ``m`` of superchain ``k``)::

        chain mean       mean_{.mk} = 1/N sum_n theta[n,m,k]
        superchain mean  mean_{..k} = 1/M sum_m mean_{.mk}
        overall mean     mean_{...} = 1/K sum_k mean_{..k}
        between superchains   B_nu = 1/(K-1) sum_k (mean_{..k} - mean_{...})^2
        between chains in k   ~B_k = 1/(M-1) sum_m (mean_{.mk} - mean_{..k})^2   (0 if M = 1)
        within chains in k    ~W_k = 1/M sum_m 1/(N-1) sum_n (theta[n,m,k] - mean_{.mk})^2
                                                                                  (0 if N = 1)
        within superchains    W_nu = 1/K sum_k (~B_k + ~W_k)
        nested R-hat          nR   = sqrt(1 + B_nu / W_nu)

    No chain splitting and no rank normalisation: this is the paper's definition (and that of
    the posterior package's ``rhat_nested``). ``N = 1`` draw per chain is allowed (``W_nu`` is
    then the between-chain variance within superchains alone), as is ``M = 1`` (then
    ``nR^2 = R-hat^2 + 1/N`` for the classic, unsplit R-hat: nested R-hat is bounded below by
    1, the paper's footnote on the difference); ``N = M = 1`` is not, since ``W_nu`` would be 0.

    Reading it: nR approaches 1 as the superchains forget their initial points. Even for
    independent draws from the target it stays above 1: ``nR^2 - 1`` is then about
    ``1 / (M (N + 1))`` (``1/M`` for ``N = 1``, up to the noise of ``W_nu``), and more for
    autocorrelated chains, so the threshold (e.g. 1.01) needs enough chains per superchain; see
    the paper for how to choose it. NaN for non-finite or constant draws.

    Raises ``ValueError`` when ``groups`` does not split the chains into at least two equal
    superchains (naming the sizes), or when ``N = M = 1``."""
    x, params = _as_draws(draws)
    n, c, p = x.shape
    idx = _superchains(groups, c, x.device)
    k, m = idx.shape
    if n == 1 and m == 1:
        raise ValueError(f"nested R-hat needs more than one draw per chain or more than one chain "
                         f"per superchain; got N=1 draw and M=1 chain in each of {k} superchains")
    ok = _finite(x)
    chain_mean = x.mean(0)[idx]                                # (K, M, P)
    super_mean = chain_mean.mean(1)                            # (K, P)
    b_nu = super_mean.var(0, correction=1)
    b_k = chain_mean.var(1, correction=1) if m > 1 else torch.zeros_like(super_mean)
    w_k = x.var(0, correction=1)[idx].mean(1) if n > 1 else torch.zeros_like(super_mean)
    w_nu = (b_k + w_k).mean(0)
    return _out(torch.sqrt(1 + b_nu / w_nu), ok, params)


# ------------------------------------------------------------------------------------ report
def chain_report(trace, groups=None) -> dict:
    """Convergence summary of one scalar traced along ``T`` steps of ``C`` chains.

    ``trace`` is a ``(T, C)`` tensor, e.g. ``FusedLangevin``'s ``stats.energy`` (NaN where a
    chain's energy was non-finite), or an object with such an ``.energy`` attribute
    (``LangevinStats``). Chains with any non-finite value are dropped before anything is
    computed and counted in ``nonfinite_chains``.

    With ``groups`` (see ``nested_rhat``: a number of contiguous superchains, or a ``(C,)``
    tensor of ids, checked against all ``C`` chains), nested R-hat is computed on the finite
    chains: superchains left with no finite chain are dropped, and the others keep their first
    ``m`` finite chains, ``m`` the fewest finite chains any of them has, so that superchains stay
    equal in size. Dropping diverged chains can hide a sampler problem: look at the count.

    Returns a dict: Python ints ``draws``, ``chains``, ``nonfinite_chains``, ``chains_used``
    and Python floats ``rhat`` (rank-normalised split R-hat, ``rhat(..)``), ``ess_bulk``,
    ``ess_tail``, ``ess_bulk_per_chain`` (``ess_bulk / chains_used``); with ``groups`` also
    ``nested_rhat`` (float) and ``superchains_used``, ``chains_per_superchain`` (ints). A value
    that cannot be computed (too few draws or chains, constant trace) is NaN; ``rhat`` and ESS
    need several draws per chain, nested R-hat works from one."""
    trace = getattr(trace, "energy", trace)
    x = trace.detach() if isinstance(trace, torch.Tensor) else torch.as_tensor(trace)
    if x.dim() != 2:
        raise ValueError(f"trace must be shaped (T, C), got shape {tuple(x.shape)}")
    x = x.to(torch.float64)
    t, c = x.shape
    keep = torch.isfinite(x).all(0).nonzero().squeeze(1)
    used = int(keep.numel())
    rep = {"draws": t, "chains": c, "nonfinite_chains": c - used, "chains_used": used}
    nan = math.nan
    if used and t:
        xs = x[:, keep]
        e_bulk = float(ess(xs, method="bulk"))
        rep.update(rhat=float(rhat(xs)), ess_bulk=e_bulk, ess_tail=float(ess(xs, method="tail")),
                   ess_bulk_per_chain=e_bulk / used)
    else:
        rep.update(rhat=nan, ess_bulk=nan, ess_tail=nan, ess_bulk_per_chain=nan)
    if groups is not None:
        idx = _superchains(groups, c, x.device)
        finite = torch.zeros(c, dtype=torch.bool, device=x.device)
        finite[keep] = True
        members = [row[finite[row]] for row in idx]
        members = [mm for mm in members if mm.numel()]
        m = min((mm.numel() for mm in members), default=0)
        value = nan
        if len(members) >= 2 and t and not (t == 1 and m == 1):
            sel = torch.cat([mm[:m] for mm in members])
            value = float(nested_rhat(x[:, sel], len(members)))
        rep.update(nested_rhat=value, superchains_used=len(members), chains_per_superchain=m)
    return rep
