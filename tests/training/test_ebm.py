"""Stage-2 trainer: loss and gradient against an independent computation, the Adam-moment
clipping against a hand computation, frozen models during the chains, exact resume (in process
and after SIGKILL), divergence rollback, bad data."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vaebm.models.eps_space import eps_energy_fn
from vaebm.sampling import langevin_sample
from vaebm.sampling.generate import initial_eps
from vaebm.training import (DataError, EBMTrainer, TrainingDiverged, clip_grad_adam_,
                            ebm_config, load_checkpoint, train_ebm)

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _train_models import make_data, make_models  # noqa: E402


def trainer(tmp_path=None, seed=0, data=None, callback=None, energy_seed=None, **kw):
    vae, energy = make_models(seed)
    if energy_seed is not None:
        energy = make_models(energy_seed)[1]
    kw.setdefault("out_dir", str(tmp_path) if tmp_path is not None else None)
    cfg = ebm_config("tiny", **kw)
    return EBMTrainer(vae, energy, make_data() if data is None else data, cfg, callback=callback)


# ----------------------------------------------------------------------------- clipping
def test_clip_grad_adam_matches_hand_computation():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(7))
    q = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.Adam([p, q], lr=1e-2, betas=(0.99, 0.999), weight_decay=3e-5)
    g1p, g1q = torch.randn(7), torch.randn(3, 2)
    p.grad, q.grad = g1p.clone() * 5, g1q.clone() * 5
    clip_grad_adam_(opt)  # first step: no state, nothing clipped
    assert torch.equal(p.grad, g1p * 5)
    p0 = p.detach().clone()
    opt.step()
    # Adam's v after one step; coupled weight decay enters the gradient first
    v_hand = (1 - 0.999) * (g1p.double() * 5 + 3e-5 * p0.double()).square()
    np.testing.assert_allclose(opt.state[p]["exp_avg_sq"].double().numpy(), v_hand.numpy(),
                               rtol=1e-5)
    g2p = torch.tensor([10.0, -10.0, 0.01, -0.01, 0.3, -0.3, 1e3])
    p.grad, q.grad = g2p.clone(), torch.full((3, 2), -1e4)
    clip_grad_adam_(opt)
    v = opt.state[p]["exp_avg_sq"].numpy().astype(np.float64)
    vhat = v / (1 - 0.999 ** 1)
    bound = 3 * np.sqrt(vhat) + 0.1
    want = np.clip(g2p.numpy().astype(np.float64), -bound, bound)
    np.testing.assert_allclose(p.grad.numpy(), want, rtol=1e-6, atol=1e-7)
    assert (p.grad.abs() < g2p.abs()).any() and (p.grad == g2p).any()  # some clipped, some not
    vq = opt.state[q]["exp_avg_sq"].numpy().astype(np.float64) / (1 - 0.999)
    np.testing.assert_allclose(q.grad.numpy(), -(3 * np.sqrt(vq) + 0.1), rtol=1e-6)
    # the bound uses v_hat with the step count of the previous step (1 here), not 2
    assert not np.allclose(bound, 3 * np.sqrt(v / (1 - 0.999 ** 2)) + 0.1)


# ----------------------------------------------------------------------------- one step
def test_loss_and_gradient_match_independent_computation():
    t = trainer(lr=0.0, grad_clip=False, buffer_size=0, ld_steps=3)
    t.data_init()
    t.energy.spectral_regularisation(n_iter=300)  # converged u/v: the copy below agrees
    x = make_data()[:4]
    # the chains of iteration 0, run independently with langevin_sample
    fn, lam = eps_energy_fn(t.vae, t.energy, "paper")
    seed = t.chain_seed(0)
    eps0 = initial_eps(t.vae, 0, 4, seed)
    eps = langevin_sample(fn, eps0, 3, t.cfg.ld_step_size, lam=lam, seed=seed)
    x_neg = t.vae.decode_eps(eps).x_sample.detach()
    xn, eps_t, _ = t.negatives(0)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(eps, eps_t))
    # loss = E(x+).mean() - E(x-).mean() + 0.2 * spectral, grads by autograd
    import copy
    ref = copy.deepcopy(t.energy)
    loss_ref = ref(x).mean() - ref(x_neg).mean() + 0.2 * ref.spectral_regularisation()
    grads = torch.autograd.grad(loss_ref, list(ref.parameters()))
    stats, reason = t.train_step(0, x)
    assert reason is None
    assert math.isclose(stats["loss"], loss_ref.item(), rel_tol=1e-4, abs_tol=1e-4)
    assert math.isclose(stats["e_pos"] - stats["e_neg"],
                        (ref(x).mean() - ref(x_neg).mean()).item(), abs_tol=1e-5)
    for (name, p), g in zip(t.energy.named_parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=2e-3, atol=2e-4, msg=name)


def test_negative_mean_vs_sample():
    for neg in ("mean", "sample"):
        t = trainer(negative=neg, ld_steps=2)
        t.data_init()
        xn, eps, _ = t.negatives(1)
        out = t.vae.decode_eps(eps)
        assert torch.equal(xn, out.x_mean if neg == "mean" else out.x_sample)


def test_energy_l2_adds_exactly_its_term():
    """energy_l2 > 0 adds energy_l2 * (mean E(x+)^2 + mean E(x-)^2) to the loss and its
    gradient; the chains (and so the negatives) are unchanged."""
    x = make_data()[:4]
    out = {}
    for l2 in (0.0, 0.5):
        t = trainer(lr=0.0, grad_clip=False, buffer_size=0, ld_steps=2, energy_l2=l2)
        t.data_init()
        xn, _, _ = t.negatives(0)
        ep, en = t.energy(x).detach(), t.energy(xn).detach()
        stats, reason = t.train_step(0, x)
        assert reason is None
        out[l2] = (stats["loss"], ep, en, xn, [p.grad.clone() for p in t.energy.parameters()])
    (l0, ep, en, xn0, g0), (l1, _, _, xn1, g1) = out[0.0], out[0.5]
    assert torch.equal(xn0, xn1)
    want = 0.5 * (ep.square().mean() + en.square().mean()).item()
    assert math.isclose(l1 - l0, want, rel_tol=1e-4, abs_tol=1e-4)
    assert any(not torch.allclose(a, b) for a, b in zip(g0, g1))
    with pytest.raises(ValueError, match="energy_l2"):
        ebm_config("tiny", energy_l2=-1.0)


def test_chain_negative_mean_feeds_the_decoder_mean_to_the_energy():
    """chain_negative="mean": inside the chain E sees mu_x(z) (no pixel noise); the default
    feeds the x-sample, as the published code."""
    for chain in (None, "mean"):
        t = trainer(ld_steps=1, chain_negative=chain)
        t.data_init()
        seen = []
        orig = t.energy.forward

        def spy(x, orig=orig, seen=seen):
            if x.requires_grad:
                seen.append(x.detach().clone())
            return orig(x)

        t.energy.forward = spy
        t.negatives(0)
        fn, _ = eps_energy_fn(t.vae, t.energy, "paper")
        seed = t.chain_seed(0)
        eps0 = initial_eps(t.vae, 0, t.local_batch, seed)
        dec = t.vae.decode_eps(eps0)
        want = dec.x_mean if chain == "mean" else dec.x_sample
        assert len(seen) == 1
        torch.testing.assert_close(seen[0], want.detach(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="chain_negative"):
        ebm_config("tiny", chain_negative="noise")


def test_models_frozen_during_chain_and_energy_trainable_after():
    t = trainer(ld_steps=2)
    t.data_init()
    seen = []
    net = t.energy
    orig = net.forward

    def spy(x):
        seen.append((x.requires_grad, [p.requires_grad for p in net.parameters()],
                     net.is_frozen, net.training))
        return orig(x)

    net.forward = spy
    t.train_step(0, make_data()[:4])
    chain = [s for s in seen if s[0]]
    loss_calls = [s for s in seen if not s[0]]
    assert len(chain) == 2 and len(loss_calls) == 2
    for _, req, frozen, training in chain:
        assert not any(req) and frozen and not training
    for _, req, frozen, training in loss_calls:
        assert all(req) and not frozen and training
    assert not any(p.requires_grad for p in t.vae.parameters()) and not t.vae.training


def test_official_mode_differs_from_paper():
    a, b = trainer(energy_mode="paper"), trainer(energy_mode="official")
    for t in (a, b):
        t.data_init()
    xa, _, _ = a.negatives(0)
    xb, _, _ = b.negatives(0)
    assert not torch.allclose(xa, xb)


# ----------------------------------------------------------------------------- resume
def _params(t):
    return {k: v.clone() for k, v in t.energy.state_dict().items()}


def test_resume_is_bitwise_identical(tmp_path):
    straight = trainer(tmp_path / "a", steps=6, ckpt_every=0)
    h1 = straight.run(resume=False)
    half = trainer(tmp_path / "b", steps=3, ckpt_every=0)
    half.run(resume=False)
    assert half.buffer.size > 0
    rest = trainer(tmp_path / "b", steps=6, energy_seed=123)  # fresh objects, other init: all loaded
    h2 = rest.run()  # "auto" resumes from b/ebm.pt
    for k, v in _params(straight).items():
        assert torch.equal(v, _params(rest)[k]), k
    for k in ("loss", "e_pos", "e_neg", "grad_norm", "replayed"):
        assert h1[k] == h2[k], k
    assert torch.equal(straight.buffer.storage[0], rest.buffer.storage[0])
    ck = load_checkpoint(tmp_path / "b" / "ebm.pt", kind="ebm")
    assert ck["iteration"] == 6 and ck["config"]["steps"] == 6
    assert {"energy", "energy_config", "optimizer", "buffer", "rng", "config", "history",
            "trainer", "vae_fingerprint"} <= set(ck)
    assert set(ck["rng"]) >= {"torch", "numpy", "python"}
    assert ck["trainer"]["next_chain_seed"] == rest.chain_seed(6)
    csv = (tmp_path / "b" / "ebm.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in csv[1:]] == [str(i) for i in range(6)]


def test_resume_refuses_other_vae(tmp_path):
    t = trainer(tmp_path, steps=1)
    t.run(resume=False)
    vae, energy = make_models(5)
    with torch.no_grad():
        next(vae.parameters()).add_(1.0)
    other = EBMTrainer(vae, energy, make_data(), ebm_config("tiny", out_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="different VAE"):
        other.run()


CHILD = r"""
import sys, time, torch
sys.path.insert(0, {here!r})
torch.set_num_threads(1)
from _train_models import make_models, make_data
from vaebm.training import ebm_config, EBMTrainer
vae, energy = make_models(0)
def slow(tr, it, stats):
    print("done", it, flush=True)
    time.sleep(0.2)
