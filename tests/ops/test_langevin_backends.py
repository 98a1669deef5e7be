"""Every fast backend against the PyTorch reference, with identical Philox noise."""

import math

import pytest
import torch

from vaebm.ops import (MODE_KEEP, MODE_RESET, BackendUnavailable, langevin_reduce,
                       langevin_update_, reduce_ref, update_ref)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FAST = ["cpp", "triton", "cuda"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: (2e-6, 2e-6), torch.float16: (1e-3, 2e-3), torch.bfloat16: (8e-3, 1.6e-2)}


def _device_for(backend):
    if backend == "cpp":
        return "cpu"
    if backend == "cuda" and not torch.cuda.is_available():
        pytest.skip("cuda backend needs a GPU (its sources are compile-checked in test_build.py)")
    return DEV


def _state(shapes, dtype, device, B, gen):
    xs = [torch.randn((B, *s), generator=gen).to(device=device, dtype=dtype) for s in shapes]
    gs = [(3 * torch.randn((B, *s), generator=gen)).to(device=device, dtype=dtype) for s in shapes]
    return xs, gs


SHAPES = [[(7,)], [(3, 5, 5), (2, 3), (1,), (4, 9, 13)], [(20, 16, 16), (3, 32, 32)]]
CASES = [  # (lam, sigma, clip_value, clamp, gscale, mode)
    dict(lam=0.0, sigma=1.0),
    dict(lam=1.0, sigma=0.5, clip_value=2.0),
    dict(lam=1.0, sigma=1.0, clamp=(-1.5, 1.0), per_sample=True),
]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shapes", SHAPES, ids=["one", "mixed", "vaebm"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_update_matches_reference(backend, dtype, shapes, case):
    device = _device_for(backend)
    cfg = dict(CASES[case])
    per_sample = cfg.pop("per_sample", False)
    gen = torch.Generator().manual_seed(hash((backend, str(dtype), case, len(shapes))) % 2**31)
    B = 5
    xs, gs = _state(shapes, dtype, device, B, gen)
    kw = dict(seed=int(torch.randint(0, 2**62, (1,), generator=gen)), step=3, sample_offset=11,
              step_size=0.37, **cfg)
    if per_sample:
        kw["gscale"] = torch.rand(B, generator=gen).to(device)
        kw["mode"] = torch.tensor([0, MODE_KEEP, MODE_RESET, 0, MODE_KEEP], dtype=torch.int32,
                                  device=device)
    want = [x.clone() for x in xs]
    langevin_update_(want, gs, backend="torch", **kw)
    got = [x.clone() for x in xs]
    langevin_update_(got, gs, backend=backend, **kw)
    rtol, atol = TOL[dtype]
    for w, g in zip(want, got):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), w.float(), rtol=rtol, atol=atol)
    if per_sample:  # kept chains are bit-identical to their old state
        for x, g in zip(xs, got):
            assert torch.equal(g[1], x[1]) and torch.equal(g[4], x[4])


