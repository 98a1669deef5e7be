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
so load on a shared machine hits them alike; the ratio is the median of per-round ratios.
CSV: benchmarks/results/langevin_overhead-cpu.csv.
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


def pin_malloc() -> bool:
    """glibc only: serve every allocation from the heap and never trim it. The MLP's (B, 128)
    activations are 1 MB at batch 2000, above glibc's mmap threshold, so each one was mapped
    and unmapped, page-faulting 35-90 times a step in either variant; which allocations crossed
    the (dynamic) threshold depended on the variants' other buffers, and the batch-2000 rows
    swung by +-5% between runs. Both variants run under the same setting."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and \
            bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False


def run(batches=(100, 2000), threads=(1, 2), steps=100, reps=15):
    """Per (threads, batch): ``reps`` rounds, each running every variant once in a rotated
    order. ``vs_two_line`` is the median over rounds of each round's time ratio to the
    two-line loop (paired: a round's variants run within a second of each other, so slow
    drifts of a shared machine cancel), with its quartiles; the medians of the times are
    given too."""
    rows = []
    energy = toy_energy()
    names = list(VARIANTS)
    for nt in threads:
        torch.set_num_threads(nt)
        for b in batches:
            x0 = torch.randn(b, 2, generator=torch.Generator().manual_seed(1))
            times = {name: [] for name in VARIANTS}
            for fn in VARIANTS.values():  # warm up (kernel build, allocator)
                fn(energy, x0, 5)
            for r in range(reps):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    t0 = time.perf_counter()
                    VARIANTS[name](energy, x0, steps)
                    times[name].append((time.perf_counter() - t0) / steps * 1e6)
            base = times["two-line loop"]
            for name, ts in times.items():
                ratios = [t / t0 for t, t0 in zip(ts, base)]
                q = statistics.quantiles(ts, n=4)
                qr = statistics.quantiles(ratios, n=4)
                rows.append({"threads": nt, "batch": b, "impl": name,
                             "us_per_step": statistics.median(ts), "q1_us": q[0], "q3_us": q[2],
                             "vs_two_line": statistics.median(ratios), "ratio_q1": qr[0],
                             "ratio_q3": qr[2]})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batches", type=int, nargs="+", default=[100, 2000])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--out", default=None, help="CSV name (default langevin_overhead)")
    p.add_argument("--no-pin-malloc", action="store_true",
                   help="leave glibc's mmap threshold dynamic (see pin_malloc)")
    a = p.parse_args(argv)
    pinned = False if a.no_pin_malloc else pin_malloc()
    rows = run(a.batches, a.threads, a.steps, a.reps)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    for r in rows:
        r["load_avg"] = round(load, 2)
        r["malloc_pinned"] = pinned
    print(f"machine: {machine('cpu')}; load average {load:.2f}; malloc pinned: {pinned}")
    print(markdown(rows, ["threads", "batch", "impl", "us_per_step", "q1_us", "q3_us",
                          "vs_two_line", "ratio_q1", "ratio_q3"]))
    print(f"csv: {write_csv(a.out or 'langevin_overhead', rows, 'cpu')}")
    return rows


if __name__ == "__main__":
    main()
