"""Divergence rollback that does not depend on restarts: the rollback point is a function of the
iteration (snapshots every ``snapshot_every`` iterations counted from 0, carried by checkpoints),
so a run interrupted between a snapshot and a divergence and resumed (in process or after SIGKILL)
ends bit for bit like the uninterrupted run, CSV included; the CSV keeps one row per iteration
after a rollback; a second rollback to the same snapshot restores it unchanged."""

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from vaebm.training import EBMTrainer, VAETrainer, ebm_config, load_checkpoint, vae_config

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _train_models import TinyVAE, make_data, make_models  # noqa: E402

STEPS, EVERY, FAIL_AT = 7, 3, 5  # snapshots at 0, 3, 6; the first try of iteration 5 diverges


# ----------------------------------------------------------------------------- injection
def nan_energy_at(trainer, at, lr_scale=1.0):
    """E returns NaN in the loss (not in the chains nor the data init) while ``trainer`` runs
    iteration ``at`` with ``lr_scale``: a function of the trainer's state, not of the process
    history, so a resumed process diverges exactly where the uninterrupted one does."""
    net = trainer.energy

    def forward(x):
        e = net.__class__.forward(net, x)
        if (torch.is_grad_enabled() and not x.requires_grad and trainer.iteration == at
                and trainer.lr_scale == lr_scale):
            return e * float("nan")
        return e
    net.forward = forward


def nan_vae_loss_at(trainer, at, lr_scales=(1.0,)):
    """The VAE's log p(x|z) is NaN while ``trainer`` runs iteration ``at`` with one of
    ``lr_scales`` (each try of ``at`` at those scales diverges)."""
    vae = trainer.vae

    def loss_terms(x):
        out = vae.__class__.loss_terms(vae, x)
        if trainer.iteration == at and trainer.lr_scale in lr_scales:
            out["log_p_x"] = out["log_p_x"] * float("nan")
        return out
    vae.loss_terms = loss_terms


def ebm(out, callback=None, **kw):
    vae, energy = make_models(0)
    cfg = ebm_config("tiny", **{"steps": STEPS, "snapshot_every": EVERY, "ckpt_every": 0,
                                "out_dir": str(out), **kw})
    t = EBMTrainer(vae, energy, make_data(), cfg, callback=callback)
    nan_energy_at(t, FAIL_AT)
    return t


def vae(out, callback=None, fail_scales=(1.0,), **kw):
    torch.manual_seed(0)
    cfg = vae_config("tiny", **{"steps": STEPS, "snapshot_every": EVERY, "ckpt_every": 0,
                                "out_dir": str(out), **kw})
    t = VAETrainer(TinyVAE(), make_data(24), cfg, callback=callback)
    nan_vae_loss_at(t, FAIL_AT, fail_scales)
    return t


def stop_after(n):
    """Callback: stop (and checkpoint) once ``n`` iterations are complete."""
    return lambda tr, it, stats: it == n - 1


