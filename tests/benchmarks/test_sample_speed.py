"""benchmarks/sample_speed.py: the end-to-end quick run, and the pieces it measures with."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import sample_speed as ss  # noqa: E402


def test_quick_run_end_to_end(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "sample_speed.py"), "--quick", "--n", "3",
           "--out", str(tmp_path), "--backend", "torch", "--tag", "t"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    assert "| model | mode | precision |" in out and "VAEBM published / optimised" in out
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with open(tmp_path / f"t-{dev}.csv") as f:
        rows = list(csv.DictReader(f))
    for col in ss.COLUMNS + ["machine", "git", "torch", "precision"]:
        assert col in rows[0], col
    got = {(r["model"], r["mode"]) for r in rows}
    assert got == {("VAEBM", m) for m in ss.VAEBM_MODES} | {
        (f"NCSN {v}", m) for v in ("v1", "v2") for m in ss.NCSN_MODES}
    for r in rows:
        n, secs = int(r["n"]), float(r["seconds"])
        assert n == 3 and secs > 0
        assert float(r["samples_per_s"]) == pytest.approx(n / secs, rel=1e-6)
        assert float(r["ms_per_eval"]) == pytest.approx(1e3 * secs / int(r["evals_per_chain"]),
                                                        rel=1e-6)
        # the timed code really is the sampler: network calls seen by a forward hook
        assert int(r["evals_hooked"]) == int(r["evals_timed"]) * n
        if r["model"] == "VAEBM":
            assert int(r["evals_per_chain"]) == 3 and r["extrapolated"] == "False"
        else:
            full = 1000 if r["model"].endswith("v1") else 1161
            assert int(r["evals_per_chain"]) == full and r["extrapolated"] == "True"
            assert int(r["evals_timed"]) == (10 if full == 1000 else 5)  # v2: 4 levels + denoise
            assert float(r["ratio_vs_vaebm_optimised"]) > 1
    meta = json.loads((tmp_path / f"t-{dev}.json").read_text())["meta"]
    assert meta["quick"] is True and meta["vaebm_steps"] == 3 and meta["git"]


def _tiny(mode, **kw):
    vae, _ = ss.build_vae("tiny", "auto", "cpu")
    energy = ss.build_energy("tiny", "cpu")
    return ss.VAEBMRunner(vae, energy, mode=mode, steps=4, eta=1e-2, backend="torch", **kw), energy


@pytest.mark.parametrize("energy_mode", ["official", "paper"])
def test_published_and_eager_loops_are_the_same_chain(energy_mode):
    """Same noise draws in the same order: the published loop (backward of the batch mean,
    gradient times B, noise drawn into buffers, host-sync assert) equals the clean loop."""
    xs = []
    for mode in ("published", "eager"):
        r, _ = _tiny(mode, energy_mode=energy_mode)
        torch.manual_seed(11)
        xs.append(r.run(3, torch.Generator().manual_seed(2)))
    torch.testing.assert_close(xs[0], xs[1], rtol=1e-4, atol=1e-5)
    r, _ = _tiny("eager", energy_mode=energy_mode)
    torch.manual_seed(11)
    r.steps = 0
    x0 = r.run(3, torch.Generator().manual_seed(2))
    assert (x0 - xs[1]).abs().max() > 1e-4  # the chains moved


def test_optimised_runs_the_fused_sampler_on_frozen_models():
    r, energy = _tiny("optimised")
    r.setup()
    assert energy.is_frozen
    counter = ss.EvalCounter(energy)
    x = r.run(5, torch.Generator().manual_seed(0))
    counter.close()
    r.teardown()
    assert not energy.is_frozen
    assert x.shape == (5, 3, 8, 8) and torch.isfinite(x).all()
    assert counter.samples == 4 * 5
    with pytest.raises(ValueError, match="mode"):
        ss.VAEBMRunner(None, None, mode="fast")


def test_peak_memory_sees_a_large_allocation():
    with ss.PeakMemory("cpu") as mem:
        a = torch.ones(48 * 2**20 // 4)  # 48 MiB, touched
        del a
    r = mem.row()
    if "VmHWM" in r["mem_kind"]:
        assert r["mem_delta_MiB"] > 40
    assert r["peak_mem_MiB"] > 40


def test_scaling_quick(tmp_path):
    """bench_scaling.py --quick: every sweep runs, the CSV holds its rows, plots are written
    (when matplotlib is installed), and the steps sweep's straight-line fit is consistent."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_scaling.py"), "--quick", "--out",
           str(tmp_path), "--backend", "torch", "--batches", "1", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with open(tmp_path / f"bench_scaling-quick-{dev}.csv") as f:
        rows = list(csv.DictReader(f))
    sweeps = [r["sweep"] for r in rows]
    assert sweeps.count("batch") == 4 and sweeps.count("steps") == 4
    assert sweeps.count("resolution") == 1
    steps = [r for r in rows if r["sweep"] == "steps"]
    assert [int(r["steps"]) for r in steps] == [0, 1, 2, 4]
    fixed, per = float(steps[0]["fit_fixed_s"]), float(steps[0]["fit_per_step_s"])
    assert per > 0
    # the residuals of a least-squares line sum to zero
    res = sum(float(r["s_per_sample"]) - (fixed + per * int(r["steps"])) for r in steps)
    assert abs(res) < 1e-9
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    for sw in ("batch", "steps", "resolution"):
        png = tmp_path / f"scaling_{sw}-quick-{dev}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_marks_ratios_built_on_extrapolated_rows():
    rows = [{"model": "VAEBM", "mode": m, "seconds": s, "extrapolated": False}
            for m, s in (("published", 20.0), ("optimised", 10.0))]
    rows += [{"model": "NCSN v1", "mode": "published", "seconds": 200.0, "extrapolated": True},
             {"model": "NCSN v1", "mode": "eager", "seconds": 190.0, "extrapolated": False}]
    lines = ss.summary(rows)
    by = {ln.split(":")[0]: ln for ln in lines}
    assert "[extrapolated: NCSN v1 published" in by["NCSN v1 published / VAEBM published"]
    assert "extrapolated" not in by["NCSN v1 eager / VAEBM optimised"]
    assert "extrapolated" not in by["VAEBM published / optimised"]
