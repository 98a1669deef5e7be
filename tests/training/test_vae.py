"""Stage-1 trainer: schedules and KL balancing against NVAE's formulas by hand, the loss against
an independent computation, exact resume, bits/dim, mixed precision, sample grids."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from vaebm.training import VAETrainer, bits_per_dim, evaluate_bpd, train_vae, vae_config
from vaebm.training.checkpoint import load_checkpoint
from vaebm.training.vae import group_alpha, kl_balance_coeffs, kl_coeff, lr_at, wdn_coeff

sys.path.insert(0, str(Path(__file__).parent))
from _train_models import TinyVAE, make_data  # noqa: E402


class StubVAE(nn.Module):
    """Deterministic loss terms with known values: log p(x|z) = -sum (x - a)^2,
    KL_l = (l + 1) * b_l^2 * mean(x) per sample; regularisers spectral = |a|^2, bn = |b|^2."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.full((3, 8, 8), 0.2))
        self.b = nn.Parameter(torch.tensor([1.0, 2.0, 0.5]))

    def loss_terms(self, x):
        m = x.flatten(1).mean(1)
        return {"log_p_x": -((x - self.a) ** 2).flatten(1).sum(1),
                "kl": [(i + 1) * self.b[i] ** 2 * m for i in range(3)]}

    def regularizers(self):
        return {"spectral": self.a.square().sum(), "bn": self.b.square().sum()}

    def iwae(self, x, k):
        return self.loss_terms(x)["log_p_x"]


def test_kl_coeff_schedule():
    T = 1000
    assert kl_coeff(0, T) == 1e-4
    assert math.isclose(kl_coeff(150, T), (150 - 0.1) / 300)
    assert kl_coeff(300, T) < 1 and kl_coeff(301, T) == 1.0 and kl_coeff(999, T) == 1.0
    assert kl_coeff(50, T, 0.3, 0.1, 1e-3) == 1e-3  # held at the minimum during the const part


def test_lr_schedule_and_wdn():
    cfg = vae_config(steps=100, lr=1e-2, lr_min=1e-4, warmup_steps=10)
    assert [lr_at(i, cfg, 100, 10) for i in (0, 4, 9)] == pytest.approx([1e-3, 5e-3, 1e-2])
    assert lr_at(10, cfg, 100, 10) == pytest.approx(1e-2)
    assert lr_at(55, cfg, 100, 10) == pytest.approx(1e-4 + 0.5 * (1e-2 - 1e-4))
    assert lr_at(100, cfg, 100, 10) == pytest.approx(1e-4)
    c = vae_config(steps=10, wdn=1e-2, wdn_anneal=True, wdn_init=10.0)
    assert wdn_coeff(0.0, c) == pytest.approx(10.0) and wdn_coeff(1.0, c) == pytest.approx(1e-2)
    assert wdn_coeff(0.5, c) == pytest.approx(math.sqrt(10.0 * 1e-2))
    assert wdn_coeff(0.3, vae_config(steps=10, wdn=0.1)) == 0.1


def test_kl_balancing_matches_nvae_formula():
    kl = torch.tensor([[1.0, -4.0, 10.0], [3.0, 2.0, 0.0]])
    alpha = torch.tensor([1.0, 4.0, 16.0])
    g = kl_balance_coeffs(kl, alpha)
    mag = np.array([2.0, 3.0, 5.0]) + 0.01  # mean |kl| + 0.01
    want = mag / alpha.numpy()
    want = want / want.mean()
    np.testing.assert_allclose(g.numpy(), want, rtol=1e-6)
    assert g.mean().item() == pytest.approx(1.0)
    # NVAE's 'square' factors: groups at 2x2 and 4x4 -> areas 4 and 16, one group each
    assert group_alpha(TinyVAE()).tolist() == [1.0, 4.0]


