"""The one-call step op ``vaebm::langevin_step_`` against its reference
``vaebm.ops.langevin_ref.step_ref``: narrow rows (the lanes-over-samples kernel), wide rows
(one pass per sample), mixed states, each guard, gradient clipping by norm and by value, chain
ids, statistics rows and the step counter, on fresh random inputs with broken chains."""

from __future__ import annotations

import math

import pytest
import torch

from vaebm.ops import _registry
from vaebm.ops.langevin_ref import GUARD_KEEP, GUARD_NONE, GUARD_RESET, step_ref

CASES = [  # shapes, guard, clip_norm, clip_value, broken rows, chain ids
    ([(100, 2)], GUARD_KEEP, 0.0, 0.0, (), False),
    ([(2000, 2)], GUARD_KEEP, 1.0, 0.0, (3, 8, 1999), False),
    ([(37, 5), (37, 3, 3)], GUARD_RESET, 0.5, 0.7, (0, 1, 36), True),
    ([(5, 20, 16, 16), (5, 3, 32, 32)], GUARD_KEEP, 2.0, 0.0, (2, 3), False),
    ([(33, 130)], GUARD_NONE, 0.0, 0.0, (), False),
    ([(33, 127)], GUARD_RESET, 0.0, 0.0, (4, 5), True),
    ([(8, 20, 32, 32), (8, 3, 32, 32)], GUARD_KEEP, 2.0, 0.0, (2, 3), False),  # one pass/sample
    ([(8, 20, 32, 32), (8, 3, 32, 32)], GUARD_RESET, 0.0, 0.5, (0, 7), True),
    ([(8, 2), (8, 3, 32, 32)], GUARD_KEEP, 1.0, 0.0, (5,), False),  # narrow and wide together
    # the one-sweep path (wide, no norm clipping): verdicts found after the rows are written
    ([(8, 20, 32, 32), (8, 3, 32, 32)], GUARD_KEEP, 0.0, 0.0, (1, 2, 3, 4, 7), False),
    ([(8, 20, 32, 32), (8, 3, 32, 32)], GUARD_RESET, 0.0, 0.0, (0, 3, 5), True),
    ([(8, 20, 32, 32), (8, 3, 32, 32)], GUARD_KEEP, 0.0, 0.3, (1, 6), False),
    ([(6, 50_000)], GUARD_NONE, 0.0, 0.0, (1, 2), False),  # rows end in a partial step
    # rows of 1-4 elements: blocks of plain updates run as one contiguous run of vectors
    ([(50, 1)], GUARD_KEEP, 0.0, 0.0, (3,), False),
    ([(70, 3)], GUARD_RESET, 0.0, 0.5, (1, 40), True),
    ([(45, 4), (45, 2)], GUARD_NONE, 0.0, 0.0, (), True),
    ([(33, 2)], GUARD_KEEP, 0.0, 0.0, (), False),
]

# how the sweep's rows are broken, by row: a non-finite x (first element: written before the
# verdict is known; or mid-row), a NaN gradient at the row's end, and a finite gradient whose
# squares overflow (not a broken chain: the sum of squares is Inf, the verdict good)
SWEEP_BREAKS = {
    (0, 0): "x_inf_first", (0, 1): "g_nan_last", (0, 2): "x_nan_mid", (0, 3): "g_huge",
    (0, 4): "energy_inf", (0, 7): "g_nan_last",
    (1, 0): "energy_inf", (1, 3): "x_inf_first", (1, 5): "g_huge",
    (2, 1): "g_inf_mid", (2, 6): "x_nan_mid",
    (3, 1): "g_nan_last", (3, 2): "x_inf_first",
}
SWEEP0 = 9  # index of the first sweep case


