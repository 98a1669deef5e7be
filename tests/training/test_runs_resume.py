"""Resuming a run: a fallback to the previous checkpoint is logged, and a requested config that
differs from the stored one in what defines the run is refused unless allowed."""

import sys
from pathlib import Path

import pytest
import torch

from vaebm.training import VAETrainer, vae_config
from vaebm.training.checkpoint import CheckpointFallbackWarning, load_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from _train_models import TinyVAE, make_data  # noqa: E402


def _trainer(out, **kw):
    torch.manual_seed(0)
    return VAETrainer(TinyVAE(), make_data(8), vae_config("tiny", out_dir=str(out), **kw))


def test_corrupt_newest_checkpoint_falls_back_with_a_warning_and_an_event(tmp_path):
    _trainer(tmp_path, steps=2, ckpt_every=1).run(resume=False)
    ck = tmp_path / "vae.pt"
    data = bytearray(ck.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ck.write_bytes(bytes(data))
    with pytest.warns(CheckpointFallbackWarning, match="vae.pt is unusable"):
        h = _trainer(tmp_path, steps=3, ckpt_every=1).run()
    assert h["iteration"] == [0, 1, 2]  # iteration 1 again, from the .prev of iteration 1
    log = (tmp_path / "events.log").read_text()
    want = f"checkpoint {ck} is unusable (corrupt: SHA-256 of the payload does not match"
    assert want in log and f"loaded the previous one, {ck}.prev" in log
    assert f"resumed from {ck}.prev at iteration 1" in log
    assert any(want in e["message"] for e in h["events"])
    assert load_checkpoint(ck)["iteration"] == 3
