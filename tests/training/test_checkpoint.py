"""Checkpoint files: atomic writes with .prev, clear errors for truncated/corrupt/foreign files,
safe loading, RNG capture."""

import argparse
import os
import random
import warnings

import numpy as np
import pytest
import torch

from vaebm.training.checkpoint import (CheckpointError, capture_rng, load_checkpoint,
                                       load_latest, restore_rng, save_checkpoint)


class NotAllowed:
    pass


def test_round_trip_and_prev(tmp_path):
    p = tmp_path / "a" / "ck.pt"
    save_checkpoint({"kind": "ebm", "w": torch.arange(5.0), "n": 1}, p)
    assert not (tmp_path / "a" / "ck.pt.prev").exists()
    save_checkpoint({"kind": "ebm", "w": torch.arange(5.0) * 2, "n": 2}, p)
    ck = load_checkpoint(p, kind="ebm")
    assert ck["n"] == 2 and torch.equal(ck["w"], torch.arange(5.0) * 2)
    prev = load_checkpoint(str(p) + ".prev")
    assert prev["n"] == 1
    assert os.listdir(tmp_path / "a") == sorted(["ck.pt", "ck.pt.prev"]) or \
        sorted(os.listdir(tmp_path / "a")) == ["ck.pt", "ck.pt.prev"]
    with pytest.raises(CheckpointError, match="is a 'ebm' checkpoint, expected 'vae'"):
        load_checkpoint(p, kind="vae")


def test_truncated_corrupt_foreign(tmp_path):
    p = tmp_path / "ck.pt"
    save_checkpoint({"w": torch.randn(100)}, p)
    data = p.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=r"trunc.pt: truncated: \d+ of \d+ payload bytes"):
        load_checkpoint(tmp_path / "trunc.pt")
    (tmp_path / "short.pt").write_bytes(data[:20])
    with pytest.raises(CheckpointError, match="short.pt: truncated"):
        load_checkpoint(tmp_path / "short.pt")
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF
    (tmp_path / "flip.pt").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="corrupt: SHA-256"):
        load_checkpoint(tmp_path / "flip.pt")
    torch.save({"w": 1}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="plain torch.save file"):
        load_checkpoint(tmp_path / "plain.pt")
    (tmp_path / "junk.pt").write_bytes(b"hello world, not a checkpoint at all")
    with pytest.raises(CheckpointError, match="unknown format"):
        load_checkpoint(tmp_path / "junk.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file"):
        load_checkpoint(tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_safe_loading_allow_list(tmp_path):
    p = tmp_path / "ck.pt"
    save_checkpoint({"obj": NotAllowed()}, p)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(p)
    assert isinstance(load_checkpoint(p, safe_globals=(NotAllowed,))["obj"], NotAllowed)
    save_checkpoint({"args": argparse.Namespace(a=1)}, p)  # NVAE's checkpoints pickle this
    assert load_checkpoint(p)["args"].a == 1


def test_fallback_to_prev(tmp_path):
    p = tmp_path / "ck.pt"
    save_checkpoint({"n": 1}, p)
    save_checkpoint({"n": 2}, p)
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.warns(UserWarning, match="unusable"):
        ck, used = load_latest(p)
    assert ck["n"] == 1 and used.name == "ck.pt.prev"
    (tmp_path / "ck.pt.prev").write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated.*fallback.*empty"):
        load_latest(p)


def test_interrupted_write_leaves_old_file(tmp_path, monkeypatch):
    p = tmp_path / "ck.pt"
    save_checkpoint({"n": 1}, p)
    real = os.replace

    def boom(src, dst):
        if str(dst) == str(p):
            raise OSError("disk died")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk died"):
        save_checkpoint({"n": 2}, p)
    monkeypatch.setattr(os, "replace", real)
    assert load_checkpoint(p)["n"] == 1
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]
    (tmp_path / ".ck.pt.tmp-999").write_bytes(b"half")  # left by a killed writer
    save_checkpoint({"n": 3}, p)
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]
    assert load_checkpoint(p)["n"] == 3


def test_rng_capture_restore(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    st = capture_rng()
    a = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    p = tmp_path / "rng.pt"
    save_checkpoint({"rng": st}, p)
    torch.rand(10), np.random.rand(10), random.random()
    restore_rng(load_checkpoint(p)["rng"])
    b = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2:] == b[2:]


def test_load_latest_fallback_is_never_silent(tmp_path):
    from vaebm.training.checkpoint import CheckpointFallbackWarning

    p = tmp_path / "ck.pt"
    save_checkpoint({"kind": "ebm", "n": 1}, p)
    save_checkpoint({"kind": "ebm", "n": 2}, p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning while the newest file is fine
        assert load_latest(p, kind="ebm")[0]["n"] == 2
    data = bytearray(p.read_bytes())
    data[-5] ^= 0xFF
    p.write_bytes(bytes(data))
    seen = []
    with pytest.warns(CheckpointFallbackWarning) as w:
        ck, used = load_latest(p, kind="ebm", on_fallback=seen.append)
    assert ck["n"] == 1 and used == tmp_path / "ck.pt.prev"
    msg = str(w[0].message)
    assert seen == [msg]
    assert f"checkpoint {p} is unusable (corrupt: SHA-256" in msg and f"{p}.prev" in msg