cfg = ebm_config("tiny", steps={steps}, ckpt_every=1, out_dir={out!r})
EBMTrainer(vae, energy, make_data(), cfg, callback=slow).run()
"""


def test_sigkill_mid_run_then_resume_matches_straight_run(tmp_path):
    steps = 8
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent.parent), str(HERE)]))
    out = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(here=str(HERE), steps=steps,
                                                                 out=str(out))],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    seen = False
    try:
        for line in child.stdout:  # kill once a few iterations are done
            if line.startswith("done 3"):
                seen = True
                break
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert seen, f"the training child failed: {child.stderr.read()[-3000:]}"
    assert child.returncode == -signal.SIGKILL
    ck = load_checkpoint(out / "ebm.pt", kind="ebm")
    assert 3 <= ck["iteration"] < steps
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the child: same kernels, same summation order
    try:
        resumed = trainer(out, steps=steps, ckpt_every=1)
        h = resumed.run()
        straight = trainer(tmp_path / "straight", steps=steps, ckpt_every=0)
        h2 = straight.run()
    finally:
        torch.set_num_threads(threads)
    assert h["iteration"] == list(range(steps))
    for k, v in _params(straight).items():
        assert torch.equal(v, _params(resumed)[k]), k
    assert h["loss"] == h2["loss"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_iteration_saves_and_resumes_like_a_straight_run(tmp_path, sig):
    """SIGTERM (a scheduler, `timeout`) or SIGINT (Ctrl-C) mid-run: the iteration under way
    finishes, a checkpoint of it is written (ckpt_every=0: none would exist otherwise), the run
    raises TrainingInterrupted (exit status 128 + signal in the child), events.log says so, and
    the same run resumed ends bit for bit where a straight run ends."""
    steps = 8
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent.parent), str(HERE)]))
    out = tmp_path / "stopped"
    code = CHILD.format(here=str(HERE), steps=steps, out=str(out)).replace(
        "ckpt_every=1", "ckpt_every=0").replace(
        "callback=slow).run()", "callback=slow)\ntry:\n    t.run()\n"
        "except KeyboardInterrupt as e:\n    print('interrupted', e.iteration, flush=True)\n"
        "    sys.exit(e.exit_status)").replace("EBMTrainer(vae", "t = EBMTrainer(vae")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env, text=True)
    lines = []
    try:
        for line in child.stdout:
            lines.append(line)
            if line.startswith("done 2"):
                child.send_signal(sig)
                break
        rest, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    lines += rest.splitlines()
    assert child.returncode == 128 + int(sig), err[-3000:]
    stopped = [ln for ln in lines if ln.startswith("interrupted")]
    assert stopped, lines
    n = int(stopped[0].split()[1])
    assert 3 <= n < steps  # the iteration under way was finished, not dropped
    ck = load_checkpoint(out / "ebm.pt", kind="ebm")
    assert ck["iteration"] == n
    assert f"stopped by {sig.name}" in (out / "events.log").read_text()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the child: same kernels, same summation order
    try:
        h = trainer(out, steps=steps, ckpt_every=0).run()
        straight = trainer(tmp_path / "straight", steps=steps, ckpt_every=0)
        h2 = straight.run()
    finally:
        torch.set_num_threads(threads)
    assert h["iteration"] == list(range(steps))
    assert h["loss"] == h2["loss"]


# ----------------------------------------------------------------------------- robustness
class NaNOnce:
    """Wraps E: returns NaN energies on the `when`-th call from the loss (not the chain)."""

    def __init__(self, net, when):
        self.net, self.when, self.calls = net, when, 0

    def __call__(self, x):
        e = self.net.__class__.forward(self.net, x)
        if torch.is_grad_enabled() and not x.requires_grad:  # not data init, not the chain
            self.calls += 1
            if self.calls == self.when:
                return e * float("nan")
        return e


def test_divergence_rolls_back_and_halves_lr(tmp_path):
    t = trainer(tmp_path, steps=5, snapshot_every=2, ckpt_every=0)
    hook = NaNOnce(t.energy, when=7)  # the 4th iteration's positive phase (2 loss calls each)
    t.energy.forward = hook
    h = t.run(resume=False)
    # iteration 3 failed: rolled back to the snapshot at 2 (history too), 2.. redone at lr / 2
    assert h["iteration"] == [0, 1, 2, 3, 4]
    assert h["lr"] == [1e-3, 1e-3, 5e-4, 5e-4, 5e-4]
    msgs = [e["message"] for e in h["events"] if "divergence" in e["message"]]
    assert len(msgs) == 1 and "non-finite loss" in msgs[0] and "rolled back to iteration 2" in msgs[0]
    assert "divergence at iteration 3" in (tmp_path / "events.log").read_text()
    assert all(torch.isfinite(p).all() for p in t.energy.parameters())


def test_repeated_divergence_stops_with_clear_error(tmp_path):
    t = trainer(tmp_path, steps=4, max_energy_gap=1e-12, max_failures=2)
    with pytest.raises(TrainingDiverged, match="3 times in a row"):
        t.run(resume=False)
    assert not (tmp_path / "ebm.pt").exists()  # nothing written from a diverged state


def test_bad_data_raises_and_keeps_checkpoint(tmp_path):
    good = make_data(64)

    def data(it):
        x = good[4 * (it % 16):4 * (it % 16) + 4].clone()
        if it == 3:
            x[1, 0, 2, 2] = float("nan")
        return x

    t = trainer(tmp_path, steps=6, ckpt_every=2, data=data)
    with pytest.raises(DataError, match=r"iteration 3: batch has 1 NaN/Inf values in rows \[1\]"):
        t.run(resume=False)
    ck = load_checkpoint(tmp_path / "ebm.pt")
    assert ck["iteration"] == 2
    for k, v in ck["energy"].items():
        assert torch.isfinite(v.float()).all()
    t2 = trainer(steps=2, data=lambda it: good[:4, :, :4])
    with pytest.raises(DataError, match=r"data-init batch 0: batch of shape \(4, 3, 4, 8\), "
                                        r"expected \(B, 3, 8, 8\)"):
        t2.run(resume=False)
    t3 = trainer(steps=2, data=lambda it: good[:4] * 255)
    with pytest.raises(DataError, match=r"expected \[0, 1\]"):
        t3.run(resume=False)
    t5 = trainer(steps=2, data=lambda it: (good[:4] * 255).to(torch.uint8))
    with pytest.raises(DataError, match="dtype torch.uint8"):
        t5.run(resume=False)
    t4 = trainer(steps=2, data=lambda it: good[:3])
    with pytest.raises(DataError, match="batch of 3 rows, expected 4"):
        t4.run(resume=False)


def test_train_ebm_returns_history_and_writes_outputs(tmp_path):
    vae, energy = make_models(0)
    h = train_ebm(vae, energy, make_data(), ebm_config("tiny", steps=4, sample_every=2,
                                                       out_dir=str(tmp_path)))
    assert h["iteration"] == [0, 1, 2, 3] and all(np.isfinite(h["loss"]))
    assert [round(p, 6) for p in h["buffer_p"]] == [0.0, 0.3, 0.6, 0.6]
    assert energy.initialised
    from vaebm.imageio import read_png
    img = read_png(tmp_path / "samples" / "ebm_0000004.png")
    assert img.shape == (2 + 2 * 10, 2 + 2 * 10, 3)
    assert (tmp_path / "ebm.pt.prev").exists()
    from vaebm.training import load_energy
    net, ck = load_energy(tmp_path / "ebm.pt")
    assert ck["iteration"] == 4 and net.initialised and not net.training
    x = make_data(3)
    torch.testing.assert_close(net(x), energy.eval()(x))


@pytest.mark.gpu
def test_cuda_training_and_resume(tmp_path):
    dev = "cuda"
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    a = trainer(tmp_path / "a", steps=4, ckpt_every=0, device=dev)
    h1 = a.run(resume=False)
    b = trainer(tmp_path / "b", steps=2, ckpt_every=0, device=dev)
    b.run(resume=False)
    c = trainer(tmp_path / "b", steps=4, energy_seed=9, device=dev)
    h2 = c.run()
    assert c.buffer.storage[0].is_cuda and all(np.isfinite(h2["loss"]))
    for k, v in _params(a).items():
        torch.testing.assert_close(v, _params(c)[k], rtol=1e-5, atol=1e-6, msg=k)
    assert h1["loss"][:2] == h2["loss"][:2]
    ck = load_checkpoint(tmp_path / "b" / "ebm.pt")  # maps to the CPU
    assert all(not t.is_cuda for t in ck["energy"].values())
