"""How sampling time scales: per sample against batch size, number of Langevin steps and
resolution (VAEBM presets at 32, 64 and 256 pixels), with PNG plots.

    python benchmarks/bench_scaling.py                 # CPU defaults, a few minutes
    python benchmarks/bench_scaling.py --quick         # tiny sweeps (seconds)
    python benchmarks/bench_scaling.py --sweeps batch --mode eager

Sweeps (VAEBM in ``--mode``, default optimised, same runner as sample_speed.py):

- ``batch``: seconds per sample of a ``--steps``-step VAEBM chain, and of one NCSN v1 evaluation
  times 1000 (its full chain), at each batch size. Both on cifar10-sized networks.
- ``steps``: seconds per sample against the number of Langevin steps at one batch size; a least-
  squares line gives the fixed cost (initial draw + final decode) and the cost per step.
- ``resolution``: seconds per sample per Langevin step for the cifar10 (32), celeba64 (64) and
  celebahq256 (256) presets (NVAE backbone + EnergyNet of that preset).

Writes ``benchmarks/results/bench_scaling-<device>.csv`` and ``scaling_<sweep>-<device>.png``
(matplotlib, imported only here).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ncsn  # noqa: E402
import sample_speed as ss  # noqa: E402
from _harness import RESULTS, git_rev, machine, markdown, sync  # noqa: E402

RES_PRESETS = {"cifar10": 32, "celeba64": 64, "celebahq256": 256}


def _vaebm(preset, kind, dev, mode, batch, steps, ac, backend, cache):
    if preset not in cache:
        vae, desc = ss.build_vae(preset, kind, dev)
        cache[preset] = (vae, ss.build_energy(preset, dev), desc)
    vae, energy, desc = cache[preset]
    (r,) = ss.time_vaebm(vae, energy, [mode], batch, steps=steps, eta=ss.ETA,
                         energy_mode="official", device=dev, autocast=ac, backend=backend)
    return r["seconds"], desc


def _ncsn_eval(model, batch, dev, ac):
    """Seconds of one NCSN forward at ``batch`` (median of 3 after a warm-up)."""
    x = torch.rand(batch, 3, 32, 32, device=dev)
    y = torch.zeros(batch, dtype=torch.long, device=dev)
    ts = []
    with torch.no_grad(), ss._autocast(dev, ac):
        for i in range(4):
            sync(dev)
            t0 = time.perf_counter()
            model(x, y)
            sync(dev)
            if i:
                ts.append(time.perf_counter() - t0)
    return sorted(ts)[1]


def sweep_batch(a, dev, ac, cache):
    rows = []
    model = (ncsn.ncsn_v1(ngf=8) if a.quick else ncsn.ncsn_v1()).to(dev).eval().requires_grad_(False)
    for b in a.batches:
        s, desc = _vaebm(a.preset, a.vae, dev, a.mode, b, a.steps, ac, a.backend, cache)
        rows.append({"sweep": "batch", "x": b, "model": f"VAEBM {a.mode} ({a.steps} steps)",
                     "batch": b, "steps": a.steps, "preset": a.preset, "seconds": s,
                     "s_per_sample": s / b, "vae": desc})
        t = _ncsn_eval(model, b, dev, ac)
        rows.append({"sweep": "batch", "x": b, "model": "NCSN v1 (1000 evals, extrapolated)",
                     "batch": b, "steps": 1000, "preset": "cifar10", "seconds": t * 1000,
                     "s_per_sample": t * 1000 / b, "vae": ""})
    return rows


def sweep_steps(a, dev, ac, cache):
    rows = []
    for k in a.step_counts:
        s, desc = _vaebm(a.preset, a.vae, dev, a.mode, a.batch, k, ac, a.backend, cache)
        rows.append({"sweep": "steps", "x": k, "model": f"VAEBM {a.mode}", "batch": a.batch,
                     "steps": k, "preset": a.preset, "seconds": s, "s_per_sample": s / a.batch,
                     "vae": desc})
    xs = [r["x"] for r in rows]
    ys = [r["s_per_sample"] for r in rows]
    if len(xs) > 1:  # least squares y = c + m k
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        m = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        for r in rows:
            r["fit_fixed_s"], r["fit_per_step_s"] = my - m * mx, m
    return rows


def sweep_resolution(a, dev, ac, cache):
    rows = []
    presets = ["tiny"] if a.quick else a.res_presets
    for p in presets:
        steps = max(1, min(a.steps, 2 if dev.type == "cpu" else a.steps))
        s0, desc = _vaebm(p, a.vae, dev, a.mode, a.res_batch, 0, ac, a.backend, cache)
        s, _ = _vaebm(p, a.vae, dev, a.mode, a.res_batch, steps, ac, a.backend, cache)
        vae = cache[p][0]
        state = sum(sh.numel() for sh in vae.eps_shapes(1))
        rows.append({"sweep": "resolution", "x": RES_PRESETS.get(p, 8), "model": f"VAEBM {a.mode}",
                     "batch": a.res_batch, "steps": steps, "preset": p, "seconds": s,
                     "s_per_sample": s / a.res_batch,
                     "s_per_step_per_sample": max(s - s0, 0.0) / steps / a.res_batch,
                     "state_floats_per_sample": state, "vae": desc})
        cache.pop(p, None)  # the 256-px models are large: keep one preset in memory at a time
    return rows


def plot(rows, sweep, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    key = "s_per_step_per_sample" if sweep == "resolution" else "s_per_sample"
    for model in dict.fromkeys(r["model"] for r in rows):
        pts = [(r["x"], r[key]) for r in rows if r["model"] == model]
        ax.plot(*zip(*pts), "o-", label=model)
    ax.set_xlabel({"batch": "batch size", "steps": "Langevin steps",
                   "resolution": "image size (preset)"}[sweep])
    ax.set_ylabel({"resolution": "s per sample per step"}.get(sweep, "s per sample"))
    if sweep != "steps":
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"sampling time vs {sweep}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if gpu else "cpu")
    p.add_argument("--sweeps", default="batch,steps,resolution")
    p.add_argument("--mode", default="optimised", choices=ss.VAEBM_MODES)
    p.add_argument("--vae", default="auto", choices=["auto", "nvae", "standin"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    p.add_argument("--backend", default=None)
    p.add_argument("--batches", type=int, nargs="+", default=None)
    p.add_argument("--steps", type=int, default=None, help="steps per chain in the batch sweep")
    p.add_argument("--step-counts", type=int, nargs="+", default=None)
    p.add_argument("--batch", type=int, default=None, help="batch of the steps sweep")
    p.add_argument("--res-batch", type=int, default=None)
    p.add_argument("--res-presets", nargs="+", default=list(RES_PRESETS))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    cpu = dev.type == "cpu"
    a.preset = "tiny" if a.quick else "cifar10"
    a.batches = a.batches or ([1, 2, 4] if a.quick else [1, 2, 4, 8] if cpu else [1, 4, 16, 64, 256])
    a.steps = a.steps or (2 if a.quick else 4 if cpu else 16)
    a.step_counts = a.step_counts or ([0, 1, 2, 4] if a.quick else [0, 2, 4, 8] if cpu
                                      else [0, 4, 8, 16, 32, 64])
    a.batch = a.batch or (2 if cpu else 50)
    a.res_batch = a.res_batch or (1 if cpu else 8)
    if a.threads or a.quick:
        torch.set_num_threads(a.threads or 1)
    ac = ss.precision_context(a.precision, dev)
    cache, rows = {}, []
    funcs = {"batch": sweep_batch, "steps": sweep_steps, "resolution": sweep_resolution}
    out = Path(a.out) if a.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{'-quick' if a.quick else ''}-{dev.type}"
    pngs = []
    for sw in [s for s in a.sweeps.split(",") if s]:
        if sw not in funcs:
            raise SystemExit(f"unknown sweep {sw!r}; choose from {', '.join(funcs)}")
        r = funcs[sw](a, dev, ac, cache)
        rows += r
        print(f"\n## {sw}\n")
        print(markdown(r, ["model", "preset", "batch", "steps", "seconds", "s_per_sample"]
                       + (["s_per_step_per_sample", "state_floats_per_sample"]
                          if sw == "resolution" else [])
                       + (["fit_fixed_s", "fit_per_step_s"] if sw == "steps" else [])))
        try:
            png = out / f"scaling_{sw}{tag}.png"
            plot(r, sw, png)
            pngs.append(png)
        except ImportError as e:
            print(f"no plot ({e}); pip install matplotlib", file=sys.stderr)
    meta = {"machine": machine(dev), "git": git_rev(), "torch": torch.__version__,
            "precision": a.precision, "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    keys = list(dict.fromkeys(k for r in rows for k in r)) + list(meta)
    path = out / f"bench_scaling{tag}.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({**r, **meta})
    print(f"\nmachine: {meta['machine']}\nwrote {path}", *pngs)
    return rows


if __name__ == "__main__":
    main()
