"""The drop-in options of FusedLangevin / langevin_sample and the x-space SampleBank: one test per
option, each able to fail (most compare against an independent construction, bitwise)."""

import io
import math

import pytest
import torch

from vaebm import FusedLangevin, SampleBank, langevin_sample
from vaebm.ops.langevin_ref import GUARD_KEEP, GUARD_NONE, GUARD_RESET, step_ref
from vaebm.ops.philox import STREAM_NOISE, STREAM_RESET, philox_normal_rows

BACKENDS = ["torch", "cpp"]


def energy(x):
    """Separable (each element on its own), so a row's gradient is bitwise the same whatever
    batch it is in; not quadratic, so the drift is not linear."""
    return (0.5 * x.pow(2) + 0.2 * torch.cos(3 * x)).flatten(1).sum(1)


def zero_energy(x):
    return 0.0 * x.flatten(1).sum(1)


def run(x, n, *args, energy_fn=energy, **kw):
    s = FusedLangevin(x, *args, **kw)
    for _ in range(n):
        s.step(energy_fn)
    return s


# ------------------------------------------------------------------------------------- from_sgld
@pytest.mark.parametrize("backend", BACKENDS)
def test_from_sgld_equals_explicit_mapping_bitwise(backend):
    a, b = 0.3, 0.05
    x0 = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    x1, x2 = x0.clone(), x0.clone()
    s1 = FusedLangevin.from_sgld(x1, a, b, seed=7, backend=backend)
    s2 = FusedLangevin(x2, 2 * a, sigma=b / math.sqrt(2 * a), seed=7, backend=backend)
    for _ in range(4):
        s1.step(energy)
        s2.step(energy)
    assert torch.equal(x1, x2)
    # schedules are mapped step by step
    A, Bn = [0.3, 0.1, 0.2, 0.05], [0.05, 0.02, 0.04, 0.01]
    y1, y2 = x0.clone(), x0.clone()
    s1 = FusedLangevin.from_sgld(y1, lambda t: A[t], Bn, seed=7, backend=backend)
    s2 = FusedLangevin(y2, lambda t: 2 * A[t], sigma=lambda t: Bn[t] / math.sqrt(2 * A[t]),
                       seed=7, backend=backend)
    for _ in range(4):
        s1.step(energy)
        s2.step(energy)
    assert torch.equal(y1, y2)


def test_from_sgld_is_the_two_line_loop():
    """One step of from_sgld(a, b) is x - a grad + b xi with the sampler's own noise."""
    a, b, seed = 0.3, 0.05, 7
    x0 = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    x = x0.clone()
    FusedLangevin.from_sgld(x, a, b, seed=seed, backend="torch", on_nonfinite=None).step(energy)
    xr = x0.clone().requires_grad_(True)
    g = torch.autograd.grad(energy(xr).sum(), xr)[0]
    xi = philox_normal_rows(seed, 0, torch.arange(6), 5, 0, STREAM_NOISE).reshape(6, 5)
    torch.testing.assert_close(x, x0 - a * g + b * xi, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="grad_scale"):
        FusedLangevin.from_sgld(x, 0.0, b)


# ------------------------------------------------------------------------------- seeds and bind
@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_seed_never_repeats_increments_across_bind(backend):
    B, D, n = 8, 6, 3
    incs = []
    x = torch.zeros(B, D)
    s = FusedLangevin(x, 0.5, seed=3, backend=backend)
    for call in range(2):
        if call:
            x = torch.zeros(B, D)
            s.bind(x)  # a persistent-chain loop: new chains, same sampler, same seed
        for _ in range(n):
            before = x.clone()
            s.step(zero_energy)
            incs.append(x - before)
    assert s.t == 2 * n
    flat = torch.stack(incs).reshape(2 * n, -1)
    for i in range(2 * n):
        for j in range(i):
            assert not torch.isclose(flat[i], flat[j]).any(), (i, j)
    # a new sampler with the same seed and start_step reproduces the second call
    x = torch.zeros(B, D)
    s2 = FusedLangevin(x, 0.5, seed=3, start_step=n, backend=backend)
    again = []
    for _ in range(n):
        before = x.clone()
        s2.step(zero_energy)
        again.append(x - before)
    assert all(torch.equal(u, v) for u, v in zip(again, incs[n:]))