@pytest.mark.parametrize("backend", FAST)
def test_update_out_of_place_and_noncontiguous(backend):
    device = _device_for(backend)
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(6, 9, 10, generator=gen).to(device)
    x = base.transpose(1, 2)  # non-contiguous state
    g = torch.randn(6, 10, 9, generator=gen).to(device)
    y = torch.randn(4, 33, generator=gen).to(device)[:, ::3]  # strided, second tensor
    gy = torch.randn_like(y)
    kw = dict(seed=5, step=0, step_size=0.1, lam=1.0)
    want = [torch.empty_like(x), torch.empty_like(y)]
    with pytest.raises(ValueError, match="batch size"):
        langevin_update_([x, y], [g, gy], want, backend=backend, **kw)
    y = torch.randn(6, 33, generator=gen).to(device)[:, ::3]
    gy = torch.randn_like(y)
    want = [torch.zeros_like(x), torch.zeros_like(y)]
    got = [torch.zeros_like(x), torch.zeros_like(y)]
    update_ref([x, y], [g, gy], want, seed=5, step=0, sample_offset=0, a=0.05,
               b=math.sqrt(0.1), lam=1.0, clip_value=0.0, lo=-math.inf, hi=math.inf)
    x0 = x.clone()
    langevin_update_([x, y], [g, gy], got, backend=backend, **kw)
    assert torch.equal(x, x0)  # out-of-place leaves the state alone
    for w, o in zip(want, got):
        torch.testing.assert_close(o, w, rtol=2e-6, atol=2e-6)
    langevin_update_([x, y], [g, gy], backend=backend, **kw)  # in place, through a copy
    for w, o in zip(want, [x, y]):
        torch.testing.assert_close(o, w, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("backend", FAST)
def test_noise_is_the_philox_stream(backend):
    """With x = g = 0, eta = 1, sigma = 1 the update writes xi itself: integers bitwise equal in
    all backends implies normals within 1e-6 of the reference."""
    device = _device_for(backend)
    shapes = [(4, 1031), (4, 3, 5)]
    xs = [torch.zeros(s, device=device) for s in shapes]
    gs = [torch.zeros(s, device=device) for s in shapes]
    want = [x.clone() for x in xs]
    langevin_update_(want, gs, seed=2**40 + 3, step=9, sample_offset=2, step_size=1.0,
                     backend="torch")
    langevin_update_(xs, gs, seed=2**40 + 3, step=9, sample_offset=2, step_size=1.0,
                     backend=backend)
    for w, x in zip(want, xs):
        torch.testing.assert_close(x, w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_others", [False, True])
def test_reduce_matches_reference(backend, dtype, with_others):
    device = _device_for(backend)
    gen = torch.Generator().manual_seed(7 + with_others)
    B = 6
    xs, gs = _state(SHAPES[1], dtype, device, B, gen)
    xs[1][2, 0, 1] = float("nan")
    gs[3][4, 1, 2, 3] = float("inf")
    others = [x + 0.1 * torch.randn(x.shape, generator=gen).to(device, dtype) for x in xs]
    kw = dict(step_size=0.2, lam=1.0, clip_value=2.5,
              gscale=torch.rand(B, generator=gen).to(device))
    want = langevin_reduce(xs, gs, others if with_others else None, backend="torch", **kw)
    got = langevin_reduce(xs, gs, others if with_others else None, backend=backend, **kw)
    assert got.shape == (B, 4) and got.dtype == torch.float32
    assert torch.equal(got[:, 1], want[:, 1])
    assert got[2, 1] == 1 and got[4, 1] == 1 and got[0, 1] == 0
    fin = torch.isfinite(want)
    assert torch.equal(fin, torch.isfinite(got))
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=1e-4)


def test_reduce_ref_against_numpy():
    np = pytest.importorskip("numpy")
    gen = torch.Generator().manual_seed(3)
    xs, gs = _state([(3, 4), (5,)], torch.float64, "cpu", 4, gen)
    os_ = [x + 1 for x in xs]
    s = torch.rand(4, generator=gen, dtype=torch.float64)
    r = reduce_ref(xs, gs, os_, a=0.1, lam=0.5, clip_value=1.0, gscale=s.float()).double()
    X = np.concatenate([x.reshape(4, -1).numpy() for x in xs], 1)
    G = np.clip(np.concatenate([g.reshape(4, -1).numpy() for g in gs], 1), -1, 1)
    O = X + 1
    np.testing.assert_allclose(r[:, 0], (G**2).sum(1), rtol=1e-5)
    np.testing.assert_allclose(r[:, 2], (X**2).sum(1), rtol=1e-5)
    d = O - X + 0.1 * (s.numpy()[:, None] * G + 0.5 * X)
    np.testing.assert_allclose(r[:, 3], (d**2).sum(1), rtol=1e-5)


def test_explicit_backend_that_cannot_run_raises():
    x = torch.zeros(2, 3)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="CUDA tensors"):
            langevin_update_(x, x.clone(), seed=0, step_size=0.1, backend="cuda")
    with pytest.raises(BackendUnavailable, match="supports"):
        langevin_update_(x.double(), x.double(), seed=0, step_size=0.1, backend="cpp")
    with pytest.raises(ValueError, match="unknown backend"):
        langevin_update_(x, x.clone(), seed=0, step_size=0.1, backend="fortran")
