"""NCSN v1 / NCSNv2 score networks and annealed Langevin samplers of benchmarks/ncsn.py."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import ncsn  # noqa: E402


def _meta(version):
    with torch.device("meta"):
        return ncsn.RefineNetDilated(version)


# ----------------------------------------------------------------------------- architecture
@pytest.mark.parametrize("version,params", [(1, 30_117_635), (2, 29_694_083)])
def test_parameter_count_matches_the_released_networks(version, params):
    m = _meta(version)
    assert sum(p.numel() for p in m.parameters()) == params


@pytest.mark.parametrize("version", [1, 2])
def test_forward_flops(version):
    m = _meta(version)
    f1 = ncsn.count_flops(m, batch=1)
    assert abs(f1 / 1e9 - 19.79) < 0.01 * 19.79
    assert ncsn.count_flops(m, batch=3) == 3 * f1


def test_module_census():
    m1, m2 = _meta(1), _meta(2)
    convs = [c for c in m1.modules() if isinstance(c, torch.nn.Conv2d)]
    assert len(convs) == 75
    assert sum(c.kernel_size == (3, 3) for c in convs) == 74
    dil = [c.dilation[0] for c in convs]
    assert (dil.count(1), dil.count(2), dil.count(4)) == (65, 5, 5)
    norms1 = [n for n in m1.modules() if isinstance(n, ncsn.InstanceNormPlus)]
    assert len(norms1) == 71 and all(n.embed.weight.shape == (10, 3 * n.channels) for n in norms1)
    norms2 = [n for n in m2.modules() if isinstance(n, ncsn.InstanceNormPlus)]
    assert len(norms2) == 17 and not any(isinstance(e, torch.nn.Embedding) for e in m2.modules())
    assert m2.n_levels == 232 and m1.n_levels == 10


def _in_plus_ref(x, gamma, alpha, beta):
    """Instance norm++ from its definition, in float64."""
    x = x.double()
    mu = x.mean((2, 3))
    var = x.var((2, 3), unbiased=False)
    h = (x - mu[..., None, None]) / torch.sqrt(var[..., None, None] + 1e-5)
    a = (mu - mu.mean(1, keepdim=True)) / torch.sqrt(mu.var(1, keepdim=True) + 1e-5)
    g, al, b = (t.double().reshape(x.shape[0], -1, 1, 1) for t in (gamma, alpha, beta))
    return g * (h + al * a[..., None, None]) + b


def test_conditional_norm_uses_the_noise_level_index():
    torch.manual_seed(0)
    norm = ncsn.InstanceNormPlus(6, n_levels=5)
    with torch.no_grad():
        norm.embed.weight.normal_()
    x = torch.randn(3, 6, 7, 5) * 3 + 1
    y = torch.tensor([4, 0, 2])
    out = norm(x, y)
    g, a, b = norm.embed.weight[y].detach().chunk(3, 1)
    torch.testing.assert_close(out.double(), _in_plus_ref(x, g, a, b), rtol=1e-5, atol=1e-5)
    # another level changes the output of that sample only
    y2 = torch.tensor([4, 1, 2])
    out2 = norm(x, y2)
    assert not torch.allclose(out2[1], out[1])
    torch.testing.assert_close(out2[[0, 2]], out[[0, 2]])
    with pytest.raises(ValueError, match="noise-level index"):
        norm(x, torch.tensor([0, 1]))


def test_unconditional_norm_ignores_the_level():
    torch.manual_seed(1)
    norm = ncsn.InstanceNormPlus(4)
    x = torch.randn(2, 4, 5, 5)
    ref = _in_plus_ref(x, norm.gamma.expand(2, 4), norm.alpha.expand(2, 4), norm.beta.expand(2, 4))
    torch.testing.assert_close(norm(x, torch.tensor([0, 9])).double(), ref, rtol=1e-5, atol=1e-5)


def test_networks_condition_on_the_level():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16)
    v1 = ncsn.ncsn_v1(ngf=8).eval()
    for n in v1.modules():  # random embeddings so that levels differ clearly
        if isinstance(n, torch.nn.Embedding):
            torch.nn.init.normal_(n.weight, 1.0, 0.5)
    with torch.no_grad():
        a = v1(x, torch.tensor([0, 0]))
        b = v1(x, torch.tensor([0, 7]))
        torch.testing.assert_close(a[0], b[0])
        assert (a[1] - b[1]).abs().max() > 1e-3
        # per-sample networks (instance norms): a sample's score does not depend on the batch
        torch.testing.assert_close(v1(x[1:], torch.tensor([7])), b[1:], rtol=1e-4, atol=1e-5)
        v2 = ncsn.ncsn_v2(ngf=8).eval()
        s0 = v2(x, torch.tensor([0, 0]))
        s1 = v2(x, torch.tensor([100, 231]))
        sig = v2.sigmas
        # NCSNv2: the level only divides the output by sigma_y
        torch.testing.assert_close(s1 * sig[[100, 231]].view(-1, 1, 1, 1),
                                   s0 * sig[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="noise-level"):
        v1(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="expects x"):
        v1(torch.rand(2, 1, 16, 16), torch.tensor([0, 1]))


# ----------------------------------------------------------------------------- sampler
def test_schedules():
    s1 = ncsn.NCSN_V1.sigmas
    want = [1, .5995, .3594, .2154, .1292, .0774, .0464, .0278, .0167, .01]
    assert len(s1) == 10 and max(abs(a - b) for a, b in zip(s1, want)) < 1e-4
    assert s1[0] == 1.0 and abs(s1[-1] - 0.01) < 1e-15
    s2 = ncsn.NCSN_V2.sigmas
    assert len(s2) == 232 and abs(s2[0] - 50) < 1e-12 and abs(s2[-1] - 0.01) < 1e-15
    r = [b / a for a, b in zip(s2, s2[1:])]
    assert max(r) - min(r) < 1e-12 and abs(r[0] - 0.9638) < 1e-4
    assert ncsn.NCSN_V1.evaluations == 1000 and ncsn.NCSN_V2.evaluations == 1161
    assert ncsn.NCSN_V1.step_size(9) == pytest.approx(2e-5)
    assert ncsn.NCSN_V1.step_size(0) == pytest.approx(2e-5 * 1e4)
    assert ncsn.NCSN_V2.step_size(0) == pytest.approx(6.2e-6 * 5000**2)


class _Score:
    """A fake score s(x, y) = (0.3 - x) / (sigma_y^2 + 0.1) (a Gaussian's, stable under both
    schedules) that records the levels it is called with."""

    def __init__(self, sched=ncsn.NCSN_V1, bad_level=None):
        self.calls, self.bad_level = [], bad_level
        self.sig = torch.tensor(sched.sigmas, dtype=torch.float64)

    def __call__(self, x, y):
        self.calls.append(y.clone())
        out = ((0.3 - x) / (self.sig[y].view(-1, 1, 1, 1) ** 2 + 0.1)).to(x.dtype)
        if self.bad_level is not None and int(y[0]) == self.bad_level:
            out = out * float("nan")
        return out


@pytest.mark.parametrize("sched", [ncsn.NCSN_V1, ncsn.NCSN_V2], ids=["v1", "v2"])
def test_annealed_langevin_update_and_noise_schedule(sched):
    x0 = ncsn.init_uniform(2, 1, 3, generator=torch.Generator().manual_seed(3))
    assert 0 <= x0.min() and x0.max() <= 1
    score = _Score(sched)
    res = ncsn.annealed_langevin(score, x0, sched, generator=torch.Generator().manual_seed(7))
    # independent re-computation in float64 with the same noise stream
    gen = torch.Generator().manual_seed(7)
    x, L = x0.double(), len(sched.sigmas)
    for i, sigma in enumerate(sched.sigmas):
        step = sched.step_lr * (sigma / sched.sigmas[-1]) ** 2
        for _ in range(sched.steps_each):
            z = torch.randn(x.shape, generator=gen).double()
            x = x + step * (0.3 - x) / (sigma**2 + 0.1) + math.sqrt(2 * step) * z
    if sched.denoise:
        x = x + sched.sigmas[-1] ** 2 * (0.3 - x) / (sched.sigmas[-1] ** 2 + 0.1)
    assert res.evaluations == len(score.calls) == sched.evaluations
    levels = [int(c[0]) for c in score.calls]
    want = [i for i in range(L) for _ in range(sched.steps_each)] + ([L - 1] * sched.denoise)
    assert levels == want
    torch.testing.assert_close(res.x.double(), x, rtol=1e-4, atol=1e-4)
    assert not torch.equal(res.x, x0)  # the input is not modified, a new chain is returned


def test_published_mode_copies_to_host_every_step_v1_only():
    x0 = torch.rand(2, 1, 2, 2)
    r1 = ncsn.annealed_langevin(_Score(), x0, ncsn.NCSN_V1, mode="published",
                                levels=[0, 5], steps_each=3)
    assert r1.evaluations == 6 and r1.levels == [0, 5]
    assert len(r1.images) == 6 + 1  # before every step, and the final image
    assert all(im.device.type == "cpu" and 0 <= im.min() and im.max() <= 1 for im in r1.images[:-1])
    r2 = ncsn.annealed_langevin(_Score(ncsn.NCSN_V2), x0, ncsn.NCSN_V2, mode="published", levels=[0],
                                steps_each=2)
    assert r2.evaluations == 3 and len(r2.images) == 1  # final_only: the final image alone
    r3 = ncsn.annealed_langevin(_Score(), x0, ncsn.NCSN_V1, mode="eager", levels=[0], steps_each=2)
    assert r3.images == []
    # same noise stream, same chain: the published loop differs only in what it copies
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    a = ncsn.annealed_langevin(_Score(), x0, ncsn.NCSN_V1, mode="published", levels=[2, 3],
                               steps_each=4, generator=g())
    b = ncsn.annealed_langevin(_Score(), x0, ncsn.NCSN_V1, mode="eager", levels=[2, 3],
                               steps_each=4, generator=g())
    torch.testing.assert_close(a.x, b.x)


def test_non_finite_guard():
    x0 = torch.rand(2, 1, 2, 2)
    with pytest.raises(FloatingPointError, match="noise level 3"):
        ncsn.annealed_langevin(_Score(bad_level=3), x0, ncsn.NCSN_V1, steps_each=2)
    res = ncsn.annealed_langevin(_Score(bad_level=3), x0, ncsn.NCSN_V1, steps_each=2, guard=False)
    assert torch.isnan(res.x).all()
    with pytest.raises(FloatingPointError, match="noise level 231"):  # the denoising step
        ncsn.annealed_langevin(_Score(ncsn.NCSN_V2, 231), x0, ncsn.NCSN_V2, levels=[0], steps_each=1)


def test_sampler_rejects_bad_arguments():
    x0 = torch.rand(1, 1, 2, 2)
    with pytest.raises(ValueError, match="mode"):
        ncsn.annealed_langevin(_Score(), x0, ncsn.NCSN_V1, mode="fast")
    with pytest.raises(ValueError, match="levels"):
        ncsn.annealed_langevin(_Score(), x0, ncsn.NCSN_V1, levels=[10])
    with pytest.raises(ValueError, match="version"):
        ncsn.RefineNetDilated(3)