def test_bits_per_dim():
    lp = torch.tensor([-1000.0])
    D = 3 * 8 * 8
    assert bits_per_dim(lp, D, None).item() == pytest.approx(1000 / (D * math.log(2)))
    assert bits_per_dim(lp, D, 8).item() == pytest.approx(1000 / (D * math.log(2)) + 8)
    # uniform density on [0, 1]^D: log p = 0 -> exactly 8 bits per dim for 256 levels
    assert bits_per_dim(torch.zeros(1), D).item() == 8.0
    x = make_data(10)
    res = evaluate_bpd(StubVAE(), x, k=1, batch_size=4, n_bits=8)
    lp = -((x - 0.2) ** 2).flatten(1).sum(1).double()
    assert res["bpd"] == pytest.approx(float((-lp / (D * math.log(2)) + 8).mean()))
    assert res["n"] == 10


def test_loss_matches_independent_computation():
    cfg = vae_config(steps=10, batch_size=4, lr=0.0, warmup_steps=2, wdn=0.1, wdn_anneal=True,
                     wdn_init=10.0, kl_anneal_portion=0.5)
    vae = StubVAE()
    t = VAETrainer(vae, make_data(8), cfg)
    x = make_data(8)[:4]
    for it in (1, 8):  # during warm-up (balanced) and after (plain sum)
        beta = kl_coeff(it, 10, 0.5, 1e-4, 1e-4)
        lam = math.exp((1 - beta) * math.log(10.0) + beta * math.log(0.1))
        terms = vae.loss_terms(x)
        kl = torch.stack(terms["kl"], 1)
        gamma = kl_balance_coeffs(kl, None) if beta < 1 else torch.ones(3)
        want = (-terms["log_p_x"] + beta * (kl * gamma).sum(1)).mean() \
            + lam * (vae.a.square().sum() + vae.b.square().sum())
        ga, gb = torch.autograd.grad(want, [vae.a, vae.b])
        stats, reason = t.train_step(it, x)
        assert reason is None
        assert stats["loss"] == pytest.approx(want.item(), rel=1e-5)
        assert stats["kl_coeff"] == beta and stats["wdn"] == pytest.approx(lam)
        torch.testing.assert_close(vae.a.grad, ga)
        torch.testing.assert_close(vae.b.grad, gb)
    assert beta == 1.0


def test_adamax_settings():
    t = VAETrainer(StubVAE(), make_data(8), vae_config("tiny"))
    g = t.optimizer.param_groups[0]
    assert isinstance(t.optimizer, torch.optim.Adamax)
    assert g["eps"] == 1e-3 and g["weight_decay"] == 3e-4
    assert not t.amp and not t.scaler.is_enabled()  # off by default on the CPU


def test_resume_is_bitwise_identical(tmp_path):
    def make():
        torch.manual_seed(0)
        return TinyVAE()

    data = make_data(24)
    a = VAETrainer(make(), data, vae_config("tiny", steps=6, out_dir=str(tmp_path / "a"),
                                            ckpt_every=0))
    h1 = a.run(resume=False)
    # the schedules depend on the total, so stop at 3 of 6 (the callback) rather than steps=3
    b = VAETrainer(make(), data, vae_config("tiny", steps=6, out_dir=str(tmp_path / "b"),
                                            ckpt_every=0), callback=lambda tr, it, st: it == 2)
    b.run(resume=False)
    assert load_checkpoint(tmp_path / "b" / "vae.pt")["iteration"] == 3
    torch.manual_seed(99)
    c = VAETrainer(TinyVAE(), data, vae_config("tiny", steps=6, out_dir=str(tmp_path / "b")))
    h2 = c.run()
    for k, v in a.vae.state_dict().items():
        assert torch.equal(v, c.vae.state_dict()[k]), k
    assert h1["loss"] == h2["loss"] and h1["lr"] == h2["lr"]
    ck = load_checkpoint(tmp_path / "b" / "vae.pt", kind="vae")
    assert ck["iteration"] == 6


def test_bf16_autocast_on_cpu_close_to_fp32():
    x = make_data(8)[:4]
    res = []
    for amp in (False, True):
        torch.manual_seed(0)
        vae = TinyVAE()
        t = VAETrainer(vae, make_data(8), vae_config("tiny", batch_size=4, amp=amp))
        assert t.amp is amp and (t.amp_dtype == torch.bfloat16)
        torch.manual_seed(1)
        stats, _ = t.train_step(3, x)
        res.append(stats["nelbo"])
    assert res[0] != res[1] and res[1] == pytest.approx(res[0], rel=0.05)


