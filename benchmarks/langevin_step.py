"""One Langevin update step: fused backends vs the eager update as the published code writes it.

    python benchmarks/langevin_step.py [--device cuda] [--reps 30]

Workloads: a VAEBM CIFAR-10 eps-state (30 tensors of 50x20x16x16 plus 50x3x32x32, 156,672 floats
per sample) and one 1e7-element tensor (50 x 200,000). The baseline is the published code's
update: per tensor ``x.add_(g, alpha=-eta/2)`` then ``x.add_(torch.randn_like(x), alpha=sqrt(eta))``.
Bandwidth counts 12 bytes per fp32 element (read x, read g, write x). On a GPU the achieved
bandwidth is also given as a fraction of the measured device copy bandwidth.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))  # a checkout works without install
from _harness import bench, bench_interleaved, machine, markdown, write_csv  # noqa: E402

from vaebm import FusedLangevin  # noqa: E402
from vaebm.ops import BackendUnavailable, langevin_reduce, langevin_update_  # noqa: E402

ETA = 8e-5  # CIFAR-10 step size (Table 8)


def workloads(device, dtype=torch.float32):
    gen = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=gen).to(device, dtype)  # noqa: E731
    vaebm = [mk(50, 20, 16, 16) for _ in range(30)] + [mk(50, 3, 32, 32)]
    return {"vaebm-cifar10 (31 tensors)": vaebm, "one 1e7 tensor": [mk(50, 200_000)]}


def eager_update(xs, gs, eta=ETA):
    for x, g in zip(xs, gs):
        x.add_(g, alpha=-eta / 2)
        x.add_(torch.randn_like(x), alpha=math.sqrt(eta))


def copy_bandwidth(device, n=1 << 28) -> float:
    a = torch.empty(n // 4, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a), device, reps=20)["median_ms"]
    return 2 * a.numel() * 4 / (t * 1e-3) / 1e9


def run(device="cpu", reps=30, backends=("torch", "cpp", "triton", "cuda")):
    """Per workload, the eager update and the kernels timed in one interleaved loop (variant by
    variant within each rep), so the ratios to the eager update are side by side. The `torch`
    reference backend runs in a loop of its own: interleaved, its large temporaries slowed the
    eager update next to it by 1.7x (allocator and page-fault churn), flattering every ratio."""
    rows = []
    peak = copy_bandwidth(device) if torch.device(device).type == "cuda" else None
    for name, xs in workloads(device).items():
        gs = [torch.randn_like(x) for x in xs]
        n = sum(x.numel() for x in xs)
        variants = {"eager (published)": lambda: eager_update(xs, gs)}
        for be in backends:
            step = lambda be=be: langevin_update_(xs, gs, seed=1, step=0, step_size=ETA,  # noqa
                                                  backend=be)
            try:
                step()
            except BackendUnavailable as e:
                print(f"skip {be}: {e}", file=sys.stderr)
                continue
            variants[be] = step
            if be != "torch":
                variants[be + " +guard reduce"] = \
                    lambda be=be, step=step: (langevin_reduce(xs, gs, backend=be), step())
            if be == "cpp":  # FusedLangevin's planned step: guard, statistics, update, one call
                energy = torch.zeros(xs[0].shape[0], device=device)
                full = FusedLangevin(xs, ETA, lam=1.0, seed=1, backend=be)
                lean = FusedLangevin(xs, ETA, lam=1.0, seed=1, backend=be, track=False,
                                     on_nonfinite=None)
                variants["cpp FusedLangevin step (guard + stats)"] = \
                    lambda s=full: s.step_with_grad(gs, energy)
                variants["cpp FusedLangevin step (no guard, no stats)"] = \
                    lambda s=lean: s.step_with_grad(gs, energy)
        ref = variants.pop("torch", None)
        res = bench_interleaved(variants, device, reps=reps)
        if ref is not None:
            res["torch"] = bench(ref, device, reps=max(3, reps // 3))
        base = res["eager (published)"]["median_ms"]
        for label, r in res.items():
            t = r["median_ms"]
            row = {"workload": name, "impl": label, "median_ms": t, "q1_ms": r["q1_ms"],
                   "q3_ms": r["q3_ms"], "GB/s": 12 * n / (t * 1e-3) / 1e9, "speedup": base / t}
            if peak:
                row["% copy BW"] = 100 * row["GB/s"] / peak
            rows.append(row)
    return rows, peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=30)
    args = p.parse_args(argv)
    rows, peak = run(args.device, args.reps)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {machine(args.device)}; load average {load:.2f}")
    if peak:
        print(f"measured device copy bandwidth: {peak:.0f} GB/s")
    cols = ["workload", "impl", "median_ms", "q1_ms", "q3_ms", "GB/s", "speedup"] + (["% copy BW"] if peak else [])
    print(markdown(rows, cols))
    print(f"csv: {write_csv('langevin_step', rows, args.device)}")


if __name__ == "__main__":
    main()