# --------------------------------------------------------------------------------- chain_ids
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [3, 300])  # narrow rows (lanes over samples) and wide rows
def test_chain_ids_make_a_chain_independent_of_its_row(backend, D):
    B = 12
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(B, D, generator=gen)
    ids = torch.randperm(1000, generator=gen)[:B]
    perm = torch.randperm(B, generator=gen)
    kw = dict(sigma=0.7, seed=11, backend=backend, clip_grad_norm=5.0)
    xa, xb = x0.clone(), x0[perm].clone()
    run(xa, 4, 0.2, chain_ids=ids, **kw)
    run(xb, 4, 0.2, chain_ids=ids[perm], **kw)
    assert torch.equal(xb, xa[perm])
    # without chain ids the noise follows the row: the permuted batch is another set of chains
    xa, xb = x0.clone(), x0[perm].clone()
    run(xa, 4, 0.2, **kw)
    run(xb, 4, 0.2, **kw)
    assert not torch.equal(xb, xa[perm])


def test_chain_ids_are_checked():
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="chain_ids"):
        FusedLangevin(x, 0.1, chain_ids=torch.arange(3))
    with pytest.raises(ValueError, match="chain_ids"):
        FusedLangevin(x, 0.1, chain_ids=torch.tensor([0.0, 1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="chain_ids"):
        FusedLangevin(x, 0.1, chain_ids=torch.tensor([0, 1, 2, -1]))


# --------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("backend", BACKENDS)
def test_schedules_equal_per_step_constant_samplers(backend):
    etas, sigs = [0.3, 0.1, 0.05, 0.2], [1.0, 0.5, 0.25, 0.8]
    x0 = torch.randn(5, 7, generator=torch.Generator().manual_seed(2))
    x_call, x_seq, x_man = x0.clone(), x0.clone(), x0.clone()
    run(x_call, 4, lambda t: etas[t], sigma=lambda t: sigs[t], seed=5, backend=backend)
    s = run(x_seq, 4, etas, sigma=torch.tensor(sigs), seed=5, backend=backend)
    for t in range(4):
        run(x_man, 1, etas[t], sigma=sigs[t], seed=5, start_step=t, backend=backend)
    assert torch.equal(x_call, x_man)
    assert torch.equal(x_seq, x_man)
    x_const = x0.clone()
    run(x_const, 4, etas[0], sigma=sigs[0], seed=5, backend=backend)
    assert not torch.equal(x_const, x_man)
    with pytest.raises(IndexError, match="schedule"):
        s.step(energy)  # past the sequence's end
    # the schedule is indexed by the global step: start_step=2 starts at etas[2]
    x_off, x_man2 = x0.clone(), x0.clone()
    run(x_off, 2, etas, sigma=sigs, seed=5, start_step=2, backend=backend)
    for t in (2, 3):
        run(x_man2, 1, etas[t], sigma=sigs[t], seed=5, start_step=t, backend=backend)
    assert torch.equal(x_off, x_man2)


# ------------------------------------------------------------------------------ create_graph
def test_create_graph_gradients_match_finite_differences():
    """d(final state)/d(theta, x0) of a differentiable chain (torch backend, float64), checked
    against central finite differences by gradcheck; the noise is fixed by the seed."""

    def chain(theta, x0):
        def e(x):
            return (0.5 * theta[0] * x.pow(2) + theta[1] * torch.cos(2 * x)).flatten(1).sum(1)
        return langevin_sample(e, x0, 5, 0.1, sigma=0.5, seed=1, backend="torch",
                               create_graph=True, clip_grad_value=10.0)

    theta = torch.tensor([1.3, 0.4], dtype=torch.float64, requires_grad=True)
    x0 = torch.randn(4, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3),
                     requires_grad=True)
    assert torch.autograd.gradcheck(chain, (theta, x0), eps=1e-6, atol=1e-6, rtol=1e-5)
    out = chain(theta, x0)
    g_theta, = torch.autograd.grad(out.pow(2).sum(), theta)
    assert g_theta.abs().sum() > 0  # the gradient is not trivially zero
    # the same chain without create_graph: same values, no graph
    plain = langevin_sample(lambda x: (0.5 * 1.3 * x.pow(2) + 0.4 * torch.cos(2 * x)).flatten(1)
                            .sum(1), x0, 5, 0.1, sigma=0.5, seed=1, backend="torch",
                            clip_grad_value=10.0)
    assert not plain.requires_grad
    # (the kernels' arithmetic is float32 whatever the state's dtype; the differentiable step
    # computes in the state's dtype, float64 here)
    torch.testing.assert_close(plain, out.detach(), rtol=0, atol=1e-6)


def test_create_graph_leaves_the_initial_state_alone():
    x0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    keep = x0.detach().clone()
    s = FusedLangevin(x0, 0.1, seed=0, backend="torch", create_graph=True)
    s.step(energy)
    assert torch.equal(x0.detach(), keep)
    assert s.state[0] is not x0 and s.state[0].requires_grad


# ------------------------------------------------------------------------- energies (B, 1, ...)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mala", [False, True])
def test_energy_of_shape_b111_is_accepted(backend, mala):
    x0 = torch.randn(6, 4, generator=torch.Generator().manual_seed(4))
    xa, xb = x0.clone(), x0.clone()
    sa = run(xa, 3, 0.1, seed=2, mala=mala, backend=backend)
    sb = run(xb, 3, 0.1, seed=2, mala=mala, backend=backend,
             energy_fn=lambda x: energy(x).view(-1, 1, 1, 1))
    assert torch.equal(xa, xb)
    assert torch.equal(sa.stats.energy, sb.stats.energy)
    with pytest.raises(ValueError, match="one energy per sample"):
        FusedLangevin(x0.clone(), 0.1, backend=backend).step(
            lambda x: torch.stack([energy(x), energy(x)], 1))


# ---------------------------------------------------------------------------------- state_dict
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mala", [False, True])
def test_state_dict_round_trip_resumes_the_identical_chain(backend, mala):
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(5))
    ids = torch.tensor([7, 3, 90, 12, 5])
    sa = run(x, 3, 0.1, seed=9, chain_ids=ids, mala=mala, backend=backend)
    buf = io.BytesIO()
    torch.save({"sampler": sa.state_dict(), "x": x.clone()}, buf)
    for _ in range(4):
        sa.step(energy)
    buf.seek(0)
    ck = torch.load(buf)
    xb = ck["x"]
    sb = FusedLangevin(xb, 0.1, seed=1234, mala=mala, backend=backend)  # another seed, no ids
    sb.load_state_dict(ck["sampler"])
    assert sb.t == 3 and sb.seed == 9
    for _ in range(4):
        sb.step(energy)
    assert torch.equal(xb, x)
    assert torch.equal(sb.stats.energy, sa.stats.energy)
    assert sb.stats.steps == sa.stats.steps == 7
    # power: the same state without the loaded dict runs other chains
    xc = ck["x"]
    run(xc, 4, 0.1, seed=1234, mala=mala, backend=backend)
    assert not torch.equal(xc, x)


