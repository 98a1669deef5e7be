"""``vaebm sample``'s outputs: NaN samples reported and the rest kept, all-or-nothing atomic
writes (a full disk leaves the previous run's files intact), ordinary file permissions; and the
:mod:`vaebm.imageio` pieces behind them. A tiny run (tiny training presets on the synthetic
Fashion-MNIST of ``test_cli``) is built once for the module."""

import errno
import os

import numpy as np
import pytest
import torch
import test_cli

import vaebm.sampling.generate as generate
from vaebm.cli import main
from vaebm.imageio import make_grid, read_png, save_grid, save_png

pytestmark = pytest.mark.usefixtures("one_thread")
data_root = test_cli.data_root  # the module-scoped synthetic data set
OUTPUTS = {"samples.png", "vae_samples.png", "pairs.png", "chain.png", "samples.npz"}


run = test_cli.tiny_run  # (vae run folder, ebm run folder), built once per module


def _sample(run, out, *extra, n=5, seed=0):
    return main(["sample", "--vae", str(run[0]), "--ebm", str(run[1]), "--n", str(n), "--batch",
                 str(n), "--steps", "2", "--every", "1", "--seed", str(seed), "--backend", "torch",
                 "--out", str(out), *extra])


def _poison(monkeypatch, bad):
    """vaebm_sample whose samples ``bad`` diverged: NaN images, energies and last frames."""
    real = generate.vaebm_sample

    def fake(*a, **k):
        res = real(*a, **k)
        res["samples"][bad] = float("nan")
        res["energy"][bad] = float("nan")
        if "chain" in res:
            res["chain"][-1, bad] = float("inf")
        return res

    monkeypatch.setattr(generate, "vaebm_sample", fake)


def test_nonfinite_samples_are_reported_and_the_others_kept(run, tmp_path, monkeypatch, capsys):
    """Before: every chain ran, then make_grid raised on the NaN and nothing was saved."""
    _poison(monkeypatch, [1])
    out = tmp_path / "s"
    assert _sample(run, out) == 0
    printed = capsys.readouterr().out
    assert "1 of 5 samples are non-finite" in printed and "indices 1" in printed
    assert {p.name for p in out.iterdir()} == OUTPUTS  # no temporary file left
    z = np.load(out / "samples.npz")
    assert z["nonfinite"].tolist() == [1]
    assert z["samples"].shape == (5, 1, 28, 28)  # raw: sample i stays sample i
    assert np.isnan(z["samples"][1]).all() and np.isfinite(np.delete(z["samples"], 1, 0)).all()
    keep = [0, 2, 3, 4]
    grid = read_png(out / "samples.png")  # the 4 finite samples, as a 2x2 grid (5 would be 3x3)
    np.testing.assert_array_equal(grid, make_grid(torch.from_numpy(z["samples"][keep])))
    pairs = read_png(out / "pairs.png")  # 4 before/after pairs in one row of 8
    assert pairs.shape[:2] == (32, 8 * 30 + 2)
    chain = read_png(out / "chain.png")  # 4 chains (the poisoned one dropped) of 2 frames
    np.testing.assert_array_equal(
        chain, make_grid(torch.from_numpy(z["chain"][:, keep]).transpose(0, 1).flatten(0, 1),
                         nrow=2))
    assert read_png(out / "vae_samples.png").shape[:2] == (2 * 30 + 2, 3 * 30 + 2)  # all 5 starts


