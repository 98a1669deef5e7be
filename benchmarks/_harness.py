"""Shared timing harness: warm-up, device synchronisation, medians, machine description, CSV."""

from __future__ import annotations

import csv
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench(fn, device="cpu", *, warmup: int = 3, reps: int = 20, min_time: float = 0.0) -> dict:
    """Median, min and spread of ``fn()`` wall times in ms, synchronised around every call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else times * 3
    return {"median_ms": statistics.median(times), "min_ms": min(times), "q1_ms": q[0],
            "q3_ms": q[2], "reps": len(times)}


def bench_interleaved(fns: dict, device="cpu", *, warmup: int = 3, reps: int = 20) -> dict:
    """``bench`` for several variants at once, alternating them call by call, so that load on
    a shared machine hits them alike (ratios of the medians are then side by side)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else ts * 3
        out[name] = {"median_ms": statistics.median(ts), "min_ms": min(ts), "q1_ms": q[0],
                     "q3_ms": q[2], "reps": len(ts)}
    return out


def machine(device="cpu") -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        what = torch.cuda.get_device_name(dev)
    else:
        what = _cpu_model()
    return (f"{what}; {os.cpu_count()} CPU threads visible, torch {torch.__version__} "
            f"({torch.get_num_threads()} intra-op threads), {platform.system()} {platform.machine()}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_csv(name: str, rows: list[dict], device="cpu") -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}-{torch.device(device).type}.csv"
    meta = {"machine": machine(device), "git": git_rev(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    keys = list(rows[0]) + list(meta)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({**r, **meta})
    return path


def markdown(rows: list[dict], cols: list[str]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)