# --------------------------------------------------------------------------- bounded statistics
@pytest.mark.parametrize("backend,n", [("cpp", 5000), ("torch", 600)])  # (torch: ~2 ms a step)
def test_statistics_keep_the_last_max_steps_rows_in_order(backend, n, one_thread):
    x0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(6))
    _, short = langevin_sample(energy, x0, n, 0.05, seed=3, backend=backend, max_steps=64,
                               return_stats=True, disable=True)
    _, full = langevin_sample(energy, x0, n, 0.05, seed=3, backend=backend, max_steps=n,
                              return_stats=True, disable=True)
    assert short.rows == 64 and short._buf.shape[0] == 64 and short.steps == n
    assert short.energy.shape == (64, 4) and full.energy.shape == (n, 4)
    assert torch.equal(short.energy, full.energy[-64:])
    assert torch.equal(short.grad_norm, full.grad_norm[-64:])
    # in order: the energies along the chain are not a rotation of themselves
    assert not torch.equal(short.energy, torch.roll(full.energy[-64:], 1, 0))


def test_langevin_sample_takes_max_steps():
    x0 = torch.randn(3, 2)
    out, st = langevin_sample(energy, x0, 20, 0.1, seed=0, max_steps=10, return_stats=True)
    assert st.energy.shape == (10, 3)
    _, st_default = langevin_sample(energy, x0, 20, 0.1, seed=0, return_stats=True)
    assert torch.equal(st.energy, st_default.energy[-10:])


