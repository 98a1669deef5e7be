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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vaebm", description="VAEBM: train, sample, evaluate.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("backends", help=cmd_backends.__doc__).set_defaults(func=cmd_backends)
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
