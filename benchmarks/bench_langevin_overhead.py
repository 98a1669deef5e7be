"""Per-step cost of FusedLangevin against the two-line SGLD loop of short-run EBM code.

    python benchmarks/bench_langevin_overhead.py [--threads 1 2] [--batches 100 2000]

The energy is a toy MLP 2-128-128-1 (SiLU), the state (B, 2). The baseline is the loop such
projects write (grad_scale a, noise_std b)::

    x.requires_grad_(True)
    for _ in range(K):
        g = torch.autograd.grad(E(x).sum(), x)[0]
        x.data += -a * g + b * torch.randn_like(x)

against ``FusedLangevin.from_sgld(x, a, b)`` with its defaults (the non-finite guard and the
statistics on), and with both off (``track=False, on_nonfinite=None``). Each rep runs K steps;
the variants alternate rep by rep in one process (medians over reps, microseconds per step),
so load on a shared machine hits them alike. CSV: benchmarks/results/langevin_overhead-cpu.csv.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))  # a checkout works without install
from _harness import machine, markdown, write_csv  # noqa: E402

from vaebm import FusedLangevin  # noqa: E402

A, B_NOISE = 0.01, 0.005  # grad_scale, noise_std (short-run EBM style)


def toy_energy(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(2, 128), torch.nn.SiLU(), torch.nn.Linear(128, 128),
                              torch.nn.SiLU(), torch.nn.Linear(128, 1))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            p.requires_grad_(False)
    return lambda x: net(x).squeeze(-1)


def two_line(energy, x0, k):
    x = x0.clone().requires_grad_(True)
    for _ in range(k):
        g = torch.autograd.grad(energy(x).sum(), x)[0]
        x.data += -A * g + B_NOISE * torch.randn_like(x)
    return x


def fused(energy, x0, k, **kw):
    x = x0.clone()
    s = FusedLangevin.from_sgld(x, A, B_NOISE, seed=0, **kw)
    for _ in range(k):
        s.step(energy)
    return x


VARIANTS = {
    "two-line loop": lambda e, x, k: two_line(e, x, k),
    "FusedLangevin (defaults)": lambda e, x, k: fused(e, x, k),
    "FusedLangevin (no guard, no stats)": lambda e, x, k: fused(e, x, k, track=False,
                                                                 on_nonfinite=None),
}


def run(batches=(100, 2000), threads=(1, 2), steps=100, reps=15):
    rows = []
    energy = toy_energy()
    for nt in threads:
        torch.set_num_threads(nt)
        for b in batches:
            x0 = torch.randn(b, 2, generator=torch.Generator().manual_seed(1))
            times = {name: [] for name in VARIANTS}
            for fn in VARIANTS.values():  # warm up (kernel build, allocator)
                fn(energy, x0, 5)
            for _ in range(reps):
                for name, fn in VARIANTS.items():
                    t0 = time.perf_counter()
                    fn(energy, x0, steps)
                    times[name].append((time.perf_counter() - t0) / steps * 1e6)
            base = statistics.median(times["two-line loop"])
            for name, ts in times.items():
                med = statistics.median(ts)
                q = statistics.quantiles(ts, n=4)
                rows.append({"threads": nt, "batch": b, "impl": name, "us_per_step": med,
                             "q1_us": q[0], "q3_us": q[2], "vs_two_line": med / base})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batches", type=int, nargs="+", default=[100, 2000])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--out", default=None, help="CSV name (default langevin_overhead)")
    a = p.parse_args(argv)
    rows = run(a.batches, a.threads, a.steps, a.reps)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    for r in rows:
        r["load_avg"] = round(load, 2)
    print(f"machine: {machine('cpu')}; load average {load:.2f}")
    print(markdown(rows, ["threads", "batch", "impl", "us_per_step", "q1_us", "q3_us",
                          "vs_two_line"]))
    print(f"csv: {write_csv(a.out or 'langevin_overhead', rows, 'cpu')}")
    return rows


if __name__ == "__main__":
    main()