def _break(xs, gs, energy, r, kind):
    if kind == "energy_inf":
        energy[r] = float("inf")
    elif kind == "g_nan_last":
        gs[-1][r].view(-1)[-1] = float("nan")
    elif kind == "g_inf_mid":
        gs[0][r].view(-1)[gs[0][r].numel() // 2] = float("inf")
    elif kind == "x_inf_first":
        xs[0][r].view(-1)[0] = float("inf")
    elif kind == "x_nan_mid":
        xs[-1][r].view(-1)[xs[-1][r].numel() // 2 + 1] = float("nan")
    elif kind == "g_huge":
        gs[0][r].fill_(min(1e30, torch.finfo(gs[0].dtype).max))  # fp16: no overflow
    else:
        raise ValueError(kind)


@pytest.fixture(scope="module")
def op():
    try:
        _registry.load_extension("cpu")
    except _registry.BackendUnavailable as e:
        pytest.skip(str(e))
    return torch.ops.vaebm.langevin_step_


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_step_matches_reference(op, case, dtype):
    shapes, guard, clip_norm, cv, broken, chain = CASES[case]
    gen = torch.Generator().manual_seed(100 + case)
    B = shapes[0][0]
    xs = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    gs = [(3 * torch.randn(s, generator=gen)).to(dtype) for s in shapes]
    energy = torch.randn(B, generator=gen)
    for r in broken:  # odd rows: a NaN gradient entry; even rows: an infinite energy
        kind = "g_nan_last" if r % 2 else "energy_inf"
        _break(xs, gs, energy, r, SWEEP_BREAKS.get((case - SWEEP0, r), kind))
    bad_rows = [r for r in broken if SWEEP_BREAKS.get((case - SWEEP0, r)) != "g_huge"]
    ids = torch.randperm(10 * B, generator=gen)[:B] if chain else None
    seed, rows = 123456789012, 4  # rows: the ring holds 4 steps
    kw = dict(a=0.01, b=0.05, lam=1.0, clip_value=cv, clip_norm=clip_norm, lo=-math.inf,
              hi=math.inf, guard=guard)
    out = {}
    for impl in ("ref", "cpp"):
        x = [t.clone() for t in xs]
        step = torch.tensor([7], dtype=torch.int64)
        rec = torch.full((rows, 4, B), 5.0)
        n_guarded = torch.tensor(2, dtype=torch.int64)
        if impl == "ref":
            step_ref(x, gs, energy, step, seed=seed, sample_offset=3, chain_ids=ids,
                     stats=(rec, n_guarded), **kw)
        else:
            op(x, gs, energy, step, seed & 0xFFFFFFFF, seed >> 32, 3, ids, kw["a"], kw["b"],
               kw["lam"], cv, clip_norm, kw["lo"], kw["hi"], guard, rec, n_guarded)
        out[impl] = (x, int(step), rec, int(n_guarded))
    (xr, sr, rr, nr), (xc, sc, rc, nc) = out["ref"], out["cpp"]
    assert sr == sc == 8 and nr == nc == 2 + (len(bad_rows) if guard != GUARD_NONE else 0)
    # the SIMD normals are within 1 ulp of the scalar ones; results round to the dtype
    tol = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for a, b in zip(xr, xc):
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(b.float().nan_to_num(), a.float().nan_to_num(), atol=tol,
                                   rtol=tol)
    torch.testing.assert_close(rc, rr, equal_nan=True, rtol=1e-5, atol=1e-6)
    row = 7 % rows
    assert torch.equal(rc[row, 3] > 0, torch.isin(torch.arange(B),
                                                  torch.tensor(bad_rows or [-1]))
                       & (guard != GUARD_NONE))
    if guard == GUARD_KEEP:  # a rejected chain keeps its state bit for bit
        for a, x0 in zip(xc, xs):
            for r in bad_rows:
                assert torch.equal(a[r].isnan(), x0[r].isnan())
                assert torch.equal(a[r].nan_to_num(), x0[r].nan_to_num())


def test_step_validates_its_arguments(op):
    x, g = [torch.zeros(4, 3)], [torch.zeros(4, 3)]
    step = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="guard must be"):
        op(x, g, None, step, 0, 0, 0, None, 0.1, 0.1, 0.0, 0.0, 0.0, -1.0, 1.0, 3, None, None)
    with pytest.raises(RuntimeError, match="rows, 4, B"):
        op(x, g, None, step, 0, 0, 0, None, 0.1, 0.1, 0.0, 0.0, 0.0, -1.0, 1.0, 1,
           torch.zeros(2, 3, 4), torch.zeros((), dtype=torch.int64))
    with pytest.raises(RuntimeError, match="chain_ids"):
        op(x, g, None, step, 0, 0, 0, torch.zeros(3, dtype=torch.int64), 0.1, 0.1, 0.0, 0.0,
           0.0, -1.0, 1.0, 1, None, None)