def test_train_vae_end_to_end_outputs(tmp_path):
    torch.manual_seed(0)
    vae = TinyVAE()
    h = train_vae(vae, make_data(24), vae_config("tiny", sample_every=3, out_dir=str(tmp_path)),
                  eval_data=make_data(6, seed=7))
    assert h["iteration"] == list(range(6))
    assert h["kl_coeff"][0] == 1e-4 and h["kl_coeff"][-1] == 1.0
    assert len(h["eval"]) == 1 and 0 < h["eval"][0]["bpd"] < 100
    from vaebm.imageio import read_png
    img = read_png(tmp_path / "samples" / "vae_0000006.png")
    assert img.shape == (2 + 2 * 10, 2 + 2 * 10, 3)
    rows = (tmp_path / "vae.csv").read_text().splitlines()
    assert rows[0].startswith("iteration,loss,nelbo") and len(rows) == 7


def test_bad_batch_rejected():
    t = VAETrainer(StubVAE(), make_data(8), vae_config(steps=2, batch_size=4))
    x = make_data(4)
    x[2, 1, 3, 3] = float("inf")
    from vaebm.training import DataError
    with pytest.raises(DataError, match=r"iteration 0: batch has 1 NaN/Inf values in rows \[2\]"):
        t.train_step(0, x)


class NaNAt(StubVAE):
    """StubVAE whose loss is NaN on the given calls of loss_terms."""

    def __init__(self, bad_calls):
        super().__init__()
        self.bad, self.calls = set(bad_calls), 0

    def loss_terms(self, x):
        out = super().loss_terms(x)
        self.calls += 1
        if self.calls in self.bad:
            out["log_p_x"] = out["log_p_x"] * float("nan")
        return out


def test_divergence_rollback_and_give_up(tmp_path):
    t = VAETrainer(NaNAt({4}), make_data(16), vae_config("tiny", steps=5, snapshot_every=2,
                                                          ckpt_every=0, out_dir=str(tmp_path)))
    h = t.run(resume=False)
    assert h["iteration"] == [0, 1, 2, 3, 4]
    base = [lr_at(i, t.cfg, 5, 2) for i in range(5)]
    assert h["lr"][:2] == base[:2] and h["lr"][2:] == pytest.approx([b / 2 for b in base[2:]])
    assert any("non-finite loss" in e["message"] for e in h["events"])
    from vaebm.training import TrainingDiverged
    t = VAETrainer(NaNAt(range(3, 100)), make_data(16), vae_config("tiny", steps=5, max_failures=2))
    with pytest.raises(TrainingDiverged, match="iteration 2"):
        t.run(resume=False)


@pytest.mark.gpu
def test_cuda_fp16_gradscaler(tmp_path):
    torch.manual_seed(0)
    vae = TinyVAE()
    t = VAETrainer(vae, make_data(24), vae_config("tiny", out_dir=str(tmp_path)), device="cuda")
    assert t.amp and t.amp_dtype == torch.float16 and t.scaler.is_enabled()
    h = t.run(resume=False)
    assert all(np.isfinite(h["nelbo"]))
    ck = load_checkpoint(tmp_path / "vae.pt")
    assert ck["scaler"]["scale"] > 0


def test_bits_per_dim_uses_the_density_of_the_unit_range_image():
    """NVAE scores x mapped to [-1, 1]; the [0, 1] image's density is 2^D times larger, so the
    reported bits/dim must be exactly one lower than the [-1, 1] density's."""
    import math

    from vaebm.training.vae import evaluate_bpd

    class Const(torch.nn.Module):
        x_scale_log_det = 4 * math.log(2.0)  # D = 4

        def iwae(self, x, k):
            return torch.full((x.shape[0],), -3.0, dtype=torch.float64)

    x = torch.rand(6, 1, 2, 2)
    got = evaluate_bpd(Const(), x, k=1, batch_size=4)["bpd"]
    assert got == pytest.approx(3.0 / (4 * math.log(2)) - 1 + 8, abs=1e-12)
