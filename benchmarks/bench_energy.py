"""Energy forward + gradient w.r.t. the input (what one Langevin step needs), cifar10 preset.

    python benchmarks/bench_energy.py [--device cuda] [--batch 50] [--reps 15] [--bf16]

Baseline: the same network written the usual way, nn.Conv2d under
``torch.nn.utils.parametrizations.weight_norm`` (weights recomputed at every call), Swish as
``x * sigmoid(x) / 1.1``, ResBlock as conv -> swish -> conv, skip, avg-pool, swish. It is loaded
with the EnergyNet's weights, and both must agree before anything is timed.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm as wn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import bench, machine, markdown, write_csv  # noqa: E402

from vaebm.models import EnergyNet  # noqa: E402


class _Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x) / 1.1


class _Block(nn.Module):
    def __init__(self, cin, cout, down):
        super().__init__()
        self.down = down
        self.conv1 = wn(nn.Conv2d(cin, cout, 3, padding=1))
        self.conv2 = wn(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = wn(nn.Conv2d(cin, cout, 1, bias=False)) if down or cin != cout else None
        self.act = _Swish()

    def forward(self, x):
        y = self.conv2(self.act(self.conv1(x)))
        y = y + (x if self.skip is None else self.skip(x))
        return self.act(F.avg_pool2d(y, 2) if self.down else y)


class Baseline(nn.Module):
    """The EnergyNet architecture in stock PyTorch, with ``net``'s current weights."""

    def __init__(self, net: EnergyNet):
        super().__init__()
        self.stem = wn(nn.Conv2d(net.in_channels, net.stem.out_channels, 3, padding=1))
        self.blocks = nn.ModuleList(_Block(b.in_channels, b.out_channels, b.down)
                                    for b in net.blocks)
        self.head = nn.Linear(net.head.in_features, 1)
        self.act = _Swish()
        pairs = [(self.stem, net.stem)] + [
            (getattr(mb, n), getattr(nb, n)) for mb, nb in zip(self.blocks, net.blocks)
            for n in ("conv1", "conv2", "skip") if getattr(nb, n) is not None]
        with torch.no_grad():
            for mine, theirs in pairs:
                pw = mine.parametrizations.weight
                pw.original0.copy_(theirs.log_g.exp().view_as(pw.original0))  # g
                pw.original1.copy_(theirs.weight_v)                            # v
                if theirs.bias is not None:
                    mine.bias.copy_(theirs.bias)
            self.head.load_state_dict(net.head.state_dict())

    def forward(self, x):
        h = self.act(self.stem(x))
        for b in self.blocks:
            h = b(h)
        return self.head(h.sum((2, 3))).squeeze(1)


def energy_and_grad(model, x, autocast=None):
    x = x.detach().requires_grad_()
    if autocast is None:
        e = model(x)
    else:
        with torch.autocast(x.device.type, dtype=autocast):
            e = model(x)
    (g,) = torch.autograd.grad(e.sum(), x)
    return e, g


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--reps", type=int, default=15, help="timed rounds (all variants each)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--bf16", action="store_true", help="also time bf16 autocast")
    ap.add_argument("--csv", action="store_true", help="write benchmarks/results/*.csv")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    net = EnergyNet("cifar10").to(dev)
    data = [torch.rand(args.batch, 3, 32, 32, device=dev) for _ in range(2)]
    net.data_init(data)  # realistic weight scales, as after training starts
    base = Baseline(net).to(dev)
    x = torch.rand(args.batch, 3, 32, 32, device=dev)
    e0, g0 = energy_and_grad(base, x)
    e1, g1 = energy_and_grad(net, x)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(e1, e0) < 1e-4 and rel(g1, g0) < 1e-4, (rel(e1, e0), rel(g1, g0))

    base_cl = Baseline(net).to(dev).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    frozen = copy.deepcopy(net).freeze()
    frozen_cl = copy.deepcopy(net).freeze(channels_last=True)
    bf16 = torch.bfloat16
    variants = [
        ("baseline: parametrizations.weight_norm, x*sigmoid(x)", lambda: energy_and_grad(base, x)),
        ("baseline, channels_last", lambda: energy_and_grad(base_cl, x_cl)),
        ("vaebm EnergyNet (training mode)", lambda: energy_and_grad(net, x)),
        ("vaebm frozen", lambda: energy_and_grad(frozen, x)),
        ("vaebm frozen + channels_last", lambda: energy_and_grad(frozen_cl, x)),
    ]
    if args.bf16:
        variants += [("baseline, bf16 autocast", lambda: energy_and_grad(base, x, bf16)),
                     ("vaebm frozen + channels_last, bf16 autocast",
                      lambda: energy_and_grad(frozen_cl, x, bf16))]
    errs = {}
    for name, fn in variants:  # every variant computes the same thing before it is timed
        e, g = fn()
        errs[name] = (rel(e, e0), rel(g, g0))
        tol = 0.2 if "bf16" in name else 1e-4  # bf16 keeps ~3 digits through 16 convs
        assert max(errs[name]) < tol, (name, errs[name])
    # interleaved rounds: on a shared machine, load changes hit every variant alike
    times = {name: [] for name, _ in variants}
    for r in range(args.warmup + args.reps):
        for name, fn in variants:
            t = bench(fn, dev, warmup=0, reps=1)["median_ms"]
            if r >= args.warmup:
                times[name].append(t)
    rows = []
    for name, _ in variants:
        ts = times[name]
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else ts * 3
        rows.append({"variant": name, "batch": args.batch, "median_ms": statistics.median(ts),
                     "min_ms": min(ts),
                     "q1_ms": q[0], "q3_ms": q[2], "reps": len(ts),
                     "rel_err_E": errs[name][0], "rel_err_grad": errs[name][1]})
    for r in rows:  # min is the steadier estimate when other jobs share the cores
        r["speedup"] = rows[0]["median_ms"] / r["median_ms"]
        r["speedup_min"] = rows[0]["min_ms"] / r["min_ms"]
    print(f"\nEnergyNet('cifar10') forward + d/dx, batch {args.batch}, {dev.type}\n"
          f"machine: {machine(dev)}\n")
    print(markdown(rows, ["variant", "median_ms", "min_ms", "q1_ms", "q3_ms", "speedup",
                          "speedup_min", "rel_err_grad"]))
    if args.csv:
        print("\nwrote", write_csv("bench_energy", rows, dev))


if __name__ == "__main__":
    main()
