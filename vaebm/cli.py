"""The ``vaebm`` command. Each subcommand is one ``cmd_<name>(args)`` function registered in
``_parser``; heavy imports happen inside the commands so ``vaebm --help`` stays fast."""

from __future__ import annotations

import argparse
import sys


def cmd_backends(args) -> int:
    """Which kernel backends can run here (builds them on first use)."""
    import torch

    from .ops import available_backends

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        for name, reason in available_backends(dev).items():
            print(f"{dev:5s} {name:7s} {'ok' if reason is None else 'unavailable: ' + reason}")
    return 0


def cmd_info(args) -> int:
    """Parameter counts of the energy networks (the four of Table 7 unless presets are named)."""
    from .models.energy import PAPER_PRESETS, describe

    for i, preset in enumerate(args.presets or PAPER_PRESETS):
        print(("\n" if i else "") + describe(preset, width=args.width))
    return 0


def cmd_demo(args) -> int:
    """The 2-D likelihood experiment of Sec. 5.4 (25 Gaussians, embedded: nothing to download)."""
    from .toy.experiment import format_table, run_demo

    res = run_demo(args.out, paper=args.paper, plot=not args.no_plot, seed=args.seed)
    print(format_table(res))
    t = res["timings"]["total_s"]
    print(f"finished in {t:.0f} s; results, models and samples in {args.out}"
          + (f"; figure {res['figure']}" if res["figure"] else ""))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vaebm", description="VAEBM: train, sample, evaluate.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("backends", help=cmd_backends.__doc__).set_defaults(func=cmd_backends)
    demo = sub.add_parser("demo", help=cmd_demo.__doc__)
    demo.add_argument("--out", default="vaebm-demo-out", help="output folder")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--paper", action="store_true",
                      help="the paper's protocol: 100,000 test points, IWAE with 10,000 samples (slow)")
    demo.add_argument("--no-plot", action="store_true", help="skip the Fig. 4 style PNG")
    demo.set_defaults(func=cmd_demo)
    info = sub.add_parser("info", help=cmd_info.__doc__)
    info.add_argument("presets", nargs="*", help="EnergyNet presets (default: the paper's four)")
    info.add_argument("--width", type=float, default=1.0, help="channel width multiplier")
    info.set_defaults(func=cmd_info)
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
