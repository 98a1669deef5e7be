"""Stage-1 (NVAE -ELBO) iteration time on the CPU: the plain PyTorch path against vaebm's fast
paths, side by side in one process.

    python benchmarks/bench_stage1.py [--presets mnist,stacked_mnist] [--batch 32] [--threads 1]

One timed call is ``VAETrainer.train_step`` (forward, -ELBO with KL balancing and the spectral /
BN regularisers, backward, Adamax), the thing a training run repeats. The two modes alternate
rep by rep on the same trainer so that load on a shared machine hits both alike:

- ``plain``: ``VAEBM_CPU_CONV=torch``, every convolution and its gradients on PyTorch's own
  kernels (what stage 1 ran on before the C++ depthwise training path);
- ``fast``: the default (``auto``): each served conv takes the C++ kernel where it measured
  faster at first use (``vaebm.ops.conv.prefer``).

Run it a second time under ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
VAEBM_CPU_ISA=avx2`` for the AVX2-only figures (``--tag stage1-avx2``).
Writes ``benchmarks/results/<tag>-cpu.csv`` with machine, versions and git revision.
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

MODES = {"plain": "torch", "fast": "auto"}


def _trainer(preset: str, batch: int, seed: int = 0):
    from vaebm.models.nvae import NVAE
    from vaebm.training.config import VAEConfig
    from vaebm.training.vae import VAETrainer

    torch.manual_seed(seed)
    vae = NVAE(preset)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, *vae.image_shape, generator=g)
    cfg = VAEConfig(steps=10_000, batch_size=batch, warmup_steps=10, lr=1e-3, wdn=1e-2,
                    tensorboard=False)
    return VAETrainer(vae, lambda it: x, cfg), x


def run(presets, batch: int, reps: int, warmup: int) -> list[dict]:
    rows = []
    old = os.environ.get("VAEBM_CPU_CONV")
    try:
        for preset in presets:
            tr, x = _trainer(preset, batch)
            times = {m: [] for m in MODES}
            it = 0
            for r in range(warmup + reps):
                for mode, policy in MODES.items():
                    os.environ["VAEBM_CPU_CONV"] = policy
                    t0 = time.perf_counter()
                    stats, reason = tr.train_step(it, x)
                    dt = time.perf_counter() - t0
                    if reason is not None:
                        raise RuntimeError(f"{preset}: divergence in the benchmark: {reason}")
                    it += 1
                    if r >= warmup:
                        times[mode].append(dt)
            plain = statistics.median(times["plain"])
            for mode in MODES:
                ts = sorted(times[mode])
                med = statistics.median(ts)
                rows.append({"preset": preset, "batch": batch, "mode": mode,
                             "threads": torch.get_num_threads(), "reps": len(ts),
                             "median_s": med, "min_s": ts[0], "max_s": ts[-1],
                             "speedup_vs_plain": plain / med,
                             "cpu_isa": torch.backends.cpu.get_cpu_capability(),
                             "vaebm_cpu_isa": os.environ.get("VAEBM_CPU_ISA", "")})
            print(f"[bench_stage1] {preset}: plain {plain:.3f} s, fast "
                  f"{statistics.median(times['fast']):.3f} s", flush=True)
    finally:
        if old is None:
            os.environ.pop("VAEBM_CPU_CONV", None)
        else:
            os.environ["VAEBM_CPU_CONV"] = old
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="mnist,stacked_mnist")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--tag", default="stage1")
    a = p.parse_args(argv)
    if a.batch < 1 or a.reps < 1 or a.warmup < 0 or a.threads < 1:
        p.error("--batch, --reps and --threads must be >= 1, --warmup >= 0")
    torch.set_num_threads(a.threads)
    load0 = os.getloadavg()[0]
    rows = run([s.strip() for s in a.presets.split(",") if s.strip()], a.batch, a.reps,
               a.warmup)
    print(f"\nStage-1 iteration (VAETrainer.train_step), batch {a.batch}\nmachine: "
          f"{machine('cpu')}; CPU ISA {torch.backends.cpu.get_cpu_capability()}; load average "
          f"{load0:.2f} -> {os.getloadavg()[0]:.2f}\n")
    print(markdown(rows, ["preset", "mode", "threads", "median_s", "min_s", "max_s",
                          "speedup_vs_plain"]))
    path = write_csv(a.tag, rows)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
