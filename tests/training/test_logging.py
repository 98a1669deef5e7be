"""TrainLogger: CSV rows, truncation of rows past the resume point, optional extras."""

import importlib.util

import pytest

from vaebm.training.logging import TrainLogger


def test_csv_rows_and_resume_truncation(tmp_path):
    with TrainLogger(tmp_path, "ebm", tensorboard=False) as log:
        for i in range(5):
            log.log(i, {"loss": float(i) / 2, "lr": 1e-3})
        log.event(4, "checkpoint")
    lines = (tmp_path / "ebm.csv").read_text().splitlines()
    assert lines[0] == "iteration,loss,lr" and lines[3] == "2,1.0,0.001" and len(lines) == 6
    # a run killed after logging 0..4 resumes from a checkpoint at iteration 3
    with TrainLogger(tmp_path, "ebm", start=3, tensorboard=False) as log:
        log.log(3, {"loss": 9.0, "lr": 1e-3, "new_key": 1.0})
    lines = (tmp_path / "ebm.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in lines[1:]] == ["0", "1", "2", "3"]
    assert lines[-1] == "3,9.0,0.001"  # columns stay those of the header
    assert (tmp_path / "events.log").read_text() == "4\tcheckpoint\n"


def test_disabled_and_non_finite(tmp_path):
    log = TrainLogger(tmp_path, "x", enabled=False)
    log.log(0, {"a": 1.0})
    log.close()
    assert not (tmp_path / "x.csv").exists()
    with TrainLogger(tmp_path, "y", tensorboard=False) as log:
        log.log(0, {"a": float("nan"), "b": float("inf")})
    assert (tmp_path / "y.csv").read_text().splitlines()[1] == "0,nan,inf"


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None,
                    reason="tensorboard is installed")
def test_tensorboard_required_but_missing(tmp_path):
    with pytest.raises(ImportError, match=r"vaebm\[train\]"):
        TrainLogger(tmp_path, "z", tensorboard=True)
    TrainLogger(tmp_path, "z", tensorboard=None).close()  # optional: silently without