def test_all_samples_nonfinite_saves_the_arrays_and_fails(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "s"
    assert _sample(run, out, n=3) == 0  # an earlier, good run in the same folder
    capsys.readouterr()
    _poison(monkeypatch, slice(None))
    assert main(["sample", "--vae", str(run[0]), "--ebm", str(run[1]), "--n", "3", "--steps",
                 "1", "--backend", "torch", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vaebm: error: all 3 samples are non-finite")
    assert "samples.npz" in err[0]
    z = np.load(out / "samples.npz")
    assert z["nonfinite"].tolist() == [0, 1, 2] and np.isnan(z["samples"]).all()
    assert np.isfinite(z["initial"]).all()
    # what was saved belongs to this run only: the earlier run's grids are gone, not mixed in
    assert {p.name for p in out.iterdir()} == {"vae_samples.png", "samples.npz"}


def _full_disk_at(monkeypatch, out, which):
    """Simulate ENOSPC: ``which`` = ("fsync", k): the k-th fsync of a file in ``out`` fails;
    ("npz",): the .npz write fails half way."""
    if which[0] == "npz":
        real = np.savez_compressed

        def savez(file, *a, **k):
            if isinstance(file, (str, os.PathLike)):
                with open(file, "wb") as f:
                    f.write(b"PK\x03\x04 half")
            else:
                file.write(b"PK\x03\x04 half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(np, "savez_compressed", savez)
        return real
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = str(out)
        if target.startswith(str(out)) and os.path.isfile(target):
            calls.append(target)
            if len(calls) == which[1]:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("which", [("fsync", 2), ("npz",)], ids=["second-file", "npz"])
def test_full_disk_leaves_the_previous_outputs_intact(run, tmp_path, monkeypatch, capsys, which):
    """Before: the PNGs written before the failure replaced the old ones, and samples.npz was
    written in place (truncated)."""
    out = tmp_path / "s"
    assert _sample(run, out, seed=0) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == OUTPUTS
    capsys.readouterr()
    _full_disk_at(monkeypatch, out, which)
    assert _sample(run, out, seed=1) == 1  # other samples, but the disk is full
    err = capsys.readouterr().err
    assert err.startswith("vaebm: error: ") and "No space left on device" in err
    after = {p.name: p.read_bytes() for p in out.iterdir()}  # every name: no temporary files
    assert after == before


def test_png_and_npz_get_ordinary_permissions(run, tmp_path):
    """0o666 less the umask, as open() gives; before, every PNG was 0600 (mkstemp)."""
    old = os.umask(0o027)
    try:
        save_png(np.zeros((2, 3), np.uint8), tmp_path / "a.png")
        save_grid(torch.zeros(2, 1, 4, 4), tmp_path / "b.png")
        assert _sample(run, tmp_path / "s", n=2) == 0
        os.umask(0o022)
        save_png(np.zeros((2, 3), np.uint8), tmp_path / "c.png")
    finally:
        os.umask(old)
    mode = lambda p: os.stat(p).st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "a.png") == mode(tmp_path / "b.png") == 0o666 & ~0o027
    for name in OUTPUTS:
        assert mode(tmp_path / "s" / name) == 0o666 & ~0o027, name
    assert mode(tmp_path / "c.png") == 0o666 & ~0o022


def test_atomic_files_rolls_back_a_failed_rename_and_can_refuse_to_overwrite(tmp_path,
                                                                           monkeypatch):
    from vaebm.imageio import AtomicFiles

    for name in ("a", "b"):
        (tmp_path / name).write_bytes(b"old " + name.encode())
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.EIO, "simulated")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="simulated"):
        with AtomicFiles() as files:
            for name in ("a", "b", "c"):
                files.write_bytes(tmp_path / name, b"new")
    monkeypatch.setattr(os, "replace", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # "a" put back, no temps
    assert (tmp_path / "a").read_bytes() == b"old a" and (tmp_path / "b").read_bytes() == b"old b"
    files = AtomicFiles(overwrite=False)
    files.write_bytes(tmp_path / "c", b"new c")
    files.write_bytes(tmp_path / "b", b"new b")
    with pytest.raises(FileExistsError):
        files.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    assert (tmp_path / "b").read_bytes() == b"old b"


def test_sample_shows_progress_without_tqdm_and_is_quiet_with_quiet(run, tmp_path, monkeypatch,
                                                                    capsys):
    import sys
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    monkeypatch.delenv("VAEBM_QUIET", raising=False)
    monkeypatch.setenv("VAEBM_PROGRESS_INTERVAL", "0")
    assert _sample(run, tmp_path / "a", "--batch", "2") == 0
    err = capsys.readouterr().err
    assert "vaebm sampling: 1/3 batch" in err
    assert _sample(run, tmp_path / "b", "--batch", "2", "--quiet") == 0
    assert "vaebm sampling" not in capsys.readouterr().err
