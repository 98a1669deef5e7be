"""Both trainers on the library's NVAE ("tiny" preset), when it is importable: the real
eps-space contract end to end, and exact resume of stage 2 through NVAE's sampling mode."""

import pytest
import torch

nvae = pytest.importorskip("vaebm.models.nvae")

from vaebm.models import EnergyNet  # noqa: E402
from vaebm.training import EBMTrainer, ebm_config, train_vae, vae_config  # noqa: E402
from vaebm.training.vae import group_alpha  # noqa: E402


def _vae():
    torch.manual_seed(0)
    return nvae.NVAE("tiny")


def test_stage1_then_stage2_and_exact_resume(tmp_path):
    vae = _vae()
    x = torch.rand(16, *vae.image_shape, generator=torch.Generator().manual_seed(1))
    # NVAE's 'square' KL balancing factors from the group shapes: 4^scale / groups per scale
    shapes = vae.eps_shapes(1)[:-1]
    areas = [s[2] * s[3] for s in shapes]
    want = torch.tensor([a / areas.count(a) for a in areas])
    torch.testing.assert_close(group_alpha(vae), want / want.min())
    h = train_vae(vae, x, vae_config("tiny", steps=2, batch_size=4), eval_data=x[:4],
                  resume=False)
    assert len(h["eval"]) == 1 and torch.isfinite(torch.tensor(h["loss"])).all()

    def run(out, stop=None, energy_seed=0):
        torch.manual_seed(energy_seed)
        e = EnergyNet("tiny")
        cfg = ebm_config("tiny", steps=4, out_dir=str(out), ckpt_every=0, negative="mean")
        t = EBMTrainer(vae, e, x, cfg,
                       callback=(lambda tr, it, st: it == stop) if stop is not None else None)
        return t, t.run()

    a, ha = run(tmp_path / "a")
    run(tmp_path / "b", stop=1)
    c, hc = run(tmp_path / "b", energy_seed=5)
    assert ha["loss"] == hc["loss"]
    for k, v in a.energy.state_dict().items():
        assert torch.equal(v, c.energy.state_dict()[k]), k
    assert not vae.is_frozen and not any(p.requires_grad for p in vae.parameters())
