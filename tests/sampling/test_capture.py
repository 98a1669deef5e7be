"""CUDA-graph capture of the whole step: replays equal the eager chain (GPU only)."""

import pytest
import torch

from vaebm import FusedLangevin


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("mala", [False, True])
def test_graph_replay_equals_eager(backend, mala):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 64), torch.nn.SiLU(), torch.nn.Linear(64, 1)).cuda()
    energy = lambda xs: net(torch.cat([xs[0], xs[1].flatten(1)], 1)).squeeze(1)  # noqa: E731
    x0 = [torch.randn(32, 4, device="cuda"), torch.randn(32, 2, 2, 2, device="cuda")]
    kw = dict(lam=1.0, seed=3, backend=backend, mala=mala, clip_grad_norm=5.0)
    eager = [t.clone() for t in x0]
    s = FusedLangevin(eager, 0.01, **kw)
    for _ in range(6):
        s.step(energy)
    graphed = [t.clone() for t in x0]
    g = FusedLangevin(graphed, 0.01, capturable=True, **kw)
    for _ in range(6):
        g.graph_step(energy)
    for a, b in zip(eager, graphed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert g.stats.steps == 6
