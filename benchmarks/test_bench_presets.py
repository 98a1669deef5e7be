"""pytest-benchmark cases: one full Langevin step of every paper preset at a small batch
(``pytest benchmarks --benchmark-only -k presets``).

- ``energy``: an x-space step on EnergyNet(preset) alone (frozen, channels_last): forward,
  input gradient, fused update.
- ``vaebm``: an eps-space VAEBM step on NVAE(preset) + EnergyNet(preset), as sample_speed.py's
  optimised mode: decode T(eps), energy, gradient through both, fused update.
- ``ncsn``: one score evaluation of NCSN v1 / NCSNv2 (one of their 1000 / 1161 steps).

Batch 2 (1 for the 256-pixel preset); a few rounds each, the big networks are slow on a CPU.
"""

import pytest
import torch

import ncsn
import sample_speed as ss
from vaebm.models import PAPER_PRESETS, EnergyNet
from vaebm.models.eps_space import eps_energy_fn
from vaebm.sampling import FusedLangevin

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROUNDS = 5 if DEV.type == "cuda" else 2


def _sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def _batch(preset):
    return 1 if preset == "celebahq256" else 2


def _run(benchmark, fn, group):
    benchmark.group = group
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_energy_step(benchmark, preset):
    torch.manual_seed(0)
    net = EnergyNet(preset).to(DEV)
    net.data_init([torch.rand(2, 3, net.resolution, net.resolution, device=DEV)])
    net.requires_grad_(False).freeze(channels_last=True)
    x = torch.rand(_batch(preset), 3, net.resolution, net.resolution, device=DEV)
    s = FusedLangevin(x, 1e-4, seed=0, track=False)
    _run(benchmark, lambda: (s.step(net), _sync()), f"energy step {preset}")


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_vaebm_step(benchmark, preset):
    pytest.importorskip("vaebm.models.nvae")
    vae, _ = ss.build_vae(preset, "nvae", DEV)
    energy = ss.build_energy(preset, DEV)
    for m in (vae, energy):
        m.requires_grad_(False)
    vae.freeze()
    energy.freeze(channels_last=True)
    eps = [torch.randn(sh, device=DEV) for sh in vae.eps_shapes(_batch(preset))]
    fn, lam = eps_energy_fn(vae, energy, "official")
    s = FusedLangevin(eps, ss.ETA, lam=lam, seed=0, track=False)
    _run(benchmark, lambda: (s.step(fn), _sync()), f"VAEBM step {preset}")


@pytest.mark.parametrize("version", [1, 2])
def test_ncsn_evaluation(benchmark, version):
    model = ncsn.RefineNetDilated(version).to(DEV).eval().requires_grad_(False)
    x = ncsn.init_uniform(2, device=DEV)
    y = torch.zeros(2, dtype=torch.long, device=DEV)

    def fn():
        with torch.no_grad():
            model(x, y)
        _sync()

    _run(benchmark, fn, "NCSN evaluation, batch 2")
