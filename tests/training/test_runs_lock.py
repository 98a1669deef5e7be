"""One trainer per run folder: an exclusive lock on <out>/.lock, held for the whole run, holding
the PID; a second trainer fails at once naming the folder and the PID."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vaebm.training import VAETrainer, vae_config
from vaebm.training.checkpoint import load_checkpoint
from vaebm.training.loop import RunLock, RunLocked

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _train_models import TinyVAE, make_data  # noqa: E402


def _trainer(out, steps=2, callback=None):
    torch.manual_seed(0)
    return VAETrainer(TinyVAE(), make_data(8), vae_config("tiny", steps=steps, out_dir=str(out)),
                      callback=callback)


def test_second_trainer_on_the_same_folder_fails_at_once(tmp_path):
    out = tmp_path / "run"
    seen = []

    def second(tr, it, stats):
        if it == 0:  # the first trainer is mid-run
            assert (out / ".lock").read_text().strip() == str(os.getpid())
            with pytest.raises(RunLocked) as e:
                _trainer(out, steps=3).run()
            seen.append(str(e.value))

    _trainer(out, steps=2, callback=second).run(resume=False)
    assert len(seen) == 1
    assert str(out) in seen[0] and f"PID {os.getpid()}" in seen[0]
    # the first run was not disturbed, and its lock is gone once it returned
    assert load_checkpoint(out / "vae.pt")["iteration"] == 2
    h = _trainer(out, steps=3).run()
    assert h["iteration"] == [0, 1, 2]


def test_lock_released_when_the_run_fails(tmp_path):
    out = tmp_path / "run"

    def boom(tr, it, stats):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _trainer(out, callback=boom).run(resume=False)
    with RunLock(out):  # free again
        pass


# another trainer's process, as RunLock leaves it (no torch import: starts in milliseconds)
LOCK_HOLDER = r"""
import fcntl, os, sys
os.makedirs(sys.argv[1], exist_ok=True)
fd = os.open(os.path.join(sys.argv[1], ".lock"), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.ftruncate(fd, 0)
os.write(fd, f"{os.getpid()}\\n".encode())
print("locked", flush=True)
sys.stdin.read()
"""


def test_lock_held_by_another_process(tmp_path):
    out = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=f"run folder {out} is in use .*PID {child.pid}"):
            _trainer(out).run()
    finally:
        child.stdin.close()
        child.wait(timeout=60)
    assert _trainer(out, steps=1).run()["iteration"] == [0]
