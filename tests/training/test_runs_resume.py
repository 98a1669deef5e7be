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


def test_resume_refuses_other_lr_seed_batch_model_or_dataset(tmp_path):
    from vaebm.training.loop import ConfigMismatch

    info = {"dataset": "blobs"}
    _trainer(tmp_path, steps=2).run(resume=False, run_info=info)
    before = (tmp_path / "vae.pt").read_bytes()
    for kw, words in ((dict(lr=2e-3), "lr 0.001 -> 0.002"), (dict(seed=1), "seed 0 -> 1"),
                      (dict(batch_size=8), "batch_size 4 -> 8")):
        with pytest.raises(ConfigMismatch, match=words) as e:
            _trainer(tmp_path, steps=3, **kw).run(run_info=info)
        assert "--allow-config-change" in str(e.value) and str(tmp_path / "vae.pt") in str(e.value)
    with pytest.raises(ConfigMismatch, match="lr 0.001 -> 0.002; seed 0 -> 1"):
        _trainer(tmp_path, steps=3, lr=2e-3, seed=1).run(run_info=info)
    with pytest.raises(ConfigMismatch, match="dataset 'blobs' -> 'other'"):
        _trainer(tmp_path, steps=3).run(run_info={"dataset": "other"})

    class OtherVAE(TinyVAE):
        pass

    other = VAETrainer(OtherVAE(), make_data(8), vae_config("tiny", steps=3, out_dir=str(tmp_path)))
    with pytest.raises(ConfigMismatch, match="model class 'TinyVAE' -> 'OtherVAE'"):
        other.run()
    assert (tmp_path / "vae.pt").read_bytes() == before  # nothing was touched
    # steps may change freely (extending the run); the change is logged
    h = _trainer(tmp_path, steps=3).run(run_info=info)
    assert h["iteration"] == [0, 1, 2]
    assert "config changed on resume: steps 2 -> 3" in (tmp_path / "events.log").read_text()


def test_allow_config_change_logs_each_change(tmp_path):
    from vaebm.training import train_vae

    torch.manual_seed(0)
    train_vae(TinyVAE(), make_data(8), vae_config("tiny", steps=1, out_dir=str(tmp_path)),
              resume=False, run_info={"dataset": "blobs"})
    torch.manual_seed(0)
    h = train_vae(TinyVAE(), make_data(8), vae_config("tiny", steps=2, lr=5e-4, out_dir=str(tmp_path)),
                  allow_config_change=True, run_info={"dataset": "blobs2"})
    assert h["iteration"] == [0, 1] and h["lr"][1] <= 5e-4
    log = (tmp_path / "events.log").read_text()
    assert "config changed on resume (allowed): lr 0.001 -> 0.0005" in log
    assert "config changed on resume (allowed): dataset 'blobs' -> 'blobs2'" in log
    assert "config changed on resume: steps 1 -> 2" in log
    assert '"dataset": "blobs2"' in (tmp_path / "run.json").read_text()
