"""examples/results_page.py end to end on tiny models and synthetic IDX data (seconds): the
page's tables carry the numbers of the JSON it writes, those numbers obey relations computed
independently here (bits/dim from log p, KL bounds from the mode count), and bad inputs stop
with a message naming the problem."""

import gzip
import importlib.util
import json
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))


def _load_script():
    spec = importlib.util.spec_from_file_location("results_page", ROOT / "examples" /
                                                  "results_page.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_idx(path, arr):
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    head = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + b"".join(struct.pack(">I", d)
                                                                 for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + arr.tobytes())


def _blobs(rng, n, labels=None):
    """Light blobs on black; with labels, the blob's column follows the class."""
    yy, xx = np.mgrid[:28, :28]
    cy = rng.integers(8, 20, n)
    cx = 4 + 2 * labels if labels is not None else rng.integers(8, 20, n)
    return (255 * np.exp(-((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2) / 30.0)
            ).astype(np.uint8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from vaebm.models.energy import EnergyNet
    from vaebm.models.nvae import NVAE
    from vaebm.training.config import ebm_config, vae_config
    from vaebm.training.ebm import train_ebm
    from vaebm.training.vae import train_vae

    root = tmp_path_factory.mktemp("results")
    rng = np.random.default_rng(0)
    fdir, mdir = root / "fashion", root / "mnist"
    fdir.mkdir()
    mdir.mkdir()
    for split, n in (("train", 40), ("t10k", 24)):
        _write_idx(fdir / f"{split}-images-idx3-ubyte.gz", _blobs(rng, n))
        _write_idx(fdir / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    y = np.repeat(np.arange(10), 8)
    _write_idx(mdir / "train-images-idx3-ubyte.gz", _blobs(rng, len(y), y))
    _write_idx(mdir / "train-labels-idx1-ubyte.gz", y)
    # a tiny Fashion-MNIST run in examples/fashion_mnist.sh's layout (RUN/vae, RUN/ebm)
    from vaebm.data import FashionMNIST
    data = FashionMNIST(fdir, "train")
    fm = root / "fm"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        vae = NVAE("tiny", image_size=28, in_channels=1)
        train_vae(vae, data, vae_config("tiny", out_dir=str(fm / "vae"), steps=2,
                                        eval_batches=1, tensorboard=False))
        train_ebm(vae, EnergyNet("tiny", in_channels=1, resolution=28), data,
                  ebm_config("tiny", out_dir=str(fm / "ebm"), steps=2, tensorboard=False))
    finally:
        torch.set_num_threads(threads)
    demo = root / "demo.json"
    demo.write_text(json.dumps({
        "config": {"seed": 0, "n_test": 100, "iwae_k": 10},
        "test_ll": {"vae": -2.81, "vaebm": -2.79, "true": -1.10},
        "gap_to_true": {"vae": 1.71, "vaebm": 1.69},
        "paper": {"test_ll": {"vae": -2.97, "vaebm": -1.5, "true": -1.1},
                  "gap_to_true": {"vae": 1.87, "vaebm": 0.4}}, "timings": {"total_s": 12.0}}))
    csv = root / "speed.csv"
    csv.write_text("model,mode,n,evals_per_chain,seconds,ms_per_eval,ratio_vs_vaebm_published,"
                   "extrapolated,machine,git,date\nVAEBM,published,2,16,40.33,2520.7,1.0,False,"
                   "test box,abc1234,2026-01-01\n")
    return {"root": root, "fashion": fdir, "mnist": mdir, "fm": fm, "demo": demo, "csv": csv}


def _rows(page: str, heading: str) -> dict:
    """The first markdown table after ``heading``: {first cell: [cells]}."""
    part = page.split(heading, 1)[1]
    table = []
    started = False
    for ln in part.splitlines():  # stop at the table's end
        if ln.startswith("|"):
            started = True
            table.append(ln)
        elif started:
            break
    return {c[0]: c for c in ([x.strip() for x in ln.strip("|").split("|")] for ln in table[2:])}


def test_page_end_to_end(setup, tmp_path, one_thread):
    rp = _load_script()
    st = tmp_path / "stacked"
    assert rp.main(["train-stacked", "--quick", "--mnist", str(setup["mnist"]), "--out", str(st),
                    "--vae-steps", "2", "--ebm-steps", "2", "--threads", "1", "--quiet"]) == 0
    for f in ("vae/vae.pt", "ebm/ebm.pt", "classifier.pt", "train.json"):
        assert (st / f).exists(), f
    out = tmp_path / "docs" / "results.md"
    assert rp.main(["page", "--quick", "--fashion-run", str(setup["fm"]), "--fashion-data",
                    str(setup["fashion"]), "--mnist", str(setup["mnist"]), "--stacked-run",
                    str(st), "--demo-json", str(setup["demo"]), "--speed-csv", str(setup["csv"]),
                    "--out", str(out), "--threads", "1", "--quiet", "--no-inception",
                    *_no_bars(tmp_path)]) == 0
    page = out.read_text()
    res = json.loads((tmp_path / "docs" / "img" / "results" / "results.json").read_text())
    assert res["quick"] and "--quick run" in page
    pv = res["provenance"]
    assert pv["command"].startswith("PYTHONPATH=. python examples/results_page.py page --quick")
    assert pv["command"] in page and pv["commit"] in page and pv["cpu"] in page

    # OOD table: every row's numbers are the JSON's
    o, k = res["fashion"]["ood"], res["fashion"]["iwae_k"]
    assert k == 2
    rows = _rows(page, "## Out-of-distribution detection")
    fmt = rp.fmt
    for name, label in (("in", "Fashion-MNIST test (in)"), ("mnist", "MNIST digits"),
                        ("noise", "uniform noise"), ("interp", "interpolations")):
        r, row = o[name], rows[label]
        assert row[1] == str(r["n"]) == "16"
        assert row[2] == fmt(r["mean_log_p_elbo"], 1) and row[3] == fmt(r["mean_log_p_iwae"], 1)
        assert row[4] == fmt(r["mean_energy"], 1)
        for b in ("elbo", "iwae"):  # bits/dim = -log p / (D ln 2) + 8, D = 784
            want = -r[f"mean_log_p_{b}"] / (784 * math.log(2)) + 8
            assert r[f"bpd_{b}"] == pytest.approx(want, rel=1e-9)
        assert row[5] == fmt(r["bpd_elbo"])
        if name != "in":
            assert row[7:12] == [fmt(r["auroc_vae_elbo"]), fmt(r["auroc_vaebm_elbo"]),
                                 fmt(r["auroc_vae_iwae"]), fmt(r["auroc_vaebm_iwae"]),
                                 fmt(r["auroc_energy_only"])]
            for key in ("auroc_vae_elbo", "auroc_vaebm_iwae", "auroc_energy_only"):
                assert 0.0 <= r[key] <= 1.0
    # the AUROCs, recomputed from the saved per-image scores as a Mann-Whitney U statistic:
    # VAE = log p, VAEBM = log p - E (a sign error in the energy would show here)
    from scipy.stats import mannwhitneyu
    sc = np.load(tmp_path / "docs" / "img" / "results" / "ood_scores.npz")
    for name in ("mnist", "noise", "interp"):
        for b in ("elbo", "iwae"):
            for key, f in ((f"auroc_vae_{b}", lambda s_: sc[f"{s_}_{b}"]),
                           (f"auroc_vaebm_{b}", lambda s_: sc[f"{s_}_{b}"] - sc[f"{s_}_energy"])):
                u = mannwhitneyu(f("in"), f(name)).statistic / (16 * 16)
                assert o[name][key] == pytest.approx(u, abs=1e-12), (name, key)
        assert o[name]["mean_energy"] == pytest.approx(sc[f"{name}_energy"].mean())
    assert "Nalisnick" in page and "![OOD sets](img/results/ood_sets.png)" in page

    # modes: table = JSON; KL of m covered modes out of 1000 is at least log(1000 / m)
    s = res["stacked"]
    rows = _rows(page, "## Mode coverage on StackedMNIST")
    for key, label in (("vae", "VAE"), ("data", "StackedMNIST data (reference)")):
        r = s[key]
        assert rows[label][1:] == [str(r["modes"]), fmt(r["kl"]), str(r["n_samples"])]
        assert 1 <= r["modes"] <= r["n_samples"] == 24
        assert math.log(1000 / r["modes"]) - 1e-9 <= r["kl"] <= math.log(1000) + 1e-9
    assert any(label.startswith("VAEBM") for label in rows)
    acc = s["classifier"]["test_accuracy"]
    assert 0.0 <= acc <= 1.0 and f"held-out accuracy **{fmt(acc, 4)}**" in page

    # FID skipped on request, and the Inception Score says why it did not run
    assert "FID: **not computed**: not run (--no-inception)" in page
    assert "Inception Score: **cannot run here**" in page
    # copied tables and every referenced figure exists
    demo = _rows(page, "2-D 25-Gaussians demo")
    assert demo["VAEBM"][1:3] == ["-2.790", "1.690"]
    assert "VAEBM | published | 2 | 16 | 40.3 | 2520.7 | 1.00 | False" in page
    for fig in ("ood_sets", "hist_ood_vae", "hist_train_test_vaebm", "nn_pixel_vaebm",
                "fashion_vaebm_samples", "stacked_vae_samples"):
        assert f"img/results/{fig}.png" in page
        assert (tmp_path / "docs" / "img" / "results" / f"{fig}.png").stat().st_size > 100
    # every table (no FID table here) says its data, counts, command and machine
    assert page.count("*Data: ") == 5
    # `render` rebuilds the same page from the JSON alone
    again = tmp_path / "docs" / "again.md"
    assert rp.main(["render", "--json", str(tmp_path / "docs" / "img" / "results" /
                                            "results.json"), "--out", str(again),
                    *_no_bars(tmp_path)]) == 0
    assert again.read_text() == page


def _no_bars(tmp_path):
    return ["--fashion-bars", str(tmp_path / "none"), "--stacked-bars", str(tmp_path / "none"),
            "--curve", str(tmp_path / "none")]


def _fm_json(name, ratio, auroc_vae, auroc_vaebm, events="", it=200):
    st = {"iterations": it, "seconds": 600.0, "events": events, "max_abs_e": 40.0}
    return {"name": name, "ebm_iteration": it, "fid": {"vae": 100.0, "vaebm": 100.0 * ratio,
                                                       "ratio": ratio, "n": 2000},
            "ood": {"auroc_vae": auroc_vae, "auroc_vaebm": auroc_vaebm}, "stage2": st,
            "stage1": {"iterations": 2400, "seconds": 1800.0}}


def test_bars_section_says_met_only_when_every_seed_meets_the_bar():
    import results_bars as rb

    fm = [_fm_json("s0", 0.45, 0.2, 0.55), _fm_json("s1", 0.52, 0.2, 0.6)]
    sm = {"name": "s0", "vae": {"modes": 900, "kl": 0.3, "n_samples": 10000},
          "vaebm": {"modes": 950, "kl": 0.2, "n_samples": 10000},
          "stage2": {"iterations": 200, "seconds": 700.0, "events": "3\tdivergence at 3"},
          "stage1": {"iterations": 2400, "seconds": 1600.0}}
    rows = {ln.split("|")[1].strip(): ln for ln in rb._bars({"fashion_bars": fm,
                                                             "stacked_bars": [sm]})
            if ln.startswith("| ") and not ln.startswith("| bar")}
    assert rows["Fashion-MNIST FID(VAEBM) / FID(VAE) <= 0.5"].endswith("**not met** |")  # 0.52
    assert "0.450, 0.520" in rows["Fashion-MNIST FID(VAEBM) / FID(VAE) <= 0.5"]
    assert rows["OOD Fashion-MNIST vs MNIST: AUROC(VAEBM) >= AUROC(VAE) + 0.3"].endswith(
        "| met |")  # +0.35 and +0.4
    assert rows["StackedMNIST: modes(VAEBM) >= modes(VAE), lower KL, >= 10,000 samples"
                ].endswith("| met |")
    assert rows["no rollback in any of these runs"].endswith("**not met** |")  # the divergence
    small = json.loads(json.dumps(sm))
    small["vae"]["n_samples"] = small["vaebm"]["n_samples"] = 4000  # too few for the bar
    page = "\n".join(rb._bars({"stacked_bars": [small]}))
    assert "(n = 4000) | **not met** |" in page
    small["vaebm"]["modes"] = 10  # a smaller check run is listed but does not decide the bar
    page = "\n".join(rb._bars({"stacked_bars": [sm, small]}))
    assert "(n = 4000) | met |" in page
    curve = rb._bars({"fashion_bars": fm, "curve": [_fm_json("b", 0.7, 0.2, 0.2, it=400),
                                                    _fm_json("a", 0.9, 0.2, 0.2, it=200)]})
    i200, i400 = (next(k for k, ln in enumerate(curve) if ln.startswith(f"| {it} |"))
                  for it in (200, 400))
    assert i200 < i400  # sorted by stage-2 iteration
    assert rb._bars({}) == []
    # the noise-only controls: listed beside their bar, against their own run, deciding nothing
    fm[0]["ebm"] = "runs/ebm_s0"
    ctl = rb._bars({"fashion_bars": fm, "stacked_bars": [sm],
                    "fashion_control": [{"ebm": "runs/ebm_s0", "fid": 99.25, "n": 2000}],
                    "stacked_control": [{"modes": {"modes": 930, "kl": 0.25,
                                                   "n_samples": 10000}}]})
    lines = [ln for ln in ctl if ln.startswith("| (control")]
    assert len(lines) == 2 and all(ln.endswith("|  |") for ln in lines)
    assert "FID 99.2 (n = 2000) against VAE 100.0 and VAEBM 45.0 of s0" in lines[0]
    assert "930 modes, KL 0.250 (n = 10000)" in lines[1]


def test_bad_inputs(setup, tmp_path):
    rp = _load_script()
    base = ["page", "--quick", "--mnist", str(setup["mnist"]), "--out", str(tmp_path / "r.md")]
    with pytest.raises(SystemExit, match="run folder .*missing does not exist"):
        rp.main([*base, "--fashion-run", str(tmp_path / "missing")])
    half = tmp_path / "half"
    (half / "vae").mkdir(parents=True)
    (half / "vae" / "vae.pt").write_bytes(b"x")
    with pytest.raises(SystemExit, match="has no ebm/ebm.pt"):
        rp.main([*base, "--fashion-run", str(half)])
    with pytest.raises(SystemExit, match="MNIST source .* does not exist"):
        rp.main(["page", "--fashion-run", str(setup["fm"]), "--mnist", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "r.md")])
    with pytest.raises(SystemExit, match="StackedMNIST run folder"):
        rp.main([*base, "--fashion-run", str(setup["fm"]), "--stacked-run", str(tmp_path)])
    with pytest.raises(SystemExit, match="no such file"):
        rp.main(["render", "--json", str(tmp_path / "none.json"), "--out", str(tmp_path / "r.md")])
    assert not (tmp_path / "r.md").exists()  # nothing written before the inputs were checked
