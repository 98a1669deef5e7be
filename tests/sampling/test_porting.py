"""docs/porting.md: every ```python block runs (each on its own, in a fresh namespace), and the
convention table names every project it promises."""

import re
from pathlib import Path

import pytest
import torch

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "porting.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks() -> list[tuple[int, str, str]]:
    """(line number, nearest heading, code) of every python block of the guide."""
    text = GUIDE.read_text()
    out = []
    for m in _BLOCK.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        heads = re.findall(r"^#+ (.*)$", text[:m.start()], re.M)
        out.append((line, heads[-1] if heads else "", m.group(1)))
    return out


BLOCKS = blocks()


def test_the_guide_has_its_examples():
    assert len(BLOCKS) >= 7, [b[:2] for b in BLOCKS]
    heads = {h for _, h, _ in BLOCKS}
    for want in ("(a) The two-line SGLD loop", "(b) A MALA evaluation loop",
                 "(c) A persistent sample-bank loop"):
        assert want in heads, heads
    text = GUIDE.read_text()
    for project in ("IGEBM", "JEM", "Short-run EBM", "TorchEBM", "VAEBM"):
        assert f"**{project}**" in text, project


@pytest.mark.parametrize("line,head,code", BLOCKS,
                         ids=[f"line{ln}-{re.sub(r'[^a-z]+', '_', h.lower()).strip('_')}"
                              for ln, h, _ in BLOCKS])
def test_guide_block_runs(line, head, code, one_thread, capsys):
    torch.manual_seed(0)
    namespace = {"__name__": f"porting_md_line_{line}"}
    exec(compile(code, f"{GUIDE}:{line}", "exec"), namespace)


def _one_step(make, energy_fn, x0):
    """One step of the sampler ``make(x)`` and the noise it used (torch backend, so the noise is
    the reference's Philox stream for rows 0..B-1 at step 0)."""
    from vaebm.ops.philox import STREAM_NOISE, philox_normal_rows

    x = x0.clone()
    s = make(x)
    s.step(energy_fn)
    B, n = x0.shape[0], x0[0].numel()
    xi = philox_normal_rows(s.seed, 0, torch.arange(B), n, 0, STREAM_NOISE).reshape(x0.shape)
    xr = x0.clone().requires_grad_(True)
    g = torch.autograd.grad(energy_fn(xr).sum(), xr)[0]
    return x, g, xi


def test_table_rows_are_the_projects_updates():
    """Each row of the convention table, one step: the table's arguments give the project's own
    update formula (with the sampler's noise in place of torch.randn)."""
    from vaebm import FusedLangevin

    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 6, generator=gen)
    w = torch.randn(6, generator=gen)

    def f(x):  # a network output that JEM / short-run ascend
        return torch.tanh(x @ w) + 0.1 * x.pow(2).sum(1)

    kw = dict(seed=3, backend="torch", on_nonfinite=None)
    close = dict(rtol=0, atol=2e-6)

    # JEM and short-run: x += 1.0 * grad f + 0.01 * xi, energy -f
    x, g, xi = _one_step(lambda x: FusedLangevin.from_sgld(x, 1.0, 0.01, **kw), lambda x: -f(x), x0)
    torch.testing.assert_close(x, x0 - 1.0 * g + 0.01 * xi, **close)  # g = grad(-f): x + grad f

    # IGEBM (up to its noise-before-gradient order): x - 10 * clip(grad E, 0.01), clamp [0, 1]
    x, g, xi = _one_step(lambda x: FusedLangevin.from_sgld(x, 10.0, 0.005, clip_grad_value=0.01,
                                                           clamp=(0, 1), **kw), f, x0)
    torch.testing.assert_close(x, (x0 - 10.0 * g.clamp(-0.01, 0.01) + 0.005 * xi).clamp(0, 1),
                               **close)

    # Anatomy, training: x += -grad f + eps * xi; evaluation: -(eps^2/2) grad(f/T) + eps * xi
    eps, T = 7.5e-3, 0.5
    x, g, xi = _one_step(lambda x: FusedLangevin.from_sgld(x, 1.0, eps, **kw), f, x0)
    torch.testing.assert_close(x, x0 - g + eps * xi, **close)
    x, g, xi = _one_step(lambda x: FusedLangevin(x, eps ** 2, sigma=1.0, **kw),
                         lambda x: f(x) / T, x0)
    torch.testing.assert_close(x, x0 - (eps ** 2 / 2) * g + eps * xi, **close)

    # TorchEBM: x - step_size * grad U + sqrt(2 step_size) * noise_scale * xi
    step, ns = 1e-3, 0.7
    x, g, xi = _one_step(lambda x: FusedLangevin(x, 2 * step, sigma=ns, **kw), f, x0)
    torch.testing.assert_close(x, x0 - step * g + (2 * step) ** 0.5 * ns * xi, **close)

    # VAEBM eps-space: eps - 0.5 step grad(E + |eps|^2 / 2) + sqrt(step) xi, the Gaussian by lam
    step = 8e-5
    x, g, xi = _one_step(lambda x: FusedLangevin(x, step, lam=1.0, sigma=1.0, **kw), f, x0)
    torch.testing.assert_close(x, x0 - 0.5 * step * (g + x0) + step ** 0.5 * xi, **close)
