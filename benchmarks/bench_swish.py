"""Scaled Swish (fused bias) forward + backward, and weight norm forward + backward: each kernel
backend against the PyTorch reference of the same op (``_torch_fwd`` / ``_torch_bwd``).

    python benchmarks/bench_swish.py [--device cuda] [--shape 50 128 32 32] [--reps 20]

Times one ``swish_fwd`` + ``swish_bwd`` call pair on a (B, C, H, W) tensor with a (C,) bias, in
the contiguous and channels_last layouts, and ``weight_norm_fwd`` + ``weight_norm_bwd`` on the
(256, 256, 3, 3) weight of a cifar10 ResBlock conv. Medians of ``--reps`` runs after warm-up.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import bench, machine, markdown, write_csv  # noqa: E402

from vaebm.ops import _registry, swish as sw, weight_norm as wn  # noqa: E402


def _backends(device, table, fwd, bwd):
    """(name, forward kernel, backward kernel) of each backend of ``device`` that builds."""
    names = ["cpp"] if device.type == "cpu" else ["cuda", "triton"]
    out = []
    for name in names:
        try:
            out.append((name, table[fwd][name].get(), table[bwd][name].get()))
        except _registry.BackendUnavailable as e:
            print(f"skipping {name}: {e}", file=sys.stderr)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", type=int, nargs=4, default=[50, 128, 32, 32])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = ap.parse_args(argv)
    dev, dt = torch.device(args.device), getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for layout in ("contiguous", "channels_last"):
        x = torch.randn(args.shape, generator=gen).to(dev, dt)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        g = torch.randn(args.shape, generator=gen).to(dev, dt)
        g = torch.empty_like(x).copy_(g)
        b = torch.randn(args.shape[1], generator=gen).to(dev, dt)
        impls = [("torch", sw._torch_fwd, sw._torch_bwd)]
        impls += _backends(dev, sw.SWISH, "swish_fwd", "swish_bwd")
        base = None
        for name, fwd, bwd in impls:
            r = bench(lambda: (fwd(x, b), bwd(g, x, b)), dev, warmup=3, reps=args.reps)
            base = base or r["median_ms"]
            rows.append({"op": f"swish fwd+bwd {layout}", "backend": name,
                         "median_ms": r["median_ms"], "speedup": base / r["median_ms"]})
    v = torch.randn(256, 256, 3, 3, generator=gen).to(dev, dt)
    lg = torch.randn(256, generator=gen).to(dev, dt)
    gw = torch.randn(256, 256, 3, 3, generator=gen).to(dev, dt)
    impls = [("torch", wn._torch_fwd, wn._torch_bwd)]
    impls += _backends(dev, wn.WEIGHT_NORM, "weight_norm_fwd", "weight_norm_bwd")
    base = None
    for name, fwd, bwd in impls:
        r = bench(lambda: (fwd(v, lg), bwd(gw, v, lg)), dev, warmup=3, reps=args.reps)
        base = base or r["median_ms"]
        rows.append({"op": "weight_norm fwd+bwd (256,256,3,3)", "backend": name,
                     "median_ms": r["median_ms"], "speedup": base / r["median_ms"]})
    print(f"{machine(dev)}; shape {tuple(args.shape)} {args.dtype}\n")
    print(markdown(rows, ["op", "backend", "median_ms", "speedup"]))
    print(f"\nwrote {write_csv(f'bench_swish-{args.dtype}', rows, dev)}")


if __name__ == "__main__":
    main()
