"""FID features over 50k samples, and the sampling behind them, showed no progress: they now
report images done, rate and ETA on stderr (time-based; here every update), quiet on request."""

import numpy as np
import pytest
import torch

import vaebm.eval as E
from vaebm import _progress


class FeatNet(torch.nn.Module):
    def forward(self, x):
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], 1)


@pytest.fixture
def every_update(monkeypatch):
    monkeypatch.setenv("VAEBM_PROGRESS_INTERVAL", "0")
    monkeypatch.delenv("VAEBM_QUIET", raising=False)


def _sampler(b):
    return torch.rand(b, 3, 8, 8, generator=torch.Generator().manual_seed(b))


def test_features_of_samples_and_reference_show_progress(every_update, capsys):
    pytest.importorskip("scipy")
    r = E.evaluate(sampler=_sampler, n_samples=230, metrics=("fid",), batch_size=100,
                   train_data=torch.rand(150, 3, 8, 8), inception=FeatNet(), strict=True)
    assert r["fid"]["n_samples"] == 230
    err = capsys.readouterr().err
    assert "vaebm sampling + Inception features: 100/230 images (43%)" in err, err
    assert "vaebm sampling + Inception features: 230/230 images in " in err
    assert "vaebm reference Inception features: 100/150 images (67%)" in err
    assert "ETA" in err and "images/s" in err


def test_other_sample_loops_show_progress(every_update, capsys):
    scores = E.score_images(torch.rand(20, 3, 8, 8), lambda x: x.flatten(1).sum(1), n=20,
                            batch_size=8)
    assert scores.shape == (20,)
    assert "vaebm scoring images: 8/20 images (40%)" in capsys.readouterr().err

    class Digits(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 10)

    d, _ = E.classify_stacked(lambda b: torch.rand(b, 3, 28, 28), Digits(), n=12, batch_size=5)
    assert d.shape == (12, 3)
    assert "vaebm sampling + classifying digits: 5/12 images" in capsys.readouterr().err


def test_quiet_and_progress_false_print_nothing(every_update, capsys):
    x = torch.rand(30, 3, 8, 8)
    f = E.compute_features(x, FeatNet(), batch_size=10, progress=False)
    prev = _progress.set_verbosity(0)
    try:
        g = E.compute_features(x, FeatNet(), batch_size=10)
    finally:
        _progress.set_verbosity(prev)
    np.testing.assert_array_equal(f, g)
    assert capsys.readouterr().err == ""
    # a loader's length counts batches, not images: the total is then unknown, not wrong
    loader = torch.utils.data.DataLoader(x, batch_size=10)
    E.compute_features(loader, FeatNet(), batch_size=10)
    err = capsys.readouterr().err
    assert "vaebm Inception features: 10 images, " in err and "/" not in err.split(",")[0]