def csv_rows(path):
    """The CSV without its wall-clock column."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    drop = rows[0].index("seconds") if "seconds" in rows[0] else None
    return [[v for i, v in enumerate(r) if i != drop] for r in rows]


def assert_same_run(a, b, module, out_a, out_b, name):
    for k, v in getattr(a, module).state_dict().items():
        assert torch.equal(v, getattr(b, module).state_dict()[k]), k
    for k in a.history:
        if k not in ("events", "seconds", "eval"):
            assert a.history[k] == b.history[k], k
    assert a.lr_scale == b.lr_scale and a.guard.failures == b.guard.failures
    ra, rb = csv_rows(out_a / f"{name}.csv"), csv_rows(out_b / f"{name}.csv")
    assert [r[0] for r in ra[1:]] == [str(i) for i in range(STEPS)]  # one row per iteration
    assert ra == rb


# ----------------------------------------------------------------------------- in process
def test_ebm_resume_between_snapshot_and_divergence_is_bitwise(tmp_path):
    straight = ebm(tmp_path / "a")
    h = straight.run(resume=False)
    # iteration 5 diverged: back to the snapshot at 3, 3.. redone at lr / 2
    assert h["lr"] == [1e-3] * 3 + [5e-4] * 4
    assert "rolled back to iteration 3" in (tmp_path / "a" / "events.log").read_text()
    # the same run stopped at 4 (checkpoint at 4, between the snapshot at 3 and the divergence)
    ebm(tmp_path / "b", callback=stop_after(4)).run(resume=False)
    assert load_checkpoint(tmp_path / "b" / "ebm.pt")["iteration"] == 4
    resumed = ebm(tmp_path / "b")
    resumed.run()
    assert "rolled back to iteration 3" in (tmp_path / "b" / "events.log").read_text()
    assert_same_run(straight, resumed, "energy", tmp_path / "a", tmp_path / "b", "ebm")
    assert torch.equal(straight.buffer.storage[0], resumed.buffer.storage[0])


def test_ebm_resume_on_the_snapshot_iteration_is_bitwise(tmp_path):
    # a checkpoint at a snapshot iteration carries no copy: the resumed loop retakes it
    straight = ebm(tmp_path / "a")
    straight.run(resume=False)
    ebm(tmp_path / "b", callback=stop_after(3)).run(resume=False)
    ck = load_checkpoint(tmp_path / "b" / "ebm.pt")
    assert ck["iteration"] == 3 and ck["rollback"] == {"iteration": 3, "at_checkpoint": True}
    resumed = ebm(tmp_path / "b")
    resumed.run()
    assert_same_run(straight, resumed, "energy", tmp_path / "a", tmp_path / "b", "ebm")


def test_vae_resume_between_snapshot_and_divergence_is_bitwise(tmp_path):
    straight = vae(tmp_path / "a")
    h = straight.run(resume=False)
    assert h["iteration"] == list(range(STEPS))
    assert [e for e in h["events"] if "rolled back to iteration 3" in e["message"]]
    vae(tmp_path / "b", callback=stop_after(4)).run(resume=False)
    ck = load_checkpoint(tmp_path / "b" / "vae.pt")
    assert ck["iteration"] == 4 and ck["rollback"]["iteration"] == 3
    resumed = vae(tmp_path / "b")
    resumed.run()
    assert_same_run(straight, resumed, "vae", tmp_path / "a", tmp_path / "b", "vae")


def test_csv_after_rollback_has_one_row_per_iteration(tmp_path):
    t = ebm(tmp_path)
    h = t.run(resume=False)
    rows = csv_rows(tmp_path / "ebm.csv")
    head = rows[0]
    assert [int(r[0]) for r in rows[1:]] == list(range(STEPS))
    # the rows are those of the iterations that count: the retried 3, 4 at lr / 2
    assert [float(r[head.index("lr")]) for r in rows[1:]] == h["lr"]
    assert [float(r[head.index("loss")]) for r in rows[1:]] == h["loss"]
    assert "divergence at iteration 5" in (tmp_path / "events.log").read_text()


def test_second_rollback_to_the_same_snapshot_restores_it_unchanged(tmp_path):
    # two divergences at 5 (lr scale 1, then 1/2) roll back to the snapshot at 3 twice: the
    # state after the second must be the snapshot's, not one advanced by the steps in between
    # (the optimiser must not share tensors with the snapshot). Reference: one rollback with a
    # factor of 1/4 reaches the same state (lr scale 1/4 at iteration 3).
    twice = vae(tmp_path / "a", fail_scales=(1.0, 0.5))
    twice.run(resume=False)
    once = vae(tmp_path / "b", divergence_lr_factor=0.25)
    once.run(resume=False)
    assert twice.lr_scale == once.lr_scale == 0.25
    assert (tmp_path / "a" / "events.log").read_text().count("rolled back to iteration 3") == 2
    for k, v in twice.vae.state_dict().items():
        assert torch.equal(v, once.vae.state_dict()[k]), k
    assert twice.history["loss"] == once.history["loss"]


def test_logger_rewind_drops_the_rows_to_run_again(tmp_path):
    from vaebm.training.logging import TrainLogger
    with TrainLogger(tmp_path, "ebm", tensorboard=False, progress=False) as log:
        for i in range(5):
            log.log(i, {"loss": float(i)})
        log.event(4, "divergence")
        log.rewind(2)
        assert not list(tmp_path.glob("*.tmp"))
        for i in range(2, 4):
            log.log(i, {"loss": 10.0 + i})
    rows = (tmp_path / "ebm.csv").read_text().splitlines()
    assert rows == ["iteration,loss", "0,0.0", "1,1.0", "2,12.0", "3,13.0"]
    assert (tmp_path / "events.log").read_text() == "4\tdivergence\n"


# ----------------------------------------------------------------------------- SIGKILL
CHILD = r"""
import sys, time, torch
sys.path.insert(0, {here!r})
torch.set_num_threads(1)
from test_rollback_resume import ebm
def block(tr, it, stats):
    if it == 4:  # iterations 0..4 logged, the checkpoint at 4 written after 3: wait to be killed
        print("ready", flush=True)
        time.sleep(120)
ebm({out!r}, ckpt_every=1, callback=block).run()
"""


def test_ebm_sigkill_between_snapshot_and_divergence_then_resume_is_bitwise(tmp_path):
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent.parent), str(HERE)]))
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(here=str(HERE), out=str(out))],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        ready = child.stdout.readline().strip() == "ready"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert ready, f"the training child failed: {child.stderr.read()[-3000:]}"
    assert load_checkpoint(out / "ebm.pt")["iteration"] == 4
    assert [r[0] for r in csv_rows(out / "ebm.csv")[1:]] == ["0", "1", "2", "3", "4"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the child: same kernels, same summation order
    try:
        resumed = ebm(out, ckpt_every=1)
        resumed.run()  # drops the CSV row of 4 (after the checkpoint), diverges at 5, back to 3
        straight = ebm(tmp_path / "straight")
        straight.run(resume=False)
    finally:
        torch.set_num_threads(threads)
    assert_same_run(straight, resumed, "energy", tmp_path / "straight", out, "ebm")