# ----------------------------------------------------------------------- trajectory, pass-through
@pytest.mark.parametrize("thin,frames", [(1, [0, 1, 2, 3, 4, 5, 6, 7]), (3, [0, 3, 6, 7]),
                                         (7, [0, 7]), (10, [0, 7])])
def test_return_trajectory_and_thin(thin, frames):
    x0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(7))
    final, traj = langevin_sample(energy, x0, 7, 0.1, seed=4, return_trajectory=True, thin=thin)
    assert traj.shape == (len(frames), 4, 3)
    assert torch.equal(traj[0], x0) and torch.equal(traj[-1], final)
    for k, n in enumerate(frames):  # frame k is the state after frames[k] steps
        assert torch.equal(traj[k], langevin_sample(energy, x0, n, 0.1, seed=4))
    # list states, stats together
    xs = [x0, torch.randn(4, 2, 2)]
    final, traj, st = langevin_sample(lambda s: energy(s[0]) + energy(s[1]), xs, 7, 0.1, seed=4,
                                      return_trajectory=True, thin=thin, return_stats=True)
    assert [t.shape for t in traj] == [(len(frames), 4, 3), (len(frames), 4, 2, 2)]
    assert all(torch.equal(t[-1], f) for t, f in zip(traj, final))
    assert st.steps == 7
    with pytest.raises(ValueError, match="thin"):
        langevin_sample(energy, x0, 7, 0.1, return_trajectory=True, thin=0)


def test_trajectory_with_create_graph_is_differentiable():
    x0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    final, traj = langevin_sample(energy, x0, 4, 0.1, seed=0, backend="torch", create_graph=True,
                                  return_trajectory=True, thin=2)
    assert traj.shape == (3, 3, 2) and traj.requires_grad
    assert torch.equal(traj[-1], final)
    g, = torch.autograd.grad(traj[1].sum(), x0)
    assert g.abs().sum() > 0


def test_langevin_sample_passes_chain_ids_and_start_step():
    x0 = torch.randn(4, 3)
    ids = torch.tensor([5, 9, 2, 40])
    a = langevin_sample(energy, x0, 3, 0.1, seed=1, chain_ids=ids, start_step=10)
    b = x0.clone()
    run(b, 3, 0.1, seed=1, chain_ids=ids, start_step=10)
    assert torch.equal(a, b)
    c = langevin_sample(energy, x0, 3, 0.1, seed=1)
    assert not torch.equal(a, c)


def test_disable_controls_the_progress_display(capsys, monkeypatch):
    monkeypatch.setenv("VAEBM_PROGRESS_INTERVAL", "0")  # print at every update
    monkeypatch.delenv("VAEBM_QUIET", raising=False)
    x0 = torch.randn(2, 2)
    langevin_sample(energy, x0, 5, 0.1, seed=0, disable=False)
    assert "langevin: 5/5 step" in capsys.readouterr().err
    langevin_sample(energy, x0, 5, 0.1, seed=0, disable=True)
    langevin_sample(energy, x0, 5, 0.1, seed=0)  # auto: a short run shows nothing
    assert capsys.readouterr().err == ""
    langevin_sample(energy, x0, 150, 0.1, seed=0)  # auto: a long run shows it
    assert "langevin: " in capsys.readouterr().err
    monkeypatch.setenv("VAEBM_QUIET", "1")  # ... unless vaebm is quiet
    langevin_sample(energy, x0, 150, 0.1, seed=0)
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------- cpp plan vs the reference (spec)
def _nan_energy(bad_rows):
    def e(x):
        nan = torch.full((x.shape[0],), float("nan"))
        mask = torch.zeros(x.shape[0], dtype=torch.bool)
        mask[bad_rows] = True
        return energy(x) + torch.where(mask, nan, torch.zeros(()))
    return e


_OPTS = [dict(), dict(clip_grad_norm=0.5), dict(clip_grad_value=0.3), dict(clamp=(-1.0, 1.5)),
         dict(clip_grad_norm=0.5, clip_grad_value=0.3, clamp=(-1.0, 1.5))]


@pytest.mark.parametrize("guard,opts", [
    pytest.param(g, o, id=f"{g or 'noguard'}-{'+'.join(o) or 'plain'}")
    for g in ("reject", "reset", None) for o in _OPTS])
def test_planned_cpp_step_matches_the_reference(guard, opts):
    B, D, steps = 6, 37, 3
    x0 = 2 * torch.randn(B, D, generator=torch.Generator().manual_seed(8))
    x0[2, 5] = float("nan")  # a broken state: its energy and gradient are NaN
    e = _nan_energy([1])     # a broken energy with a finite gradient
    kw = dict(sigma=0.6, seed=21, on_nonfinite=guard, chain_ids=torch.tensor([4, 8, 15, 16, 23, 42]),
              **opts)
    xc, xt = x0.clone(), x0.clone()
    sc = FusedLangevin(xc, 0.2, backend="cpp", **kw)
    assert sc._plan is not None, "the one-call cpp plan is not in use: this test would miss it"
    st = FusedLangevin(xt, 0.2, backend="torch", **kw)
    for _ in range(steps):
        sc.step(e)
        st.step(e)
    torch.testing.assert_close(xc, xt, rtol=0, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(sc.stats.energy, st.stats.energy, rtol=1e-6, atol=1e-5,
                               equal_nan=True)  # (energies ~50 of states within 1e-6)
    torch.testing.assert_close(sc.stats.grad_norm, st.stats.grad_norm, rtol=1e-6, atol=1e-6,
                               equal_nan=True)
    assert torch.equal(sc.stats.guarded, st.stats.guarded)
    assert torch.equal(sc.stats.accepted, st.stats.accepted)
    assert int(sc.stats.n_guarded) == int(st.stats.n_guarded)

    # what the guard did, checked on its own (not only cpp == torch)
    ok = [0, 3, 4, 5]
    assert torch.isfinite(xc[ok]).all()
    lo, hi = opts.get("clamp", (-math.inf, math.inf))
    assert (xc[ok] >= lo).all() and (xc[ok] <= hi).all()
    if guard is None:
        assert not sc.stats.guarded.any() and torch.isnan(xc[2, 5])
        assert not torch.equal(xc[1], x0[1])  # NaN energy, finite gradient: it moved
    else:
        assert sc.stats.guarded[:, 1].all() and not sc.stats.guarded[:, ok].any()
    if guard == "reject":
        assert sc.stats.guarded[:, 2].all() and int(sc.stats.n_guarded) == 2 * steps
        assert torch.equal(xc[1], x0[1])
        assert torch.isnan(xc[2, 5]) and torch.equal(xc[2].nan_to_num(7.0), x0[2].nan_to_num(7.0))
    if guard == "reset":  # row 2 restarts once (then it is finite), row 1 at every step
        assert sc.stats.guarded[:, 2].tolist() == [True] + [False] * (steps - 1)
        assert int(sc.stats.n_guarded) == steps + 1
        assert torch.isfinite(xc[[1, 2]]).all()


@pytest.mark.parametrize("guard", [GUARD_NONE, GUARD_KEEP, GUARD_RESET])
def test_planned_cpp_step_matches_step_ref_directly(guard):
    """The same comparison against the specification function itself (langevin_ref.step_ref),
    statistics row included."""
    B, D = 5, 9
    x0 = torch.randn(B, D, generator=torch.Generator().manual_seed(9))
    x0[3, 0] = float("inf")
    on = {GUARD_NONE: None, GUARD_KEEP: "reject", GUARD_RESET: "reset"}[guard]
    xc = x0.clone()
    sc = FusedLangevin(xc, 0.3, sigma=0.5, seed=77, on_nonfinite=on, clip_grad_norm=1.0,
                       clamp=(-2.0, 2.0), backend="cpp", start_step=4)
    assert sc._plan is not None
    sc.step(energy)
    xr = x0.clone()
    g = torch.autograd.grad(energy(xr.requires_grad_(True)).sum(), xr)[0]
    xr = x0.clone()
    with torch.no_grad():
        e = energy(xr)
    rec, n_g = torch.zeros(8, 4, B), torch.zeros((), dtype=torch.int64)
    step = torch.tensor([4])
    step_ref([xr], [g], e, step, seed=77, a=0.15, b=0.5 * math.sqrt(0.3), lam=0.0,
             clip_value=0.0, clip_norm=1.0, lo=-2.0, hi=2.0, guard=guard, stats=(rec, n_g))
    torch.testing.assert_close(xc, xr, rtol=0, atol=1e-6, equal_nan=True)
    assert int(step) == 5 and sc.t == 5
    torch.testing.assert_close(sc.stats.energy[0], rec[4, 0], rtol=0, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(sc.stats.grad_norm[0], rec[4, 1], rtol=1e-6, atol=1e-6,
                               equal_nan=True)
    assert torch.equal(sc.stats.guarded[0], rec[4, 3] > 0.5)
    if guard == GUARD_RESET:  # row 3 restarted from the reset stream (then clamped)
        fresh = philox_normal_rows(77, 4, torch.arange(B), D, 0, STREAM_RESET).reshape(B, D)
        torch.testing.assert_close(xc[3], fresh[3].clamp(-2, 2), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------ SampleBank
def test_sample_bank_reinit_fraction_is_binomial():
    stats = pytest.importorskip("scipy.stats")
    bank = SampleBank(1000, (3,), init="uniform", reinit_prob=0.05, seed=0)
    bank.update(torch.arange(1000), torch.full((1000, 3), 5.0))  # sentinel: fresh rows differ
    n_re = n = 0
    for _ in range(40):
        x, idx = bank.sample(500)
        fresh = (x != 5.0).all(1)
        assert torch.equal(fresh, bank.last_reinit)  # exactly the flagged rows are fresh
        assert ((x[fresh] > -1) & (x[fresh] < 1)).all()  # ... and drawn from U(-1, 1)
        n_re += int(fresh.sum())
        n += 500
    assert stats.binomtest(n_re, n, 0.05).pvalue > 1e-3, n_re / n
    # power: the test would see a wrong probability
    assert stats.binomtest(n_re, n, 0.06).pvalue < 1e-3


def test_sample_bank_indices_are_uniform_and_distinct():
    stats = pytest.importorskip("scipy.stats")
    size, batch, draws = 200, 50, 400
    bank = SampleBank(size, (2, 2), seed=1, reinit_prob=0.0)
    counts = torch.zeros(size)
    for _ in range(draws):
        x, idx = bank.sample(batch)
        assert idx.dtype == torch.int64 and idx.unique().numel() == batch  # no row twice
        assert torch.equal(x, bank.bank[idx])  # no restarts at reinit_prob=0: copies
        counts += torch.bincount(idx, minlength=size)
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3
    x, _ = bank.sample(size)  # the whole bank is a valid batch
    with pytest.raises(ValueError, match="batch"):
        bank.sample(size + 1)


def test_sample_bank_update_writes_back_exactly_and_round_trips():
    bank = SampleBank(64, (3, 4), init="normal", seed=2, dtype=torch.float64)
    before = bank.bank.clone()
    x, idx = bank.sample(16)
    assert x.dtype == torch.float64 and x.shape == (16, 3, 4)
    x.mul_(3).add_(1)  # a sample is a copy: the bank is untouched until update
    assert torch.equal(bank.bank, before)
    bank.update(idx, x)
    assert torch.equal(bank.bank[idx], x)
    rest = torch.ones(64, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(bank.bank[rest], before[rest])
    # state_dict: content and generator; a restored bank draws what the original draws next
    d = bank.state_dict()
    other = SampleBank(64, (3, 4), init="normal", seed=99, dtype=torch.float64)
    other.load_state_dict(d)
    assert torch.equal(other.bank, bank.bank)
    xa, ia = bank.sample(8)
    xb, ib = other.sample(8)
    assert torch.equal(ia, ib) and torch.equal(xa, xb)
    with pytest.raises(ValueError, match="shape"):
        SampleBank(32, (3, 4)).load_state_dict(d)


def test_sample_bank_errors_are_clear():
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="size"):
            SampleBank(bad, (2,))
    with pytest.raises(ValueError, match="shape"):
        SampleBank(4, (2, 0))
    with pytest.raises(ValueError, match="reinit_prob"):
        SampleBank(4, 2, reinit_prob=1.5)
    with pytest.raises(ValueError, match="init"):
        SampleBank(4, 2, init="laplace")
    with pytest.raises(ValueError, match="init_range"):
        SampleBank(4, 2, init_range=(1.0, 1.0))
    with pytest.raises(ValueError, match="init"):
        SampleBank(4, (2,), init=lambda n, g: torch.zeros(n, 3))
    bank = SampleBank(8, (2,))
    with pytest.raises(ValueError, match="batch"):
        bank.sample(0)
    with pytest.raises(ValueError, match="shape"):
        bank.update(torch.tensor([0, 1]), torch.zeros(2, 3))
    with pytest.raises(IndexError, match="idx"):
        bank.update(torch.tensor([0, 8]), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="more than once"):
        bank.update(torch.tensor([1, 1]), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="integer"):
        bank.update(torch.tensor([0.0, 1.0]), torch.zeros(2, 2))


def test_sample_bank_callable_init_uses_the_banks_generator():
    init = lambda n, g: torch.rand(n, 2, generator=g) + 10  # noqa: E731
    a = SampleBank(16, (2,), init=init, seed=5, reinit_prob=0.5)
    b = SampleBank(16, (2,), init=init, seed=5, reinit_prob=0.5)
    assert torch.equal(a.bank, b.bank) and (a.bank >= 10).all()
    assert all(torch.equal(u, v) for u, v in zip(a.sample(8), b.sample(8)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bank_row_noise_follows_the_bank_index_not_the_batch_row(backend):
    """Two runs (same sampler seed and start_step) draw overlapping sets of bank rows at
    different batch positions; with chain_ids=idx a row gets identical increments in both."""
    size, batch = 32, 16
    b1 = SampleBank(size, (5,), reinit_prob=0.0, seed=1)
    b2 = SampleBank(size, (5,), reinit_prob=0.0, seed=2)
    b2.update(torch.arange(size), b1.bank)  # same content, other draws
    x1, i1 = b1.sample(batch)
    x2, i2 = b2.sample(batch)
    pos1 = {int(r): p for p, r in enumerate(i1)}
    pairs = [(pos1[int(r)], p) for p, r in enumerate(i2) if int(r) in pos1]
    assert any(p != q for p, q in pairs), "no shared row at another position: reseed the test"

    def increments(x, ids):
        x0 = x.clone()
        run(x, 3, 0.1, sigma=0.5, seed=42, start_step=10, chain_ids=ids, backend=backend)
        return x - x0

    d1, d2 = increments(x1.clone(), i1), increments(x2.clone(), i2)
    for p, q in pairs:
        assert torch.equal(d1[p], d2[q]), (p, q)
    # power: keyed by batch row, a shared row at another position gets other noise
    e1, e2 = increments(x1.clone(), None), increments(x2.clone(), None)
    assert any(not torch.equal(e1[p], e2[q]) for p, q in pairs if p != q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_persistent_bank_loop_with_bind(backend):
    """The IGEBM/JEM loop: draw, bind with chain_ids, step, write back. Each iteration gets
    new noise (the global step advances across bind) and the bank holds the chains' ends."""
    bank = SampleBank(20, (4,), reinit_prob=0.0, seed=3, init="normal")
    sampler, seen = None, {}
    for it in range(3):
        x, idx = bank.sample(20)  # the whole bank, in a new order each time
        start = x.clone()
        if sampler is None:
            sampler = FusedLangevin(x, 0.1, sigma=0.5, seed=0, chain_ids=idx, backend=backend)
        else:
            sampler.bind(x, chain_ids=idx)
        for _ in range(2):
            sampler.step(zero_energy)
        bank.update(idx, x)
        assert torch.equal(bank.bank[idx], x)
        inc = x - start
        for p, r in enumerate(idx.tolist()):
            for old in seen.get(r, []):
                assert not torch.isclose(inc[p], old).any()
            seen.setdefault(r, []).append(inc[p])
    assert sampler.t == 6


def test_statistics_buffer_is_uninitialised_but_checkpoints_are_not():
    """The ring buffer is allocated uninitialised (a zero fill cost a page fault per page up
    front); only recorded rows are read, and state_dict stores zeros in the rest."""
    x = torch.randn(5, 2)
    s = FusedLangevin(x, 0.05, seed=1)
    s.stats._buf.fill_(float("nan"))  # what uninitialised memory may hold
    for _ in range(3):
        s.step(energy)
    assert s.stats.energy.shape == (3, 5) and torch.isfinite(s.stats.energy).all()
    buf = s.state_dict()["stats"]["buffer"]
    assert buf.shape == s.stats._buf.shape and torch.isfinite(buf).all()
    assert torch.equal(buf[3:], torch.zeros_like(buf[3:]))
    assert torch.equal(buf[:3], s.stats._buf[:3])


def test_a_finished_samplers_statistics_block_is_reused_and_rewritten():
    """A sampler made after another one is gone takes over its CPU statistics block (no fresh
    pages to fault in), and its records are its own: nothing of the old run shows through."""
    import gc

    from vaebm.sampling import diagnostics

    gc.collect()  # samplers of earlier tests hand in their blocks now, not in the middle
    diagnostics._spare.clear()
    x = torch.randn(6, 2)
    a = FusedLangevin(x.clone(), 0.05, seed=1)
    for _ in range(5):
        a.step(energy)
    ptr = a.stats._buf.data_ptr()
    del a
    gc.collect()
    b = FusedLangevin(x.clone(), 0.05, seed=2)
    assert b.stats._buf.data_ptr() == ptr
    for _ in range(2):
        b.step(energy)
    fresh = FusedLangevin(x.clone(), 0.05, seed=2)  # (the spare is taken: a new block)
    assert fresh.stats._buf.data_ptr() != ptr
    for _ in range(2):
        fresh.step(energy)
    assert b.stats.energy.shape == (2, 6)
    assert torch.equal(b.stats.energy, fresh.stats.energy)
    assert torch.equal(b.state_dict()["stats"]["buffer"], fresh.state_dict()["stats"]["buffer"])
